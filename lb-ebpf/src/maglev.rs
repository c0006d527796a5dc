//! Maglev ring lookup. The ring itself is built by the agent (lb-userspace/src/maglev.rs).
use lb_common::{BACKEND_IN_USE, Backend, FlowKey, Service, flow_hash, sizes::RING_CHUNK};

use crate::maps::{BACKENDS, RINGS};

/// The backend the service's active ring assigns to this flow.
#[inline(always)]
pub fn pick(svc: &Service, key: &FlowKey) -> Option<(u32, &'static Backend)> {
    if svc.table_size == 0 {
        return None;
    }
    let slot = svc.ring_offset + flow_hash(key) % svc.table_size;
    let chunk = RINGS.get(slot / RING_CHUNK)?;
    let backend_id = chunk[(slot % RING_CHUNK) as usize];
    let backend = BACKENDS.get(backend_id)?;
    if backend.flags & BACKEND_IN_USE == 0 {
        return None;
    }
    Some((backend_id, backend))
}
