//! Address and port rewrites with incremental checksum updates.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::PROTO_UDP;

use crate::{
    csum,
    parse::{Ipv4Hdr, L4Packet, PacketBuf, load},
    parse6::{Addr6, Ipv6Hdr, L4Packet6},
};

/// Offsets of the IPv4 checksum and addresses within the header.
const IP_CSUM_OFF: usize = 10;
const IP_SADDR_OFF: usize = 12;
const IP_DADDR_OFF: usize = 16;

/// Writes a header field (see `parse::load` on alignment).
#[inline(always)]
fn store<T>(p: *mut T, v: T) {
    unsafe { core::ptr::write(p, v) }
}

/// Writes an IPv6 address into a header word by word (a whole-array store may become a
/// library memmove, whose byte loop the verifier walks at every call site).
#[inline(always)]
fn store_addr6(p: *mut Addr6, addr: &Addr6) {
    let words = p.cast::<u32>();
    for (i, word) in addr.iter().enumerate() {
        unsafe { core::ptr::write_volatile(words.add(i), *word) };
    }
}

/// A new address and port for one end of a packet (network order).
#[derive(Clone, Copy, Default)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
}

/// A fullnat flow's source: the LB's address (IPv4 in the first word) and port, network
/// order.
#[derive(Clone, Copy, Default)]
pub struct Snat {
    pub addr: [u32; 4],
    pub port: u16,
}

impl Snat {
    /// The IPv4 endpoint of a v4 flow's source.
    #[inline(always)]
    pub fn v4(&self) -> Endpoint {
        Endpoint {
            addr: self.addr[0],
            port: self.port,
        }
    }
}

/// DNAT in XDP: destination address and port become the backend's.
#[inline(always)]
pub fn dnat_v4(ctx: &XdpContext, pkt: &L4Packet, dst: Endpoint) -> Option<()> {
    rewrite_v4(ctx, pkt, None, dst)
}

/// fullnat in XDP: both ends change (client -> VIP becomes SNAT -> backend, and back).
#[inline(always)]
pub fn full_nat_v4(ctx: &XdpContext, pkt: &L4Packet, src: Endpoint, dst: Endpoint) -> Option<()> {
    rewrite_v4(ctx, pkt, Some(src), dst)
}

#[inline(always)]
fn rewrite_v4(
    ctx: &XdpContext,
    pkt: &L4Packet,
    src: Option<Endpoint>,
    dst: Endpoint,
) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv4Hdr>(pkt.l3_off)?;
    let check = ctx.ptr_at::<u16>(pkt.csum_off)?;
    let ports = ctx.ptr_at::<[u16; 2]>(pkt.l4_off)?;

    let mut ip_check = load(unsafe { &raw const (*ip).check });
    let mut l4_check = load(check);
    // A zero UDP checksum means "none": leave it so.
    let l4_none = pkt.proto == PROTO_UDP && l4_check == 0;
    if let Some(src) = src {
        store(unsafe { &raw mut (*ip).saddr }, src.addr);
        store(unsafe { &raw mut (*ports)[0] }, src.port);
        ip_check = csum::replace4(ip_check, pkt.saddr, src.addr);
        l4_check = csum::replace4(l4_check, pkt.saddr, src.addr);
        l4_check = csum::replace2(l4_check, pkt.sport, src.port);
    }
    store(unsafe { &raw mut (*ip).daddr }, dst.addr);
    store(unsafe { &raw mut (*ports)[1] }, dst.port);
    store(
        unsafe { &raw mut (*ip).check },
        csum::replace4(ip_check, pkt.daddr, dst.addr),
    );
    if l4_none {
        return Some(());
    }
    l4_check = csum::replace4(l4_check, pkt.daddr, dst.addr);
    l4_check = csum::replace2(l4_check, pkt.dport, dst.port);
    if pkt.proto == PROTO_UDP && l4_check == 0 {
        l4_check = 0xffff;
    }
    store(check, l4_check);
    Some(())
}

/// DNAT66 in XDP: destination address and port become the backend's. v6 has no IP
/// checksum; the L4 one covers both addresses through the pseudo-header.
#[inline(always)]
pub fn dnat_v6(ctx: &XdpContext, pkt: &L4Packet6, addr: &Addr6, port: u16) -> Option<()> {
    rewrite_v6(ctx, pkt, None, addr, port)
}

/// fullnat over IPv6 in XDP: the source becomes `src` (an LB address and port, or the VIP on
/// a reply) and the destination `addr`:`port`.
#[inline(always)]
pub fn full_nat_v6(
    ctx: &XdpContext,
    pkt: &L4Packet6,
    src: &Snat,
    addr: &Addr6,
    port: u16,
) -> Option<()> {
    rewrite_v6(ctx, pkt, Some(src), addr, port)
}

