//! The balancing pipeline, the same at XDP and at TC ingress: parse, VIP, conntrack or
//! Maglev, counters. The hook (hooks.rs) rewrites and sends the packet in the service's mode.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, FAMILY_V4, FlowKey, MODE_FULLNAT, PROTO_TCP, Reason, SERVICE_ALLOW, VipAddrKey,
    VipKey, flow_hash, ring_hash,
};

use crate::{
    balance6::balance6,
    conntrack::{self, Table},
    decided::Decided,
    flowcache, maglev,
    maps::{self, VIP_ADDRS, VIPS},
    nat::Snat,
    parse::{IcmpPacket, L4Packet, PacketBuf, Parsed, Segment, parse},
    parse6::{Icmp6Packet, L4Packet6},
    snat, stats, trace,
};

pub enum Verdict {
    Pass(Reason),
    Drop(Reason),
    /// Rewritten to a backend; `deliver_to` is its local bridge (0: the kernel routes it).
    Forward {
        deliver_to: u32,
    },
    /// Rewritten for a local container whose host-side veth the agent has resolved: TC
    /// hands it to the container's eth0 (`deliver::to_container`).
    ToContainer {
        backend_id: u32,
    },
    /// Rewritten and sent by the hook itself: its action (XDP only).
    Sent(u32, Reason),
    /// Rewritten in place as an answer: back out of the interface it came in on.
    Bounce(Reason),
}

/// Where a flow goes: decided once per flow, then kept by conntrack and the flow cache.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub service_id: u32,
    pub mode: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub backend: &'static Backend,
    /// fullnat: the flow's SNAT address and port (in the decision's per-CPU room: 20 bytes
    /// more on the sender's frame would overflow the 512 bytes of the dsr call chain).
    pub snat: &'a Snat,
}

/// What differs between XDP and TC for the balancer.
pub trait Hook: PacketBuf {
    fn ingress_ifindex(&self) -> u32;
    /// Writes the address the LB would send from towards `backend` (fullnat's default
    /// source) into `out`; false if there is no route.
    fn source_towards(&self, backend: &Backend, now: u64, out: &mut [u32; 4]) -> bool;
    /// Rewrites the packet for its target in the service's mode and sends it.
    fn send(&self, pkt: &L4Packet, target: &Target, hash: u32, now: u64) -> Verdict;
    /// A fullnat reply (backend -> SNAT address) translated back and sent, if it is one.
    fn reverse(&self, pkt: &L4Packet, now: u64) -> Option<Verdict>;
    /// ICMP (to a VIP or not).
    fn icmp(&self, icmp: &IcmpPacket, now: u64) -> Verdict;
    /// `send` for IPv6: mode nat or fullnat, the ones `decide` lets a v6 flow have.
    fn send6(&self, pkt: &L4Packet6, target: &Target, hash: u32, now: u64) -> Verdict;
    /// `reverse` for IPv6.
    fn reverse6(&self, pkt: &L4Packet6, now: u64) -> Option<Verdict>;
    /// Sends an ICMPv6 error `icmp6::to_backend` rewrote for `backend`.
    fn icmp6_to_backend(&self, icmp: &Icmp6Packet, backend: &Backend) -> Verdict;
    /// An ICMPv6 error to a fullnat flow's SNAT address, translated and sent to its client
    /// (`icmp6::to_client`), if it is one.
    fn icmp6_to_client(&self, icmp: &Icmp6Packet) -> Option<Verdict>;
}

#[inline(always)]
pub fn balance<H: Hook>(ctx: &H) -> Verdict {
    let pkt = match parse(ctx) {
        Parsed::L4(pkt) => pkt,
        Parsed::Pass(reason) => return Verdict::Pass(reason),
        Parsed::Ipv6(l3_off) => return balance6(ctx, l3_off),
        Parsed::Icmp(icmp) => return ctx.icmp(&icmp, unsafe { bpf_ktime_get_coarse_ns() }),
        // Odd packets are ours to drop only when they are addressed to a VIP.
        Parsed::Fragment(daddr) if is_vip_addr(daddr) => {
            return Verdict::Drop(Reason::DropFragment);
        }
        Parsed::Fragment(_) => return Verdict::Pass(Reason::PassFragment),
        Parsed::Malformed(Some(daddr)) if is_vip_addr(daddr) => {
            return Verdict::Drop(Reason::DropMalformed);
        }
        Parsed::Malformed(_) => return Verdict::Pass(Reason::PassMalformed),
    };
    balance_flow(ctx, &pkt)
}

