//! Microbenchmarks: the XDP program under BPF_PROG_TEST_RUN, and Maglev (table build time
//! from criterion's estimates, fraction of slots moved when one backend leaves).
//!
//! How the XDP numbers are taken (BPF_PROG_TEST_RUN rewrites its one copy of the packet in
//! place, so with `repeat` every run after the first would see the *rewritten* packet):
//!
//! - established, `repeat`: a service whose only backend is its own VIP:port, so the DNAT
//!   writes the same values back (the same loads, stores and checksum arithmetic) and every
//!   repetition takes the conntrack-hit path. The kernel reports the mean time per run; the
//!   verdict and flow counters confirm that all N runs were forwarded and none was new.
//! - new flow: a flow cannot be new twice, so K distinct SYNs each run once (repeat = 1).
//!   The kernel's reported time of a single run includes one clock read; it is measured the
//!   same way for a two-instruction XDP program (`return XDP_PASS`) and subtracted. Medians
//!   over K runs. Taken on empty maps, and again once conntrack is full (LRU eviction on
//!   every insert, the steady state of a busy LB).
//! - established, per packet: the same K packets again (now conntrack hits), measured the
//!   same way as new flows, as a cross-check of the `repeat` figure.
//! - reply: the looped flow's reply through the TC egress program (reverse NAT), `repeat`,
//!   with the same idempotent rewrite; the RevNat counter confirms every run rewrote.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{SchedClassifier, Xdp};
use lb_common::{
    Reason,
    sizes::{DEFAULT_RING_SIZE, MAX_RING_SIZE},
};
use serde::{Deserialize, Serialize};
use xlb::{
    datapath::Datapath,
    loader,
    maglev::{MaglevBackend, build_table},
    reconcile::{AllAlive, Reconciler},
};
use xlb_tests::testrun::{Packet, TCP_SYN, XDP_PASS, service_toml, unchecked_desired_state};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
/// The service whose backend is itself (see the module doc).
const LOOP_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 1);
const LOOP_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 2);
/// Distinct v6 SYNs: with the v4 ones they stay within the embryonic table.
const V6_FLOWS: usize = 10_000;
/// XLB_CONNTRACK_V1's capacity (lb-common sizes).
const CONNTRACK_ENTRIES: usize = 262_144;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XdpResult {
    /// Runs per BPF_PROG_TEST_RUN call in the `repeat` measurement, and calls made.
    pub repeat: u32,
    pub repeat_calls: u32,
    /// Established flow, mean per run as the kernel reports it with `repeat` (median of the
    /// calls).
    pub established_repeat_ns: f64,
    /// The empty program under the same `repeat`: the test loop's own cost per run.
    pub empty_repeat_ns: f64,
    /// Distinct packets run once each, per phase.
    pub flows: usize,
    /// The empty program's single-run time (clock read included): subtracted below.
    pub empty_single_ns: f64,
    /// New flow on empty maps, median single-run time minus the empty program's.
    pub new_flow_ns: f64,
    /// New flow while conntrack is full (every insert evicts).
    pub new_flow_full_ns: f64,
    /// The same packets once their flows exist, measured like new flows.
    pub established_single_ns: f64,
    /// Means, for the record (the medians above resist interrupts).
    pub new_flow_mean_ns: f64,
    pub established_single_mean_ns: f64,
    /// TC egress reverse NAT of a reply (an established flow), `repeat`, same trick.
    pub tc_reply_repeat_ns: f64,
    /// The empty classifier under the same `repeat`.
    pub tc_empty_repeat_ns: f64,
    /// What tracing costs (None in reports from before it was measured).
    #[serde(default)]
    pub trace: Option<crate::tracecost::TraceCost>,
    /// The same cases over IPv6 (None in reports from before they were measured).
    #[serde(default)]
    pub v6: Option<V6Result>,
}

/// IPv6 (mode nat), measured as the v4 cases beside them in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct V6Result {
    pub established_repeat_ns: f64,
    pub established_single_ns: f64,
    pub new_flow_ns: f64,
}

/// Pinned maps and programs of this benchmark, removed on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = loader::detach(&self.0) {
            eprintln!("removing {}: {e:#}", self.0.display());
        }
    }
}

/// One loaded object with the benchmark's services applied; unpinned on drop.
pub(crate) struct Instance {
    pub ebpf: aya::Ebpf,
    pub datapath: Datapath,
    pub web_id: u32,
    pub loop_id: u32,
    pub web6_id: u32,
    pub loop6_id: u32,
    pub pin_path: PathBuf,
    _reconciler: Reconciler,
    _pins: Pins,
}

