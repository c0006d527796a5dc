//! Modes fullnat and dsr with backends on other hosts behind a router, and two LB nodes
//! behind an ECMP route (tests/src/remote.rs). Real TCP stacks verify every checksum (TX
//! offload is off on the client and the hosts). Run as root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use xlb_tests::{
    agent::Agent,
    client::{LineConn, LoadLoop, failures, tcp_name},
    process::{raise_fd_limit, wait_for},
    remote::{ANNOUNCE_TABLE, Remote},
    topology::{CLIENT_ADDR, CLIENT_ADDR6, FRONT, VIP, VIP6},
};

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().expect("addr")
}

/// Names answering `n` new connections to `addr` from the client namespace.
fn ask_many(remote: &Remote, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    remote.client.run(move || {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let name = tcp_name(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    })
}

/// A verdict counter of the agent's data path (`reasons` in `xlb status --json`).
fn reason(agent: &Agent, name: &str) -> u64 {
    let status = agent.status();
    let reasons = status["reasons"].as_array().cloned().unwrap_or_default();
    reasons
        .iter()
        .find(|r| r[0] == name)
        .and_then(|r| r[1].as_u64())
        .unwrap_or(0)
}

#[test]
fn fullnat_serves_remote_backends_from_the_lb_address() {
    let remote = Remote::new(1, 3);
    let lb = &remote.lbs[0];
    let agent = remote.serve(0, &[("web", 81, 8080, "mode = \"fullnat\"")]);

    let counts = ask_many(&remote, vip(81), 150);
    assert_eq!(counts.len(), 3, "every host answers: {counts:?}");
    for (name, n) in &counts {
        assert!(*n >= 20, "{name} got {n} of 150: {counts:?}");
    }
    // The hosts saw the LB's address, never the client's, and replies came back through it.
    for host in &remote.hosts {
        let peers = Remote::peers_seen(host);
        let from_lb = peers
            .iter()
            .filter(|p| p.starts_with(&format!("{}:", lb.addr)));
        assert!(from_lb.count() > 0, "{}: {peers:?}", host.name);
        assert!(
            !peers.iter().any(|p| p.starts_with(CLIENT_ADDR)),
            "{} saw the client address: {peers:?}",
            host.name
        );
    }
    assert!(reason(&agent, "rev_snat") > 0, "{}", agent.status());
    // Both directions left by XDP_TX (one-armed LB), except while a neighbour resolved.
    assert!(reason(&agent, "tx") > 0, "{}", agent.status());
}

#[test]
fn fullnat_and_dsr_flows_survive_an_agent_restart() {
    let remote = Remote::new(1, 3);
    remote.decap_on_hosts();
    let mut agent = remote.serve(
        0,
        &[
            ("fn", 81, 8080, "mode = \"fullnat\""),
            ("dsr", 80, 80, "mode = \"dsr\""),
        ],
    );
    let mut long: Vec<(LineConn, String)> = remote.client.run(|| {
        [81, 80]
            .iter()
            .map(|&port| LineConn::open(vip(port)))
            .collect()
    });
    let loads = [81, 80].map(|port| {
        LoadLoop::start(
            &remote.client.path(),
            vip(port),
            Duration::from_millis(20),
            300,
        )
    });
    std::thread::sleep(Duration::from_millis(400));
    agent.stop();
    std::thread::sleep(Duration::from_millis(400));
    agent.launch();
    std::thread::sleep(Duration::from_millis(600));
    for load in loads {
        let samples = load.stop();
        assert!(samples.len() > 40);
        assert!(failures(&samples).is_empty(), "{:?}", failures(&samples));
    }
    for (conn, name) in &mut long {
        assert_eq!(&conn.ask().expect("after the restart"), name);
    }
}

#[test]
fn two_front_nics_redirect_between_them() {
    let mut remote = Remote::new(1, 3);
    let back_addr = remote.add_back_nic(0);
    let agent = remote.serve_with(0, &[("web", 81, 8080, "mode = \"fullnat\"")], |config| {
        config.replace(
            "interfaces = [\"front\"]",
            "interfaces = [\"front\", \"back\"]",
        )
    });

    let counts = ask_many(&remote, vip(81), 90);
    assert_eq!(counts.len(), 3, "every host answers: {counts:?}");
    // The hosts saw the LB's address on their segment: requests left by "back"...
    for host in &remote.hosts {
        let peers = Remote::peers_seen(host);
        assert!(
            peers
                .iter()
                .any(|p| p.starts_with(&format!("{back_addr}:"))),
            "{}: {peers:?}",
            host.name
        );
    }
    // ...redirected from "front", and the replies redirected back to it.
    assert!(reason(&agent, "redirected") >= 2 * 90, "{}", agent.status());
}

#[test]
fn fullnat_holds_10k_connections_at_once_without_a_port_collision() {
    raise_fd_limit(12_000);
    let remote = Remote::new(1, 3);
    let agent = remote.serve(0, &[("web", 81, 8080, "mode = \"fullnat\"")]);
    holds_10k_connections(&remote, &agent, vip(81), &remote.lbs[0].addr);
}

/// The same over IPv6: SNAT66 to the LB's v6 address, 10k flows at once, each its own port.
#[test]
fn fullnat_over_v6_holds_10k_connections_at_once_without_a_port_collision() {
    raise_fd_limit(12_000);
    let remote = Remote::dual_stack(1, 3);
    let agent = remote.serve6(0, &[("web6", 81, 8080, "mode = \"fullnat\"")]);
    let lb6 = format!("[{}]", remote.lbs[0].addr6.as_deref().expect("dual stack"));
    holds_10k_connections(
        &remote,
        &agent,
        format!("[{VIP6}]:81").parse().unwrap(),
        &lb6,
    );
}

/// Opens 10k connections to `addr` and keeps them all open while each asks again: each
/// answered by the same host both times, every host saw them from `lb_source` (the LB's
/// address), each on a source port of its own.
fn holds_10k_connections(remote: &Remote, agent: &Agent, addr: SocketAddr, lb_source: &str) {
    const N: usize = 10_000;
    let (first, second) = remote.client.run(move || {
        let mut conns = Vec::with_capacity(N);
        let mut first = Vec::with_capacity(N);
        for i in 0..N {
            let mut conn =
                LineConn::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            first.push(conn.ask().unwrap_or_else(|e| panic!("connection {i}: {e}")));
            conns.push(conn);
        }
        // All open at once: a port shared by two of them would have broken one.
        let second: Vec<String> = conns
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                c.ask()
                    .unwrap_or_else(|e| panic!("connection {i} again: {e}"))
            })
            .collect();
        (first, second)
    });
    assert_eq!(first, second, "every connection kept its backend");
    // Each host saw one distinct LB source port per connection it served.
    let mut total = 0;
    for host in &remote.hosts {
        let peers: Vec<String> = Remote::peers_seen(host)
            .into_iter()
            .filter(|p| p.starts_with(&format!("{lb_source}:")))
            .collect();
        let distinct: BTreeSet<&String> = peers.iter().collect();
        assert_eq!(
            distinct.len(),
            peers.len(),
            "{}: a source port twice",
            host.name
        );
        total += peers.len();
    }
    assert!(total >= N, "hosts saw {total} connections");
    assert_eq!(reason(agent, "drop_snat_exhausted"), 0);
}

