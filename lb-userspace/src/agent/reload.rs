//! `xlb reload` and SIGHUP: the config is read again and takes effect in full, or not at
//! all. Everything that can be checked without changing anything is checked first (the
//! config parses and validates, its interfaces exist); then the steps that can fail run
//! (attachments, then the maps: every service of the new config must apply), and a failed
//! step undoes those before it. The announce table, which cannot fail, changes last. A
//! reload waits for its applies (commands queue meanwhile; the API's reads and the health
//! checks go on).
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow, bail};
use tracing::{info, warn};

use super::Agent;
use crate::{
    config::Config, discovery::Sources, events::Kind, health::State, layout::Layout, loader,
    netdev::ifindex, reconcile::Changes,
};

/// Why a reload did not take effect.
#[derive(Debug)]
pub(super) enum ReloadError {
    /// Nothing changed: the config was refused before, or what changed was undone.
    Rejected(anyhow::Error),
    /// A step failed, and undoing the steps before it failed too.
    NotUndone {
        error: anyhow::Error,
        undo: anyhow::Error,
    },
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rejected(e) => write!(f, "reload rejected, the running state is kept:\n{e:#}"),
            Self::NotUndone { error, undo } => write!(
                f,
                "reload failed, and undoing it failed too ({undo:#}): the data path may be \
                 partly changed; a new reload or a restart sets it right:\n{error:#}"
            ),
        }
    }
}

impl Agent {
    /// Re-reads the config and applies all of it, or none of it; records which.
    pub(super) async fn reload(&mut self, sources: &mut Sources) -> Result<String, ReloadError> {
        let result = self.try_reload(sources).await;
        match &result {
            Ok(msg) => self.events.record(Kind::Reload, None, None, msg.clone()),
            Err(e) => self
                .events
                .record(Kind::ReloadRejected, None, None, e.to_string()),
        }
        result
    }

    async fn try_reload(&mut self, sources: &mut Sources) -> Result<String, ReloadError> {
        let config =
            Config::load(&self.config_path).map_err(|e| ReloadError::Rejected(e.into()))?;
        interfaces_exist(&config).map_err(ReloadError::Rejected)?;
        maps_fit(&self.config, &config).map_err(ReloadError::Rejected)?;
        let (new, old) = (&config.agent, &self.config.agent);
        let restart_only = (&new.pin_path, &new.api, new.api_public, &new.control)
            != (&old.pin_path, &old.api, old.api_public, &old.control)
            || (&new.control_group, &new.control_token_file)
                != (&old.control_group, &old.control_token_file);
        if restart_only {
            warn!(
                "agent.pin_path, agent.api and agent.control changes (and their settings) take \
                 effect on restart only"
            );
        }
        // A fullnat or dsr service coming or going can change what `auto` picks.
        let nat_only = config.nat_only();
        let attach = new.interfaces != old.interfaces
            || new.xdp_mode != old.xdp_mode
            || nat_only != self.config.nat_only();
        if attach {
            let attached = loader::attach(
                &mut self.ebpf,
                &old.pin_path,
                &new.interfaces,
                new.xdp_mode,
                nat_only,
            );
            match attached {
                Ok(a) => self.attachments = a,
                Err(e) => {
                    let error = e.context("attaching to the new interfaces");
                    let undo = self.reattach();
                    self.publish();
                    return Err(match undo {
                        Ok(()) => ReloadError::Rejected(error),
                        Err(undo) => ReloadError::NotUndone { error, undo },
                    });
                }
            }
        }

        let old = std::mem::replace(&mut self.config, config);
        let drained = self.drained.clone();
        // What failed before this reload is known only once the applies in flight are done.
        if self.applier.busy() {
            let in_flight = self.applier.submitted();
            let _ = self.wait_for(in_flight).await;
        }
        let known = self.reconciled.problems.clone();
        sources.configure(&self.config);
        self.update_desired(sources);
        let changes = match self.apply_and_wait().await {
            Ok(changes) => self.all_applied(changes, &known),
            Err(e) => Err(e),
        };
        let changes = match changes {
            Ok(changes) => changes,
            Err(e) => {
                self.config = old;
                self.drained = drained;
                let undo = self.restore(sources, attach, &known).await;
                self.publish();
                return Err(match undo {
                    Ok(()) => ReloadError::Rejected(e),
                    Err(undo) => ReloadError::NotUndone { error: e, undo },
                });
            }
        };
        // Cannot fail from here on.
        if self.config.agent.announce_table != old.agent.announce_table {
            self.set_announce_table(self.config.agent.announce_table);
        }
        self.publish();
        let msg = format!("reloaded {}: {changes}", self.config_path.display());
        info!("{msg}");
        Ok(msg)
    }

