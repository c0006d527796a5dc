//! Docker containers as backends. Per session: list, then follow the events since just
//! before the list (the daemon replays them), then re-list every `resync_interval`, since
//! the daemon drops events past 1024 per subscriber. A `die` removes a container at once;
//! a `kill` with its stop signal (or SIGKILL) drains it, any other signal (an nginx reload's
//! HUP) changes nothing. Only a container that is gone (404) or not running leaves: one
//! that cannot be inspected just now (a timeout, a 5xx) keeps its backend and is asked
//! again every second. While the daemon is unreachable the last snapshot stays in force
//! ("fail static"), and the session is retried with backoff.
mod inspect;
mod signal;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use bollard::{API_DEFAULT_VERSION, Docker, query_parameters::EventsOptions};
use futures_util::StreamExt as _;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{labels::ContainerInfo, supervise::Report};
use crate::config::DockerConfig;
use inspect::{Listed, Lookup, NetworkCache, Running, inspect, list};
use signal::{SIGKILL, SIGTERM, parse_signal};

/// The running labelled containers, or None until the first list succeeded.
type Containers = Option<Vec<ContainerInfo>>;

/// How often containers whose inspection did not answer are asked again.
const RETRY: Duration = Duration::from_secs(1);

/// Connects to the daemon at `endpoint` (unix:///path or tcp://host:port) and negotiates
/// the API version: never pinned.
pub async fn connect(endpoint: &str) -> Result<Docker> {
    let docker = if let Some(path) = endpoint.strip_prefix("unix://") {
        Docker::connect_with_unix(path, 30, API_DEFAULT_VERSION)?
    } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
        Docker::connect_with_http(endpoint, 30, API_DEFAULT_VERSION)?
    } else {
        bail!("docker.endpoint `{endpoint}`: use unix:///path or tcp://host:port");
    };
    Ok(docker.negotiate_version().await?)
}

/// Keeps `out` equal to the set of running labelled containers, for as long as the
/// receiver lives.
pub async fn watch_containers(
    config: DockerConfig,
    out: watch::Sender<Containers>,
    report: Report,
) {
    let mut backoff = Duration::from_millis(250);
    let mut last_error = String::new();
    while !out.is_closed() {
        let started = std::time::Instant::now();
        match session(&config, &out, &report).await {
            Ok(()) => return,
            Err(e) => {
                let error = format!("{e:#}");
                if error != last_error {
                    warn!(%error, "Docker unreachable; keeping the last known backends");
                    last_error = error.clone();
                }
                report.unreachable(error);
            }
        }
        // A session that ran a while was healthy: retry quickly after it.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(250);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection: list, follow events, resync. Returns Err when the daemon goes away.
async fn session(
    config: &DockerConfig,
    out: &watch::Sender<Containers>,
    report: &Report,
) -> Result<()> {
    let docker = connect(&config.endpoint).await?;
    let label = format!("{}.service", config.label_prefix);
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        ("label".to_string(), vec![label.clone()]),
    ]);
    // Events from just before the list are replayed, so nothing falls between the two.
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_secs()
        .saturating_sub(1);
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(filters),
    }));
    let mut networks = NetworkCache::default();
    // From the last snapshot: a container that does not answer now keeps its backend.
    let mut tracked = Tracked::from_snapshot(out.borrow().as_deref().unwrap_or_default());
    tracked.resync(list(&docker, &label, &mut networks).await?);
    info!(containers = tracked.containers.len(), "Docker connected");
    report.connected(None);
    publish(out, &tracked);
    let mut resync = tokio::time::interval(config.resync_interval);
    resync.tick().await;
    loop {
        let retry_at = tracked.retry_at.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { bail!("the event stream ended") };
                let event = event.context("reading Docker events")?;
                let actor = event.actor.unwrap_or_default();
                let id = actor.id.unwrap_or_default();
                let attributes = actor.attributes.unwrap_or_default();
                let action = event.action.unwrap_or_default();
                match Effect::of(&action, &attributes, tracked.stop_signal(&id)) {
                    Effect::Refresh => {
                        let lookup = inspect(&docker, &id, &mut networks).await;
                        tracked.update(&id, lookup);
                    }
                    Effect::Stopping => {
                        if !tracked.mark_stopping(&id) {
                            continue;
                        }
                    }
                    Effect::Remove => tracked.remove(&id),
                    Effect::Ignore => continue,
                }
                publish(out, &tracked);
            }
            _ = resync.tick() => {
                tracked.resync(list(&docker, &label, &mut networks).await?);
                publish(out, &tracked);
            }
            _ = tokio::time::sleep_until(retry_at), if !tracked.unresolved.is_empty() => {
                tracked.retry_at = None;
                let ids: Vec<String> = tracked.unresolved.keys().cloned().collect();
                for id in ids {
                    let lookup = inspect(&docker, &id, &mut networks).await;
                    tracked.update(&id, lookup);
                }
                publish(out, &tracked);
            }
            _ = out.closed() => return Ok(()),
        }
    }
}

