//! IPv6 frames for the TestRun tests (datapath_v6.rs, icmp_v6.rs): a builder with extension
//! headers and checksums, and the data paths and checks those tests share.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use xlb_tests::testrun::*;

use super::checksums;

pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 1);
pub const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 2);

pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTS: u8 = 60;
pub const ESP: u8 = 50;
pub const ICMPV6: u8 = 58;
pub const NEIGHBOUR_SOLICITATION: u8 = 135;

/// An IPv6 frame: extension headers (kind, bytes after the first two), then the upper layer.
pub struct Frame6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub ext: Vec<(u8, Vec<u8>)>,
    pub upper: u8,
    pub upper_bytes: Vec<u8>,
    /// Overrides the payload length field.
    pub payload_len: Option<u16>,
}

impl Frame6 {
    pub fn tcp(dst: Ipv6Addr) -> Frame6 {
        let mut t = vec![0; 20];
        put_be16(&mut t, L4_SPORT, 40000);
        put_be16(&mut t, L4_DPORT, 80);
        t[TCP_DOFF] = 5 << 4;
        t[13] = TCP_SYN;
        Frame6::upper(dst, PROTO_TCP, t)
    }

    pub fn udp(dst: Ipv6Addr) -> Frame6 {
        let mut u = vec![0; 12];
        put_be16(&mut u, L4_SPORT, 40000);
        put_be16(&mut u, L4_DPORT, 53);
        put_be16(&mut u, UDP_LEN, 12);
        Frame6::upper(dst, PROTO_UDP, u)
    }

    pub fn upper(dst: Ipv6Addr, upper: u8, upper_bytes: Vec<u8>) -> Frame6 {
        Frame6 {
            src: CLIENT6,
            dst,
            ext: Vec::new(),
            upper,
            upper_bytes,
            payload_len: None,
        }
    }

    /// From `src` at port `sport` to port `dport`.
    pub fn between(mut self, src: Ipv6Addr, sport: u16, dport: u16) -> Frame6 {
        self.src = src;
        put_be16(&mut self.upper_bytes, L4_SPORT, sport);
        put_be16(&mut self.upper_bytes, L4_DPORT, dport);
        self
    }

    pub fn with_tcp_flags(mut self, flags: u8) -> Frame6 {
        self.upper_bytes[13] = flags;
        self
    }

    /// With a valid TCP or UDP checksum.
    pub fn checksummed(self) -> Frame6 {
        let at = if self.upper == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
        self.with_checksum_at(at)
    }

    /// With a valid ICMPv6 checksum.
    pub fn checksummed_icmp(self) -> Frame6 {
        self.with_checksum_at(2)
    }

    /// The upper layer's checksum at `at` computed over the pseudo-header of RFC 8200 8.1.
    pub fn with_checksum_at(mut self, at: usize) -> Frame6 {
        put_be16(&mut self.upper_bytes, at, 0);
        let len = (self.upper_bytes.len() as u32).to_be_bytes();
        let sum = checksum(&[
            &self.src.octets(),
            &self.dst.octets(),
            &len,
            &[0, 0, 0, self.upper],
            &self.upper_bytes,
        ]);
        put_be16(&mut self.upper_bytes, at, sum);
        self
    }

    /// Where the upper layer starts in the built frame.
    pub fn l4_off(&self) -> usize {
        14 + 40
            + self
                .ext
                .iter()
                .map(|(_, rest)| rest.len() + 2)
                .sum::<usize>()
    }

    /// An option header (hop-by-hop, routing, destination options) of 8 bytes.
    pub fn with_ext(mut self, kind: u8) -> Frame6 {
        self.ext.push((kind, vec![0; 6]));
        self
    }

    /// A fragment header with this offset-and-flags field.
    pub fn with_fragment(mut self, field: u16) -> Frame6 {
        let [hi, lo] = field.to_be_bytes();
        self.ext.push((FRAGMENT, vec![hi, lo, 0, 0, 0, 1]));
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        for (i, (kind, rest)) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.upper, |e| e.0);
            // The length field counts 8-byte units past the first 8 (fragment: always 0).
            let len = if *kind == FRAGMENT {
                0
            } else {
                ((rest.len() + 2) / 8 - 1) as u8
            };
            payload.extend_from_slice(&[next, len]);
            payload.extend_from_slice(rest);
        }
        payload.extend_from_slice(&self.upper_bytes);
        let first = self.ext.first().map_or(self.upper, |e| e.0);
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        let len = self.payload_len.unwrap_or(payload.len() as u16);
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[first, 64]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&payload);
        f
    }
}

