//! Under a flood: the legitimate loads (wrk keep-alive and `Connection: close` from the
//! client) with and without a random-source SYN flood and a UDP flood at a fixed rate from
//! a second client (its own namespace and link into the lb namespace), through xlb, nft
//! DNAT and HAProxy in the same run. Reports the throughput retained, the flood packets the
//! lb namespace took in per second, and the CPU each flood packet cost the machine.
use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use xlb_tests::{
    flood::{Flood, Kind, mac_of},
    netns::{Netns, unique_prefix, veth},
    topology::VIP,
};

use crate::{
    cpu,
    load::{self, Load},
    micro::median,
    modes::{Active, Mode},
    report::Goal,
    runs,
    testbed::{HTTP_PORT, Testbed, UDP_PORT},
};

/// The flooding client's link in the lb namespace.
pub const FLOOD_IF: &str = "flood0";
const FLOOD_NET: &str = "10.99.6";
/// Where the flood's random sources live (tests/src/flood.rs): routed back to the
/// flooder, so answers to them leave the way an attack came in.
const FLOOD_SOURCES: &str = "10.99.128.0/17";

/// The flood threads' nice value.
const FLOOD_NICE: i32 = -10;

/// The modes compared under a flood.
pub const MODES: [Mode; 3] = [Mode::Nft, Mode::Haproxy, Mode::XlbDefault];

/// Goal of issue 15: the share of the legitimate throughput kept under the flood.
pub const RETAINED_GOAL: f64 = 0.90;

/// The second client: a namespace with a veth into the lb namespace.
pub struct Flooder {
    ns: Netns,
    next_hop: [u8; 6],
}

impl Flooder {
    pub fn new(bed: &Testbed) -> Flooder {
        let ns = Netns::new(&format!("{}fl", unique_prefix()));
        let lb = &bed.topo.lb;
        veth(&ns, "eth0", lb, FLOOD_IF, None);
        ns.ip(&["addr", "add", &format!("{FLOOD_NET}.2/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.no_tx_offload("eth0");
        lb.ip(&["addr", "add", &format!("{FLOOD_NET}.1/24"), "dev", FLOOD_IF]);
        lb.ip(&["link", "set", FLOOD_IF, "up"]);
        route_back(lb);
        let next_hop = mac_of(lb, FLOOD_IF);
        Flooder { ns, next_hop }
    }

    /// Starts the SYN flood (to the VIP's HTTP port) and the UDP flood (to its UDP port),
    /// `rate` packets a second each, sent from a thread pinned to `cpu`.
    fn start(&self, cpu: usize, rate: u64, limit: Duration) -> Result<[Flood; 2]> {
        let vip: std::net::Ipv4Addr = VIP.parse().context("VIP")?;
        // The flood threads inherit the affinity of the thread that starts them.
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<[Flood; 2]> {
                    cpu::pin_thread(cpu)?;
                    // Ahead of wrk on the load CPU, so the rate holds (it sleeps between
                    // bursts, so it takes no more than the flood needs).
                    // SAFETY: setpriority on the calling thread (who = 0) has no preconditions.
                    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, FLOOD_NICE) };
                    let one = |kind, port| {
                        Flood::start(
                            &self.ns,
                            "eth0",
                            self.next_hop,
                            SocketAddrV4::new(vip, port),
                            kind,
                            u64::MAX,
                            limit,
                            rate,
                        )
                    };
                    Ok([one(Kind::Syn, HTTP_PORT), one(Kind::Udp, UDP_PORT)])
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the flood starter panicked"))?
        })
    }
}

impl Flooder {
    /// The machine's CPU per flood packet with the lb namespace's link down (the veth
    /// drops each frame at once): what the generator itself costs, to be taken off.
    pub fn generator_ns_per_packet(
        &self,
        bed: &Testbed,
        cpu: usize,
        rate: u64,
        seconds: u64,
    ) -> Result<f64> {
        let lb = &bed.topo.lb;
        lb.ip(&["link", "set", FLOOD_IF, "down"]);
        let cost = self.cpu_per_packet(cpu, rate, seconds, 0.0);
        lb.ip(&["link", "set", FLOOD_IF, "up"]);
        // Taking the link down took its routes with it.
        route_back(lb);
        Ok(cost?.0)
    }

