//! The data path under BPF_PROG_TEST_RUN: packet fixtures in, verdict, bytes and counters out
//! (katran's fixtures + testLbCounters). Services are provisioned through the reconciler,
//! as the agent does. Checksums of every rewritten packet are checked with etherparse, an
//! implementation independent of both the data path and the fixture builder.
//!
//! Needs root and BPF. Each test loads its own copy of the programs and maps under
//! /sys/fs/bpf/xlb-test-<pid>-<n>, removed on drop, so tests run in parallel.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use lb_common::{Counters, FlowKey, PROTO_TCP, Reason, VipKey, addr_words};
use xlb::{reconcile::Liveness, replyendpoints::ReplyEndpoints, state::Endpoint};
use xlb_tests::testrun::*;

#[path = "support/checksums.rs"]
mod checksums;
use checksums::{checksum_problem, verify_checksums};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
/// An address that is no VIP.
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);
const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, 53);
const WEB_BACKENDS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 11), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 12), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 13), 8080),
];
const DNS_BACKENDS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 11), 5353),
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 12), 5353),
    SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 13), 5353),
];

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

fn weighted(backends: &[SocketAddrV4], weight: u32) -> Vec<(SocketAddrV4, u32)> {
    backends.iter().map(|b| (*b, weight)).collect()
}

/// "web" (TCP VIP:80) and "dns" (UDP VIP:53), three backends each.
fn web_and_dns() -> String {
    service_toml("web", WEB, "tcp", &weighted(&WEB_BACKENDS, 100))
        + &service_toml("dns", DNS, "udp", &weighted(&DNS_BACKENDS, 100))
}

/// How a forwarded packet relates to conntrack, which decides the counters it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// First packet of a flow: new_flows +1.
    New,
    /// A flow conntrack already pins.
    Known,
    /// A flow whose backend is gone: Rehashed +1, and it counts as new on its new backend.
    Rehashed,
}

/// Runs `pkt` (addressed to a VIP of `service`) through XDP and checks everything a forward
/// must do: XDP_PASS; destination address and port now one of the service's backends, every
/// other byte as sent; IPv4 and L4 checksums valid; Forwarded (+ Rehashed) counted; service
/// and chosen backend counters moved by one packet of this size; other backends untouched.
/// Returns the backend.
fn forward(
    dp: &LoadedDatapath,
    what: &str,
    pkt: &Packet,
    service: &str,
    flow: Flow,
) -> SocketAddrV4 {
    let input = pkt.build();
    verify_checksums(
        &input,
        pkt.l3_off(),
        &format!("{what} (the fixture itself)"),
    );
    let service_id = dp.service_id(service);
    let backends = dp.backend_ids(service);
    let reasons_before = dp.reasons();
    let service_before = dp.service_counters(service_id);
    let backends_before: Vec<Counters> = backends
        .iter()
        .map(|(_, id)| dp.backend_counters(*id))
        .collect();

    let out = dp.xdp(&input);
    assert_eq!(
        out.action,
        XDP_PASS,
        "{what}: got {} instead of XDP_PASS (forward)\ninput:\n{}",
        xdp_action_name(out.action),
        hexdump(&input, usize::MAX)
    );
    assert_eq!(
        out.data.len(),
        input.len(),
        "{what}: the packet changed length"
    );
    let (l3, l4) = (pkt.l3_off(), pkt.l4_off());
    let chosen = SocketAddrV4::new(
        ipv4_at(&out.data, l3 + IP_DADDR),
        be16(&out.data, l4 + L4_DPORT),
    );
    let index = backends.iter().position(|(b, _)| *b == chosen).unwrap_or_else(|| {
        panic!("{what}: destination rewritten to {chosen}, not a backend of {service} ({backends:?})")
    });
    verify_checksums(&out.data, l3, what);
    assert_frame_eq(&pkt.clone().with_dst(chosen).build(), &out.data, what);

    let mut moved = vec![(Reason::Forwarded, 1)];
    if flow == Flow::Rehashed {
        moved.push((Reason::Rehashed, 1));
    }
    dp.reasons().assert_moved(&reasons_before, &moved, what);
    let one = Counters {
        packets: 1,
        bytes: input.len() as u64,
        new_flows: u64::from(flow != Flow::Known),
    };
    assert_counters_moved(
        &service_before,
        &dp.service_counters(service_id),
        &one,
        &format!("{what}: service {service}"),
    );
    for (i, ((backend, id), before)) in backends.iter().zip(&backends_before).enumerate() {
        let expected = if i == index { one } else { Counters::default() };
        assert_counters_moved(
            before,
            &dp.backend_counters(*id),
            &expected,
            &format!("{what}: backend {backend} (id {id})"),
        );
    }
    chosen
}

fn assert_counters_moved(before: &Counters, after: &Counters, expected: &Counters, what: &str) {
    let moved = Counters {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        new_flows: after.new_flows - before.new_flows,
    };
    assert_eq!(
        moved, *expected,
        "{what}: counters moved by {moved:?}, expected {expected:?}"
    );
}

/// Runs `input` through XDP and checks a verdict that leaves the packet alone: the action,
/// output identical to input, exactly `reason` counted, and no service counter moved.
fn untouched(dp: &LoadedDatapath, what: &str, input: &[u8], action: u32, reason: Reason) {
    let reasons_before = dp.reasons();
    let services: Vec<(String, u32, Counters)> = dp
        .service_ids()
        .into_iter()
        .map(|(name, id)| (name, id, dp.service_counters(id)))
        .collect();
    let out = dp.xdp(input);
    assert_eq!(
        out.action,
        action,
        "{what}: got {} instead of {} ({})\ninput:\n{}",
        xdp_action_name(out.action),
        xdp_action_name(action),
        reason.name(),
        hexdump(input, usize::MAX)
    );
    assert_frame_eq(input, &out.data, what);
    dp.reasons()
        .assert_moved(&reasons_before, &[(reason, 1)], what);
    for (name, id, before) in services {
        assert_counters_moved(
            &before,
            &dp.service_counters(id),
            &Counters::default(),
            &format!("{what}: service {name}"),
        );
    }
}

/// The conntrack key of a client -> VIP packet.
fn flow_key(pkt: &Packet) -> FlowKey {
    let (family, src) = addr_words(IpAddr::V4(pkt.src));
    let (_, dst) = addr_words(IpAddr::V4(pkt.dst));
    FlowKey {
        src,
        dst,
        src_port: pkt.src_sock().port().to_be(),
        dst_port: pkt.dst_sock().port().to_be(),
        proto: pkt.proto(),
        family,
        _pad: 0,
    }
}

