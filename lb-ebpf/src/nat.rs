//! Address and port rewrites with incremental checksum updates.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::PROTO_UDP;

use crate::{
    csum,
    parse::{Ipv4Hdr, L4Packet, PacketBuf, load},
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

/// DNAT in XDP: destination address and port become the backend's.
#[inline(always)]
pub fn dnat_v4(ctx: &XdpContext, pkt: &L4Packet, daddr: u32, dport: u16) -> Option<()> {
    let ip = ctx.ptr_at::<Ipv4Hdr>(pkt.l3_off)?;
    let check = ctx.ptr_at::<u16>(pkt.csum_off)?;
    let port = ctx.ptr_at::<u16>(pkt.l4_off + 2)?;

    unsafe {
        store(&raw mut (*ip).daddr, daddr);
        let ip_check = load(&raw const (*ip).check);
        store(
            &raw mut (*ip).check,
            csum::replace4(ip_check, pkt.daddr, daddr),
        );
    }
    store(port, dport);

    let l4_check = load(check);
    // A zero UDP checksum means "none": leave it so.
    if pkt.proto == PROTO_UDP && l4_check == 0 {
        return Some(());
    }
    let mut l4_check = csum::replace4(l4_check, pkt.daddr, daddr);
    l4_check = csum::replace2(l4_check, pkt.dport, dport);
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
    let udp_flag = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
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
