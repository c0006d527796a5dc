//! Desired state: which services exist and which backends each should have, merged from all
//! sources (static config now; Docker and Swarm later). Pure data, no I/O.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Serialize;

use crate::{
    bridgeport::VethPort,
    config::{Config, HealthConfig, HealthOverride, Mode, Protocol, ServiceConfig},
    discovery::{
        labels::{self, ContainerInfo, LabelError, LabelSpec},
        swarm::SwarmTask,
    },
};

/// Where a backend listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr: std::net::SocketAddr = s
            .parse()
            .map_err(|_| format!("`{s}` is not ADDRESS:PORT"))?;
        Ok(Endpoint {
            addr: addr.ip(),
            port: addr.port(),
        })
    }
}

/// Which source declared a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Static,
    /// A container on this host (its name).
    Docker(String),
    /// A Swarm task (its id).
    Swarm(String),
    /// A backend of the pinned data path that the config does not declare, kept after a
    /// restart until Docker has answered (it may be a container or task of its).
    Pinned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendSpec {
    /// 0 drains the backend: no new flows, established flows stay.
    pub weight: u32,
    pub source: Source,
    /// Changes to the service's health check for this backend.
    pub health: HealthOverride,
    /// A bridge on this host the backend sits on (a local container's): the data path
    /// hands packets to it directly.
    pub bridge: Option<String>,
    /// `bridge` resolved by the agent.
    pub delivery: Delivery,
}

/// How packets reach a backend on a local bridge, as the agent resolved it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// The bridge's ifindex; 0: the kernel routes the packets.
    pub bridge: u32,
    /// The container's host-side veth on that bridge, once known: packets skip the bridge.
    pub veth: Option<VethPort>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    /// fullnat: LB source addresses (empty: the FIB's source towards each backend).
    pub snat: Vec<IpAddr>,
    /// dsr: GUE instead of IPIP.
    pub gue: bool,
    /// The LB answers ping to the VIP.
    pub icmp_echo: bool,
    pub table_size: u32,
    pub health: HealthConfig,
    pub backends: BTreeMap<Endpoint, BackendSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<String, ServiceSpec>,
}

impl DesiredState {
    /// The services of a (validated) config with their static backends.
    pub fn from_config(config: &Config) -> Self {
        let services = config
            .services
            .iter()
            .map(|svc| (svc.name.clone(), ServiceSpec::from_config(svc)))
            .collect();
        Self { services }
    }
}

