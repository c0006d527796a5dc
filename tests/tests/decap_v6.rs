//! `xlb decap` over IPv6: IPv6-in-IPv6 and GUE over IPv6 frames, built by hand as the
//! balancer writes them (a 40-byte outer header, GUE with UDP checksum 0), under
//! BPF_PROG_TEST_RUN; then the command itself on a veth, with real packets to a v6 VIP on lo.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use ipnet::IpNet;
use lb_common::{DecapCounter, GUE_PORT, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use xlb_tests::{
    flood::PacketSocket,
    netns::{Netns, unique_prefix, veth},
    process::binary,
    testrun::*,
};

#[path = "support/checksums.rs"]
#[allow(dead_code)]
mod checksums;
#[path = "support/decap.rs"]
mod decap;
#[path = "support/frame6.rs"]
#[allow(dead_code)]
mod frame6;
use decap::Decap;
use frame6::{CLIENT6, Frame6, OTHER6, VIP6};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const LB4: Ipv4Addr = Ipv4Addr::new(10, 99, 4, 1);
const HOST4: Ipv4Addr = Ipv4Addr::new(10, 99, 4, 11);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd99, 4, 0, 0, 0, 0, 0, 1);
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd99, 4, 0, 0, 0, 0, 0, 0x11);
const FORGED6: Ipv6Addr = Ipv6Addr::new(0xfd99, 4, 0, 0, 0, 0, 0, 0xc8);
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x04, 0x11];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x04, 0x01];
const ETH_HLEN: usize = 14;

#[derive(Clone, Copy, Debug)]
enum Encap {
    Ip6ip6,
    Gue,
}

const ENCAPS: [Encap; 2] = [Encap::Ip6ip6, Encap::Gue];

/// The client's TCP SYN to [VIP6]:80, as a whole frame.
fn client_frame(vip: Ipv6Addr) -> Vec<u8> {
    Frame6::tcp(vip)
        .between(CLIENT6, 40000, 80)
        .checksummed()
        .build()
}

/// `inner` (a frame) encapsulated as the balancer does, from `src` to `dst`.
fn encapsulate6(encap: Encap, inner: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let packet = &inner[ETH_HLEN..];
    let mut payload = Vec::new();
    let next = match encap {
        Encap::Ip6ip6 => PROTO_IPV6,
        Encap::Gue => {
            // Checksum 0: RFC 6935 allows it for tunnels over IPv6; the inner packet has its own.
            payload.extend_from_slice(&40001u16.to_be_bytes());
            payload.extend_from_slice(&GUE_PORT.to_be_bytes());
            payload.extend_from_slice(&(8 + packet.len() as u16).to_be_bytes());
            payload.extend_from_slice(&[0, 0]);
            PROTO_UDP
        }
    };
    payload.extend_from_slice(packet);
    outer6(next, &payload, src, dst)
}

/// An Ethernet frame LB -> host with a plain 40-byte IPv6 header before `payload`.
fn outer6(next: u8, payload: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut f = [HOST_MAC, LB_MAC].concat();
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(payload);
    f
}

/// `inner` (an IPv4 frame) in IPIP or GUE over IPv4, LB4 -> HOST4.
fn encapsulate4(gue: bool, inner: &[u8], src: Ipv4Addr) -> Vec<u8> {
    let packet = &inner[ETH_HLEN..];
    let mut payload = Vec::new();
    if gue {
        payload.extend_from_slice(&40001u16.to_be_bytes());
        payload.extend_from_slice(&GUE_PORT.to_be_bytes());
        payload.extend_from_slice(&(8 + packet.len() as u16).to_be_bytes());
        payload.extend_from_slice(&[0, 0]);
    }
    payload.extend_from_slice(packet);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[
        0,
        0,
        0x40,
        0,
        64,
        if gue { PROTO_UDP } else { PROTO_IPIP },
        0,
        0,
    ]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&HOST4.octets());
    let sum = checksum(&[&ip]);
    put_be16(&mut ip, 10, sum);
    let mut f = [HOST_MAC, LB_MAC].concat();
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&payload);
    f
}

