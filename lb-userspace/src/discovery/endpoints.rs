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
    let vips: Vec<IpAddr> = config.services.iter().flat_map(|s| s.vip.iter()).collect();
    let default = ClaimLimits::default();
    // `web.v6` (a dual-stack service's v6 half) is held to the limits of `web`.
    let limits = config
        .services
        .iter()
        .find(|s| DesiredState::names(&s.name, &spec.service))
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
        let halves = half_keys(desired, &spec.service);
        if halves.is_empty() {
            errors.push(LabelError {
                owner: c.owner(),
                label: format!("{prefix}.service"),
                reason: format!("`{}` is not a service in the config", spec.service),
            });
            continue;
        }
        if c.health.as_deref().is_some_and(|h| h != "healthy") {
            continue;
        }
        let joined: Vec<_> = halves
            .iter()
            .map(|half| container_backend(config, c, &spec, half, prefix))
            .collect();
        join_halves(desired, &halves, joined, &mut errors);
    }
    errors
}

/// What a service name in a label means: the service, or both halves of a dual-stack one.
struct Half {
    name: String,
    protocol: Protocol,
    vip: IpAddr,
}

fn half_keys(desired: &DesiredState, name: &str) -> Vec<Half> {
    desired
        .halves_of(name)
        .into_iter()
        .map(|s| Half {
            name: s.name.clone(),
            protocol: s.protocol,
            vip: s.vip,
        })
        .collect()
}

/// Adds each half's backend. A claim that fits no half is an error (the first half's); one
/// that fits a half is not, as a v4-only container on a dual-stack service joins its v4 VIP.
fn join_halves(
    desired: &mut DesiredState,
    halves: &[Half],
    joined: Vec<Result<(Endpoint, BackendSpec), LabelError>>,
    errors: &mut Vec<LabelError>,
) {
    let fits = joined.iter().any(Result::is_ok);
    let mut first_error = None;
    for (half, result) in halves.iter().zip(joined) {
        match result {
            Ok((endpoint, backend)) => {
                desired.add_backend(&half.name, endpoint, backend);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    errors.extend(first_error.filter(|_| !fits));
}

/// The backend a container is in one service (half), or why it is not.
fn container_backend(
    config: &Config,
    c: &ContainerInfo,
    spec: &LabelSpec,
    half: &Half,
    prefix: &str,
) -> Result<(Endpoint, BackendSpec), LabelError> {
    let target = c.target(spec, prefix, half.protocol, half.vip.is_ipv6())?;
    if target.ip.is_ipv4() != half.vip.is_ipv4() {
        return Err(LabelError {
            owner: c.owner(),
            label: format!("{prefix}.network"),
            reason: format!("{} is not of the VIP's IP family", target.ip),
        });
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
    let weight = admitted(config, &claim, spec)?;
    let endpoint = Endpoint {
        addr: target.ip,
        port: target.port,
    };
    let backend = BackendSpec {
        weight: if c.stopping { 0 } else { weight },
        source: Source::Docker(c.name.clone()),
        health: spec.health.clone(),
        bridge: target.bridge,
        delivery: Delivery::default(),
    };
    Ok((endpoint, backend))
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
        let halves = half_keys(desired, &spec.service);
        if halves.is_empty() {
            let reason = format!("`{}` is not a service in the config", spec.service);
            errors.push(bad("service", reason));
            continue;
        }
        // A half without an address of its family yet is left out, not an error.
        let (joins, joined): (Vec<Half>, Vec<_>) = halves
            .into_iter()
            .filter_map(|half| {
                let result = task_backend(config, task, &spec, &half, prefix).transpose()?;
                Some((half, result))
            })
            .unzip();
        join_halves(desired, &joins, joined, &mut errors);
    }
    errors
}

/// The backend a task is in one service (half), None while it has no address of the half's
/// family, or why it is not.
fn task_backend(
    config: &Config,
    task: &SwarmTask,
    spec: &LabelSpec,
    half: &Half,
    prefix: &str,
) -> Result<Option<(Endpoint, BackendSpec)>, LabelError> {
    let owner = format!("swarm service {}", task.service);
    let found = task_endpoint(task, spec, half.protocol, half.vip.is_ipv6()).map_err(
        |(label, reason)| LabelError {
            owner: owner.clone(),
            label: format!("{prefix}.{label}"),
            reason,
        },
    )?;
    let Some((endpoint, network)) = found else {
        return Ok(None);
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
    let weight = admitted(config, &claim, spec)?;
    let backend = BackendSpec {
        weight: if task.draining { 0 } else { weight },
        source: Source::Swarm(task.id.clone()),
        health: spec.health.clone(),
        bridge: None,
        delivery: Delivery::default(),
    };
    Ok(Some((endpoint, backend)))
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
