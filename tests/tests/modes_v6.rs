//! Modes fullnat and dsr over IPv6 under BPF_PROG_TEST_RUN: SNAT66 to the FIB's source or
//! the service's pool, DNAT66 to the backend, and replies translated back to VIP -> client,
//! the checksums checked by etherparse; dsr's IPv6-in-IPv6 and GUE over IPv6, and its Packet
//! Too Big from the VIP. In a namespace where the FIB answers (support/routed.rs).
use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use xlb_tests::testrun::*;

#[path = "support/checksums.rs"]
#[allow(dead_code)] // the v4 checks
mod checksums;
#[path = "support/frame6.rs"]
#[allow(dead_code)] // each test file uses some
mod frame6;
#[path = "support/routed.rs"]
mod routed;
use frame6::{CLIENT6, Frame6, VIP6, assert_icmpv6_checksum, icmp6_error, ipv6_at};
use routed::{HOSTS6, LB_BACK6, routed_namespace};

const L3: usize = 14;
const SADDR: usize = 8;
const DADDR: usize = 24;
const HOP_LIMIT: usize = 7;

/// A fullnat service on [VIP6]:`port` to port 8080 of the three v6 hosts.
fn service(port: u16, protocol: &str, extra: &str) -> String {
    let mut s = format!(
        "[[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\nport = {port}\nprotocol = \"{protocol}\"\n\
         mode = \"fullnat\"\n{extra}\n[service.health]\ntype = \"none\"\n"
    );
    for host in HOSTS6 {
        s += &format!("[[service.backend]]\naddress = \"{host}\"\nport = 8080\n");
    }
    s
}

/// (source, destination) of the TCP/UDP packet of `frame` (no extension headers).
fn endpoints(frame: &[u8]) -> (SocketAddrV6, SocketAddrV6) {
    let l4 = L3 + 40;
    let at = |addr, port| SocketAddrV6::new(ipv6_at(frame, addr), be16(frame, port), 0, 0);
    (at(L3 + SADDR, l4), at(L3 + DADDR, l4 + 2))
}

/// The frame `from` -> `to` of `proto` (TCP with `flags`), with a valid checksum.
fn frame(proto: u8, from: SocketAddrV6, to: SocketAddrV6, flags: u8) -> Frame6 {
    let base = if proto == PROTO_TCP {
        Frame6::tcp(*to.ip()).with_tcp_flags(flags)
    } else {
        Frame6::udp(*to.ip())
    };
    let mut f = base.between(*from.ip(), from.port(), to.port());
    f.dst = *to.ip();
    f.checksummed()
}

/// Sends a client packet and its backend's reply through fullnat; checks both rewrites and
/// returns the source the backend saw.
fn round_trip(dp: &LoadedDatapath, proto: u8, port: u16, what: &str) -> SocketAddrV6 {
    let client = SocketAddrV6::new(CLIENT6, 40000, 0, 0);
    let vip = SocketAddrV6::new(VIP6, port, 0, 0);
    let first = if proto == PROTO_TCP { TCP_SYN } else { 0 };
    let input = frame(proto, client, vip, first).build();
    let before = dp.reasons();
    let out = dp.xdp_unmarked(&input);
    // The neighbour is known but the device is no front NIC: TC sends it.
    assert_eq!(
        out.action,
        XDP_PASS,
        "{what}: {}",
        xdp_action_name(out.action)
    );
    dp.reasons()
        .assert_moved(&before, &[(Reason::HandedToTc, 1)], what);
    checksums::verify_checksums6(&out.data, L3, L3 + 40, proto, what);
    let (snat, backend) = endpoints(&out.data);
    assert!(HOSTS6.contains(backend.ip()), "{what}: to {backend}");
    assert_eq!(backend.port(), 8080, "{what}");
    assert_eq!(
        out.data[L3 + HOP_LIMIT],
        input[L3 + HOP_LIMIT] - 1,
        "{what}: hop limit"
    );

    // The flow's next packet keeps its source port.
    let next = frame(proto, client, vip, TCP_ACK).build();
    let again = dp.xdp_unmarked(&next);
    assert_eq!(
        endpoints(&again.data),
        (snat, backend),
        "{what}: next packet"
    );

    let reply = frame(proto, backend, snat, TCP_SYN | TCP_ACK).build();
    let before = dp.reasons();
    let back = dp.xdp_unmarked(&reply);
    dp.reasons().assert_moved(
        &before,
        &[(Reason::RevSnat, 1), (Reason::HandedToTc, 1)],
        &format!("{what}: reply"),
    );
    checksums::verify_checksums6(&back.data, L3, L3 + 40, proto, what);
    assert_eq!(endpoints(&back.data), (vip, client), "{what}: reply");
    snat
}

