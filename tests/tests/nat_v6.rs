//! Mode `nat` over IPv6 end to end, in the dual-stack topology (`Topology::dual_stack`):
//! client fd99:1::2 -> lb (xlb attached) -> br0 fd99:2::1 -> backends fd99:2::1N, and the
//! same links in IPv4 beside it. A v6 service and a v4 one serve side by side. Real TCP/UDP
//! stacks verify the rewritten checksums (TX offload is off on every endpoint). Run as root.
use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use xlb_tests::{
    agent::Agent,
    client::{LineConn, assert_spread, count_names, tcp_name, udp_name},
    topology::{CLIENT_ADDR6, FRONT, Topology, VIP, VIP6},
    trace,
};

/// A dual-stack TCP service (`web`: a VIP of each family, each with the backends of its
/// family) beside a v6 UDP one; `delivery` is put under each backend (`bridge = "..."`, or
/// nothing for the detected default).
fn config(topo: &Topology, delivery: &str) -> String {
    let mut text = format!(
        "[agent]\ninterfaces = [\"{FRONT}\"]\npin_path = \"{}\"\n",
        Agent::pin_path_for(topo)
    );
    for (name, vip, port, protocol) in [
        ("web", format!("[\"{VIP}\", \"{VIP6}\"]"), 80, "tcp"),
        ("dns6", format!("\"{VIP6}\""), 53, "udp"),
    ] {
        text += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = {vip}\nport = {port}\n\
             protocol = \"{protocol}\"\n  [service.health]\n  type = \"tcp\"\n  \
             interval = \"200ms\"\n  timeout = \"100ms\"\n  fall = 2\n  rise = 2\n"
        );
        let addrs = topo.backends.iter().flat_map(|b| {
            let v4 = (name == "web").then(|| b.addr.clone());
            v4.into_iter().chain([b.addr6()])
        });
        for addr in addrs {
            text += &format!(
                "  [[service.backend]]\n  address = \"{addr}\"\n  port = 8080\n{delivery}"
            );
        }
    }
    text
}

fn start(backends: usize, delivery: &str) -> (Topology, Agent) {
    let topo = Topology::dual_stack(backends);
    let agent = Agent::start(&topo, &config(&topo, delivery));
    agent.wait_up("web", backends, Duration::from_secs(5));
    agent.wait_up("web.v6", backends, Duration::from_secs(5));
    agent.wait_up("dns6", backends, Duration::from_secs(5));
    (topo, agent)
}

/// 600 new v6 connections spread over every backend, each answered by the backend's
/// server, which saw the client's own address; the service's v4 VIP serves beside it, over
/// the v4 backends.
fn spread_and_client_address(delivery: &str) {
    let (topo, agent) = start(3, delivery);
    let (vip6, vip4) = (topo.vip6(80), topo.vip(80));
    let (names, v4) = topo.client.run(move || {
        let names: Vec<String> = (0..600)
            .map(|i| tcp_name(vip6).unwrap_or_else(|e| panic!("v6 connection {i}: {e}")))
            .collect();
        let v4: Vec<String> = (0..60)
            .map(|i| tcp_name(vip4).unwrap_or_else(|e| panic!("v4 connection {i}: {e}")))
            .collect();
        (names, v4)
    });
    assert_spread(&names, 3, 0.25..=0.42);
    assert_eq!(count_names(&v4).len(), 3, "the v4 VIP spreads too: {v4:?}");
    let web6 = agent.service("web.v6");
    assert_eq!(web6["counters"]["new_flows"], 600, "{web6}");
    let web4 = agent.service("web");
    assert_eq!(web4["counters"]["new_flows"], 60, "{web4}");
    assert_eq!(web4["vip"], VIP, "{web4}");
    let log = topo.backends[0].proc.as_ref().expect("running").log_text();
    assert!(
        log.contains(&format!("be1 tcp from [{CLIENT_ADDR6}]:")),
        "the backend sees the client's v6 address: {log}"
    );
    // Status names the v6 endpoints in brackets.
    let (ok, text) = agent.cli(&["status"]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("[{VIP6}]:80/tcp")), "{text}");
    assert!(text.contains("[fd99:2::11]:8080"), "{text}");
    // The service's name drains a backend of either family.
    for backend in ["[fd99:2::11]:8080", "10.99.2.12:8080"] {
        let (ok, out) = agent.cli(&["drain", "web", backend]);
        assert!(ok, "drain web {backend}: {out}");
    }
    let drained = |service: &str, address: &str| {
        let svc = agent.service(service);
        let backends = svc["backends"].as_array().cloned().unwrap_or_default();
        let backend = backends.iter().find(|b| b["address"] == address).cloned();
        backend.unwrap_or_default()["drained"] == true
    };
    assert!(drained("web.v6", "[fd99:2::11]:8080") && drained("web", "10.99.2.12:8080"));
    assert!(
        !drained("web", "10.99.2.11:8080"),
        "only the v6 endpoint of be1 drained"
    );
}

