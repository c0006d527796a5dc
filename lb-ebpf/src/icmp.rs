//! ICMP at the VIPs (Katran's handle_icmp does the like):
//! - errors about a VIP flow (fragmentation needed, unreachable, time exceeded: the quoted
//!   header is a packet the VIP sent) go to the backend that owns the flow, translated as
//!   its mode needs, so its path MTU discovery works (no black hole behind a small link);
//! - echo requests to a VIP are answered (`icmp_echo`, per service);
//! - dsr answers a packet too big to encapsulate with "fragmentation needed" itself;
//! - fullnat: errors a backend sends to a SNAT address about a flow go on to its client.
//!
//! ICMP the LB generates keeps the VLAN tag of the frame it answers.
use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FlowKey, MODE_DSR, MODE_FULLNAT, MODE_NAT, PROTO_TCP, PROTO_UDP, Reason,
    SERVICE_GUE, VIP_ADDR_ECHO, VipAddrKey, VipKey, flow_hash, ring_hash,
};

use crate::{
    balance::Verdict,
    csum, encap, maglev,
    maps::{self, CONNTRACK, CONNTRACK_NEW, VIP_ADDRS, VIPS},
    nat::Endpoint,
    parse::{ETH_HLEN, IPV4_HLEN, IcmpPacket, Ipv4Hdr, L4Packet, PROTO_ICMP, PacketBuf, load},
    route::{self, Decrement, Fallback},
    snat, stats,
};

const ICMP_HLEN: usize = 8;
/// The original IP header and the first 8 bytes after it (RFC 792).
const QUOTE_LEN: usize = IPV4_HLEN + 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Don't-fragment flag, host order.
const IP_DF: u16 = 0x4000;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IP: u16 = 0x0800;
const VLAN_HLEN: usize = 4;

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    unused: u16,
    mtu: u16,
}

/// The flags of the VIP address `daddr`, if it is one.
#[inline(always)]
pub fn vip_addr_flags(daddr: u32) -> Option<u32> {
    let key = VipAddrKey {
        addr: [daddr, 0, 0, 0],
        family: FAMILY_V4,
        _pad0: 0,
        _pad1: 0,
    };
    unsafe { VIP_ADDRS.get(key) }.copied()
}

/// What XDP does with ICMP to a VIP address (PASS `pass_not_l4` for any other ICMP, unless
/// it is a fullnat backend's error about a flow).
#[inline(never)]
pub fn handle(ctx: &XdpContext, icmp: &IcmpPacket, now: u64) -> Verdict {
    let Some(flags) = vip_addr_flags(icmp.daddr) else {
        return from_fullnat_backend(ctx, icmp, now).unwrap_or(Verdict::Pass(Reason::PassNotL4));
    };
    let answer = match icmp.kind {
        ICMP_ECHO if flags & VIP_ADDR_ECHO != 0 => {
            echo_reply(ctx, icmp).map(|()| Verdict::Bounce(Reason::IcmpEcho))
        }
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => to_backend(ctx, icmp, now),
        _ => None,
    };
    answer.unwrap_or(Verdict::Pass(Reason::PassIcmp))
}

/// Turns an echo request into its reply, in place, to go back out of the NIC it came in on.
#[inline(always)]
pub fn echo_reply<C: PacketBuf>(ctx: &C, icmp: &IcmpPacket) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv4Hdr>(icmp.l3_off)?;
    let header = ctx.ptr_at::<IcmpHdr>(icmp.icmp_off)?;
    let macs = ctx.ptr_at::<route::Macs>(0)?;
    unsafe {
        let [d0, d1, d2, s0, s1, s2] = load(macs);
        core::ptr::write_unaligned(macs, [s0, s1, s2, d0, d1, d2]);
        // Swapped addresses leave the IP checksum as it is; the TTL shares a word with the
        // protocol.
        (*ip).saddr = icmp.daddr;
        (*ip).daddr = icmp.saddr;
        let old = u16::from_be_bytes([load(&raw const (*ip).ttl), PROTO_ICMP]);
        (*ip).ttl = 64;
        let new = u16::from_be_bytes([64, PROTO_ICMP]);
        (*ip).check = csum::replace2(load(&raw const (*ip).check), old.to_be(), new.to_be());
        let old = u16::from_be_bytes([ICMP_ECHO, icmp.code]);
        (*header).kind = ICMP_ECHO_REPLY;
        let new = u16::from_be_bytes([ICMP_ECHO_REPLY, icmp.code]);
        (*header).check =
            csum::replace2(load(&raw const (*header).check), old.to_be(), new.to_be());
    }
    Some(())
}