/// Asserts that conntrack pins `pkt`'s flow to `backend` and that the reverse NAT entry for
/// the backend's replies names the VIP.
fn assert_pinned(
    dp: &LoadedDatapath,
    what: &str,
    pkt: &Packet,
    service: &str,
    backend: SocketAddrV4,
) {
    let key = flow_key(pkt);
    let conntrack = dp.datapath().conntrack().expect("reading conntrack");
    let flow = conntrack
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| {
            panic!(
                "{what}: no conntrack entry for {} -> {}",
                pkt.src_sock(),
                pkt.dst_sock()
            )
        })
        .1;
    assert_eq!(
        u32::from(flow.backend_id),
        dp.backend_id(service, backend),
        "{what}: conntrack backend id"
    );
    assert_eq!(
        u32::from(flow.service_id),
        dp.service_id(service),
        "{what}: conntrack service id"
    );

    let (_, backend_addr) = addr_words(IpAddr::V4(*backend.ip()));
    let reply = FlowKey {
        src: backend_addr,
        dst: key.src,
        src_port: backend.port().to_be(),
        dst_port: key.src_port,
        ..key
    };
    let rev_nat = dp.datapath().rev_nat().expect("reading rev nat");
    let Some((_, rev)) = rev_nat.iter().find(|(k, _)| *k == reply) else {
        // A new flow's replies may find it through its backend's endpoint instead.
        let endpoint = VipKey {
            addr: reply.src,
            port: reply.src_port,
            proto: reply.proto,
            family: reply.family,
        };
        let claims = ReplyEndpoints::open_pinned(dp.pin_path())
            .and_then(|e| e.claims())
            .expect("reading the reply endpoints");
        let embryonic = dp.datapath().flow_tables().flows_in(false).unwrap();
        assert!(
            claims.contains(&(endpoint, u32::from(flow.backend_id)))
                && embryonic.iter().any(|(k, _)| *k == key),
            "{what}: no reverse NAT entry for {backend} -> {}, and no claim of the endpoint \
             by a new flow's backend",
            pkt.src_sock()
        );
        return;
    };
    assert_eq!(
        (rev.vip, rev.vip_port),
        (key.dst, key.dst_port),
        "{what}: reverse NAT target"
    );
}

/// `pkt` with its IP id and first two payload bytes chosen so that, once `rewrite` has
/// been applied, both checksums come out of the one's complement sum 0xffff: an IPv4 header
/// checksum of 0x0000, a TCP checksum of 0x0000, and a UDP checksum of 0 that must be sent
/// as 0xffff. These are the edge cases of an incremental update.
fn with_extreme_checksums(pkt: &Packet, rewrite: impl Fn(Packet) -> Packet) -> Packet {
    let mut pkt = pkt.clone();
    pkt.payload.resize(pkt.payload.len().max(2), 0x5a);
    let l3 = pkt.l3_off();
    let l4_csum = pkt.l4_off()
        + if pkt.proto() == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
    // Each word enters its sum once: with it at 0 the sum is !c0, and c0 completes it to 0xffff.
    pkt.id = 0;
    pkt.id = be16(&rewrite(pkt.clone()).build(), l3 + IP_CSUM);
    pkt.payload[..2].copy_from_slice(&[0, 0]);
    let c0 = be16(&rewrite(pkt.clone()).build(), l4_csum);
    pkt.payload[..2].copy_from_slice(&c0.to_be_bytes());

    let after = rewrite(pkt.clone()).build();
    let want = if pkt.proto() == PROTO_TCP { 0 } else { 0xffff };
    assert_eq!(
        (be16(&after, l3 + IP_CSUM), be16(&after, l4_csum)),
        (0, want),
        "fixture: crafting extreme checksums failed"
    );
    pkt
}

/// The reply of `backend` to `client_side` (a client -> VIP fixture), for TC egress.
fn reply_to(client_side: &Packet, backend: SocketAddrV4) -> Packet {
    let mut reply = client_side
        .clone()
        .with_src(backend)
        .with_dst(client_side.src_sock());
    std::mem::swap(&mut reply.src_mac, &mut reply.dst_mac);
    if let L4::Tcp { flags, .. } = &mut reply.l4 {
        *flags = TCP_SYN | TCP_ACK;
    }
    reply
}

#[test]
fn tcp_to_vip_is_dnated_with_valid_checksums() {
    let dp = LoadedDatapath::new(&web_and_dns());

    let syn = Packet::tcp(client(40000), WEB).with_tcp_flags(TCP_SYN);
    let backend = forward(&dp, "TCP SYN", &syn, "web", Flow::New);
    assert_pinned(&dp, "TCP SYN", &syn, "web", backend);
    assert_eq!(
        forward(&dp, "TCP SYN retransmit", &syn, "web", Flow::Known),
        backend,
        "a retransmitted SYN changed backend"
    );

    // A mid-flow segment with no SYN (a flow taken over from another LB node) creates a flow.
    let mid = Packet::tcp(client(40001), WEB)
        .with_tcp_flags(TCP_ACK | TCP_PSH)
        .with_payload(*b"GET / HTTP/1.1\r\n\r\n!");
    let mid_backend = forward(&dp, "TCP mid-flow ACK|PSH", &mid, "web", Flow::New);
    assert_pinned(&dp, "TCP mid-flow ACK|PSH", &mid, "web", mid_backend);
    let fin = mid
        .clone()
        .with_tcp_flags(TCP_FIN | TCP_ACK)
        .with_payload(Vec::new());
    assert_eq!(
        forward(&dp, "TCP FIN", &fin, "web", Flow::Known),
        mid_backend
    );
    let rst = mid.clone().with_tcp_flags(TCP_RST).with_payload(Vec::new());
    assert_eq!(
        forward(&dp, "TCP RST", &rst, "web", Flow::Known),
        mid_backend
    );

    // Odd and even payload lengths, up to a large segment.
    for (i, len) in [1usize, 2, 3, 7, 64, 999, 1400].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
        let pkt = Packet::tcp(client(40100 + i as u16), WEB).with_payload(payload);
        forward(
            &dp,
            &format!("TCP with a {len}-byte payload"),
            &pkt,
            "web",
            Flow::New,
        );
    }

    // A SYN with the usual options (MSS, SACK permitted, timestamps, window scale).
    let syn_options = Packet::tcp(client(40300), WEB)
        .with_tcp_flags(TCP_SYN)
        .with_tcp_options([
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ]);
    forward(&dp, "TCP SYN with options", &syn_options, "web", Flow::New);

    // A rewrite whose correct IPv4 and TCP checksums are 0x0000.
    let probe = Packet::tcp(client(40200), WEB).with_payload(vec![0x11; 9]);
    let backend = forward(&dp, "TCP probe", &probe, "web", Flow::New);
    let extreme = with_extreme_checksums(&probe, |p| p.with_dst(backend));
    forward(
        &dp,
        "TCP rewrite to checksums 0x0000",
        &extreme,
        "web",
        Flow::Known,
    );

    // Nothing but Forwarded was counted, and nothing went to the UDP service.
    let reasons = dp.reasons();
    for reason in Reason::ALL {
        if reason != Reason::Forwarded {
            assert_eq!(reasons.get(reason), 0, "{} was counted", reason.name());
        }
    }
    assert_eq!(
        dp.service_counters(dp.service_id("dns")),
        Counters::default()
    );
}