#[test]
fn v6_connections_spread_with_the_detected_delivery() {
    spread_and_client_address("");
}

#[test]
fn v6_connections_spread_when_routed_by_the_kernel() {
    spread_and_client_address("  bridge = \"none\"\n");
}

#[test]
fn v6_connection_stays_while_a_backend_is_added() {
    let (mut topo, agent) = start(3, "");
    let vip = topo.vip6(80);
    let (conn, first) = topo.client.run(move || LineConn::open(vip));
    topo.add_backend();
    let (ok, out) = agent.reload(&config(&topo, ""));
    assert!(ok, "reload failed: {out}");
    agent.wait_up("web.v6", 4, Duration::from_secs(5));
    let (same, fresh) = topo.client.run(move || {
        let mut c = conn;
        let same: Vec<String> = (0..20).map(|_| c.ask().expect("old connection")).collect();
        let fresh: Vec<String> = (0..200).map(|_| tcp_name(vip).expect("new")).collect();
        (same, fresh)
    });
    assert!(
        same.iter().all(|n| *n == first),
        "moved from {first}: {same:?}"
    );
    let be4 = count_names(&fresh).get("be4").copied().unwrap_or(0);
    assert!((20..=90).contains(&be4), "be4 got {be4} of 200");
}

#[test]
fn v6_udp_flow_sticks_and_source_ports_spread() {
    let (topo, _agent) = start(3, "");
    let vip = topo.vip6(53);
    let (sticky, spread) = topo.client.run(move || {
        let socket = UdpSocket::bind(format!("[{CLIENT_ADDR6}]:40000")).expect("bind");
        let sticky: Vec<String> = (0..30)
            .map(|_| udp_name(&socket, vip).expect("udp answer"))
            .collect();
        let spread: Vec<String> = (0..90)
            .map(|i| {
                let s = UdpSocket::bind(format!("[{CLIENT_ADDR6}]:{}", 41000 + i)).expect("bind");
                udp_name(&s, vip).expect("udp answer")
            })
            .collect();
        (sticky, spread)
    });
    assert!(
        sticky.iter().all(|n| *n == sticky[0]),
        "one source port, one backend: {sticky:?}"
    );
    assert_eq!(count_names(&spread).len(), 3, "{spread:?}");
}

/// v6 traffic to a backend's own address is routed through the LB untouched, and neighbour
/// discovery works through the XDP program (the client resolved the front's address).
#[test]
fn v6_traffic_not_for_a_vip_routes_and_ndp_works() {
    let (topo, agent) = start(3, "");
    let direct: SocketAddr = "[fd99:2::12]:8080".parse().expect("addr");
    let (tcp, udp) = topo.client.run(move || {
        let tcp = tcp_name(direct).expect("direct TCP to a backend");
        let socket = UdpSocket::bind(format!("[{CLIENT_ADDR6}]:0")).expect("bind");
        (tcp, udp_name(&socket, direct).expect("direct UDP"))
    });
    assert_eq!((tcp.as_str(), udp.as_str()), ("be2", "be2"));
    assert!(agent.verdicts("pass_not_vip") >= 2);
    let neigh = topo.client.ip(&["-6", "neigh", "show", "dev", "eth0"]);
    assert!(
        neigh.contains("fd99:1::1") && !neigh.contains("FAILED"),
        "the front's address resolved by NDP: {neigh}"
    );
}

/// A service's VIP and backends are one family (a dual-stack service lists a VIP of each).
#[test]
fn v6_config_refuses_a_vip_and_backends_of_two_families() {
    let topo = Topology::dual_stack(1);
    let mixed = config(&topo, "").replace(
        &format!("vip = \"{VIP6}\"\nport = 53"),
        &format!("vip = \"{VIP}\"\nport = 53"),
    );
    let refused = Agent::start_refused(&topo, &mixed);
    assert!(refused.contains("same IP family"), "{refused}");
}

