//! ICMPv6 through the XDP and TC programs under BPF_PROG_TEST_RUN: echo to a v6 VIP
//! answered, errors about a v6 flow sent to its backend, and a backend's errors about one
//! given the VIP back on the reply path; every checksum computed here over the
//! pseudo-header. Needs root and BPF.
use std::net::Ipv6Addr;

use lb_common::Reason;
use xlb_tests::testrun::*;

#[path = "support/checksums.rs"]
#[allow(dead_code)] // the v4 checks
mod checksums;
#[path = "support/frame6.rs"]
#[allow(dead_code)] // each test file uses some
mod frame6;
use frame6::*;

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
    assert_icmpv6_checksum(f, "echo reply");

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
    icmp6_error(from, VIP6, kind, code, &reply)
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
            assert_icmpv6_checksum(f, &what);
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
        assert_icmpv6_checksum(f, &what);
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
