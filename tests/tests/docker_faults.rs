//! Docker discovery under faults, against a real dockerd: signals that do not stop a
//! container, an API that fails or stalls some requests (through a fault-injecting proxy in
//! front of the daemon's socket), and an agent that starts while Docker is down. Run as root.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

#[path = "support/docker_lb.rs"]
mod docker_lb;
use docker_lb::{PACE, VIP, config, config_with, docker_host, names, names_on, short, web_labels};
use xlb_tests::{
    agent::Agent,
    client::{LoadLoop, failures, http_get},
    docker::{
        DaemonOptions, DockerHost, TCP_PORT,
        faults::{Fault, FaultProxy},
    },
    netns::{Netns, veth},
    process::{Proc, wait_for},
    topology::start_test_backend,
};

/// `web`'s backends as `xlb status` shows them, sorted: (address, state).
fn web_backends(agent: &Agent) -> Vec<(String, String)> {
    let mut b = agent.backends("web");
    b.sort();
    b
}

/// `ADDRESS:9000` of each container, sorted.
fn addresses(host: &DockerHost, ids: &[&String]) -> Vec<String> {
    let mut a: Vec<String> = ids
        .iter()
        .map(|id| format!("{}:{TCP_PORT}", host.inspect_ip(id, "bridge")))
        .collect();
    a.sort();
    a
}

/// Each address in state `up`.
fn all_up(addresses: &[String]) -> Vec<(String, String)> {
    addresses.iter().map(|a| (a.clone(), "up".into())).collect()
}

/// The `discovery` entry of `source` in `xlb status --json`.
fn source_status(agent: &Agent, source: &str) -> serde_json::Value {
    let status = agent.status();
    let sources = status["discovery"].as_array().cloned().unwrap_or_default();
    sources
        .into_iter()
        .find(|s| s["source"] == source)
        .unwrap_or_default()
}

fn wait_source_state(agent: &Agent, source: &str, state: &str, within: Duration) {
    wait_for(within, || {
        (source_status(agent, source)["state"] == state).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{source} not {state} within {within:?}: {}\n{}",
            source_status(agent, source),
            agent.log_text()
        )
    });
}

#[test]
fn a_kill_with_a_reload_signal_does_not_drain_the_container() {
    let host = docker_host(DaemonOptions::default());
    let reloaded = host.run_backend("web1", &web_labels(), &[]);
    let stopped = host.run_backend("web2", &web_labels(), &[]);
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config(&host));
    agent.wait_up("web", 2, Duration::from_secs(5));

    // nginx reloads on HUP, and reopens its logs on USR1.
    host.docker(&["kill", "-s", "HUP", &reloaded]);
    host.docker(&["kill", "-s", "USR1", &reloaded]);
    // Events are handled in order: once the next container is up, the kills were seen.
    let third = host.run_backend("web3", &web_labels(), &[]);
    agent.wait_up("web", 3, Duration::from_secs(5));
    let running = host.docker(&["inspect", "-f", "{{.State.Running}}", &reloaded]);
    assert_eq!(running.trim(), "true", "the backend survives HUP and USR1");
    let answered: BTreeSet<String> = names(&host, 60).into_iter().collect();
    assert!(
        answered.contains(&short(&reloaded)),
        "the reloaded container takes new flows: {answered:?}"
    );

    // Its stop signal (SIGTERM: the backend lingers 2 s) drains the other one at once.
    host.docker(&["kill", "-s", "TERM", &stopped]);
    let address = format!("{}:{TCP_PORT}", host.inspect_ip(&stopped, "bridge"));
    // Within its 2 s linger; after that it exits and leaves.
    agent.wait_state("web", &address, "drain", Duration::from_millis(1500));
    let answered: BTreeSet<String> = names(&host, 30).into_iter().collect();
    assert_eq!(answered, BTreeSet::from([short(&reloaded), short(&third)]));
}

