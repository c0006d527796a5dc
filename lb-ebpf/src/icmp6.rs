//! ICMPv6 to a v6 VIP address: echo requests answered by the LB (`icmp_echo`), as for v4.
//! Everything else (neighbour discovery above all) goes to the kernel.
use crate::{
    csum,
    parse::{ETH_HLEN, PacketBuf, load},
    parse6::{IPV6_HLEN, Icmp6Packet, Ipv6Hdr},
    route,
};

pub const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Turns an echo request into its reply, in place, to go back out of the interface it came
/// in on. Only an untagged frame without extension headers (what a ping sends): None
/// otherwise, and the kernel answers if it holds the address. A subprogram: the ICMP chain
/// is the deepest of the entry point's.
#[inline(never)]
pub fn echo_reply<C: PacketBuf>(ctx: &C, icmp: &Icmp6Packet) -> Option<()> {
    if icmp.icmp_off != ETH_HLEN + IPV6_HLEN || icmp.code != 0 {
        return None;
    }
    let ip = ctx.ptr_at::<Ipv6Hdr>(ETH_HLEN)?;
    let header = ctx.ptr_at::<[u16; 2]>(icmp.icmp_off)?;
    let macs = ctx.ptr_at::<route::Macs>(0)?;
    unsafe {
        let [d0, d1, d2, s0, s1, s2] = load(macs);
        core::ptr::write_unaligned(macs, [s0, s1, s2, d0, d1, d2]);
        // Swapped addresses leave the pseudo-header's sum as it is; the hop limit is in no
        // checksum.
        let saddr = load(&raw const (*ip).saddr);
        core::ptr::write_unaligned(&raw mut (*ip).saddr, load(&raw const (*ip).daddr));
        core::ptr::write_unaligned(&raw mut (*ip).daddr, saddr);
        (*ip).hop_limit = 64;
        let [kind_code, check] = load(header);
        let reply = u16::from_be_bytes([ICMPV6_ECHO_REPLY, 0]).to_be();
        let check = csum::replace2(check, kind_code, reply);
        core::ptr::write_unaligned(header, [reply, check]);
    }
    Some(())
}
