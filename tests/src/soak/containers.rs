//! The soak's containers: a Docker host (its own containerd and dockerd, tests/src/docker)
//! with a second agent in front of docker0 that discovers labelled containers, and the
//! operations on them: `docker run`, `docker stop` (SIGTERM: drained while it lingers 2 s),
//! `docker kill` (SIGKILL, no drain: gone at its `die` event), agent restarts and kills.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use super::world::HEALTH;
use crate::{
    agent::Agent,
    docker::{DockerHost, IMAGE},
    process::wait_for,
};

pub const VIP: &str = "10.99.100.1";
pub const PORT: u16 = 80;
/// Containers running between steps (the soak runs and removes them in turn).
pub const STEADY: usize = 3;
const LABELS: [(&str, &str); 2] = [("xlb.service", "web"), ("xlb.port", "9000")];

pub struct Containers {
    pub agent: Agent,
    /// When the running agent was started.
    pub launched: Instant,
    /// The logs of the agents that ran before the current one.
    pub history: String,
    /// Running containers, oldest first: (name, full id).
    running: VecDeque<(String, String)>,
    next: usize,
    // Dropped last: the agent before the daemon and its namespace.
    pub host: DockerHost,
}

fn config(host: &DockerHost) -> String {
    let h = &HEALTH;
    format!(
        "[agent]\ninterfaces = [\"front\"]\npin_path = \"{pin}\"\n\n\
         [docker]\nendpoint = \"{endpoint}\"\nresync_interval = \"3s\"\n\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {PORT}\n  [service.health]\n  \
         interval = \"{}ms\"\n  timeout = \"{}ms\"\n  fall = {}\n  rise = {}\n",
        h.interval.as_millis(),
        h.timeout.as_millis(),
        h.fall,
        h.rise,
        pin = Agent::pin_path_of(&host.prefix),
        endpoint = host.endpoint(),
    )
}

impl Containers {
    pub fn new() -> Containers {
        let host = DockerHost::new();
        // Containers first, so the agent's first sync already finds them.
        let running: VecDeque<(String, String)> = (1..=STEADY)
            .map(|i| {
                let name = format!("c{i}");
                (
                    name.clone(),
                    host.run_image(&name, &LABELS, &[], IMAGE, &[]),
                )
            })
            .collect();
        let agent = Agent::start_in(&host.host, &host.dir, &host.prefix, &config(&host));
        let c = Containers {
            agent,
            launched: Instant::now(),
            history: String::new(),
            running,
            next: STEADY + 1,
            host,
        };
        c.wait_running();
        c
    }

    pub fn vip(&self) -> std::net::SocketAddr {
        format!("{VIP}:{PORT}").parse().expect("addr")
    }

    /// Waits until exactly the running containers are the service's backends, all up.
    fn wait_running(&self) {
        let n = self.running.len();
        let settled = || {
            let b = self.agent.backends("web");
            (b.len() == n && b.iter().all(|(_, s)| s == "up")).then_some(())
        };
        wait_for(Duration::from_secs(15), settled).unwrap_or_else(|| {
            panic!(
                "the {n} running containers are not the backends, all up: {:?}\n{}",
                self.agent.backends("web"),
                self.agent.log_text()
            )
        });
    }

    /// `docker run` of one more labelled container; returns once it is up in the agent.
    pub fn run_one(&mut self) -> String {
        let name = format!("c{}", self.next);
        self.next += 1;
        let id = self.host.run_image(&name, &LABELS, &[], IMAGE, &[]);
        self.running.push_back((name.clone(), id));
        self.wait_running();
        name
    }

    /// `docker stop` of the oldest container (then `docker rm`).
    pub fn stop_oldest(&mut self) -> String {
        let (name, id) = self.running.pop_front().expect("a container runs");
        self.host.stop(&id);
        self.host.rm(&id);
        self.wait_running();
        name
    }

    /// `docker kill` of the oldest container; returns its name and how long until the agent
    /// no longer had it up.
    pub fn kill_oldest(&mut self) -> (String, Duration) {
        let (name, id) = self.running.pop_front().expect("a container runs");
        let killed = Instant::now();
        self.host.kill(&id);
        self.wait_running();
        let gone = killed.elapsed();
        self.host.rm(&id);
        (name, gone)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn restart_agent(&mut self) {
        self.agent.stop();
        self.history.push_str(&self.agent.log_text());
        self.launch();
    }

    pub fn kill_agent(&mut self) {
        self.agent.kill();
        self.history.push_str(&self.agent.log_text());
        self.launch();
    }

    fn launch(&mut self) {
        self.agent.launch();
        self.launched = Instant::now();
        self.wait_running();
    }
}

impl Default for Containers {
    fn default() -> Self {
        Containers::new()
    }
}
