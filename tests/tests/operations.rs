//! The agent in operation: health checks, drain, restarts and reloads under a request loop,
//! and the metrics. Same netns topology as nat.rs; health checks probe every 200 ms with
//! fall 2 / rise 2. Run as root.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::Agent,
    client::{LineConn, LoadLoop, Sample, failures, http_get, tcp_name, udp_name},
    process::wait_for,
    topology::Topology,
};

/// One new connection every 20 ms.
const PACE: Duration = Duration::from_millis(20);

fn start(backends: usize) -> (Topology, Agent) {
    let topo = Topology::new(backends);
    let all: Vec<_> = topo.backends.iter().collect();
    let agent = Agent::start(&topo, &topo.config(&Agent::pin_path_for(&topo), &all));
    (topo, agent)
}

fn answered_by<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.answer.as_deref() == Ok(name))
        .collect()
}

#[test]
fn dead_backend_leaves_after_fall_probes_and_returns_after_rise() {
    let (mut topo, agent) = start(3);
    let dns = topo.vip(53);
    // A UDP flow pinned to be2 must move when be2 dies.
    let (sticky, first) = topo.client.run(move || {
        (41000..41100)
            .find_map(|port| {
                let socket = UdpSocket::bind(SocketAddr::from(([10, 99, 1, 2], port))).ok()?;
                let name = udp_name(&socket, dns).ok()?;
                (name == "be2").then_some((socket, name))
            })
            .expect("a source port that hashes to be2")
    });
    assert_eq!(first, "be2");

    let load = LoadLoop::start(&topo.client.path(), topo.vip(80), PACE, 400);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    topo.kill_backend(1);
    agent.wait_state("web", "10.99.2.12:8080", "down", Duration::from_secs(2));
    let detected = killed.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let samples = load.stop();

    // After the detection window nothing fails and nothing goes to be2.
    let late: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at > killed + detected)
        .cloned()
        .collect();
    assert!(
        late.len() > 50,
        "the loop kept running: {} samples",
        late.len()
    );
    assert!(
        failures(&late).is_empty(),
        "failures after detection ({detected:?}): {:?}",
        failures(&late)
    );
    let early_failures = failures(&samples).len();
    assert!(
        early_failures <= 40,
        "{early_failures} failures while detecting"
    );
    assert!(
        detected < Duration::from_millis(1200),
        "detected after {detected:?}"
    );

    // The UDP flow pinned to be2 re-hashed to a live backend.
    let moved = topo
        .client
        .run(move || udp_name(&sticky, dns).expect("re-hashed flow answered"));
    assert_ne!(moved, "be2");

    // be2 comes back after `rise` good probes and takes new flows again.
    topo.restart_backend(1);
    agent.wait_state("web", "10.99.2.12:8080", "up", Duration::from_secs(2));
    let vip = topo.vip(80);
    let names: Vec<String> = topo
        .client
        .run(move || (0..150).map(|_| tcp_name(vip).expect("served")).collect());
    assert!(
        names.iter().any(|n| n == "be2"),
        "be2 takes flows again: {names:?}"
    );
}

#[test]
fn drain_keeps_established_flows_and_stops_new_ones() {
    let (topo, agent) = start(3);
    let vip = topo.vip(80);
    let (conn, name) = topo.client.run(move || LineConn::open(vip));
    let address = &topo
        .backends
        .iter()
        .find(|b| b.name == name)
        .expect("backend")
        .addr;
    let endpoint = format!("{address}:8080");

    let (ok, out) = agent.cli(&["drain", "web", &endpoint]);
    assert!(ok, "drain: {out}");
    assert_eq!(
        agent
            .backends("web")
            .into_iter()
            .find(|(a, _)| *a == endpoint)
            .map(|(_, s)| s)
            .unwrap_or_default(),
        "drain"
    );
    let (conn, same, fresh) = topo.client.run(move || {
        let mut c = conn;
        let same: Vec<String> = (0..10).map(|_| c.ask().expect("old connection")).collect();
        let fresh: Vec<String> = (0..150).map(|_| tcp_name(vip).expect("new")).collect();
        (c, same, fresh)
    });
    assert!(
        same.iter().all(|n| *n == name),
        "established flow kept on {name}: {same:?}"
    );
    assert!(!fresh.contains(&name), "no new flows to the drained {name}");

    let (ok, out) = agent.cli(&["undrain", "web", &endpoint]);
    assert!(ok, "undrain: {out}");
    let fresh: Vec<String> = topo
        .client
        .run(move || (0..150).map(|_| tcp_name(vip).expect("new")).collect());
    assert!(
        fresh.contains(&name),
        "{name} takes new flows after undrain"
    );
    drop(conn);

    let (ok, out) = agent.cli(&["drain", "web", "10.99.2.99:8080"]);
    assert!(
        !ok && out.contains("has no backend 10.99.2.99:8080"),
        "{out}"
    );
}

