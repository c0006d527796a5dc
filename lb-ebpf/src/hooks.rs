//! The balancer's hooks: XDP sends packets itself in every mode (nat, fullnat, dsr); TC
//! ingress (`xdp_mode = "tc"`) rewrites for mode nat and leaves sending to the kernel.
use aya_ebpf::{
    bindings::xdp_action::XDP_TX,
    helpers::bpf_ktime_get_coarse_ns,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Backend, FAMILY_V6, FlowKey, MODE_DSR, MODE_FULLNAT, MODE_NAT, Reason, SERVICE_GUE, SnatRev,
};

use crate::{
    balance::{Hook, Target, Verdict},
    conntrack::{self, Table},
    encap, icmp, icmp_tc, icmp6, maps,
    nat::{self, End, Endpoint, Snat},
    parse::{ETH_HLEN, IcmpPacket, L4Packet, PacketBuf, load},
    parse6::{IPV6_HLEN, Icmp6Packet, Ipv6Hdr, L4Packet6},
    route::{self, Decrement, Fallback},
    snat, stats,
};

impl Hook for XdpContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn source_towards(&self, backend: &Backend, now: u64, out: &mut [u32; 4]) -> bool {
        if backend.family == FAMILY_V6 {
            return route::source6(self, &backend.addr, out);
        }
        match route::lookup(self, backend.addr[0], 0, now).source() {
            Some(source) => {
                *out = [source, 0, 0, 0];
                true
            }
            None => false,
        }
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
    fn send6(&self, pkt: &L4Packet6, target: &Target, hash: u32, now: u64) -> Verdict {
        match target.mode {
            MODE_NAT => send_nat6(self, pkt, target, now),
            MODE_FULLNAT => send_fullnat6(self, pkt, target, now),
            // Sibling subprograms, not nested: see `dsr6_route`.
            MODE_DSR => match dsr6_route(self, pkt, target, now) {
                Dsr6Route::Ready => dsr6_send(self, pkt, target, hash),
                Dsr6Route::TooBig(fits) => match icmp6::packet_too_big(self, pkt, fits) {
                    Some(()) => Verdict::Sent(XDP_TX, Reason::FragNeeded),
                    None => Verdict::Drop(Reason::DropTooBig),
                },
                Dsr6Route::Failed(reason) => Verdict::Drop(reason),
            },
            _ => Verdict::Drop(Reason::DropUnsupportedMode),
        }
    }

    #[inline(always)]
    fn reverse6(&self, pkt: &L4Packet6, now: u64) -> Option<Verdict> {
        reverse_fullnat6(self, pkt, now)
    }

    /// To the backend's bridge, or the FIB's next hop, as the flow's packets go.
    #[inline(always)]
    fn icmp6_to_backend(&self, icmp: &Icmp6Packet, backend: &Backend) -> Verdict {
        if backend.deliver_ifindex != 0 {
            return Verdict::Forward {
                deliver_to: backend.deliver_ifindex,
            };
        }
        // A fullnat flow's error leaves from its SNAT address, which the kernel would not
        // forward (martian): TC sends it, as the flow's packets.
        let fallback = match maps::service(backend.service_id) {
            Some(svc) if svc.mode == MODE_FULLNAT => Fallback::Tc,
            _ => Fallback::Kernel,
        };
        route_icmp6(self, icmp.l3_off, &backend.addr, fallback)
    }

    #[inline(always)]
    fn icmp6_to_client(&self, icmp: &Icmp6Packet) -> Option<Verdict> {
        let client = icmp6::to_client(self, icmp)?;
        Some(route_icmp6(self, icmp.l3_off, client, Fallback::Tc))
    }
}

/// A subprogram: the FIB lookup's locals would otherwise add to the entry point's frame,
/// the first of the ICMP chain.
#[inline(never)]
fn route_icmp6(ctx: &XdpContext, l3_off: usize, to: &[u32; 4], fallback: Fallback) -> Verdict {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let hop = route::lookup6(ctx, to, now);
    let (action, reason) = route::transmit(ctx, &hop, l3_off, Decrement::HopLimit, fallback);
    Verdict::Sent(action, reason)
}

/// What a sender needs. Each mode's sender is a subprogram: the verifier checks it once per
/// call, and its stack is not added to the balancer's slow path.
struct Outgoing<'a> {
    pkt: &'a L4Packet,
    target: &'a Target<'a>,
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
    if nat::full_nat_v4(ctx, pkt, out.target.snat.v4(), backend).is_none() {
        return Verdict::Drop(Reason::DropMalformed);
    }
    let (action, reason) = route::transmit(ctx, &hop, pkt.l3_off, Decrement::Ttl, Fallback::Tc);
    Verdict::Sent(action, reason)
}

