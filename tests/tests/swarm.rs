//! Swarm discovery against a real 3-node Swarm (each node its own containerd + dockerd in a
//! namespace), with xlb on a dedicated LB namespace in front of the nodes, as seed 004's LB
//! node: client -> lb (xlb, mode nat) -> node address : host-mode published port. The nodes
//! route replies through the lb. Run as root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::Agent,
    client::{LoadLoop, failures, tcp_name},
    docker::TCP_PORT,
    process::wait_for,
    swarm::{Swarm, Task},
};

const VIP: &str = "10.99.100.1";
const PACE: Duration = Duration::from_millis(20);

fn config(swarm: &Swarm) -> String {
    format!(
        r#"[agent]
interfaces = ["front"]
pin_path = "{pin}"

[docker]
endpoint = "{endpoint}"
swarm_poll_interval = "500ms"

[[service]]
name = "web"
vip = "{VIP}"
port = 80
  [service.health]
  interval = "200ms"
  timeout = "100ms"
  fall = 2
  rise = 2
"#,
        pin = Agent::pin_path_of(&swarm.prefix),
        endpoint = swarm.manager().endpoint(),
    )
}

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().expect("addr")
}

fn start(replicas: u32) -> (Swarm, Agent) {
    let swarm = Swarm::new();
    swarm.service_create(
        "web",
        replicas,
        &[("xlb.service", "web")],
        Some((TCP_PORT, 0)),
        &[],
    );
    swarm.wait_running("web", replicas as usize, Duration::from_secs(30));
    let agent = Agent::start_in(&swarm.lb, &swarm.dir, &swarm.prefix, &config(&swarm));
    agent.wait_up("web", replicas as usize, Duration::from_secs(5));
    (swarm, agent)
}

fn names(swarm: &Swarm, n: usize) -> Vec<String> {
    let vip = vip();
    swarm.client.run(move || {
        (0..n)
            .map(|i| tcp_name(vip).unwrap_or_else(|e| panic!("request {i}: {e}")))
            .collect()
    })
}

/// The `task_joined` and `task_left` events after `since`: (kind, service, backend, message).
fn task_events(agent: &Agent, since: Option<u64>) -> Vec<[String; 4]> {
    agent.events_of(since, &["task_joined", "task_left"])
}

/// The event `kind` of task `t` of `web`: it names the task's node address and published port.
fn task_event(kind: &str, t: &Task) -> [String; 4] {
    let endpoint = t.endpoint(TCP_PORT).expect("a published port").to_string();
    let verb = kind.trim_start_matches("task_");
    let message = format!("swarm task {} {verb}", t.id);
    [kind, "web", &endpoint, &message].map(String::from)
}

fn task_names(swarm: &Swarm) -> BTreeSet<String> {
    swarm
        .running_tasks("web")
        .into_iter()
        .map(|t| t.name)
        .collect()
}

