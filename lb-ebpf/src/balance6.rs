//! IPv6 at the balancer. Not balanced yet: the odd packets of a VIP address are dropped
//! with a reason, as for IPv4, and everything else goes to the kernel.
use lb_common::{FAMILY_V6, Reason, VipAddrKey};

use crate::{
    balance::Verdict,
    maps::VIP_ADDRS,
    parse::PacketBuf,
    parse6::{Addr6, Parsed6, parse6},
};

#[inline(always)]
pub fn balance6<B: PacketBuf>(buf: &B, l3_off: usize) -> Verdict {
    match parse6(buf, l3_off) {
        // The v6 services' seam: their VIP addresses cannot be configured yet.
        Parsed6::L4(pkt) if is_vip_addr6(&pkt.daddr) => Verdict::Pass(Reason::PassIpv6),
        Parsed6::L4(_) => Verdict::Pass(Reason::PassNotVip),
        // Neighbour discovery included: it always reaches the kernel.
        Parsed6::Icmp(icmp) if is_vip_addr6(&icmp.daddr) => Verdict::Pass(Reason::PassIcmp),
        Parsed6::Icmp(_) | Parsed6::NotL4 => Verdict::Pass(Reason::PassNotL4),
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

#[inline(always)]
fn is_vip_addr6(daddr: &Addr6) -> bool {
    let key = VipAddrKey {
        addr: *daddr,
        family: FAMILY_V6,
        _pad0: 0,
        _pad1: 0,
    };
    unsafe { VIP_ADDRS.get(key) }.is_some()
}
