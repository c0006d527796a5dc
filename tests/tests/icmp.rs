//! ICMP at the VIPs under BPF_PROG_TEST_RUN: echo answered (VLAN tag kept), errors about a
//! VIP flow sent to its backend, translated as the mode needs (nat, fullnat, dsr), and the
//! LB's own "fragmentation needed" keeping the VLAN tag.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{DeliverMeta, Reason};
use xlb_tests::testrun::*;

#[path = "support/routed.rs"]
mod routed;
use routed::{HOSTS, LB_BACK, routed_namespace};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 40000);
/// A router on the client's path that cannot forward a reply (its link is too small).
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 254);
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;

/// "web" on VIP:80 over HOSTS, in the mode `extra` sets (backends on port 80 for dsr,
/// which does not rewrite ports, 8080 else).
fn service(extra: &str) -> String {
    let port = if extra.contains("dsr") { 80 } else { 8080 };
    let mut s = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\n{extra}\n\
         [service.health]\ntype = \"none\"\n"
    );
    for host in HOSTS {
        s += &format!("[[service.backend]]\naddress = \"{host}\"\nport = {port}\n");
    }
    s
}

/// An ICMP error from ROUTER to the VIP quoting `quoted` (a frame of a packet the VIP
/// sent): type 3 code 4 with `mtu`, or another type and code.
fn icmp_error(kind: u8, code: u8, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    icmp_error_between(ROUTER, VIP, kind, code, mtu, quoted)
}

/// The same from `from` to `to`.
fn icmp_error_between(
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: u8,
    code: u8,
    mtu: u16,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted[ETH_HLEN..ETH_HLEN + IPV4_HLEN + 8]);
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Packet::other(from, to, 1).with_payload(icmp).build()
}

/// The reply a backend sent to the client, as it left the LB (from the VIP).
fn reply_from_vip() -> Vec<u8> {
    Packet::tcp(WEB, CLIENT)
        .with_payload(vec![b'x'; 1400])
        .build()
}

/// Drops the delivery metadata XDP puts in front of a frame it hands to TC.
fn strip_meta(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() > 8 && frame[..4] == lb_common::DELIVER_MAGIC.to_ne_bytes() {
        frame.drain(..size_of::<DeliverMeta>());
    }
    frame
}

fn assert_valid_ip_and_icmp(frame: &[u8], l3: usize, what: &str) {
    assert_eq!(
        checksum(&[&frame[l3..l3 + IPV4_HLEN]]),
        0,
        "{what}: IP checksum"
    );
    let len = usize::from(be16(frame, l3 + 2));
    assert_eq!(
        checksum(&[&frame[l3 + IPV4_HLEN..l3 + len]]),
        0,
        "{what}: ICMP checksum"
    );
}

#[test]
fn echo_to_a_vip_is_answered_with_the_vlan_tag_kept() {
    let dp = LoadedDatapath::new(&service_toml("web", WEB, "tcp", &[]));
    for (what, request) in [
        ("untagged", Packet::icmp_echo(*CLIENT.ip(), VIP)),
        (
            "802.1Q",
            Packet::icmp_echo(*CLIENT.ip(), VIP).with_vlan(ETH_P_8021Q, 7),
        ),
    ] {
        let input = request.build();
        let before = dp.reasons();
        let out = dp.xdp(&input);
        assert_eq!(out.action, XDP_TX, "{what}");
        dp.reasons()
            .assert_moved(&before, &[(Reason::IcmpEcho, 1)], what);
        let l3 = request.l3_off();
        let frame = &out.data;
        assert_eq!(
            (&frame[..6], &frame[6..12]),
            (&input[6..12], &input[..6]),
            "{what}: MACs"
        );
        assert_eq!(&frame[12..l3], &input[12..l3], "{what}: the VLAN tag stays");
        assert_eq!(
            (ipv4_at(frame, l3 + 12), ipv4_at(frame, l3 + 16)),
            (VIP, *CLIENT.ip())
        );
        assert_eq!(frame[l3 + IPV4_HLEN], 0, "{what}: echo reply");
        assert_eq!(
            &frame[l3 + IPV4_HLEN + 4..],
            &input[l3 + IPV4_HLEN + 4..],
            "{what}: id, seq, data"
        );
        assert_valid_ip_and_icmp(frame, l3, what);
    }
}

