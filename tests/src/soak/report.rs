//! The soak's verdict and its markdown report. A failed request is inside a documented
//! window when it is a new flow (TCP connection or UDP flow) started while a backend killed
//! without drain was not yet marked down (plus the time to apply that): README "What survives what", "a backend that dies
//! takes new flows until its health checks notice (`interval` × `fall`)". Every other failure
//! is outside the windows: agent restarts and kills, reloads, drains and backends added or
//! removed (they keep running) are all documented to fail nothing, and the long-lived flows
//! live on backends that are never killed nor removed.
use std::{fmt::Write as _, time::Duration};

use super::{
    Run,
    containers::STEADY,
    load::{Kind, Request},
    probe::Sample,
    world::{BACKENDS, HEALTH},
};

/// Growth of the agent's RSS, anonymous RSS or fds, start to end, beyond which the soak
/// fails.
pub const MAX_GROWTH: f64 = 0.10;
/// How long before a backend's kill a request counts as in its window (in flight).
const IN_FLIGHT: Duration = Duration::from_millis(100);
/// How long after `xlb status` shows a backend down a new flow may still reach it (the
/// ring's flip into the maps).
const APPLY: Duration = Duration::from_millis(500);

pub struct Verdict {
    pub passed: bool,
    pub reasons: Vec<String>,
}

/// A kill's window: from shortly before the kill until the apply after it was marked down,
/// and never longer than the allowance.
struct Window<'a> {
    backend: &'a str,
    at: std::time::Instant,
    detected: Duration,
    backends: usize,
    container: bool,
}

impl Window<'_> {
    fn end(&self) -> std::time::Instant {
        self.at + (self.detected + APPLY).min(HEALTH.allowance())
    }

    fn contains(&self, r: &Request) -> bool {
        r.kind.is_new_flow()
            && r.kind.to_containers() == self.container
            && r.at + IN_FLIGHT >= self.at
            && r.at <= self.end()
    }
}

fn windows(run: &Run) -> Vec<Window<'_>> {
    run.events
        .iter()
        .filter_map(|e| {
            let k = e.kill.as_ref()?;
            Some(Window {
                backend: &k.backend,
                at: e.at,
                detected: k.detected,
                backends: k.backends,
                container: k.container,
            })
        })
        .collect()
}

fn outside<'a>(run: &'a Run, windows: &[Window]) -> Vec<&'a Request> {
    run.requests
        .iter()
        .filter(|r| r.answer.is_err() && !windows.iter().any(|w| w.contains(r)))
        .collect()
}