    /// A flood alone for `seconds`: the machine's busy CPU (less other users' and
    /// `generator_ns` a packet) per packet sent, and the packets sent.
    fn cpu_per_packet(
        &self,
        cpu: usize,
        rate: u64,
        seconds: u64,
        generator_ns: f64,
    ) -> Result<(f64, u64)> {
        let procs = cpu::processes();
        let before = cpu::sample()?;
        let floods = self.start(cpu, rate, Duration::from_secs(seconds))?;
        let sent: u64 = floods.into_iter().map(|f| f.finish().0).sum();
        let usage = cpu::usage(&before, &cpu::sample()?);
        let foreign = cpu::foreign_us(&procs, &cpu::processes());
        let per_packet = (usage.busy_us - foreign) * 1000.0 / sent.max(1) as f64;
        Ok(((per_packet - generator_ns).max(0.0), sent))
    }
}

/// Answers to the flood's sources go back towards the flooder.
fn route_back(lb: &Netns) {
    lb.ip(&[
        "route",
        "replace",
        FLOOD_SOURCES,
        "via",
        &format!("{FLOOD_NET}.2"),
    ]);
}

/// One mode's repetition: the loads without and with the flood, and a flood alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodRun {
    pub rep: u32,
    pub mode: Mode,
    pub keep_alive: f64,
    pub keep_alive_flooded: f64,
    pub close: f64,
    pub close_flooded: f64,
    /// wrk's errors (timeouts, failed connects) during the flooded runs.
    pub errors_flooded: u64,
    /// Flood packets sent per second (SYN and UDP together) while the loads ran.
    pub offered_pps: f64,
    /// Flood packets the lb namespace's link took in per second meanwhile.
    pub received_pps: f64,
    /// The machine's CPU per flood packet during a flood alone, less other users' and the
    /// generator's own (measured with the link down).
    pub cpu_ns_per_packet: f64,
}

/// The medians of a mode's repetitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodSummary {
    pub mode: Mode,
    pub keep_alive_retained: f64,
    pub close_retained: f64,
    pub offered_pps: f64,
    pub received_pps: f64,
    pub cpu_ns_per_packet: f64,
    pub errors_flooded: u64,
}

impl FloodSummary {
    pub fn retained(&self) -> f64 {
        self.keep_alive_retained.min(self.close_retained)
    }
}

pub struct Settings {
    pub reps: u32,
    pub seconds: u64,
    pub load_cpu: usize,
    /// Packets a second of each flood (SYN, UDP).
    pub rate: u64,
    /// The generator's own CPU per packet (Flooder::generator_ns_per_packet).
    pub generator_ns: f64,
}

/// Every mode of MODES in turn (rotated per repetition), in a sandbox with the flooder.
pub fn run(
    wrk: &load::Wrk<'_>,
    bed: &Testbed,
    flooder: &Flooder,
    settings: &Settings,
) -> Result<Vec<FloodRun>> {
    let mut out = Vec::new();
    for rep in 0..settings.reps {
        for k in 0..MODES.len() {
            let mode = MODES[(k + rep as usize) % MODES.len()];
            crate::stopped()?;
            crate::step(&format!(
                "flood rep {}/{}: {}",
                rep + 1,
                settings.reps,
                mode.name()
            ));
            let active = Active::start_on(bed, mode, &[FLOOD_IF])?;
            let r = one_mode(wrk, bed, flooder, &active, rep, settings)?;
            eprintln!(
                "    keep-alive {:.0} -> {:.0} req/s, close {:.0} -> {:.0} conn/s; flood {:.0} pps offered, {:.0} taken in, {:.0} ns CPU/packet{}",
                r.keep_alive,
                r.keep_alive_flooded,
                r.close,
                r.close_flooded,
                r.offered_pps,
                r.received_pps,
                r.cpu_ns_per_packet,
                if r.errors_flooded > 0 {
                    format!(", {} wrk errors", r.errors_flooded)
                } else {
                    String::new()
                }
            );
            out.push(r);
            drop(active);
            if mode.runs_xlb() {
                crate::modes::check_detached(bed)?;
            }
        }
    }
    Ok(out)
}

