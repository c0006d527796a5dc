//! Entry points of the data path: the balancer (XDP, or TC ingress), delivery to local
//! bridges, and reverse NAT (TC). The pipeline lives in the modules; these functions only
//! dispatch and count verdicts.
#![no_std]
#![no_main]
// Map keys stay references: a key passed by value is another copy on the 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod balance;
mod balance6;
mod conntrack;
mod csum;
mod decided;
mod deliver;
mod encap;
mod flowcache;
mod hooks;
mod icmp;
mod icmp6;
mod icmp_tc;
mod maglev;
mod maps;
mod nat;
mod object;
mod parse;
mod parse6;
mod replies;
mod route;
mod snat;
mod stats;
mod trace;

use aya_ebpf::{
    bindings::{
        TC_ACT_SHOT,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{FlowKey, Reason};

use crate::{
    balance::Verdict,
    conntrack::Table,
    deliver::Marked,
    nat::End,
    parse::{Parsed, Segment, parse},
    parse6::{Parsed6, parse6},
};

/// tcx "next" / cls_act "unspec": let the packet continue to other programs and the stack.
const TC_ACT_NEXT: i32 = -1;

#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    let (action, reason) = match balance::balance(&ctx) {
        Verdict::Pass(reason) => (XDP_PASS, reason),
        Verdict::Drop(reason) => (XDP_DROP, reason),
        Verdict::Forward { deliver_to } => {
            if deliver_to != 0 && !deliver::mark(&ctx, deliver_to) {
                stats::count(Reason::DeliverError);
            }
            (XDP_PASS, Reason::Forwarded)
        }
        Verdict::ToContainer { backend_id } => {
            if !deliver::mark_container(&ctx, backend_id) {
                stats::count(Reason::DeliverError);
            }
            (XDP_PASS, Reason::DeliveredPeer)
        }
        Verdict::Sent(action, reason) => (action, reason),
        Verdict::Bounce(reason) => (XDP_TX, reason),
    };
    stats::count(reason);
    action
}

/// The balancer at TC ingress instead of XDP (`xdp_mode = "tc"`): on a veth front, XDP
/// copies many skbs and defers them to NAPI, which costs more than the balancing. A packet
/// for a local bridge is redirected there at once.
#[classifier]
pub fn xlb_tc_balance(ctx: TcContext) -> i32 {
    let (action, reason) = match balance::balance(&ctx) {
        Verdict::Pass(reason) => (TC_ACT_NEXT, reason),
        Verdict::Drop(reason) => (TC_ACT_SHOT, reason),
        Verdict::Forward { deliver_to: 0 } => (TC_ACT_NEXT, Reason::Forwarded),
        Verdict::Forward { deliver_to } => (deliver::redirect(deliver_to), Reason::Forwarded),
        Verdict::ToContainer { backend_id } => (
            deliver::to_container(&ctx, backend_id),
            Reason::DeliveredPeer,
        ),
        // The TC hook never sends by itself.
        Verdict::Sent(_, reason) => (TC_ACT_NEXT, reason),
        Verdict::Bounce(reason) => (deliver::bounce(&ctx), reason),
    };
    stats::count(reason);
    action
}

/// TC ingress of a front NIC: hands packets XDP marked for a local container to it (or to
/// its bridge).
#[classifier]
pub fn xlb_tc_ingress(ctx: TcContext) -> i32 {
    match deliver::marked(&ctx) {
        Some(Marked::Bridge(ifindex)) => deliver::redirect(ifindex),
        Some(Marked::Container(backend_id)) => deliver::to_container(&ctx, backend_id),
        None => TC_ACT_NEXT,
    }
}

/// Eth + VLAN + IPv4 with options + TCP: all the headers the reverse NAT reads.
const MAX_HEADERS: usize = parse::ETH_HLEN + 4 + 60 + 20;
/// The same for IPv6, with room for a few extension headers.
const MAX_HEADERS6: usize = parse::ETH_HLEN + 4 + parse6::IPV6_HLEN + 64 + 20;