impl Instance {
    /// The XDP program's fd.
    pub fn xdp_fd(&self) -> Result<i32> {
        let prog: &Xdp = self
            .ebpf
            .program(loader::XDP_PROGRAM)
            .context("no XDP program in the object")?
            .try_into()?;
        Ok(prog.fd()?.as_fd().as_raw_fd())
    }
}

/// Loads the object under a pin path of its own (`name`) and applies the two services.
pub(crate) fn instance(name: &str, trace_hooks: bool) -> Result<Instance> {
    let pin_path = PathBuf::from(format!("/sys/fs/bpf/{name}-{}", std::process::id()));
    if pin_path.exists() {
        loader::detach(&pin_path)?;
    }
    let pins = Pins(pin_path.clone());
    let mut ebpf = if trace_hooks {
        loader::load(&pin_path)?
    } else {
        loader::load_without_trace_hooks(&pin_path)?
    };
    let mut datapath = loader::datapath(&mut ebpf)?;
    let mut reconciler = Reconciler::adopt(&datapath)?;
    let backends: Vec<(SocketAddrV4, u32)> = (11..=13)
        .map(|i| (SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, i), 80), 100))
        .collect();
    let web = SocketAddrV4::new(VIP, 80);
    let looped = SocketAddrV4::new(LOOP_VIP, 80);
    let backends6: Vec<(SocketAddr, u32)> = (0x11..=0x13)
        .map(|i| {
            let addr = Ipv6Addr::new(0xfd99, 2, 0, 0, 0, 0, 0, i);
            (SocketAddr::new(addr.into(), 80), 100)
        })
        .collect();
    let web6 = SocketAddr::new(VIP6.into(), 80);
    let looped6 = SocketAddr::new(LOOP_VIP6.into(), 80);
    let services = service_toml("web", web, "tcp", &backends)
        + &service_toml("loop", looped, "tcp", &[(looped, 100)])
        + &service_toml("web6", web6, "tcp", &backends6)
        + &service_toml("loop6", looped6, "tcp", &[(looped6, 100)]);
    // The looped service is one `xlb check` refuses (its backend is a VIP).
    reconciler.apply(
        &mut datapath,
        &unchecked_desired_state(&services),
        &AllAlive,
    )?;
    let ids: Vec<(String, u32)> = reconciler
        .applied()
        .into_iter()
        .map(|s| (s.name, s.id))
        .collect();
    let id = |name: &str| {
        ids.iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .expect("applied")
    };
    let (web_id, loop_id) = (id("web"), id("loop"));
    Ok(Instance {
        ebpf,
        datapath,
        web_id,
        loop_id,
        web6_id: id("web6"),
        loop6_id: id("loop6"),
        pin_path,
        _reconciler: reconciler,
        _pins: pins,
    })
}

