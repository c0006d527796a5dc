//! BPF_PROG_TEST_RUN harness for the data path (katran fixtures, aya `prog_test_run.rs`).
//!
//! [`LoadedDatapath`] loads the real object with its maps pinned under a private directory,
//! provisions services through the production reconciler (never raw map writes) and runs
//! packets through `xlb_xdp` and `xlb_tc_egress`. [`Packet`] builds fixture frames, valid
//! ones or, by poking bytes afterwards at the offsets it reports, deliberately broken ones.
//! Its checksums are computed from scratch (RFC 1071), not with the data path's code.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, TestRunResult, Xdp},
};
use lb_common::{Counters, Reason};
use xlb::{
    config::Config,
    datapath::Datapath,
    layout::Layout,
    loader,
    reconcile::{AllAlive, Liveness, Reconciler},
    state::{DesiredState, Endpoint},
};

/// XDP verdicts (`enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// TC "unspec" / tcx "next" (-1), as BPF_PROG_TEST_RUN reports it: the raw 32-bit return.
pub const TC_ACT_UNSPEC: u32 = -1i32 as u32;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 flags/fragment-offset field bits (host order).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;

/// Offsets inside the IPv4 header.
pub const IP_TOT_LEN: usize = 2;
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// Offsets inside the TCP and UDP headers.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
pub const TCP_DOFF: usize = 12;
pub const TCP_CSUM: usize = 16;
pub const UDP_LEN: usize = 4;
pub const UDP_CSUM: usize = 6;

/// Room after the input in `data_out`: a rewrite may grow the packet (encapsulation).
const OUT_SLACK: usize = 256;

pub fn xdp_action_name(action: u32) -> String {
    match action {
        XDP_ABORTED => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        other => format!("unknown XDP action {other}"),
    }
}

/// What one test run returned.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub action: u32,
    /// The packet as the program left it (`data_size_out` bytes).
    pub data: Vec<u8>,
}

/// The global verdict counters, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonCounts(pub [u64; Reason::COUNT as usize]);

impl ReasonCounts {
    pub fn get(&self, reason: Reason) -> u64 {
        self.0[reason as usize]
    }

    /// Panics unless every counter moved from `before` by exactly `expected` (unlisted
    /// reasons by 0). `what` names the fixture in the message.
    pub fn assert_moved(&self, before: &ReasonCounts, expected: &[(Reason, u64)], what: &str) {
        let mut problems = String::new();
        for reason in Reason::ALL {
            let want: u64 = expected
                .iter()
                .filter(|(r, _)| *r == reason)
                .map(|(_, n)| n)
                .sum();
            let got = self.get(reason).wrapping_sub(before.get(reason));
            if got != want {
                let _ = write!(
                    problems,
                    "\n  {}: moved by {got}, expected {want}",
                    reason.name()
                );
            }
        }
        assert!(
            problems.is_empty(),
            "{what}: verdict counters are wrong:{problems}"
        );
    }
}

/// Deletes a pin directory (links, programs, maps) on drop, also when the test panics.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let detached = loader::detach(&self.0);
        // The ports detach kept for a next agent on this pin path, which never comes.
        let _ = std::fs::remove_file(xlb::snatheld::held_path(&self.0));
        if let Err(e) = detached {
            if std::thread::panicking() {
                eprintln!("removing {}: {e:#}", self.0.display());
            } else {
                panic!("removing {}: {e:#}", self.0.display());
            }
        }
    }
}

/// The data path loaded with private maps, provisioned through the reconciler. One load
/// allocates the 64 MiB ring map, so use one per test.
pub struct LoadedDatapath {
    reconciler: Reconciler,
    datapath: Datapath,
    ebpf: Ebpf,
    // Dropped last: the pins go after every fd above is closed.
    pins: PinDir,
}

impl LoadedDatapath {
    /// Loads the programs under `/sys/fs/bpf/xlb-test-<pid>-<n>` and applies `services`,
    /// the `[[service]]` tables of an xlb.toml (see [`service_toml`]).
    pub fn new(services: &str) -> LoadedDatapath {
        Self::sized(services, &Layout::default())
    }

