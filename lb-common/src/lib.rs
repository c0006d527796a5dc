//! Types shared by the XDP/TC programs and the agent. Everything here is `#[repr(C)]` with
//! explicit padding, so the kernel and user space agree on every byte.
//!
//! Addresses are 16 bytes with a family tag everywhere, so IPv6 is an addition, not a
//! rewrite. An IPv4 address sits in `addr[0]`, the other words are zero. Words and ports are
//! kept in network byte order, exactly as they appear on the wire.
#![no_std]

pub mod allow;
pub mod hash;
pub mod sizes;
pub mod trace;

pub use hash::{flow_hash, ring_hash, source_hash};

/// Address family tags (not the libc values: these are ours and stable).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// The IPv6 extension headers (hop-by-hop, routing, fragment, destination options) the data
/// path walks before the upper-layer header: RFC 8200's order has at most five.
pub const IPV6_MAX_EXT_HEADERS: usize = 6;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// IP in IP (RFC 2003): dsr's plain encapsulation.
pub const PROTO_IPIP: u8 = 4;
/// IPv6 in IPv6 (RFC 2473): dsr's plain encapsulation to a v6 VIP.
pub const PROTO_IPV6: u8 = 41;

/// Forwarding modes (`Service::mode`).
pub const MODE_NAT: u8 = 0;
pub const MODE_FULLNAT: u8 = 1;
pub const MODE_DSR: u8 = 2;

/// `Service::flags` (dsr): encapsulate in GUE (IP in UDP) instead of IPIP.
pub const SERVICE_GUE: u8 = 1;
/// `Service::flags`: the service has an `allow` list: a source must match one of its
/// prefixes in `ALLOW` (allow.rs). Services without one never look there.
pub const SERVICE_ALLOW: u8 = 2;
/// `Service::flags`: `hash = "source"`: the ring slot comes from the client address, the
/// VIP and the protocol only (`hash::source_hash`); flow tables still key on the 5-tuple.
pub const SERVICE_SOURCE_HASH: u8 = 4;
/// UDP destination port of GUE-encapsulated packets (the port Katran uses, so its decap
/// interoperates).
pub const GUE_PORT: u16 = 9886;

/// Key of the VIP map: where clients send traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// One service (VIP:port:proto) as the data path reads it: where its active ring is, its mode,
/// and its fullnat source pool. Stored double-buffered in `SERVICES` (indexed by `id`), so
/// the agent replaces all of it at once and a packet never sees a mix of two versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// The VIP this id serves. The data path checks it against the key it looked up, so a
    /// VIP map element the kernel reused for another VIP is never taken for this one.
    pub vip: VipKey,
    pub id: u32,
    /// First slot of this service's active ring in `RINGS`.
    pub ring_offset: u32,
    /// Number of ring slots in use; 0 means no backend can take new flows.
    pub table_size: u32,
    pub mode: u8,
    pub flags: u8,
    pub _pad: u16,
    /// fullnat: the source addresses and ports new flows get.
    pub snat: SnatPool,
}

/// A value the agent replaces while the data path reads it, without locks: two copies, and
/// `active` says which one is current. The agent writes the other copy, then flips `active`
/// with one aligned store. It writes a copy again only after an RCU grace period, so a reader
/// that chose a copy before a flip is done with it before it changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoubleBuffer<T> {
    /// Index of the current copy (0 or 1; only the low bit counts).
    pub active: u32,
    pub _pad: u32,
    pub halves: [T; 2],
}

impl<T> DoubleBuffer<T> {
    /// The current copy.
    #[inline(always)]
    pub fn current(&self) -> &T {
        // One load of the flip word; the copy it names is complete (written before the flip).
        let active = unsafe { core::ptr::read_volatile(&self.active) } & 1;
        &self.halves[active as usize]
    }
}

/// `Backend::flags`: the slot holds a backend.
pub const BACKEND_IN_USE: u8 = 1;
/// `Backend::flags`: established flows may stay on this backend. Cleared when the backend is
/// removed or fails health checks; such flows are re-hashed. A drained backend (weight 0)
/// keeps this flag: it is only left out of the ring.
pub const BACKEND_ALIVE: u8 = 2;

