//! Entry points of the data path: XDP ingress (balance + DNAT) and TC egress (reverse NAT).
//! The pipeline lives in the modules; these functions only dispatch and count verdicts.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod deliver;
mod maglev;
mod maps;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{FAMILY_V4, Reason, VipAddrKey, VipKey};

use crate::{
    maps::{REV_NAT, VIP_ADDRS, VIPS},
    parse::{PacketBuf, Parsed, parse},
};

/// tcx "next" / cls_act "unspec": let the packet continue to other programs and the stack.
const TC_ACT_NEXT: i32 = -1;

#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    let (action, reason) = balance(&ctx);
    stats::count(reason);
    action
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> (u32, Reason) {
    let pkt = match parse(ctx) {
        Parsed::L4(pkt) => pkt,
        Parsed::Pass(reason) => return (XDP_PASS, reason),
        // Odd packets are ours to drop only when they are addressed to a VIP.
        Parsed::Fragment(daddr) if is_vip_addr(daddr) => return (XDP_DROP, Reason::DropFragment),
        Parsed::Fragment(_) => return (XDP_PASS, Reason::PassFragment),
        Parsed::Malformed(Some(daddr)) if is_vip_addr(daddr) => {
            return (XDP_DROP, Reason::DropMalformed);
        }
        Parsed::Malformed(_) => return (XDP_PASS, Reason::PassMalformed),
    };

    let vip = VipKey {
        addr: [pkt.daddr, 0, 0, 0],
        port: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
    };
    let Some(svc) = (unsafe { VIPS.get(vip) }) else {
        return (XDP_PASS, Reason::PassNotVip);
    };
    if pkt.has_ip_options {
        return (XDP_DROP, Reason::DropIpOptions);
    }

    let flow = pkt.flow_key();
    // Coarse (jiffies) time is plenty for idle timeouts, and cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let ifindex = ctx.ingress_ifindex() as u32;
    let (backend_id, backend, new_flow) = match conntrack::pinned_backend(&flow, svc, now, ifindex)
    {
        Some((id, backend)) => (id, backend, false),
        None => {
            let Some((id, backend)) = maglev::pick(svc, &flow) else {
                return (XDP_DROP, Reason::DropNoBackend);
            };
            conntrack::insert(&flow, svc, id, backend, now, ifindex);
            (id, backend, true)
        }
    };

    let (daddr, dport, deliver_to) = (backend.addr[0], backend.port, backend.deliver_ifindex);
    if nat::dnat_v4(ctx, &pkt, daddr, dport).is_none() {
        return (XDP_DROP, Reason::DropMalformed);
    }
    stats::count_traffic(svc.id, backend_id, ctx.len() as u64, new_flow);
    if deliver_to != 0 && !deliver::mark(ctx, deliver_to) {
        stats::count(Reason::DeliverError);
    }
    (XDP_PASS, Reason::Forwarded)
}

#[inline(always)]
fn is_vip_addr(daddr: u32) -> bool {
    let key = VipAddrKey {
        addr: [daddr, 0, 0, 0],
        family: FAMILY_V4,
        _pad0: 0,
        _pad1: 0,
    };
    unsafe { VIP_ADDRS.get(key) }.is_some()
}

/// TC ingress of a front NIC: hands packets XDP marked for a local container to its bridge.
#[classifier]
pub fn xlb_tc_ingress(ctx: TcContext) -> i32 {
    match deliver::marked(&ctx) {
        Some(ifindex) => deliver::redirect(ifindex),
        None => TC_ACT_NEXT,
    }
}

/// Eth + VLAN + IPv4 with options + TCP: all the headers the reverse NAT reads.
const MAX_HEADERS: usize = parse::ETH_HLEN + 4 + 60 + 20;

/// Rewrites a reply of a NATed flow back to its VIP; returns the flow's ingress interface.
#[inline(always)]
fn reverse_nat(ctx: &TcContext) -> Option<u32> {
    let pkt = match parse(ctx) {
        Parsed::L4(pkt) => pkt,
        // Headers partly outside the linear buffer: pull them in and look again. Only
        // then, since pulling can copy the skb head.
        Parsed::Malformed(_) if ctx.data_end() - ctx.data() < ctx.len() as usize => {
            ctx.pull_data(ctx.len().min(MAX_HEADERS as u32)).ok()?;
            match parse(ctx) {
                Parsed::L4(pkt) => pkt,
                _ => return None,
            }
        }
        _ => return None,
    };
    let rev = unsafe { REV_NAT.get(pkt.flow_key()) }?;
    let (vip, vip_port, ifindex) = (rev.vip[0], rev.vip_port, rev.ifindex);
    match nat::snat_reply_v4(ctx, &pkt, vip, vip_port) {
        Ok(()) => stats::count(Reason::RevNat),
        Err(_) => stats::count(Reason::RevNatError),
    }
    Some(ifindex)
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
