//! Per-service source ranges (`allow`): under BPF_PROG_TEST_RUN, a source inside passes and
//! is balanced, one outside is dropped as `drop_not_allowed` before any flow table, at XDP
//! and at the TC balancer; an empty list lets everyone in; a reload that narrows the list
//! cuts the established flows of sources it leaves out. End to end in network namespaces, a
//! client with two addresses is answered from one and refused from the other.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use lb_common::{Reason, sizes::FLOW_REFRESH_NS};
use xlb::reconcile::Maps as _;
use xlb_tests::{
    agent::Agent,
    client::{tcp_name, udp_name},
    testrun::*,
    topology::{CLIENT_ADDR, Topology},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const INSIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 7, 2);
/// TC_ACT_SHOT: what the TC balancer returns for a drop.
const TC_ACT_SHOT: u32 = 2;

fn backends() -> Vec<(SocketAddrV4, u32)> {
    (11..14)
        .map(|l| (SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, l), 8080), 100))
        .collect()
}

/// "web" with `allow = [ranges]` (no key at all for None).
fn web(allow: Option<&[&str]>) -> String {
    let toml = service_toml("web", WEB, "tcp", &backends());
    let Some(ranges) = allow else {
        return toml;
    };
    let list: Vec<String> = ranges.iter().map(|r| format!("\"{r}\"")).collect();
    toml.replacen(
        "mode = \"nat\"\n",
        &format!("mode = \"nat\"\nallow = [{}]\n", list.join(", ")),
        1,
    )
}

