//! The soak (`cargo xtask soak [--minutes N]`): a steady request load against both VIPs
//! while, every minute, the agent is restarted (SIGTERM) and killed (SIGKILL), a backend is
//! killed without drain and restarted, one is drained and undrained, and one is removed and
//! re-added by a reload; beside it, a Docker host whose own agent follows containers that are
//! run, stopped and killed under a load of their own, its agent restarted and killed too. At the end a markdown report (report.rs) says what failed and when,
//! and whether the agent's memory and fds stayed flat.
//!
//! `world.rs` is the topology, agent and the operations on them, `containers.rs` the Docker
//! host's, `load.rs` the client load,
//! `probe.rs` the resource and map samples, `report.rs` the classification and the report.
pub mod containers;
pub mod load;
pub mod probe;
pub mod report;
pub mod world;

use std::{
    panic::AssertUnwindSafe,
    path::PathBuf,
    time::{Duration, Instant},
};

use containers::Containers;
use load::{Kind, Load, Pace};
use world::{BACKENDS, STABLE, World};

pub struct Options {
    pub minutes: u64,
    pub report: PathBuf,
}

/// Something the soak did, and when.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub minute: u64,
    pub what: String,
    pub kill: Option<Kill>,
}

/// A backend killed without drain.
#[derive(Debug, Clone)]
pub struct Kill {
    pub backend: String,
    /// How long until `xlb status` showed it down in both services.
    pub detected: Duration,
    /// Backends in the config then (the killed one's share of new flows is 1 / that).
    pub backends: usize,
    /// A container (`docker kill`) rather than a static backend's server.
    pub container: bool,
}

/// Everything a soak produced, for the report.
pub struct Run {
    pub minutes: u64,
    pub started: Instant,
    pub pace: Pace,
    pub events: Vec<Event>,
    pub samples: Vec<probe::Sample>,
    /// The same of the Docker host's agent.
    pub container_samples: Vec<probe::Sample>,
    pub requests: Vec<load::Request>,
    /// The agent's log lines at WARN or ERROR, over all its runs.
    pub agent_problems: Vec<String>,
    /// Why the soak stopped early (a step that did not take effect, with its panic).
    pub aborted: Option<String>,
}

const MINUTE: Duration = Duration::from_secs(60);
/// The age of the agents when they are sampled.
const SAMPLED_AGE: Duration = Duration::from_secs(48);

#[derive(Debug, Clone, Copy)]
enum Step {
    RunContainer,
    StopContainer,
    KillContainer,
    RestartAgent,
    KillAgent,
    KillBackend,
    RestartBackend,
    Drain,
    Undrain,
    Remove,
    Add,
    Sample,
}

/// Each minute's steps, at their second of the minute; none overlaps another's effect.
const SCHEDULE: [(u64, Step); 13] = [
    (0, Step::RestartAgent),
    (3, Step::RunContainer),
    (6, Step::KillAgent),
    (12, Step::KillBackend),
    (16, Step::StopContainer),
    (20, Step::RestartBackend),
    (24, Step::KillContainer),
    (27, Step::Drain),
    (34, Step::Undrain),
    (37, Step::RunContainer),
    (40, Step::Remove),
    (47, Step::Add),
    (55, Step::Sample),
];

/// Both worlds, and the samples taken of them.
struct Soak {
    world: World,
    containers: Containers,
    samples: Vec<probe::Sample>,
    container_samples: Vec<probe::Sample>,
}

impl Soak {
    fn sample(&mut self, label: &str) {
        let (w, c) = (&self.world, &self.containers);
        self.samples
            .push(probe::sample(&w.agent, w.launched, label));
        self.container_samples
            .push(probe::sample(&c.agent, c.launched, label));
    }
}