/// What decap must make of `encapsulated`: its MACs, then the client frame from its
/// EtherType on.
fn decapsulated(encapsulated: &[u8], inner: &[u8]) -> Vec<u8> {
    [&encapsulated[..12], &inner[12..]].concat()
}

fn net(text: &str) -> IpNet {
    xlb::decap::parse_source(text).expect("prefix")
}

#[test]
fn ip6ip6_and_gue_over_v6_to_a_served_vip_come_out_as_the_client_frame() {
    let decap = Decap::new(&[VIP6.into()]);
    let syn = client_frame(VIP6);
    let datagram = Frame6::udp(VIP6)
        .between(CLIENT6, 40000, 53)
        .checksummed()
        .build();
    for inner in [&syn, &datagram] {
        for encap in ENCAPS {
            let frame = encapsulate6(encap, inner, LB6, HOST6);
            let (action, out) = decap.run(&frame);
            assert_eq!(action, XDP_PASS, "{encap:?}: {}", xdp_action_name(action));
            assert_eq!(
                out,
                decapsulated(&frame, inner),
                "{encap:?}: the client frame"
            );
            assert_eq!(be16(&out, 12), ETH_P_IPV6);
        }
    }
    assert_eq!(decap.counter(DecapCounter::Decapsulated), 4);
}

#[test]
fn v6_packets_not_for_decap_pass_untouched() {
    let decap = Decap::new(&[OTHER6.into()]);
    let inner = client_frame(VIP6);
    // Encapsulated to a VIP this host does not serve.
    for encap in ENCAPS {
        let frame = encapsulate6(encap, &inner, LB6, HOST6);
        assert_eq!(decap.run(&frame), (XDP_PASS, frame), "{encap:?}");
    }
    assert_eq!(decap.counter(DecapCounter::UnknownVip), 2);
    // Not encapsulated, or not by us: uncounted.
    let mut other_port = encapsulate6(Encap::Gue, &inner, LB6, HOST6);
    put_be16(&mut other_port, ETH_HLEN + 40 + 2, GUE_PORT + 1);
    let fragment = outer6(44, &[0; 64], LB6, HOST6);
    for frame in [inner.clone(), other_port, fragment] {
        assert_eq!(decap.run(&frame), (XDP_PASS, frame.clone()));
    }
    // Cut short anywhere before the VIP (served) is whole: every read is bounds-checked.
    let whole = encapsulate6(Encap::Gue, &client_frame(OTHER6), LB6, HOST6);
    for len in [14, 20, 53, 54, 57, 61, 62, 70, 101] {
        let cut = whole[..len].to_vec();
        assert_eq!(decap.run(&cut), (XDP_PASS, cut.clone()), "{len} bytes");
    }
    assert_eq!(decap.counter(DecapCounter::Decapsulated), 0);
    assert_eq!(decap.counter(DecapCounter::UnknownVip), 2);
    // An IPv4 packet in IPv6: not what the balancer sends, counted and passed.
    let v4 = Packet::tcp(
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 40000),
        SocketAddrV4::new(VIP, 80),
    )
    .build();
    let frame = outer6(PROTO_IPV6, &v4[ETH_HLEN..], LB6, HOST6);
    assert_eq!(decap.run(&frame), (XDP_PASS, frame));
    assert_eq!(decap.counter(DecapCounter::NotIpv6), 1);
}

#[test]
fn v6_decap_from_accepts_encapsulated_packets_only_from_the_lb() {
    let decap = Decap::from(&[VIP6.into()], &[net("fd99:4::1")]);
    let inner = client_frame(VIP6);
    for encap in ENCAPS {
        let frame = encapsulate6(encap, &inner, LB6, HOST6);
        let (action, out) = decap.run(&frame);
        assert_eq!(action, XDP_PASS, "{encap:?}: from the LB");
        assert_eq!(out, decapsulated(&frame, &inner), "{encap:?}");
        // The same from another host: a forged client address, dropped.
        let forged = encapsulate6(encap, &inner, FORGED6, HOST6);
        let (action, _) = decap.run(&forged);
        assert_eq!(action, XDP_DROP, "{encap:?}: {}", xdp_action_name(action));
    }
    assert_eq!(decap.counter(DecapCounter::Decapsulated), 2);
    assert_eq!(decap.counter(DecapCounter::RefusedSource), 2);
    // A prefix works as well as an address.
    let wide = Decap::from(&[VIP6.into()], &[net("fd99:4::/64")]);
    let forged = encapsulate6(Encap::Ip6ip6, &inner, FORGED6, HOST6);
    assert_eq!(wide.run(&forged).0, XDP_PASS);
    assert_eq!(wide.counter(DecapCounter::Decapsulated), 1);
    // Sources of one family only: the other family is refused, not open to anyone.
    let v4_only = Decap::from(&[VIP6.into()], &[net("10.99.4.1")]);
    let frame = encapsulate6(Encap::Ip6ip6, &inner, LB6, HOST6);
    assert_eq!(v4_only.run(&frame).0, XDP_DROP);
    assert_eq!(v4_only.counter(DecapCounter::RefusedSource), 1);
}

