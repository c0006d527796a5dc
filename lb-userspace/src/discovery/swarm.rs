//! Swarm tasks as backends. The API has no task events, so the manager is polled every
//! `swarm_poll_interval`, and at once on service and node events. A running task on a ready
//! and active node serves; one told to shut down (rolling update, node drain, scale down)
//! is drained while it still runs (no new flows, its flows finish) and leaves when it stops.
//! Backends are `node address : published port` for host-mode publishing, else the task's
//! address on the network `xlb.network` names (or its only one).
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use bollard::{
    Docker,
    query_parameters::{EventsOptions, ListNodesOptions, ListServicesOptions},
};
use futures_util::StreamExt as _;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{docker::connect, supervise::Report};
use crate::config::DockerConfig;

/// What the poll found: None until the first poll; empty when not a Swarm manager.
type Swarm = Option<Vec<SwarmTask>>;

/// A task that is running, meant to run, on a ready and active node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmTask {
    pub id: String,
    pub service: String,
    /// The service's labels (where `xlb.*` live for Swarm).
    pub labels: BTreeMap<String, String>,
    pub node_addr: Option<IpAddr>,
    /// Host-mode published ports: (target, published, "tcp"/"udp").
    pub published: Vec<(u16, u16, String)>,
    /// Network name -> the task's address on it.
    pub networks: Vec<(String, IpAddr)>,
    /// Still running but told to shut down.
    pub draining: bool,
    /// When Swarm created it: among tasks claiming one endpoint, the oldest keeps it.
    pub created: Option<SystemTime>,
}

/// Upper bound of one poll (services, nodes and tasks).
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn watch_swarm(config: DockerConfig, out: watch::Sender<Swarm>, report: Report) {
    let mut last_error = String::new();
    while !out.is_closed() {
        if let Err(e) = session(&config, &out, &report).await {
            let error = format!("{e:#}");
            if error != last_error {
                warn!(%error, "Swarm manager unreachable; keeping the last known tasks");
                last_error = error.clone();
            }
            report.unreachable(error);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn session(config: &DockerConfig, out: &watch::Sender<Swarm>, report: &Report) -> Result<()> {
    let docker = connect(&config.endpoint).await?;
    let info = docker.info().await.context("docker info")?;
    let manager = info
        .swarm
        .as_ref()
        .and_then(|s| s.control_available)
        .unwrap_or(false);
    if !manager {
        // Not a Swarm manager: nothing to poll; look again later.
        report.connected(Some("not a Swarm manager".into()));
        out.send_if_modified(|s| s.replace(Vec::new()) != Some(Vec::new()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        return Ok(());
    }
    let filters = HashMap::from([("type".to_string(), vec!["service".into(), "node".into()])]);
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }));
    info!("Swarm manager connected; polling tasks");
    let mut connected = false;
    let mut poll = tokio::time::interval(config.swarm_poll_interval);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            event = events.next() => match event {
                Some(Ok(_)) => poll.reset_immediately(),
                Some(Err(e)) => return Err(e).context("reading Swarm events"),
                None => bail!("the event stream ended"),
            },
            _ = out.closed() => return Ok(()),
        }
        let tasks = tokio::time::timeout(POLL_TIMEOUT, poll_tasks(&docker, &config.endpoint))
            .await
            .map_err(|_| anyhow::anyhow!("polling tasks: no answer within {POLL_TIMEOUT:?}"))??;
        if !connected {
            report.connected(None);
            connected = true;
        }
        out.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&tasks);
            if changed {
                *current = Some(tasks);
            }
            changed
        });
    }
}