#[test]
fn echo_is_left_to_the_kernel_where_the_service_turns_it_off() {
    let dp = LoadedDatapath::new(
        &service_toml("web", WEB, "tcp", &[])
            .replace("mode = \"nat\"", "mode = \"nat\"\nicmp_echo = false"),
    );
    let input = Packet::icmp_echo(*CLIENT.ip(), VIP).build();
    let before = dp.reasons();
    let out = dp.xdp(&input);
    assert_eq!((out.action, out.data), (XDP_PASS, input));
    dp.reasons()
        .assert_moved(&before, &[(Reason::PassIcmp, 1)], "echo off");
}

#[test]
fn nat_sends_an_error_about_a_flow_to_its_backend_as_the_backend_sent_it() {
    let backends: Vec<_> = HOSTS
        .iter()
        .map(|h| (SocketAddrV4::new(*h, 8080), 100))
        .collect();
    let dp = LoadedDatapath::new(&service_toml("web", WEB, "tcp", &backends));
    // The flow's own SYN: conntrack pins it to a backend.
    let syn = Packet::tcp(CLIENT, WEB).with_tcp_flags(TCP_SYN);
    let first = dp.xdp(&syn.build());
    let backend = ipv4_at(&first.data, ETH_HLEN + 16);
    let error = icmp_error(3, 4, 1280, &reply_from_vip());
    let before = dp.reasons();
    let out = dp.xdp(&error);
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    dp.reasons().assert_moved(
        &before,
        &[(Reason::IcmpToBackend, 1), (Reason::Forwarded, 1)],
        "frag needed",
    );
    let frame = &out.data;
    assert_eq!(ipv4_at(frame, ETH_HLEN + 12), ROUTER, "outer source kept");
    assert_eq!(
        ipv4_at(frame, ETH_HLEN + 16),
        backend,
        "to the flow's backend"
    );
    let inner = ETH_HLEN + IPV4_HLEN + 8;
    assert_eq!(
        SocketAddrV4::new(ipv4_at(frame, inner + 12), be16(frame, inner + IPV4_HLEN)),
        SocketAddrV4::new(backend, 8080),
        "the quoted packet is the backend's own"
    );
    assert_eq!(
        SocketAddrV4::new(
            ipv4_at(frame, inner + 16),
            be16(frame, inner + IPV4_HLEN + 2)
        ),
        CLIENT
    );
    assert_eq!(be16(frame, ETH_HLEN + IPV4_HLEN + 6), 1280, "the MTU");
    assert_valid_ip_and_icmp(frame, ETH_HLEN, "frag needed");
    assert_eq!(
        checksum(&[&frame[inner..inner + IPV4_HLEN]]),
        0,
        "quoted IP checksum"
    );

    // Without a flow entry the ring decides, as it does for the flow's own packets.
    let other = SocketAddrV4::new(*CLIENT.ip(), 40001);
    let out = dp.xdp(&icmp_error(11, 0, 0, &Packet::tcp(WEB, other).build()));
    let via_ring = ipv4_at(&out.data, ETH_HLEN + 16);
    let syn = Packet::tcp(other, WEB).with_tcp_flags(TCP_SYN).build();
    assert_eq!(
        via_ring,
        ipv4_at(&dp.xdp(&syn).data, ETH_HLEN + 16),
        "time exceeded"
    );

    // An error about no flow of a service (another port on the VIP) is the kernel's.
    let stray = Packet::tcp(SocketAddrV4::new(VIP, 9999), CLIENT).build();
    let before = dp.reasons();
    assert_eq!(dp.xdp(&icmp_error(3, 3, 0, &stray)).action, XDP_PASS);
    dp.reasons()
        .assert_moved(&before, &[(Reason::PassIcmp, 1)], "about no service");
}

