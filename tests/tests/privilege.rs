//! The agent with only the capabilities docs/security.md ("Privilege") and
//! deploy/xlb.service grant: it starts, attaches and serves; without CAP_BPF it exits
//! non-zero with the reason and leaves nothing attached. Root (uid 0) with a reduced
//! bounding set, as systemd's CapabilityBoundingSet runs it: the capabilities root gets at
//! exec are the bounding set. Run as root.
use std::time::Duration;

use xlb_tests::{
    agent::Agent,
    client::tcp_name,
    topology::{FRONT, Topology},
};

/// What the agent needs, as deploy/xlb.service grants it.
const NEEDED: &str = "-all,+bpf,+net_admin,+perfmon";

fn setpriv(bounding: &str) -> Vec<String> {
    let caps = bounding.to_string();
    vec![
        "setpriv".into(),
        format!("--bounding-set={caps}"),
        format!("--inh-caps={caps}"),
        "--".into(),
    ]
}

fn agent(topo: &Topology, bounding: &str) -> Agent {
    let all: Vec<_> = topo.backends.iter().collect();
    let config = topo.config(&Agent::pin_path_for(topo), &all);
    let wrapper = setpriv(bounding);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Agent::unstarted(&topo.lb, &topo.dir, &topo.prefix, &config, &wrapper)
}

/// The `CapBnd` line of the agent's /proc status: what it may ever have.
fn bounding_set(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd line");
    u64::from_str_radix(hex.trim(), 16).expect("hex")
}

fn xdp_attached(topo: &Topology) -> bool {
    let out = topo.lb.exec(&["ip", "-d", "link", "show", "dev", FRONT]);
    out.contains("xdp")
}

#[test]
fn the_agent_serves_with_only_the_documented_capabilities() {
    let topo = Topology::new(2);
    let mut agent = agent(&topo, NEEDED);
    agent.launch();
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39; nothing else (CAP_SYS_ADMIN is 21).
    let want = (1u64 << 12) | (1 << 38) | (1 << 39);
    assert_eq!(
        bounding_set(agent.pid()),
        want,
        "the agent runs with another bounding set"
    );
    assert!(xdp_attached(&topo), "no XDP program on {FRONT}");
    let vip = topo.vip(80);
    let names: Vec<String> = topo.client.run(move || {
        (0..20)
            .map(|i| tcp_name(vip).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect()
    });
    assert_eq!(names.len(), 20);
    let (ok, status) = agent.cli(&["status"]);
    assert!(ok, "status: {status}");
    agent.stop();
}

#[test]
fn without_cap_bpf_the_agent_refuses_to_start() {
    let topo = Topology::new(1);
    let agent = agent(&topo, "-all,+net_admin,+perfmon");
    let (status, log) = agent.run_another(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("the agent kept running:\n{log}"));
    assert!(!status.success(), "exited 0:\n{log}");
    assert!(
        log.contains("CAP_BPF"),
        "the error does not name what is missing:\n{log}"
    );
    assert!(
        !xdp_attached(&topo),
        "something is attached after a failed start"
    );
}
