//! Labels -> backend: which service a container (or Swarm service) joins, on which port,
//! network and weight, with which health-check changes. Pure: no Docker calls. A label can
//! only attach to a service the config declares, so a container cannot claim a VIP.
use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime},
};

use crate::config::{HealthKind, HealthOverride, Protocol};

/// What discovery knows of a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading '/'.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub networks: Vec<NetworkInfo>,
    /// Ports the image or `--expose` declares.
    pub exposed: Vec<(u16, Protocol)>,
    /// Docker's HEALTHCHECK status ("starting", "healthy", "unhealthy"), if it has one.
    pub health: Option<String>,
    /// Signalled to stop (`docker stop` sends SIGTERM first): it takes no new flows, and
    /// its flows finish while it lingers.
    pub stopping: bool,
    /// When Docker created it: among containers claiming one endpoint, the oldest keeps it.
    pub created: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub name: String,
    pub ip: Option<IpAddr>,
    /// The global IPv6 address on an IPv6-enabled network (`GlobalIPv6Address`).
    pub ip6: Option<IpAddr>,
    /// The Linux bridge of a bridge network on this host.
    pub bridge: Option<String>,
}

/// The parsed `xlb.*` labels of a container or Swarm service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSpec {
    pub service: String,
    pub port: Option<u16>,
    pub network: Option<String>,
    pub weight: Option<u32>,
    pub health: HealthOverride,
}

/// A bad label: names the container (or service) and the label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelError {
    /// "container web_3 (3f2a1c9b0d1e)" or "swarm service web".
    pub owner: String,
    pub label: String,
    pub reason: String,
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: label {}: {}", self.owner, self.label, self.reason)
    }
}

/// Parses every `PREFIX.*` label. None if there is no `PREFIX.service` (not ours).
pub fn parse(
    owner: &str,
    labels: &BTreeMap<String, String>,
    prefix: &str,
) -> Result<Option<LabelSpec>, LabelError> {
    let key = |name: &str| format!("{prefix}.{name}");
    let Some(service) = labels.get(&key("service")) else {
        return Ok(None);
    };
    let mut spec = LabelSpec {
        service: service.clone(),
        ..LabelSpec::default()
    };
    for (label, value) in labels {
        let Some(name) = label.strip_prefix(prefix).and_then(|s| s.strip_prefix('.')) else {
            continue;
        };
        let bad = |reason: String| LabelError {
            owner: owner.into(),
            label: label.clone(),
            reason,
        };
        let h = &mut spec.health;
        match name {
            "service" => {}
            "port" => spec.port = Some(number(value, 1, u16::MAX.into()).map_err(bad)? as u16),
            "network" if value.is_empty() => return Err(bad("is empty".into())),
            "network" => spec.network = Some(value.clone()),
            "weight" => spec.weight = Some(number(value, 0, u16::MAX.into()).map_err(bad)?),
            "health.type" => h.kind = Some(kind(value).map_err(bad)?),
            "health.path" if !value.starts_with('/') => {
                return Err(bad(format!("`{value}` must start with '/'")));
            }
            "health.path" => h.path = Some(value.clone()),
            "health.port" => h.port = Some(number(value, 1, u16::MAX.into()).map_err(bad)? as u16),
            "health.expect_status" => {
                h.expect_status = Some(number(value, 100, 599).map_err(bad)? as u16);
            }
            "health.interval" => h.interval = Some(duration(value).map_err(bad)?),
            "health.timeout" => h.timeout = Some(duration(value).map_err(bad)?),
            "health.fastinter" => h.fastinter = Some(duration(value).map_err(bad)?),
            "health.downinter" => h.downinter = Some(duration(value).map_err(bad)?),
            "health.rise" => h.rise = Some(number(value, 1, 1000).map_err(bad)?),
            "health.fall" => h.fall = Some(number(value, 1, 1000).map_err(bad)?),
            _ => return Err(bad("unknown label (a typo?)".into())),
        }
    }
    Ok(Some(spec))
}

fn number(value: &str, min: u32, max: u32) -> Result<u32, String> {
    match u32::from_str(value.trim()) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("`{value}` is not a number in {min}..={max}")),
    }
}

fn duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value.trim()) {
        Ok(d) if d >= Duration::from_millis(10) => Ok(d),
        Ok(_) => Err(format!("`{value}` is shorter than 10ms")),
        Err(e) => Err(format!("`{value}` is not a duration ({e})")),
    }
}

fn kind(value: &str) -> Result<HealthKind, String> {
    match value {
        "tcp" => Ok(HealthKind::Tcp),
        "http" => Ok(HealthKind::Http),
        "udp" => Ok(HealthKind::Udp),
        "none" => Ok(HealthKind::None),
        _ => Err(format!("`{value}` is not one of tcp, http, udp, none")),
    }
}

/// Where a labelled container is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerTarget {
    /// The network the address is on.
    pub network: String,
    pub ip: IpAddr,
    pub port: u16,
    pub bridge: Option<String>,
}

impl ContainerInfo {
    pub fn owner(&self) -> String {
        format!(
            "container {} ({})",
            self.name,
            // Docker's ids are hex, but this runs on whatever the API sent: 12 chars, not
            // 12 bytes (a byte index inside a UTF-8 char panics).
            self.id.chars().take(12).collect::<String>()
        )
    }

    /// The address and port of this container for a service using `protocol` whose VIP is
    /// IPv6 (`v6`) or not: the network must be unambiguous among those where the container
    /// has an address of that family (or named), and so must the port.
    pub fn target(
        &self,
        spec: &LabelSpec,
        prefix: &str,
        protocol: Protocol,
        v6: bool,
    ) -> Result<ContainerTarget, LabelError> {
        let bad = |label: &str, reason: String| LabelError {
            owner: self.owner(),
            label: format!("{prefix}.{label}"),
            reason,
        };
        let address = |n: &NetworkInfo| if v6 { n.ip6 } else { n.ip };
        let attached: Vec<&NetworkInfo> = self
            .networks
            .iter()
            .filter(|n| address(n).is_some())
            .collect();
        let network = match &spec.network {
            Some(name) => *attached.iter().find(|n| n.name == *name).ok_or_else(|| {
                let on: Vec<&str> = attached.iter().map(|n| n.name.as_str()).collect();
                bad(
                    "network",
                    format!("not attached to `{name}` (it is on: {})", on.join(", ")),
                )
            })?,
            None => match attached.as_slice() {
                [one] => *one,
                [] => {
                    let family = if v6 { "IPv6" } else { "IPv4" };
                    let reason = format!("the container has no {family} address");
                    return Err(bad("network", reason));
                }
                several => {
                    let on: Vec<&str> = several.iter().map(|n| n.name.as_str()).collect();
                    let reason = format!("required: the container is on {}", on.join(", "));
                    return Err(bad("network", reason));
                }
            },
        };
        let port = match spec.port {
            Some(port) => port,
            None => {
                let ports: Vec<u16> = self
                    .exposed
                    .iter()
                    .filter(|(_, p)| *p == protocol)
                    .map(|(port, _)| *port)
                    .collect();
                match ports.as_slice() {
                    [one] => *one,
                    [] => return Err(bad("port", format!("required: no {protocol} port exposed"))),
                    several => {
                        let list: Vec<String> = several.iter().map(u16::to_string).collect();
                        let reason =
                            format!("required: {protocol} ports {} exposed", list.join(", "));
                        return Err(bad("port", reason));
                    }
                }
            }
        };
        Ok(ContainerTarget {
            network: network.name.clone(),
            ip: address(network).expect("filtered on the address"),
            port,
            bridge: network.bridge.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