/// A backend of one service (the current copy of a `BACKENDS` entry, indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
    pub service_id: u32,
    /// A local container's bridge: packets go there by TC redirect, never through the
    /// host's netfilter (Docker's FORWARD policy would drop them). 0: kernel routing.
    pub deliver_ifindex: u32,
    /// The container's host-side veth on that bridge, once the agent has resolved it (0:
    /// not yet; the bridge delivers). TC then hands the packet straight to the container's
    /// eth0 (`bpf_redirect_peer`): no bridge and no backlog queue on the way.
    pub port_ifindex: u32,
    /// The container's MAC and the bridge's, written into the frame for `port_ifindex`.
    pub mac: [u8; 6],
    pub gateway_mac: [u8; 6],
}

impl Backend {
    pub const fn is_alive(&self) -> bool {
        self.flags & BACKEND_ALIVE != 0
    }
}

/// A directional 5-tuple: the conntrack key (client -> VIP) and the reverse NAT key
/// (backend -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Conntrack value: the backend a flow is pinned to. New flows start in the embryonic table
/// and move to the main table once they prove two-way (`FLOW_REPLIED`, then a client packet
/// that is not a SYN), so a flood of new flows never evicts an established one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Ids fit 16 bits (MAX_BACKENDS, MAX_SERVICES): the entry stays 40 bytes, and the flow
    /// table's memory per flow with it.
    pub backend_id: u16,
    pub service_id: u16,
    pub snat_port: u16,
    /// `FLOW_*` bits.
    pub state: u8,
    pub _pad: u8,
    /// bpf_ktime_get_coarse_ns() when the flow was last refreshed (at most once a second).
    pub last_seen_ns: u64,
    /// fullnat: the LB source address and port this flow was given (network order).
    pub snat: [u32; 4],
    /// Seconds of the data path's clock when the flow was placed (for `xlb explain` and
    /// `xlb flows`).
    pub created_s: u32,
    /// mode nat: the interface the flow came in on (a new flow's replies are redirected out
    /// of it; once established, its `RevNat` says it). 0: unknown.
    pub ifindex: u32,
}

const _: () = assert!(sizes::MAX_BACKENDS <= 1 << 16 && sizes::MAX_SERVICES <= 1 << 16);

/// `Flow::state`: a reply of the flow was seen (nat and fullnat, where replies pass the LB).
pub const FLOW_REPLIED: u8 = 1;
/// `Flow::state`: the client sent a FIN.
pub const FLOW_FIN_CLIENT: u8 = 2;
/// `Flow::state`: the backend sent a FIN.
pub const FLOW_FIN_SERVER: u8 = 4;
/// `Flow::state`: either side sent a RST.
pub const FLOW_RST: u8 = 8;

impl Flow {
    /// Both sides are done (RST, or FIN both ways): the entry lingers only briefly.
    pub const fn is_closed(&self) -> bool {
        self.state & FLOW_RST != 0
            || self.state & (FLOW_FIN_CLIENT | FLOW_FIN_SERVER) == FLOW_FIN_CLIENT | FLOW_FIN_SERVER
    }
}

/// fullnat reverse mapping, keyed by the reply's 5-tuple (backend -> SNAT address:port).
/// Its existence is what reserves the SNAT port for that backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatRev {
    pub client: [u32; 4],
    pub vip: [u32; 4],
    /// Network byte order.
    pub client_port: u16,
    pub vip_port: u16,
    pub service_id: u32,
    /// When a packet of the flow was last seen (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// `SNAT_*` bits.
    pub state: u8,
    pub _pad: [u8; 7],
}

/// `SnatRev::state`: a FIN or RST was seen; the port may be reused sooner.
pub const SNAT_CLOSING: u8 = 1;
/// `SnatRev::state`: the backend answered (an embryonic reservation that never got an
/// answer is given to another flow after a short while).
pub const SNAT_REPLIED: u8 = 2;

/// Most SNAT addresses a fullnat service can have.
pub const MAX_SNAT_ADDRS: usize = 8;

/// fullnat source addresses of a service (indexed by service id). With `count == 0` the
/// address the kernel would use towards the backend (its FIB source) is taken.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatPool {
    pub addrs: [[u32; 4]; MAX_SNAT_ADDRS],
    pub count: u32,
    /// Ports handed out, inclusive, host order.
    pub port_min: u16,
    pub port_max: u16,
}

