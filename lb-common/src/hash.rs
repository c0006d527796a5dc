//! The flow hash that picks a Maglev slot. Kernel and user space use this same function,
//! and it is fixed (no per-host seed), so every LB node with the same config sends a flow
//! to the same backend.
use crate::FlowKey;

#[inline(always)]
const fn mix(h: u32, v: u32) -> u32 {
    // One murmur3 round.
    let k = v
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of the client side of a flow: source address, both ports and the protocol. The
/// destination is left out because each service has its own ring.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = mix(0x9747_b28c, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, ((key.src_port as u32) << 16) | key.dst_port as u32);
    h = mix(h, key.proto as u32);
    finish(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_fixed() {
        // A changed hash moves every flow when nodes run different versions: keep it stable.
        let key = FlowKey {
            src: [0x0201_630a, 0, 0, 0],
            src_port: 0x3930,
            dst_port: 0x5000,
            proto: 6,
            family: 4,
            ..Default::default()
        };
        assert_eq!(flow_hash(&key), flow_hash(&key));
        let mut other = key;
        other.src_port = 0x3931;
        assert_ne!(flow_hash(&key), flow_hash(&other));
    }
}
