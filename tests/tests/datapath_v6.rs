//! IPv6 through the XDP program under BPF_PROG_TEST_RUN: the parser (fixed header, a bounded
//! chain of extension headers, TCP/UDP/ICMPv6) and the verdicts of docs/architecture.md: a
//! VIP address's odd packets are dropped with a reason, what is not for a v6 service passes
//! untouched (the first tests put a VIP address without a service into the map), and a v6
//! service's packets are balanced in mode nat, their checksums checked by etherparse. Needs
//! root and BPF, like datapath.rs.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use lb_common::{IPV6_MAX_EXT_HEADERS, PROTO_TCP, PROTO_UDP, Reason};
use xlb_tests::testrun::*;

#[path = "support/checksums.rs"]
#[allow(dead_code)] // the v4 checks
mod checksums;

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 2);

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;
const ESP: u8 = 50;
const ICMPV6: u8 = 58;
const NEIGHBOUR_SOLICITATION: u8 = 135;

/// An IPv6 frame: extension headers (kind, bytes after the first two), then the upper layer.
struct Frame6 {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ext: Vec<(u8, Vec<u8>)>,
    upper: u8,
    upper_bytes: Vec<u8>,
    /// Overrides the payload length field.
    payload_len: Option<u16>,
}

impl Frame6 {
    fn tcp(dst: Ipv6Addr) -> Frame6 {
        let mut t = vec![0; 20];
        put_be16(&mut t, L4_SPORT, 40000);
        put_be16(&mut t, L4_DPORT, 80);
        t[TCP_DOFF] = 5 << 4;
        t[13] = TCP_SYN;
        Frame6::upper(dst, PROTO_TCP, t)
    }

    fn udp(dst: Ipv6Addr) -> Frame6 {
        let mut u = vec![0; 12];
        put_be16(&mut u, L4_SPORT, 40000);
        put_be16(&mut u, L4_DPORT, 53);
        put_be16(&mut u, UDP_LEN, 12);
        Frame6::upper(dst, PROTO_UDP, u)
    }

    fn upper(dst: Ipv6Addr, upper: u8, upper_bytes: Vec<u8>) -> Frame6 {
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
    fn between(mut self, src: Ipv6Addr, sport: u16, dport: u16) -> Frame6 {
        self.src = src;
        put_be16(&mut self.upper_bytes, L4_SPORT, sport);
        put_be16(&mut self.upper_bytes, L4_DPORT, dport);
        self
    }

    fn with_tcp_flags(mut self, flags: u8) -> Frame6 {
        self.upper_bytes[13] = flags;
        self
    }

    /// With a valid TCP or UDP checksum.
    fn checksummed(self) -> Frame6 {
        let at = if self.upper == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
        self.with_checksum_at(at)
    }

    /// With a valid ICMPv6 checksum.
    fn checksummed_icmp(self) -> Frame6 {
        self.with_checksum_at(2)
    }

    /// The upper layer's checksum at `at` computed over the pseudo-header of RFC 8200 8.1.
    fn with_checksum_at(mut self, at: usize) -> Frame6 {
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
    fn l4_off(&self) -> usize {
        14 + 40
            + self
                .ext
                .iter()
                .map(|(_, rest)| rest.len() + 2)
                .sum::<usize>()
    }

    /// An option header (hop-by-hop, routing, destination options) of 8 bytes.
    fn with_ext(mut self, kind: u8) -> Frame6 {
        self.ext.push((kind, vec![0; 6]));
        self
    }

    /// A fragment header with this offset-and-flags field.
    fn with_fragment(mut self, field: u16) -> Frame6 {
        let [hi, lo] = field.to_be_bytes();
        self.ext.push((FRAGMENT, vec![hi, lo, 0, 0, 0, 1]));
        self
    }

    fn build(&self) -> Vec<u8> {
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
type BuildTo = fn(Ipv6Addr) -> Vec<u8>;

/// A data path with one v4 service and `VIP6` as a v6 VIP address without a service.
fn datapath() -> LoadedDatapath {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 1), 80);
    let backend = SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 11), 8080);
    let mut dp = LoadedDatapath::new(&service_toml("web", vip, "tcp", &[(backend, 1)]));
    dp.add_vip_addr(VIP6.into());
    dp
}

