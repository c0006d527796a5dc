//! iproute2's `ip`, for the few host settings the agent and `xlb decap` make (a VIP on lo,
//! announcement routes): each is one command an operator can also read and run.
use std::process::{Command, Output};

use anyhow::{Context as _, Result, bail};

/// Runs `ip ARGS`; fails only if it cannot be started.
pub fn run(args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")
}

/// Runs `ip ARGS`; its stdout, or an error with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
