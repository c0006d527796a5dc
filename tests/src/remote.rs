//! A dedicated-LB topology (seeds 002 and 004): backends on other hosts, reached through a
//! router; the LB nodes hang off the router with one NIC each and are not the hosts' gateway.
//!
//! ```text
//!   client (10.99.1.2) --- rt (10.99.1.1) --- lbN ns "front" (10.99.(4+N).2)
//!                           |  VIP 10.99.100.1 via lb1 [and lb2: ECMP, L4 hash]
//!                           +-- br0 10.99.4.1 --- hostN ns "eth0" (10.99.4.(10+N))
//! ```
//! Hosts route everything via the router, so replies reach the client directly (dsr) or
//! the LB only when addressed to it (fullnat). `Remote::dual_stack` adds IPv6 on every link:
//! fd99:1::/64 to the client, fd99:(4+N)::/64 to lbN, fd99:4::/64 for the hosts
//! (fd99:4::(10+N)), VIP6 via the LB nodes. Links behind the router carry 1600-byte
//! frames, room for the dsr encapsulation of a full 1500-byte client packet.
use std::path::PathBuf;

use crate::{
    agent::Agent,
    netns::{Netns, unique_prefix},
    process::{Proc, binary},
    topology::{CLIENT_ADDR6, FRONT, FRONT_ADDR6, VIP, VIP6, start_test_backend, wire_client},
};

/// MTU behind the router: 1500 + the largest encapsulation (GUE, 28 bytes), rounded up.
const INNER_MTU: &str = "1600";
/// The kernel table the agents announce VIPs in, and BIRD on the LB nodes learns from.
pub const ANNOUNCE_TABLE: u32 = 100;
/// TCP ports every host serves (the dsr services use the VIP's ports, unchanged).
pub const HOST_PORTS: [u16; 3] = [80, 83, 8080];
/// The hosts' HTTP port (the test backend's, with /bytes/N).
pub const HTTP_PORT: u16 = 84;

pub struct Host {
    pub name: String,
    pub ns: Netns,
    pub addr: String,
    /// In a dual-stack `Remote`.
    pub addr6: Option<String>,
    pub proc: Option<Proc>,
    pub log: PathBuf,
}

pub struct LbNode {
    pub ns: Netns,
    pub addr: String,
    /// In a dual-stack `Remote`.
    pub addr6: Option<String>,
    /// The router's interface towards this node.
    pub router_if: String,
    pub dir: PathBuf,
    pub prefix: String,
}

impl LbNode {
    pub fn start_agent(&self, config: &str) -> Agent {
        Agent::start_in(&self.ns, &self.dir, &self.prefix, config)
    }

    pub fn pin_path(&self) -> String {
        Agent::pin_path_of(&self.prefix)
    }
}

pub struct Remote {
    pub prefix: String,
    pub dir: PathBuf,
    /// BIRD on the router and on each LB node (`with_bgp`); stopped before the namespaces go.
    pub birds: Vec<Proc>,
    /// Pass-through XDP on the router's LB-facing veths (see `xdp_pass`).
    router_xdp: Option<aya::Ebpf>,
    /// IPv6 on every link too, and servers listening on both families.
    pub dual_stack: bool,
    // Processes end before namespaces go: fields drop in this order.
    pub hosts: Vec<Host>,
    pub lbs: Vec<LbNode>,
    pub client: Netns,
    pub router: Netns,
}

impl Remote {
    /// `lbs` LB nodes (the VIP is routed over all of them) and `hosts` backend hosts, each
    /// running the test backend on HOST_PORTS.
    pub fn new(lbs: usize, hosts: usize) -> Remote {
        let remote = Remote::unrouted(lbs, hosts);
        remote.route_vip();
        remote
    }

    /// `new` with IPv6 beside IPv4 on every link (addresses without duplicate address
    /// detection, so they work at once), VIP6 routed over the LB nodes as VIP is.
    pub fn dual_stack(lbs: usize, hosts: usize) -> Remote {
        let remote = Remote::build(lbs, hosts, true);
        remote.route_vip();
        remote.route_vip6();
        remote
    }