fn one_mode(
    wrk: &load::Wrk<'_>,
    bed: &Testbed,
    flooder: &Flooder,
    active: &Active<'_>,
    rep: u32,
    s: &Settings,
) -> Result<FloodRun> {
    let keep_alive = runs::wrk_run(wrk, bed, active, rep, Load::KeepAlive)?;
    let close = runs::wrk_run(wrk, bed, active, rep, Load::Close)?;
    let limit = Duration::from_secs(4 * s.seconds + 30);

    let counters_before = counters(bed);
    let rx_before = rx_packets(bed)?;
    let started = std::time::Instant::now();
    let floods = flooder.start(s.load_cpu, s.rate, limit)?;
    // Let the flood fill the tables before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let keep_alive_flooded = runs::wrk_run(wrk, bed, active, rep, Load::KeepAlive);
    let close_flooded = runs::wrk_run(wrk, bed, active, rep, Load::Close);
    let offered_pps = stop_all(floods);
    let received_pps = (rx_packets(bed)? - rx_before) as f64 / started.elapsed().as_secs_f64();
    let (keep_alive_flooded, close_flooded) = (keep_alive_flooded?, close_flooded?);
    let changed: Vec<String> = counters(bed)
        .into_iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(*counters_before.get(&k).unwrap_or(&0));
            (d > 0).then(|| format!("{k} {d}"))
        })
        .collect();
    eprintln!("    during the flood: {}", changed.join(", "));

    let (cpu_ns_per_packet, _) =
        flooder.cpu_per_packet(s.load_cpu, s.rate, s.seconds, s.generator_ns)?;
    Ok(FloodRun {
        rep,
        mode: active.mode,
        keep_alive: keep_alive.rate,
        keep_alive_flooded: keep_alive_flooded.rate,
        close: close.rate,
        close_flooded: close_flooded.rate,
        errors_flooded: keep_alive_flooded.errors + close_flooded.errors,
        offered_pps,
        received_pps,
        cpu_ns_per_packet,
    })
}

/// Stops both floods; returns their combined rate.
fn stop_all(floods: [Flood; 2]) -> f64 {
    floods
        .into_iter()
        .map(|f| {
            let (sent, took) = f.stop();
            sent as f64 / took.as_secs_f64().max(1e-3)
        })
        .sum()
}

/// Packets the lb namespace's flood link has received (the kernel's count, also of those
/// XDP dropped or redirected).
fn rx_packets(bed: &Testbed) -> Result<u64> {
    let text = bed.topo.lb.ip(&["-j", "-s", "link", "show", FLOOD_IF]);
    let links: serde_json::Value = serde_json::from_str(&text).context("ip -j -s link")?;
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packets for {FLOOD_IF}: {text}"))
}

/// Where packets can be lost on the way (printed, to tell why a load suffers): every
/// link's drops in the lb and backend namespaces, and the backends' TCP troubles.
fn counters(bed: &Testbed) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let namespaces = std::iter::once(("lb", &bed.topo.lb))
        .chain(bed.topo.backends.iter().map(|b| (b.name.as_str(), &b.ns)));
    for (name, ns) in namespaces {
        let text = ns.ip(&["-j", "-s", "link", "show"]);
        if let Ok(serde_json::Value::Array(links)) = serde_json::from_str(&text) {
            for link in links {
                let ifname = link["ifname"].as_str().unwrap_or("?");
                for dir in ["rx", "tx"] {
                    let dropped = link["stats64"][dir]["dropped"].as_u64().unwrap_or(0);
                    out.insert(format!("{name}/{ifname} {dir}_dropped"), dropped);
                }
            }
        }
        if name == "lb" {
            continue;
        }
        let text = ns.exec(&["nstat", "-az", "-j"]);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(kernel) = v["kernel"].as_object()
        {
            for key in [
                "TcpExtListenOverflows",
                "TcpExtListenDrops",
                "TcpExtSyncookiesSent",
                "TcpExtTCPTimeouts",
                "TcpRetransSegs",
                "TcpExtTCPBacklogDrop",
                "IpExtInNoRoutes",
            ] {
                out.insert(
                    format!("{name} {key}"),
                    kernel.get(key).and_then(|v| v.as_u64()).unwrap_or(0),
                );
            }
        }
    }
    out
}