#[test]
fn a_v4_frame_still_decapsulates_beside_v6_vips_and_sources() {
    let vips: [IpAddr; 2] = [VIP.into(), VIP6.into()];
    let decap = Decap::from(&vips, &[net("10.99.4.1"), net("fd99:4::1")]);
    let inner4 = Packet::tcp(
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 40000),
        SocketAddrV4::new(VIP, 80),
    )
    .build();
    for gue in [false, true] {
        let frame = encapsulate4(gue, &inner4, LB4);
        let (action, out) = decap.run(&frame);
        assert_eq!(action, XDP_PASS, "gue={gue}");
        assert_eq!(out, decapsulated(&frame, &inner4), "gue={gue}");
        assert_eq!(be16(&out, 12), ETH_P_IP);
        let forged = encapsulate4(gue, &inner4, Ipv4Addr::new(10, 99, 4, 200));
        assert_eq!(decap.run(&forged).0, XDP_DROP, "gue={gue}: forged");
    }
    let inner6 = client_frame(VIP6);
    let frame = encapsulate6(Encap::Ip6ip6, &inner6, LB6, HOST6);
    assert_eq!(decap.run(&frame).1, decapsulated(&frame, &inner6));
    assert_eq!(decap.counter(DecapCounter::Decapsulated), 3);
    assert_eq!(decap.counter(DecapCounter::RefusedSource), 2);
}

/// Runs `xlb decap --detach` when the test ends, also on a panic.
struct Detach<'a>(&'a Netns, String);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let net = format!("--net={}", self.0.path());
        let _ = std::process::Command::new("nsenter")
            .args([net.as_str(), "--"])
            .arg(binary("xlb"))
            .args(["decap", "--detach", "--pin-path", &self.1])
            .output();
    }
}

