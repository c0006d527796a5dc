//! A service's `allow` list in the `ALLOW` trie, written around the flip so that no packet
//! ever sees a list narrower than both the old and the new one: prefixes the new list adds
//! go in before the flip (which sets or clears `SERVICE_ALLOW`), prefixes it drops leave
//! after it. A service without a list has no entries and no flag, and costs packets nothing.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use ipnet::IpNet;

use super::{AppliedService, Maps};
use crate::state::ServiceSpec;

/// Before the flip: the prefixes of the new list that the trie lacks.
pub fn enter(svc: &mut AppliedService, spec: &ServiceSpec, maps: &mut impl Maps) -> Result<()> {
    for net in &spec.allow {
        if !svc.allow.contains(net) {
            maps.insert_allow(svc.value.id, net)
                .with_context(|| format!("adding {net} to the allow list"))?;
            svc.allow.insert(*net);
        }
    }
    Ok(())
}

/// After the flip: the prefixes the new list no longer has.
pub fn leave(svc: &mut AppliedService, spec: &ServiceSpec, maps: &mut impl Maps) -> Result<()> {
    remove_except(svc, &spec.allow.iter().copied().collect(), maps)
}

/// Removes every prefix of the service but `keep` (all of them when the service goes).
pub fn remove_except(
    svc: &mut AppliedService,
    keep: &BTreeSet<IpNet>,
    maps: &mut impl Maps,
) -> Result<()> {
    let gone: Vec<IpNet> = svc.allow.difference(keep).copied().collect();
    for net in gone {
        maps.remove_allow(svc.value.id, &net)
            .with_context(|| format!("removing {net} from the allow list"))?;
        svc.allow.remove(&net);
    }
    Ok(())
}

/// Pinned entries split by owner: those of adopted services, and those of ids no service
/// holds (a previous agent was stopped while removing a service), to remove.
pub fn adopt(
    maps: &impl Maps,
    services: &mut BTreeMap<lb_common::VipKey, AppliedService>,
) -> Result<Vec<(u32, IpNet)>> {
    let mut stale = Vec::new();
    for (id, net) in maps
        .allow_prefixes()
        .context("reading pinned allow lists")?
    {
        match services.values_mut().find(|s| s.value.id == id) {
            Some(svc) => {
                svc.allow.insert(net);
            }
            None => stale.push((id, net)),
        }
    }
    Ok(stale)
}

/// Removes stale entries; returns those that failed (to retry) and the ids left clean.
pub fn clear_stale(
    stale: Vec<(u32, IpNet)>,
    maps: &mut impl Maps,
    failed: &mut Vec<String>,
) -> (Vec<(u32, IpNet)>, Vec<u32>) {
    let ids: BTreeSet<u32> = stale.iter().map(|(id, _)| *id).collect();
    let mut left = Vec::new();
    for (id, net) in stale {
        if let Err(e) = maps.remove_allow(id, &net) {
            failed.push(format!("stale allow entry {id} {net}: {e:#}"));
            left.push((id, net));
        }
    }
    let clean = ids
        .into_iter()
        .filter(|id| !left.iter().any(|(i, _)| i == id))
        .collect();
    (left, clean)
}
