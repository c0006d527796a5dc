//! The soak's world: the netns topology with five static backends, the agent, and the
//! operations the soak does to them (each waits, bounded, until the agent shows its effect).
//! be1 and be2 are stable (never killed nor removed: the long-lived flows live there);
//! be3..be5 are killed and restarted, and removed and re-added by reloads.
use std::time::{Duration, Instant};

use crate::{agent::Agent, process::wait_for, topology::Topology};

pub const BACKENDS: usize = 5;
pub const STABLE: usize = 2;
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const SERVICES: [&str; 2] = ["web", "dns"];

/// The health checks of both services (TCP connect to the backend's port 8080). The
/// timeout is generous so that a loaded machine does not take a live backend down.
pub struct Health {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
}

pub const HEALTH: Health = Health {
    interval: Duration::from_millis(250),
    timeout: Duration::from_secs(1),
    fall: 3,
    rise: 2,
};

impl Health {
    /// The documented window of a backend that dies: `interval` × `fall`.
    pub fn window(&self) -> Duration {
        self.interval * self.fall
    }

    /// What the soak allows: the window, plus one interval (a probe that started just
    /// before the kill succeeded), plus 500 ms for the reconcile to apply the change.
    pub fn allowance(&self) -> Duration {
        self.interval * (self.fall + 1) + Duration::from_millis(500)
    }
}

pub struct World {
    pub topo: Topology,
    pub agent: Agent,
    /// Which backends the config has.
    pub in_config: [bool; BACKENDS],
    /// When the running agent was started.
    pub launched: Instant,
    /// The logs of the agents that ran before the current one.
    pub history: String,
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl World {
    pub fn new() -> World {
        let topo = Topology::new(BACKENDS);
        let in_config = [true; BACKENDS];
        let agent = Agent::start(&topo, &config(&topo, &in_config));
        let world = World {
            topo,
            agent,
            in_config,
            launched: Instant::now(),
            history: String::new(),
        };
        world.wait_all_up();
        world
    }

    pub fn name(&self, i: usize) -> String {
        self.topo.backends[i].name.clone()
    }

    fn endpoint(&self, i: usize) -> String {
        format!("{}:8080", self.topo.backends[i].addr)
    }

    /// Waits until every backend of the config is up in both services.
    pub fn wait_all_up(&self) {
        let n = self.in_config.iter().filter(|&&b| b).count();
        for svc in SERVICES {
            self.agent.wait_up(svc, n, Duration::from_secs(15));
        }
    }

    fn wait_state(&self, i: usize, state: &str) {
        for svc in SERVICES {
            self.agent
                .wait_state(svc, &self.endpoint(i), state, Duration::from_secs(10));
        }
    }

    /// SIGKILL to backend `i`'s server, without drain; returns how long until the agent
    /// showed it down in both services.
    pub fn kill_backend(&mut self, i: usize) -> Duration {
        let mut proc = self.topo.backends[i].proc.take().expect("backend running");
        let killed = Instant::now();
        proc.signal(libc::SIGKILL);
        proc.stop(Duration::from_secs(3));
        let endpoint = self.endpoint(i);
        let down = || {
            SERVICES.iter().all(|svc| {
                self.agent
                    .backends(svc)
                    .iter()
                    .any(|(a, s)| *a == endpoint && s == "down")
            })
        };
        wait_for(Duration::from_secs(10), || down().then_some(()))
            .unwrap_or_else(|| panic!("{endpoint} not down 10 s after its kill"));
        killed.elapsed()
    }

    pub fn restart_backend(&mut self, i: usize) {
        self.topo.restart_backend(i);
        self.wait_state(i, "up");
    }

    /// `xlb drain` (or `undrain`) of backend `i` in both services.
    pub fn drain(&self, i: usize, drain: bool) {
        let verb = if drain { "drain" } else { "undrain" };
        for svc in SERVICES {
            let (ok, out) = self.agent.cli(&[verb, svc, &self.endpoint(i)]);
            assert!(ok, "xlb {verb} {svc}: {out}");
        }
        self.wait_state(i, if drain { "drain" } else { "up" });
    }

    /// Rewrites the config with backend `i` in or out (a temporary file renamed over the
    /// config, so the agent never reads half of one), then `xlb reload`.
    pub fn reload_with(&mut self, i: usize, present: bool) {
        self.in_config[i] = present;
        let path = &self.agent.config_path;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, config(&self.topo, &self.in_config)).expect("write config");
        std::fs::rename(&tmp, path).expect("rename config");
        let (ok, out) = self.agent.cli(&["reload"]);
        assert!(ok, "xlb reload: {out}");
        if present {
            self.wait_state(i, "up");
        } else {
            let endpoint = self.endpoint(i);
            let gone = || {
                SERVICES
                    .iter()
                    .all(|svc| self.agent.backends(svc).iter().all(|(a, _)| *a != endpoint))
            };
            wait_for(Duration::from_secs(10), || gone().then_some(()))
                .unwrap_or_else(|| panic!("{endpoint} still in the status after its removal"));
        }
    }

    /// SIGTERM, then a new agent on the same config and pins.
    pub fn restart_agent(&mut self) {
        self.agent.stop();
        self.history.push_str(&self.agent.log_text());
        self.launch();
    }

    /// SIGKILL, then a new agent.
    pub fn kill_agent(&mut self) {
        self.agent.kill();
        self.history.push_str(&self.agent.log_text());
        self.launch();
    }

    fn launch(&mut self) {
        self.agent.launch();
        self.launched = Instant::now();
        self.wait_all_up();
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// The topology's config (a TCP service on VIP:80, a UDP one on VIP:53, both to port 8080)
/// with the backends in `present` and the soak's health checks.
pub fn config(topo: &Topology, present: &[bool; BACKENDS]) -> String {
    let chosen: Vec<_> = topo
        .backends
        .iter()
        .zip(present)
        .filter(|(_, p)| **p)
        .map(|(b, _)| b)
        .collect();
    let pin = Agent::pin_path_for(topo);
    let h = &HEALTH;
    topo.config(&pin, &chosen)
        .replace(
            "interval = \"200ms\"",
            &format!("interval = \"{}\"", ms(h.interval)),
        )
        .replace(
            "timeout = \"100ms\"",
            &format!("timeout = \"{}\"", ms(h.timeout)),
        )
        .replace("fall = 2", &format!("fall = {}", h.fall))
        .replace("rise = 2", &format!("rise = {}", h.rise))
}
