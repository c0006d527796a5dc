//! ICMP in TC. The TC balancer (`xdp_mode = "tc"`, mode nat) handles ICMP to a VIP as XDP
//! does: echo answered, errors about a flow sent to its backend.
//!
//! And on the reply paths: ICMP errors a nat backend (or a router on its side) sends about a
//! VIP flow: the quoted packet is the client's request after DNAT (client -> backend), which the client's stack
//! cannot match to its socket (it talks to the VIP). Translated back like the flow's
//! replies: the quoted destination becomes the VIP again, and an error the backend itself
//! sent leaves from the VIP. So "port unreachable" reaches a UDP client, and "fragmentation
//! needed" for an upload reaches the client's path MTU discovery.
use aya_ebpf::programs::TcContext;
use lb_common::{FAMILY_V4, FlowKey, MODE_NAT, PROTO_TCP, PROTO_UDP, Reason, VIP_ADDR_ECHO};

use crate::{
    balance::Verdict,
    conntrack, icmp,
    parse::{IPV4_HLEN, IcmpPacket},
    stats,
};

const ICMP_HLEN: usize = 8;
const ICMP_CSUM_OFF: usize = 2;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const IP_PROTO_OFF: usize = 9;
const IP_CSUM_OFF: usize = 10;
const IP_SADDR_OFF: usize = 12;
const IP_DADDR_OFF: usize = 16;

/// What the TC balancer does with ICMP (to a VIP address or not).
#[inline(never)]
pub fn handle(ctx: &TcContext, icmp: &IcmpPacket) -> Verdict {
    let Some(flags) = icmp::vip_addr_flags(icmp.daddr) else {
        return Verdict::Pass(Reason::PassNotL4);
    };
    let answer = match icmp.kind {
        ICMP_ECHO if flags & VIP_ADDR_ECHO != 0 => {
            icmp::echo_reply(ctx, icmp).map(|()| Verdict::Bounce(Reason::IcmpEcho))
        }
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => to_backend(ctx, icmp),
        _ => None,
    };
    answer.unwrap_or(Verdict::Pass(Reason::PassIcmp))
}

/// An error about a nat flow, translated for its backend (as XDP does); the kernel or the
/// backend's bridge takes it there.
#[inline(always)]
fn to_backend(ctx: &TcContext, icmp: &IcmpPacket) -> Option<Verdict> {
    let owner = icmp::owner(ctx, icmp)?;
    if owner.mode != MODE_NAT {
        return None;
    }
    icmp::translate(ctx, icmp, &owner.quoted, None, owner.backend, None)?;
    stats::count(Reason::IcmpToBackend);
    Some(Verdict::Forward {
        deliver_to: owner.deliver_ifindex,
    })
}

/// The quoted request, as read from the packet (addresses and ports in network order).
struct Quoted {
    off: usize,
    proto: u8,
    client: u32,
    client_port: u16,
    backend: u32,
    backend_port: u16,
}

fn quoted_request(ctx: &TcContext, icmp: &IcmpPacket) -> Option<Quoted> {
    if icmp.kind != ICMP_DEST_UNREACH && icmp.kind != ICMP_TIME_EXCEEDED {
        return None;
    }
    let off = icmp.icmp_off + ICMP_HLEN;
    // Inside the ICMP message, not in padding past the IPv4 total length (see icmp.rs).
    if off + IPV4_HLEN + 4 > icmp.l3_off + icmp.tot_len as usize {
        return None;
    }
    let version_ihl: u8 = ctx.load(off).ok()?;
    let proto: u8 = ctx.load(off + IP_PROTO_OFF).ok()?;
    if version_ihl != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    let client: u32 = ctx.load(off + IP_SADDR_OFF).ok()?;
    // An error goes to the source of the packet it quotes.
    if client != icmp.daddr {
        return None;
    }
    let ports: [u16; 2] = ctx.load(off + IPV4_HLEN).ok()?;
    Some(Quoted {
        off,
        proto,
        client,
        client_port: ports[0],
        backend: ctx.load(off + IP_DADDR_OFF).ok()?,
        backend_port: ports[1],
    })
}

/// Rewrites an ICMP error about a NATed flow back to its VIP; returns the flow's ingress
/// interface (as for the flow's replies). None: not about a flow of this LB.
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext, icmp: &IcmpPacket) -> Option<u32> {
    let q = quoted_request(ctx, icmp)?;
    // The flow's reply direction, as its reverse NAT entry is keyed.
    let reply = FlowKey {
        src: [q.backend, 0, 0, 0],
        dst: [q.client, 0, 0, 0],
        src_port: q.backend_port,
        dst_port: q.client_port,
        proto: q.proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    let rev = conntrack::reply_mapping(&reply)?;
    let (vip, vip_port, ifindex) = (rev.vip[0], rev.vip_port, rev.ifindex);
    match rewrite(ctx, icmp, &q, vip, vip_port) {
        Ok(()) => stats::count(Reason::RevNat),
        Err(_) => stats::count(Reason::RevNatError),
    }
    Some(ifindex)
}

/// The outer source (if the backend sent it) and the quoted destination become the VIP;
/// the outer IP, quoted IP and ICMP checksums are updated incrementally.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    icmp: &IcmpPacket,
    q: &Quoted,
    vip: u32,
    vip_port: u16,
) -> Result<(), i64> {
    if icmp.saddr == q.backend {
        ctx.l3_csum_replace(icmp.l3_off + IP_CSUM_OFF, q.backend as u64, vip as u64, 4)?;
        ctx.store(icmp.l3_off + IP_SADDR_OFF, &vip, 0)?;
    }
    let inner_csum_off = q.off + IP_CSUM_OFF;
    let old_inner_csum: u16 = ctx.load(inner_csum_off)?;
    ctx.l3_csum_replace(inner_csum_off, q.backend as u64, vip as u64, 4)?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off)?;
    let icmp_csum_off = icmp.icmp_off + ICMP_CSUM_OFF;
    // The ICMP checksum covers the quoted header: its address, checksum and port change.
    ctx.l4_csum_replace(icmp_csum_off, q.backend as u64, vip as u64, 4)?;
    ctx.l4_csum_replace(
        icmp_csum_off,
        old_inner_csum as u64,
        new_inner_csum as u64,
        2,
    )?;
    ctx.l4_csum_replace(icmp_csum_off, q.backend_port as u64, vip_port as u64, 2)?;
    ctx.store(q.off + IP_DADDR_OFF, &vip, 0)?;
    ctx.store(q.off + IPV4_HLEN + 2, &vip_port, 0)?;
    Ok(())
}
