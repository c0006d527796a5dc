//! Per-service source ranges (`allow`): the key of the `ALLOW` LPM trie. The trie matches
//! bits from the first byte on, so the service id and the family come first and are always
//! matched whole, then the source prefix: `prefix_len = ALLOW_SERVICE_BITS + CIDR length`.
//! The family keeps a v4 and a v6 range of one length apart when the table is read back.

/// Key data of the `ALLOW` trie (the kernel's LPM key is `{prefix_len: u32, data}`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowKey {
    /// Service id, in host order (only ever matched whole).
    pub service_id: u32,
    /// `FAMILY_V4` or `FAMILY_V6` in the low byte (only ever matched whole).
    pub family: u32,
    /// Source prefix, network byte order, host bits zero (IPv4: the first word).
    pub addr: [u32; 4],
}

/// Bits of an `ALLOW` key's prefix that are the service id and the family.
pub const ALLOW_SERVICE_BITS: u32 = 64;

#[cfg(feature = "user")]
unsafe impl aya::Pod for AllowKey {}
