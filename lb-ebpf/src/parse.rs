//! Bounds-checked header parsing shared by the XDP and TC programs. Every read is preceded by
//! a check against `data_end` that the verifier can follow; nothing here writes.
use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP, Reason};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
/// More-fragments flag and fragment offset, in host order.
const IP_MF_OFFSET: u16 = 0x3fff;

pub const PROTO_ICMP: u8 = 1;

/// TCP flags (low bits of the data offset/flags word, host order).
const TCP_FIN: u16 = 0x01;
const TCP_SYN: u16 = 0x02;
const TCP_RST: u16 = 0x04;
const TCP_ACK: u16 = 0x10;

/// Offset of the L4 checksum within the TCP and UDP headers.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

#[repr(C)]
#[allow(dead_code)] // full layout, only some fields are read
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// An IPv4 header without options.
pub const IPV4_HLEN: usize = size_of::<Ipv4Hdr>();

/// The first 20 bytes of TCP and 8 of UDP share the port layout; we read only what we need.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

#[repr(C)]
#[allow(dead_code)] // full layout, only some fields are read
struct TcpHdr {
    ports: Ports,
    seq: u32,
    ack: u32,
    doff_flags: u16,
    window: u16,
    check: u16,
    urg: u16,
}

#[repr(C)]
struct UdpHdr {
    ports: Ports,
    len: u16,
    check: u16,
}

/// Packet access common to XDP and TC contexts.
pub trait PacketBuf {
    fn start(&self) -> usize;
    fn end(&self) -> usize;

    /// A pointer to a `T` at `offset`, if the whole `T` lies within the packet.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let start = self.start();
        if start + offset + size_of::<T>() > self.end() {
            return None;
        }
        Some((start + offset) as *mut T)
    }

    /// Length of the whole packet, including any part not in the linear buffer.
    fn len(&self) -> usize;
}

impl PacketBuf for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl PacketBuf for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    /// skb->len: locally generated TCP keeps its payload in page fragments.
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// Reads a header field. Packet data is only 2-byte aligned after Ethernet, but BPF on the
/// kernel's JITs (and its verifier, without strict alignment) takes unaligned loads; an
/// unaligned read here would make LLVM split every field into byte loads.
#[inline(always)]
pub fn load<T: Copy>(p: *const T) -> T {
    unsafe { core::ptr::read(p) }
}

/// An IPv4 TCP/UDP packet with the fields the balancer needs. Addresses and ports are in
/// network byte order.
pub struct L4Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    /// Offset of the L4 checksum field.
    pub csum_off: usize,
    pub proto: u8,
    /// The IPv4 total length.
    pub tot_len: u16,
    pub has_ip_options: bool,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl L4Packet {
    /// The packet's 5-tuple, source first.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: [self.saddr, 0, 0, 0],
            dst: [self.daddr, 0, 0, 0],
            src_port: self.sport,
            dst_port: self.dport,
            proto: self.proto,
            family: FAMILY_V4,
            _pad: 0,
        }
    }
}

/// The TCP flags the flow tables follow, of a packet of either family (all false for UDP).
pub trait Segment {
    /// A SYN without ACK: the first packet of a connection.
    fn syn(&self) -> bool;
    fn fin(&self) -> bool;
    fn rst(&self) -> bool;
    /// A FIN or RST: the connection is ending.
    #[inline(always)]
    fn closing(&self) -> bool {
        self.fin() || self.rst()
    }
}

/// `Segment` of a packet struct with `syn`, `fin` and `rst` fields.
macro_rules! segment_of_fields {
    ($packet:ty) => {
        impl $crate::parse::Segment for $packet {
            #[inline(always)]
            fn syn(&self) -> bool {
                self.syn
            }
            #[inline(always)]
            fn fin(&self) -> bool {
                self.fin
            }
            #[inline(always)]
            fn rst(&self) -> bool {
                self.rst
            }
        }
    };
}
pub(crate) use segment_of_fields;

segment_of_fields!(L4Packet);

/// An ICMP message in IPv4 (without IP options), with what the balancer reads of it.
pub struct IcmpPacket {
    pub l3_off: usize,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    pub tot_len: u16,
    pub kind: u8,
    pub code: u8,
    pub saddr: u32,
    pub daddr: u32,
}

pub enum Parsed {
    L4(L4Packet),
    /// ICMP (the caller checks whether it concerns a VIP).
    Icmp(IcmpPacket),
    /// An IPv4 fragment (no ports to hash), with its destination address.
    Fragment(u32),
    /// A broken IPv4/TCP/UDP header, with the destination address if it could be read.
    Malformed(Option<u32>),
    /// IPv6 at this offset: `parse6` reads it, in a frame of its own.
    Ipv6(usize),
    Pass(Reason),
}

