//! The rates of the last 10 minutes for the status page (`GET /history`): every
//! [`EVERY`] the API samples the counters and keeps, per service and per backend, packets/s
//! and new flows/s since the sample before. Bounded: [`KEEP`] samples.
use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::status::{CounterStatus, Status};

pub const EVERY: Duration = Duration::from_secs(5);
/// 10 minutes of samples.
pub const KEEP: usize = 120;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub unix_ms: u64,
    pub rates: Vec<Rate>,
}

/// A service's rates (`backend` none), or one backend's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub service: String,
    pub backend: Option<String>,
    pub packets_per_s: f64,
    pub new_flows_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryJson {
    pub interval_s: u64,
    pub samples: Vec<Sample>,
}

type Totals = BTreeMap<(String, Option<String>), CounterStatus>;

#[derive(Default)]
struct Inner {
    last: Option<(Instant, Totals)>,
    samples: VecDeque<Sample>,
}

#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Inner>>);

impl History {
    /// Takes in the counters of `status`, read at `at`.
    pub fn add(&self, status: &Status, at: Instant) {
        let mut totals = Totals::new();
        for svc in &status.services {
            totals.insert((svc.name.clone(), None), svc.counters);
            for b in &svc.backends {
                totals.insert((svc.name.clone(), Some(b.address.clone())), b.counters);
            }
        }
        let mut inner = self.0.lock().expect("history");
        if let Some((then, before)) = &inner.last {
            let secs = at.duration_since(*then).as_secs_f64().max(0.001);
            // A counter that went back (a service or backend given a new id) counts from 0.
            let rate = |now: u64, was: u64| now.saturating_sub(was) as f64 / secs;
            let rates = totals
                .iter()
                .map(|((service, backend), now)| {
                    let was = before.get(&(service.clone(), backend.clone()));
                    let was = was.copied().unwrap_or(*now);
                    Rate {
                        service: service.clone(),
                        backend: backend.clone(),
                        packets_per_s: rate(now.packets, was.packets),
                        new_flows_per_s: rate(now.new_flows, was.new_flows),
                    }
                })
                .collect();
            let unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if inner.samples.len() == KEEP {
                inner.samples.pop_front();
            }
            inner.samples.push_back(Sample { unix_ms, rates });
        }
        inner.last = Some((at, totals));
    }

    pub fn json(&self) -> HistoryJson {
        HistoryJson {
            interval_s: EVERY.as_secs(),
            samples: self
                .0
                .lock()
                .expect("history")
                .samples
                .iter()
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, ServiceStatus};

    fn status(service_packets: u64, backend_packets: u64) -> Status {
        let counters = |packets| CounterStatus {
            packets,
            bytes: 0,
            new_flows: packets / 10,
        };
        Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "10.99.100.1".into(),
                port: 80,
                protocol: "tcp".into(),
                mode: "nat".into(),
                table_size: 7,
                problem: None,
                apply_error: None,
                ring_rebuilds: 0,
                counters: counters(service_packets),
                backends: vec![BackendStatus {
                    address: "10.99.2.11:8080".into(),
                    id: 1,
                    weight: 100,
                    state: "up".into(),
                    drained: false,
                    last_probe: None,
                    counters: counters(backend_packets),
                    delivery: "routed".into(),
                }],
            }],
            ..Status::default()
        }
    }

    #[test]
    fn rates_are_the_change_per_second_and_only_the_last_samples_stay() {
        let history = History::default();
        let t0 = Instant::now();
        history.add(&status(1000, 500), t0);
        assert!(history.json().samples.is_empty(), "one reading has no rate");
        history.add(&status(2000, 600), t0 + Duration::from_secs(5));
        let json = history.json();
        let rates = &json.samples[0].rates;
        let web = rates.iter().find(|r| r.backend.is_none()).unwrap();
        assert_eq!(web.packets_per_s, 200.0);
        assert_eq!(web.new_flows_per_s, 20.0);
        let be = rates.iter().find(|r| r.backend.is_some()).unwrap();
        assert_eq!(be.packets_per_s, 20.0);
        // Counters that went back give 0, not a wrapped number.
        history.add(&status(10, 10), t0 + Duration::from_secs(10));
        assert!(
            history.json().samples[1]
                .rates
                .iter()
                .all(|r| r.packets_per_s == 0.0)
        );
        for i in 0..KEEP as u64 + 10 {
            history.add(&status(i, i), t0 + Duration::from_secs(15 + i));
        }
        assert_eq!(history.json().samples.len(), KEEP);
        assert_eq!(history.json().interval_s, 5);
    }
}
