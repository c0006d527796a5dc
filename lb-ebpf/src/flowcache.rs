//! A per-CPU, direct-mapped cache in front of the shared conntrack. An established flow is
//! forwarded after one array slot and a key compare: no VIP and no conntrack hash lookup.
//! An entry decides nothing on its own: its backend is checked on every packet (a dead or
//! removed backend sends the flow to the slow path, which re-hashes it), and it expires
//! after FLOW_REFRESH_NS, so the slow path still sees each flow about once a second and
//! keeps conntrack's LRU position, idle timer and reply mapping fresh.
use lb_common::{FlowKey, sizes::FLOW_CACHE_SLOTS, sizes::FLOW_REFRESH_NS};

use crate::{
    decided::Decided,
    maps::{self, FLOW_CACHE},
    parse6::copy_addr,
};

/// One slot: a cache line and a quarter (the SNAT address is 16 bytes for either family).
#[repr(C)]
pub struct CachedFlow {
    key: FlowKey,
    service_id: u32,
    backend_id: u32,
    /// When the slow path last vouched for this flow.
    checked_ns: u64,
    snat_addr: [u32; 4],
    snat_port: u16,
    mode: u8,
    flags: u8,
}

#[inline(always)]
fn slot(hash: u32) -> u32 {
    hash & (FLOW_CACHE_SLOTS - 1)
}

/// Writes the target of a flow the slow path saw less than a second ago, whose backend
/// still takes it, into `out`; false (and `out` untouched) if there is none. In place: a
/// returned copy would take another slot of the balancer's stack.
#[inline(always)]
pub fn lookup(key: &FlowKey, hash: u32, now: u64, out: &mut Decided) -> bool {
    let Some(entry) = FLOW_CACHE.get(slot(hash)) else {
        return false;
    };
    if entry.key != *key || now.wrapping_sub(entry.checked_ns) > FLOW_REFRESH_NS {
        return false;
    }
    let Some(backend) = maps::backend(entry.backend_id) else {
        return false;
    };
    if !backend.is_alive() || backend.service_id != entry.service_id {
        return false;
    }
    out.service_id = entry.service_id;
    out.mode = entry.mode;
    out.flags = entry.flags;
    out.new_flow = false;
    out.backend_id = entry.backend_id;
    copy_addr(&mut out.snat.addr, &entry.snat_addr);
    out.snat.port = entry.snat_port;
    true
}

/// Records what the slow path decided (overwriting whatever flow had the slot).
#[inline(always)]
pub fn remember(key: &FlowKey, hash: u32, target: &Decided, now: u64) {
    if let Some(entry) = FLOW_CACHE.get_ptr_mut(slot(hash)) {
        // Field by field: a whole CachedFlow built first would take stack room.
        unsafe {
            (*entry).key = *key;
            (*entry).service_id = target.service_id;
            (*entry).backend_id = target.backend_id;
            (*entry).checked_ns = now;
            copy_addr(&mut (*entry).snat_addr, &target.snat.addr);
            (*entry).snat_port = target.snat.port;
            (*entry).mode = target.mode;
            (*entry).flags = target.flags;
        }
    }
}

/// Empties this CPU's slot if it holds `key`: the flow was decided anew, and its cached
/// target (a backend, a SNAT port) may be stale. Other CPUs' copies expire within
/// FLOW_REFRESH_NS; a closing packet, after which a flow may reopen, caches none.
#[inline(always)]
pub fn forget(key: &FlowKey, hash: u32) {
    if let Some(entry) = FLOW_CACHE.get_ptr_mut(slot(hash)) {
        unsafe {
            if (*entry).key == *key {
                (*entry).checked_ns = 0;
            }
        }
    }
}
