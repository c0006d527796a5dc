//! The netns topology of DESIGN.md:
//!
//! ```text
//! client ns (10.99.1.2) --veth-- lb ns (10.99.1.1, "front": XDP) --br0 10.99.2.1-- beN ns (10.99.2.1N)
//! ```
//! Backends route replies through the lb ns. Each topology has its own namespaces (unique
//! prefix), so tests can run in parallel with the same addresses.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    netns::{Netns, unique_prefix},
    process::{Proc, binary, wait_for},
};

pub const VIP: &str = "10.99.100.1";
/// The dual-stack topology's IPv6 addresses (`Topology::dual_stack`): the same links, with
/// fd99:1::/64 for the client's, fd99:2::/64 for the backends' (be N at fd99:2::1N).
pub const VIP6: &str = "fd99:100::1";
pub const FRONT_ADDR6: &str = "fd99:1::1";
pub const CLIENT_ADDR6: &str = "fd99:1::2";
/// The LB's client-facing interface, and the addresses on that link.
pub const FRONT: &str = "front";
pub const FRONT_ADDR: &str = "10.99.1.1";
pub const CLIENT_ADDR: &str = "10.99.1.2";
/// Where every test backend takes push triggers (`xlb-test-backend --push`): a connection
/// there makes it speak first on all its open line connections.
pub const PUSH_PORT: u16 = 7000;
const PUSH_LISTEN: &str = "0.0.0.0:7000";

/// Makes the test backend at `addr` speak first on every open line connection; returns how
/// many it pushed to. Call inside a namespace that reaches the backend directly.
pub fn push_from_backend(addr: std::net::IpAddr) -> usize {
    use std::io::BufRead as _;
    let target = std::net::SocketAddr::new(addr, PUSH_PORT);
    let stream = std::net::TcpStream::connect_timeout(&target, crate::client::TIMEOUT)
        .unwrap_or_else(|e| panic!("push trigger {target}: {e}"));
    stream
        .set_read_timeout(Some(crate::client::TIMEOUT))
        .expect("timeout");
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("push trigger {target}: {e}"));
    line.trim()
        .strip_prefix("pushed ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("push trigger {target} answered {line:?}"))
}

/// Links a client namespace ("eth0", CLIENT_ADDR, default route via the front) to the
/// namespace that takes its traffic ("front", FRONT_ADDR). TX offload is off on the client,
/// so receivers verify its checksums.
pub fn wire_client(client: &Netns, front: &Netns) {
    crate::netns::veth(client, "eth0", front, FRONT, None);
    client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    client.ip(&["route", "add", "default", "via", FRONT_ADDR]);
    client.no_tx_offload("eth0");
    front.ip(&["addr", "add", &format!("{FRONT_ADDR}/24"), "dev", FRONT]);
    front.ip(&["link", "set", FRONT, "up"]);
}

