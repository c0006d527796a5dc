//! Results: per-run records, their summary (median, min–max, ratio to direct), the goals,
//! and the outputs: report.md, results.json and ratios.svg.
use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{
    load::{self, Load},
    micro::{self, MaglevResult, XdpResult},
    modes::{self, Mode},
    tables::{goals_table, maglev_table, profile_table, throughput_table, xdp_table},
};

/// One measured run of one load through one mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub rep: u32,
    pub load: Load,
    pub mode: Mode,
    /// req/s, conn/s or delivered packets/s.
    pub rate: f64,
    pub seconds: f64,
    /// Requests completed, or packets delivered.
    pub count: u64,
    /// wrk's latency percentiles (None for UDP).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Busy CPU time of the whole machine during the run, µs.
    pub cpu_busy_us: f64,
    /// Busy share of each CPU.
    pub cpu_util: Vec<f64>,
    /// CPU time used meanwhile by user processes that are not ours (other work on the
    /// machine), µs. Subtracted from cpu_busy_us for the CPU cost per unit.
    pub foreign_cpu_us: f64,
    /// CPU time of the proxy process (HAProxy, or xlb's agent), µs.
    pub proxy_cpu_us: Option<f64>,
    /// Requests (nginx stub_status) or packets (nft counter) per backend.
    pub per_backend: Vec<u64>,
    /// wrk's socket errors + non-2xx answers; for UDP, datagrams sent but not delivered.
    pub errors: u64,
    /// UDP only: datagrams the generator sent.
    pub sent: Option<u64>,
}

impl Run {
    /// CPU per unit: µs per request/connection, ns per packet.
    pub fn cpu_per_unit(&self) -> f64 {
        let per = (self.cpu_busy_us - self.foreign_cpu_us).max(0.0) / self.count.max(1) as f64;
        if self.load == Load::Udp {
            per * 1000.0
        } else {
            per
        }
    }

    /// CPUs that other people's processes used during the run.
    pub fn other_load(&self) -> f64 {
        self.foreign_cpu_us / 1e6 / self.seconds.max(1e-3)
    }

