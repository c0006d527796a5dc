//! Mode `nat` end to end in network namespaces: client -> lb (xlb attached) -> bridge -> 3
//! backends running the workspace's test backend. Real TCP/UDP stacks verify checksums (TX
//! offload is off on every endpoint). Run as root.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use xlb_tests::{
    agent::Agent,
    client::{LineConn, assert_spread, count_names, tcp_name, udp_name},
    process::wait_for,
    topology::{FRONT, Topology},
};

/// `n` answers on one open connection.
fn answers(conn: &mut LineConn, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| conn.ask().expect("answer on the old connection"))
        .collect()
}

/// The backend names of `n` new connections.
fn new_connections(vip: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| tcp_name(vip).expect("new connection"))
        .collect()
}

/// Three backends declared as local containers on br0, on a host that forwards nothing
/// (Docker's FORWARD policy): only delivery on the bridge reaches them.
fn local_containers() -> (Topology, String) {
    let topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo
        .config(&Agent::pin_path_for(&topo), &all)
        .replace("  port = 8080\n", "  port = 8080\n  bridge = \"br0\"\n");
    forward_nothing(&topo);
    (topo, config)
}

/// What Docker does to a host: the lb namespace forwards nothing unless a rule allows it.
fn forward_nothing(topo: &Topology) {
    topo.lb.exec(&[
        "nft",
        "add table inet filter; add chain inet filter forward { type filter hook forward priority 0; policy drop; }",
    ]);
}

fn start(backends: usize) -> (Topology, Agent) {
    let topo = Topology::new(backends);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all);
    let agent = Agent::start(&topo, &config);
    (topo, agent)
}

#[test]
fn new_connections_spread_over_all_backends() {
    let (topo, agent) = start(3);
    let vip = topo.vip(80);
    let names: Vec<String> = topo.client.run(move || {
        (0..600)
            .map(|i| tcp_name(vip).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect()
    });
    assert_spread(&names, 3, 0.25..=0.42);

    // The data path counted each connection once, per service and per backend.
    let web = agent.service("web");
    assert_eq!(web["counters"]["new_flows"], 600, "{web}");
    let per_backend: u64 = web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["counters"]["new_flows"].as_u64().expect("count"))
        .sum();
    assert_eq!(per_backend, 600);
}

#[test]
fn long_lived_connection_stays_while_a_backend_is_added() {
    let (mut topo, agent) = start(3);
    let vip = topo.vip(80);
    let (conn, first) = topo.client.run(move || LineConn::open(vip));

    topo.add_backend();
    let all: Vec<_> = topo.backends.iter().collect();
    let (ok, out) = agent.reload(&topo.config(&Agent::pin_path_for(&topo), &all));
    assert!(ok, "reload failed: {out}");
    // A new backend takes flows after its first good probe; the share below counts from then.
    agent.wait_up("web", 4, Duration::from_secs(5));

    // The same connection keeps talking to the same backend.
    let (names, new_names) = topo.client.run(move || {
        let mut c = conn;
        (answers(&mut c, 20), new_connections(vip, 200))
    });
    assert!(
        names.iter().all(|n| *n == first),
        "moved from {first}: {names:?}"
    );
    // New connections reach the new backend too (about 1/4 of them).
    let counts = count_names(&new_names);
    let be4 = counts.get("be4").copied().unwrap_or(0);
    assert!(
        (20..=90).contains(&be4),
        "be4 got {be4} of 200 new connections: {counts:?}"
    );
}

#[test]
fn a_larger_table_takes_over_on_reload_and_established_flows_stay() {
    let (topo, agent) = start(3);
    let vip = topo.vip(80);
    let (conn, first) = topo.client.run(move || LineConn::open(vip));
    let all: Vec<_> = topo.backends.iter().collect();
    let default = topo.config(&Agent::pin_path_for(&topo), &all);
    let web = "port = 80\nprotocol = \"tcp\"\n";
    let large = default.replacen(web, &format!("{web}table_size = 2097143\n"), 1);
    assert_ne!(large, default);

    let mut conn = Some(conn);
    for (config, table_size) in [(&large, 2_097_143), (&default, 65_537)] {
        let (ok, out) = agent.reload(config);
        assert!(ok, "reload failed: {out}");
        assert_eq!(agent.service("web")["table_size"], table_size);
        let c = conn.take().expect("kept");
        let (c, same, fresh) = topo.client.run(move || {
            let mut c = c;
            let same = answers(&mut c, 10);
            (c, same, new_connections(vip, 300))
        });
        conn = Some(c);
        assert!(
            same.iter().all(|n| *n == first),
            "moved from {first}: {same:?}"
        );
        let counts = count_names(&fresh);
        assert_eq!(counts.len(), 3, "table {table_size}: {counts:?}");
        for (name, n) in &counts {
            assert!(
                (75..=126).contains(n),
                "table {table_size}: {name} got {n} of 300: {counts:?}"
            );
        }
    }
}

