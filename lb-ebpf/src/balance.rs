//! The balancing pipeline, the same at XDP and at TC ingress: parse, VIP, conntrack or
//! Maglev, counters. The hook (hooks.rs) rewrites and sends the packet in the service's mode.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{Backend, FAMILY_V4, MODE_FULLNAT, Reason, VipAddrKey, VipKey, flow_hash};

use crate::{
    conntrack, flowcache, maglev,
    maps::{self, VIP_ADDRS, VIPS},
    nat::Endpoint,
    parse::{L4Packet, PacketBuf, Parsed, parse},
    snat, stats,
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
}

/// Where a flow goes: decided once per flow, then kept by conntrack and the flow cache.
#[derive(Clone, Copy)]
pub struct Target {
    pub service_id: u32,
    pub mode: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub backend: &'static Backend,
    /// fullnat: the flow's SNAT address and port.
    pub snat: Endpoint,
}

/// What differs between XDP and TC for the balancer.
pub trait Hook: PacketBuf {
    fn ingress_ifindex(&self) -> u32;
    /// The address the LB would send from towards `daddr` (fullnat's default source).
    fn source_towards(&self, daddr: u32, now: u64) -> Option<u32>;
    /// Rewrites the packet for its target in the service's mode and sends it.
    fn send(&self, pkt: &L4Packet, target: &Target, hash: u32, now: u64) -> Verdict;
    /// A fullnat reply (backend -> SNAT address) translated back and sent, if it is one.
    fn reverse(&self, pkt: &L4Packet, now: u64) -> Option<Verdict>;
}

#[inline(always)]
pub fn balance<H: Hook>(ctx: &H) -> Verdict {
    let pkt = match parse(ctx) {
        Parsed::L4(pkt) => pkt,
        Parsed::Pass(reason) => return Verdict::Pass(reason),
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

    let flow = pkt.flow_key();
    let hash = flow_hash(&flow);
    // Coarse (jiffies) time is plenty for idle timeouts, and cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // Options to a VIP are dropped below, so such a packet skips the cache, as does a SYN,
    // which starts a flow, and a FIN or RST, which the slow path records.
    if !pkt.has_ip_options
        && !pkt.syn
        && !pkt.closing
        && let Some(target) = flowcache::lookup(&flow, hash, now)
    {
        return forward(ctx, &pkt, &target, hash, now, false);
    }

    let vip = VipKey {
        addr: [pkt.daddr, 0, 0, 0],
        port: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
    };
    // A service whose recorded VIP differs was reached through a VIP map element the kernel
    // just reused for another VIP: not ours.
    let Some(svc) = (unsafe { VIPS.get(vip) })
        .and_then(|id| maps::service(*id))
        .filter(|svc| svc.vip == vip)
    else {
        return match ctx.reverse(&pkt, now) {
            Some(verdict) => verdict,
            None => Verdict::Pass(Reason::PassNotVip),
        };
    };
    if pkt.has_ip_options {
        return Verdict::Drop(Reason::DropIpOptions);
    }

    let ifindex = ctx.ingress_ifindex();
    let pinned =
        conntrack::pinned_backend(&flow, svc, now, ifindex).filter(|(_, backend, snat)| {
            svc.mode != MODE_FULLNAT
                || snat::still_owned(&flow, backend, snat.addr, snat.port, now, pkt.closing)
        });
    let (backend_id, backend, snat, new_flow) = match pinned {
        Some((backend_id, backend, snat)) => (backend_id, backend, snat, false),
        None => {
            let Some((backend_id, backend)) = maglev::pick(svc, hash) else {
                return Verdict::Drop(Reason::DropNoBackend);
            };
            let mut snat = Endpoint { addr: 0, port: 0 };
            if svc.mode == MODE_FULLNAT {
                let Some(source) = ctx.source_towards(backend.addr[0], now) else {
                    return Verdict::Drop(Reason::DropNoRoute);
                };
                let Some((addr, port)) = snat::allocate(&flow, hash, svc, backend, source, now)
                else {
                    return Verdict::Drop(Reason::DropSnatExhausted);
                };
                snat = Endpoint { addr, port };
            }
            conntrack::insert(&flow, svc, backend_id, backend, snat, now, ifindex);
            (backend_id, backend, snat, true)
        }
    };
    let target = Target {
        service_id: svc.id,
        mode: svc.mode,
        flags: svc.flags,
        backend_id,
        backend,
        snat,
    };
    // Only flows seen again are cached: one-packet flows (a SYN flood, UDP one-shots) would
    // only push out the flows worth keeping.
    if !new_flow {
        flowcache::remember(&flow, hash, &target, now);
    }
    forward(ctx, &pkt, &target, hash, now, new_flow)
}

#[inline(always)]
fn forward<H: Hook>(
    ctx: &H,
    pkt: &L4Packet,
    target: &Target,
    hash: u32,
    now: u64,
    new_flow: bool,
) -> Verdict {
    let len = ctx.len() as u64;
    let verdict = ctx.send(pkt, target, hash, now);
    if !matches!(verdict, Verdict::Drop(_)) {
        stats::count_traffic(target.service_id, target.backend_id, len, new_flow);
    }
    verdict
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
