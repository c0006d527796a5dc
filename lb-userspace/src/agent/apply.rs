//! Applies run on the applier's thread (see `crate::applier`): the loop hands over the
//! effective state and goes on; each outcome comes back to the loop, which logs it, detaches
//! the reply program where no backend is delivered any more, publishes, and answers the
//! commands that waited for it.
use anyhow::{Context as _, Result};
use tracing::{error, info};

use super::{APPLY_RETRY, Agent, Veths};
use crate::{applier::Outcome, reconcile::Changes};

/// Called with the result of the apply a command waits for (or of a later one covering it).
pub(super) type Waiter = Box<dyn FnOnce(&Result<Changes>)>;

impl Agent {
    /// Queues an apply of the desired state with drained backends at weight 0, current
    /// health and local bridges resolved to ifindexes; returns its number. The reply program
    /// is attached to a bridge (and a veth) before any backend is delivered there, and
    /// detached only after none is.
    pub(super) fn apply(&mut self) -> Result<u64> {
        let veths = self.resolve_veths();
        self.apply_with(veths)
    }

    /// `apply` with local backends' veths already resolved.
    pub(super) fn apply_with(&mut self, veths: Veths) -> Result<u64> {
        let mut effective = self.desired.clone();
        for (name, svc) in &mut effective.services {
            for (endpoint, b) in &mut svc.backends {
                if self.drained.contains(&(name.clone(), *endpoint)) {
                    b.weight = 0;
                }
            }
        }
        let reply_interfaces = self.deliver(&mut effective, &veths);
        self.veths = veths;
        self.attach_reply_before(reply_interfaces)?;
        self.applier.submit(effective, self.health.view())
    }

    /// Applies now and waits for the outcome (or that of a later apply covering it).
    pub(super) async fn apply_and_wait(&mut self) -> Result<Changes> {
        let seq = self.apply()?;
        self.wait_for(seq).await
    }

    /// Once apply `seq` (or a later one) is done, `waiter` gets its result.
    pub(super) fn after(&mut self, seq: u64, waiter: Waiter) {
        self.waiting.push((seq, waiter));
    }

    /// Waits for apply `seq` (at start, before anything else runs); its result.
    pub(super) async fn wait_for(&mut self, seq: u64) -> Result<Changes> {
        loop {
            let outcome = self
                .applier
                .outcome()
                .await
                .context("the applier thread is gone")?;
            let covered = outcome.seq >= seq;
            let result = self.finish(outcome);
            if covered {
                return result;
            }
        }
    }

    /// Takes in an apply's outcome: logs it, detaches the reply program once no newer apply
    /// is queued, publishes, and answers the commands it covers.
    pub(super) fn finish(&mut self, outcome: Outcome) -> Result<Changes> {
        let known = std::mem::replace(&mut self.reconciled, outcome.snapshot);
        let mut result = outcome.result;
        if let Ok(changes) = &result {
            for (service, e) in &changes.failed {
                if known.problems.get(service) == Some(e) {
                    continue;
                }
                error!(%service, "not applied, keeps its previous state (retried every {APPLY_RETRY:?}): {e}");
            }
            if !changes.is_empty() {
                info!(?changes, "applied");
            }
            // A queued apply may deliver to the interfaces this one left.
            if outcome.seq == self.applier.submitted()
                && let Err(e) = self.attach_reply_after()
            {
                result = Err(e);
            }
        }
        if let Err(e) = &result {
            error!("applying: {e:#}");
        }
        self.drain_applies.retain(|_, seq| *seq > outcome.seq);
        self.publish();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(seq, _)| *seq <= outcome.seq);
        self.waiting = waiting;
        for (_, waiter) in done {
            waiter(&result);
        }
        result
    }
}