/// Asks the dsr services on ports 80 and 83 of `vip` 150 times each: every host answers and
/// sees the client's address. Returns the check that no reply passed the LB (anything its
/// stack receives from the VIP would be one), counted from now by an nft rule of `family`.
fn dsr_hosts_answer_the_client_directly<'a>(
    remote: &'a Remote,
    vip: &str,
    client: &str,
    family: &'static str,
) -> impl Fn() + 'a {
    let lb = &remote.lbs[0];
    lb.ns.exec(&[
        "nft",
        &format!(
            "add table {family} t; add chain {family} t pre {{ type filter hook prerouting \
             priority -300; }}; add rule {family} t pre {family} saddr {vip} counter"
        ),
    ]);
    let host_part = if vip.contains(':') {
        format!("[{vip}]")
    } else {
        vip.to_string()
    };
    for port in [80, 83] {
        let addr: SocketAddr = format!("{host_part}:{port}").parse().expect("addr");
        let counts = ask_many(remote, addr, 150);
        assert_eq!(counts.len(), 3, "{addr}: every host answers: {counts:?}");
    }
    let client = if client.contains(':') {
        format!("[{client}]:")
    } else {
        format!("{client}:")
    };
    for host in &remote.hosts {
        let peers = Remote::peers_seen(host);
        // Health checks come from the LB; every client connection shows the client.
        let from_client = peers.iter().filter(|p| p.starts_with(&client));
        assert!(from_client.count() >= 30, "{}: {peers:?}", host.name);
    }
    move || {
        let counter = lb.ns.exec(&["nft", "list", "table", family, "t"]);
        assert!(
            counter.contains("packets 0 bytes 0"),
            "replies passed the LB:\n{counter}"
        );
    }
}

