//! Supervised watchers. Each source's watcher runs in a task of its own under a supervisor:
//! if it panics, or ends while its snapshots are still wanted, it is started again with
//! backoff, and its last snapshot stays in force meanwhile (fail static). Each source's
//! state (connecting, connected, unreachable with its last error, restarting) and restart
//! count are on a [`Board`] that status and metrics read.
use std::{
    any::Any,
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tracing::error;

/// Where a source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    /// Has not reached its daemon yet.
    Connecting,
    Connected,
    /// Lost its daemon (or never reached it); retrying.
    Unreachable,
    /// Its watcher failed; started again after a backoff.
    Restarting,
}

impl SourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Connecting => "connecting",
            SourceState::Connected => "connected",
            SourceState::Unreachable => "unreachable",
            SourceState::Restarting => "restarting",
        }
    }
}

/// One source as `GET /status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// "docker" (this host's containers) or "swarm" (the tasks of Swarm services).
    pub source: String,
    pub state: SourceState,
    /// A note on a connected source, such as "not a Swarm manager".
    pub detail: Option<String>,
    /// The most recent error, kept after recovery for the record.
    pub last_error: Option<String>,
    /// Times its watcher failed and was started again.
    pub restarts: u64,
}

type Cell = Arc<Mutex<SourceStatus>>;

/// Every running source's status. A source started again on a new config gets a new cell,
/// so a watcher being stopped cannot overwrite its successor's state.
#[derive(Clone, Default, Debug)]
pub struct Board(Arc<Mutex<BTreeMap<String, Cell>>>);

impl Board {
    pub fn snapshot(&self) -> Vec<SourceStatus> {
        let cells = self.0.lock().expect("source board");
        cells
            .values()
            .map(|c| c.lock().expect("source status").clone())
            .collect()
    }

    /// A fresh entry for `source` (connecting, no restarts), and the handle to update it.
    pub fn register(&self, source: &str) -> Report {
        let cell = Arc::new(Mutex::new(SourceStatus {
            source: source.to_string(),
            state: SourceState::Connecting,
            detail: None,
            last_error: None,
            restarts: 0,
        }));
        let mut cells = self.0.lock().expect("source board");
        cells.insert(source.to_string(), cell.clone());
        Report(cell)
    }

    pub fn remove(&self, source: &str) {
        self.0.lock().expect("source board").remove(source);
    }
}

/// A watcher's handle to its entry on the board.
#[derive(Clone, Debug)]
pub struct Report(Cell);

impl Report {
    fn update(&self, f: impl FnOnce(&mut SourceStatus)) {
        f(&mut self.0.lock().expect("source status"));
    }

    pub fn connected(&self, detail: Option<String>) {
        self.update(|s| {
            s.state = SourceState::Connected;
            s.detail = detail;
        });
    }

    pub fn unreachable(&self, error: String) {
        self.update(|s| {
            s.state = SourceState::Unreachable;
            s.detail = None;
            s.last_error = Some(error);
        });
    }

    fn restarting(&self, why: String) {
        self.update(|s| {
            s.state = SourceState::Restarting;
            s.detail = None;
            s.last_error = Some(why);
            s.restarts += 1;
        });
    }

    fn source(&self) -> String {
        self.0.lock().expect("source status").source.clone()
    }
}

/// How long a failed watcher waits before it starts again.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    /// A watcher that ran this long was healthy: the next wait is `first` again.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// A supervised watcher and the snapshots it publishes (None until its first).
pub struct Watch<T> {
    pub rx: watch::Receiver<Option<T>>,
    supervisor: JoinHandle<()>,
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        // The supervisor's JoinSet goes with it, and aborts the watcher.
        self.supervisor.abort();
    }
}

impl<T: Send + Sync + 'static> Watch<T> {
    /// Runs `run(sender, report)` under a supervisor until the Watch is dropped.
    pub fn start<F, Fut>(report: Report, backoff: Backoff, run: F) -> Self
    where
        F: Fn(watch::Sender<Option<T>>, Report) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = watch::channel(None);
        Self {
            rx,
            supervisor: tokio::spawn(supervise(tx, report, backoff, run)),
        }
    }

    /// Resolves when the watcher publishes a new snapshot. The supervisor keeps a sender,
    /// so a watcher that dies does not leave this pending for a reason nobody sees.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn supervise<T, F, Fut>(
    tx: watch::Sender<Option<T>>,
    report: Report,
    backoff: Backoff,
    run: F,
) where
    T: Send + Sync + 'static,
    F: Fn(watch::Sender<Option<T>>, Report) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let source = report.source();
    let mut delay = backoff.first;
    loop {
        let started = Instant::now();
        let mut task = JoinSet::new();
        task.spawn(run(tx.clone(), report.clone()));
        let outcome = task.join_next().await.expect("one task");
        let why = match outcome {
            Ok(()) => "the watcher ended".to_string(),
            Err(e) if e.is_panic() => {
                format!("the watcher panicked: {}", panic_text(e.into_panic()))
            }
            Err(e) => format!("the watcher failed: {e}"),
        };
        if started.elapsed() >= backoff.healthy_after {
            delay = backoff.first;
        }
        error!(%source, "{why}; starting it again in {delay:?}, the last known backends stay");
        report.restarting(why);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff.max);
    }
}

fn panic_text(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "(no message)".into()),
    }
}

#[cfg(test)]
mod tests;
