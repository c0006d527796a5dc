//! The balancing pipeline, the same at XDP and at TC ingress: parse, VIP, conntrack or
//! Maglev, DNAT, counters. The hook decides what a verdict means for the packet.
use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    programs::{TcContext, XdpContext},
};
use lb_common::{Backend, FAMILY_V4, Reason, VipAddrKey, VipKey, flow_hash};

use crate::{
    conntrack, flowcache, maglev,
    maps::{VIP_ADDRS, VIPS},
    nat::{self, End},
    parse::{L4Packet, PacketBuf, Parsed, parse},
    stats,
};

pub enum Verdict {
    Pass(Reason),
    Drop(Reason),
    /// Rewritten to a backend; `deliver_to` is its local bridge (0: the kernel routes it).
    Forward {
        deliver_to: u32,
    },
}

/// What differs between XDP and TC for the balancer.
pub trait Hook: PacketBuf {
    fn ingress_ifindex(&self) -> u32;
    /// Rewrites the destination to the backend; false if the packet could not be.
    fn dnat(&self, pkt: &L4Packet, daddr: u32, dport: u16) -> bool;
}

impl Hook for XdpContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }
    #[inline(always)]
    fn dnat(&self, pkt: &L4Packet, daddr: u32, dport: u16) -> bool {
        nat::dnat_v4(self, pkt, daddr, dport).is_some()
    }
}

impl Hook for TcContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn dnat(&self, pkt: &L4Packet, daddr: u32, dport: u16) -> bool {
        nat::rewrite_tc(self, pkt, End::Destination, daddr, dport).is_ok()
    }
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
    // which starts a flow.
    if !pkt.has_ip_options
        && !pkt.syn
        && let Some((service_id, backend_id, backend)) = flowcache::lookup(&flow, hash, now)
    {
        return forward(ctx, &pkt, service_id, backend_id, backend, false);
    }

    let vip = VipKey {
        addr: [pkt.daddr, 0, 0, 0],
        port: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
    };
    let Some(svc) = (unsafe { VIPS.get(vip) }) else {
        return Verdict::Pass(Reason::PassNotVip);
    };
    if pkt.has_ip_options {
        return Verdict::Drop(Reason::DropIpOptions);
    }

    let ifindex = ctx.ingress_ifindex();
    let (backend_id, backend, new_flow) = match conntrack::pinned_backend(&flow, svc, now, ifindex)
    {
        Some((id, backend)) => (id, backend, false),
        None => {
            let Some((id, backend)) = maglev::pick(svc, hash) else {
                return Verdict::Drop(Reason::DropNoBackend);
            };
            conntrack::insert(&flow, svc, id, backend, now, ifindex);
            (id, backend, true)
        }
    };
    // Only flows seen again are cached: one-packet flows (a SYN flood, UDP one-shots) would
    // only push out the flows worth keeping.
    if !new_flow {
        flowcache::remember(&flow, hash, svc.id, backend_id, now);
    }
    forward(ctx, &pkt, svc.id, backend_id, backend, new_flow)
}

#[inline(always)]
fn forward<H: Hook>(
    ctx: &H,
    pkt: &L4Packet,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    new_flow: bool,
) -> Verdict {
    let (daddr, dport, deliver_to) = (backend.addr[0], backend.port, backend.deliver_ifindex);
    if !ctx.dnat(pkt, daddr, dport) {
        return Verdict::Drop(Reason::DropMalformed);
    }
    stats::count_traffic(service_id, backend_id, ctx.len() as u64, new_flow);
    Verdict::Forward { deliver_to }
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
