//! Tests of the Docker and Swarm harness itself (tests/src/docker.rs, tests/src/swarm.rs):
//! real containerd/dockerd per network namespace, the scratch test image, compose, a 3-node
//! Swarm, and that nothing of them is left afterwards. Run as root (`cargo xtask test`).
//! Every answer checked is a backend's name (container id or task name), never just "it
//! connected".
use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use xlb_tests::{
    client::{http_get, tcp_name, udp_name},
    docker::{DaemonOptions, DockerHost, HEALTH_IMAGE, HTTP_PORT, LeakCheck, TCP_PORT, UDP_PORT},
    netns::sh,
    swarm::{LB_BACK_ADDR, NODES, Swarm, Task},
};

fn short(id: &str) -> &str {
    &id[..12]
}

/// HTTP GET / from inside `ns`; the backend's name.
fn http_name(ns: &xlb_tests::netns::Netns, addr: SocketAddr) -> String {
    ns.run(move || http_get(addr, "/"))
        .unwrap_or_else(|e| panic!("GET http://{addr}/: {e}"))
        .trim_end()
        .to_string()
}

/// (ifindex, name, peer ifindex, rest of the line) of each link of `ip -o link show`.
fn links(out: &str) -> Vec<(u32, String, Option<u32>, String)> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ": ");
            let idx = it.next()?.trim().parse().ok()?;
            let name = it.next()?;
            let rest = it.next().unwrap_or_default().to_string();
            let (name, peer) = match name.split_once("@if") {
                Some((n, p)) => (n.to_string(), p.parse().ok()),
                None => (name.to_string(), None),
            };
            Some((idx, name, peer, rest))
        })
        .collect()
}

#[test]
fn docker_host_runs_labelled_backends_reachable_from_the_host() {
    let started = Instant::now();
    let mut h = DockerHost::new();
    eprintln!("docker host up in {:?}", started.elapsed());
    let labels = [("xlb.service", "web"), ("xlb.port", "8080")];
    let ids = [
        h.run_backend("web1", &labels, &[]),
        h.run_backend("web2", &labels, &[]),
    ];

    let listed: BTreeSet<String> = h
        .docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            "label=xlb.service=web",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect());

    let host_links = links(&h.host.ip(&["-o", "link", "show"]));
    for id in &ids {
        let ip = h.inspect_ip(id, "bridge");
        // Each protocol answers with the container's hostname: its short id.
        assert_eq!(
            http_name(&h.host, SocketAddr::new(ip.into(), HTTP_PORT)),
            short(id)
        );
        let tcp = SocketAddr::new(ip.into(), TCP_PORT);
        assert_eq!(h.host.run(move || tcp_name(tcp)).expect("tcp"), short(id));
        let udp = SocketAddr::new(ip.into(), UDP_PORT);
        let answer = h.host.run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            udp_name(&socket, udp)
        });
        assert_eq!(answer.expect("udp"), short(id));

        // host_veth_ifindex is the host side of the container's eth0: a veth on docker0 in
        // the host ns whose peer is eth0's ifindex.
        let veth = h.host_veth_ifindex(id);
        let pid = h.daemon.container_pid(id).to_string();
        let inside = links(&sh(&[
            "nsenter", "-t", &pid, "-n", "ip", "-o", "link", "show", "eth0",
        ]));
        let (eth0_index, _, peer, _) = &inside[0];
        assert_eq!(*peer, Some(veth));
        let (_, name, host_peer, rest) = host_links
            .iter()
            .find(|l| l.0 == veth)
            .unwrap_or_else(|| panic!("no link {veth} in the host ns: {host_links:?}"));
        assert!(name.starts_with("veth"), "{name}");
        assert_eq!(*host_peer, Some(*eth0_index));
        assert!(rest.contains("master docker0"), "{rest}");
    }

    // Without live-restore, a daemon restart stops the containers and they stay stopped.
    let t = Instant::now();
    h.restart_daemon();
    eprintln!(
        "dockerd restarted in {:?} (2 containers lingering 2 s)",
        t.elapsed()
    );
    assert_eq!(h.docker(&["ps", "-q"]).trim(), "");
    assert_eq!(h.daemon.container_ids().len(), 2);

    let leaks = LeakCheck::of_host(&h);
    let t = Instant::now();
    drop(h);
    eprintln!("docker host torn down in {:?}", t.elapsed());
    leaks.assert_clean();
}

#[test]
fn docker_compose_scales_a_service_of_the_test_image() {
    let h = DockerHost::new();
    h.write_compose_file(
        "version: \"2.4\"\nservices:\n  web:\n    image: xlb-test-backend:latest\n    \
         labels:\n      xlb.service: web\n",
    );
    let t = Instant::now();
    h.compose(&["up", "-d", "--scale", "web=3"]);
    eprintln!("compose up --scale web=3 in {:?}", t.elapsed());
    let ids: Vec<String> = h
        .docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            "label=com.docker.compose.service=web",
            "--filter",
            "label=xlb.service=web",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut names = BTreeSet::new();
    for id in &ids {
        let ip = h.inspect_ip(id, "compose_default");
        let name = http_name(&h.host, SocketAddr::new(ip.into(), HTTP_PORT));
        assert_eq!(name, short(id));
        names.insert(name);
    }
    assert_eq!(names.len(), 3);
    let leaks = LeakCheck::of_host(&h);
    drop(h);
    leaks.assert_clean();
}

