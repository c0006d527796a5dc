//! The benchmark's netns sandbox: the test topology (client → lb → be1..be3) with one nginx
//! per backend namespace instead of the test backend. Everything it starts or creates is
//! removed on drop, also when a run fails or is interrupted.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use xlb_tests::{
    netns::Netns,
    process::{Proc, wait_for},
    topology::Topology,
};

/// Where the backends' nginx answers HTTP (every mode targets port 80).
pub const HTTP_PORT: u16 = 80;
/// The UDP port the backends count datagrams on.
pub const UDP_PORT: u16 = 9000;
/// nginx's stub_status, on the backend's loopback only.
const STATUS_PORT: u16 = 8099;
/// nft table in each backend namespace that counts (and drops) the UDP load.
const UDP_TABLE: &str = "xlbbench_udp";

/// MTU between the lb namespace and the backends: dsr's IPIP header (20 bytes; GUE 28) on
/// a full 1500-byte client packet must fit, or the balancer drops it (drop_too_big).
pub const INNER_MTU: &str = "1600";

/// Present when br_netfilter is loaded (the test runs inside the lb namespace).
const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Sysctls set for the load (reported with the results).
pub const SYSCTLS: &[(&str, &str, &str)] = &[
    // Connection: close opens tens of thousands of connections per run.
    ("client", "net.ipv4.ip_local_port_range", "1024 65535"),
    ("client", "net.ipv4.tcp_tw_reuse", "1"),
    // HAProxy's connections to the backends leave the lb namespace.
    ("lb", "net.ipv4.ip_local_port_range", "1024 65535"),
    ("lb", "net.ipv4.tcp_tw_reuse", "1"),
];

pub struct Testbed {
    // Fields drop in order: the servers end before their namespaces go.
    nginx: Vec<Proc>,
    pub topo: Topology,
    pub server_cpu: usize,
}

impl Testbed {
    pub fn new(server_cpu: usize) -> Result<Testbed> {
        let topo = Topology::without_servers(3);
        // One client address per mode (see Mode::client_addr); 10.99.1.2 is there already.
        for mode in crate::modes::ALL {
            let addr = mode.client_addr();
            if addr != "10.99.1.2" {
                topo.client
                    .ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            }
        }
        for b in &topo.backends {
            topo.lb.ip(&["link", "set", &b.name, "mtu", INNER_MTU]);
            b.ns.ip(&["link", "set", "eth0", "mtu", INNER_MTU]);
        }
        topo.lb.ip(&["link", "set", "br0", "mtu", INNER_MTU]);
        for (ns, key, value) in SYSCTLS {
            let ns = if *ns == "client" {
                &topo.client
            } else {
                &topo.lb
            };
            ns.sysctl(key, value);
        }
        // Bridge netfilter (br_netfilter, loaded once anything ran Docker on this machine)
        // would send the bridged traffic of br0 through the IP hooks in every mode. A plain
        // router has no such detour; its state depends on the machine's history, so turn it
        // off in the lb namespace (the setting is per namespace).
        if topo
            .lb
            .command("test")
            .args(["-e", BRIDGE_NF])
            .status()
            .is_ok_and(|s| s.success())
        {
            for key in ["iptables", "ip6tables", "arptables"] {
                topo.lb
                    .sysctl(&format!("net.bridge.bridge-nf-call-{key}"), "0");
            }
        }
        let mut bed = Testbed {
            nginx: Vec::new(),
            topo,
            server_cpu,
        };
        for i in 0..bed.topo.backends.len() {
            let proc = bed.start_nginx(i)?;
            bed.nginx.push(proc);
        }
        Ok(bed)
    }

    pub fn backend_addrs(&self) -> Vec<Ipv4Addr> {
        self.topo
            .backends
            .iter()
            .map(|b| b.addr.parse().expect("backend address"))
            .collect()
    }

    pub fn backend_names(&self) -> Vec<String> {
        self.topo.backends.iter().map(|b| b.name.clone()).collect()
    }