/// Runs the soak and writes the report; returns the verdict.
pub fn run(opts: &Options) -> report::Verdict {
    let pace = Pace {
        tcp_every: Duration::from_millis(10),
        udp_every: Duration::from_millis(20),
        long_every: Duration::from_millis(200),
        tcp_long: 4,
        udp_long: 2,
        container_every: Duration::from_millis(20),
        max: 200_000,
    };
    let world = World::new();
    let containers = Containers::new();
    let stable: Vec<String> = (0..STABLE).map(|i| world.name(i)).collect();
    let started = Instant::now();
    let mut load = Load::start(
        &world.topo.client.path(),
        world.topo.vip(world::TCP_PORT),
        world.topo.vip(world::UDP_PORT),
        &stable,
        &pace,
    );
    load.new_connections(
        &containers.host.client.path(),
        containers.vip(),
        Kind::ContainerTcpNew,
        pace.container_every,
        pace.max,
    );
    let mut soak = Soak {
        world,
        containers,
        samples: Vec::new(),
        container_samples: Vec::new(),
    };
    let mut events = Vec::new();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // The first agents are sampled as old as the later ones (at second 55, some 48 s
        // after the SIGKILL at second 6): an agent's heap grows in its first seconds.
        let load_started = Instant::now();
        let warm = || {
            let young = soak.world.launched.max(soak.containers.launched);
            young.elapsed() >= SAMPLED_AGE && load_started.elapsed() >= Duration::from_secs(5)
        };
        while !warm() {
            std::thread::sleep(Duration::from_millis(100));
        }
        soak.sample("start");
        let first = Instant::now();
        for minute in 0..opts.minutes {
            let begin = first + MINUTE * minute as u32;
            for (second, step) in SCHEDULE {
                let when = begin + Duration::from_secs(second);
                std::thread::sleep(when.saturating_duration_since(Instant::now()));
                let at = Instant::now();
                let (what, kill) = perform(&mut soak, minute, step);
                eprintln!("soak {:>4}s: {what}", started.elapsed().as_secs());
                events.push(Event {
                    at,
                    minute: minute + 1,
                    what,
                    kill,
                });
            }
        }
        let end = first + MINUTE * opts.minutes as u32;
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
    }));
    let requests = load.stop();
    let aborted = outcome.err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a step panicked".into())
    });
    let Soak {
        mut world,
        mut containers,
        samples,
        container_samples,
    } = soak;
    world.history.push_str(&world.agent.log_text());
    containers.history.push_str(&containers.agent.log_text());
    let problems = |who: &str, log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(|l| format!("[{who}] {l}"))
            .collect()
    };
    let mut agent_problems = problems("static", &world.history);
    agent_problems.extend(problems("docker", &containers.history));
    let run = Run {
        minutes: opts.minutes,
        started,
        pace,
        events,
        samples,
        container_samples,
        requests,
        agent_problems,
        aborted,
    };
    let verdict = report::judge(&run);
    let text = report::markdown(&run, &verdict);
    if let Some(dir) = opts.report.parent() {
        std::fs::create_dir_all(dir).expect("report directory");
    }
    std::fs::write(&opts.report, text).expect("write the report");
    eprintln!("soak report: {}", opts.report.display());
    verdict
}

/// Does one step of minute `minute`; returns what it did.
fn perform(soak: &mut Soak, minute: u64, step: Step) -> (String, Option<Kill>) {
    let (world, containers) = (&mut soak.world, &mut soak.containers);
    let m = minute as usize;
    let churn = BACKENDS - STABLE;
    // The backend killed, the one drained and the one removed this minute.
    let killed = STABLE + m % churn;
    let drained = m % BACKENDS;
    let removed = STABLE + (m + 1) % churn;
    let name = |w: &World, i: usize| w.name(i);
    match step {
        Step::RestartAgent => {
            world.restart_agent();
            containers.restart_agent();
            ("both agents stopped (SIGTERM) and restarted".into(), None)
        }
        Step::KillAgent => {
            world.kill_agent();
            containers.kill_agent();
            ("both agents killed (SIGKILL) and restarted".into(), None)
        }
        Step::RunContainer => {
            let name = containers.run_one();
            (format!("container {name} run (docker run), up"), None)
        }
        Step::StopContainer => {
            let name = containers.stop_oldest();
            (
                format!("container {name} stopped (docker stop) and removed"),
                None,
            )
        }
        Step::KillContainer => {
            let backends = containers.running();
            let (backend, detected) = containers.kill_oldest();
            let what = format!(
                "container {backend} killed (docker kill, SIGKILL); gone in {} ms",
                detected.as_millis()
            );
            let kill = Kill {
                backend: format!("container {backend}"),
                detected,
                backends,
                container: true,
            };
            (what, Some(kill))
        }
        Step::KillBackend => {
            let backend = name(world, killed);
            let backends = world.in_config.iter().filter(|&&b| b).count();
            let detected = world.kill_backend(killed);
            let what = format!(
                "{backend} killed (SIGKILL, no drain); down in {} ms",
                detected.as_millis()
            );
            let kill = Kill {
                backend,
                detected,
                backends,
                container: false,
            };
            (what, Some(kill))
        }
        Step::RestartBackend => {
            world.restart_backend(killed);
            (format!("{} restarted, up again", name(world, killed)), None)
        }
        Step::Drain => {
            world.drain(drained, true);
            (
                format!("{} drained (xlb drain)", name(world, drained)),
                None,
            )
        }
        Step::Undrain => {
            world.drain(drained, false);
            (
                format!("{} undrained (xlb undrain)", name(world, drained)),
                None,
            )
        }
        Step::Remove => {
            world.reload_with(removed, false);
            let what = format!(
                "{} removed by a reload (it keeps running)",
                name(world, removed)
            );
            (what, None)
        }
        Step::Add => {
            world.reload_with(removed, true);
            (
                format!("{} added back by a reload, up", name(world, removed)),
                None,
            )
        }
        Step::Sample => {
            let label = format!("minute {}", minute + 1);
            soak.sample(&label);
            (format!("sampled the agent and the maps ({label})"), None)
        }
    }
}