/// The loop answers while an apply is under way (held through the agent's test hook, as a
/// long Maglev build holds it): a drain is answered once its apply is done (so is the same
/// drain asked again meanwhile), and a command that needs no apply is answered at once.
#[test]
fn commands_are_answered_while_an_apply_runs() {
    let (topo, agent) = start(3);
    let first = format!("{}:8080", topo.backends[0].addr);
    let second = format!("{}:8080", topo.backends[1].addr);
    let patience = Duration::from_secs(10);
    let held = agent.hold_applies();
    let (agent_ref, first_ref, second_ref) = (&agent, first.as_str(), second.as_str());
    std::thread::scope(|s| {
        let (drain_tx, drained) = mpsc::channel();
        s.spawn(move || drain_tx.send(agent_ref.cli(&["drain", "web", first_ref])));
        wait_for(patience, || {
            let log = agent.log_text();
            log.contains("apply held while this file exists")
                .then_some(())
        })
        .expect("the drain's apply is held");
        // `second` is not drained: undraining it needs no apply.
        let (undrain_tx, undrained) = mpsc::channel();
        s.spawn(move || undrain_tx.send(agent_ref.cli(&["undrain", "web", second_ref])));
        let (ok, out) = undrained
            .recv_timeout(patience)
            .expect("the loop answers while an apply runs");
        assert!(ok, "undrain: {out}");
        assert!(
            drained.try_recv().is_err(),
            "the drain is answered only once its apply is done"
        );
        let (again_tx, again) = mpsc::channel();
        s.spawn(move || again_tx.send(agent_ref.cli(&["drain", "web", first_ref])));
        assert!(
            again.recv_timeout(Duration::from_secs(1)).is_err(),
            "the same drain asked again waits for the same apply"
        );
        drop(held);
        for answer in [drained, again] {
            let (ok, out) = answer
                .recv_timeout(patience)
                .expect("the drain is answered after its apply");
            assert!(ok && out.contains("drained"), "drain: {out}");
        }
    });
    let state = agent
        .backends("web")
        .into_iter()
        .find(|(a, _)| *a == first)
        .map(|(_, s)| s);
    assert_eq!(state.as_deref(), Some("drain"));
}