#[test]
fn dsr_keeps_the_client_address_and_replies_skip_the_lb() {
    let remote = Remote::new(1, 3);
    remote.decap_on_hosts();
    let agent = remote.serve(
        0,
        &[
            ("ipip", 80, 80, "mode = \"dsr\""),
            ("gue", 83, 83, "mode = \"dsr\"\nencap = \"gue\""),
        ],
    );
    let assert_no_reply_passed_the_lb =
        dsr_hosts_answer_the_client_directly(&remote, VIP, CLIENT_ADDR, "ip");
    // Each host decapsulated its share (`xlb decap --status`).
    for host in &remote.hosts {
        let status = host.ns.exec(&[
            xlb_tests::process::binary("xlb").to_str().unwrap(),
            "decap",
            "--status",
            "--pin-path",
            &remote.decap_pin_path(host),
        ]);
        let decapsulated: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("decapsulated"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(decapsulated > 0, "{}: {status}", host.name);
    }
    assert_no_reply_passed_the_lb();
    assert!(reason(&agent, "tx") > 0, "{}", agent.status());
}

/// The same over IPv6: IPv6-in-IPv6 and GUE over v6 to the hosts' v6 addresses, which
/// decapsulate (`xlb decap` with VIP6) and answer the client from VIP6 themselves.
#[test]
fn dsr_over_v6_keeps_the_client_address_and_replies_skip_the_lb() {
    let remote = Remote::dual_stack(1, 3);
    remote.decap_on_hosts();
    let agent = remote.serve6(
        0,
        &[
            ("ipip6", 80, 80, "mode = \"dsr\""),
            ("gue6", 83, 83, "mode = \"dsr\"\nencap = \"gue\""),
        ],
    );
    let assert_no_reply_passed_the_lb =
        dsr_hosts_answer_the_client_directly(&remote, VIP6, CLIENT_ADDR6, "ip6");
    assert_no_reply_passed_the_lb();
    assert_eq!(reason(&agent, "drop_no_route"), 0, "{}", agent.status());
}

#[test]
fn dsr_path_mtu_discovery_shrinks_the_clients_segments() {
    let remote = Remote::new(1, 3);
    // No room for the encapsulation on the LB's link: full-size client segments do not fit.
    remote.lbs[0]
        .ns
        .ip(&["link", "set", "front", "mtu", "1500"]);
    remote.decap_on_hosts();
    let agent = remote.serve(0, &[("web", 80, 80, "mode = \"dsr\"")]);
    sends_20_kb_through_dsr(&remote, &agent, vip(80));
}

/// The same over IPv6: Packet Too Big from VIP6 shrinks the client's segments.
#[test]
fn dsr_over_v6_path_mtu_discovery_shrinks_the_clients_segments() {
    let remote = Remote::dual_stack(1, 3);
    remote.lbs[0]
        .ns
        .ip(&["link", "set", "front", "mtu", "1500"]);
    remote.decap_on_hosts();
    let agent = remote.serve6(0, &[("web", 80, 80, "mode = \"dsr\"")]);
    let addr: SocketAddr = format!("[{VIP6}]:80").parse().expect("addr");
    sends_20_kb_through_dsr(&remote, &agent, addr);
}

/// A 20 kB request to `addr` gets its answer, after the LB answered full-size segments
/// with "too big" (none dropped for it).
fn sends_20_kb_through_dsr(remote: &Remote, agent: &Agent, addr: SocketAddr) {
    let answer = remote.client.run(move || {
        let mut conn = LineConn::connect(addr)?;
        let mut line = vec![b'x'; 20_000];
        line.push(b'\n');
        conn.ask_with(&line)
    });
    let name = answer.expect("a 20 kB request through dsr");
    assert!(name.starts_with("host"), "{name}");
    assert!(reason(agent, "frag_needed") > 0, "{}", agent.status());
    assert_eq!(reason(agent, "drop_too_big"), 0);
}

#[test]
fn established_flows_survive_an_lb_node_failure() {
    let remote = Remote::new(2, 3);
    remote.decap_on_hosts();
    let agents: Vec<Agent> = (0..remote.lbs.len())
        .map(|i| remote.serve(i, &[("web", 80, 80, "mode = \"dsr\"")]))
        .collect();
    flows_survive_the_first_lbs_failure(&remote, &agents, vip(80));
}

/// The same over IPv6: dsr over v6 from both nodes, the router's v6 ECMP route losing one.
#[test]
fn established_v6_flows_survive_an_lb_node_failure() {
    let remote = Remote::dual_stack(2, 3);
    remote.decap_on_hosts();
    // A v6 route's next hop on a link that is down is skipped only with this.
    remote
        .router
        .sysctl("net.ipv6.conf.all.ignore_routes_with_linkdown", "1");
    let agents: Vec<Agent> = (0..remote.lbs.len())
        .map(|i| remote.serve6(i, &[("web", 80, 80, "mode = \"dsr\"")]))
        .collect();
    let addr: SocketAddr = format!("[{VIP6}]:80").parse().expect("addr");
    flows_survive_the_first_lbs_failure(&remote, &agents, addr);
}

/// Long-lived connections to `addr` spread over both LB nodes, and a load of new ones, all
/// keep their backends and answer while the first node's link goes down: the other node
/// places every flow as the first did (the same Maglev ring and flow hash).
fn flows_survive_the_first_lbs_failure(remote: &Remote, agents: &[Agent], addr: SocketAddr) {
    // Long-lived connections from many source ports: the router spreads them over both.
    let mut conns: Vec<(LineConn, String)> = remote
        .client
        .run(move || (0..40).map(|_| LineConn::open(addr)).collect());
    let through_lb1 = reason(&agents[0], "tx");
    assert!(
        through_lb1 > 0 && reason(&agents[1], "tx") > 0,
        "ECMP used one LB only"
    );

    let load = LoadLoop::start(&remote.client.path(), addr, Duration::from_millis(20), 400);
    std::thread::sleep(Duration::from_millis(500));
    // LB1 fails: its link goes down and the router drops it from the ECMP route.
    remote
        .router
        .ip(&["link", "set", &remote.lbs[0].router_if, "down"]);
    std::thread::sleep(Duration::from_secs(2));
    let lb1_after = reason(&agents[0], "tx");

    for (i, (conn, name)) in conns.iter_mut().enumerate() {
        let again = conn
            .ask()
            .unwrap_or_else(|e| panic!("connection {i} after the failover: {e}"));
        assert_eq!(&again, name, "connection {i} moved to another backend");
    }
    let samples = load.stop();
    assert!(samples.len() > 50);
    assert!(
        failures(&samples).is_empty(),
        "failed during the failover: {:?}",
        failures(&samples)
    );
    assert_eq!(reason(&agents[0], "tx"), lb1_after, "LB1 still forwarded");
}

#[test]
fn bgp_announces_the_vip_from_each_serving_lb_and_withdraws_it() {
    let mut remote = Remote::with_bgp(2, 3);
    remote.decap_on_hosts();
    let mut agents: Vec<Agent> = remote
        .lbs
        .iter()
        .map(|lb| {
            let config = remote
                .config(&lb.pin_path(), &[("web", 80, 80, "mode = \"dsr\"")])
                .replacen(
                    "[agent]\n",
                    &format!("[agent]\nannounce_table = {ANNOUNCE_TABLE}\n"),
                    1,
                );
            lb.start_agent(&config)
        })
        .collect();
    let both: Vec<String> = remote.lbs.iter().map(|lb| lb.addr.clone()).collect();
    let hops = wait_for(Duration::from_secs(20), || {
        let hops = remote.vip_next_hops();
        (hops == both).then_some(hops)
    });
    assert!(
        hops.is_some(),
        "router never learned the VIP from both LBs: {:?}",
        remote.vip_next_hops()
    );
    assert_eq!(
        ask_many(&remote, vip(80), 60).len(),
        3,
        "every host answers"
    );

    // The agent on LB1 stops: its node withdraws the VIP; the router keeps LB2 only.
    let load = LoadLoop::start(
        &remote.client.path(),
        vip(80),
        Duration::from_millis(20),
        500,
    );
    agents[0].stop();
    let only_lb2 = wait_for(Duration::from_secs(10), || {
        (remote.vip_next_hops() == [both[1].clone()]).then_some(())
    });
    assert!(
        only_lb2.is_some(),
        "LB1 still announced: {:?}",
        remote.vip_next_hops()
    );
    std::thread::sleep(Duration::from_millis(500));
    let samples = load.stop();
    assert!(
        failures(&samples).is_empty(),
        "failed while LB1 withdrew: {:?}",
        failures(&samples)
    );

    // No backend up anywhere: the last node withdraws the VIP too.
    for host in &mut remote.hosts {
        host.proc.take();
    }
    let gone = wait_for(Duration::from_secs(10), || {
        remote.vip_next_hops().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "VIP still routed with no backend up: {:?}",
        remote.vip_next_hops()
    );
    assert!(
        agents[1].log_text().contains("VIP withdrawn"),
        "{}",
        agents[1].log_text()
    );
}

/// `xlb flows` and `xlb explain` over a v6 fullnat flow: its SNAT address is the LB's v6
/// address, printed `[addr]:port`, and both name the backend that answered.
#[test]
fn flows_and_explain_show_a_v6_fullnat_flow() {
    let remote = Remote::dual_stack(1, 3);
    let agent = remote.serve6(0, &[("web6", 81, 8080, "mode = \"fullnat\"")]);
    let vip: SocketAddr = format!("[{VIP6}]:81").parse().unwrap();
    let (conn, answered) = remote.client.run(move || LineConn::open(vip));
    let local = conn.local_addr().expect("local address");
    let host = remote
        .hosts
        .iter()
        .find(|h| h.name == answered)
        .unwrap_or_else(|| panic!("{answered} is no host"));
    let backend = format!("[{}]:8080", host.addr6.as_deref().expect("dual stack"));
    let lb6 = format!("[{}]:", remote.lbs[0].addr6.as_deref().expect("dual stack"));

    let flow = agent.flow_from("web6", &local.to_string());
    assert_eq!(flow["backend"], backend, "{flow}");
    assert_eq!(flow["mode"], "fullnat", "{flow}");
    let snat = flow["snat"].as_str().unwrap_or_default();
    assert!(snat.starts_with(&lb6), "SNAT {snat}, not from {lb6}");

    let to = vip.to_string();
    let (ok, out) = agent.cli(&[
        "explain",
        "--from",
        &local.to_string(),
        "--to",
        &to,
        "--json",
    ]);
    assert!(ok, "{out}");
    let explained: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(explained["reason"], "known_flow", "{explained}");
    assert_eq!(explained["backend"]["address"], backend, "{explained}");
    assert!(
        explained["notes"].to_string().contains(snat),
        "the note names SNAT {snat}: {explained}"
    );
    drop(conn);
}

/// A dual-stack fullnat service: each VIP balances the hosts' addresses of its family, and
/// each half takes the source addresses of its family (none listed here: the LB's own
/// towards the hosts, v4 for the v4 VIP, v6 for the v6 one).
#[test]
fn a_dual_stack_fullnat_service_serves_each_family_from_the_lbs_address_of_it() {
    let remote = Remote::dual_stack(1, 3);
    let lb = &remote.lbs[0];
    let mut config = format!(
        "[agent]\ninterfaces = [\"{FRONT}\"]\npin_path = \"{}\"\n\n[[service]]\nname = \"web\"\n\
         vip = [\"{VIP}\", \"{VIP6}\"]\nport = 81\nmode = \"fullnat\"\n[service.health]\n  \
         type = \"tcp\"\n  interval = \"200ms\"\n  timeout = \"100ms\"\n",
        lb.pin_path()
    );
    for host in &remote.hosts {
        for addr in [&host.addr, host.addr6.as_ref().expect("dual stack")] {
            config += &format!("  [[service.backend]]\n  address = \"{addr}\"\n  port = 8080\n");
        }
    }
    let agent = lb.start_agent(&config);
    for half in ["web", "web.v6"] {
        agent.wait_probed_up(half, 3, Duration::from_secs(10));
    }
    let v6: SocketAddr = format!("[{VIP6}]:81").parse().unwrap();
    for (addr, family) in [(vip(81), "v4"), (v6, "v6")] {
        let counts = ask_many(&remote, addr, 60);
        assert_eq!(counts.len(), 3, "{family}: every host answers: {counts:?}");
    }
    let lb6 = format!("[{}]:", lb.addr6.as_deref().expect("dual stack"));
    for host in &remote.hosts {
        // SNAT ports on the LB's own address are below the kernel's ephemeral range, where
        // the health checks' are.
        let peers: Vec<String> = Remote::peers_seen(host)
            .into_iter()
            .filter(|p| p.rsplit(':').next().and_then(|n| n.parse::<u16>().ok()) < Some(32768))
            .collect();
        // A [::] listener shows a v4 peer v4-mapped.
        let from_v4 = peers
            .iter()
            .filter(|p| p.contains(&format!("{}]:", lb.addr)));
        let from_v6 = peers.iter().filter(|p| p.starts_with(&lb6));
        assert!(from_v4.count() > 0, "{}: {peers:?}", host.name);
        assert!(from_v6.count() > 0, "{}: {peers:?}", host.name);
    }
    assert_eq!(reason(&agent, "drop_snat_exhausted"), 0);
}

/// fullnat takes ports 1024-32767 on the LB's own address; on a host whose ephemeral range
/// reaches down there, the agent reserves them, so its own connections to a backend (a
/// proxy beside it, anything) never share a flow's reply 4-tuple. A dsr service takes no
/// ports of the host and leaves the setting alone.
#[test]
fn fullnat_keeps_the_hosts_own_connections_off_its_ports() {
    let remote = Remote::new(1, 1);
    let lb = &remote.lbs[0];
    let reserved = || {
        lb.ns
            .exec(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
            .trim()
            .to_string()
    };
    lb.ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let dsr = remote.serve(0, &[("dsr", 80, 80, "mode = \"dsr\"")]);
    assert_eq!(reserved(), "", "dsr reserved ports");
    drop(dsr);
    let agent = remote.serve(0, &[("web", 81, 8080, "mode = \"fullnat\"")]);
    wait_for(Duration::from_secs(5), || {
        (reserved() == "1024-32767").then_some(())
    })
    .unwrap_or_else(|| panic!("reserved: {:?}\n{}", reserved(), agent.log_text()));

    // The host's own connections to the backend now come from above the span...
    let backend: SocketAddr = format!("{}:8080", remote.hosts[0].addr)
        .parse()
        .expect("addr");
    let ports: Vec<u16> = lb.ns.run(move || {
        let conns: Vec<_> = (0..300)
            .map(|_| std::net::TcpStream::connect(backend).expect("connect to the backend"))
            .collect();
        conns
            .iter()
            .map(|c| c.local_addr().expect("local").port())
            .collect()
    });
    let inside: Vec<_> = ports.iter().filter(|&&p| p <= 32767).collect();
    assert!(
        inside.is_empty(),
        "host connections on fullnat ports: {inside:?}"
    );
    // ...and the service's flows still go through.
    let counts = ask_many(&remote, vip(81), 30);
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
}

/// `xlb detach` and a start with the tables made anew: the ports the first agent's closed
/// flows hold for the backends' TIME_WAIT go to the next agent, which hands them to no new
/// flow until the hold ends (snatheld.rs), and serves on.
#[test]
fn fullnat_ports_held_for_time_wait_outlive_a_detach() {
    let remote = Remote::new(1, 3);
    let mut agent = remote.serve(0, &[("web", 81, 8080, "mode = \"fullnat\"")]);
    let counts = ask_many(&remote, vip(81), 40);
    assert_eq!(counts.values().sum::<usize>(), 40);
    agent.stop();
    let pin_path = std::path::PathBuf::from(remote.lbs[0].pin_path());
    let held = xlb::snatheld::held_path(&pin_path);
    xlb::loader::detach(&pin_path).expect("detach");
    assert!(
        held.exists(),
        "detach kept the held ports in {}",
        held.display()
    );
    agent.launch();
    agent.wait_up("web", 3, Duration::from_secs(10));
    let log = agent.log_text();
    let restored: usize = log
        .lines()
        .filter(|l| l.contains("fullnat ports of the last agent held"))
        .find_map(|l| {
            l.split("ports=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no ports restored:\n{log}"));
    assert!(restored >= 40, "{restored} of 40 flows' ports:\n{log}");
    assert!(!held.exists(), "read once");
    let counts = ask_many(&remote, vip(81), 20);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
}
