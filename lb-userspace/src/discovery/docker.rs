//! Docker containers as backends. Per session: list, then follow the events since just
//! before the list (the daemon replays them), then re-list every `resync_interval`, since
//! the daemon drops events past 1024 per subscriber. A `die` removes a container at once.
//! While the daemon is unreachable the last snapshot stays in force ("fail static"), and
//! the session is retried with backoff.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::{ContainerInspectResponse, HealthStatusEnum},
    query_parameters::{EventsOptions, InspectNetworkOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use tokio::sync::watch;
use tracing::{info, warn};

use super::labels::{ContainerInfo, NetworkInfo};
use crate::config::{DockerConfig, Protocol};

/// The running labelled containers, or None until the first list succeeded.
type Containers = Option<Vec<ContainerInfo>>;

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
pub async fn watch_containers(config: DockerConfig, out: watch::Sender<Containers>) {
    let mut backoff = Duration::from_millis(250);
    let mut last_error = String::new();
    while !out.is_closed() {
        let started = std::time::Instant::now();
        match session(&config, &out).await {
            Ok(()) => return,
            Err(e) => {
                let error = format!("{e:#}");
                if error != last_error {
                    warn!(%error, "Docker unreachable; keeping the last known backends");
                    last_error = error;
                }
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
async fn session(config: &DockerConfig, out: &watch::Sender<Containers>) -> Result<()> {
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
    let mut containers = list(&docker, &label, &mut networks).await?;
    info!(containers = containers.len(), "Docker connected");
    publish(out, &containers);
    let mut resync = tokio::time::interval(config.resync_interval);
    resync.tick().await;
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { bail!("the event stream ended") };
                let event = event.context("reading Docker events")?;
                let id = event.actor.and_then(|a| a.id).unwrap_or_default();
                let action = event.action.unwrap_or_default();
                match Effect::of(&action) {
                    Effect::Refresh => {
                        let stopping = containers.get(&id).is_some_and(|c| c.stopping);
                        match docker.inspect_container(&id, None).await {
                            Ok(c) => match container_info(c, &mut networks, &docker).await? {
                                Some(info) => {
                                    containers.insert(id, ContainerInfo { stopping, ..info });
                                }
                                None => { containers.remove(&id); }
                            },
                            Err(_) => { containers.remove(&id); }
                        }
                    }
                    Effect::Stopping => match containers.get_mut(&id) {
                        Some(c) if !c.stopping => c.stopping = true,
                        _ => continue,
                    },
                    Effect::Remove => {
                        containers.remove(&id);
                    }
                    Effect::Ignore => continue,
                }
                publish(out, &containers);
            }
            _ = resync.tick() => {
                let listed = list(&docker, &label, &mut networks).await?;
                containers = resynced(&containers, listed);
                publish(out, &containers);
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
    fn of(action: &str) -> Effect {
        // "health_status: healthy" carries its status after the colon.
        match action.split(':').next().unwrap_or_default() {
            "start" | "unpause" | "health_status" | "rename" | "update" => Effect::Refresh,
            "kill" => Effect::Stopping,
            "die" | "stop" | "pause" | "destroy" | "oom" => Effect::Remove,
            _ => Effect::Ignore,
        }
    }
}

/// A fresh list replaces what events built, except that a container still running after
/// `docker stop` signalled it stays draining (the list cannot know it was signalled).
fn resynced(
    current: &BTreeMap<String, ContainerInfo>,
    listed: BTreeMap<String, ContainerInfo>,
) -> BTreeMap<String, ContainerInfo> {
    listed
        .into_iter()
        .map(|(id, info)| {
            let stopping = current.get(&id).is_some_and(|c| c.stopping);
            (id, ContainerInfo { stopping, ..info })
        })
        .collect()
}

fn publish(out: &watch::Sender<Containers>, containers: &BTreeMap<String, ContainerInfo>) {
    let list: Vec<ContainerInfo> = containers.values().cloned().collect();
    out.send_if_modified(|current| {
        let changed = current.as_ref() != Some(&list);
        if changed {
            *current = Some(list);
        }
        changed
    });
}

async fn list(
    docker: &Docker,
    label: &str,
    networks: &mut NetworkCache,
) -> Result<BTreeMap<String, ContainerInfo>> {
    let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
    let options = ListContainersOptions {
        filters: Some(filters),
        ..Default::default()
    };
    let mut out = BTreeMap::new();
    for summary in docker
        .list_containers(Some(options))
        .await
        .context("listing containers")?
    {
        let Some(id) = summary.id else { continue };
        // A container can vanish between the list and its inspection.
        let Ok(inspected) = docker.inspect_container(&id, None).await else {
            continue;
        };
        if let Some(info) = container_info(inspected, networks, docker).await? {
            out.insert(id, info);
        }
    }
    Ok(out)
}

/// The parts of an inspection discovery uses; None unless the container is running.
async fn container_info(
    c: ContainerInspectResponse,
    networks: &mut NetworkCache,
    docker: &Docker,
) -> Result<Option<ContainerInfo>> {
    let state = c.state.unwrap_or_default();
    if state.running != Some(true) || state.paused == Some(true) {
        return Ok(None);
    }
    let config = c.config.unwrap_or_default();
    let health = state.health.and_then(|h| h.status).and_then(|s| match s {
        HealthStatusEnum::STARTING => Some("starting".to_string()),
        HealthStatusEnum::HEALTHY => Some("healthy".to_string()),
        HealthStatusEnum::UNHEALTHY => Some("unhealthy".to_string()),
        HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
    });
    let exposed = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
            let proto = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return None,
            };
            Some((port.parse().ok()?, proto))
        })
        .collect();
    let mut attached = Vec::new();
    let endpoints = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    for (name, endpoint) in endpoints {
        let ip = endpoint
            .ip_address
            .as_deref()
            .and_then(|ip| IpAddr::from_str(ip).ok());
        let bridge = match endpoint.network_id.as_deref() {
            Some(id) if !id.is_empty() => networks.bridge(docker, id).await,
            _ => None,
        };
        attached.push(NetworkInfo { name, ip, bridge });
    }
    attached.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        networks: attached,
        exposed,
        health,
        stopping: false,
    }))
}

