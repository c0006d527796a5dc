//! Network namespaces owned by a test: created on construction, deleted on drop (also when the
//! test panics). Processes are started inside with setns in the child before exec, and
//! sockets are made inside by running a closure on a thread that entered the namespace.
use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// Runs a command to completion; panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth pair: `a_if` in `a` and `b_if` in `b`, both down, with `mtu` on both if given.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str, mtu: Option<&str>) {
    let mut args = vec!["ip", "link", "add", a_if, "netns", &a.name];
    args.extend(mtu.iter().flat_map(|m| ["mtu", *m]));
    args.extend(["type", "veth", "peer", "name", b_if, "netns", &b.name]);
    args.extend(mtu.iter().flat_map(|m| ["mtu", *m]));
    sh(&args);
}

/// A short prefix unique to this process and call, for namespace and interface names
/// (interface names are limited to 15 bytes).
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = std::process::id() * 64 + NEXT.fetch_add(1, Ordering::Relaxed);
    let mut s = String::from("x");
    let mut v = n % (36 * 36 * 36 * 36);
    for _ in 0..4 {
        s.push(char::from_digit(v % 36, 36).expect("digit"));
        v /= 36;
    }
    s
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        // A leftover from a crashed run of the same name would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", name]);
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a program inside the namespace (network only; mounts stay the host's, so
    /// /sys/fs/bpf is shared) and waits for it.
    pub fn exec(&self, args: &[&str]) -> String {
        let net = format!("--net={}", self.path());
        let mut full = vec!["nsenter", &net, "--"];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// Turns TX checksum offload off, so packets carry full checksums that the receiver
    /// verifies (with offload on, veth hands over unverified CHECKSUM_PARTIAL packets).
    pub fn no_tx_offload(&self, interface: &str) {
        self.exec(&["ethtool", "-K", interface, "tx", "off"]);
    }

    /// A command that will start inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let ns = File::open(self.path()).expect("open netns");
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open until after exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread inside this namespace: sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// Moves the calling thread into the namespace at `path` (only this thread).
pub fn enter(path: &str) {
    let ns = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd; affects the calling thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("setns {path}: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes its interfaces and detaches their programs.
        let ok = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok && !std::thread::panicking() {
            panic!("could not delete netns {}", self.name);
        }
    }
}
