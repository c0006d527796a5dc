//! `xlb-bench` (run it with `cargo xtask bench`): the same loads through every mode in a
//! netns sandbox, interleaved over repetitions, plus microbenchmarks of the XDP program and
//! Maglev. Writes report.md, results.json and ratios.svg to target/bench/; `--update-docs`
//! makes a full run the one README.md and docs/ quote (publish.rs).
//!
//! ```text
//! client ns 10.99.1.2 ──veth── lb ns (front 10.99.1.1, br0 10.99.2.1) ──br0── beN ns 10.99.2.1N (nginx)
//!   wrk / UDP generator          direct: routing only      nft: DNAT numgen
//!   (pinned to the load CPU)     HAProxy mode tcp on VIP   xlb: XDP on front (nat, fullnat, dsr)
//! ```
//! Everything it creates (namespaces, processes, pins) is removed at the end, also when a
//! run fails or on Ctrl-C.
mod cpu;
mod flood;
mod load;
mod micro;
mod modes;
mod plot;
mod profile;
mod publish;
mod report;
mod runs;
mod tables;
mod testbed;
mod tracecost;
mod xlbmode;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::{
    load::Load,
    modes::{Active, Mode},
    report::{Context, Failure, Results, Run},
    testbed::Testbed,
};

/// Set by Ctrl-C / SIGTERM: the run stops at the next check and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(about = "xlb against direct routing, nft DNAT and HAProxy in a netns sandbox")]
struct Args {
    /// Smoke run: every mode and load once for 1 s, small microbenchmarks (for CI).
    #[arg(long)]
    quick: bool,
    /// Repetitions of the interleaved mode loop [default: 5; --quick: 1].
    #[arg(long)]
    reps: Option<u32>,
    /// Seconds per measured run [default: 4; --quick: 1].
    #[arg(long)]
    seconds: Option<u64>,
    /// CPU for the load generators (wrk, the UDP generator).
    #[arg(long, default_value_t = 0)]
    load_cpu: usize,
    /// CPU for the servers and proxies (nginx ×3, HAProxy, the xlb agent).
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// wrk threads (in direct mode thread i drives backend i mod 3).
    #[arg(long, default_value_t = 3)]
    threads: u32,
    /// wrk connections in total.
    #[arg(long, default_value_t = 48)]
    connections: u32,
    /// UDP flows (source ports) of the UDP generator.
    #[arg(long, default_value_t = 60)]
    udp_flows: usize,
    /// Output directory [default: target/bench next to this binary's target dir].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Criterion's output directory, read for the Maglev build times [default: target/criterion].
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// A run during which other people's processes used more than this many CPUs is done
    /// again (up to --retries times; the least disturbed one is kept).
    #[arg(long, default_value_t = 0.3)]
    max_other_load: f64,
    /// Extra tries of a disturbed run (off by default: on a machine that is shared all the
    /// time they only add time).
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Seconds of throughput runs after which no retry starts.
    #[arg(long, default_value_t = 420)]
    retry_budget: u64,
    /// Only these modes (direct always runs: it is the reference).
    #[arg(long, value_delimiter = ',', value_enum)]
    modes: Vec<Mode>,
    /// Only these loads.
    #[arg(long, value_delimiter = ',', value_enum)]
    loads: Vec<Load>,
    /// Skip the netns throughput runs (microbenchmarks only).
    #[arg(long)]
    no_netns: bool,
    /// Skip the microbenchmarks.
    #[arg(long)]
    no_micro: bool,
    /// Skip the loads under a flood.
    #[arg(long)]
    no_flood: bool,
    /// Packets a second of each flood (random-source SYNs, UDP) from the second client.
    #[arg(long, default_value_t = 20_000)]
    flood_rate: u64,
    /// Run nothing: rewrite the benchmark sections of README.md and docs/benchmarks.md from
    /// docs/bench-results.json, the last full run's results.
    #[arg(long)]
    update_docs: bool,
    /// With --update-docs: first make this output directory's full run (results.json,
    /// ratios.svg) the last full run in docs/.
    #[arg(long, requires = "update_docs")]
    from: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = ctrlc::set_handler(|| {
        eprintln!("\nxlb-bench: stopping, cleaning up…");
        STOP.store(true, Ordering::SeqCst);
    }) {
        eprintln!("xlb-bench: no signal handler: {e}");
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("==> [{t:5.0} s] {msg}");
}

/// target/ of the workspace this binary was built in (target/release/xlb-bench).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn run(args: Args) -> Result<()> {
    if args.update_docs {
        let changed = publish::update_docs(args.from.as_deref())?;
        eprintln!(
            "xlb-bench: {}",
            if changed.is_empty() {
                "README.md and docs/benchmarks.md already quote docs/bench-results.json".into()
            } else {
                format!("rewrote the benchmark section of {}", changed.join(", "))
            }
        );
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: it creates network namespaces and loads BPF programs");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.load_cpu >= cpus || args.server_cpu >= cpus {
        bail!("this machine has {cpus} CPUs: choose --load-cpu and --server-cpu below that");
    }
    let quick = args.quick;
    let reps = args.reps.unwrap_or(if quick { 1 } else { 5 });
    let seconds = args.seconds.unwrap_or(if quick { 1 } else { 4 });
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench"));
    let criterion = args
        .criterion
        .clone()
        .unwrap_or_else(|| target_dir().join("criterion"));
    let started = Instant::now();

