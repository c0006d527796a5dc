//! The benchmark sections of README.md and docs/benchmarks.md, generated from the results
//! of the last full run, which docs/bench-results.json keeps (with its chart,
//! docs/bench-ratios.svg): the docs quote one run, and no figure is copied by hand.
//! `cargo xtask bench` publishes a full run here; `cargo xtask readme` rewrites the sections
//! from the committed results after a change to the text around them or to the tables.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    load::{self, Load},
    modes::{self, Mode},
    report::{self, CONTENDED, Results, Summary},
    tables::{goals_table, maglev_table, profile_table, throughput_table, xdp_table},
};

/// The last full run's results.json and ratios.svg, relative to the workspace.
pub const RESULTS: &str = "docs/bench-results.json";
pub const CHART: &str = "docs/bench-ratios.svg";
/// The files with a generated section, between these two marker lines.
pub const FILES: [&str; 2] = ["README.md", "docs/benchmarks.md"];
const BEGIN: &str = "<!-- bench:begin";
const END: &str = "<!-- bench:end -->";
const BEGIN_LINE: &str = "<!-- bench:begin: generated from docs/bench-results.json by `cargo xtask readme`; edit the code in bench/src/publish.rs, not this -->";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_path_buf()
}

pub fn load(path: &Path) -> Result<Results> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Why these results are not a full run, if they are not: the docs quote only full runs.
pub fn not_full(r: &Results) -> Option<String> {
    let c = &r.context;
    if c.quick {
        return Some("a --quick run".into());
    }
    if !r.failures.is_empty() {
        return Some(format!("{} mode setup(s) failed", r.failures.len()));
    }
    if r.xdp.is_none() || r.maglev.is_empty() {
        return Some("the microbenchmarks did not run".into());
    }
    let missing: Vec<String> = load::ALL
        .into_iter()
        .flat_map(|l| modes::ALL.map(|m| (l, m)))
        .filter(|(l, m)| *l != Load::Udp || m.does_udp())
        .filter(|(l, m)| !r.summary.iter().any(|s| s.load == *l && s.mode == *m))
        .map(|(l, m)| format!("{} through {}", l.title(), m.name()))
        .collect();
    (!missing.is_empty()).then(|| format!("not run: {}", missing.join(", ")))
}