/// The command on a host's eth0, with the LB on the other end of the veth: both VIPs go on
/// lo, --status lists the v6 VIP and source, real IP6IP6 and GUE packets reach a socket on
/// the v6 VIP, the VIP answers no neighbour solicitation on eth0, and detach removes it.
#[test]
fn xlb_decap_serves_a_v6_vip_on_lo_for_packets_from_the_lb() {
    let host = Netns::new(&format!("{}-h", unique_prefix()));
    let lb = Netns::new(&format!("{}-l", unique_prefix()));
    veth(&host, "eth0", &lb, "eth1", None);
    let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    for (ns, dev, m, addr) in [(&host, "eth0", HOST_MAC, HOST6), (&lb, "eth1", LB_MAC, LB6)] {
        ns.ip(&["link", "set", dev, "address", &mac(m), "up"]);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            dev,
            "nodad",
        ]);
    }
    let pin = format!("/sys/fs/bpf/xlb-test-{}-decap6", host.name);
    let _detach = Detach(&host, pin.clone());
    let xlb = binary("xlb");
    let xlb = xlb.to_str().expect("utf-8");
    let (vip, vip6) = (VIP.to_string(), VIP6.to_string());
    let out = host.exec(&[
        xlb,
        "decap",
        "--interface",
        "eth0",
        "--vip",
        &vip,
        "--vip",
        &vip6,
        "--from",
        "10.99.4.1",
        "--from",
        "fd99:4::1",
        "--pin-path",
        &pin,
    ]);
    assert!(out.contains("decapsulating for"), "{out}");
    assert!(
        host.ip(&["-6", "addr", "show", "dev", "lo"])
            .contains("fd99:100::1/128")
    );
    assert!(
        host.ip(&["-4", "addr", "show", "dev", "lo"])
            .contains("10.99.100.1/32")
    );

    let socket = host.run(|| UdpSocket::bind((VIP6, 7000)).expect("bind the v6 VIP"));
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let inner = Frame6::udp(VIP6)
        .between(CLIENT6, 40000, 7000)
        .checksummed()
        .build();
    let frames: Vec<Vec<u8>> = [
        (Encap::Ip6ip6, LB6),
        (Encap::Gue, LB6),
        (Encap::Gue, FORGED6),
    ]
    .into_iter()
    .map(|(encap, src)| encapsulate6(encap, &inner, src, HOST6))
    .collect();
    lb.run(move || {
        let sock = PacketSocket::bind("eth1");
        for frame in &frames {
            assert!(sock.send(frame), "send");
        }
    });
    let client = SocketAddr::from((CLIENT6, 40000));
    for encap in ["ip6ip6", "gue"] {
        let mut buf = [0u8; 64];
        let (n, from) = socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{encap}: nothing reached the VIP: {e}"));
        assert_eq!((n, from), (4, client), "{encap}");
    }
    assert!(
        socket.recv_from(&mut [0u8; 64]).is_err(),
        "the forged one arrived"
    );

    let status = host.exec(&[xlb, "decap", "--status", "--pin-path", &pin]);
    assert!(status.contains("10.99.100.1, fd99:100::1"), "{status}");
    assert!(
        status.contains("from: 10.99.4.1/32, fd99:4::1/128"),
        "{status}"
    );
    let count = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or("");
        line[name.len()..].trim().parse().unwrap_or(0)
    };
    assert_eq!(count("decapsulated"), 2, "{status}");
    assert_eq!(count("refused_source"), 1, "{status}");

    // Linux answers a solicitation only for the receiving interface's addresses: the LB's
    // neighbour entry for the host's eth0 address resolves, the one for the VIP does not.
    lb.ip(&["-6", "route", "add", "fd99:100::1/128", "dev", "eth1"]);
    lb.run(|| {
        let sock = UdpSocket::bind("[::]:0").unwrap();
        for to in [VIP6, HOST6] {
            let _ = sock.send_to(b"x", (to, 9));
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let neighbour = |addr: &str| lb.ip(&["-6", "neigh", "show", addr, "dev", "eth1"]);
    assert!(neighbour("fd99:4::11").contains("lladdr"), "no control");
    let vip_neighbour = neighbour("fd99:100::1");
    assert!(
        !vip_neighbour.contains("lladdr"),
        "eth0 claimed the VIP: {vip_neighbour}"
    );

    let out = host.exec(&[xlb, "decap", "--detach", "--pin-path", &pin]);
    assert!(out.contains("decap removed"), "{out}");
    assert!(
        !host
            .ip(&["-6", "addr", "show", "dev", "lo"])
            .contains("fd99:100::1")
    );
}

/// A dual-stack Remote's `decap_on_hosts` serves VIP6 too, from the LB nodes' v6 addresses
/// (the v4 callers get the v4 VIP alone, as before).
#[test]
fn decap_on_hosts_of_a_dual_stack_remote_serves_vip6_too() {
    let remote = xlb_tests::remote::Remote::dual_stack(1, 2);
    remote.decap_on_hosts();
    let lb6 = remote.lbs[0].addr6.clone().expect("dual stack");
    for host in &remote.hosts {
        let lo = host.ns.ip(&["-6", "addr", "show", "dev", "lo"]);
        assert!(lo.contains("fd99:100::1/128"), "{}: {lo}", host.name);
        let xlb = binary("xlb");
        let pin = remote.decap_pin_path(host);
        let status = host.ns.exec(&[
            xlb.to_str().unwrap(),
            "decap",
            "--status",
            "--pin-path",
            &pin,
        ]);
        assert!(status.contains("10.99.100.1, fd99:100::1"), "{status}");
        assert!(status.contains(&format!("{lb6}/128")), "{status}");
        assert!(status.contains("fd99:4::/64"), "{status}");
    }
}
