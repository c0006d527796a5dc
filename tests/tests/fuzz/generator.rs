//! The corpus: well-formed fixtures of every kind the data path meets, and random mutations
//! of them. An XDP frame depends on (seed, index) alone; a TC frame also on the flows XDP
//! created before it.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{PROTO_TCP, PROTO_UDP};
use xlb_tests::testrun::*;

use super::{
    Flow5, MAX_FRAME, NOT_VIP, PROTO_ICMP, VIP1, VIP2,
    model::{Model, Parsed, get16, parse, scratch_checksums},
    sock,
};

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

pub struct Frame {
    pub bytes: Vec<u8>,
    /// Where the fixture's IP and L4 headers were (mutations aim there; after some mutations
    /// nothing is there any more, which is fine).
    l3: usize,
    l4: usize,
    pub what: String,
}

impl Frame {
    /// A frame to run as it is (no fixture behind it).
    pub fn of(bytes: Vec<u8>, what: &str) -> Frame {
        Frame {
            bytes,
            l3: 14,
            l4: 34,
            what: what.into(),
        }
    }
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
    let upper = rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_TCP, 58, 59, 50, any]);
    let mut l4 = match upper {
        PROTO_TCP => {
            let mut t = vec![0; 20];
            put_be16(&mut t, L4_SPORT, 40000);
            // Often the port of modes.rs's v6 service.
            let port = if rng.chance(50) { 80 } else { some_port(rng) };
            put_be16(&mut t, L4_DPORT, port);
            t[TCP_DOFF] = 5 << 4;
            // Half of them a SYN: a v6 service's flows start with one.
            t[13] = if rng.chance(50) { TCP_SYN } else { rng.u8() };
            t
        }
        PROTO_UDP => {
            let mut u = rng.bytes(8);
            let port = if rng.chance(50) { 53 } else { some_port(rng) };
            put_be16(&mut u, L4_DPORT, port);
            u
        }
        58 => vec![
            rng.pick(&[128, 129, 133, 134, 135, 136, 137, 1, 2, any]),
            0,
            0,
            0,
        ],
        _ => vec![],
    };
    let n = payload_len(rng).min(200);
    l4.extend(rng.bytes(n));
    if upper == PROTO_UDP {
        let len = l4.len() as u16;
        put_be16(&mut l4, UDP_LEN, len);
    }
    // Extension headers before it: none, a few, or more than the data path walks.
    let count = match rng.below(4) {
        0 | 1 => 0,
        2 => 1 + rng.below(3),
        _ => rng.below(lb_common::IPV6_MAX_EXT_HEADERS + 3),
    };
    let kinds: Vec<u8> = (0..count).map(|_| rng.pick(&[0, 43, 60, 44])).collect();
    let mut chain = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let following = kinds.get(i + 1).copied().unwrap_or(upper);
        if kind == 44 {
            // Mostly an atomic fragment (a whole packet); else a real one.
            let field: u16 = if rng.chance(60) { 0 } else { rng.u16() };
            chain.extend_from_slice(&[following, 0]);
            chain.extend_from_slice(&field.to_be_bytes());
            chain.extend(rng.bytes(4));
        } else {
            let len = rng.below(3);
            chain.extend_from_slice(&[following, len as u8]);
            chain.extend(rng.bytes(6 + 8 * len));
        }
    }
    let next = kinds.first().copied().unwrap_or(upper);
    let l4_at = chain.len();
    chain.extend(l4);
    let l4 = chain;
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
        1 => super::VIP6.octets(),
        _ => rng.bytes(16).try_into().expect("16 bytes"),
    };
    f.extend_from_slice(&dst);
    f.extend_from_slice(&l4);
    let l3 = 14 + 4 * tags.len();
    Frame {
        bytes: with_tags(f, &tags),
        l3,
        l4: l3 + 40 + l4_at,
        what: format!("IPv6, {count} extension headers, then {upper}{tags_what}"),
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
        60..63 => icmp_error_frame(rng, model),
        63..67 => {
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

/// An ICMP error (mostly unreachable or time exceeded) from a router to a VIP, quoting a
/// packet the VIP sent to a client: what the data path hands to the flow's backend.
fn icmp_error_frame(rng: &mut Rng, model: &Model) -> Frame {
    let svc = &model.services[rng.below(model.services.len())];
    let client = client(rng);
    let quoted = match svc.proto {
        PROTO_TCP => Packet::tcp(svc.vip, client),
        _ => Packet::udp(svc.vip, client),
    }
    .build();
    let kind = rng.pick(&[3, 3, 3, 11, 11, 12, 5]);
    let any = rng.u8();
    let code = rng.pick(&[0, 1, 3, 4, any]);
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    let any = rng.u16();
    icmp.extend_from_slice(&rng.pick(&[1280u16, 0, any]).to_be_bytes());
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let router = Ipv4Addr::new(10, 99, 1, 254);
    let bytes = Packet::other(router, *svc.vip.ip(), PROTO_ICMP)
        .with_payload(icmp)
        .build();
    Frame {
        bytes,
        l3: 14,
        l4: 34,
        what: format!("ICMP {kind}/{code} about a flow of {}", svc.name),
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

pub fn xdp_frame(seed: u64, index: u64, model: &Model) -> Frame {
    let mut rng = Rng::for_frame(seed, 1, index);
    let mut f = fixture(&mut rng, model);
    mutate(&mut rng, &mut f);
    f
}

pub fn tc_frame(seed: u64, index: u64, model: &Model, replies: &[Flow5]) -> Frame {
    frame_among(seed, 2, index, model, replies)
}

/// Often one of `replies` (as it is or mutated), else any frame: of stream `stream`.
pub fn frame_among(seed: u64, stream: u64, index: u64, model: &Model, replies: &[Flow5]) -> Frame {
    let mut rng = Rng::for_frame(seed, stream, index);
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
pub fn kernel_refuses_skb(f: &[u8]) -> bool {
    match get16(f, 12) {
        Some(ETH_P_IP) => f.len() < 14 + 20,
        Some(ETH_P_IPV6) => f.len() < 14 + 40,
        _ => false,
    }
}