/// Runs `frame` through XDP: it must come back with `action`, byte for byte as it went in,
/// counted under `reason` alone.
fn expect(dp: &LoadedDatapath, what: &str, frame: &[u8], action: u32, reason: Reason) {
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

#[test]
fn well_formed_ipv6_passes_and_extension_headers_are_walked() {
    let dp = datapath();
    let cases = [
        ("TCP SYN to the VIP", Frame6::tcp(VIP6), Reason::PassNotVip),
        ("UDP to the VIP", Frame6::udp(VIP6), Reason::PassNotVip),
        ("TCP to no VIP", Frame6::tcp(OTHER6), Reason::PassNotVip),
        (
            "TCP after hop-by-hop, destination options and routing",
            Frame6::tcp(VIP6)
                .with_ext(HOP_BY_HOP)
                .with_ext(DEST_OPTS)
                .with_ext(ROUTING),
            Reason::PassNotVip,
        ),
        (
            "TCP after an atomic fragment header (a whole packet)",
            Frame6::tcp(VIP6).with_fragment(0),
            Reason::PassNotVip,
        ),
        (
            "ESP to the VIP",
            Frame6::upper(VIP6, ESP, vec![0; 16]),
            Reason::PassNotL4,
        ),
        (
            "no next header to the VIP",
            Frame6::upper(VIP6, 59, vec![]),
            Reason::PassNotL4,
        ),
    ];
    for (what, frame, reason) in cases {
        expect(&dp, what, &frame.build(), XDP_PASS, reason);
    }
}

#[test]
fn neighbour_discovery_and_icmpv6_always_pass_untouched() {
    let dp = datapath();
    let ns = |dst| {
        Frame6::upper(
            dst,
            ICMPV6,
            vec![NEIGHBOUR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0],
        )
    };
    let solicited_node: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
    let cases = [
        (
            "neighbour solicitation to the VIP",
            ns(VIP6),
            Reason::PassIcmp,
        ),
        (
            "neighbour solicitation to the solicited-node group",
            ns(solicited_node),
            Reason::PassNotL4,
        ),
        (
            "neighbour solicitation after hop-by-hop",
            ns(VIP6).with_ext(HOP_BY_HOP),
            Reason::PassIcmp,
        ),
        (
            "router advertisement",
            Frame6::upper(OTHER6, ICMPV6, vec![134, 0, 0, 0, 0, 0, 0, 0]),
            Reason::PassNotL4,
        ),
        (
            "echo request to the VIP",
            Frame6::upper(VIP6, ICMPV6, vec![128, 0, 0, 0, 0, 1, 0, 1]),
            Reason::PassIcmp,
        ),
    ];
    for (what, frame, reason) in cases {
        expect(&dp, what, &frame.build(), XDP_PASS, reason);
    }
}

#[test]
fn odd_ipv6_to_a_vip_address_is_dropped_and_elsewhere_passed() {
    let dp = datapath();
    let just_enough =
        (0..IPV6_MAX_EXT_HEADERS).fold(Frame6::tcp(VIP6), |f, _| f.with_ext(DEST_OPTS));
    expect(
        &dp,
        "the longest chain walked",
        &just_enough.build(),
        XDP_PASS,
        Reason::PassNotVip,
    );

    fn fragment(dst: Ipv6Addr) -> Vec<u8> {
        Frame6::tcp(dst).with_fragment(1).build()
    }
    fn later_fragment(dst: Ipv6Addr) -> Vec<u8> {
        Frame6::tcp(dst).with_fragment(185 << 3).build()
    }
    fn too_many(dst: Ipv6Addr) -> Vec<u8> {
        (0..=IPV6_MAX_EXT_HEADERS)
            .fold(Frame6::tcp(dst), |f, _| f.with_ext(DEST_OPTS))
            .build()
    }
    fn long_payload(dst: Ipv6Addr) -> Vec<u8> {
        let mut f = Frame6::tcp(dst);
        f.payload_len = Some(21);
        f.build()
    }
    fn tcp_doff(dst: Ipv6Addr, words: u8) -> Vec<u8> {
        let mut f = Frame6::tcp(dst);
        f.upper_bytes[TCP_DOFF] = words << 4;
        f.build()
    }
    fn short_doff(dst: Ipv6Addr) -> Vec<u8> {
        tcp_doff(dst, 4)
    }
    fn long_doff(dst: Ipv6Addr) -> Vec<u8> {
        tcp_doff(dst, 6)
    }
    fn long_udp(dst: Ipv6Addr) -> Vec<u8> {
        let mut f = Frame6::udp(dst);
        put_be16(&mut f.upper_bytes, UDP_LEN, 13);
        f.build()
    }
    /// An option header whose length runs past the payload.
    fn long_ext(dst: Ipv6Addr) -> Vec<u8> {
        let mut frame = Frame6::tcp(dst).with_ext(HOP_BY_HOP).build();
        frame[14 + 40 + 1] = 200;
        frame
    }
    fn version(dst: Ipv6Addr) -> Vec<u8> {
        let mut frame = Frame6::tcp(dst).build();
        frame[14] = 0x40;
        frame
    }
    let (drop_malformed, pass_malformed) = (Reason::DropMalformed, Reason::PassMalformed);
    let cases: [(&str, BuildTo, Reason, Reason); 9] = [
        (
            "a first fragment",
            fragment,
            Reason::DropFragment,
            Reason::PassFragment,
        ),
        (
            "a later fragment",
            later_fragment,
            Reason::DropFragment,
            Reason::PassFragment,
        ),
        (
            "more extension headers than walked",
            too_many,
            Reason::DropExtHeaders,
            Reason::PassIpv6,
        ),
        (
            "payload length past the frame",
            long_payload,
            drop_malformed,
            pass_malformed,
        ),
        (
            "TCP data offset 4",
            short_doff,
            drop_malformed,
            pass_malformed,
        ),
        (
            "TCP data offset past the payload",
            long_doff,
            drop_malformed,
            pass_malformed,
        ),
        (
            "UDP length past the payload",
            long_udp,
            drop_malformed,
            pass_malformed,
        ),
        (
            "an extension header past the payload",
            long_ext,
            drop_malformed,
            pass_malformed,
        ),
        (
            "IP version 4 in an IPv6 frame",
            version,
            drop_malformed,
            pass_malformed,
        ),
    ];
    for (what, frame, to_vip, elsewhere) in cases {
        expect(
            &dp,
            &format!("{what}, to the VIP"),
            &frame(VIP6),
            XDP_DROP,
            to_vip,
        );
        expect(
            &dp,
            &format!("{what}, to no VIP"),
            &frame(OTHER6),
            XDP_PASS,
            elsewhere,
        );
    }

    // Cut inside the fixed header: no destination to judge.
    let cut = Frame6::tcp(VIP6).build()[..14 + 30].to_vec();
    expect(
        &dp,
        "cut inside the IPv6 header",
        &cut,
        XDP_PASS,
        Reason::PassMalformed,
    );
    // Cut inside the TCP header, with a payload length that says so.
    let mut cut_tcp = Frame6::tcp(VIP6);
    cut_tcp.upper_bytes.truncate(10);
    expect(
        &dp,
        "cut inside the TCP header",
        &cut_tcp.build(),
        XDP_DROP,
        Reason::DropMalformed,
    );
}

const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, 0x13),
];

