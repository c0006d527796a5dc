//! Flow lifetimes under BPF_PROG_TEST_RUN: new flows are embryonic until they prove two-way,
//! a flood of new flows evicts no established one, closed flows leave after their linger,
//! and fullnat ports go only to packets that can open a flow.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    FLOW_FIN_CLIENT, FLOW_FIN_SERVER, FLOW_RST, FlowTable, Reason,
    sizes::{CLOSED_LINGER_NS, CONNTRACK_SIZE, EMBRYONIC_SIZE},
};
use xlb::{flowtables::monotonic_ns, reconcile::Maps as _};
use xlb_tests::{netns::Netns, testrun::*};

#[path = "support/routed.rs"]
mod routed;
use routed::{HOSTS, routed_namespace};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);

fn backends() -> Vec<(SocketAddrV4, u32)> {
    (11..14)
        .map(|l| (SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, l), 8080), 100))
        .collect()
}

fn nat_web() -> String {
    service_toml("web", WEB, "tcp", &backends())
}

/// Client `n` (n < 25000): addresses in 10.99.128.0/17, none a backend's, each port its own.
fn client(n: u32) -> SocketAddrV4 {
    let addr = Ipv4Addr::new(10, 99, 128 + (n / 250) as u8, (n % 250) as u8 + 1);
    SocketAddrV4::new(addr, 10000 + n as u16)
}

/// Where XDP sent the packet.
fn forwarded_to(dp: &LoadedDatapath, pkt: &Packet) -> SocketAddrV4 {
    let out = dp.xdp(&pkt.build());
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    SocketAddrV4::new(
        ipv4_at(&out.data, pkt.l3_off() + IP_DADDR),
        be16(&out.data, pkt.l4_off() + L4_DPORT),
    )
}

/// The backend's reply to `from`, as TC egress sees it; returns its source after TC.
fn reply(
    dp: &LoadedDatapath,
    backend: SocketAddrV4,
    from: SocketAddrV4,
    flags: u8,
) -> SocketAddrV4 {
    let pkt = Packet::tcp(backend, from).with_tcp_flags(flags);
    let out = dp.tc_egress(&pkt.build());
    SocketAddrV4::new(
        ipv4_at(&out.data, pkt.l3_off() + IP_SADDR),
        be16(&out.data, pkt.l4_off() + L4_SPORT),
    )
}

/// A handshake through the LB: SYN, SYN-ACK (TC egress), ACK. Returns the backend.
fn handshake(dp: &LoadedDatapath, from: SocketAddrV4) -> SocketAddrV4 {
    let backend = forwarded_to(dp, &Packet::tcp(from, WEB).with_tcp_flags(TCP_SYN));
    assert_eq!(
        reply(dp, backend, from, TCP_SYN | TCP_ACK),
        WEB,
        "SYN-ACK from the VIP"
    );
    assert_eq!(forwarded_to(dp, &Packet::tcp(from, WEB)), backend, "ACK");
    backend
}

fn established(dp: &LoadedDatapath) -> usize {
    dp.datapath().flow_tables().flows_in(true).unwrap().len()
}

fn embryonic(dp: &LoadedDatapath) -> usize {
    dp.datapath().flow_tables().flows_in(false).unwrap().len()
}

#[test]
fn a_flow_is_embryonic_until_a_reply_and_the_clients_next_packet() {
    let dp = LoadedDatapath::new(&nat_web());
    let from = client(1);
    let before = dp.reasons();
    let backend = forwarded_to(&dp, &Packet::tcp(from, WEB).with_tcp_flags(TCP_SYN));
    assert_eq!((established(&dp), embryonic(&dp)), (0, 1));
    // A retransmitted SYN, or an ACK before any reply, proves nothing.
    forwarded_to(&dp, &Packet::tcp(from, WEB).with_tcp_flags(TCP_SYN));
    forwarded_to(&dp, &Packet::tcp(from, WEB));
    assert_eq!((established(&dp), embryonic(&dp)), (0, 1));
    // The SYN-ACK is turned back to the VIP from the embryonic mapping, the ACK promotes.
    assert_eq!(reply(&dp, backend, from, TCP_SYN | TCP_ACK), WEB);
    assert_eq!(forwarded_to(&dp, &Packet::tcp(from, WEB)), backend);
    assert_eq!((established(&dp), embryonic(&dp)), (1, 0));
    let rev = dp.datapath().rev_nat().unwrap();
    assert_eq!(rev.len(), 1, "one reply mapping, moved along: {rev:?}");
    dp.reasons().assert_moved(
        &before,
        &[
            (Reason::Forwarded, 4),
            (Reason::RevNat, 1),
            (Reason::Promoted, 1),
        ],
        "handshake",
    );
    // Established: the server may speak first at any time.
    assert_eq!(reply(&dp, backend, from, TCP_ACK | TCP_PSH), WEB);
}

