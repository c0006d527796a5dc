//! IPv6: the fixed header, a bounded chain of extension headers, then the TCP/UDP ports or
//! the ICMPv6 type. Checked like `parse` (every read against `data_end`); nothing here writes.
use lb_common::{IPV6_MAX_EXT_HEADERS, PROTO_TCP, PROTO_UDP};

use lb_common::{FAMILY_V6, FlowKey};

use crate::parse::{PacketBuf, TCP_CSUM_OFF, UDP_CSUM_OFF, l4_header, load, segment_of_fields};

pub const IPV6_HLEN: usize = 40;

/// Extension headers (RFC 8200 4.1) the parser walks past.
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_DEST_OPTS: u8 = 60;
pub const PROTO_ICMPV6: u8 = 58;

/// Fragment offset and M flag of a fragment header, in host order.
const FRAG_OFFSET_MORE: u16 = 0xfff9;

#[repr(C)]
#[allow(dead_code)] // full layout, only some fields are read
pub struct Ipv6Hdr {
    pub version_class_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// An IPv6 address as four words in network order, as lb-common's keys hold it.
pub type Addr6 = [u32; 4];

/// An IPv6 TCP/UDP packet with what the balancer needs. Addresses and ports are in network
/// byte order; the offsets are what a rewrite needs (no IP checksum in v6).
pub struct L4Packet6 {
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    /// As in `L4Header` (the fields, not the header: a smaller frame for the balancer).
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub sport: u16,
    pub dport: u16,
    pub saddr: Addr6,
    pub daddr: Addr6,
}

impl L4Packet6 {
    /// Offset of the L4 checksum field (computed: one field less on the balancer's stack).
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == PROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }

    /// The packet's 5-tuple, source first.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: self.saddr,
            dst: self.daddr,
            src_port: self.sport,
            dst_port: self.dport,
            proto: self.proto,
            family: FAMILY_V6,
            _pad: 0,
        }
    }
}

segment_of_fields!(L4Packet6);

/// An ICMPv6 message, with what the balancer reads of it.
pub struct Icmp6Packet {
    pub l3_off: usize,
    pub icmp_off: usize,
    /// Where the IPv6 payload ends (Ethernet padding may follow).
    pub end: usize,
    pub kind: u8,
    pub code: u8,
    pub daddr: Addr6,
}

pub enum Parsed6 {
    L4(L4Packet6),
    Icmp(Icmp6Packet),
    /// A fragment (offset or more-fragments set): no ports to hash.
    Fragment(Addr6),
    /// A broken header, with the destination address if it could be read.
    Malformed(Option<Addr6>),
    /// More than `IPV6_MAX_EXT_HEADERS` extension headers.
    TooManyExtHeaders(Addr6),
    /// Neither TCP, UDP nor ICMPv6 (ESP, AH, no next header, ...).
    NotL4,
}

/// Copies an address word by word. A whole-array copy between two places the compiler
/// cannot tell apart becomes a call to the library memmove, whose byte loop the verifier
/// walks at every call site.
#[inline(always)]
pub fn copy_addr(dst: &mut Addr6, src: &Addr6) {
    for i in 0..4 {
        unsafe { core::ptr::write_volatile(&raw mut dst[i], core::ptr::read_volatile(&src[i])) };
    }
}

/// `copy_addr` from a header field in the packet.
#[inline(always)]
pub fn load_addr(dst: &mut Addr6, src: *const Addr6) {
    let words = src.cast::<u32>();
    for (i, word) in dst.iter_mut().enumerate() {
        *word = unsafe { core::ptr::read_volatile(words.add(i)) };
    }
}

/// Parses the IPv6 packet at `l3_off`.
#[inline(always)]
pub fn parse6<B: PacketBuf>(buf: &B, l3_off: usize) -> Parsed6 {
    let Some(ip) = buf.ptr_at::<Ipv6Hdr>(l3_off) else {
        return Parsed6::Malformed(None);
    };
    let daddr = load(unsafe { &raw const (*ip).daddr });
    let version = load(unsafe { &raw const (*ip).version_class_flow }).to_ne_bytes()[0] >> 4;
    let payload_len = u16::from_be(load(unsafe { &raw const (*ip).payload_len })) as usize;
    // Trailing Ethernet padding is allowed; a payload past the packet is not. (Jumbograms,
    // payload length 0 with a hop-by-hop option, do not fit an Ethernet frame.)
    if version != 6 || l3_off + IPV6_HLEN + payload_len > buf.len() {
        return Parsed6::Malformed(Some(daddr));
    }
    let end = l3_off + IPV6_HLEN + payload_len;
    let mut next = load(unsafe { &raw const (*ip).next_header });
    let mut off = l3_off + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {
                let Some(ext) = buf.ptr_at::<[u8; 2]>(off) else {
                    return Parsed6::Malformed(Some(daddr));
                };
                let [following, len] = load(ext);
                next = following;
                off += (len as usize + 1) * 8;
            }
            NEXT_FRAGMENT => {
                let Some(frag) = buf.ptr_at::<[u8; 4]>(off) else {
                    return Parsed6::Malformed(Some(daddr));
                };
                let [following, _, hi, lo] = load(frag);
                // An atomic fragment (offset 0, no more) is a whole packet (RFC 6946).
                if u16::from_be_bytes([hi, lo]) & FRAG_OFFSET_MORE != 0 {
                    return Parsed6::Fragment(daddr);
                }
                next = following;
                off += 8;
            }
            _ => break,
        }
    }
    if matches!(
        next,
        NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS | NEXT_FRAGMENT
    ) {
        return Parsed6::TooManyExtHeaders(daddr);
    }
    if off > end {
        return Parsed6::Malformed(Some(daddr));
    }
    if next == PROTO_ICMPV6 {
        let Some(icmp) = buf.ptr_at::<[u8; 2]>(off) else {
            return Parsed6::Malformed(Some(daddr));
        };
        let [kind, code] = load(icmp);
        return Parsed6::Icmp(Icmp6Packet {
            l3_off,
            icmp_off: off,
            end,
            kind,
            code,
            daddr,
        });
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return Parsed6::NotL4;
    }
    let Some(l4) = l4_header(buf, next, off, end - off) else {
        return Parsed6::Malformed(Some(daddr));
    };
    Parsed6::L4(L4Packet6 {
        l3_off,
        l4_off: off,
        proto: next,
        syn: l4.syn,
        fin: l4.fin,
        rst: l4.rst,
        sport: l4.ports.src,
        dport: l4.ports.dst,
        saddr: load(unsafe { &raw const (*ip).saddr }),
        daddr,
    })
}
