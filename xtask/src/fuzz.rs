//! `cargo xtask fuzz [--seconds N]`: coverage-guided fuzzing (cargo-fuzz, libFuzzer) of the
//! parsers fed by operators and containers: each target of fuzz/ for N seconds, from the
//! seeds in fuzz/seeds/ plus what earlier runs found (fuzz/corpus/, not committed). Fails on
//! the first crash; libFuzzer leaves the input in fuzz/artifacts/TARGET/.
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{run, step, workspace_root};

/// The fuzz targets (fuzz/fuzz_targets/*.rs).
pub const TARGETS: &[&str] = &["config", "labels"];

pub fn fuzz(seconds: u64) -> Result<()> {
    cargo_fuzz()?;
    let root = workspace_root();
    for target in TARGETS {
        step(&format!("fuzzing {target} for {seconds} s"));
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        run(nightly_cargo()
            .current_dir(&root)
            // The code under test is safe Rust: a panic is what we look for, and without
            // AddressSanitizer the build and the run take a fraction of the CPU.
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .args(["--", &format!("-max_total_time={seconds}"), "-timeout=10"]))?;
    }
    step("fuzzing: no crash");
    Ok(())
}

/// `cargo +nightly`, free of the variables the outer cargo set for its own toolchain.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly");
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// cargo-fuzz from crates.io, unless it is there.
fn cargo_fuzz() -> Result<()> {
    let present = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step("cargo-fuzz: installing from crates.io");
    run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
}
