//! One containerd + dockerd in a network namespace: how it is started (see the module doc of
//! `docker`), and how tests talk to it (the CLI, the Engine API, inspections).
use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use super::{CLI_TIMEOUT, MountNs, image::provide_images, run_bounded};
use crate::{
    netns::{Netns, sh},
    process::{Proc, wait_for},
};

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
    pub(super) cgroup_parent: String,
    pub(super) containerd: Option<Proc>,
    pub(super) dockerd: Option<Proc>,
    /// The private mount namespace: every process in it is ours. The open file pins the
    /// namespace, so its `mnt:[inode]` cannot be reused by another one while we compare.
    pub(super) mount_ns: Option<MountNs>,
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
}
