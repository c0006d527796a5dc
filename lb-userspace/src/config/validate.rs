//! Semantic checks of a parsed config: every problem with its field path and reason (the
//! line is found by locate.rs).
use std::{collections::HashSet, net::IpAddr, time::Duration};

use ipnet::IpNet;
use lb_common::sizes::{
    MAX_ALLOW_PREFIXES, MAX_BACKENDS, MAX_FLOW_TABLE_SIZE, MAX_RING_BLOCKS, MAX_RING_SIZE,
    MAX_SERVICES, MIN_FLOW_TABLE_SIZE, RING_BLOCK, RING_HALVES, ring_blocks,
};

use super::{ApiListen, Config, HealthConfig, HealthKind, claims, modes, parse_control};

impl Config {
    /// Semantic checks: (field path, reason) for each problem.
    pub(super) fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let agent = &self.agent;
        if agent.interfaces.is_empty() {
            out.push((
                "agent.interfaces".into(),
                "at least one interface is required".into(),
            ));
        }
        for (i, name) in agent.interfaces.iter().enumerate() {
            if !valid_interface(name) {
                out.push((
                    format!("agent.interfaces[{i}]"),
                    format!("`{name}` is not an interface name"),
                ));
            }
        }
        match ApiListen::parse(&agent.api) {
            Err(e) => out.push(("agent.api".into(), e)),
            Ok(ApiListen::Tcp(addr)) if !addr.ip().is_loopback() && !agent.api_public => {
                out.push((
                    "agent.api".into(),
                    format!(
                        "{addr} is not a loopback address: whoever reaches it reads every \
                         service, backend and counter; set `api_public = true` in [agent] \
                         to mean it"
                    ),
                ))
            }
            Ok(_) => {}
        }
        if let Err(e) = parse_control(&agent.control) {
            out.push(("agent.control".into(), e));
        }
        if let Some(group) = &agent.control_group
            && (group.is_empty() || group.contains([':', '/', ' ']))
        {
            out.push((
                "agent.control_group".into(),
                format!("`{group}` is not a group name"),
            ));
        }
        if let Some(file) = &agent.control_token_file
            && !file.is_absolute()
        {
            out.push((
                "agent.control_token_file".into(),
                "must be an absolute path".into(),
            ));
        }
        if !agent.pin_path.is_absolute() {
            out.push(("agent.pin_path".into(), "must be an absolute path".into()));
        }
        // 0 is no table; 253-255 are the kernel's default, main and local tables.
        if let Some(table @ (0 | 253..=255)) = agent.announce_table {
            out.push((
                "agent.announce_table".into(),
                format!("{table} is reserved; use a table of its own, such as 100"),
            ));
        }
        if !(MIN_FLOW_TABLE_SIZE..=MAX_FLOW_TABLE_SIZE).contains(&agent.flow_table_size) {
            out.push((
                "agent.flow_table_size".into(),
                format!(
                    "{} is outside {MIN_FLOW_TABLE_SIZE}..={MAX_FLOW_TABLE_SIZE}",
                    agent.flow_table_size
                ),
            ));
        }
        if let Some(docker) = &self.docker {
            for (field, d) in [
                ("docker.resync_interval", docker.resync_interval),
                ("docker.swarm_poll_interval", docker.swarm_poll_interval),
            ] {
                if d.is_zero() {
                    out.push((field.into(), "must be longer than 0s".into()));
                }
            }
        }
        // A dual-stack service is two in the data path.
        let data_path_services: usize = self.services.iter().map(|s| s.vip.len()).sum();
        if data_path_services > MAX_SERVICES as usize {
            out.push((
                "service".into(),
                format!(
                    "at most {MAX_SERVICES} services are supported (a dual-stack service \
                     counts twice)"
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        let mut backends = 0;
        let mut allow_prefixes = 0;
        let mut ring_space = 0;
        let all_vips: Vec<IpAddr> = self.services.iter().flat_map(|s| s.vip.iter()).collect();
        for (i, svc) in self.services.iter().enumerate() {
            let at = |field: &str| format!("service[{i}].{field}");
            if !valid_name(&svc.name) {
                out.push((
                    at("name"),
                    format!("`{}`: use 1-63 of a-z, 0-9, '-', '_'", svc.name),
                ));
            }
            if !names.insert(svc.name.as_str()) {
                out.push((
                    at("name"),
                    format!("`{}` is used by another service", svc.name),
                ));
            }
            for vip in svc.vip.iter() {
                if !vips.insert((vip, svc.port, svc.protocol)) {
                    out.push((
                        at("vip"),
                        format!(
                            "{}/{} is used by another service",
                            std::net::SocketAddr::new(vip, svc.port),
                            svc.protocol
                        ),
                    ));
                }
            }
            if svc.port == 0 {
                out.push((at("port"), "must be 1-65535".into()));
            }
            out.extend(
                claims::problems(svc, &all_vips)
                    .into_iter()
                    .map(|(f, r)| (at(&f), r)),
            );
            out.extend(
                modes::problems(svc, self.agent.xdp_mode)
                    .into_iter()
                    .map(|(f, r)| (at(&f), r)),
            );
            if !(3..=MAX_RING_SIZE).contains(&svc.table_size) || !is_prime(svc.table_size) {
                out.push((
                    at("table_size"),
                    format!("{} must be a prime in 3..={MAX_RING_SIZE}", svc.table_size),
                ));
            } else {
                // Room for the ring in use and the one being written.
                let before = ring_space;
                ring_space += svc.vip.len() as u32 * RING_HALVES * ring_blocks(svc.table_size);
                if ring_space > MAX_RING_BLOCKS && before <= MAX_RING_BLOCKS {
                    out.push((
                        at("table_size"),
                        format!(
                            "the services' tables need more than the ring space of {} slots \
                             (each service needs twice its table_size, rounded up to {RING_BLOCK})",
                            MAX_RING_BLOCKS * RING_BLOCK
                        ),
                    ));
                }
            }
            out.extend(
                health_problems(&svc.health)
                    .into_iter()
                    .map(|(f, r)| (at(&format!("health.{f}")), r)),
            );
            for (j, range) in svc.allow.iter().enumerate() {
                match parse_allow(range) {
                    Err(e) => out.push((format!("service[{i}].allow[{j}]"), e)),
                    Ok(net) if svc.vip.of_family(net.addr()).is_none() => out.push((
                        format!("service[{i}].allow[{j}]"),
                        format!("`{range}` is not of the VIP's IP family: it would match nothing"),
                    )),
                    Ok(_) => {}
                }
            }
            // Each VIP of a dual-stack service takes the ranges of its family: a list with
            // one family only would leave the other VIP open to everyone.
            let nets = svc.allow_nets();
            if svc.vip.len() > 1 && !nets.is_empty() {
                for vip in svc.vip.iter() {
                    if !nets.iter().any(|n| n.addr().is_ipv4() == vip.is_ipv4()) {
                        out.push((
                            at("allow"),
                            format!(
                                "lists no range of {vip}'s family: list one for each VIP of a \
                                 dual-stack service (`::/0` or `0.0.0.0/0` for everyone)"
                            ),
                        ));
                    }
                }
            }
            allow_prefixes += svc.allow.len();
            let mut seen = HashSet::new();
            for (j, be) in svc.backends.iter().enumerate() {
                let at = |field: &str| format!("service[{i}].backend[{j}].{field}");
                if svc.vip.of_family(be.address).is_none() {
                    out.push((
                        at("address"),
                        "must be of the same IP family as the VIP (a dual-stack service lists \
                         a VIP of each family)"
                            .into(),
                    ));
                }
                if be.port == 0 {
                    out.push((at("port"), "must be 1-65535".into()));
                }
                if let Some(bridge) = &be.bridge
                    && !valid_interface(bridge)
                {
                    out.push((at("bridge"), format!("`{bridge}` is not an interface name")));
                }
                if be.weight > u16::MAX as u32 {
                    out.push((
                        at("weight"),
                        format!("{} is above the maximum 65535", be.weight),
                    ));
                }
                let health = svc.health.with(&be.health);
                out.extend(
                    health_problems(&health)
                        .into_iter()
                        .filter(|(f, _)| !health_problems(&svc.health).iter().any(|(g, _)| g == f))
                        .map(|(f, r)| (at(&format!("health.{f}")), r)),
                );
                if !seen.insert((be.address, be.port)) {
                    out.push((
                        at("address"),
                        format!(
                            "{} is listed twice",
                            std::net::SocketAddr::new(be.address, be.port)
                        ),
                    ));
                }
            }
            backends += svc.backends.len();
        }
        if backends > MAX_BACKENDS as usize {
            out.push((
                "service".into(),
                format!("{backends} backends in all; at most {MAX_BACKENDS}"),
            ));
        }
        if allow_prefixes > MAX_ALLOW_PREFIXES as usize {
            out.push((
                "service".into(),
                format!("{allow_prefixes} allow ranges in all; at most {MAX_ALLOW_PREFIXES}"),
            ));
        }
        out
    }
}

/// One `allow` entry: a CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address (a /32 or
/// /128).
pub fn parse_allow(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => return Err(format!("`{text}` is not a CIDR (ADDRESS/LENGTH)")),
        },
    };
    if net.addr() != net.network() {
        return Err(format!(
            "`{text}` has host bits set; the range is {}",
            net.trunc()
        ));
    }
    Ok(net)
}

fn health_problems(h: &HealthConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (field, d) in [
        ("interval", Some(h.interval)),
        ("fastinter", h.fastinter),
        ("downinter", h.downinter),
    ] {
        if d.is_some_and(|d| d < Duration::from_millis(10)) {
            out.push((field, "must be at least 10ms".into()));
        }
    }
    if h.timeout.is_zero() {
        out.push(("timeout", "must be longer than 0s".into()));
    }
    if h.rise == 0 {
        out.push(("rise", "must be at least 1".into()));
    }
    if h.fall == 0 {
        out.push(("fall", "must be at least 1".into()));
    }
    if h.kind == HealthKind::Http && !h.path.starts_with('/') {
        out.push(("path", format!("`{}` must start with '/'", h.path)));
    }
    if h.port == Some(0) {
        out.push(("port", "must be 1-65535".into()));
    }
    if !(100..=599).contains(&h.expect_status) {
        out.push((
            "expect_status",
            format!("{} is not an HTTP status", h.expect_status),
        ));
    }
    out
}

fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len()) && !name.contains(['/', ' ', ':'])
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

pub fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}
