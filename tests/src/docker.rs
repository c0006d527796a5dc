//! Docker hosts for discovery tests: a network namespace with its own containerd and dockerd,
//! wired like the netns topology (see ../shared/notes/swarm-in-netns.md and
//! docker-delivery.md):
//!
//! ```text
//! client ns (10.99.1.2) --veth-- host ns (10.99.1.1, "front"; dockerd, docker0 172.17.K.1/24)
//! ```
//!
//! The xlb agent under test runs in the host namespace (`DockerHost::host.command(..)`) and
//! talks to `DockerHost::endpoint()`.
//!
//! How a daemon is started ([`Daemon`]), and why:
//! - Never with `ip netns exec`: it remounts /sys, so /sys/fs/cgroup is empty and runc fails.
//!   `nsenter --net` + `unshare --mount --uts --propagation slave` runs a script that mounts a
//!   sysfs of the node's netns, binds the cgroup tree (and bpffs) back, puts private tmpfs over
//!   /run/containerd, /run/docker and /etc/docker, sets the hostname and execs containerd.
//!   dockerd then joins containerd's namespaces with `nsenter --target`. Propagation `slave`
//!   makes `ip netns del` elsewhere reach our copy of /run/netns, so no netns is pinned.
//! - Each daemon has its own containerd (own root, state, sockets; CRI plugin off), its own
//!   data-root, exec-root, pidfile, socket, cgroup parent and bridge subnet, so several can run
//!   in one test process.
//! - Everything is undone on drop, also on panic: containers removed, dockerd then containerd
//!   stopped by PID, any leftover process of the daemon (shims, containers of a killed
//!   dockerd) killed by PID (found through the daemon's private mount namespace and cgroup
//!   parent), cgroups removed; the mounts die with the mount namespace; then the netns and the
//!   scratch directory go.
//!
//! The image `xlb-test-backend:latest` is built `FROM scratch` around the static (musl) test
//! backend, saved once to a tarball under `target/xlb-test-image/` (rebuilt when the binary
//! changes) and loaded into every daemon; nothing is ever pulled.
//!
//! Layout: `docker/daemon.rs` starts and talks to one containerd + dockerd, `cleanup.rs` removes what a
//! daemon left and checks that nothing is left, `image.rs` builds the test images, `host.rs` is
//! the Docker host topology, and `faults.rs` a proxy in front of a daemon's socket that fails
//! chosen requests.
mod cleanup;
mod daemon;
pub mod faults;
mod host;
mod image;

use std::{
    io::Read as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

pub use cleanup::{LeakCheck, MountNs};
pub use daemon::{Daemon, DaemonOptions, DaemonTimings};
pub use host::DockerHost;
pub use image::backend_binary;

/// The test backend image: ENTRYPOINT runs `xlb-test-backend --http 0.0.0.0:8080 --tcp
/// 0.0.0.0:9000 --udp 0.0.0.0:8080 --linger 2000`; arguments after the image name are appended
/// (`--log`, `--name N`, `--start-delay MS`). It answers with its name, by default its hostname,
/// that is the short container id (or the task name for [`crate::swarm`] services).
pub const IMAGE: &str = "xlb-test-backend:latest";
/// The same with a Docker HEALTHCHECK (exec form, `xlb-test-backend --probe 127.0.0.1:8080`,
/// every 1 s, timeout 1 s, 2 retries): healthy about 1 s after start.
pub const HEALTH_IMAGE: &str = "xlb-test-backend:health";
pub const HTTP_PORT: u16 = 8080;
pub const TCP_PORT: u16 = 9000;
pub const UDP_PORT: u16 = 8080;

/// The Docker host's interface towards the client (XDP attaches here), as in the topology.
pub use crate::topology::{CLIENT_ADDR, FRONT, FRONT_ADDR};

/// Upper bound of one docker CLI call.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Commands with a time bound

/// Runs `cmd` to completion with its stdout and stderr captured; kills it (our own child, by
/// its handle) after `timeout`. Ok(stdout) on success, Err(a description with both streams).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {desc}: {e}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let out = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("{desc} failed ({s}):\n{out}{err}")),
        None => Err(format!("{desc} timed out after {timeout:?}:\n{out}{err}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch directories

/// A directory removed (recursively) on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