pub fn xdp(quick: bool, cpu: usize) -> Result<XdpResult> {
    crate::cpu::pin_thread(cpu)?;
    let main = instance("xlb-bench", true)?;
    let (datapath, web_id, loop_id) = (&main.datapath, main.web_id, main.loop_id);
    let xlb_fd = main.xdp_fd()?;
    let web = SocketAddrV4::new(VIP, 80);
    let looped = SocketAddrV4::new(LOOP_VIP, 80);
    let empty = load_empty(BPF_PROG_TYPE_XDP, XDP_PASS as i32)?;
    let empty_fd = empty.as_raw_fd();
    let tc: &SchedClassifier = main
        .ebpf
        .program(loader::TC_EGRESS_PROGRAM)
        .context("no TC egress program in the object")?
        .try_into()?;
    let tc_fd = tc.fd()?.as_fd().as_raw_fd();
    let tc_empty = load_empty(BPF_PROG_TYPE_SCHED_CLS, -1)?;

    // Fewer flows than the embryonic table holds: the second pass must find them all.
    let (repeat, calls, flows) = if quick {
        (100_000, 3, 20_000)
    } else {
        (1_000_000, 7, 50_000)
    };
    const { assert!(50_000 + V6_FLOWS < lb_common::sizes::EMBRYONIC_SIZE as usize) };

    // Established, with repeat.
    let client = SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 40000);
    let pkt = Packet::tcp(client, looped).build();
    let (ret, _) = test_run(xlb_fd, &pkt, 1)?;
    check_pass(ret)?;
    let before = (forwarded(datapath)?, datapath.service_counters(loop_id)?);
    let mut times = Vec::new();
    for _ in 0..calls {
        let (ret, ns) = test_run(xlb_fd, &pkt, repeat)?;
        check_pass(ret)?;
        times.push(ns as f64);
    }
    let after = (forwarded(datapath)?, datapath.service_counters(loop_id)?);
    let runs = u64::from(repeat) * u64::from(calls);
    if after.0 - before.0 != runs
        || after.1.packets - before.1.packets != runs
        || after.1.new_flows != before.1.new_flows
    {
        bail!(
            "the repeat runs did not all take the established path: forwarded +{}, \
             packets +{}, new flows +{} (expected +{runs}, +{runs}, +0)",
            after.0 - before.0,
            after.1.packets - before.1.packets,
            after.1.new_flows - before.1.new_flows
        );
    }
    let established_repeat_ns = median(&mut times);
    let trace = crate::tracecost::measure(&main, &pkt, repeat, calls)?;
    let mut empty_times = Vec::new();
    for _ in 0..calls {
        empty_times.push(test_run(empty_fd, &pkt, repeat)?.1 as f64);
    }
    let empty_repeat_ns = median(&mut empty_times);

    // The reply of that flow through TC egress (reverse NAT from "backend" VIP:80 to VIP:80:
    // the same idempotent rewrite).
    let reply = Packet::tcp(looped, client).build();
    let rev_before = reason(datapath, Reason::RevNat)?;
    let mut tc_times = Vec::new();
    let mut tc_empty_times = Vec::new();
    for _ in 0..calls {
        let (ret, ns) = test_run(tc_fd, &reply, repeat)?;
        if ret != TC_ACT_UNSPEC {
            bail!("TC egress returned {ret} for a reply");
        }
        tc_times.push(ns as f64);
        tc_empty_times.push(test_run(tc_empty.as_raw_fd(), &reply, repeat)?.1 as f64);
    }
    let rev_moved = reason(datapath, Reason::RevNat)? - rev_before;
    if rev_moved != runs {
        bail!("TC egress rewrote {rev_moved} of {runs} replies");
    }

    // New flows, then the same flows established, one run each.
    let packets: Vec<Vec<u8>> = (0..flows).map(|i| syn(i, web)).collect();
    let empty_single = single_runs(empty_fd, &packets, None)?;
    let new_before = datapath.service_counters(web_id)?;
    let new = single_runs(xlb_fd, &packets, Some(datapath))?;
    let new_after = datapath.service_counters(web_id)?;
    if new_after.new_flows - new_before.new_flows != flows as u64 {
        bail!(
            "{flows} distinct SYNs made {} new flows",
            new_after.new_flows - new_before.new_flows
        );
    }
    let est = single_runs(xlb_fd, &packets, Some(datapath))?;
    if datapath.service_counters(web_id)?.new_flows != new_after.new_flows {
        bail!("known flows were counted as new");
    }
    // IPv6 beside it, before conntrack is filled.
    let v6 = xdp6(&main, repeat, calls, V6_FLOWS, empty_single.median)?;

    // Fill conntrack past its capacity, then new flows again: every insert evicts.
    let fill: Vec<Vec<u8>> = (flows..flows + CONNTRACK_ENTRIES)
        .map(|i| syn(i, web))
        .collect();
    single_runs(xlb_fd, &fill, None)?;
    drop(fill);
    let more: Vec<Vec<u8>> = (flows + CONNTRACK_ENTRIES..2 * flows + CONNTRACK_ENTRIES)
        .map(|i| syn(i, web))
        .collect();
    let full = single_runs(xlb_fd, &more, Some(datapath))?;

    let base = empty_single.median;
    Ok(XdpResult {
        repeat,
        repeat_calls: calls,
        established_repeat_ns,
        empty_repeat_ns,
        flows,
        empty_single_ns: base,
        new_flow_ns: new.median - base,
        new_flow_full_ns: full.median - base,
        established_single_ns: est.median - base,
        new_flow_mean_ns: new.mean - empty_single.mean,
        established_single_mean_ns: est.mean - empty_single.mean,
        tc_reply_repeat_ns: median(&mut tc_times),
        tc_empty_repeat_ns: median(&mut tc_empty_times),
        trace: Some(trace),
        v6: Some(v6),
    })
}

