//! `xlb flows`: the flows in the data path's tables (client, VIP, backend, idle time, TCP
//! state, mode, table), filtered, sorted by idle time (most recently active first) and cut
//! to a limit, so a full 262144-entry table never becomes one huge answer. The tables are
//! read in batches, which does not mark LRU entries used.
use std::{collections::HashMap, net::IpAddr};

use anyhow::Result;
use lb_common::{
    FLOW_FIN_CLIENT, FLOW_FIN_SERVER, FLOW_REPLIED, FLOW_RST, MODE_DSR, MODE_FULLNAT, MODE_NAT,
    PROTO_TCP, PROTO_UDP, words_addr,
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::Datapath, flowtables::monotonic_ns, reconcile::Maps as _, state::DesiredState,
    status::Status,
};

/// Flows listed when the request names no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// The most one request lists.
pub const MAX_LIMIT: usize = 10_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Filter {
    /// Service name.
    pub service: Option<String>,
    /// Backend ADDRESS:PORT (as `xlb status` shows it).
    pub backend: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowList {
    /// Flows in the tables, all services.
    pub total: usize,
    /// Flows that match the filter (`flows` holds the first `limit` of them).
    pub matching: usize,
    pub flows: Vec<FlowInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub client: String,
    pub vip: String,
    pub protocol: String,
    pub service: String,
    pub backend: String,
    pub mode: String,
    /// "flows" (established) or "flows_new" (not proven two-way yet).
    pub table: String,
    /// Since the entry was last refreshed (at most once a second while packets flow).
    pub idle_ms: u64,
    /// Since the flow was placed, to the second (None: an entry from before this was kept).
    #[serde(default)]
    pub age_s: Option<u64>,
    pub state: String,
    /// fullnat: the LB address and port the backend sees.
    pub snat: Option<String>,
}

/// The flows of the tables that match `filter`.
pub fn list(datapath: &Datapath, status: &Status, filter: &Filter) -> Result<FlowList> {
    let now = monotonic_ns();
    let all = datapath.flow_tables().flows_batched()?;
    let mut services: HashMap<u32, (String, String)> = HashMap::new();
    let mut backends: HashMap<u32, String> = HashMap::new();
    let mut flows = Vec::new();
    for (established, key, flow) in &all {
        let (service_id, backend_id) = (u32::from(flow.service_id), u32::from(flow.backend_id));
        let (service, mode) = services
            .entry(service_id)
            .or_insert_with(|| service_name(datapath, status, service_id));
        let backend = backends.entry(backend_id).or_insert_with(|| {
            datapath.backend(backend_id).map_or_else(
                || "gone".into(),
                |b| endpoint_text(b.family, &b.addr, b.port),
            )
        });
        if filter
            .service
            .as_ref()
            .is_some_and(|s| !DesiredState::names(s, service))
            || filter.backend.as_ref().is_some_and(|b| b != backend)
        {
            continue;
        }
        flows.push(FlowInfo {
            client: endpoint_text(key.family, &key.src, key.src_port),
            vip: endpoint_text(key.family, &key.dst, key.dst_port),
            protocol: proto_name(key.proto).into(),
            service: service.clone(),
            backend: backend.clone(),
            mode: mode.clone(),
            table: if *established { "flows" } else { "flows_new" }.into(),
            idle_ms: now.saturating_sub(flow.last_seen_ns) / 1_000_000,
            age_s: age_s(flow),
            state: state_text(key.proto, *established, flow.state),
            snat: (flow.snat_port != 0)
                .then(|| endpoint_text(key.family, &flow.snat, flow.snat_port)),
        });
    }
    let matching = flows.len();
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    // Only the first `limit` need an order.
    if limit < flows.len() {
        flows.select_nth_unstable_by_key(limit, |f| f.idle_ms);
        flows.truncate(limit);
    }
    flows.sort_by(|a, b| (a.idle_ms, &a.client).cmp(&(b.idle_ms, &b.client)));
    Ok(FlowList {
        total: all.len(),
        matching,
        flows,
    })
}

/// A service's name (from the status, by its VIP) and mode.
fn service_name(datapath: &Datapath, status: &Status, id: u32) -> (String, String) {
    let Ok(svc) = datapath.service(id) else {
        return (format!("id {id}"), "?".into());
    };
    let vip = words_addr(svc.vip.family, svc.vip.addr).to_string();
    let port = u16::from_be(svc.vip.port);
    let name = status
        .services
        .iter()
        .find(|s| s.vip == vip && s.port == port && s.protocol == proto_name(svc.vip.proto))
        .map_or_else(|| format!("id {id}"), |s| s.name.clone());
    (name, mode_name(svc.mode).into())
}

/// Seconds since the flow was placed; None for an entry made before `created_s` existed.
pub fn age_s(flow: &lb_common::Flow) -> Option<u64> {
    (flow.created_s != 0)
        .then(|| (monotonic_ns() / 1_000_000_000).saturating_sub(flow.created_s.into()))
}

pub fn mode_name(mode: u8) -> &'static str {
    match mode {
        MODE_NAT => "nat",
        MODE_FULLNAT => "fullnat",
        MODE_DSR => "dsr",
        _ => "?",
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "?",
    }
}