/// The packet an ICMP error quotes: one the error's destination sent (from a VIP to a
/// client, or in fullnat from a SNAT address to a backend).
pub struct Quoted {
    off: usize,
    proto: u8,
    src: Endpoint,
    dst: Endpoint,
}

impl Quoted {
    /// The key of the packets that answer the quoted one (its destination -> its source),
    /// built in the scratch room (the stack is short here): a VIP flow's own key when the
    /// quote is the VIP's reply, a fullnat reply's key when it is the LB's request.
    #[inline(always)]
    fn answered_flow(&self) -> Option<&'static mut FlowKey> {
        let key = &mut maps::scratch()?.key;
        key.src = [self.dst.addr, 0, 0, 0];
        key.dst = [self.src.addr, 0, 0, 0];
        key.src_port = self.dst.port;
        key.dst_port = self.src.port;
        key.proto = self.proto;
        key.family = FAMILY_V4;
        key._pad = 0;
        Some(key)
    }
}

#[inline(always)]
fn quoted<C: PacketBuf>(ctx: &C, icmp: &IcmpPacket) -> Option<Quoted> {
    let off = icmp.icmp_off + ICMP_HLEN;
    // The quoted header and ports must lie inside the ICMP message, not in the frame's
    // padding past the IPv4 total length: a rewrite there would break the ICMP checksum.
    if off + IPV4_HLEN + 4 > icmp.l3_off + icmp.tot_len as usize {
        return None;
    }
    let ip = ctx.ptr_at::<Ipv4Hdr>(off)?;
    let ports = load(ctx.ptr_at::<[u16; 2]>(off + IPV4_HLEN)?);
    let proto = load(unsafe { &raw const (*ip).proto });
    let version_ihl = load(unsafe { &raw const (*ip).version_ihl });
    let saddr = load(unsafe { &raw const (*ip).saddr });
    if version_ihl != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) || saddr != icmp.daddr {
        return None;
    }
    Some(Quoted {
        off,
        proto,
        src: Endpoint {
            addr: saddr,
            port: ports[0],
        },
        dst: Endpoint {
            addr: load(unsafe { &raw const (*ip).daddr }),
            port: ports[1],
        },
    })
}

/// The backend that owns the flow an error to a VIP is about, and what sending it there
/// needs.
pub struct Owner {
    pub quoted: Quoted,
    pub mode: u8,
    pub service_flags: u8,
    pub backend: Endpoint,
    pub deliver_ifindex: u32,
    /// fullnat: the flow's SNAT address and port.
    pub snat: Endpoint,
    pub hash: u32,
}

/// Finds the backend of the flow an error is about: its conntrack entry, else the ring, as
/// for the flow's own packets. None: not about a flow this LB can place.
#[inline(always)]
pub fn owner<C: PacketBuf>(ctx: &C, icmp: &IcmpPacket) -> Option<Owner> {
    let q = quoted(ctx, icmp)?;
    let vip = VipKey {
        addr: [q.src.addr, 0, 0, 0],
        port: q.src.port,
        proto: q.proto,
        family: FAMILY_V4,
    };
    let svc = maps::service(*unsafe { VIPS.get(vip) }?).filter(|s| s.vip == vip)?;
    let flow = q.answered_flow()?;
    let known = match unsafe { CONNTRACK.get(&*flow) } {
        Some(f) => Some(f),
        None => unsafe { CONNTRACK_NEW.get(&*flow) },
    }
    .map(|f| {
        (
            u32::from(f.service_id),
            u32::from(f.backend_id),
            f.snat[0],
            f.snat_port,
        )
    });
    let hash = flow_hash(flow);
    let (backend_id, snat) = match known {
        Some((service_id, backend_id, addr, port)) if service_id == svc.id => {
            (backend_id, Endpoint { addr, port })
        }
        // fullnat cannot translate without the flow's SNAT port.
        _ if svc.mode == MODE_FULLNAT => return None,
        _ => (
            maglev::pick(svc, ring_hash(flow, hash, svc.flags))?.0,
            Endpoint::default(),
        ),
    };
    let backend = maps::backend(backend_id).filter(|b| b.service_id == svc.id)?;
    Some(Owner {
        quoted: q,
        mode: svc.mode,
        service_flags: svc.flags,
        backend: Endpoint {
            addr: backend.addr[0],
            port: backend.port,
        },
        deliver_ifindex: backend.deliver_ifindex,
        snat,
        hash,
    })
}

