//! IPv6 through the XDP program under BPF_PROG_TEST_RUN: the parser (fixed header, a bounded
//! chain of extension headers, TCP/UDP/ICMPv6) and the verdicts of docs/architecture.md: a
//! VIP address's odd packets are dropped with a reason, what is not for a v6 service passes
//! untouched (the first tests put a VIP address without a service into the map), and a v6
//! service's packets are balanced in mode nat, their checksums checked by etherparse; v6
//! allow lists. ICMPv6 is in icmp_v6.rs. Needs root and BPF, like datapath.rs.
use std::net::{Ipv6Addr, SocketAddr};

use lb_common::{IPV6_MAX_EXT_HEADERS, PROTO_TCP, PROTO_UDP, Reason};
use xlb_tests::testrun::*;

#[path = "support/checksums.rs"]
#[allow(dead_code)] // the v4 checks
mod checksums;
#[path = "support/frame6.rs"]
#[allow(dead_code)] // each test file uses some
mod frame6;
use frame6::*;

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

/// `allow` with IPv6 ranges, on a dual-stack service: a v6 source inside the v6 range is
/// balanced, one outside dropped as `drop_not_allowed` (at XDP and at TC), and the v4 VIP
/// keeps its own range.
#[test]
fn a_v6_allow_list_lets_in_its_range_only() {
    let backends: Vec<(SocketAddr, u32)> = BACKENDS6
        .iter()
        .map(|a| (SocketAddr::new((*a).into(), 8080), 1))
        .collect();
    let web = service_toml("web", SocketAddr::new(VIP6.into(), 80), "tcp", &backends).replacen(
        &format!("vip = \"{VIP6}\""),
        &format!(
            "vip = [\"10.99.100.1\", \"{VIP6}\"]\nallow = [\"10.99.1.0/24\", \"fd99:1::/64\"]"
        ),
        1,
    );
    let dp = LoadedDatapath::new(&web);
    let inside = Frame6::tcp(VIP6).between(CLIENT6, 40000, 80).checksummed();
    balanced("inside", &inside, |f| dp.xdp(f), XDP_PASS);
    let stranger = Ipv6Addr::new(0xfd99, 7, 0, 0, 0, 0, 0, 2);
    let outside = Frame6::tcp(VIP6).between(stranger, 40000, 80).checksummed();
    for (hook, drop) in [("XDP", XDP_DROP), ("TC", 2)] {
        let before = dp.reasons();
        let input = outside.build();
        let out = if hook == "XDP" {
            dp.xdp(&input)
        } else {
            dp.tc_balance(&input)
        };
        assert_eq!(out.action, drop, "outside at {hook}");
        dp.reasons()
            .assert_moved(&before, &[(Reason::DropNotAllowed, 1)], hook);
    }
    let v4_range = dp
        .datapath()
        .allowed(dp.service_id("web"), "10.99.1.9".parse().unwrap());
    assert!(v4_range.expect("lookup"), "the v4 VIP's range");
    let v6_in_v4 = dp.datapath().allowed(dp.service_id("web"), CLIENT6.into());
    assert!(!v6_in_v4.expect("lookup"), "v6 ranges belong to the v6 VIP");
}