async fn poll_tasks(docker: &Docker, endpoint: &str) -> Result<Vec<SwarmTask>> {
    let services = docker.list_services(None::<ListServicesOptions>).await?;
    let labels: HashMap<String, (String, BTreeMap<String, String>)> = services
        .into_iter()
        .filter_map(|s| {
            let spec = s.spec?;
            let labels = spec.labels.unwrap_or_default().into_iter().collect();
            Some((s.id?, (spec.name?, labels)))
        })
        .collect();
    let nodes: HashMap<String, Option<IpAddr>> = docker
        .list_nodes(None::<ListNodesOptions>)
        .await?
        .into_iter()
        .filter(|n| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.state.as_ref())
                .map(|s| s.to_string());
            let active = n
                .spec
                .as_ref()
                .and_then(|s| s.availability.as_ref())
                .map(|a| a.to_string());
            ready.as_deref() == Some("ready") && active.as_deref() == Some("active")
        })
        .filter_map(|n| {
            let addr = n.status.and_then(|s| s.addr).and_then(|a| a.parse().ok());
            Some((n.id?, addr))
        })
        .collect();
    // bollard's Task model lacks NetworksAttachments: read the tasks as JSON.
    let body = get(
        endpoint,
        "/tasks?filters=%7B%22desired-state%22%3A%5B%22running%22%5D%7D",
    )
    .await?;
    let raw: Vec<RawTask> = serde_json::from_slice(&body).context("parsing /tasks")?;
    Ok(tasks(raw, &labels, &nodes))
}

/// Keeps the running tasks of known services on nodes that are ready and active.
fn tasks(
    raw: Vec<RawTask>,
    services: &HashMap<String, (String, BTreeMap<String, String>)>,
    nodes: &HashMap<String, Option<IpAddr>>,
) -> Vec<SwarmTask> {
    let mut out: Vec<SwarmTask> = raw
        .into_iter()
        .filter(|t| t.status.state == "running")
        .filter_map(|t| {
            let (service, labels) = services.get(&t.service_id)?.clone();
            let node_addr = *nodes.get(&t.node_id)?;
            let mut published: Vec<(u16, u16, String)> = t
                .status
                .port_status
                .ports
                .iter()
                .filter(|p| p.publish_mode == "host")
                .map(|p| (p.target_port, p.published_port, p.protocol.clone()))
                .collect();
            // Ports are listed once per IP family.
            published.sort();
            published.dedup();
            let networks = t
                .networks_attachments
                .iter()
                .flat_map(|a| {
                    let name = a.network.spec.name.clone();
                    a.addresses.iter().filter_map(move |cidr| {
                        let ip = cidr.split('/').next()?.parse().ok()?;
                        Some((name.clone(), ip))
                    })
                })
                .filter(|(name, _)| name != "ingress")
                .collect();
            Some(SwarmTask {
                draining: t.desired_state != "running",
                id: t.id,
                service,
                labels,
                node_addr,
                published,
                networks,
                created: humantime::parse_rfc3339_weak(&t.created_at).ok(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTask {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    #[serde(rename = "NodeID", default)]
    node_id: String,
    #[serde(default)]
    desired_state: String,
    status: RawStatus,
    #[serde(default)]
    networks_attachments: Vec<RawAttachment>,
    #[serde(default)]
    created_at: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawStatus {
    #[serde(default)]
    state: String,
    #[serde(default)]
    port_status: RawPortStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawPortStatus {
    #[serde(default)]
    ports: Vec<RawPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawPort {
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    target_port: u16,
    #[serde(default)]
    published_port: u16,
    #[serde(default)]
    publish_mode: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawAttachment {
    network: RawNetwork,
    #[serde(default)]
    addresses: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetwork {
    spec: RawNetworkSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetworkSpec {
    #[serde(default)]
    name: String,
}

/// One GET against the Docker API (unix:// or tcp://), the body on 200.
async fn get(endpoint: &str, path: &str) -> Result<Bytes> {
    let request = hyper::Request::get(path)
        .header("host", "docker")
        .body(Empty::<Bytes>::new())?;
    let response = if let Some(socket) = endpoint.strip_prefix("unix://") {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        crate::http::send(stream, request).await?
    } else {
        let addr = endpoint
            .trim_start_matches("tcp://")
            .trim_start_matches("http://");
        let stream = tokio::net::TcpStream::connect(addr).await?;
        crate::http::send(stream, request).await?
    };
    if !response.status().is_success() {
        bail!("GET {path}: {}", response.status());
    }
    Ok(response.into_body().collect().await?.to_bytes())
}

#[cfg(test)]
mod tests;