/// Sends an error about a VIP flow to the flow's backend, translated as its mode needs.
#[inline(always)]
fn to_backend(ctx: &XdpContext, icmp: &IcmpPacket, now: u64) -> Option<Verdict> {
    let Owner {
        quoted: q,
        mode,
        service_flags,
        backend: to,
        deliver_ifindex,
        snat,
        hash,
    } = owner(ctx, icmp)?;
    stats::count(Reason::IcmpToBackend);
    match mode {
        MODE_NAT => {
            translate(ctx, icmp, &q, None, to, None)?;
            if deliver_ifindex != 0 {
                return Some(Verdict::Forward {
                    deliver_to: deliver_ifindex,
                });
            }
            let hop = route::lookup(ctx, to.addr, 0, now);
            let (action, reason) =
                route::transmit(ctx, &hop, icmp.l3_off, Decrement::Ttl, Fallback::Kernel);
            Some(Verdict::Sent(action, reason))
        }
        MODE_FULLNAT => {
            let hop = route::lookup(ctx, to.addr, 0, now);
            translate(ctx, icmp, &q, Some(snat.addr), to, Some(snat))?;
            let (action, reason) =
                route::transmit(ctx, &hop, icmp.l3_off, Decrement::Ttl, Fallback::Tc);
            Some(Verdict::Sent(action, reason))
        }
        MODE_DSR => {
            // Encapsulated unchanged: the backend host has the VIP on lo.
            let gue = service_flags & SERVICE_GUE != 0;
            let outer_len = icmp.tot_len + encap::overhead(gue) as u16;
            let hop = route::lookup(ctx, to.addr, outer_len, now);
            let source = hop.source().filter(|_| !hop.too_big())?;
            encap::encap_v4(ctx, icmp.l3_off, icmp.tot_len, source, to.addr, gue, hash)?;
            let (action, reason) =
                route::transmit(ctx, &hop, ETH_HLEN, Decrement::No, Fallback::Tc);
            Some(Verdict::Sent(action, reason))
        }
        _ => None,
    }
}

/// An error a fullnat backend (or a router on its side) sends to a SNAT address about a
/// flow: sent on to the flow's client as the flow's replies are. The quoted packet becomes
/// the client's own (client -> VIP), and an error the backend sent itself leaves from the
/// VIP. None: about no flow of this LB.
#[inline(always)]
fn from_fullnat_backend(ctx: &XdpContext, icmp: &IcmpPacket, now: u64) -> Option<Verdict> {
    if icmp.kind != ICMP_DEST_UNREACH && icmp.kind != ICMP_TIME_EXCEEDED {
        return None;
    }
    let q = quoted(ctx, icmp)?;
    // The flow's reply direction (backend -> SNAT address:port), as reservations are keyed.
    let reply = q.answered_flow()?;
    let (entry, _) = snat::reservation(reply)?;
    let entry = unsafe { &*entry };
    let client = Endpoint {
        addr: entry.client[0],
        port: entry.client_port,
    };
    let vip = Endpoint {
        addr: entry.vip[0],
        port: entry.vip_port,
    };
    let outer_src = (icmp.saddr == q.dst.addr).then_some(vip.addr);
    let hop = route::lookup(ctx, client.addr, 0, now);
    translate(ctx, icmp, &q, outer_src, client, Some(vip))?;
    stats::count(Reason::RevSnat);
    let (action, reason) = route::transmit(ctx, &hop, icmp.l3_off, Decrement::Ttl, Fallback::Tc);
    Some(Verdict::Sent(action, reason))
}