#[test]
fn udp_flow_sticks_to_one_backend_and_source_ports_spread() {
    let (topo, _agent) = start(3);
    let vip = topo.vip(53);
    let (sticky, spread) = topo.client.run(move || {
        let socket = UdpSocket::bind("10.99.1.2:40000").expect("bind");
        let sticky: Vec<String> = (0..30)
            .map(|_| udp_name(&socket, vip).expect("udp answer"))
            .collect();
        let spread: Vec<String> = (0..90)
            .map(|i| {
                let s =
                    UdpSocket::bind(SocketAddr::from(([10, 99, 1, 2], 41000 + i))).expect("bind");
                udp_name(&s, vip).expect("udp answer")
            })
            .collect();
        (sticky, spread)
    });
    assert!(
        sticky.iter().all(|n| *n == sticky[0]),
        "one source port, one backend: {sticky:?}"
    );
    let counts = count_names(&spread);
    assert_eq!(
        counts.len(),
        3,
        "source ports spread over all backends: {counts:?}"
    );
}

#[test]
fn traffic_not_for_a_vip_still_routes() {
    let (topo, agent) = start(3);
    let direct: SocketAddr = "10.99.2.12:8080".parse().expect("addr");
    let (tcp, udp) = topo.client.run(move || {
        let tcp = tcp_name(direct).expect("direct TCP to a backend");
        let socket = UdpSocket::bind("10.99.1.2:0").expect("bind");
        let udp = udp_name(&socket, direct).expect("direct UDP to a backend");
        (tcp, udp)
    });
    assert_eq!((tcp.as_str(), udp.as_str()), ("be2", "be2"));
    let status = agent.status();
    let reasons: BTreeMap<String, u64> = serde_json::from_value(status["reasons"].clone())
        .map(|v: Vec<(String, u64)>| v.into_iter().collect())
        .expect("reasons");
    assert!(reasons["pass_not_vip"] >= 2, "{reasons:?}");
    assert_eq!(reasons["forwarded"], 0, "{reasons:?}");
}

#[test]
fn client_address_reaches_the_backend() {
    let (topo, _agent) = start(1);
    let vip = topo.vip(80);
    topo.client.run(move || tcp_name(vip).expect("connect"));
    let log = topo.backends[0].proc.as_ref().expect("running").log_text();
    assert!(
        log.contains("be1 tcp from 10.99.1.2:"),
        "backend log: {log}"
    );
}

#[test]
fn detach_leaves_nothing_attached_or_pinned() {
    let (topo, mut agent) = start(2);
    let vip = topo.vip(80);
    topo.client
        .run(move || tcp_name(vip).expect("served before detach"));

    // Stopping the agent leaves forwarding in place (XDP, TC ingress and egress links).
    agent.stop();
    // (And the reply program on br0 and the backends' veths: they are on a local bridge.)
    let links = agent
        .pin_path
        .join("links")
        .read_dir()
        .expect("links")
        .filter(|l| {
            let name = l.as_ref().expect("link").file_name();
            !name.to_string_lossy().starts_with("tc_reply_")
        })
        .count();
    assert_eq!(links, 3);
    let name = topo
        .client
        .run(move || tcp_name(vip).expect("served with the agent stopped"));
    assert!(name.starts_with("be"));

    agent.detach();
    assert!(!agent.pin_path.exists(), "pin path removed");
    let link = topo.lb.ip(&["-d", "link", "show", FRONT]);
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
    let tc = topo.lb.exec(&["bpftool", "net", "show", "dev", FRONT]);
    assert!(!tc.contains("xlb"), "a program is still attached: {tc}");
    // Without the LB, the VIP is not served any more (and nothing else answers for it).
    let gone = topo.client.run(move || tcp_name(vip));
    assert!(gone.is_err(), "VIP still answered after detach: {gone:?}");
}

#[test]
fn local_bridge_delivery_bypasses_a_forward_drop_policy() {
    let (topo, config) = local_containers();
    let direct: SocketAddr = "10.99.2.11:8080".parse().expect("addr");
    assert!(
        topo.client.run(move || tcp_name(direct)).is_err(),
        "the policy drops routed traffic"
    );

    let agent = Agent::start(&topo, &config);
    let links = agent.links();
    assert!(links.contains(&"tc_reply_br0".to_string()), "{links:?}");
    // Health checks resolve the backends' neighbours; the agent then finds their veths.
    agent.wait_for_veths(6, Duration::from_secs(15));
    let before = agent.verdicts("delivered_peer");
    let (vip, dns) = (topo.vip(80), topo.vip(53));
    let (tcp, udp) = topo.client.run(move || {
        let tcp: Vec<String> = (0..60)
            .map(|_| tcp_name(vip).expect("delivered past the policy"))
            .collect();
        let socket = UdpSocket::bind("10.99.1.2:0").expect("bind");
        let udp = udp_name(&socket, dns).expect("UDP delivered past the policy");
        (tcp, udp)
    });
    assert_eq!(count_names(&tcp).len(), 3, "{:?}", count_names(&tcp));
    assert!(udp.starts_with("be"));
    // Each connection's SYN and ACK at least, and the datagram: straight into the netns.
    let handed = agent.verdicts("delivered_peer") - before;
    assert!(
        handed > 2 * 60,
        "{handed} packets handed to a container's eth0"
    );
    // Replies are caught on each backend's veth too, before the bridge.
    assert_eq!(veth_reply_links(&agent), 3, "{:?}", agent.links());
    let log = topo.backends[0].proc.as_ref().expect("running").log_text();
    assert!(
        log.contains("be1 tcp from 10.99.1.2:"),
        "client address kept: {log}"
    );

    // Routing the backends (`bridge = "none"`) detaches the reply program.
    let all: Vec<_> = topo.backends.iter().collect();
    let plain = topo
        .config(&Agent::pin_path_for(&topo), &all)
        .replace("  port = 8080\n", "  port = 8080\n  bridge = \"none\"\n");
    let (ok, out) = agent.reload(&plain);
    assert!(ok, "{out}");
    assert!(!agent.pin_path.join("links/tc_reply_br0").exists());
    assert_eq!(veth_reply_links(&agent), 0, "{:?}", agent.links());
}

