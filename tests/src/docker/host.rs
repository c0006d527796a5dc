//! A Docker host: a network namespace with its own daemon, and a client namespace in front.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{CLI_TIMEOUT, Daemon, DaemonOptions, HTTP_PORT, IMAGE, Scratch, run_bounded};
use crate::{
    netns::{Netns, sh, unique_prefix},
    process::wait_for,
};

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