/// Each agent's samples, with what to call it.
fn agents(run: &Run) -> [(&'static str, &[Sample]); 2] {
    [
        ("agent of the static backends", &run.samples),
        ("agent of the Docker host", &run.container_samples),
    ]
}

fn growth(start: f64, end: f64) -> f64 {
    (end - start) / start.max(1.0)
}

pub fn judge(run: &Run) -> Verdict {
    let windows = windows(run);
    let mut reasons = Vec::new();
    if let Some(why) = &run.aborted {
        reasons.push(format!("the soak stopped early: {why}"));
    }
    let out = outside(run, &windows).len();
    if out > 0 {
        reasons.push(format!(
            "{out} failed requests outside the documented windows"
        ));
    }
    for kind in Kind::ALL {
        if !run.requests.iter().any(|r| r.kind == kind) {
            reasons.push(format!(
                "no request of the load \"{}\" ran",
                kind.describe()
            ));
        }
    }
    for w in &windows {
        if w.detected > HEALTH.allowance() {
            reasons.push(format!(
                "{} was marked down {} ms after its kill (allowed: {} ms)",
                w.backend,
                w.detected.as_millis(),
                HEALTH.allowance().as_millis()
            ));
        }
    }
    for (who, samples) in agents(run) {
        let (Some(start), Some(end)) = (samples.first(), samples.last()) else {
            reasons.push(format!("no sample of the {who} was taken"));
            continue;
        };
        let measures = [
            ("RSS", start.rss_kb as f64, end.rss_kb as f64),
            ("anonymous RSS", start.anon_kb as f64, end.anon_kb as f64),
            ("open fds", start.fds as f64, end.fds as f64),
        ];
        for (what, a, b) in measures {
            let g = growth(a, b);
            if g > MAX_GROWTH {
                reasons.push(format!(
                    "{who}: {what} grew {:.1} % ({a} to {b})",
                    g * 100.0
                ));
            }
        }
    }
    Verdict {
        passed: reasons.is_empty(),
        reasons,
    }
}

fn secs(run: &Run, at: std::time::Instant) -> String {
    format!(
        "{:.1}",
        at.saturating_duration_since(run.started).as_secs_f64()
    )
}

/// The event just before `at`, and how long before.
fn last_event(run: &Run, at: std::time::Instant) -> String {
    run.events
        .iter()
        .rev()
        .find(|e| e.at <= at)
        .map(|e| format!("{:.1} s after: {}", (at - e.at).as_secs_f64(), e.what))
        .unwrap_or_else(|| "before the first event".into())
}

pub fn markdown(run: &Run, verdict: &Verdict) -> String {
    let windows = windows(run);
    let mut md = String::new();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let status = if verdict.passed { "PASSED" } else { "FAILED" };
    let _ = writeln!(md, "# Soak: {} minutes, {status}\n", run.minutes);
    let _ = writeln!(
        md,
        "Written by `cargo xtask soak --minutes {}` ({date}; `tests/src/soak/`, run as \
         `tests/tests/soak.rs`). Exit status non-zero when a request failed outside the \
         documented windows, or an agent's RSS, anonymous RSS or open fds grew more than \
         {:.0} %.\n",
        run.minutes,
        MAX_GROWTH * 100.0
    );
    if !verdict.passed {
        md += "**Why it failed:**\n\n";
        for r in &verdict.reasons {
            let _ = writeln!(md, "- {r}");
        }
        md += "\n";
    }
    setup(run, &mut md);
    requests(run, &windows, &mut md);
    kills(run, &windows, &mut md);
    agent(run, &mut md);
    tables(run, &mut md);
    events(run, &mut md);
    md
}

fn setup(run: &Run, md: &mut String) {
    let p = &run.pace;
    let h = &HEALTH;
    let _ = writeln!(
        md,
        "## Setup\n\n\
         The netns topology of the tests (client → lb with XDP on `front` → bridge → \
         {BACKENDS} backend namespaces running the workspace's `xlb-test-backend`), mode nat, \
         a TCP service (VIP:80) and a UDP one (VIP:53) over the same backends; health checks \
         TCP every {} ms, timeout {} ms, fall {}, rise {}. These backends are static (config \
         entries): they come and go by reloads, and their server processes are killed and \
         restarted. be1 and be2 are never killed nor removed; the long-lived flows are held \
         there.\n\n\
         Beside it, a Docker host (its own containerd and dockerd in a namespace, \
         `tests/src/docker/`) with a second agent in front of docker0 that discovers \
         containers of the test backend image labelled `xlb.service=web` (same health \
         checks), {STEADY} of them running between steps, and a client of its own.\n\n\
         Load, all the time: a new TCP connection every {} ms and a new UDP flow every {} ms \
         (one request each), {} long-lived TCP connections and {} long-lived UDP flows asked \
         every {} ms; a new TCP connection to the containers every {} ms; each request times \
         out after 2 s.\n\n\
         Every minute, one step at a time: both agents stopped (SIGTERM) and restarted, killed \
         (SIGKILL) and restarted; a churn backend (be3..be5, in turn) killed (SIGKILL, no \
         drain) and restarted; a backend (be1..be5 in turn) drained and undrained (`xlb \
         drain`); another churn backend removed and added back by a reload (the config \
         written to a temporary file and renamed over the old one, then `xlb reload`); two \
         containers run (`docker run`), the oldest stopped (`docker stop`: SIGTERM, it \
         lingers 2 s) and removed, the next killed (`docker kill`: SIGKILL, no drain) and \
         removed; then the agents and the maps sampled. Each step waits until `xlb status` shows its effect.\n",
        h.interval.as_millis(),
        h.timeout.as_millis(),
        h.fall,
        h.rise,
        p.tcp_every.as_millis(),
        p.udp_every.as_millis(),
        p.tcp_long,
        p.udp_long,
        p.long_every.as_millis(),
        p.container_every.as_millis(),
    );
}

fn requests(run: &Run, windows: &[Window], md: &mut String) {
    let _ = writeln!(
        md,
        "## Requests\n\n\
         The only documented window in which requests may fail here is a backend killed \
         without drain (README \"What survives what\": it takes new flows until its health \
         checks notice, `interval` × `fall` = {} ms; docs/architecture.md: a flow's backend \
         is used while it is ALIVE in the maps). For a container killed with `docker kill` \
         the same window ends sooner: the agent drains it at its `kill` event and removes \
         it at `die` (docs/architecture.md, \"Discovery\"); the window of a kill applies \
         to the new flows of its own agent only. A new flow counts as inside the window when \
         it started from {} ms before the kill (in flight) until {} ms after `xlb status` \
         showed the backend down (the ring's flip into the maps), and never later than {} ms \
         after the kill (`interval` × (`fall` + 1) + 500 ms). Agent restarts and SIGKILLs, reloads, drains, backends \
         added or removed, containers run or stopped (`docker stop`) have no window: \
         established and new flows keep going.\n\n\
         | load | sent | failed | inside the window | outside |\n|---|---:|---:|---:|---:|",
        HEALTH.window().as_millis(),
        IN_FLIGHT.as_millis(),
        APPLY.as_millis(),
        HEALTH.allowance().as_millis(),
    );
    let out = outside(run, windows);
    let mut totals = [0usize; 4];
    for kind in Kind::ALL {
        let of = |r: &&Request| r.kind == kind;
        let sent = run.requests.iter().filter(of).count();
        let failed = run
            .requests
            .iter()
            .filter(of)
            .filter(|r| r.answer.is_err())
            .count();
        let outside = out.iter().filter(|r| r.kind == kind).count();
        for (t, v) in totals
            .iter_mut()
            .zip([sent, failed, failed - outside, outside])
        {
            *t += v;
        }
        let _ = writeln!(
            md,
            "| {} | {sent} | {failed} | {} | {outside} |",
            kind.describe(),
            failed - outside
        );
    }
    let [sent, failed, inside, outside] = totals;
    let _ = writeln!(
        md,
        "| **all** | **{sent}** | **{failed}** | **{inside}** | **{outside}** |\n"
    );
    if !out.is_empty() {
        md.push_str("Failures outside the windows (the first 50):\n\n");
        md.push_str("| at (s) | load | backend | error | last event |\n|---:|---|---|---|---|\n");
        for r in out.iter().take(50) {
            let _ = writeln!(
                md,
                "| {} | {:?} | {} | {} | {} |",
                secs(run, r.at),
                r.kind,
                r.backend.as_deref().unwrap_or("-"),
                r.answer.as_ref().err().map(String::as_str).unwrap_or(""),
                last_event(run, r.at)
            );
        }
        md.push('\n');
    }
}

fn kills(run: &Run, windows: &[Window], md: &mut String) {
    md.push_str(
        "## Backends and containers killed without drain\n\n\
         Each row bounds that window's failures: at most the new flows started in the \
         window, and expected about the killed backend's share (1 / backends in the ring) \
         of those started before it was marked down.\n\n\
         | at (s) | backend | marked down after (ms) | new flows started in the window | \
         of them before down | backends | expected failures | failed inside |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for w in windows {
        let started: Vec<&Request> = run.requests.iter().filter(|r| w.contains(r)).collect();
        let before_down = started.iter().filter(|r| r.at <= w.at + w.detected).count();
        let failed = started.iter().filter(|r| r.answer.is_err()).count();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {before_down} | {} | {:.0} | {failed} |",
            secs(run, w.at),
            w.backend,
            w.detected.as_millis(),
            started.len(),
            w.backends,
            before_down as f64 / w.backends.max(1) as f64,
        );
    }
    md.push('\n');
}

