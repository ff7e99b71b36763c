//! The reference model: what the guest was promised, kept beside the simulated cluster and
//! checked against it after every step.
//!
//! Data is tracked symbolically: every guest write gets a unique tag, every block of a disk
//! holds the tag of the write that put it there (0: never written). The model knows, per block,
//! the history of acknowledged writes and which of them are guaranteed to survive (flushed, or
//! still held by a replica incarnation that acknowledged them and has not crashed), and so
//! which tags a read or a replica may show.

use std::collections::{BTreeMap, BTreeSet};

pub type Tag = u64;

/// A replica incarnation: (node index, incarnation).
pub type Holder = (usize, u64);

#[derive(Debug, Clone)]
pub struct WriteRec {
    pub tag: Tag,
    pub first_block: u64,
    pub blocks: u64,
    /// Owner generation that took it from the guest.
    pub generation: u64,
    pub acked: bool,
    /// Replica incarnations that acknowledged it to the owner, for which extent (a write may
    /// span extents, with other replicas each), and when (a step number).
    pub holders: BTreeMap<(Holder, u32), u64>,
    /// An acknowledged flush submitted after this write was acknowledged.
    pub flushed: bool,
    /// Ended without acknowledgement (owner gone or error).
    pub abandoned: bool,
    /// When the guest issued it (a step number).
    pub issued_step: u64,
}

#[derive(Debug, Default)]
pub struct Model {
    pub writes: BTreeMap<Tag, WriteRec>,
    /// Per block: acknowledged writes, in acknowledgement order.
    acked: BTreeMap<u64, Vec<Tag>>,
    /// Per block: writes issued and not acknowledged (yet or ever).
    unacked: BTreeMap<u64, BTreeSet<Tag>>,
    /// Replica incarnations that crashed.
    pub crashed: BTreeSet<Holder>,
    /// Per block: last read value and the "change counter" it was read at.
    last_read: BTreeMap<u64, (Tag, u64)>,
    /// Bumped for a block whenever what it may read as changes (acked write, loss).
    change: BTreeMap<u64, u64>,
    /// Writes acknowledged and not yet covered by a flush, with their ack order.
    unflushed: BTreeSet<Tag>,
    /// Writes of zeroes (write-zeroes, discard): their blocks hold 0, not their tag.
    zeroes: BTreeSet<Tag>,
    pub stats: ModelStats,
}

#[derive(Debug, Default, Clone)]
pub struct ModelStats {
    pub writes_acked: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
}

impl Model {
    pub fn write_issued(&mut self, tag: Tag, first_block: u64, blocks: u64, generation: u64, step: u64) {
        self.writes.insert(
            tag,
            WriteRec {
                tag,
                first_block,
                blocks,
                generation,
                acked: false,
                holders: BTreeMap::new(),
                flushed: false,
                abandoned: false,
                issued_step: step,
            },
        );
        for b in first_block..first_block + blocks {
            self.unacked.entry(b).or_default().insert(tag);
        }
    }

    /// A write of zeroes (write-zeroes or discard) under its own tag.
    pub fn zeroes_issued(&mut self, tag: Tag, first_block: u64, blocks: u64, generation: u64, step: u64) {
        self.zeroes.insert(tag);
        self.write_issued(tag, first_block, blocks, generation, step);
    }

    /// What a block written by `tag` holds.
    pub fn value_of(&self, tag: Tag) -> Tag {
        if self.zeroes.contains(&tag) {
            0
        } else {
            tag
        }
    }

    pub fn holder_acked(&mut self, tag: Tag, holder: Holder, extent: u32, step: u64) {
        if let Some(w) = self.writes.get_mut(&tag) {
            w.holders.entry((holder, extent)).or_insert(step);
        }
    }

    pub fn write_acked(&mut self, tag: Tag) {
        let Some(w) = self.writes.get_mut(&tag) else { return };
        w.acked = true;
        self.stats.writes_acked += 1;
        let (first, n) = (w.first_block, w.blocks);
        for b in first..first + n {
            if let Some(s) = self.unacked.get_mut(&b) {
                s.remove(&tag);
            }
            self.acked.entry(b).or_default().push(tag);
            *self.change.entry(b).or_default() += 1;
        }
        self.unflushed.insert(tag);
    }

    /// The owner gave up on a write, or died with it in flight: it may or may not be there.
    pub fn write_abandoned(&mut self, tag: Tag) {
        if let Some(w) = self.writes.get_mut(&tag) {
            if !w.acked {
                w.abandoned = true;
            }
        }
    }

