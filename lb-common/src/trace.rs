//! `xlb trace`: the filter the data path reads (one word decides whether it traces at all)
//! and the record it writes to the trace ring buffer for each matching packet.

/// `TraceFilter::service_id` that matches every service.
pub const TRACE_ANY_SERVICE: u32 = u32::MAX;
/// Records each CPU writes per second at most while a trace runs.
pub const TRACE_RATE_PER_CPU: u32 = 1000;
/// Bytes of the trace ring buffer (a power of two, a multiple of the page size).
pub const TRACE_RING_BYTES: u32 = 128 * 1024;

/// Element 0 of the trace filter map. `enabled == 0`: no trace runs, and the data path reads
/// nothing else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    pub enabled: u32,
    /// Service ids, or `TRACE_ANY_SERVICE` first: both halves of a dual-stack service (the
    /// same id twice for one service).
    pub service_ids: [u32; 2],
    /// 0: sources of any family; `FAMILY_V4`/`FAMILY_V6`: only that family's, with
    /// `saddr & src_mask == src_addr` word by word (network order).
    pub family: u32,
    pub src_addr: [u32; 4],
    pub src_mask: [u32; 4],
}

/// Per-CPU budget of the current second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceBudget {
    pub second: u64,
    pub used: u32,
    pub _pad: u32,
}

/// One traced packet. Addresses (IPv4 in the first word) and ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub time_ns: u64,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub mode: u8,
    /// 1: the packet started a new flow.
    pub new_flow: u8,
    /// 0: dropped before a backend was chosen (the backend fields are zero).
    pub has_backend: u8,
    /// `Reason` of the verdict.
    pub reason: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub backend_addr: [u32; 4],
    pub backend_port: u16,
    /// fullnat: the source port the packet got.
    pub snat_port: u16,
    /// fullnat: the source address the packet got (IPv4 in the first word).
    pub snat_addr: [u32; 4],
    /// The interface the packet came in on.
    pub ifindex: u32,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::TraceRecord {}
}