#[test]
fn udp_to_vip_is_dnated_with_valid_checksums() {
    let dp = LoadedDatapath::new(&web_and_dns());

    for (i, len) in [0usize, 1, 3, 8, 17, 512, 1001].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|b| (b * 13 + i) as u8).collect();
        let pkt = Packet::udp(client(5000 + i as u16), DNS).with_payload(payload);
        let what = format!("UDP with a {len}-byte payload");
        let backend = forward(&dp, &what, &pkt, "dns", Flow::New);
        assert_pinned(&dp, &what, &pkt, "dns", backend);
        forward(&dp, &format!("{what}, again"), &pkt, "dns", Flow::Known);
    }

    // Checksum 0 means "none": it stays 0 (forward compares the whole frame).
    for len in [0usize, 5, 6] {
        let pkt = Packet::udp(client(5100 + len as u16), DNS)
            .with_payload(vec![0xc3; len])
            .without_udp_checksum();
        assert_eq!(be16(&pkt.build(), pkt.l4_off() + UDP_CSUM), 0);
        forward(
            &dp,
            &format!("UDP without checksum, {len}-byte payload"),
            &pkt,
            "dns",
            Flow::New,
        );
    }

    // A rewrite whose checksum computes to 0 must be sent as 0xffff, not as "no checksum".
    let probe = Packet::udp(client(5200), DNS).with_payload(vec![0x42; 11]);
    let backend = forward(&dp, "UDP probe", &probe, "dns", Flow::New);
    let extreme = with_extreme_checksums(&probe, |p| p.with_dst(backend));
    forward(
        &dp,
        "UDP rewrite to checksum 0 (sent as 0xffff)",
        &extreme,
        "dns",
        Flow::Known,
    );

    assert_eq!(
        dp.service_counters(dp.service_id("web")),
        Counters::default()
    );
}

#[test]
fn conntrack_pins_a_flow_and_spreads_new_ones() {
    let dp = LoadedDatapath::new(&web_and_dns());
    let web = dp.service_id("web");

    let pkt = Packet::tcp(client(33333), WEB).with_payload(*b"x");
    let first = forward(&dp, "flow packet 1", &pkt, "web", Flow::New);
    for n in 2..=20 {
        let backend = forward(&dp, &format!("flow packet {n}"), &pkt, "web", Flow::Known);
        assert_eq!(
            backend, first,
            "packet {n} of one flow went to another backend"
        );
    }
    let c = dp.service_counters(web);
    assert_eq!(
        (c.packets, c.new_flows),
        (20, 1),
        "one flow of 20 packets: {c:?}"
    );

    let mut per_backend: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    let flows = 300u16;
    for i in 0..flows {
        let pkt = Packet::tcp(client(20000 + i), WEB).with_tcp_flags(TCP_SYN);
        let backend = forward(
            &dp,
            &format!("SYN from port {}", 20000 + i),
            &pkt,
            "web",
            Flow::New,
        );
        *per_backend.entry(backend).or_default() += 1;
    }
    assert_eq!(
        per_backend.len(),
        3,
        "new flows did not reach every backend: {per_backend:?}"
    );
    for (backend, n) in &per_backend {
        assert!(
            *n >= usize::from(flows) / 6,
            "{backend} got only {n} of {flows} flows: {per_backend:?}"
        );
    }
    let c = dp.service_counters(web);
    assert_eq!((c.packets, c.new_flows), (20 + 300, 301), "{c:?}");
    let total: u64 = dp
        .backend_ids("web")
        .iter()
        .map(|(_, id)| dp.backend_counters(*id).new_flows)
        .sum();
    assert_eq!(total, 301, "backend new_flows must add up to the service's");
    assert_eq!(dp.datapath().conntrack().expect("conntrack").len(), 301);
}

#[test]
fn traffic_not_for_a_vip_passes_untouched() {
    let dp = LoadedDatapath::new(&web_and_dns());
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "TCP to the VIP address, another port",
            Packet::tcp(client(1000), SocketAddrV4::new(VIP, 81)).build(),
            Reason::PassNotVip,
        ),
        (
            "TCP to another address, the VIP port",
            Packet::tcp(client(1000), SocketAddrV4::new(OTHER, 80)).build(),
            Reason::PassNotVip,
        ),
        (
            "UDP to the TCP VIP",
            Packet::udp(client(1000), WEB).build(),
            Reason::PassNotVip,
        ),
        (
            "TCP to the UDP VIP",
            Packet::tcp(client(1000), DNS).build(),
            Reason::PassNotVip,
        ),
        (
            "TCP from a backend port to the client (a reply)",
            Packet::tcp(WEB_BACKENDS[0], client(1000)).build(),
            Reason::PassNotVip,
        ),
        (
            "IPv4 options, not to a VIP",
            Packet::tcp(client(1000), SocketAddrV4::new(OTHER, 80))
                .with_options([1, 1, 1, 0])
                .build(),
            Reason::PassNotVip,
        ),
        (
            "ICMP echo to an address that is no VIP",
            Packet::icmp_echo(CLIENT, OTHER).build(),
            Reason::PassNotL4,
        ),
        (
            "GRE to the VIP",
            Packet::other(CLIENT, VIP, 47)
                .with_payload([0u8; 8])
                .build(),
            Reason::PassNotL4,
        ),
        (
            "SCTP to the VIP",
            Packet::other(CLIENT, VIP, 132)
                .with_payload([0u8; 12])
                .build(),
            Reason::PassNotL4,
        ),
        (
            "ARP request for the VIP",
            arp_request(CLIENT, VIP),
            Reason::PassNotIp,
        ),
        (
            "IPv6 TCP SYN to no VIP address",
            ipv6_tcp_syn(80),
            Reason::PassNotVip,
        ),
        (
            "LLDP",
            {
                let mut f = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e, 2, 0, 0, 0, 0, 2, 0x88, 0xcc];
                f.resize(60, 0);
                f
            },
            Reason::PassNotIp,
        ),
        (
            "bare Ethernet header",
            arp_request(CLIENT, VIP)[..14].to_vec(),
            Reason::PassNotIp,
        ),
    ];
    for (what, input, reason) in &cases {
        untouched(&dp, what, input, XDP_PASS, *reason);
    }
    assert!(
        dp.datapath().conntrack().expect("conntrack").is_empty(),
        "passed traffic created flows"
    );
}

