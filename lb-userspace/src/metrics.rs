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
    use std::{collections::BTreeSet, path::Path};

    use super::*;
    use crate::{
        discovery::supervise::SourceStatus,
        loader::{
            TC_BALANCE_PROGRAM, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM, TC_REPLY_PROGRAM,
            XDP_PROGRAM,
        },
        status::{BackendStatus, ProbeStatus, ServiceStatus},
    };

    /// A status with one of everything, so that every family has a sample.
    fn fixture() -> (Status, ProbeLatency) {
        let counters = CounterStatus {
            packets: 3,
            bytes: 200,
            new_flows: 1,
        };
        let status = Status {
            version: "test".into(),
            interfaces: vec![],
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "10.99.100.1".into(),
                port: 80,
                protocol: "tcp".into(),
                mode: "nat".into(),
                table_size: 65537,
                problem: None,
                apply_error: None,
                ring_rebuilds: 1,
                counters,
                backends: vec![BackendStatus {
                    address: "10.99.2.11:8080".into(),
                    id: 0,
                    weight: 100,
                    state: "up".into(),
                    drained: false,
                    last_probe: Some(ProbeStatus {
                        ok: true,
                        detail: "ok".into(),
                        latency_ms: 0.3,
                    }),
                    counters,
                    delivery: "routed".into(),
                }],
            }],
            reasons: vec![("forwarded".into(), 3)],
            flow_tables: vec![crate::flowtables::TableStatus {
                name: "flows".into(),
                entries: 1,
                capacity: 262144,
                ..Default::default()
            }],
            discovery: vec![SourceStatus {
                source: "docker".into(),
                state: SourceState::Connected,
                detail: None,
                last_error: None,
                restarts: 0,
            }],
            conflicts: vec![],
        };
        let probes = ProbeLatency::default();
        probes.observe("web", "10.99.2.11:8080", 0.0003);
        (status, probes)
    }

    /// The metric families `/metrics` declares, and every sample name it prints.
    fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
        let (status, probes) = fixture();
        let text = render(&status, &probes);
        let mut families = BTreeSet::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                families.extend(declared.split(' ').next().map(String::from));
            } else if !line.starts_with('#') {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        (families, samples)
    }

    /// What the docs mention, one entry per name (`PREFIX_{b,c}_total` gives two; a name
    /// ending in `_*` stands for any metric with that prefix), with where it was found.
    fn mentions(text: &str, origin: &str, out: &mut Vec<(String, String)>) {
        // BPF programs, named like metrics.
        let programs = [
            XDP_PROGRAM,
            TC_EGRESS_PROGRAM,
            TC_INGRESS_PROGRAM,
            TC_REPLY_PROGRAM,
            TC_BALANCE_PROGRAM,
        ];
        let name_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        let mut rest = text;
        while let Some(at) = rest.find("xlb_") {
            let preceded = rest[..at].chars().next_back().is_some_and(name_char);
            let tail = &rest[at..];
            let mut end = tail.find(|c| !name_char(c)).unwrap_or(tail.len());
            let mut names = vec![tail[..end].to_string()];
            // `prefix_{a,b}suffix`: alternatives (a `{` after a whole name opens labels).
            if names[0].ends_with('_') && tail[end..].starts_with('{') {
                if let Some(close) = tail[end..].find('}') {
                    let alternatives = &tail[end + 1..end + close];
                    let after = &tail[end + close + 1..];
                    let suffix_len = after.find(|c| !name_char(c)).unwrap_or(after.len());
                    let suffix = &after[..suffix_len];
                    names = alternatives
                        .split(',')
                        .map(|a| format!("{}{a}{suffix}", names[0]))
                        .collect();
                    end += close + 1 + suffix_len;
                }
            } else if tail[end..].starts_with('*') {
                names[0].push('*');
                end += 1;
            }
            rest = &tail[end..];
            let rust_path = rest.starts_with("::");
            for name in names {
                if !preceded && !rust_path && !programs.contains(&name.as_str()) {
                    out.push((name, origin.to_string()));
                }
            }
        }
    }

    fn workspace() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the crate is in the workspace")
    }

    /// README.md, docs/*.md, and the comments of the crates that make up xlb.
    fn documented() -> Vec<(String, String)> {
        let root = workspace();
        let mut out = Vec::new();
        let mut read = |path: &Path, comments_only: bool| {
            let text =
                std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let origin = path
                .strip_prefix(root)
                .unwrap_or(path)
                .display()
                .to_string();
            for (n, line) in text.lines().enumerate() {
                if !comments_only || line.trim_start().starts_with("//") {
                    mentions(line, &format!("{origin}:{}", n + 1), &mut out);
                }
            }
        };
        read(&root.join("README.md"), false);
        let mut dirs = vec![root.join("docs")];
        for krate in ["lb-common", "lb-ebpf", "lb-userspace"] {
            dirs.push(root.join(krate).join("src"));
        }
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("reading a source directory") {
                let path = entry.expect("a directory entry").path();
                match path.extension().and_then(|e| e.to_str()) {
                    _ if path.is_dir() => dirs.push(path),
                    Some("md") => read(&path, false),
                    Some("rs") => read(&path, true),
                    _ => {}
                }
            }
        }
        out
    }

    #[test]
    fn every_metric_the_docs_name_is_exported() {
        let (families, samples) = exported();
        let found = documented();
        assert!(
            found.iter().any(|(n, _)| n == "xlb_verdicts_total"),
            "the scan found no metric names at all: {found:?}"
        );
        let missing: Vec<String> = found
            .iter()
            .filter(|(name, _)| match name.strip_suffix('*') {
                Some(prefix) => !samples.iter().any(|s| s.starts_with(prefix)),
                None => !samples.contains(name) && !families.contains(name),
            })
            .map(|(name, origin)| format!("{origin}: {name}"))
            .collect();
        assert!(
            missing.is_empty(),
            "named in the docs but not exported by /metrics:\n  {}\nexported: {samples:?}",
            missing.join("\n  ")
        );
    }

    #[test]
    fn every_exported_metric_is_in_the_readme() {
        let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
        let mut named = Vec::new();
        mentions(&readme, "README.md", &mut named);
        let (families, _) = exported();
        // A counter family is named by its sample (`_total`), a histogram by the family.
        let undocumented: Vec<&String> = families
            .iter()
            .filter(|f| {
                !named
                    .iter()
                    .any(|(n, _)| n == *f || *n == format!("{f}_total"))
            })
            .collect();
        assert!(
            undocumented.is_empty(),
            "exported by /metrics but not named in the README: {undocumented:?}"
        );
    }

    #[test]
    fn mentions_are_read_like_a_reader_would() {
        let mut got = Vec::new();
        mentions(
            "`xlb_a_{b,c_d}_total`, xlb_e{reason=\"x\"}, see xlb_f_* and xlb_tests::topology, \
             `xlb_xdp`, my_xlb_g",
            "here",
            &mut got,
        );
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["xlb_a_b_total", "xlb_a_c_d_total", "xlb_e", "xlb_f_*"]
        );
    }

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
