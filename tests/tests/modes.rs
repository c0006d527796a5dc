//! Modes fullnat and dsr, and the dsr decapsulation, under BPF_PROG_TEST_RUN. These paths
//! ask the kernel's FIB for the next hop, so each test runs in a namespace of its own where
//! veth pairs stand for the links to the backends (10.99.4.0/24) and to the client
//! (10.99.1.0/24), with permanent neighbours.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{DecapCounter, GUE_PORT, Reason};
use xlb_tests::testrun::*;

#[path = "support/checksums.rs"]
mod checksums;
use checksums::verify_checksums;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 40000);
const IPV4_HLEN: usize = 20;
const ETH_HLEN: usize = 14;

#[path = "support/decap.rs"]
mod decap;
use decap::Decap;
#[path = "support/routed.rs"]
mod routed;
use routed::{HOSTS, LB_BACK, routed_namespace};

fn service(name: &str, port: u16, extra: &str, backend_port: u16) -> String {
    let mut s = format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\n{extra}\n\
         [service.health]\ntype = \"none\"\n"
    );
    for host in HOSTS {
        s += &format!("[[service.backend]]\naddress = \"{host}\"\nport = {backend_port}\n");
    }
    s
}

fn xdp(dp: &LoadedDatapath, input: &[u8]) -> RunResult {
    dp.xdp_unmarked(input)
}

/// (source, destination) of the TCP/UDP packet with its IPv4 header at `l3`.
fn endpoints(frame: &[u8], l3: usize) -> (SocketAddrV4, SocketAddrV4) {
    let l4 = l3 + IPV4_HLEN;
    (
        SocketAddrV4::new(ipv4_at(frame, l3 + IP_SADDR), be16(frame, l4)),
        SocketAddrV4::new(ipv4_at(frame, l3 + IP_DADDR), be16(frame, l4 + 2)),
    )
}

fn host_of(addr: Ipv4Addr) -> usize {
    HOSTS
        .iter()
        .position(|h| *h == addr)
        .unwrap_or_else(|| panic!("{addr} is not a host"))
}

#[test]
fn fullnat_rewrites_both_ends_and_translates_replies_back() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service("web", 81, "mode = \"fullnat\"", 8080));
    let request = Packet::tcp(CLIENT, SocketAddrV4::new(VIP, 81)).with_tcp_flags(TCP_SYN);
    let before = dp.reasons();
    let out = xdp(&dp, &request.build());
    // The neighbour is known but the device is no front NIC: TC sends it.
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    dp.reasons()
        .assert_moved(&before, &[(Reason::HandedToTc, 1)], "fullnat request");
    let l3 = request.l3_off();
    verify_checksums(&out.data, l3, "fullnat request");
    let (src, dst) = endpoints(&out.data, l3);
    assert_eq!(*src.ip(), LB_BACK, "SNAT to the FIB's source address");
    assert!(
        (1024..=32767).contains(&src.port()),
        "SNAT port {}",
        src.port()
    );
    assert_eq!(dst.port(), 8080);
    host_of(*dst.ip());
    // TTL went down by one, as a router's would.
    assert_eq!(out.data[l3 + 8], request.build()[l3 + 8] - 1);

    // The same flow keeps its SNAT port; the reply goes back to the client from the VIP.
    let again = xdp(&dp, &request.clone().with_tcp_flags(TCP_ACK).build());
    assert_eq!(be16(&again.data, l3 + IPV4_HLEN), src.port());
    let reply = Packet::tcp(dst, src).with_tcp_flags(TCP_SYN | TCP_ACK);
    let before = dp.reasons();
    let back = xdp(&dp, &reply.build());
    dp.reasons().assert_moved(
        &before,
        &[(Reason::RevSnat, 1), (Reason::HandedToTc, 1)],
        "fullnat reply",
    );
    verify_checksums(&back.data, l3, "fullnat reply");
    assert_eq!(ipv4_at(&back.data, l3 + IP_SADDR), VIP);
    assert_eq!(be16(&back.data, l3 + IPV4_HLEN), 81);
    assert_eq!(ipv4_at(&back.data, l3 + IP_DADDR), *CLIENT.ip());
    assert_eq!(be16(&back.data, l3 + IPV4_HLEN + 2), CLIENT.port());
    // The reservation is what the data path keeps per flow.
    let reservations = dp.datapath().snat_rev().expect("snat map");
    assert_eq!(reservations.len(), 1, "{reservations:?}");
}

