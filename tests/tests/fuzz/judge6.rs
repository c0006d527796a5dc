//! The modes judge (modes.rs) for IPv6 frames: a v6 TCP/UDP packet rewritten in place
//! (fullnat: both addresses and ports, the hop limit down by one) or an ICMPv6 message
//! rewritten in place, with the L4 checksum as right or as wrong as it came. Shares no code
//! with lb-ebpf.
use lb_common::{PROTO_TCP, PROTO_UDP};
use xlb_tests::testrun::*;

use super::model::get16;

const ICMPV6: u8 = 58;
/// Extension headers the data path walks (hop-by-hop, routing, fragment, destination
/// options), at most this many.
const EXT_HEADERS: [u8; 4] = [0, 43, 44, 60];
const MAX_EXT: usize = lb_common::IPV6_MAX_EXT_HEADERS;

/// Where the IPv6 header of `f` starts, after any VLAN tags; None: not IPv6.
pub fn ipv6_l3(f: &[u8]) -> Option<usize> {
    let mut at = 12;
    loop {
        match get16(f, at)? {
            ETH_P_8021Q | ETH_P_8021AD => at += 4,
            ETH_P_IPV6 => return Some(at + 2),
            _ => return None,
        }
    }
}

/// (upper-layer protocol, its offset, the payload's end) of the IPv6 packet at `l3`.
fn upper(f: &[u8], l3: usize) -> Option<(u8, usize, usize)> {
    let end = l3 + 40 + usize::from(get16(f, l3 + 4)?);
    let (mut next, mut off) = (*f.get(l3 + 6)?, l3 + 40);
    for _ in 0..MAX_EXT {
        if !EXT_HEADERS.contains(&next) {
            break;
        }
        let len = if next == 44 {
            8
        } else {
            (usize::from(*f.get(off + 1)?) + 1) * 8
        };
        next = *f.get(off)?;
        off += len;
    }
    (end <= f.len() && off <= end).then_some((next, off, end))
}

/// The one's complement sum of the upper layer over the pseudo-header (0: the checksum is
/// right), None when the packet has no room for it.
fn l4_sum(f: &[u8], l3: usize, proto: u8, l4: usize, end: usize) -> Option<u16> {
    let len = ((end - l4) as u32).to_be_bytes();
    Some(checksum(&[
        f.get(l3 + 8..l3 + 40)?,
        &len,
        &[0, 0, 0, proto],
        f.get(l4..end)?,
    ]))
}

/// Judges a program's output `out` of the IPv6 frame `input` (IPv6 at `l3`): Ok(true) for a
/// rewrite of a TCP/UDP packet, Ok(false) for an ICMPv6 message rewritten in place.
pub fn judge6(input: &[u8], out: &[u8], l3: usize) -> Result<bool, String> {
    if out.len() != input.len() {
        return Err(format!(
            "an IPv6 frame of {} bytes came back with {}",
            input.len(),
            out.len()
        ));
    }
    let (proto, l4, end) = upper(input, l3).ok_or("rewrote a v6 frame that does not parse")?;
    let (csum, rewritable): (usize, &[(usize, usize)]) = match proto {
        PROTO_TCP => (l4 + 16, &[(l4, 4)]),
        PROTO_UDP => (l4 + 6, &[(l4, 4)]),
        // Type (echo), checksum, and the quoted header's addresses and ports.
        ICMPV6 => (l4 + 2, &[(l4, 1), (l4 + 16, 32), (l4 + 48, 4)]),
        p => return Err(format!("rewrote a v6 frame of protocol {p}")),
    };
    let mut expect = input.to_vec();
    let fixed = [(0, 12), (l3 + 7, 1), (l3 + 8, 32), (csum, 2)];
    for (off, n) in fixed.iter().chain(rewritable) {
        let range = *off..(*off + n).min(out.len());
        expect[range.clone()].copy_from_slice(&out[range]);
    }
    if let Some(at) = expect.iter().zip(out).position(|(a, b)| a != b) {
        return Err(format!("byte {at} changed, which no v6 rewrite may change"));
    }
    let hops = (input[l3 + 7], out[l3 + 7]);
    if proto != ICMPV6 && hops.0 != hops.1 && hops.0.wrapping_sub(1) != hops.1 {
        return Err(format!("hop limit {} -> {}", hops.0, hops.1));
    }
    let (sum_in, sum_out) = (
        l4_sum(input, l3, proto, l4, end),
        l4_sum(out, l3, proto, l4, end),
    );
    let (c_in, c_out) = (get16(input, csum), get16(out, csum));
    if proto == PROTO_UDP && (c_in == Some(0)) != (c_out == Some(0)) {
        return Err(format!("UDP checksum {c_in:x?} -> {c_out:x?}"));
    }
    if !(proto == PROTO_UDP && c_in == Some(0)) && sum_in != sum_out {
        return Err(format!(
            "the v6 L4 checksum sums {sum_out:x?}, it came summing {sum_in:x?}"
        ));
    }
    Ok(proto != ICMPV6)
}

/// The judge must be able to fail.
#[test]
fn the_v6_judge_catches_wrong_rewrites() {
    let mut t = vec![0u8; 20];
    put_be16(&mut t, L4_SPORT, 40000);
    put_be16(&mut t, L4_DPORT, 80);
    t[TCP_DOFF] = 5 << 4;
    t[13] = TCP_SYN;
    let mut input = vec![
        2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd, 0x60, 0, 0, 0, 0, 20,
    ];
    input.extend_from_slice(&[PROTO_TCP, 64]);
    input.extend_from_slice(&[0xfd, 0x99, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    input.extend_from_slice(&[0xfd, 0x99, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    input.extend_from_slice(&t);
    let (l3, l4) = (14, 54);
    let fix = |f: &mut Vec<u8>| {
        put_be16(f, l4 + 16, 0);
        let sum = l4_sum(f, l3, PROTO_TCP, l4, f.len()).unwrap();
        put_be16(f, l4 + 16, sum);
    };
    fix(&mut input);
    assert_eq!(judge6(&input, &input, l3), Ok(true));
    // Both ends and ports rewritten, hop limit down, checksum made right again: fine.
    let mut out = input.clone();
    out[l3 + 7] = 63;
    out[l3 + 8 + 15] = 9;
    out[l3 + 24 + 15] = 7;
    put_be16(&mut out, l4 + 2, 8080);
    fix(&mut out);
    assert_eq!(judge6(&input, &out, l3), Ok(true));
    // A stale checksum, a payload byte, a hop limit down by two: caught.
    let mut stale = out.clone();
    put_be16(&mut stale, l4 + 16, be16(&input, l4 + 16));
    assert!(judge6(&input, &stale, l3).is_err());
    let mut flags = out.clone();
    flags[l4 + 13] ^= 1;
    assert!(judge6(&input, &flags, l3).is_err());
    let mut hops = out.clone();
    hops[l3 + 7] = 62;
    assert!(judge6(&input, &hops, l3).is_err());
}
