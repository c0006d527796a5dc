//! Remote delivery at XDP speed: the kernel's FIB picks the next hop, XDP writes the MACs
//! and sends the packet itself: XDP_TX out of the NIC it came in on, XDP_REDIRECT (devmap)
//! out of another front NIC. What XDP cannot send itself goes to the kernel, never to a drop:
//! an unresolved neighbour is handed to TC, which resolves it (bpf_redirect_neigh).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    Reason,
    sizes::{HOP_CACHE_BITS, HOP_CACHE_NS},
};

use crate::{
    deliver,
    maps::{FIB_PARAMS, HOP_CACHE, HOP_CACHE6, TX_PORTS},
    parse::{ETH_HLEN, Ipv4Hdr, PacketBuf, load},
    parse6::{Addr6, Ipv6Hdr, copy_addr},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Destination then source MAC as 16-bit words in wire order: twelve separate bytes would
/// each take a register or an 8-byte stack slot.
pub type Macs = [u16; 6];

/// Where the FIB sends a packet.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NextHop {
    rc: u32,
    ifindex: u32,
    /// The route's preferred source address.
    src: u32,
    /// Destination then source MAC, as they go into the Ethernet header.
    macs: Macs,
    /// XDP can send out of `ifindex`: it is the ingress NIC or a front NIC in TX_PORTS.
    own_port: bool,
    _pad: u8,
    /// The route's MTU, when the packet was too big for it.
    pub mtu: u16,
}

impl NextHop {
    /// The address the LB sends from on this route.
    #[inline(always)]
    pub fn source(&self) -> Option<u32> {
        (self.routed() && self.src != 0).then_some(self.src)
    }

    /// The FIB found a route (the neighbour may be unresolved yet).
    #[inline(always)]
    pub fn routed(&self) -> bool {
        matches!(
            self.rc,
            BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH
        )
    }

    #[inline(always)]
    pub fn too_big(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_FRAG_NEEDED
    }
}

/// A FIB answer kept per CPU for a second: the lookup costs more than the rest of an
/// established flow's path. Answers to retry soon (no neighbour yet, too big) are not kept.
#[repr(C)]
pub struct CachedHop {
    daddr: u32,
    ingress: u32,
    /// The largest IP length the route was checked for (dsr's MTU check).
    checked_len: u16,
    _pad: [u8; 6],
    checked_ns: u64,
    hop: NextHop,
}

/// The next hop towards `daddr` for an IP packet of `tot_len` bytes (0: no MTU check).
#[inline(always)]
pub fn lookup(ctx: &XdpContext, daddr: u32, tot_len: u16, now: u64) -> NextHop {
    let ingress = ctx.ingress_ifindex() as u32;
    let slot = (daddr ^ ingress).wrapping_mul(0x9e37_79b1) >> (32 - HOP_CACHE_BITS);
    let cached = HOP_CACHE.get_ptr_mut(slot);
    if let Some(entry) = cached {
        let entry = unsafe { &*entry };
        if entry.daddr == daddr
            && entry.ingress == ingress
            && tot_len <= entry.checked_len
            && now.wrapping_sub(entry.checked_ns) <= HOP_CACHE_NS
        {
            return entry.hop;
        }
    }
    let hop = fib(ctx, ingress, daddr, tot_len);
    if !matches!(
        hop.rc,
        BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED
    ) && let Some(entry) = cached
    {
        // Field by field: a whole CachedHop built first would take stack room.
        unsafe {
            (*entry).daddr = daddr;
            (*entry).ingress = ingress;
            (*entry).checked_len = tot_len;
            (*entry).checked_ns = now;
            (*entry).hop = hop;
        }
    }
    hop
}

#[inline(always)]
fn fib(ctx: &XdpContext, ingress: u32, daddr: u32, tot_len: u16) -> NextHop {
    // The source is asked for always, so one answer serves every use of the route.
    ask(ctx, ingress, BPF_FIB_LOOKUP_SRC, |params| {
        params.family = AF_INET;
        params.__bindgen_anon_1.tot_len = tot_len;
        params.__bindgen_anon_4.ipv4_dst = daddr;
    })
}

/// `CachedHop` for an IPv6 destination, with the route's source (dsr's outer header).
#[repr(C)]
pub struct CachedHop6 {
    daddr: Addr6,
    src: Addr6,
    ingress: u32,
    checked_len: u16,
    _pad: u16,
    checked_ns: u64,
    hop: NextHop,
}

