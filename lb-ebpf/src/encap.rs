//! dsr: the client's packet, unchanged, inside an outer IPv4 header to the backend's host
//! (IPIP, or GUE variant 1: outer IPv4 + UDP, the inner IPv4 right after). The backend
//! decapsulates it (`xlb decap`) and answers the client directly from the VIP.
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{GUE_PORT, PROTO_IPIP, PROTO_UDP};

use crate::{
    csum,
    parse::{ETH_HLEN, IPV4_HLEN, Ipv4Hdr, PacketBuf, load},
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
        // The source port carries the flow's entropy, so the backend's NIC spreads flows
        // over its queues (RSS hashes the outer header).
        let header = UdpHdr {
            sport: (0xc000 | (hash as u16 & 0x3fff)).to_be(),
            dport: GUE_PORT.to_be(),
            len: (inner_len + UDP_HLEN as u16).to_be(),
            // Optional in IPv4; the inner packet has its own.
            check: 0,
        };
        unsafe { core::ptr::write_unaligned(udp, header) };
    }
    Some(())
}
