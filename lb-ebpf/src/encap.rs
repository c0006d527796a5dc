//! dsr: the client's packet, unchanged, inside an outer IP header of its family to the
//! backend's host (IPIP or IPv6-in-IPv6, or GUE variant 1: outer IP + UDP, the inner packet
//! right after). The backend decapsulates it (`xlb decap`) and answers the client directly
//! from the VIP.
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{GUE_PORT, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};

use crate::{
    csum,
    parse::{ETH_HLEN, IPV4_HLEN, Ipv4Hdr, PacketBuf, load},
    parse6::{Addr6, IPV6_HLEN, Ipv6Hdr, copy_addr},
    route,
};

const UDP_HLEN: usize = size_of::<UdpHdr>();
const DEFAULT_TTL: u8 = 64;

#[repr(C)]
struct UdpHdr {
    sport: u16,
    dport: u16,
    len: u16,
    check: u16,
}

/// Bytes the encapsulation adds in front of the inner IP header.
#[inline(always)]
pub const fn overhead(gue: bool) -> usize {
    if gue { IPV4_HLEN + UDP_HLEN } else { IPV4_HLEN }
}

/// The same for an IPv6 packet in IPv6.
#[inline(always)]
pub const fn overhead6(gue: bool) -> usize {
    if gue { IPV6_HLEN + UDP_HLEN } else { IPV6_HLEN }
}

/// The GUE source port: the flow's entropy, so the backend's NIC spreads flows over its
/// queues (RSS hashes the outer header).
#[inline(always)]
fn gue_sport(hash: u32) -> u16 {
    (0xc000 | (hash as u16 & 0x3fff)).to_be()
}

/// Puts the outer headers in front of the packet's IP header. A VLAN tag is dropped: the
/// outer packet is routed, and the FIB picks its interface. The MACs are kept until
/// `route` writes the next hop's.
#[inline(always)]
pub fn encap_v4(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    outer_src: u32,
    outer_dst: u32,
    gue: bool,
    hash: u32,
) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv4Hdr>(l3_off)?;
    let tos = load(unsafe { &raw const (*ip).tos });
    // The MACs move with the head: TC's bpf_redirect_neigh sends a frame whose destination
    // MAC is left from the buffer (or multicast) nowhere.
    let macs = load(ctx.ptr_at::<route::Macs>(0)?);
    let grow = overhead(gue) as i32 - (l3_off - ETH_HLEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return None;
    }
    route::write_eth_ipv4(ctx, macs)?;
    let outer = ctx.ptr_at::<Ipv4Hdr>(ETH_HLEN)?;
    let tot_len = inner_len + overhead(gue) as u16;
    let proto = if gue { PROTO_UDP } else { PROTO_IPIP };
    let header = Ipv4Hdr {
        version_ihl: 0x45,
        tos,
        tot_len: tot_len.to_be(),
        id: 0,
        frag_off: 0,
        ttl: DEFAULT_TTL,
        proto,
        check: 0,
        saddr: outer_src,
        daddr: outer_dst,
    };
    let check = csum::of::<_, { IPV4_HLEN / 2 }>(&header);
    unsafe {
        core::ptr::write_unaligned(outer, header);
        core::ptr::write_unaligned(&raw mut (*outer).check, check);
    }
    if gue {
        let udp = ctx.ptr_at::<UdpHdr>(ETH_HLEN + IPV4_HLEN)?;
        let header = UdpHdr {
            sport: gue_sport(hash),
            dport: GUE_PORT.to_be(),
            len: (inner_len + UDP_HLEN as u16).to_be(),
            // Optional in IPv4; the inner packet has its own.
            check: 0,
        };
        unsafe { core::ptr::write_unaligned(udp, header) };
    }
    Some(())
}

/// `encap_v4` for an IPv6 packet of `inner_len` bytes (header included): an outer IPv6
/// header (next header 41, or UDP to GUE_PORT) from `outer_src` to `outer_dst`, with the
/// inner traffic class and the flow's hash as flow label (ECMP and RSS on the way hash it).
/// GUE's UDP checksum is 0, as RFC 6935 allows tunnels over IPv6: the inner packet carries
/// its own, and `xlb decap` takes the packet before the kernel's UDP would.
#[inline(always)]
pub fn encap_v6(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    outer_src: &Addr6,
    outer_dst: &Addr6,
    gue: bool,
    hash: u32,
) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv6Hdr>(l3_off)?;
    let class = u32::from_be(load(unsafe { &raw const (*ip).version_class_flow })) & 0x0ff0_0000;
    let macs = load(ctx.ptr_at::<route::Macs>(0)?);
    let grow = overhead6(gue) as i32 - (l3_off - ETH_HLEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return None;
    }
    route::write_eth_ipv6(ctx, macs)?;
    let outer = ctx.ptr_at::<Ipv6Hdr>(ETH_HLEN)?;
    let payload = inner_len + if gue { UDP_HLEN as u16 } else { 0 };
    // Field by field: a whole header built first would take 40 bytes of the dsr chain's
    // stack, which is at its 512-byte limit.
    unsafe {
        let first = (0x6000_0000 | class | (hash & 0x000f_ffff)).to_be();
        core::ptr::write_unaligned(&raw mut (*outer).version_class_flow, first);
        core::ptr::write_unaligned(&raw mut (*outer).payload_len, payload.to_be());
        (*outer).next_header = if gue { PROTO_UDP } else { PROTO_IPV6 };
        (*outer).hop_limit = DEFAULT_TTL;
        copy_addr(&mut (*outer).saddr, outer_src);
        copy_addr(&mut (*outer).daddr, outer_dst);
    }
    if gue {
        let udp = ctx.ptr_at::<UdpHdr>(ETH_HLEN + IPV6_HLEN)?;
        let header = UdpHdr {
            sport: gue_sport(hash),
            dport: GUE_PORT.to_be(),
            len: payload.to_be(),
            check: 0,
        };
        unsafe { core::ptr::write_unaligned(udp, header) };
    }
    Some(())
}
