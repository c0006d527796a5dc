//! `xlb trace`: a record per matching packet into the trace ring buffer, at most
//! TRACE_RATE_PER_CPU a second on each CPU. With no trace running, the cost is one array
//! load and a branch.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Reason,
    trace::{TRACE_ANY_SERVICE, TRACE_RATE_PER_CPU, TraceRecord},
};

use crate::{
    balance::{Hook, Target, Verdict},
    maps::{TRACE, TRACE_BUDGET, TRACE_FILTER},
    parse::L4Packet,
};

/// The reason a verdict is counted under.
#[inline(always)]
fn reason(verdict: &Verdict) -> Reason {
    match verdict {
        Verdict::Pass(r) | Verdict::Drop(r) | Verdict::Sent(_, r) | Verdict::Bounce(r) => *r,
        Verdict::Forward { .. } => Reason::Forwarded,
        Verdict::ToContainer { .. } => Reason::DeliveredPeer,
    }
}

/// Records a packet of a VIP flow and what was done with it, if a trace asks for it.
#[inline(always)]
pub fn packet<H: Hook>(
    ctx: &H,
    pkt: &L4Packet,
    target: &Target,
    verdict: &Verdict,
    new_flow: bool,
) {
    let Some(filter) = TRACE_FILTER.get(0) else {
        return;
    };
    if filter.enabled == 0 {
        return;
    }
    if (filter.service_id != TRACE_ANY_SERVICE && filter.service_id != target.service_id)
        || pkt.saddr & filter.src_mask != filter.src_addr
    {
        return;
    }
    record(
        pkt,
        target,
        reason(verdict),
        new_flow,
        ctx.ingress_ifindex(),
    );
}

/// Only while a trace runs: a subprogram, so the hot path does not carry it.
#[inline(never)]
fn record(pkt: &L4Packet, target: &Target, reason: Reason, new_flow: bool, ifindex: u32) {
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
    let r = entry.as_mut_ptr();
    unsafe {
        (*r).time_ns = now;
        (*r).saddr = pkt.saddr;
        (*r).daddr = pkt.daddr;
        (*r).sport = pkt.sport;
        (*r).dport = pkt.dport;
        (*r).proto = pkt.proto;
        (*r).mode = target.mode;
        (*r).new_flow = new_flow as u8;
        (*r)._pad = 0;
        (*r).reason = reason as u32;
        (*r).service_id = target.service_id;
        (*r).backend_id = target.backend_id;
        (*r).backend_addr = target.backend.addr[0];
        (*r).backend_port = target.backend.port;
        (*r).snat_port = target.snat.port;
        (*r).snat_addr = target.snat.addr;
        (*r).ifindex = ifindex;
        (*r)._pad2 = 0;
    }
    entry.submit(0);
}
