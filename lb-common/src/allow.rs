//! Per-service source ranges (`allow`): the key of the `ALLOW` LPM trie. The trie matches
//! bits from the first byte on, so the service id comes first and is always matched whole
//! (32 bits), then the source prefix: `prefix_len = 32 + CIDR length`.

/// Key data of the `ALLOW` trie (the kernel's LPM key is `{prefix_len: u32, data}`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowKey {
    /// Service id, in host order (only ever matched whole).
    pub service_id: u32,
    /// IPv4 source prefix, network byte order (host bits zero).
    pub addr: u32,
}

/// Bits of an `ALLOW` key's prefix that are the service id.
pub const ALLOW_SERVICE_BITS: u32 = 32;

#[cfg(feature = "user")]
unsafe impl aya::Pod for AllowKey {}