/// Network id -> the Linux bridge of a local bridge network (None for overlay etc.).
#[derive(Default)]
struct NetworkCache(HashMap<String, Option<String>>);

impl NetworkCache {
    async fn bridge(&mut self, docker: &Docker, id: &str) -> Option<String> {
        if let Some(known) = self.0.get(id) {
            return known.clone();
        }
        let network = docker
            .inspect_network(id, None::<InspectNetworkOptions>)
            .await
            .ok()?;
        let bridge = (network.driver.as_deref() == Some("bridge")).then(|| {
            network
                .options
                .as_ref()
                .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
                .unwrap_or_else(|| format!("br-{}", &id[..id.len().min(12)]))
        });
        self.0.insert(id.to_string(), bridge.clone());
        bridge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, stopping: bool) -> (String, ContainerInfo) {
        let info = ContainerInfo {
            id: id.into(),
            name: id.into(),
            labels: BTreeMap::new(),
            networks: Vec::new(),
            exposed: Vec::new(),
            health: None,
            stopping,
        };
        (id.to_string(), info)
    }

    #[test]
    fn events_map_to_what_they_mean_for_a_backend() {
        for (action, effect) in [
            ("start", Effect::Refresh),
            ("health_status: healthy", Effect::Refresh),
            ("health_status: unhealthy", Effect::Refresh),
            ("kill", Effect::Stopping),
            ("die", Effect::Remove),
            ("destroy", Effect::Remove),
            ("pause", Effect::Remove),
            ("exec_start: sh", Effect::Ignore),
            ("attach", Effect::Ignore),
        ] {
            assert_eq!(Effect::of(action), effect, "{action}");
        }
    }

    #[test]
    fn a_resync_keeps_stopping_containers_draining_and_drops_vanished_ones() {
        let current = BTreeMap::from([
            container("a", true),
            container("b", false),
            container("gone", false),
        ]);
        let listed = BTreeMap::from([
            container("a", false),
            container("b", false),
            container("new", false),
        ]);
        let after = resynced(&current, listed);
        let summary: Vec<(&str, bool)> = after
            .values()
            .map(|c| (c.id.as_str(), c.stopping))
            .collect();
        assert_eq!(summary, [("a", true), ("b", false), ("new", false)]);
    }
}