#[test]
fn transient_docker_api_errors_keep_healthy_backends() {
    let host = docker_host(DaemonOptions::default());
    let proxy = FaultProxy::start(host.socket(), host.dir.join("proxy.sock"));
    let ids: Vec<String> = (1..=2)
        .map(|i| host.run_backend(&format!("web{i}"), &web_labels(), &[]))
        .collect();
    let config = config_with(&host, &proxy.endpoint(), "1s", "");
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config);
    agent.wait_up("web", 2, Duration::from_secs(5));
    let both = addresses(&host, &[&ids[0], &ids[1]]);
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let load = LoadLoop::start(&host.client.path(), vip, PACE, 2000);
    // Every check of a phase: the faults were met, and both backends stayed up throughout.
    let steady = |what: &str, met: &dyn Fn() -> bool, within: Duration| {
        let done = wait_for(within, || {
            let backends = web_backends(&agent);
            assert_eq!(backends, all_up(&both), "{what}:\n{}", agent.log_text());
            met().then_some(())
        });
        assert!(
            done.is_some(),
            "{what}: the faults were not met within {within:?}"
        );
    };

    // A 500 to every inspection of web1: after an event (a rename), at each resync, and
    // at each retry.
    let inspect_one = format!("/containers/{}/json", ids[0]);
    proxy.fail(&inspect_one, Fault::Status(500), None);
    host.docker(&["rename", "web1", "web1-renamed"]);
    steady(
        "500 on one inspection",
        &|| proxy.faulted(&inspect_one) >= 4,
        Duration::from_secs(10),
    );
    proxy.clear();

    // A 500 to the list itself: the session ends and starts again, twice.
    let list = "/containers/json";
    let lists = proxy.seen(list).len();
    proxy.fail(list, Fault::Status(500), Some(2));
    steady(
        "500 on the list",
        // Two failed, then one that worked.
        &|| proxy.faulted(list) == 2 && proxy.seen(list).len() >= lists + 3,
        Duration::from_secs(15),
    );

    // No answer at all to web2's inspection during a list, past the agent's 10 s bound.
    let inspect_two = format!("/containers/{}/json", ids[1]);
    let inspections = proxy.seen(&inspect_two).len();
    proxy.fail(&inspect_two, Fault::Stall(Duration::from_secs(15)), Some(1));
    steady(
        "an inspection that never answers",
        &|| {
            proxy.faulted(&inspect_two) == 1
                && agent.log_text().contains("no answer within 10s")
                && proxy.seen(&inspect_two).len() >= inspections + 2
        },
        Duration::from_secs(25),
    );
    let samples = load.stop();
    assert!(samples.len() > 100, "{} samples", samples.len());
    assert!(
        failures(&samples).is_empty(),
        "failed requests: {:?}",
        failures(&samples)
    );
    let answered: BTreeSet<String> = names(&host, 40).into_iter().collect();
    assert_eq!(answered, ids.iter().map(|id| short(id)).collect());
    assert!(agent.log_text().contains("its backend stays as it was"));

    // A container that is really gone still leaves.
    host.rm(&ids[1]);
    wait_for(Duration::from_secs(3), || {
        (agent.backends("web").len() == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("web2 stayed: {:?}", web_backends(&agent)));
}

/// A backend of a static service in a namespace of its own, routed through the Docker host:
/// `static1` on 10.99.3.11:9000. Fields drop in order: the server before its namespace.
struct StaticBackend {
    _proc: Proc,
    _ns: Netns,
}

impl StaticBackend {
    const ADDRESS: &str = "10.99.3.11";

    fn start(host: &DockerHost) -> StaticBackend {
        let ns = Netns::new(&format!("{}-sb", host.prefix));
        veth(&host.host, "sb0", &ns, "eth0", None);
        host.host.ip(&["addr", "add", "10.99.3.1/24", "dev", "sb0"]);
        host.host.ip(&["link", "set", "sb0", "up"]);
        ns.ip(&["addr", "add", "10.99.3.11/24", "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", "10.99.3.1"]);
        // Docker set FORWARD to DROP: let the routed static backend through.
        for dir in ["-i", "-o"] {
            host.host.exec(&[
                "iptables", "-w", "-I", "FORWARD", dir, "sb0", "-j", "ACCEPT",
            ]);
        }
        let listen = format!("{}:9000", Self::ADDRESS);
        let proc = start_test_backend(
            &ns,
            "static1",
            &["--tcp", &listen],
            &host.dir,
            host.dir.join("static1.log"),
        );
        StaticBackend {
            _proc: proc,
            _ns: ns,
        }
    }

    fn service() -> String {
        format!(
            r#"
[[service]]
name = "static"
vip = "{VIP}"
port = 82
  [[service.backend]]
  address = "{}"
  port = 9000
"#,
            Self::ADDRESS
        )
    }
}

/// The agent's /metrics, from inside its namespace.
fn metrics(host: &DockerHost) -> String {
    let api: SocketAddr = "127.0.0.1:9900".parse().expect("addr");
    host.host
        .run(move || http_get(api, "/metrics"))
        .expect("GET /metrics")
}

#[test]
fn the_agent_serves_at_once_without_docker_and_containers_join_when_it_comes_up() {
    let mut host = docker_host(DaemonOptions::default());
    let _static = StaticBackend::start(&host);
    host.daemon.stop_dockerd(Duration::from_secs(30));
    let config = config_with(&host, &host.endpoint(), "3s", &StaticBackend::service());
    // Start-up itself is bounded: `launch` waits for "xlb is running" for 10 s.
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config);
    agent.wait_up("static", 1, Duration::from_secs(5));
    assert_eq!(names_on(&host, 82, 10), vec!["static1".to_string(); 10]);
    wait_source_state(&agent, "docker", "unreachable", Duration::from_secs(5));
    let docker = source_status(&agent, "docker");
    assert!(docker["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    let (ok, text) = agent.cli(&["status"]);
    assert!(
        ok && text.contains("discovery: docker unreachable: "),
        "{text}"
    );
    assert!(metrics(&host).contains("xlb_discovery_up{source=\"docker\"} 0"));

    host.daemon.start_dockerd();
    let web = host.run_backend("web1", &web_labels(), &[]);
    agent.wait_up("web", 1, Duration::from_secs(10));
    assert_eq!(names(&host, 10), vec![short(&web); 10]);
    wait_source_state(&agent, "docker", "connected", Duration::from_secs(5));
    assert!(metrics(&host).contains("xlb_discovery_up{source=\"docker\"} 1"));
    assert!(metrics(&host).contains("xlb_discovery_restarts_total{source=\"docker\"} 0"));
    assert_eq!(names_on(&host, 82, 5), vec!["static1".to_string(); 5]);
}

#[test]
fn a_restarted_agent_keeps_docker_backends_while_docker_is_down() {
    // live-restore: the containers keep running while dockerd is stopped.
    let mut host = docker_host(DaemonOptions {
        live_restore: true,
        ..Default::default()
    });
    let ids: Vec<String> = (1..=2)
        .map(|i| host.run_backend(&format!("web{i}"), &web_labels(), &[]))
        .collect();
    let mut agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config(&host));
    agent.wait_up("web", 2, Duration::from_secs(5));
    let both = addresses(&host, &[&ids[0], &ids[1]]);
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let load = LoadLoop::start(&host.client.path(), vip, PACE, 1500);

    agent.stop();
    host.daemon.stop_dockerd(Duration::from_secs(30));
    // Up within launch's 10 s although Docker does not answer.
    agent.launch();
    assert_eq!(web_backends(&agent), all_up(&both), "{}", agent.log_text());
    assert_ne!(source_status(&agent, "docker")["state"], "connected");
    let answered: BTreeSet<String> = names(&host, 40).into_iter().collect();
    assert_eq!(answered, ids.iter().map(|id| short(id)).collect());
    // The request loop runs a while with Docker down.
    std::thread::sleep(Duration::from_secs(1));

    // Docker is back: the same containers, now as Docker says, and changes count again.
    host.daemon.start_dockerd();
    wait_source_state(&agent, "docker", "connected", Duration::from_secs(10));
    assert_eq!(web_backends(&agent), all_up(&both));
    let samples = load.stop();
    assert!(samples.len() > 50, "{} samples", samples.len());
    assert!(
        failures(&samples).is_empty(),
        "failed requests: {:?}",
        failures(&samples)
    );
    // Kept no longer: a container that stops leaves.
    host.stop(&ids[1]);
    wait_for(Duration::from_secs(5), || {
        (agent.backends("web").len() == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("web2 stayed: {:?}", web_backends(&agent)));
    assert_eq!(names(&host, 20), vec![short(&ids[0]); 20]);
}