#[test]
fn fullnat_gives_concurrent_flows_distinct_ports() {
    let _ns = routed_namespace();
    // One backend, so every flow competes for the same (address, backend) port space.
    let one = "[[service]]\nname = \"web\"\nvip = \"10.99.100.1\"\nport = 81\nmode = \"fullnat\"\n\
               [service.health]\ntype = \"none\"\n\
               [[service.backend]]\naddress = \"10.99.4.11\"\nport = 8080\n";
    let dp = LoadedDatapath::new(one);
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..2000u16 {
        let client = SocketAddrV4::new(*CLIENT.ip(), 20000 + i);
        let out = xdp(
            &dp,
            &Packet::tcp(client, SocketAddrV4::new(VIP, 81))
                .with_tcp_flags(TCP_SYN)
                .build(),
        );
        let l3 = ETH_HLEN;
        assert!(
            ports.insert(be16(&out.data, l3 + IPV4_HLEN)),
            "flow {i} got a port in use"
        );
    }
    assert_eq!(dp.reasons().get(Reason::DropSnatExhausted), 0);
}

#[test]
fn fullnat_translates_udp_both_ways() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service(
        "dns",
        53,
        "protocol = \"udp\"\nmode = \"fullnat\"",
        5353,
    ));
    let query = Packet::udp(CLIENT, SocketAddrV4::new(VIP, 53)).with_payload(&b"query"[..]);
    let out = xdp(&dp, &query.build());
    let l3 = query.l3_off();
    verify_checksums(&out.data, l3, "fullnat UDP request");
    let (src, dst) = endpoints(&out.data, l3);
    assert_eq!((*src.ip(), dst.port()), (LB_BACK, 5353));
    let answer = Packet::udp(dst, src).with_payload(&b"answer"[..]);
    let back = xdp(&dp, &answer.build());
    verify_checksums(&back.data, l3, "fullnat UDP reply");
    assert_eq!(ipv4_at(&back.data, l3 + IP_SADDR), VIP);
    assert_eq!(be16(&back.data, l3 + IPV4_HLEN), 53);
    assert_eq!(ipv4_at(&back.data, l3 + IP_DADDR), *CLIENT.ip());
    assert_eq!(be16(&back.data, l3 + IPV4_HLEN + 2), CLIENT.port());
}

#[test]
fn fullnat_out_of_ports_is_counted_not_blackholed() {
    use xlb::reconcile::Maps as _;
    let _ns = routed_namespace();
    let mut dp = LoadedDatapath::new(&service("web", 81, "mode = \"fullnat\"", 8080));
    // One port on one address: the second concurrent flow to a backend finds none.
    let id = dp.service_id("web");
    let mut value = dp.datapath().service(id).expect("service");
    value.snat = lb_common::SnatPool {
        port_min: 1024,
        port_max: 1024,
        ..Default::default()
    };
    dp.datapath_mut().grace_period().expect("grace");
    dp.datapath_mut().set_service(id, &value).expect("pool");
    let mut dropped = 0;
    for i in 0..20u16 {
        let client = SocketAddrV4::new(*CLIENT.ip(), 30000 + i);
        let before = dp.reasons();
        let out = xdp(
            &dp,
            &Packet::tcp(client, SocketAddrV4::new(VIP, 81))
                .with_tcp_flags(TCP_SYN)
                .build(),
        );
        if out.action == XDP_DROP {
            dp.reasons()
                .assert_moved(&before, &[(Reason::DropSnatExhausted, 1)], "no port left");
            dropped += 1;
        }
    }
    // Three backends, one port each: three flows got one, the others were refused.
    assert_eq!(dropped, 17);
}