/// The established and new-flow cases over IPv6, as `xdp` takes them over IPv4 (`base`:
/// the empty program's single-run time).
fn xdp6(main: &Instance, repeat: u32, calls: u32, flows: usize, base: f64) -> Result<V6Result> {
    let (datapath, fd) = (&main.datapath, main.xdp_fd()?);
    let client = SocketAddrV6::new(Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 2), 40000, 0, 0);
    let looped = SocketAddrV6::new(LOOP_VIP6, 80, 0, 0);
    let pkt = tcp6(client, looped, TCP_SYN);
    check_pass(test_run(fd, &pkt, 1)?.0)?;
    let before = datapath.service_counters(main.loop6_id)?;
    let mut times = Vec::new();
    for _ in 0..calls {
        let (ret, ns) = test_run(fd, &pkt, repeat)?;
        check_pass(ret)?;
        times.push(f64::from(ns));
    }
    let after = datapath.service_counters(main.loop6_id)?;
    let runs = u64::from(repeat) * u64::from(calls);
    if after.packets - before.packets != runs || after.new_flows != before.new_flows {
        bail!(
            "the v6 repeat runs did not all take the established path: packets +{}, new \
             flows +{}",
            after.packets - before.packets,
            after.new_flows - before.new_flows
        );
    }
    let web = SocketAddrV6::new(VIP6, 80, 0, 0);
    let packets: Vec<Vec<u8>> = (0..flows)
        .map(|i| {
            let src = Ipv6Addr::new(0xfd99, 0x64, 0, 0, 0, 0, (i / 50_000) as u16, 1);
            let src = SocketAddrV6::new(src, 10_000 + (i % 50_000) as u16, 0, 0);
            tcp6(src, web, TCP_SYN)
        })
        .collect();
    let new_before = datapath.service_counters(main.web6_id)?;
    let new = single_runs(fd, &packets, Some(datapath))?;
    let made = datapath.service_counters(main.web6_id)?.new_flows - new_before.new_flows;
    if made != flows as u64 {
        bail!("{flows} distinct v6 SYNs made {made} new flows");
    }
    let est = single_runs(fd, &packets, Some(datapath))?;
    Ok(V6Result {
        established_repeat_ns: median(&mut times),
        established_single_ns: est.median - base,
        new_flow_ns: new.median - base,
    })
}

/// An untagged IPv6 TCP frame without payload or extension headers (TestRun needs no valid
/// checksum: the program updates it incrementally).
fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, lb_common::PROTO_TCP, 64]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// Flow i: a SYN from a distinct (address, port) to `dst`.
fn syn(i: usize, dst: SocketAddrV4) -> Vec<u8> {
    let addr = u32::from(Ipv4Addr::new(10, 100, 0, 0)) + (i / 50_000) as u32;
    let src = SocketAddrV4::new(Ipv4Addr::from(addr), 10_000 + (i % 50_000) as u16);
    Packet::tcp(src, dst).with_tcp_flags(TCP_SYN).build()
}

struct Single {
    median: f64,
    mean: f64,
}