    /// One nginx, `worker_processes 1`, pinned to the server CPU, answering "beN\n".
    fn start_nginx(&self, index: usize) -> Result<Proc> {
        let backend = &self.topo.backends[index];
        let dir = self.topo.dir.join(format!("nginx-{}", backend.name));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n\
             \x20 access_log off;\n\
             \x20 client_body_temp_path {d}/tmp/body;\n\
             \x20 proxy_temp_path {d}/tmp/proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20 scgi_temp_path {d}/tmp/scgi;\n\
             \x20 keepalive_requests 100000000;\n\
             \x20 keepalive_timeout 300s;\n\
             \x20 server {{\n\
             \x20   listen {HTTP_PORT} backlog=4096;\n\
             \x20   location / {{ default_type text/plain; return 200 \"{name}\\n\"; }}\n\
             \x20 }}\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{STATUS_PORT};\n\
             \x20   location / {{ stub_status; }}\n\
             \x20 }}\n\
             }}\n",
            name = backend.name
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = backend.ns.command("taskset");
        cmd.args(["-c", &self.server_cpu.to_string(), "nginx", "-p"])
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let mut proc = Proc::spawn(
            &format!("nginx-{}", backend.name),
            cmd,
            dir.join("stdout.log"),
        );
        let ns_path = backend.ns.path();
        let up = wait_for(Duration::from_secs(10), || {
            if !proc.is_running() {
                return Some(false);
            }
            stub_status(&ns_path).is_ok().then_some(true)
        });
        if up != Some(true) {
            bail!(
                "nginx in {} did not start: {}{}",
                backend.name,
                proc.log_text(),
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        Ok(proc)
    }

    /// Requests each backend's nginx has served so far (from stub_status).
    pub fn nginx_requests(&self) -> Result<Vec<u64>> {
        self.topo
            .backends
            .iter()
            .map(|b| Ok(stub_status(&b.ns.path())?.requests))
            .collect()
    }

    /// Adds a counter that counts and drops UDP to UDP_PORT in every backend namespace.
    pub fn add_udp_counters(&self) -> Result<()> {
        for b in &self.topo.backends {
            nft(
                &b.ns,
                &format!(
                    "table inet {UDP_TABLE} {{\n\
                     \x20 counter rx {{ }}\n\
                     \x20 chain input {{\n\
                     \x20   type filter hook input priority 0; policy accept;\n\
                     \x20   udp dport {UDP_PORT} counter name \"rx\" drop\n\
                     \x20 }}\n\
                     }}\n"
                ),
            )?;
        }
        Ok(())
    }

    /// Packets counted so far by each backend's UDP counter.
    pub fn udp_counts(&self) -> Result<Vec<u64>> {
        self.topo
            .backends
            .iter()
            .map(|b| {
                let out =
                    b.ns.exec(&["nft", "-j", "list", "counter", "inet", UDP_TABLE, "rx"]);
                let json: serde_json::Value =
                    serde_json::from_str(&out).context("parsing nft -j output")?;
                json["nftables"]
                    .as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .find_map(|i| i.get("counter")?.get("packets")?.as_u64())
                    })
                    .with_context(|| format!("no counter in nft output: {out}"))
            })
            .collect()
    }

    pub fn remove_udp_counters(&self) {
        for b in &self.topo.backends {
            let _ =
                b.ns.command("nft")
                    .args(["delete", "table", "inet", UDP_TABLE])
                    .output();
        }
    }

    /// Asks `target` over HTTP from the client namespace `n` times; returns the bodies.
    pub fn probe_http(&self, targets: &[SocketAddrV4], n: usize) -> Result<Vec<String>> {
        let targets = targets.to_vec();
        self.topo.client.run(move || {
            (0..n)
                .map(|i| http_get(SocketAddr::V4(targets[i % targets.len()])))
                .collect()
        })
    }

    pub fn scratch(&self) -> PathBuf {
        self.topo.dir.clone()
    }
}

/// Applies an nft ruleset (`nft -f`) inside `ns`.
pub fn nft(ns: &Netns, ruleset: &str) -> Result<()> {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting nft")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f failed in {}: {}\n{ruleset}",
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

struct StubStatus {
    requests: u64,
}

/// Reads nginx's stub_status inside the namespace at `ns_path`.
fn stub_status(ns_path: &str) -> Result<StubStatus> {
    let ns_path = ns_path.to_string();
    let text = std::thread::spawn(move || -> Result<String> {
        xlb_tests::netns::enter(&ns_path);
        http_get(SocketAddr::from(([127, 0, 0, 1], STATUS_PORT)))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("stub_status thread panicked"))??;
    // "Active connections: 1\nserver accepts handled requests\n 5 5 9\nReading: ..."
    let numbers: Vec<u64> = text
        .lines()
        .nth(2)
        .context("short stub_status")?
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let requests = *numbers.get(2).context("no request count in stub_status")?;
    Ok(StubStatus { requests })
}

/// One HTTP/1.0 GET of `/`; returns the body.
fn http_get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .with_context(|| format!("reading from {addr}"))?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("no HTTP answer from {addr}: {reply:?}"))?;
    Ok(body.trim_end().to_string())
}
