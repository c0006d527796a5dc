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

/// Hash of a client address alone (`hash = "source"`): the source address, the VIP and the
/// protocol, no ports, so every flow of one client to a VIP gets one ring slot (IPVS
/// persistence, Katran's no-source-port hashing). Fixed like `flow_hash`.
#[inline(always)]
pub const fn source_hash(key: &FlowKey) -> u32 {
    let mut h = mix(0x2f1c_a3b5, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, key.proto as u32);
    finish(h)
}

/// The hash that picks a flow's ring slot in a service with these `Service::flags`: the
/// data path and `xlb explain` both call this. `flow` is the flow's `flow_hash`.
#[inline(always)]
pub const fn ring_hash(key: &FlowKey, flow: u32, service_flags: u8) -> u32 {
    if service_flags & crate::SERVICE_SOURCE_HASH != 0 {
        source_hash(key)
    } else {
        flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

    /// A key as the data path builds it: words and ports in network byte order, read as
    /// native integers (the addresses in the comments below are what they are on x86).
    const fn key(src: [u32; 4], src_port: u16, dst_port: u16, proto: u8, family: u8) -> FlowKey {
        FlowKey {
            src,
            dst: [0x0164_630a, 0, 0, 0],
            src_port,
            dst_port,
            proto,
            family,
            _pad: 0,
        }
    }

    /// Keys and the hashes the function gave them when this test was written (the same
    /// values as a separate Python version of these rounds). A changed hash sends flows to
    /// other backends while LB nodes run different versions: change these only together
    /// with a deliberate, documented change of the hash.
    const GOLDEN: [(&str, FlowKey, u32); 9] = [
        (
            "10.99.1.2:12345 tcp -> :80",
            key([0x0201_630a, 0, 0, 0], 0x3930, 0x5000, PROTO_TCP, FAMILY_V4),
            0xa979_0a4e,
        ),
        (
            "10.99.1.2:12601 tcp -> :80",
            key([0x0201_630a, 0, 0, 0], 0x3931, 0x5000, PROTO_TCP, FAMILY_V4),
            0xcdf7_3ce9,
        ),
        (
            "10.99.1.2:12345 udp -> :80",
            key([0x0201_630a, 0, 0, 0], 0x3930, 0x5000, PROTO_UDP, FAMILY_V4),
            0x5f57_f163,
        ),
        (
            "10.99.1.9:65534 udp -> :53",
            key([0x0901_630a, 0, 0, 0], 0xfeff, 0x3500, PROTO_UDP, FAMILY_V4),
            0xebc1_2418,
        ),
        (
            "255.255.255.255:65535 tcp -> :65535",
            key([0xffff_ffff, 0, 0, 0], 0xffff, 0xffff, PROTO_TCP, FAMILY_V4),
            0x7ea2_d14a,
        ),
        (
            "0.0.0.0:0 proto 0 -> :0",
            key([0, 0, 0, 0], 0, 0, 0, FAMILY_V4),
            0x4ee8_c2f8,
        ),
        (
            "[fd99::2]:12345 tcp -> :80",
            key(
                [0x0000_99fd, 0, 0, 0x0200_0000],
                0x3930,
                0x5000,
                PROTO_TCP,
                FAMILY_V6,
            ),
            0x56c3_5481,
        ),
        (
            "[fd99:0:0:1::2]:12345 tcp -> :80",
            key(
                [0x0000_99fd, 0x0100_0000, 0, 0x0200_0000],
                0x3930,
                0x5000,
                PROTO_TCP,
                FAMILY_V6,
            ),
            0x989a_813e,
        ),
        (
            "[fe80::234:12ff:fefe:5678]:47873 udp -> :443",
            key(
                [0x0000_80fe, 0, 0xff12_3402, 0x7856_fefe],
                0x01bb,
                0xbb01,
                PROTO_UDP,
                FAMILY_V6,
            ),
            0x74a2_9d2e,
        ),
    ];

    #[test]
    fn hash_is_fixed() {
        for (what, key, want) in GOLDEN {
            assert_eq!(flow_hash(&key), want, "{what}: {:#010x}", flow_hash(&key));
        }
    }

    /// `source_hash` of GOLDEN[0] (10.99.1.2 tcp -> 10.99.100.1), also from a Python version.
    const SOURCE_GOLDEN: u32 = 0x88b8_64ef;

    #[test]
    fn source_hash_ignores_ports_but_not_the_client() {
        for (what, key, _) in GOLDEN {
            let mut other = key;
            other.src_port ^= 0x1234;
            other.dst_port ^= 0x0101;
            assert_eq!(source_hash(&other), source_hash(&key), "{what}");
            let mut client = key;
            client.src[0] ^= 0x0100_0000;
            assert_ne!(source_hash(&client), source_hash(&key), "{what}");
            let flags = crate::SERVICE_SOURCE_HASH;
            assert_eq!(ring_hash(&key, 7, flags), source_hash(&key), "{what}");
            assert_eq!(ring_hash(&key, 7, crate::SERVICE_ALLOW), 7, "{what}");
        }
        // Fixed like flow_hash: LB nodes of different versions must agree.
        assert_eq!(source_hash(&GOLDEN[0].1), SOURCE_GOLDEN);
    }

    #[test]
    fn destination_is_not_hashed() {
        // Each service has its own ring: the VIP must not move a client's flows.
        for (what, key, want) in GOLDEN {
            let mut other = key;
            other.dst = [0x0764_630a, 0, 0, 0];
            assert_eq!(flow_hash(&other), want, "{what}");
        }
    }
}