/// With `announce_table`, each VIP of the dual-stack service gets its host route (/32 and
/// /128) while it can serve, and a v6 route a dead agent left behind for a VIP the config no
/// longer has is withdrawn on start.
#[test]
fn both_vips_are_announced_and_a_stale_v6_route_is_withdrawn() {
    let topo = Topology::dual_stack(2);
    topo.lb.ip(&[
        "-6",
        "route",
        "add",
        "fd99:100::99/128",
        "dev",
        "lo",
        "table",
        "77",
        "proto",
        "static",
    ]);
    let text = config(&topo, "").replacen("[agent]\n", "[agent]\nannounce_table = 77\n", 1);
    let agent = Agent::start(&topo, &text);
    agent.wait_up("web.v6", 2, Duration::from_secs(5));
    agent.wait_up("web", 2, Duration::from_secs(5));
    let routes = || {
        let v4 = topo.lb.ip(&["-4", "route", "show", "table", "77"]);
        v4 + &topo.lb.ip(&["-6", "route", "show", "table", "77"])
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !(routes().contains(VIP6) && routes().contains(VIP)) {
        assert!(std::time::Instant::now() < deadline, "{}", routes());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !routes().contains("fd99:100::99"),
        "stale route kept: {}",
        routes()
    );
}

/// `xlb explain` answers for v6 flows: a port that never connected gets the ring's pick of
/// a v6 backend, and an open connection its flow-table entry, naming the backend that
/// answered it.
#[test]
fn explain_names_the_backend_of_a_v6_flow() {
    let (topo, agent) = start(3, "");
    let vip = topo.vip6(80);
    let (conn, answered) = topo.client.run(move || LineConn::open(vip));
    let local = conn.local_addr().expect("local address");
    let explain = |from: String| {
        let to = format!("[{VIP6}]:80");
        let (ok, out) = agent.cli(&["explain", "--from", &from, "--to", &to, "--json"]);
        assert!(ok, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).expect("json")
    };
    let open = explain(local.to_string());
    assert_eq!(open["reason"], "known_flow", "{open}");
    assert_eq!(open["service"]["name"], "web.v6", "{open}");
    let be = &topo.backends[answered[2..].parse::<usize>().expect("beN") - 1];
    assert_eq!(
        open["backend"]["address"],
        format!("[{}]:8080", be.addr6()),
        "{open}"
    );
    // `xlb flows --service web` lists it too: the name takes both halves.
    let flow = agent.flow_from("web", &local.to_string());
    assert_eq!(flow["service"], "web.v6", "{flow}");
    assert_eq!(flow["backend"], open["backend"]["address"], "{flow}");
    let fresh = explain(format!("[{CLIENT_ADDR6}]:1"));
    assert_eq!(fresh["reason"], "new_flow", "{fresh}");
    assert!(fresh["ring"]["slot"].is_u64(), "{fresh}");
    let picked = fresh["backend"]["address"].as_str().unwrap_or_default();
    assert!(picked.starts_with("[fd99:2::1"), "{fresh}");
    drop(conn);
}

/// `xlb trace --service web --from fd99:1::/64` records the v6 half's packets only (the v4
/// connections beside them are not from that range), each naming the v6 backend that
/// answered its connection.
#[test]
fn trace_records_v6_packets_of_a_dual_stack_service() {
    let (topo, agent) = start(3, "");
    let args = ["--service", "web", "--from", "fd99:1::/64", "--count", "6"];
    let mut traced = trace::start(&topo, &agent, "trace", &args);
    let (vip6, vip4) = (topo.vip6(80), topo.vip(80));
    let answered = trace::until_done(&mut traced, || {
        topo.client.run(move || {
            let _ = tcp_name(vip4);
            let (conn, name) = LineConn::open(vip6);
            (conn.local_addr().expect("local address").port(), name)
        })
    });
    let records = trace::lines(&traced);
    let text = traced.log_text();
    assert_eq!(records.len(), 6, "{text}");
    for r in &records {
        assert_eq!(r.service, "web.v6", "{r:?}");
        assert_eq!(r.client.ip().to_string(), CLIENT_ADDR6, "{r:?}");
        assert_eq!(r.vip, vip6, "{r:?}");
        let name = &answered[&r.client.port()];
        let be = &topo.backends[name[2..].parse::<usize>().expect("beN") - 1];
        let backend = r.backend.expect("a backend").to_string();
        assert_eq!(backend, format!("[{}]:8080", be.addr6()), "{r:?}");
    }
}

/// `allow` with a v6 range, end to end: UDP from a v6 client address inside it is answered,
/// from one outside refused (`drop_not_allowed`).
#[test]
fn a_v6_allow_list_refuses_the_client_addresses_outside_it() {
    const SECOND6: &str = "fd99:1::3";
    let topo = Topology::dual_stack(2);
    topo.client.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{SECOND6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let text = config(&topo, "").replacen(
        "protocol = \"udp\"\n",
        &format!("protocol = \"udp\"\nallow = [\"{SECOND6}/128\"]\n"),
        1,
    );
    let agent = Agent::start(&topo, &text);
    agent.wait_up("dns6", 2, Duration::from_secs(5));
    let vip = topo.vip6(53);
    let (second, first) = topo.client.run(move || {
        let from = |addr: &str| -> std::io::Result<String> {
            let socket = UdpSocket::bind(format!("[{addr}]:0"))?;
            udp_name(&socket, vip)
        };
        (
            from(SECOND6).map_err(|e| e.to_string()),
            from(CLIENT_ADDR6).map_err(|e| e.to_string()),
        )
    });
    assert!(second.is_ok(), "{SECOND6} is allowed: {second:?}");
    assert!(first.is_err(), "{CLIENT_ADDR6} is not, answered {first:?}");
    assert!(
        agent.verdicts("drop_not_allowed") >= 1,
        "{}",
        agent.status()
    );
}