fn agent(run: &Run, md: &mut String) {
    md.push_str(
        "## Agent resources\n\n\
         Each agent is restarted twice a minute, so each sample is of the agent running then \
         (its age given): \"start\" is of the first agents, under load, before any step, \
         as old as the later ones, which are taken at second 55 of each minute, after a \
         minute of every step. The check compares \
         the first sample with the last. RSS (VmRSS) is mostly the pages of the (debug) \
         binary, shared by both agents; the anonymous part (RssAnon: heap and stacks) is \
         where a leak would show, so it is checked too.\n\n",
    );
    for (who, samples) in agents(run) {
        let _ = writeln!(
            md,
            "The {who}:\n\n\
             | sample | pid | agent age (s) | RSS (KiB) | anonymous (KiB) | open fds | \
             backend slots in use |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for s in samples {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} | {} |",
                s.label,
                s.pid,
                s.agent_age.as_secs_f64(),
                s.rss_kb,
                s.anon_kb,
                s.fds,
                s.backends_in_use
            );
        }
        if let (Some(a), Some(b)) = (samples.first(), samples.last()) {
            let _ = writeln!(
                md,
                "\nStart to end: RSS {:+.1} %, anonymous {:+.1} %, open fds {:+.1} % (limit \
                 +{:.0} % each).\n",
                growth(a.rss_kb as f64, b.rss_kb as f64) * 100.0,
                growth(a.anon_kb as f64, b.anon_kb as f64) * 100.0,
                growth(a.fds as f64, b.fds as f64) * 100.0,
                MAX_GROWTH * 100.0
            );
        }
    }
    log_summary(run, md);
}