    fn proxy_per_unit(&self) -> Option<f64> {
        let per = self.proxy_cpu_us? / self.count.max(1) as f64;
        Some(if self.load == Load::Udp {
            per * 1000.0
        } else {
            per
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub load: Load,
    pub mode: Mode,
    pub unit: String,
    pub reps: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Median over repetitions of (this mode / direct in the same repetition).
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Median CPU per unit (µs/req, µs/conn or ns/pkt) of the whole machine.
    pub cpu_per_unit: f64,
    /// Median over repetitions of (direct's CPU per unit / this mode's) in the same
    /// repetition: the throughput ratio a CPU-bound machine would show, and much less
    /// sensitive to other load than the throughput itself.
    pub cpu_ratio: f64,
    pub proxy_cpu_per_unit: Option<f64>,
    /// Median busy share of each CPU.
    pub cpu_util: Vec<f64>,
    /// Median CPU (in CPUs) that other people's processes used during the runs.
    pub foreign_cpus: f64,
    /// Share of each backend over all repetitions.
    pub split: Vec<f64>,
    pub errors: u64,
}

pub fn summarize(runs: &[Run]) -> Vec<Summary> {
    let mut out = Vec::new();
    for load in load::ALL {
        for mode in modes::ALL {
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.load == load && r.mode == mode)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut rates: Vec<f64> = mine.iter().map(|r| r.rate).collect();
            let mut ratios: Vec<f64> = mine
                .iter()
                .filter_map(|r| {
                    let direct = runs
                        .iter()
                        .find(|d| d.rep == r.rep && d.load == load && d.mode == Mode::Direct)?;
                    Some(r.rate / direct.rate)
                })
                .collect();
            let mut cpu_ratios: Vec<f64> = mine
                .iter()
                .filter_map(|r| {
                    let direct = runs
                        .iter()
                        .find(|d| d.rep == r.rep && d.load == load && d.mode == Mode::Direct)?;
                    Some(direct.cpu_per_unit() / r.cpu_per_unit())
                })
                .collect();
            let med = |f: &dyn Fn(&Run) -> Option<f64>| {
                let mut v: Vec<f64> = mine.iter().filter_map(|r| f(r)).collect();
                (!v.is_empty()).then(|| micro::median(&mut v))
            };
            let backends = mine.iter().map(|r| r.per_backend.len()).max().unwrap_or(0);
            let totals: Vec<u64> = (0..backends)
                .map(|i| mine.iter().filter_map(|r| r.per_backend.get(i)).sum())
                .collect();
            let all: u64 = totals.iter().sum();
            let cpus = mine[0].cpu_util.len();
            out.push(Summary {
                load,
                mode,
                unit: load.unit().into(),
                reps: mine.len(),
                median: micro::median(&mut rates),
                min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max: rates.iter().copied().fold(0.0, f64::max),
                ratio: micro::median(&mut ratios),
                ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
                ratio_max: ratios.iter().copied().fold(0.0, f64::max),
                p50_us: med(&|r| r.p50_us),
                p99_us: med(&|r| r.p99_us),
                cpu_per_unit: med(&|r| Some(r.cpu_per_unit())).unwrap_or(f64::NAN),
                cpu_ratio: micro::median(&mut cpu_ratios),
                proxy_cpu_per_unit: med(&|r| r.proxy_per_unit()),
                cpu_util: (0..cpus)
                    .map(|c| med(&|r| r.cpu_util.get(c).copied()).unwrap_or(0.0))
                    .collect(),
                foreign_cpus: med(&|r| Some(r.other_load())).unwrap_or(0.0),
                split: totals
                    .iter()
                    .map(|t| *t as f64 / all.max(1) as f64)
                    .collect(),
                errors: mine.iter().map(|r| r.errors).sum(),
            });
        }
    }
    out
}

/// One goal of issue 6 and where this run stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
    pub note: String,
}

/// Median CPU (in CPUs) that other people's processes used during the wrk runs, which
/// keep both CPUs busy (the UDP load leaves the server CPU idle for anyone to take).
pub fn other_load(runs: &[Run]) -> f64 {
    let mut v: Vec<f64> = runs
        .iter()
        .filter(|r| r.load != Load::Udp)
        .map(Run::other_load)
        .collect();
    if v.is_empty() {
        0.0
    } else {
        micro::median(&mut v)
    }
}

/// Above this much other load (in CPUs, median over the runs) the throughput ratios say
/// more about the neighbours than about the modes.
pub const CONTENDED: f64 = 0.15;

pub fn goals(
    summary: &[Summary],
    xdp: Option<&XdpResult>,
    maglev: &[MaglevResult],
    other_load: f64,
) -> Vec<Goal> {
    let mut out = Vec::new();
    let contended = other_load > CONTENDED;
    let find = |load: Load, mode: Mode| summary.iter().find(|s| s.load == load && s.mode == mode);
    let ratio = |load: Load, mode: Mode| find(load, mode).map(|s| s.ratio);
    // Peers are compared as measured in this run only: figures from other runs and
    // machines cannot be checked here, so the report does not quote them.
    for (load, what, min) in [
        (Load::Close, "new connections/s vs direct", 0.95),
        (Load::KeepAlive, "keep-alive req/s vs direct", 0.98),
        (Load::Udp, "UDP pps delivered vs routed", 1.0),
    ] {
        // Judged on what a user gets without tuning; the tuned rows are quoted beside it.
        let best = Mode::XlbDefault;
        let mine = ratio(load, best);
        let here: Vec<String> = [Mode::Xlb, Mode::XlbTc, Mode::Nft, Mode::Haproxy]
            .into_iter()
            .filter_map(|m| Some(format!("{} {:.2}", m.name(), ratio(load, m)?)))
            .collect();
        out.push(Goal {
            what: what.into(),
            target: format!("≥ {min:.2}, > nft DNAT"),
            measured: mine.map_or("not run".into(), |r| format!("{r:.3}")),
            // And ahead of nft DNAT in the same run (when it ran).
            met: if contended {
                None
            } else {
                mine.map(|r| r >= min && ratio(load, Mode::Nft).is_none_or(|n| r > n))
            },
            note: format!(
                "{}; CPU ratio {}; this run: {}{}",
                best.name(),
                find(load, best).map_or("–".into(), |s| format!("{:.3}", s.cpu_ratio)),
                here.join(", "),
                if contended {
                    format!("; not judged: other processes used {other_load:.2} CPU")
                } else {
                    String::new()
                }
            ),
        });
    }
    if let Some(x) = xdp {
        // The program's own time, as for new flows: the kernel's mean per run less the
        // same mean for an empty program (the test loop itself).
        let established = x.established_repeat_ns - x.empty_repeat_ns;
        out.push(Goal {
            what: "XDP established flow".into(),
            target: "≤ 60 ns/packet".into(),
            measured: format!("{established:.1} ns"),
            met: Some(established <= 60.0),
            note: format!(
                "BPF_PROG_TEST_RUN repeat={}: {:.1} ns per run less the empty program's {:.1} ns; one cold run per packet: {:.1} ns",
                x.repeat, x.established_repeat_ns, x.empty_repeat_ns, x.established_single_ns
            ),
        });
        out.push(Goal {
            what: "XDP new flow".into(),
            target: "≤ 150 ns/packet".into(),
            measured: format!("{:.1} ns", x.new_flow_ns),
            met: Some(x.new_flow_ns <= 150.0),
            note: format!(
                "one run per distinct SYN, empty-program time subtracted; with conntrack full (LRU eviction): {:.1} ns",
                x.new_flow_full_ns
            ),
        });
    }
    if let Some(t) = xdp.and_then(|x| x.trace.as_ref()) {
        let overhead = t.off_overhead_ns();
        out.push(Goal {
            what: "Tracing off (no `xlb trace` running)".into(),
            target: "≤ 1 ns/packet over the object without trace hooks".into(),
            measured: format!("{overhead:+.1} ns"),
            met: Some(overhead <= 1.0),
            note: format!(
                "established flow, repeat, {} alternating calls: {:.1} ns normal, {:.1} ns with the hooks removed at load; {:.1} ns while a trace runs for other sources",
                t.calls, t.off_ns, t.removed_ns, t.other_source_ns
            ),
        });
    }
    if let Some(m) = maglev.iter().find(|m| m.backends == 1000) {
        let (ns, how) = match &m.build {
            Some(c) => (c.median_ns, "criterion median"),
            None => (
                m.build_inline_ns,
                "in-process timing (criterion did not run)",
            ),
        };
        out.push(Goal {
            what: format!("Maglev build, M={} and 1000 backends", m.table_size),
            target: "≤ 2 ms".into(),
            measured: format!("{:.3} ms", ns / 1e6),
            met: Some(ns <= 2e6),
            note: how.into(),
        });
    }
    let mut table_sizes: Vec<u32> = maglev.iter().map(|m| m.table_size).collect();
    table_sizes.dedup();
    for table_size in table_sizes {
        let these: Vec<&MaglevResult> = maglev
            .iter()
            .filter(|m| m.table_size == table_size)
            .collect();
        let worst = these
            .iter()
            .map(|m| m.moved_max * m.backends as f64)
            .fold(0.0, f64::max);
        let each: Vec<String> = these
            .iter()
            .map(|m| format!("N={}: {:.3}/N", m.backends, m.moved_max * m.backends as f64))
            .collect();
        out.push(Goal {
            what: format!("Maglev: entries moved when 1 of N is removed, M={table_size}"),
            target: "≤ 1.1/N".into(),
            measured: format!("{worst:.3}/N (worst)"),
            met: Some(worst <= 1.1),
            note: each.join(", "),
        });
    }
    out
}

/// The machine and the settings, for the report's header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Context {
    pub date: String,
    /// `git describe --always --dirty` of the tree that was measured.
    pub revision: String,
    /// /proc/loadavg when the run started.
    pub loadavg: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub tools: Vec<String>,
    pub quick: bool,
    pub reps: u32,
    pub seconds: u64,
    pub wrk_threads: u32,
    pub wrk_connections: u32,
    pub udp_flows: usize,
    pub pinning: Vec<String>,
    pub settings: Vec<String>,
    pub xdp_mode: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub context: Context,
    pub goals: Vec<Goal>,
    pub summary: Vec<Summary>,
    pub runs: Vec<Run>,
    pub xdp: Option<XdpResult>,
    pub maglev: Vec<MaglevResult>,
    /// xlb's programs in real traffic (an extra run with BPF stats on).
    pub profile: Vec<crate::profile::ProgramCost>,
    /// Mode setups that failed (their loads did not run in that repetition).
    pub failures: Vec<Failure>,
    /// The loads under a flood (absent in results from before the flood bench).
    #[serde(default)]
    pub flood: Vec<crate::flood::FloodRun>,
    #[serde(default)]
    pub flood_summary: Vec<crate::flood::FloodSummary>,
}

