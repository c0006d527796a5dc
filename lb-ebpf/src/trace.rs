//! `xlb trace`: a record per matching packet into the trace ring buffer, at most
//! TRACE_RATE_PER_CPU a second on each CPU. With no trace running, the cost is one array
//! load and a branch.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Backend, Reason,
    trace::{TRACE_ANY_SERVICE, TRACE_RATE_PER_CPU, TraceRecord},
};

use crate::{
    balance::{FlowPacket, Hook, Verdict},
    decided::Decided,
    maps::{TRACE, TRACE_BUDGET, TRACE_FILTER},
    parse6::copy_addr,
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
fn wanted<P: FlowPacket>(pkt: &P, service_id: u32) -> bool {
    if unsafe { core::ptr::read_volatile(&XLB_TRACE_HOOKS) } == 0 {
        return false;
    }
    let Some(filter) = TRACE_FILTER.get(0) else {
        return false;
    };
    let [first, second] = filter.service_ids;
    filter.enabled != 0
        && (first == TRACE_ANY_SERVICE || first == service_id || second == service_id)
        && (filter.family == 0
            || (filter.family == P::FAMILY as u32
                && pkt.source_in(&filter.src_addr, &filter.src_mask)))
}

/// Records a packet of a VIP flow sent to its backend, and what was done with it.
#[inline(always)]
pub fn packet<H: Hook, P: FlowPacket>(
    ctx: &H,
    pkt: &P,
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
pub fn dropped<H: Hook, P: FlowPacket>(ctx: &H, pkt: &P, decided: &Decided, reason: Reason) {
    if wanted(pkt, decided.service_id) {
        record(pkt, decided, None, reason, ctx.ingress_ifindex());
    }
}

/// Only while a trace runs: a subprogram, so the hot path does not carry it.
#[inline(never)]
fn record<P: FlowPacket>(
    pkt: &P,
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
    const NO_ADDR: [u32; 4] = [0; 4];
    let (has_backend, backend_addr, backend_port) = match backend {
        Some(b) => (1, &b.addr, b.port),
        None => (0, &NO_ADDR, 0),
    };
    let key = pkt.flow_key();
    let r = entry.as_mut_ptr();
    unsafe {
        (*r).time_ns = now;
        copy_addr(&mut (*r).saddr, &key.src);
        copy_addr(&mut (*r).daddr, &key.dst);
        (*r).sport = key.src_port;
        (*r).dport = key.dst_port;
        (*r).proto = key.proto;
        (*r).mode = decided.mode;
        (*r).new_flow = (decided.new_flow && has_backend != 0) as u8;
        (*r).has_backend = has_backend;
        (*r).reason = reason as u32;
        (*r).service_id = decided.service_id;
        (*r).backend_id = decided.backend_id;
        copy_addr(&mut (*r).backend_addr, backend_addr);
        (*r).backend_port = backend_port;
        (*r).snat_port = decided.snat.port;
        copy_addr(&mut (*r).snat_addr, &decided.snat.addr);
        (*r).ifindex = ifindex;
        (*r).family = P::FAMILY;
        // Byte by byte: three zero bytes at once become a library memset call.
        for byte in 0..3 {
            core::ptr::write_volatile(&raw mut (*r)._pad[byte], 0);
        }
    }
    entry.submit(0);
}
