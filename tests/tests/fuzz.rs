//! Fuzzing the data path (issue 6): random and mutated frames through BPF_PROG_TEST_RUN,
//! each judged by an independent reference model of the verdict table in
//! docs/architecture.md.
//!
//! XDP must answer every frame with XDP_PASS or XDP_DROP, the action of the verdict the model
//! gives it. It must leave every frame byte for byte as it came, unless the model calls it a
//! well-formed IPv4 TCP/UDP packet to the VIP:port of a service with backends: then only the
//! destination address and port (now one of that service's backends, the same one for every
//! packet of a flow) and the two checksums may change, and the checksums must stay right: a
//! correct one stays correct (exactly the value computed from scratch), a wrong one stays
//! exactly as wrong (the data path does not judge checksums, the kernel does), and a UDP
//! checksum of 0 stays 0. The verdict counters must move as the model says, checked once per
//! batch (a few map reads per batch instead of per packet); a batch that disagrees is
//! replayed packet by packet to name the culprit. The service and backend counters, and at
//! the end the conntrack and reverse NAT maps, must match the forwarded packets.
//!
//! TC egress gets replies of the flows XDP created, as they are or mutated, and random
//! frames: it must return -1 for every one and change only replies of known flows (source
//! back to the VIP, under the same checksum rules).
//!
//! `cargo test` runs a fixed-seed corpus of 100k frames (CI). The full run:
//! `XLB_FUZZ_PACKETS=1000000 cargo test --release -p xlb-tests --test fuzz -- --nocapture`;
//! `XLB_FUZZ_SEED` (decimal or 0x-hex) picks another corpus. A failure names the seed, the
//! frame's index and the frame itself (hex). An XDP frame depends on (seed, index) alone; a
//! TC frame also on the flows XDP created before it.
//!
//! Needs root and BPF, like tests/datapath.rs.
use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya::{programs::ProgramError, sys::SyscallError};
use lb_common::{FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP, Reason, addr_words};
use xlb_tests::testrun::*;

/// Frames of a `cargo test` run (CI); `XLB_FUZZ_PACKETS` overrides.
const DEFAULT_PACKETS: u64 = 100_000;
/// "xlb_fuzz"; `XLB_FUZZ_SEED` overrides.
const DEFAULT_SEED: u64 = 0x786c_625f_6675_7a7a;
/// XDP frames between two reads of the verdict counters.
const BATCH: u64 = 10_000;
/// TC egress frames per XDP frame.
const TC_SHARE: u64 = 4;
/// Frames stay well below what BPF_PROG_TEST_RUN takes without fragments (~3.5 KiB).
const MAX_FRAME: usize = 1600;
/// Below this many flows neither conntrack nor reverse NAT (262144 entries each) evicts, so
/// the new-flow counters and the maps themselves must match the model exactly.
const EXACT_FLOWS: usize = 200_000;
/// A UDP flow idle this long may have expired (30 s, last_seen refreshed once a second).
const UDP_MAYBE_EXPIRED: Duration = Duration::from_secs(28);

const VIP1: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 7);
/// Next to the VIPs, but no VIP.
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 2);
const PROTO_ICMP: u8 = 1;

/// The verdicts this corpus reaches: every XDP packet counts under exactly one. Its services
/// are in mode nat and the test namespace has no front NIC, so the fullnat/dsr verdicts and
/// XDP's own sends (tx, redirected, handed_to_tc) must stay at zero like the events.
const VERDICTS: [Reason; 11] = [
    Reason::PassNotIp,
    Reason::PassIpv6,
    Reason::PassNotL4,
    Reason::PassNotVip,
    Reason::PassFragment,
    Reason::PassMalformed,
    Reason::DropMalformed,
    Reason::DropFragment,
    Reason::DropIpOptions,
    Reason::DropNoBackend,
    Reason::Forwarded,
];

fn is_drop(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::DropMalformed
            | Reason::DropFragment
            | Reason::DropIpOptions
            | Reason::DropNoBackend
    )
}

fn sock(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

/// (name, VIP, protocol, [(backend, weight)])
type ServiceSpec = (&'static str, SocketAddrV4, u8, Vec<(SocketAddrV4, u32)>);

/// Services: TCP and UDP on two VIP addresses, several backends each (backend address:port
/// sets are disjoint, so a reply 5-tuple belongs to one flow), and one without backends.
fn services() -> Vec<ServiceSpec> {
    let three = |port| {
        (11..=13)
            .map(|h| (sock([10, 99, 2, h], port), 100))
            .collect::<Vec<_>>()
    };
    vec![
        ("web", SocketAddrV4::new(VIP1, 80), PROTO_TCP, three(8080)),
        ("dns", SocketAddrV4::new(VIP1, 53), PROTO_UDP, three(5353)),
        (
            "tls",
            SocketAddrV4::new(VIP2, 443),
            PROTO_TCP,
            vec![
                (sock([10, 99, 3, 21], 8443), 100),
                (sock([10, 99, 3, 22], 8443), 50),
            ],
        ),
        (
            "quic",
            SocketAddrV4::new(VIP2, 443),
            PROTO_UDP,
            vec![
                (sock([10, 99, 3, 21], 4433), 100),
                (sock([10, 99, 3, 22], 4433), 100),
            ],
        ),
        ("empty", SocketAddrV4::new(VIP1, 8443), PROTO_TCP, vec![]),
    ]
}

fn services_toml() -> String {
    services()
        .into_iter()
        .map(|(name, vip, proto, backends)| {
            let proto = if proto == PROTO_TCP { "tcp" } else { "udp" };
            service_toml(name, vip, proto, &backends)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Random numbers

/// SplitMix64. Its sequence for a seed never changes, so a corpus stays replayable across
/// dependency updates (`rand`'s StdRng promises no such thing).
struct Rng(u64);

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator of frame `index` of `stream`: each frame depends on (seed, index) only.
    fn for_frame(seed: u64, stream: u64, index: u64) -> Rng {
        Rng(mix(seed ^ mix(stream ^ mix(index))))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn u32(&mut self) -> u32 {
        self.next() as u32
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

// ---------------------------------------------------------------------------------------
// The reference model

/// The headers of a well-formed IPv4 TCP/UDP packet, as the model reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Headers {
    l3: usize,
    ihl: usize,
    tot_len: usize,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    /// The UDP length field (the bytes its checksum covers); 0 for TCP.
    udp_len: usize,
    /// TCP flags (0 for UDP).
    tcp_flags: u8,
}

impl Headers {
    /// A SYN without ACK: opens a flow.
    fn syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

impl Headers {
    fn l4(&self) -> usize {
        self.l3 + self.ihl
    }

    /// End of what the L4 checksum covers.
    fn l4_end(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l3 + self.tot_len
        } else {
            self.l4() + self.udp_len
        }
    }

    fn l4_csum(&self) -> usize {
        self.l4()
            + if self.proto == PROTO_TCP {
                TCP_CSUM
            } else {
                UDP_CSUM
            }
    }
}

/// What the model makes of a frame, before looking at any VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    /// Not IPv4 or IPv6, or more than one VLAN tag (or a tag cut short).
    NotIp,
    Ipv6,
    /// IPv4, but the frame ends inside the 20-byte header: no destination to judge.
    TooShort,
    /// Bad version or IHL, total length below the IHL or past the frame; with the
    /// destination address.
    BadIp(Ipv4Addr),
    /// A sound IPv4 header of another protocol.
    NotL4,
    /// A TCP/UDP fragment (MF or an offset), with the destination address.
    Fragment(Ipv4Addr),
    /// A TCP/UDP header that does not fit the IPv4 packet (cut short, data offset < 5 or past
    /// the end, UDP length < 8 or past the end), with the destination address.
    BadL4(Ipv4Addr),
    Ok(Headers),
}

fn get16(f: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]))
}

/// Reads a frame as docs/architecture.md describes the parser: Ethernet, at most one
/// 802.1Q/802.1ad tag, IPv4, and the TCP/UDP header within the IPv4 packet's total length
/// (Ethernet padding after it is allowed). A pure reading of the bytes, sharing no code with
/// lb-ebpf.
fn parse(f: &[u8]) -> Parsed {
    let Some(mut ethertype) = get16(f, 12) else {
        return Parsed::NotIp;
    };
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = get16(f, 16) else {
            return Parsed::NotIp;
        };
        ethertype = inner;
        l3 = 18;
    }
    // A second tag shows up here as an ethertype that is neither IPv4 nor IPv6.
    match ethertype {
        ETH_P_IPV6 => return Parsed::Ipv6,
        ETH_P_IP => {}
        _ => return Parsed::NotIp,
    }
    let Some(ip) = f.get(l3..l3 + 20) else {
        return Parsed::TooShort;
    };
    let dst = ipv4_at(ip, IP_DADDR);
    let version = ip[0] >> 4;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(be16(ip, IP_TOT_LEN));
    if version != 4 || ihl < 20 || tot_len < ihl || l3 + tot_len > f.len() {
        return Parsed::BadIp(dst);
    }
    let proto = ip[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::NotL4;
    }
    // Flags: reserved, DF, MF. Only MF and the offset make a fragment.
    if be16(ip, 6) & 0x3fff != 0 {
        return Parsed::Fragment(dst);
    }
    let l4 = l3 + ihl;
    let segment = &f[l4..l3 + tot_len];
    let udp_len = if proto == PROTO_TCP {
        let data_offset = segment.get(TCP_DOFF).map(|b| usize::from(b >> 4) * 4);
        match data_offset {
            Some(doff) if segment.len() >= 20 && (20..=segment.len()).contains(&doff) => 0,
            _ => return Parsed::BadL4(dst),
        }
    } else {
        match get16(segment, UDP_LEN).map(usize::from) {
            Some(len) if (8..=segment.len()).contains(&len) => len,
            _ => return Parsed::BadL4(dst),
        }
    };
    Parsed::Ok(Headers {
        l3,
        ihl,
        tot_len,
        proto,
        src: ipv4_at(ip, IP_SADDR),
        dst,
        sport: be16(segment, L4_SPORT),
        dport: be16(segment, L4_DPORT),
        udp_len,
        tcp_flags: if proto == PROTO_TCP { segment[13] } else { 0 },
    })
}

#[derive(Debug, Clone)]
struct Svc {
    name: &'static str,
    id: u32,
    vip: SocketAddrV4,
    proto: u8,
    /// (endpoint, backend id)
    backends: Vec<(SocketAddrV4, u32)>,
}

struct Model {
    services: Vec<Svc>,
    vip_addrs: HashSet<Ipv4Addr>,
}

/// The model's verdict, and for a forward the service and the headers to check the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    reason: Reason,
    forward: Option<(usize, Headers)>,
}