#[test]
fn vlan_tagged_vip_packets() {
    let dp = LoadedDatapath::new(&web_and_dns());

    let tcp = Packet::tcp(client(41000), WEB)
        .with_vlan(ETH_P_8021Q, 100)
        .with_tcp_flags(TCP_SYN);
    let backend = forward(&dp, "802.1Q TCP SYN", &tcp, "web", Flow::New);
    assert_pinned(&dp, "802.1Q TCP SYN", &tcp, "web", backend);
    let tcp = tcp.with_tcp_flags(TCP_ACK).with_payload(*b"abc");
    assert_eq!(
        forward(&dp, "802.1Q TCP data", &tcp, "web", Flow::Known),
        backend
    );

    let udp = Packet::udp(client(41001), DNS)
        .with_vlan(ETH_P_8021Q, 0x2fff)
        .with_payload(*b"query");
    forward(&dp, "802.1Q UDP", &udp, "dns", Flow::New);
    let udp = Packet::udp(client(41002), DNS)
        .with_vlan(ETH_P_8021Q, 7)
        .with_payload(*b"q")
        .without_udp_checksum();
    forward(&dp, "802.1Q UDP without checksum", &udp, "dns", Flow::New);
    // The parser takes an 802.1ad S-tag as the one tag too.
    let s_tagged = Packet::tcp(client(41003), WEB).with_vlan(ETH_P_8021AD, 200);
    forward(
        &dp,
        "802.1ad single-tagged TCP",
        &s_tagged,
        "web",
        Flow::New,
    );

    // More than one tag: not parsed, passed untouched.
    let qinq = Packet::tcp(client(41004), WEB)
        .with_vlan(ETH_P_8021AD, 10)
        .with_vlan(ETH_P_8021Q, 20)
        .build();
    untouched(
        &dp,
        "QinQ (802.1ad + 802.1Q) to the VIP",
        &qinq,
        XDP_PASS,
        Reason::PassNotIp,
    );
    let double_q = Packet::udp(client(41005), DNS)
        .with_vlan(ETH_P_8021Q, 10)
        .with_vlan(ETH_P_8021Q, 20)
        .build();
    untouched(
        &dp,
        "two 802.1Q tags to the VIP",
        &double_q,
        XDP_PASS,
        Reason::PassNotIp,
    );
    // A tag whose inner ethertype is cut off.
    let cut = Packet::tcp(client(41006), WEB)
        .with_vlan(ETH_P_8021Q, 5)
        .build();
    for len in 14..18 {
        untouched(
            &dp,
            &format!("802.1Q frame cut to {len} bytes"),
            &cut[..len],
            XDP_PASS,
            Reason::PassNotIp,
        );
    }
    let ipv6 = {
        let plain = ipv6_tcp_syn(80);
        let mut f = plain[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        f.extend_from_slice(&plain[12..]);
        f
    };
    untouched(&dp, "802.1Q IPv6", &ipv6, XDP_PASS, Reason::PassNotVip);
}

#[test]
fn malformed_packets_get_the_documented_verdict() {
    let dp = LoadedDatapath::new(&web_and_dns());
    let drop =
        |what: &str, input: &[u8]| untouched(&dp, what, input, XDP_DROP, Reason::DropMalformed);

    let tcp = Packet::tcp(client(42000), WEB).with_payload(*b"0123456789");
    let udp = Packet::udp(client(42001), DNS).with_payload(*b"012345678");
    let tagged = Packet::tcp(client(42002), WEB)
        .with_vlan(ETH_P_8021Q, 9)
        .with_payload(*b"01234");

    // Every truncation from a bare Ethernet header up to one byte short.
    for (name, pkt) in [("TCP", &tcp), ("UDP", &udp), ("802.1Q TCP", &tagged)] {
        let full = pkt.build();
        for len in 14..full.len() {
            let what = format!("{name} to the VIP cut to {len} of {} bytes", full.len());
            if len < pkt.l3_off() {
                // The VLAN header itself is cut: not recognisable as IP.
                untouched(&dp, &what, &full[..len], XDP_PASS, Reason::PassNotIp);
            } else if len < pkt.l3_off() + 20 {
                // No destination address to tell whether it is ours: the kernel's call.
                untouched(&dp, &what, &full[..len], XDP_PASS, Reason::PassMalformed);
            } else {
                drop(&what, &full[..len]);
            }
        }
    }
    // The full ones still go through, and only now create flows.
    assert!(dp.datapath().conntrack().expect("conntrack").is_empty());
    forward(&dp, "TCP fixture uncut", &tcp, "web", Flow::New);
    forward(&dp, "UDP fixture uncut", &udp, "dns", Flow::New);
    forward(&dp, "802.1Q fixture uncut", &tagged, "web", Flow::New);

    // A consistent IPv4 packet whose L4 header is cut short, bare or padded to 60 bytes.
    for (name, pkt, header) in [("TCP", &tcp, 20), ("UDP", &udp, 8)] {
        for l4_len in 0..header {
            for pad in [false, true] {
                let mut f = pkt.build();
                let l3 = pkt.l3_off();
                put_be16(&mut f, l3 + IP_TOT_LEN, (20 + l4_len) as u16);
                fix_ip_checksum(&mut f, l3);
                f.truncate(l3 + 20 + l4_len);
                if pad {
                    f.resize(f.len().max(60), 0);
                }
                drop(
                    &format!("{name} header of {l4_len} bytes (padded: {pad})"),
                    &f,
                );
            }
        }
    }

    let l3 = tcp.l3_off();
    let l4 = tcp.l4_off();
    let edit = |pkt: &Packet, f: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = pkt.build();
        f(&mut frame);
        frame
    };
    for version in [0u8, 5, 6, 15] {
        let f = edit(&tcp, &|f| {
            f[l3] = (version << 4) | 5;
            fix_ip_checksum(f, l3);
        });
        drop(&format!("IP version {version} in an IPv4 frame"), &f);
    }
    for ihl in 0u8..5 {
        let f = edit(&tcp, &|f| f[l3] = 0x40 | ihl);
        drop(&format!("IHL {ihl}"), &f);
    }
    // IHL 15 (60 bytes) on a 20-byte header: past the total length, then past the frame.
    drop("IHL 15, total length 50", &edit(&tcp, &|f| f[l3] = 0x4f));
    drop(
        "IHL 15, total length 80",
        &edit(&tcp, &|f| {
            f[l3] = 0x4f;
            put_be16(f, l3 + IP_TOT_LEN, 80);
            fix_ip_checksum(f, l3);
        }),
    );
    // IHL 15 with a total length that ends exactly at the options: no room for ports.
    drop(
        "IHL 15, total length 60",
        &edit(&tcp, &|f| {
            f[l3] = 0x4f;
            put_be16(f, l3 + IP_TOT_LEN, 60);
            fix_ip_checksum(f, l3);
            f.resize(l3 + 60, 0);
        }),
    );
    let ip_len = tcp.ip_len() as u16;
    for tot_len in [0, 19, 20, ip_len + 1, ip_len + 100, 0xffff] {
        let f = edit(&tcp, &|f| {
            put_be16(f, l3 + IP_TOT_LEN, tot_len);
            fix_ip_checksum(f, l3);
        });
        drop(
            &format!("TCP with total length {tot_len} in a {ip_len}-byte packet"),
            &f,
        );
    }
    let ulen = udp.ip_len() as u16;
    let ul3 = udp.l3_off();
    let f = edit(&udp, &|f| {
        put_be16(f, ul3 + IP_TOT_LEN, ulen + 1);
        fix_ip_checksum(f, ul3);
    });
    drop("UDP with total length one past the frame", &f);

    for doff in [0u8, 1, 4] {
        let f = edit(&tcp, &|f| f[l4 + TCP_DOFF] = doff << 4);
        drop(&format!("TCP data offset {doff}"), &f);
    }
    // 10 bytes of payload: a data offset of 8 (32 bytes) or more runs past the segment.
    for doff in [8u8, 15] {
        let f = edit(&tcp, &|f| f[l4 + TCP_DOFF] = doff << 4);
        drop(&format!("TCP data offset {doff} past the segment"), &f);
    }
    let ul4 = udp.l4_off();
    let seg = (udp.ip_len() - 20) as u16;
    for len in [0u16, 1, 7, seg + 1, 0xffff] {
        let f = edit(&udp, &|f| put_be16(f, ul4 + UDP_LEN, len));
        drop(&format!("UDP length {len} in a {seg}-byte segment"), &f);
    }

    // The same breakage addressed to an address that is not a VIP is not ours: passed
    // untouched for the kernel to judge.
    let other: SocketAddrV4 = "10.99.9.9:80".parse().expect("addr");
    let stranger = Packet::tcp(client(42200), other).with_payload(*b"0123456789");
    let sl3 = stranger.l3_off();
    let sl4 = stranger.l4_off();
    let full = stranger.build();
    let pass =
        |what: &str, input: &[u8]| untouched(&dp, what, input, XDP_PASS, Reason::PassMalformed);
    pass("TCP not to a VIP, cut in the TCP header", &full[..sl4 + 10]);
    pass(
        "TCP not to a VIP, IHL 4",
        &edit(&stranger, &|f| f[sl3] = 0x44),
    );
    pass(
        "TCP not to a VIP, data offset 1",
        &edit(&stranger, &|f| f[sl4 + TCP_DOFF] = 1 << 4),
    );
    pass(
        "TCP not to a VIP, total length past the frame",
        &edit(&stranger, &|f| {
            put_be16(f, sl3 + IP_TOT_LEN, 0xffff);
            fix_ip_checksum(f, sl3);
        }),
    );

    // Ethernet padding after a short IPv4 packet is not part of it: forwarded, left as is.
    let padded = Packet::tcp(client(42100), WEB)
        .with_tcp_flags(TCP_SYN)
        .with_padding(6);
    assert_eq!(padded.build().len(), 60);
    forward(&dp, "TCP SYN padded to 60 bytes", &padded, "web", Flow::New);
    let padded = Packet::udp(client(42101), DNS)
        .with_payload(*b"z")
        .with_padding(17);
    assert_eq!(padded.build().len(), 60);
    forward(&dp, "UDP padded to 60 bytes", &padded, "dns", Flow::New);
    let padded = Packet::udp(client(42102), DNS)
        .without_udp_checksum()
        .with_padding(18);
    forward(
        &dp,
        "UDP without checksum padded to 60 bytes",
        &padded,
        "dns",
        Flow::New,
    );
    let padded = Packet::tcp(client(42103), WEB)
        .with_vlan(ETH_P_8021Q, 3)
        .with_payload(*b"p")
        .with_padding(3);
    forward(&dp, "802.1Q TCP with padding", &padded, "web", Flow::New);
}