#[test]
fn fullnat_translates_an_error_to_the_flows_snat_address_and_port() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service("mode = \"fullnat\""));
    let first = strip_meta(
        dp.xdp(&Packet::tcp(CLIENT, WEB).with_tcp_flags(TCP_SYN).build())
            .data,
    );
    let l4 = ETH_HLEN + IPV4_HLEN;
    let snat = SocketAddrV4::new(ipv4_at(&first, ETH_HLEN + 12), be16(&first, l4));
    let backend = SocketAddrV4::new(ipv4_at(&first, ETH_HLEN + 16), be16(&first, l4 + 2));
    assert_eq!(*snat.ip(), LB_BACK);

    let out = strip_meta(dp.xdp(&icmp_error(3, 4, 1280, &reply_from_vip())).data);
    let frame = &out;
    assert_eq!(
        (ipv4_at(frame, ETH_HLEN + 12), ipv4_at(frame, ETH_HLEN + 16)),
        (LB_BACK, *backend.ip()),
        "from the LB to the backend"
    );
    let inner = ETH_HLEN + IPV4_HLEN + 8;
    let quoted = |at: usize, port_at: usize| {
        SocketAddrV4::new(
            ipv4_at(frame, inner + at),
            be16(frame, inner + IPV4_HLEN + port_at),
        )
    };
    assert_eq!(
        (quoted(12, 0), quoted(16, 2)),
        (backend, snat),
        "as the backend sent it"
    );
    assert_valid_ip_and_icmp(frame, ETH_HLEN, "fullnat frag needed");
    assert_eq!(
        checksum(&[&frame[inner..inner + IPV4_HLEN]]),
        0,
        "quoted IP checksum"
    );
}

#[test]
fn dsr_encapsulates_an_error_for_the_backend_host() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service("mode = \"dsr\""));
    let error = icmp_error(3, 4, 1280, &reply_from_vip());
    let out = strip_meta(dp.xdp(&error).data);
    let outer = ETH_HLEN;
    assert_eq!(out[outer + 9], 4, "IPIP");
    assert_eq!(ipv4_at(&out, outer + 12), LB_BACK);
    assert!(
        HOSTS.contains(&ipv4_at(&out, outer + 16)),
        "to a backend host"
    );
    assert_eq!(
        &out[outer + IPV4_HLEN..],
        &error[ETH_HLEN..],
        "the error, unchanged, inside"
    );
}

#[test]
fn the_lbs_own_frag_needed_keeps_the_vlan_tag() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service("mode = \"dsr\""));
    let big = Packet::tcp(CLIENT, WEB)
        .with_payload(vec![b'x'; 1460])
        .with_vlan(ETH_P_8021Q, 9);
    let input = big.build();
    let out = dp.xdp(&input);
    assert_eq!(out.action, XDP_TX, "{}", xdp_action_name(out.action));
    let l3 = big.l3_off();
    let frame = &out.data;
    assert_eq!(&frame[12..l3], &input[12..l3], "the VLAN tag stays");
    assert_eq!(
        (&frame[..6], &frame[6..12]),
        (&input[6..12], &input[..6]),
        "MACs swapped"
    );
    assert_eq!(frame.len(), l3 + IPV4_HLEN + 8 + IPV4_HLEN + 8);
    assert_eq!((frame[l3 + IPV4_HLEN], frame[l3 + IPV4_HLEN + 1]), (3, 4));
    assert_valid_ip_and_icmp(frame, l3, "frag needed, tagged");
    assert_eq!(
        &frame[l3 + IPV4_HLEN + 8..],
        &input[l3..l3 + 28],
        "quotes the packet"
    );
}

