//! ICMPv6 to a v6 VIP address, as for v4: echo requests answered by the LB (`icmp_echo`);
//! errors about a nat flow (packet too big, unreachable, time exceeded: the quoted packet
//! is one the VIP sent) go to the flow's backend, so its path MTU discovery works; and on
//! the reply paths, an error a backend (or a router on its side) sends a client about a nat
//! flow gets the VIP back in its quote, as the flow's replies do (`reverse_nat`). fullnat
//! flows likewise at XDP: an error to the VIP reaches the backend about the SNAT address
//! (`to_backend`), one to the SNAT address reaches the client about the VIP (`to_client`).
//! Everything else (neighbour discovery above all) goes to the kernel.
use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Backend, FAMILY_V6, Flow, FlowKey, MODE_FULLNAT, MODE_NAT, PROTO_TCP, PROTO_UDP, Reason,
    VipKey, flow_hash, ring_hash,
};

use crate::{
    conntrack, csum, maglev,
    maps::{self, CONNTRACK, CONNTRACK_NEW, VIPS},
    parse::{ETH_HLEN, PacketBuf, load},
    parse6::{IPV6_HLEN, Icmp6Packet, Ipv6Hdr, L4Packet6, copy_addr, load_addr},
    route, snat, stats,
};

pub const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// Type, code, checksum and the 4 bytes (MTU, pointer or unused) before the quote.
const ICMPV6_HLEN: usize = 8;
const ICMPV6_CSUM_OFF: usize = 2;
const IP6_SADDR_OFF: usize = 8;
const NEXT_ICMPV6: u8 = 58;
/// What a Packet Too Big quotes: the header and the ports, all the client's stack needs to
/// find the connection (the answer stays small: no 1280-byte copy per oversized packet).
const PTB_QUOTE_LEN: usize = IPV6_HLEN + 8;
const IP6_DADDR_OFF: usize = 24;

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
    let (off, inner, proto) = quoted(ctx, icmp)?;
    let ports = ctx.ptr_at::<[u16; 2]>(off + IPV6_HLEN)?;
    let vip = load(unsafe { &raw const (*inner).saddr });
    if vip != icmp.daddr {
        return None;
    }
    let [vip_port, client_port] = load(ports);
    let key = VipKey {
        addr: vip,
        port: vip_port,
        proto,
        family: FAMILY_V6,
    };
    let svc = maps::service(*unsafe { VIPS.get(key) }?)
        .filter(|s| s.vip == key && (s.mode == MODE_NAT || s.mode == MODE_FULLNAT))?;
    // The flow's own key (client -> VIP), in the scratch room: the stack is short here.
    let flow = &mut maps::scratch()?.key;
    load_addr(&mut flow.src, unsafe { &raw const (*inner).daddr });
    copy_addr(&mut flow.dst, &vip);
    flow.src_port = client_port;
    flow.dst_port = vip_port;
    flow.proto = proto;
    flow.family = FAMILY_V6;
    flow._pad = 0;
    let known = match unsafe { CONNTRACK.get(&*flow) } {
        Some(f) => Some(f),
        None => unsafe { CONNTRACK_NEW.get(&*flow) },
    }
    .filter(|f| u32::from(f.service_id) == svc.id);
    let backend_id = match known {
        Some(f) => u32::from(f.backend_id),
        // A fullnat flow has its SNAT address and port in its entry only.
        None if svc.mode == MODE_FULLNAT => return None,
        None => maglev::pick(svc, ring_hash(flow, flow_hash(flow), svc.flags))?.0,
    };
    let backend = maps::backend(backend_id).filter(|b| b.service_id == svc.id)?;
    let outer = ctx.ptr_at::<Ipv6Hdr>(icmp.l3_off)?;
    if svc.mode == MODE_FULLNAT {
        // From the flow's SNAT address, about the packet the backend got from it.
        let f: &Flow = known?;
        let ends = Ends {
            outer_src: Some(&f.snat),
            outer_dst: &backend.addr,
            inner_src: (&backend.addr, backend.port),
            inner_dst: (&f.snat, f.snat_port),
        };
        translate(ctx, icmp, outer, inner, ports, &ends)?;
        return Some(backend);
    }
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

