//! Every map's size. The BPF side (lb-ebpf/src/maps.rs) declares the maps with these, and the
//! agent uses them to lay out rings and allocate ids. Changing one changes a pinned map's
//! layout: bump the map's version suffix in maps.rs too.

/// Services (VIP:port:proto) at most; also the size of the per-service counters.
pub const MAX_SERVICES: u32 = 128;
/// Backends at most, over all services (a backend is one endpoint of one service).
pub const MAX_BACKENDS: u32 = 8192;
/// Largest Maglev table a service may use (a prime; the default table size).
pub const MAX_RING_SIZE: u32 = 65537;
/// Each service owns two rings: the agent fills the idle one, then flips the VIP to it.
pub const RING_HALVES: u32 = 2;
/// Ring slots are stored in chunks of this many u32 (one cache line per map element): array
/// map elements are padded to 8 bytes, so single-u32 elements would waste half the memory
/// and break the agent's contiguous memory-mapped view.
pub const RING_CHUNK: u32 = 16;
/// Distance between two ring halves: MAX_RING_SIZE rounded up to whole chunks.
pub const RING_STRIDE: u32 = MAX_RING_SIZE.div_ceil(RING_CHUNK) * RING_CHUNK;
/// Slots of all rings: MAX_SERVICES * RING_HALVES * RING_STRIDE (64 MiB of u32).
pub const RING_SLOTS: u32 = MAX_SERVICES * RING_HALVES * RING_STRIDE;
/// Elements of the `RINGS` array.
pub const RING_CHUNKS: u32 = RING_SLOTS / RING_CHUNK;
/// Conntrack entries (LRU, shared by all CPUs).
pub const CONNTRACK_SIZE: u32 = 262_144;
/// Reverse NAT entries (LRU), one per NATed flow.
pub const REV_NAT_SIZE: u32 = 262_144;
/// Slots of the per-CPU flow cache in front of conntrack (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 4096;
/// fullnat reverse mappings (LRU), one per fullnat flow.
pub const SNAT_REV_SIZE: u32 = 262_144;
/// Per-CPU next-hop cache: 2^HOP_CACHE_BITS slots (route.rs).
pub const HOP_CACHE_BITS: u32 = 8;
/// A cached FIB answer is used this long.
pub const HOP_CACHE_NS: u64 = 1_000_000_000;
/// Interfaces XDP may redirect to (the front NICs).
pub const MAX_TX_PORTS: u32 = 64;
/// Distinct VIP addresses (for the fragment check).
pub const MAX_VIP_ADDRS: u32 = MAX_SERVICES;

/// A UDP flow idle this long is forgotten and re-hashed on its next packet.
pub const UDP_IDLE_TIMEOUT_NS: u64 = 30_000_000_000;
/// A fullnat port whose flow saw FIN or RST may go to a new flow after this long (the
/// backend's TIME_WAIT is 60 s).
pub const SNAT_CLOSED_REUSE_NS: u64 = 60_000_000_000;
/// A fullnat TCP port idle this long may go to a new flow (IPVS's TCP timeout).
pub const SNAT_TCP_IDLE_REUSE_NS: u64 = 900_000_000_000;
/// SNAT ports tried per new flow before giving up (each try is one map insert).
pub const SNAT_PORT_TRIES: u32 = 16;
/// Conntrack timestamps are refreshed at most this often, to keep writes off the hot path.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// First slot of a service's ring half.
pub const fn ring_offset(service_id: u32, half: u32) -> u32 {
    (service_id * RING_HALVES + half) * RING_STRIDE
}

/// Which half a service's ring offset points at.
pub const fn ring_half(service_id: u32, offset: u32) -> u32 {
    offset / RING_STRIDE - service_id * RING_HALVES
}
