//! Docker discovery against a real dockerd: a Docker host namespace with its own daemon,
//! xlb attached to its front NIC, and labelled containers behind it on docker0. The VIP
//! reaches them only through xlb's bridge delivery: Docker's FORWARD policy drops routed
//! traffic to unpublished ports. Run as root.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

#[path = "support/docker_lb.rs"]
mod docker_lb;
use docker_lb::{PACE, VIP, config, docker_host, host_client, names, short, web_labels};
use xlb_tests::{
    agent::Agent,
    client::{LoadLoop, failures, tcp_name},
    docker::{DaemonOptions, HEALTH_IMAGE, IMAGE, TCP_PORT},
    process::wait_for,
};

#[test]
fn labelled_containers_join_leave_on_stop_and_new_ones_serve_at_once() {
    let host = docker_host(DaemonOptions::default());
    let ids: Vec<String> = (1..=5)
        .map(|i| host.run_backend(&format!("web{i}"), &web_labels(), &[]))
        .collect();
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config(&host));
    agent.wait_up("web", 5, Duration::from_secs(5));
    let addr = |id: &str| format!("{}:{TCP_PORT}", host.inspect_ip(id, "bridge"));
    // Taken while they run: a stopped container has no address.
    let addrs: Vec<String> = ids.iter().map(|id| addr(id)).collect();
    assert!(
        agent.pin_path.join("links/tc_reply_docker0").exists(),
        "replies are caught on docker0"
    );
    let direct = format!("{}:{TCP_PORT}", host.inspect_ip(&ids[0], "bridge"))
        .parse()
        .expect("addr");
    assert!(
        host_client(&host, move || tcp_name(direct)).is_err(),
        "routed traffic is dropped"
    );

    // Every container answers through the VIP (checked by name, never "it connected"),
    // handed to its eth0 through its veth once the agent has found that.
    agent.wait_for_veths(5, Duration::from_secs(10));
    let before = agent.verdicts("delivered_peer");
    let answered: BTreeSet<String> = names(&host, 100).into_iter().collect();
    let expected: BTreeSet<String> = ids.iter().map(|id| short(id)).collect();
    assert_eq!(answered, expected);
    let handed = agent.verdicts("delivered_peer") - before;
    assert!(
        handed > 2 * 100,
        "{handed} packets handed to a container's eth0"
    );

    // `docker stop` one under a request loop: at most one failure, none after the stop.
    let vip = format!("{VIP}:80").parse().expect("addr");
    let load = LoadLoop::start(&host.client.path(), vip, PACE, 400);
    std::thread::sleep(Duration::from_millis(500));
    host.stop(&ids[2]);
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let samples = load.stop();
    let failed = failures(&samples);
    assert!(failed.len() <= 1, "failures around the stop: {failed:?}");
    assert!(
        failed.iter().all(|s| s.at < stopped),
        "a failure after the die event: {failed:?}"
    );
    assert!(
        !samples
            .iter()
            .any(|s| s.at > stopped && s.answer.as_deref() == Ok(short(&ids[2]).as_str()))
    );
    agent.wait_up("web", 4, Duration::from_secs(2));

    // `docker run` one more: it serves within a second.
    let fresh = host.run_image("web6", &web_labels(), &[], IMAGE, &["--log"]);
    let ran = Instant::now();
    let new_name = short(&fresh);
    let served = wait_for(Duration::from_secs(3), || {
        names(&host, 20).contains(&new_name).then(|| ran.elapsed())
    })
    .expect("the new container serves");
    assert!(served < Duration::from_secs(1), "served after {served:?}");

    // The client's address reaches the container (mode nat keeps it).
    let logs = host.docker(&["logs", &fresh]);
    assert!(
        logs.contains(&format!("{new_name} tcp from 10.99.1.2:")),
        "{logs}"
    );

    // GET /events: the five that ran before the agent joined, then web3 left, then web6
    // joined; each names the service, the backend's address and the container.
    let event = |kind: &str, name: &str, addr: &str| {
        let verb = kind.trim_start_matches("container_");
        [kind, "web", addr, &format!("container {name} {verb}")].map(String::from)
    };
    let kinds = ["container_joined", "container_left"];
    let seen = wait_for(Duration::from_secs(3), || {
        let seen = agent.events_of(None, &kinds);
        (seen.len() >= 7).then_some(seen)
    })
    .unwrap_or_else(|| panic!("7 joins and leaves: {:#?}", agent.events(None)));
    let first: BTreeSet<[String; 4]> = seen[..5].iter().cloned().collect();
    let ran: BTreeSet<[String; 4]> = (0..5)
        .map(|i| event("container_joined", &format!("web{}", i + 1), &addrs[i]))
        .collect();
    assert_eq!(first, ran, "{seen:#?}");
    assert_eq!(
        seen[5..],
        [
            event("container_left", "web3", &addrs[2]),
            event("container_joined", "web6", &addr(&fresh)),
        ],
        "{seen:#?}"
    );
}

