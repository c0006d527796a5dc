//! `xlb status --watch`: the status table with rates (per second, between two samples of
//! `GET /status`) instead of totals. Pure: the CLI fetches, this computes and renders.
use std::{collections::HashMap, fmt::Write as _, time::Duration};

use crate::status::{CounterStatus, Status};

/// Per-second rates of one service or backend.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rate {
    pub packets: f64,
    pub bytes: f64,
    pub new_flows: f64,
}

impl Rate {
    /// The rate between two samples `elapsed` apart. A counter that went down (its slot was
    /// given to a new service or backend, which starts at zero) counts from zero.
    pub fn between(before: Option<&CounterStatus>, now: &CounterStatus, elapsed: Duration) -> Rate {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let zero = CounterStatus::default();
        let before = before.unwrap_or(&zero);
        let per = |now: u64, then: u64| {
            let delta = if now >= then { now - then } else { now };
            delta as f64 / secs
        };
        Rate {
            packets: per(now.packets, before.packets),
            bytes: per(now.bytes, before.bytes),
            new_flows: per(now.new_flows, before.new_flows),
        }
    }
}

/// One frame: `now` with the rates since `before`.
pub fn render(before: &Status, now: &Status, elapsed: Duration) -> String {
    let services: HashMap<&str, &crate::status::ServiceStatus> = before
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut out = String::new();
    let ifaces: Vec<String> = now
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.interface, i.xdp_mode))
        .collect();
    let _ = writeln!(
        out,
        "xlb {}  interfaces: {}  rates over {:.1}s (Ctrl-C ends)",
        now.version,
        ifaces.join(", "),
        elapsed.as_secs_f64()
    );
    for svc in &now.services {
        let old = services.get(svc.name.as_str());
        let rate = Rate::between(old.map(|s| &s.counters), &svc.counters, elapsed);
        let up = svc.backends.iter().filter(|b| b.state == "up").count();
        let _ = writeln!(
            out,
            "\nSERVICE {}  {}/{}  mode {}  backends {}/{} up  {:.1} pkt/s  {}  {:.1} new flows/s",
            svc.name,
            svc.vip_port(),
            svc.protocol,
            svc.mode,
            up,
            svc.backends.len(),
            rate.packets,
            bytes_per_second(rate.bytes),
            rate.new_flows
        );
        if let Some(problem) = &svc.problem {
            let _ = writeln!(out, "  !! {problem}");
        }
        let _ = writeln!(
            out,
            "  {:<24} {:>6} {:>7} {:>10} {:>12} {:>10}",
            "BACKEND", "WEIGHT", "STATE", "PKT/S", "BYTES/S", "NEW/S"
        );
        for b in &svc.backends {
            // The same address with the same id: a re-added backend starts from zero.
            let old = old
                .and_then(|s| {
                    s.backends
                        .iter()
                        .find(|o| o.address == b.address && o.id == b.id)
                })
                .map(|o| &o.counters);
            let rate = Rate::between(old, &b.counters, elapsed);
            let _ = writeln!(
                out,
                "  {:<24} {:>6} {:>7} {:>10.1} {:>12} {:>10.1}",
                b.address,
                b.weight,
                b.state,
                rate.packets,
                bytes_per_second(rate.bytes),
                rate.new_flows
            );
        }
    }
    let reasons: HashMap<&str, u64> = before
        .reasons
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .collect();
    let secs = elapsed.as_secs_f64().max(1e-3);
    let moving: Vec<String> = now
        .reasons
        .iter()
        .filter_map(|(r, n)| {
            let delta = n.saturating_sub(reasons.get(r.as_str()).copied().unwrap_or(0));
            (delta > 0).then(|| format!("{r}={:.1}", delta as f64 / secs))
        })
        .collect();
    let _ = writeln!(
        out,
        "\nverdicts/s: {}",
        if moving.is_empty() {
            "none".into()
        } else {
            moving.join(" ")
        }
    );
    out
}

fn bytes_per_second(rate: f64) -> String {
    match rate {
        r if r >= 1e9 => format!("{:.1} GB/s", r / 1e9),
        r if r >= 1e6 => format!("{:.1} MB/s", r / 1e6),
        r if r >= 1e3 => format!("{:.1} kB/s", r / 1e3),
        r => format!("{r:.0} B/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, ServiceStatus};

    fn counters(packets: u64, bytes: u64, new_flows: u64) -> CounterStatus {
        CounterStatus {
            packets,
            bytes,
            new_flows,
        }
    }

    fn status(service: CounterStatus, backend: CounterStatus, backend_id: u32) -> Status {
        Status {
            version: "test".into(),
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "10.99.100.1".into(),
                port: 80,
                protocol: "tcp".into(),
                mode: "nat".into(),
                table_size: 101,
                problem: None,
                apply_error: None,
                ring_rebuilds: 1,
                counters: service,
                backends: vec![BackendStatus {
                    address: "10.99.2.11:8080".into(),
                    id: backend_id,
                    weight: 100,
                    state: "up".into(),
                    drained: false,
                    last_probe: None,
                    counters: backend,
                    delivery: "routed".into(),
                }],
            }],
            reasons: vec![("forwarded".into(), 1000), ("drop_no_backend".into(), 5)],
            ..Status::default()
        }
    }

    #[test]
    fn rates_are_differences_over_the_elapsed_time() {
        let rate = Rate::between(
            Some(&counters(100, 10_000, 10)),
            &counters(300, 30_000, 14),
            Duration::from_secs(2),
        );
        assert_eq!(
            rate,
            Rate {
                packets: 100.0,
                bytes: 10_000.0,
                new_flows: 2.0
            }
        );
        // A counter that restarted counts from zero; no earlier sample: from zero too.
        let reset = Rate::between(
            Some(&counters(500, 0, 0)),
            &counters(50, 0, 0),
            Duration::from_secs(1),
        );
        assert_eq!(reset.packets, 50.0);
        assert_eq!(
            Rate::between(None, &counters(7, 0, 0), Duration::from_secs(1)).packets,
            7.0
        );
    }

    #[test]
    fn a_frame_shows_rates_not_totals() {
        let before = status(counters(1000, 100_000, 10), counters(600, 60_000, 6), 3);
        let mut now = status(counters(1500, 150_000, 30), counters(850, 85_000, 16), 3);
        now.reasons = vec![("forwarded".into(), 1500), ("drop_no_backend".into(), 5)];
        let text = render(&before, &now, Duration::from_secs(1));
        assert!(
            text.contains("500.0 pkt/s  50.0 kB/s  20.0 new flows/s"),
            "{text}"
        );
        assert!(
            text.contains("up      250.0    25.0 kB/s       10.0\n"),
            "{text}"
        );
        assert!(text.contains("verdicts/s: forwarded=500.0\n"), "{text}");
        assert!(!text.contains("1500"), "totals shown:\n{text}");
        // A backend whose id changed is a new one: its rate counts from zero.
        let moved = status(counters(1500, 150_000, 30), counters(850, 85_000, 16), 4);
        let text = render(&before, &moved, Duration::from_secs(1));
        assert!(
            text.contains("up      850.0    85.0 kB/s       16.0\n"),
            "{text}"
        );
    }
}
