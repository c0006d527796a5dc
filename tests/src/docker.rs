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
use std::{
    collections::hash_map::DefaultHasher,
    fs::File,
    hash::{Hash as _, Hasher as _},
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    netns::{Netns, sh, unique_prefix},
    process::{Proc, wait_for},
};

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

const MUSL: &str = "x86_64-unknown-linux-musl";

const DOCKERFILE: &str = r#"FROM scratch
COPY xlb-test-backend /xlb-test-backend
ENTRYPOINT ["/xlb-test-backend", "--http", "0.0.0.0:8080", "--tcp", "0.0.0.0:9000", "--udp", "0.0.0.0:8080", "--linger", "2000"]
"#;

// Scratch has no shell: HEALTHCHECK must be the exec form, with the backend's own probe mode.
const DOCKERFILE_HEALTH: &str = r#"FROM xlb-test-backend:latest
HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD ["/xlb-test-backend", "--probe", "127.0.0.1:8080"]
"#;

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
// The static test backend and the image

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Newest modification time of the test backend's sources.
fn backend_sources_mtime() -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(Some(m));
            }
        }
    }
    let mut newest = None;
    walk(&workspace_root().join("test-backend"), &mut newest);
    newest
}

/// The static (musl) test backend that goes into the image:
/// `cargo build --release -p test-backend --target x86_64-unknown-linux-musl` (`cargo xtask
/// setup` adds the target), run at most once per test process, and only when the binary is
/// missing or older than a file under test-backend/ (a nested cargo may wait a long time for
/// the target dir's lock while another build runs). `XLB_TEST_BACKEND_MUSL=PATH` uses PATH.
pub fn backend_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("XLB_TEST_BACKEND_MUSL") {
            return PathBuf::from(path);
        }
        let bin = target_dir().join(MUSL).join("release/xlb-test-backend");
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        if built.is_some() && built >= backend_sources_mtime() {
            return bin;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run_bounded(
            Command::new(cargo).current_dir(workspace_root()).args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "test-backend",
                "--target",
                MUSL,
            ]),
            Duration::from_secs(900),
        )
        .unwrap_or_else(|e| {
            panic!("building the static test backend (rustup target add {MUSL}?): {e}")
        });
        bin
    })
}

/// Hash of everything that goes into the images: the binary and the Dockerfiles.
fn image_hash() -> u64 {
    let bin = backend_binary();
    let bytes = std::fs::read(bin).unwrap_or_else(|e| panic!("reading {}: {e}", bin.display()));
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    DOCKERFILE.hash(&mut h);
    DOCKERFILE_HEALTH.hash(&mut h);
    h.finish()
}