/// A mode that could not be set up or did not answer from every backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub rep: u32,
    pub mode: Mode,
    pub error: String,
}

pub fn markdown(r: &Results) -> String {
    let c = &r.context;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# xlb benchmark{}\n",
        if c.quick {
            " (--quick smoke run: not for comparison)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Taken {} on Linux {}, {} CPUs ({}), tree {}, load average at the start {}. \
         {} repetition(s) × {} s per load and mode, modes interleaved.\n",
        c.date, c.kernel, c.cpus, c.cpu_model, c.revision, c.loadavg, c.reps, c.seconds
    );
    let other = other_load(&r.runs);
    if other > CONTENDED {
        let _ = writeln!(
            s,
            "> **Contended run**: other users' processes used a median {other:.2} CPU of {} \
             during the wrk runs (see \"other load\"). The throughput ratios are not reliable; the \
             goals based on them are not judged.\n",
            c.cpus
        );
    }
    if !r.failures.is_empty() {
        let _ = writeln!(
            s,
            "## Failed setups\n\nThese modes failed their check (every backend must answer new \
             connections) and ran no load in that repetition:\n"
        );
        for f in &r.failures {
            let _ = writeln!(
                s,
                "- {}, repetition {}: {}",
                f.mode.name(),
                f.rep + 1,
                f.error
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Goals (issue 6)\n\n{}", goals_table(&r.goals));
    let _ = writeln!(
        s,
        "## Throughput\n\nwrk: {} threads, {} connections in every mode; UDP: {} flows (source ports). \
         CPU/unit is the whole machine's busy CPU time (/proc/stat) divided by requests, connections \
         or delivered packets, less what other users' processes used meanwhile (the \"other load\" \
         column, in CPUs; the machine is shared); \"CPU ratio\" is direct's CPU/unit over this \
         mode's (paired per repetition): the throughput ratio a CPU-bound machine would show, and \
         far less sensitive to other load than throughput; in brackets the proxy process's own (HAProxy; for \
         xlb its agent, which is not on the packet path). \"CPU busy\" is the load CPU's and the \
         server CPU's busy share. The split is nginx's request count (stub_status) or the \
         backends' nft counters; UDP errors are datagrams sent but not delivered. \
         \"direct, xlb attached\" is a diagnostic: the direct load with xlb's programs on the \
         interface (every packet passes: not for a VIP). \
         \"xlb, fullnat\" also rewrites the source to the lb namespace's br0 address, so \
         replies come back through xlb (attached to br0 too, in skb mode); \"xlb, dsr\" \
         encapsulates in IPIP to the backend, which decapsulates (`xlb decap`) and answers the \
         client directly.\n\n{}",
        c.wrk_threads,
        c.wrk_connections,
        c.udp_flows,
        throughput_table(&r.summary)
    );
    if let Some(x) = &r.xdp {
        let _ = writeln!(s, "## XDP program (BPF_PROG_TEST_RUN)\n\n{}", xdp_table(x));
    }
    if !r.flood_summary.is_empty() {
        let _ = writeln!(
            s,
            "## Under a flood\n\nEach mode's wrk keep-alive and `Connection: close` runs without \
             and then with a random-source SYN flood and a UDP flood (to the VIP's HTTP and UDP \
             ports) from a second client, its own namespace and link into the lb namespace; \
             \"kept\" is the flooded rate over the unflooded one (median over the \
             repetitions). \"Taken in\" is what the lb namespace's flood link received per \
             second; the CPU per flood packet is the whole machine's busy time during a flood \
             alone, less the generator's own, over the packets sent.\n\n{}",
            crate::flood::table(&r.flood_summary)
        );
    }
    if !r.profile.is_empty() {
        let _ = writeln!(
            s,
            "## xlb's programs in this traffic\n\nAn extra run of each load through xlb with the \
             kernel's BPF run-time stats on (BPF_ENABLE_STATS; not part of the numbers above): \
             program runs per request, connection or delivered datagram, and the mean time per \
             run.\n\n{}",
            profile_table(&r.profile)
        );
    }
    if !r.maglev.is_empty() {
        let _ = writeln!(s, "## Maglev\n\n{}", maglev_table(&r.maglev));
    }
    let _ = writeln!(s, "## Setup\n");
    for p in &c.pinning {
        let _ = writeln!(s, "- pinning: {p}");
    }
    for p in &c.settings {
        let _ = writeln!(s, "- {p}");
    }
    if let Some(m) = &c.xdp_mode {
        let _ = writeln!(s, "- xlb attached its XDP program in {m} mode");
    }
    let _ = writeln!(s, "- tools: {}", c.tools.join("; "));
    s
}

pub fn write_all(dir: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    crate::plot::plot(&dir.join("ratios.svg"), &r.summary)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(load: Load, mode: Mode, ratio: f64) -> Summary {
        Summary {
            load,
            mode,
            unit: load.unit().into(),
            reps: 1,
            median: 1000.0 * ratio,
            min: 1000.0 * ratio,
            max: 1000.0 * ratio,
            ratio,
            ratio_min: ratio,
            ratio_max: ratio,
            p50_us: None,
            p99_us: None,
            cpu_per_unit: 1.0,
            cpu_ratio: 1.0,
            proxy_cpu_per_unit: None,
            cpu_util: vec![],
            foreign_cpus: 0.0,
            split: vec![],
            errors: 0,
        }
    }

    #[test]
    fn a_default_config_behind_nft_misses_the_goal() {
        let run: Vec<Summary> = [
            summary(Load::Udp, Mode::Direct, 1.0),
            summary(Load::Udp, Mode::XlbDefault, 1.05),
            summary(Load::Udp, Mode::Nft, 1.1),
        ]
        .into();
        let goals = goals(&run, None, &[], 0.0);
        let udp = goals
            .iter()
            .find(|g| g.what.contains("UDP"))
            .expect("UDP goal");
        assert_eq!(udp.met, Some(false), "{udp:?}");
    }

    #[test]
    fn throughput_goals_quote_only_this_run() {
        let run: Vec<Summary> = load::ALL
            .into_iter()
            .flat_map(|l| {
                [
                    summary(l, Mode::Direct, 1.0),
                    summary(l, Mode::XlbDefault, 1.25),
                    summary(l, Mode::Xlb, 1.5),
                    summary(l, Mode::Nft, 0.7),
                ]
            })
            .collect();
        let goals = goals(&run, None, &[], 0.0);
        assert_eq!(goals.len(), 3);
        for g in &goals {
            // Judged on the default config, not on the better tuned row.
            assert_eq!(g.measured, "1.250", "{}", g.what);
            assert_eq!(g.met, Some(true), "{}", g.what);
            // HAProxy and mode tc did not run: no figure of theirs may appear.
            assert_eq!(
                g.note, "xlb, default config; CPU ratio 1.000; this run: xlb 1.50, nft DNAT 0.70",
                "{}",
                g.what
            );
        }
    }
}