impl Model {
    fn new(services: Vec<Svc>) -> Model {
        let vip_addrs = services.iter().map(|s| *s.vip.ip()).collect();
        Model {
            services,
            vip_addrs,
        }
    }

    /// The services as the data path has them applied (ids from the reconciler).
    fn applied(dp: &LoadedDatapath) -> Model {
        Model::new(
            services()
                .into_iter()
                .map(|(name, vip, proto, _)| Svc {
                    name,
                    id: dp.service_id(name),
                    vip,
                    proto,
                    backends: dp.backend_ids(name),
                })
                .collect(),
        )
    }

    fn service(&self, h: &Headers) -> Option<usize> {
        let to = SocketAddrV4::new(h.dst, h.dport);
        self.services
            .iter()
            .position(|s| s.vip == to && s.proto == h.proto)
    }

    /// The verdict table of docs/architecture.md. Where two rows apply, the more basic fact
    /// decides: what cannot be parsed (malformed, fragment: no ports) is judged by the VIP
    /// address, and only a parsed packet by VIP:port, then IP options, then backends.
    fn xdp_verdict(&self, frame: &[u8]) -> Verdict {
        let ours = |addr: Ipv4Addr| self.vip_addrs.contains(&addr);
        let reason = match parse(frame) {
            Parsed::NotIp => Reason::PassNotIp,
            Parsed::Ipv6 => Reason::PassIpv6,
            Parsed::TooShort => Reason::PassMalformed,
            Parsed::NotL4 => Reason::PassNotL4,
            Parsed::BadIp(dst) | Parsed::BadL4(dst) if ours(dst) => Reason::DropMalformed,
            Parsed::BadIp(_) | Parsed::BadL4(_) => Reason::PassMalformed,
            Parsed::Fragment(dst) if ours(dst) => Reason::DropFragment,
            Parsed::Fragment(_) => Reason::PassFragment,
            Parsed::Ok(h) => match self.service(&h) {
                None => Reason::PassNotVip,
                Some(_) if h.ihl > 20 => Reason::DropIpOptions,
                Some(k) if self.services[k].backends.is_empty() => Reason::DropNoBackend,
                Some(k) => {
                    return Verdict {
                        reason: Reason::Forwarded,
                        forward: Some((k, h)),
                    };
                }
            },
        };
        Verdict {
            reason,
            forward: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checking a rewrite

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// XDP: DNAT of the destination.
    Dst,
    /// TC egress: the reply's source back to the VIP.
    Src,
}

/// The checksum of the L4 segment with its pseudo-header, as the frame has it (0 when the
/// checksum field is right).
fn l4_checksum(f: &[u8], h: &Headers) -> u16 {
    let len = (h.l4_end() - h.l4()) as u16;
    let mut pseudo = f[h.l3 + IP_SADDR..h.l3 + IP_DADDR + 4].to_vec();
    pseudo.extend_from_slice(&[0, h.proto]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    checksum(&[&pseudo, &f[h.l4()..h.l4_end()]])
}

fn ip_checksum(f: &[u8], h: &Headers) -> u16 {
    checksum(&[&f[h.l3..h.l4()]])
}

/// The checksum field computed from scratch (RFC 1071, UDP's 0 sent as 0xffff).
fn scratch_checksums(f: &[u8], h: &Headers) -> (u16, u16) {
    let mut f = f.to_vec();
    put_be16(&mut f, h.l3 + IP_CSUM, 0);
    put_be16(&mut f, h.l4_csum(), 0);
    let ip = ip_checksum(&f, h);
    let l4 = match l4_checksum(&f, h) {
        0 if h.proto == PROTO_UDP => 0xffff,
        c => c,
    };
    (ip, l4)
}

/// Checks that `out` is `input` with the destination (or source) address and port rewritten
/// and nothing else but the checksums changed; that each checksum is off by exactly what it
/// was off by before (a one's complement sum over the changed data does not move), is
/// exactly the from-scratch value if it was that before, and that a UDP checksum of 0 stays 0
/// and no other becomes 0. Returns the new address and port.
fn check_rewrite(
    input: &[u8],
    out: &[u8],
    h: &Headers,
    side: Side,
) -> Result<SocketAddrV4, String> {
    if out.len() != input.len() {
        return Err(format!(
            "the rewrite changed the length from {} to {}",
            input.len(),
            out.len()
        ));
    }
    let (addr, port) = match side {
        Side::Dst => (h.l3 + IP_DADDR, h.l4() + L4_DPORT),
        Side::Src => (h.l3 + IP_SADDR, h.l4() + L4_SPORT),
    };
    let mut expect = input.to_vec();
    for (off, n) in [(addr, 4), (port, 2), (h.l3 + IP_CSUM, 2), (h.l4_csum(), 2)] {
        expect[off..off + n].copy_from_slice(&out[off..off + n]);
    }
    if let Some(at) = expect.iter().zip(out).position(|(a, b)| a != b) {
        return Err(format!(
            "the rewrite changed byte {at} ({:#04x} -> {:#04x}), which is none of the {side:?} \
             address, port or checksums",
            input[at], out[at]
        ));
    }
    let to = SocketAddrV4::new(ipv4_at(out, addr), be16(out, port));

    let (scratch_ip, scratch_l4) = scratch_checksums(input, h);
    let (ip_in, ip_out) = (be16(input, h.l3 + IP_CSUM), be16(out, h.l3 + IP_CSUM));
    if ip_checksum(input, h) != ip_checksum(out, h) {
        return Err(format!(
            "IPv4 checksum {ip_in:#06x} -> {ip_out:#06x}: the header sums to {:#06x} before and \
             {:#06x} after (must not move)",
            !ip_checksum(input, h),
            !ip_checksum(out, h)
        ));
    }
    if ip_in == scratch_ip && ip_out != scratch_checksums(out, h).0 {
        return Err(format!(
            "IPv4 checksum {ip_in:#06x} -> {ip_out:#06x}, expected {:#06x}",
            scratch_checksums(out, h).0
        ));
    }

    let proto = if h.proto == PROTO_TCP { "TCP" } else { "UDP" };
    let (l4_in, l4_out) = (be16(input, h.l4_csum()), be16(out, h.l4_csum()));
    if h.proto == PROTO_UDP && l4_in == 0 {
        if l4_out != 0 {
            return Err(format!(
                "UDP checksum 0 (none) became {l4_out:#06x}; it must stay 0"
            ));
        }
        return Ok(to);
    }
    if h.proto == PROTO_UDP && l4_out == 0 {
        return Err(format!(
            "UDP checksum {l4_in:#06x} became 0, which means none; 0xffff expected"
        ));
    }
    if l4_checksum(input, h) != l4_checksum(out, h) {
        return Err(format!(
            "{proto} checksum {l4_in:#06x} -> {l4_out:#06x}: the segment sums to {:#06x} before \
             and {:#06x} after (must not move)",
            !l4_checksum(input, h),
            !l4_checksum(out, h)
        ));
    }
    if l4_in == scratch_l4 && l4_out != scratch_checksums(out, h).1 {
        return Err(format!(
            "{proto} checksum {l4_in:#06x} -> {l4_out:#06x}, expected {:#06x}",
            scratch_checksums(out, h).1
        ));
    }
    Ok(to)
}

// ---------------------------------------------------------------------------------------
// Frames

struct Frame {
    bytes: Vec<u8>,
    /// Where the fixture's IP and L4 headers were (mutations aim there; after some mutations
    /// nothing is there any more, which is fine).
    l3: usize,
    l4: usize,
    what: String,
}

fn vlan_tags(rng: &mut Rng) -> (Vec<(u16, u16)>, &'static str) {
    let tci = rng.u16();
    let tci2 = rng.u16();
    match rng.below(100) {
        0..65 => (vec![], ""),
        65..77 => (vec![(ETH_P_8021Q, tci)], ", 802.1Q"),
        77..84 => (vec![(ETH_P_8021AD, tci)], ", 802.1ad"),
        84..90 => (
            vec![(ETH_P_8021AD, tci), (ETH_P_8021Q, tci2)],
            ", QinQ 802.1ad+802.1Q",
        ),
        90..94 => (
            vec![(ETH_P_8021Q, tci), (ETH_P_8021Q, tci2)],
            ", two 802.1Q tags",
        ),
        94..97 => (
            vec![
                (ETH_P_8021AD, tci),
                (ETH_P_8021Q, tci2),
                (ETH_P_8021Q, tci ^ tci2),
            ],
            ", three tags",
        ),
        _ => (vec![(0x9100, tci), (ETH_P_8021Q, tci2)], ", 0x9100 QinQ"),
    }
}

/// `tags` inserted after the MAC addresses of an untagged frame.
fn with_tags(mut frame: Vec<u8>, tags: &[(u16, u16)]) -> Vec<u8> {
    let bytes: Vec<u8> = tags
        .iter()
        .flat_map(|(tpid, tci)| [tpid.to_be_bytes(), tci.to_be_bytes()].concat())
        .collect();
    frame.splice(12..12, bytes);
    frame
}

fn payload_len(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..25 => 0,
        25..75 => rng.range(1, 64),
        75..95 => rng.range(65, 512),
        _ => rng.range(513, 1400),
    }
}

/// IPv4 options: NOPs, a router alert, or junk; a multiple of 4 bytes, at most 40.
fn ip_options(rng: &mut Rng) -> Vec<u8> {
    let len = 4 * rng.range(1, 10);
    match rng.below(3) {
        0 => vec![1; len],
        1 => {
            let mut o = vec![0x94, 4, 0, 0];
            o.resize(len, 0);
            o
        }
        _ => rng.bytes(len),
    }
}

/// A client: mostly from a small pool, so flows come back and conntrack hits.
fn client(rng: &mut Rng) -> SocketAddrV4 {
    if rng.chance(5) {
        SocketAddrV4::new(Ipv4Addr::from(rng.u32()), rng.u16())
    } else {
        sock(
            [10, 99, 1, 1 + rng.below(8) as u8],
            1024 + rng.below(512) as u16,
        )
    }
}

fn some_address(rng: &mut Rng, model: &Model) -> Ipv4Addr {
    match rng.below(6) {
        0 => VIP1,
        1 => VIP2,
        2 => NOT_VIP,
        3 => {
            let svc = &model.services[rng.below(model.services.len())];
            svc.backends.first().map_or(VIP1, |b| *b.0.ip())
        }
        4 => *client(rng).ip(),
        _ => Ipv4Addr::from(rng.u32()),
    }
}

fn some_port(rng: &mut Rng) -> u16 {
    let any = rng.u16();
    rng.pick(&[80, 53, 443, 8443, 81, 8080, 5353, 4433, any])
}

/// An IPv4 frame from `src` to `dst` with everything around it random: flags, payload,
/// fragment bits, TCP and IP options, checksum or not, padding, VLAN tags.
fn ipv4_frame(rng: &mut Rng, src: SocketAddrV4, dst: SocketAddrV4, proto: u8, what: &str) -> Frame {
    let mut p = match proto {
        PROTO_TCP => Packet::tcp(src, dst),
        PROTO_UDP => Packet::udp(src, dst),
        PROTO_ICMP => Packet::icmp_echo(*src.ip(), *dst.ip()),
        _ => Packet::other(*src.ip(), *dst.ip(), proto),
    };
    let mut what = what.to_string();
    p.tos = rng.u8();
    p.id = rng.u16();
    p.ttl = rng.u8();
    p.frag = match rng.below(100) {
        0..75 => IP_DF,
        75..85 => 0,
        85..90 => IP_DF | 0x8000,
        _ => {
            what.push_str(", fragment");
            let (a, b, c) = (rng.u16(), rng.u16(), rng.u16());
            rng.pick(&[
                IP_MF,
                IP_MF | IP_DF,
                IP_MF | (a & 0x1fff),
                b & 0x1fff | 1,
                c | 1,
            ])
        }
    };
    p.payload = {
        let n = payload_len(rng);
        rng.bytes(n)
    };
    match &mut p.l4 {
        L4::Tcp {
            seq,
            ack,
            flags,
            window,
            ..
        } => {
            *seq = rng.u32();
            *ack = rng.u32();
            *flags = rng.u8();
            *window = rng.u16();
        }
        L4::Udp { checksum, .. } if rng.chance(20) => {
            *checksum = false;
            what.push_str(", no UDP checksum");
        }
        _ => {}
    }
    if proto == PROTO_TCP && rng.chance(20) {
        let n = 4 * rng.range(1, 10);
        p.tcp_options = rng.bytes(n);
        what.push_str(", TCP options");
    }
    if rng.chance(12) {
        p.options = ip_options(rng);
        what.push_str(", IP options");
    }
    if rng.chance(15) {
        p.padding = rng.range(1, 46);
        what.push_str(", padded");
    }
    let (tags, tags_what) = vlan_tags(rng);
    p.vlans = tags;
    what.push_str(tags_what);
    Frame {
        bytes: p.build(),
        l3: p.l3_off(),
        l4: p.l4_off(),
        what,
    }
}

fn ipv6_frame(rng: &mut Rng) -> Frame {
    let (tags, tags_what) = vlan_tags(rng);
    let any = rng.u8();
    let next = rng.pick(&[PROTO_TCP, PROTO_UDP, 58, 0, 44, any]);
    let mut l4 = match next {
        PROTO_TCP => {
            let mut t = vec![0; 20];
            put_be16(&mut t, L4_SPORT, 40000);
            put_be16(&mut t, L4_DPORT, some_port(rng));
            t[TCP_DOFF] = 5 << 4;
            t[13] = rng.u8();
            t
        }
        PROTO_UDP => {
            let mut u = rng.bytes(8);
            put_be16(&mut u, L4_DPORT, some_port(rng));
            u
        }
        _ => vec![],
    };
    let n = payload_len(rng).min(200);
    l4.extend(rng.bytes(n));
    if next == PROTO_UDP {
        let len = l4.len() as u16;
        put_be16(&mut l4, UDP_LEN, len);
    }
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    let version = if rng.chance(80) { 6 } else { rng.u8() >> 4 };
    f.extend_from_slice(&[version << 4, 0, 0, 0]);
    let plen = if rng.chance(80) {
        l4.len() as u16
    } else {
        rng.u16()
    };
    f.extend_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&[0xfd, 0x99, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let dst: [u8; 16] = match rng.below(3) {
        // v4-mapped VIP: still IPv6.
        0 => Ipv4Addr::to_ipv6_mapped(&VIP1).octets(),
        1 => [0xfd, 0x99, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        _ => rng.bytes(16).try_into().expect("16 bytes"),
    };
    f.extend_from_slice(&dst);
    f.extend_from_slice(&l4);
    let l3 = 14 + 4 * tags.len();
    Frame {
        bytes: with_tags(f, &tags),
        l3,
        l4: l3 + 40,
        what: format!("IPv6, next header {next}{tags_what}"),
    }
}

fn not_ip_frame(rng: &mut Rng) -> Frame {
    let (tags, tags_what) = vlan_tags(rng);
    let (frame, what) = match rng.below(3) {
        0 => (arp_request(*client(rng).ip(), VIP1), "ARP"),
        1 => {
            let mut f = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e, 2, 0, 0, 0, 0, 2, 0x88, 0xcc];
            f.extend(rng.bytes(46));
            (f, "LLDP")
        }
        _ => {
            let n = 14 + rng.below(100);
            let mut f = rng.bytes(n);
            let any = rng.u16() | 1;
            let ethertype = rng.pick(&[0x0806, 0x88cc, 0x8847, 0x0842, any]);
            put_be16(&mut f, 12, ethertype);
            (f, "random ethertype")
        }
    };
    let l3 = 14 + 4 * tags.len();
    Frame {
        bytes: with_tags(frame, &tags),
        l3,
        l4: l3 + 20,
        what: format!("{what}{tags_what}"),
    }
}

fn garbage_frame(rng: &mut Rng) -> Frame {
    let len = rng.range(14, 300);
    let mut f = rng.bytes(len);
    let mut l3 = 14;
    if rng.chance(60) {
        let ethertype = rng.pick(&[ETH_P_IP, ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD]);
        put_be16(&mut f, 12, ethertype);
        if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 && len >= 18 && rng.chance(60) {
            put_be16(&mut f, 16, ETH_P_IP);
            l3 = 18;
        }
        // Mostly version 4: the IPv4 checks get hit rather than the version check.
        if rng.chance(60) && len > l3 {
            f[l3] = 0x40 | (f[l3] & 0x0f);
        }
    }
    Frame {
        bytes: f,
        l3,
        l4: l3 + 20,
        what: format!("{len} random bytes"),
    }
}

/// A well-formed fixture of any kind.
fn fixture(rng: &mut Rng, model: &Model) -> Frame {
    match rng.below(100) {
        0..40 => {
            let svc = &model.services[rng.below(model.services.len())];
            let what = format!("to service {}", svc.name);
            let from = client(rng);
            ipv4_frame(rng, from, svc.vip, svc.proto, &what)
        }
        40..50 => {
            let vip = SocketAddrV4::new(rng.pick(&[VIP1, VIP2]), some_port(rng));
            let proto = rng.pick(&[PROTO_TCP, PROTO_UDP]);
            let from = client(rng);
            ipv4_frame(rng, from, vip, proto, "to a VIP address")
        }
        50..60 => {
            let to = SocketAddrV4::new(some_address(rng, model), some_port(rng));
            let proto = rng.pick(&[PROTO_TCP, PROTO_UDP]);
            let from = client(rng);
            ipv4_frame(rng, from, to, proto, "to anywhere")
        }
        60..67 => {
            let to = SocketAddrV4::new(some_address(rng, model), 0);
            let any = rng.u8();
            let proto = rng.pick(&[PROTO_ICMP, PROTO_ICMP, 47, 132, 50, 0, any]);
            let what = format!("IP protocol {proto}");
            let from = client(rng);
            ipv4_frame(rng, from, to, proto, &what)
        }
        67..72 => not_ip_frame(rng),
        72..80 => ipv6_frame(rng),
        80..86 => garbage_frame(rng),
        _ => {
            // A backend answering a client: not for a VIP (XDP), maybe a known flow (TC).
            let svc = &model.services[rng.below(model.services.len())];
            let from = match svc.backends.len() {
                0 => svc.vip,
                n => svc.backends[rng.below(n)].0,
            };
            let to = client(rng);
            ipv4_frame(rng, from, to, svc.proto, "from a backend")
        }
    }
}

/// Makes the IPv4 header checksum right for the header found where [`parse`] looks, and the
/// TCP/UDP checksum too if the packet parses (a UDP checksum of 0 stays 0).
fn recompute_checksums(f: &mut [u8]) {
    let l3 = match (get16(f, 12), get16(f, 16)) {
        (Some(ETH_P_IP), _) => 14,
        (Some(ETH_P_8021Q | ETH_P_8021AD), Some(ETH_P_IP)) => 18,
        _ => return,
    };
    if f.len() < l3 + 20 {
        return;
    }
    let ihl = (usize::from(f[l3] & 0x0f) * 4).max(20);
    let end = (l3 + ihl).min(f.len());
    put_be16(f, l3 + IP_CSUM, 0);
    let c = checksum(&[&f[l3..end]]);
    put_be16(f, l3 + IP_CSUM, c);
    if let Parsed::Ok(h) = parse(f) {
        // A UDP checksum of 0 stays "none".
        if h.proto == PROTO_UDP && be16(f, h.l4_csum()) == 0 {
            return;
        }
        let (_, l4) = scratch_checksums(f, &h);
        put_be16(f, h.l4_csum(), l4);
    }
}

/// Writes a byte if the offset is inside the frame.
fn poke(f: &mut [u8], off: usize, v: u8) {
    if let Some(b) = f.get_mut(off) {
        *b = v;
    }
}

fn poke16(f: &mut [u8], off: usize, v: u16) {
    let [hi, lo] = v.to_be_bytes();
    poke(f, off, hi);
    poke(f, off + 1, lo);
}

/// One random mutation; returns what it did.
fn mutate_once(rng: &mut Rng, f: &mut Frame) -> String {
    let (l3, l4) = (f.l3, f.l4);
    let len = f.bytes.len();
    let b = &mut f.bytes;
    match rng.below(17) {
        0 if len > 14 => {
            // Mostly inside the headers, where lengths get judged.
            let cut = if rng.chance(60) {
                l3 + rng.below(l4 + 24 - l3)
            } else {
                rng.range(14, len - 1)
            };
            let cut = cut.clamp(14, len - 1);
            b.truncate(cut);
            format!("cut to {cut}")
        }
        1 => {
            let ihl = rng.below(16) as u8;
            let old = b.get(l3).copied().unwrap_or(0);
            poke(b, l3, (old & 0xf0) | ihl);
            format!("IHL {ihl}")
        }
        2 => {
            let any = rng.u8() >> 4;
            let version = rng.pick(&[4, 6, 0, 5, 15, any]);
            let old = b.get(l3).copied().unwrap_or(0);
            poke(b, l3, (version << 4) | (old & 0x0f));
            format!("IP version {version}")
        }
        3 => {
            let cur = get16(b, l3 + IP_TOT_LEN).unwrap_or(0);
            let room = len.saturating_sub(l3) as u16;
            let (more, less, any) = (
                rng.range(1, 64) as u16,
                rng.below(usize::from(cur) + 1) as u16,
                rng.u16(),
            );
            let tot = rng.pick(&[
                0,
                19,
                20,
                40,
                cur.wrapping_sub(1),
                cur.wrapping_add(1),
                cur.wrapping_add(more),
                less,
                room,
                room.wrapping_add(1),
                0xffff,
                any,
            ]);
            poke16(b, l3 + IP_TOT_LEN, tot);
            format!("total length {tot}")
        }
        4 => {
            let (x, y, z) = (rng.u16(), rng.u16(), rng.u16());
            let frag = rng.pick(&[
                IP_MF,
                IP_MF | (x & 0x1fff),
                y & 0x1fff,
                IP_MF | IP_DF,
                0x8000,
                0x8000 | IP_DF,
                z,
            ]);
            poke16(b, l3 + 6, frag);
            format!("flags+offset {frag:#06x}")
        }
        5 => {
            let any = rng.u8();
            let proto = rng.pick(&[PROTO_ICMP, PROTO_TCP, PROTO_UDP, 47, 58, 132, 0, 255, any]);
            poke(b, l3 + 9, proto);
            format!("protocol {proto}")
        }
        6 if len >= l3 + 20 => {
            let options = ip_options(rng);
            let n = options.len();
            b.splice(l3 + 20..l3 + 20, options);
            let ihl = ((b[l3] & 0x0f) + (n / 4) as u8).min(15);
            b[l3] = (b[l3] & 0xf0) | ihl;
            let tot = be16(b, l3 + IP_TOT_LEN).wrapping_add(n as u16);
            put_be16(b, l3 + IP_TOT_LEN, tot);
            f.l4 += n;
            format!("{n} bytes of IP options inserted")
        }
        7 => {
            let doff = rng.below(16) as u8;
            let old = b.get(l4 + TCP_DOFF).copied().unwrap_or(0);
            poke(b, l4 + TCP_DOFF, (doff << 4) | (old & 0x0f));
            format!("data offset {doff}")
        }
        8 => {
            let cur = get16(b, l4 + UDP_LEN).unwrap_or(0);
            let segment = len.saturating_sub(l4) as u16;
            let any = rng.u16();
            let v = rng.pick(&[
                0,
                1,
                7,
                8,
                cur.wrapping_sub(1),
                cur.wrapping_add(1),
                segment,
                segment.wrapping_add(1),
                any,
            ]);
            poke16(b, l4 + UDP_LEN, v);
            format!("UDP length {v}")
        }
        9 if len >= l4 + 20 => {
            // No payload: a bare TCP header, or a zero-length UDP datagram.
            let udp = b.get(l3 + 9) == Some(&PROTO_UDP);
            let header = if udp { 8 } else { 20 };
            b.truncate(l4 + header);
            poke16(b, l3 + IP_TOT_LEN, (l4 - l3 + header) as u16);
            if udp {
                poke16(b, l4 + UDP_LEN, 8);
            } else {
                poke(b, l4 + TCP_DOFF, 5 << 4);
            }
            "payload removed".into()
        }
        10 => {
            let n = rng.range(1, 4);
            let mut at = Vec::new();
            for _ in 0..n {
                let i = if rng.chance(50) {
                    rng.below(len)
                } else {
                    (l3 + rng.below(l4 + 20 - l3)).min(len - 1)
                };
                b[i] ^= rng.range(1, 255) as u8;
                at.push(i);
            }
            format!("bytes {at:?} flipped")
        }
        11 => {
            let at = rng.pick(&[12, l3 - 2]);
            let any = rng.u16();
            let ethertype = rng.pick(&[
                ETH_P_IP,
                ETH_P_IPV6,
                ETH_P_8021Q,
                ETH_P_8021AD,
                ETH_P_ARP,
                0x9100,
                any,
            ]);
            poke16(b, at, ethertype);
            format!("ethertype at {at} {ethertype:#06x}")
        }
        12 => {
            let any = Ipv4Addr::from(rng.u32());
            let dst = rng.pick(&[VIP1, VIP2, NOT_VIP, any]);
            let port = some_port(rng);
            for (i, o) in dst.octets().into_iter().enumerate() {
                poke(b, l3 + IP_DADDR + i, o);
            }
            poke16(b, l4 + L4_DPORT, port);
            format!("sent to {dst}:{port}")
        }
        13 => {
            let n = rng.range(1, 64);
            b.extend(rng.bytes(n));
            format!("{n} bytes appended")
        }
        14 if len >= 18 && matches!(get16(b, 12), Some(ETH_P_8021Q | ETH_P_8021AD)) => {
            b.drain(12..16);
            f.l3 = f.l3.saturating_sub(4).max(14);
            f.l4 = f.l4.saturating_sub(4).max(f.l3);
            "outer tag removed".into()
        }
        14 => {
            let tpid = rng.pick(&[ETH_P_8021Q, ETH_P_8021AD]);
            let tci = rng.u16();
            b.splice(12..12, [tpid.to_be_bytes(), tci.to_be_bytes()].concat());
            f.l3 += 4;
            f.l4 += 4;
            format!("tag {tpid:#06x} pushed")
        }
        15 => {
            let from = rng.range(12, len - 1);
            for x in &mut b[from..] {
                *x = rng.u8();
            }
            format!("random from byte {from}")
        }
        16 => {
            // A near miss of a flow: one field of the 5-tuple a little off.
            match rng.below(5) {
                0 => {
                    let v = b.get(l3 + IP_SADDR + 3).copied().unwrap_or(0);
                    poke(b, l3 + IP_SADDR + 3, v ^ 1);
                    "source address off by one bit".into()
                }
                1 => {
                    let v = get16(b, l4 + L4_SPORT).unwrap_or(0).wrapping_add(1);
                    poke16(b, l4 + L4_SPORT, v);
                    "source port + 1".into()
                }
                2 => {
                    let v = b.get(l3 + IP_DADDR + 3).copied().unwrap_or(0);
                    poke(b, l3 + IP_DADDR + 3, v ^ 1);
                    "destination address off by one bit".into()
                }
                3 => {
                    let v = get16(b, l4 + L4_DPORT).unwrap_or(0).wrapping_sub(1);
                    poke16(b, l4 + L4_DPORT, v);
                    "destination port - 1".into()
                }
                _ => {
                    let proto = match b.get(l3 + 9) {
                        Some(&PROTO_TCP) => PROTO_UDP,
                        _ => PROTO_TCP,
                    };
                    poke(b, l3 + 9, proto);
                    format!("protocol {proto}")
                }
            }
        }
        _ => "nothing".into(),
    }
}

/// Zero to a few mutations, then often the checksums made right again (so that odd fields
/// come with valid checksums as often as with broken ones).
fn mutate(rng: &mut Rng, f: &mut Frame) {
    let n = match rng.below(100) {
        0..45 => 0,
        45..75 => 1,
        75..90 => 2,
        _ => rng.range(3, 6),
    };
    let mut done = Vec::new();
    for _ in 0..n {
        done.push(mutate_once(rng, f));
    }
    if n > 0 && rng.chance(50) {
        recompute_checksums(&mut f.bytes);
        done.push("checksums recomputed".into());
    }
    f.bytes.truncate(MAX_FRAME);
    if !done.is_empty() {
        let _ = write!(f.what, "; {}", done.join(", "));
    }
}

fn xdp_frame(seed: u64, index: u64, model: &Model) -> Frame {
    let mut rng = Rng::for_frame(seed, 1, index);
    let mut f = fixture(&mut rng, model);
    mutate(&mut rng, &mut f);
    f
}

fn tc_frame(seed: u64, index: u64, model: &Model, replies: &[Flow5]) -> Frame {
    let mut rng = Rng::for_frame(seed, 2, index);
    let mut f = if !replies.is_empty() && rng.chance(60) {
        let (src, sport, dst, dport, proto) = replies[rng.below(replies.len())];
        let from = SocketAddrV4::new(src, sport);
        let to = SocketAddrV4::new(dst, dport);
        ipv4_frame(&mut rng, from, to, proto, "reply of a known flow")
    } else {
        fixture(&mut rng, model)
    };
    mutate(&mut rng, &mut f);
    f
}

/// The kernel refuses skb test runs of IPv4 and IPv6 frames shorter than their L3 header
/// (seen on 6.18; before the program runs, so nothing to judge).
fn kernel_refuses_skb(f: &[u8]) -> bool {
    match get16(f, 12) {
        Some(ETH_P_IP) => f.len() < 14 + 20,
        Some(ETH_P_IPV6) => f.len() < 14 + 40,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Bookkeeping

/// (source, source port, destination, destination port, protocol)
type Flow5 = (Ipv4Addr, u16, Ipv4Addr, u16, u8);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    packets: u64,
    bytes: u64,
    /// Distinct flows.
    flows: u64,
    /// Packets of UDP flows idle long enough to have expired (each may count as new).
    maybe_new: u64,
}

/// What the model knows of one flow.
struct FlowState {
    /// A reply passed TC egress while the flow was new.
    replied: bool,
    /// In the main table (it proved two-way).
    established: bool,
    /// FIN from the client, FIN from the backend, RST from either.
    fin_client: bool,
    fin_server: bool,
    rst: bool,
    backend: SocketAddrV4,
    backend_id: u32,
    service: usize,
    last: Instant,
}

impl FlowState {
    fn new() -> Self {
        FlowState {
            replied: false,
            established: false,
            fin_client: false,
            fin_server: false,
            rst: false,
            backend: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            backend_id: 0,
            service: 0,
            last: Instant::now(),
        }
    }
}

#[derive(Default)]
struct Tracker {
    services: Vec<Tally>,
    backends: HashMap<u32, Tally>,
    flows: HashMap<Flow5, FlowState>,
    /// Reply 5-tuple -> VIP, as the reverse NAT map must hold it.
    rev_nat: HashMap<Flow5, SocketAddrV4>,
    replies: Vec<Flow5>,
    verdicts: [u64; Reason::COUNT as usize],
    /// Rewrites (XDP and TC) of frames with a wrong IPv4 checksum, a wrong L4 checksum, and
    /// UDP without a checksum: the corner cases of the checksum rules.
    odd_checksums: [u64; 3],
    xdp_packets: u64,
    tc_packets: u64,
    tc_rewritten: u64,
    tc_refused: u64,
}

impl Tracker {
    fn rewritten(&mut self, frame: &[u8], h: &Headers) {
        self.odd_checksums[0] += u64::from(ip_checksum(frame, h) != 0);
        if h.proto == PROTO_UDP && be16(frame, h.l4_csum()) == 0 {
            self.odd_checksums[2] += 1;
        } else {
            self.odd_checksums[1] += u64::from(l4_checksum(frame, h) != 0);
        }
    }

    fn forwarded(
        &mut self,
        service: usize,
        h: &Headers,
        backend: SocketAddrV4,
        backend_id: u32,
        frame_len: usize,
    ) -> Result<(), String> {
        let key = (h.src, h.sport, h.dst, h.dport, h.proto);
        let now = Instant::now();
        let mut new = false;
        let mut maybe_new = false;
        let fin = h.tcp_flags & TCP_FIN != 0;
        let rst = h.tcp_flags & TCP_RST != 0;
        match self.flows.entry(key) {
            Entry::Occupied(mut e) => {
                let flow = e.get_mut();
                if flow.backend != backend {
                    return Err(format!(
                        "flow {}:{} -> {}:{} went to {} before and now to {backend}",
                        h.src, h.sport, h.dst, h.dport, flow.backend
                    ));
                }
                maybe_new = h.proto == PROTO_UDP && now - flow.last > UDP_MAYBE_EXPIRED;
                flow.last = now;
                let closed = flow.rst || (flow.fin_client && flow.fin_server);
                if h.syn() && closed {
                    // A SYN reopens a closed flow: a new one (Maglev picks the same backend).
                    *flow = FlowState {
                        backend,
                        backend_id,
                        service,
                        last: now,
                        fin_client: fin,
                        rst,
                        ..FlowState::new()
                    };
                    new = true;
                } else {
                    flow.fin_client |= fin;
                    flow.rst |= rst;
                    if !flow.established && flow.replied && !h.syn() {
                        flow.established = true;
                        self.verdicts[Reason::Promoted as usize] += 1;
                    }
                }
            }
            Entry::Vacant(e) => {
                e.insert(FlowState {
                    backend,
                    backend_id,
                    service,
                    last: now,
                    fin_client: fin,
                    rst,
                    ..FlowState::new()
                });
                new = true;
                let reply = (*backend.ip(), backend.port(), h.src, h.sport, h.proto);
                let vip = SocketAddrV4::new(h.dst, h.dport);
                if let Some(other) = self.rev_nat.insert(reply, vip) {
                    panic!("test setup: reply {reply:?} belongs to flows to {other} and {vip}");
                }
                self.replies.push(reply);
            }
        }
        let len = frame_len as u64;
        for tally in [
            &mut self.services[service],
            self.backends.entry(backend_id).or_default(),
        ] {
            tally.packets += 1;
            tally.bytes += len;
            tally.flows += u64::from(new);
            tally.maybe_new += u64::from(maybe_new);
        }
        Ok(())
    }

    /// Fewer flows than conntrack or reverse NAT could ever evict.
    fn exact(&self) -> bool {
        self.flows.len() < EXACT_FLOWS
    }
}

struct Run {
    seed: u64,
    packets: u64,
}

impl Run {
    fn from_env() -> Run {
        let var = |name: &str| std::env::var(name).ok().map(|v| v.replace('_', ""));
        let packets = var("XLB_FUZZ_PACKETS").map_or(DEFAULT_PACKETS, |v| {
            v.parse()
                .unwrap_or_else(|e| panic!("XLB_FUZZ_PACKETS={v}: {e}"))
        });
        let seed = var("XLB_FUZZ_SEED").map_or(DEFAULT_SEED, |v| {
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            }
            .unwrap_or_else(|e| panic!("XLB_FUZZ_SEED={v}: {e}"))
        });
        Run { seed, packets }
    }

    fn replay(&self) -> String {
        format!(
            "replay: XLB_FUZZ_SEED={:#x} XLB_FUZZ_PACKETS={} cargo test -p xlb-tests --test fuzz",
            self.seed, self.packets
        )
    }

    /// Panics with everything needed to look at and replay a failing frame.
    fn fail(&self, what: &str, index: u64, frame: &Frame, out: Option<&[u8]>, problem: &str) -> ! {
        let mut msg = format!(
            "{what} frame {index} (seed {:#x}): {problem}\nframe: {}\ninput ({} bytes):\n{}",
            self.seed,
            frame.what,
            frame.bytes.len(),
            hexdump(&frame.bytes, usize::MAX)
        );
        if let Some(out) = out {
            let first = frame
                .bytes
                .iter()
                .zip(out)
                .position(|(a, b)| a != b)
                .unwrap_or(frame.bytes.len().min(out.len()));
            if out == frame.bytes {
                msg.push_str("output: the same\n");
            } else {
                let _ = write!(
                    msg,
                    "output ({} bytes, first difference at {first}):\n{}",
                    out.len(),
                    hexdump(out, first)
                );
            }
        }
        let _ = write!(msg, "model: {:?}\n{}", parse(&frame.bytes), self.replay());
        panic!("{msg}");
    }
}

fn deltas(before: &ReasonCounts, after: &ReasonCounts) -> [u64; Reason::COUNT as usize] {
    let mut d = [0; Reason::COUNT as usize];
    for r in Reason::ALL {
        d[r as usize] = after.get(r).wrapping_sub(before.get(r));
    }
    d
}

/// Names every counter whose move differs from `want`.
fn counter_problems(got: &[u64], want: &[u64]) -> String {
    let mut s = String::new();
    for r in Reason::ALL {
        let (g, w) = (got[r as usize], want[r as usize]);
        if g != w {
            let _ = write!(s, "\n  {}: moved by {g}, expected {w}", r.name());
        }
    }
    s
}

/// A batch's verdict counters disagree with the model: replays its frames one at a time to
/// find one whose counted verdict is not the model's. (Verdicts do not depend on conntrack
/// state here: every backend stays alive.)
fn find_culprit(dp: &LoadedDatapath, model: &Model, run: &Run, frames: &[(u64, Frame)]) {
    for (index, frame) in frames {
        let before = dp.reasons();
        let out = dp.xdp(&frame.bytes);
        let moved = deltas(&before, &dp.reasons());
        let mut want = [0; Reason::COUNT as usize];
        want[model.xdp_verdict(&frame.bytes).reason as usize] = 1;
        let problems = counter_problems(&moved, &want);
        if !problems.is_empty() {
            run.fail(
                "XDP",
                *index,
                frame,
                Some(&out.data),
                &format!("counted a verdict other than the model's:{problems}"),
            );
        }
    }
}

fn check_xdp_frame(
    dp: &LoadedDatapath,
    model: &Model,
    run: &Run,
    track: &mut Tracker,
    index: u64,
    frame: &Frame,
) {
    let verdict = model.xdp_verdict(&frame.bytes);
    let out = dp.xdp(&frame.bytes);
    macro_rules! fail {
        ($($arg:tt)*) => {
            run.fail("XDP", index, frame, Some(&out.data), &format!($($arg)*))
        };
    }
    if out.action != XDP_PASS && out.action != XDP_DROP {
        fail!(
            "returned {}: only XDP_PASS and XDP_DROP are allowed",
            xdp_action_name(out.action)
        );
    }
    let want = if is_drop(verdict.reason) {
        XDP_DROP
    } else {
        XDP_PASS
    };
    if out.action != want {
        fail!(
            "returned {}, the model says {} ({})",
            xdp_action_name(out.action),
            xdp_action_name(want),
            verdict.reason.name()
        );
    }
    track.verdicts[verdict.reason as usize] += 1;
    track.xdp_packets += 1;
    let Some((k, h)) = verdict.forward else {
        if out.data != frame.bytes {
            fail!(
                "changed a frame it must leave alone ({})",
                verdict.reason.name()
            );
        }
        return;
    };
    let svc = &model.services[k];
    let to = check_rewrite(&frame.bytes, &out.data, &h, Side::Dst)
        .unwrap_or_else(|e| fail!("forward to {}: {e}", svc.name));
    let Some(&(_, backend_id)) = svc.backends.iter().find(|(b, _)| *b == to) else {
        fail!(
            "rewritten to {to}, not a backend of {} ({:?})",
            svc.name,
            svc.backends
        );
    };
    if let Err(e) = track.forwarded(k, &h, to, backend_id, frame.bytes.len()) {
        fail!("{e}");
    }
    track.rewritten(&frame.bytes, &h);
}

fn check_tc_frame(dp: &LoadedDatapath, run: &Run, track: &mut Tracker, index: u64, frame: &Frame) {
    track.tc_packets += 1;
    let reply = match parse(&frame.bytes) {
        Parsed::Ok(h) => track
            .rev_nat
            .get(&(h.src, h.sport, h.dst, h.dport, h.proto))
            .map(|vip| (h, *vip)),
        _ => None,
    };
    let out = match dp.try_tc_egress(&frame.bytes) {
        Ok(out) => out,
        Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::EINVAL)
                && kernel_refuses_skb(&frame.bytes) =>
        {
            track.tc_refused += 1;
            return;
        }
        Err(e) => run.fail(
            "TC egress",
            index,
            frame,
            None,
            &format!("BPF_PROG_TEST_RUN failed: {e:?}"),
        ),
    };
    macro_rules! fail {
        ($($arg:tt)*) => {
            run.fail("TC egress", index, frame, Some(&out.data), &format!($($arg)*))
        };
    }
    if out.action != TC_ACT_UNSPEC {
        fail!("returned {:#x}, only -1 (next) is allowed", out.action);
    }
    match reply {
        Some((h, vip)) => {
            let to = check_rewrite(&frame.bytes, &out.data, &h, Side::Src)
                .unwrap_or_else(|e| fail!("reverse NAT to {vip}: {e}"));
            if to != vip {
                fail!("reply source rewritten to {to}, not the VIP {vip}");
            }
            track.tc_rewritten += 1;
            track.rewritten(&frame.bytes, &h);
            let forward = (h.dst, h.dport, *vip.ip(), vip.port(), h.proto);
            if let Some(flow) = track.flows.get_mut(&forward) {
                flow.replied |= !flow.established;
                flow.fin_server |= h.tcp_flags & TCP_FIN != 0;
                flow.rst |= h.tcp_flags & TCP_RST != 0;
            }
        }
        None => {
            if out.data != frame.bytes {
                fail!("changed a frame that is no reply of a known flow");
            }
        }
    }
}

/// The service and backend counters against the forwarded packets.
fn check_traffic_counters(dp: &LoadedDatapath, model: &Model, run: &Run, track: &Tracker) {
    let check = |what: &str, got: lb_common::Counters, want: &Tally| {
        let new_flows = if track.exact() {
            want.flows..=want.flows + want.maybe_new
        } else {
            want.flows..=want.packets
        };
        assert!(
            got.packets == want.packets
                && got.bytes == want.bytes
                && new_flows.contains(&got.new_flows),
            "{what}: counters {got:?}, expected {} packets, {} bytes, new flows in \
             {new_flows:?}\n{}",
            want.packets,
            want.bytes,
            run.replay()
        );
    };
    for (k, svc) in model.services.iter().enumerate() {
        let counters = dp.service_counters(svc.id);
        check(
            &format!("service {}", svc.name),
            counters,
            &track.services[k],
        );
        let mut new_flows = 0;
        for (backend, id) in &svc.backends {
            let got = dp.backend_counters(*id);
            let want = track.backends.get(id).copied().unwrap_or_default();
            check(&format!("backend {backend} of {}", svc.name), got, &want);
            new_flows += got.new_flows;
        }
        assert_eq!(
            new_flows,
            counters.new_flows,
            "service {}: backend new_flows must add up to the service's\n{}",
            svc.name,
            run.replay()
        );
    }
}

/// The conntrack and reverse NAT maps against the flows the model saw forwarded.
fn check_flow_maps(dp: &LoadedDatapath, model: &Model, run: &Run, track: &Tracker) {
    let key = |(src, sport, dst, dport, proto): &Flow5| FlowKey {
        src: addr_words(IpAddr::V4(*src)).1,
        dst: addr_words(IpAddr::V4(*dst)).1,
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto: *proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    let want: HashMap<FlowKey, (u32, u32)> = track
        .flows
        .iter()
        .map(|(flow, state)| {
            let svc = model.services[state.service].id;
            (key(flow), (state.backend_id, svc))
        })
        .collect();
    let got: HashMap<FlowKey, (u32, u32)> = dp
        .datapath()
        .conntrack()
        .expect("reading conntrack")
        .into_iter()
        .map(|(k, f)| (k, (f.backend_id, f.service_id)))
        .collect();
    if got != want {
        let missing = want.keys().filter(|k| !got.contains_key(k)).count();
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(k))
            .take(3)
            .collect();
        let wrong = want
            .iter()
            .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
            .count();
        panic!(
            "conntrack holds {} flows, the model {}: {missing} missing, {wrong} with another \
             backend or service, extra ones: {extra:?}\n{}",
            got.len(),
            want.len(),
            run.replay()
        );
    }
    let want: HashMap<FlowKey, ([u32; 4], u16)> = track
        .rev_nat
        .iter()
        .map(|(reply, vip)| {
            let vip_words = addr_words(IpAddr::V4(*vip.ip())).1;
            (key(reply), (vip_words, vip.port().to_be()))
        })
        .collect();
    let got: HashMap<FlowKey, ([u32; 4], u16)> = dp
        .datapath()
        .rev_nat()
        .expect("reading reverse NAT")
        .into_iter()
        .map(|(k, r)| (k, (r.vip, r.vip_port)))
        .collect();
    assert!(
        got == want,
        "reverse NAT holds {} entries, the model {} (or they differ)\n{}",
        got.len(),
        want.len(),
        run.replay()
    );
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn xdp_and_tc_egress_survive_random_and_mutated_frames() {
    let run = Run::from_env();
    println!(
        "xlb fuzz: {} XDP frames, about {} TC egress frames, seed {:#x}\n{}",
        run.packets,
        run.packets / TC_SHARE,
        run.seed,
        run.replay()
    );
    let dp = LoadedDatapath::new(&services_toml());
    let model = Model::applied(&dp);
    let mut track = Tracker {
        services: vec![Tally::default(); model.services.len()],
        ..Default::default()
    };
    let events: Vec<Reason> = Reason::ALL
        .into_iter()
        .filter(|r| !VERDICTS.contains(r))
        .collect();
    let started = Instant::now();

    let mut start = 0;
    while start < run.packets {
        let end = (start + BATCH).min(run.packets);

        // XDP: every frame checked on its own, the verdict counters per batch.
        let before = dp.reasons();
        let histogram_before = track.verdicts;
        let mut frames = Vec::with_capacity((end - start) as usize);
        for index in start..end {
            let frame = xdp_frame(run.seed, index, &model);
            check_xdp_frame(&dp, &model, &run, &mut track, index, &frame);
            frames.push((index, frame));
        }
        let moved = deltas(&before, &dp.reasons());
        let want: Vec<u64> = Reason::ALL
            .iter()
            .map(|r| track.verdicts[*r as usize] - histogram_before[*r as usize])
            .collect();
        let problems = counter_problems(&moved, &want);
        if !problems.is_empty() {
            find_culprit(&dp, &model, &run, &frames);
            panic!(
                "XDP frames {start}..{end}: the counters disagree with the model, but no single \
                 frame does when replayed:{problems}\n{}",
                run.replay()
            );
        }
        drop(frames);

        // TC egress, replies of the flows so far among them: only rev_nat may move.
        let before = dp.reasons();
        let rewritten_before = track.tc_rewritten;
        for index in start / TC_SHARE..end / TC_SHARE {
            let frame = tc_frame(run.seed, index, &model, &track.replies);
            check_tc_frame(&dp, &run, &mut track, index, &frame);
        }
        let moved = deltas(&before, &dp.reasons());
        let mut want = [0; Reason::COUNT as usize];
        want[Reason::RevNat as usize] = track.tc_rewritten - rewritten_before;
        let problems = counter_problems(&moved, &want);
        assert!(
            problems.is_empty(),
            "TC egress frames {}..{}: counters:{problems}\n{}",
            start / TC_SHARE,
            end / TC_SHARE,
            run.replay()
        );

        check_traffic_counters(&dp, &model, &run, &track);
        start = end;
    }

    // The totals: every XDP frame under exactly one verdict, and no event but rev_nat.
    let reasons = dp.reasons();
    let verdicts: u64 = VERDICTS.iter().map(|r| reasons.get(*r)).sum();
    assert_eq!(
        verdicts,
        run.packets,
        "the verdict counters add up to {verdicts}, not the {} frames run\n{}",
        run.packets,
        run.replay()
    );
    for r in &events {
        let want = match r {
            Reason::RevNat => track.tc_rewritten,
            Reason::Promoted => track.verdicts[Reason::Promoted as usize],
            _ => 0,
        };
        assert_eq!(reasons.get(*r), want, "{}\n{}", r.name(), run.replay());
    }
    let forwarded: u64 = model
        .services
        .iter()
        .map(|s| dp.service_counters(s.id).packets)
        .sum();
    assert_eq!(
        forwarded,
        reasons.get(Reason::Forwarded),
        "service packet counters vs forwarded\n{}",
        run.replay()
    );
    if track.exact() {
        check_flow_maps(&dp, &model, &run, &track);
    }

    let elapsed = started.elapsed();
    let mut summary = String::new();
    for r in VERDICTS {
        let _ = write!(summary, "\n  {:<15} {:>9}", r.name(), reasons.get(r));
    }
    println!(
        "xlb fuzz: {} XDP frames in {elapsed:.1?} ({:.0}/s), verdicts:{summary}\n  \
         {} flows; TC egress: {} frames, {} rewritten, {} refused by the kernel (too short)\n  \
         rewrites with a wrong IPv4 checksum {}, a wrong L4 checksum {}, UDP without one {}",
        run.packets,
        run.packets as f64 / elapsed.as_secs_f64(),
        track.flows.len(),
        track.tc_packets,
        track.tc_rewritten,
        track.tc_refused,
        track.odd_checksums[0],
        track.odd_checksums[1],
        track.odd_checksums[2]
    );
    // The corpus must reach every verdict, or the generator has gone blind somewhere.
    if run.packets >= 10_000 {
        for r in VERDICTS {
            assert!(reasons.get(r) > 0, "the corpus never hit {}", r.name());
        }
        assert!(track.tc_rewritten > 0, "TC egress never saw a known reply");
        assert!(
            track.odd_checksums.iter().all(|n| *n > 0),
            "the corpus missed a checksum corner case: {:?}",
            track.odd_checksums
        );
    }
}

fn test_model() -> Model {
    Model::new(
        services()
            .into_iter()
            .enumerate()
            .map(|(i, (name, vip, proto, backends))| Svc {
                name,
                id: i as u32,
                vip,
                proto,
                backends: backends
                    .iter()
                    .enumerate()
                    .map(|(j, (b, _))| (*b, (10 * i + j) as u32))
                    .collect(),
            })
            .collect(),
    )
}

/// The model itself against rows of the verdict table (no BPF).
#[test]
fn reference_model_follows_the_verdict_table() {
    let model = test_model();
    let client = sock([10, 99, 1, 2], 40000);
    let web = SocketAddrV4::new(VIP1, 80);
    let dns = SocketAddrV4::new(VIP1, 53);
    let tcp = Packet::tcp(client, web).with_payload(*b"0123456789");
    let udp = Packet::udp(client, dns).with_payload(*b"query");
    let (l3, l4) = (tcp.l3_off(), tcp.l4_off());
    let edit = |pkt: &Packet, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = pkt.build();
        f(&mut b);
        b
    };
    let to_other = |p: &Packet| p.clone().with_dst(SocketAddrV4::new(NOT_VIP, 80));
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        ("TCP to web", tcp.build(), Reason::Forwarded),
        ("UDP to dns", udp.build(), Reason::Forwarded),
        (
            "UDP to dns, no checksum, 802.1ad",
            udp.clone()
                .without_udp_checksum()
                .with_vlan(ETH_P_8021AD, 3)
                .build(),
            Reason::Forwarded,
        ),
        (
            "TCP to web, reserved flag bit",
            tcp.clone().with_frag(0x8000 | IP_DF).build(),
            Reason::Forwarded,
        ),
        (
            "TCP to web, padded",
            tcp.clone().with_padding(9).build(),
            Reason::Forwarded,
        ),
        (
            "UDP length short of the segment",
            edit(&udp, &|f| put_be16(f, udp.l4_off() + UDP_LEN, 9)),
            Reason::Forwarded,
        ),
        (
            "TCP to the service without backends",
            tcp.clone().with_dst(SocketAddrV4::new(VIP1, 8443)).build(),
            Reason::DropNoBackend,
        ),
        (
            "TCP to web with IP options",
            tcp.clone().with_options([1, 1, 1, 0]).build(),
            Reason::DropIpOptions,
        ),
        (
            "TCP with IP options to the VIP address, another port",
            tcp.clone()
                .with_options([1, 1, 1, 0])
                .with_dst(SocketAddrV4::new(VIP1, 81))
                .build(),
            Reason::PassNotVip,
        ),
        (
            "UDP to the TCP VIP",
            udp.clone().with_dst(web).build(),
            Reason::PassNotVip,
        ),
        (
            "fragment to the VIP address, any port",
            udp.clone()
                .with_dst(SocketAddrV4::new(VIP2, 9))
                .with_frag(IP_MF)
                .build(),
            Reason::DropFragment,
        ),
        (
            "fragment elsewhere",
            to_other(&tcp).with_frag(185).build(),
            Reason::PassFragment,
        ),
        (
            "ICMP fragment to the VIP (no ports either way)",
            Packet::icmp_echo(*client.ip(), VIP1)
                .with_frag(IP_MF)
                .build(),
            Reason::PassNotL4,
        ),
        (
            "ICMP to the VIP",
            Packet::icmp_echo(*client.ip(), VIP1).build(),
            Reason::PassNotL4,
        ),
        (
            "cut inside the IPv4 header",
            tcp.build()[..l3 + 19].to_vec(),
            Reason::PassMalformed,
        ),
        (
            "cut inside the TCP header",
            tcp.build()[..l4 + 19].to_vec(),
            Reason::DropMalformed,
        ),
        (
            "IHL 4 to the VIP",
            edit(&tcp, &|f| f[l3] = 0x44),
            Reason::DropMalformed,
        ),
        (
            "IHL 4 elsewhere",
            edit(&to_other(&tcp), &|f| f[l3] = 0x44),
            Reason::PassMalformed,
        ),
        (
            "ICMP with version 6 to the VIP",
            edit(&Packet::icmp_echo(*client.ip(), VIP1), &|f| f[l3] = 0x65),
            Reason::DropMalformed,
        ),
        (
            "total length past the frame",
            edit(&tcp, &|f| put_be16(f, l3 + IP_TOT_LEN, 0xffff)),
            Reason::DropMalformed,
        ),
        (
            "TCP data offset 4",
            edit(&tcp, &|f| f[l4 + TCP_DOFF] = 4 << 4),
            Reason::DropMalformed,
        ),
        (
            "TCP data offset past the segment",
            edit(&tcp, &|f| f[l4 + TCP_DOFF] = 8 << 4),
            Reason::DropMalformed,
        ),
        (
            "UDP length 7",
            edit(&udp, &|f| put_be16(f, udp.l4_off() + UDP_LEN, 7)),
            Reason::DropMalformed,
        ),
        (
            "UDP length past the segment",
            edit(&udp, &|f| put_be16(f, udp.l4_off() + UDP_LEN, 14)),
            Reason::DropMalformed,
        ),
        (
            "QinQ to the VIP",
            tcp.clone()
                .with_vlan(ETH_P_8021AD, 1)
                .with_vlan(ETH_P_8021Q, 2)
                .build(),
            Reason::PassNotIp,
        ),
        (
            "802.1Q tag cut",
            tcp.clone().with_vlan(ETH_P_8021Q, 1).build()[..16].to_vec(),
            Reason::PassNotIp,
        ),
        ("ARP", arp_request(*client.ip(), VIP1), Reason::PassNotIp),
        ("IPv6", ipv6_tcp_syn(80), Reason::PassIpv6),
    ];
    for (what, frame, reason) in cases {
        assert_eq!(
            model.xdp_verdict(&frame).reason,
            reason,
            "{what}: {:?}",
            parse(&frame)
        );
    }
}

/// The rewrite checker must catch a wrong rewrite (no BPF).
#[test]
fn rewrite_checker_catches_wrong_rewrites() {
    let client = sock([10, 99, 1, 2], 40000);
    let backend = sock([10, 99, 2, 11], 8080);
    for pkt in [
        Packet::tcp(client, SocketAddrV4::new(VIP1, 80)).with_payload(*b"abc"),
        Packet::udp(client, SocketAddrV4::new(VIP1, 53)).with_payload(*b"abcd"),
        Packet::udp(client, SocketAddrV4::new(VIP1, 53))
            .with_vlan(ETH_P_8021Q, 1)
            .with_padding(5),
    ] {
        let input = pkt.build();
        let Parsed::Ok(h) = parse(&input) else {
            panic!("fixture {pkt:?} does not parse");
        };
        let good = pkt.clone().with_dst(backend).build();
        assert_eq!(check_rewrite(&input, &good, &h, Side::Dst), Ok(backend));
        let bad = |at: usize| {
            let mut f = good.clone();
            f[at] ^= 0x01;
            f
        };
        for (what, out) in [
            ("IPv4 checksum", bad(h.l3 + IP_CSUM + 1)),
            ("L4 checksum", bad(h.l4_csum())),
            ("source address", bad(h.l3 + IP_SADDR)),
            ("TTL", bad(h.l3 + 8)),
            ("payload", bad(h.l4_end() - 1)),
            ("padding", bad(input.len() - 1)),
            ("length", good[..good.len() - 1].to_vec()),
        ] {
            assert!(
                check_rewrite(&input, &out, &h, Side::Dst).is_err(),
                "{what} went unnoticed"
            );
        }
        // A broken input checksum must come out as broken, not repaired.
        let mut broken = input.clone();
        broken[h.l4_csum()] ^= 0x10;
        assert!(check_rewrite(&broken, &good, &h, Side::Dst).is_err());
        let mut broken = input.clone();
        broken[h.l3 + IP_CSUM] ^= 0x10;
        assert!(check_rewrite(&broken, &good, &h, Side::Dst).is_err());
        // UDP without checksum: stays 0, and the rewrite must not invent one.
        if h.proto == PROTO_UDP {
            let none = pkt.clone().without_udp_checksum();
            let (input, good) = (none.build(), none.clone().with_dst(backend).build());
            assert_eq!(check_rewrite(&input, &good, &h, Side::Dst), Ok(backend));
            let invented = pkt.clone().with_dst(backend).build();
            assert!(check_rewrite(&input, &invented, &h, Side::Dst).is_err());
        }
    }
}