/// Rewrites an ICMP error: the outer destination becomes `to` (and the source `outer_src`),
/// the quoted packet's source `to` and its destination `inner_dst`. Towards a backend: `to`
/// is the backend and, fullnat, `inner_dst` the SNAT address and port; from a fullnat
/// backend: `to` is the client and `inner_dst` the VIP. Every checksum updated
/// incrementally.
#[inline(always)]
pub fn translate<C: PacketBuf>(
    ctx: &C,
    icmp: &IcmpPacket,
    q: &Quoted,
    outer_src: Option<u32>,
    to: Endpoint,
    inner_dst: Option<Endpoint>,
) -> Option<()> {
    let outer = ctx.ptr_at::<Ipv4Hdr>(icmp.l3_off)?;
    let header = ctx.ptr_at::<IcmpHdr>(icmp.icmp_off)?;
    let inner = ctx.ptr_at::<Ipv4Hdr>(q.off)?;
    let ports = ctx.ptr_at::<[u16; 2]>(q.off + IPV4_HLEN)?;
    unsafe {
        let mut outer_check = load(&raw const (*outer).check);
        if let Some(src) = outer_src {
            outer_check = csum::replace4(outer_check, icmp.saddr, src);
            (*outer).saddr = src;
        }
        (*outer).check = csum::replace4(outer_check, icmp.daddr, to.addr);
        (*outer).daddr = to.addr;

        let old_inner_check = load(&raw const (*inner).check);
        let mut inner_check = csum::replace4(old_inner_check, q.src.addr, to.addr);
        let mut icmp_check = load(&raw const (*header).check);
        icmp_check = csum::replace4(icmp_check, q.src.addr, to.addr);
        icmp_check = csum::replace2(icmp_check, q.src.port, to.port);
        (*inner).saddr = to.addr;
        (*ports)[0] = to.port;
        if let Some(dst) = inner_dst {
            inner_check = csum::replace4(inner_check, q.dst.addr, dst.addr);
            icmp_check = csum::replace4(icmp_check, q.dst.addr, dst.addr);
            icmp_check = csum::replace2(icmp_check, q.dst.port, dst.port);
            (*inner).daddr = dst.addr;
            (*ports)[1] = dst.port;
        }
        (*inner).check = inner_check;
        (*header).check = csum::replace2(icmp_check, old_inner_check, inner_check);
    }
    Some(())
}

/// The Ethernet header (and VLAN tag) of the frame, to be written back in front of an
/// answer with the MACs swapped: (MACs swapped, tag or 0).
#[inline(always)]
fn l2_of(ctx: &XdpContext, l3_off: usize) -> Option<(route::Macs, Option<[u16; 2]>)> {
    let [d0, d1, d2, s0, s1, s2] = load(ctx.ptr_at::<route::Macs>(0)?);
    let tag = if l3_off == ETH_HLEN + VLAN_HLEN {
        Some(load(ctx.ptr_at::<[u16; 2]>(12)?))
    } else {
        None
    };
    Some(([s0, s1, s2, d0, d1, d2], tag))
}

/// Writes an Ethernet header (with the VLAN tag, if any) for IPv4 at the frame's start.
#[inline(always)]
fn write_l2(ctx: &XdpContext, macs: route::Macs, tag: Option<[u16; 2]>) -> Option<()> {
    match tag {
        None => route::write_eth_ipv4(ctx, macs),
        Some([tpid, tci]) => {
            let eth = ctx.ptr_at::<[u16; 9]>(0)?;
            let [a, b, c, d, e, f] = macs;
            let tpid = if u16::from_be(tpid) == ETH_P_8021AD {
                tpid
            } else {
                ETH_P_8021Q.to_be()
            };
            let header = [a, b, c, d, e, f, tpid, tci, ETH_P_IP.to_be()];
            unsafe { core::ptr::write_unaligned(eth, header) };
            Some(())
        }
    }
}

/// Turns the packet into the ICMP answer (to be sent back with XDP_TX); None if it must be
/// dropped instead (no DF flag: fragmenting is the sender's choice, not ours to answer).
#[inline(always)]
pub fn frag_needed(ctx: &XdpContext, pkt: &L4Packet, mtu: u16) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv4Hdr>(pkt.l3_off)?;
    if u16::from_be(load(unsafe { &raw const (*ip).frag_off })) & IP_DF == 0 || pkt.has_ip_options {
        return None;
    }
    let l3 = pkt.l3_off;
    let (macs, tag) = l2_of(ctx, l3)?;
    // New IP + ICMP headers in front of the original IP header; the frame ends after the quote.
    let grow = (IPV4_HLEN + ICMP_HLEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return None;
    }
    let keep = l3 + IPV4_HLEN + ICMP_HLEN + QUOTE_LEN;
    let trim = ctx.data_end() as i32 - ctx.data() as i32 - keep as i32;
    if trim < 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, -trim) } != 0 {
        return None;
    }

    // Back to where the packet came from: swapped MACs, the VIP answering the client.
    write_l2(ctx, macs, tag)?;
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
    let out_ip = ctx.ptr_at::<Ipv4Hdr>(l3)?;
    unsafe {
        core::ptr::write_unaligned(out_ip, ip);
        core::ptr::write_unaligned(&raw mut (*out_ip).check, ip_check);
    }

    let icmp_off = l3 + IPV4_HLEN;
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