/// An error to a fullnat flow's SNAT address about a packet the LB sent the backend (the
/// quote: SNAT address:port -> backend), translated for the client: the outer destination
/// and the quoted source become the client's, the quoted destination the VIP's, and an
/// error the backend sent itself leaves from the VIP. Returns the client (XDP sends the
/// error there as the flow's replies go); None: about no fullnat flow, untouched. XDP only:
/// the TC balancer has no fullnat flows. A subprogram: the ICMP chain is the entry point's
/// deepest.
#[inline(never)]
pub fn to_client(ctx: &XdpContext, icmp: &Icmp6Packet) -> Option<&'static [u32; 4]> {
    let (off, inner, proto) = quoted(ctx, icmp)?;
    let ports = ctx.ptr_at::<[u16; 2]>(off + IPV6_HLEN)?;
    let outer = ctx.ptr_at::<Ipv6Hdr>(icmp.l3_off)?;
    // The flow's reply direction (backend -> SNAT address:port), as reservations are keyed,
    // in the scratch room: the stack is short here.
    let reply = &mut maps::scratch()?.key;
    load_addr(&mut reply.src, unsafe { &raw const (*inner).daddr });
    load_addr(&mut reply.dst, unsafe { &raw const (*inner).saddr });
    let [snat_port, backend_port] = load(ports);
    reply.src_port = backend_port;
    reply.dst_port = snat_port;
    reply.proto = proto;
    reply.family = FAMILY_V6;
    reply._pad = 0;
    // An error goes to the source of the packet it quotes.
    if reply.dst != icmp.daddr {
        return None;
    }
    let (entry, _) = snat::reservation(reply)?;
    let entry = unsafe { &*entry };
    let from_backend = load(unsafe { &raw const (*outer).saddr }) == reply.src;
    let ends = Ends {
        outer_src: from_backend.then_some(&entry.vip),
        outer_dst: &entry.client,
        inner_src: (&entry.client, entry.client_port),
        inner_dst: (&entry.vip, entry.vip_port),
    };
    translate(ctx, icmp, outer, inner, ports, &ends)?;
    stats::count(Reason::RevSnat);
    Some(&entry.client)
}

