//! A 3-node Docker Swarm on one machine (../shared/notes/swarm-in-netns.md), with a dedicated
//! load balancer namespace in front of the nodes and a client behind it:
//!
//! ```text
//! client ns (10.99.1.2) --veth-- lb ns ("front" 10.99.1.1; "back" 10.98.0.254)
//!                                   |
//!                  bridge ns (br0) -+- node1 ns (10.98.0.1, manager)
//!                                   +- node2 ns (10.98.0.2, worker)
//!                                   +- node3 ns (10.98.0.3, worker)
//! ```
//! The client reaches the nodes only through the lb ns; the nodes' default route is the lb ns,
//! so replies to the client go back through it. Each node is a [`Daemon`] (own containerd and
//! dockerd, `--bridge none`) with the test images loaded; services use the attachable overlay
//! [`NETWORK`] and publish ports in host mode (ingress and VIP service names need IPVS, which
//! this kernel lacks). Task containers get the hostname `{{.Task.Name}}` (`SERVICE.SLOT.ID`),
//! so a test backend answers with its task name.
//!
//! Node indexes are 0-based: node `i` is `nodes[i]` at 10.98.0.(i+1); node 0 is the manager.
//! Helpers that change the swarm return at once (the CLI's `--detach`); wait explicitly with
//! [`Swarm::wait_running`] or [`Swarm::wait_update`].
//!
//! Teardown (drop, also on panic) follows the notes: remove services, workers leave, then the
//! manager; stop each dockerd then its containerd by PID (nodes in parallel); delete the
//! namespaces.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    docker::{Daemon, DaemonOptions, IMAGE, Scratch, run_bounded},
    netns::{Netns, unique_prefix, veth},
    process::wait_for,
};

pub const NODES: usize = 3;
/// The lb ns's address on the nodes' network: the nodes' default gateway.
pub const LB_BACK_ADDR: &str = "10.98.0.254";
/// The lb ns's interface towards the nodes.
pub const BACK: &str = "back";
/// The attachable overlay network services are put on (unless `extra` names another).
pub const NETWORK: &str = "xlbnet";

/// Address of node `i` (0-based).
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 98, 0, i as u8 + 1)
}

pub struct Node {
    /// Hostname, also the Swarm node's hostname.
    pub name: String,
    pub addr: Ipv4Addr,
    /// Swarm node ID.
    pub id: String,
    // The daemon goes before its namespace.
    pub daemon: Daemon,
    pub ns: Netns,
}

/// A published port of a task, as the API reports it (de-duplicated: IPv4 and IPv6 appear
/// twice).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishedPort {
    pub target: u16,
    pub published: u16,
    pub protocol: String,
    pub mode: String,
}

/// A task from `GET /tasks`.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    /// `SERVICE.SLOT.ID` as the CLI shows it; the container's hostname, so the backend's
    /// answer.
    pub name: String,
    pub service_id: String,
    pub slot: u64,
    pub node_id: String,
    /// Index of the node it runs on, if known.
    pub node: Option<usize>,
    /// Status.State (`running`, `shutdown`, ...).
    pub state: String,
    pub desired_state: String,
    pub container_id: Option<String>,
    pub ports: Vec<PublishedPort>,
    /// NetworksAttachments[].Addresses (CIDR), with the network name.
    pub addresses: Vec<(String, String)>,
}

impl Task {
    pub fn is_running(&self) -> bool {
        self.state == "running" && self.desired_state == "running"
    }

    /// Published port for `target`.
    pub fn published(&self, target: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.target == target)
            .map(|p| p.published)
    }

    /// `node address : published port` for `target`: where the task answers from outside.
    pub fn endpoint(&self, target: u16) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            node_addr(self.node?).into(),
            self.published(target)?,
        ))
    }
}

pub struct Swarm {
    pub prefix: String,
    pub dir: PathBuf,
    // Fields drop in this order: nodes (daemons, then their namespaces), the others, the
    // directory last.
    pub nodes: Vec<Node>,
    pub client: Netns,
    pub lb: Netns,
    pub bridge: Netns,
    _scratch: Scratch,
}

