//! Where each service's ring lives in `RINGS`. Space is handed out in blocks of RING_BLOCK
//! slots; a ring larger than the default takes adjacent blocks. A new ring is written into
//! free blocks and the service flipped to it; the blocks it replaced stay untouched until an
//! RCU grace period has passed, so a packet that read the old service value just before the
//! flip still finds the old ring.
use lb_common::sizes::{RING_BLOCK, ring_blocks};

pub struct RingSpace {
    used: Vec<bool>,
    /// Replaced rings (first block, blocks), freed by the next `release_retired`.
    retired: Vec<(u32, u32)>,
}

impl RingSpace {
    /// Space with these rings (offset, table_size) in use, e.g. those a previous agent left,
    /// in a `RINGS` of the BPF object's size.
    #[cfg(test)]
    pub fn new(in_use: impl IntoIterator<Item = (u32, u32)>) -> Self {
        Self::with_blocks(lb_common::sizes::RING_BLOCKS, in_use)
    }

    /// The same in a `RINGS` of `blocks` blocks (layout.rs sizes it from the config).
    pub fn with_blocks(blocks: u32, in_use: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut space = Self {
            used: vec![false; blocks as usize],
            retired: Vec::new(),
        };
        for (offset, table_size) in in_use {
            space.mark(offset / RING_BLOCK, ring_blocks(table_size), true);
        }
        space
    }

    /// The first slot of free space for a ring of `table_size` slots, now taken. Default-sized
    /// rings fill the space from the bottom, larger ones from the top, so that the many small
    /// ones do not split the room the few large ones need.
    pub fn take(&mut self, table_size: u32) -> Option<u32> {
        let blocks = ring_blocks(table_size);
        if blocks == 0 {
            return Some(0);
        }
        let total = self.used.len() as u32;
        let fits = |&start: &u32| (start..start + blocks).all(|b| !self.used[b as usize]);
        let start = if blocks == 1 {
            (0..total).find(fits)
        } else {
            (0..=total.checked_sub(blocks)?).rev().find(fits)
        }?;
        self.mark(start, blocks, true);
        Some(start * RING_BLOCK)
    }

    /// Space taken for a ring that was never published: free again at once.
    pub fn give_back(&mut self, offset: u32, table_size: u32) {
        self.mark(offset / RING_BLOCK, ring_blocks(table_size), false);
    }

    /// The ring at `offset` is no longer the service's; its blocks are freed by the next
    /// `release_retired`.
    pub fn retire(&mut self, offset: u32, table_size: u32) {
        let blocks = ring_blocks(table_size);
        if blocks > 0 {
            self.retired.push((offset / RING_BLOCK, blocks));
        }
    }

    /// Frees what was retired before: called after a grace period, when no packet can still
    /// be reading it.
    pub fn release_retired(&mut self) {
        for (start, blocks) in std::mem::take(&mut self.retired) {
            self.mark(start, blocks, false);
        }
    }

    /// Blocks that are neither in use nor retired.
    pub fn free_blocks(&self) -> u32 {
        self.used.iter().filter(|&&u| !u).count() as u32
    }

    fn mark(&mut self, start: u32, blocks: u32, used: bool) {
        // Clamped: a pinned offset from a differently sized build must not panic here.
        let end = (start + blocks).min(self.used.len() as u32);
        for b in &mut self.used[start.min(end) as usize..end as usize] {
            *b = used;
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::sizes::{DEFAULT_RING_SIZE, MAX_RING_SIZE, RING_BLOCKS};

    use super::*;

    #[test]
    fn default_rings_fill_from_the_bottom_and_large_ones_from_the_top() {
        let mut space = RingSpace::new([]);
        assert_eq!(space.take(DEFAULT_RING_SIZE), Some(0));
        assert_eq!(space.take(251), Some(RING_BLOCK));
        let large = ring_blocks(MAX_RING_SIZE);
        assert_eq!(
            space.take(MAX_RING_SIZE),
            Some((RING_BLOCKS - large) * RING_BLOCK)
        );
        assert_eq!(space.free_blocks(), RING_BLOCKS - 2 - large);
    }

    #[test]
    fn an_empty_ring_takes_nothing() {
        let mut space = RingSpace::new([]);
        assert_eq!(space.take(0), Some(0));
        space.retire(0, 0);
        space.release_retired();
        assert_eq!(space.free_blocks(), RING_BLOCKS);
    }

    #[test]
    fn retired_blocks_are_reused_only_after_release() {
        let mut space = RingSpace::new([]);
        for _ in 0..RING_BLOCKS {
            assert!(space.take(DEFAULT_RING_SIZE).is_some());
        }
        assert_eq!(space.take(DEFAULT_RING_SIZE), None);
        space.retire(5 * RING_BLOCK, DEFAULT_RING_SIZE);
        assert_eq!(space.take(DEFAULT_RING_SIZE), None, "still readable");
        space.release_retired();
        assert_eq!(space.take(DEFAULT_RING_SIZE), Some(5 * RING_BLOCK));
    }

    #[test]
    fn adopted_rings_are_kept() {
        let large_at = 100 * RING_BLOCK;
        let mut space = RingSpace::new([(0, DEFAULT_RING_SIZE), (large_at, 1_048_573)]);
        assert_eq!(space.free_blocks(), RING_BLOCKS - 1 - 16);
        assert_eq!(space.take(DEFAULT_RING_SIZE), Some(RING_BLOCK));
        let mut taken = Vec::new();
        while let Some(offset) = space.take(DEFAULT_RING_SIZE) {
            taken.push(offset / RING_BLOCK);
        }
        assert!(taken.iter().all(|b| !(100..116).contains(b)));
    }

    #[test]
    fn a_large_ring_needs_adjacent_free_blocks() {
        let mut space = RingSpace::new([]);
        let offsets: Vec<u32> = (0..RING_BLOCKS)
            .map(|_| space.take(DEFAULT_RING_SIZE).unwrap())
            .collect();
        // Every other block free: plenty of room in total, none of it adjacent.
        for offset in offsets.iter().step_by(2) {
            space.retire(*offset, DEFAULT_RING_SIZE);
        }
        space.release_retired();
        assert_eq!(space.free_blocks(), RING_BLOCKS / 2);
        assert_eq!(space.take(2 * RING_BLOCK), None);
        assert!(space.take(RING_BLOCK).is_some());
    }
}