/// Recomputes the IPv4 header checksum in place (for fixtures with a changed header field).
fn fix_ip_checksum(frame: &mut [u8], l3: usize) {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    put_be16(frame, l3 + IP_CSUM, 0);
    let end = (l3 + ihl.max(20)).min(frame.len());
    let check = checksum(&[&frame[l3..end]]);
    put_be16(frame, l3 + IP_CSUM, check);
}

#[test]
fn fragments_and_ip_options() {
    let mut dp = LoadedDatapath::new(&web_and_dns());
    let tcp = Packet::tcp(client(43000), WEB).with_payload(*b"fragment");
    let udp = Packet::udp(client(43001), DNS).with_payload(*b"fragment");

    for (name, frag) in [
        ("MF, offset 0", IP_MF),
        ("MF + DF, offset 0", IP_MF | IP_DF),
        ("offset 185, last", 185),
        ("MF, offset 1", IP_MF | 1),
        ("offset 8191 (largest)", 0x1fff),
    ] {
        let what = format!("TCP fragment ({name}) to the VIP");
        untouched(
            &dp,
            &what,
            &tcp.clone().with_frag(frag).build(),
            XDP_DROP,
            Reason::DropFragment,
        );
        let what = format!("UDP fragment ({name}) to the VIP");
        untouched(
            &dp,
            &what,
            &udp.clone().with_frag(frag).build(),
            XDP_DROP,
            Reason::DropFragment,
        );
        // Fragments carry no ports: the VIP address alone decides.
        let other_port = udp
            .clone()
            .with_dst(SocketAddrV4::new(VIP, 9999))
            .with_frag(frag);
        let what = format!("UDP fragment ({name}) to the VIP address, a port without service");
        untouched(
            &dp,
            &what,
            &other_port.build(),
            XDP_DROP,
            Reason::DropFragment,
        );
        let elsewhere = tcp
            .clone()
            .with_dst(SocketAddrV4::new(OTHER, 80))
            .with_frag(frag);
        let what = format!("TCP fragment ({name}) to another address");
        untouched(
            &dp,
            &what,
            &elsewhere.build(),
            XDP_PASS,
            Reason::PassFragment,
        );
        let elsewhere = udp
            .clone()
            .with_dst(SocketAddrV4::new(OTHER, 53))
            .with_frag(frag);
        let what = format!("UDP fragment ({name}) to another address");
        untouched(
            &dp,
            &what,
            &elsewhere.build(),
            XDP_PASS,
            Reason::PassFragment,
        );
    }
    // Without MF or an offset a packet is whole, DF or not.
    forward(
        &dp,
        "TCP without DF",
        &tcp.clone().with_frag(0),
        "web",
        Flow::New,
    );
    forward(
        &dp,
        "UDP with DF",
        &udp.clone().with_frag(IP_DF),
        "dns",
        Flow::New,
    );

    for (name, options) in [
        ("IHL 6 (NOPs + EOL)", vec![1, 1, 1, 0]),
        (
            "IHL 7 (router alert + EOL)",
            vec![0x94, 4, 0, 0, 0, 0, 0, 0],
        ),
        ("IHL 15 (40 bytes)", vec![1; 40]),
    ] {
        let what = format!("TCP with IP options {name} to the VIP");
        let pkt = tcp.clone().with_options(options.clone());
        untouched(&dp, &what, &pkt.build(), XDP_DROP, Reason::DropIpOptions);
        let what = format!("UDP with IP options {name} to the VIP");
        let pkt = udp.clone().with_options(options);
        untouched(&dp, &what, &pkt.build(), XDP_DROP, Reason::DropIpOptions);
    }
    assert_eq!(dp.datapath().conntrack().expect("conntrack").len(), 2);

    // The VIP address stays while any service uses it, and goes with the last one.
    let udp_fragment = udp.clone().with_frag(IP_MF).build();
    dp.apply(&service_toml(
        "web",
        WEB,
        "tcp",
        &weighted(&WEB_BACKENDS, 100),
    ));
    untouched(
        &dp,
        "UDP fragment to the VIP, only the TCP service left",
        &udp_fragment,
        XDP_DROP,
        Reason::DropFragment,
    );
    untouched(
        &dp,
        "UDP to the removed UDP service",
        &udp.build(),
        XDP_PASS,
        Reason::PassNotVip,
    );
    dp.apply("");
    untouched(
        &dp,
        "UDP fragment to a former VIP",
        &udp_fragment,
        XDP_PASS,
        Reason::PassFragment,
    );
    untouched(
        &dp,
        "TCP to a former VIP",
        &tcp.build(),
        XDP_PASS,
        Reason::PassNotVip,
    );
}