/// The new ends of an ICMPv6 error and of the packet it quotes (addresses and ports in
/// network order).
struct Ends<'a> {
    /// None: the outer source stays.
    outer_src: Option<&'a [u32; 4]>,
    outer_dst: &'a [u32; 4],
    inner_src: (&'a [u32; 4], u16),
    inner_dst: (&'a [u32; 4], u16),
}

/// Rewrites an error and its quote to `ends`, the ICMPv6 checksum updated word by word
/// (the outer addresses are in its pseudo-header, the quote in its data).
#[inline(always)]
fn translate<C: PacketBuf>(
    ctx: &C,
    icmp: &Icmp6Packet,
    outer: *mut Ipv6Hdr,
    inner: *mut Ipv6Hdr,
    ports: *mut [u16; 2],
    ends: &Ends,
) -> Option<()> {
    let header = ctx.ptr_at::<[u16; 2]>(icmp.icmp_off)?;
    rewrite(outer, inner, ports, header, ends);
    Some(())
}

/// `translate` past the bounds checks. A subprogram of pointers into the packet: inlined,
/// LLVM spills the sixteen words it rewrites past the stack's limit.
#[inline(never)]
fn rewrite(
    outer: *mut Ipv6Hdr,
    inner: *mut Ipv6Hdr,
    ports: *mut [u16; 2],
    header: *mut [u16; 2],
    ends: &Ends,
) {
    let [kind_code, mut check] = load(header);
    unsafe {
        if let Some(src) = ends.outer_src {
            check = swap_addr(check, &raw mut (*outer).saddr, src);
        }
        check = swap_addr(check, &raw mut (*outer).daddr, ends.outer_dst);
        check = swap_addr(check, &raw mut (*inner).saddr, ends.inner_src.0);
        check = swap_addr(check, &raw mut (*inner).daddr, ends.inner_dst.0);
        let [old_src, old_dst] = load(ports);
        check = csum::replace2(check, old_src, ends.inner_src.1);
        check = csum::replace2(check, old_dst, ends.inner_dst.1);
        core::ptr::write_unaligned(ports, [ends.inner_src.1, ends.inner_dst.1]);
        core::ptr::write_unaligned(header, [kind_code, check]);
    }
}

/// Writes `new` over the address at `at` word by word (no 16-byte copies on the stack) and
/// returns `check` updated for the change.
#[inline(always)]
fn swap_addr(mut check: u16, at: *mut [u32; 4], new: &[u32; 4]) -> u16 {
    let words = at.cast::<u32>();
    for (i, word) in new.iter().enumerate() {
        unsafe {
            // Volatile: one word at a time, not sixteen loaded at once and spilled.
            let old = core::ptr::read_volatile(words.add(i));
            check = csum::replace4(check, old, *word);
            core::ptr::write_volatile(words.add(i), *word);
        }
    }
    check
}

/// The packet an error quotes: its offset, header and protocol, when it is TCP or UDP right
/// after the quoted header, with the header and ports inside the payload (a rewrite past
/// it, in padding, would break the checksum).
#[inline(always)]
fn quoted<C: PacketBuf>(ctx: &C, icmp: &Icmp6Packet) -> Option<(usize, *mut Ipv6Hdr, u8)> {
    let off = icmp.icmp_off + ICMPV6_HLEN;
    if off + IPV6_HLEN + 4 > icmp.end {
        return None;
    }
    let inner = ctx.ptr_at::<Ipv6Hdr>(off)?;
    let proto = load(unsafe { &raw const (*inner).next_header });
    (proto == PROTO_TCP || proto == PROTO_UDP).then_some((off, inner, proto))
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

/// An error to a client about a nat flow's request (the quote: client -> backend, as the
/// backend got it), which the client's stack cannot match to its socket: the quoted
/// destination and port become the VIP's again, and an error the backend sent itself leaves
/// from the VIP. Returns the flow's ingress interface, as for its replies; None: about no
/// flow of this LB, untouched. Inlined: its locals share the reply path's frame (the L4
/// branch's), where a subprogram's would add to it.
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext, icmp: &Icmp6Packet) -> Option<u32> {
    if !is_error(icmp.kind) {
        return None;
    }
    let (off, inner, proto) = quoted(ctx, icmp)?;
    let [client_port, backend_port] = load(ctx.ptr_at::<[u16; 2]>(off + IPV6_HLEN)?);
    // The flow's reply direction (backend -> client), as its reverse NAT entry is keyed.
    let reply = FlowKey {
        src: load(unsafe { &raw const (*inner).daddr }),
        dst: load(unsafe { &raw const (*inner).saddr }),
        src_port: backend_port,
        dst_port: client_port,
        proto,
        family: FAMILY_V6,
        _pad: 0,
    };
    // An error goes to the source of the packet it quotes.
    if reply.dst != icmp.daddr {
        return None;
    }
    let rev = conntrack::reply_mapping(&reply)?;
    match rewrite_quote(ctx, icmp, off, &reply, &rev.vip, rev.vip_port) {
        Ok(()) => stats::count(Reason::RevNat),
        Err(_) => stats::count(Reason::RevNatError),
    }
    Some(rev.ifindex)
}

/// With the skb checksum helpers, as the v6 replies are rewritten (nat.rs): the quoted
/// destination and port (the backend's: `reply`'s source), and the outer source when the
/// backend sent the error (that one is in the pseudo-header).
#[inline(always)]
fn rewrite_quote(
    ctx: &TcContext,
    icmp: &Icmp6Packet,
    off: usize,
    reply: &FlowKey,
    vip: &[u32; 4],
    vip_port: u16,
) -> Result<(), i64> {
    let outer_src: [u32; 4] = ctx.load(icmp.l3_off + IP6_SADDR_OFF)?;
    let from_backend = outer_src == reply.src;
    let check = icmp.icmp_off + ICMPV6_CSUM_OFF;
    for (old, new) in reply.src.iter().zip(vip) {
        let (old, new) = (*old as u64, *new as u64);
        ctx.l4_csum_replace(check, old, new, 4)?;
        if from_backend {
            ctx.l4_csum_replace(check, old, new, BPF_F_PSEUDO_HDR as u64 | 4)?;
        }
    }
    ctx.l4_csum_replace(check, reply.src_port as u64, vip_port as u64, 2)?;
    ctx.store(off + IP6_DADDR_OFF, vip, 0)?;
    ctx.store(off + IPV6_HLEN + 2, &vip_port, 0)?;
    if from_backend {
        ctx.store(icmp.l3_off + IP6_SADDR_OFF, vip, 0)?;
    }
    Ok(())
}

/// Turns a dsr packet that would not fit the route once encapsulated into Packet Too Big
/// from the VIP to the client with `mtu` (to be sent back with XDP_TX). Only an untagged
/// frame without extension headers: None otherwise, and the packet is dropped.
#[inline(never)]
pub fn packet_too_big(ctx: &XdpContext, pkt: &L4Packet6, mtu: u16) -> Option<()> {
    if pkt.l3_off != ETH_HLEN || pkt.l4_off != ETH_HLEN + IPV6_HLEN {
        return None;
    }
    let [d0, d1, d2, s0, s1, s2] = load(ctx.ptr_at::<route::Macs>(0)?);
    // New IPv6 + ICMPv6 headers in front of the original header; the frame ends after the
    // quote.
    let grow = (IPV6_HLEN + ICMPV6_HLEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return None;
    }
    let keep = ETH_HLEN + IPV6_HLEN + ICMPV6_HLEN + PTB_QUOTE_LEN;
    let trim = ctx.data_end() as i32 - ctx.data() as i32 - keep as i32;
    if trim < 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, -trim) } != 0 {
        return None;
    }
    route::write_eth_ipv6(ctx, [s0, s1, s2, d0, d1, d2])?;
    let length = (ICMPV6_HLEN + PTB_QUOTE_LEN) as u16;
    let ip = ctx.ptr_at::<Ipv6Hdr>(ETH_HLEN)?;
    let header = Ipv6Hdr {
        version_class_flow: 0x6000_0000u32.to_be(),
        payload_len: length.to_be(),
        next_header: NEXT_ICMPV6,
        hop_limit: 64,
        saddr: pkt.daddr,
        daddr: pkt.saddr,
    };
    unsafe { core::ptr::write_unaligned(ip, header) };
    let icmp_off = ETH_HLEN + IPV6_HLEN;
    let icmp = ctx.ptr_at::<[u16; ICMPV6_HLEN / 2]>(icmp_off)?;
    let quote = ctx.ptr_at::<[u16; PTB_QUOTE_LEN / 2]>(icmp_off + ICMPV6_HLEN)?;
    let kind_code = u16::from_be_bytes([ICMPV6_PACKET_TOO_BIG, 0]).to_be();
    let mtu = (mtu as u32).to_be();
    let mut words = [kind_code, 0, mtu as u16, (mtu >> 16) as u16];
    // The pseudo-header: both addresses, the ICMPv6 length and next header.
    let mut total = csum::sum(&words) + csum::sum(unsafe { &*quote });
    for i in 0..4 {
        let (a, b) = (pkt.saddr[i], pkt.daddr[i]);
        total += (a >> 16) + (a & 0xffff) + (b >> 16) + (b & 0xffff);
    }
    total += length.to_be() as u32 + (NEXT_ICMPV6 as u16).to_be() as u32;
    words[1] = csum::fold(total);
    unsafe { core::ptr::write_unaligned(icmp, words) };
    Some(())
}
