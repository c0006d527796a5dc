//! Per-CPU counters: plain adds, no atomics, summed by the agent.
use lb_common::{Counters, FlowTable, Reason};

use crate::maps::{BACKEND_STATS, REASONS, SERVICE_STATS, TABLE_STATS};

/// What happened to a flow table entry.
#[derive(Clone, Copy)]
pub enum TableOp {
    Added,
    Removed,
    Failed,
}

#[inline(always)]
pub fn table(table: FlowTable, op: TableOp) {
    if let Some(c) = TABLE_STATS.get_ptr_mut(table as u32) {
        let c = unsafe { &mut *c };
        match op {
            TableOp::Added => c.added += 1,
            TableOp::Removed => c.removed += 1,
            TableOp::Failed => c.failed += 1,
        }
    }
}

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = REASONS.get_ptr_mut(reason as u32) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn add(slot: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = slot {
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
        c.new_flows += new_flow as u64;
    }
}

#[inline(always)]
pub fn count_traffic(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    add(SERVICE_STATS.get_ptr_mut(service_id), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}