    /// The same with the maps sized by `layout` (see `xlb::layout`).
    pub fn sized(services: &str, layout: &Layout) -> LoadedDatapath {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/sys/fs/bpf/xlb-test-{}-{n}", std::process::id()));
        // A leftover of an earlier process with the same pid would hand us its maps.
        if path.exists() {
            loader::detach(&path)
                .unwrap_or_else(|e| panic!("removing stale {}: {e:#}", path.display()));
        }
        let pins = PinDir(path);
        let mut ebpf = loader::load_sized(&pins.0, layout).unwrap_or_else(|e| {
            panic!(
                "loading the data path under {} (root?): {e:#}",
                pins.0.display()
            )
        });
        let datapath =
            loader::datapath(&mut ebpf).unwrap_or_else(|e| panic!("taking the maps: {e:#}"));
        let reconciler =
            Reconciler::adopt(&datapath).unwrap_or_else(|e| panic!("adopting fresh maps: {e:#}"));
        let mut dp = LoadedDatapath {
            reconciler,
            datapath,
            ebpf,
            pins,
        };
        dp.apply(services);
        dp
    }

    pub fn pin_path(&self) -> &Path {
        &self.pins.0
    }

    /// (name, instructions the verifier walked) of each program of the object, as the kernel
    /// reports them (`verified_insns`).
    pub fn verified_instructions(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .map(|(name, prog)| {
                let info = prog
                    .info()
                    .unwrap_or_else(|e| panic!("info of {name}: {e}"));
                let count = info
                    .verified_instruction_count()
                    .unwrap_or_else(|| panic!("{name}: the kernel reports no verified count"));
                (name.to_string(), count)
            })
            .collect()
    }

    /// Every map of the loaded programs, with the memory the kernel charges for it.
    pub fn kernel_maps(&self) -> Vec<xlb::layout::KernelMap> {
        xlb::layout::kernel_maps(&self.ebpf).unwrap_or_else(|e| panic!("reading the maps: {e:#}"))
    }

    /// Applies a new set of services with every backend alive.
    pub fn apply(&mut self, services: &str) {
        self.apply_with(services, &AllAlive);
    }

    /// Applies a new set of services with health decided by `live`.
    pub fn apply_with(&mut self, services: &str, live: &impl Liveness) {
        let desired = desired_state(services);
        let changes = self
            .reconciler
            .apply(&mut self.datapath, &desired, live)
            .unwrap_or_else(|e| panic!("applying the desired state: {e:#}"));
        assert!(
            changes.failed.is_empty(),
            "services not applied: {:?}",
            changes.failed
        );
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// For tests that write a map the reconciler owns (and then must not apply again).
    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// Makes `addr` a VIP address of the data path, behind the reconciler's back (a VIP
    /// address without a service).
    pub fn add_vip_addr(&mut self, addr: std::net::IpAddr) {
        use xlb::reconcile::Maps as _;
        let (family, addr) = lb_common::addr_words(addr);
        let key = lb_common::VipAddrKey {
            addr,
            family,
            _pad0: 0,
            _pad1: 0,
        };
        self.datapath
            .set_vip_addr(&key, 0)
            .expect("adding a VIP address");
    }

    pub fn service_id(&self, name: &str) -> u32 {
        self.service_ids()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("service {name} is not applied"))
            .1
    }

    /// Every applied service: (name, id).
    pub fn service_ids(&self) -> Vec<(String, u32)> {
        self.reconciler
            .applied()
            .into_iter()
            .map(|s| (s.name, s.id))
            .collect()
    }

    /// Backend endpoints of a service with their ids, as applied.
    pub fn backend_ids(&self, service: &str) -> Vec<(SocketAddrV4, u32)> {
        let svc = self
            .reconciler
            .applied()
            .into_iter()
            .find(|s| s.name == service)
            .unwrap_or_else(|| panic!("service {service} is not applied"));
        svc.backends
            .iter()
            .map(|(e, b)| (endpoint_v4(e), b.id))
            .collect()
    }

    pub fn backend_id(&self, service: &str, backend: SocketAddrV4) -> u32 {
        self.backend_ids(service)
            .into_iter()
            .find(|(e, _)| *e == backend)
            .unwrap_or_else(|| panic!("{backend} is not a backend of {service}"))
            .1
    }