#[test]
fn a_service_without_backends_drops() {
    let empty = SocketAddrV4::new(VIP, 8443);
    let config = |web: &[(SocketAddrV4, u32)]| {
        service_toml("web", WEB, "tcp", web) + &service_toml("empty", empty, "tcp", &[])
    };
    let mut dp = LoadedDatapath::new(&config(&weighted(&WEB_BACKENDS, 100)));

    let syn = Packet::tcp(client(44000), empty).with_tcp_flags(TCP_SYN);
    untouched(
        &dp,
        "SYN to a service declared without backends",
        &syn.build(),
        XDP_DROP,
        Reason::DropNoBackend,
    );
    assert_eq!(
        dp.service_counters(dp.service_id("empty")),
        Counters::default()
    );

    let established = Packet::tcp(client(44001), WEB);
    let backend = forward(
        &dp,
        "flow before the change",
        &established,
        "web",
        Flow::New,
    );

    // Every backend drained: no new flow has a backend, established flows stay.
    dp.apply(&config(&weighted(&WEB_BACKENDS, 0)));
    let fresh = Packet::tcp(client(44002), WEB).with_tcp_flags(TCP_SYN);
    untouched(
        &dp,
        "new flow, every backend drained",
        &fresh.build(),
        XDP_DROP,
        Reason::DropNoBackend,
    );
    assert_eq!(
        forward(
            &dp,
            "established flow, every backend drained",
            &established,
            "web",
            Flow::Known
        ),
        backend
    );

    // Every backend removed: the established flow loses its backend too.
    dp.apply(&config(&[]));
    untouched(
        &dp,
        "new flow, every backend removed",
        &fresh.build(),
        XDP_DROP,
        Reason::DropNoBackend,
    );
    let before = dp.reasons();
    let out = dp.xdp(&established.build());
    assert_eq!(
        out.action,
        XDP_DROP,
        "established flow, every backend removed: {}",
        xdp_action_name(out.action)
    );
    assert_frame_eq(
        &established.build(),
        &out.data,
        "established flow, every backend removed",
    );
    dp.reasons().assert_moved(
        &before,
        &[(Reason::Rehashed, 1), (Reason::DropNoBackend, 1)],
        "established flow, every backend removed",
    );

    // Backends back: traffic flows again.
    dp.apply(&config(&weighted(&WEB_BACKENDS, 100)));
    forward(&dp, "new flow, backends back", &fresh, "web", Flow::New);
}

#[test]
fn tc_egress_restores_the_vip_on_replies() {
    let dp = LoadedDatapath::new(&web_and_dns());

    type Shape = fn(Packet) -> Packet;
    let same: Shape = |p| p;
    let cases: [(&str, Packet, &str, Shape); 8] = [
        (
            "TCP",
            Packet::tcp(client(45000), WEB).with_tcp_flags(TCP_SYN),
            "web",
            same,
        ),
        (
            "TCP, 802.1Q",
            Packet::tcp(client(45001), WEB).with_vlan(ETH_P_8021Q, 4),
            "web",
            same,
        ),
        ("TCP, padded", Packet::tcp(client(45002), WEB), "web", |p| {
            p.with_payload(Vec::new()).with_padding(6)
        }),
        (
            "TCP, IP options",
            Packet::tcp(client(45003), WEB),
            "web",
            |p| p.with_options([1, 1, 1, 0]),
        ),
        (
            "UDP",
            Packet::udp(client(45004), DNS).with_payload(*b"odd"),
            "dns",
            same,
        ),
        (
            "UDP, no checksum",
            Packet::udp(client(45005), DNS).without_udp_checksum(),
            "dns",
            same,
        ),
        (
            "TCP, checksums 0 after",
            Packet::tcp(client(45006), WEB),
            "web",
            same,
        ),
        (
            "UDP, checksum 0xffff after",
            Packet::udp(client(45007), DNS),
            "dns",
            same,
        ),
    ];
    for (name, request, service, shape) in cases {
        let backend = forward(
            &dp,
            &format!("{name} request"),
            &request,
            service,
            Flow::New,
        );
        let vip = request.dst_sock();
        let mut reply = shape(reply_to(&request, backend).with_payload(*b"reply payload"));
        if name.contains("after") {
            reply = with_extreme_checksums(&reply, |p| p.with_src(vip));
        }
        let input = reply.build();
        verify_checksums(
            &input,
            reply.l3_off(),
            &format!("{name} reply (the fixture itself)"),
        );
        let before = dp.reasons();
        let out = dp.tc_egress(&input);
        let what = format!("{name} reply from {backend}");
        assert_eq!(
            out.action, TC_ACT_UNSPEC,
            "{what}: TC verdict {:#x}",
            out.action
        );
        verify_checksums(&out.data, reply.l3_off(), &what);
        assert_frame_eq(&reply.clone().with_src(vip).build(), &out.data, &what);
        dp.reasons()
            .assert_moved(&before, &[(Reason::RevNat, 1)], &what);

        // The same reply from another backend, to another client port, or of the other
        // protocol matches no flow: untouched.
        let other_backend = WEB_BACKENDS
            .iter()
            .chain(&DNS_BACKENDS)
            .find(|b| b.ip() != backend.ip());
        let stray = [
            (
                "from another backend",
                reply.clone().with_src(*other_backend.expect("backend")),
            ),
            ("to another client port", reply.clone().with_dst(client(1))),
            (
                "from another port",
                reply.clone().with_src(SocketAddrV4::new(*backend.ip(), 1)),
            ),
        ];
        for (how, stray) in stray {
            let input = stray.build();
            let before = dp.reasons();
            let out = dp.tc_egress(&input);
            let what = format!("{name} reply {how}");
            assert_eq!(
                out.action, TC_ACT_UNSPEC,
                "{what}: TC verdict {:#x}",
                out.action
            );
            assert_frame_eq(&input, &out.data, &what);
            dp.reasons().assert_moved(&before, &[], &what);
        }
    }

    // Not a reply at all.
    let client_side = Packet::tcp(client(45000), WEB)
        .with_tcp_flags(TCP_SYN)
        .build();
    for (what, input) in [
        ("a client packet to the VIP", client_side.clone()),
        ("ARP", arp_request(VIP, CLIENT)),
        ("IPv6", ipv6_tcp_syn(80)),
        // (The kernel refuses skb test runs of IPv4 frames shorter than an IPv4 header.)
        (
            "a frame cut inside the TCP header",
            client_side[..38].to_vec(),
        ),
    ] {
        let before = dp.reasons();
        let out = dp.tc_egress(&input);
        assert_eq!(
            out.action, TC_ACT_UNSPEC,
            "{what}: TC verdict {:#x}",
            out.action
        );
        assert_frame_eq(&input, &out.data, what);
        dp.reasons().assert_moved(&before, &[], what);
    }
}

