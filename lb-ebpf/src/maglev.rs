//! Maglev ring lookup. The ring itself is built by the agent (lb-userspace/src/maglev.rs).
use lb_common::{BACKEND_IN_USE, Backend, Service, sizes::RING_CHUNK};

use crate::maps::{self, RINGS};

/// The backend the service's active ring assigns to a flow of this `flow_hash`. A slot that
/// names no backend of this service (which the agent's ordering rules out) gives None rather
/// than a stranger's backend.
#[inline(always)]
pub fn pick(svc: &Service, hash: u32) -> Option<(u32, &'static Backend)> {
    if svc.table_size == 0 {
        return None;
    }
    let slot = svc.ring_offset + hash % svc.table_size;
    let chunk = RINGS.get(slot / RING_CHUNK)?;
    let backend_id = chunk[(slot % RING_CHUNK) as usize];
    let backend = maps::backend(backend_id)?;
    if backend.flags & BACKEND_IN_USE == 0 || backend.service_id != svc.id {
        return None;
    }
    Some((backend_id, backend))
}