/// SNAT66 and DNAT66 (the flow's LB source, the backend), sent by the FIB as v4 fullnat is.
#[inline(never)]
fn send_fullnat6(ctx: &XdpContext, pkt: &L4Packet6, target: &Target, now: u64) -> Verdict {
    let backend = target.backend;
    let hop = route::lookup6(ctx, &backend.addr, now);
    if nat::full_nat_v6(ctx, pkt, target.snat, &backend.addr, backend.port).is_none() {
        return Verdict::Drop(Reason::DropMalformed);
    }
    let (action, reason) =
        route::transmit(ctx, &hop, pkt.l3_off, Decrement::HopLimit, Fallback::Tc);
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

/// What `dsr6_route` found.
enum Dsr6Route {
    /// The next hop and the source are in the scratch room.
    Ready,
    /// The packet would not fit once encapsulated: the client gets Packet Too Big from the
    /// VIP with this MTU, as v4 gets "fragmentation needed".
    TooBig(u16),
    Failed(Reason),
}

/// dsr over IPv6, first half: the route to the backend's host for the packet once
/// encapsulated, with the LB's source on it (into the scratch room). The halves and the
/// Packet Too Big answer are sibling subprograms: nested, or as one frame, they would
/// overflow the call chain's 512-byte stack.
#[inline(never)]
fn dsr6_route(ctx: &XdpContext, pkt: &L4Packet6, target: &Target, now: u64) -> Dsr6Route {
    let gue = target.flags & SERVICE_GUE != 0;
    let (Some(inner_len), Some(scratch)) = (ipv6_len(ctx, pkt.l3_off), maps::scratch()) else {
        return Dsr6Route::Failed(Reason::DropMalformed);
    };
    let outer_len = inner_len.saturating_add(encap::overhead6(gue) as u16);
    let source = &mut scratch.encap_src;
    let hop = route::lookup6_sized(ctx, &target.backend.addr, outer_len, now, Some(source));
    if hop.too_big() {
        return Dsr6Route::TooBig(hop.mtu.saturating_sub(encap::overhead6(gue) as u16));
    }
    if !hop.routed() || source.iter().all(|w| *w == 0) {
        return Dsr6Route::Failed(Reason::DropNoRoute);
    }
    scratch.encap_hop = hop;
    Dsr6Route::Ready
}

/// dsr over IPv6, second half: the client's packet inside IPv6 (or GUE over IPv6) to the
/// backend's host, from the source and to the next hop `dsr6_route` found.
#[inline(never)]
fn dsr6_send(ctx: &XdpContext, pkt: &L4Packet6, target: &Target, hash: u32) -> Verdict {
    let gue = target.flags & SERVICE_GUE != 0;
    let (Some(inner_len), Some(scratch)) = (ipv6_len(ctx, pkt.l3_off), maps::scratch()) else {
        return Verdict::Drop(Reason::DropMalformed);
    };
    let (source, dst) = (&scratch.encap_src, &target.backend.addr);
    if encap::encap_v6(ctx, pkt.l3_off, inner_len, source, dst, gue, hash).is_none() {
        return Verdict::Drop(Reason::DropMalformed);
    }
    let hop = &scratch.encap_hop;
    let (action, reason) = route::transmit(ctx, hop, ETH_HLEN, Decrement::No, Fallback::Tc);
    Verdict::Sent(action, reason)
}

/// The length of the IPv6 packet at `l3_off`, its header included.
#[inline(always)]
fn ipv6_len(ctx: &XdpContext, l3_off: usize) -> Option<u16> {
    let ip = ctx.ptr_at::<Ipv6Hdr>(l3_off)?;
    let payload = u16::from_be(load(unsafe { &raw const (*ip).payload_len }));
    Some(payload.saturating_add(IPV6_HLEN as u16))
}

/// A fullnat reply (backend -> SNAT address:port), translated back to VIP -> client.
#[inline(never)]
fn reverse_fullnat(ctx: &XdpContext, pkt: &L4Packet, now: u64) -> Option<Verdict> {
    let entry = reply_seen(&pkt.flow_key(), pkt.fin, pkt.rst, now)?;
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

/// A fullnat reply over IPv6 (backend -> SNAT address:port), translated back to VIP ->
/// client.
#[inline(never)]
fn reverse_fullnat6(ctx: &XdpContext, pkt: &L4Packet6, now: u64) -> Option<Verdict> {
    let entry = reply_seen(&pkt.flow_key(), pkt.fin, pkt.rst, now)?;
    let vip = Snat {
        addr: entry.vip,
        port: entry.vip_port,
    };
    let hop = route::lookup6(ctx, &entry.client, now);
    if nat::full_nat_v6(ctx, pkt, &vip, &entry.client, entry.client_port).is_none() {
        return Some(Verdict::Drop(Reason::DropMalformed));
    }
    stats::count(Reason::RevSnat);
    let (action, reason) =
        route::transmit(ctx, &hop, pkt.l3_off, Decrement::HopLimit, Fallback::Tc);
    Some(Verdict::Sent(action, reason))
}

/// The fullnat reservation of a reply (`reply`: backend -> SNAT address:port), with the
/// reply recorded on it and on its flow. A subprogram: the forward key stays off the
/// reverse senders' frames.
#[inline(never)]
fn reply_seen(reply: &FlowKey, fin: bool, rst: bool, now: u64) -> Option<&'static SnatRev> {
    let (entry, embryonic) = snat::reservation(reply)?;
    let entry = unsafe { &mut *entry };
    snat::touch(entry, now, fin || rst, embryonic);
    let table = if embryonic { Table::New } else { Table::Main };
    let forward = FlowKey {
        src: entry.client,
        dst: entry.vip,
        src_port: entry.client_port,
        dst_port: entry.vip_port,
        proto: reply.proto,
        family: reply.family,
        _pad: 0,
    };
    conntrack::reply_seen(&forward, table, fin, rst);
    Some(entry)
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

    fn source_towards(&self, _backend: &Backend, _now: u64, _out: &mut [u32; 4]) -> bool {
        false
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
    fn send6(&self, pkt: &L4Packet6, target: &Target, _hash: u32, _now: u64) -> Verdict {
        if target.mode != MODE_NAT {
            return Verdict::Drop(Reason::DropUnsupportedMode);
        }
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

    fn reverse6(&self, _pkt: &L4Packet6, _now: u64) -> Option<Verdict> {
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

    /// The TC balancer has no fullnat flows.
    fn icmp6_to_client(&self, _icmp: &Icmp6Packet) -> Option<Verdict> {
        None
    }
}