    pub fn reasons(&self) -> ReasonCounts {
        let mut out = [0; Reason::COUNT as usize];
        for (reason, n) in self
            .datapath
            .reasons()
            .unwrap_or_else(|e| panic!("reading reasons: {e:#}"))
        {
            out[reason as usize] = n;
        }
        ReasonCounts(out)
    }

    pub fn service_counters(&self, id: u32) -> Counters {
        self.datapath
            .service_counters(id)
            .unwrap_or_else(|e| panic!("reading counters of service {id}: {e:#}"))
    }

    pub fn backend_counters(&self, id: u32) -> Counters {
        self.datapath
            .backend_counters(id)
            .unwrap_or_else(|e| panic!("reading counters of backend {id}: {e:#}"))
    }

    /// Runs `input` through the XDP program once.
    pub fn xdp(&self, input: &[u8]) -> RunResult {
        let prog: &Xdp = self
            .ebpf
            .program(loader::XDP_PROGRAM)
            .expect("the object has the XDP program")
            .try_into()
            .expect("xlb_xdp is an XDP program");
        run(input, loader::XDP_PROGRAM, |opts| prog.test_run(opts))
    }

    /// `xdp`, the frame without the delivery metadata XDP puts in front of a packet it hands
    /// to TC (BPF_PROG_TEST_RUN returns the metadata too).
    pub fn xdp_unmarked(&self, input: &[u8]) -> RunResult {
        let mut out = self.xdp(input);
        out.data = strip_delivery_meta(out.data);
        out
    }

    /// Runs `input` through the XDP program once: its verdict, and the run's time as the
    /// kernel measured it (one clock read included).
    pub fn xdp_timed(&self, input: &[u8]) -> (u32, std::time::Duration) {
        let prog: &Xdp = self
            .ebpf
            .program(loader::XDP_PROGRAM)
            .expect("the object has the XDP program")
            .try_into()
            .expect("xlb_xdp is an XDP program");
        let mut out = vec![0u8; input.len() + OUT_SLACK];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of the XDP program: {e:?}"));
        (result.return_value, result.duration)
    }

    /// Runs `input` (an Ethernet frame) through the TC egress program once.
    pub fn tc_egress(&self, input: &[u8]) -> RunResult {
        self.tc(loader::TC_EGRESS_PROGRAM, input)
    }

    /// Like [`LoadedDatapath::tc_egress`], but hands back the kernel's refusal of the run
    /// (it rejects some short frames before the program sees them) instead of panicking.
    pub fn try_tc_egress(&self, input: &[u8]) -> Result<RunResult, ProgramError> {
        self.try_tc(loader::TC_EGRESS_PROGRAM, input)
    }

    /// Runs `input` through the balancer at TC ingress (`xdp_mode = "tc"`) once.
    pub fn tc_balance(&self, input: &[u8]) -> RunResult {
        self.tc(loader::TC_BALANCE_PROGRAM, input)
    }

    /// Runs `input` through the TC reply program (fullnat/dsr replies at TC) once.
    pub fn tc_reply(&self, input: &[u8]) -> RunResult {
        self.tc(loader::TC_REPLY_PROGRAM, input)
    }

    fn tc(&self, name: &str, input: &[u8]) -> RunResult {
        run(input, name, |opts| self.classifier(name).test_run(opts))
    }

    fn try_tc(&self, name: &str, input: &[u8]) -> Result<RunResult, ProgramError> {
        try_run(input, name, |opts| self.classifier(name).test_run(opts))
    }

    fn classifier(&self, name: &str) -> &SchedClassifier {
        self.ebpf
            .program(name)
            .unwrap_or_else(|| panic!("the object has no program {name}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name} is not a classifier: {e}"))
    }
}

/// Runs `input` once through any XDP program (the decap program, say).
pub fn xdp_once(prog: &Xdp, name: &str, input: &[u8]) -> RunResult {
    run(input, name, |opts| prog.test_run(opts))
}

fn run(
    input: &[u8],
    name: &str,
    test_run: impl for<'a> FnOnce(TestRunOptions<'a>) -> Result<TestRunResult, ProgramError>,
) -> RunResult {
    try_run(input, name, test_run).unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN of {name} with {} bytes: {e:?}",
            input.len()
        )
    })
}