/// Builds a frame to this destination.
pub type BuildTo = fn(Ipv6Addr) -> Vec<u8>;

/// A data path with one v4 service and `VIP6` as a v6 VIP address without a service.
pub fn datapath() -> LoadedDatapath {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 1), 80);
    let backend = SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 11), 8080);
    let mut dp = LoadedDatapath::new(&service_toml("web", vip, "tcp", &[(backend, 1)]));
    dp.add_vip_addr(VIP6.into());
    dp
}

/// Runs `frame` through XDP: it must come back with `action`, byte for byte as it went in,
/// counted under `reason` alone.
pub fn expect(dp: &LoadedDatapath, what: &str, frame: &[u8], action: u32, reason: Reason) {
    let before = dp.reasons();
    let out = dp.xdp(frame);
    assert_eq!(
        out.action,
        action,
        "{what}: got {} instead of {} ({})\n{}",
        xdp_action_name(out.action),
        xdp_action_name(action),
        reason.name(),
        hexdump(frame, usize::MAX)
    );
    if action == XDP_PASS {
        assert_frame_eq(frame, &out.data, what);
    }
    dp.reasons().assert_moved(&before, &[(reason, 1)], what);
}

pub const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, 0x13),
];

/// A data path with v6 services in mode nat: TCP [VIP6]:80 and UDP [VIP6]:53, both to port
/// 8080 of three v6 backends.
pub fn balancing() -> LoadedDatapath {
    let backends: Vec<(SocketAddr, u32)> = BACKENDS6
        .iter()
        .map(|a| (SocketAddr::new((*a).into(), 8080), 1))
        .collect();
    let web = service_toml("web6", SocketAddr::new(VIP6.into(), 80), "tcp", &backends);
    let dns = service_toml("dns6", SocketAddr::new(VIP6.into(), 53), "udp", &backends);
    LoadedDatapath::new(&format!("{web}{dns}"))
}

pub fn ipv6_at(frame: &[u8], off: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&frame[off..off + 16]).expect("16 bytes"))
}

/// Runs a client frame through `run`; checks it was DNATed to one of the backends' port 8080
/// with the client's address kept and a valid checksum; returns the backend it went to.
pub fn balanced(
    what: &str,
    frame: &Frame6,
    run: impl Fn(&[u8]) -> RunResult,
    pass: u32,
) -> Ipv6Addr {
    let input = frame.build();
    let out = run(&input);
    assert_eq!(out.action, pass, "{what}: {}", xdp_action_name(out.action));
    let (l3, l4) = (14, frame.l4_off());
    let backend = ipv6_at(&out.data, l3 + 24);
    assert!(BACKENDS6.contains(&backend), "{what}: sent to {backend}");
    assert_eq!(ipv6_at(&out.data, l3 + 8), frame.src, "{what}: source kept");
    assert_eq!(be16(&out.data, l4 + L4_DPORT), 8080, "{what}");
    assert_eq!(out.data.len(), input.len(), "{what}: length kept");
    // Everything but the destination address, the port and the checksum is as it came.
    let csum = l4
        + if frame.upper == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
    for (i, (a, b)) in input.iter().zip(&out.data).enumerate() {
        let rewritten = (l3 + 24..l3 + 40).contains(&i)
            || (l4 + 2..l4 + 4).contains(&i)
            || (csum..csum + 2).contains(&i);
        assert!(rewritten || a == b, "{what}: byte {i} changed");
    }
    checksums::verify_checksums6(&out.data, l3, l4, frame.upper, what);
    backend
}

/// An ICMPv6 error (`kind`, `code`; MTU 1280 for packet too big) from `from` to `to`
/// quoting `quoted`'s IPv6 packet, with a valid checksum.
pub fn icmp6_error(from: Ipv6Addr, to: Ipv6Addr, kind: u8, code: u8, quoted: &Frame6) -> Frame6 {
    let mut message = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
    message.extend_from_slice(&quoted.build()[14..]);
    let mut error = Frame6::upper(to, ICMPV6, message);
    error.src = from;
    error.checksummed_icmp()
}

/// Panics unless the untagged frame `f` carries an ICMPv6 message with a valid checksum,
/// computed here over the pseudo-header.
pub fn assert_icmpv6_checksum(f: &[u8], what: &str) {
    let len = ((f.len() - 54) as u32).to_be_bytes();
    let sum = checksum(&[&f[22..38], &f[38..54], &len, &[0, 0, 0, ICMPV6], &f[54..]]);
    assert_eq!(
        sum,
        0,
        "{what}: ICMPv6 checksum\n{}",
        hexdump(f, usize::MAX)
    );
}
