//! Every map's size, default and limit. The BPF side (lb-ebpf/src/maps.rs) declares the maps
//! with the defaults; the agent sizes them from its config at load time
//! (lb-userspace/src/layout.rs) within the limits here. Changing a key or value layout
//! changes a pinned map: bump the map's version suffix in maps.rs too.

/// Services (VIP:port:proto) at most; also the size of the per-service counters.
pub const MAX_SERVICES: u32 = 256;
/// Backends at most, over all services (a backend is one endpoint of one service).
pub const MAX_BACKENDS: u32 = 16_384;
/// Backend slots a config gets at least: room for discovered containers and tasks, whose
/// number no config says.
pub const MIN_BACKEND_SLOTS: u32 = 4096;
/// `agent.flow_table_size` unless the config sets it.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
/// Smallest and largest `agent.flow_table_size`.
pub const MIN_FLOW_TABLE_SIZE: u32 = 1024;
pub const MAX_FLOW_TABLE_SIZE: u32 = 16_777_216;
/// Each embryonic table holds 1/EMBRYONIC_SHARE of the flow table (65536 at the default).
pub const EMBRYONIC_SHARE: u32 = 4;
/// Entries of a reply table no configured mode uses (nat: `REV_NAT`, fullnat: `SNAT_REV`):
/// it must exist for the programs to load, nothing more.
pub const UNUSED_TABLE_SIZE: u32 = 1024;
/// Ring blocks a config gets beyond what its services need: room to grow a ring or add a
/// service by a reload. A quarter more, and at least this many: a reload can give any
/// service the largest table (its new ring takes this and the block of its idle half).
pub const MIN_SPARE_RING_BLOCKS: u32 = MAX_RING_SIZE.div_ceil(RING_BLOCK) - 1;
/// Largest `RINGS` in blocks (256 MiB).
pub const MAX_RING_BLOCKS: u32 = 1024;
/// The Maglev table size a service gets unless it sets one (a prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Largest Maglev table a service may use (a prime just below 2^21). Larger tables move fewer
/// flows when a backend leaves: at N = 100 about 1.08/N here, 1.57/N at the default.
pub const MAX_RING_SIZE: u32 = 2_097_143;
/// Ring slots are stored in chunks of this many u32 (one cache line per map element): array
/// map elements are padded to 8 bytes, so single-u32 elements would waste half the memory
/// and break the agent's contiguous memory-mapped view.
pub const RING_CHUNK: u32 = 16;
/// The agent hands out ring space in blocks of this many slots: a default-sized ring, rounded
/// up to whole chunks. A larger ring takes several adjacent blocks.
pub const RING_BLOCK: u32 = DEFAULT_RING_SIZE.div_ceil(RING_CHUNK) * RING_CHUNK;
/// Each service needs room for two rings: the one in use and the one being written.
pub const RING_HALVES: u32 = 2;
/// Blocks in `RINGS` as the BPF object declares it (a load without a config): two
/// default-sized rings for 128 services.
pub const RING_BLOCKS: u32 = 128 * RING_HALVES;
/// Slots of all rings (64 MiB of u32).
pub const RING_SLOTS: u32 = RING_BLOCKS * RING_BLOCK;
/// Elements of the `RINGS` array.
pub const RING_CHUNKS: u32 = RING_SLOTS / RING_CHUNK;
/// Conntrack entries of established flows (LRU, shared by all CPUs), by default.
pub const CONNTRACK_SIZE: u32 = DEFAULT_FLOW_TABLE_SIZE;
/// Reverse NAT entries (LRU), one per established NATed flow, by default.
pub const REV_NAT_SIZE: u32 = DEFAULT_FLOW_TABLE_SIZE;
/// Entries of each embryonic table (new flows, their reply mappings and SNAT ports) until
/// they prove two-way. A flood fills these, never the main tables. Under a flood of R new
/// flows a second an entry lives about EMBRYONIC_SIZE / R seconds, far longer than a
/// handshake even at a million a second; one evicted before its handshake completes is
/// balanced again by Maglev, to the same backend.
pub const EMBRYONIC_SIZE: u32 = DEFAULT_FLOW_TABLE_SIZE / EMBRYONIC_SHARE;
/// Backend endpoints whose new flows' replies are found without a reply mapping per flow
/// (twice the backends: stale endpoints linger until the agent's sweep).
pub const REPLY_ENDPOINTS_SIZE: u32 = 2 * MAX_BACKENDS;
/// Slots of the per-CPU flow cache in front of conntrack (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 2048;
/// fullnat reverse mappings (LRU), one per fullnat flow, by default.
pub const SNAT_REV_SIZE: u32 = DEFAULT_FLOW_TABLE_SIZE;
/// Per-CPU next-hop cache: 2^HOP_CACHE_BITS slots (route.rs).
pub const HOP_CACHE_BITS: u32 = 8;
/// A cached FIB answer is used this long.
pub const HOP_CACHE_NS: u64 = 1_000_000_000;
/// Interfaces XDP may redirect to (the front NICs).
pub const MAX_TX_PORTS: u32 = 64;
/// Source prefixes of all services' `allow` lists (an LPM trie: entries take memory only
/// when used).
pub const MAX_ALLOW_PREFIXES: u32 = 16_384;
/// Distinct VIP addresses (for the fragment check).
pub const MAX_VIP_ADDRS: u32 = MAX_SERVICES;
/// Outer source prefixes `xlb decap --from` may accept encapsulated packets from.
pub const MAX_DECAP_SOURCES: u32 = 64;

/// A UDP flow idle this long is forgotten and re-hashed on its next packet.
pub const UDP_IDLE_TIMEOUT_NS: u64 = 30_000_000_000;
/// A closed TCP flow (RST, or FIN both ways) leaves the tables once idle this long (late
/// retransmissions still find it).
pub const CLOSED_LINGER_NS: u64 = 10_000_000_000;
/// A TCP flow with a FIN one way leaves once idle this long (a half-closed flow that still
/// carries data keeps refreshing it). In dsr the backend's FIN is never seen.
pub const HALF_CLOSED_IDLE_NS: u64 = 120_000_000_000;
/// A new TCP flow that has not proven two-way leaves once idle this long.
pub const EMBRYONIC_IDLE_NS: u64 = 30_000_000_000;
/// An established TCP flow leaves once idle this long (TCP keepalives, 2 h by default,
/// refresh it; the kernel's own conntrack keeps 5 days).
pub const TCP_IDLE_NS: u64 = 86_400_000_000_000;
/// An embryonic fullnat port whose backend never answered goes to another flow after this
/// long, so spoofed SYNs cannot hold a backend's ports.
pub const SNAT_UNANSWERED_REUSE_NS: u64 = 2_000_000_000;
/// A fullnat port whose flow saw FIN or RST may go to a new flow after this long (the
/// backend's TIME_WAIT is 60 s).
pub const SNAT_CLOSED_REUSE_NS: u64 = 60_000_000_000;
/// A fullnat TCP port idle this long may go to a new flow (IPVS's TCP timeout).
pub const SNAT_TCP_IDLE_REUSE_NS: u64 = 900_000_000_000;
/// SNAT ports tried per new flow before giving up (each try is one map insert).
pub const SNAT_PORT_TRIES: u32 = 16;
/// Conntrack timestamps are refreshed at most this often, to keep writes off the hot path.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// Blocks a ring of `table_size` slots takes (0 for an empty ring).
pub const fn ring_blocks(table_size: u32) -> u32 {
    table_size.div_ceil(RING_BLOCK)
}