#[test]
fn agent_restart_and_reload_under_load_fail_nothing() {
    let (mut topo, mut agent) = start(3);
    let vip = topo.vip(80);
    let (conn, name) = topo.client.run(move || LineConn::open(vip));
    let load = LoadLoop::start(&topo.client.path(), vip, PACE, 500);
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    agent.launch();
    assert!(
        agent.log_text().contains("adopted=true"),
        "{}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));

    topo.add_backend();
    let all: Vec<_> = topo.backends.iter().collect();
    let (ok, out) = agent.reload(&topo.config(&Agent::pin_path_for(&topo), &all));
    assert!(ok, "reload: {out}");
    std::thread::sleep(Duration::from_millis(600));
    let samples = load.stop();

    assert!(samples.len() > 50, "{} samples", samples.len());
    assert!(
        failures(&samples).is_empty(),
        "failed requests: {:?}",
        failures(&samples)
    );
    assert!(
        !answered_by(&samples, "be4").is_empty(),
        "the new backend takes new flows"
    );
    let same = topo.client.run(move || {
        let mut c = conn;
        c.ask()
            .expect("the established connection survived restart and reload")
    });
    assert_eq!(same, name);
}

/// What a reload may change: services, rings and backends (not counters or probe times).
fn shape(agent: &Agent) -> Vec<String> {
    let status = agent.status();
    let mut out = Vec::new();
    for svc in status["services"].as_array().expect("services") {
        out.push(format!(
            "{} {}:{} ring {}",
            svc["name"], svc["vip"], svc["port"], svc["table_size"]
        ));
        for b in svc["backends"].as_array().expect("backends") {
            out.push(format!(
                "  {} id {} weight {} {}",
                b["address"], b["id"], b["weight"], b["state"]
            ));
        }
    }
    out
}

#[test]
fn invalid_reload_keeps_the_running_state() {
    let (topo, agent) = start(2);
    let before = shape(&agent);
    let all: Vec<_> = topo.backends.iter().collect();
    let bad = topo.config(&Agent::pin_path_for(&topo), &all).replacen(
        "port = 80\n",
        "port = 80\ntable_size = 65536\n",
        1,
    );
    let (ok, out) = agent.reload(&bad);
    assert!(!ok, "an invalid config must be rejected");
    // Line 11: the harness adds agent.xdp_mode and agent.control on lines 2 and 3.
    assert!(
        out.contains("xlb.toml:11: service[0].table_size: 65536 must be a prime"),
        "{out}"
    );
    assert_eq!(shape(&agent), before);
    let vip = topo.vip(80);
    topo.client
        .run(move || tcp_name(vip).expect("still served"));

    // SIGHUP with the same bad file: logged, state kept.
    agent.proc.as_ref().expect("running").signal(libc::SIGHUP);
    wait_for(Duration::from_secs(2), || {
        agent
            .log_text()
            .contains("reload rejected, the running state is kept")
            .then_some(())
    })
    .expect("the rejection is logged");
    assert_eq!(shape(&agent), before);
}

#[test]
fn all_backends_down_answers_nothing_and_says_why() {
    let (mut topo, agent) = start(2);
    topo.kill_backend(0);
    topo.kill_backend(1);
    agent.wait_state("web", "10.99.2.11:8080", "down", Duration::from_secs(2));
    agent.wait_state("web", "10.99.2.12:8080", "down", Duration::from_secs(2));
    let vip = topo.vip(80);
    let result = topo.client.run(move || tcp_name(vip));
    assert!(result.is_err(), "nothing answers: {result:?}");
    let web = agent.service("web");
    let problem = web["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("no backend can take new flows (2 backends: 2 down"),
        "{web}"
    );
    let (_, table) = agent.cli(&["status"]);
    assert!(
        table.contains("!! no backend can take new flows"),
        "{table}"
    );
    let api: SocketAddr = "127.0.0.1:9900".parse().unwrap();
    let metrics = topo
        .lb
        .run(move || http_get(api, "/metrics").expect("metrics"));
    assert!(
        metrics.contains("xlb_service_backends_up{service=\"web\"} 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("xlb_verdicts_total{reason=\"drop_no_backend\"} 0\n"),
        "{metrics}"
    );
}

/// Parses Prometheus text strictly enough to catch format errors: every sample line is
/// `name{labels} value`, every family has HELP and TYPE first.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().expect("name").to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line == "# EOF" {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = series.split('{').next().expect("name");
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            typed.contains(family) || typed.contains(name),
            "no TYPE for {name}"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

#[test]
fn metrics_parse_and_match_the_traffic_sent() {
    let (topo, agent) = start(3);
    let vip = topo.vip(80);
    let names: Vec<String> = topo
        .client
        .run(move || (0..300).map(|_| tcp_name(vip).expect("served")).collect());
    let api: SocketAddr = "127.0.0.1:9900".parse().unwrap();
    let text = topo
        .lb
        .run(move || http_get(api, "/metrics").expect("metrics"));
    let m = parse_metrics(&text);

    let new_flows = m[r#"xlb_service_new_flows_total{service="web"}"#];
    assert!(
        (new_flows - 300.0).abs() <= 3.0,
        "new flows {new_flows} for 300 connections"
    );
    for b in &topo.backends {
        let sent = names.iter().filter(|n| **n == b.name).count() as f64;
        let key = format!(
            r#"xlb_backend_new_flows_total{{service="web",backend="{}:8080"}}"#,
            b.addr
        );
        let counted = m[&key];
        assert!(
            (counted - sent).abs() <= (sent * 0.01).max(1.0),
            "{key}: {counted} vs {sent} sent"
        );
        let up = format!(
            r#"xlb_backend_up{{service="web",backend="{}:8080"}}"#,
            b.addr
        );
        assert_eq!(m[&up], 1.0);
    }
    // Each connection: SYN, ACK, request, ACK of the answer, FIN, last ACK: at least 5
    // client packets, and the status agrees with the metrics.
    let packets = m[r#"xlb_service_packets_total{service="web"}"#];
    assert!(packets >= 1500.0, "{packets} packets");
    let web = agent.service("web");
    assert!(web["counters"]["packets"].as_f64().unwrap() >= packets);
    // The backends are on br0: once their veths are found, packets count as handed over.
    let sent = m[r#"xlb_verdicts_total{reason="forwarded"}"#]
        + m.get(r#"xlb_verdicts_total{reason="delivered_peer"}"#)
            .copied()
            .unwrap_or(0.0);
    assert!(
        sent >= packets,
        "{sent} forwarded or handed over, {packets} packets"
    );
    assert!(
        m[r#"xlb_probe_duration_seconds_count{service="web",backend="10.99.2.11:8080"}"#] >= 1.0
    );
    assert!(m[r#"xlb_ring_rebuilds_total{service="web"}"#] >= 1.0);
}

#[test]
fn http_and_udp_probes_judge_backends() {
    let topo = Topology::new(2);
    let all: Vec<_> = topo.backends.iter().collect();
    let base = topo.config(&Agent::pin_path_for(&topo), &all);
    // web: HTTP on the backends' port 8081; dns: a UDP round trip on the service port.
    let http = |path: &str| {
        base.replacen(
            "type = \"tcp\"",
            &format!("type = \"http\"\n  port = 8081\n  path = \"{path}\""),
            1,
        )
        .replacen("type = \"tcp\"", "type = \"udp\"", 1)
    };
    let agent = Agent::start(&topo, &http("/status/503"));
    agent.wait_state("web", "10.99.2.11:8080", "down", Duration::from_secs(2));
    let web = agent.service("web");
    assert_eq!(
        web["backends"][0]["last_probe"]["detail"], "HTTP 503 (expected 200)",
        "{web}"
    );

    let (ok, out) = agent.reload(&http("/"));
    assert!(ok, "reload: {out}");
    agent.wait_state("web", "10.99.2.11:8080", "up", Duration::from_secs(2));
    let vip = topo.vip(80);
    assert!(topo.client.run(move || tcp_name(vip)).is_ok());

    let dns_state = |agent: &Agent| {
        let dns = agent.service("dns");
        (
            dns["backends"][1]["state"].clone(),
            dns["backends"][1]["last_probe"]["detail"].clone(),
        )
    };
    assert_eq!(dns_state(&agent).0, "up");
    let mut topo = topo;
    topo.kill_backend(1);
    let down = wait_for(Duration::from_secs(2), || {
        let (state, detail) = dns_state(&agent);
        (state == "down").then_some(detail)
    })
    .expect("the UDP probe notices the dead backend");
    assert!(
        down.as_str().unwrap_or_default().contains("refused"),
        "{down}"
    );
}

#[test]
fn the_api_can_listen_on_a_unix_socket() {
    let topo = Topology::new(1);
    let all: Vec<_> = topo.backends.iter().collect();
    let socket = topo.dir.join("xlb.sock");
    let config = topo.config(&Agent::pin_path_for(&topo), &all).replacen(
        "[agent]\n",
        &format!("[agent]\napi = \"unix:{}\"\n", socket.display()),
        1,
    );
    let agent = Agent::start(&topo, &config);
    let api = format!("unix:{}", socket.display());
    let (ok, out) = agent.cli(&["status", "--api", &api]);
    assert!(ok && out.contains("SERVICE web"), "{out}");
    let (ok, _) = agent.cli(&["status"]);
    assert!(!ok, "nothing listens on TCP 9900");
}
