//! The status model served by `GET /status` and printed by `xlb status`: what the agent
//! applied, joined with the data path's counters.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
};

use anyhow::Result;
use lb_common::Counters;
use serde::{Deserialize, Serialize};

use crate::{
    bridgeport::index_name,
    datapath::Datapath,
    discovery::supervise::{SourceState, SourceStatus},
    flowtables::TableStatus,
    health::{BackendHealth, Key, State},
    loader::Attachment,
    reconcile::AppliedView,
    state::{Conflict, Delivery, DesiredState},
};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub interfaces: Vec<InterfaceStatus>,
    pub services: Vec<ServiceStatus>,
    /// Global verdict counters by reason name.
    pub reasons: Vec<(String, u64)>,
    /// Each flow table as the last sweep found it.
    #[serde(default)]
    pub flow_tables: Vec<TableStatus>,
    /// Each discovery source (Docker containers, Swarm tasks): connected, unreachable or
    /// restarting, with its last error and restarts.
    #[serde(default)]
    pub discovery: Vec<SourceStatus>,
    /// Endpoints claimed by two sources in one service, and which kept it.
    #[serde(default)]
    pub conflicts: Vec<ConflictStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictStatus {
    pub service: String,
    pub address: String,
    /// The source that keeps the address ("the static config", "container NAME"...).
    pub kept: String,
    /// The source whose claim is refused while the conflict lasts.
    pub refused: String,
}

