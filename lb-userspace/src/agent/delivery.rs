//! Local backends' delivery: the host-side veths of containers behind a bridge, and the
//! interfaces the reply program is attached to. The reply program is attached to a bridge
//! (and a veth) before an apply that delivers there is queued, and detached only once the
//! newest apply delivers there no more.
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

    /// Before an apply: the reply program on both the interfaces it is on and the `wanted`
    /// ones (those the apply delivers to).
    pub(super) fn attach_reply_before(&mut self, wanted: BTreeSet<String>) -> Result<()> {
        let during: BTreeSet<String> = wanted.union(&self.reply_interfaces).cloned().collect();
        if during != self.reply_interfaces {
            let pin_path = self.config.agent.pin_path.clone();
            let list: Vec<String> = during.iter().cloned().collect();
            loader::attach_reply(&mut self.ebpf, &pin_path, &list)?;
            self.reply_interfaces = during;
        }
        self.reply_wanted = wanted;
        Ok(())
    }

    /// After the newest apply: the reply program on the interfaces it wanted only.
    pub(super) fn attach_reply_after(&mut self) -> Result<()> {
        if self.reply_wanted != self.reply_interfaces {
            let after: Vec<String> = self.reply_wanted.iter().cloned().collect();
            let pin_path = self.config.agent.pin_path.clone();
            loader::attach_reply(&mut self.ebpf, &pin_path, &after)?;
            self.reply_interfaces = self.reply_wanted.clone();
        }
        Ok(())
    }

    /// Reads the host's tables again and applies what changed for local backends.
    pub(super) fn refresh_veths(&mut self) {
        let veths = self.resolve_veths();
        if veths != self.veths
            && let Err(e) = self.apply_with(veths)
        {
            error!("applying local delivery changes: {e:#}");
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
