//! `xlb decap`: the backend-host side of mode dsr. Strips the IPIP, IPv6-in-IPv6 or GUE
//! header the balancer added, for packets to a VIP this host serves, so the kernel needs no
//! ipip or ip6_tunnel module. The host then answers the client directly from the VIP (on
//! lo). A separate object from the balancer, so a backend host loads only this and a few
//! small maps.
#![no_std]
#![no_main]

mod object;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    DecapCounter, FAMILY_V4, FAMILY_V6, GUE_PORT, PROTO_IPIP, PROTO_IPV6, PROTO_UDP, VipAddrKey,
    sizes::{MAX_DECAP_SOURCES, MAX_VIP_ADDRS},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// More-fragments flag and fragment offset, in host order.
const IP_MF_OFFSET: u16 = 0x3fff;

/// The VIPs this host serves: only packets to them are decapsulated.
#[map(name = "XLB_DECAP_VIPS_V1")]
static DECAP_VIPS: HashMap<VipAddrKey, u32> = HashMap::pinned(MAX_VIP_ADDRS, 0);

/// Outer IPv4 source prefixes (address in network order) encapsulated packets are accepted
/// from: the LB nodes. `xlb decap` writes 0.0.0.0/0 when given no `--from`; an empty trie
/// accepts nothing.
#[map(name = "XLB_DECAP_SOURCES_V1")]
static DECAP_SOURCES: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_DECAP_SOURCES, 0);

/// The same for outer IPv6 sources (address bytes as on the wire); `::/0` without `--from`.
#[map(name = "XLB_DECAP_SOURCES6_V1")]
static DECAP_SOURCES6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(MAX_DECAP_SOURCES, 0);

/// Per-CPU counters indexed by `lb_common::DecapCounter` (V3: NotIpv6 added).
#[map(name = "XLB_DECAP_STATS_V3")]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DecapCounter::COUNT, 0);

#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let counter = decap(&ctx);
    if let Some(counter) = counter
        && let Some(slot) = DECAP_STATS.get_ptr_mut(counter as u32)
    {
        unsafe { *slot += 1 };
    }
    match counter {
        Some(DecapCounter::RefusedSource) => XDP_DROP,
        _ => XDP_PASS,
    }
}

#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    Some(unsafe { core::ptr::read_unaligned(at::<T>(ctx, offset)?) })
}

/// None: not an encapsulated packet (left alone, uncounted).
#[inline(always)]
fn decap(ctx: &XdpContext) -> Option<DecapCounter> {
    match u16::from_be(read(ctx, 12)?) {
        ETH_P_IP => decap_v4(ctx),
        ETH_P_IPV6 => decap_v6(ctx),
        _ => None,
    }
}

#[inline(always)]
fn decap_v4(ctx: &XdpContext) -> Option<DecapCounter> {
    let outer = ETH_HLEN;
    // Our balancer writes a plain 20-byte header and never fragments.
    if read::<u8>(ctx, outer)? != 0x45 || u16::from_be(read(ctx, outer + 6)?) & IP_MF_OFFSET != 0 {
        return None;
    }
    let inner = match read::<u8>(ctx, outer + 9)? {
        PROTO_IPIP => outer + IPV4_HLEN,
        PROTO_UDP if u16::from_be(read(ctx, outer + IPV4_HLEN + 2)?) == GUE_PORT => {
            outer + IPV4_HLEN + UDP_HLEN
        }
        _ => return None,
    };
    if read::<u8>(ctx, inner)? >> 4 != 4 {
        return Some(DecapCounter::NotIpv4);
    }
    let vip = VipAddrKey {
        addr: [read(ctx, inner + 16)?, 0, 0, 0],
        family: FAMILY_V4,
        _pad0: 0,
        _pad1: 0,
    };
    if unsafe { DECAP_VIPS.get(vip) }.is_none() {
        return Some(DecapCounter::UnknownVip);
    }
    // Only the LB nodes may hand this host a client packet: from anyone else it would be a
    // forged client address, and the kernel (or an ipip device) must not see it either.
    let source: u32 = read(ctx, outer + 12)?;
    if DECAP_SOURCES.get(Key::new(32, source)).is_none() {
        return Some(DecapCounter::RefusedSource);
    }
    strip(ctx, inner, ETH_P_IP)
}

/// The same checks behind an outer IPv6 header. The balancer writes exactly 40 bytes with
/// no extension headers, so next header is the tunnel's (41) or UDP (GUE) or not ours; a
/// fragment would show as 44, and is not ours either.
#[inline(always)]
fn decap_v6(ctx: &XdpContext) -> Option<DecapCounter> {
    let outer = ETH_HLEN;
    if read::<u8>(ctx, outer)? >> 4 != 6 {
        return None;
    }
    let inner = match read::<u8>(ctx, outer + 6)? {
        PROTO_IPV6 => outer + IPV6_HLEN,
        PROTO_UDP if u16::from_be(read(ctx, outer + IPV6_HLEN + 2)?) == GUE_PORT => {
            outer + IPV6_HLEN + UDP_HLEN
        }
        _ => return None,
    };
    if read::<u8>(ctx, inner)? >> 4 != 6 {
        return Some(DecapCounter::NotIpv6);
    }
    let vip = VipAddrKey {
        addr: read(ctx, inner + 24)?,
        family: FAMILY_V6,
        _pad0: 0,
        _pad1: 0,
    };
    if unsafe { DECAP_VIPS.get(vip) }.is_none() {
        return Some(DecapCounter::UnknownVip);
    }
    let source: [u8; 16] = read(ctx, outer + 8)?;
    if DECAP_SOURCES6.get(Key::new(128, source)).is_none() {
        return Some(DecapCounter::RefusedSource);
    }
    strip(ctx, inner, ETH_P_IPV6)
}

/// Drops everything between the Ethernet header and `inner`; the Ethernet header (the outer
/// frame's MACs, `ethertype`) moves up to sit right before the inner IP header.
#[inline(always)]
fn strip(ctx: &XdpContext, inner: usize, ethertype: u16) -> Option<DecapCounter> {
    let macs: [u8; 12] = read(ctx, 0)?;
    let strip = inner - ETH_HLEN;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return Some(DecapCounter::Error);
    }
    let eth = at::<[u8; ETH_HLEN]>(ctx, 0)?;
    let mut header = [0u8; ETH_HLEN];
    header[..12].copy_from_slice(&macs);
    header[12..].copy_from_slice(&ethertype.to_be_bytes());
    unsafe { core::ptr::write_unaligned(eth, header) };
    Some(DecapCounter::Decapsulated)
}