/// 1000 established flows, then new flows from random sources numbering four times the
/// main flow table: every established flow keeps its entry, its backend and its reply
/// mapping, and every new flow is still balanced (none dropped).
#[test]
fn a_flood_of_new_flows_evicts_no_established_flow() {
    let mut dp = LoadedDatapath::new(&nat_web());
    let live: Vec<(SocketAddrV4, SocketAddrV4)> = (0..1000)
        .map(|n| (client(n), handshake(&dp, client(n))))
        .collect();
    assert_eq!(established(&dp), 1000);

    let flood = 4 * CONNTRACK_SIZE;
    let mut syn = Packet::tcp(client(0), WEB).with_tcp_flags(TCP_SYN).build();
    let (saddr, sport) = (26, 34);
    let mut state = 0x9e37_79b9_u32;
    for n in 0..flood {
        // Random sources in 10.99.0.0/16 and ports; checksums do not matter to the balancer.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        syn[saddr + 2..saddr + 4].copy_from_slice(&(state as u16).to_be_bytes());
        syn[sport..sport + 2].copy_from_slice(&((state >> 16) as u16 | 1024).to_be_bytes());
        let out = dp.xdp(&syn);
        assert_eq!(out.action, XDP_PASS, "flood packet {n} was not balanced");
    }
    assert_eq!(established(&dp), 1000, "established flows were evicted");
    assert!(embryonic(&dp) <= EMBRYONIC_SIZE as usize);
    for (from, backend) in &live {
        let what = format!("established flow from {from}");
        assert_eq!(
            forwarded_to(&dp, &Packet::tcp(*from, WEB)),
            *backend,
            "{what}"
        );
        assert_eq!(
            reply(&dp, *backend, *from, TCP_ACK | TCP_PSH),
            WEB,
            "{what}: reply"
        );
    }

    // The sweep sees the tables as they are: the flood churned only the embryonic one.
    let tables = dp
        .datapath_mut()
        .flow_tables_mut()
        .sweep(monotonic_ns())
        .unwrap();
    let table = |t: FlowTable| tables.iter().find(|s| s.name == t.name()).unwrap().clone();
    assert_eq!(table(FlowTable::Flows).entries, 1000);
    assert_eq!(table(FlowTable::Flows).evictions, 0);
    let new = table(FlowTable::FlowsNew);
    assert!(
        new.evictions > u64::from(flood) - u64::from(EMBRYONIC_SIZE) - 1000,
        "the flood's evictions are counted: {new:?}"
    );
}

/// The state bits of the flow from `from`.
fn state(dp: &LoadedDatapath, from: SocketAddrV4) -> Option<u8> {
    dp.datapath()
        .conntrack()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.src_port == from.port().to_be())
        .map(|(_, f)| f.state)
}

#[test]
fn closed_flows_leave_after_their_linger_and_take_their_mappings_along() {
    let mut dp = LoadedDatapath::new(&nat_web());
    let (a, b, c) = (client(1), client(2), client(3));
    let (ba, bb, _) = (handshake(&dp, a), handshake(&dp, b), handshake(&dp, c));
    // a: FIN both ways. b: RST from the client. c: stays open.
    forwarded_to(&dp, &Packet::tcp(a, WEB).with_tcp_flags(TCP_FIN | TCP_ACK));
    reply(&dp, ba, a, TCP_FIN | TCP_ACK);
    forwarded_to(&dp, &Packet::tcp(b, WEB).with_tcp_flags(TCP_RST));
    assert_eq!(state(&dp, a), Some(FLOW_FIN_CLIENT | FLOW_FIN_SERVER));
    assert_eq!(state(&dp, b), Some(FLOW_RST));
    let _ = bb;

    let now = monotonic_ns();
    let sweep = |dp: &mut LoadedDatapath, at: u64| {
        dp.datapath_mut().flow_tables_mut().sweep(at).unwrap();
    };
    sweep(&mut dp, now);
    assert_eq!(established(&dp), 3, "closed flows linger a while");
    sweep(&mut dp, now + CLOSED_LINGER_NS + 2_000_000_000);
    assert_eq!(established(&dp), 1, "closed flows left after their linger");
    assert_eq!(
        dp.datapath().rev_nat().unwrap().len(),
        1,
        "with their reply mappings"
    );

    // A SYN on a closed flow's tuple is a new flow, not the old one.
    let d = client(4);
    let bd = handshake(&dp, d);
    forwarded_to(&dp, &Packet::tcp(d, WEB).with_tcp_flags(TCP_RST));
    let before = dp.reasons();
    forwarded_to(&dp, &Packet::tcp(d, WEB).with_tcp_flags(TCP_SYN));
    assert_eq!(state(&dp, d), Some(0), "reopened as new");
    dp.reasons()
        .assert_moved(&before, &[(Reason::Forwarded, 1)], "reopening SYN");
    let _ = bd;
}