#[test]
fn fullnat_over_v6_rewrites_both_ends_and_translates_replies_back() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&format!(
        "{}{}",
        service(81, "tcp", ""),
        service(53, "udp", "").replace("\"web6\"", "\"dns6\"")
    ));
    for (proto, port, what) in [(PROTO_TCP, 81, "TCP"), (PROTO_UDP, 53, "UDP")] {
        let snat = round_trip(&dp, proto, port, what);
        assert_eq!(
            *snat.ip(),
            LB_BACK6,
            "{what}: SNAT to the FIB's source address"
        );
        assert!((1024..=32767).contains(&snat.port()), "{what}: port {snat}");
    }
    // One reservation per flow, keyed by the v6 reply.
    let reservations = dp.datapath().snat_rev().expect("snat map");
    assert_eq!(reservations.len(), 2, "{reservations:?}");
    assert!(
        reservations
            .iter()
            .all(|(k, _)| k.family == lb_common::FAMILY_V6)
    );
}

#[test]
fn fullnat_over_v6_takes_the_services_pool_and_distinct_ports() {
    let _ns = routed_namespace();
    let pool: Ipv6Addr = "fd99:4::100".parse().unwrap();
    let dp = LoadedDatapath::new(&service(81, "tcp", &format!("snat = [\"{pool}\"]")));
    let snat = round_trip(&dp, PROTO_TCP, 81, "pool");
    assert_eq!(*snat.ip(), pool);
    assert!(snat.port() >= 1024, "{snat}");
    // Concurrent flows from many client ports: no two share a (source port, backend).
    let mut seen = std::collections::BTreeSet::new();
    for sport in 0..200u16 {
        let client = SocketAddrV6::new(CLIENT6, 20000 + sport, 0, 0);
        let syn = frame(
            PROTO_TCP,
            client,
            SocketAddrV6::new(VIP6, 81, 0, 0),
            TCP_SYN,
        );
        let out = dp.xdp_unmarked(&syn.build());
        let (src, backend) = endpoints(&out.data);
        assert_eq!(*src.ip(), pool);
        assert!(
            seen.insert((src.port(), backend)),
            "{src} -> {backend} twice"
        );
    }
    // A packet from a backend to a port no flow holds is not ours.
    let stray = frame(
        PROTO_TCP,
        SocketAddrV6::new(HOSTS6[0], 8080, 0, 0),
        SocketAddrV6::new(pool, 1, 0, 0),
        TCP_ACK,
    );
    let before = dp.reasons();
    let out = dp.xdp(&stray.build());
    assert_eq!(out.action, XDP_PASS);
    dp.reasons()
        .assert_moved(&before, &[(Reason::PassNotVip, 1)], "stray reply");
}