    /// The router's route for VIP6 over every LB node (ECMP when there are several).
    pub fn route_vip6(&self) {
        let mut args = vec!["-6", "route", "replace", VIP6];
        let hops: Vec<&str> = self
            .lbs
            .iter()
            .filter_map(|lb| lb.addr6.as_deref())
            .collect();
        if hops.len() == 1 {
            args.extend(["via", hops[0]]);
        } else {
            for hop in &hops {
                args.extend(["nexthop", "via", hop]);
            }
        }
        self.router.ip(&args);
    }

    /// Like `new`, but the VIP route comes from BGP: BIRD on the router (AS 65000, ECMP over
    /// equal routes) peers with BIRD on each LB node (AS 65001), which announces the routes
    /// the agent puts in table ANNOUNCE_TABLE (`agent.announce_table`).
    pub fn with_bgp(lbs: usize, hosts: usize) -> Remote {
        let mut remote = Remote::unrouted(lbs, hosts);
        let mut router_conf = String::from(
            "router id 10.99.1.1;\nprotocol device { scan time 1; }\n\
             protocol kernel { ipv4 { import none; export all; }; merge paths on; }\n",
        );
        for (i, lb) in remote.lbs.iter().enumerate() {
            let gateway = format!("10.99.{}.1", 5 + i);
            router_conf += &format!(
                "protocol bgp {name} {{ local {gateway} as 65000; neighbor {addr} as 65001; \
                 hold time 3; connect retry time 1; ipv4 {{ import all; export none; }}; }}\n",
                name = lb.router_if,
                addr = lb.addr
            );
            let lb_conf = format!(
                "router id {addr};\nprotocol device {{ scan time 1; }}\n\
                 protocol kernel {{ kernel table {ANNOUNCE_TABLE}; learn; scan time 1; \
                 ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp up {{ local {addr} as 65001; neighbor {gateway} as 65000; \
                 hold time 3; connect retry time 1; \
                 ipv4 {{ import none; export all; next hop self; }}; }}\n",
                addr = lb.addr
            );
            let bird = start_bird(&lb.ns, &lb.dir, &lb_conf);
            remote.birds.push(bird);
        }
        let bird = start_bird(&remote.router, &remote.dir, &router_conf);
        remote.birds.push(bird);
        remote
    }

    /// The router's next hops for the VIP (empty: no route).
    pub fn vip_next_hops(&self) -> Vec<String> {
        let text = self.router.ip(&["-j", "route", "show", VIP]);
        let routes: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        let mut hops = Vec::new();
        for route in routes {
            if let Some(gw) = route["gateway"].as_str() {
                hops.push(gw.to_string());
            }
            for hop in route["nexthops"].as_array().into_iter().flatten() {
                hops.extend(hop["gateway"].as_str().map(String::from));
            }
        }
        hops.sort();
        hops
    }

    fn unrouted(lbs: usize, hosts: usize) -> Remote {
        Remote::build(lbs, hosts, false)
    }