pub fn summarize(runs: &[FloodRun]) -> Vec<FloodSummary> {
    MODES
        .iter()
        .filter_map(|&mode| {
            let mine: Vec<&FloodRun> = runs.iter().filter(|r| r.mode == mode).collect();
            if mine.is_empty() {
                return None;
            }
            let med = |f: &dyn Fn(&FloodRun) -> f64| {
                let mut v: Vec<f64> = mine.iter().map(|r| f(r)).collect();
                median(&mut v)
            };
            Some(FloodSummary {
                mode,
                keep_alive_retained: med(&|r| r.keep_alive_flooded / r.keep_alive.max(1e-9)),
                close_retained: med(&|r| r.close_flooded / r.close.max(1e-9)),
                offered_pps: med(&|r| r.offered_pps),
                received_pps: med(&|r| r.received_pps),
                cpu_ns_per_packet: med(&|r| r.cpu_ns_per_packet),
                errors_flooded: mine.iter().map(|r| r.errors_flooded).sum(),
            })
        })
        .collect()
}

/// The goal: xlb keeps >= 90% of both loads, and more than either peer.
pub fn goal(summary: &[FloodSummary], rate: u64) -> Option<Goal> {
    let of = |m| summary.iter().find(|s| s.mode == m);
    let xlb = of(Mode::XlbDefault)?;
    let peers: Vec<&FloodSummary> = [Mode::Nft, Mode::Haproxy]
        .into_iter()
        .filter_map(of)
        .collect();
    let ahead = peers.iter().all(|p| xlb.retained() > p.retained());
    let note = peers
        .iter()
        .map(|p| {
            format!(
                "{} {:.2} / {:.2}",
                p.mode.name(),
                p.keep_alive_retained,
                p.close_retained
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Some(Goal {
        what: "throughput kept under a SYN + UDP flood (keep-alive / close)".into(),
        target: format!("≥ {RETAINED_GOAL:.2}, ahead of nft and HAProxy"),
        measured: format!("{:.3} / {:.3}", xlb.keep_alive_retained, xlb.close_retained),
        met: Some(xlb.retained() >= RETAINED_GOAL && ahead),
        note: format!("{rate} SYN/s + {rate} UDP/s from a second client; this run: {note}"),
    })
}

pub fn table(summary: &[FloodSummary]) -> String {
    let mut s = String::from(
        "| mode | keep-alive kept | close kept | flood offered | taken in | CPU per flood packet | wrk errors (flooded) |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in summary {
        s += &format!(
            "| {} | {:.3} | {:.3} | {:.0} pps | {:.0} pps | {:.0} ns | {} |\n",
            f.mode.name(),
            f.keep_alive_retained,
            f.close_retained,
            f.offered_pps,
            f.received_pps,
            f.cpu_ns_per_packet,
            f.errors_flooded
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(mode: Mode, ka: f64, close: f64) -> FloodSummary {
        FloodSummary {
            mode,
            keep_alive_retained: ka,
            close_retained: close,
            offered_pps: 40_000.0,
            received_pps: 40_000.0,
            cpu_ns_per_packet: 500.0,
            errors_flooded: 0,
        }
    }

    #[test]
    fn the_goal_needs_both_loads_kept_and_both_peers_behind() {
        let peers = [
            summary(Mode::Nft, 0.80, 0.70),
            summary(Mode::Haproxy, 0.85, 0.60),
        ];
        let with = |xlb: FloodSummary| {
            let mut all = peers.to_vec();
            all.push(xlb);
            goal(&all, 20_000).unwrap().met
        };
        assert_eq!(with(summary(Mode::XlbDefault, 0.95, 0.93)), Some(true));
        assert_eq!(with(summary(Mode::XlbDefault, 0.95, 0.89)), Some(false));
        assert_eq!(with(summary(Mode::XlbDefault, 0.84, 0.95)), Some(false));
        assert!(goal(&peers, 20_000).is_none(), "no xlb run, no verdict");
    }

    #[test]
    fn retained_is_the_median_ratio_per_repetition() {
        let run = |rep, ka: f64, kaf: f64| FloodRun {
            rep,
            mode: Mode::XlbDefault,
            keep_alive: ka,
            keep_alive_flooded: kaf,
            close: 100.0,
            close_flooded: 50.0,
            errors_flooded: 1,
            offered_pps: 1.0,
            received_pps: 1.0,
            cpu_ns_per_packet: 1.0,
        };
        let s = summarize(&[
            run(0, 100.0, 90.0),
            run(1, 200.0, 100.0),
            run(2, 10.0, 10.0),
        ]);
        assert_eq!(s.len(), 1);
        assert!((s[0].keep_alive_retained - 0.9).abs() < 1e-9);
        assert!((s[0].close_retained - 0.5).abs() < 1e-9);
        assert_eq!(s[0].errors_flooded, 3);
    }
}