/// Runs a dsr service's request and checks the encapsulation; returns the output frame.
fn encapsulated(gue: bool) -> (Vec<u8>, Vec<u8>) {
    let extra = if gue {
        "mode = \"dsr\"\nencap = \"gue\""
    } else {
        "mode = \"dsr\""
    };
    let dp = LoadedDatapath::new(&service("web", 80, extra, 80));
    let request = Packet::tcp(CLIENT, SocketAddrV4::new(VIP, 80)).with_payload(&b"GET /\n"[..]);
    let input = request.build();
    let out = xdp(&dp, &input);
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    let overhead = if gue { IPV4_HLEN + 8 } else { IPV4_HLEN };
    let inner = &input[ETH_HLEN..];
    assert_eq!(
        out.data.len(),
        ETH_HLEN + overhead + inner.len(),
        "outer headers added"
    );
    assert_eq!(be16(&out.data, 12), ETH_P_IP);
    // Handed to TC, which sends by the neighbour table: the frame keeps sane MACs.
    assert_eq!(&out.data[..12], &input[..12], "MACs kept");
    let outer = &out.data[ETH_HLEN..];
    assert_eq!(outer[0], 0x45);
    assert_eq!(outer[8], 64, "outer TTL");
    assert_eq!(outer[9], if gue { 17 } else { 4 }, "outer protocol");
    assert_eq!(
        be16(outer, 2) as usize,
        overhead + inner.len(),
        "outer total length"
    );
    assert_eq!(ipv4_at(outer, 12), LB_BACK, "outer source: the LB");
    host_of(ipv4_at(outer, 16));
    let header = etherparse::Ipv4Header::from_slice(outer)
        .expect("outer header")
        .0;
    assert_eq!(header.header_checksum, header.calc_header_checksum());
    if gue {
        let udp = &outer[IPV4_HLEN..];
        assert_eq!(be16(udp, 2), GUE_PORT);
        assert_eq!(be16(udp, 4) as usize, 8 + inner.len(), "UDP length");
        assert_eq!(be16(udp, 6), 0, "no outer UDP checksum");
        assert!(be16(udp, 0) >= 0xc000, "source port from the flow hash");
    }
    assert_eq!(&outer[overhead..], inner, "the client's packet, unchanged");
    (input, out.data)
}

#[test]
fn dsr_encapsulates_in_ipip_and_gue() {
    let _ns = routed_namespace();
    encapsulated(false);
    encapsulated(true);
}

