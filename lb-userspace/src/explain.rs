//! `xlb explain`: which backend the data path gives a flow, and why. It reads the maps the
//! XDP program reads, in its order (VIP, allow list, flow tables, Maglev ring), and hashes
//! with the functions the program compiles (`lb_common::hash`), so the answer is the data
//! path's own, not a model of it. Read-only: a lookup from user space does not mark an LRU
//! entry used, and nothing is written.
use std::{fmt::Write as _, net::SocketAddr};

use anyhow::Result;
use lb_common::{
    BACKEND_IN_USE, FlowKey, MODE_FULLNAT, PROTO_TCP, PROTO_UDP, Reason, SERVICE_ALLOW,
    SERVICE_SOURCE_HASH, VipKey, addr_words, flow_hash, ring_hash, sizes::UDP_IDLE_TIMEOUT_NS,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::Protocol,
    datapath::Datapath,
    flows::{age_s, endpoint_text, mode_name, state_text},
    flowtables::monotonic_ns,
    reconcile::Maps as _,
    status::Status,
};

/// The flow to explain: its first (or next) packet from `from` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub proto: Protocol,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// "CLIENT -> VIP/PROTO".
    pub flow: String,
    /// "forward", "drop" or "pass" (to the kernel, untouched).
    pub verdict: String,
    /// The verdict counter the packet moves (`xlb status`), or "new_flow" / "known_flow".
    pub reason: String,
    /// One sentence for humans.
    pub why: String,
    pub service: Option<ServiceInfo>,
    pub backend: Option<BackendInfo>,
    /// The flow-table entry that pins the flow, when one does.
    pub entry: Option<EntryInfo>,
    /// The ring pick, when no entry pins the flow.
    pub ring: Option<RingInfo>,
    /// What else the next packets may meet (a SYN reopening a closed flow, fullnat's SYN rule).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub id: u32,
    pub mode: String,
    /// "flow" or "source".
    pub hash: String,
    /// The service has an allow list.
    pub allow_list: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub address: String,
    pub id: u32,
    /// As `xlb status` shows it: up, down, pending, drain.
    pub state: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// "flows" (established) or "flows_new" (not proven two-way yet).
    pub table: String,
    /// Since the entry was last refreshed (the data path refreshes it at most once a second).
    pub idle_ms: u64,
    /// Since the flow was placed, to the second (None: an entry from before this was kept).
    #[serde(default)]
    pub age_s: Option<u64>,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RingInfo {
    /// The hash that indexes the ring (`hash = "flow"`: the 5-tuple; `"source"`: the client).
    pub hash: u32,
    pub slot: u32,
    pub table_size: u32,
}