    fn build(lbs: usize, hosts: usize, dual_stack: bool) -> Remote {
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("xlb-test-{prefix}"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let router = Netns::new(&format!("{prefix}-rt"));
        let client = Netns::new(&format!("{prefix}-cl"));
        wire_client(&client, &router);
        router.sysctl("net.ipv4.ip_forward", "1");
        // dsr replies come from the VIP, which the router routes towards the LBs.
        for conf in ["all", "default"] {
            router.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0");
        }
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        router.sysctl("net.ipv4.conf.all.ignore_routes_with_linkdown", "1");
        router.ip(&["link", "add", "br0", "mtu", INNER_MTU, "type", "bridge"]);
        router.ip(&["addr", "add", "10.99.4.1/24", "dev", "br0"]);
        router.ip(&["link", "set", "br0", "up"]);
        if dual_stack {
            add6(&client, &format!("{CLIENT_ADDR6}/64"), "eth0");
            client.ip(&["-6", "route", "add", "default", "via", FRONT_ADDR6]);
            add6(&router, &format!("{FRONT_ADDR6}/64"), FRONT);
            add6(&router, "fd99:4::1/64", "br0");
            router.sysctl("net.ipv6.conf.all.forwarding", "1");
            router.sysctl("net.ipv6.fib_multipath_hash_policy", "1");
        }
        let mut remote = Remote {
            prefix,
            dir,
            birds: Vec::new(),
            router_xdp: None,
            dual_stack,
            hosts: Vec::new(),
            lbs: Vec::new(),
            client,
            router,
        };
        for _ in 0..lbs {
            remote.add_lb();
        }
        let lb_ifs: Vec<String> = remote.lbs.iter().map(|l| l.router_if.clone()).collect();
        remote.router_xdp = Some(xdp_pass(
            &remote.router,
            None,
            &lb_ifs,
            &remote.router_pin_path(),
        ));
        for _ in 0..hosts {
            remote.add_host();
        }
        remote
    }

    fn add_lb(&mut self) {
        let n = self.lbs.len() + 1;
        let prefix = format!("{}-lb{n}", self.prefix);
        let ns = Netns::new(&prefix);
        let router_if = format!("lb{n}");
        veth(&ns, FRONT, &self.router, &router_if);
        let (addr, gateway) = (format!("10.99.{}.2", 4 + n), format!("10.99.{}.1", 4 + n));
        self.router
            .ip(&["addr", "add", &format!("{gateway}/24"), "dev", &router_if]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", FRONT]);
        ns.ip(&["route", "add", "default", "via", &gateway]);
        ns.sysctl("net.ipv4.ip_forward", "1");
        let addr6 = self.dual_stack.then(|| {
            let (addr6, gateway6) = (format!("fd99:{}::2", 4 + n), format!("fd99:{}::1", 4 + n));
            add6(&self.router, &format!("{gateway6}/64"), &router_if);
            add6(&ns, &format!("{addr6}/64"), FRONT);
            ns.ip(&["-6", "route", "add", "default", "via", &gateway6]);
            ns.sysctl("net.ipv6.conf.all.forwarding", "1");
            addr6
        });
        let dir = self.dir.join(format!("lb{n}"));
        std::fs::create_dir_all(&dir).expect("lb dir");
        self.lbs.push(LbNode {
            ns,
            addr,
            addr6,
            router_if,
            dir,
            prefix,
        });
    }

    /// Gives LB node `index` a second NIC, "back", on the hosts' segment (10.99.4.(2+index)):
    /// the FIB then sends packets for the hosts out of it, a redirect from "front".
    pub fn add_back_nic(&mut self, index: usize) -> String {
        let lb = &self.lbs[index];
        let router_if = format!("{}b", lb.router_if);
        veth(&lb.ns, "back", &self.router, &router_if);
        self.router
            .ip(&["link", "set", &router_if, "master", "br0"]);
        let addr = format!("10.99.4.{}", 2 + index);
        lb.ns
            .ip(&["addr", "add", &format!("{addr}/24"), "dev", "back"]);
        let loaded = self.router_xdp.take();
        self.router_xdp = Some(xdp_pass(
            &self.router,
            loaded,
            &[router_if],
            &self.router_pin_path(),
        ));
        addr
    }

    /// The VIP via every LB node that is up (ECMP when there are several).
    pub fn route_vip(&self) {
        let mut args = vec!["route", "replace", VIP];
        let hops: Vec<String> = self.lbs.iter().map(|lb| lb.addr.clone()).collect();
        if hops.len() == 1 {
            args.extend(["via", &hops[0]]);
        } else {
            for hop in &hops {
                args.extend(["nexthop", "via", hop]);
            }
        }
        self.router.ip(&args);
    }

    fn add_host(&mut self) {
        let n = self.hosts.len() + 1;
        let name = format!("host{n}");
        let ns = Netns::new(&format!("{}-{name}", self.prefix));
        veth(&ns, "eth0", &self.router, &name);
        self.router.ip(&["link", "set", &name, "master", "br0"]);
        let addr = format!("10.99.4.{}", 10 + n);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", "10.99.4.1"]);
        let addr6 = self.dual_stack.then(|| {
            let addr6 = format!("fd99:4::{}", 10 + n);
            add6(&ns, &format!("{addr6}/64"), "eth0");
            ns.ip(&["-6", "route", "add", "default", "via", "fd99:4::1"]);
            addr6
        });
        ns.no_tx_offload("eth0");
        let log = self.dir.join(format!("{name}.log"));
        let mut host = Host {
            name,
            ns,
            addr,
            addr6,
            proc: None,
            log,
        };
        host.proc = Some(start_server(&host, &self.dir, self.dual_stack));
        self.hosts.push(host);
    }

    /// Runs `xlb decap` on every host for the VIP (dsr's backend side), and for VIP6 too in
    /// a dual-stack Remote.
    pub fn decap_on_hosts(&self) {
        for host in &self.hosts {
            let xlb = binary("xlb");
            let mut args = vec![xlb.to_str().expect("utf-8")];
            let pins = self.decap_pin_path(host);
            args.extend(decap_args(&pins));
            // Only the LB nodes may send encapsulated packets: their front addresses, and
            // the hosts' segment for a back NIC (`add_back_nic`), in each family served.
            let mut from: Vec<String> = self.lbs.iter().map(|lb| lb.addr.clone()).collect();
            from.push("10.99.4.0/24".into());
            if self.dual_stack {
                args.extend(["--vip", VIP6]);
                from.extend(self.lbs.iter().filter_map(|lb| lb.addr6.clone()));
                from.push("fd99:4::/64".into());
            }
            for source in &from {
                args.extend(["--from", source.as_str()]);
            }
            let out = host.ns.exec(&args);
            assert!(out.contains("decapsulating for"), "xlb decap: {out}");
        }
    }

    fn router_pin_path(&self) -> String {
        format!("/sys/fs/bpf/xlb-test-{}-rt", self.prefix)
    }

    pub fn decap_pin_path(&self, host: &Host) -> String {
        format!("/sys/fs/bpf/xlb-test-{}-{}-decap", self.prefix, host.name)
    }

    /// Peers the host's server logged, in order ("ADDR:PORT").
    pub fn peers_seen(host: &Host) -> Vec<String> {
        let text = std::fs::read_to_string(&host.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split(" from ").nth(1))
            .map(|p| p.split_whitespace().next().unwrap_or("").to_string())
            .collect()
    }

    /// Starts LB node `index`'s agent on the config of `services` (see `config`), edited by
    /// `edit`, and waits until every service has every host up.
    pub fn serve_with(
        &self,
        index: usize,
        services: &[(&str, u16, u16, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> Agent {
        self.serve_family(index, services, edit, false)
    }

    /// `serve_with` the config as it is.
    pub fn serve(&self, index: usize, services: &[(&str, u16, u16, &str)]) -> Agent {
        self.serve_with(index, services, |config| config)
    }

    /// `serve` with the services on VIP6 over the hosts' v6 addresses (a dual-stack Remote).
    pub fn serve6(&self, index: usize, services: &[(&str, u16, u16, &str)]) -> Agent {
        self.serve6_with(index, services, |config| config)
    }

    /// `serve_with` on VIP6 over the hosts' v6 addresses.
    pub fn serve6_with(
        &self,
        index: usize,
        services: &[(&str, u16, u16, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> Agent {
        self.serve_family(index, services, edit, true)
    }

    fn serve_family(
        &self,
        index: usize,
        services: &[(&str, u16, u16, &str)],
        edit: impl FnOnce(String) -> String,
        v6: bool,
    ) -> Agent {
        let lb = &self.lbs[index];
        let config = edit(self.config_of(&lb.pin_path(), services, v6));
        let agent = lb.start_agent(&config);
        for (name, ..) in services {
            let (n, within) = (self.hosts.len(), std::time::Duration::from_secs(10));
            // Over v6 the first probes may be slow (past the 100 ms timeout) after the
            // programs attach: connections wait for an answered probe, not the first start's
            // default "up", which a failed probe would take back.
            if v6 && !config.contains("type = \"none\"") {
                agent.wait_probed_up(name, n, within);
            } else {
                agent.wait_up(name, n, within);
            }
        }
        agent
    }

    /// A config of TCP services (name, VIP port, backend port, extra lines such as mode,
    /// snat or encap), each to every host.
    pub fn config(&self, pin_path: &str, services: &[(&str, u16, u16, &str)]) -> String {
        self.config_of(pin_path, services, false)
    }

    /// `config` on VIP6 and the hosts' v6 addresses when `v6`.
    fn config_of(&self, pin_path: &str, services: &[(&str, u16, u16, &str)], v6: bool) -> String {
        let mut text = format!("[agent]\ninterfaces = [\"{FRONT}\"]\npin_path = \"{pin_path}\"\n");
        let vip = if v6 { VIP6 } else { VIP };
        for (name, port, backend_port, extra) in services {
            text += &format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\n{extra}\n\
                 [service.health]\n  type = \"tcp\"\n  interval = \"200ms\"\n  timeout = \"100ms\"\n"
            );
            for host in &self.hosts {
                let addr = if v6 {
                    host.addr6.as_deref().expect("a dual-stack Remote")
                } else {
                    &host.addr
                };
                text += &format!(
                    "  [[service.backend]]\n  address = \"{addr}\"\n  port = {backend_port}\n"
                );
            }
        }
        text
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.birds.clear();
        for host in &mut self.hosts {
            host.proc.take();
            let pin = format!("/sys/fs/bpf/xlb-test-{}-{}-decap", self.prefix, host.name);
            // Inside the host's namespace: detaching also takes the VIP off its lo.
            if std::path::Path::new(&pin).exists() {
                let _ = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", host.ns.path()))
                    .arg("--")
                    .arg(binary("xlb"))
                    .args(["decap", "--detach", "--pin-path", &pin])
                    .output();
            }
        }
        self.router_xdp.take();
        let _ = std::fs::remove_dir_all(self.router_pin_path());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// XDP_TX (and redirect) into a veth reaches the peer only when the peer runs an XDP
/// program (on this kernel enabling GRO is not enough), as a real NIC's driver would take
/// the frame. The decap program with no VIP configured passes every packet: it serves.
/// Loads it (unless `loaded`) and attaches it to `interfaces` of the router.
fn xdp_pass(
    router: &Netns,
    loaded: Option<aya::Ebpf>,
    interfaces: &[String],
    pin_path: &str,
) -> aya::Ebpf {
    let (interfaces, pin_path) = (interfaces.to_vec(), PathBuf::from(pin_path));
    router.run(move || {
        let mut ebpf = loaded.unwrap_or_else(|| {
            xlb::bpffs::ensure(&pin_path).expect("bpffs");
            std::fs::create_dir_all(&pin_path).expect("pin dir");
            let mut ebpf = aya::EbpfLoader::new()
                .default_map_pin_directory(&pin_path)
                .load(xlb::decap::DECAP_OBJECT)
                .expect("load the decap object");
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut("xlb_decap")
                .expect("program")
                .try_into()
                .expect("xdp");
            prog.load().expect("verify");
            ebpf
        });
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut("xlb_decap")
            .expect("program")
            .try_into()
            .expect("xdp");
        for interface in &interfaces {
            prog.attach(interface, aya::programs::XdpMode::Driver)
                .unwrap_or_else(|e| panic!("XDP on {interface}: {e}"));
        }
        ebpf
    })
}

/// `xlb decap` arguments for a host whose eth0 receives the dsr traffic for VIP.
pub fn decap_args(pin_path: &str) -> [&str; 7] {
    [
        "decap",
        "--interface",
        "eth0",
        "--vip",
        VIP,
        "--pin-path",
        pin_path,
    ]
}

/// Runs BIRD in the foreground in `ns` with `conf`, its control socket and log in `dir`.
fn start_bird(ns: &Netns, dir: &std::path::Path, conf: &str) -> Proc {
    let conf_path = dir.join("bird.conf");
    std::fs::write(&conf_path, format!("log stderr all;\n{conf}")).expect("bird.conf");
    let mut cmd = ns.command("bird");
    cmd.arg("-f")
        .arg("-c")
        .arg(&conf_path)
        .arg("-s")
        .arg(dir.join("bird.ctl"));
    Proc::spawn(&format!("bird in {}", ns.name), cmd, dir.join("bird.log"))
}

/// Adds the IPv6 address `addr` (with its prefix) to `dev` in `ns`, usable at once.
fn add6(ns: &Netns, addr: &str, dev: &str) {
    ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
}

/// A veth pair `a_if` in `a` and `b_if` in `b`, both up, with room for encapsulation.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    crate::netns::veth(a, a_if, b, b_if, Some(INNER_MTU));
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

fn start_server(host: &Host, dir: &std::path::Path, dual_stack: bool) -> Proc {
    // A socket on [::] takes IPv4 too (as v4-mapped addresses).
    let any = if dual_stack { "[::]" } else { "0.0.0.0" };
    let addrs: Vec<String> = HOST_PORTS.iter().map(|p| format!("{any}:{p}")).collect();
    let mut listeners: Vec<&str> = addrs.iter().flat_map(|a| ["--tcp", a.as_str()]).collect();
    let push = format!("{any}:{}", crate::topology::PUSH_PORT);
    let http = format!("{any}:{HTTP_PORT}");
    listeners.extend(["--push", push.as_str(), "--http", http.as_str()]);
    start_test_backend(&host.ns, &host.name, &listeners, dir, host.log.clone())
}
