//! `GET /metrics`: Prometheus text, encoded by prometheus-client. Traffic counters live in
//! the BPF maps, so each scrape builds fresh families from a `Status`; probe latencies are
//! histograms the health checker fills as it goes.
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    discovery::supervise::SourceState,
    status::{CounterStatus, Status},
};

type Labels = Vec<(&'static str, String)>;

/// Probe latency per backend, shared by the health checker (writer) and the API.
#[derive(Clone, Debug)]
pub struct ProbeLatency(Family<Labels, Histogram, fn() -> Histogram>);

impl Default for ProbeLatency {
    fn default() -> Self {
        // 0.1 ms .. ~1.6 s
        Self(Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 15))
        }))
    }
}

impl ProbeLatency {
    pub fn observe(&self, service: &str, backend: &str, seconds: f64) {
        self.0
            .get_or_create(&vec![
                ("service", service.to_string()),
                ("backend", backend.to_string()),
            ])
            .observe(seconds);
    }

    pub fn forget(&self, service: &str, backend: &str) {
        self.0.remove(&vec![
            ("service", service.to_string()),
            ("backend", backend.to_string()),
        ]);
    }
}

struct Traffic {
    packets: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    new_flows: Family<Labels, Counter>,
}

impl Traffic {
    fn new() -> Self {
        Self {
            packets: Family::default(),
            bytes: Family::default(),
            new_flows: Family::default(),
        }
    }

    fn set(&self, labels: &Labels, c: &CounterStatus) {
        self.packets.get_or_create(labels).inc_by(c.packets);
        self.bytes.get_or_create(labels).inc_by(c.bytes);
        self.new_flows.get_or_create(labels).inc_by(c.new_flows);
    }

    fn register(self, registry: &mut Registry, what: &str) {
        registry.register(
            format!("xlb_{what}_packets"),
            format!("Packets forwarded per {what}"),
            self.packets,
        );
        registry.register(
            format!("xlb_{what}_bytes"),
            format!("Bytes forwarded per {what} (L2 frame length)"),
            self.bytes,
        );
        registry.register(
            format!("xlb_{what}_new_flows"),
            format!("Flows started per {what}"),
            self.new_flows,
        );
    }
}

pub fn render(status: &Status, probes: &ProbeLatency) -> String {
    let service_traffic = Traffic::new();
    let backend_traffic = Traffic::new();
    let backend_up = Family::<Labels, Gauge>::default();
    let backend_weight = Family::<Labels, Gauge>::default();
    let service_up = Family::<Labels, Gauge>::default();
    let service_applied = Family::<Labels, Gauge>::default();
    let rebuilds = Family::<Labels, Counter>::default();
    let verdicts = Family::<Labels, Counter>::default();

    for svc in &status.services {
        let labels = vec![("service", svc.name.clone())];
        service_traffic.set(&labels, &svc.counters);
        rebuilds.get_or_create(&labels).inc_by(svc.ring_rebuilds);
        let up = svc.backends.iter().filter(|b| b.state == "up").count();
        service_up.get_or_create(&labels).set(up as i64);
        service_applied
            .get_or_create(&labels)
            .set(i64::from(svc.apply_error.is_none()));
        for b in &svc.backends {
            let labels = vec![
                ("service", svc.name.clone()),
                ("backend", b.address.clone()),
            ];
            backend_traffic.set(&labels, &b.counters);
            backend_up
                .get_or_create(&labels)
                .set(i64::from(b.state == "up"));
            backend_weight
                .get_or_create(&labels)
                .set(i64::from(b.weight));
        }
    }
    let table_entries = Family::<Labels, Gauge>::default();
    let table_capacity = Family::<Labels, Gauge>::default();
    let table_expired = Family::<Labels, Counter>::default();
    let table_evictions = Family::<Labels, Counter>::default();
    let table_failures = Family::<Labels, Counter>::default();
    for t in &status.flow_tables {
        let labels = vec![("table", t.name.clone())];
        table_entries.get_or_create(&labels).set(t.entries as i64);
        table_capacity.get_or_create(&labels).set(t.capacity as i64);
        table_expired.get_or_create(&labels).inc_by(t.expired);
        table_evictions.get_or_create(&labels).inc_by(t.evictions);
        table_failures
            .get_or_create(&labels)
            .inc_by(t.insert_failures);
    }
    let discovery_up = Family::<Labels, Gauge>::default();
    let discovery_restarts = Family::<Labels, Counter>::default();
    for source in &status.discovery {
        let labels = vec![("source", source.source.clone())];
        discovery_up
            .get_or_create(&labels)
            .set(i64::from(source.state == SourceState::Connected));
        discovery_restarts
            .get_or_create(&labels)
            .inc_by(source.restarts);
    }
    for (reason, n) in &status.reasons {
        verdicts
            .get_or_create(&vec![("reason", reason.clone())])
            .inc_by(*n);
    }

    let mut registry = Registry::default();
    service_traffic.register(&mut registry, "service");
    backend_traffic.register(&mut registry, "backend");
    registry.register(
        "xlb_service_backends_up",
        "Backends of a service that take new flows",
        service_up,
    );
    registry.register(
        "xlb_service_applied",
        "0 while the last apply could not bring the service to its desired state",
        service_applied,
    );
    registry.register(
        "xlb_backend_up",
        "1 if the backend passes its health checks and is not drained",
        backend_up,
    );
    registry.register(
        "xlb_backend_weight",
        "Weight in use (0 while drained)",
        backend_weight,
    );
    registry.register(
        "xlb_probe_duration_seconds",
        "Health probe latency",
        probes.0.clone(),
    );
    registry.register(
        "xlb_verdicts",
        "Packets by data path verdict (pass/drop reason)",
        verdicts,
    );
    registry.register(
        "xlb_flow_table_entries",
        "Entries in a flow table at the last sweep",
        table_entries,
    );
    registry.register(
        "xlb_flow_table_capacity",
        "Entries a flow table can hold",
        table_capacity,
    );
    registry.register(
        "xlb_flow_table_expired",
        "Entries the agent removed (closed after their linger, idle, orphaned)",
        table_expired,
    );
    registry.register(
        "xlb_flow_table_evictions",
        "Entries the kernel dropped to make room (estimated: inserted, not removed, not there)",
        table_evictions,
    );
    registry.register(
        "xlb_flow_table_insert_failures",
        "Inserts the kernel refused",
        table_failures,
    );
    registry.register(
        "xlb_ring_rebuilds",
        "Maglev rings written per service",
        rebuilds,
    );
    registry.register(
        "xlb_discovery_up",
        "1 while the discovery source (docker, swarm) is connected to its daemon",
        discovery_up,
    );
    registry.register(
        "xlb_discovery_restarts",
        "Times the discovery source's watcher failed and was started again",
        discovery_restarts,
    );
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::supervise::SourceStatus;

    #[test]
    fn discovery_sources_show_whether_they_are_up_and_how_often_they_restarted() {
        let source = |name: &str, state, restarts| SourceStatus {
            source: name.into(),
            state,
            detail: None,
            last_error: None,
            restarts,
        };
        let status = Status {
            discovery: vec![
                source("docker", SourceState::Unreachable, 3),
                source("swarm", SourceState::Connected, 0),
            ],
            ..Status::default()
        };
        let text = render(&status, &ProbeLatency::default());
        for line in [
            "xlb_discovery_up{source=\"docker\"} 0\n",
            "xlb_discovery_up{source=\"swarm\"} 1\n",
            "xlb_discovery_restarts_total{source=\"docker\"} 3\n",
            "xlb_discovery_restarts_total{source=\"swarm\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
