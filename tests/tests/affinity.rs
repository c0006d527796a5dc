//! Source affinity (`hash = "source"`): every flow of one client address goes to one
//! backend, the same on every LB node with the same config; `hash = "flow"` spreads them.
//! BPF_PROG_TEST_RUN first, then real connections through one and two LB nodes. Run as root.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use std::time::Duration;

use xlb_tests::{agent::Agent, client::tcp_name, remote::Remote, testrun::*, topology::Topology};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);

fn backends() -> Vec<(SocketAddrV4, u32)> {
    (11..14)
        .map(|l| (SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, l), 8080), 100))
        .collect()
}

/// Service "web" (nat, three backends) with `hash = HASH`.
fn web(hash: &str) -> String {
    service_toml("web", WEB, "tcp", &backends()).replace(
        "mode = \"nat\"\n",
        &format!("mode = \"nat\"\nhash = \"{hash}\"\n"),
    )
}

/// Where XDP sends a SYN from `from`.
fn picked(dp: &LoadedDatapath, from: SocketAddrV4) -> SocketAddrV4 {
    let pkt = Packet::tcp(from, WEB).with_tcp_flags(TCP_SYN);
    let out = dp.xdp(&pkt.build());
    assert_eq!(out.action, XDP_PASS, "{}", xdp_action_name(out.action));
    SocketAddrV4::new(
        ipv4_at(&out.data, pkt.l3_off() + IP_DADDR),
        be16(&out.data, pkt.l4_off() + L4_DPORT),
    )
}

/// Backends picked for 200 source ports of each of `clients` client addresses.
fn spread(dp: &LoadedDatapath, clients: u8) -> Vec<BTreeMap<SocketAddrV4, usize>> {
    (0..clients)
        .map(|c| {
            let addr = Ipv4Addr::new(10, 99, 1, 2 + c);
            let mut counts = BTreeMap::new();
            for port in 0..200u16 {
                let backend = picked(dp, SocketAddrV4::new(addr, 20000 + port));
                *counts.entry(backend).or_insert(0) += 1;
            }
            counts
        })
        .collect()
}

#[test]
fn source_hash_sends_every_port_of_a_client_to_one_backend() {
    let dp = LoadedDatapath::new(&web("source"));
    let per_client = spread(&dp, 30);
    for (c, counts) in per_client.iter().enumerate() {
        assert_eq!(counts.len(), 1, "client {c}: {counts:?}");
    }
    // Different clients still spread over the backends.
    let used: std::collections::BTreeSet<_> =
        per_client.iter().flat_map(|c| c.keys().copied()).collect();
    assert_eq!(used.len(), 3, "30 clients used {used:?}");
    // The flow tables still hold each connection on its own.
    assert_eq!(dp.datapath().conntrack().unwrap().len(), 30 * 200);
}

#[test]
fn flow_hash_spreads_the_ports_of_a_client() {
    let dp = LoadedDatapath::new(&web("flow"));
    let counts = &spread(&dp, 1)[0];
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in counts {
        assert!(*n >= 30, "{backend} got {n} of 200: {counts:?}");
    }
}

#[test]
fn a_reload_to_source_hash_moves_new_flows_only() {
    let mut dp = LoadedDatapath::new(&web("flow"));
    let client = |port| SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), port);
    let before: Vec<_> = (0..50).map(|p| picked(&dp, client(30000 + p))).collect();
    dp.apply(&web("source"));
    // Known flows keep their backend (conntrack); new ones all go to one.
    for (p, backend) in before.iter().enumerate() {
        assert_eq!(picked(&dp, client(30000 + p as u16)), *backend, "flow {p}");
    }
    let fresh: std::collections::BTreeSet<_> =
        (0..50).map(|p| picked(&dp, client(40000 + p))).collect();
    assert_eq!(fresh.len(), 1, "{fresh:?}");
}

/// Backend names answering `n` new connections to `vip` from the client namespace.
fn names(client: &xlb_tests::netns::Netns, vip: std::net::SocketAddr, n: usize) -> Vec<String> {
    client.run(move || {
        (0..n)
            .map(|i| tcp_name(vip).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect()
    })
}

fn distinct(names: &[String]) -> std::collections::BTreeSet<String> {
    names.iter().cloned().collect()
}

#[test]
fn real_connections_of_one_client_stick_to_one_backend() {
    let topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(&topo), &all);
    // "web" by source, "dns" stays by flow: one is rewritten, the other kept as a contrast.
    let sticky = config.replacen("port = 80\n", "port = 80\nhash = \"source\"\n", 1);
    assert_ne!(sticky, config);
    let agent = Agent::start(&topo, &sticky);
    agent.wait_up("web", 3, Duration::from_secs(5));
    let got = names(&topo.client, topo.vip(80), 60);
    assert_eq!(distinct(&got).len(), 1, "hash = source: {got:?}");
    // xlb explain gives any new port of this client that backend, by the client's hash.
    for port in [45000, 45001, 61234] {
        let from = format!("{}:{port}", xlb_tests::topology::CLIENT_ADDR);
        let to = topo.vip(80).to_string();
        let (ok, out) = agent.cli(&["explain", "--from", &from, "--to", &to, "--json"]);
        assert!(ok, "{out}");
        let answer: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(answer["service"]["hash"], "source", "{answer}");
        let addr = answer["backend"]["address"].as_str().unwrap_or_default();
        let named = topo
            .backends
            .iter()
            .find(|b| format!("{}:8080", b.addr) == addr);
        assert_eq!(named.map(|b| &b.name), Some(&got[0]), "{answer}");
    }

    // The same connections by flow spread (a reload switches the service's hash).
    let (ok, out) = agent.reload(&config);
    assert!(ok, "{out}");
    let got = names(&topo.client, topo.vip(80), 60);
    assert_eq!(distinct(&got).len(), 3, "hash = flow: {got:?}");
}

#[test]
fn two_lb_nodes_send_a_client_to_the_same_backend() {
    let remote = Remote::new(2, 3);
    let services = [("web", 81, 8080, "mode = \"fullnat\"\nhash = \"source\"")];
    let agents: Vec<Agent> = (0..2).map(|i| remote.serve(i, &services)).collect();
    let vip: std::net::SocketAddr = format!("{}:81", xlb_tests::topology::VIP).parse().unwrap();
    let got = names(&remote.client, vip, 80);
    // The router's ECMP hash (L4) spread the connections over both nodes...
    for (i, agent) in agents.iter().enumerate() {
        let flows = agent.service("web")["counters"]["new_flows"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            flows > 0,
            "LB node {i} got no connection: {}",
            agent.status()
        );
    }
    // ...and both sent them to one backend.
    assert_eq!(distinct(&got).len(), 1, "{got:?}");
}