#[test]
fn a_backend_whose_veth_is_replaced_is_followed_at_once() {
    let (topo, config) = local_containers();
    let agent = Agent::start(&topo, &config);
    agent.wait_for_veths(6, Duration::from_secs(15));

    // As when a container restarts under its address: its old veth goes, a new one comes.
    // Until the agent follows, be1's share of new connections goes to a veth that is gone.
    // The agent's own poll runs every 30 s; link and neighbour events make it follow at once.
    topo.rewire_backend(0);
    let vip = topo.vip(80);
    let followed = wait_for(Duration::from_secs(10), || {
        let names: Vec<String> = topo
            .client
            .run(move || (0..12).map_while(|_| tcp_name(vip).ok()).collect());
        (names.len() == 12 && names.iter().any(|n| n == "be1")).then_some(())
    });
    assert!(
        followed.is_some(),
        "be1 unreachable after its veth was replaced\n{}",
        agent.log_text()
    );
    agent.wait_for_veths(6, Duration::from_secs(10));
}

#[test]
fn the_balancer_runs_at_tc_ingress_in_mode_tc_and_modes_switch_on_reload() {
    let topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    let xdp_config = topo.config(&Agent::pin_path_for(&topo), &all);
    let agent = Agent::start(&topo, &xdp_config);
    let tc_config = xdp_config
        .replacen("[agent]\n", "[agent]\nxdp_mode = \"tc\"\n", 1)
        .replace("  port = 8080\n", "  port = 8080\n  bridge = \"br0\"\n");
    let (ok, out) = agent.reload(&tc_config);
    assert!(ok, "{out}");
    let links = agent.links();
    assert!(links.contains(&format!("tc_balance_{FRONT}")), "{links:?}");
    assert!(
        !links.iter().any(|l| l.starts_with("xdp_")),
        "XDP detached: {links:?}"
    );
    assert!(!topo.lb.ip(&["-d", "link", "show", FRONT]).contains("xdp"));
    assert_eq!(agent.status()["interfaces"][0]["xdp_mode"], "tc");

    // Delivery straight to the containers: nothing is routed (a drop policy proves it).
    forward_nothing(&topo);
    agent.wait_for_veths(6, Duration::from_secs(15));
    let before = agent.verdicts("delivered_peer");
    let (vip, dns) = (topo.vip(80), topo.vip(53));
    let (tcp, udp) = topo.client.run(move || {
        let tcp: Vec<String> = (0..150)
            .map(|_| tcp_name(vip).expect("served in mode tc"))
            .collect();
        let socket = UdpSocket::bind("10.99.1.2:0").expect("bind");
        (tcp, udp_name(&socket, dns).expect("UDP in mode tc"))
    });
    assert_eq!(count_names(&tcp).len(), 3, "{:?}", count_names(&tcp));
    assert!(udp.starts_with("be"));
    let log = topo.backends[1].proc.as_ref().expect("running").log_text();
    assert!(
        log.contains("be2 tcp from 10.99.1.2:"),
        "client address kept: {log}"
    );
    let handed = agent.verdicts("delivered_peer") - before;
    assert!(
        handed > 2 * 150,
        "{handed} packets handed to a container's eth0"
    );

    // And back to XDP.
    let (ok, out) = agent.reload(&xdp_config);
    assert!(ok, "{out}");
    assert!(topo.lb.ip(&["-d", "link", "show", FRONT]).contains("xdp"));
    assert!(
        !agent
            .pin_path
            .join(format!("links/tc_balance_{FRONT}"))
            .exists()
    );
}

/// Reply-program links on interfaces other than the bridge: the backends' veths.
fn veth_reply_links(agent: &Agent) -> usize {
    agent
        .links()
        .iter()
        .filter(|l| l.starts_with("tc_reply_") && *l != "tc_reply_br0")
        .count()
}