#[test]
fn rehash_moves_flows_off_removed_backends_but_not_drained_ones() {
    let [a, b, c] = WEB_BACKENDS;
    let mut dp = LoadedDatapath::new(&service_toml(
        "web",
        WEB,
        "tcp",
        &weighted(&WEB_BACKENDS, 100),
    ));

    // Flows until each backend has at least two.
    let mut flows: Vec<(Packet, SocketAddrV4)> = Vec::new();
    for port in 46000u16.. {
        let pkt = Packet::tcp(client(port), WEB).with_payload(*b"data");
        let backend = forward(
            &dp,
            &format!("flow from port {port}"),
            &pkt,
            "web",
            Flow::New,
        );
        flows.push((pkt, backend));
        if [a, b, c]
            .iter()
            .all(|x| flows.iter().filter(|(_, y)| y == x).count() >= 2)
        {
            break;
        }
        assert!(port < 46200, "200 flows did not reach every backend");
    }

    // Drain c (weight 0): its flows stay, no new flow goes there.
    dp.apply(&service_toml(
        "web",
        WEB,
        "tcp",
        &[(a, 100), (b, 100), (c, 0)],
    ));
    for (pkt, backend) in &flows {
        let what = format!("flow {} on {backend} after draining {c}", pkt.src_sock());
        assert_eq!(
            forward(&dp, &what, pkt, "web", Flow::Known),
            *backend,
            "{what} moved"
        );
    }
    for port in 47000u16..47100 {
        let pkt = Packet::tcp(client(port), WEB).with_tcp_flags(TCP_SYN);
        let what = format!("new flow from port {port} after draining {c}");
        assert_ne!(
            forward(&dp, &what, &pkt, "web", Flow::New),
            c,
            "{what} went to the drained backend"
        );
    }

    // Remove b (c still drained): b's flows are re-hashed, and a is the only choice left.
    dp.apply(&service_toml("web", WEB, "tcp", &[(a, 100), (c, 0)]));
    for (pkt, backend) in &flows {
        let what = format!("flow {} on {backend} after removing {b}", pkt.src_sock());
        if *backend == b {
            let moved = forward(&dp, &what, pkt, "web", Flow::Rehashed);
            assert_eq!(moved, a, "{what}: re-hashed to {moved}");
            assert_pinned(&dp, &what, pkt, "web", a);
            let again = format!("{what}, next packet");
            assert_eq!(forward(&dp, &again, pkt, "web", Flow::Known), a, "{again}");
        } else {
            assert_eq!(
                forward(&dp, &what, pkt, "web", Flow::Known),
                *backend,
                "{what} moved"
            );
        }
    }
}

/// Health: every backend alive except the listed ones.
struct DeadSet(Vec<SocketAddrV4>);

impl Liveness for DeadSet {
    fn is_alive(&self, _service: &str, endpoint: &Endpoint) -> bool {
        !self
            .0
            .iter()
            .any(|d| IpAddr::V4(*d.ip()) == endpoint.addr && d.port() == endpoint.port)
    }
}

#[test]
fn flows_of_a_dead_backend_are_rehashed() {
    let [a, _, _] = WEB_BACKENDS;
    let services = service_toml("web", WEB, "tcp", &weighted(&WEB_BACKENDS, 100));
    let mut dp = LoadedDatapath::new(&services);

    let mut flows: Vec<(Packet, SocketAddrV4)> = Vec::new();
    for port in 48000u16..48060 {
        let pkt = Packet::tcp(client(port), WEB);
        let backend = forward(
            &dp,
            &format!("flow from port {port}"),
            &pkt,
            "web",
            Flow::New,
        );
        flows.push((pkt, backend));
    }
    assert!(flows.iter().any(|(_, b)| *b == a), "no flow reached {a}");

    dp.apply_with(&services, &DeadSet(vec![a]));
    for (pkt, backend) in &mut flows {
        let what = format!("flow {} on {backend} after {a} failed", pkt.src_sock());
        if *backend == a {
            let moved = forward(&dp, &what, pkt, "web", Flow::Rehashed);
            assert_ne!(moved, a, "{what}: stayed on the dead backend");
            *backend = moved;
        } else {
            assert_eq!(
                forward(&dp, &what, pkt, "web", Flow::Known),
                *backend,
                "{what} moved"
            );
        }
    }

    // a comes back: established flows keep the backend they have now.
    dp.apply(&services);
    for (pkt, backend) in &flows {
        let what = format!("flow {} on {backend} after {a} recovered", pkt.src_sock());
        assert_eq!(
            forward(&dp, &what, pkt, "web", Flow::Known),
            *backend,
            "{what} moved"
        );
    }
}

