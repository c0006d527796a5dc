//! One service's sync, step by step. Each step writes, and updates the bookkeeping only for
//! what it wrote; an error leaves the maps valid for packets and agreeing with the
//! bookkeeping, and the next apply continues from there. `owed` is set whenever a
//! double-buffered slot flipped (a grace period is owed before it is written again).
use anyhow::{Context as _, Result, bail};
use lb_common::{Backend, VipKey, sizes::ring_blocks};
use tracing::warn;

use super::{
    AppliedBackend, AppliedService, Changes, CleanUp, Maps,
    ids::IdPool,
    plan::{Plan, RingInput, backend_value, service_value},
    rings::RingSpace,
};
use crate::state::ServiceSpec;

/// Step 1: new, revived and moved backends enter `BACKENDS`: no ring may name a backend that is
/// not there.
pub fn enter_backends(
    svc: &mut AppliedService,
    plan: &mut Plan,
    ids: &mut IdPool,
    maps: &mut impl Maps,
    changes: &mut Changes,
    owed: &mut bool,
) -> Result<()> {
    let service_id = svc.value.id;
    for entering in std::mem::take(&mut plan.entering) {
        let (id, new) = match entering.id {
            Some(id) => (id, false),
            None => {
                let id = ids.take().context("no free backend id")?;
                if let Err(e) = maps.reset_backend_counters(id) {
                    ids.untake(id);
                    return Err(e);
                }
                (id, true)
            }
        };
        let b = &entering.applied;
        let value = backend_value(&entering.endpoint, service_id, b.alive, &b.delivery);
        if let Err(e) = maps.set_backend(id, &value) {
            if new {
                ids.untake(id);
            }
            return Err(e);
        }
        *owed = true;
        svc.backends
            .insert(entering.endpoint, AppliedBackend { id, ..b.clone() });
        if new {
            plan.assign(&entering.endpoint, id);
            changes.backends_added += 1;
        }
    }
    Ok(())
}

/// Step 2: weights (they only change the ring, which records what it was built from).
pub fn set_weights(svc: &mut AppliedService, spec: &ServiceSpec) {
    for (endpoint, want) in &spec.backends {
        if let Some(b) = svc.backends.get_mut(endpoint) {
            b.weight = want.weight;
        }
    }
}

/// Where a new ring went.
pub struct Placement {
    offset: u32,
    table_size: u32,
    /// In free space (else over the ring in use).
    fresh: bool,
    /// What the bookkeeping records as the ring's input (None: a smaller stand-in, the
    /// requested one is tried again next time).
    input: Option<RingInput>,
}

/// Step 3: the ring, if its input changed: built, then written into free blocks when there are
/// enough adjacent ones, else over the ring in use. None: the map holds it already.
pub fn place_ring(
    svc: &mut AppliedService,
    input: &RingInput,
    rings: &mut RingSpace,
    maps: &mut impl Maps,
) -> Result<Option<Placement>> {
    if svc.ring_input.as_ref() == Some(input) {
        return Ok(None);
    }
    let ring = input.build();
    if svc.written && ring == maps.ring(svc.value.ring_offset, svc.value.table_size) {
        svc.ring_input = Some(input.clone());
        return Ok(None);
    }
    let table_size = ring.len() as u32;
    if let Some(offset) = rings.take(table_size) {
        if let Err(e) = maps.write_ring(offset, &ring) {
            rings.give_back(offset, table_size);
            return Err(e).context("writing the ring");
        }
        return Ok(Some(Placement {
            offset,
            table_size,
            fresh: true,
            input: Some(input.clone()),
        }));
    }
    if !svc.written {
        bail!("no free ring space for a table of {table_size} slots");
    }
    // Only scattered free blocks get here (validation keeps the total within RINGS). The
    // new ring goes over the one in use, slot by slot: each holds its old or its new
    // backend, both valid until the clean-up after the next grace period. A larger table
    // waits (the next apply tries again).
    warn!(
        service = %svc.name,
        table_size,
        free_blocks = rings.free_blocks(),
        "no adjacent free ring space: rewriting the ring in place"
    );
    let current = svc.value.table_size;
    let (ring, recorded) = if ring_blocks(table_size) > ring_blocks(current) {
        (input.resized(current).build(), None)
    } else {
        (ring, Some(input.clone()))
    };
    // Until the write is complete, nobody knows what the ring holds.
    svc.ring_input = None;
    maps.write_ring(svc.value.ring_offset, &ring)
        .context("rewriting the ring in place")?;
    Ok(Some(Placement {
        offset: svc.value.ring_offset,
        table_size: ring.len() as u32,
        fresh: false,
        input: recorded,
    }))
}

/// Step 4: the flip: the service's whole value (ring, mode, SNAT pool) in one store. The ring it
/// replaced is freed after a grace period.
pub fn flip(
    svc: &mut AppliedService,
    spec: &ServiceSpec,
    placed: Option<Placement>,
    rings: &mut RingSpace,
    maps: &mut impl Maps,
    changes: &mut Changes,
    owed: &mut bool,
) -> Result<()> {
    let service_id = svc.value.id;
    let (offset, table_size) = placed
        .as_ref()
        .map_or((svc.value.ring_offset, svc.value.table_size), |p| {
            (p.offset, p.table_size)
        });
    let value = service_value(spec, service_id, offset, table_size);
    let fresh = placed.as_ref().is_some_and(|p| p.fresh);
    if !svc.written || value != svc.value {
        if let Err(e) = maps.set_service(service_id, &value) {
            if fresh {
                rings.give_back(offset, table_size);
            }
            return Err(e).context("flipping the service");
        }
        *owed = true;
        if fresh && svc.written {
            rings.retire(svc.value.ring_offset, svc.value.table_size);
        }
        svc.value = value;
        svc.written = true;
    }
    if let Some(placement) = placed {
        svc.ring_input = placement.input;
        svc.ring_rebuilds += 1;
        changes.rings_written += 1;
        if value.table_size == 0 {
            warn!(service = %spec.name, "no backend can take new flows");
        }
    }
    Ok(())
}

/// Step 5: the VIP leads to the service (once; its value never changes).
pub fn publish(svc: &mut AppliedService, key: &VipKey, maps: &mut impl Maps) -> Result<()> {
    if !svc.in_vips {
        maps.insert_vip(key, svc.value.id)
            .context("publishing the VIP")?;
        svc.in_vips = true;
    }
    Ok(())
}

/// Step 6: after a grace period, when no ring names them any more: dead backends lose ALIVE
/// (their flows re-hash), removed ones their slot (the id is free after another one).
pub fn clean_up(
    svc: &mut AppliedService,
    clean_up: CleanUp,
    ids: &mut IdPool,
    maps: &mut impl Maps,
    changes: &mut Changes,
    owed: &mut bool,
) -> Result<()> {
    for (endpoint, id) in clean_up.dying {
        let b = svc.backends.get_mut(&endpoint).expect("planned");
        maps.set_backend(
            id,
            &backend_value(&endpoint, svc.value.id, false, &b.delivery),
        )?;
        *owed = true;
        b.alive = false;
    }
    for (endpoint, id) in clean_up.removed {
        maps.set_backend(id, &Backend::default())?;
        *owed = true;
        svc.backends.remove(&endpoint);
        ids.quarantine(id);
        changes.backends_removed += 1;
    }
    Ok(())
}
