//! `xlb trace`: a record per matching packet into the trace ring buffer, at most
//! TRACE_RATE_PER_CPU a second on each CPU. With no trace running, the cost is one array
//! load and a branch.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Backend, Reason,
    trace::{TRACE_ANY_SERVICE, TRACE_RATE_PER_CPU, TraceRecord},
};

use crate::{
    balance::{Decided, Hook, Verdict},
    maps::{TRACE, TRACE_BUDGET, TRACE_FILTER},
    parse::L4Packet,
};

/// 0 at load time takes the trace hooks out of the program (the verifier removes the dead
/// code): the benchmark's baseline for what tracing costs while no trace runs.
#[unsafe(no_mangle)]
static XLB_TRACE_HOOKS: u8 = 1;

/// The reason a verdict is counted under.
#[inline(always)]
fn reason(verdict: &Verdict) -> Reason {
    match verdict {
        Verdict::Pass(r) | Verdict::Drop(r) | Verdict::Sent(_, r) | Verdict::Bounce(r) => *r,
        Verdict::Forward { .. } => Reason::Forwarded,
        Verdict::ToContainer { .. } => Reason::DeliveredPeer,
    }
}

/// Whether a running trace asks for this packet of this service.
#[inline(always)]
fn wanted(pkt: &L4Packet, service_id: u32) -> bool {
    if unsafe { core::ptr::read_volatile(&XLB_TRACE_HOOKS) } == 0 {
        return false;
    }
    let Some(filter) = TRACE_FILTER.get(0) else {
        return false;
    };
    filter.enabled != 0
        && (filter.service_id == TRACE_ANY_SERVICE || filter.service_id == service_id)
        && pkt.saddr & filter.src_mask == filter.src_addr
}

/// Records a packet of a VIP flow sent to its backend, and what was done with it.
#[inline(always)]
pub fn packet<H: Hook>(
    ctx: &H,
    pkt: &L4Packet,
    decided: &Decided,
    backend: &Backend,
    verdict: &Verdict,
) {
    if wanted(pkt, decided.service_id) {
        record(
            pkt,
            decided,
            Some(backend),
            reason(verdict),
            ctx.ingress_ifindex(),
        );
    }
}

/// Records a packet of a VIP flow dropped before it got a backend (allow list, no backend,
/// no flow, no route, SNAT ports).
#[inline(always)]
pub fn dropped<H: Hook>(ctx: &H, pkt: &L4Packet, decided: &Decided, reason: Reason) {
    if wanted(pkt, decided.service_id) {
        record(pkt, decided, None, reason, ctx.ingress_ifindex());
    }
}

/// Only while a trace runs: a subprogram, so the hot path does not carry it.
#[inline(never)]
fn record(
    pkt: &L4Packet,
    decided: &Decided,
    backend: Option<&Backend>,
    reason: Reason,
    ifindex: u32,
) {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = TRACE_BUDGET.get_ptr_mut(0) else {
        return;
    };
    let budget = unsafe { &mut *budget };
    let second = now / 1_000_000_000;
    if budget.second != second {
        budget.second = second;
        budget.used = 0;
    }
    if budget.used >= TRACE_RATE_PER_CPU {
        return;
    }
    let Some(mut entry) = TRACE.reserve::<TraceRecord>(0) else {
        return;
    };
    budget.used += 1;
    let (has_backend, backend_addr, backend_port) = match backend {
        Some(b) => (1, b.addr[0], b.port),
        None => (0, 0, 0),
    };
    let r = entry.as_mut_ptr();
    unsafe {
        (*r).time_ns = now;
        (*r).saddr = pkt.saddr;
        (*r).daddr = pkt.daddr;
        (*r).sport = pkt.sport;
        (*r).dport = pkt.dport;
        (*r).proto = pkt.proto;
        (*r).mode = decided.mode;
        (*r).new_flow = (decided.new_flow && has_backend != 0) as u8;
        (*r).has_backend = has_backend;
        (*r).reason = reason as u32;
        (*r).service_id = decided.service_id;
        (*r).backend_id = decided.backend_id;
        (*r).backend_addr = backend_addr;
        (*r).backend_port = backend_port;
        (*r).snat_port = decided.snat.port;
        (*r).snat_addr = decided.snat.addr;
        (*r).ifindex = ifindex;
        (*r)._pad2 = 0;
    }
    entry.submit(0);
}
