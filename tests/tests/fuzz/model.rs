//! The reference model: the parser and verdict table of docs/architecture.md, read from the
//! bytes, sharing no code with lb-ebpf; and the checksums computed from scratch.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use xlb_tests::testrun::*;

use super::{NOT_VIP, PROTO_ICMP, VIP1, VIP2, services, sock};

/// The headers of a well-formed IPv4 TCP/UDP packet, as the model reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub l3: usize,
    pub ihl: usize,
    pub tot_len: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// The UDP length field (the bytes its checksum covers); 0 for TCP.
    pub udp_len: usize,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

impl Headers {
    /// A SYN without ACK: opens a flow.
    pub fn syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    pub fn l4(&self) -> usize {
        self.l3 + self.ihl
    }

    /// End of what the L4 checksum covers.
    pub fn l4_end(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l3 + self.tot_len
        } else {
            self.l4() + self.udp_len
        }
    }

    pub fn l4_csum(&self) -> usize {
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
pub enum Parsed {
    /// Not IPv4 or IPv6, or more than one VLAN tag (or a tag cut short).
    NotIp,
    /// IPv6, its header at this offset.
    Ipv6(usize),
    /// IPv4, but the frame ends inside the 20-byte header: no destination to judge.
    TooShort,
    /// Bad version or IHL, total length below the IHL or past the frame; with the
    /// destination address.
    BadIp(Ipv4Addr),
    /// A sound IPv4 header of another protocol, at this offset.
    NotL4(usize),
    /// A TCP/UDP fragment (MF or an offset), with the destination address.
    Fragment(Ipv4Addr),
    /// A TCP/UDP header that does not fit the IPv4 packet (cut short, data offset < 5 or past
    /// the end, UDP length < 8 or past the end), with the destination address.
    BadL4(Ipv4Addr),
    Ok(Headers),
}

pub fn get16(f: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]))
}

/// Reads a frame as docs/architecture.md describes the parser: Ethernet, at most one
/// 802.1Q/802.1ad tag, IPv4, and the TCP/UDP header within the IPv4 packet's total length
/// (Ethernet padding after it is allowed). A pure reading of the bytes, sharing no code with
/// lb-ebpf.
pub fn parse(f: &[u8]) -> Parsed {
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
        ETH_P_IPV6 => return Parsed::Ipv6(l3),
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
        return Parsed::NotL4(l3);
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
pub struct Svc {
    pub name: &'static str,
    pub id: u32,
    pub vip: SocketAddrV4,
    pub proto: u8,
    /// (endpoint, backend id)
    pub backends: Vec<(SocketAddrV4, u32)>,
}

pub struct Model {
    pub services: Vec<Svc>,
    vip_addrs: HashSet<Ipv4Addr>,
}

/// The model's verdict, and for a forward the service and the headers to check the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub forward: Option<(usize, Headers)>,
    /// ICMP to a VIP that XDP handles itself.
    pub icmp: Option<Icmp>,
}

/// What XDP does with ICMP to a VIP address (icmp.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmp {
    /// An echo request, answered out of the NIC it came in on.
    Echo { l3: usize },
    /// An error quoting a packet that `service`'s VIP sent: to a backend of the service,
    /// the quoted packet's source rewritten to it. `flow` is the client -> VIP 5-tuple.
    ToBackend {
        l3: usize,
        service: usize,
        flow: (Ipv4Addr, u16, Ipv4Addr, u16, u8),
    },
}

impl Model {
    pub fn new(services: Vec<Svc>) -> Model {
        let vip_addrs = services.iter().map(|s| *s.vip.ip()).collect();
        Model {
            services,
            vip_addrs,
        }
    }

    /// The services as the data path has them applied (ids from the reconciler).
    pub fn applied(dp: &LoadedDatapath) -> Model {
        Model::applied_from(dp, services())
    }