fn try_run(
    input: &[u8],
    name: &str,
    test_run: impl for<'a> FnOnce(TestRunOptions<'a>) -> Result<TestRunResult, ProgramError>,
) -> Result<RunResult, ProgramError> {
    let mut out = vec![0u8; input.len() + OUT_SLACK];
    let result = test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    })?;
    let size = result.data_size_out as usize;
    assert!(
        size <= out.len(),
        "{name}: data_size_out {size} exceeds the buffer"
    );
    out.truncate(size);
    Ok(RunResult {
        action: result.return_value,
        data: out,
    })
}

fn endpoint_v4(e: &Endpoint) -> SocketAddrV4 {
    match e.addr {
        std::net::IpAddr::V4(a) => SocketAddrV4::new(a, e.port),
        std::net::IpAddr::V6(_) => panic!("IPv6 backend {e} in a v4 test"),
    }
}

/// The desired state of an xlb.toml made of `services` and a dummy `[agent]` section.
pub fn desired_state(services: &str) -> DesiredState {
    let text = format!("[agent]\ninterfaces = [\"xlbtest0\"]\n\n{services}");
    let config = Config::parse(Path::new("datapath-test.toml"), &text)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n--- config ---\n{text}"));
    DesiredState::from_config(&config)
}

/// The same without the config's checks: for a benchmark that needs what `xlb check`
/// refuses (a service whose backend is its own VIP, so that a repeated run stays the same).
pub fn unchecked_desired_state(services: &str) -> DesiredState {
    let text = format!("[agent]\ninterfaces = [\"xlbtest0\"]\n\n{services}");
    let config: Config = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("test config does not parse:\n{e}\n--- config ---\n{text}"));
    DesiredState::from_config(&config)
}

/// One `[[service]]` table in nat mode, health checks off, with `(backend, weight)` pairs.
pub fn service_toml<A: Into<std::net::SocketAddr> + Copy>(
    name: &str,
    vip: A,
    protocol: &str,
    backends: &[(A, u32)],
) -> String {
    let vip: std::net::SocketAddr = vip.into();
    let mut s = format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{}\"\nport = {}\nprotocol = \"{protocol}\"\nmode = \"nat\"\n\
         [service.health]\ntype = \"none\"\n",
        vip.ip(),
        vip.port()
    );
    for (backend, weight) in backends {
        let backend: std::net::SocketAddr = (*backend).into();
        let _ = write!(
            s,
            "[[service.backend]]\naddress = \"{}\"\nport = {}\nweight = {weight}\n",
            backend.ip(),
            backend.port()
        );
    }
    s
}

/// Transport layer of a fixture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
    },
    /// `checksum: false` sends 0 ("no checksum").
    Udp {
        sport: u16,
        dport: u16,
        checksum: bool,
    },
    IcmpEcho {
        id: u16,
        seq: u16,
    },
    /// Any other protocol number: the payload follows the IP header directly.
    Other(u8),
}

/// An Ethernet + IPv4 fixture frame. Build it with the constructors and `with_*` methods;
/// [`Packet::build`] fills in lengths and checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// 802.1Q/802.1ad tags, outermost first: (TPID, TCI).
    pub vlans: Vec<(u16, u16)>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset (host order).
    pub frag: u16,
    pub ttl: u8,
    /// IPv4 options, a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub l4: L4,
    /// TCP options (a multiple of 4 bytes); the data offset follows.
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Bytes after the IPv4 packet (Ethernet padding), not covered by any length or checksum.
    pub padding: usize,
}

impl Packet {
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Packet {
        Packet {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlans: Vec::new(),
            src,
            dst,
            tos: 0,
            id: 0x1234,
            frag: IP_DF,
            ttl: 64,
            options: Vec::new(),
            l4,
            tcp_options: Vec::new(),
            payload: Vec::new(),
            padding: 0,
        }
    }

    /// A TCP segment (ACK set, no payload).
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Packet {
        let l4 = L4::Tcp {
            sport: src.port(),
            dport: dst.port(),
            seq: 0x0102_0304,
            ack: 0x0a0b_0c0d,
            flags: TCP_ACK,
            window: 64240,
        };
        Packet::ipv4(*src.ip(), *dst.ip(), l4)
    }

