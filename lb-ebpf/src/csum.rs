//! Internet checksums: incremental updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')) and
//! whole sums of headers XDP writes itself. Words stay in network byte order: one's
//! complement sums are byte-order independent as long as every term has the same order.

/// The one's complement sum of `words`, not yet folded (add several, then `fold`).
#[inline(always)]
pub fn sum(words: &[u16]) -> u32 {
    let mut total = 0u32;
    for word in words {
        total += *word as u32;
    }
    total
}

/// Folds a sum into the checksum field's value.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum of a struct's bytes (a header with its checksum field zero).
#[inline(always)]
pub fn of<T, const WORDS: usize>(header: &T) -> u16 {
    const { assert!(size_of::<T>() == WORDS * 2) };
    fold(sum(unsafe {
        &*(header as *const T as *const [u16; WORDS])
    }))
}

/// Checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let old = !old;
    let sum = (!check) as u32 + (old >> 16) + (old & 0xffff) + (new >> 16) + (new & 0xffff);
    fold(sum)
}

/// Checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    fold(sum)
}

/// Checksum after a 128-bit field (an IPv6 address in a pseudo-header) changed.
#[inline(always)]
pub fn replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut sum = (!check) as u32;
    for i in 0..4 {
        let (old, new) = (!old[i], new[i]);
        sum += (old >> 16) + (old & 0xffff) + (new >> 16) + (new & 0xffff);
    }
    fold(sum)
}