    /// The services of `specs` as the data path has them applied.
    pub fn applied_from(dp: &LoadedDatapath, specs: Vec<super::ServiceSpec>) -> Model {
        Model::new(
            specs
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
    pub fn xdp_verdict(&self, frame: &[u8]) -> Verdict {
        let ours = |addr: Ipv4Addr| self.vip_addrs.contains(&addr);
        let reason = match parse(frame) {
            Parsed::NotIp => Reason::PassNotIp,
            Parsed::Ipv6(l3) => super::model6::verdict6(frame, l3, |a| a == super::VIP6),
            Parsed::TooShort => Reason::PassMalformed,
            Parsed::NotL4(l3) => match self.icmp(frame, l3) {
                None => Reason::PassNotL4,
                Some(None) => Reason::PassIcmp,
                Some(Some(icmp)) => {
                    let reason = match icmp {
                        Icmp::Echo { .. } => Reason::IcmpEcho,
                        Icmp::ToBackend { .. } => Reason::Forwarded,
                    };
                    return Verdict {
                        reason,
                        forward: None,
                        icmp: Some(icmp),
                    };
                }
            },
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
                        icmp: None,
                    };
                }
            },
        };
        Verdict {
            reason,
            forward: None,
            icmp: None,
        }
    }

    /// ICMP in the sound IPv4 packet at `l3`: None if it is not ICMP to a VIP address that
    /// XDP looks at (no options, no fragment, 2 bytes of ICMP header), Some(None) if XDP
    /// leaves it to the kernel, else what XDP does. Bounds are the frame's, as the data
    /// path's checks are against the end of the packet.
    fn icmp(&self, f: &[u8], l3: usize) -> Option<Option<Icmp>> {
        let ip = &f[l3..];
        let daddr = ipv4_at(ip, IP_DADDR);
        let simple = ip[9] == PROTO_ICMP && ip[0] & 0x0f == 5 && be16(ip, 6) & 0x3fff == 0;
        if !simple || f.len() < l3 + 22 || !self.vip_addrs.contains(&daddr) {
            return None;
        }
        let icmp = l3 + 20;
        Some(match f[icmp] {
            8 if f.len() >= icmp + 8 => Some(Icmp::Echo { l3 }),
            3 | 11 => {
                let q = icmp + 8;
                let proto = f.get(q + 9).copied();
                // The quoted header and ports inside the IPv4 packet, not in padding.
                let sound = f.len() >= q + 24
                    && l3 + usize::from(be16(f, l3 + IP_TOT_LEN)) >= q + 24
                    && f[q] == 0x45
                    && matches!(proto, Some(PROTO_TCP | PROTO_UDP))
                    && ipv4_at(f, q + IP_SADDR) == daddr;
                sound
                    .then(|| {
                        let vip = SocketAddrV4::new(daddr, be16(f, q + 20));
                        let proto = f[q + 9];
                        let service = self
                            .services
                            .iter()
                            .position(|s| s.vip == vip && s.proto == proto)
                            .filter(|k| !self.services[*k].backends.is_empty())?;
                        let client = (ipv4_at(f, q + IP_DADDR), be16(f, q + 22));
                        let flow = (client.0, client.1, daddr, vip.port(), proto);
                        Some(Icmp::ToBackend { l3, service, flow })
                    })
                    .flatten()
            }
            _ => None,
        })
    }
}

/// The checksum of the L4 segment with its pseudo-header, as the frame has it (0 when the
/// checksum field is right).
pub fn l4_checksum(f: &[u8], h: &Headers) -> u16 {
    let len = (h.l4_end() - h.l4()) as u16;
    let mut pseudo = f[h.l3 + IP_SADDR..h.l3 + IP_DADDR + 4].to_vec();
    pseudo.extend_from_slice(&[0, h.proto]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    checksum(&[&pseudo, &f[h.l4()..h.l4_end()]])
}

pub fn ip_checksum(f: &[u8], h: &Headers) -> u16 {
    checksum(&[&f[h.l3..h.l4()]])
}

/// The checksum field computed from scratch (RFC 1071, UDP's 0 sent as 0xffff).
pub fn scratch_checksums(f: &[u8], h: &Headers) -> (u16, u16) {
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
            Reason::IcmpEcho,
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
        (
            "IPv6 TCP to a VIP address without a v6 service",
            ipv6_tcp_syn(80),
            Reason::PassNotVip,
        ),
        (
            "IPv6 TCP to no VIP address",
            {
                let mut f = ipv6_tcp_syn(80);
                f[14 + 39] = 2;
                f
            },
            Reason::PassNotVip,
        ),
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
