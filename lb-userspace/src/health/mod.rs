//! Health checking: one tokio task per backend probes it on its own schedule (see
//! `checker`), keeps the last result, and tells the agent when a backend goes up or down,
//! so the agent re-applies the rings. `sync` follows the desired state: new backends get a
//! task, removed ones lose it, a changed check restarts it.
pub mod checker;
pub mod probe;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

pub use checker::State;
use checker::{Checker, Timing};

use crate::{
    config::{HealthConfig, HealthKind},
    events::{EventLog, Kind},
    metrics::ProbeLatency,
    reconcile::Liveness,
    state::{DesiredState, Endpoint},
};

/// A backend of a service.
pub type Key = (String, Endpoint);

/// Runs one probe. The network prober is the real one; tests script their own.
pub trait Prober: Send + Sync + 'static {
    fn probe(
        &self,
        endpoint: Endpoint,
        check: HealthConfig,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
}

pub struct NetProber;

impl Prober for NetProber {
    fn probe(
        &self,
        endpoint: Endpoint,
        check: HealthConfig,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        Box::pin(probe::probe(endpoint, check))
    }
}

/// The last probe of a backend, for status and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastProbe {
    pub ok: bool,
    /// "ok", or why it failed.
    pub detail: String,
    pub latency: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendHealth {
    pub state: State,
    pub last: Option<LastProbe>,
    /// Probes run (for metrics).
    pub probes: u64,
}

type Table = Arc<Mutex<HashMap<Key, BackendHealth>>>;

struct Task {
    check: HealthConfig,
    handle: JoinHandle<()>,
}

pub struct HealthMonitor {
    prober: Arc<dyn Prober>,
    tasks: HashMap<Key, Task>,
    table: Table,
    changes: mpsc::UnboundedSender<Key>,
    latency: ProbeLatency,
    events: EventLog,
}

impl HealthMonitor {
    /// `changes` receives a backend's key each time its state changes.
    pub fn new(prober: Arc<dyn Prober>, changes: mpsc::UnboundedSender<Key>) -> Self {
        Self {
            prober,
            tasks: HashMap::new(),
            table: Arc::default(),
            changes,
            latency: ProbeLatency::default(),
            events: EventLog::default(),
        }
    }

    /// Backends going up and down are recorded in `events` too.
    pub fn with_events(mut self, events: EventLog) -> Self {
        self.events = events;
        self
    }

    /// Probe latency histograms, for /metrics.
    pub fn latency(&self) -> ProbeLatency {
        self.latency.clone()
    }

    /// Starts, restarts and stops probe tasks to match `desired`. `initial` gives the state
    /// a backend starts in (known from pinned maps after a restart, say); a backend already
    /// monitored keeps its state.
    pub fn sync(&mut self, desired: &DesiredState, initial: impl Fn(&Key) -> State) {
        let mut wanted: HashMap<Key, HealthConfig> = HashMap::new();
        for svc in desired.services.values() {
            for (endpoint, backend) in &svc.backends {
                wanted.insert(
                    (svc.name.clone(), *endpoint),
                    svc.health.with(&backend.health),
                );
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.get(key) == Some(&task.check);
            if !keep {
                task.handle.abort();
                self.latency.forget(&key.0, &key.1.to_string());
            }
            keep
        });
        let mut table = self.table.lock().expect("health table");
        table.retain(|key, _| wanted.contains_key(key));
        for (key, check) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            if check.kind == HealthKind::None {
                table.insert(
                    key,
                    BackendHealth {
                        state: State::Up,
                        last: None,
                        probes: 0,
                    },
                );
                continue;
            }
            let state = table
                .get(&key)
                .map(|h| h.state)
                .unwrap_or_else(|| initial(&key));
            table.insert(
                key.clone(),
                BackendHealth {
                    state,
                    last: None,
                    probes: 0,
                },
            );
            let handle = tokio::spawn(watch(
                key.clone(),
                check.clone(),
                state,
                self.prober.clone(),
                self.table.clone(),
                Reports {
                    changes: self.changes.clone(),
                    latency: self.latency.clone(),
                    events: self.events.clone(),
                },
            ));
            self.tasks.insert(key, Task { check, handle });
        }
    }

    /// A snapshot of every backend's health.
    pub fn snapshot(&self) -> HashMap<Key, BackendHealth> {
        self.table.lock().expect("health table").clone()
    }

    /// A read-only handle on the live table (for the API).
    pub fn reader(&self) -> HealthReader {
        HealthReader(self.table.clone())
    }

    pub fn view(&self) -> HealthView {
        let table = self.table.lock().expect("health table");
        HealthView(table.iter().map(|(k, h)| (k.clone(), h.state)).collect())
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.handle.abort();
        }
    }
}

#[derive(Clone)]
pub struct HealthReader(Table);

impl HealthReader {
    pub fn snapshot(&self) -> HashMap<Key, BackendHealth> {
        self.0.lock().expect("health table").clone()
    }
}

/// Which backends may take traffic, as of a snapshot.
#[derive(Debug, Clone, Default)]
pub struct HealthView(pub HashMap<Key, State>);

impl Liveness for HealthView {
    fn is_alive(&self, service: &str, endpoint: &Endpoint) -> bool {
        // Without a health entry (no check configured yet), a backend is trusted.
        self.0
            .get(&(service.to_string(), *endpoint))
            .is_none_or(|s| s.takes_traffic())
    }
}

/// Where a probe task tells what it found, besides its table entry.
struct Reports {
    /// The agent: to apply again.
    changes: mpsc::UnboundedSender<Key>,
    latency: ProbeLatency,
    events: EventLog,
}

/// Probes one backend forever: at once, then at the interval its state asks for.
async fn watch(
    key: Key,
    check: HealthConfig,
    initial: State,
    prober: Arc<dyn Prober>,
    table: Table,
    reports: Reports,
) {
    let Reports {
        changes,
        latency,
        events,
    } = reports;
    let backend = key.1.to_string();
    let mut checker = Checker::new(initial, Timing::from(&check));
    loop {
        let start = Instant::now();
        let result = tokio::time::timeout(check.timeout, prober.probe(key.1, check.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}",
                    humantime::format_duration(check.timeout)
                ))
            });
        let last = LastProbe {
            ok: result.is_ok(),
            detail: result.clone().err().unwrap_or_else(|| "ok".into()),
            latency: start.elapsed(),
        };
        latency.observe(&key.0, &backend, last.latency.as_secs_f64());
        let transition = checker.record(result.is_ok());
        {
            let mut table = table.lock().expect("health table");
            let Some(entry) = table.get_mut(&key) else {
                return; // removed while probing
            };
            entry.state = checker.state();
            entry.probes += 1;
            entry.last = Some(last.clone());
        }
        if let Some(state) = transition {
            let (service, endpoint) = (&key.0, key.1);
            let backend = backend.as_str();
            match state {
                State::Up => {
                    info!(%service, backend = %endpoint, "backend is up");
                    let message = format!(
                        "backend is up: probe ok in {:.1} ms",
                        last.latency.as_secs_f64() * 1000.0
                    );
                    events.record(Kind::BackendUp, Some(service), Some(backend), message);
                }
                _ => {
                    warn!(%service, backend = %endpoint, reason = %last.detail, "backend is down");
                    let message = format!("backend is down: {}", last.detail);
                    events.record(Kind::BackendDown, Some(service), Some(backend), message);
                }
            }
            if changes.send(key.clone()).is_err() {
                return;
            }
        }
        tokio::time::sleep(checker.next_delay()).await;
    }
}

#[cfg(test)]
mod tests;
