//! Flow tables of another size than the pinned ones (lb-userspace/src/loader/resize.rs):
//! a restart with a larger `flow_table_size` makes new tables and moves the live flows; a
//! reload that would need larger tables is refused. Same netns topology as nat.rs. Root.
use std::time::Duration;

use xlb::{datapath::CONNTRACK, layout::Layout};
use xlb_tests::{agent::Agent, client::LineConn, topology::Topology};

fn with_flow_table(config: &str, size: u32) -> String {
    config.replacen(
        "[agent]\n",
        &format!("[agent]\nflow_table_size = {size}\n"),
        1,
    )
}

/// Pinned flow-table entries.
fn pinned_flows(pin: &str) -> u32 {
    Layout::of_pins(std::path::Path::new(pin))
        .expect("reading the pins")
        .expect("pinned")
        .flows
}

#[test]
fn a_restart_with_a_larger_flow_table_keeps_every_connection_on_its_backend() {
    let topo = Topology::new(4);
    let pin = Agent::pin_path_for(&topo);
    let two: Vec<_> = topo.backends.iter().take(2).collect();
    let all: Vec<_> = topo.backends.iter().collect();
    let mut agent = Agent::start(&topo, &with_flow_table(&topo.config(&pin, &two), 4096));
    agent.wait_up("web", 2, Duration::from_secs(10));
    assert_eq!(pinned_flows(&pin), 4096);
    let vip = topo.vip(80);
    let conns: Vec<(LineConn, String)> = topo
        .client
        .run(move || (0..24).map(|_| LineConn::open(vip)).collect());

    // Four backends now: a flow whose entry were lost would be balanced again, to be1..be4,
    // and a connection sent to another backend gets a reset.
    agent.restart_with(&with_flow_table(&topo.config(&pin, &all), 65_536));
    agent.wait_up("web", 4, Duration::from_secs(10));
    assert_eq!(pinned_flows(&pin), 65_536, "the flow table was made anew");
    assert!(
        agent.log_text().contains("flow tables resized"),
        "{}",
        agent.log_text()
    );
    assert!(
        !std::path::Path::new(&pin)
            .join(format!("resizing_{CONNTRACK}"))
            .exists()
    );

    let moved = topo.client.run(move || {
        conns
            .into_iter()
            .filter_map(|(mut c, first)| match c.ask() {
                Ok(now) if now == first => None,
                other => Some(format!("{first} -> {other:?}")),
            })
            .collect::<Vec<_>>()
    });
    assert!(
        moved.is_empty(),
        "connections that moved or broke: {moved:?}"
    );
}

#[test]
fn a_reload_to_a_larger_flow_table_is_refused_and_connections_stay() {
    let topo = Topology::new(2);
    let pin = Agent::pin_path_for(&topo);
    let all: Vec<_> = topo.backends.iter().collect();
    let base = topo.config(&pin, &all);
    let agent = Agent::start(&topo, &with_flow_table(&base, 4096));
    agent.wait_up("web", 2, Duration::from_secs(10));
    let vip = topo.vip(80);
    let (conn, first) = topo.client.run(move || LineConn::open(vip));

    let (ok, out) = agent.reload(&with_flow_table(&base, 65_536));
    assert!(!ok, "a reload that needs larger maps went through: {out}");
    assert!(out.contains("XLB_CONNTRACK_V3 holds 4096"), "{out}");
    assert_eq!(pinned_flows(&pin), 4096);
    let now = topo.client.run(move || {
        let mut c = conn;
        c.ask()
    });
    assert_eq!(now.ok().as_deref(), Some(first.as_str()));
    // A smaller table fits: that reload goes through (the tables stay as they are).
    let (ok, out) = agent.reload(&with_flow_table(&base, 2048));
    assert!(ok, "{out}");
}