/// A TCP/UDP packet of either family, as the flow pipeline reads it.
pub trait FlowPacket: Segment + Sized {
    const FAMILY: u8;
    fn flow_key(&self) -> FlowKey;
    fn vip_key(&self) -> VipKey;
    /// IPv4 options: a VIP's packets with them are dropped.
    fn has_ip_options(&self) -> bool;
    /// Whether the service's allow list takes the packet's source.
    fn source_allowed(&self, service_id: u32) -> bool;
    /// Whether the source is in the prefix `addr`/`mask` (words in network order; IPv4:
    /// the first).
    fn source_in(&self, addr: &[u32; 4], mask: &[u32; 4]) -> bool;
    /// Rewrites the packet for its target and sends it (the hook's sender of this family).
    fn send<H: Hook>(&self, ctx: &H, target: &Target, hash: u32, now: u64) -> Verdict;
    /// Not for a VIP: maybe a fullnat reply, else the kernel's.
    fn not_vip<H: Hook>(&self, ctx: &H, now: u64) -> Verdict;
    fn trace_packet<H: Hook>(&self, ctx: &H, decided: &Decided, backend: &Backend, v: &Verdict);
    fn trace_dropped<H: Hook>(&self, ctx: &H, decided: &Decided, reason: Reason);
}

impl FlowPacket for L4Packet {
    const FAMILY: u8 = FAMILY_V4;
    #[inline(always)]
    fn flow_key(&self) -> FlowKey {
        L4Packet::flow_key(self)
    }
    #[inline(always)]
    fn vip_key(&self) -> VipKey {
        VipKey {
            addr: [self.daddr, 0, 0, 0],
            port: self.dport,
            proto: self.proto,
            family: FAMILY_V4,
        }
    }
    #[inline(always)]
    fn has_ip_options(&self) -> bool {
        self.has_ip_options
    }
    #[inline(always)]
    fn source_allowed(&self, service_id: u32) -> bool {
        maps::allowed(service_id, FAMILY_V4, [self.saddr, 0, 0, 0])
    }
    #[inline(always)]
    fn source_in(&self, addr: &[u32; 4], mask: &[u32; 4]) -> bool {
        self.saddr & mask[0] == addr[0]
    }
    #[inline(always)]
    fn send<H: Hook>(&self, ctx: &H, target: &Target, hash: u32, now: u64) -> Verdict {
        ctx.send(self, target, hash, now)
    }
    #[inline(always)]
    fn not_vip<H: Hook>(&self, ctx: &H, now: u64) -> Verdict {
        match ctx.reverse(self, now) {
            Some(verdict) => verdict,
            None => Verdict::Pass(Reason::PassNotVip),
        }
    }
    #[inline(always)]
    fn trace_packet<H: Hook>(&self, ctx: &H, decided: &Decided, backend: &Backend, v: &Verdict) {
        trace::packet(ctx, self, decided, backend, v);
    }
    #[inline(always)]
    fn trace_dropped<H: Hook>(&self, ctx: &H, decided: &Decided, reason: Reason) {
        trace::dropped(ctx, self, decided, reason);
    }
}