#[test]
fn bad_labels_are_skipped_with_a_clear_error_and_the_rest_serve() {
    let host = docker_host(DaemonOptions::default());
    let good = host.run_backend("good", &web_labels(), &[]);
    host.run_backend("typo", &[("xlb.service", "web"), ("xlb.prot", "9000")], &[]);
    host.run_backend(
        "claim",
        &[("xlb.service", "admin"), ("xlb.port", "9000")],
        &[],
    );
    host.run_backend("noport", &[("xlb.service", "web")], &[]);
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config(&host));
    agent.wait_up("web", 1, Duration::from_secs(5));
    let log = agent.log_text();
    for expected in [
        "container typo (",
        "label xlb.prot: unknown label (a typo?)",
        "container claim (",
        "label xlb.service: `admin` is not a service in the config",
        "container noport (",
        "label xlb.port: required: no tcp port exposed",
    ] {
        assert!(log.contains(expected), "missing `{expected}` in:\n{log}");
    }
    assert_eq!(
        log.matches("label xlb.prot").count(),
        1,
        "each error is logged once"
    );
    let answered: BTreeSet<String> = names(&host, 20).into_iter().collect();
    assert_eq!(answered, BTreeSet::from([short(&good)]));
}

/// Whoever can start a container can label it: a container asking for more weight than
/// the service allows, or to turn its health check off, is skipped with an error naming it
/// and the label; an address that a static backend has already stays the static one's, and
/// the conflict is shown in the status.
#[test]
fn labels_beyond_the_services_limits_are_skipped_and_conflicts_are_shown() {
    let host = docker_host(DaemonOptions::default());
    let good = host.run_backend("good", &web_labels(), &[]);
    let mut greedy = web_labels();
    greedy.push(("xlb.weight", "65535"));
    host.run_backend("greedy", &greedy, &[]);
    let mut unchecked = web_labels();
    unchecked.push(("xlb.health.type", "none"));
    host.run_backend("unchecked", &unchecked, &[]);
    // Declared in the config as well: a second claim on the same address.
    let twice = host.run_backend("twice", &web_labels(), &[]);
    let twice_ip = host.inspect_ip(&twice, "bridge");
    let config = config(&host).replacen(
        "\n[[service]]\nname = \"api\"",
        &format!(
            "  [[service.backend]]\n  address = \"{twice_ip}\"\n  port = 9000\n  bridge = \"docker0\"\n\n[[service]]\nname = \"api\""
        ),
        1,
    );
    assert!(config.contains(&twice_ip.to_string()), "{config}");
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config);
    agent.wait_up("web", 2, Duration::from_secs(5));
    let log = agent.log_text();
    for expected in [
        "container greedy (",
        "label xlb.weight: 65535 is above the max_weight 100 of service web",
        "container unchecked (",
        "label xlb.health.type: service web does not let labels change its health check",
        &format!(
            "service web: {twice_ip}:9000 is claimed by the static config and by container \
             twice; the static config keeps it"
        ),
    ] {
        assert!(log.contains(expected), "missing `{expected}` in:\n{log}");
    }
    let conflicts = agent.status()["conflicts"].clone();
    assert_eq!(
        conflicts,
        serde_json::json!([{
            "service": "web",
            "address": format!("{twice_ip}:9000"),
            "kept": "the static config",
            "refused": "container twice",
        }]),
    );
    let (ok, text) = agent.cli(&["status"]);
    assert!(ok && text.contains("!! conflict: service web"), "{text}");
    let answered: BTreeSet<String> = names(&host, 20).into_iter().collect();
    assert_eq!(answered, BTreeSet::from([short(&good), short(&twice)]));
}