/// Reverse NAT value: what a reply's source is rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    pub vip: [u32; 4],
    /// Network byte order.
    pub vip_port: u16,
    pub family: u8,
    pub _pad: u8,
    pub service_id: u32,
    /// The interface the flow came in on: replies of locally delivered flows are redirected
    /// out of it.
    pub ifindex: u32,
}

/// Marks XDP metadata that asks the TC ingress program to deliver a packet to a local
/// container's bridge (`DeliverMeta::target` is the bridge's ifindex).
pub const DELIVER_MAGIC: u32 = 0x786c_6264; // "xlbd"
/// Marks XDP metadata that asks the TC ingress program to hand a packet straight to a local
/// container's eth0 (`DeliverMeta::target` is the backend id; its `port_ifindex` the veth).
pub const DELIVER_PEER_MAGIC: u32 = 0x786c_6270; // "xlbp"

/// Metadata the XDP program puts in front of a packet for the TC ingress program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliverMeta {
    pub magic: u32,
    pub target: u32,
}

/// Value bit of the VIP address set: the LB answers echo requests to this address.
pub const VIP_ADDR_ECHO: u32 = 1;

/// Key of the VIP address set (value: `VIP_ADDR_*` bits), consulted for fragments (which
/// carry no ports) and ICMP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipAddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// The flow tables, as indexes of the per-table counters (`TableCounters`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowTable {
    /// Established flows: client -> VIP.
    Flows = 0,
    /// New flows that have not proven two-way yet.
    FlowsNew,
    /// nat reply mappings of established flows: backend -> client.
    RevNat,
    RevNatNew,
    /// fullnat port reservations of established flows: backend -> SNAT address:port.
    SnatRev,
    SnatRevNew,
}

impl FlowTable {
    pub const COUNT: u32 = FlowTable::SnatRevNew as u32 + 1;
    pub const ALL: [FlowTable; FlowTable::COUNT as usize] = [
        FlowTable::Flows,
        FlowTable::FlowsNew,
        FlowTable::RevNat,
        FlowTable::RevNatNew,
        FlowTable::SnatRev,
        FlowTable::SnatRevNew,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlowTable::Flows => "flows",
            FlowTable::FlowsNew => "flows_new",
            FlowTable::RevNat => "rev_nat",
            FlowTable::RevNatNew => "rev_nat_new",
            FlowTable::SnatRev => "snat",
            FlowTable::SnatRevNew => "snat_new",
        }
    }
}

/// What the data path did to one flow table (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounters {
    /// Entries inserted that did not exist before.
    pub added: u64,
    /// Entries the data path deleted (promoted, closed and reopened, re-hashed).
    pub removed: u64,
    /// Inserts the kernel refused (no memory, or no entry it could evict).
    pub failed: u64,
}

impl TableCounters {
    pub fn add(&mut self, other: &TableCounters) {
        self.added += other.added;
        self.removed += other.removed;
        self.failed += other.failed;
    }
}

/// Per-CPU traffic counters of a service or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
    }
}