/// The flow pipeline: flow cache or slow path, then the send in the service's mode.
#[inline(always)]
pub fn balance_flow<H: Hook, P: FlowPacket>(ctx: &H, pkt: &P) -> Verdict {
    let flow = pkt.flow_key();
    let hash = flow_hash(&flow);
    // Coarse (jiffies) time is plenty for idle timeouts, and cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // Options to a VIP are dropped below, so such a packet skips the cache, as does a SYN,
    // which starts a flow, and a FIN or RST, which the slow path records.
    // In per-CPU room, not on the entry point's frame: the verifier adds that frame to the
    // ICMP handler's (512 bytes a call chain), and a target of either family is 32 bytes.
    let Some(decided) = maps::decided() else {
        return Verdict::Pass(Reason::PassNotVip);
    };
    decided.reset(0, 0, 0, false);
    let cached = !pkt.has_ip_options()
        && !pkt.syn()
        && !pkt.closing()
        && flowcache::lookup(&flow, hash, now, decided);
    let dropped = if cached {
        // A flow of a service that had a list when the slow path saw it (at most
        // FLOW_REFRESH_NS ago) is checked again: a list narrowed or removed since applies at
        // once, a list that is new within that second. Services without one pay nothing.
        (decided.flags & SERVICE_ALLOW != 0 && !still_allowed(decided, pkt))
            .then_some(Reason::DropNotAllowed)
    } else {
        let slow = Slow {
            pkt,
            flow: &flow,
            hash,
            now,
        };
        match decide(ctx, &slow, decided) {
            Outcome::Forward => None,
            Outcome::Drop(reason) => Some(reason),
            Outcome::NotVip => return pkt.not_vip(ctx, now),
        }
    };
    if let Some(reason) = dropped {
        return drop_traced(ctx, pkt, decided, reason);
    }
    send_placed(ctx, pkt, decided, hash, now)
}

/// Drops a packet of a VIP flow before it got a backend. A subprogram of one call site, so
/// the trace check stays off the balancer's frame (the verifier's 512 bytes a call chain).
#[inline(never)]
fn drop_traced<H: Hook, P: FlowPacket>(
    ctx: &H,
    pkt: &P,
    decided: &Decided,
    reason: Reason,
) -> Verdict {
    pkt.trace_dropped(ctx, decided, reason);
    Verdict::Drop(reason)
}

/// Sends a packet of a placed flow to its backend. A subprogram: the target and what the
/// sender and the trace keep alive stay off the balancer's frame, which the verifier adds
/// to the slow path's and the ICMP handler's (512 bytes a call chain).
#[inline(never)]
fn send_placed<H: Hook, P: FlowPacket>(
    ctx: &H,
    pkt: &P,
    decided: &Decided,
    hash: u32,
    now: u64,
) -> Verdict {
    let Some(backend) = maps::backend(decided.backend_id) else {
        return drop_traced(ctx, pkt, decided, Reason::DropNoBackend);
    };
    let target = Target {
        service_id: decided.service_id,
        mode: decided.mode,
        flags: decided.flags,
        backend_id: decided.backend_id,
        backend,
        snat: &decided.snat,
    };
    forward(ctx, pkt, decided, &target, hash, now)
}

/// What the slow path works from.
struct Slow<'a, P> {
    pkt: &'a P,
    flow: &'a FlowKey,
    hash: u32,
    now: u64,
}

/// What the slow path found.
enum Outcome {
    /// Forward the packet to the target it wrote.
    Forward,
    /// Not for a VIP (maybe a fullnat reply).
    NotVip,
    /// Dropped for this reason (`out` names the service).
    Drop(Reason),
}