    let mut context = Context {
        date: sh_out(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        revision: sh_out(&[
            "git",
            "-C",
            &target_dir().parent().unwrap_or(Path::new(".")).to_string_lossy(),
            "describe",
            "--always",
            "--dirty",
        ]),
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus,
        cpu_model: cpu_model(),
        tools: [
            &["nginx", "-v"][..],
            &["haproxy", "-v"],
            &["wrk", "-v"],
            &["nft", "--version"],
        ]
        .iter()
        .map(|c| first_line(c))
        .collect(),
        quick,
        reps,
        seconds,
        wrk_threads: args.threads,
        wrk_connections: args.connections,
        udp_flows: args.udp_flows,
        pinning: vec![
            format!(
                "CPU {}: the load generators (wrk, the UDP generator thread)",
                args.load_cpu
            ),
            format!(
                "CPU {}: nginx ×3 (1 worker each), HAProxy (nbthread 1), the xlb agent, the XDP microbenchmark",
                args.server_cpu
            ),
            "softirq work (routing, netfilter, XDP, TC) runs where the packet is sent or received, unpinned".into(),
        ],
        settings: vec![
            "TX checksum offload off on the client's eth0 and the backends' eth0 (ethtool -K eth0 tx off)".into(),
            "lb ns: net.bridge.bridge-nf-call-{iptables,ip6tables,arptables} = 0 when br_netfilter is loaded (no netfilter detour for br0's bridged traffic)".into(),
            format!(
                "each mode's load comes from its own client address ({})",
                modes::ALL.map(|m| format!("{}: {}", m.name(), m.client_addr())).join(", ")
            ),
            format!("HAProxy connects to the backends from {} on br0, not from the lb namespace's 10.99.2.1, which fullnat takes its ports on: the TIME_WAITs HAProxy's connections leave on the backends would meet fullnat's first SYNs", modes::HAPROXY_SOURCE),
            format!("MTU {} on br0, its ports and the backends' eth0: room for dsr's encapsulation of a full-size packet", testbed::INNER_MTU),
        ],
        xdp_mode: None,
    };
    for (ns, key, value) in testbed::SYSCTLS {
        context.settings.push(format!("{ns} ns: {key} = {value}"));
    }
    eprintln!(
        "xlb-bench: {} repetition(s) × {seconds} s; pinning: {}",
        reps,
        context.pinning.join("; ")
    );

    let mut xdp = None;
    let mut maglev = Vec::new();
    if !args.no_micro {
        step("XDP program under BPF_PROG_TEST_RUN");
        let cpu = args.server_cpu;
        let x = std::thread::spawn(move || micro::xdp(quick, cpu))
            .join()
            .map_err(|_| anyhow::anyhow!("the XDP microbenchmark panicked"))??;
        eprintln!(
            "    established {:.1} ns (repeat), {:.1} ns (one run per packet); new flow {:.1} ns, {:.1} ns with conntrack full",
            x.established_repeat_ns, x.established_single_ns, x.new_flow_ns, x.new_flow_full_ns
        );
        if let Some(t) = &x.trace {
            eprintln!(
                "    tracing off: {:.1} ns vs {:.1} ns with the hooks removed ({:+.1} ns); a trace for other sources: {:.1} ns",
                t.off_ns,
                t.removed_ns,
                t.off_overhead_ns(),
                t.other_source_ns
            );
        }
        xdp = Some(x);
        stopped()?;
        step("Maglev: moved fraction (and criterion's build times)");
        maglev = micro::maglev(&criterion, quick)?;
        for m in &maglev {
            eprintln!(
                "    N={:4}: build {} ; moved {:.4} (1/N {:.4})",
                m.backends,
                m.build.as_ref().map_or_else(
                    || format!("{:.3} ms (in-process)", m.build_inline_ns / 1e6),
                    |c| format!("{:.3} ms (criterion)", c.median_ns / 1e6)
                ),
                m.moved_max,
                1.0 / m.backends as f64
            );
        }
        stopped()?;
    }

    let mut runs = Vec::new();
    let mut profile = Vec::new();
    let mut failures = Vec::new();
    let mut flood = Vec::new();
    if !args.no_netns {
        step("building the netns sandbox (client, lb, 3 nginx backends)");
        let bed = Testbed::new(args.server_cpu)?;
        let outcome = throughput(
            &args,
            &bed,
            reps,
            seconds,
            &mut runs,
            &mut context,
            &mut profile,
        );
        let flooded = match outcome {
            Ok(_) if !args.no_flood && !stopped_now() => under_flood(&args, &bed, reps, seconds),
            _ => Ok(Vec::new()),
        };
        drop(bed);
        failures = outcome?;
        flood = flooded?;
    }

    let summary = report::summarize(&runs);
    let mut goals = report::goals(&summary, xdp.as_ref(), &maglev, report::other_load(&runs));
    let flood_summary = flood::summarize(&flood);
    goals.extend(flood::goal(&flood_summary, args.flood_rate));
    let results = Results {
        context,
        goals,
        summary,
        runs,
        xdp,
        maglev,
        profile,
        failures,
        flood,
        flood_summary,
    };
    report::write_all(&out, &results)?;
    println!("{}", report::markdown(&results));
    step(&format!(
        "wrote {0}/report.md, {0}/results.json, {0}/ratios.svg in {1:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    ));
    if !results.failures.is_empty() {
        let which: Vec<String> = results
            .failures
            .iter()
            .map(|f| format!("{} (rep {})", f.mode.name(), f.rep + 1))
            .collect();
        bail!("failed their check: {}", which.join(", "));
    }
    Ok(())
}

/// The interleaved loop: each repetition sets every mode up in turn (in a rotated order)
/// and runs every load through it.
fn throughput(
    args: &Args,
    bed: &Testbed,
    reps: u32,
    seconds: u64,
    runs: &mut Vec<Run>,
    context: &mut Context,
    profile: &mut Vec<profile::ProgramCost>,
) -> Result<Vec<Failure>> {
    let mut failures = Vec::new();
    let started = Instant::now();
    let retries = args.retries;
    let scratch = bed.scratch();
    let wrk = wrk_of(args, bed, seconds, &scratch);
    for rep in 0..reps {
        let modes: Vec<Mode> = modes::ALL
            .into_iter()
            .filter(|m| args.modes.is_empty() || *m == Mode::Direct || args.modes.contains(m))
            .collect();
        for k in 0..modes.len() {
            let mode = modes[(k + rep as usize) % modes.len()];
            stopped()?;
            step(&format!("rep {}/{reps}: {}", rep + 1, mode.name()));
            // A mode that cannot be set up or fails its check is reported, and the others
            // still run: one broken mode should not void the whole run.
            let active = match Active::start(bed, mode) {
                Ok(active) => active,
                Err(e) => {
                    eprintln!("    FAILED: {e:#}");
                    failures.push(Failure {
                        rep,
                        mode,
                        error: format!("{e:#}"),
                    });
                    if mode.runs_xlb() {
                        modes::check_detached(bed)?;
                    }
                    continue;
                }
            };
            // How the default config attached (the tuned modes choose theirs).
            if mode == Mode::XlbDefault {
                context.xdp_mode.clone_from(&active.xdp_mode);
            }
            if !args.quick {
                // Warm-up, not recorded: caches, conntrack, nginx's connection pools.
                let warm = load::Wrk { seconds: 1, ..wrk };
                warm.run(&active.http_targets(), false)?;
            }
            for load in load::ALL {
                if load == Load::Udp && !mode.does_udp()
                    || !args.loads.is_empty() && !args.loads.contains(&load)
                {
                    continue;
                }
                stopped()?;
                let mut run = one_run(args, &wrk, bed, &active, rep, load, seconds)?;
                let mut tries = 0;
                while run.other_load() > args.max_other_load
                    && tries < retries
                    && started.elapsed().as_secs() < args.retry_budget
                {
                    tries += 1;
                    stopped()?;
                    eprintln!(
                        "    ({} CPU used by other processes: again)",
                        (run.other_load() * 100.0).round() / 100.0
                    );
                    let again = one_run(args, &wrk, bed, &active, rep, load, seconds)?;
                    if again.other_load() < run.other_load() {
                        run = again;
                    }
                }
                eprintln!(
                    "    {:24} {:>10.0} {:14} cpu {:6.2} {:7} other {:.2} CPU split {:?}{}",
                    load.title(),
                    run.rate,
                    load.unit(),
                    run.cpu_per_unit(),
                    load.per(),
                    run.other_load(),
                    run.per_backend,
                    if run.errors > 0 {
                        format!("  errors {}", run.errors)
                    } else {
                        String::new()
                    }
                );
                runs.push(run);
                stopped()?;
            }
            if mode == Mode::XlbDefault && rep == 0 {
                profile_xlb(args, &wrk, bed, &active, seconds.min(2), profile)?;
            }
            drop(active);
            if mode.runs_xlb() {
                modes::check_detached(bed)?;
            }
        }
    }
    Ok(failures)
}

/// The loads under a flood, in the same sandbox, with the second client added.
fn under_flood(
    args: &Args,
    bed: &Testbed,
    reps: u32,
    seconds: u64,
) -> Result<Vec<flood::FloodRun>> {
    step("adding the flooding client");
    let flooder = flood::Flooder::new(bed);
    let scratch = bed.scratch();
    let wrk = wrk_of(args, bed, seconds, &scratch);
    let generator_ns =
        flooder.generator_ns_per_packet(bed, args.load_cpu, args.flood_rate, seconds)?;
    eprintln!("    the flood generator alone: {generator_ns:.0} ns CPU per packet");
    let settings = flood::Settings {
        reps,
        seconds,
        load_cpu: args.load_cpu,
        rate: args.flood_rate,
        generator_ns,
    };
    flood::run(&wrk, bed, &flooder, &settings)
}

/// wrk as the arguments set it, from the client namespace.
fn wrk_of<'a>(args: &Args, bed: &'a Testbed, seconds: u64, scratch: &'a Path) -> load::Wrk<'a> {
    load::Wrk {
        client: &bed.topo.client,
        cpu: args.load_cpu,
        threads: args.threads,
        connections: args.connections,
        seconds,
        scratch,
    }
}

fn stopped_now() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn one_run(
    args: &Args,
    wrk: &load::Wrk<'_>,
    bed: &Testbed,
    active: &Active<'_>,
    rep: u32,
    load: Load,
    seconds: u64,
) -> Result<Run> {
    match load {
        Load::Udp => runs::udp_run(bed, active, rep, seconds, args.load_cpu, args.udp_flows),
        _ => runs::wrk_run(wrk, bed, active, rep, load),
    }
}

/// An extra run of each load with the kernel's BPF run-time stats on (not recorded as
/// throughput): what xlb's programs cost per packet in this traffic.
fn profile_xlb(
    args: &Args,
    wrk: &load::Wrk<'_>,
    bed: &Testbed,
    active: &Active<'_>,
    seconds: u64,
    out: &mut Vec<profile::ProgramCost>,
) -> Result<()> {
    let pins = active
        .xlb_pins()
        .context("xlb is not running")?
        .to_path_buf();
    let wrk = load::Wrk { seconds, ..*wrk };
    let _stats = profile::enable_stats()?;
    for load in load::ALL {
        stopped()?;
        let before = profile::snapshot(&pins)?;
        let run = one_run(args, &wrk, bed, active, 0, load, seconds)?;
        let after = profile::snapshot(&pins)?;
        for c in profile::costs(load, &before, &after, run.count) {
            eprintln!(
                "    profile: {:24} {:14} {:6.2} runs/{} {:7.1} ns/run",
                load.title(),
                c.program,
                c.runs_per_unit,
                load.noun(),
                c.ns_per_run
            );
            out.push(c);
        }
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The first line a tool prints about its version (stdout or stderr).
fn first_line(cmd: &[&str]) -> String {
    match Command::new(cmd[0]).args(&cmd[1..]).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines().next().unwrap_or_default().trim().to_string()
        }
        Err(e) => format!("{}: {e}", cmd[0]),
    }
}

fn sh_out(cmd: &[&str]) -> String {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