/// Starts the workspace's test backend in `ns`, answering with `name` on `listeners`
/// (`--tcp ADDR` ...), logging each peer to `log`; returns once every listener is bound.
pub fn start_test_backend(
    ns: &Netns,
    name: &str,
    listeners: &[&str],
    dir: &std::path::Path,
    log: PathBuf,
) -> Proc {
    let ready = dir.join(format!("{name}.ready"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = ns.command(binary("xlb-test-backend").to_str().expect("utf-8"));
    cmd.args(["--name", name, "--log", "--ready-file"])
        .arg(&ready)
        .args(listeners);
    let proc = Proc::spawn(name, cmd, log);
    wait_for(Duration::from_secs(5), || ready.exists().then_some(()))
        .unwrap_or_else(|| panic!("{name} did not start: {}", proc.log_text()));
    proc
}

pub struct Backend {
    pub name: String,
    pub ns: Netns,
    pub addr: String,
    pub proc: Option<Proc>,
}

impl Backend {
    /// Its IPv6 address in a dual-stack topology (be N at fd99:2::1N).
    pub fn addr6(&self) -> String {
        format!("fd99:2::1{}", &self.name[2..])
    }
}

pub struct Topology {
    pub prefix: String,
    /// Scratch directory for configs and logs.
    pub dir: PathBuf,
    // Processes must end before their namespaces go: fields drop in this order.
    pub backends: Vec<Backend>,
    pub client: Netns,
    pub lb: Netns,
    /// A router between client and lb (`behind_router`).
    pub router: Option<Netns>,
    /// Every link has an IPv6 address too, and servers listen on both families.
    pub dual_stack: bool,
}

impl Topology {
    pub fn new(backends: usize) -> Topology {
        let mut topo = Topology::without_backends();
        for _ in 0..backends {
            topo.add_backend();
        }
        topo
    }

    /// The same wiring with `backends` backend namespaces (addresses and routes as in
    /// [`Topology::new`]) but no server started in them: for callers that run their own
    /// servers there (the benchmarks run nginx).
    pub fn without_servers(backends: usize) -> Topology {
        let mut topo = Topology::without_backends();
        for _ in 0..backends {
            topo.add_backend_namespace();
        }
        topo
    }

    /// Client and lb namespaces, wired, with no backend yet.
    fn without_backends() -> Topology {
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("xlb-test-{prefix}"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let client = Netns::new(&format!("{prefix}-cl"));
        let lb = Netns::new(&format!("{prefix}-lb"));
        let topo = Topology {
            prefix,
            dir,
            backends: Vec::new(),
            client,
            lb,
            router: None,
            dual_stack: false,
        };
        wire_client(&topo.client, &topo.lb);
        topo.wire_lb();
        topo
    }

    /// `new` with IPv6 on every link besides IPv4 (addresses without duplicate address
    /// detection, so they work at once); the lb forwards both.
    pub fn dual_stack(backends: usize) -> Topology {
        let mut topo = Topology::without_backends();
        topo.dual_stack = true;
        let add6 = |ns: &Netns, addr: &str, dev: &str| {
            ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
        };
        add6(&topo.client, &format!("{CLIENT_ADDR6}/64"), "eth0");
        topo.client
            .ip(&["-6", "route", "add", "default", "via", FRONT_ADDR6]);
        add6(&topo.lb, &format!("{FRONT_ADDR6}/64"), FRONT);
        add6(&topo.lb, "fd99:2::1/64", "br0");
        topo.lb.sysctl("net.ipv6.conf.all.forwarding", "1");
        for _ in 0..backends {
            topo.add_backend();
        }
        topo
    }

    pub fn vip6(&self, port: u16) -> SocketAddr {
        format!("[{VIP6}]:{port}").parse().expect("addr")
    }

    /// The same, but the client reaches the lb through a router ("rt"), whose link towards
    /// the client has `client_mtu` on the router's side (a smaller link on the path: the
    /// client's own MTU, and so its MSS, stays 1500):
    ///
    /// ```text
    /// client (10.99.1.2) --- rt "front" 10.99.1.1 | rt "uplink" 10.99.3.1 --- lb "front" 10.99.3.2
    /// ```
    pub fn behind_router(backends: usize, client_mtu: &str) -> Topology {
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("xlb-test-{prefix}"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let client = Netns::new(&format!("{prefix}-cl"));
        let lb = Netns::new(&format!("{prefix}-lb"));
        let router = Netns::new(&format!("{prefix}-rt"));
        wire_client(&client, &router);
        router.ip(&["link", "set", FRONT, "mtu", client_mtu]);
        crate::netns::veth(&router, "uplink", &lb, FRONT, None);
        router.ip(&["addr", "add", "10.99.3.1/24", "dev", "uplink"]);
        router.ip(&["link", "set", "uplink", "up"]);
        lb.ip(&["addr", "add", "10.99.3.2/24", "dev", FRONT]);
        lb.ip(&["link", "set", FRONT, "up"]);
        lb.ip(&["route", "add", "10.99.1.0/24", "via", "10.99.3.1"]);
        for net in [VIP, "10.99.2.0/24"] {
            router.ip(&["route", "add", net, "via", "10.99.3.2"]);
        }
        router.sysctl("net.ipv4.ip_forward", "1");
        let mut topo = Topology {
            prefix,
            dir,
            backends: Vec::new(),
            client,
            lb,
            router: Some(router),
            dual_stack: false,
        };
        topo.wire_lb();
        for _ in 0..backends {
            topo.add_backend();
        }
        topo
    }

    /// [`Topology::behind_router`] with IPv6 on every link as well (client fd99:1::2 via the
    /// router's fd99:1::1; router "uplink" fd99:3::1, lb "front" fd99:3::2; the backends as
    /// in [`Topology::dual_stack`]).
    pub fn behind_router_dual_stack(backends: usize, client_mtu: &str) -> Topology {
        let mut topo = Topology::behind_router(0, client_mtu);
        topo.dual_stack = true;
        let router = topo.router.as_ref().expect("a router");
        let add6 = |ns: &Netns, addr: &str, dev: &str| {
            ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
        };
        add6(&topo.client, &format!("{CLIENT_ADDR6}/64"), "eth0");
        topo.client
            .ip(&["-6", "route", "add", "default", "via", FRONT_ADDR6]);
        add6(router, &format!("{FRONT_ADDR6}/64"), FRONT);
        add6(router, "fd99:3::1/64", "uplink");
        for net in [VIP6, "fd99:2::/64"] {
            router.ip(&["-6", "route", "add", net, "via", "fd99:3::2"]);
        }
        router.sysctl("net.ipv6.conf.all.forwarding", "1");
        add6(&topo.lb, "fd99:3::2/64", FRONT);
        add6(&topo.lb, "fd99:2::1/64", "br0");
        topo.lb
            .ip(&["-6", "route", "add", "fd99:1::/64", "via", "fd99:3::1"]);
        topo.lb.sysctl("net.ipv6.conf.all.forwarding", "1");
        topo.wait_routed6("fd99:3::2");
        for _ in 0..backends {
            topo.add_backend();
        }
        topo
    }

    /// Waits (at most 5 s) until the client reaches `addr` over IPv6 and back: a TCP
    /// connection to a closed port there is refused. The new links' link-local addresses go
    /// through duplicate address detection first, and until then the router does not forward.
    fn wait_routed6(&self, addr: &str) {
        let to: SocketAddr = format!("[{addr}]:9").parse().expect("addr");
        let reached = self.client.run(move || {
            (0..50).any(|_| {
                let refused = std::net::TcpStream::connect_timeout(&to, Duration::from_millis(100))
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
                if !refused {
                    std::thread::sleep(Duration::from_millis(100));
                }
                refused
            })
        });
        assert!(reached, "{addr} not reachable over IPv6 from the client");
    }

    /// The lb's bridge to the backends.
    fn wire_lb(&self) {
        let lb = &self.lb;
        lb.ip(&["link", "add", "br0", "type", "bridge"]);
        lb.ip(&["addr", "add", "10.99.2.1/24", "dev", "br0"]);
        lb.ip(&["link", "set", "br0", "up"]);
        lb.sysctl("net.ipv4.ip_forward", "1");
    }

    /// Adds backend N+1 at 10.99.2.(11+N) and starts its server (TCP and UDP on 8080,
    /// HTTP on 8081).
    pub fn add_backend(&mut self) -> &Backend {
        self.add_backend_namespace();
        let proc = self.start_server(self.backends.last().expect("just added"));
        let backend = self.backends.last_mut().expect("just added");
        backend.proc = Some(proc);
        backend
    }

    /// Adds backend N+1's namespace at 10.99.2.(11+N), wired to br0, with no server in it.
    pub fn add_backend_namespace(&mut self) -> &Backend {
        let i = self.backends.len() + 1;
        let name = format!("be{i}");
        let ns = Netns::new(&format!("{}-{name}", self.prefix));
        let addr = format!("10.99.2.{}", 10 + i);
        let backend = Backend {
            name,
            ns,
            addr,
            proc: None,
        };
        self.wire_backend(&backend);
        self.backends.push(backend);
        self.backends.last().expect("pushed")
    }

    /// Replaces a backend's link (as a restarted container gets a new veth and MAC under its
    /// old address); its server keeps running.
    pub fn rewire_backend(&self, index: usize) {
        let backend = &self.backends[index];
        // Docker derives a container's MAC from its address, so it keeps that too.
        let shown = backend.ns.ip(&["-br", "link", "show", "eth0"]);
        let mac = shown.split_whitespace().nth(2).expect("MAC").to_string();
        self.lb.ip(&["link", "del", &backend.name]);
        self.wire_backend(backend);
        backend.ns.ip(&["link", "set", "eth0", "address", &mac]);
    }

    /// A veth from the backend's eth0 to a port of br0 named after it.
    fn wire_backend(&self, backend: &Backend) {
        let (ns, name) = (&backend.ns, &backend.name);
        crate::netns::veth(ns, "eth0", &self.lb, name, None);
        self.lb.ip(&["link", "set", name, "master", "br0"]);
        self.lb.ip(&["link", "set", name, "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", backend.addr),
            "dev",
            "eth0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", "10.99.2.1"]);
        if self.dual_stack {
            let addr6 = format!("{}/64", backend.addr6());
            ns.ip(&["-6", "addr", "add", &addr6, "dev", "eth0", "nodad"]);
            ns.ip(&["-6", "route", "add", "default", "via", "fd99:2::1"]);
        }
        ns.no_tx_offload("eth0");
    }

    fn start_server(&self, backend: &Backend) -> Proc {
        // A socket on [::] takes IPv4 too (as v4-mapped addresses).
        let any = if self.dual_stack { "[::]" } else { "0.0.0.0" };
        let (tcp, udp, http) = (
            format!("{any}:8080"),
            format!("{any}:8080"),
            format!("{any}:8081"),
        );
        let push = if self.dual_stack {
            "[::]:7000"
        } else {
            PUSH_LISTEN
        };
        let listeners = [
            "--tcp", &tcp, "--udp", &udp, "--http", &http, "--push", push,
        ];
        let log = self.dir.join(format!("{}.log", backend.name));
        start_test_backend(&backend.ns, &backend.name, &listeners, &self.dir, log)
    }

    /// Stops a backend's server (its namespace stays).
    pub fn kill_backend(&mut self, index: usize) {
        if let Some(mut p) = self.backends[index].proc.take() {
            p.stop(Duration::from_secs(3));
        }
    }

    pub fn restart_backend(&mut self, index: usize) {
        let proc = self.start_server(&self.backends[index]);
        self.backends[index].proc = Some(proc);
    }

    pub fn vip(&self, port: u16) -> SocketAddr {
        format!("{VIP}:{port}").parse().expect("addr")
    }

    /// A config for these backends in mode nat: one TCP service on VIP:80 and one UDP
    /// service on VIP:53, both to port 8080 of every backend, with fast health checks
    /// (TCP connect every 200 ms; 2 failures take a backend down, 2 successes bring it up).
    pub fn config(&self, pin_path: &str, backends: &[&Backend]) -> String {
        let mut text = format!("[agent]\ninterfaces = [\"{FRONT}\"]\npin_path = \"{pin_path}\"\n");
        for (name, port, protocol) in [("web", 80, "tcp"), ("dns", 53, "udp")] {
            text += &format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\n\
                 protocol = \"{protocol}\"\n  [service.health]\n  type = \"tcp\"\n  \
                 interval = \"200ms\"\n  timeout = \"100ms\"\n  fall = 2\n  rise = 2\n"
            );
            for b in backends {
                text += &format!(
                    "  [[service.backend]]\n  address = \"{}\"\n  port = 8080\n",
                    b.addr
                );
            }
        }
        text
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for b in &mut self.backends {
            b.proc.take();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