impl From<&Conflict> for ConflictStatus {
    fn from(c: &Conflict) -> Self {
        Self {
            service: c.service.clone(),
            address: c.endpoint.to_string(),
            kept: c.kept.to_string(),
            refused: c.refused.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub interface: String,
    pub xdp_mode: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub mode: String,
    /// Slots of the active ring; 0 when no backend can take new flows.
    pub table_size: u32,
    /// Why the service serves nothing, or not as configured, when it does not.
    pub problem: Option<String>,
    /// Why the last apply left this service as it was (it keeps serving its previous state;
    /// the next apply tries again).
    #[serde(default)]
    pub apply_error: Option<String>,
    pub ring_rebuilds: u64,
    pub counters: CounterStatus,
    pub backends: Vec<BackendStatus>,
}

impl ServiceStatus {
    /// `VIP:port`, an IPv6 VIP in brackets (`[fd99:100::1]:80`).
    pub fn vip_port(&self) -> String {
        if self.vip.contains(':') {
            format!("[{}]:{}", self.vip, self.port)
        } else {
            format!("{}:{}", self.vip, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub id: u32,
    /// The weight in use (0 while drained).
    pub weight: u32,
    /// "up", "down", "pending" (not probed yet) or "drain".
    pub state: String,
    pub drained: bool,
    pub last_probe: Option<ProbeStatus>,
    pub counters: CounterStatus,
    /// How packets reach it: "routed" (the kernel), "bridge NAME" (redirected to its local
    /// bridge), or "veth NAME" (handed to the container's eth0 through its host-side veth).
    /// A nat backend is on a local bridge by its `bridge` key or else by its route.
    #[serde(default)]
    pub delivery: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub ok: bool,
    pub detail: String,
    pub latency_ms: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterStatus {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<Counters> for CounterStatus {
    fn from(c: Counters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

/// What the agent last applied: enough to build a `Status` with live counters.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub desired: DesiredState,
    pub services: Vec<AppliedView>,
    pub attachments: Vec<Attachment>,
    pub drained: BTreeSet<Key>,
    /// Why services (by name) could not be applied, from the last apply.
    pub problems: BTreeMap<String, String>,
}

impl Status {
    pub fn collect(
        applied: &Applied,
        health: &HashMap<Key, BackendHealth>,
        datapath: &Datapath,
        flow_tables: &[TableStatus],
    ) -> Result<Status> {
        let mut services = Vec::new();
        for view in &applied.services {
            let Some(spec) = applied.desired.services.get(&view.name) else {
                continue;
            };
            let mut backends = Vec::new();
            for (endpoint, b) in &view.backends {
                let key = (view.name.clone(), *endpoint);
                let health = health.get(&key);
                let state = match (health.map(|h| h.state), b.alive, b.weight) {
                    (Some(State::Pending), false, _) => "pending",
                    (_, false, _) => "down",
                    (_, true, 0) => "drain",
                    (_, true, _) => "up",
                };
                backends.push(BackendStatus {
                    address: endpoint.to_string(),
                    id: b.id,
                    weight: b.weight,
                    state: state.into(),
                    drained: applied.drained.contains(&key),
                    last_probe: health.and_then(|h| h.last.as_ref()).map(|p| ProbeStatus {
                        ok: p.ok,
                        detail: p.detail.clone(),
                        latency_ms: p.latency.as_secs_f64() * 1000.0,
                    }),
                    counters: datapath.backend_counters(b.id)?.into(),
                    delivery: delivery_text(&b.delivery),
                });
            }
            let apply_error = view.problem.clone();
            let empty = (view.table_size == 0).then(|| {
                let count = |s: &str| backends.iter().filter(|b| b.state == s).count();
                format!(
                    "no backend can take new flows ({} backends: {} down, {} pending, {} drained)",
                    backends.len(),
                    count("down"),
                    count("pending"),
                    count("drain")
                )
            });
            let problem = match (&apply_error, empty) {
                (Some(e), _) => Some(format!("not applied: {e}")),
                (None, empty) => empty,
            };
            services.push(ServiceStatus {
                name: view.name.clone(),
                vip: spec.vip.to_string(),
                port: spec.port,
                protocol: spec.protocol.to_string(),
                mode: format!("{:?}", spec.mode).to_lowercase(),
                table_size: view.table_size,
                problem,
                apply_error,
                ring_rebuilds: view.ring_rebuilds,
                counters: datapath.service_counters(view.id)?.into(),
                backends,
            });
        }
        // Services the data path does not have at all (no id could be given to them).
        for (name, spec) in &applied.desired.services {
            if services.iter().any(|s| &s.name == name) {
                continue;
            }
            let error = applied.problems.get(name).cloned();
            services.push(ServiceStatus {
                name: name.clone(),
                vip: spec.vip.to_string(),
                port: spec.port,
                protocol: spec.protocol.to_string(),
                mode: format!("{:?}", spec.mode).to_lowercase(),
                table_size: 0,
                problem: Some(format!(
                    "not applied: {}",
                    error.as_deref().unwrap_or("not yet")
                )),
                apply_error: error,
                ring_rebuilds: 0,
                counters: CounterStatus::default(),
                backends: Vec::new(),
            });
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: applied
                .attachments
                .iter()
                .map(|a| InterfaceStatus {
                    interface: a.interface.clone(),
                    xdp_mode: a.xdp_mode.clone(),
                })
                .collect(),
            services,
            reasons: datapath
                .reasons()?
                .into_iter()
                .map(|(r, n)| (r.name().to_string(), n))
                .collect(),
            flow_tables: flow_tables.to_vec(),
            discovery: Vec::new(),
            conflicts: applied
                .desired
                .conflicts
                .iter()
                .map(ConflictStatus::from)
                .collect(),
        })
    }

    /// A table for humans (`xlb status`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let ifaces: Vec<String> = self
            .interfaces
            .iter()
            .map(|i| format!("{} ({})", i.interface, i.xdp_mode))
            .collect();
        let _ = writeln!(
            out,
            "xlb {}  interfaces: {}",
            self.version,
            ifaces.join(", ")
        );
        for source in &self.discovery {
            let _ = writeln!(out, "discovery: {}", source_text(source));
        }
        for c in &self.conflicts {
            let _ = writeln!(
                out,
                "!! conflict: service {} {} claimed by {} and by {}; {} keeps it",
                c.service, c.address, c.kept, c.refused, c.kept
            );
        }
        for svc in &self.services {
            let up = svc.backends.iter().filter(|b| b.state == "up").count();
            let _ = writeln!(
                out,
                "\nSERVICE {}  {}/{}  mode {}  backends {}/{} up  packets {}  bytes {}  new flows {}",
                svc.name,
                svc.vip_port(),
                svc.protocol,
                svc.mode,
                up,
                svc.backends.len(),
                svc.counters.packets,
                svc.counters.bytes,
                svc.counters.new_flows
            );
            if let Some(problem) = &svc.problem {
                let _ = writeln!(out, "  !! {problem}");
            }
            let _ = writeln!(
                out,
                "  {:<24} {:>6} {:>7} {:>12} {:>14} {:>10}  LAST PROBE",
                "BACKEND", "WEIGHT", "STATE", "PACKETS", "BYTES", "NEW FLOWS"
            );
            for b in &svc.backends {
                let probe = match &b.last_probe {
                    Some(p) if p.ok => format!("ok {:.1}ms", p.latency_ms),
                    Some(p) => p.detail.clone(),
                    None => "-".into(),
                };
                let _ = writeln!(
                    out,
                    "  {:<24} {:>6} {:>7} {:>12} {:>14} {:>10}  {probe}",
                    b.address,
                    b.weight,
                    b.state,
                    b.counters.packets,
                    b.counters.bytes,
                    b.counters.new_flows
                );
            }
        }
        if !self.flow_tables.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<12} {:>9} {:>9} {:>10} {:>10} {:>9}",
                "FLOW TABLE", "ENTRIES", "CAPACITY", "EXPIRED", "EVICTIONS", "FAILURES"
            );
            for t in &self.flow_tables {
                let _ = writeln!(
                    out,
                    "{:<12} {:>9} {:>9} {:>10} {:>10} {:>9}",
                    t.name, t.entries, t.capacity, t.expired, t.evictions, t.insert_failures
                );
            }
        }
        let nonzero: Vec<String> = self
            .reasons
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        let _ = writeln!(
            out,
            "\nverdicts: {}",
            if nonzero.is_empty() {
                "none yet".into()
            } else {
                nonzero.join(" ")
            }
        );
        out
    }
}

fn delivery_text(delivery: &Delivery) -> String {
    match (delivery.bridge, delivery.veth) {
        (0, _) => "routed".into(),
        (bridge, None) => match index_name(bridge) {
            Some(name) => format!("bridge {name}"),
            None => "bridge".into(),
        },
        (_, Some(veth)) => match index_name(veth.ifindex) {
            Some(name) => format!("veth {name}"),
            None => format!("veth ifindex {}", veth.ifindex),
        },
    }
}

/// "docker connected", "swarm unreachable (restarts 2): ERROR"...
fn source_text(s: &SourceStatus) -> String {
    let mut text = format!("{} {}", s.source, s.state.as_str());
    if s.restarts > 0 {
        let _ = write!(text, " (restarts {})", s.restarts);
    }
    match (s.state, &s.detail, &s.last_error) {
        (SourceState::Connected, Some(detail), _) => {
            let _ = write!(text, ": {detail}");
        }
        (SourceState::Connected, None, _) => {}
        (_, _, Some(error)) => {
            let _ = write!(text, ": {error}");
        }
        _ => {}
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(
        state: SourceState,
        detail: Option<&str>,
        error: Option<&str>,
        restarts: u64,
    ) -> SourceStatus {
        SourceStatus {
            source: "docker".into(),
            state,
            detail: detail.map(Into::into),
            last_error: error.map(Into::into),
            restarts,
        }
    }

    #[test]
    fn the_text_shows_each_discovery_source_with_its_error_when_it_is_not_connected() {
        let status = Status {
            discovery: vec![
                source(SourceState::Connected, None, Some("old"), 0),
                source(
                    SourceState::Unreachable,
                    None,
                    Some("connection refused"),
                    0,
                ),
                source(
                    SourceState::Restarting,
                    None,
                    Some("the watcher panicked: x"),
                    3,
                ),
                source(SourceState::Connected, Some("not a Swarm manager"), None, 1),
            ],
            ..Status::default()
        };
        let text = status.render();
        for line in [
            "discovery: docker connected\n",
            "discovery: docker unreachable: connection refused\n",
            "discovery: docker restarting (restarts 3): the watcher panicked: x\n",
            "discovery: docker connected (restarts 1): not a Swarm manager\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn conflicts_are_shown_with_the_source_that_keeps_the_address() {
        use crate::state::{Endpoint, Source};
        let mut applied = Applied::default();
        applied.desired.conflicts.push(Conflict {
            service: "web".into(),
            endpoint: "10.99.2.11:8080".parse::<Endpoint>().unwrap(),
            kept: Source::Static,
            refused: Source::Docker("web_2".into()),
        });
        let status = Status {
            conflicts: applied
                .desired
                .conflicts
                .iter()
                .map(ConflictStatus::from)
                .collect(),
            ..Status::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["conflicts"][0]["refused"],
            serde_json::json!("container web_2")
        );
        let text = status.render();
        assert!(
            text.contains(
                "!! conflict: service web 10.99.2.11:8080 claimed by the static config and by \
                 container web_2; the static config keeps it\n"
            ),
            "{text}"
        );
    }
}