#[test]
fn a_container_with_a_healthcheck_joins_when_healthy_and_leaves_when_unhealthy() {
    let host = docker_host(DaemonOptions::default());
    let plain = host.run_backend("plain", &web_labels(), &[]);
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config(&host));
    agent.wait_up("web", 1, Duration::from_secs(5));
    let checked = host.run_image("checked", &web_labels(), &[], HEALTH_IMAGE, &[]);
    // Not while Docker says "starting".
    assert_eq!(host.health(&checked), "starting");
    assert_eq!(agent.backends("web").len(), 1);
    wait_for(Duration::from_secs(10), || {
        (host.health(&checked) == "healthy").then_some(())
    })
    .expect("healthy");
    agent.wait_up("web", 2, Duration::from_secs(3));
    let answered: BTreeSet<String> = names(&host, 40).into_iter().collect();
    assert_eq!(answered, BTreeSet::from([short(&plain), short(&checked)]));

    host.block_health_probe(&checked, true);
    wait_for(Duration::from_secs(10), || {
        (host.health(&checked) == "unhealthy").then_some(())
    })
    .expect("unhealthy");
    wait_for(Duration::from_secs(3), || {
        (agent.backends("web").len() == 1).then_some(())
    })
    .expect("left");
    let answered: BTreeSet<String> = names(&host, 20).into_iter().collect();
    assert_eq!(answered, BTreeSet::from([short(&plain)]));
}

#[test]
fn dockerd_restart_under_load_fails_nothing_and_resyncs_exactly() {
    let mut host = docker_host(DaemonOptions {
        live_restore: true,
        ..Default::default()
    });
    let ids: Vec<String> = (1..=3)
        .map(|i| host.run_backend(&format!("web{i}"), &web_labels(), &[]))
        .collect();
    let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config(&host));
    agent.wait_up("web", 3, Duration::from_secs(5));

    let vip = format!("{VIP}:80").parse().expect("addr");
    let load = LoadLoop::start(&host.client.path(), vip, PACE, 600);
    std::thread::sleep(Duration::from_millis(300));
    host.restart_daemon();
    // While it was down the agent kept forwarding; now a change must arrive.
    let fourth = host.run_backend("web4", &web_labels(), &[]);
    agent.wait_up("web", 4, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();
    assert!(samples.len() > 50, "{} samples", samples.len());
    assert!(
        failures(&samples).is_empty(),
        "failed requests: {:?}",
        failures(&samples)
    );

    // Exactly the running containers, by address.
    let mut expected: Vec<String> = ids
        .iter()
        .chain([&fourth])
        .map(|id| format!("{}:{TCP_PORT}", host.inspect_ip(id, "bridge")))
        .collect();
    expected.sort();
    let mut seen: Vec<String> = agent.backends("web").into_iter().map(|(a, _)| a).collect();
    seen.sort();
    assert_eq!(seen, expected);
    assert!(
        agent
            .log_text()
            .contains("Docker unreachable; keeping the last known backends"),
        "{}",
        agent.log_text()
    );
}

