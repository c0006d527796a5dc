//! `xlb trace`: live records of real connections through the control socket: `--count N`
//! prints N records, each naming the backend that answered that connection, and `--from`
//! leaves out other sources. Same netns topology as nat.rs. Run as root.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use xlb_tests::{agent::Agent, client::LineConn, topology::Topology, trace};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);

/// Opens (and closes) one connection; its client port and the backend that answered.
fn connect(topo: &Topology) -> (u16, String) {
    let vip = topo.vip(80);
    topo.client.run(move || {
        let (conn, name) = LineConn::open(vip);
        (conn.local_addr().expect("local address").port(), name)
    })
}

#[test]
fn trace_prints_count_records_naming_the_backend_that_answered_and_from_filters() {
    let topo = Topology::new(3);
    let all: Vec<_> = topo.backends.iter().collect();
    let agent = Agent::start(&topo, &topo.config(&Agent::pin_path_for(&topo), &all));
    agent.wait_up("web", 3, Duration::from_secs(5));
    let address: BTreeMap<String, SocketAddrV4> = topo
        .backends
        .iter()
        .map(|b| {
            let ip: Ipv4Addr = b.addr.parse().expect("backend address");
            (b.name.clone(), SocketAddrV4::new(ip, 8080))
        })
        .collect();

    // Connections until the trace has its 8 records (bounded in count and time).
    let mut traced = trace::start(
        &topo,
        &agent,
        "trace",
        &["--count", "8", "--from", "10.99.1.2/32"],
    );
    let answered = trace::until_done(&mut traced, || connect(&topo));
    let records = trace::lines(&traced);
    assert_eq!(records.len(), 8, "{}", traced.log_text());
    for r in &records {
        assert_eq!(
            (r.service.as_str(), r.client.ip()),
            ("web", CLIENT.into()),
            "{r:?}"
        );
        let name = answered
            .get(&r.client.port())
            .unwrap_or_else(|| panic!("a record of no connection made: {r:?}"));
        assert_eq!(
            r.backend,
            Some(address[name].into()),
            "the record names {name}: {r:?}"
        );
        assert_eq!(
            r.vip,
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 100, 1), 80).into()
        );
        // Routed, or (a backend on a local bridge) handed to its veth.
        assert!(
            r.verdict == "forwarded" || r.verdict == "delivered_peer",
            "{r:?}"
        );
    }
    assert!(records.iter().any(|r| r.new_flow), "a SYN is a new flow");

    // Another source's trace sees none of this client's packets.
    let mut other = trace::start(
        &topo,
        &agent,
        "other",
        &["--count", "1", "--from", "10.99.9.0/24"],
    );
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..20 {
        connect(&topo);
    }
    assert!(
        other.is_running(),
        "no record ended it: {}",
        other.log_text()
    );
    other.stop(Duration::from_secs(5));
    assert!(trace::lines(&other).is_empty(), "{}", other.log_text());
}

/// Packets dropped before a backend is chosen are traced too, with the reason: an allow list
/// that refuses the client, and a service whose only backend is down.
#[test]
fn trace_shows_drops_before_a_backend_is_chosen() {
    let mut topo = Topology::new(1);
    let all: Vec<_> = topo.backends.iter().collect();
    let mut config = topo.config(&Agent::pin_path_for(&topo), &all);
    let vip = topo.vip(80).ip().to_string();
    config += &format!(
        "\n[[service]]\nname = \"admin\"\nvip = \"{vip}\"\nport = 82\nallow = [\"10.99.3.0/24\"]\n\
         [service.health]\n  type = \"tcp\"\n  interval = \"200ms\"\n  timeout = \"100ms\"\n\
         [[service.backend]]\n  address = \"{}\"\n  port = 8080\n",
        topo.backends[0].addr
    );
    let agent = Agent::start(&topo, &config);
    agent.wait_up("web", 1, Duration::from_secs(5));

    let refused = |topo: &Topology, port: u16| {
        let vip = topo.vip(port);
        topo.client.run(move || {
            let _ = LineConn::connect_within(vip, Duration::from_millis(300));
        });
    };
    let mut traced = trace::start(
        &topo,
        &agent,
        "admin",
        &["--count", "1", "--service", "admin"],
    );
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        if !traced.is_running() {
            break;
        }
        refused(&topo, 82);
    }
    assert!(
        traced.wait_exit(Duration::from_secs(5)).is_some(),
        "no record of {} drops: {}",
        agent.verdicts("drop_not_allowed"),
        traced.log_text()
    );
    let records = trace::lines(&traced);
    assert_eq!(records.len(), 1, "{}", traced.log_text());
    let r = &records[0];
    assert_eq!(
        (
            r.service.as_str(),
            r.verdict.as_str(),
            r.backend,
            r.rewrite.as_str()
        ),
        ("admin", "drop_not_allowed", None, "none"),
        "{r:?}"
    );
    assert_eq!(r.client.ip(), CLIENT);

    // The only backend of web killed: once it is down, a new flow has nowhere to go.
    let down = format!("{}:8080", topo.backends[0].addr);
    topo.kill_backend(0);
    agent.wait_state("web", &down, "down", Duration::from_secs(5));
    let mut traced = trace::start(&topo, &agent, "web", &["--count", "1", "--service", "web"]);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        if !traced.is_running() {
            break;
        }
        refused(&topo, 80);
    }
    assert!(
        traced.wait_exit(Duration::from_secs(5)).is_some(),
        "{}",
        traced.log_text()
    );
    let records = trace::lines(&traced);
    assert_eq!(records.len(), 1, "{}", traced.log_text());
    assert_eq!(
        (records[0].verdict.as_str(), records[0].backend),
        ("drop_no_backend", None),
        "{:?}",
        records[0]
    );
}