/// Whether part of the skb's data is outside its linear buffer (where headers may be).
#[inline(always)]
fn nonlinear(ctx: &TcContext) -> bool {
    ctx.data_end() - ctx.data() < ctx.len() as usize
}

/// Rewrites a reply of a NATed flow (or an ICMP error about one) back to its VIP; returns the flow's ingress interface.
#[inline(always)]
fn reverse_nat(ctx: &TcContext) -> Option<u32> {
    let pkt = match parse(ctx) {
        Parsed::L4(pkt) => pkt,
        Parsed::Icmp(icmp) => return icmp_tc::reverse_nat(ctx, &icmp),
        Parsed::Ipv6(l3_off) => return reverse_nat6(ctx, l3_off),
        // Headers partly outside the linear buffer: pull them in and look again. Only
        // then, since pulling can copy the skb head.
        Parsed::Malformed(_) if nonlinear(ctx) => {
            ctx.pull_data(ctx.len().min(MAX_HEADERS as u32)).ok()?;
            match parse(ctx) {
                Parsed::L4(pkt) => pkt,
                _ => return None,
            }
        }
        _ => return None,
    };
    let rev = reply_of(&pkt.flow_key(), &pkt)?;
    count_rewrite(nat::rewrite_tc(
        ctx,
        &pkt,
        End::Source,
        rev.vip[0],
        rev.vip_port,
    ));
    Some(rev.ifindex)
}

/// `reverse_nat` for IPv6 at `l3_off`.
#[inline(always)]
fn reverse_nat6(ctx: &TcContext, l3_off: usize) -> Option<u32> {
    let pkt = match parse6(ctx, l3_off) {
        Parsed6::L4(pkt) => pkt,
        Parsed6::Icmp(icmp) => return icmp6::reverse_nat(ctx, &icmp),
        Parsed6::Malformed(_) if nonlinear(ctx) => {
            ctx.pull_data(ctx.len().min(MAX_HEADERS6 as u32)).ok()?;
            match parse6(ctx, l3_off) {
                Parsed6::L4(pkt) => pkt,
                _ => return None,
            }
        }
        _ => return None,
    };
    let rev = reply_of(&pkt.flow_key(), &pkt)?;
    count_rewrite(nat::rewrite_tc6(
        ctx,
        &pkt,
        End::Source,
        &rev.vip,
        rev.vip_port,
    ));
    Some(rev.ifindex)
}

/// The mapping of a nat flow's reply, with the reply's FIN or RST recorded on the flow.
#[inline(always)]
fn reply_of<P: Segment>(reply: &FlowKey, pkt: &P) -> Option<conntrack::ReplyTo> {
    let rev = conntrack::reply_mapping(reply)?;
    match rev.flow {
        Some(flow) => conntrack::mark_reply(flow, rev.table, pkt.fin(), pkt.rst()),
        None if rev.table == Table::New || pkt.closing() => conntrack::reply_seen(
            &conntrack::forward_of_reply(reply, &rev),
            rev.table,
            pkt.fin(),
            pkt.rst(),
        ),
        None => {}
    }
    Some(rev)
}

#[inline(always)]
fn count_rewrite(result: Result<(), i64>) {
    match result {
        Ok(()) => stats::count(Reason::RevNat),
        Err(_) => stats::count(Reason::RevNatError),
    }
}

/// TC egress of a front NIC: replies routed by the kernel get the VIP back as source.
#[classifier]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    let _ = reverse_nat(&ctx);
    TC_ACT_NEXT
}

/// TC ingress of a local container bridge: replies get the VIP back and leave by the NIC
/// their flow came in on, without passing the host's netfilter.
#[classifier]
pub fn xlb_tc_reply(ctx: TcContext) -> i32 {
    match reverse_nat(&ctx) {
        Some(ifindex) if ifindex != 0 => deliver::redirect(ifindex),
        _ => TC_ACT_NEXT,
    }
}
