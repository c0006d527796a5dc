//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights: builds the ring that
//! the XDP program indexes by flow hash.
//!
//! Pure and deterministic: the table depends only on the set of `(key, weight)` pairs and the
//! table size, never on input order or on the process. Every LB host that sees the same
//! backends builds the same ring, so a flow keeps its backend across a failover between hosts.

mod fill;
use fill::fill;

// Part of the contract between hosts (and between versions during a rolling upgrade):
// changing either seed reshuffles every ring. The golden tests below pin them.
const SEED_OFFSET: u64 = 0x786c_625f_6f66_6673; // "xlb_offs"
const SEED_SKIP: u64 = 0x786c_625f_736b_6970; // "xlb_skip"

const EMPTY: u32 = u32::MAX;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Identity used for hashing. It must be the same string on every host (e.g.
    /// `"10.99.2.11:8080"`), never a host-local id such as a map slot or a container name
    /// that differs between nodes. Keys should be unique; duplicates are tolerated
    /// (ties are broken by weight, then by input position).
    pub key: &'a str,
    /// Relative share of the ring. 0 means drained: the backend gets no slot.
    pub weight: u32,
}

/// Largest exponent `permutation_degree` can pick for a table of at most 2^31 slots: the odd
/// primes up to 29 multiply to more than 2^31, so one of them does not divide `m - 1`.
const MAX_DEGREE: usize = 29;

/// Per-backend cursor through its own permutation of the slots, `offset + skip * j^k mod m`.
///
/// Plain Maglev walks `offset + skip * j`. Two such arithmetic progressions are related by an
/// affine map, so some backend pairs interleave in lockstep, and one removal then moves more
/// than it must (over 1.1/N at N = 20 for about 1 backend set in 100). `j^k` breaks that
/// up; it is a bijection of the slots when `gcd(k, m - 1) = 1`, and its forward differences
/// make each step `k` additions instead of a multiplication.
///
/// `D - 1` is the largest degree this cursor can walk (differences above the degree stay 0);
/// a `D` fitted to the degree lets the compiler unroll the step.
struct Cursor<const D: usize> {
    /// `diffs[0]` is the next candidate slot, `diffs[i]` its i-th forward difference.
    diffs: [u32; D],
    weight: u64,
    /// Weight earned and not yet spent on claims; below the largest weight. For a backend that
    /// waits in `fill`'s heap: as of its next claim, which is already paid for.
    credit: u64,
    /// Position in the caller's slice; this is what the table stores.
    index: u32,
}

impl<const D: usize> Cursor<D> {
    fn new(offset: u32, skip: u32, degree: usize, m: u32, weight: u64, index: u32) -> Self {
        assert!(degree < D, "degree {degree} needs a wider cursor");
        let m64 = u64::from(m);
        // The first `degree + 1` values of the walk, then their forward differences.
        let mut diffs = [0u32; D];
        for (j, d) in (0u64..).zip(&mut diffs[..=degree]) {
            let value = u64::from(offset) + u64::from(skip) * pow_mod(j, degree, m64);
            *d = (value % m64) as u32;
        }
        for order in 1..=degree {
            for i in (order..=degree).rev() {
                diffs[i] = sub_mod(diffs[i], diffs[i - 1], m);
            }
        }
        Cursor {
            diffs,
            weight,
            credit: 0,
            index,
        }
    }

    /// Returns the next slot of this backend's permutation.
    fn advance(&mut self, m: u32) -> u32 {
        let slot = self.diffs[0];
        for i in 0..D - 1 {
            self.diffs[i] = add_mod(self.diffs[i], self.diffs[i + 1], m);
        }
        slot
    }
}

/// The smallest odd `k >= 3` with `gcd(k, m - 1) = 1`, so that `j -> j^k` permutes the
/// slots of a prime-sized table. 3 for the default 65537.
fn permutation_degree(m: u32) -> usize {
    let order = u64::from(m.saturating_sub(1)).max(1);
    let degree = (3u64..)
        .step_by(2)
        .find(|&k| gcd(k, order) == 1)
        .expect("some odd number is coprime");
    usize::try_from(degree).expect("small")
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn pow_mod(base: u64, exp: usize, m: u64) -> u64 {
    (0..exp).fold(1 % m, |acc, _| acc * (base % m) % m)
}

// Both operands are < m <= 2^31, so the sums fit a u32.
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    let sum = a + b;
    if sum >= m { sum - m } else { sum }
}