/// The next hop towards the IPv6 address `daddr`, cached per CPU as `lookup` does, without
/// an MTU check (nat and fullnat need none).
#[inline(always)]
pub fn lookup6(ctx: &XdpContext, daddr: &Addr6, now: u64) -> NextHop {
    lookup6_sized(ctx, daddr, 0, now, None)
}

/// `lookup6` for an IP packet of `tot_len` bytes (0: no MTU check), writing the route's
/// source into `src` when asked (dsr; it is unset when the route has none).
#[inline(always)]
pub fn lookup6_sized(
    ctx: &XdpContext,
    daddr: &Addr6,
    tot_len: u16,
    now: u64,
    src: Option<&mut Addr6>,
) -> NextHop {
    let ingress = ctx.ingress_ifindex() as u32;
    let mix = daddr[0] ^ daddr[1] ^ daddr[2] ^ daddr[3] ^ ingress;
    let slot = mix.wrapping_mul(0x9e37_79b1) >> (32 - HOP_CACHE_BITS);
    let cached = HOP_CACHE6.get_ptr_mut(slot);
    if let Some(entry) = cached {
        let entry = unsafe { &*entry };
        if entry.daddr == *daddr
            && entry.ingress == ingress
            && tot_len <= entry.checked_len
            && now.wrapping_sub(entry.checked_ns) <= HOP_CACHE_NS
        {
            if let Some(src) = src {
                copy_addr(src, &entry.src);
            }
            return entry.hop;
        }
    }
    // The source is asked for always, as for IPv4: one answer serves every use.
    let hop = ask(ctx, ingress, BPF_FIB_LOOKUP_SRC, |params| {
        params.family = AF_INET6;
        params.__bindgen_anon_1.tot_len = tot_len;
        params.__bindgen_anon_4.ipv6_dst = *daddr;
    });
    let Some(params) = FIB_PARAMS.get_ptr(0) else {
        return hop;
    };
    let found = unsafe { &(*params).__bindgen_anon_3.ipv6_src };
    if let Some(src) = src {
        copy_addr(src, found);
    }
    if !matches!(
        hop.rc,
        BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED
    ) && let Some(entry) = cached
    {
        unsafe {
            (*entry).daddr = *daddr;
            copy_addr(&mut (*entry).src, found);
            (*entry).ingress = ingress;
            (*entry).checked_len = tot_len;
            (*entry).checked_ns = now;
            (*entry).hop = hop;
        }
    }
    hop
}

/// Writes the address the LB sends from towards the IPv6 address `daddr` into `out` (fullnat
/// over v6 without a pool). Uncached: a new flow asks once, its packets do not.
#[inline(always)]
pub fn source6(ctx: &XdpContext, daddr: &Addr6, out: &mut Addr6) -> bool {
    let ingress = ctx.ingress_ifindex() as u32;
    let hop = ask(ctx, ingress, BPF_FIB_LOOKUP_SRC, |params| {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = *daddr;
    });
    if !hop.routed() {
        return false;
    }
    let Some(params) = FIB_PARAMS.get_ptr(0) else {
        return false;
    };
    *out = unsafe { (*params).__bindgen_anon_3.ipv6_src };
    out.iter().any(|w| *w != 0)
}

/// Asks the FIB from `ingress` with the family and destination `fill` writes; `flags`:
/// BPF_FIB_LOOKUP_*. The parameters live in a per-CPU map value, not on the stack (512
/// bytes in all).
#[inline(always)]
fn ask(ctx: &XdpContext, ingress: u32, flags: u32, fill: impl FnOnce(&mut FibParams)) -> NextHop {
    let Some(params) = FIB_PARAMS.get_ptr_mut(0) else {
        return NextHop {
            rc: BPF_FIB_LKUP_RET_NOT_FWDED,
            ..NextHop::default()
        };
    };
    // Word by word: write_bytes becomes a call to the library memset, whose byte loop the
    // verifier walks 64 times at every call site.
    const WORDS: usize = size_of::<FibParams>() / 8;
    const _: () = assert!(size_of::<FibParams>() == WORDS * 8);
    let words = params.cast::<u64>();
    for i in 0..WORDS {
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    let params = unsafe { &mut *params };
    params.ifindex = ingress;
    fill(params);
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), params, size_of::<FibParams>() as i32, flags) }
        as u32;
    let dmac: [u16; 3] = unsafe { core::ptr::read_unaligned(params.dmac.as_ptr().cast()) };
    let smac: [u16; 3] = unsafe { core::ptr::read_unaligned(params.smac.as_ptr().cast()) };
    let macs = [dmac[0], dmac[1], dmac[2], smac[0], smac[1], smac[2]];
    let ifindex = params.ifindex;
    NextHop {
        rc,
        ifindex,
        src: if params.family == AF_INET {
            unsafe { params.__bindgen_anon_3.ipv4_src }
        } else {
            0
        },
        macs,
        own_port: ifindex == ingress || TX_PORTS.get_ifindex(ifindex).is_some(),
        _pad: 0,
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
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

/// What a router decrements in the packet at `l3_off` before XDP sends it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Decrement {
    /// Nothing: the LB is the packet's source (an encapsulation, an answer).
    No,
    /// The IPv4 TTL.
    Ttl,
    /// The IPv6 hop limit.
    HopLimit,
}