fn from(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// Runs the packet through XDP; Some(backend) if it was balanced, None if dropped.
fn xdp(dp: &LoadedDatapath, pkt: &Packet) -> Option<SocketAddrV4> {
    let out = dp.xdp(&pkt.build());
    match out.action {
        XDP_PASS => Some(SocketAddrV4::new(
            ipv4_at(&out.data, pkt.l3_off() + IP_DADDR),
            be16(&out.data, pkt.l4_off() + L4_DPORT),
        )),
        XDP_DROP => None,
        other => panic!("unexpected {}", xdp_action_name(other)),
    }
}

fn syn(src: SocketAddrV4) -> Packet {
    Packet::tcp(src, WEB).with_tcp_flags(TCP_SYN)
}

/// Flow-table entries (established and new) whose client is `addr`.
fn flows_of(dp: &LoadedDatapath, addr: Ipv4Addr) -> usize {
    let (_, words) = lb_common::addr_words(addr.into());
    let flows = dp.datapath().conntrack().expect("reading the flow tables");
    flows.iter().filter(|(k, _)| k.src == words).count()
}

/// A handshake through the LB (SYN, SYN-ACK at TC egress, ACK): the flow is established.
fn handshake(dp: &LoadedDatapath, src: SocketAddrV4) -> SocketAddrV4 {
    let backend = xdp(dp, &syn(src)).expect("SYN balanced");
    let reply = Packet::tcp(backend, src).with_tcp_flags(TCP_SYN | TCP_ACK);
    dp.tc_egress(&reply.build());
    assert_eq!(xdp(dp, &Packet::tcp(src, WEB)), Some(backend), "ACK");
    backend
}

#[test]
fn a_source_inside_is_balanced_and_one_outside_dropped_before_any_flow_table() {
    let dp = LoadedDatapath::new(&web(Some(&["10.99.1.0/24", "192.0.2.7/32"])));
    let id = dp.service_id("web");

    let before = dp.reasons();
    let backend = xdp(&dp, &syn(from(INSIDE, 40000))).expect("inside: balanced");
    assert!(backends().iter().any(|(b, _)| *b == backend), "{backend}");
    assert!(xdp(&dp, &syn(from(Ipv4Addr::new(192, 0, 2, 7), 40000))).is_some());
    dp.reasons()
        .assert_moved(&before, &[(Reason::Forwarded, 2)], "inside");

    let before = dp.reasons();
    let counters = dp.service_counters(id);
    for (n, addr) in [
        OUTSIDE,
        Ipv4Addr::new(10, 99, 0, 255),
        Ipv4Addr::new(192, 0, 2, 8),
    ]
    .into_iter()
    .enumerate()
    {
        // A SYN and a packet of a flow that was never seen: neither gets anywhere.
        assert_eq!(xdp(&dp, &syn(from(addr, 41000 + n as u16))), None, "{addr}");
        assert_eq!(
            xdp(&dp, &Packet::tcp(from(addr, 42000), WEB)),
            None,
            "{addr}"
        );
        assert_eq!(flows_of(&dp, addr), 0, "{addr} left a flow-table entry");
    }
    dp.reasons()
        .assert_moved(&before, &[(Reason::DropNotAllowed, 6)], "outside");
    assert_eq!(
        dp.service_counters(id),
        counters,
        "dropped packets count as traffic"
    );

    // The TC balancer (xdp_mode = "tc") drops them the same way.
    let before = dp.reasons();
    assert_eq!(
        dp.tc_balance(&syn(from(OUTSIDE, 43000)).build()).action,
        TC_ACT_SHOT
    );
    assert_eq!(flows_of(&dp, OUTSIDE), 0);
    let inside = dp.tc_balance(&syn(from(INSIDE, 43000)).build());
    assert_ne!(inside.action, TC_ACT_SHOT, "inside, at TC");
    dp.reasons().assert_moved(
        &before,
        &[(Reason::DropNotAllowed, 1), (Reason::Forwarded, 1)],
        "tc balancer",
    );

    // The trie holds web's two ranges under its id.
    let prefixes = dp.datapath().allow_prefixes().unwrap();
    assert_eq!(prefixes.len(), 2, "{prefixes:?}");
    assert!(prefixes.iter().all(|(svc, _)| *svc == id), "{prefixes:?}");
}

#[test]
fn an_empty_or_absent_list_lets_everyone_in() {
    for config in [web(None), web(Some(&[]))] {
        let dp = LoadedDatapath::new(&config);
        let before = dp.reasons();
        for (n, addr) in [INSIDE, OUTSIDE, Ipv4Addr::new(203, 0, 113, 9)]
            .into_iter()
            .enumerate()
        {
            assert!(
                xdp(&dp, &syn(from(addr, 40000 + n as u16))).is_some(),
                "{addr}"
            );
        }
        dp.reasons()
            .assert_moved(&before, &[(Reason::Forwarded, 3)], &config);
        assert!(dp.datapath().allow_prefixes().unwrap().is_empty());
    }
}

/// The documented rule: the list applies to every packet, not only to new flows. A reload
/// that narrows it cuts the established flows of the sources it leaves out at once (the
/// flow cache of the established flows re-checks the list); one that widens it again lets
/// them on, on their old backend (their flow-table entries stayed).
#[test]
fn a_reload_that_narrows_the_list_cuts_the_flows_of_sources_it_leaves_out() {
    let other = Ipv4Addr::new(10, 99, 3, 2);
    let mut dp = LoadedDatapath::new(&web(Some(&["10.99.1.0/24", "10.99.3.0/24"])));
    let kept = handshake(&dp, from(INSIDE, 40000));
    let cut = handshake(&dp, from(other, 40000));
    // Established flows are answered from the flow cache from now on.
    for _ in 0..3 {
        assert_eq!(xdp(&dp, &Packet::tcp(from(INSIDE, 40000), WEB)), Some(kept));
        assert_eq!(xdp(&dp, &Packet::tcp(from(other, 40000), WEB)), Some(cut));
    }

    dp.apply(&web(Some(&["10.99.1.0/24"])));
    let before = dp.reasons();
    for _ in 0..3 {
        assert_eq!(xdp(&dp, &Packet::tcp(from(INSIDE, 40000), WEB)), Some(kept));
        assert_eq!(xdp(&dp, &Packet::tcp(from(other, 40000), WEB)), None);
    }
    assert_eq!(xdp(&dp, &syn(from(other, 40001))), None, "a new flow");
    dp.reasons().assert_moved(
        &before,
        &[(Reason::Forwarded, 3), (Reason::DropNotAllowed, 4)],
        "narrowed",
    );
    assert_eq!(dp.datapath().allow_prefixes().unwrap().len(), 1);

    dp.apply(&web(Some(&["10.99.0.0/16"])));
    assert_eq!(xdp(&dp, &Packet::tcp(from(other, 40000), WEB)), Some(cut));

    // A list given to a service that had none applies to established flows within the
    // flow cache's refresh (the cache holds the service's flags as they were).
    dp.apply(&web(None));
    assert!(dp.datapath().allow_prefixes().unwrap().is_empty());
    assert_eq!(xdp(&dp, &Packet::tcp(from(other, 40000), WEB)), Some(cut));
    dp.apply(&web(Some(&["10.99.1.0/24"])));
    std::thread::sleep(Duration::from_nanos(FLOW_REFRESH_NS) + Duration::from_millis(200));
    assert_eq!(xdp(&dp, &Packet::tcp(from(other, 40000), WEB)), None);
    assert_eq!(xdp(&dp, &Packet::tcp(from(INSIDE, 40000), WEB)), Some(kept));
}

#[test]
fn removing_a_service_removes_its_ranges() {
    let mut dp = LoadedDatapath::new(
        &(web(Some(&["10.99.1.0/24"]))
            + &service_toml("dns", SocketAddrV4::new(VIP, 53), "udp", &backends())),
    );
    assert_eq!(dp.datapath().allow_prefixes().unwrap().len(), 1);
    dp.apply(&service_toml(
        "dns",
        SocketAddrV4::new(VIP, 53),
        "udp",
        &backends(),
    ));
    assert!(dp.datapath().allow_prefixes().unwrap().is_empty());
}

/// `xlb check` names the file, line and field of a range it cannot take.
#[test]
fn xlb_check_rejects_a_bad_range_with_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("xlb-allow-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("xlb.toml");
    let text = "[agent]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"web\"\n\
                vip = \"10.99.100.1\"\nport = 80\nallow = [\n  \"10.0.0.0/8\",\n  \
                \"10.1.2.3/16\",\n  \"fd00::/8\",\n  \"nonsense\",\n]\n";
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(xlb_tests::process::binary("xlb"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run xlb check");
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "xlb check accepted it:\n{text}");
    let file = path.display();
    for expected in [
        format!("{file}:10: service[0].allow[1]: `10.1.2.3/16` has host bits set"),
        format!("{file}:11: service[0].allow[2]: `fd00::/8` is not of the VIP's IP family"),
        format!("{file}:12: service[0].allow[3]: `nonsense` is not a CIDR"),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!text.contains("allow[0]"), "{text}");
}

/// A client with two addresses: the one outside `allow` is refused over TCP and UDP, the
/// one inside is answered; status counts the refusals; a reload that empties the list lets
/// the other address in.
#[test]
fn a_client_address_outside_the_list_is_refused_end_to_end() {
    let topo = Topology::new(2);
    const SECOND: &str = "10.99.1.3";
    topo.client
        .ip(&["addr", "add", &format!("{SECOND}/24"), "dev", "eth0"]);
    let all: Vec<_> = topo.backends.iter().collect();
    let open = topo.config(&Agent::pin_path_for(&topo), &all);
    let only_second = open.replace(
        "protocol = \"tcp\"\n",
        &format!("protocol = \"tcp\"\nallow = [\"{SECOND}/32\"]\n"),
    );
    let only_second = only_second.replace(
        "protocol = \"udp\"\n",
        &format!("protocol = \"udp\"\nallow = [\"{SECOND}/32\"]\n"),
    );
    assert_ne!(only_second, open);
    let agent = Agent::start(&topo, &only_second);
    let (web, dns) = (topo.vip(80), topo.vip(53));

    let udp_from = move |addr: &str| -> std::io::Result<String> {
        let socket = UdpSocket::bind(SocketAddr::new(addr.parse().unwrap(), 0))?;
        udp_name(&socket, dns)
    };
    let (second, first, tcp) = topo.client.run(move || {
        (
            udp_from(SECOND).map_err(|e| e.to_string()),
            udp_from(CLIENT_ADDR).map_err(|e| e.to_string()),
            // The client's primary address (CLIENT_ADDR) is its TCP source.
            tcp_name(web).map_err(|e| e.to_string()),
        )
    });
    assert!(second.is_ok(), "{SECOND} is allowed: {second:?}");
    assert!(
        first.is_err(),
        "{CLIENT_ADDR} is not allowed, answered {first:?}"
    );
    assert!(tcp.is_err(), "{CLIENT_ADDR} over TCP, answered {tcp:?}");
    let refused = agent.verdicts("drop_not_allowed");
    assert!(
        refused >= 2,
        "drop_not_allowed = {refused}\n{}",
        agent.status()
    );

    let (ok, out) = agent.reload(&open);
    assert!(ok, "reload: {out}");
    let (first, tcp) = topo.client.run(move || {
        (
            udp_from(CLIENT_ADDR).map_err(|e| e.to_string()),
            tcp_name(web).map_err(|e| e.to_string()),
        )
    });
    assert!(first.is_ok(), "after the reload: {first:?}");
    assert!(tcp.is_ok(), "after the reload: {tcp:?}");
}

/// Pins left by a version before `allow` (its verdict counters under an older name, no
/// allow trie): a new agent loads over them, pins the new maps, unpins the old counters, and
/// adopts the running services.
#[test]
fn an_agent_adopts_the_pins_of_the_version_before_allow() {
    let dp = LoadedDatapath::new(&web(None));
    let pins = dp.pin_path().to_path_buf();
    std::fs::rename(pins.join("XLB_REASONS_V8"), pins.join("XLB_REASONS_V7")).unwrap();
    std::fs::remove_file(pins.join("XLB_ALLOW_V2")).unwrap();

    let mut ebpf = xlb::loader::load(&pins).unwrap_or_else(|e| panic!("loading over: {e:#}"));
    assert!(
        !pins.join("XLB_REASONS_V7").exists(),
        "the old counters stay pinned"
    );
    for name in ["XLB_REASONS_V8", "XLB_ALLOW_V2"] {
        assert!(pins.join(name).exists(), "{name} is not pinned");
    }
    let datapath = xlb::loader::datapath(&mut ebpf).unwrap();
    let rec = xlb::reconcile::Reconciler::adopt(&datapath).unwrap();
    assert_eq!(rec.applied().len(), 1, "the running service is adopted");
    assert!(datapath.allow_prefixes().unwrap().is_empty());
}