/// fullnat to one backend with a pool of a few ports (in a namespace whose FIB answers).
fn fullnat_few_ports(ports: u16) -> (Netns, LoadedDatapath) {
    let ns = routed_namespace();
    let one = [(SocketAddrV4::new(HOSTS[0], 8080), 100)];
    let toml = service_toml("web", WEB, "tcp", &one).replace(
        "mode = \"nat\"",
        "mode = \"fullnat\"\nsnat = [\"10.99.5.9\"]",
    );
    let mut dp = LoadedDatapath::new(&toml);
    let id = dp.service_id("web");
    let mut value = dp.datapath().service(id).unwrap();
    value.snat.port_min = 40000;
    value.snat.port_max = 40000 + ports - 1;
    dp.datapath_mut().grace_period().unwrap();
    dp.datapath_mut().set_service(id, &value).unwrap();
    (ns, dp)
}

#[test]
fn fullnat_ports_go_only_to_packets_that_can_open_a_flow() {
    let (_ns, dp) = fullnat_few_ports(4);
    // Spoofed ACKs of flows nobody opened take nothing.
    let before = dp.reasons();
    for n in 0..100 {
        let out = dp.xdp(&Packet::tcp(client(n), WEB).build());
        assert_eq!(out.action, XDP_DROP);
    }
    dp.reasons()
        .assert_moved(&before, &[(Reason::DropNoFlow, 100)], "spoofed ACKs");
    assert!(dp.datapath().snat_rev().unwrap().is_empty());
    // So the real clients still get all four ports.
    for n in 0..4 {
        let out = dp.xdp(
            &Packet::tcp(client(1000 + n), WEB)
                .with_tcp_flags(TCP_SYN)
                .build(),
        );
        assert_ne!(out.action, XDP_DROP, "client {n}");
    }
    assert_eq!(dp.datapath().snat_rev().unwrap().len(), 4);
}

#[test]
fn a_fullnat_port_held_by_an_unanswered_syn_is_given_to_another_flow_soon() {
    let (_ns, dp) = fullnat_few_ports(2);
    let syn = |n| Packet::tcp(client(n), WEB).with_tcp_flags(TCP_SYN).build();
    // Two spoofed SYNs hold both ports; one of them is answered by the backend.
    // XDP hands these to TC: the frame comes back behind the delivery metadata.
    let first = dp.xdp(&syn(1));
    let first = &first.data[size_of::<lb_common::DeliverMeta>()..];
    assert_ne!(dp.xdp(&syn(2)).action, XDP_DROP);
    let l3 = Packet::tcp(client(1), WEB).l3_off();
    let (backend, snat) = (
        SocketAddrV4::new(ipv4_at(first, l3 + IP_DADDR), be16(first, l3 + 22)),
        SocketAddrV4::new(ipv4_at(first, l3 + IP_SADDR), be16(first, l3 + 20)),
    );
    let answer = Packet::tcp(backend, snat).with_tcp_flags(TCP_SYN | TCP_ACK);
    let before = dp.reasons();
    dp.xdp(&answer.build());
    dp.reasons().assert_moved(
        &before,
        // No route back to this client in the test namespace: the kernel gets it.
        &[(Reason::RevSnat, 1), (Reason::Forwarded, 1)],
        "the answer",
    );
    assert_eq!(dp.xdp(&syn(3)).action, XDP_DROP, "no port free yet");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // The unanswered one's port is free again; the answered one's is not.
    assert_ne!(
        dp.xdp(&syn(3)).action,
        XDP_DROP,
        "the unanswered port is reused"
    );
    assert_eq!(
        dp.xdp(&syn(4)).action,
        XDP_DROP,
        "the answered port is kept"
    );
}

