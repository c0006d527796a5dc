//! Desired state: which services exist and which backends each should have, merged from all
//! sources (the static config here; discovery adds Docker and Swarm backends through
//! [`DesiredState::add_backend`]). Pure data, no I/O, and no knowledge of the sources.
use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt,
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    bridgeport::VethPort,
    config::{
        Config, HealthConfig, HealthOverride, Mode, Protocol, ServiceConfig, V6_HALF_SUFFIX,
        v6_half_name,
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
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

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Static => f.write_str("the static config"),
            Source::Docker(name) => write!(f, "container {name}"),
            Source::Swarm(id) => write!(f, "swarm task {id}"),
            Source::Pinned => f.write_str("the pinned data path"),
        }
    }
}

/// One endpoint of a service claimed by two sources. The first claim keeps it (the static
/// config, then containers, then Swarm tasks, each oldest first: see `discovery::endpoints`); the
/// other is not a backend while the conflict lasts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Conflict {
    pub service: String,
    pub endpoint: Endpoint,
    pub kept: Source,
    pub refused: Source,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {}: {} is claimed by {} and by {}; {} keeps it",
            self.service, self.endpoint, self.kept, self.refused, self.kept
        )
    }
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
    /// New flows are placed by the 5-tuple or by the client address.
    pub hash: crate::config::HashMode,
    /// The LB answers ping to the VIP.
    pub icmp_echo: bool,
    /// Sources that may reach the service (empty: everyone).
    pub allow: Vec<ipnet::IpNet>,
    pub table_size: u32,
    pub health: HealthConfig,
    pub backends: BTreeMap<Endpoint, BackendSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DesiredState {
    pub services: BTreeMap<String, ServiceSpec>,
    /// Endpoints claimed twice, and who kept each.
    pub conflicts: Vec<Conflict>,
}

impl DesiredState {
    /// The services of a (validated) config with their static backends: a dual-stack
    /// service is two, one per family (`ServiceConfig::halves`).
    pub fn from_config(config: &Config) -> Self {
        let services = config
            .services
            .iter()
            .flat_map(|svc| {
                svc.halves()
                    .map(|(name, vip)| (name.clone(), ServiceSpec::from_config(svc, name, vip)))
            })
            .collect();
        Self {
            services,
            conflicts: Vec::new(),
        }
    }

    /// The services a name in a label or a command means: the service itself and, for a
    /// dual-stack service, its IPv6 half (`NAME.v6`).
    pub fn halves_of<'a>(&'a self, name: &str) -> Vec<&'a ServiceSpec> {
        let v6 = v6_half_name(name);
        [name, v6.as_str()]
            .into_iter()
            .filter_map(|n| self.services.get(n))
            .collect()
    }

    /// `name` is `of` or the IPv6 half of the dual-stack service `of`.
    pub fn names(of: &str, name: &str) -> bool {
        name == of || name.strip_suffix(V6_HALF_SUFFIX) == Some(of)
    }

    /// Of the services `name` means, the one that balances addresses of `addr`'s family.
    pub fn half_for(&self, name: &str, addr: IpAddr) -> Option<&ServiceSpec> {
        self.halves_of(name)
            .into_iter()
            .find(|s| s.vip.is_ipv4() == addr.is_ipv4())
    }

    /// Adds a backend of `service`. False, and nothing changes, when there is no such
    /// service: sources only fill services the config declares. An endpoint the service has
    /// already stays as it is and the claim is recorded in `conflicts`: the first claim
    /// wins, never silently the last.
    pub fn add_backend(&mut self, service: &str, endpoint: Endpoint, backend: BackendSpec) -> bool {
        let Some(svc) = self.services.get_mut(service) else {
            return false;
        };
        match svc.backends.entry(endpoint) {
            Entry::Vacant(slot) => {
                slot.insert(backend);
            }
            Entry::Occupied(held) => self.conflicts.push(Conflict {
                service: service.into(),
                endpoint,
                kept: held.get().source.clone(),
                refused: backend.source,
            }),
        }
        true
    }
}

impl ServiceSpec {
    fn from_config(svc: &ServiceConfig, name: String, vip: IpAddr) -> Self {
        let backends = svc
            .backends
            .iter()
            .filter(|b| b.address.is_ipv4() == vip.is_ipv4())
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
            name,
            vip,
            port: svc.port,
            protocol: svc.protocol,
            mode: svc.mode,
            snat: svc
                .snat
                .iter()
                .filter(|a| a.is_ipv4() == vip.is_ipv4())
                .copied()
                .collect(),
            gue: svc.encap == Some(crate::config::Encap::Gue),
            hash: svc.hash,
            icmp_echo: svc.icmp_echo,
            allow: svc
                .allow_nets()
                .into_iter()
                .filter(|n| n.addr().is_ipv4() == vip.is_ipv4())
                .collect(),
            table_size: svc.table_size,
            health: svc.health.clone(),
            backends,
        }
    }
}

#[cfg(test)]
mod tests;
