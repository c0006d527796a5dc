//! What the Docker discovery test files share: a Docker host with xlb in front of docker0,
//! its config, the labels of a `web` backend, and requests through the VIP.
#![allow(dead_code)]
use std::time::Duration;

use xlb_tests::{
    agent::Agent,
    client::tcp_name,
    docker::{DaemonOptions, DockerHost},
};

pub const VIP: &str = "10.99.100.1";
pub const PACE: Duration = Duration::from_millis(20);

/// xlb on the host's front NIC with services `web` (port 80, health-checked every 200 ms)
/// and `api` (port 81), Docker at `endpoint`, and `extra` appended (more services).
pub fn config_with(host: &DockerHost, endpoint: &str, resync: &str, extra: &str) -> String {
    format!(
        r#"[agent]
interfaces = ["front"]
pin_path = "{pin}"

[docker]
endpoint = "{endpoint}"
resync_interval = "{resync}"

[[service]]
name = "web"
vip = "{VIP}"
port = 80
  [service.health]
  interval = "200ms"
  timeout = "100ms"
  fall = 2
  rise = 2

[[service]]
name = "api"
vip = "{VIP}"
port = 81
{extra}"#,
        pin = Agent::pin_path_of(&host.prefix),
    )
}

/// [`config_with`] the host's own daemon, resync every 3 s.
pub fn config(host: &DockerHost) -> String {
    config_with(host, &host.endpoint(), "3s", "")
}

/// A Docker host as Docker leaves a machine that had IP forwarding off: FORWARD policy DROP,
/// so only xlb's bridge delivery (which skips netfilter) reaches unpublished ports.
pub fn docker_host(options: DaemonOptions) -> DockerHost {
    let host = DockerHost::with_options(options);
    host.host.exec(&["iptables", "-w", "-P", "FORWARD", "DROP"]);
    host
}

pub fn web_labels() -> Vec<(&'static str, &'static str)> {
    vec![("xlb.service", "web"), ("xlb.port", "9000")]
}

/// The 12-character id a container answers with (its hostname).
pub fn short(id: &str) -> String {
    id[..12].to_string()
}

/// The names that answer `n` new connections to the VIP on `port`, from the client.
pub fn names_on(host: &DockerHost, port: u16, n: usize) -> Vec<String> {
    let vip = format!("{VIP}:{port}").parse().expect("addr");
    host.client.run(move || {
        (0..n)
            .map(|i| tcp_name(vip).unwrap_or_else(|e| panic!("request {i} to {vip}: {e}")))
            .collect()
    })
}

/// [`names_on`] port 80 (`web`).
pub fn names(host: &DockerHost, n: usize) -> Vec<String> {
    names_on(host, 80, n)
}

pub fn host_client<T: Send + 'static>(
    host: &DockerHost,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    host.client.run(f)
}