/// "ADDR:PORT" ("[ADDR]:PORT" for IPv6) of an IPv4 address word (or words) and a port in
/// network order.
pub fn endpoint_text(family: u8, words: &[u32; 4], port_be: u16) -> String {
    match words_addr(family, *words) {
        IpAddr::V4(a) => format!("{a}:{}", u16::from_be(port_be)),
        IpAddr::V6(a) => format!("[{a}]:{}", u16::from_be(port_be)),
    }
}

/// What the flow's entry knows of its state: new, replied (nat and fullnat see replies),
/// established; FIN from either side, closed, reset.
pub fn state_text(proto: u8, established: bool, state: u8) -> String {
    let fins = state & (FLOW_FIN_CLIENT | FLOW_FIN_SERVER);
    let text = if state & FLOW_RST != 0 {
        "reset"
    } else if fins == FLOW_FIN_CLIENT | FLOW_FIN_SERVER {
        "closed"
    } else if fins == FLOW_FIN_CLIENT {
        "fin_client"
    } else if fins == FLOW_FIN_SERVER {
        "fin_backend"
    } else if established {
        if proto == PROTO_TCP {
            "established"
        } else {
            "active"
        }
    } else if state & FLOW_REPLIED != 0 {
        "replied"
    } else {
        "new"
    };
    text.into()
}

impl FlowList {
    /// A table for humans (`xlb flows`).
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{:<22} {:<22} {:<5} {:<12} {:<22} {:<7} {:<9} {:>6} {:>8}  STATE\n",
            "CLIENT", "VIP", "PROTO", "SERVICE", "BACKEND", "MODE", "TABLE", "AGE", "IDLE"
        );
        for f in &self.flows {
            let _ = writeln!(
                out,
                "{:<22} {:<22} {:<5} {:<12} {:<22} {:<7} {:<9} {:>6} {:>7.1}s  {}{}",
                f.client,
                f.vip,
                f.protocol,
                f.service,
                f.backend,
                f.mode,
                f.table,
                f.age_s.map_or_else(|| "?".into(), |s| format!("{s}s")),
                f.idle_ms as f64 / 1000.0,
                f.state,
                f.snat
                    .as_ref()
                    .map(|s| format!(" (snat {s})"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "{} of {} matching flows shown ({} in the tables)",
            self.flows.len(),
            self.matching,
            self.total
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_as_words() {
        assert_eq!(state_text(PROTO_TCP, false, 0), "new");
        assert_eq!(state_text(PROTO_TCP, false, FLOW_REPLIED), "replied");
        assert_eq!(state_text(PROTO_TCP, true, 0), "established");
        assert_eq!(state_text(PROTO_UDP, true, 0), "active");
        assert_eq!(state_text(PROTO_TCP, true, FLOW_FIN_CLIENT), "fin_client");
        let both = FLOW_FIN_CLIENT | FLOW_FIN_SERVER;
        assert_eq!(state_text(PROTO_TCP, true, both), "closed");
        assert_eq!(state_text(PROTO_TCP, true, FLOW_RST | both), "reset");
    }

    #[test]
    fn endpoints_are_written_in_host_order() {
        let addr = u32::from_ne_bytes([10, 99, 1, 2]);
        assert_eq!(
            endpoint_text(lb_common::FAMILY_V4, &[addr, 0, 0, 0], 40000u16.to_be()),
            "10.99.1.2:40000"
        );
        // A v6 address whose last 96 bits are zero stays v6.
        let v6 = lb_common::addr_words("fd99:4::".parse().unwrap()).1;
        assert_eq!(
            endpoint_text(lb_common::FAMILY_V6, &v6, 40000u16.to_be()),
            "[fd99:4::]:40000"
        );
    }
}
