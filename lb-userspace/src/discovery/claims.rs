//! What a labelled container or Swarm task may claim in a service: its `[service.docker]`
//! limits (weight, health-check changes, networks, projects) and an address that can be a
//! backend. Pure: a claim beyond them is an error naming the owner and the label.
use std::{collections::BTreeMap, net::IpAddr};

use super::labels::{LabelError, LabelSpec};
use crate::config::{ClaimLimits, unusable_backend};

/// The label Compose puts on a project's containers.
pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// The label `docker stack deploy` puts on a stack's services.
pub const STACK_NAMESPACE: &str = "com.docker.stack.namespace";

/// The default weight of a labelled backend (as a static one's).
const DEFAULT_WEIGHT: u32 = 100;

/// Where a claim comes from, as the checks need it.
pub struct Claim<'a> {
    pub owner: &'a str,
    pub prefix: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// The label naming the project (Compose) or stack (Swarm).
    pub project_label: &'static str,
    /// The Docker network the address is taken from; None for a node's published port.
    pub network: Option<&'a str>,
    pub addr: IpAddr,
    /// The label that chose the address (for the error when it cannot be a backend).
    pub addr_label: &'static str,
}

impl Claim<'_> {
    fn bad(&self, label: String, reason: String) -> LabelError {
        LabelError {
            owner: self.owner.into(),
            label,
            reason,
        }
    }

    /// The weight the claim gets, or why it is refused. `service` is the service's name,
    /// `vips` every VIP of the config.
    pub fn check(
        &self,
        spec: &LabelSpec,
        limits: &ClaimLimits,
        service: &str,
        vips: &[IpAddr],
    ) -> Result<u32, LabelError> {
        let key = |name: &str| format!("{}.{name}", self.prefix);
        let weight = match spec.weight {
            Some(w) if w > limits.max_weight => {
                return Err(self.bad(
                    key("weight"),
                    format!(
                        "{w} is above the max_weight {} of service {service} ([service.docker])",
                        limits.max_weight
                    ),
                ));
            }
            Some(w) => w,
            None => DEFAULT_WEIGHT.min(limits.max_weight),
        };
        if !limits.health_override
            && let Some(label) = self.labels.keys().find(|k| k.starts_with(&key("health.")))
        {
            return Err(self.bad(
                label.clone(),
                format!(
                    "service {service} does not let labels change its health check \
                     ([service.docker] health_override = false)"
                ),
            ));
        }
        if !limits.networks.is_empty() {
            let allowed = self
                .network
                .is_some_and(|n| limits.networks.iter().any(|a| a == n));
            if !allowed {
                let on = match self.network {
                    Some(n) => format!("network `{n}`"),
                    None => "a node's published port (no network)".into(),
                };
                return Err(self.bad(
                    key("network"),
                    format!(
                        "{on} is not among the networks of service {service} ({})",
                        limits.networks.join(", ")
                    ),
                ));
            }
        }
        if !limits.projects.is_empty() {
            let project = self.labels.get(self.project_label);
            if !project.is_some_and(|p| limits.projects.contains(p)) {
                let what = match project {
                    Some(p) => format!("project `{p}`"),
                    None => "no project".into(),
                };
                return Err(self.bad(
                    self.project_label.into(),
                    format!(
                        "{what} is not among the projects of service {service} ({})",
                        limits.projects.join(", ")
                    ),
                ));
            }
        }
        if let Some(reason) = unusable_backend(self.addr, vips) {
            return Err(self.bad(key(self.addr_label), reason));
        }
        Ok(weight)
    }
}