/// The checksum checker itself must catch a wrong checksum (it is what makes the forward
/// tests mean anything). No BPF needed.
#[test]
fn checksum_checker_rejects_corrupted_packets() {
    for pkt in [
        Packet::tcp(client(1), WEB).with_payload(*b"abc"),
        Packet::udp(client(1), DNS).with_payload(*b"abc"),
        Packet::udp(client(1), DNS)
            .with_vlan(ETH_P_8021Q, 1)
            .with_padding(4),
    ] {
        let good = pkt.build();
        assert_eq!(
            checksum_problem(&good, pkt.l3_off()),
            Ok(()),
            "builder output {pkt:?}"
        );
        let l4_csum = pkt.l4_off()
            + if pkt.proto() == PROTO_TCP {
                TCP_CSUM
            } else {
                UDP_CSUM
            };
        for at in [
            pkt.l3_off() + IP_CSUM,
            pkt.l3_off() + IP_DADDR + 3,
            l4_csum,
            pkt.l4_off() + L4_DPORT,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            assert!(
                checksum_problem(&bad, pkt.l3_off()).is_err(),
                "a flipped bit at {at} went unnoticed"
            );
        }
    }
}

/// Runs one flow with every value of the IPv4 id and of a payload word, so that the input
/// IPv4 and L4 checksums take every one of their 65536 values: each carry case of the
/// incremental updates comes up (a one's complement sum folded once too few, say).
fn sweep_input_checksums(dp: &LoadedDatapath, request: &Packet, service: &str, name: &str) {
    let backend = forward(
        dp,
        &format!("{name} sweep probe"),
        request,
        service,
        Flow::New,
    );
    let mut pkt = request.clone();
    pkt.payload.resize(pkt.payload.len().max(2), 0x77);
    let mut reply = reply_to(&pkt, backend);
    let vip = request.dst_sock();
    for i in 0..=u16::MAX {
        pkt.id = i;
        // An odd multiplier keeps the two words from moving in step.
        pkt.payload[..2].copy_from_slice(&i.wrapping_mul(40503).to_be_bytes());
        let out = dp.xdp(&pkt.build());
        let what = format!("{name} with IP id {i:#06x}");
        assert_eq!(
            out.action,
            XDP_PASS,
            "{what}: {}",
            xdp_action_name(out.action)
        );
        if let Err(problem) = checksum_problem(&out.data, pkt.l3_off()) {
            panic!("{what}: {problem}");
        }
        assert_frame_eq(&pkt.clone().with_dst(backend).build(), &out.data, &what);

        reply.id = i;
        reply.payload = pkt.payload.clone();
        let out = dp.tc_egress(&reply.build());
        let what = format!("{name} reply with IP id {i:#06x}");
        assert_eq!(
            out.action, TC_ACT_UNSPEC,
            "{what}: TC verdict {:#x}",
            out.action
        );
        if let Err(problem) = checksum_problem(&out.data, pkt.l3_off()) {
            panic!("{what}: {problem}");
        }
        assert_frame_eq(&reply.clone().with_src(vip).build(), &out.data, &what);
    }
}

#[test]
fn checksums_stay_valid_for_every_input_checksum() {
    let dp = LoadedDatapath::new(&web_and_dns());
    sweep_input_checksums(
        &dp,
        &Packet::tcp(client(49000), WEB).with_payload(*b"sweep"),
        "web",
        "TCP",
    );
    sweep_input_checksums(
        &dp,
        &Packet::udp(client(49001), DNS).with_payload(*b"sweep"),
        "dns",
        "UDP",
    );
}

/// `xdp_mode = "tc"` runs the same pipeline at TC ingress: every packet gets the same
/// verdict, the same rewrite and the same counters as under XDP (XDP_PASS is TC "next" (-1),
/// XDP_DROP is TC_ACT_SHOT).
#[test]
fn the_tc_balancer_matches_the_xdp_balancer() {
    let xdp = LoadedDatapath::new(&web_and_dns());
    let tc = LoadedDatapath::new(&web_and_dns());
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for port in 42000..42040 {
        let syn = Packet::tcp(client(port), WEB).with_tcp_flags(TCP_SYN);
        cases.push((format!("SYN from {port}"), syn.build()));
        let data = Packet::tcp(client(port), WEB).with_payload(*b"GET / HTTP/1.1\r\n\r\n");
        cases.push((format!("data from {port}"), data.build()));
        let udp = Packet::udp(client(port), DNS).with_payload(*b"who");
        cases.push((format!("UDP from {port}"), udp.build()));
    }
    let no_csum = Packet::udp(client(43000), DNS)
        .without_udp_checksum()
        .with_payload(*b"x");
    cases.push(("UDP without a checksum".into(), no_csum.build()));
    let tagged = Packet::tcp(client(43001), WEB)
        .with_vlan(ETH_P_8021Q, 7)
        .with_payload(*b"v");
    cases.push(("802.1Q TCP".into(), tagged.build()));
    let elsewhere = Packet::tcp(client(43002), SocketAddrV4::new(OTHER, 80));
    cases.push(("not a VIP".into(), elsewhere.build()));
    let options = Packet::tcp(client(43003), WEB).with_options([1, 1, 1, 1]);
    cases.push(("IP options to a VIP".into(), options.build()));
    let fragment = Packet::udp(client(43004), DNS).with_frag(0x2000);
    cases.push(("fragment to a VIP".into(), fragment.build()));
    let mut cut = Packet::tcp(client(43005), WEB).build();
    cut.truncate(cut.len() - 10);
    cases.push(("cut TCP header to a VIP".into(), cut));
    // ICMP to a VIP is XDP's alone (icmp.rs); elsewhere both leave it to the kernel.
    cases.push(("ICMP".into(), Packet::icmp_echo(CLIENT, OTHER).build()));
    cases.push(("ARP".into(), arp_request(CLIENT, VIP)));

    for (what, frame) in &cases {
        let (before_x, before_t) = (xdp.reasons(), tc.reasons());
        let x = xdp.xdp(frame);
        let t = tc.tc_balance(frame);
        let expected_tc = match x.action {
            XDP_PASS => u32::MAX,
            XDP_DROP => 2,
            other => panic!("{what}: XDP returned {other}"),
        };
        assert_eq!(t.action, expected_tc, "{what}");
        assert_frame_eq(&x.data, &t.data, what);
        let moved = |after: ReasonCounts, before: ReasonCounts| -> Vec<u64> {
            after.0.iter().zip(before.0).map(|(a, b)| a - b).collect()
        };
        assert_eq!(
            moved(tc.reasons(), before_t),
            moved(xdp.reasons(), before_x),
            "{what}"
        );
    }
    for svc in ["web", "dns"] {
        let (x, t) = (xdp.service_id(svc), tc.service_id(svc));
        assert_eq!(xdp.service_counters(x), tc.service_counters(t), "{svc}");
    }
}