/// What a container event means for its backend.
#[derive(Debug, PartialEq, Eq)]
enum Effect {
    /// Inspect it again (it started, changed health, was renamed...).
    Refresh,
    /// `docker stop` signals before it kills: new flows go elsewhere while it lingers.
    Stopping,
    /// Gone at once: it died, stopped, paused or was removed.
    Remove,
    Ignore,
}

impl Effect {
    /// `stop_signal`: the container's (SIGTERM if not known).
    fn of(action: &str, attributes: &HashMap<String, String>, stop_signal: i32) -> Effect {
        // "health_status: healthy" carries its status after the colon.
        match action.split(':').next().unwrap_or_default() {
            "start" | "unpause" | "health_status" | "rename" | "update" => Effect::Refresh,
            // `docker stop` sends the stop signal, `docker kill` SIGKILL by default; other
            // signals (`docker kill -s HUP`: a reload) do not stop the container. A kill
            // that names no signal (no daemon here omits it) is taken for a stop.
            "kill" => match attributes.get("signal").map(|s| parse_signal(s)) {
                None => Effect::Stopping,
                Some(Some(sig)) if sig == stop_signal || sig == SIGKILL => Effect::Stopping,
                Some(_) => Effect::Ignore,
            },
            "die" | "stop" | "pause" | "destroy" | "oom" => Effect::Remove,
            _ => Effect::Ignore,
        }
    }
}

/// What a session knows of the labelled containers.
#[derive(Debug, Default)]
struct Tracked {
    containers: BTreeMap<String, ContainerInfo>,
    stop_signals: HashMap<String, i32>,
    /// Containers whose last inspection did not answer (id -> error): asked again every
    /// `RETRY`; their backends stay as they were meanwhile.
    unresolved: BTreeMap<String, String>,
    /// When to ask them.
    retry_at: Option<tokio::time::Instant>,
}

impl Tracked {
    fn from_snapshot(containers: &[ContainerInfo]) -> Tracked {
        Tracked {
            containers: containers
                .iter()
                .map(|c| (c.id.clone(), c.clone()))
                .collect(),
            ..Tracked::default()
        }
    }

    fn stop_signal(&self, id: &str) -> i32 {
        self.stop_signals.get(id).copied().unwrap_or(SIGTERM)
    }

    /// The container's state as an inspection found it.
    fn update(&mut self, id: &str, lookup: Lookup) {
        match lookup {
            Lookup::Running(running) => {
                self.unresolved.remove(id);
                self.insert(id.to_string(), running);
            }
            Lookup::NotRunning => {
                self.unresolved.remove(id);
                self.remove(id);
            }
            Lookup::Unknown(error) => self.unknown(id.to_string(), error),
        }
    }

    fn insert(&mut self, id: String, running: Running) {
        // Stopping stays stopping: neither an inspection nor a list can tell it was signalled.
        let stopping = self.containers.get(&id).is_some_and(|c| c.stopping);
        self.stop_signals.insert(id.clone(), running.stop_signal);
        let info = ContainerInfo {
            stopping,
            ..running.info
        };
        self.containers.insert(id, info);
    }

    fn unknown(&mut self, id: String, error: String) {
        if self.unresolved.get(&id) != Some(&error) {
            let known = self.containers.contains_key(&id);
            warn!(%error, "Docker did not say how container {id:.12} is; {}, and it is asked again", if known { "its backend stays as it was" } else { "it joins once it answers" });
        }
        self.unresolved.insert(id, error);
        self.retry_at
            .get_or_insert_with(|| tokio::time::Instant::now() + RETRY);
    }

    /// True if that changed anything.
    fn mark_stopping(&mut self, id: &str) -> bool {
        match self.containers.get_mut(id) {
            Some(c) if !c.stopping => {
                c.stopping = true;
                true
            }
            _ => false,
        }
    }

    fn remove(&mut self, id: &str) {
        self.containers.remove(id);
        self.stop_signals.remove(id);
        self.unresolved.remove(id);
    }

    /// A fresh list replaces what events built: containers not listed are gone. Those
    /// listed that did not answer their inspection stay as they were.
    fn resync(&mut self, listed: Listed) {
        let mut before = std::mem::take(&mut self.containers);
        let mut signals = std::mem::take(&mut self.stop_signals);
        let unresolved = std::mem::take(&mut self.unresolved);
        for (id, running) in listed.running {
            if let Some(old) = before.remove(&id) {
                self.containers.insert(id.clone(), old);
            }
            self.insert(id, running);
        }
        for (id, error) in listed.unknown {
            if let Some(old) = before.remove(&id) {
                self.containers.insert(id.clone(), old);
            }
            if let Some(sig) = signals.remove(&id) {
                self.stop_signals.insert(id.clone(), sig);
            }
            if let Some(previous) = unresolved.get(&id) {
                self.unresolved.insert(id.clone(), previous.clone());
            }
            self.unknown(id, error);
        }
    }
}

fn publish(out: &watch::Sender<Containers>, tracked: &Tracked) {
    let list: Vec<ContainerInfo> = tracked.containers.values().cloned().collect();
    out.send_if_modified(|current| {
        let changed = current.as_ref() != Some(&list);
        if changed {
            *current = Some(list);
        }
        changed
    });
}

#[cfg(test)]
mod tests;
