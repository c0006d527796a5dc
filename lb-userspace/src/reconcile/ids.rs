//! Service and backend ids. A freed id waits in quarantine until an RCU grace period has
//! passed (a packet may still be reading its old value), then goes to the back of the queue,
//! so it is reused as late as possible: a stale conntrack entry then finds an empty slot, not
//! a stranger.
use std::collections::VecDeque;

pub struct IdPool {
    free: VecDeque<u32>,
    pub(super) quarantined: Vec<u32>,
    max: u32,
}

impl IdPool {
    pub fn new(max: u32, used: &[u32]) -> Self {
        Self {
            free: (0..max).filter(|id| !used.contains(id)).collect(),
            quarantined: Vec::new(),
            max,
        }
    }

    pub fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }

    /// Returns an id that was taken but never written anywhere: usable again at once.
    pub fn untake(&mut self, id: u32) {
        self.free.push_front(id);
    }

    /// An id whose slot was just cleared: free after the next grace period.
    pub fn quarantine(&mut self, id: u32) {
        self.quarantined.push(id);
    }

    /// After a grace period: quarantined ids become free.
    pub fn release(&mut self) {
        self.free.extend(self.quarantined.drain(..));
    }

    /// Ids that can be taken now.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn max(&self) -> u32 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_id_waits_for_a_grace_period_then_comes_last() {
        let mut pool = IdPool::new(3, &[]);
        let a = pool.take().unwrap();
        pool.quarantine(a);
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.take(), Some(1));
        pool.release();
        assert_eq!(pool.take(), Some(2));
        assert_eq!(pool.take(), Some(a));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn an_unused_id_goes_back_to_the_front() {
        let mut pool = IdPool::new(3, &[1]);
        let a = pool.take().unwrap();
        pool.untake(a);
        assert_eq!(pool.take(), Some(a));
    }
}