/// Gives `daemon` both test images: loads the cached tarball, or builds the images in this
/// daemon (`DOCKER_BUILDKIT=0 docker build` from a temp context) and saves the tarball for
/// the next daemons. Serialised within the process and, with flock, across processes.
fn provide_images(daemon: &Daemon) {
    static LOCK: Mutex<()> = Mutex::new(());
    let started = Instant::now();
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = target_dir().join("xlb-test-image");
    std::fs::create_dir_all(&cache).expect("image cache dir");
    let lock = File::create(cache.join("lock")).expect("image cache lock");
    // SAFETY: flock on a file we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!("flock: {}", std::io::Error::last_os_error());
    }
    let name = format!("xlb-test-backend-{:016x}.tar", image_hash());
    let tarball = cache.join(&name);
    if tarball.exists() {
        drop(lock);
        drop(guard);
        daemon.docker(&["load", "-q", "-i", tarball.to_str().expect("utf-8")]);
        eprintln!("[{}] images loaded in {:?}", daemon.name, started.elapsed());
        return;
    }
    let ctx = daemon.dir.join("image-context");
    std::fs::create_dir_all(&ctx).expect("image context");
    std::fs::copy(backend_binary(), ctx.join("xlb-test-backend")).expect("copy backend");
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
    std::fs::write(ctx.join("Dockerfile.health"), DOCKERFILE_HEALTH).expect("Dockerfile");
    let ctx_s = ctx.to_str().expect("utf-8");
    daemon.docker(&["build", "-q", "-t", IMAGE, ctx_s]);
    let health = ctx.join("Dockerfile.health");
    daemon.docker(&[
        "build",
        "-q",
        "-f",
        health.to_str().expect("utf-8"),
        "-t",
        HEALTH_IMAGE,
        ctx_s,
    ]);
    let tmp = cache.join(format!("{name}.tmp"));
    daemon.docker(&[
        "save",
        "-o",
        tmp.to_str().expect("utf-8"),
        IMAGE,
        HEALTH_IMAGE,
    ]);
    for entry in std::fs::read_dir(&cache).expect("read cache").flatten() {
        let old = entry.file_name().to_string_lossy().into_owned();
        if old.starts_with("xlb-test-backend-") && old.ends_with(".tar") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    std::fs::rename(&tmp, &tarball).expect("rename tarball");
    let _ = std::fs::remove_dir_all(&ctx);
    eprintln!(
        "[{}] images built and saved in {:?}",
        daemon.name,
        started.elapsed()
    );
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

// ---------------------------------------------------------------------------------------------
// One containerd + dockerd in a network namespace

/// How a daemon is configured.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    /// `live-restore`: containers keep running while dockerd is stopped and are adopted when it
    /// starts again. Without it, stopping dockerd stops the containers (SIGTERM, so the backend
    /// lingers 2 s) and they stay stopped. Docker refuses it in swarm mode.
    pub live_restore: bool,
    /// `--bridge none`: no docker0 (Swarm nodes, whose tasks use an overlay network).
    pub no_bridge: bool,
}

/// How long the steps of a daemon's start took (printed, and kept for reports).
#[derive(Clone, Debug, Default)]
pub struct DaemonTimings {
    pub containerd: Duration,
    pub dockerd: Duration,
}

/// A containerd and a dockerd of their own in a network namespace, in a private mount and UTS
/// namespace (hostname = `name`). Dropping it removes its containers and stops both daemons.
pub struct Daemon {
    /// Hostname, and the name in logs.
    pub name: String,
    /// Everything of this daemon lives here: configs, data-root, exec-root, sockets, logs.
    pub dir: PathBuf,
    /// dockerd's API socket.
    pub socket: PathBuf,
    /// The default bridge's gateway (`--bip`), unless `no_bridge`.
    pub bip: Option<String>,
    pub options: DaemonOptions,
    pub timings: DaemonTimings,
    netns_path: String,
    cgroup_parent: String,
    containerd: Option<Proc>,
    dockerd: Option<Proc>,
    /// The private mount namespace: every process in it is ours. The open file pins the
    /// namespace, so its `mnt:[inode]` cannot be reused by another one while we compare.
    mount_ns: Option<MountNs>,
    dockerd_starts: u32,
}

/// Gives each daemon of the process distinct subnets and cgroup names.
static DAEMON_SEQ: AtomicU32 = AtomicU32::new(0);

