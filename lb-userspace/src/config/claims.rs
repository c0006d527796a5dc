//! What a service lets its dynamic sources claim (`[service.docker]`), and which addresses
//! can be a backend at all. Whoever can start a container on the host can label it, so
//! labels are held to limits the config sets; the static config is trusted.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::ServiceConfig;

/// Per-service limits on what container and Swarm labels may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimLimits {
    /// The highest `xlb.weight` a label may ask for. The default is the default weight
    /// (100): a container gets at most the share of a static backend left at its default.
    pub max_weight: u32,
    /// Whether `xlb.health.*` labels may change the service's health check for their
    /// container. Off by default: a container cannot turn its checks off (`none`), nor
    /// point them at a port that always answers.
    pub health_override: bool,
    /// Docker networks a backend's address may be taken from; empty: any.
    pub networks: Vec<String>,
    /// Compose projects (`com.docker.compose.project`) or Swarm stacks
    /// (`com.docker.stack.namespace`) whose containers may join; empty: any.
    pub projects: Vec<String>,
}

pub const DEFAULT_MAX_WEIGHT: u32 = 100;

impl Default for ClaimLimits {
    fn default() -> Self {
        Self {
            max_weight: DEFAULT_MAX_WEIGHT,
            health_override: false,
            networks: Vec::new(),
            projects: Vec::new(),
        }
    }
}

impl ClaimLimits {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Why `addr` cannot be a backend of a service, given every VIP of the config; None if it
/// can. Such an address would loop packets back to the LB or go nowhere.
pub fn unusable_backend(addr: IpAddr, vips: &[IpAddr]) -> Option<String> {
    let why = match addr {
        _ if addr.is_unspecified() => "an unspecified address",
        _ if addr.is_loopback() => "a loopback address",
        _ if addr.is_multicast() => "a multicast address",
        IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address",
        _ if vips.contains(&addr) => "a VIP of this config",
        _ => return None,
    };
    Some(format!("{addr} is {why}, not a backend"))
}

/// (field, reason) for every problem with a service's claim limits and backend addresses.
pub(super) fn problems(svc: &ServiceConfig, vips: &[IpAddr]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let limits = &svc.docker;
    if !(1..=u16::MAX as u32).contains(&limits.max_weight) {
        out.push((
            "docker.max_weight".into(),
            format!("{} must be in 1..=65535", limits.max_weight),
        ));
    }
    for (field, names) in [
        ("networks", &limits.networks),
        ("projects", &limits.projects),
    ] {
        for (k, name) in names.iter().enumerate() {
            if name.is_empty() {
                out.push((format!("docker.{field}[{k}]"), "is empty".into()));
            }
        }
    }
    for (j, be) in svc.backends.iter().enumerate() {
        if let Some(reason) = unusable_backend(be.address, vips) {
            out.push((format!("backend[{j}].address"), reason));
        }
    }
    out
}
