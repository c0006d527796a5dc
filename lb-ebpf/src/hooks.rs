//! The balancer's hooks: XDP sends packets itself in every mode (nat, fullnat, dsr); TC
//! ingress (`xdp_mode = "tc"`) rewrites for mode nat and leaves sending to the kernel.
use aya_ebpf::{
    bindings::xdp_action::XDP_TX,
    helpers::bpf_ktime_get_coarse_ns,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Backend, FAMILY_V4, FlowKey, MODE_DSR, MODE_FULLNAT, MODE_NAT, Reason, SERVICE_GUE,
};

use crate::{
    balance::{Hook, Target, Verdict},
    conntrack::{self, Table},
    encap, icmp, icmp_tc,
    nat::{self, End, Endpoint},
    parse::{ETH_HLEN, IcmpPacket, L4Packet},
    parse6::{Icmp6Packet, L4Packet6},
    route::{self, Decrement, Fallback},
    snat, stats,
};

impl Hook for XdpContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn source_towards(&self, daddr: u32, now: u64) -> Option<u32> {
        route::lookup(self, daddr, 0, now).source()
    }

    #[inline(always)]
    fn send(&self, pkt: &L4Packet, target: &Target, hash: u32, now: u64) -> Verdict {
        let out = Outgoing {
            pkt,
            target,
            hash,
            now,
        };
        match target.mode {
            MODE_NAT => send_nat(self, &out),
            MODE_FULLNAT => send_fullnat(self, &out),
            MODE_DSR => send_dsr(self, &out),
            _ => Verdict::Drop(Reason::DropUnsupportedMode),
        }
    }

    #[inline(always)]
    fn reverse(&self, pkt: &L4Packet, now: u64) -> Option<Verdict> {
        reverse_fullnat(self, pkt, now)
    }

    #[inline(always)]
    fn icmp(&self, icmp: &IcmpPacket, now: u64) -> Verdict {
        icmp::handle(self, icmp, now)
    }

    #[inline(always)]
    fn send6(&self, pkt: &L4Packet6, target: &Target, now: u64) -> Verdict {
        send_nat6(self, pkt, target, now)
    }

    /// To the backend's bridge, or the FIB's next hop, as the flow's packets go.
    #[inline(always)]
    fn icmp6_to_backend(&self, icmp: &Icmp6Packet, backend: &Backend) -> Verdict {
        if backend.deliver_ifindex != 0 {
            return Verdict::Forward {
                deliver_to: backend.deliver_ifindex,
            };
        }
        route_icmp6(self, icmp.l3_off, &backend.addr)
    }
}

/// A subprogram: the FIB lookup's locals would otherwise add to the entry point's frame,
/// the first of the ICMP chain.
#[inline(never)]
fn route_icmp6(ctx: &XdpContext, l3_off: usize, to: &[u32; 4]) -> Verdict {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let hop = route::lookup6(ctx, to, now);
    let (action, reason) =
        route::transmit(ctx, &hop, l3_off, Decrement::HopLimit, Fallback::Kernel);
    Verdict::Sent(action, reason)
}

/// What a sender needs. Each mode's sender is a subprogram: the verifier checks it once per
/// call, and its stack is not added to the balancer's slow path.
struct Outgoing<'a> {
    pkt: &'a L4Packet,
    target: &'a Target,
    hash: u32,
    now: u64,
}

impl Outgoing<'_> {
    #[inline(always)]
    fn backend(&self) -> Endpoint {
        Endpoint {
            addr: self.target.backend.addr[0],
            port: self.target.backend.port,
        }
    }
}

#[inline(never)]
fn send_nat(ctx: &XdpContext, out: &Outgoing) -> Verdict {
    let (pkt, target, backend) = (out.pkt, out.target, out.backend());
    if nat::dnat_v4(ctx, pkt, backend).is_none() {
        return Verdict::Drop(Reason::DropMalformed);
    }
    if target.backend.deliver_ifindex != 0 {
        return local_delivery(pkt.l3_off, target);
    }
    let hop = route::lookup(ctx, backend.addr, 0, out.now);
    let (action, reason) = route::transmit(ctx, &hop, pkt.l3_off, Decrement::Ttl, Fallback::Kernel);
    Verdict::Sent(action, reason)
}

/// DNAT66 to the backend, sent as v4 nat is (local bridge, or the FIB's next hop).
#[inline(never)]
fn send_nat6(ctx: &XdpContext, pkt: &L4Packet6, target: &Target, now: u64) -> Verdict {
    let backend = target.backend;
    if nat::dnat_v6(ctx, pkt, &backend.addr, backend.port).is_none() {
        return Verdict::Drop(Reason::DropMalformed);
    }
    if backend.deliver_ifindex != 0 {
        return local_delivery(pkt.l3_off, target);
    }
    let hop = route::lookup6(ctx, &backend.addr, now);
    let (action, reason) =
        route::transmit(ctx, &hop, pkt.l3_off, Decrement::HopLimit, Fallback::Kernel);
    Verdict::Sent(action, reason)
}

#[inline(never)]
fn send_fullnat(ctx: &XdpContext, out: &Outgoing) -> Verdict {
    let (pkt, backend) = (out.pkt, out.backend());
    let hop = route::lookup(ctx, backend.addr, 0, out.now);
    if nat::full_nat_v4(ctx, pkt, out.target.snat, backend).is_none() {
        return Verdict::Drop(Reason::DropMalformed);
    }
    let (action, reason) = route::transmit(ctx, &hop, pkt.l3_off, Decrement::Ttl, Fallback::Tc);
    Verdict::Sent(action, reason)
}

