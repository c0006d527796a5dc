//! `cargo xtask setup|build|run|test|fuzz|demo|soak|bench|readme|image`: the project's one-command workflows. This crate
//! depends on nothing that needs BPF tooling, so it builds on a fresh machine and installs
//! that tooling itself.
mod fuzz;
mod setup;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "xlb developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the nightly toolchain, bpf-linker and the Debian packages (idempotent).
    Setup,
    /// Set up, then build everything.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the agent as root: `cargo xtask run -- --config F`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run every test (unit, BPF, netns) as root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Coverage-guided fuzzing (cargo-fuzz, nightly) of the config and label parsers: each
    /// target for N seconds; fails on a crash. Installs cargo-fuzz if missing.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Set up, build, and show xlb balancing a netns sandbox live.
    Demo {
        /// Seconds of traffic before the demo ends by itself.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Set up, build, and soak the agent: steady TCP and UDP load while, every minute, the
    /// agent is restarted and killed, backends killed, drained, removed and re-added, and
    /// containers run, stopped and killed; writes a markdown report and fails on a request
    /// failed outside the documented windows or on the agent's RSS or fds growing more than
    /// 10 %.
    Soak {
        /// Length of the soak (each minute runs every step once).
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Where the report goes (default: docs/soak.md for a run of 10 minutes or more,
        /// target/soak.md otherwise).
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Build the container images xlb:latest and xlb-test-backend:latest (FROM scratch,
    /// static binaries) in the local Docker daemon.
    Image,
    /// Set up (with wrk, nginx, HAProxy, nftables), build in release, and benchmark xlb
    /// against direct routing, nft DNAT and HAProxy; writes target/bench/. A full run (no
    /// --quick, no extra arguments) then becomes the one docs/ and the README quote.
    Bench {
        /// Smoke run: every mode and load for 1 s (for CI; not for comparison).
        #[arg(long)]
        quick: bool,
        /// Extra arguments for xlb-bench (see `target/release/xlb-bench --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Rewrite the benchmark sections of README.md and docs/benchmarks.md from the last full
    /// run's results (docs/bench-results.json).
    Readme,
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::setup(setup::TEST_PACKAGES),
        Task::Build { release } => {
            setup::setup(setup::TEST_PACKAGES)?;
            build(release)
        }
        Task::Run { args } => {
            setup::setup(setup::TEST_PACKAGES)?;
            build(false)?;
            let status = Command::new(target_dir()?.join("debug/xlb"))
                .arg("run")
                .args(args)
                .status()?;
            if !status.success() {
                bail!("xlb exited with {status}");
            }
            Ok(())
        }
        Task::Test { args } => {
            setup::setup(setup::TEST_PACKAGES)?;
            build(false)?;
            build_static()?;
            step("running all tests");
            run(cargo()
                .args(["test", "--workspace", "--exclude", "lb-ebpf"])
                .args(args))
        }
        Task::Fuzz { seconds } => {
            setup::setup(setup::TEST_PACKAGES)?;
            fuzz::fuzz(seconds)
        }
        Task::Demo { seconds } => {
            setup::setup(setup::TEST_PACKAGES)?;
            build(false)?;
            step("starting the demo (Ctrl-C ends it and removes everything)");
            run(Command::new(target_dir()?.join("debug/xlb-demo"))
                .args(["--seconds", &seconds.to_string()]))
        }
        Task::Soak { minutes, report } => soak(minutes, report),
        Task::Bench { quick, args } => bench(quick, &args),
        Task::Readme => run(cargo().args(["run", "-q", "-p", "xlb-bench", "--", "--update-docs"])),
        Task::Image => {
            setup::setup(setup::TEST_PACKAGES)?;
            build_static()?;
            image()
        }
    }
}

const MUSL: &str = "x86_64-unknown-linux-musl";

/// The static binaries that go into the images (the Docker tests build images from them).
fn build_static() -> Result<()> {
    step("building the static (musl) xlb and test backend");
    run(cargo().args([
        "build",
        "--release",
        "--target",
        MUSL,
        "-p",
        "lb-userspace",
        "-p",
        "test-backend",
    ]))
}

/// `docker build` of both images from deploy/ and the static binaries.
fn image() -> Result<()> {
    let bin = target_dir()?.join(MUSL).join("release");
    let context = target_dir()?.join("image-context");
    for (tag, dockerfile, binary) in [
        ("xlb:latest", "Dockerfile", "xlb"),
        (
            "xlb-test-backend:latest",
            "test-backend.Dockerfile",
            "xlb-test-backend",
        ),
    ] {
        step(&format!("docker build {tag}"));
        let _ = std::fs::remove_dir_all(&context);
        std::fs::create_dir_all(&context)?;
        std::fs::copy(bin.join(binary), context.join(binary))?;
        std::fs::copy(
            workspace_root().join("deploy").join(dockerfile),
            context.join("Dockerfile"),
        )?;
        run(Command::new("docker")
            .args(["build", "-t", tag])
            .arg(&context)
            .env("DOCKER_BUILDKIT", "0"))?;
    }
    Ok(())
}

/// `cargo xtask soak`: the ignored test tests/tests/soak.rs, told the length and the report
/// path through the environment.
fn soak(minutes: u64, report: Option<PathBuf>) -> Result<()> {
    setup::setup(setup::TEST_PACKAGES)?;
    build(false)?;
    let report = report.unwrap_or_else(|| {
        let default = if minutes >= 10 {
            "docs/soak.md"
        } else {
            "target/soak.md"
        };
        PathBuf::from(default)
    });
    // Relative to where xtask was started (cargo runs the test from tests/).
    let report = std::env::current_dir()?.join(report);
    step(&format!(
        "soaking for {minutes} minutes; report: {}",
        report.display()
    ));
    run(cargo()
        .args(["test", "-p", "xlb-tests", "--test", "soak", "--"])
        .args(["--ignored", "--nocapture", "--exact", "soak"])
        .env("XLB_SOAK_MINUTES", minutes.to_string())
        .env("XLB_SOAK_REPORT", &report))
}

/// `cargo xtask bench`: criterion's Maglev benches, then xlb-bench (netns loads and the XDP
/// microbenchmark), both from a release build.
fn bench(quick: bool, args: &[String]) -> Result<()> {
    let packages = [setup::TEST_PACKAGES, setup::BENCH_PACKAGES].concat();
    setup::setup(&packages)?;
    build(true)?;
    step("Maglev table build (criterion)");
    let mut criterion = cargo();
    criterion.args(["bench", "-p", "lb-userspace", "--bench", "maglev", "--"]);
    if quick {
        criterion.args(["--warm-up-time", "0.2", "--measurement-time", "0.5"]);
    }
    run(criterion.env("CARGO_TARGET_DIR", target_dir()?))?;
    step("xlb-bench (Ctrl-C stops it and removes everything it made)");
    let mut cmd = Command::new(target_dir()?.join("release/xlb-bench"));
    if quick {
        cmd.arg("--quick");
    }
    cmd.args(args);
    // Ctrl-C reaches xlb-bench too; wait for it to clean up instead of dying first.
    // SAFETY: setting a signal disposition; restored below.
    let old = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let outcome = run(&mut cmd);
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGINT, old) };
    outcome?;
    // Only a default full run replaces the one the docs quote.
    if quick || !args.is_empty() {
        return Ok(());
    }
    step("publishing the run: docs/bench-results.json, docs/bench-ratios.svg, README.md");
    run(Command::new(target_dir()?.join("release/xlb-bench"))
        .arg("--update-docs")
        .arg("--from")
        .arg(target_dir()?.join("bench")))
}

/// Builds every crate the tests and the demo run (the BPF object through build.rs).
fn build(release: bool) -> Result<()> {
    step("building");
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--exclude", "lb-ebpf", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> Result<PathBuf> {
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target")))
}

/// Prints a progress line.
pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Runs a command, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
