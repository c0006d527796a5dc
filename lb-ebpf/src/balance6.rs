//! IPv6 at the balancer: TCP and UDP to a v6 VIP go through the flow pipeline of
//! balance.rs (modes nat and fullnat); an echo request to a VIP address is answered, an error about a
//! flow goes to its backend (icmp6.rs); the odd packets of a
//! VIP address are dropped with a reason, as for IPv4, and everything else (neighbour
//! discovery included) goes to the kernel.
use lb_common::{Backend, FAMILY_V6, FlowKey, Reason, VIP_ADDR_ECHO, VipAddrKey, VipKey};

use crate::{
    balance::{FlowPacket, Hook, Target, Verdict, balance_flow},
    decided::Decided,
    icmp6::{self, ICMPV6_ECHO_REQUEST},
    maps::{self, VIP_ADDRS},
    parse6::{Addr6, L4Packet6, Parsed6, parse6},
    stats, trace,
};

#[inline(always)]
pub fn balance6<H: Hook>(ctx: &H, l3_off: usize) -> Verdict {
    match parse6(ctx, l3_off) {
        Parsed6::L4(pkt) => balance_flow(ctx, &pkt),
        // Neighbour discovery included: it always reaches the kernel.
        Parsed6::Icmp(icmp) => match vip_addr6(&icmp.daddr) {
            Some(flags)
                if icmp.kind == ICMPV6_ECHO_REQUEST
                    && flags & VIP_ADDR_ECHO != 0
                    && icmp6::echo_reply(ctx, &icmp).is_some() =>
            {
                Verdict::Bounce(Reason::IcmpEcho)
            }
            Some(_) if icmp6::is_error(icmp.kind) => match icmp6::to_backend(ctx, &icmp) {
                Some(backend) => {
                    stats::count(Reason::IcmpToBackend);
                    ctx.icmp6_to_backend(&icmp, backend)
                }
                None => Verdict::Pass(Reason::PassIcmp),
            },
            Some(_) => Verdict::Pass(Reason::PassIcmp),
            // Maybe about a fullnat flow, to its SNAT address.
            None if icmp6::is_error(icmp.kind) => match ctx.icmp6_to_client(&icmp) {
                Some(verdict) => verdict,
                None => Verdict::Pass(Reason::PassNotL4),
            },
            None => Verdict::Pass(Reason::PassNotL4),
        },
        Parsed6::NotL4 => Verdict::Pass(Reason::PassNotL4),
        Parsed6::Fragment(daddr) if is_vip_addr6(&daddr) => Verdict::Drop(Reason::DropFragment),
        Parsed6::Fragment(_) => Verdict::Pass(Reason::PassFragment),
        Parsed6::Malformed(Some(daddr)) if is_vip_addr6(&daddr) => {
            Verdict::Drop(Reason::DropMalformed)
        }
        Parsed6::Malformed(_) => Verdict::Pass(Reason::PassMalformed),
        Parsed6::TooManyExtHeaders(daddr) if is_vip_addr6(&daddr) => {
            Verdict::Drop(Reason::DropExtHeaders)
        }
        Parsed6::TooManyExtHeaders(_) => Verdict::Pass(Reason::PassIpv6),
    }
}

impl FlowPacket for L4Packet6 {
    const FAMILY: u8 = FAMILY_V6;
    #[inline(always)]
    fn flow_key(&self) -> FlowKey {
        L4Packet6::flow_key(self)
    }
    #[inline(always)]
    fn vip_key(&self) -> VipKey {
        VipKey {
            addr: self.daddr,
            port: self.dport,
            proto: self.proto,
            family: FAMILY_V6,
        }
    }
    /// Extension headers are forwarded as they came.
    #[inline(always)]
    fn has_ip_options(&self) -> bool {
        false
    }
    #[inline(always)]
    fn source_allowed(&self, service_id: u32) -> bool {
        maps::allowed(service_id, FAMILY_V6, self.saddr)
    }
    #[inline(always)]
    fn source_in(&self, addr: &[u32; 4], mask: &[u32; 4]) -> bool {
        (0..4).all(|i| self.saddr[i] & mask[i] == addr[i])
    }
    #[inline(always)]
    fn send<H: Hook>(&self, ctx: &H, target: &Target, hash: u32, now: u64) -> Verdict {
        ctx.send6(self, target, hash, now)
    }
    #[inline(always)]
    fn not_vip<H: Hook>(&self, ctx: &H, now: u64) -> Verdict {
        match ctx.reverse6(self, now) {
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

#[inline(always)]
fn is_vip_addr6(daddr: &Addr6) -> bool {
    vip_addr6(daddr).is_some()
}

/// The `VIP_ADDR_*` flags of the v6 VIP address `daddr`, if it is one.
#[inline(always)]
fn vip_addr6(daddr: &Addr6) -> Option<u32> {
    let key = VipAddrKey {
        addr: *daddr,
        family: FAMILY_V6,
        _pad0: 0,
        _pad1: 0,
    };
    unsafe { VIP_ADDRS.get(key) }.copied()
}