/// Detaches and removes a pin path on drop.
struct Unpin(std::path::PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = xlb::loader::detach(&self.0);
    }
}

/// The static xlb binary for the agent image (`cargo xtask build` makes it).
fn musl_xlb() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let target = exe.ancestors().nth(3).expect("target dir");
    let bin = target.join("x86_64-unknown-linux-musl/release/xlb");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask build`",
        bin.display()
    );
    bin
}

/// Seed 001 with xlb instead of HAProxy: deploy/docker-compose.yml runs the agent image
/// (FROM scratch, --privileged, host network) and `web` scaled to 5; a request loop prints
/// every container's hostname; a stopped container is not missed.
#[test]
fn compose_example_runs_seed_001_through_the_agent_image() {
    let host = docker_host(DaemonOptions::default());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let context = host.dir.join("xlb-image");
    std::fs::create_dir_all(&context).expect("context");
    std::fs::copy(root.join("deploy/Dockerfile"), context.join("Dockerfile")).expect("Dockerfile");
    std::fs::copy(musl_xlb(), context.join("xlb")).expect("binary");
    host.docker(&[
        "build",
        "-q",
        "-t",
        "xlb:latest",
        context.to_str().expect("utf-8"),
    ]);

    let compose =
        std::fs::read_to_string(root.join("deploy/docker-compose.yml")).expect("compose file");
    let socket = host.socket().display().to_string();
    host.write_compose_file(&compose.replace(
        "/var/run/docker.sock:/var/run/docker.sock",
        &format!("{socket}:/var/run/docker.sock"),
    ));
    let example = std::fs::read_to_string(root.join("deploy/xlb.toml")).expect("xlb.toml");
    // The container pins into the host's bpffs: a path of this test's own, removed at the end
    // (also on failure) whatever the container left.
    let pins = Unpin(Agent::pin_path_of(&host.prefix).into());
    let config = example
        .replace(
            "interfaces = [\"eth0\"]",
            &format!(
                "interfaces = [\"front\"]\npin_path = \"{}\"",
                pins.0.display()
            ),
        )
        .replace("192.168.99.104", VIP);
    std::fs::write(host.dir.join("compose/xlb.toml"), config).expect("xlb.toml");
    host.compose(&["up", "-d", "--scale", "web=5"]);

    let api: std::net::SocketAddr = "127.0.0.1:9900".parse().expect("addr");
    let status = || {
        host.host
            .run(move || xlb_tests::client::http_get(api, "/status"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
    };
    wait_for(Duration::from_secs(20), || {
        let s = status()?;
        let up = s["services"][0]["backends"]
            .as_array()?
            .iter()
            .filter(|b| b["state"] == "up")
            .count();
        (up == 5).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "5 containers not up: {:?}\n{}",
            status(),
            host.compose(&["logs", "xlb"])
        )
    });

    let http = |n: usize| {
        let vip: std::net::SocketAddr = format!("{VIP}:80").parse().expect("addr");
        host.client.run(move || {
            (0..n)
                .map(|_| {
                    xlb_tests::client::http_get(vip, "/")
                        .expect("HTTP through xlb")
                        .trim()
                        .to_string()
                })
                .collect::<BTreeSet<String>>()
        })
    };
    let ids: BTreeSet<String> = host
        .compose(&["ps", "-q", "web"])
        .lines()
        .map(short)
        .collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(
        http(100),
        ids,
        "every container answers (seed 001's `make test`)"
    );

    let stopped = short(
        host.compose(&["ps", "-q", "web"])
            .lines()
            .next()
            .expect("a web container"),
    );
    host.docker(&["stop", &stopped]);
    let rest: BTreeSet<String> = ids.iter().filter(|i| **i != stopped).cloned().collect();
    assert_eq!(http(60), rest, "the others still serve");
    host.compose(&["down", "-t", "1"]);
}