/// An error a nat backend (or a router on its side) sends about a flow quotes the request
/// as the backend got it (to the backend's address): on its way out (TC egress, as replies)
/// it is turned back into one about the VIP, so the client's stack can match it to its
/// socket. An error about no flow of this LB is left alone.
#[test]
fn nat_turns_a_backends_error_about_a_flow_back_to_the_vip() {
    let backends: Vec<_> = HOSTS
        .iter()
        .map(|h| (SocketAddrV4::new(*h, 8080), 100))
        .collect();
    let dp = LoadedDatapath::new(&service_toml("web", WEB, "tcp", &backends));
    let syn = Packet::tcp(CLIENT, WEB).with_tcp_flags(TCP_SYN);
    let first = dp.xdp(&syn.build());
    let backend = SocketAddrV4::new(ipv4_at(&first.data, ETH_HLEN + 16), 8080);
    let as_received = Packet::tcp(CLIENT, backend).build();
    let as_sent = Packet::tcp(CLIENT, WEB).build();
    for (what, from, kind, code, mtu) in [
        ("port unreachable from the backend", *backend.ip(), 3, 3, 0),
        ("frag needed from a router", ROUTER, 3, 4, 1280),
        ("time exceeded from a router", ROUTER, 11, 0, 0),
    ] {
        let error = icmp_error_between(from, *CLIENT.ip(), kind, code, mtu, &as_received);
        let before = dp.reasons();
        let out = dp.tc_egress(&error);
        assert_eq!(
            out.action, TC_ACT_UNSPEC,
            "{what}: TC verdict {:#x}",
            out.action
        );
        // Built from scratch, checksums and all: what the client must get.
        let outer_src = if from == *backend.ip() { VIP } else { from };
        let expected = icmp_error_between(outer_src, *CLIENT.ip(), kind, code, mtu, &as_sent);
        assert_frame_eq(&expected, &out.data, what);
        assert_valid_ip_and_icmp(&out.data, ETH_HLEN, what);
        dp.reasons()
            .assert_moved(&before, &[(Reason::RevNat, 1)], what);
    }

    // About a packet to another backend, another port, or of no flow: untouched.
    let other_backend = HOSTS.iter().find(|h| **h != *backend.ip()).unwrap();
    for (what, quoted) in [
        (
            "another backend",
            Packet::tcp(CLIENT, SocketAddrV4::new(*other_backend, 8080)),
        ),
        (
            "another port",
            Packet::tcp(CLIENT, SocketAddrV4::new(*backend.ip(), 8081)),
        ),
        (
            "another client port",
            Packet::tcp(SocketAddrV4::new(*CLIENT.ip(), 1), backend),
        ),
        ("a UDP packet", Packet::udp(CLIENT, backend)),
    ] {
        let error = icmp_error_between(*backend.ip(), *CLIENT.ip(), 3, 3, 0, &quoted.build());
        let before = dp.reasons();
        let out = dp.tc_egress(&error);
        assert_eq!(out.action, TC_ACT_UNSPEC, "{what}");
        assert_frame_eq(&error, &out.data, what);
        dp.reasons().assert_moved(&before, &[], what);
    }
}