fn sub_mod(a: u32, b: u32, m: u32) -> u32 {
    if a >= b { a - b } else { a + m - b }
}

/// Builds a Maglev lookup table of `table_size` entries.
///
/// Each entry is the index into `backends` of the backend that owns the slot. `table_size`
/// must be prime for every permutation to cover all slots (the caller validates it; 65537 is
/// the default). Backends with weight 0 get no slot. If no backend has a weight above 0, or
/// `table_size` is 0, the result is empty.
///
/// Weights use credit-based filling: each round every backend adds its weight to a credit and,
/// while the credit reaches the largest weight, claims its next free preferred slot and pays
/// the largest weight. So a backend with the largest weight takes exactly one slot per round,
/// and with equal weights this is plain Maglev.
///
/// Cost is about `M * ln(M)` probes plus, per slot, at most 32 backend visits or one heap
/// operation (`log N`), whatever the weights: a backend that claims less often than every
/// 32 rounds is not visited each round but waits in a heap. At M = 65537, one backend at
/// 65535 beside 999 at 1 builds in 0.27 ms; equal weights take about 1.3 ms at N = 1000
/// (docs/benchmarks.md).
///
/// # Panics
///
/// If `backends` has `u32::MAX` or more entries (indices must fit the table's `u32`), or if
/// `table_size` exceeds 2^31 (the cursor arithmetic must not overflow).
#[must_use]
pub fn build_table(backends: &[MaglevBackend<'_>], table_size: u32) -> Vec<u32> {
    assert!(
        u32::try_from(backends.len()).is_ok_and(|n| n < EMPTY),
        "too many backends for a u32 table"
    );
    assert!(table_size <= 1 << 31, "table_size too large");
    let m = table_size;
    if m == 0 {
        return Vec::new();
    }

    let mut live: Vec<(usize, &MaglevBackend<'_>)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    // Fill order decides contested slots, so it must not depend on input order.
    live.sort_unstable_by(|(ia, a), (ib, b)| {
        a.key
            .cmp(b.key)
            .then(a.weight.cmp(&b.weight))
            .then(ia.cmp(ib))
    });

    let max_weight = live
        .iter()
        .map(|(_, b)| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let degree = permutation_degree(m);
    // The default table size has degree 3; other primes may need up to MAX_DEGREE.
    match degree {
        3 => fill::<4>(&live, m, degree, max_weight),
        5 => fill::<6>(&live, m, degree, max_weight),
        7 => fill::<8>(&live, m, degree, max_weight),
        _ => fill::<{ MAX_DEGREE + 1 }>(&live, m, degree, max_weight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;
    use xxhash_rust::xxh3::xxh3_64_with_seed;

    const M: u32 = lb_common::sizes::DEFAULT_RING_SIZE;
    const LARGEST: u32 = lb_common::sizes::MAX_RING_SIZE;

    /// Distinct, realistic keys ("a.b.c.d:port").
    fn keys(n: impl Into<proptest::collection::SizeRange>) -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set((any::<u32>(), 1u16..), n).prop_map(|set| {
            // Distinct (ip, port) pairs give distinct strings.
            set.into_iter()
                .map(|(ip, port)| format!("{}:{port}", Ipv4Addr::from(ip)))
                .collect()
        })
    }

    fn backends<'a>(keys: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .map(|(k, &weight)| MaglevBackend { key: k, weight })
            .collect()
    }

    fn mb(key: &str, weight: u32) -> MaglevBackend<'_> {
        MaglevBackend { key, weight }
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    /// The fraction of slots of an `m`-slot table whose owner changes when backend `removed`
    /// of these (equal weights) leaves; also checks that none still points at it. Returns
    /// (fraction, N).
    fn moved_fraction(keys: &[String], removed: usize, m: u32) -> (f64, f64) {
        let n = keys.len();
        let all = backends(keys, &vec![1; n]);
        let mut rest = all.clone();
        rest.remove(removed);
        let before = owner_keys(&build_table(&all, m), &all);
        let after = owner_keys(&build_table(&rest, m), &rest);
        assert!(
            after.iter().all(|&k| k != all[removed].key),
            "a slot still points at it"
        );
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        (moved as f64 / f64::from(m), n as f64)
    }

    /// Owner key per slot, to compare tables built from differently ordered inputs.
    fn owner_keys<'a>(table: &[u32], b: &[MaglevBackend<'a>]) -> Vec<&'a str> {
        table.iter().map(|&i| b[i as usize].key).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn every_slot_has_a_live_backend(
            (keys, weights) in (1usize..=50).prop_flat_map(|n| {
                (keys(n), proptest::collection::vec(0u32..=10, n))
            }),
        ) {
            let b = backends(&keys, &weights);
            let t = build_table(&b, M);
            if weights.iter().all(|&w| w == 0) {
                prop_assert!(t.is_empty());
            } else {
                prop_assert_eq!(t.len(), M as usize);
                for &i in &t {
                    prop_assert!((i as usize) < b.len());
                    prop_assert!(b[i as usize].weight > 0);
                }
            }
        }

        #[test]
        fn equal_weights_are_balanced(keys in keys(1..=100), w in 1u32..=65535) {
            let b = backends(&keys, &vec![w; keys.len()]);
            let c = counts(&build_table(&b, M), b.len());
            let mean = f64::from(M) / b.len() as f64;
            let max = *c.iter().max().unwrap() as f64;
            prop_assert!(max / mean <= 1.01, "max {max} mean {mean}");
        }

        // Removing one of N backends should move at most 1.1/N of the slots. Extra movement
        // shrinks like 1/sqrt(M): at the default M it stays within 1.1/N up to N = 20 (6000
        // random sets of 20: 1.073/N on average, 1.095/N at most) unless two backends share
        // a skip (probability N^2 / 2M), and within 2.1/N up to 100 (1.57/N on average at
        // 100). No table that depends only on the backend set and keeps max/mean <= 1.01 can
        // do 1.1/N at N = 100 with M = 65537 (docs/benchmarks.md: at best 1.155/N). The
        // largest table, MAX_RING_SIZE, does: 1.08/N at most at N = 100 (30 random sets).
        #[test]
        fn removing_one_of_up_to_20_backends_moves_at_most_1_1_over_n(
            (keys, removed) in (2usize..=20).prop_flat_map(|n| (keys(n), 0..n)),
        ) {
            let skips: BTreeSet<u64> =
                keys.iter().map(|k| xxh3_64_with_seed(k.as_bytes(), SEED_SKIP) % u64::from(M - 1)).collect();
            prop_assume!(skips.len() == keys.len(), "two backends share a skip");
            let (frac, n) = moved_fraction(&keys, removed, M);
            prop_assert!(frac <= 1.1 / n, "moved {frac} = {:.3}/N", frac * n);
        }

        #[test]
        fn removing_one_of_up_to_100_backends_moves_at_most_2_1_over_n(
            (keys, removed) in (2usize..=100).prop_flat_map(|n| (keys(n), 0..n)),
        ) {
            let (frac, n) = moved_fraction(&keys, removed, M);
            prop_assert!(frac <= 2.1 / n, "moved {frac} = {:.3}/N", frac * n);
        }

        #[test]
        fn weights_are_respected(
            (keys, weights) in (1usize..=20).prop_flat_map(|n| {
                (keys(n), proptest::collection::vec(1u32..=65535, n))
            }),
        ) {
            let b = backends(&keys, &weights);
            let c = counts(&build_table(&b, M), b.len());
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            for (i, &w) in weights.iter().enumerate() {
                let expected = f64::from(M) * f64::from(w) / total;
                let tol = (expected * 0.01).max(2.0);
                prop_assert!(
                    (c[i] as f64 - expected).abs() <= tol,
                    "backend {i} w {w}: {} slots, expected {expected:.1}", c[i]
                );
            }
        }

        #[test]
        fn input_order_does_not_matter(
            (keys, weights, order) in (1usize..=50).prop_flat_map(|n| {
                (
                    keys(n),
                    proptest::collection::vec(0u32..=5, n),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            }),
        ) {
            let b = backends(&keys, &weights);
            let shuffled: Vec<_> = order.iter().map(|&i| b[i]).collect();
            let t1 = build_table(&b, M);
            let t2 = build_table(&shuffled, M);
            prop_assert_eq!(owner_keys(&t1, &b), owner_keys(&t2, &shuffled));
        }

        #[test]
        fn drained_backends_never_appear(
            (keys, weights) in (1usize..=30).prop_flat_map(|n| {
                (keys(n), proptest::collection::vec(prop_oneof![Just(0u32), 1u32..=3], n))
            }),
        ) {
            let b = backends(&keys, &weights);
            let t = build_table(&b, M);
            let used: BTreeSet<u32> = t.iter().copied().collect();
            for (i, &w) in weights.iter().enumerate() {
                if w == 0 {
                    prop_assert!(!used.contains(&(i as u32)));
                }
            }
            prop_assert_eq!(t.is_empty(), weights.iter().all(|&w| w == 0));
        }
    }

    /// The round loop `fill` replaced, kept as the specification: every round each live backend
    /// (in fill order) adds its weight to a credit and, once the credit reaches the largest
    /// weight, pays it and takes its next free slot, until the table is full. The walk is
    /// computed directly, `offset + skip * j^degree mod m`.
    fn reference_build_table(backends: &[MaglevBackend<'_>], m: u32) -> Vec<u32> {
        let mut live: Vec<(usize, &MaglevBackend<'_>)> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.weight > 0)
            .collect();
        if m == 0 || live.is_empty() {
            return Vec::new();
        }
        live.sort_by(|(ia, a), (ib, b)| (a.key, a.weight, ia).cmp(&(b.key, b.weight, ib)));
        let max_weight = live.iter().map(|(_, b)| u64::from(b.weight)).max().unwrap();
        let (m64, degree) = (u64::from(m), permutation_degree(m));
        // Per backend: offset, skip, next j, credit.
        let mut walks: Vec<(u64, u64, u64, u64)> = live
            .iter()
            .map(|(_, b)| {
                let offset = xxh3_64_with_seed(b.key.as_bytes(), SEED_OFFSET) % m64;
                let skip = xxh3_64_with_seed(b.key.as_bytes(), SEED_SKIP) % (m64 - 1).max(1) + 1;
                (offset, skip, 0, 0)
            })
            .collect();
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0;
        loop {
            for ((index, b), (offset, skip, j, credit)) in live.iter().zip(&mut walks) {
                *credit += u64::from(b.weight);
                if *credit < max_weight {
                    continue;
                }
                *credit -= max_weight;
                loop {
                    let slot = ((*offset + *skip * pow_mod(*j, degree, m64)) % m64) as usize;
                    *j += 1;
                    if table[slot] == EMPTY {
                        table[slot] = *index as u32;
                        break;
                    }
                }
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }

    fn small_primes() -> Vec<u32> {
        (2u32..2000)
            .filter(|&m| (2..m).take_while(|d| d * d <= m).all(|d| m % d != 0))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        // Rings are a contract between LB nodes and versions: `fill` must give exactly the
        // table of the round loop, for any weights (0, 1, 65535 and u32::MAX side by side)
        // and duplicate keys. 65537, 65539, 65551 and 65521 take degrees 3, 5, 7 and 11.
        #[test]
        fn fill_matches_the_round_loop(
            entries in prop_oneof![Just(65535u32), Just(u32::MAX), 1u32..=1000, 0u32..=65535]
                .prop_flat_map(|top| {
                    // `fill` visits a backend every round from a weight of about top / 32 on.
                    let weight = prop_oneof![
                        Just(0), Just(1), Just(top), 0..=top, 1..=(top / 32).max(1),
                        Just(top / 32), Just(top / 32 + 1),
                    ];
                    proptest::collection::vec((0u8..=60, weight), 0..=40)
                }),
            m in prop_oneof![
                4 => proptest::sample::select(small_primes()),
                1 => proptest::sample::select(vec![0u32, 1, 65537, 65539, 65551, 65521]),
            ],
        ) {
            let keys: Vec<String> = entries.iter().map(|(id, _)| format!("10.99.0.{id}:80")).collect();
            let weights: Vec<u32> = entries.iter().map(|&(_, w)| w).collect();
            let b = backends(&keys, &weights);
            prop_assert_eq!(build_table(&b, m), reference_build_table(&b, m));
        }
    }

    proptest! {
        // Each case builds two tables of two million slots.
        #![proptest_config(ProptestConfig::with_cases(4))]

        #[test]
        fn at_the_largest_table_removing_one_of_up_to_100_moves_at_most_1_1_over_n(
            (keys, removed) in (21usize..=100).prop_flat_map(|n| (keys(n), 0..n)),
        ) {
            let (frac, n) = moved_fraction(&keys, removed, LARGEST);
            prop_assert!(frac <= 1.1 / n, "moved {frac} = {:.3}/N", frac * n);
        }
    }

    #[test]
    fn all_drained_or_no_backends_gives_empty_table() {
        assert!(build_table(&[], M).is_empty());
        let b = [mb("10.0.0.1:80", 0), mb("10.0.0.2:80", 0)];
        assert!(build_table(&b, M).is_empty());
        assert!(build_table(&b[..0], 0).is_empty());
    }

    #[test]
    fn tiny_tables() {
        let b = [mb("a", 1), mb("b", 1), mb("c", 1)];
        // 1 is not prime, but must not divide by zero.
        for m in [1, 2, 3, 5, 7, 13, 31] {
            let t = build_table(&b, m);
            assert_eq!(t.len(), m as usize);
            assert!(t.iter().all(|&i| i < 3));
        }
    }

    #[test]
    fn every_backend_walk_visits_every_slot_once() {
        for m in small_primes().into_iter().chain([65521, 65537]) {
            let degree = permutation_degree(m);
            let mut cursor =
                Cursor::<{ MAX_DEGREE + 1 }>::new(m / 3, (m / 2).max(1), degree, m, 1, 0);
            let mut seen = vec![false; m as usize];
            for _ in 0..m {
                let slot = cursor.advance(m) as usize;
                assert!(!seen[slot], "m = {m}, degree {degree}: slot {slot} twice");
                seen[slot] = true;
            }
        }
        assert_eq!(permutation_degree(65537), 3);
        assert_eq!(permutation_degree(65521), 11);
    }

    // Golden tables: a change to the hash, the seeds or the fill order breaks ring
    // compatibility between hosts running different versions, so it must be deliberate.
    #[test]
    fn golden_equal_weights() {
        let b = [
            mb("10.99.2.11:8080", 1),
            mb("10.99.2.12:8080", 1),
            mb("10.99.2.13:8080", 1),
        ];
        assert_eq!(build_table(&b, 13), [1, 0, 2, 0, 1, 1, 2, 2, 0, 0, 2, 0, 1]);
        assert_eq!(
            build_table(&b, 65537)[..16],
            [0, 1, 1, 0, 2, 2, 1, 1, 2, 0, 2, 1, 1, 1, 2, 0]
        );
    }

    #[test]
    fn golden_weighted() {
        let b = [
            mb("10.99.2.13:8080", 300),
            mb("10.99.2.11:8080", 100),
            mb("10.99.2.12:8080", 0),
            mb("10.99.2.14:8080", 200),
        ];
        assert_eq!(
            build_table(&b, 31),
            [
                3, 3, 0, 0, 1, 3, 3, 3, 0, 3, 3, 0, 0, 0, 1, 0, 3, 0, 3, 0, 0, 1, 0, 0, 0, 3, 0, 1,
                1, 0, 0
            ]
        );
    }
}