impl DesiredState {
    /// Adds the labelled containers to the services they name. A container with a bad
    /// label (or naming a service the config lacks) is skipped and its error returned;
    /// nothing else is affected. A container with a Docker HEALTHCHECK joins when healthy.
    pub fn add_containers(
        &mut self,
        containers: &[ContainerInfo],
        prefix: &str,
    ) -> Vec<LabelError> {
        let mut errors = Vec::new();
        for c in containers {
            let spec = match labels::parse(&c.owner(), &c.labels, prefix) {
                Ok(Some(spec)) => spec,
                Ok(None) => continue,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let Some(service) = self.services.get_mut(&spec.service) else {
                errors.push(LabelError {
                    owner: c.owner(),
                    label: format!("{prefix}.service"),
                    reason: format!("`{}` is not a service in the config", spec.service),
                });
                continue;
            };
            if c.health.as_deref().is_some_and(|h| h != "healthy") {
                continue;
            }
            let target = match c.target(&spec, prefix, service.protocol) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if target.ip.is_ipv4() != service.vip.is_ipv4() {
                errors.push(LabelError {
                    owner: c.owner(),
                    label: format!("{prefix}.network"),
                    reason: format!("{} is not of the VIP's IP family", target.ip),
                });
                continue;
            }
            let endpoint = Endpoint {
                addr: target.ip,
                port: target.port,
            };
            let backend = BackendSpec {
                weight: if c.stopping {
                    0
                } else {
                    spec.weight.unwrap_or(100)
                },
                source: Source::Docker(c.name.clone()),
                health: spec.health,
                bridge: target.bridge,
                delivery: Delivery::default(),
            };
            service.backends.insert(endpoint, backend);
        }
        errors
    }
}

impl DesiredState {
    /// Adds the Swarm tasks of services whose labels name a configured service: at
    /// `node address : published port` when the service publishes in host mode, else at
    /// the task's address on its (named) network.
    pub fn add_tasks(&mut self, tasks: &[SwarmTask], prefix: &str) -> Vec<LabelError> {
        let mut errors = Vec::new();
        for task in tasks {
            let owner = format!("swarm service {}", task.service);
            let spec = match labels::parse(&owner, &task.labels, prefix) {
                Ok(Some(spec)) => spec,
                Ok(None) => continue,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let bad = |label: &str, reason: String| LabelError {
                owner: owner.clone(),
                label: format!("{prefix}.{label}"),
                reason,
            };
            let Some(service) = self.services.get_mut(&spec.service) else {
                let reason = format!("`{}` is not a service in the config", spec.service);
                errors.push(bad("service", reason));
                continue;
            };
            let endpoint = match task_endpoint(task, &spec, service.protocol) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err((label, reason)) => {
                    errors.push(bad(label, reason));
                    continue;
                }
            };
            let backend = BackendSpec {
                weight: if task.draining {
                    0
                } else {
                    spec.weight.unwrap_or(100)
                },
                source: Source::Swarm(task.id.clone()),
                health: spec.health,
                bridge: None,
                delivery: Delivery::default(),
            };
            service.backends.insert(endpoint, backend);
        }
        errors
    }
}

/// Where a task is reached; Ok(None) for a task on a node without an address yet.
fn task_endpoint(
    task: &SwarmTask,
    spec: &LabelSpec,
    protocol: Protocol,
) -> Result<Option<Endpoint>, (&'static str, String)> {
    let published: Vec<&(u16, u16, String)> = task
        .published
        .iter()
        .filter(|(_, _, p)| *p == protocol.to_string())
        .collect();
    if !published.is_empty() {
        let chosen = match (spec.port, published.as_slice()) {
            (Some(port), _) => published.iter().find(|(target, _, _)| *target == port),
            (None, [one]) => Some(one),
            (None, _) => {
                let list: Vec<String> = published.iter().map(|(t, _, _)| t.to_string()).collect();
                return Err((
                    "port",
                    format!("required: ports {} are published", list.join(", ")),
                ));
            }
        };
        let Some((_, published_port, _)) = chosen else {
            return Err((
                "port",
                format!("{} is not a published port", spec.port.unwrap_or(0)),
            ));
        };
        return Ok(task.node_addr.map(|addr| Endpoint {
            addr,
            port: *published_port,
        }));
    }
    let Some(port) = spec.port else {
        return Err((
            "port",
            "required: the service publishes no port in host mode".into(),
        ));
    };
    let ip = match (&spec.network, task.networks.as_slice()) {
        (Some(name), nets) => nets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, ip)| *ip)
            .ok_or_else(|| ("network", format!("the task is not attached to `{name}`")))?,
        (None, [(_, ip)]) => *ip,
        (None, []) => return Ok(None),
        (None, nets) => {
            let names: Vec<&str> = nets.iter().map(|(n, _)| n.as_str()).collect();
            return Err((
                "network",
                format!("required: the task is on {}", names.join(", ")),
            ));
        }
    };
    Ok(Some(Endpoint { addr: ip, port }))
}

impl ServiceSpec {
    fn from_config(svc: &ServiceConfig) -> Self {
        let backends = svc
            .backends
            .iter()
            .map(|b| {
                let endpoint = Endpoint {
                    addr: b.address,
                    port: b.port,
                };
                let spec = BackendSpec {
                    weight: b.weight,
                    source: Source::Static,
                    health: b.health.clone(),
                    bridge: b.bridge.clone(),
                    delivery: Delivery::default(),
                };
                (endpoint, spec)
            })
            .collect();
        Self {
            name: svc.name.clone(),
            vip: svc.vip,
            port: svc.port,
            protocol: svc.protocol,
            mode: svc.mode,
            snat: svc.snat.clone(),
            gue: svc.encap == Some(crate::config::Encap::Gue),
            icmp_echo: svc.icmp_echo,
            table_size: svc.table_size,
            health: svc.health.clone(),
            backends,
        }
    }
}

#[cfg(test)]
mod tests;
