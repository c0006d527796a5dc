//! A per-CPU, direct-mapped cache in front of the shared conntrack. An established flow is
//! forwarded after one array slot and a key compare: no VIP and no conntrack hash lookup.
//! An entry decides nothing on its own: its backend is checked on every packet (a dead or
//! removed backend sends the flow to the slow path, which re-hashes it), and it expires
//! after FLOW_REFRESH_NS, so the slow path still sees each flow about once a second and
//! keeps conntrack's LRU position, idle timer and reply mapping fresh.
use lb_common::{Backend, FlowKey, sizes::FLOW_CACHE_SLOTS, sizes::FLOW_REFRESH_NS};

use crate::maps::{BACKENDS, FLOW_CACHE};

#[repr(C)]
pub struct CachedFlow {
    key: FlowKey,
    service_id: u32,
    backend_id: u32,
    /// When the slow path last vouched for this flow.
    checked_ns: u64,
}

#[inline(always)]
fn slot(hash: u32) -> u32 {
    hash & (FLOW_CACHE_SLOTS - 1)
}

/// (service id, backend id, backend) of a flow the slow path saw less than a second ago,
/// whose backend still takes it.
#[inline(always)]
pub fn lookup(key: &FlowKey, hash: u32, now: u64) -> Option<(u32, u32, &'static Backend)> {
    let entry = FLOW_CACHE.get(slot(hash))?;
    if entry.key != *key || now.wrapping_sub(entry.checked_ns) > FLOW_REFRESH_NS {
        return None;
    }
    let backend = BACKENDS.get(entry.backend_id)?;
    if !backend.is_alive() || backend.service_id != entry.service_id {
        return None;
    }
    Some((entry.service_id, entry.backend_id, backend))
}

/// Records what the slow path decided (overwriting whatever flow had the slot).
#[inline(always)]
pub fn remember(key: &FlowKey, hash: u32, service_id: u32, backend_id: u32, now: u64) {
    if let Some(entry) = FLOW_CACHE.get_ptr_mut(slot(hash)) {
        unsafe {
            (*entry).key = *key;
            (*entry).service_id = service_id;
            (*entry).backend_id = backend_id;
            (*entry).checked_ns = now;
        }
    }
}
