//! The reference model's IPv6: the verdict table of docs/architecture.md for IPv6 frames,
//! read from the bytes (fixed header, at most `IPV6_MAX_EXT_HEADERS` extension headers,
//! then the upper layer), sharing no code with lb-ebpf. The corpus's v6 VIP address has no
//! service, so a frame only passes or, to that address, is dropped as odd (the balancing of
//! v6 services is checked by datapath_v6.rs and nat_v6.rs).
use std::net::Ipv6Addr;

use lb_common::{IPV6_MAX_EXT_HEADERS, PROTO_TCP, PROTO_UDP, Reason};
use xlb_tests::testrun::*;

use super::model::get16;

const EXT_HEADERS: [u8; 4] = [0, 43, 44, 60];

/// What the data path does with the IPv6 packet at `l3` of `f`; `vip` says whether an
/// address is a VIP address.
pub fn verdict6(f: &[u8], l3: usize, vip: impl Fn(Ipv6Addr) -> bool) -> Reason {
    let Some(ip) = f.get(l3..l3 + 40) else {
        return Reason::PassMalformed;
    };
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
    let odd = |drop: Reason, pass: Reason| if vip(dst) { drop } else { pass };
    let end = l3 + 40 + usize::from(be16(ip, 4));
    if ip[0] >> 4 != 6 || end > f.len() {
        return odd(Reason::DropMalformed, Reason::PassMalformed);
    }
    let (mut next, mut off) = (ip[6], l3 + 40);
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        if !EXT_HEADERS.contains(&next) {
            break;
        }
        // The header's first bytes must be in the frame (the length may point past it).
        let Some(head) = f.get(off..off + if next == 44 { 4 } else { 2 }) else {
            return odd(Reason::DropMalformed, Reason::PassMalformed);
        };
        if next == 44 {
            if be16(head, 2) & 0xfff9 != 0 {
                return odd(Reason::DropFragment, Reason::PassFragment);
            }
            off += 8;
        } else {
            off += (usize::from(head[1]) + 1) * 8;
        }
        next = head[0];
    }
    if EXT_HEADERS.contains(&next) {
        return odd(Reason::DropExtHeaders, Reason::PassIpv6);
    }
    if off > end {
        return odd(Reason::DropMalformed, Reason::PassMalformed);
    }
    let l4_len = end - off;
    let fits = match next {
        58 => f.len() >= off + 2,
        PROTO_TCP => {
            let doff = f.get(off + TCP_DOFF).map(|b| usize::from(b >> 4) * 4);
            f.len() >= off + 20 && doff.is_some_and(|d| (20..=l4_len).contains(&d))
        }
        PROTO_UDP => {
            let len = get16(f, off + UDP_LEN).map(usize::from);
            f.len() >= off + 8 && len.is_some_and(|l| (8..=l4_len).contains(&l))
        }
        _ => return Reason::PassNotL4,
    };
    match (fits, next) {
        (false, _) => odd(Reason::DropMalformed, Reason::PassMalformed),
        (true, 58) => odd(Reason::PassIcmp, Reason::PassNotL4),
        // No service listens on the VIP address: not a VIP flow.
        (true, _) => Reason::PassNotVip,
    }
}