/// ICMPv6 errors about a fullnat flow, both ways: one to the VIP (a router on the client's
/// side quotes the VIP's reply) reaches the backend from the flow's SNAT address, quoting the
/// LB's packet to the backend; one to the SNAT address (the backend, or a router on its side,
/// quotes that packet) reaches the client about the VIP, from the VIP when the backend sent
/// it. Each ICMPv6 checksum is computed here.
#[test]
fn icmpv6_errors_about_a_fullnat_flow_are_translated_both_ways() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service(81, "tcp", ""));
    let snat = round_trip(&dp, PROTO_TCP, 81, "flow");
    let client = SocketAddrV6::new(CLIENT6, 40000, 0, 0);
    let vip = SocketAddrV6::new(VIP6, 81, 0, 0);
    let router = Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 0xfe);
    let quote = L3 + 40 + 8;
    let quoted = |f: &[u8]| {
        let at = |addr, port| SocketAddrV6::new(ipv6_at(f, quote + addr), be16(f, port), 0, 0);
        (at(SADDR, quote + 40), at(DADDR, quote + 42))
    };

    // Towards the backend.
    let reply = frame(PROTO_TCP, vip, client, TCP_ACK);
    let too_big = icmp6_error(router, VIP6, 2, 0, &reply).build();
    let before = dp.reasons();
    let out = dp.xdp_unmarked(&too_big);
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    dp.reasons().assert_moved(
        &before,
        &[(Reason::IcmpToBackend, 1), (Reason::HandedToTc, 1)],
        "to the backend",
    );
    let f = &out.data;
    let backend = quoted(f).0;
    assert!(HOSTS6.contains(backend.ip()), "quoted source {backend}");
    assert_eq!(backend.port(), 8080);
    assert_eq!(
        quoted(f).1,
        snat,
        "quoted destination: the flow's SNAT address"
    );
    assert_eq!(ipv6_at(f, L3 + SADDR), *snat.ip(), "from the SNAT address");
    assert_eq!(ipv6_at(f, L3 + DADDR), *backend.ip());
    assert_icmpv6_checksum(f, "to the backend");

    // Towards the client, from the backend and from a router on its side.
    let request = frame(PROTO_TCP, snat, backend, TCP_ACK);
    for (from, outer_src) in [(*backend.ip(), VIP6), (LB_BACK6, LB_BACK6)] {
        let what = format!("from {from}");
        let unreachable = icmp6_error(from, *snat.ip(), 1, 4, &request).build();
        let before = dp.reasons();
        let out = dp.xdp_unmarked(&unreachable);
        assert_eq!(
            out.action,
            XDP_PASS,
            "{what}: {}",
            xdp_action_name(out.action)
        );
        dp.reasons().assert_moved(
            &before,
            &[(Reason::RevSnat, 1), (Reason::HandedToTc, 1)],
            &what,
        );
        let f = &out.data;
        assert_eq!(quoted(f), (client, vip), "{what}: the client's own packet");
        assert_eq!(ipv6_at(f, L3 + SADDR), outer_src, "{what}: outer source");
        assert_eq!(ipv6_at(f, L3 + DADDR), CLIENT6, "{what}");
        assert_icmpv6_checksum(f, &what);
    }

    // About no flow (another SNAT port): untouched.
    let other = frame(
        PROTO_TCP,
        SocketAddrV6::new(*snat.ip(), 1, 0, 0),
        backend,
        TCP_ACK,
    );
    let stray = icmp6_error(*backend.ip(), *snat.ip(), 1, 4, &other).build();
    let out = dp.xdp(&stray);
    assert_eq!(out.action, XDP_PASS);
    assert_frame_eq(&stray, &out.data, "about no flow");
}

/// A dsr service on [VIP6]:80 to the three v6 hosts (dsr keeps the port).
fn dsr_service(extra: &str) -> String {
    service(80, "tcp", extra)
        .replace("mode = \"fullnat\"", "mode = \"dsr\"")
        .replace("port = 8080", "port = 80")
}

/// A TCP packet from the client to [VIP6]:80 with `payload` bytes of data.
fn dsr_request(payload: usize, flags: u8) -> Vec<u8> {
    let mut f = Frame6::tcp(VIP6).with_tcp_flags(flags);
    f.upper_bytes.extend(std::iter::repeat_n(b'x', payload));
    f.checksummed().build()
}