impl Daemon {
    /// Starts containerd and dockerd in `ns`, waits (bounded) until dockerd answers, and loads
    /// the test images.
    pub fn start(ns: &Netns, name: &str, dir: PathBuf, options: DaemonOptions) -> Daemon {
        let seq = DAEMON_SEQ.fetch_add(1, Ordering::Relaxed);
        std::fs::create_dir_all(dir.join("containerd")).expect("daemon dir");
        std::fs::create_dir_all(dir.join("cli")).expect("daemon dir");
        // Distinct per daemon (each is in its own netns anyway, so overlaps would not matter).
        let bip = (!options.no_bridge).then(|| format!("172.17.{}.1/24", seq % 254 + 1));
        let mut daemon = Daemon {
            name: name.into(),
            socket: dir.join("docker.sock"),
            dir,
            bip,
            options,
            timings: DaemonTimings::default(),
            netns_path: ns.path(),
            cgroup_parent: format!("/xlb-test-{name}"),
            containerd: None,
            dockerd: None,
            mount_ns: None,
            dockerd_starts: 0,
        };
        daemon.write_configs(seq);
        daemon.start_containerd();
        daemon.start_dockerd();
        provide_images(&daemon);
        daemon
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).to_str().expect("utf-8").to_string()
    }

    fn write_configs(&self, seq: u32) {
        let d = |rel: &str| self.path(rel);
        let containerd = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{}\"\n",
            d("containerd/root"),
            d("containerd/state"),
            d("containerd/containerd.sock"),
            d("containerd/containerd.sock.ttrpc"),
            d("containerd/opt"),
        );
        std::fs::write(self.dir.join("containerd.toml"), containerd).expect("containerd.toml");

        let mut config = serde_json::json!({
            "cgroup-parent": self.cgroup_parent,
            "live-restore": self.options.live_restore,
            // Networks compose and `docker network create` make; Swarm's docker_gwbridge too.
            "default-address-pools": [
                {"base": format!("172.{}.0.0/16", 18 + seq % 14), "size": 24}
            ],
        });
        match &self.bip {
            Some(bip) => config["bip"] = bip.clone().into(),
            None => config["bridge"] = "none".into(),
        }
        std::fs::write(self.dir.join("daemon.json"), config.to_string()).expect("daemon.json");

        // First process of the daemon's own mount and UTS namespaces (see the module doc).
        let script = format!(
            r#"set -eu
dir='{dir}'
mkdir -p "$dir/aside/cgroup" "$dir/aside/bpf"
mount --rbind /sys/fs/cgroup "$dir/aside/cgroup"
bpf=0
if mountpoint -q /sys/fs/bpf; then mount --rbind /sys/fs/bpf "$dir/aside/bpf"; bpf=1; fi
mount -t sysfs sysfs /sys
mount --rbind "$dir/aside/cgroup" /sys/fs/cgroup
umount -R "$dir/aside/cgroup"
if [ "$bpf" = 1 ]; then
  mount --rbind "$dir/aside/bpf" /sys/fs/bpf
  umount -R "$dir/aside/bpf"
fi
mkdir -p /run/containerd /run/docker
mount -t tmpfs -o mode=0711 tmpfs /run/containerd
mount -t tmpfs -o mode=0700 tmpfs /run/docker
if [ -d /etc/docker ]; then mount -t tmpfs -o mode=0755 tmpfs /etc/docker; fi
hostname '{name}'
exec containerd --config "$dir/containerd.toml"
"#,
            dir = self.dir.display(),
            name = self.name,
        );
        std::fs::write(self.dir.join("start.sh"), script).expect("start.sh");
    }

    fn start_containerd(&mut self) {
        let started = Instant::now();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path))
            .args([
                "--",
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "slave",
            ])
            .args(["--", "sh"])
            .arg(self.dir.join("start.sh"));
        let mut proc = Proc::spawn("containerd", cmd, self.dir.join("containerd.log"));
        let sock = self.dir.join("containerd/containerd.sock");
        let up = wait_for(Duration::from_secs(20), || {
            if !proc.is_running() {
                panic!("[{}] containerd exited:\n{}", self.name, proc.log_text());
            }
            UnixStream::connect(&sock).ok().map(|_| ())
        });
        if up.is_none() {
            panic!(
                "[{}] containerd did not come up:\n{}",
                self.name,
                proc.log_text()
            );
        }
        let ns = MountNs::of(proc.pid() as i32).expect("containerd's mount namespace");
        let ours = std::fs::read_link("/proc/self/ns/mnt").expect("own mount namespace");
        assert_ne!(
            ns.id,
            ours.to_string_lossy(),
            "containerd must run in its own mount namespace"
        );
        self.mount_ns = Some(ns);
        self.containerd = Some(proc);
        self.timings.containerd = started.elapsed();
    }

    /// Starts dockerd (again) in containerd's namespaces and waits until `/_ping` answers.
    pub fn start_dockerd(&mut self) {
        assert!(self.dockerd.is_none(), "dockerd is already running");
        let started = Instant::now();
        let containerd_pid = self.containerd.as_ref().expect("containerd").pid();
        // A pidfile left by a killed dockerd makes the next one refuse to start if its PID
        // has been reused meanwhile.
        let _ = std::fs::remove_file(self.dir.join("docker.pid"));
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &containerd_pid.to_string()])
            .args(["--mount", "--uts", "--net", "--", "dockerd"])
            .args(["--config-file", &self.path("daemon.json")])
            .args(["--data-root", &self.path("data")])
            .args(["--exec-root", &self.path("exec")])
            .args(["--pidfile", &self.path("docker.pid")])
            .args(["-H", &self.endpoint()])
            .args(["--containerd", &self.path("containerd/containerd.sock")])
            .env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1");
        self.dockerd_starts += 1;
        let log = self
            .dir
            .join(format!("dockerd-{}.log", self.dockerd_starts));
        let mut proc = Proc::spawn("dockerd", cmd, log);
        let up = wait_for(Duration::from_secs(30), || {
            if !proc.is_running() {
                panic!("[{}] dockerd exited:\n{}", self.name, proc.log_text());
            }
            matches!(self.api("GET", "/_ping"), Ok((200, _))).then_some(())
        });
        if up.is_none() {
            panic!(
                "[{}] dockerd did not come up:\n{}",
                self.name,
                proc.log_text()
            );
        }
        self.dockerd = Some(proc);
        self.timings.dockerd = started.elapsed();
        eprintln!(
            "[{}] containerd ready in {:?}, dockerd in {:?}",
            self.name, self.timings.containerd, self.timings.dockerd
        );
    }

    /// Stops dockerd by PID (SIGTERM; SIGKILL after `timeout`). See
    /// [`DaemonOptions::live_restore`] for what happens to the containers.
    pub fn stop_dockerd(&mut self, timeout: Duration) {
        if let Some(mut p) = self.dockerd.take() {
            p.stop(timeout);
        }
    }

    /// SIGKILL to dockerd (a crash). Containers keep running under containerd; a dockerd
    /// started later without live-restore stops them.
    pub fn kill_dockerd(&mut self) {
        if let Some(mut p) = self.dockerd.take() {
            p.signal(libc::SIGKILL);
            p.stop(Duration::from_secs(5));
        }
    }

    pub fn dockerd_running(&mut self) -> bool {
        self.dockerd.as_mut().is_some_and(Proc::is_running)
    }

    /// PIDs of containerd and dockerd (for leak checks).
    pub fn pids(&self) -> Vec<u32> {
        [&self.containerd, &self.dockerd]
            .into_iter()
            .flatten()
            .map(Proc::pid)
            .collect()
    }

    pub fn dockerd_log(&self) -> String {
        self.dockerd
            .as_ref()
            .map(Proc::log_text)
            .unwrap_or_default()
    }

    /// `unix:///.../docker.sock`, for `-H`, `DOCKER_HOST` and the agent's `[docker] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The docker CLI (first in PATH) pointed at this daemon, with a private CLI config dir.
    pub fn docker_command(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(self.endpoint())
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_BUILDKIT", "0")
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        cmd
    }

    /// Runs `docker -H unix://SOCK ARGS...`; Ok(stdout) or Err(everything it printed).
    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        run_bounded(self.docker_command().args(args), CLI_TIMEOUT)
    }

    /// Runs `docker -H unix://SOCK ARGS...` and returns its stdout; panics if it fails.
    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args)
            .unwrap_or_else(|e| panic!("[{}] {e}", self.name))
    }

    /// One request to the Engine API over the socket (unversioned path, so the daemon's own
    /// API version): (status, body).
    pub fn api(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
        Ok((status, body.to_string()))
    }

    /// GET `path` from the Engine API as JSON; panics unless it answers 200.
    pub fn api_get(&self, path: &str) -> serde_json::Value {
        match self.api("GET", path) {
            Ok((200, body)) => serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("[{}] GET {path}: bad JSON ({e}): {body}", self.name)),
            other => panic!("[{}] GET {path}: {other:?}", self.name),
        }
    }

    /// Ids of all containers (running or not).
    pub fn container_ids(&self) -> Vec<String> {
        self.docker(&["ps", "-aq", "--no-trunc"])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// PID of a running container's init process (in the host's PID namespace).
    pub fn container_pid(&self, container: &str) -> u32 {
        let out = self.docker(&["inspect", "-f", "{{.State.Pid}}", container]);
        match out.trim().parse() {
            Ok(pid) if pid != 0 => pid,
            _ => panic!("[{}] container {container} is not running", self.name),
        }
    }

    /// The container's IPv4 address on `network` (`bridge` for the default one).
    pub fn inspect_ip(&self, container: &str, network: &str) -> Ipv4Addr {
        let out = self.docker(&[
            "inspect",
            "-f",
            "{{json .NetworkSettings.Networks}}",
            container,
        ]);
        let networks: serde_json::Value = serde_json::from_str(&out).expect("networks JSON");
        networks[network]["IPAddress"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "[{}] {container} has no address on {network}: {out}",
                    self.name
                )
            })
    }

    /// Ifindex of the peer (in this daemon's netns) of `iface` inside the container: the
    /// `N` of `iface@ifN` as netlink reports it inside the container's netns. (Reading
    /// /sys/class/net/IFACE/iflink after entering only the netns gives the host's value,
    /// because sysfs is not remounted.)
    pub fn peer_ifindex(&self, container: &str, iface: &str) -> u32 {
        let pid = self.container_pid(container).to_string();
        let out = sh(&[
            "nsenter", "-t", &pid, "-n", "ip", "-o", "link", "show", iface,
        ]);
        // "3: eth0@if4: <BROADCAST,...> ..."
        out.split_whitespace()
            .nth(1)
            .and_then(|name| name.trim_end_matches(':').split_once("@if"))
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or_else(|| panic!("[{}] no peer index in {out:?}", self.name))
    }

    /// Removes every container (SIGKILL), stops dockerd then containerd by PID, kills what is
    /// left of this daemon (shims; the containers of a killed dockerd) by PID and removes its
    /// cgroups. Idempotent; Drop calls it.
    pub fn shutdown(&mut self) {
        if self.dockerd_running() {
            let ids = run_bounded(
                self.docker_command().args(["ps", "-aq"]),
                Duration::from_secs(20),
            )
            .unwrap_or_default();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut cmd = self.docker_command();
                cmd.args(["rm", "-f", "-v"]).args(&ids);
                if let Err(e) = run_bounded(&mut cmd, Duration::from_secs(30)) {
                    eprintln!("[{}] removing containers: {e}", self.name);
                }
            }
        }
        self.stop_dockerd(Duration::from_secs(20));
        if let Some(mut p) = self.containerd.take() {
            p.stop(Duration::from_secs(10));
        }
        self.kill_leftovers();
    }

    /// Directories of this daemon's cgroup parent, in every hierarchy.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_dirs(&self.cgroup_parent)
    }

    /// This daemon's private mount namespace, while it runs.
    pub fn mount_ns(&self) -> Option<&MountNs> {
        self.mount_ns.as_ref()
    }

    /// The cgroup parent of its containers (`/xlb-test-NAME`).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// PIDs that belong to this daemon: in its cgroup parent (container processes) or in its
    /// private mount namespace (shims, docker-proxy, anything it started).
    fn leftover_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        fn walk(dir: &Path, pids: &mut Vec<i32>) {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), pids);
                }
            }
        }
        for dir in self.cgroup_dirs() {
            walk(&dir, &mut pids);
        }
        if let Some(ns) = &self.mount_ns {
            pids.extend(ns.pids());
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn kill_leftovers(&mut self) {
        let clean = wait_for(Duration::from_secs(10), || {
            let pids = self.leftover_pids();
            for &pid in &pids {
                kill_if(pid, |pid| self.owns(pid));
            }
            pids.is_empty().then_some(())
        });
        if clean.is_none() {
            eprintln!(
                "[{}] processes left after shutdown: {:?}",
                self.name,
                self.leftover_pids()
            );
        }
        // Deepest first; a cgroup goes once its processes are gone.
        let mut dirs = Vec::new();
        fn collect(dir: &Path, dirs: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    collect(&e.path(), dirs);
                }
            }
            dirs.push(dir.to_path_buf());
        }
        for dir in self.cgroup_dirs() {
            collect(&dir, &mut dirs);
        }
        for dir in dirs {
            let gone = wait_for(Duration::from_secs(2), || {
                std::fs::remove_dir(&dir)
                    .ok()
                    .or((!dir.exists()).then_some(()))
            });
            if gone.is_none() {
                eprintln!("[{}] could not remove cgroup {}", self.name, dir.display());
            }
        }
        // Only now may the namespace go (and its inode number be reused).
        self.mount_ns = None;
    }

    /// Whether `pid` is in this daemon's mount namespace or cgroup parent.
    fn owns(&self, pid: i32) -> bool {
        self.mount_ns.as_ref().is_some_and(|ns| ns.contains(pid))
            || in_cgroup(pid, &self.cgroup_parent)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A mount namespace, pinned by an open file so that its identity (`mnt:[inode]`) stays
/// unique while we hold it: a freed namespace's inode number is soon reused by a new one
/// (another test's daemon), and comparing with a stale number would find, or kill, the wrong
/// processes.
#[derive(Debug)]
pub struct MountNs {
    /// `mnt:[N]`
    pub id: String,
    _pin: File,
}

impl MountNs {
    /// The mount namespace of process `pid`.
    pub fn of(pid: i32) -> std::io::Result<MountNs> {
        let path = format!("/proc/{pid}/ns/mnt");
        let pin = File::open(&path)?;
        let id = std::fs::read_link(&path)?.to_string_lossy().into_owned();
        // The process may have changed namespace between the two calls: check the pinned one.
        let pinned = std::fs::read_link(format!("/proc/self/fd/{}", pin.as_raw_fd()))?;
        if pinned.to_string_lossy() != id {
            return Err(std::io::Error::other("process changed mount namespace"));
        }
        Ok(MountNs { id, _pin: pin })
    }

    pub fn try_clone(&self) -> std::io::Result<MountNs> {
        Ok(MountNs {
            id: self.id.clone(),
            _pin: self._pin.try_clone()?,
        })
    }

    pub fn contains(&self, pid: i32) -> bool {
        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .is_ok_and(|m| m.to_string_lossy() == self.id)
    }

    /// PIDs of the processes in it.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
            .filter(|&pid| self.contains(pid))
            .collect()
    }
}

