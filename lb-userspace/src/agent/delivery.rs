//! Local backends' delivery: the bridge a backend sits on (its `bridge` key, or else the
//! bridge its route goes out of: no key needed), the host-side veth of a container behind
//! it, and the interfaces the reply program is attached to. The reply program is attached
//! to a bridge (and a veth) before an apply that delivers there is queued, and detached
//! only once the newest apply delivers there no more.
use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Result;
use tracing::{error, info, warn};

use super::{Agent, Veths};
use crate::{
    bridgeport::{HostTables, VethPort, index_name},
    config::{BRIDGE_ROUTED, Mode},
    loader, localbridge,
    netdev::ifindex,
    state::{Delivery, DesiredState},
};

/// Where a backend on a local bridge is, as the host's tables say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Local {
    pub bridge: String,
    /// Its host-side veth on that bridge, once found: packets skip the bridge.
    pub veth: Option<VethPort>,
}

/// Whether a backend may be delivered on a local bridge: by its `bridge` key
/// (`BRIDGE_ROUTED`: never), or else in mode nat, if its route goes out of a bridge. fullnat
/// and dsr backends are wherever their route says; a bridge is for nat.
fn may_be_local(key: Option<&str>, mode: Mode) -> bool {
    match key {
        Some(bridge) => bridge != BRIDGE_ROUTED,
        None => mode == Mode::Nat,
    }
}

impl Agent {
    /// Resolves local bridges (and veths) to ifindexes in `effective`; returns the interfaces
    /// the reply program must be attached to for it.
    pub(super) fn deliver(&self, effective: &mut DesiredState, veths: &Veths) -> BTreeSet<String> {
        let mut reply_interfaces = BTreeSet::new();
        for (name, svc) in &mut effective.services {
            for (endpoint, b) in &mut svc.backends {
                if !may_be_local(b.bridge.as_deref(), svc.mode) {
                    continue;
                }
                let Some(local) = veths.get(&(b.bridge.clone(), endpoint.addr)) else {
                    continue;
                };
                b.delivery = Delivery {
                    bridge: ifindex(&local.bridge),
                    veth: local.veth,
                };
                if b.delivery.bridge == 0 {
                    let bridge = &local.bridge;
                    warn!(service = %name, backend = %endpoint, %bridge, "no such bridge; the kernel routes to this backend");
                } else {
                    reply_interfaces.insert(local.bridge.clone());
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

    /// Where each local backend and its host-side veth are, as the host's tables say now.
    pub(super) fn resolve_veths(&self) -> Veths {
        let candidates: BTreeSet<(Option<String>, IpAddr)> = self
            .desired
            .services
            .values()
            .flat_map(|svc| {
                svc.backends
                    .iter()
                    .filter(|(_, b)| may_be_local(b.bridge.as_deref(), svc.mode))
                    .map(|(endpoint, b)| (b.bridge.clone(), endpoint.addr))
            })
            .collect();
        if candidates.is_empty() {
            return Veths::new();
        }
        let tables = HostTables::read();
        let mut veths = Veths::new();
        for (key, addr) in candidates {
            let bridge = match &key {
                Some(bridge) => bridge.clone(),
                None => {
                    let route = localbridge::route_to(addr);
                    match route.and_then(|r| localbridge::bridge_of(&r, &tables.links)) {
                        Some(bridge) => bridge,
                        None => continue,
                    }
                }
            };
            let veth = tables.lookup(&bridge, addr);
            veths.insert((key, addr), Local { bridge, veth });
        }
        self.log_found(&veths);
        veths
    }

    /// One line per backend whose bridge was found by its route, when that changes.
    fn log_found(&self, veths: &Veths) {
        let found = |v: &Veths| -> BTreeSet<(IpAddr, String)> {
            v.iter()
                .filter(|((key, _), _)| key.is_none())
                .map(|((_, addr), l)| (*addr, l.bridge.clone()))
                .collect()
        };
        let (now, before) = (found(veths), found(&self.veths));
        for (addr, bridge) in now.difference(&before) {
            info!(backend = %addr, %bridge, "on a bridge of this host (by its route): delivered on the bridge, no routing");
        }
        for (addr, bridge) in before.difference(&now) {
            info!(backend = %addr, %bridge, "no longer reached through this bridge: routed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nat_backend_without_a_key_may_be_on_a_local_bridge() {
        assert!(may_be_local(None, Mode::Nat));
    }

    #[test]
    fn the_key_decides_when_there_is_one() {
        assert!(may_be_local(Some("docker0"), Mode::Nat));
        assert!(!may_be_local(Some(BRIDGE_ROUTED), Mode::Nat), "opted out");
        assert!(
            may_be_local(Some("br1"), Mode::Fullnat),
            "a container's bridge, whatever the mode (as before)"
        );
    }

    #[test]
    fn fullnat_and_dsr_backends_without_a_key_are_routed() {
        assert!(!may_be_local(None, Mode::Fullnat));
        assert!(!may_be_local(None, Mode::Dsr));
    }
}
