//! The ways the same load reaches the three nginx backends. A mode is set up in the lb
//! namespace and torn down when its guard drops (the XDP program detached and its pins gone,
//! HAProxy stopped, the nft table deleted, the VIP removed from lo, dsr's decap detached).
use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use xlb_tests::{agent::Agent, process::Proc, topology::VIP};

use crate::{
    testbed::{HTTP_PORT, Testbed, UDP_PORT, nft},
    xlbmode::{self, Decap},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The client drives the three backends directly, routed through the lb namespace.
    Direct,
    /// Kernel nft DNAT in the lb namespace, `numgen inc mod 3`.
    Nft,
    /// HAProxy `mode tcp` in the lb namespace, round robin.
    Haproxy,
    /// xlb as a user's first config writes it: interfaces, VIPs and backend addresses, and
    /// nothing else (no `bridge` key, `xdp_mode` unset). The goals are judged on it.
    XlbDefault,
    /// Tuned: xlb's XDP program on the lb namespace's front interface; the backends on br0 are
    /// local (`bridge = "br0"`): TC hands each packet to the backend's eth0 through its
    /// veth (`bpf_redirect_peer`), and replies leave through TC on br0, so neither
    /// direction is routed.
    Xlb,
    /// xlb with `xdp_mode = "tc"`: the balancer at TC ingress, delivery as in `Xlb`.
    XlbTc,
    /// Diagnostic: xlb attached as in `XlbDefault`, but the client drives the backends directly as
    /// in `Direct`, so every packet takes XDP_PASS (not a VIP) and TC finds no reverse NAT.
    /// Its gap to direct is the cost of having the programs on the interface at all.
    XdpPass,
    /// xlb in mode fullnat: client → VIP becomes 10.99.2.1:port → backend; the replies come
    /// back to the lb namespace's br0, where the program is attached too (skb mode).
    XlbFullnat,
    /// xlb in mode dsr: IPIP to the backend, which decapsulates (`xlb decap`) and answers
    /// the client from the VIP directly (routed by the lb namespace, not through xlb).
    XlbDsr,
}

pub const ALL: [Mode; 9] = [
    Mode::Direct,
    Mode::Nft,
    Mode::Haproxy,
    Mode::XlbDefault,
    Mode::Xlb,
    Mode::XlbTc,
    Mode::XdpPass,
    Mode::XlbFullnat,
    Mode::XlbDsr,
];

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Nft => "nft DNAT",
            Mode::Haproxy => "HAProxy",
            Mode::XlbDefault => "xlb, default config",
            Mode::Xlb => "xlb",
            Mode::XlbTc => "xlb, mode tc",
            Mode::XdpPass => "direct, xlb attached",
            Mode::XlbFullnat => "xlb, fullnat",
            Mode::XlbDsr => "xlb, dsr",
        }
    }

    /// The client address this mode's load comes from. Each mode has its own, so a
    /// backend's TIME_WAIT sockets left by one mode never meet another mode's SYNs: TCP
    /// timestamps have a per-address-pair offset, and client → VIP differs from client →
    /// backend, so PAWS would reject such a SYN and stall it for a retransmit.
    pub fn client_addr(self) -> &'static str {
        match self {
            Mode::Direct => "10.99.1.2",
            Mode::Nft => "10.99.1.3",
            Mode::Haproxy => "10.99.1.4",
            Mode::Xlb => "10.99.1.5",
            Mode::XdpPass => "10.99.1.6",
            Mode::XlbTc => "10.99.1.7",
            Mode::XlbFullnat => "10.99.1.8",
            Mode::XlbDsr => "10.99.1.9",
            Mode::XlbDefault => "10.99.1.10",
        }
    }

    /// Modes that run an xlb agent.
    pub fn runs_xlb(self) -> bool {
        matches!(
            self,
            Mode::XlbDefault
                | Mode::Xlb
                | Mode::XlbTc
                | Mode::XdpPass
                | Mode::XlbFullnat
                | Mode::XlbDsr
        )
    }

    /// HAProxy has no UDP mode.
    pub fn does_udp(self) -> bool {
        self != Mode::Haproxy
    }
}