/// A data path with v6 services in mode nat: TCP [VIP6]:80 and UDP [VIP6]:53, both to port
/// 8080 of three v6 backends.
fn balancing() -> LoadedDatapath {
    let backends: Vec<(SocketAddr, u32)> = BACKENDS6
        .iter()
        .map(|a| (SocketAddr::new((*a).into(), 8080), 1))
        .collect();
    let web = service_toml("web6", SocketAddr::new(VIP6.into(), 80), "tcp", &backends);
    let dns = service_toml("dns6", SocketAddr::new(VIP6.into(), 53), "udp", &backends);
    LoadedDatapath::new(&format!("{web}{dns}"))
}

fn ipv6_at(frame: &[u8], off: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&frame[off..off + 16]).expect("16 bytes"))
}

/// Runs a client frame through `run`; checks it was DNATed to one of the backends' port 8080
/// with the client's address kept and a valid checksum; returns the backend it went to.
fn balanced(what: &str, frame: &Frame6, run: impl Fn(&[u8]) -> RunResult, pass: u32) -> Ipv6Addr {
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

#[test]
fn v6_flows_are_balanced_in_nat_and_stay_on_their_backend() {
    let dp = balancing();
    let xdp = |f: &[u8]| dp.xdp(f);
    let before = dp.reasons();
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40000..40060u16 {
        let syn = Frame6::tcp(VIP6).between(CLIENT6, sport, 80).checksummed();
        let first = balanced(&format!("SYN from {sport}"), &syn, xdp, XDP_PASS);
        let ack = syn.with_tcp_flags(TCP_ACK).checksummed();
        let next = balanced(&format!("ACK from {sport}"), &ack, xdp, XDP_PASS);
        assert_eq!(first, next, "port {sport} moved");
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "60 flows over three backends: {seen:?}");
    // The kernel forwards them (no FIB route here), and counts them as new flows.
    dp.reasons()
        .assert_moved(&before, &[(Reason::Forwarded, 120)], "v6 nat");
    let web6 = dp.service_counters(dp.service_id("web6"));
    assert_eq!((web6.packets, web6.new_flows), (120, 60));

    // After extension headers, and over UDP.
    let hbh = Frame6::tcp(VIP6)
        .between(CLIENT6, 41000, 80)
        .with_ext(HOP_BY_HOP)
        .with_ext(DEST_OPTS)
        .checksummed();
    balanced("SYN after two option headers", &hbh, xdp, XDP_PASS);
    for sport in [42000u16, 42001] {
        let udp = Frame6::udp(VIP6).between(CLIENT6, sport, 53).checksummed();
        balanced("UDP datagram", &udp, xdp, XDP_PASS);
    }
    // A port no v6 service listens on is not balanced.
    let other = Frame6::tcp(VIP6).between(CLIENT6, 43000, 81).checksummed();
    expect(
        &dp,
        "TCP to another port",
        &other.build(),
        XDP_PASS,
        Reason::PassNotVip,
    );
}

#[test]
fn v6_replies_get_the_vip_back_at_tc_egress() {
    let dp = balancing();
    for (sport, proto) in [(40000u16, PROTO_TCP), (40001, PROTO_UDP)] {
        let (request, vip_port) = if proto == PROTO_TCP {
            (Frame6::tcp(VIP6).between(CLIENT6, sport, 80), 80)
        } else {
            (Frame6::udp(VIP6).between(CLIENT6, sport, 53), 53)
        };
        let backend = balanced("request", &request.checksummed(), |f| dp.xdp(f), XDP_PASS);
        let reply = if proto == PROTO_TCP {
            Frame6::tcp(CLIENT6).with_tcp_flags(TCP_SYN | TCP_ACK)
        } else {
            Frame6::udp(CLIENT6)
        }
        .between(backend, 8080, sport)
        .checksummed();
        let before = dp.reasons();
        let out = dp.tc_egress(&reply.build());
        assert_eq!(out.action, TC_ACT_UNSPEC);
        let what = format!("reply over {proto}");
        assert_eq!(
            ipv6_at(&out.data, 14 + 8),
            VIP6,
            "{what}: source is the VIP"
        );
        assert_eq!(
            be16(&out.data, reply.l4_off() + L4_SPORT),
            vip_port,
            "{what}"
        );
        assert_eq!(ipv6_at(&out.data, 14 + 24), CLIENT6, "{what}");
        checksums::verify_checksums6(&out.data, 14, reply.l4_off(), proto, &what);
        dp.reasons()
            .assert_moved(&before, &[(Reason::RevNat, 1)], &what);
    }
    // A reply of no flow leaves untouched.
    let stranger = Frame6::tcp(CLIENT6)
        .between(BACKENDS6[0], 8080, 45000)
        .checksummed()
        .build();
    assert_frame_eq(&stranger, &dp.tc_egress(&stranger).data, "no flow");
}

#[test]
fn v6_is_balanced_by_the_tc_hook_too() {
    let dp = balancing();
    for sport in [40000u16, 40001, 40002] {
        let syn = Frame6::tcp(VIP6).between(CLIENT6, sport, 80).checksummed();
        balanced("SYN at TC", &syn, |f| dp.tc_balance(f), TC_ACT_UNSPEC);
        let udp = Frame6::udp(VIP6).between(CLIENT6, sport, 53).checksummed();
        balanced("UDP at TC", &udp, |f| dp.tc_balance(f), TC_ACT_UNSPEC);
    }
}

#[test]
fn an_echo_request_to_a_v6_vip_is_answered() {
    let dp = balancing();
    let request = Frame6::upper(
        VIP6,
        ICMPV6,
        vec![128, 0, 0, 0, 0x12, 0x34, 0, 7, b'p', b'i'],
    )
    .checksummed_icmp();
    let input = request.build();
    let before = dp.reasons();
    let out = dp.xdp(&input);
    assert_eq!(out.action, XDP_TX, "{}", xdp_action_name(out.action));
    dp.reasons()
        .assert_moved(&before, &[(Reason::IcmpEcho, 1)], "echo");
    let f = &out.data;
    assert_eq!(
        (&f[0..6], &f[6..12]),
        (&input[6..12], &input[0..6]),
        "MACs swapped"
    );
    assert_eq!(
        (ipv6_at(f, 22), ipv6_at(f, 38)),
        (VIP6, CLIENT6),
        "addresses swapped"
    );
    assert_eq!(f[21], 64, "hop limit");
    assert_eq!(f[54], 129, "an echo reply");
    assert_eq!(&f[58..], &input[58..], "identifier, sequence and data kept");
    let len = ((f.len() - 54) as u32).to_be_bytes();
    let sum = checksum(&[&f[22..38], &f[38..54], &len, &[0, 0, 0, ICMPV6], &f[54..]]);
    assert_eq!(sum, 0, "ICMPv6 checksum\n{}", hexdump(f, usize::MAX));

    // Other ICMPv6 to the VIP, and an echo after an extension header, reach the kernel.
    let other = Frame6::upper(VIP6, ICMPV6, vec![1, 4, 0, 0, 0, 0, 0, 0]).checksummed_icmp();
    expect(
        &dp,
        "unreachable to the VIP",
        &other.build(),
        XDP_PASS,
        Reason::PassIcmp,
    );
    let after_ext = Frame6::upper(VIP6, ICMPV6, vec![128, 0, 0, 0, 0, 1, 0, 1])
        .with_ext(DEST_OPTS)
        .checksummed_icmp();
    expect(
        &dp,
        "echo after options",
        &after_ext.build(),
        XDP_PASS,
        Reason::PassIcmp,
    );
}

/// An ICMPv6 error from `from` to the VIP quoting the VIP's reply to `client_port` (TCP,
/// VIP6:80 -> CLIENT6), with a valid checksum.
fn error_about_a_reply(from: Ipv6Addr, kind: u8, code: u8, client_port: u16) -> Frame6 {
    let reply = Frame6::tcp(CLIENT6)
        .between(VIP6, 80, client_port)
        .with_tcp_flags(TCP_ACK)
        .checksummed();
    let quoted = &reply.build()[14..];
    let mut message = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
    message.extend_from_slice(quoted);
    let mut error = Frame6::upper(VIP6, ICMPV6, message);
    error.src = from;
    error.checksummed_icmp()
}

/// Packet too big, unreachable and time exceeded about a v6 VIP flow go to the flow's
/// backend: the outer destination and the quoted source become the backend's, the quoted
/// port its port, and the ICMPv6 checksum stays valid (computed here over the pseudo-header).
/// Both hooks. An error quoting another source, or cut short, reaches the kernel untouched.
#[test]
fn icmpv6_errors_about_a_v6_flow_go_to_its_backend() {
    let dp = balancing();
    let router = Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 0xfe);
    for (i, (kind, code)) in [(2u8, 0u8), (1, 4), (3, 0)].into_iter().enumerate() {
        let client_port = 45000 + i as u16;
        let syn = Frame6::tcp(VIP6)
            .between(CLIENT6, client_port, 80)
            .checksummed();
        let backend = balanced("SYN", &syn, |f| dp.xdp(f), XDP_PASS);
        for (hook, run) in [("XDP", true), ("TC", false)] {
            let what = format!("ICMPv6 type {kind} at {hook}");
            let input = error_about_a_reply(router, kind, code, client_port).build();
            let before = dp.reasons();
            let out = if run {
                dp.xdp(&input)
            } else {
                dp.tc_balance(&input)
            };
            let pass = if run { XDP_PASS } else { TC_ACT_UNSPEC };
            assert_eq!(out.action, pass, "{what}");
            let to_backend = |counts: &ReasonCounts| counts.get(Reason::IcmpToBackend);
            assert_eq!(to_backend(&dp.reasons()) - to_backend(&before), 1, "{what}");
            let f = &out.data;
            assert_eq!(ipv6_at(f, 22), router, "{what}: source kept");
            assert_eq!(ipv6_at(f, 38), backend, "{what}: to the flow's backend");
            let quote = 54 + 8;
            assert_eq!(ipv6_at(f, quote + 8), backend, "{what}: quoted source");
            assert_eq!(
                ipv6_at(f, quote + 24),
                CLIENT6,
                "{what}: quoted destination"
            );
            assert_eq!(be16(f, quote + 40), 8080, "{what}: quoted port");
            assert_eq!(be16(f, quote + 42), client_port, "{what}");
            let len = ((f.len() - 54) as u32).to_be_bytes();
            let sum = checksum(&[&f[22..38], &f[38..54], &len, &[0, 0, 0, ICMPV6], &f[54..]]);
            assert_eq!(
                sum,
                0,
                "{what}: ICMPv6 checksum\n{}",
                hexdump(f, usize::MAX)
            );
        }
    }
    // Quoting a packet the VIP did not send, and a quote cut before its ports.
    let mut forged = error_about_a_reply(router, 2, 0, 45000);
    forged.upper_bytes[8 + 8..8 + 24].copy_from_slice(&OTHER6.octets());
    let forged = forged.checksummed_icmp();
    expect(
        &dp,
        "forged quote",
        &forged.build(),
        XDP_PASS,
        Reason::PassIcmp,
    );
    let mut short = error_about_a_reply(router, 2, 0, 45000);
    short.upper_bytes.truncate(8 + 40 + 2);
    let short = short.checksummed_icmp();
    expect(
        &dp,
        "short quote",
        &short.build(),
        XDP_PASS,
        Reason::PassIcmp,
    );
}