#[test]
fn dsr_answers_what_would_not_fit_the_egress_mtu_with_icmp() {
    let _ns = routed_namespace();
    let dp = LoadedDatapath::new(&service("web", 80, "mode = \"dsr\"", 80));
    // 1500 bytes of IP: 1520 encapsulated, over the link's 1500.
    let full = Packet::tcp(CLIENT, SocketAddrV4::new(VIP, 80)).with_payload(vec![b'x'; 1460]);
    let input = full.build();
    let before = dp.reasons();
    let out = xdp(&dp, &input);
    assert_eq!(out.action, XDP_TX, "{}", xdp_action_name(out.action));
    dp.reasons()
        .assert_moved(&before, &[(Reason::FragNeeded, 1)], "too big, DF set");
    let frame = &out.data;
    assert_eq!(frame.len(), ETH_HLEN + IPV4_HLEN + 8 + IPV4_HLEN + 8);
    assert_eq!(
        (&frame[..6], &frame[6..12]),
        (&input[6..12], &input[..6]),
        "MACs swapped"
    );
    let ip = &frame[ETH_HLEN..];
    let header = etherparse::Ipv4Header::from_slice(ip).expect("IP header").0;
    assert_eq!(header.header_checksum, header.calc_header_checksum());
    assert_eq!(
        (ip[9], ipv4_at(ip, 12), ipv4_at(ip, 16)),
        (1, VIP, *CLIENT.ip())
    );
    let icmp = &ip[IPV4_HLEN..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(
        be16(icmp, 6),
        1500 - 20,
        "the MTU that fits once encapsulated"
    );
    assert_eq!(checksum(&[icmp]), 0, "ICMP checksum");
    assert_eq!(
        &icmp[8..],
        &input[ETH_HLEN..ETH_HLEN + 28],
        "quotes the client's packet"
    );

    // Without DF the sender allows fragmenting, which dsr does not do: dropped, counted.
    let fragmentable = full.with_frag(0).build();
    let before = dp.reasons();
    assert_eq!(xdp(&dp, &fragmentable).action, XDP_DROP);
    dp.reasons().assert_moved(
        &before,
        // Its flow's second packet that is no SYN: dsr sees no replies, so that proves it.
        &[(Reason::DropTooBig, 1), (Reason::Promoted, 1)],
        "too big, no DF",
    );
}

#[test]
fn decap_restores_the_client_packet_for_served_vips_only() {
    let _ns = routed_namespace();
    let decap = Decap::new(&[VIP.into()]);
    for gue in [false, true] {
        let (original, encapsulated) = encapsulated(gue);
        let (action, out) = decap.run(&encapsulated);
        assert_eq!(action, XDP_PASS);
        // MACs are the outer frame's (the hop to this host); the rest is the client's.
        assert_eq!(&out[..12], &encapsulated[..12]);
        assert_eq!(
            &out[12..],
            &original[12..],
            "gue={gue}: decapsulated packet"
        );
        verify_checksums(&out, ETH_HLEN, "decapsulated");
    }
    // A host that serves other VIPs leaves the packet alone.
    let other = Decap::new(&[Ipv4Addr::new(10, 99, 100, 9).into()]);
    let (_, encapsulated) = encapsulated(false);
    let (action, out) = other.run(&encapsulated);
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, encapsulated, "not ours: untouched");
    // Plain traffic too.
    let plain = Packet::tcp(CLIENT, SocketAddrV4::new(VIP, 80)).build();
    assert_eq!(decap.run(&plain).1, plain);
}

#[test]
fn decap_from_accepts_encapsulated_packets_only_from_the_lb() {
    let _ns = routed_namespace();
    let lb = ipnet::IpNet::from(std::net::IpAddr::from(LB_BACK));
    let decap = Decap::from(&[VIP.into()], &[lb]);
    for gue in [false, true] {
        let (original, encapsulated) = encapsulated(gue);
        let (action, out) = decap.run(&encapsulated);
        assert_eq!(action, XDP_PASS, "gue={gue}: from the LB");
        assert_eq!(&out[12..], &original[12..], "gue={gue}: decapsulated");

        // The same packet from another host: a forged client address, dropped.
        let mut forged = encapsulated.clone();
        forged[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&[10, 99, 4, 200]);
        let (action, _) = decap.run(&forged);
        assert_eq!(
            action,
            XDP_DROP,
            "gue={gue}: from another source: {}",
            xdp_action_name(action)
        );
    }
    assert_eq!(decap.counter(DecapCounter::Decapsulated), 2);
    assert_eq!(decap.counter(DecapCounter::RefusedSource), 2);
    // A prefix works as well as an address.
    let wide = Decap::from(&[VIP.into()], &["10.99.0.0/16".parse().unwrap()]);
    let (_, encapsulated) = encapsulated(false);
    assert_eq!(wide.run(&encapsulated).0, XDP_PASS);
    assert_eq!(wide.counter(DecapCounter::Decapsulated), 1);
}
