//! The fill of `build_table`: the order of claims of its round loop, with a cost that does
//! not depend on the weight ratio.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{Cursor, EMPTY, MaglevBackend, SEED_OFFSET, SEED_SKIP};

/// A backend whose weight earns a claim at least once in this many rounds ("dense") is
/// visited every round; the others ("sparse") wait in a heap. A claim then costs at most this
/// many visits or one heap operation, whatever the weight ratio; 32 about evens the two out
/// (docs/benchmarks.md).
const DENSE_ROUNDS: u64 = 32;

/// Maglev's round-robin fill over `live` (already in fill order); see `build_table`.
///
/// Claims happen in the order of that round loop (round, then position in `live`). Dense
/// backends are visited every round as the loop says; sparse ones wait in a heap keyed by
/// (round of their next claim, position) and are merged in by position. A backend with the
/// largest weight is dense and claims every round, so there are at most `m` rounds.
pub(super) fn fill<const D: usize>(
    live: &[(usize, &MaglevBackend<'_>)],
    m: u32,
    degree: usize,
    max_weight: u64,
) -> Vec<u32> {
    // `max(1)` only matters for m == 1, which is not prime; it avoids a division by zero.
    let skip_mod = u64::from(m - 1).max(1);
    // Dense cursors and their positions, apart: most rounds need no positions.
    let (mut dense, mut dense_pos) = (Vec::with_capacity(live.len()), Vec::new());
    let mut sparse = Sparse::<D> {
        cursors: Vec::new(),
        index: vec![0; live.len()],
        heap: BinaryHeap::new(),
    };
    for (pos, &(index, b)) in (0u32..).zip(live) {
        let offset = xxh3_64_with_seed(b.key.as_bytes(), SEED_OFFSET) % u64::from(m);
        let skip = xxh3_64_with_seed(b.key.as_bytes(), SEED_SKIP) % skip_mod + 1;
        // Both are < m, so they fit u32.
        let (offset, skip) = (offset as u32, skip as u32);
        let mut c = Cursor::new(offset, skip, degree, m, u64::from(b.weight), index as u32);
        if c.weight * DENSE_ROUNDS >= max_weight {
            dense.push(c);
            dense_pos.push(pos);
        } else {
            let round = c.rounds_to_next_claim(max_weight);
            sparse.heap.push(Reverse(heap_key(round, pos)));
            sparse.index[pos as usize] = sparse.cursors.len() as u32;
            sparse.cursors.push(c);
        }
    }

    let mut table = Table {
        slots: vec![EMPTY; m as usize],
        free: m,
    };
    for round in 1u64.. {
        let mut next_sparse = sparse.due(round);
        if next_sparse == u32::MAX {
            for c in &mut dense {
                if visit(c, &mut table, max_weight) {
                    return table.slots;
                }
            }
            continue;
        }
        for (c, &pos) in dense.iter_mut().zip(&dense_pos) {
            if next_sparse < pos {
                match sparse.claim_before(round, pos, &mut table, max_weight) {
                    Some(next) => next_sparse = next,
                    None => return table.slots,
                }
            }
            if visit(c, &mut table, max_weight) {
                return table.slots;
            }
        }
        if next_sparse < u32::MAX
            && sparse
                .claim_before(round, u32::MAX, &mut table, max_weight)
                .is_none()
        {
            return table.slots;
        }
    }
    unreachable!("every round claims a slot")
}

/// One round of a dense backend: earn `weight`, claim a slot if the credit reaches the
/// largest weight. True when that filled the table.
#[inline(always)]
fn visit<const D: usize>(c: &mut Cursor<D>, table: &mut Table, max_weight: u64) -> bool {
    c.credit += c.weight;
    // credit < 2 * max_weight here, so `if` is the same as `while`: at most one slot per
    // backend per round.
    if c.credit < max_weight {
        return false;
    }
    c.credit -= max_weight;
    table.claim(c)
}

impl<const D: usize> Cursor<D> {
    /// Rounds from this backend's last claim (or the start) to its next one, where every
    /// round adds `weight` to the credit and a claim pays `max_weight`; pays for that claim.
    fn rounds_to_next_claim(&mut self, max_weight: u64) -> u64 {
        let gap = if self.credit + self.weight >= max_weight {
            1
        } else {
            (max_weight - self.credit).div_ceil(self.weight)
        };
        self.credit = self.credit + gap * self.weight - max_weight;
        gap
    }
}

struct Table {
    slots: Vec<u32>,
    free: u32,
}

impl Table {
    /// Gives `c` its next free preferred slot; true when that filled the table.
    fn claim<const D: usize>(&mut self, c: &mut Cursor<D>) -> bool {
        let m = self.slots.len() as u32;
        // A free slot always exists (the caller stops when the table is full), and the walk
        // visits every slot (m is prime and the degree coprime to m - 1), so this terminates.
        loop {
            let slot = c.advance(m) as usize;
            if self.slots[slot] == EMPTY {
                self.slots[slot] = c.index;
                break;
            }
        }
        self.free -= 1;
        self.free == 0
    }
}

/// The backends that claim less often than every `DENSE_ROUNDS` rounds.
struct Sparse<const D: usize> {
    cursors: Vec<Cursor<D>>,
    /// Index into `cursors` by position in fill order.
    index: Vec<u32>,
    /// `heap_key` of each sparse backend's next claim.
    heap: BinaryHeap<Reverse<u64>>,
}

/// (round, position) as one integer, for fast comparisons. Every round claims a slot, so the
/// fill ends within `m <= 2^31` rounds: a claim due after round `u32::MAX` never comes.
fn heap_key(round: u64, pos: u32) -> u64 {
    round.min(u64::from(u32::MAX)) << 32 | u64::from(pos)
}

impl<const D: usize> Sparse<D> {
    /// Position of the first sparse claim in `round`, or `u32::MAX`.
    fn due(&self, round: u64) -> u32 {
        match self.heap.peek() {
            Some(&Reverse(next)) if next >> 32 == round => next as u32,
            _ => u32::MAX,
        }
    }

    /// Makes the claims of `round` at positions before `before`. Returns the position of the
    /// next claim in `round` (`u32::MAX` if none), or None when the table is full.
    fn claim_before(
        &mut self,
        round: u64,
        before: u32,
        table: &mut Table,
        max_weight: u64,
    ) -> Option<u32> {
        let limit = heap_key(round, before);
        while let Some(mut next) = self.heap.peek_mut()
            && next.0 < limit
        {
            let pos = next.0 as u32;
            let c = &mut self.cursors[self.index[pos as usize] as usize];
            if table.claim(c) {
                return None;
            }
            next.0 = heap_key(round + c.rounds_to_next_claim(max_weight), pos);
        }
        Some(self.due(round))
    }
}