    /// A flush submitted when `acked_before` were the acknowledged, unflushed writes was
    /// acknowledged.
    pub fn flush_acked(&mut self, acked_before: &BTreeSet<Tag>) {
        self.stats.flushes_acked += 1;
        for t in acked_before {
            if let Some(w) = self.writes.get_mut(t) {
                w.flushed = true;
            }
            self.unflushed.remove(t);
        }
    }

    pub fn unflushed(&self) -> BTreeSet<Tag> {
        self.unflushed.clone()
    }

    /// The owner declared that acknowledged writes may have been lost: reads may go back.
    pub fn loss_declared(&mut self) {
        // Later flushes cannot make what was lost durable (the first of them fails); the model
        // stops expecting them to.
        self.unflushed.clear();
        let blocks: Vec<u64> = self.acked.keys().copied().collect();
        for b in blocks {
            *self.change.entry(b).or_default() += 1;
        }
    }

    pub fn crash(&mut self, holder: Holder) {
        self.crashed.insert(holder);
        // Blocks whose newest acked write may now be gone can legitimately read older data.
        let blocks: Vec<u64> = self.acked.keys().copied().collect();
        for b in blocks {
            *self.change.entry(b).or_default() += 1;
        }
    }

    /// A new owner generation: the guest restarted, reads before and after may differ where
    /// writes were in flight or unflushed.
    pub fn new_generation(&mut self) {
        // Its flushes cover what it acknowledges, not what the previous guest session left
        // unflushed.
        self.unflushed.clear();
        let blocks: Vec<u64> = self.acked.keys().chain(self.unacked.keys()).copied().collect();
        for b in blocks {
            *self.change.entry(b).or_default() += 1;
        }
    }

    /// Certainly still held: flushed, or acknowledged by a replica incarnation that has not
    /// crashed and has been in sync for the block ever since (`kept(node, step)`).
    fn survives(&self, w: &WriteRec, extent: u32, kept: &dyn Fn(usize, u64) -> bool) -> bool {
        w.flushed
            || w.holders.iter().any(|((h, e), step)| *e == extent && !self.crashed.contains(h) && kept(h.0, *step))
    }

    /// Tags block `b` may hold/read as: the newest acknowledged write that certainly
    /// survives, every acknowledged write after it (they may or may not have survived), and
    /// every write never acknowledged that is not older than it.
    pub fn allowed(&self, b: u64, extent: u32, in_sync: &dyn Fn(usize, u64) -> bool) -> BTreeSet<Tag> {
        let mut out = BTreeSet::new();
        let history = self.acked.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        let floor = history.iter().rposition(|t| self.writes.get(t).is_some_and(|w| self.survives(w, extent, in_sync)));
        match floor {
            Some(i) => out.extend(history[i..].iter().copied()),
            None => {
                out.insert(0);
                out.extend(history.iter().copied());
            }
        }
        let floor_tag = floor.map_or(0, |i| history[i]);
        if let Some(s) = self.unacked.get(&b) {
            // Writes issued after the floor write was acknowledged (tags grow with issue time).
            out.extend(s.iter().copied().filter(|t| *t > floor_tag));
        }
        out.into_iter().map(|t| self.value_of(t)).collect()
    }

    /// The strict value of block `b`: the newest acknowledged write, if it certainly
    /// survives and nothing is in flight on the block.
    /// Checks a guest read's result for block `b` (I9). Returns a description on violation.
    pub fn read_result(
        &mut self,
        b: u64,
        extent: u32,
        tag: Tag,
        in_flight_on_block: bool,
        in_sync: &dyn Fn(usize, u64) -> bool,
    ) -> Result<(), String> {
        self.stats.reads_checked += 1;
        let allowed = self.allowed(b, extent, in_sync);
        if !allowed.contains(&tag) {
            return Err(format!("I9: block {b} read as write {tag}, allowed {allowed:?}"));
        }
        let change = self.change.get(&b).copied().unwrap_or(0);
        // A write that failed leaves its blocks undefined until a later write: replicas may
        // hold it or not, and which one a read sees may change.
        let history = self.acked.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        let newest_acked = history.last().copied().unwrap_or(0);
        let undefined =
            self.unacked.get(&b).is_some_and(|s| {
                s.iter().any(|t| *t > newest_acked && self.writes.get(t).is_some_and(|w| w.abandoned))
            }) || !allowed.contains(&self.value_of(newest_acked));
        if let Some((prev, at)) = self.last_read.get(&b) {
            if *at == change && *prev != tag && !in_flight_on_block && !undefined {
                return Err(format!("I9: block {b} read as {prev} then {tag} with no write in between"));
            }
        }
        self.last_read.insert(b, (tag, change));
        Ok(())
    }
}