/// UDP: a flow is established once the backend answered and the client sent again; a scan
/// from random sources four times the flow table, each datagram answered by the backend
/// (as a DNS server would), evicts none of them, since its flows never send twice.
#[test]
fn a_udp_scan_evicts_no_established_udp_flow() {
    let dns = SocketAddrV4::new(VIP, 53);
    let dp = LoadedDatapath::new(&service_toml("dns", dns, "udp", &backends()));
    let query = |from| Packet::udp(from, dns).with_payload(*b"query");
    let answer = |backend, to| {
        let pkt = Packet::udp(backend, to).with_payload(*b"answer");
        let out = dp.tc_egress(&pkt.build());
        ipv4_at(&out.data, pkt.l3_off() + IP_SADDR)
    };
    let live: Vec<(SocketAddrV4, SocketAddrV4)> = (0..500)
        .map(|n| {
            let from = client(n);
            let backend = forwarded_to(&dp, &query(from));
            assert_eq!(answer(backend, from), VIP);
            assert_eq!(forwarded_to(&dp, &query(from)), backend);
            (from, backend)
        })
        .collect();
    assert_eq!(established(&dp), 500);

    let mut probe = query(client(0)).build();
    let (saddr, sport) = (26, 34);
    let mut state = 0x2545_f491_u32;
    for n in 0..4 * CONNTRACK_SIZE {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        probe[saddr + 2..saddr + 4].copy_from_slice(&(state as u16).to_be_bytes());
        probe[sport..sport + 2].copy_from_slice(&((state >> 16) as u16 | 1024).to_be_bytes());
        let out = dp.xdp(&probe);
        assert_eq!(out.action, XDP_PASS, "scan datagram {n} was not balanced");
        // Answered, as a server would: the reply alone proves nothing.
        if n % 4 == 0 {
            let mut reply = out.data.clone();
            let src: [u8; 4] = reply[saddr + 4..saddr + 8].try_into().unwrap();
            let dst: [u8; 4] = reply[saddr..saddr + 4].try_into().unwrap();
            reply[saddr..saddr + 4].copy_from_slice(&src);
            reply[saddr + 4..saddr + 8].copy_from_slice(&dst);
            reply.swap(sport, sport + 2);
            reply.swap(sport + 1, sport + 3);
            dp.tc_egress(&reply);
        }
    }
    // (A random source and port that came twice after an answer is established too.)
    let main: std::collections::HashSet<(u32, u16)> = dp
        .datapath()
        .flow_tables()
        .flows_in(true)
        .unwrap()
        .iter()
        .map(|(k, _)| (k.src[0], k.src_port))
        .collect();
    for (from, _) in &live {
        let key = (u32::from_ne_bytes(from.ip().octets()), from.port().to_be());
        assert!(
            main.contains(&key),
            "the established flow from {from} was evicted"
        );
    }
    for (from, backend) in &live {
        assert_eq!(
            forwarded_to(&dp, &query(*from)),
            *backend,
            "flow from {from}"
        );
        assert_eq!(answer(*backend, *from), VIP, "reply of {from}");
    }
}

/// A new nat flow's SYN-ACK finds its flow through the backend's endpoint (no reply mapping
/// per new flow), and where two services share a backend endpoint, the flows of the one that
/// did not claim it keep a mapping each: every reply gets its own flow's VIP back.
#[test]
fn new_flows_need_no_reply_mapping_unless_their_backend_serves_two_services() {
    let alt = SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 2), 80);
    let dp = LoadedDatapath::new(&(nat_web() + &service_toml("alt", alt, "tcp", &backends())));
    let syn = |from: SocketAddrV4, vip: SocketAddrV4| {
        forwarded_to(&dp, &Packet::tcp(from, vip).with_tcp_flags(TCP_SYN))
    };
    let mappings = || dp.datapath().rev_nat().unwrap().len();
    // web's first flows claim every backend's endpoint.
    let web_flows: Vec<_> = (0..30).map(|n| (client(n), syn(client(n), WEB))).collect();
    assert_eq!(mappings(), 0, "web's new flows take no reply mapping");
    // alt's backends are the same endpoints, claimed by web's backend ids.
    let alt_flows: Vec<_> = (30..60).map(|n| (client(n), syn(client(n), alt))).collect();
    assert_eq!(mappings(), 30, "alt's new flows each keep one");
    // The same client port to both VIPs at once (the backend sees them as one 4-tuple only
    // if Maglev sends both to the same backend; the replies still name their own VIP).
    let both = client(60);
    let (to_web, to_alt) = (syn(both, WEB), syn(both, alt));
    for (from, backend) in &web_flows {
        assert_eq!(reply(&dp, *backend, *from, TCP_SYN | TCP_ACK), WEB);
    }
    for (from, backend) in &alt_flows {
        assert_eq!(reply(&dp, *backend, *from, TCP_SYN | TCP_ACK), alt);
    }
    assert_eq!(reply(&dp, to_web, both, TCP_SYN | TCP_ACK), WEB);
    if to_alt != to_web {
        assert_eq!(reply(&dp, to_alt, both, TCP_SYN | TCP_ACK), alt);
    }
    // Replied, then the ACK: both kinds are promoted with a mapping in the main table.
    for (from, backend) in web_flows.iter().chain(&alt_flows) {
        let vip = if web_flows.contains(&(*from, *backend)) {
            WEB
        } else {
            alt
        };
        assert_eq!(forwarded_to(&dp, &Packet::tcp(*from, vip)), *backend);
        assert_eq!(reply(&dp, *backend, *from, TCP_ACK | TCP_PSH), vip);
    }
    assert!(established(&dp) >= 60);
}