    /// The desired state of `self.config`, with the health checks and drains it keeps.
    fn update_desired(&mut self, sources: &Sources) {
        self.rebuild(sources);
        self.drained.retain(|(svc, ep)| {
            self.desired
                .services
                .get(svc)
                .is_some_and(|s| s.backends.contains_key(ep))
        });
        // A backend new to this agent takes traffic after its first good probe.
        self.sync_health(State::Pending);
    }

    /// Fails if a service of the desired state could not be applied, unless it failed so
    /// before (`known`): the reconciler kept its previous state and retries it.
    fn all_applied(&self, changes: Changes, known: &BTreeMap<String, String>) -> Result<Changes> {
        let new: Vec<String> = changes
            .failed
            .iter()
            .filter(|(svc, e)| {
                self.desired.services.contains_key(*svc) && known.get(*svc) != Some(e)
            })
            .map(|(svc, e)| format!("service {svc}: {e}"))
            .collect();
        if !new.is_empty() {
            bail!("not applied: {}", new.join("; "));
        }
        Ok(changes)
    }

    /// Applies `self.config` (the old one, restored) again, and its attachments if they
    /// were changed.
    async fn restore(
        &mut self,
        sources: &mut Sources,
        attach: bool,
        known: &BTreeMap<String, String>,
    ) -> Result<()> {
        // Sources restart only if their part of the config changed.
        sources.configure(&self.config);
        self.update_desired(sources);
        let applied = match self.apply_and_wait().await {
            Ok(changes) => self.all_applied(changes, known).map(|_| ()),
            Err(e) => Err(e),
        }
        .context("applying the old config");
        let attached = if attach { self.reattach() } else { Ok(()) };
        match (applied, attached) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Err(a), Err(b)) => Err(anyhow!("{a:#}; {b:#}")),
        }
    }

    /// The attachments of `self.config` again: links made for new interfaces go, a mode
    /// switched back (make-before-break as well).
    fn reattach(&mut self) -> Result<()> {
        let agent = &self.config.agent;
        self.attachments = loader::attach(
            &mut self.ebpf,
            &agent.pin_path,
            &agent.interfaces,
            agent.xdp_mode,
            self.config.nat_only(),
        )
        .context("attaching as before")?;
        Ok(())
    }
}

/// A config that needs larger flow tables than those pinned (a larger `flow_table_size`, a
/// first fullnat service) is refused: the maps keep their size while the agent runs (a
/// restart resizes the flow tables: loader/resize.rs). Ring space and backend slots are the
/// reconciler's to check: it knows what is really in use.
fn maps_fit(old: &Config, new: &Config) -> Result<()> {
    let wanted = Layout::for_config(new);
    if Layout::for_config(old).flows_short_of(&wanted).is_empty() {
        return Ok(());
    }
    let Some(pinned) = Layout::of_pins(&old.agent.pin_path)? else {
        return Ok(());
    };
    let short = pinned.flows_short_of(&wanted);
    if !short.is_empty() {
        bail!(
            "the config needs larger maps than the running ones ({}); maps are not resized \
             by a reload: a restart resizes the flow tables, and their flows move",
            short.join("; ")
        );
    }
    Ok(())
}

/// Every interface the config names must exist: checked before anything changes.
fn interfaces_exist(config: &Config) -> Result<()> {
    let missing: Vec<&str> = config
        .agent
        .interfaces
        .iter()
        .filter(|i| ifindex(i) == 0)
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!("agent.interfaces: no interface {} here", missing.join(", "));
    }
    Ok(())
}
