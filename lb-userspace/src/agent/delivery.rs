//! Local backends' delivery: the host-side veths of containers behind a bridge, and the
//! interfaces the reply program is attached to. The reply program is attached to a bridge
//! (and a veth) before any backend is delivered there, and detached only after none is.
use std::collections::BTreeSet;

use anyhow::Result;
use tracing::{error, warn};

use super::{Agent, Veths};
use crate::{
    bridgeport::{HostTables, index_name},
    loader,
    netdev::ifindex,
    state::{Delivery, DesiredState},
};

impl Agent {
    /// Resolves local bridges (and veths) to ifindexes in `effective`; returns the interfaces
    /// the reply program must be attached to for it.
    pub(super) fn deliver(&self, effective: &mut DesiredState, veths: &Veths) -> BTreeSet<String> {
        let mut reply_interfaces = BTreeSet::new();
        for (name, svc) in &mut effective.services {
            for (endpoint, b) in &mut svc.backends {
                let Some(bridge) = &b.bridge else { continue };
                b.delivery = Delivery {
                    bridge: ifindex(bridge),
                    veth: veths
                        .get(&(bridge.clone(), endpoint.addr))
                        .copied()
                        .flatten(),
                };
                if b.delivery.bridge == 0 {
                    warn!(service = %name, backend = %endpoint, %bridge, "no such bridge; the kernel routes to this backend");
                } else {
                    reply_interfaces.insert(bridge.clone());
                    let veth = b.delivery.veth.and_then(|v| index_name(v.ifindex));
                    reply_interfaces.extend(veth);
                }
            }
        }
        reply_interfaces
    }

    /// Before an apply: the reply program on both the current and the `wanted` interfaces.
    /// Returns them.
    pub(super) fn attach_reply_before(&mut self, wanted: &BTreeSet<String>) -> Result<Vec<String>> {
        let during: Vec<String> = wanted.union(&self.reply_interfaces).cloned().collect();
        if during.len() != self.reply_interfaces.len() {
            let pin_path = self.config.agent.pin_path.clone();
            loader::attach_reply(&mut self.ebpf, &pin_path, &during)?;
        }
        Ok(during)
    }

    /// After an apply: the reply program on the `wanted` interfaces only.
    pub(super) fn attach_reply_after(
        &mut self,
        wanted: BTreeSet<String>,
        during: &[String],
    ) -> Result<()> {
        if wanted != self.reply_interfaces || during.len() != wanted.len() {
            let after: Vec<String> = wanted.iter().cloned().collect();
            let pin_path = self.config.agent.pin_path.clone();
            loader::attach_reply(&mut self.ebpf, &pin_path, &after)?;
            self.reply_interfaces = wanted;
        }
        Ok(())
    }

    /// Reads the host's tables again and applies what changed for local backends.
    pub(super) fn refresh_veths(&mut self) {
        let veths = self.resolve_veths();
        if veths != self.veths {
            if let Err(e) = self.apply_with(veths) {
                error!("applying local delivery changes: {e:#}");
            }
            self.publish();
        }
    }

    /// Where each local backend's host-side veth is, as the host's tables say now.
    pub(super) fn resolve_veths(&self) -> Veths {
        let local = || {
            self.desired.services.values().flat_map(|svc| {
                svc.backends
                    .iter()
                    .filter_map(|(endpoint, b)| Some((b.bridge.as_ref()?, endpoint.addr)))
            })
        };
        if local().next().is_none() {
            return Veths::new();
        }
        let tables = HostTables::read();
        local()
            .map(|(bridge, addr)| ((bridge.clone(), addr), tables.lookup(bridge, addr)))
            .collect()
    }
}