/// Parses Ethernet (+ one VLAN tag), IPv4 and the TCP/UDP ports.
#[inline(always)]
pub fn parse<B: PacketBuf>(buf: &B) -> Parsed {
    let Some(eth_type) = buf.ptr_at::<u16>(12) else {
        return Parsed::Pass(Reason::PassNotIp);
    };
    let mut eth_type = u16::from_be(load(eth_type));
    let mut l3_off = ETH_HLEN;
    if eth_type == ETH_P_8021Q || eth_type == ETH_P_8021AD {
        let Some(inner) = buf.ptr_at::<u16>(ETH_HLEN + 2) else {
            return Parsed::Pass(Reason::PassNotIp);
        };
        eth_type = u16::from_be(load(inner));
        l3_off += VLAN_HLEN;
    }
    if eth_type == ETH_P_IPV6 {
        return Parsed::Ipv6(l3_off);
    }
    if eth_type != ETH_P_IP {
        return Parsed::Pass(Reason::PassNotIp);
    }

    let Some(ip) = buf.ptr_at::<Ipv4Hdr>(l3_off) else {
        return Parsed::Malformed(None);
    };
    let daddr = load(unsafe { &raw const (*ip).daddr });
    let version_ihl = load(unsafe { &raw const (*ip).version_ihl });
    let ihl = (version_ihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be(load(unsafe { &raw const (*ip).tot_len })) as usize;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || tot_len < ihl {
        return Parsed::Malformed(Some(daddr));
    }
    // Trailing Ethernet padding is allowed; a total length past the packet is not.
    if l3_off + tot_len > buf.len() {
        return Parsed::Malformed(Some(daddr));
    }
    let proto = load(unsafe { &raw const (*ip).proto });
    if proto == PROTO_ICMP
        && ihl == size_of::<Ipv4Hdr>()
        && u16::from_be(load(unsafe { &raw const (*ip).frag_off })) & IP_MF_OFFSET == 0
        && let Some(icmp) = buf.ptr_at::<[u8; 2]>(l3_off + ihl)
    {
        let [kind, code] = load(icmp);
        return Parsed::Icmp(IcmpPacket {
            l3_off,
            icmp_off: l3_off + ihl,
            tot_len: tot_len as u16,
            kind,
            code,
            saddr: load(unsafe { &raw const (*ip).saddr }),
            daddr,
        });
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::Pass(Reason::PassNotL4);
    }
    if u16::from_be(load(unsafe { &raw const (*ip).frag_off })) & IP_MF_OFFSET != 0 {
        return Parsed::Fragment(daddr);
    }
    let saddr = load(unsafe { &raw const (*ip).saddr });

    let l4_off = l3_off + ihl;
    let Some(l4) = l4_header(buf, proto, l4_off, tot_len - ihl) else {
        return Parsed::Malformed(Some(daddr));
    };

    Parsed::L4(L4Packet {
        l3_off,
        l4_off,
        csum_off: l4_off + l4.csum_off,
        proto,
        tot_len: tot_len as u16,
        has_ip_options: ihl > size_of::<Ipv4Hdr>(),
        syn: l4.syn,
        fin: l4.fin,
        rst: l4.rst,
        saddr,
        daddr,
        sport: l4.ports.src,
        dport: l4.ports.dst,
    })
}

/// What the balancer reads of a TCP or UDP header (either IP version).
pub struct L4Header {
    pub ports: Ports,
    /// Of the checksum field, from the L4 header.
    pub csum_off: usize,
    /// A SYN without ACK.
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
}

/// The TCP or UDP header at `l4_off`, of an L4 payload of `l4_len` bytes; None if it is
/// cut short or its length fields do not fit (TCP data offset < 5 or past the payload, UDP
/// length < 8 or past the payload).
#[inline(always)]
pub fn l4_header<B: PacketBuf>(
    buf: &B,
    proto: u8,
    l4_off: usize,
    l4_len: usize,
) -> Option<L4Header> {
    if proto == PROTO_TCP {
        let tcp = buf.ptr_at::<TcpHdr>(l4_off)?;
        let doff_flags = u16::from_be(load(unsafe { &raw const (*tcp).doff_flags }));
        let doff = (doff_flags >> 12) as usize * 4;
        if doff < size_of::<TcpHdr>() || doff > l4_len {
            return None;
        }
        Some(L4Header {
            ports: load(unsafe { &raw const (*tcp).ports }),
            csum_off: TCP_CSUM_OFF,
            syn: doff_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
            fin: doff_flags & TCP_FIN != 0,
            rst: doff_flags & TCP_RST != 0,
        })
    } else {
        let udp = buf.ptr_at::<UdpHdr>(l4_off)?;
        let udp_len = u16::from_be(load(unsafe { &raw const (*udp).len })) as usize;
        if udp_len < size_of::<UdpHdr>() || udp_len > l4_len {
            return None;
        }
        Some(L4Header {
            ports: load(unsafe { &raw const (*udp).ports }),
            csum_off: UDP_CSUM_OFF,
            syn: false,
            fin: false,
            rst: false,
        })
    }
}