/// On the reply paths (TC egress here): an ICMPv6 error to the client about its nat flow
/// quotes the request as the backend got it (client -> backend:8080); it leaves quoting
/// client -> VIP, from the VIP when the backend sent it itself, its checksum valid. So a
/// connected UDP socket of the client sees "port unreachable".
#[test]
fn icmpv6_errors_from_a_backend_get_the_vip_back_in_their_quote() {
    let dp = balancing();
    let router = Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, 0xfe);
    for (i, from_backend) in [true, false].into_iter().enumerate() {
        let sport = 46000 + i as u16;
        let request = Frame6::udp(VIP6).between(CLIENT6, sport, 53).checksummed();
        let backend = balanced("request", &request, |f| dp.xdp(f), XDP_PASS);
        let got = Frame6::udp(backend)
            .between(CLIENT6, sport, 8080)
            .checksummed();
        let mut message = vec![1, 4, 0, 0, 0, 0, 0, 0];
        message.extend_from_slice(&got.build()[14..]);
        let mut error = Frame6::upper(CLIENT6, ICMPV6, message);
        error.src = if from_backend { backend } else { router };
        let input = error.checksummed_icmp().build();
        let before = dp.reasons();
        let out = dp.tc_egress(&input);
        let what = format!("unreachable, from the backend: {from_backend}");
        assert_eq!(out.action, TC_ACT_UNSPEC, "{what}");
        dp.reasons()
            .assert_moved(&before, &[(Reason::RevNat, 1)], &what);
        let f = &out.data;
        let outer_src = if from_backend { VIP6 } else { router };
        assert_eq!(ipv6_at(f, 22), outer_src, "{what}: outer source");
        assert_eq!(ipv6_at(f, 38), CLIENT6, "{what}");
        let quote = 54 + 8;
        assert_eq!(ipv6_at(f, quote + 8), CLIENT6, "{what}: quoted source");
        assert_eq!(ipv6_at(f, quote + 24), VIP6, "{what}: quoted destination");
        assert_eq!(be16(f, quote + 40), sport, "{what}");
        assert_eq!(be16(f, quote + 42), 53, "{what}: quoted port");
        let len = ((f.len() - 54) as u32).to_be_bytes();
        let sum = checksum(&[&f[22..38], &f[38..54], &len, &[0, 0, 0, ICMPV6], &f[54..]]);
        assert_eq!(
            sum,
            0,
            "{what}: ICMPv6 checksum\n{}",
            hexdump(f, usize::MAX)
        );
    }
    // About no flow of this LB: untouched.
    let stray = Frame6::udp(BACKENDS6[0])
        .between(CLIENT6, 47000, 8080)
        .checksummed();
    let mut message = vec![1, 4, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&stray.build()[14..]);
    let error = Frame6::upper(CLIENT6, ICMPV6, message)
        .checksummed_icmp()
        .build();
    assert_frame_eq(&error, &dp.tc_egress(&error).data, "no flow");
}
