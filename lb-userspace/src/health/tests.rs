//! The probe loop under tokio's paused clock: every probe time and transition is exact.
use std::{collections::BTreeMap, net::IpAddr};

use tokio::time::Instant;

use super::*;
use crate::{
    config::{HealthOverride, Mode, Protocol},
    state::{BackendSpec, ServiceSpec, Source},
};

/// Answers by the time since the test began; a `None` answer hangs (for timeouts).
struct Scripted {
    start: Instant,
    calls: Mutex<Vec<Duration>>,
    answer: Box<dyn Fn(Duration) -> Option<bool> + Send + Sync>,
}

impl Prober for Scripted {
    fn probe(
        &self,
        _: Endpoint,
        _: HealthConfig,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        let at = self.start.elapsed();
        self.calls.lock().unwrap().push(at);
        match (self.answer)(at) {
            Some(true) => Box::pin(async { Ok(()) }),
            Some(false) => Box::pin(async { Err("refused".to_string()) }),
            None => Box::pin(std::future::pending()),
        }
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn check() -> HealthConfig {
    HealthConfig {
        interval: ms(1000),
        fastinter: Some(ms(100)),
        downinter: Some(ms(500)),
        timeout: ms(50),
        rise: 2,
        fall: 3,
        ..HealthConfig::default()
    }
}

fn endpoint() -> Endpoint {
    Endpoint {
        addr: IpAddr::from([10, 99, 2, 11]),
        port: 8080,
    }
}

fn desired(check: HealthConfig) -> DesiredState {
    let backend = BackendSpec {
        weight: 100,
        source: Source::Static,
        health: HealthOverride::default(),
        bridge: None,
        delivery: Default::default(),
    };
    let svc = ServiceSpec {
        name: "web".into(),
        vip: IpAddr::from([10, 99, 100, 1]),
        port: 80,
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        snat: Vec::new(),
        gue: false,
        hash: Default::default(),
        icmp_echo: true,
        allow: Vec::new(),
        table_size: 101,
        health: check,
        backends: BTreeMap::from([(endpoint(), backend)]),
    };
    DesiredState {
        services: BTreeMap::from([("web".to_string(), svc)]),
        ..DesiredState::default()
    }
}

struct Run {
    prober: Arc<Scripted>,
    monitor: HealthMonitor,
    changes: mpsc::UnboundedReceiver<Key>,
}

fn start(initial: State, answer: impl Fn(Duration) -> Option<bool> + Send + Sync + 'static) -> Run {
    let prober = Arc::new(Scripted {
        start: Instant::now(),
        calls: Mutex::default(),
        answer: Box::new(answer),
    });
    let (tx, changes) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(prober.clone(), tx);
    monitor.sync(&desired(check()), |_| initial);
    Run {
        prober,
        monitor,
        changes,
    }
}

impl Run {
    fn calls(&self) -> Vec<Duration> {
        self.prober.calls.lock().unwrap().clone()
    }
    fn state(&self) -> State {
        self.monitor.snapshot()[&("web".to_string(), endpoint())].state
    }
}

#[tokio::test(start_paused = true)]
async fn falls_after_fall_failures_at_fastinter_then_probes_at_downinter() {
    let mut run = start(State::Up, |_| Some(false));
    let key = run.changes.recv().await.unwrap();
    assert_eq!(key.1, endpoint());
    // Probes at 0, 100, 200 ms (each fails after 0 ms): down at 200 ms.
    assert_eq!(run.prober.start.elapsed(), ms(200));
    assert_eq!(run.state(), State::Down);
    tokio::time::sleep(ms(1100)).await;
    assert_eq!(run.calls(), [ms(0), ms(100), ms(200), ms(700), ms(1200)]);
    let last = run.monitor.snapshot()[&key].last.clone().unwrap();
    assert_eq!((last.ok, last.detail.as_str()), (false, "refused"));
}

#[tokio::test(start_paused = true)]
async fn rises_after_rise_successes_then_probes_at_interval() {
    let mut run = start(State::Down, |_| Some(true));
    run.changes.recv().await.unwrap();
    assert_eq!(
        run.prober.start.elapsed(),
        ms(100),
        "successes at 0 and 100 ms"
    );
    assert_eq!(run.state(), State::Up);
    tokio::time::sleep(ms(2050)).await;
    assert_eq!(run.calls(), [ms(0), ms(100), ms(1100), ms(2100)]);
}

#[tokio::test(start_paused = true)]
async fn one_failure_speeds_up_probing_without_a_transition() {
    let mut run = start(State::Up, |at| Some(at != ms(0)));
    tokio::time::sleep(ms(1500)).await;
    assert_eq!(run.calls(), [ms(0), ms(100), ms(1100)]);
    assert_eq!(run.state(), State::Up);
    assert!(run.changes.try_recv().is_err(), "no transition");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_probe_fails_at_its_timeout() {
    let mut run = start(State::Up, |_| None);
    run.changes.recv().await.unwrap();
    // Each probe takes the 50 ms timeout, then waits fastinter (100 ms).
    assert_eq!(run.calls(), [ms(0), ms(150), ms(300)]);
    assert_eq!(run.prober.start.elapsed(), ms(350));
    let last = run.monitor.snapshot()[&("web".to_string(), endpoint())]
        .last
        .clone()
        .unwrap();
    assert_eq!(last.detail, "no answer within 50ms");
}

#[tokio::test(start_paused = true)]
async fn a_new_backend_comes_up_on_its_first_success() {
    let mut run = start(State::Pending, |_| Some(true));
    run.changes.recv().await.unwrap();
    assert_eq!(run.prober.start.elapsed(), ms(0));
    assert_eq!(run.state(), State::Up);
}

#[tokio::test(start_paused = true)]
async fn sync_stops_removed_backends_and_restarts_changed_checks() {
    let mut run = start(State::Up, |_| Some(true));
    tokio::time::sleep(ms(10)).await;
    assert_eq!(run.calls().len(), 1);
    // A changed check restarts the task (a new probe at once); the state is kept.
    let mut faster = check();
    faster.interval = ms(200);
    run.monitor.sync(&desired(faster), |_| State::Down);
    tokio::time::sleep(ms(450)).await;
    assert_eq!(run.calls(), [ms(0), ms(10), ms(210), ms(410)]);
    assert_eq!(run.state(), State::Up);
    // Removing the backend stops its probes.
    run.monitor.sync(&DesiredState::default(), |_| State::Up);
    tokio::time::sleep(ms(1000)).await;
    assert_eq!(run.calls().len(), 4);
    assert!(run.monitor.snapshot().is_empty());
    assert!(
        run.monitor.view().is_alive("web", &endpoint()),
        "unknown backends are trusted"
    );
}

#[test]
fn view_lets_only_up_backends_take_traffic() {
    let key = ("web".to_string(), endpoint());
    for (state, alive) in [
        (State::Up, true),
        (State::Down, false),
        (State::Pending, false),
    ] {
        let view = HealthView(HashMap::from([(key.clone(), state)]));
        assert_eq!(view.is_alive("web", &endpoint()), alive, "{state:?}");
    }
}
