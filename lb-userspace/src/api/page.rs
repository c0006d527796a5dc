//! The status page (`GET /`): services, backends, verdicts, flow tables and the recent
//! events as server-side HTML, readable without JavaScript. The embedded script
//! (page.js) fetches the page again every 2 s to swap in the new tables, and draws the
//! rates of `GET /history`. No external resource. Every string goes through maud, which
//! escapes it: container names and labels are anyone's input.
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::{events::Event, status::Status};

const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// Events shown: the newest.
pub const EVENTS_SHOWN: usize = 50;

pub fn render(status: &Status, events: &[Event]) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "xlb status" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { "xlb " (status.version) }
                    span #live { "live updates need JavaScript; reload to refresh" }
                }
                main { (body(status, events)) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

fn body(status: &Status, events: &[Event]) -> Markup {
    html! {
        p.meta {
            "interfaces: "
            @for (i, iface) in status.interfaces.iter().enumerate() {
                @if i > 0 { ", " }
                (iface.interface) " (" (iface.xdp_mode) ")"
            }
            @for source in &status.discovery {
                " · " (source.source) " " (source.state.as_str())
                @if let Some(e) = &source.last_error { ": " (e) }
            }
        }
        @for c in &status.conflicts {
            p.problem {
                "conflict: service " (c.service) " " (c.address) " claimed by " (c.kept)
                " and by " (c.refused) "; " (c.kept) " keeps it"
            }
        }
        @for svc in &status.services {
            @let up = svc.backends.iter().filter(|b| b.state == "up").count();
            section.service data-service=(svc.name) {
                h2 {
                    (svc.name) " "
                    span.vip { (svc.vip) ":" (svc.port) "/" (svc.protocol) }
                    " mode " (svc.mode)
                    " · backends " span.up { (up) "/" (svc.backends.len()) " up" }
                }
                @if let Some(problem) = &svc.problem {
                    p.problem { (problem) }
                }
                table.backends data-service=(svc.name) {
                    thead { tr {
                        th { "backend" } th { "state" } th { "weight" } th { "delivery" }
                        th { "last probe" } th.num { "packets" } th.num { "new flows" }
                    } }
                    tbody {
                        @for b in &svc.backends {
                            tr data-backend=(b.address) data-state=(b.state) {
                                td { (b.address) }
                                td { span class={ "state " (b.state) } { (b.state) } }
                                td.num { (b.weight) }
                                td { (b.delivery) }
                                td { @match &b.last_probe {
                                    Some(p) => { (p.detail) " in " (format!("{:.1}", p.latency_ms)) " ms" }
                                    None => "-",
                                } }
                                td.num { (b.counters.packets) }
                                td.num { (b.counters.new_flows) }
                            }
                        }
                    }
                }
                div.charts {
                    figure.chart data-service=(svc.name) data-metric="packets_per_s" {
                        figcaption { "packets/s, last 10 min" }
                    }
                    figure.chart data-service=(svc.name) data-metric="new_flows_per_s" {
                        figcaption { "new flows/s, last 10 min" }
                    }
                }
            }
        }
        div.columns {
            section {
                h2 { "verdicts" }
                table.verdicts {
                    @for (reason, n) in status.reasons.iter().filter(|(_, n)| *n > 0) {
                        tr { td { (reason) } td.num { (n) } }
                    }
                    @if status.reasons.iter().all(|(_, n)| *n == 0) {
                        tr { td { "none yet" } }
                    }
                }
            }
            section {
                h2 { "flow tables" }
                table.flowtables {
                    thead { tr { th { "table" } th.num { "entries" } th.num { "capacity" } th.num { "used" } } }
                    @for t in &status.flow_tables {
                        tr {
                            td { (t.name) }
                            td.num { (t.entries) }
                            td.num { (t.capacity) }
                            td.num { (format!("{:.1} %", occupancy(t.entries, t.capacity))) }
                        }
                    }
                }
            }
        }
        section {
            h2 { "recent events" }
            table.events {
                thead { tr { th { "time" } th { "event" } th { "service" } th { "backend" } th { "" } } }
                @for e in events {
                    tr class=@if e.kind.is_bad() { "bad" } data-seq=(e.seq) {
                        td { (e.time) }
                        td { (kind_text(e)) }
                        td { (e.service.as_deref().unwrap_or("")) }
                        td { (e.backend.as_deref().unwrap_or("")) }
                        td { (e.message) }
                    }
                }
            }
        }
    }
}

fn occupancy(entries: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        return 0.0;
    }
    entries as f64 * 100.0 / capacity as f64
}

/// "backend_down" -> "backend down".
fn kind_text(e: &Event) -> String {
    serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::{EventLog, Kind},
        status::{BackendStatus, CounterStatus, ServiceStatus},
    };

    const HOSTILE: &str = "<script>alert(1)</script>\"'&";

    #[test]
    fn every_string_is_escaped_and_backends_carry_their_state() {
        let status = Status {
            version: "0.1.0".into(),
            services: vec![ServiceStatus {
                name: HOSTILE.into(),
                vip: "10.99.100.1".into(),
                port: 80,
                protocol: "tcp".into(),
                mode: "nat".into(),
                table_size: 0,
                problem: Some(HOSTILE.into()),
                apply_error: None,
                ring_rebuilds: 0,
                counters: CounterStatus::default(),
                backends: vec![BackendStatus {
                    address: "10.99.2.11:8080".into(),
                    id: 1,
                    weight: 100,
                    state: "down".into(),
                    drained: false,
                    last_probe: None,
                    counters: CounterStatus::default(),
                    delivery: HOSTILE.into(),
                }],
            }],
            ..Status::default()
        };
        let log = EventLog::default();
        log.record(
            Kind::ContainerJoined,
            Some("web"),
            Some("10.99.2.11:8080"),
            format!("container {HOSTILE} joined"),
        );
        let page = render(&status, &log.latest(10)).into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(!page.contains("\"'&\""), "{page}");
        assert!(
            page.contains(r#"data-backend="10.99.2.11:8080" data-state="down""#),
            "{page}"
        );
        assert!(page.contains("container joined"), "{page}");
        // The one script is ours, and nothing is loaded from elsewhere.
        assert_eq!(page.matches("<script>").count(), 1);
        assert!(!page.contains("src=") && !page.contains("href="), "{page}");
    }
}
