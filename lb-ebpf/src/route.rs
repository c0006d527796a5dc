//! Remote delivery at XDP speed: the kernel's FIB picks the next hop, XDP writes the MACs
//! and sends the packet itself: XDP_TX out of the NIC it came in on, XDP_REDIRECT (devmap)
//! out of another front NIC. What XDP cannot send itself goes to the kernel, never to a drop:
//! an unresolved neighbour is handed to TC, which resolves it (bpf_redirect_neigh).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SRC, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::Reason;

use crate::{
    deliver,
    maps::TX_PORTS,
    parse::{ETH_HLEN, Ipv4Hdr, PacketBuf, load},
};

const AF_INET: u8 = 2;

/// Where the FIB sends a packet.
pub struct NextHop {
    params: FibParams,
    rc: u32,
}

/// What `lookup` is asked for.
pub struct Query {
    pub proto: u8,
    /// 0: ask the FIB for the source address the kernel would use (see `source`).
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// IP length that will be sent, for the MTU check (0: no check).
    pub tot_len: u16,
}

impl NextHop {
    /// The route's preferred source address (when the query's `saddr` was 0).
    #[inline(always)]
    pub fn source(&self) -> Option<u32> {
        let src = unsafe { self.params.__bindgen_anon_3.ipv4_src };
        (matches!(
            self.rc,
            BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH
        ) && src != 0)
            .then_some(src)
    }

    #[inline(always)]
    pub fn too_big(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED
    }
}

#[inline(always)]
pub fn lookup(ctx: &XdpContext, q: &Query) -> NextHop {
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = q.proto;
    params.sport = q.sport;
    params.dport = q.dport;
    params.__bindgen_anon_1.tot_len = q.tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = q.saddr;
    params.__bindgen_anon_4.ipv4_dst = q.daddr;
    let flags = if q.saddr == 0 { BPF_FIB_LOOKUP_SRC } else { 0 };
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<FibParams>() as i32,
            flags,
        )
    };
    NextHop {
        params,
        rc: rc as u32,
    }
}

/// Who may send a packet XDP cannot send itself.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The kernel's forwarding path (mode nat: the packet is an ordinary forwarded one).
    Kernel,
    /// TC's bpf_redirect_neigh: the packet carries an LB address as source (fullnat, dsr),
    /// which the kernel would drop as martian.
    Tc,
}

/// Sends a rewritten packet (IPv4 at `l3_off`) to `hop`; returns the XDP action.
#[inline(always)]
pub fn transmit(
    ctx: &XdpContext,
    hop: &NextHop,
    l3_off: usize,
    decrement_ttl: bool,
    fallback: Fallback,
) -> (u32, Reason) {
    let ifindex = hop.params.ifindex;
    let ingress = ctx.ingress_ifindex() as u32;
    let own_port = ifindex == ingress || TX_PORTS.get_ifindex(ifindex).is_some();
    let to_tc = |reason| {
        if deliver::mark(ctx, ifindex) {
            (XDP_PASS, reason)
        } else {
            (XDP_PASS, Reason::DeliverError)
        }
    };
    let by_xdp = match hop.rc {
        // A VLAN-tagged frame keeps its tag only through the kernel.
        BPF_FIB_LKUP_RET_SUCCESS if own_port && l3_off == ETH_HLEN => true,
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH if fallback == Fallback::Tc => false,
        // The kernel forwards it, and decrements the TTL itself.
        _ => return (XDP_PASS, Reason::Forwarded),
    };
    if decrement_ttl && !decrement(ctx, l3_off) {
        return (XDP_PASS, Reason::PassTtl);
    }
    if !by_xdp {
        return to_tc(Reason::HandedToTc);
    }
    let Some(eth) = ctx.ptr_at::<[u8; 12]>(0) else {
        return (XDP_PASS, Reason::Forwarded);
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&hop.params.dmac);
    macs[6..].copy_from_slice(&hop.params.smac);
    unsafe { core::ptr::write_unaligned(eth, macs) };
    if ifindex == ingress {
        return (XDP_TX, Reason::Tx);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => (action, Reason::Redirected),
        Err(_) => to_tc(Reason::HandedToTc),
    }
}

/// Decrements the TTL as a router does (RFC 1624 update); false if it would reach zero.
#[inline(always)]
fn decrement(ctx: &XdpContext, l3_off: usize) -> bool {
    let Some(ip) = ctx.ptr_at::<Ipv4Hdr>(l3_off) else {
        return false;
    };
    unsafe {
        let ttl = load(&raw const (*ip).ttl);
        if ttl <= 1 {
            return false;
        }
        (*ip).ttl = ttl - 1;
        // The TTL is the high byte of its 16-bit word: the sum drops by 0x0100.
        let check = u16::from_be(load(&raw const (*ip).check)) as u32 + 0x0100;
        let check = (check + (check >> 16)) as u16;
        core::ptr::write(&raw mut (*ip).check, check.to_be());
    }
    true
}
