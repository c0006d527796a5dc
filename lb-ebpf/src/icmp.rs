//! ICMP "fragmentation needed" for dsr: a client packet that would exceed the egress MTU
//! once encapsulated is answered from the VIP with the MTU that fits, so the client's path
//! MTU discovery shrinks its segments instead of the connection stalling (Katran does the
//! same).
use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use crate::{
    csum,
    parse::{ETH_HLEN, IPV4_HLEN, Ipv4Hdr, L4Packet, PacketBuf, load},
    route,
};

const ICMP_HLEN: usize = 8;
/// The original IP header and the first 8 bytes after it (RFC 792).
const QUOTE_LEN: usize = IPV4_HLEN + 8;
const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Don't-fragment flag, host order.
const IP_DF: u16 = 0x4000;

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    unused: u16,
    mtu: u16,
}

/// Turns the packet into the ICMP answer (to be sent back with XDP_TX); None if it must be
/// dropped instead (no DF flag: fragmenting is the sender's choice, not ours to answer).
#[inline(always)]
pub fn frag_needed(ctx: &XdpContext, pkt: &L4Packet, mtu: u16) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv4Hdr>(pkt.l3_off)?;
    if u16::from_be(load(unsafe { &raw const (*ip).frag_off })) & IP_DF == 0 || pkt.has_ip_options {
        return None;
    }
    let macs = load(ctx.ptr_at::<route::Macs>(0)?);
    // New IP + ICMP headers in front of the original IP header; the frame ends after the quote.
    let grow = (IPV4_HLEN + ICMP_HLEN) as i32 - (pkt.l3_off - ETH_HLEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return None;
    }
    let keep = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + QUOTE_LEN;
    let trim = ctx.data_end() as i32 - ctx.data() as i32 - keep as i32;
    if trim < 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, -trim) } != 0 {
        return None;
    }

    // Back to where the packet came from: swapped MACs, the VIP answering the client.
    let [d0, d1, d2, s0, s1, s2] = macs;
    route::write_eth_ipv4(ctx, [s0, s1, s2, d0, d1, d2])?;
    let ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((IPV4_HLEN + ICMP_HLEN + QUOTE_LEN) as u16).to_be(),
        id: 0,
        frag_off: IP_DF.to_be(),
        ttl: 64,
        proto: PROTO_ICMP,
        check: 0,
        saddr: pkt.daddr,
        daddr: pkt.saddr,
    };
    let ip_check = csum::of::<_, { IPV4_HLEN / 2 }>(&ip);
    let out_ip = ctx.ptr_at::<Ipv4Hdr>(ETH_HLEN)?;
    unsafe {
        core::ptr::write_unaligned(out_ip, ip);
        core::ptr::write_unaligned(&raw mut (*out_ip).check, ip_check);
    }

    let icmp_off = ETH_HLEN + IPV4_HLEN;
    let icmp = ctx.ptr_at::<IcmpHdr>(icmp_off)?;
    let quote = ctx.ptr_at::<[u16; QUOTE_LEN / 2]>(icmp_off + ICMP_HLEN)?;
    let header = IcmpHdr {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        check: 0,
        unused: 0,
        mtu: mtu.to_be(),
    };
    let header_words = unsafe { &*(&header as *const IcmpHdr as *const [u16; ICMP_HLEN / 2]) };
    let check = csum::fold(csum::sum(header_words) + csum::sum(unsafe { &*quote }));
    unsafe {
        core::ptr::write_unaligned(icmp, header);
        core::ptr::write_unaligned(&raw mut (*icmp).check, check);
    }
    Some(())
}