/// Percent-encodes a query parameter value (the JSON of `filters`).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Swarm {
    /// Builds the namespaces, starts the 3 daemons in parallel (images loaded), makes node 0
    /// the manager, joins the others, waits (bounded) until all 3 are ready, and creates the
    /// overlay network.
    pub fn new() -> Swarm {
        let started = Instant::now();
        let prefix = unique_prefix();
        let scratch = Scratch::new(&format!("xlb-swarm-{prefix}"));
        let bridge = Netns::new(&format!("{prefix}-sw"));
        bridge.ip(&["link", "add", "br0", "type", "bridge"]);
        bridge.ip(&["link", "set", "br0", "up"]);

        let client = Netns::new(&format!("{prefix}-cl"));
        let lb = Netns::new(&format!("{prefix}-lb"));
        crate::topology::wire_client(&client, &lb);
        veth(&lb, BACK, &bridge, "lb", None);
        bridge.ip(&["link", "set", "lb", "master", "br0"]);
        bridge.ip(&["link", "set", "lb", "up"]);
        lb.ip(&["addr", "add", &format!("{LB_BACK_ADDR}/24"), "dev", BACK]);
        lb.ip(&["link", "set", BACK, "up"]);
        lb.sysctl("net.ipv4.ip_forward", "1");

        let mut namespaces = Vec::new();
        for i in 0..NODES {
            let ns = Netns::new(&format!("{prefix}-n{}", i + 1));
            let port = format!("n{}", i + 1);
            veth(&ns, "eth0", &bridge, &port, None);
            bridge.ip(&["link", "set", &port, "master", "br0"]);
            bridge.ip(&["link", "set", &port, "up"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", node_addr(i)),
                "dev",
                "eth0",
            ]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", LB_BACK_ADDR]);
            ns.no_tx_offload("eth0");
            namespaces.push(ns);
        }

        // The daemons start in parallel; the first one builds the image if it is not cached.
        let options = DaemonOptions {
            live_restore: false,
            no_bridge: true,
        };
        let results: Vec<std::thread::Result<Daemon>> = std::thread::scope(|s| {
            let handles: Vec<_> = namespaces
                .iter()
                .map(|ns| {
                    let dir = scratch.path.join(&ns.name);
                    let options = options.clone();
                    s.spawn(move || Daemon::start(ns, &ns.name, dir, options))
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut daemons = Vec::new();
        let mut failure = None;
        for r in results {
            match r {
                Ok(d) => daemons.push(d),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            // Started daemons shut down as `daemons` drops.
            std::panic::resume_unwind(e);
        }
        let daemons_up = started.elapsed();

        let mut swarm = Swarm {
            prefix,
            dir: scratch.path.clone(),
            nodes: daemons
                .into_iter()
                .zip(namespaces)
                .enumerate()
                .map(|(i, (daemon, ns))| Node {
                    name: ns.name.clone(),
                    addr: node_addr(i),
                    id: String::new(),
                    daemon,
                    ns,
                })
                .collect(),
            client,
            lb,
            bridge,
            _scratch: scratch,
        };

        let manager = node_addr(0).to_string();
        swarm.docker(&["swarm", "init", "--advertise-addr", &manager]);
        let token = swarm.docker(&["swarm", "join-token", "-q", "worker"]);
        let token = token.trim();
        let join = format!("{manager}:2377");
        std::thread::scope(|s| {
            for node in &swarm.nodes[1..] {
                let addr = node.addr.to_string();
                let join = join.as_str();
                s.spawn(move || {
                    node.daemon.docker(&[
                        "swarm",
                        "join",
                        "--token",
                        token,
                        "--advertise-addr",
                        &addr,
                        join,
                    ])
                });
            }
        });
        for node in &mut swarm.nodes {
            node.id = node
                .daemon
                .docker(&["info", "-f", "{{.Swarm.NodeID}}"])
                .trim()
                .to_string();
        }
        let ready = wait_for(Duration::from_secs(60), || {
            let nodes = swarm.nodes_json();
            let ready = nodes.as_array().is_some_and(|a| {
                a.len() == NODES && a.iter().all(|n| n["Status"]["State"] == "ready")
            });
            std::thread::sleep(Duration::from_millis(100));
            ready.then_some(())
        });
        if ready.is_none() {
            panic!("swarm nodes not ready: {}", swarm.nodes_json());
        }
        swarm.docker(&[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            NETWORK,
        ]);
        eprintln!(
            "[{}] swarm up in {:?} (daemons and images {:?})",
            swarm.prefix,
            started.elapsed(),
            daemons_up
        );
        swarm
    }

    /// The manager (node 0).
    pub fn manager(&self) -> &Daemon {
        &self.nodes[0].daemon
    }

    /// `docker ARGS` against the manager; stdout, panics on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        self.manager().docker(args)
    }

    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        self.manager().try_docker(args)
    }

    /// `GET /nodes` from the manager.
    pub fn nodes_json(&self) -> serde_json::Value {
        self.manager().api_get("/nodes")
    }

    /// Index of the node with this Swarm ID.
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Creates a replicated service of the test image (`--no-resolve-image --detach`) on the
    /// overlay network (unless `extra` has `--network`), hostname = task name, with service
    /// labels, and optionally a host-mode published port `(target, published)` (published 0:
    /// the node picks one, which lets several tasks share a node). Returns the service ID at
    /// once; wait with [`Swarm::wait_running`].
    pub fn service_create(
        &self,
        name: &str,
        replicas: u32,
        labels: &[(&str, &str)],
        publish: Option<(u16, u16)>,
        extra: &[&str],
    ) -> String {
        self.service_create_image(name, replicas, labels, publish, extra, IMAGE)
    }

    /// [`Swarm::service_create`] with another image, e.g. [`crate::docker::HEALTH_IMAGE`]
    /// (`--health-cmd` is the shell form, which a scratch image cannot run; the HEALTHCHECK
    /// must come from the image). With it, a task stays `starting` until its probe passes.
    pub fn service_create_image(
        &self,
        name: &str,
        replicas: u32,
        labels: &[(&str, &str)],
        publish: Option<(u16, u16)>,
        extra: &[&str],
        image: &str,
    ) -> String {
        let replicas = replicas.to_string();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let publish =
            publish.map(|(t, p)| format!("mode=host,target={t},published={p},protocol=tcp"));
        let mut args = vec![
            "service",
            "create",
            "--detach",
            "--no-resolve-image",
            "--name",
            name,
            "--replicas",
            &replicas,
            "--hostname",
            "{{.Task.Name}}",
        ];
        if !extra.iter().any(|a| a.starts_with("--network")) {
            args.extend(["--network", NETWORK]);
        }
        for l in &labels {
            args.extend(["--label", l.as_str()]);
        }
        if let Some(p) = &publish {
            args.extend(["--publish", p.as_str()]);
        }
        args.extend_from_slice(extra);
        args.push(image);
        self.docker(&args).trim().to_string()
    }

    /// `docker service scale --detach NAME=N`.
    pub fn scale(&self, name: &str, replicas: u32) {
        self.docker(&[
            "service",
            "scale",
            "--detach",
            &format!("{name}={replicas}"),
        ]);
    }

    /// `docker service update --detach ARGS NAME` (a rolling update with e.g. `--force
    /// --update-parallelism 1 --update-delay 1s`); wait with [`Swarm::wait_update`]. Each task
    /// takes about 2 s (deregistration) + 2 s (linger) + the delay + `--update-monitor` (5 s by
    /// default): 4 replicas as above took ~35 s; `--update-monitor 1s` shortens it.
    pub fn update(&self, name: &str, args: &[&str]) {
        let mut full = vec!["service", "update", "--detach"];
        full.extend_from_slice(args);
        full.push(name);
        self.docker(&full);
    }

    /// `docker service rm`.
    pub fn service_rm(&self, name: &str) {
        self.docker(&["service", "rm", name]);
    }

    /// All tasks of a service (every state), from `GET /tasks`.
    pub fn tasks(&self, service: &str) -> Vec<Task> {
        let filters = serde_json::json!({ "service": [service] }).to_string();
        let json = self
            .manager()
            .api_get(&format!("/tasks?filters={}", query_escape(&filters)));
        let service_json = self.manager().api_get(&format!("/services/{service}"));
        let service_name = service_json["Spec"]["Name"]
            .as_str()
            .unwrap_or(service)
            .to_string();
        let mut tasks: Vec<Task> = json
            .as_array()
            .expect("tasks array")
            .iter()
            .map(|t| {
                let id = t["ID"].as_str().unwrap_or_default().to_string();
                let slot = t["Slot"].as_u64().unwrap_or(0);
                let node_id = t["NodeID"].as_str().unwrap_or_default().to_string();
                let mut ports: Vec<PublishedPort> = t["Status"]["PortStatus"]["Ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| PublishedPort {
                        target: p["TargetPort"].as_u64().unwrap_or(0) as u16,
                        published: p["PublishedPort"].as_u64().unwrap_or(0) as u16,
                        protocol: p["Protocol"].as_str().unwrap_or("tcp").to_string(),
                        mode: p["PublishMode"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect();
                ports.sort();
                ports.dedup();
                let addresses = t["NetworksAttachments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| {
                        let net = a["Network"]["Spec"]["Name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        a["Addresses"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|x| x.as_str())
                            .map(move |x| (net.clone(), x.to_string()))
                    })
                    .collect();
                Task {
                    name: if slot > 0 {
                        format!("{service_name}.{slot}.{id}")
                    } else {
                        format!("{service_name}.{node_id}.{id}")
                    },
                    node: self.node_index(&node_id),
                    service_id: t["ServiceID"].as_str().unwrap_or_default().to_string(),
                    slot,
                    state: t["Status"]["State"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    desired_state: t["DesiredState"].as_str().unwrap_or_default().to_string(),
                    container_id: t["Status"]["ContainerStatus"]["ContainerID"]
                        .as_str()
                        .map(str::to_string),
                    id,
                    node_id,
                    ports,
                    addresses,
                }
            })
            .collect();
        tasks.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
        tasks
    }

    /// Tasks that are running and meant to be.
    pub fn running_tasks(&self, service: &str) -> Vec<Task> {
        self.tasks(service)
            .into_iter()
            .filter(Task::is_running)
            .collect()
    }

    /// Waits (bounded) until the service has exactly `n` running tasks, none still starting,
    /// each with its published ports if the service publishes any; returns them.
    pub fn wait_running(&self, service: &str, n: usize, timeout: Duration) -> Vec<Task> {
        let spec = self.manager().api_get(&format!("/services/{service}"));
        let publishes = spec["Spec"]["EndpointSpec"]["Ports"]
            .as_array()
            .is_some_and(|p| !p.is_empty());
        let mut last = Vec::new();
        let done = wait_for(timeout, || {
            let tasks = self.tasks(service);
            let running: Vec<Task> = tasks.iter().filter(|t| t.is_running()).cloned().collect();
            let pending = tasks
                .iter()
                .any(|t| t.desired_state == "running" && t.state != "running");
            let ports_ok = !publishes || running.iter().all(|t| !t.ports.is_empty());
            last = tasks;
            std::thread::sleep(Duration::from_millis(100));
            (running.len() == n && !pending && ports_ok).then_some(running)
        });
        done.unwrap_or_else(|| {
            panic!("{service}: not {n} running tasks within {timeout:?}: {last:#?}")
        })
    }

    /// Waits (bounded) until the service's last update completed; panics if it paused or
    /// rolled back.
    pub fn wait_update(&self, service: &str, timeout: Duration) {
        let mut state = String::new();
        let done = wait_for(timeout, || {
            let spec = self.manager().api_get(&format!("/services/{service}"));
            state = spec["UpdateStatus"]["State"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if state == "paused" || state.starts_with("rollback") {
                panic!("{service}: update {state}: {}", spec["UpdateStatus"]);
            }
            std::thread::sleep(Duration::from_millis(100));
            (state == "completed").then_some(())
        });
        done.unwrap_or_else(|| {
            panic!("{service}: update not completed within {timeout:?} (state {state:?})")
        });
    }

    /// `docker node update --availability drain` for node `i`.
    pub fn node_drain(&self, i: usize) {
        self.docker(&[
            "node",
            "update",
            "--availability",
            "drain",
            &self.nodes[i].id,
        ]);
    }

    /// `docker node update --availability active` for node `i`.
    pub fn node_activate(&self, i: usize) {
        self.docker(&[
            "node",
            "update",
            "--availability",
            "active",
            &self.nodes[i].id,
        ]);
    }

    /// A node crash: SIGKILL its dockerd and set its link down (killing dockerd alone leaves
    /// its tasks' published ports answering through the node's iptables rules). The manager
    /// marks it down after ~10 s and reschedules its tasks after ~16 s; meanwhile the API
    /// still shows its tasks as running. Not for node 0 (the manager).
    pub fn kill_node(&mut self, i: usize) {
        assert!(i != 0, "node 0 is the only manager");
        self.nodes[i].daemon.kill_dockerd();
        self.nodes[i].ns.ip(&["link", "set", "eth0", "down"]);
    }

    /// Brings a killed node back: link up, dockerd started again on the same state (it rejoins
    /// the swarm by itself).
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].ns.ip(&["link", "set", "eth0", "up"]);
        self.nodes[i].daemon.start_dockerd();
    }

    /// PIDs of every containerd and dockerd of the swarm (for leak checks).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().flat_map(|n| n.daemon.pids()).collect()
    }

    /// Names of the swarm's network namespaces.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.iter().map(|n| n.ns.name.clone()).collect();
        names.extend([
            self.client.name.clone(),
            self.lb.name.clone(),
            self.bridge.name.clone(),
        ]);
        names
    }
}

impl Default for Swarm {
    fn default() -> Self {
        Swarm::new()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let started = Instant::now();
        let bound = Duration::from_secs(30);
        let manager_up = self.nodes[0].daemon.dockerd_running();
        if manager_up {
            let services = run_bounded(
                self.manager()
                    .docker_command()
                    .args(["service", "ls", "-q"]),
                bound,
            )
            .unwrap_or_default();
            let services: Vec<&str> = services.split_whitespace().collect();
            if !services.is_empty() {
                let mut cmd = self.manager().docker_command();
                cmd.args(["service", "rm"]).args(&services);
                if let Err(e) = run_bounded(&mut cmd, bound) {
                    eprintln!("[{}] removing services: {e}", self.prefix);
                }
            }
        }
        // Workers leave (those whose dockerd still runs), then the manager.
        std::thread::scope(|s| {
            for node in &mut self.nodes[1..] {
                s.spawn(move || {
                    if node.daemon.dockerd_running() {
                        let mut cmd = node.daemon.docker_command();
                        cmd.args(["swarm", "leave"]);
                        if let Err(e) = run_bounded(&mut cmd, bound) {
                            eprintln!("[{}] swarm leave: {e}", node.name);
                        }
                    }
                });
            }
        });
        if manager_up {
            let mut cmd = self.manager().docker_command();
            cmd.args(["swarm", "leave", "--force"]);
            if let Err(e) = run_bounded(&mut cmd, bound) {
                eprintln!("[{}] swarm leave --force: {e}", self.prefix);
            }
        }
        std::thread::scope(|s| {
            for node in &mut self.nodes {
                s.spawn(move || node.daemon.shutdown());
            }
        });
        eprintln!(
            "[{}] swarm torn down in {:?}",
            self.prefix,
            started.elapsed()
        );
        // The namespaces and the directory go as the fields drop.
    }
}