/// The data path's answer for `q`, with names and states from `status`.
pub fn explain(datapath: &Datapath, status: &Status, q: &Query) -> Result<Explanation> {
    let mut out = Explanation {
        flow: format!("{} -> {}/{}", q.from, q.to, q.proto),
        ..Explanation::default()
    };
    let (from, to) = (q.from, q.to);
    if from.is_ipv4() != to.is_ipv4() {
        return Ok(out.pass(
            Reason::PassNotVip,
            "the client and the VIP are of different IP families: no such packet is balanced",
        ));
    }
    let proto = q.proto.number();
    let (family, vip_addr) = addr_words(to.ip());
    let vip = VipKey {
        addr: vip_addr,
        port: to.port().to_be(),
        proto,
        family,
    };
    let svc = match datapath.vip_service(&vip)? {
        Some(id) => datapath.service(id).ok().filter(|s| s.vip == vip),
        None => None,
    };
    let Some(svc) = svc else {
        return Ok(out.pass(
            Reason::PassNotVip,
            &format!(
                "{}/{} is no VIP of this agent: the kernel gets it",
                q.to, q.proto
            ),
        ));
    };
    let view = status.services.iter().find(|s| {
        s.vip == to.ip().to_string() && s.port == to.port() && s.protocol == q.proto.to_string()
    });
    out.service = Some(ServiceInfo {
        name: view.map_or_else(|| format!("id {}", svc.id), |s| s.name.clone()),
        id: svc.id,
        mode: mode_name(svc.mode).into(),
        hash: if svc.flags & SERVICE_SOURCE_HASH != 0 {
            "source"
        } else {
            "flow"
        }
        .into(),
        allow_list: svc.flags & SERVICE_ALLOW != 0,
    });
    let (_, saddr) = addr_words(from.ip());
    if svc.flags & SERVICE_ALLOW != 0 && !datapath.allowed(svc.id, from.ip())? {
        out.verdict = "drop".into();
        out.reason = Reason::DropNotAllowed.name().into();
        out.why = format!("{} is outside the service's allow list", from.ip());
        return Ok(out);
    }
    let key = FlowKey {
        src: saddr,
        dst: vip.addr,
        src_port: from.port().to_be(),
        dst_port: vip.port,
        proto,
        family,
        _pad: 0,
    };
    let backend_info = |id: u32| -> Option<BackendInfo> {
        let b = datapath.backend(id)?;
        let shown = view.and_then(|s| s.backends.iter().find(|b| b.id == id));
        Some(BackendInfo {
            address: shown.map_or_else(
                || endpoint_text(b.family, &b.addr, b.port),
                |s| s.address.clone(),
            ),
            id,
            state: shown.map_or_else(|| "unknown".into(), |s| s.state.clone()),
            weight: shown.map_or(0, |s| s.weight),
        })
    };

    // The flow tables, as conntrack::lookup: an entry holds while its backend lives.
    if let Some((established, flow)) = datapath.flow_tables().flow(&key)? {
        let idle = monotonic_ns().saturating_sub(flow.last_seen_ns);
        let backend = datapath.backend(flow.backend_id.into()).filter(|b| {
            u32::from(flow.service_id) == svc.id && b.is_alive() && b.service_id == svc.id
        });
        let table = if established { "flows" } else { "flows_new" };
        let stale_udp = proto == PROTO_UDP && idle > UDP_IDLE_TIMEOUT_NS;
        match backend {
            Some(_) if !stale_udp => {
                out.entry = Some(EntryInfo {
                    table: table.into(),
                    idle_ms: idle / 1_000_000,
                    age_s: age_s(&flow),
                    state: state_text(proto, established, flow.state),
                });
                out.backend = backend_info(flow.backend_id.into());
                out.verdict = "forward".into();
                out.reason = "known_flow".into();
                out.why = format!(
                    "a flow-table entry ({table}) pins the flow to its backend, idle {:.1}s",
                    idle as f64 / 1e9
                );
                if flow.is_closed() && proto == PROTO_TCP {
                    out.notes.push(
                        "the flow is closed: a new SYN on this port starts over with the ring \
                         pick"
                            .into(),
                    );
                }
                if svc.mode == MODE_FULLNAT {
                    out.notes.push(format!(
                        "fullnat: the flow keeps SNAT {} while it owns that port",
                        endpoint_text(family, &flow.snat, flow.snat_port)
                    ));
                }
                return Ok(out);
            }
            Some(_) => out.notes.push(format!(
                "the entry in {table} idled past the UDP timeout: the next packet starts a new flow"
            )),
            None => out.notes.push(format!(
                "the entry in {table} names a backend that is down or gone: the next packet is \
                 re-hashed (rehashed)"
            )),
        }
    }

    // A new flow: the service's active ring, indexed as maglev::pick does.
    if svc.table_size == 0 {
        out.verdict = "drop".into();
        out.reason = Reason::DropNoBackend.name().into();
        out.why = "no backend can take new flows (the ring is empty)".into();
        return Ok(out);
    }
    let hash = ring_hash(&key, flow_hash(&key), svc.flags);
    let slot = hash % svc.table_size;
    out.ring = Some(RingInfo {
        hash,
        slot,
        table_size: svc.table_size,
    });
    let id = datapath.ring_slot(svc.ring_offset + slot);
    let backend = id.and_then(|id| {
        datapath
            .backend(id)
            .filter(|b| b.flags & BACKEND_IN_USE != 0 && b.service_id == svc.id)
            .map(|_| id)
    });
    let Some(id) = backend else {
        out.verdict = "drop".into();
        out.reason = Reason::DropNoBackend.name().into();
        out.why = format!("ring slot {slot} names no backend of the service");
        return Ok(out);
    };
    out.backend = backend_info(id);
    out.verdict = "forward".into();
    out.reason = "new_flow".into();
    out.why = format!(
        "no flow-table entry: a new flow, placed by ring slot {slot} of {}",
        svc.table_size
    );
    if svc.mode == MODE_FULLNAT && proto == PROTO_TCP {
        out.notes.push(
            "fullnat: only a SYN opens a flow; other packets of an unknown flow are dropped \
             (drop_no_flow)"
                .into(),
        );
    }
    Ok(out)
}

impl Explanation {
    fn pass(mut self, reason: Reason, why: &str) -> Self {
        self.verdict = "pass".into();
        self.reason = reason.name().into();
        self.why = why.into();
        self
    }

    /// The answer for humans (`xlb explain`).
    pub fn render(&self) -> String {
        let mut out = format!("flow     {}\n", self.flow);
        if let Some(s) = &self.service {
            let allow = if s.allow_list { ", allow list" } else { "" };
            let _ = writeln!(
                out,
                "service  {} (id {}, mode {}, hash {}{allow})",
                s.name, s.id, s.mode, s.hash
            );
        }
        let _ = match &self.backend {
            Some(b) => writeln!(
                out,
                "verdict  {} to {} (backend id {}, {}, weight {})",
                self.verdict, b.address, b.id, b.state, b.weight
            ),
            None => writeln!(out, "verdict  {} ({})", self.verdict, self.reason),
        };
        let _ = writeln!(out, "why      {}", self.why);
        if let Some(e) = &self.entry {
            let age = e.age_s.map_or_else(|| "?".into(), |s| format!("{s}s"));
            let _ = writeln!(
                out,
                "entry    table {}, state {}, age {age}, idle {:.1}s",
                e.table,
                e.state,
                e.idle_ms as f64 / 1000.0
            );
        }
        if let Some(r) = &self.ring {
            let _ = writeln!(
                out,
                "ring     slot {} of {} (hash {:#010x})",
                r.slot, r.table_size, r.hash
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "note     {note}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_the_backend_and_the_entry() {
        let e = Explanation {
            flow: "10.99.1.2:40000 -> 10.99.100.1:80/tcp".into(),
            verdict: "forward".into(),
            reason: "known_flow".into(),
            why: "pinned".into(),
            service: Some(ServiceInfo {
                name: "web".into(),
                id: 0,
                mode: "nat".into(),
                hash: "flow".into(),
                allow_list: false,
            }),
            backend: Some(BackendInfo {
                address: "10.99.2.11:8080".into(),
                id: 3,
                state: "up".into(),
                weight: 100,
            }),
            entry: Some(EntryInfo {
                table: "flows".into(),
                idle_ms: 1500,
                age_s: Some(42),
                state: "established".into(),
            }),
            ring: None,
            notes: Vec::new(),
        };
        let text = e.render();
        assert!(
            text.contains("verdict  forward to 10.99.2.11:8080 (backend id 3, up, weight 100)"),
            "{text}"
        );
        assert!(
            text.contains("entry    table flows, state established, age 42s, idle 1.5s"),
            "{text}"
        );
    }
}