/// Sends a rewritten packet (IP at `l3_off`) to `hop`; returns the XDP action.
#[inline(always)]
pub fn transmit(
    ctx: &XdpContext,
    hop: &NextHop,
    l3_off: usize,
    decrement: Decrement,
    fallback: Fallback,
) -> (u32, Reason) {
    let ifindex = hop.ifindex;
    let ingress = ctx.ingress_ifindex() as u32;
    let to_tc = |reason| {
        if deliver::mark(ctx, ifindex) {
            (XDP_PASS, reason)
        } else {
            (XDP_PASS, Reason::DeliverError)
        }
    };
    let by_xdp = match hop.rc {
        // A VLAN-tagged frame keeps its tag only through the kernel.
        BPF_FIB_LKUP_RET_SUCCESS if hop.own_port && l3_off == ETH_HLEN => true,
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH if fallback == Fallback::Tc => false,
        // The kernel forwards it, and decrements the TTL itself.
        _ => return (XDP_PASS, Reason::Forwarded),
    };
    let alive = match decrement {
        Decrement::No => true,
        Decrement::Ttl => decrement_ttl(ctx, l3_off),
        Decrement::HopLimit => decrement_hop_limit(ctx, l3_off),
    };
    if !alive {
        return (XDP_PASS, Reason::PassTtl);
    }
    if !by_xdp {
        return to_tc(Reason::HandedToTc);
    }
    let Some(eth) = ctx.ptr_at::<Macs>(0) else {
        return (XDP_PASS, Reason::Forwarded);
    };
    unsafe { core::ptr::write_unaligned(eth, hop.macs) };
    if ifindex == ingress {
        return (XDP_TX, Reason::Tx);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => (action, Reason::Redirected),
        Err(_) => to_tc(Reason::HandedToTc),
    }
}

/// Writes an Ethernet header for IPv4 with `macs` (destination, then source) in front of the
/// packet: for frames whose head XDP moved (encapsulation, an ICMP answer).
#[inline(always)]
pub fn write_eth_ipv4(ctx: &XdpContext, macs: Macs) -> Option<()> {
    write_eth(ctx, macs, ETH_P_IP)
}

/// `write_eth_ipv4` for an IPv6 packet.
#[inline(always)]
pub fn write_eth_ipv6(ctx: &XdpContext, macs: Macs) -> Option<()> {
    write_eth(ctx, macs, ETH_P_IPV6)
}

#[inline(always)]
fn write_eth(ctx: &XdpContext, macs: Macs, eth_type: u16) -> Option<()> {
    let eth = ctx.ptr_at::<[u16; ETH_HLEN / 2]>(0)?;
    let [d0, d1, d2, s0, s1, s2] = macs;
    let header = [d0, d1, d2, s0, s1, s2, eth_type.to_be()];
    unsafe { core::ptr::write_unaligned(eth, header) };
    Some(())
}

/// Decrements the TTL as a router does (RFC 1624 update); false if it would reach zero.
#[inline(always)]
fn decrement_ttl(ctx: &XdpContext, l3_off: usize) -> bool {
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

/// Decrements the IPv6 hop limit (no checksum covers it); false if it would reach zero.
#[inline(always)]
fn decrement_hop_limit(ctx: &XdpContext, l3_off: usize) -> bool {
    let Some(ip) = ctx.ptr_at::<Ipv6Hdr>(l3_off) else {
        return false;
    };
    unsafe {
        let hops = load(&raw const (*ip).hop_limit);
        if hops <= 1 {
            return false;
        }
        (*ip).hop_limit = hops - 1;
    }
    true
}