    /// A UDP datagram with a checksum (no payload).
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Packet {
        let l4 = L4::Udp {
            sport: src.port(),
            dport: dst.port(),
            checksum: true,
        };
        Packet::ipv4(*src.ip(), *dst.ip(), l4)
    }

    /// An ICMP echo request.
    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Packet {
        Packet::ipv4(src, dst, L4::IcmpEcho { id: 7, seq: 1 }).with_payload(*b"ping")
    }

    /// IPv4 with another protocol number and `payload` as its body.
    pub fn other(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Packet {
        Packet::ipv4(src, dst, L4::Other(proto))
    }

    pub fn with_tcp_flags(mut self, new: u8) -> Packet {
        match &mut self.l4 {
            L4::Tcp { flags, .. } => *flags = new,
            other => panic!("with_tcp_flags on {other:?}"),
        }
        self
    }

    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Packet {
        self.payload = payload.into();
        self
    }

    pub fn with_tcp_options(mut self, options: impl Into<Vec<u8>>) -> Packet {
        assert!(
            matches!(self.l4, L4::Tcp { .. }),
            "TCP options on {:?}",
            self.l4
        );
        self.tcp_options = options.into();
        assert!(
            self.tcp_options.len().is_multiple_of(4) && self.tcp_options.len() <= 40,
            "bad TCP options length"
        );
        self
    }

    pub fn with_vlan(mut self, tpid: u16, tci: u16) -> Packet {
        self.vlans.push((tpid, tci));
        self
    }

    pub fn with_options(mut self, options: impl Into<Vec<u8>>) -> Packet {
        self.options = options.into();
        assert!(
            self.options.len().is_multiple_of(4) && self.options.len() <= 40,
            "bad options length"
        );
        self
    }

    pub fn with_frag(mut self, frag: u16) -> Packet {
        self.frag = frag;
        self
    }

    pub fn with_padding(mut self, bytes: usize) -> Packet {
        self.padding = bytes;
        self
    }

    pub fn without_udp_checksum(mut self) -> Packet {
        match &mut self.l4 {
            L4::Udp { checksum, .. } => *checksum = false,
            other => panic!("without_udp_checksum on {other:?}"),
        }
        self
    }

    /// Source address and port (the port only for TCP/UDP).
    pub fn with_src(mut self, src: SocketAddrV4) -> Packet {
        self.src = *src.ip();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = src.port(),
            _ => {}
        }
        self
    }