/// Each file's generated section, from `r`.
pub fn sections(r: &Results) -> [(&'static str, String); 2] {
    [(FILES[0], readme(r)), (FILES[1], benchmarks(r))]
}

/// "nginx 1.22.1" from the first line a tool prints about its version ("nginx version:
/// nginx/1.22.1", "nftables v1.0.6 (Lester Gooch #5)", "HAProxy version 2.6.12-1+deb12u1 …").
fn short_tool(line: &str) -> String {
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or_default().trim_end_matches(':');
    let version = words.find_map(|w| {
        let v = w.rsplit('/').next()?.trim_start_matches('v');
        let v = v.split(['-', '+']).next()?;
        v.starts_with(|c: char| c.is_ascii_digit()).then_some(v)
    });
    match version {
        Some(v) => format!("{name} {v}"),
        None => line.to_string(),
    }
}

/// Where the run was taken, in one sentence.
fn taken(r: &Results) -> String {
    let c = &r.context;
    let tools: Vec<String> = c.tools.iter().map(|t| short_tool(t)).collect();
    format!(
        "{} (tree {}), Linux {}, {} CPUs ({}); {} repetitions × {} s per load and mode, modes \
         interleaved; {}",
        c.date,
        c.revision,
        c.kernel,
        c.cpus,
        c.cpu_model,
        c.reps,
        c.seconds,
        tools.join(", ")
    )
}

/// The other load, and whether it voids the throughput goals (as in the report).
fn other_load(r: &Results) -> String {
    let most = r.summary.iter().map(|s| s.foreign_cpus).fold(0.0, f64::max);
    let mut s = format!(
        "Other users' processes used at most {most:.2} CPU during a load and mode (median over \
         the repetitions)."
    );
    let median = report::other_load(&r.runs);
    if median > CONTENDED {
        let _ = write!(
            s,
            " **Contended run**: a median {median:.2} CPU during the wrk runs; the throughput \
             goals are not judged."
        );
    }
    s
}

fn xdp_sentence(r: &Results) -> Option<String> {
    let x = r.xdp.as_ref()?;
    Some(format!(
        "The XDP program takes {:.1} ns per established packet (program time: the kernel's \
         {:.1} ns per run less the empty program's {:.1} ns) and {:.1} ns per new flow ({:.1} ns \
         with conntrack full).",
        x.established_repeat_ns - x.empty_repeat_ns,
        x.established_repeat_ns,
        x.empty_repeat_ns,
        x.new_flow_ns,
        x.new_flow_full_ns
    ))
}

/// Which row the goals are judged on.
fn judged_on(r: &Results) -> String {
    if r.summary.iter().any(|s| s.mode == Mode::XlbDefault) {
        format!(
            "The goals are judged on the row \"{}\" (interfaces, VIPs and backend addresses, \
             nothing else), listed first for each load; the tuned rows (\"{}\", \"{}\") stand \
             beside it.",
            Mode::XlbDefault.name(),
            Mode::Xlb.name(),
            Mode::XlbTc.name()
        )
    } else {
        "This run predates the row \"xlb, default config\": its goals were judged on the better \
         of the tuned rows."
            .into()
    }
}

/// Each load's rows with the default config first, the others in their usual order.
fn default_first(summary: &[Summary]) -> Vec<Summary> {
    let mut rows = summary.to_vec();
    // Stable: only the default-config row moves, to the front of its load's rows.
    rows.sort_by_key(|s| {
        let load = load::ALL.iter().position(|l| *l == s.load);
        (load, s.mode != Mode::XlbDefault)
    });
    rows
}

fn readme(r: &Results) -> String {
    let mut s = format!("Latest full run: {}. {}\n\n", taken(r), other_load(r));
    s.push_str(
        "![throughput of each mode relative to direct, median with min–max](docs/bench-ratios.svg)\n\n",
    );
    let _ = writeln!(s, "{}\n", judged_on(r));
    let _ = writeln!(s, "{}", goals_table(&r.goals));
    let _ = writeln!(s, "{}", throughput_table(&default_first(&r.summary)));
    if let Some(x) = xdp_sentence(r) {
        let _ = writeln!(s, "{x}");
    }
    s
}

fn benchmarks(r: &Results) -> String {
    let mut s = format!(
        "Taken with `cargo xtask bench` on {}. {} Every run, summary and microbenchmark is in \
         [bench-results.json](bench-results.json).\n\n",
        taken(r),
        other_load(r)
    );
    let _ = writeln!(s, "### Goals\n\n{}", goals_table(&r.goals));
    let _ = writeln!(s, "### Throughput\n\n{}", throughput_table(&r.summary));
    if let Some(x) = &r.xdp {
        let _ = writeln!(
            s,
            "### The XDP and TC programs (BPF_PROG_TEST_RUN)\n\n{}",
            xdp_table(x)
        );
    }
    if !r.flood_summary.is_empty() {
        let _ = writeln!(
            s,
            "### Under a flood\n\n{}",
            crate::flood::table(&r.flood_summary)
        );
    }
    if !r.profile.is_empty() {
        let _ = writeln!(
            s,
            "### xlb's programs in this traffic (BPF run-time stats)\n\n{}",
            profile_table(&r.profile)
        );
    }
    if !r.maglev.is_empty() {
        let _ = writeln!(s, "### Maglev\n\n{}", maglev_table(&r.maglev));
    }
    s
}

/// The lines of `text` between the marker lines (the markers excluded), and their range.
fn find(text: &str) -> Result<(usize, usize)> {
    let mut begin = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if begin.is_none() && trimmed.starts_with(BEGIN) {
            begin = Some(offset + line.len());
        } else if trimmed == END {
            let Some(begin) = begin else {
                bail!("`{END}` before `{BEGIN} …`");
            };
            return Ok((begin, offset));
        }
        offset += line.len();
    }
    bail!("no `{BEGIN} … -->` … `{END}` lines")
}

/// `text` with its section replaced by `section` (and the begin marker by the standard one).
pub fn splice(text: &str, section: &str) -> Result<String> {
    let (begin, end) = find(text)?;
    let marker = text[..begin].rfind(BEGIN).expect("find() saw it");
    Ok(format!(
        "{}{BEGIN_LINE}\n{section}{}",
        &text[..marker],
        &text[end..]
    ))
}