/// Checks dsr's encapsulation of `input`; returns the backend host it went to.
fn encapsulated6(dp: &LoadedDatapath, input: &[u8], gue: bool, what: &str) -> Ipv6Addr {
    let out = dp.xdp_unmarked(input);
    assert_eq!(
        out.action,
        XDP_PASS,
        "{what}: {}",
        xdp_action_name(out.action)
    );
    let overhead = if gue { 48 } else { 40 };
    let inner = &input[L3..];
    assert_eq!(
        out.data.len(),
        L3 + overhead + inner.len(),
        "{what}: outer headers"
    );
    assert_eq!(be16(&out.data, 12), 0x86dd, "{what}: ethertype");
    assert_eq!(&out.data[..12], &input[..12], "{what}: MACs kept for TC");
    let outer = &out.data[L3..];
    assert_eq!(outer[0] >> 4, 6, "{what}: version");
    assert_eq!(
        be16(outer, 4) as usize,
        overhead - 40 + inner.len(),
        "{what}: payload length"
    );
    assert_eq!(
        outer[6],
        if gue { PROTO_UDP } else { 41 },
        "{what}: next header"
    );
    assert_eq!(outer[HOP_LIMIT], 64, "{what}: outer hop limit");
    assert_eq!(
        ipv6_at(&out.data, L3 + SADDR),
        LB_BACK6,
        "{what}: from the LB"
    );
    let host = ipv6_at(&out.data, L3 + DADDR);
    assert!(HOSTS6.contains(&host), "{what}: to {host}");
    if gue {
        let udp = &outer[40..];
        assert_eq!(be16(udp, 2), lb_common::GUE_PORT, "{what}: GUE port");
        assert_eq!(be16(udp, 4) as usize, 8 + inner.len(), "{what}: UDP length");
        assert_eq!(be16(udp, 6), 0, "{what}: zero UDP checksum (RFC 6935)");
        assert!(
            be16(udp, 0) >= 0xc000,
            "{what}: source port from the flow hash"
        );
    }
    assert_eq!(
        &outer[overhead..],
        inner,
        "{what}: the client's packet, unchanged"
    );
    host
}

#[test]
fn dsr_over_v6_encapsulates_in_ipv6_and_gue() {
    let _ns = routed_namespace();
    for (gue, extra) in [(false, ""), (true, "encap = \"gue\"")] {
        let dp = LoadedDatapath::new(&dsr_service(extra));
        let what = if gue { "GUE over v6" } else { "IPv6 in IPv6" };
        let before = dp.reasons();
        let host = encapsulated6(&dp, &dsr_request(6, TCP_SYN), gue, what);
        dp.reasons()
            .assert_moved(&before, &[(Reason::HandedToTc, 1)], what);
        // The flow's next packet goes to the same host.
        let next = encapsulated6(&dp, &dsr_request(100, TCP_ACK), gue, what);
        assert_eq!(next, host, "{what}: one host per flow");
    }
}

#[test]
fn dsr_over_v6_answers_what_would_not_fit_with_packet_too_big_from_the_vip() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&dsr_service(""));
    // 1500 bytes of IPv6 (40 + 20 + 1440): 1540 encapsulated, over the link's 1500.
    let input = dsr_request(1440, TCP_ACK);
    assert_eq!(input.len(), L3 + 1500);
    let before = dp.reasons();
    let out = dp.xdp_unmarked(&input);
    assert_eq!(out.action, XDP_TX, "{}", xdp_action_name(out.action));
    dp.reasons()
        .assert_moved(&before, &[(Reason::FragNeeded, 1)], "too big");
    let f = &out.data;
    assert_eq!(f.len(), L3 + 40 + 8 + 48, "headers and the quote");
    assert_eq!(
        (&f[..6], &f[6..12]),
        (&input[6..12], &input[..6]),
        "MACs swapped"
    );
    assert_eq!(be16(f, 12), 0x86dd);
    assert_eq!(f[L3 + 6], 58, "next header ICMPv6");
    assert_eq!(be16(f, L3 + 4), 56, "payload length");
    assert_eq!(
        (ipv6_at(f, L3 + SADDR), ipv6_at(f, L3 + DADDR)),
        (VIP6, CLIENT6),
        "from the VIP to the client"
    );
    let icmp = &f[L3 + 40..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "Packet Too Big");
    assert_eq!(
        u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        1500 - 40,
        "the MTU that fits once encapsulated"
    );
    assert_icmpv6_checksum(f, "Packet Too Big");
    assert_eq!(
        &icmp[8..],
        &input[L3..L3 + 48],
        "quotes the client's packet"
    );

    // A packet that fits is encapsulated as usual.
    encapsulated6(&dp, &dsr_request(1400, TCP_ACK), false, "fits");
}
