//! Reading containers from the Docker API, with errors sorted by what they say about the
//! container: gone or stopped (it leaves), or not known just now (a timeout, a 5xx, a lost
//! connection: its backend stays as it was).
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    str::FromStr,
    time::Duration,
};

use anyhow::{Context as _, Result};
use bollard::{
    Docker,
    errors::Error as DockerError,
    models::{ContainerInspectResponse, HealthStatusEnum},
    query_parameters::{InspectNetworkOptions, ListContainersOptions},
};

use super::signal::{SIGTERM, parse_signal};
use crate::{
    config::Protocol,
    discovery::labels::{ContainerInfo, NetworkInfo},
};

/// Upper bound of one API call with its body (bollard's own timeout covers the headers).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A running container as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub info: ContainerInfo,
    /// The signal `docker stop` sends first (Config.StopSignal; SIGTERM by default).
    pub stop_signal: i32,
}

/// What an inspection says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Running(Running),
    /// Stopped, paused, or gone (404).
    NotRunning,
    /// No answer that tells (a timeout, a 5xx, a broken connection): the error.
    Unknown(String),
}

/// The labelled containers a list found: running ones, and those whose inspection did not
/// answer (id -> error).
#[derive(Debug, Default)]
pub struct Listed {
    pub running: BTreeMap<String, Running>,
    pub unknown: BTreeMap<String, String>,
}

/// Whether the error says the object does not exist.
pub fn is_gone(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Lists the containers that carry `label`. An Err (the list itself failed) ends the
/// session; a container that could not be inspected is in `unknown`.
pub async fn list(docker: &Docker, label: &str, networks: &mut NetworkCache) -> Result<Listed> {
    let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
    let options = ListContainersOptions {
        filters: Some(filters),
        ..Default::default()
    };
    let summaries = tokio::time::timeout(CALL_TIMEOUT, docker.list_containers(Some(options)))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CALL_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .context("listing containers")?;
    let mut out = Listed::default();
    for summary in summaries {
        let Some(id) = summary.id else { continue };
        match inspect(docker, &id, networks).await {
            Lookup::Running(r) => {
                out.running.insert(id, r);
            }
            // It stopped or vanished between the list and its inspection.
            Lookup::NotRunning => {}
            Lookup::Unknown(e) => {
                out.unknown.insert(id, e);
            }
        }
    }
    Ok(out)
}

pub async fn inspect(docker: &Docker, id: &str, networks: &mut NetworkCache) -> Lookup {
    let short = &id[..id.len().min(12)];
    match tokio::time::timeout(CALL_TIMEOUT, docker.inspect_container(id, None)).await {
        Err(_) => Lookup::Unknown(format!(
            "inspecting container {short}: no answer within {CALL_TIMEOUT:?}"
        )),
        Ok(Err(e)) if is_gone(&e) => Lookup::NotRunning,
        Ok(Err(e)) => Lookup::Unknown(format!("inspecting container {short}: {e}")),
        Ok(Ok(c)) => match running(c, networks, docker).await {
            Ok(Some(r)) => Lookup::Running(r),
            Ok(None) => Lookup::NotRunning,
            Err(e) => Lookup::Unknown(format!("container {short}: {e}")),
        },
    }
}

/// The parts of an inspection discovery uses; None unless the container is running. Err if
/// one of its networks could not be read just now.
async fn running(
    c: ContainerInspectResponse,
    networks: &mut NetworkCache,
    docker: &Docker,
) -> Result<Option<Running>, String> {
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
        let parse = |ip: Option<&str>| ip.and_then(|ip| IpAddr::from_str(ip).ok());
        let ip = parse(endpoint.ip_address.as_deref());
        let ip6 = parse(endpoint.global_ipv6_address.as_deref()).filter(IpAddr::is_ipv6);
        let bridge = match endpoint.network_id.as_deref() {
            Some(id) if !id.is_empty() => networks.bridge(docker, id).await?,
            _ => None,
        };
        attached.push(NetworkInfo {
            name,
            ip,
            ip6,
            bridge,
        });
    }
    attached.sort_by(|a, b| a.name.cmp(&b.name));
    let stop_signal = config
        .stop_signal
        .as_deref()
        .and_then(parse_signal)
        .unwrap_or(SIGTERM);
    let info = ContainerInfo {
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
        created: c
            .created
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
    };
    Ok(Some(Running { info, stop_signal }))
}

/// Network id -> the Linux bridge of a local bridge network (None for overlay etc.).
#[derive(Default)]
pub struct NetworkCache(HashMap<String, Option<String>>);

impl NetworkCache {
    /// Err when the network could not be read just now (it is asked again next time).
    async fn bridge(&mut self, docker: &Docker, id: &str) -> Result<Option<String>, String> {
        if let Some(known) = self.0.get(id) {
            return Ok(known.clone());
        }
        let short = &id[..id.len().min(12)];
        let network = match tokio::time::timeout(
            CALL_TIMEOUT,
            docker.inspect_network(id, None::<InspectNetworkOptions>),
        )
        .await
        {
            Err(_) => {
                return Err(format!(
                    "network {short}: no answer within {CALL_TIMEOUT:?}"
                ));
            }
            // Removed under the container's feet: no bridge to deliver to.
            Ok(Err(e)) if is_gone(&e) => return Ok(None),
            Ok(Err(e)) => return Err(format!("network {short}: {e}")),
            Ok(Ok(n)) => n,
        };
        let bridge = (network.driver.as_deref() == Some("bridge")).then(|| {
            network
                .options
                .as_ref()
                .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
                .unwrap_or_else(|| format!("br-{short}"))
        });
        self.0.insert(id.to_string(), bridge.clone());
        Ok(bridge)
    }
}