/// The slow path: VIP, flow tables or Maglev. Fills `out` to forward the packet there. A subprogram of its own: the verifier then checks
/// its many branches once, not once for every way the packet is sent afterwards, and its
/// stack is not added to the senders'.
#[inline(never)]
fn decide<H: Hook, P: FlowPacket>(ctx: &H, slow: &Slow<P>, out: &mut Decided) -> Outcome {
    let Slow {
        pkt,
        flow,
        hash,
        now,
    } = *slow;
    let vip = pkt.vip_key();
    // A service whose recorded VIP differs was reached through a VIP map element the kernel
    // just reused for another VIP: not ours.
    let Some(svc) = (unsafe { VIPS.get(vip) })
        .and_then(|id| maps::service(*id))
        .filter(|svc| svc.vip == vip)
    else {
        return Outcome::NotVip;
    };
    // Named before any drop, for the trace.
    out.service_id = svc.id;
    out.mode = svc.mode;
    // Before any flow table: an outside source neither creates nor refreshes an entry, and
    // an established flow from a source a reload took out of the list is cut.
    if svc.flags & SERVICE_ALLOW != 0 && !pkt.source_allowed(svc.id) {
        return Outcome::Drop(Reason::DropNotAllowed);
    }
    if pkt.has_ip_options() {
        return Outcome::Drop(Reason::DropIpOptions);
    }

    let ifindex = ctx.ingress_ifindex();
    let known = conntrack::lookup(flow, svc, pkt, now, ifindex).filter(|known| {
        let owned =
            svc.mode != MODE_FULLNAT || conntrack::still_owns_port(known, flow, now, pkt.closing());
        if !owned {
            conntrack::remove(known.table, flow);
        }
        owned
    });
    out.reset(svc.id, svc.mode, svc.flags, known.is_none());
    match known {
        Some(known) => {
            // Read from the entry before the promotion deletes it: a deleted LRU element
            // may be handed to another flow at once.
            out.backend_id = known.backend_id;
            known.write_snat(&mut out.snat);
            if known.promote {
                conntrack::promote(flow, &known, svc, now, ifindex);
            }
            // Only established flows are cached: new ones (a SYN flood, UDP one-shots)
            // would only push out the flows worth keeping, and their next packets must reach
            // the promotion.
            // Nor closing ones: a flow that closes may reopen with another target.
            if (known.table == Table::Main || known.promote) && !pkt.closing() {
                flowcache::remember(flow, hash, out, now);
            }
        }
        None => {
            // fullnat can only start a flow with a packet that may open one.
            if svc.mode == MODE_FULLNAT && flow.proto == PROTO_TCP && !pkt.syn() {
                return Outcome::Drop(Reason::DropNoFlow);
            }
            // `hash = "source"` picks by the client address alone; the flow tables, the cache
            // and SNAT keep the 5-tuple hash.
            let slot_hash = ring_hash(flow, hash, svc.flags);
            let Some((backend_id, backend)) = maglev::pick(svc, slot_hash) else {
                return Outcome::Drop(Reason::DropNoBackend);
            };
            if svc.mode == MODE_FULLNAT {
                // The route's source is the pool when the service names none.
                if svc.snat.count == 0 && !ctx.source_towards(backend, now, &mut out.snat.addr) {
                    return Outcome::Drop(Reason::DropNoRoute);
                }
                let request = snat::Request {
                    key: flow,
                    hash,
                    svc,
                    backend,
                };
                if !snat::allocate(&request, &mut out.snat) {
                    return Outcome::Drop(Reason::DropSnatExhausted);
                }
            }
            out.backend_id = backend_id;
            // A flow decided anew (reopened, re-hashed, its port lost) must not be sent by
            // this CPU's cache to its old target.
            flowcache::forget(flow, hash);
            conntrack::insert_new(
                flow,
                pkt,
                svc,
                (backend_id, backend),
                &out.snat,
                now,
                ifindex,
            );
        }
    }
    Outcome::Forward
}

#[inline(always)]
fn forward<H: Hook, P: FlowPacket>(
    ctx: &H,
    pkt: &P,
    decided: &Decided,
    target: &Target,
    hash: u32,
    now: u64,
) -> Verdict {
    let len = ctx.len() as u64;
    let verdict = pkt.send(ctx, target, hash, now);
    if !matches!(verdict, Verdict::Drop(_)) {
        stats::count_traffic(target.service_id, target.backend_id, len, decided.new_flow);
    }
    pkt.trace_packet(ctx, decided, target.backend, &verdict);
    verdict
}

/// Whether a cached flow of a service that had an allow list may go on: the service has none
/// any more, or the source is in it.
#[inline(always)]
fn still_allowed<P: FlowPacket>(hit: &Decided, pkt: &P) -> bool {
    match maps::service(hit.service_id) {
        Some(svc) if svc.flags & SERVICE_ALLOW != 0 => pkt.source_allowed(hit.service_id),
        _ => true,
    }
}

#[inline(always)]
fn is_vip_addr(daddr: u32) -> bool {
    let key = VipAddrKey {
        addr: [daddr, 0, 0, 0],
        family: FAMILY_V4,
        _pad0: 0,
        _pad1: 0,
    };
    unsafe { VIP_ADDRS.get(key) }.is_some()
}
