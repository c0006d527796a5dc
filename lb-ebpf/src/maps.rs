//! Every map of the data path. Sizes come from `lb_common::sizes`. Maps are pinned by name
//! under the agent's pin path, so forwarding survives an agent restart. The `_V1` suffix is
//! the layout version: a changed key/value layout gets a new suffix, so an old pinned map is
//! never reused with the wrong layout.
use crate::{
    flowcache::CachedFlow,
    route::{CachedHop, CachedHop6, NextHop},
};

/// See `SCRATCH`.
#[repr(C)]
pub struct Scratch {
    pub key: FlowKey,
    pub flow: Flow,
    pub rev_nat: RevNat,
    pub snat: SnatRev,
    pub endpoint: VipKey,
    /// dsr over IPv6: the outer source and the next hop (the dsr chain's frames are at
    /// the 512-byte limit).
    pub encap_src: [u32; 4],
    pub encap_hop: NextHop,
}

/// This CPU's scratch room.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}
use crate::decided::Decided;
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
};
use lb_common::{
    Backend, Counters, DoubleBuffer, FAMILY_V4, Flow, FlowKey, FlowTable, Reason, RevNat, Service,
    SnatRev, TableCounters, VipAddrKey, VipKey,
    allow::{ALLOW_SERVICE_BITS, AllowKey},
    sizes::*,
    trace::{TRACE_RING_BYTES, TraceBudget, TraceFilter},
};

/// BPF_F_MMAPABLE: the agent writes rings through a memory mapping instead of 65537 syscalls,
/// and flips double-buffered values with one store.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// VIP:port:proto -> service id. A value is written once, when the service is added, and
/// never replaced: the kernel reuses a replaced element of a preallocated hash map at once,
/// so changing state lives in `SERVICES`.
#[map(name = "XLB_VIPS_V2")]
pub static VIPS: HashMap<VipKey, u32> = HashMap::pinned(MAX_SERVICES, 0);

/// Service id -> its ring, mode and SNAT pool, double-buffered (lb_common::DoubleBuffer):
/// the agent writes the idle copy through a memory mapping and flips, so a ring flip is
/// one aligned store.
#[map(name = "XLB_SERVICES_V1")]
pub static SERVICES: Array<DoubleBuffer<Service>> = Array::pinned(MAX_SERVICES, BPF_F_MMAPABLE);

/// VIP addresses, for the fragment check only.
#[map(name = "XLB_VIP_ADDRS_V1")]
pub static VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::pinned(MAX_VIP_ADDRS, 0);

/// (service id, family, source prefix) -> 1: the `allow` lists of the services that have
/// one (`SERVICE_ALLOW`). Read before any flow table, on every packet of such a service.
#[map(name = "XLB_ALLOW_V2")]
pub static ALLOW: LpmTrie<AllowKey, u32> = LpmTrie::pinned(MAX_ALLOW_PREFIXES, 0);

/// Whether the source `saddr` (network order; IPv4 in the first word) may reach service
/// `service_id`, whose value has `SERVICE_ALLOW`.
#[inline(always)]
pub fn allowed(service_id: u32, family: u8, saddr: [u32; 4]) -> bool {
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        ALLOW_SERVICE_BITS + bits,
        AllowKey {
            service_id,
            family: family as u32,
            addr: saddr,
        },
    );
    ALLOW.get(&key).is_some()
}

/// Backend id -> address, port, liveness and delivery, double-buffered like `SERVICES`.
#[map(name = "XLB_BACKENDS_V4")]
pub static BACKENDS: Array<DoubleBuffer<Backend>> = Array::pinned(MAX_BACKENDS, BPF_F_MMAPABLE);

/// Maglev rings, each slot a backend id, stored RING_CHUNK slots to an element. The agent
/// places each service's ring (RING_BLOCK slots or a multiple); a service's value says where.
#[map(name = "XLB_RINGS_V2")]
pub static RINGS: Array<[u32; RING_CHUNK as usize]> = Array::pinned(RING_CHUNKS, BPF_F_MMAPABLE);

/// Client -> VIP 5-tuple -> backend, for established flows. Shared by all CPUs so a flow
/// keeps its backend whichever queue its packets arrive on. Only flows that proved two-way
/// get here (conntrack.rs), so new flows, however many, never evict these.
#[map(name = "XLB_CONNTRACK_V3")]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_SIZE, 0);

/// The same for new flows, until they prove two-way.
#[map(name = "XLB_CONNTRACK_NEW_V2")]
pub static CONNTRACK_NEW: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(EMBRYONIC_SIZE, 0);

/// Per-CPU cache of recent conntrack decisions (flowcache.rs). Not pinned: it is only a
/// cache, and a new program starts with an empty one.
#[map(name = "XLB_FLOW_CACHE")]
pub static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Backend -> client 5-tuple -> the VIP to put back as the reply's source.
#[map(name = "XLB_REV_NAT_V2")]
pub static REV_NAT: LruHashMap<FlowKey, RevNat> = LruHashMap::pinned(REV_NAT_SIZE, 0);