#[test]
fn health_image_and_live_restore() {
    let mut h = DockerHost::with_options(DaemonOptions {
        live_restore: true,
        ..DaemonOptions::default()
    });
    let id = h.run_image("h1", &[("xlb.service", "web")], &[], HEALTH_IMAGE, &[]);
    let addr = SocketAddr::new(h.inspect_ip(&id, "bridge").into(), HTTP_PORT);
    h.wait_health(&id, "healthy", Duration::from_secs(10));

    // The probe fails while the service still answers from outside, then recovers.
    h.block_health_probe(&id, true);
    h.wait_health(&id, "unhealthy", Duration::from_secs(10));
    assert_eq!(http_name(&h.host, addr), short(&id));
    h.block_health_probe(&id, false);
    h.wait_health(&id, "healthy", Duration::from_secs(10));

    // With live-restore the container runs on, and answers, across a daemon restart.
    let pid = h.daemon.container_pid(&id);
    h.daemon.stop_dockerd(Duration::from_secs(30));
    assert_eq!(http_name(&h.host, addr), short(&id));
    let t = Instant::now();
    h.daemon.start_dockerd();
    eprintln!("dockerd (live-restore) started again in {:?}", t.elapsed());
    assert_eq!(h.daemon.container_pid(&id), pid);
    assert_eq!(http_name(&h.host, addr), short(&id));

    let leaks = LeakCheck::of_host(&h);
    drop(h);
    leaks.assert_clean();
}

/// Every running task answers on `node address : published port` with its task name.
fn assert_tasks_answer(s: &Swarm, tasks: &[Task]) {
    for t in tasks {
        let endpoint = t.endpoint(HTTP_PORT).unwrap_or_else(|| panic!("{t:?}"));
        assert_eq!(http_name(&s.lb, endpoint), t.name, "{endpoint}");
    }
}

#[test]
fn swarm_of_three_nodes_serves_a_host_mode_service() {
    let started = Instant::now();
    let mut s = Swarm::new();
    let up = started.elapsed();
    let nodes = s.nodes_json();
    let nodes = nodes.as_array().expect("nodes");
    assert_eq!(nodes.len(), NODES);
    for n in nodes {
        assert_eq!(n["Status"]["State"], "ready", "{n}");
        assert_eq!(n["Spec"]["Availability"], "active", "{n}");
        let i = s.node_index(n["ID"].as_str().unwrap()).expect("known node");
        assert_eq!(n["Description"]["Hostname"], s.nodes[i].name.as_str());
        assert_eq!(n["Status"]["Addr"], s.nodes[i].addr.to_string());
    }

    let t = Instant::now();
    s.service_create(
        "web",
        4,
        &[("xlb.service", "web")],
        Some((HTTP_PORT, 0)),
        &[],
    );
    let tasks = s.wait_running("web", 4, Duration::from_secs(60));
    eprintln!("4 replicas running in {:?}", t.elapsed());
    let used: BTreeSet<usize> = tasks.iter().map(|t| t.node.expect("node")).collect();
    assert_eq!(
        used.len(),
        NODES,
        "replicas spread over every node: {tasks:#?}"
    );
    let service = s.manager().api_get("/services/web");
    assert_eq!(service["Spec"]["Labels"]["xlb.service"], "web");
    assert_tasks_answer(&s, &tasks);
    // The client reaches the nodes through the lb ns, and the replies come back through it.
    let endpoint = tasks[0].endpoint(HTTP_PORT).expect("endpoint");
    assert_eq!(http_name(&s.client, endpoint), tasks[0].name);

    let t = Instant::now();
    s.scale("web", 6);
    let scaled = s.wait_running("web", 6, Duration::from_secs(60));
    eprintln!("scaled 4 -> 6 in {:?}", t.elapsed());
    let before: BTreeSet<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
    let after: BTreeSet<&str> = scaled.iter().map(|t| t.id.as_str()).collect();
    assert!(before.is_subset(&after), "scaling up keeps the old tasks");
    assert_tasks_answer(&s, &scaled);

    // Drain the last node: its tasks move to the others.
    let t = Instant::now();
    s.node_drain(2);
    let drained = wait_moved(&s, 2);
    eprintln!("node 3 drained, tasks replaced in {:?}", t.elapsed());
    assert_tasks_answer(&s, &drained);
    s.node_activate(2);

    // A crashed node: its tasks' ports stop answering at once (link down, dockerd killed);
    // the teardown copes with its orphaned containers.
    let victim = drained
        .iter()
        .find(|t| t.node == Some(1))
        .expect("a task on node 2")
        .clone();
    s.kill_node(1);
    let endpoint = victim.endpoint(HTTP_PORT).expect("endpoint");
    assert!(s.lb.run(move || http_get(endpoint, "/")).is_err());
    assert_eq!(s.nodes[1].addr.to_string(), "10.98.0.2");
    assert_eq!(LB_BACK_ADDR, "10.98.0.254");

    let leaks = LeakCheck::of_swarm(&s);
    let t = Instant::now();
    drop(s);
    eprintln!(
        "swarm: up in {up:?}, torn down in {:?}, whole test {:?}",
        t.elapsed(),
        started.elapsed()
    );
    leaks.assert_clean();
}

/// Waits until 6 tasks run and none is on node `i`.
fn wait_moved(s: &Swarm, i: usize) -> Vec<Task> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tasks = s.wait_running("web", 6, Duration::from_secs(60));
        if tasks.iter().all(|t| t.node != Some(i)) {
            return tasks;
        }
        assert!(
            Instant::now() < deadline,
            "tasks still on node {i}: {tasks:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let leaks = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let h = DockerHost::new();
        h.run_backend("doomed", &[("xlb.service", "web")], &[]);
        *leaks.lock().unwrap() = Some(LeakCheck::of_host(&h));
        panic!("a test failing with a Docker host up");
    }));
    assert!(result.is_err());
    leaks
        .into_inner()
        .unwrap()
        .expect("recorded")
        .assert_clean();
}