#[inline(never)]
fn send_dsr(ctx: &XdpContext, out: &Outgoing) -> Verdict {
    let (pkt, backend) = (out.pkt, out.backend());
    let gue = out.target.flags & SERVICE_GUE != 0;
    let outer_len = pkt.tot_len + encap::overhead(gue) as u16;
    let hop = route::lookup(ctx, backend.addr, outer_len, out.now);
    if hop.too_big() {
        // Tell the client the MTU that fits once encapsulated.
        let fits = hop.mtu.saturating_sub(encap::overhead(gue) as u16);
        return match icmp::frag_needed(ctx, pkt, fits) {
            Some(()) => Verdict::Sent(XDP_TX, Reason::FragNeeded),
            None => Verdict::Drop(Reason::DropTooBig),
        };
    }
    let Some(source) = hop.source() else {
        return Verdict::Drop(Reason::DropNoRoute);
    };
    if encap::encap_v4(
        ctx,
        pkt.l3_off,
        pkt.tot_len,
        source,
        backend.addr,
        gue,
        out.hash,
    )
    .is_none()
    {
        return Verdict::Drop(Reason::DropMalformed);
    }
    let (action, reason) = route::transmit(ctx, &hop, ETH_HLEN, Decrement::No, Fallback::Tc);
    Verdict::Sent(action, reason)
}

/// A fullnat reply (backend -> SNAT address:port), translated back to VIP -> client.
#[inline(never)]
fn reverse_fullnat(ctx: &XdpContext, pkt: &L4Packet, now: u64) -> Option<Verdict> {
    let (entry, embryonic) = snat::reservation(&pkt.flow_key())?;
    let entry = unsafe { &mut *entry };
    snat::touch(entry, now, pkt.closing, embryonic);
    let table = if embryonic { Table::New } else { Table::Main };
    let forward = FlowKey {
        src: entry.client,
        dst: entry.vip,
        src_port: entry.client_port,
        dst_port: entry.vip_port,
        proto: pkt.proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    conntrack::reply_seen(&forward, table, pkt.fin, pkt.rst);
    let vip = Endpoint {
        addr: entry.vip[0],
        port: entry.vip_port,
    };
    let client = Endpoint {
        addr: entry.client[0],
        port: entry.client_port,
    };
    let hop = route::lookup(ctx, client.addr, 0, now);
    if nat::full_nat_v4(ctx, pkt, vip, client).is_none() {
        return Some(Verdict::Drop(Reason::DropMalformed));
    }
    stats::count(Reason::RevSnat);
    let (action, reason) = route::transmit(ctx, &hop, pkt.l3_off, Decrement::Ttl, Fallback::Tc);
    Some(Verdict::Sent(action, reason))
}

/// A packet for a local container: straight to its eth0 once the agent knows its host-side
/// veth (and the frame has no VLAN tag to strip), else through its bridge.
#[inline(always)]
fn local_delivery(l3_off: usize, target: &Target) -> Verdict {
    if l3_off == ETH_HLEN && target.backend.port_ifindex != 0 {
        Verdict::ToContainer {
            backend_id: target.backend_id,
        }
    } else {
        Verdict::Forward {
            deliver_to: target.backend.deliver_ifindex,
        }
    }
}

impl Hook for TcContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    fn source_towards(&self, _daddr: u32, _now: u64) -> Option<u32> {
        None
    }

    #[inline(always)]
    fn send(&self, pkt: &L4Packet, target: &Target, _hash: u32, _now: u64) -> Verdict {
        if target.mode != MODE_NAT {
            return Verdict::Drop(Reason::DropUnsupportedMode);
        }
        let backend = target.backend;
        if nat::rewrite_tc(self, pkt, End::Destination, backend.addr[0], backend.port).is_err() {
            return Verdict::Drop(Reason::DropMalformed);
        }
        if backend.deliver_ifindex == 0 {
            return Verdict::Forward { deliver_to: 0 };
        }
        local_delivery(pkt.l3_off, target)
    }

    #[inline(always)]
    fn send6(&self, pkt: &L4Packet6, target: &Target, _now: u64) -> Verdict {
        let backend = target.backend;
        if nat::rewrite_tc6(self, pkt, End::Destination, &backend.addr, backend.port).is_err() {
            return Verdict::Drop(Reason::DropMalformed);
        }
        if backend.deliver_ifindex == 0 {
            return Verdict::Forward { deliver_to: 0 };
        }
        local_delivery(pkt.l3_off, target)
    }

    fn reverse(&self, _pkt: &L4Packet, _now: u64) -> Option<Verdict> {
        None
    }

    /// As XDP for mode nat (the only mode of the TC balancer).
    fn icmp(&self, icmp: &IcmpPacket, _now: u64) -> Verdict {
        icmp_tc::handle(self, icmp)
    }

    /// The kernel routes it, or the backend's bridge takes it.
    fn icmp6_to_backend(&self, _icmp: &Icmp6Packet, backend: &Backend) -> Verdict {
        Verdict::Forward {
            deliver_to: backend.deliver_ifindex,
        }
    }
}