/// `[who] LEVEL target: message` of a log line, without its time and its key=value fields.
fn message_of(line: &str) -> String {
    let mut words = line.split_whitespace();
    let who = words.next().unwrap_or_default();
    let _time = words.next();
    let message: Vec<&str> = words.take_while(|w| !w.contains('=')).collect();
    format!("{who} {}", message.join(" "))
}

/// The agents' WARN and ERROR lines, one row per kind of message.
fn log_summary(run: &Run, md: &mut String) {
    if run.agent_problems.is_empty() {
        md.push_str("The agents logged no WARN or ERROR line.\n\n");
        return;
    }
    let mut kinds: Vec<(String, usize, &str)> = Vec::new();
    for line in &run.agent_problems {
        let message = message_of(line);
        match kinds.iter_mut().find(|k| k.0 == message) {
            Some(k) => k.1 += 1,
            None => kinds.push((message, 1, line)),
        }
    }
    let _ = writeln!(
        md,
        "The agents' WARN and ERROR lines ({} in all), by kind (a backend killed is one \
         \"backend is down\" per service):\n\n| lines | message | the first |\n|---:|---|---|",
        run.agent_problems.len()
    );
    for (message, n, first) in kinds {
        let first = first.replace('|', "\\|");
        let _ = writeln!(md, "| {n} | {message} | `{first}` |");
    }
    md.push('\n');
}

fn tables(run: &Run, md: &mut String) {
    md.push_str(
        "## Flow tables\n\n\
         From `xlb status --json` (`flow_tables`: each table as the agent's last sweep, \
         every 5 s, found it), at the first and the last sample; the sweeps remove closed \
         flows after 10 s idle and UDP flows after 30 s.\n\n",
    );
    for (who, samples) in agents(run) {
        let (Some(a), Some(b)) = (samples.first(), samples.last()) else {
            continue;
        };
        let _ = writeln!(
            md,
            "The {who}:\n\n\
             | table | capacity | entries at start | entries at end | insert failures | \
             evictions |\n|---|---:|---:|---:|---:|---:|"
        );
        for t in &b.tables {
            let start = a
                .tables
                .iter()
                .find(|s| s.name == t.name)
                .map_or(0, |s| s.entries);
            let _ = writeln!(
                md,
                "| {} | {} | {start} | {} | {} | {} |",
                t.name, t.capacity, t.entries, t.insert_failures, t.evictions
            );
        }
        md.push('\n');
    }
}

fn events(run: &Run, md: &mut String) {
    md.push_str("## Events\n\n| at (s) | minute | event |\n|---:|---:|---|\n");
    for e in &run.events {
        let _ = writeln!(md, "| {} | {} | {} |", secs(run, e.at), e.minute, e.what);
    }
}