/// Why a packet got its verdict: the index of a global per-CPU counter. The documented
/// action for each is in docs/architecture.md.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// XDP_PASS: not IPv4/IPv6 (ARP, LLDP, ...), or more than one VLAN tag.
    PassNotIp = 0,
    /// XDP_PASS: IPv6 not to a VIP address with more extension headers than the parser walks.
    PassIpv6,
    /// XDP_PASS: IPv4 that is neither TCP nor UDP (ICMP, ...).
    PassNotL4,
    /// XDP_PASS: TCP/UDP not addressed to a VIP.
    PassNotVip,
    /// XDP_PASS: a fragment not addressed to a VIP address.
    PassFragment,
    /// XDP_PASS: a malformed header (as below) not addressed to a VIP address: not ours.
    PassMalformed,
    /// XDP_DROP: malformed IPv4/TCP/UDP header (bad IHL, lengths, data offset, truncated)
    /// addressed to a VIP address.
    DropMalformed,
    /// XDP_DROP: a fragment addressed to a VIP address (ports unknown, cannot be balanced).
    DropFragment,
    /// XDP_DROP: IPv4 options on a packet to a VIP.
    DropIpOptions,
    /// XDP_DROP: a VIP with no backend that can take the flow.
    DropNoBackend,
    /// XDP_PASS after DNAT: forwarded to a backend by the kernel.
    Forwarded,
    /// Conntrack insert failed; the packet is still forwarded by its hash.
    ConntrackFull,
    /// A flow pinned to a dead or removed backend was re-hashed.
    Rehashed,
    /// TC egress: a reply's source was rewritten back to the VIP.
    RevNat,
    /// TC egress: the rewrite of a reply failed (the skb helpers refused).
    RevNatError,
    /// A packet for a local container could not be marked for delivery (no metadata room
    /// in this driver); the kernel routes it instead.
    DeliverError,
    /// XDP_TX: rewritten and sent back out of the NIC it came in on (FIB next hop).
    Tx,
    /// XDP_REDIRECT: rewritten and sent out of another front NIC (FIB next hop).
    Redirected,
    /// XDP_PASS: TC sends the packet (bpf_redirect_neigh): the next hop's MAC is not
    /// resolved yet, or XDP cannot transmit on the egress interface.
    HandedToTc,
    /// fullnat: a reply was translated back to VIP -> client.
    RevSnat,
    /// XDP_DROP: fullnat found no free SNAT port for this backend.
    DropSnatExhausted,
    /// XDP_DROP: no route (or no source address) towards the backend for fullnat/dsr.
    DropNoRoute,
    /// XDP_DROP: the encapsulated packet would exceed the egress MTU, and the packet may be
    /// fragmented (no DF), which dsr does not do.
    DropTooBig,
    /// XDP_PASS: TTL expired on a packet to forward; the kernel answers with ICMP.
    PassTtl,
    /// XDP_DROP: fullnat or dsr on a TC balancer (`xdp_mode = "tc"` supports nat only).
    DropUnsupportedMode,
    /// XDP_TX: dsr, the encapsulated packet would exceed the egress MTU: answered with ICMP
    /// "fragmentation needed" and the MTU that fits, so the client sends smaller packets.
    FragNeeded,
    /// Rewritten for a local container whose host-side veth is known, MACs set: TC hands it
    /// to the container's eth0 (`bpf_redirect_peer`), past the bridge.
    DeliveredPeer,
    /// Event: a new flow proved two-way and moved to the main flow table.
    Promoted,
    /// XDP_DROP: fullnat, a TCP packet other than a SYN of a flow this node does not know.
    /// Only a packet that can open a flow reserves a SNAT port, so spoofed ACKs cannot use up
    /// a backend's ports (and the backend would reset a flow from a new port anyway).
    DropNoFlow,
    /// XDP_TX: an echo request to a VIP, answered by the LB (`icmp_echo`).
    IcmpEcho,
    /// XDP_PASS: ICMP to a VIP address that xlb leaves to the kernel (echo with `icmp_echo`
    /// off, other types, an error about no flow it can place).
    PassIcmp,
    /// Event: an ICMP error about a VIP flow went to the flow's backend (its verdict is how
    /// it was sent).
    IcmpToBackend,
    /// XDP_DROP: the source is outside the service's `allow` list (before any flow table).
    DropNotAllowed,
    /// XDP_DROP: an IPv6 packet to a VIP address with more than `IPV6_MAX_EXT_HEADERS`
    /// extension headers before its upper-layer header (no ports within reach).
    DropExtHeaders,
}

