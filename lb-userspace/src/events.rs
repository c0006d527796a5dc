//! The agent's recent events: backends going up or down (and why), drains, reloads, Docker
//! containers and Swarm tasks joining or leaving, services getting or losing a problem.
//! The agent records each where it logs it; the API reads them (`GET /events`, the status
//! page). A bounded ring: the oldest go first.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::state::{DesiredState, Endpoint, Source};

/// Events kept: enough for the last hours of a busy host, a few hundred KiB at most.
pub const CAPACITY: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    BackendUp,
    BackendDown,
    Drain,
    Undrain,
    Reload,
    ReloadRejected,
    ContainerJoined,
    ContainerLeft,
    TaskJoined,
    TaskLeft,
    ServiceProblem,
    ServiceOk,
}

impl Kind {
    /// Whether the operator should look: shown highlighted on the status page.
    pub fn is_bad(self) -> bool {
        matches!(
            self,
            Kind::BackendDown | Kind::ReloadRejected | Kind::ServiceProblem
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Counts from 1 for the agent's life; `?since=SEQ` asks for the newer ones.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub unix_ms: u64,
    pub kind: Kind,
    pub service: Option<String>,
    pub backend: Option<String>,
    pub message: String,
}

#[derive(Default)]
struct Ring {
    last_seq: u64,
    events: VecDeque<Event>,
}

/// A handle on the ring; clones share it.
#[derive(Clone, Default)]
pub struct EventLog(Arc<Mutex<Ring>>);

impl EventLog {
    pub fn record(
        &self,
        kind: Kind,
        service: Option<&str>,
        backend: Option<&str>,
        message: impl Into<String>,
    ) {
        let now = SystemTime::now();
        let unix_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut ring = self.0.lock().expect("event log");
        ring.last_seq += 1;
        let event = Event {
            seq: ring.last_seq,
            time: humantime::format_rfc3339_millis(now).to_string(),
            unix_ms,
            kind,
            service: service.map(Into::into),
            backend: backend.map(Into::into),
            message: message.into(),
        };
        if ring.events.len() == CAPACITY {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
    }

    /// The events after `seq` (all kept, with `None`), oldest first.
    pub fn since(&self, seq: Option<u64>) -> Vec<Event> {
        let ring = self.0.lock().expect("event log");
        let after = seq.unwrap_or(0);
        ring.events
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect()
    }

    /// The newest `n` events, newest first.
    pub fn latest(&self, n: usize) -> Vec<Event> {
        let ring = self.0.lock().expect("event log");
        ring.events.iter().rev().take(n).cloned().collect()
    }
}

/// A container or Swarm task that joined or left a service.
#[derive(Debug, PartialEq)]
pub struct Membership {
    pub kind: Kind,
    pub service: String,
    pub backend: String,
    /// "container NAME joined", "swarm task ID left".
    pub message: String,
}

/// The containers and Swarm tasks that joined or left a service from `old` to `new`: joins
/// first. Static backends change only with a reload, which is an event of its own.
pub fn membership(old: &DesiredState, new: &DesiredState) -> Vec<Membership> {
    let backends = |d: &DesiredState| -> std::collections::BTreeSet<(String, Endpoint, Source)> {
        d.services
            .values()
            .flat_map(|svc| {
                svc.backends
                    .iter()
                    .map(|(ep, b)| (svc.name.clone(), *ep, b.source.clone()))
            })
            .collect()
    };
    let (old, new) = (backends(old), backends(new));
    let joined = new.difference(&old).map(|b| (b, true));
    let left = old.difference(&new).map(|b| (b, false));
    joined
        .chain(left)
        .filter_map(|((service, endpoint, source), joins)| {
            let kind = match (source, joins) {
                (Source::Docker(_), true) => Kind::ContainerJoined,
                (Source::Docker(_), false) => Kind::ContainerLeft,
                (Source::Swarm(_), true) => Kind::TaskJoined,
                (Source::Swarm(_), false) => Kind::TaskLeft,
                _ => return None,
            };
            let verb = if joins { "joined" } else { "left" };
            Some(Membership {
                kind,
                service: service.clone(),
                backend: endpoint.to_string(),
                message: format!("{source} {verb}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, state::BackendSpec};

    #[test]
    fn containers_and_tasks_that_come_and_go_are_joins_and_leaves() {
        let config = Config::parse(
            std::path::Path::new("xlb.toml"),
            "[agent]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"10.99.100.1\"\n\
             port = 80\n  [[service.backend]]\n  address = \"10.99.2.11\"\n  port = 8080\n",
        )
        .unwrap();
        let spec = |source| BackendSpec {
            weight: 100,
            source,
            health: Default::default(),
            bridge: None,
            delivery: Default::default(),
        };
        let mut old = DesiredState::from_config(&config);
        let (a, b, t): (Endpoint, Endpoint, Endpoint) = (
            "10.99.3.1:80".parse().unwrap(),
            "10.99.3.2:80".parse().unwrap(),
            "10.99.4.1:80".parse().unwrap(),
        );
        old.add_backend("web", a, spec(Source::Docker("web_1".into())));
        let mut new = DesiredState::from_config(&config);
        new.add_backend("web", b, spec(Source::Docker("<b>".into())));
        new.add_backend("web", t, spec(Source::Swarm("x1".into())));
        let changes = membership(&old, &new);
        let got: Vec<(Kind, &str, &str)> = changes
            .iter()
            .map(|m| (m.kind, m.backend.as_str(), m.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    Kind::ContainerJoined,
                    "10.99.3.2:80",
                    "container <b> joined"
                ),
                (Kind::TaskJoined, "10.99.4.1:80", "swarm task x1 joined"),
                (Kind::ContainerLeft, "10.99.3.1:80", "container web_1 left"),
            ]
        );
        assert!(changes.iter().all(|m| m.service == "web"));
        assert!(membership(&new, &new).is_empty());
    }

    #[test]
    fn events_are_kept_in_order_and_the_oldest_go_first() {
        let log = EventLog::default();
        for i in 0..CAPACITY + 5 {
            log.record(
                Kind::BackendDown,
                Some("web"),
                Some("10.99.2.11:80"),
                i.to_string(),
            );
        }
        let all = log.since(None);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].seq, 6);
        assert_eq!(all[0].message, "5");
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let newer = log.since(Some(CAPACITY as u64 + 3));
        let seqs: Vec<u64> = newer.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [CAPACITY as u64 + 4, CAPACITY as u64 + 5]);
        assert!(log.since(Some(u64::MAX)).is_empty());
        let latest = log.latest(2);
        assert_eq!(latest[0].seq, CAPACITY as u64 + 5);
        assert_eq!(latest.len(), 2);
    }

    #[test]
    fn an_event_is_a_json_line_with_its_time_kind_service_and_backend() {
        let log = EventLog::default();
        log.record(Kind::Reload, None, None, "reloaded\nxlb.toml");
        log.record(
            Kind::BackendDown,
            Some("web"),
            Some("10.99.2.11:80"),
            "connection refused",
        );
        let events = log.since(None);
        let line = serde_json::to_string(&events[1]).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], "backend_down");
        assert_eq!(v["service"], "web");
        assert_eq!(v["backend"], "10.99.2.11:80");
        assert_eq!(v["message"], "connection refused");
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(!serde_json::to_string(&events[0]).unwrap().contains('\n'));
        assert_eq!(events[0].service, None);
    }
}