    /// Destination address and port (the port only for TCP/UDP).
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Packet {
        self.dst = *dst.ip();
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = dst.port(),
            _ => {}
        }
        self
    }

    pub fn src_sock(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.src, self.ports().0)
    }

    pub fn dst_sock(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst, self.ports().1)
    }

    fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
            _ => (0, 0),
        }
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::IcmpEcho { .. } => 1,
            L4::Other(p) => p,
        }
    }

    /// Offset of the IPv4 header in the frame.
    pub fn l3_off(&self) -> usize {
        14 + 4 * self.vlans.len()
    }

    /// Offset of the transport header in the frame.
    pub fn l4_off(&self) -> usize {
        self.l3_off() + 20 + self.options.len()
    }

    /// Length of the IPv4 packet (its total length field).
    pub fn ip_len(&self) -> usize {
        self.l4_off() - self.l3_off() + self.l4_header_len() + self.payload.len()
    }

    fn l4_header_len(&self) -> usize {
        match self.l4 {
            L4::Tcp { .. } => 20 + self.tcp_options.len(),
            L4::Udp { .. } | L4::IcmpEcho { .. } => 8,
            L4::Other(_) => 0,
        }
    }

    /// The frame, with lengths and checksums computed from scratch.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(self.l3_off() + self.ip_len() + self.padding);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, tci) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());

        let ihl = 5 + self.options.len() / 4;
        let mut ip = vec![(4 << 4) | ihl as u8, self.tos];
        ip.extend_from_slice(&(self.ip_len() as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[self.ttl, self.proto(), 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let check = checksum(&[&ip]);
        ip[IP_CSUM..IP_CSUM + 2].copy_from_slice(&check.to_be_bytes());
        f.extend_from_slice(&ip);

        let mut l4 = Vec::new();
        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                window,
            } => {
                l4.extend_from_slice(&sport.to_be_bytes());
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&seq.to_be_bytes());
                l4.extend_from_slice(&ack.to_be_bytes());
                let doff = 5 + self.tcp_options.len() / 4;
                l4.extend_from_slice(&[(doff << 4) as u8, flags]);
                l4.extend_from_slice(&window.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]);
                l4.extend_from_slice(&self.tcp_options);
                l4.extend_from_slice(&self.payload);
                let check = checksum(&[&self.pseudo_header(l4.len()), &l4]);
                l4[TCP_CSUM..TCP_CSUM + 2].copy_from_slice(&check.to_be_bytes());
            }
            L4::Udp {
                sport,
                dport,
                checksum: with,
            } => {
                let len = 8 + self.payload.len();
                l4.extend_from_slice(&sport.to_be_bytes());
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&(len as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(&self.payload);
                if with {
                    // A computed 0 is sent as 0xffff: 0 means "no checksum" (RFC 768).
                    let check = match checksum(&[&self.pseudo_header(len), &l4]) {
                        0 => 0xffff,
                        c => c,
                    };
                    l4[UDP_CSUM..UDP_CSUM + 2].copy_from_slice(&check.to_be_bytes());
                }
            }
            L4::IcmpEcho { id, seq } => {
                l4.extend_from_slice(&[8, 0, 0, 0]);
                l4.extend_from_slice(&id.to_be_bytes());
                l4.extend_from_slice(&seq.to_be_bytes());
                l4.extend_from_slice(&self.payload);
                let check = checksum(&[&l4]);
                l4[2..4].copy_from_slice(&check.to_be_bytes());
            }
            L4::Other(_) => l4.extend_from_slice(&self.payload),
        }
        f.extend_from_slice(&l4);
        // Not zeros, so a data path that reads padding as data shows up in the checksums.
        f.extend((0..self.padding).map(|i| 0xa5 ^ i as u8));
        f
    }

    fn pseudo_header(&self, l4_len: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&[0, self.proto()]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p
    }
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request (who has `target`?).
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// An IPv6 TCP SYN frame (checksum not filled in: nothing reads it here).
pub fn ipv6_tcp_syn(dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend_from_slice(&[0xfd, 0x99, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0xfd, 0x99, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        5 << 4,
        TCP_SYN,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    f
}

/// Panics with both frames in hex and the first differing offset unless they are equal.
pub fn assert_frame_eq(expected: &[u8], actual: &[u8], what: &str) {
    if expected == actual {
        return;
    }
    let first = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    panic!(
        "{what}: output differs from the expected frame at offset {first} \
         (expected {} bytes, got {})\nexpected:\n{}actual:\n{}",
        expected.len(),
        actual.len(),
        hexdump(expected, first),
        hexdump(actual, first)
    );
}

/// 16 bytes a line; the byte at `mark` is bracketed.
pub fn hexdump(bytes: &[u8], mark: usize) -> String {
    let mut s = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "  {:04x}:", i * 16);
        for (j, b) in line.iter().enumerate() {
            if i * 16 + j == mark {
                let _ = write!(s, "[{b:02x}]");
            } else {
                let _ = write!(s, " {b:02x}");
            }
        }
        s.push('\n');
    }
    s
}

/// Reads a big-endian u16 at `off`.
pub fn be16(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

/// Writes a big-endian u16 at `off`.
pub fn put_be16(frame: &mut [u8], off: usize, v: u16) {
    frame[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Reads an IPv4 address at `off`.
pub fn ipv4_at(frame: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[off], frame[off + 1], frame[off + 2], frame[off + 3])
}

/// `data` without the delivery metadata XDP puts in front of a packet it hands to TC.
pub fn strip_delivery_meta(mut data: Vec<u8>) -> Vec<u8> {
    let meta = size_of::<lb_common::DeliverMeta>();
    if data.len() > meta && data[..4] == lb_common::DELIVER_MAGIC.to_ne_bytes() {
        data.drain(..meta);
    }
    data
}
