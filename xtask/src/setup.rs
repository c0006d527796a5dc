//! `cargo xtask setup`: installs what building and testing need, skipping whatever is there.
//! Safe to run again: each step checks first.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{capture, run, step};

/// Debian packages the tests and the demo use. The Docker and Swarm tests
/// (tests/src/docker.rs, swarm.rs) run their own containerd and dockerd per network namespace:
/// docker.io brings dockerd, the CLI, containerd, runc and tini; iptables is what dockerd
/// programs (and the health-probe stopgap uses); docker-compose is v1; util-linux has nsenter,
/// unshare and mountpoint; bird2 is the BGP speaker of the LB-failover test
/// (tests/src/remote.rs); the tests filter with nft; chromium (headless) loads the status
/// page in tests/tests/page.rs.
pub const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "bpftool",
    "util-linux",
    "procps",
    "docker.io",
    "docker-compose",
    "containerd",
    "runc",
    "iptables",
    "bird2",
    "nftables",
    "chromium",
];

/// What `cargo xtask bench` adds: the load generator, the backends' server and the two
/// peers xlb is compared with.
pub const BENCH_PACKAGES: &[&str] = &["wrk", "nginx", "haproxy", "nftables"];

pub fn setup(packages: &[&str]) -> Result<()> {
    require_root()?;
    nightly()?;
    bpf_linker()?;
    musl_target()?;
    apt(packages)?;
    step("setup complete");
    Ok(())
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run this as root: it loads BPF programs and creates network namespaces");
    }
    Ok(())
}

/// The nightly toolchain with rust-src builds the BPF crate (build-std=core).
fn nightly() -> Result<()> {
    let toolchains = capture(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("nightly toolchain: present");
    } else {
        step("nightly toolchain: installing");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src: present");
    } else {
        step("rust-src: installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The test image for the Docker tests is built FROM scratch around a static test backend:
/// `cargo build --release -p test-backend --target x86_64-unknown-linux-musl`.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The musl target of the default toolchain (for the static test backend).
fn musl_target() -> Result<()> {
    let targets = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if targets.lines().any(|l| l.trim() == MUSL_TARGET) {
        step(&format!("{MUSL_TARGET} target: present"));
    } else {
        step(&format!("{MUSL_TARGET} target: installing"));
        run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    Ok(())
}

/// Where bpf-linker finds the nightly's LLVM for good (its RUNPATH points here).
fn llvm_prefix() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".local/share/xlb/llvm")
}

/// bpf-linker built against the nightly's own LLVM: crates.io's default wants a newer LLVM
/// than this machine has, and the nightly ships a libLLVM we can link to.
fn bpf_linker() -> Result<()> {
    let sysroot = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let version = capture(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc does not report its LLVM version")?
        .to_string();
    let prefix = llvm_prefix();
    let stamp = prefix.join("llvm-major");
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == major) {
        step(&format!("bpf-linker (LLVM {major}): present"));
        return Ok(());
    }
    step(&format!(
        "bpf-linker: building against the nightly's LLVM {major} (about a minute)"
    ));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let nightly_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&nightly_lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", nightly_lib.display()))?;
    std::fs::copy(nightly_lib.join(&libllvm), lib.join(&libllvm))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    run(Command::new("cargo")
        .args([
            "install",
            "--locked",
            "--force",
            "bpf-linker",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))?;
    std::fs::write(&stamp, &major)?;
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step(&format!(
            "Debian packages: present ({})",
            packages.join(" ")
        ));
        return Ok(());
    }
    step(&format!(
        "Debian packages: installing {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}