#[inline(always)]
fn rewrite_v6(
    ctx: &XdpContext,
    pkt: &L4Packet6,
    src: Option<&Snat>,
    addr: &Addr6,
    port: u16,
) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv6Hdr>(pkt.l3_off)?;
    let check = ctx.ptr_at::<u16>(pkt.csum_off())?;
    let ports = ctx.ptr_at::<[u16; 2]>(pkt.l4_off)?;
    if let Some(src) = src {
        store_addr6(unsafe { &raw mut (*ip).saddr }, &src.addr);
        store(unsafe { &raw mut (*ports)[0] }, src.port);
    }
    store_addr6(unsafe { &raw mut (*ip).daddr }, addr);
    store(unsafe { &raw mut (*ports)[1] }, port);
    let mut l4_check = load(check);
    // UDP over v6 must carry a checksum; one that does not is left as it came.
    if pkt.proto == PROTO_UDP && l4_check == 0 {
        return Some(());
    }
    if let Some(src) = src {
        l4_check = csum::replace16(l4_check, &pkt.saddr, &src.addr);
        l4_check = csum::replace2(l4_check, pkt.sport, src.port);
    }
    l4_check = csum::replace16(l4_check, &pkt.daddr, addr);
    l4_check = csum::replace2(l4_check, pkt.dport, port);
    if pkt.proto == PROTO_UDP && l4_check == 0 {
        l4_check = 0xffff;
    }
    store(check, l4_check);
    Some(())
}

/// Which end of a packet a TC rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites one end's address and port in TC (DNAT of a request, or the reverse NAT of a
/// reply). Uses the skb checksum helpers, which also handle CHECKSUM_PARTIAL packets from
/// local senders and keep CHECKSUM_COMPLETE consistent.
#[inline(always)]
pub fn rewrite_tc(
    ctx: &TcContext,
    pkt: &L4Packet,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), i64> {
    let (old_addr, addr_off, old_port, port_off) = match end {
        End::Source => (pkt.saddr, IP_SADDR_OFF, pkt.sport, 0),
        End::Destination => (pkt.daddr, IP_DADDR_OFF, pkt.dport, 2),
    };
    let udp_flag = udp_mangled(pkt.proto);
    ctx.l4_csum_replace(
        pkt.csum_off,
        old_addr as u64,
        addr as u64,
        BPF_F_PSEUDO_HDR as u64 | udp_flag | 4,
    )?;
    ctx.l4_csum_replace(pkt.csum_off, old_port as u64, port as u64, udp_flag | 2)?;
    ctx.l3_csum_replace(pkt.l3_off + IP_CSUM_OFF, old_addr as u64, addr as u64, 4)?;
    ctx.store(pkt.l3_off + addr_off, &addr, 0)?;
    ctx.store(pkt.l4_off + port_off, &port, 0)?;
    Ok(())
}

/// The skb checksum helpers' flag for UDP: a checksum that comes out 0 is written as
/// 0xffff (0 means "none").
#[inline(always)]
fn udp_mangled(proto: u8) -> u64 {
    if proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Offsets of the IPv6 addresses within the header.
const IP6_SADDR_OFF: usize = 8;
const IP6_DADDR_OFF: usize = 24;

/// `rewrite_tc` for IPv6: the address word by word into the L4 checksum (pseudo-header).
#[inline(always)]
pub fn rewrite_tc6(
    ctx: &TcContext,
    pkt: &L4Packet6,
    end: End,
    addr: &Addr6,
    port: u16,
) -> Result<(), i64> {
    let (old_addr, addr_off, old_port, port_off) = match end {
        End::Source => (&pkt.saddr, IP6_SADDR_OFF, pkt.sport, 0),
        End::Destination => (&pkt.daddr, IP6_DADDR_OFF, pkt.dport, 2),
    };
    let udp_flag = udp_mangled(pkt.proto);
    for i in 0..4 {
        ctx.l4_csum_replace(
            pkt.csum_off(),
            old_addr[i] as u64,
            addr[i] as u64,
            BPF_F_PSEUDO_HDR as u64 | udp_flag | 4,
        )?;
    }
    ctx.l4_csum_replace(pkt.csum_off(), old_port as u64, port as u64, udp_flag | 2)?;
    ctx.store(pkt.l3_off + addr_off, addr, 0)?;
    ctx.store(pkt.l4_off + port_off, &port, 0)?;
    Ok(())
}
