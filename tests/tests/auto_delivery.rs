//! The default config: static backends on a bridge of the lb host, with no `bridge` key
//! and no `xdp_mode` (`auto`). The agent finds the bridge by the backends' route and delivers
//! straight to each backend's veth, as it does for a container; on the veth front `auto`
//! picks the TC balancer. Run as root.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use xlb_tests::{
    agent::{Agent, XDP_MODE_AS_WRITTEN},
    client::tcp_name,
    topology::Topology,
};

/// What Docker does to a host: the lb namespace forwards nothing unless a rule allows it.
/// Only delivery on the bridge reaches the backends then.
fn forward_nothing(topo: &Topology) {
    topo.lb.exec(&[
        "nft",
        "add table inet filter; add chain inet filter forward { type filter hook forward priority 0; policy drop; }",
    ]);
}

fn deliveries(agent: &Agent) -> Vec<String> {
    let status = agent.status();
    let services = status["services"].as_array().cloned().unwrap_or_default();
    services
        .iter()
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| b["delivery"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn static_backends_on_a_local_bridge_are_delivered_to_their_veths_without_a_key() {
    let topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    // The default config: no bridge key, no xdp_mode (the harness would set "driver").
    let config = XDP_MODE_AS_WRITTEN.to_string() + &topo.config(&Agent::pin_path_for(&topo), &all);
    assert!(!config.contains("bridge"), "no bridge key: {config}");
    assert!(!config.contains("xdp_mode ="), "no attach mode: {config}");
    forward_nothing(&topo);
    let direct: SocketAddr = "10.99.2.11:8080".parse().expect("addr");
    assert!(
        topo.client.run(move || tcp_name(direct)).is_err(),
        "the policy drops routed traffic"
    );

    let agent = Agent::start(&topo, &config);
    assert!(
        agent.links().contains(&"tc_reply_br0".to_string()),
        "{:?}",
        agent.links()
    );
    // Both services' three backends, each through its own veth.
    agent.wait_for_veths(6, Duration::from_secs(15));
    let before = agent.verdicts("delivered_peer");
    let vip = topo.vip(80);
    let names: Vec<String> = topo.client.run(move || {
        (0..60)
            .map(|i| tcp_name(vip).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect()
    });
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "each backend answers with its name: {names:?}"
    );
    let handed = agent.verdicts("delivered_peer") - before;
    assert!(
        handed > 2 * 60,
        "{handed} packets handed to a backend's eth0"
    );
    let log = topo.backends[0].proc.as_ref().expect("running").log_text();
    assert!(
        log.contains("be1 tcp from 10.99.1.2:"),
        "client address kept: {log}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("on a bridge of this host (by its route)"),
        "the agent says why: {log}"
    );
    // `auto` put the TC balancer on the veth front, and said why.
    assert_eq!(agent.status()["interfaces"][0]["xdp_mode"], "tc");
    let why = log
        .lines()
        .find(|l| l.contains("xdp_mode auto:"))
        .unwrap_or_else(|| panic!("no line on the attach mode: {log}"));
    assert!(why.contains("veth") && why.contains("tc"), "{why}");
}

#[test]
fn bridge_none_keeps_a_backend_on_a_local_bridge_routed() {
    let topo = Topology::new(1);
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo
        .config(&Agent::pin_path_for(&topo), &all)
        .replace("  port = 8080\n", "  port = 8080\n  bridge = \"none\"\n");
    let agent = Agent::start(&topo, &config);
    agent.wait_up("web", 1, Duration::from_secs(10));
    let vip = topo.vip(80);
    let name = topo
        .client
        .run(move || tcp_name(vip).expect("routed by the kernel"));
    assert_eq!(name, "be1");
    assert_eq!(deliveries(&agent), ["routed", "routed"]);
    assert!(
        !agent.links().iter().any(|l| l.starts_with("tc_reply_")),
        "{:?}",
        agent.links()
    );
}