/// Reply mappings of new flows.
#[map(name = "XLB_REV_NAT_NEW_V1")]
pub static REV_NAT_NEW: LruHashMap<FlowKey, RevNat> = LruHashMap::pinned(EMBRYONIC_SIZE, 0);

/// Backend endpoint (address, port, protocol) -> the one backend id whose new nat flows
/// need no reply mapping of their own (replies.rs). Written by the data path, once per
/// endpoint; the agent removes entries whose backend is gone.
#[map(name = "XLB_REPLY_ENDPOINTS_V1")]
/// Not preallocated: few endpoints are ever claimed, and a preallocated table of every
/// backend slot would cost a one-service config most of a MiB.
pub static REPLY_ENDPOINTS: HashMap<VipKey, u32> =
    HashMap::pinned(REPLY_ENDPOINTS_SIZE, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// fullnat: reply 5-tuple (backend -> SNAT address:port) -> client and VIP. An entry is
/// what reserves its SNAT port (snat.rs).
#[map(name = "XLB_SNAT_REV_V1")]
pub static SNAT_REV: LruHashMap<FlowKey, SnatRev> = LruHashMap::pinned(SNAT_REV_SIZE, 0);

/// Port reservations of new fullnat flows.
#[map(name = "XLB_SNAT_REV_NEW_V1")]
pub static SNAT_REV_NEW: LruHashMap<FlowKey, SnatRev> = LruHashMap::pinned(EMBRYONIC_SIZE, 0);

/// Per-CPU cache of FIB answers (route.rs). Not pinned: only a cache.
#[map(name = "XLB_HOP_CACHE")]
pub static HOP_CACHE: PerCpuArray<CachedHop> =
    PerCpuArray::with_max_entries(1 << HOP_CACHE_BITS, 0);

/// The same for IPv6 destinations.
#[map(name = "XLB_HOP_CACHE6")]
pub static HOP_CACHE6: PerCpuArray<CachedHop6> =
    PerCpuArray::with_max_entries(1 << HOP_CACHE_BITS, 0);

/// Per-CPU room for the keys and values the slow path builds (the stack has 512 bytes for
/// a whole call chain). Programs on one CPU never interleave their use: XDP and TC ingress
/// run one after another in softirq, and TC egress runs with softirqs off.
#[map(name = "XLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for the balancer's decision about the packet in hand (`decided`).
#[map(name = "XLB_DECIDED")]
pub static DECIDED: PerCpuArray<Decided> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's room for the packet's decision: apart from `scratch`, which the flow tables'
/// writes use meanwhile.
#[inline(always)]
pub fn decided() -> Option<&'static mut Decided> {
    DECIDED.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Per-CPU room for bpf_fib_lookup's parameters, which would take 64 bytes of the 512-byte
/// stack at every call site.
#[map(name = "XLB_FIB_PARAMS")]
pub static FIB_PARAMS: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// Front NICs by ifindex: where XDP may redirect a packet the FIB sends out of another NIC.
#[map(name = "XLB_TX_PORTS_V1")]
pub static TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_TX_PORTS, 0);

/// Per-CPU traffic counters per service id.
#[map(name = "XLB_SVC_STATS_V1")]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Per-CPU traffic counters per backend id.
#[map(name = "XLB_BE_STATS_V1")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Per-CPU counters of what the data path did to each flow table (`lb_common::FlowTable`),
/// then as many entries for the agent's sweeps (which the data path never touches).
#[map(name = "XLB_TABLE_STATS_V1")]
pub static TABLE_STATS: PerCpuArray<TableCounters> = PerCpuArray::pinned(2 * FlowTable::COUNT, 0);

/// Per-CPU verdict counters, indexed by `lb_common::Reason`.
#[map(name = "XLB_REASONS_V8")]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

/// `xlb trace`: element 0 says whether a trace runs and what it matches (trace.rs).
#[map(name = "XLB_TRACE_FILTER_V2")]
pub static TRACE_FILTER: Array<TraceFilter> = Array::pinned(1, 0);

/// Records of traced packets, read by the agent while a trace runs.
#[map(name = "XLB_TRACE_V3")]
pub static TRACE: RingBuf = RingBuf::pinned(TRACE_RING_BYTES, 0);

/// Per-CPU record budget of the current second (not pinned: a new program starts afresh).
#[map(name = "XLB_TRACE_BUDGET")]
pub static TRACE_BUDGET: PerCpuArray<TraceBudget> = PerCpuArray::with_max_entries(1, 0);

/// The current copy of a service's value.
#[inline(always)]
pub fn service(id: u32) -> Option<&'static Service> {
    SERVICES.get(id).map(DoubleBuffer::current)
}

/// The current copy of a backend's value.
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    BACKENDS.get(id).map(DoubleBuffer::current)
}