/// Whether process `pid` is in cgroup `parent` or below it, in any hierarchy.
fn in_cgroup(pid: i32, parent: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    text.lines().any(|l| {
        l.splitn(3, ':').nth(2).is_some_and(|path| {
            path == parent
                || path
                    .strip_prefix(parent)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    })
}

/// SIGKILL to `pid` if `owned(pid)` holds, checked after a pidfd pins the process: a PID that
/// was recycled in between is never signalled.
fn kill_if(pid: i32, owned: impl Fn(i32) -> bool) {
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: a fresh fd that we own.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    if owned(pid) {
        // SAFETY: signals exactly the process the pidfd refers to (or fails if it is gone).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// Start time of a process (field 22 of /proc/PID/stat), to tell a recycled PID apart.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count from the closing parenthesis.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Directories of cgroup `parent` in every mounted hierarchy.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join(rel))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// What a harness created, recorded before it drops, to check afterwards that nothing of it
/// is left: daemons (by PID), processes in their mount namespaces (shims, containers of a
/// killed dockerd), cgroups, network namespaces and the scratch directory.
#[derive(Debug, Default)]
pub struct LeakCheck {
    /// (PID, start time) of each dockerd and containerd.
    pids: Vec<(u32, Option<u64>)>,
    mount_namespaces: Vec<MountNs>,
    cgroup_parents: Vec<String>,
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl LeakCheck {
    pub fn add_daemon(&mut self, daemon: &Daemon) {
        self.pids
            .extend(daemon.pids().into_iter().map(|p| (p, start_time(p))));
        self.mount_namespaces
            .extend(daemon.mount_ns().map(|ns| ns.try_clone().expect("dup")));
        self.cgroup_parents.push(daemon.cgroup_parent().to_string());
    }

    pub fn of_host(host: &DockerHost) -> LeakCheck {
        let mut check = LeakCheck::default();
        check.add_daemon(&host.daemon);
        check.netns = vec![host.client.name.clone(), host.host.name.clone()];
        check.dirs = vec![host.dir.clone()];
        check
    }

    pub fn of_swarm(swarm: &crate::swarm::Swarm) -> LeakCheck {
        let mut check = LeakCheck::default();
        for node in &swarm.nodes {
            check.add_daemon(&node.daemon);
        }
        check.netns = swarm.netns_names();
        check.dirs = vec![swarm.dir.clone()];
        check
    }

    /// Panics with everything that is still there.
    pub fn assert_clean(&self) {
        let mut left = Vec::new();
        for &(pid, started) in &self.pids {
            if start_time(pid).is_some_and(|t| Some(t) == started) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                left.push(format!("{} {pid}", comm.unwrap_or_default().trim()));
            }
        }
        for ns in &self.mount_namespaces {
            let pids = ns.pids();
            if !pids.is_empty() {
                left.push(format!("processes in {}: {pids:?}", ns.id));
            }
        }
        for parent in &self.cgroup_parents {
            for dir in cgroup_dirs(parent) {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        let list = sh(&["ip", "netns", "list"]);
        for name in &self.netns {
            if list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
            {
                left.push(format!("netns {name}"));
            }
        }
        for dir in &self.dirs {
            if dir.exists() {
                left.push(format!("dir {}", dir.display()));
            }
        }
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A Docker host

/// A Docker host in its own netns, with a client namespace in front of it:
///
/// ```text
/// client ns (10.99.1.2/24, default via 10.99.1.1; TX offload off)
///   --veth-- host ns ("front" 10.99.1.1/24, ip_forward=1; dockerd; docker0 172.17.K.1/24)
/// ```
pub struct DockerHost {
    pub prefix: String,
    /// Scratch directory: the daemon's files, compose files, logs.
    pub dir: PathBuf,
    // Fields drop in this order: the daemon before its namespace, the directory last.
    pub daemon: Daemon,
    pub client: Netns,
    pub host: Netns,
    _scratch: Scratch,
}

impl DockerHost {
    pub fn new() -> DockerHost {
        DockerHost::with_options(DaemonOptions::default())
    }

    pub fn with_options(options: DaemonOptions) -> DockerHost {
        let prefix = unique_prefix();
        let scratch = Scratch::new(&format!("xlb-docker-{prefix}"));
        let client = Netns::new(&format!("{prefix}-cl"));
        let host = Netns::new(&format!("{prefix}-dh"));
        crate::topology::wire_client(&client, &host);
        host.sysctl("net.ipv4.ip_forward", "1");
        let daemon = Daemon::start(
            &host,
            &format!("{prefix}-dh"),
            scratch.path.join("docker"),
            options,
        );
        DockerHost {
            prefix,
            dir: scratch.path.clone(),
            daemon,
            client,
            host,
            _scratch: scratch,
        }
    }

    /// dockerd's socket.
    pub fn socket(&self) -> &Path {
        &self.daemon.socket
    }

    /// `unix://SOCK`, for the agent's `[docker] endpoint`.
    pub fn endpoint(&self) -> String {
        self.daemon.endpoint()
    }

    pub fn docker(&self, args: &[&str]) -> String {
        self.daemon.docker(args)
    }

    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        self.daemon.try_docker(args)
    }

    pub fn api_get(&self, path: &str) -> serde_json::Value {
        self.daemon.api_get(path)
    }

    /// `docker run -d --name NAME --label K=V... EXTRA... xlb-test-backend:latest`: returns the
    /// full container id. `extra` are `docker run` options (`--network N`, `-p`, `--hostname`).
    pub fn run_backend(&self, name: &str, labels: &[(&str, &str)], extra: &[&str]) -> String {
        self.run_image(name, labels, extra, IMAGE, &[])
    }

    /// `docker run -d --pull never --name NAME --label K=V... EXTRA... IMAGE ARGS...` (ARGS
    /// are appended to the backend's entrypoint flags): the full container id.
    pub fn run_image(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
        image: &str,
        args: &[&str],
    ) -> String {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut full = vec!["run", "-d", "--pull", "never", "--name", name];
        for l in &labels {
            full.extend(["--label", l.as_str()]);
        }
        full.extend_from_slice(extra);
        full.push(image);
        full.extend_from_slice(args);
        self.docker(&full).trim().to_string()
    }

    /// `docker stop` (SIGTERM: the backend keeps serving for its 2 s linger, then exits 0).
    pub fn stop(&self, container: &str) {
        self.docker(&["stop", container]);
    }

    /// `docker kill` (SIGKILL: the container dies at once, a `die` event follows).
    pub fn kill(&self, container: &str) {
        self.docker(&["kill", container]);
    }

    /// `docker rm -f`.
    pub fn rm(&self, container: &str) {
        self.docker(&["rm", "-f", container]);
    }

    pub fn inspect_ip(&self, container: &str, network: &str) -> Ipv4Addr {
        self.daemon.inspect_ip(container, network)
    }

    /// Ifindex, in the host namespace, of the host-side veth of the container's eth0: the
    /// target of `bpf_redirect_peer`/`bpf_redirect` for local delivery.
    pub fn host_veth_ifindex(&self, container: &str) -> u32 {
        self.daemon.peer_ifindex(container, "eth0")
    }

    /// Stops dockerd by PID and starts it again on the same dirs and socket; returns when it
    /// answers. With `live_restore` the containers keep running throughout (same PIDs and
    /// addresses); without it they are stopped with dockerd (SIGTERM: ~2 s of linger) and stay
    /// stopped unless they have a restart policy.
    pub fn restart_daemon(&mut self) {
        self.daemon.stop_dockerd(Duration::from_secs(30));
        self.daemon.start_dockerd();
    }

    /// Writes `docker-compose.yml` in the compose project dir (project name `compose`).
    pub fn write_compose_file(&self, yaml: &str) -> PathBuf {
        let dir = self.dir.join("compose");
        std::fs::create_dir_all(&dir).expect("compose dir");
        let file = dir.join("docker-compose.yml");
        std::fs::write(&file, yaml).expect("write compose file");
        file
    }

    /// Runs docker-compose (v1) in the compose project dir with DOCKER_HOST=this daemon.
    pub fn compose(&self, args: &[&str]) -> String {
        let dir = self.dir.join("compose");
        std::fs::create_dir_all(&dir).expect("compose dir");
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(&dir)
            .args(args)
            .env("DOCKER_HOST", self.endpoint())
            .env("COMPOSE_PROJECT_NAME", "compose")
            .env("DOCKER_CONFIG", self.daemon.dir.join("cli"))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH");
        run_bounded(&mut cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("docker-compose: {e}"))
    }

    /// Makes the image's HEALTHCHECK probe fail (or pass again) while the service ports stay
    /// reachable from outside: the probe connects to 127.0.0.1:8080, so a REJECT on `lo`
    /// inside the container's netns fails it. A stopgap until the backend has a health toggle.
    pub fn block_health_probe(&self, container: &str, block: bool) {
        let pid = self.daemon.container_pid(container).to_string();
        let op = if block { "-I" } else { "-D" };
        let port = HTTP_PORT.to_string();
        sh(&[
            "nsenter",
            "-t",
            &pid,
            "-n",
            "iptables",
            "-w",
            op,
            "INPUT",
            "-i",
            "lo",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]);
    }

    /// Docker's health status of a container (`starting`, `healthy`, `unhealthy`).
    pub fn health(&self, container: &str) -> String {
        self.docker(&["inspect", "-f", "{{.State.Health.Status}}", container])
            .trim()
            .to_string()
    }

    /// Waits (bounded) until the container's health status is `status`.
    pub fn wait_health(&self, container: &str, status: &str, timeout: Duration) {
        let reached = wait_for(timeout, || {
            std::thread::sleep(Duration::from_millis(100));
            (self.health(container) == status).then_some(())
        });
        reached.unwrap_or_else(|| {
            panic!(
                "{container} did not become {status} within {timeout:?}: {}",
                self.docker(&["inspect", "-f", "{{json .State.Health}}", container])
            )
        });
    }
}

impl Default for DockerHost {
    fn default() -> Self {
        DockerHost::new()
    }
}
