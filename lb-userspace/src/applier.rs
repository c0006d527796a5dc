//! The reconciler on a thread of its own. An apply can take a while (a Maglev build for a
//! large table, RCU grace periods), and meanwhile the agent's loop goes on answering the API,
//! drains and health checks. The loop hands each effective state over in order; requests
//! that queue up while an apply runs are coalesced, since only the newest desired state
//! matters. One thread applies, so the maps still have a single writer.
use std::{
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    reconcile::{Changes, Liveness, Maps, Reconciler, Snapshot},
    state::DesiredState,
};

/// For tests only: while the file this names exists, each apply waits (up to HOLD_MAX), so
/// that a test can show the loop answering during a long apply.
pub const HOLD_ENV: &str = "XLB_TEST_HOLD_APPLIES";
const HOLD_MAX: Duration = Duration::from_secs(60);

/// What one apply did, and the reconciler's state after it.
pub struct Outcome {
    /// The newest request this apply covered; the requests before it are covered too.
    pub seq: u64,
    pub result: Result<Changes>,
    pub snapshot: Snapshot,
}

/// The loop's handle on the applier thread.
pub struct Applier<L> {
    requests: Option<std_mpsc::Sender<(u64, DesiredState, L)>>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    thread: Option<JoinHandle<()>>,
    submitted: u64,
    finished: u64,
}

impl<L: Liveness + Send + 'static> Applier<L> {
    /// Hands `reconciler` and its maps to a new thread.
    pub fn spawn<M: Maps + Send + 'static>(
        mut reconciler: Reconciler,
        mut maps: M,
    ) -> Result<Self> {
        let (requests, queue) = std_mpsc::channel::<(u64, DesiredState, L)>();
        let (done, outcomes) = mpsc::unbounded_channel();
        let hold_file = std::env::var_os(HOLD_ENV).map(PathBuf::from);
        let thread = thread::Builder::new()
            .name("xlb-apply".into())
            .spawn(move || {
                while let Ok(mut request) = queue.recv() {
                    hold(hold_file.as_deref());
                    // Requests that came in during the last apply: the newest covers them.
                    while let Ok(newer) = queue.try_recv() {
                        request = newer;
                    }
                    let (seq, desired, live) = request;
                    let result = reconciler.apply(&mut maps, &desired, &live);
                    let snapshot = reconciler.snapshot();
                    if done
                        .send(Outcome {
                            seq,
                            result,
                            snapshot,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            })
            .context("starting the applier thread")?;
        Ok(Self {
            requests: Some(requests),
            outcomes,
            thread: Some(thread),
            submitted: 0,
            finished: 0,
        })
    }

    /// Queues an apply of `desired` with `live` and returns at once; the outcome with this
    /// number (or a later one) reports it.
    pub fn submit(&mut self, desired: DesiredState, live: L) -> Result<u64> {
        let seq = self.submitted + 1;
        let sent = self.requests.as_ref().map(|r| r.send((seq, desired, live)));
        if !matches!(sent, Some(Ok(()))) {
            bail!("the applier thread is gone");
        }
        self.submitted = seq;
        Ok(seq)
    }

    /// The next outcome; None once the thread is gone.
    pub async fn outcome(&mut self) -> Option<Outcome> {
        let outcome = self.outcomes.recv().await?;
        self.finished = outcome.seq;
        Some(outcome)
    }

    /// The number of the last request submitted.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Whether a submitted request has no outcome yet.
    pub fn busy(&self) -> bool {
        self.finished < self.submitted
    }

    /// Lets the queued applies finish, then ends the thread.
    pub fn stop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits while `path` exists (see HOLD_ENV).
fn hold(path: Option<&Path>) {
    let Some(path) = path.filter(|p| p.exists()) else {
        return;
    };
    warn!(path = %path.display(), "apply held while this file exists ({HOLD_ENV})");
    let since = Instant::now();
    while path.exists() && since.elapsed() < HOLD_MAX {
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests;
