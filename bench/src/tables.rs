//! The report's markdown tables: goals, throughput, the XDP microbenchmark, the programs'
//! run-time stats and Maglev.
use std::fmt::Write as _;

use crate::{
    micro::{MaglevResult, XdpResult},
    modes::Mode,
    report::{Goal, Summary},
};

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 1000.0 => format!("{:.2} ms", v / 1000.0),
        Some(v) => format!("{v:.0} µs"),
    }
}

/// The goals table (also used for the README).
pub fn goals_table(goals: &[Goal]) -> String {
    let mut s = String::from("| goal | target | xlb | met | notes |\n|---|---|---|---|---|\n");
    for g in goals {
        let met = match g.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {met} | {} |",
            g.what, g.target, g.measured, g.note
        );
    }
    s
}

/// The throughput table (also used for the README).
pub fn throughput_table(summary: &[Summary]) -> String {
    let mut s = String::from(
        "| load | mode | median | min–max | vs direct (min–max) | p50 | p99 | CPU/unit (proxy) | CPU ratio | CPU busy load/server | other load | split be1/be2/be3 | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for x in summary {
        let ratio = if x.mode == Mode::Direct {
            "1 (ceiling)".into()
        } else {
            format!("**{:.3}** ({:.2}–{:.2})", x.ratio, x.ratio_min, x.ratio_max)
        };
        let cpu = match x.proxy_cpu_per_unit {
            Some(p) => format!("{:.2} ({:.2}) {}", x.cpu_per_unit, p, x.load.per()),
            None => format!("{:.2} {}", x.cpu_per_unit, x.load.per()),
        };
        let util: Vec<String> = x
            .cpu_util
            .iter()
            .map(|u| format!("{:.0}%", u * 100.0))
            .collect();
        let split: Vec<String> = x
            .split
            .iter()
            .map(|f| format!("{:.0}", f * 100.0))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} {} | {}–{} | {ratio} | {} | {} | {cpu} | {:.3} | {} | {:.2} CPU | {}% | {} |",
            x.load.title(),
            x.mode.name(),
            fmt_rate(x.median),
            x.unit,
            fmt_rate(x.min),
            fmt_rate(x.max),
            fmt_us(x.p50_us),
            fmt_us(x.p99_us),
            x.cpu_ratio,
            util.join("/"),
            x.foreign_cpus,
            split.join("/"),
            x.errors
        );
    }
    s
}

pub fn xdp_table(x: &XdpResult) -> String {
    let mut s = String::from("| case | ns/packet | how |\n|---|---:|---|\n");
    let rows = [
        (
            "established flow",
            x.established_repeat_ns,
            format!(
                "repeat={} ×{} calls, median of the kernel's mean (the test loop's own {:.1} ns included)",
                x.repeat, x.repeat_calls, x.empty_repeat_ns
            ),
        ),
        (
            "established flow, one run per packet",
            x.established_single_ns,
            format!(
                "{} packets, median minus the empty program's {:.1} ns (mean {:.1})",
                x.flows, x.empty_single_ns, x.established_single_mean_ns
            ),
        ),
        (
            "new flow (SYN), empty maps",
            x.new_flow_ns,
            format!(
                "{} distinct SYNs, median minus the empty program's (mean {:.1})",
                x.flows, x.new_flow_mean_ns
            ),
        ),
        (
            "reply, TC egress reverse NAT",
            x.tc_reply_repeat_ns,
            format!(
                "repeat={} ×{} calls (the empty classifier's {:.1} ns included)",
                x.repeat, x.repeat_calls, x.tc_empty_repeat_ns
            ),
        ),
        (
            "new flow (SYN), conntrack full",
            x.new_flow_full_ns,
            format!(
                "{} more SYNs after filling conntrack: every insert evicts (LRU)",
                x.flows
            ),
        ),
    ];
    for (case, ns, how) in rows {
        let _ = writeln!(s, "| {case} | {ns:.1} | {how} |");
    }
    if let Some(v6) = &x.v6 {
        let v6_rows = [
            (
                "IPv6: established flow",
                v6.established_repeat_ns,
                "as the v4 row, over a v6 service in mode nat (DNAT66)",
            ),
            (
                "IPv6: established flow, one run per packet",
                v6.established_single_ns,
                "as the v4 row",
            ),
            (
                "IPv6: new flow (SYN), empty maps",
                v6.new_flow_ns,
                "as the v4 row with 10000 distinct SYNs, after it (its flows stay in the tables)",
            ),
        ];
        for (case, ns, how) in v6_rows {
            let _ = writeln!(s, "| {case} | {ns:.1} | {how} |");
        }
    }
    if let Some(t) = &x.trace {
        let trace_rows = [
            (
                "established flow, trace hooks removed at load",
                t.removed_ns,
                format!(
                    "the same object with XLB_TRACE_HOOKS=0 (JIT size {} vs {} bytes); repeat={} ×{} calls alternating with the next two rows",
                    t.jited_bytes_removed, t.jited_bytes, x.repeat, t.calls
                ),
            ),
            (
                "established flow, normal object, no trace running",
                t.off_ns,
                format!(
                    "what tracing costs while off: {:+.1} ns",
                    t.off_overhead_ns()
                ),
            ),
            (
                "established flow, a trace running for other sources",
                t.other_source_ns,
                "the filter is read and misses".into(),
            ),
        ];
        for (case, ns, how) in trace_rows {
            let _ = writeln!(s, "| {case} | {ns:.1} | {how} |");
        }
    }
    s
}

pub fn profile_table(p: &[crate::profile::ProgramCost]) -> String {
    let mut s =
        String::from("| load | program | runs per unit | ns per run |\n|---|---|---:|---:|\n");
    for c in p {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} per {} | {:.1} |",
            c.load.title(),
            c.program,
            c.runs_per_unit,
            c.load.noun(),
            c.ns_per_run
        );
    }
    s
}

pub fn maglev_table(m: &[MaglevResult]) -> String {
    let mut s = String::from(
        "| table M | backends N | build (criterion median) | build (in-process) | moved when 1 of N leaves (mean / worst) | worst × N |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in m {
        let crit = r.build.as_ref().map_or("not run".into(), |c| {
            format!(
                "{:.3} ms ({:.3}–{:.3})",
                c.median_ns / 1e6,
                c.mean_low_ns / 1e6,
                c.mean_high_ns / 1e6
            )
        });
        let _ = writeln!(
            s,
            "| {} | {} | {crit} | {:.3} ms | {:.4} / {:.4} (1/N = {:.4}) | {:.3} |",
            r.table_size,
            r.backends,
            r.build_inline_ns / 1e6,
            r.moved_mean,
            r.moved_max,
            1.0 / r.backends as f64,
            r.moved_max * r.backends as f64
        );
    }
    s
}