impl Reason {
    pub const COUNT: u32 = Reason::DropExtHeaders as u32 + 1;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
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
        Reason::ConntrackFull,
        Reason::Rehashed,
        Reason::RevNat,
        Reason::RevNatError,
        Reason::DeliverError,
        Reason::Tx,
        Reason::Redirected,
        Reason::HandedToTc,
        Reason::RevSnat,
        Reason::DropSnatExhausted,
        Reason::DropNoRoute,
        Reason::DropTooBig,
        Reason::PassTtl,
        Reason::DropUnsupportedMode,
        Reason::FragNeeded,
        Reason::DeliveredPeer,
        Reason::Promoted,
        Reason::DropNoFlow,
        Reason::IcmpEcho,
        Reason::PassIcmp,
        Reason::IcmpToBackend,
        Reason::DropNotAllowed,
        Reason::DropExtHeaders,
    ];

    /// Stable name used in metrics and status output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassIpv6 => "pass_ipv6",
            Reason::PassNotL4 => "pass_not_l4",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassFragment => "pass_fragment",
            Reason::PassMalformed => "pass_malformed",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::DropIpOptions => "drop_ip_options",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::Forwarded => "forwarded",
            Reason::ConntrackFull => "conntrack_full",
            Reason::Rehashed => "rehashed",
            Reason::RevNat => "rev_nat",
            Reason::RevNatError => "rev_nat_error",
            Reason::DeliverError => "deliver_error",
            Reason::Tx => "tx",
            Reason::Redirected => "redirected",
            Reason::HandedToTc => "handed_to_tc",
            Reason::RevSnat => "rev_snat",
            Reason::DropSnatExhausted => "drop_snat_exhausted",
            Reason::DropNoRoute => "drop_no_route",
            Reason::DropTooBig => "drop_too_big",
            Reason::PassTtl => "pass_ttl",
            Reason::DropUnsupportedMode => "drop_unsupported_mode",
            Reason::FragNeeded => "frag_needed",
            Reason::DeliveredPeer => "delivered_peer",
            Reason::Promoted => "promoted",
            Reason::DropNoFlow => "drop_no_flow",
            Reason::IcmpEcho => "icmp_echo",
            Reason::PassIcmp => "pass_icmp",
            Reason::IcmpToBackend => "icmp_to_backend",
            Reason::DropNotAllowed => "drop_not_allowed",
            Reason::DropExtHeaders => "drop_ext_headers",
        }
    }
}

/// Counters of the dsr decapsulation program (`xlb decap`), by index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// An IPIP/GUE packet to a served VIP, decapsulated.
    Decapsulated = 0,
    /// Encapsulated, but to an address that is not a served VIP: passed on untouched.
    UnknownVip,
    /// Encapsulated in IPv4, but the inner packet is not IPv4: passed on untouched.
    NotIpv4,
    /// The driver refused to move the packet start: passed on untouched.
    Error,
    /// Encapsulated to a served VIP, but from an outer source outside `xlb decap --from`:
    /// dropped (it could carry a forged client address).
    RefusedSource,
    /// Encapsulated in IPv6, but the inner packet is not IPv6: passed on untouched.
    NotIpv6,
}

impl DecapCounter {
    pub const COUNT: u32 = DecapCounter::NotIpv6 as u32 + 1;
    pub const ALL: [DecapCounter; DecapCounter::COUNT as usize] = [
        DecapCounter::Decapsulated,
        DecapCounter::UnknownVip,
        DecapCounter::NotIpv4,
        DecapCounter::Error,
        DecapCounter::RefusedSource,
        DecapCounter::NotIpv6,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapCounter::Decapsulated => "decapsulated",
            DecapCounter::UnknownVip => "unknown_vip",
            DecapCounter::NotIpv4 => "not_ipv4",
            DecapCounter::Error => "error",
            DecapCounter::RefusedSource => "refused_source",
            DecapCounter::NotIpv6 => "not_ipv6",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for VipAddrKey {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for SnatRev {}
    unsafe impl aya::Pod for SnatPool {}
    unsafe impl aya::Pod for TableCounters {}
    unsafe impl<T: aya::Pod> aya::Pod for DoubleBuffer<T> {}

    /// Splits an address into the (family, words) form the maps use.
    pub fn addr_words(ip: IpAddr) -> (u8, [u32; 4]) {
        match ip {
            IpAddr::V4(v4) => (FAMILY_V4, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (FAMILY_V6, [word(0), word(4), word(8), word(12)])
            }
        }
    }

    /// The inverse of [`addr_words`].
    pub fn words_addr(family: u8, words: [u32; 4]) -> IpAddr {
        if family == FAMILY_V6 {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
        }
    }
}

#[cfg(feature = "user")]
pub use user::{addr_words, words_addr};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<Service>(), 172);
        // Array map elements are padded to 8 bytes; the agent's memory maps assume none.
        assert!(size_of::<DoubleBuffer<Service>>().is_multiple_of(8));
        assert!(size_of::<DoubleBuffer<Backend>>().is_multiple_of(8));
        assert_eq!(size_of::<Backend>(), 44);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 40);
        assert_eq!(size_of::<SnatRev>(), 56);
        assert_eq!(size_of::<SnatPool>(), 136);
        assert_eq!(size_of::<RevNat>(), 28);
        assert_eq!(size_of::<VipAddrKey>(), 20);
        assert_eq!(size_of::<Counters>(), 24);
    }

    #[test]
    fn reasons_are_dense() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