/// A client resets a handshake the backend answered with a stale ACK (a TIME_WAIT on the
/// SNAT port from an earlier agent's flow) and retries it: the retry takes another port, and
/// every later packet of the flow leaves from that one. The RST neither promotes the flow
/// nor leaves it in the per-CPU flow cache with the old port (the backend would reset the
/// handshake's ACK on a port with no socket).
#[test]
fn a_reset_handshake_retried_on_another_port_keeps_to_the_new_one() {
    // One CPU: the flow cache is per CPU.
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(0, &mut cpus) };
    assert_eq!(
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &cpus) },
        0
    );
    let (_ns, dp) = fullnat_few_ports(4);
    let c = client(7);
    let from_lb = |flags: u8| {
        let pkt = Packet::tcp(c, WEB).with_tcp_flags(flags);
        let out = dp.xdp_unmarked(&pkt.build());
        assert_ne!(out.action, XDP_DROP, "flags {flags:#x}");
        let l3 = pkt.l3_off();
        (
            SocketAddrV4::new(ipv4_at(&out.data, l3 + IP_DADDR), be16(&out.data, l3 + 22)),
            SocketAddrV4::new(ipv4_at(&out.data, l3 + IP_SADDR), be16(&out.data, l3 + 20)),
        )
    };
    let (backend, first) = from_lb(TCP_SYN);
    // The stale ACK comes back through the LB, and the client resets it.
    dp.xdp(&Packet::tcp(backend, first).build());
    dp.xdp(&Packet::tcp(c, WEB).with_tcp_flags(TCP_RST).build());
    let (_, retry) = from_lb(TCP_SYN);
    assert_ne!(
        retry, first,
        "the answered port is held: the retry takes another"
    );
    dp.xdp(
        &Packet::tcp(backend, retry)
            .with_tcp_flags(TCP_SYN | TCP_ACK)
            .build(),
    );
    for flags in [TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK] {
        assert_eq!(from_lb(flags).1, retry, "flags {flags:#x}");
    }
}

/// The ports of answered fullnat flows are held for the backends' TIME_WAIT also across a
/// detach (`xlb::snatheld`): a new agent with new tables gets them back and hands them to
/// no new flow.
#[test]
fn fullnat_ports_still_held_outlive_a_detach() {
    let file = std::env::temp_dir().join(format!("xlb-snat-held-{}", std::process::id()));
    let (_ns, dp) = fullnat_few_ports(2);
    for n in 0..2 {
        let syn = Packet::tcp(client(n), WEB).with_tcp_flags(TCP_SYN);
        let out = dp.xdp_unmarked(&syn.build());
        assert_ne!(out.action, XDP_DROP, "client {n}");
        let l3 = syn.l3_off();
        let backend =
            SocketAddrV4::new(ipv4_at(&out.data, l3 + IP_DADDR), be16(&out.data, l3 + 22));
        let snat = SocketAddrV4::new(ipv4_at(&out.data, l3 + IP_SADDR), be16(&out.data, l3 + 20));
        let answer = Packet::tcp(backend, snat).with_tcp_flags(TCP_SYN | TCP_ACK);
        dp.xdp(&answer.build());
    }
    assert_eq!(xlb::snatheld::save_to(&file, dp.pin_path()).unwrap(), 2);
    drop(dp);

    let (_ns2, fresh) = fullnat_few_ports(2);
    assert_eq!(
        xlb::snatheld::restore_from(&file, fresh.pin_path()).unwrap(),
        2
    );
    assert!(!file.exists(), "read once");
    let before = fresh.reasons();
    let syn = Packet::tcp(client(5), WEB).with_tcp_flags(TCP_SYN);
    assert_eq!(fresh.xdp(&syn.build()).action, XDP_DROP);
    fresh.reasons().assert_moved(
        &before,
        &[(Reason::DropSnatExhausted, 1)],
        "both ports held",
    );
    // Without the file the next agent starts with every port free.
    assert_eq!(
        xlb::snatheld::restore_from(&file, fresh.pin_path()).unwrap(),
        0
    );
}