#[test]
fn swarm_services_scale_update_and_drain_without_failures() {
    let (swarm, agent) = start(4);

    // Balanced over the tasks on every node.
    let tasks = swarm.running_tasks("web");
    // Each task that ran before the agent is a join in GET /events.
    let joined: BTreeSet<[String; 4]> =
        tasks.iter().map(|t| task_event("task_joined", t)).collect();
    let seen = task_events(&agent, None);
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), joined);
    assert_eq!(seen.len(), 4, "{seen:#?}");
    let nodes: BTreeSet<Option<usize>> = tasks.iter().map(|t| t.node).collect();
    assert_eq!(nodes.len(), 3, "tasks on all nodes: {tasks:?}");
    let answers = names(&swarm, 200);
    let mut counts = BTreeMap::new();
    for a in &answers {
        *counts.entry(a.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        task_names(&swarm)
    );
    assert!(
        counts.values().all(|&n| n >= 25),
        "each of 4 tasks gets a share of 200: {counts:?}"
    );

    // Scale to 6: the new tasks serve within 2 s of running.
    let before = task_names(&swarm);
    let seq = agent.last_event();
    swarm.scale("web", 6);
    swarm.wait_running("web", 6, Duration::from_secs(30));
    let running = Instant::now();
    let new: BTreeSet<String> = task_names(&swarm).difference(&before).cloned().collect();
    assert_eq!(new.len(), 2);
    let served = wait_for(Duration::from_secs(5), || {
        let seen: BTreeSet<String> = names(&swarm, 60).into_iter().collect();
        new.is_subset(&seen).then(|| running.elapsed())
    })
    .expect("the new tasks serve");
    assert!(
        served <= Duration::from_secs(2),
        "new tasks served after {served:?}"
    );
    // They joined, and nothing left.
    let joined: BTreeSet<[String; 4]> = swarm
        .running_tasks("web")
        .iter()
        .filter(|t| new.contains(&t.name))
        .map(|t| task_event("task_joined", t))
        .collect();
    let seen = task_events(&agent, Some(seq));
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), joined);
    assert_eq!(seen.len(), 2, "{seen:#?}");

    // A rolling update under a request loop: no failed request.
    let load = LoadLoop::start(&swarm.client.path(), vip(), PACE, 5000);
    swarm.update(
        "web",
        &[
            "--force",
            "--update-parallelism",
            "1",
            "--update-delay",
            "1s",
            "--update-monitor",
            "1s",
        ],
    );
    swarm.wait_update("web", Duration::from_secs(90));
    swarm.wait_running("web", 6, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let samples = load.stop();
    assert!(samples.len() > 200, "{} samples", samples.len());
    assert!(
        failures(&samples).is_empty(),
        "failures in the rolling update: {:?}",
        failures(&samples)
    );
    let updated = task_names(&swarm);
    let seen: BTreeSet<String> = samples
        .iter()
        .filter_map(|s| s.answer.clone().ok())
        .collect();
    assert!(
        updated.iter().any(|t| seen.contains(t)),
        "the updated tasks served"
    );

    // Draining a node under load: its tasks leave before they stop.
    let load = LoadLoop::start(&swarm.client.path(), vip(), PACE, 5000);
    swarm.node_drain(2);
    wait_for(Duration::from_secs(30), || {
        let tasks = swarm.running_tasks("web");
        (tasks.len() == 6 && tasks.iter().all(|t| t.node != Some(2))).then_some(())
    })
    .expect("tasks moved off node 3");
    std::thread::sleep(Duration::from_secs(3));
    let samples = load.stop();
    assert!(
        failures(&samples).is_empty(),
        "failures in the node drain: {:?}",
        failures(&samples)
    );

    // Scale to 4: the two tasks told to stop leave once they stopped (drained until then),
    // each a task_left naming its endpoint; none joins.
    let six = swarm.running_tasks("web");
    let seq = agent.last_event();
    swarm.scale("web", 4);
    let four: BTreeSet<String> = swarm
        .wait_running("web", 4, Duration::from_secs(30))
        .into_iter()
        .map(|t| t.name)
        .collect();
    let left: Vec<[String; 4]> = six
        .iter()
        .filter(|t| !four.contains(&t.name))
        .map(|t| task_event("task_left", t))
        .collect();
    assert_eq!(left.len(), 2, "{six:?} -> {four:?}");
    let seen = wait_for(Duration::from_secs(10), || {
        let seen = task_events(&agent, Some(seq));
        (seen.len() >= 2).then_some(seen)
    })
    .unwrap_or_else(|| panic!("2 tasks left: {:#?}", agent.events(Some(seq))));
    assert_eq!(
        seen.iter().cloned().collect::<BTreeSet<_>>(),
        left.into_iter().collect::<BTreeSet<_>>(),
    );
    assert_eq!(seen.len(), 2, "{seen:#?}");

    // The service removed: its backends go.
    swarm.service_rm("web");
    wait_for(Duration::from_secs(10), || {
        let status = agent.status();
        status["services"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.is_empty())
            .then_some(())
    })
    .expect("backends of a removed service go");
}

#[test]
fn a_dead_node_leaves_on_health_checks_while_the_api_says_running() {
    let (mut swarm, agent) = start(3);
    let victims: BTreeSet<String> = swarm
        .running_tasks("web")
        .into_iter()
        .filter(|t| t.node == Some(2))
        .map(|t| t.name)
        .collect();
    assert!(!victims.is_empty(), "a task on node 3");
    let load = LoadLoop::start(&swarm.client.path(), vip(), PACE, 400);
    std::thread::sleep(Duration::from_millis(300));
    swarm.kill_node(2);
    let killed = Instant::now();
    agent.wait_up("web", 3 - victims.len(), Duration::from_secs(3));
    let detected = killed.elapsed();
    // The manager still lists the dead node's tasks as running.
    assert!(
        swarm
            .running_tasks("web")
            .iter()
            .any(|t| victims.contains(&t.name))
    );
    std::thread::sleep(Duration::from_millis(1500));
    let samples = load.stop();
    let late: Vec<_> = samples
        .iter()
        .filter(|s| s.at > killed + detected)
        .collect();
    assert!(late.len() > 30);
    assert!(
        late.iter().all(|s| s.answer.is_ok()),
        "failures after detection ({detected:?})"
    );
    assert!(
        !late
            .iter()
            .any(|s| s.answer.as_ref().is_ok_and(|a| victims.contains(a)))
    );
}