const NFT_TABLE: &str = "xlbbench_nat";
/// HAProxy's address on br0, beside the lb namespace's own 10.99.2.1 that fullnat uses.
pub const HAPROXY_SOURCE: &str = "10.99.2.2";
/// New connections that check a mode before its load: with a hash, 60 of them miss one of
/// three backends with a probability of 3 · (2/3)^60 ≈ 10⁻¹⁰.
const PROBES: usize = 60;

/// A mode while it is set up.
pub struct Active<'a> {
    pub mode: Mode,
    bed: &'a Testbed,
    proxy: Option<Proc>,
    agent: Option<Agent>,
    /// dsr's decapsulation on the backends (dropped after the agent).
    decap: Option<Decap>,
    /// How xlb attached (driver or skb), from its status.
    pub xdp_mode: Option<String>,
}

impl<'a> Active<'a> {
    pub fn start(bed: &'a Testbed, mode: Mode) -> Result<Active<'a>> {
        Active::start_on(bed, mode, &[])
    }

    /// As `start`, with xlb also attached to `more_interfaces` of the lb namespace (the
    /// flood bench's second client link).
    pub fn start_on(bed: &'a Testbed, mode: Mode, more_interfaces: &[&str]) -> Result<Active<'a>> {
        let mut active = Active {
            mode,
            bed,
            proxy: None,
            agent: None,
            decap: None,
            xdp_mode: None,
        };
        let backends = bed.backend_addrs();
        let lb = &bed.topo.lb;
        bed.topo.client.ip(&[
            "route",
            "replace",
            "default",
            "via",
            "10.99.1.1",
            "src",
            mode.client_addr(),
        ]);
        match mode {
            Mode::Direct => {}
            Mode::Nft => {
                let map: Vec<String> = backends
                    .iter()
                    .enumerate()
                    .map(|(i, a)| format!("{i} : {a}"))
                    .collect();
                let map = map.join(", ");
                let n = backends.len();
                nft(
                    lb,
                    &format!(
                        "table ip {NFT_TABLE} {{\n\
                         \x20 chain prerouting {{\n\
                         \x20   type nat hook prerouting priority dstnat; policy accept;\n\
                         \x20   ip daddr {VIP} tcp dport {HTTP_PORT} dnat to numgen inc mod {n} map {{ {map} }}\n\
                         \x20   ip daddr {VIP} udp dport {UDP_PORT} dnat to numgen inc mod {n} map {{ {map} }}\n\
                         \x20 }}\n\
                         }}\n"
                    ),
                )?;
            }
            Mode::Haproxy => {
                lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                // Its own source: the TIME_WAITs its connections leave on the backends must
                // not meet the ports fullnat later takes on br0's address.
                lb.ip(&["addr", "add", &format!("{HAPROXY_SOURCE}/32"), "dev", "br0"]);
                let mut cfg = format!(
                    "global\n  nbthread 1\n  maxconn 8000\n\n\
                     defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  \
                     timeout server 60s\n\n\
                     frontend web\n  bind {VIP}:{HTTP_PORT}\n  default_backend nginx\n\n\
                     backend nginx\n  balance roundrobin\n  source {HAPROXY_SOURCE}\n"
                );
                for (name, addr) in bed.backend_names().iter().zip(&backends) {
                    cfg += &format!("  server {name} {addr}:{HTTP_PORT}\n");
                }
                let path = bed.scratch().join("haproxy.cfg");
                std::fs::write(&path, cfg)?;
                let mut cmd = lb.command("taskset");
                cmd.args(["-c", &bed.server_cpu.to_string(), "haproxy", "-db", "-f"])
                    .arg(&path);
                active.proxy = Some(Proc::spawn(
                    "haproxy",
                    cmd,
                    bed.scratch().join("haproxy.log"),
                ));
            }
            Mode::XlbDefault
            | Mode::Xlb
            | Mode::XlbTc
            | Mode::XdpPass
            | Mode::XlbFullnat
            | Mode::XlbDsr => {
                if mode == Mode::XlbDsr {
                    active.decap = Some(Decap::attach(bed)?);
                }
                let pin_path = Agent::pin_path_for(&bed.topo);
                let mut config = xlbmode::config(mode, &pin_path, &backends);
                for interface in more_interfaces {
                    config = config.replacen(
                        "interfaces = [",
                        &format!("interfaces = [\"{interface}\", "),
                        1,
                    );
                }
                let agent = Agent::start(&bed.topo, &config);
                if let Some(pid) = agent.proc.as_ref().map(Proc::pid) {
                    crate::cpu::pin_process(pid, bed.server_cpu)?;
                }
                let (ok, status) = agent.cli(&["status"]);
                if !ok {
                    bail!("xlb status failed: {status}");
                }
                active.xdp_mode = status
                    .lines()
                    .next()
                    .and_then(|l| l.split_once('(').map(|(_, m)| m.trim_end_matches(')')))
                    .map(str::to_string);
                active.agent = Some(agent);
            }
        }
        active.check()?;
        Ok(active)
    }

    /// The HTTP targets of the load: the VIP, or in direct mode every backend.
    pub fn http_targets(&self) -> Vec<SocketAddrV4> {
        self.targets(HTTP_PORT)
    }

    pub fn udp_targets(&self) -> Vec<SocketAddrV4> {
        self.targets(UDP_PORT)
    }

    fn targets(&self, port: u16) -> Vec<SocketAddrV4> {
        match self.mode {
            Mode::Direct | Mode::XdpPass => self
                .bed
                .backend_addrs()
                .into_iter()
                .map(|a| SocketAddrV4::new(a, port))
                .collect(),
            _ => vec![SocketAddrV4::new(VIP.parse().expect("VIP"), port)],
        }
    }

    /// xlb's pin directory while an agent runs.
    pub fn xlb_pins(&self) -> Option<&std::path::Path> {
        self.agent.as_ref().map(|a| a.pin_path.as_path())
    }

    /// The proxy process whose CPU time is reported (HAProxy, or xlb's agent).
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy
            .as_ref()
            .or(self.agent.as_ref().and_then(|a| a.proc.as_ref()))
            .map(Proc::pid)
    }

    /// Checks that the mode answers from every backend before any load runs.
    fn check(&mut self) -> Result<()> {
        let targets = self.http_targets();
        // HAProxy needs a moment to bind; the others answer at once. Bounded in time: a
        // probe that times out takes seconds, and a broken mode would stall the whole run.
        let started = std::time::Instant::now();
        let names = loop {
            match self.bed.probe_http(&targets, PROBES) {
                Ok(answers) => break answers,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    if let Some(p) = self.proxy.as_mut()
                        && !p.is_running()
                    {
                        bail!("{} exited: {}", p.name, p.log_text());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("{} does not answer", self.mode.name()));
                }
            }
        };
        for want in self.bed.backend_names() {
            if !names.contains(&want) {
                bail!(
                    "{}: {want} never answered {PROBES} new connections (answers: {names:?})",
                    self.mode.name()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let lb = &self.bed.topo.lb;
        match self.mode {
            Mode::Direct => {}
            Mode::Nft => {
                let _ = lb
                    .command("nft")
                    .args(["delete", "table", "ip", NFT_TABLE])
                    .output();
            }
            Mode::Haproxy => {
                self.proxy.take();
                for (addr, dev) in [(VIP, "lo"), (HAPROXY_SOURCE, "br0")] {
                    let _ = lb
                        .command("ip")
                        .args(["addr", "del", &format!("{addr}/32"), "dev", dev])
                        .output();
                }
            }
            Mode::XlbDefault
            | Mode::Xlb
            | Mode::XlbTc
            | Mode::XdpPass
            | Mode::XlbFullnat
            | Mode::XlbDsr => {
                // Stops the agent, unpins the links (detaching XDP and TC) and removes the pins.
                self.agent.take();
                self.decap.take();
            }
        }
    }
}

/// Fails if anything of xlb is still attached in the lb namespace.
pub fn check_detached(bed: &Testbed) -> Result<()> {
    for interface in [xlb_tests::topology::FRONT, "br0"] {
        let link = bed.topo.lb.ip(&["-d", "link", "show", interface]);
        if link.contains("prog/xdp") || link.contains(" xdp") {
            bail!("an XDP program is still attached to {interface}: {link}");
        }
    }
    let pins = Agent::pin_path_for(&bed.topo);
    if std::path::Path::new(&pins).exists() {
        bail!("{pins} still exists");
    }
    xlbmode::check_decap_detached(bed)
}