/// Runs each packet once; with `datapath`, checks that every one was forwarded.
fn single_runs(fd: i32, packets: &[Vec<u8>], datapath: Option<&Datapath>) -> Result<Single> {
    let before = datapath.map(forwarded).transpose()?;
    let mut times = Vec::with_capacity(packets.len());
    for p in packets {
        let (ret, ns) = test_run(fd, p, 1)?;
        check_pass(ret)?;
        times.push(ns as f64);
    }
    if let (Some(dp), Some(before)) = (datapath, before) {
        let moved = forwarded(dp)? - before;
        if moved != packets.len() as u64 {
            bail!("{} packets, {moved} counted as forwarded", packets.len());
        }
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(Single {
        median: median(&mut times),
        mean,
    })
}

fn forwarded(dp: &Datapath) -> Result<u64> {
    reason(dp, Reason::Forwarded)
}

fn reason(dp: &Datapath, which: Reason) -> Result<u64> {
    Ok(dp
        .reasons()?
        .into_iter()
        .find(|(r, _)| *r == which)
        .map_or(0, |(_, n)| n))
}

pub(crate) fn check_pass(ret: u32) -> Result<()> {
    if ret != XDP_PASS {
        bail!("the XDP program returned {ret}, not XDP_PASS");
    }
    Ok(())
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// TC "unspec" (-1) as BPF_PROG_TEST_RUN reports it.
const TC_ACT_UNSPEC: u32 = u32::MAX;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a bpf_attr prefix of the size we pass; the kernel zero-extends it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `r0 = ret; exit`: a baseline whose time is the test harness's own.
fn load_empty(prog_type: u32, ret: i32) -> Result<OwnedFd> {
    // mov64 r0, imm (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT).
    let [a, b, c, d] = ret.to_le_bytes();
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, a, b, c, d]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading an empty program")?;
    // SAFETY: a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One BPF_PROG_TEST_RUN: (return value, mean ns per run as the kernel measured it).
pub(crate) fn test_run(prog_fd: i32, data: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    Ok((attr.retval, attr.duration))
}

/// What criterion measured for one benchmark (ns).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CriterionEstimate {
    pub median_ns: f64,
    /// 0 when read from results rebuilt from the published tables, which do not show it.
    #[serde(default)]
    pub mean_ns: f64,
    pub mean_low_ns: f64,
    pub mean_high_ns: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaglevResult {
    pub table_size: u32,
    pub backends: usize,
    /// From `cargo bench -p lb-userspace --bench maglev` (None if it has not run).
    pub build: Option<CriterionEstimate>,
    /// A quick in-process timing of the same build (median of a few), as a cross-check.
    pub build_inline_ns: f64,
    /// Fraction of the table's slots that changed backend when one backend was removed
    /// (mean and worst over the removals tried); 1/N is the minimum possible.
    pub removals_tried: usize,
    pub moved_mean: f64,
    pub moved_max: f64,
}

/// (table size, backends) measured: the default table, and the largest at N = 100 (the
/// table an operator picks to move at most 1.1/N there).
pub const MAGLEV_CASES: [(u32, usize); 4] = [
    (DEFAULT_RING_SIZE, 10),
    (DEFAULT_RING_SIZE, 100),
    (DEFAULT_RING_SIZE, 1000),
    (MAX_RING_SIZE, 100),
];

/// The backend keys the criterion bench uses too.
pub fn maglev_keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.99.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

pub fn maglev(criterion_dir: &Path, quick: bool) -> Result<Vec<MaglevResult>> {
    let mut out = Vec::new();
    for (m, n) in MAGLEV_CASES {
        let keys = maglev_keys(n);
        let backends: Vec<MaglevBackend<'_>> = keys
            .iter()
            .map(|k| MaglevBackend {
                key: k,
                weight: 100,
            })
            .collect();
        let mut times = Vec::new();
        let mut full = Vec::new();
        for _ in 0..if quick { 3 } else { 11 } {
            let t = Instant::now();
            full = build_table(&backends, m);
            times.push(t.elapsed().as_nanos() as f64);
        }
        let tries = n.min(if quick { 3 } else { 10 });
        let mut fractions = Vec::new();
        for t in 0..tries {
            let removed = t * n / tries;
            let rest: Vec<MaglevBackend<'_>> = backends
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, b)| *b)
                .collect();
            let table = build_table(&rest, m);
            let moved = full
                .iter()
                .zip(&table)
                .filter(|(a, b)| backends[**a as usize].key != rest[**b as usize].key)
                .count();
            fractions.push(moved as f64 / f64::from(m));
        }
        out.push(MaglevResult {
            table_size: m,
            backends: n,
            build: read_criterion(criterion_dir, m, n),
            build_inline_ns: median(&mut times),
            removals_tried: tries,
            moved_mean: fractions.iter().sum::<f64>() / tries as f64,
            moved_max: fractions.iter().copied().fold(0.0, f64::max),
        });
    }
    Ok(out)
}

/// Criterion's group names: `maglev_build` for the default table, `maglev_build_M` for others
/// (lb-userspace/benches/maglev.rs).
fn read_criterion(dir: &Path, m: u32, n: usize) -> Option<CriterionEstimate> {
    let group = if m == DEFAULT_RING_SIZE {
        "maglev_build".to_string()
    } else {
        format!("maglev_build_{m}")
    };
    let path = dir.join(format!("{group}/{n}/new/estimates.json"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let get = |k: &str| json[k]["point_estimate"].as_f64();
    Some(CriterionEstimate {
        median_ns: get("median")?,
        mean_ns: get("mean")?,
        mean_low_ns: json["mean"]["confidence_interval"]["lower_bound"].as_f64()?,
        mean_high_ns: json["mean"]["confidence_interval"]["upper_bound"].as_f64()?,
    })
}
