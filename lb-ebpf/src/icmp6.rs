//! ICMPv6 to a v6 VIP address, as for v4: echo requests answered by the LB (`icmp_echo`);
//! errors about a nat flow (packet too big, unreachable, time exceeded: the quoted packet
//! is one the VIP sent) go to the flow's backend, so its path MTU discovery works.
//! Everything else (neighbour discovery above all) goes to the kernel.
use lb_common::{Backend, FAMILY_V6, MODE_NAT, PROTO_TCP, PROTO_UDP, VipKey, flow_hash, ring_hash};

use crate::{
    csum, maglev,
    maps::{self, CONNTRACK, CONNTRACK_NEW, VIPS},
    parse::{ETH_HLEN, PacketBuf, load},
    parse6::{IPV6_HLEN, Icmp6Packet, Ipv6Hdr},
    route,
};

pub const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// Type, code, checksum and the 4 bytes (MTU, pointer or unused) before the quote.
const ICMPV6_HLEN: usize = 8;

/// An error whose quote is a packet the error's destination sent.
#[inline(always)]
pub fn is_error(kind: u8) -> bool {
    matches!(
        kind,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
    )
}

/// An error to a VIP about one of its nat flows (the quote: VIP -> client, TCP or UDP right
/// after the quoted header), rewritten for the flow's backend, which it returns: the outer
/// destination and the quoted source become the backend's, and the ICMPv6 checksum (whose
/// pseudo-header holds the outer destination) follows. The flow's conntrack entry names
/// the backend, else the ring does, as for the flow's own packets. None: not about a flow
/// this LB can place; the packet is untouched.
#[inline(never)]
pub fn to_backend<C: PacketBuf>(ctx: &C, icmp: &Icmp6Packet) -> Option<&'static Backend> {
    let off = icmp.icmp_off + ICMPV6_HLEN;
    // The quoted header and ports lie inside the payload: a rewrite past it (in padding)
    // would break the checksum.
    if off + IPV6_HLEN + 4 > icmp.end {
        return None;
    }
    let inner = ctx.ptr_at::<Ipv6Hdr>(off)?;
    let ports = ctx.ptr_at::<[u16; 2]>(off + IPV6_HLEN)?;
    let proto = load(unsafe { &raw const (*inner).next_header });
    let vip = load(unsafe { &raw const (*inner).saddr });
    if (proto != PROTO_TCP && proto != PROTO_UDP) || vip != icmp.daddr {
        return None;
    }
    let [vip_port, client_port] = load(ports);
    let key = VipKey {
        addr: vip,
        port: vip_port,
        proto,
        family: FAMILY_V6,
    };
    let svc =
        maps::service(*unsafe { VIPS.get(key) }?).filter(|s| s.vip == key && s.mode == MODE_NAT)?;
    // The flow's own key (client -> VIP), in the scratch room: the stack is short here.
    let flow = &mut maps::scratch()?.key;
    flow.src = load(unsafe { &raw const (*inner).daddr });
    flow.dst = vip;
    flow.src_port = client_port;
    flow.dst_port = vip_port;
    flow.proto = proto;
    flow.family = FAMILY_V6;
    flow._pad = 0;
    let known = match unsafe { CONNTRACK.get(&*flow) } {
        Some(f) => Some(f),
        None => unsafe { CONNTRACK_NEW.get(&*flow) },
    }
    .filter(|f| u32::from(f.service_id) == svc.id)
    .map(|f| u32::from(f.backend_id));
    let backend_id = match known {
        Some(id) => id,
        None => maglev::pick(svc, ring_hash(flow, flow_hash(flow), svc.flags))?.0,
    };
    let backend = maps::backend(backend_id).filter(|b| b.service_id == svc.id)?;
    let outer = ctx.ptr_at::<Ipv6Hdr>(icmp.l3_off)?;
    let header = ctx.ptr_at::<[u16; 2]>(icmp.icmp_off)?;
    let [kind_code, check] = load(header);
    // The VIP leaves twice (pseudo-header and quote), the VIP's port once.
    let mut check = csum::replace16(check, &vip, &backend.addr);
    check = csum::replace16(check, &vip, &backend.addr);
    check = csum::replace2(check, vip_port, backend.port);
    unsafe {
        core::ptr::write_unaligned(&raw mut (*outer).daddr, backend.addr);
        core::ptr::write_unaligned(&raw mut (*inner).saddr, backend.addr);
        core::ptr::write_unaligned(ports, [backend.port, client_port]);
        core::ptr::write_unaligned(header, [kind_code, check]);
    }
    Some(backend)
}

/// Turns an echo request into its reply, in place, to go back out of the interface it came
/// in on. Only an untagged frame without extension headers (what a ping sends): None
/// otherwise, and the kernel answers if it holds the address. A subprogram: the ICMP chain
/// is the deepest of the entry point's.
#[inline(never)]
pub fn echo_reply<C: PacketBuf>(ctx: &C, icmp: &Icmp6Packet) -> Option<()> {
    if icmp.icmp_off != ETH_HLEN + IPV6_HLEN || icmp.code != 0 {
        return None;
    }
    let ip = ctx.ptr_at::<Ipv6Hdr>(ETH_HLEN)?;
    let header = ctx.ptr_at::<[u16; 2]>(icmp.icmp_off)?;
    let macs = ctx.ptr_at::<route::Macs>(0)?;
    unsafe {
        let [d0, d1, d2, s0, s1, s2] = load(macs);
        core::ptr::write_unaligned(macs, [s0, s1, s2, d0, d1, d2]);
        // Swapped addresses leave the pseudo-header's sum as it is; the hop limit is in no
        // checksum.
        let saddr = load(&raw const (*ip).saddr);
        core::ptr::write_unaligned(&raw mut (*ip).saddr, load(&raw const (*ip).daddr));
        core::ptr::write_unaligned(&raw mut (*ip).daddr, saddr);
        (*ip).hop_limit = 64;
        let [kind_code, check] = load(header);
        let reply = u16::from_be_bytes([ICMPV6_ECHO_REPLY, 0]).to_be();
        let check = csum::replace2(check, kind_code, reply);
        core::ptr::write_unaligned(header, [reply, check]);
    }
    Some(())
}
