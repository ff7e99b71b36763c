//! Byte-range locks of the owner: overlapping writes are ordered, non-overlapping ones never
//! wait.
//!
//! A write (and discard, write-zeroes, and the copy of a region during reconcile, resync and
//! cleaning) takes its range exclusively; a read takes it shared, so it never sees a write
//! that is half-way through its replicas. Waiters are served first-come first-served among
//! those that overlap, so a stream of reads cannot starve a write.

use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Names a lock request; chosen by the caller, unique among live requests.
pub type LockId = u64;

#[derive(Clone, Copy, Debug)]
struct Range {
    id: LockId,
    start: u64,
    end: u64,
    mode: Mode,
}

impl Range {
    fn conflicts(&self, other: &Range) -> bool {
        self.start < other.end
            && other.start < self.end
            && (self.mode == Mode::Exclusive || other.mode == Mode::Exclusive)
    }
}

#[derive(Debug, Default)]
pub struct RangeLock {
    held: Vec<Range>,
    waiting: VecDeque<Range>,
}

impl RangeLock {
    /// Asks for `[start, end)`. Returns true if granted now; otherwise the request waits and
    /// comes back from a later [`RangeLock::release`].
    pub fn acquire(&mut self, id: LockId, start: u64, end: u64, mode: Mode) -> bool {
        debug_assert!(start < end);
        let r = Range { id, start, end, mode };
        if self.held.iter().any(|h| h.conflicts(&r)) || self.waiting.iter().any(|w| w.conflicts(&r)) {
            self.waiting.push_back(r);
            return false;
        }
        self.held.push(r);
        true
    }

    /// Grants `id` only if that is possible at once; never queues.
    pub fn try_acquire(&mut self, id: LockId, start: u64, end: u64, mode: Mode) -> bool {
        let r = Range { id, start, end, mode };
        if self.held.iter().any(|h| h.conflicts(&r)) || self.waiting.iter().any(|w| w.conflicts(&r)) {
            return false;
        }
        self.held.push(r);
        true
    }

    /// Releases a held range (or withdraws a waiting one); returns the ids granted as a result.
    pub fn release(&mut self, id: LockId) -> Vec<LockId> {
        if let Some(i) = self.held.iter().position(|h| h.id == id) {
            self.held.swap_remove(i);
        } else if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
        } else {
            return Vec::new();
        }
        let mut granted = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            let w = self.waiting[i];
            let blocked =
                self.held.iter().any(|h| h.conflicts(&w)) || self.waiting.iter().take(i).any(|e| e.conflicts(&w));
            if blocked {
                i += 1;
            } else {
                self.waiting.remove(i);
                self.held.push(w);
                granted.push(w.id);
            }
        }
        granted
    }

    pub fn is_held(&self, id: LockId) -> bool {
        self.held.iter().any(|h| h.id == id)
    }

    /// True if anything holds or waits for a range overlapping `[start, end)`.
    pub fn is_busy(&self, start: u64, end: u64) -> bool {
        self.held.iter().chain(&self.waiting).any(|r| r.start < end && start < r.end)
    }

    pub fn len(&self) -> usize {
        self.held.len() + self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_writes_wait_and_disjoint_ones_do_not() {
        let mut l = RangeLock::default();
        assert!(l.acquire(1, 0, 10, Mode::Exclusive));
        assert!(l.acquire(2, 10, 20, Mode::Exclusive), "disjoint");
        assert!(!l.acquire(3, 5, 15, Mode::Exclusive));
        assert!(!l.acquire(4, 5, 6, Mode::Shared), "behind the held write and the waiting one");
        assert!(l.acquire(5, 30, 40, Mode::Shared), "disjoint from everything");
        assert_eq!(l.release(1), Vec::<LockId>::new(), "3 still conflicts with 2, 4 waits behind 3");
        assert_eq!(l.release(2), vec![3]);
        assert_eq!(l.release(3), vec![4]);
        assert!(l.is_held(4) && l.is_held(5));
    }

    #[test]
    fn readers_share_and_a_waiting_writer_is_not_starved() {
        let mut l = RangeLock::default();
        assert!(l.acquire(1, 0, 10, Mode::Shared));
        assert!(l.acquire(2, 0, 10, Mode::Shared));
        assert!(!l.acquire(3, 0, 10, Mode::Exclusive));
        assert!(!l.acquire(4, 0, 10, Mode::Shared), "queued behind the writer");
        assert!(!l.try_acquire(5, 5, 6, Mode::Shared));
        assert!(l.release(1).is_empty());
        assert_eq!(l.release(2), vec![3]);
        assert_eq!(l.release(3), vec![4]);
        assert_eq!(l.release(99), Vec::<LockId>::new());
        assert!(l.release(4).is_empty());
        assert!(l.is_empty());
    }
}