/// The other way in fullnat: an error a backend (or a router on its side) sends to the SNAT
/// address about a flow goes on to the flow's client, about the VIP: the quoted packet
/// becomes the client's own, and the backend's own error leaves from the VIP.
#[test]
fn fullnat_sends_a_backends_error_about_a_flow_on_to_its_client() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service("mode = \"fullnat\""));
    let first = strip_meta(
        dp.xdp(&Packet::tcp(CLIENT, WEB).with_tcp_flags(TCP_SYN).build())
            .data,
    );
    let l4 = ETH_HLEN + IPV4_HLEN;
    let snat = SocketAddrV4::new(ipv4_at(&first, ETH_HLEN + 12), be16(&first, l4));
    let backend = SocketAddrV4::new(ipv4_at(&first, ETH_HLEN + 16), be16(&first, l4 + 2));
    let as_received = Packet::tcp(snat, backend).build();
    let as_sent = Packet::tcp(CLIENT, WEB).build();
    for (what, from, kind, code, mtu) in [
        ("port unreachable from the backend", *backend.ip(), 3, 3, 0),
        ("frag needed from a router", ROUTER, 3, 4, 1280),
    ] {
        let error = icmp_error_between(from, *snat.ip(), kind, code, mtu, &as_received);
        let before = dp.reasons();
        let out = strip_meta(dp.xdp(&error).data);
        let outer_src = if from == *backend.ip() { VIP } else { from };
        assert_eq!(
            (ipv4_at(&out, ETH_HLEN + 12), ipv4_at(&out, ETH_HLEN + 16)),
            (outer_src, *CLIENT.ip()),
            "{what}: outer addresses"
        );
        // The ICMP message, quote and checksums as if built for the client from scratch.
        let expected = icmp_error_between(outer_src, *CLIENT.ip(), kind, code, mtu, &as_sent);
        assert_eq!(out[l4..], expected[l4..], "{what}: the ICMP message");
        assert_valid_ip_and_icmp(&out, ETH_HLEN, what);
        assert_eq!(
            dp.reasons().get(Reason::RevSnat) - before.get(Reason::RevSnat),
            1,
            "{what}"
        );
    }

    // About no reservation (another SNAT port): left to the kernel, untouched.
    let stray = Packet::tcp(SocketAddrV4::new(*snat.ip(), snat.port() ^ 1), backend).build();
    let error = icmp_error_between(*backend.ip(), *snat.ip(), 3, 3, 0, &stray);
    let out = dp.xdp(&error);
    assert_eq!((out.action, out.data), (XDP_PASS, error), "about no flow");
}

/// The TC balancer (`xdp_mode = "tc"`, mode nat) handles ICMP to a VIP as XDP does: it
/// answers echo (sent back out of the interface: a redirect) and hands errors about a flow
/// to the flow's backend, the same frames as XDP writes.
#[test]
fn the_tc_balancer_handles_icmp_as_xdp_does() {
    const TC_ACT_REDIRECT: u32 = 7;
    let backends: Vec<_> = HOSTS
        .iter()
        .map(|h| (SocketAddrV4::new(*h, 8080), 100))
        .collect();
    let dp = LoadedDatapath::new(&service_toml("web", WEB, "tcp", &backends));

    let echo = Packet::icmp_echo(*CLIENT.ip(), VIP).build();
    let before = dp.reasons();
    let tc = dp.tc_balance(&echo);
    assert_eq!(
        tc.action, TC_ACT_REDIRECT,
        "echo: TC verdict {:#x}",
        tc.action
    );
    dp.reasons()
        .assert_moved(&before, &[(Reason::IcmpEcho, 1)], "echo in TC");
    let xdp = dp.xdp(&echo);
    assert_eq!(xdp.action, XDP_TX);
    assert_frame_eq(&xdp.data, &tc.data, "echo reply");

    let syn = Packet::tcp(CLIENT, WEB).with_tcp_flags(TCP_SYN).build();
    let backend = ipv4_at(&dp.tc_balance(&syn).data, ETH_HLEN + 16);
    let error = icmp_error(3, 4, 1280, &reply_from_vip());
    let before = dp.reasons();
    let tc = dp.tc_balance(&error);
    assert_eq!(
        tc.action, TC_ACT_UNSPEC,
        "error: TC verdict {:#x}",
        tc.action
    );
    dp.reasons().assert_moved(
        &before,
        &[(Reason::IcmpToBackend, 1), (Reason::Forwarded, 1)],
        "error in TC",
    );
    assert_eq!(
        ipv4_at(&tc.data, ETH_HLEN + 16),
        backend,
        "to the flow's backend"
    );
    assert_frame_eq(&dp.xdp(&error).data, &tc.data, "error for the backend");
    assert_valid_ip_and_icmp(&tc.data, ETH_HLEN, "error in TC");

    // Not a VIP address: the kernel's.
    let other = Packet::icmp_echo(*CLIENT.ip(), ROUTER).build();
    let out = dp.tc_balance(&other);
    assert_eq!(
        (out.action, out.data),
        (TC_ACT_UNSPEC, other),
        "echo to another host"
    );
}
