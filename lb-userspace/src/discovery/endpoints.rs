//! Containers and Swarm tasks -> backends: the label policy that decides which service a
//! container or task joins, at which endpoint and weight, within what the service lets its
//! labels claim (claims.rs). Pure: it only reads what the watchers found and adds backends
//! to the desired state.
use std::net::IpAddr;

use crate::{
    config::{ClaimLimits, Config, Protocol},
    state::{BackendSpec, Delivery, DesiredState, Endpoint, Source},
};

use super::{
    claims::{COMPOSE_PROJECT, Claim, STACK_NAMESPACE},
    labels::{self, ContainerInfo, LabelError, LabelSpec},
    swarm::SwarmTask,
};

/// The weight `claim` may have in the service its labels name (checked against every VIP
/// of the config and that service's claim limits), or why it may not claim there.
fn admitted(config: &Config, claim: &Claim, spec: &LabelSpec) -> Result<u32, LabelError> {
    let vips: Vec<IpAddr> = config.services.iter().map(|s| s.vip).collect();
    let default = ClaimLimits::default();
    let limits = config
        .services
        .iter()
        .find(|s| s.name == spec.service)
        .map_or(&default, |s| &s.docker);
    claim.check(spec, limits, &spec.service, &vips)
}

/// Adds the labelled containers to the services they name, oldest first (so that a new
/// container cannot take an endpoint an older one has). A container with a bad label,
/// naming a service the config lacks, or claiming beyond the service's limits, is skipped
/// and its error returned; nothing else is affected. A container with a Docker HEALTHCHECK
/// joins when healthy.
pub fn add_containers(
    desired: &mut DesiredState,
    config: &Config,
    containers: &[ContainerInfo],
    prefix: &str,
) -> Vec<LabelError> {
    let mut errors = Vec::new();
    let mut oldest_first: Vec<&ContainerInfo> = containers.iter().collect();
    // Unknown creation times last; the id breaks ties, so the order never depends on the
    // list's.
    oldest_first.sort_by_key(|c| (c.created.is_none(), c.created, c.id.as_str()));
    for c in oldest_first {
        let spec = match labels::parse(&c.owner(), &c.labels, prefix) {
            Ok(Some(spec)) => spec,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let Some(service) = desired.services.get(&spec.service) else {
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
        let target = match c.target(&spec, prefix, service.protocol, service.vip.is_ipv6()) {
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
        let owner = c.owner();
        let claim = Claim {
            owner: &owner,
            prefix,
            labels: &c.labels,
            project_label: COMPOSE_PROJECT,
            network: Some(&target.network),
            addr: target.ip,
            addr_label: "network",
        };
        let weight = match admitted(config, &claim, &spec) {
            Ok(w) => w,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let endpoint = Endpoint {
            addr: target.ip,
            port: target.port,
        };
        let backend = BackendSpec {
            weight: if c.stopping { 0 } else { weight },
            source: Source::Docker(c.name.clone()),
            health: spec.health,
            bridge: target.bridge,
            delivery: Delivery::default(),
        };
        desired.add_backend(&spec.service, endpoint, backend);
    }
    errors
}

/// Adds the Swarm tasks of services whose labels name a configured service: at
/// `node address : published port` when the service publishes in host mode, else at the
/// task's address on its (named) network.
/// Tasks come after containers, oldest first; the same limits apply.
pub fn add_tasks(
    desired: &mut DesiredState,
    config: &Config,
    tasks: &[SwarmTask],
    prefix: &str,
) -> Vec<LabelError> {
    let mut errors = Vec::new();
    let mut oldest_first: Vec<&SwarmTask> = tasks.iter().collect();
    oldest_first.sort_by_key(|t| (t.created.is_none(), t.created, t.id.as_str()));
    for task in oldest_first {
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
        let Some(service) = desired.services.get(&spec.service) else {
            let reason = format!("`{}` is not a service in the config", spec.service);
            errors.push(bad("service", reason));
            continue;
        };
        let (endpoint, network) =
            match task_endpoint(task, &spec, service.protocol, service.vip.is_ipv6()) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err((label, reason)) => {
                    errors.push(bad(label, reason));
                    continue;
                }
            };
        let claim = Claim {
            owner: &owner,
            prefix,
            labels: &task.labels,
            project_label: STACK_NAMESPACE,
            network: network.as_deref(),
            addr: endpoint.addr,
            addr_label: if network.is_some() { "network" } else { "port" },
        };
        let weight = match admitted(config, &claim, &spec) {
            Ok(w) => w,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let backend = BackendSpec {
            weight: if task.draining { 0 } else { weight },
            source: Source::Swarm(task.id.clone()),
            health: spec.health,
            bridge: None,
            delivery: Delivery::default(),
        };
        desired.add_backend(&spec.service, endpoint, backend);
    }
    errors
}

/// A task's endpoint and the network its address is on (None: its node's published port).
type TaskEndpoint = (Endpoint, Option<String>);

/// Where a task is reached, and on which network (None: its node's published port);
/// Ok(None) for a task on a node without an address yet. A task on a dual-stack network
/// has an address of each family there: the one of the VIP's family (`v6`) counts.
fn task_endpoint(
    task: &SwarmTask,
    spec: &LabelSpec,
    protocol: Protocol,
    v6: bool,
) -> Result<Option<TaskEndpoint>, (&'static str, String)> {
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
        return Ok(task.node_addr.filter(|a| a.is_ipv6() == v6).map(|addr| {
            let endpoint = Endpoint {
                addr,
                port: *published_port,
            };
            (endpoint, None)
        }));
    }
    let Some(port) = spec.port else {
        return Err((
            "port",
            "required: the service publishes no port in host mode".into(),
        ));
    };
    let nets: Vec<(String, IpAddr)> = task
        .networks
        .iter()
        .filter(|(_, ip)| ip.is_ipv6() == v6)
        .cloned()
        .collect();
    let (network, ip) = match (&spec.network, nets.as_slice()) {
        (Some(name), nets) => nets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, ip)| (n.clone(), *ip))
            .ok_or_else(|| ("network", format!("the task is not attached to `{name}`")))?,
        (None, [(n, ip)]) => (n.clone(), *ip),
        (None, []) => return Ok(None),
        (None, nets) => {
            let names: Vec<&str> = nets.iter().map(|(n, _)| n.as_str()).collect();
            return Err((
                "network",
                format!("required: the task is on {}", names.join(", ")),
            ));
        }
    };
    Ok(Some((Endpoint { addr: ip, port }, Some(network))))
}

#[cfg(test)]
mod tests;