/// `xlb-bench --update-docs [--from DIR]`: with `from`, makes that run's results.json and
/// ratios.svg the last full run's (refused unless it is one); then rewrites every file's
/// section from docs/bench-results.json. Returns the files that changed.
pub fn update_docs(from: Option<&Path>) -> Result<Vec<String>> {
    let root = workspace();
    if let Some(dir) = from {
        let results = load(&dir.join("results.json"))?;
        if let Some(why) = not_full(&results) {
            bail!(
                "{} is not a full run ({why}): the docs keep quoting the last full one",
                dir.display()
            );
        }
        std::fs::copy(dir.join("results.json"), root.join(RESULTS))?;
        std::fs::copy(dir.join("ratios.svg"), root.join(CHART))?;
    }
    let results = load(&root.join(RESULTS))?;
    let mut changed = Vec::new();
    for (file, section) in sections(&results) {
        let path = root.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let new = splice(&text, &section).with_context(|| format!("in {file}"))?;
        if new != text {
            std::fs::write(&path, new)?;
            changed.push(file.to_string());
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated section `text` holds now.
    fn current(text: &str) -> Result<&str> {
        let (begin, end) = find(text)?;
        Ok(&text[begin..end])
    }

    #[test]
    fn readme_and_docs_quote_the_last_full_run() {
        let root = workspace();
        let results = load(&root.join(RESULTS)).expect("the last full run's results");
        // Until the next full run, the committed one predates the default-config row.
        let predates = !results.summary.iter().any(|s| s.mode == Mode::XlbDefault);
        let why = not_full(&results).filter(|why| {
            !(predates
                && why.starts_with("not run: ")
                && why.matches(" through ").count() == why.matches(Mode::XlbDefault.name()).count())
        });
        assert_eq!(why, None, "{RESULTS} must hold a full run");
        for (file, want) in sections(&results) {
            let text = std::fs::read_to_string(root.join(file)).expect(file);
            let got = current(&text).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            if got != want {
                let line = got
                    .lines()
                    .zip(want.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.lines().count().min(want.lines().count()));
                panic!(
                    "{file}'s benchmark section is not what {RESULTS} gives (first difference in \
                     its line {}):\n  has:  {}\n  want: {}\nrun `cargo xtask readme`",
                    line + 1,
                    got.lines().nth(line).unwrap_or("(end)"),
                    want.lines().nth(line).unwrap_or("(end)")
                );
            }
        }
    }

    #[test]
    fn splice_replaces_only_the_section() {
        let text = "# a\n\n<!-- bench:begin anything -->\nold\nlines\n<!-- bench:end -->\nafter\n";
        let new = splice(text, "new\n").unwrap();
        assert_eq!(
            new,
            format!("# a\n\n{BEGIN_LINE}\nnew\n<!-- bench:end -->\nafter\n")
        );
        assert_eq!(current(&new).unwrap(), "new\n");
        assert_eq!(splice(&new, "new\n").unwrap(), new);
        assert!(current("no markers\n").is_err());
        assert!(current("<!-- bench:end -->\n<!-- bench:begin -->\n").is_err());
        assert!(current("<!-- bench:begin -->\nnever closed\n").is_err());
    }

    #[test]
    fn a_partial_run_is_not_published() {
        let full = load(&workspace().join(RESULTS)).expect("the last full run's results");
        let mut quick = full.clone();
        quick.context.quick = true;
        assert!(not_full(&quick).is_some());
        let mut partial = full.clone();
        partial.summary.retain(|s| s.mode != Mode::XlbDsr);
        let why = not_full(&partial).expect("a mode is missing");
        assert!(why.contains("xlb, dsr"), "{why}");
        let mut no_micro = full;
        no_micro.xdp = None;
        assert!(not_full(&no_micro).is_some());
    }

    #[test]
    fn tool_versions_are_shortened() {
        for (line, want) in [
            ("nginx version: nginx/1.22.1", "nginx 1.22.1"),
            (
                "HAProxy version 2.6.12-1+deb12u1 2023/12/16 - https://haproxy.org/",
                "HAProxy 2.6.12",
            ),
            (
                "wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer",
                "wrk 4.1.0",
            ),
            ("nftables v1.0.6 (Lester Gooch #5)", "nftables 1.0.6"),
            (
                "wrk: No such file or directory",
                "wrk: No such file or directory",
            ),
        ] {
            assert_eq!(short_tool(line), want);
        }
    }
}
