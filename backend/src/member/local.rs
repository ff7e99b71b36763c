//! The local member: an owner on this node reaches its local replica directly, on its own
//! poller thread — the replica state machine is called in place (under its lock), the data
//! moves between guest memory and the disk through the owner's own io_uring queue, and the
//! one-sided "pull" and "push" of the remote protocol are no-ops (the data is already where
//! it must be). No copy, no thread hop; only the first write to a region waits for the writer
//! thread to make its dirty bit durable.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::Arc;

use replica::{IoRequest, IoStatus, Op, ShardQueue, ShardQueueConfig};
use replication::replica::{DiskResult, OpId, ReplicaAction};
use replication::{Reply, Request};

use super::{Core, Inbox, Members};

const DISK_DEPTH: u32 = 512;
const _: () = assert!(DISK_DEPTH >= 1 && DISK_DEPTH <= ShardQueue::DEPTH_MAX);

struct LocalOp {
    /// Where the data comes from (writes) or goes to (reads): guest memory or an owner's copy
    /// buffer. Boxed so the disk request can point at it while the op is in the ring.
    iov: Box<[libc::iovec]>,
    in_disk: bool,
}

/// One owner's handle onto this node's replicas. Made and used on the owner's thread.
pub struct LocalMember {
    core: Arc<Core>,
    origin: u64,
    inbox: Arc<Inbox>,
    ops: HashMap<OpId, LocalOp>,
    disks: HashMap<u64, ShardQueue>,
    replies: VecDeque<Reply>,
    backlog: VecDeque<ReplicaAction>,
}

// SAFETY: the raw iovec pointers in `ops` point into memory the owner keeps valid until the
// op's reply (the `submit` contract); they are only dereferenced by the disk queues this
// handle owns. Moving the handle to another thread moves no aliasing.
unsafe impl Send for LocalMember {}

impl LocalMember {
    /// `notify` is called (from any thread) when work for this handle arrives while its owner
    /// may be asleep: a state record made durable, an etcd answer.
    pub fn new(members: &Members, notify: Box<dyn Fn() + Send + Sync>) -> Self {
        let core = Arc::clone(members.core());
        let inbox = Arc::new(Inbox::new(notify));
        let origin = core.register_inbox(Arc::clone(&inbox));
        Self {
            core,
            origin,
            inbox,
            ops: HashMap::new(),
            disks: HashMap::new(),
            replies: VecDeque::new(),
            backlog: VecDeque::new(),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.core.node_id
    }

    /// Hands the local replica a request from this node's owner.
    ///
    /// # Safety
    /// Every iovec must point at memory valid for reads (a write's data) or writes (a read's
    /// destination) of its length, and stay valid until this request's reply has been popped.
    pub unsafe fn submit(&mut self, request: Request, iov: Vec<libc::iovec>) {
        let op = self.core.new_op(self.origin);
        self.ops.insert(op, LocalOp { iov: iov.into_boxed_slice(), in_disk: false });
        let from = self.core.node_id;
        self.core.call(|r| r.on_request(op, from, request));
    }

    /// Requests in progress.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Moves requests along; returns how much it did (0 = idle).
    pub fn poll(&mut self) -> usize {
        let mut work = 0;
        let mut finished: Vec<(OpId, DiskResult)> = Vec::new();
        for q in self.disks.values_mut() {
            work += q.poll();
            while let Some(c) = q.pop_completion() {
                let result = match c.status {
                    IoStatus::Ok => DiskResult::Ok,
                    IoStatus::IoError(libc::ENOSPC) | IoStatus::IoError(libc::EDQUOT) => DiskResult::NoSpace,
                    _ => DiskResult::IoError,
                };
                finished.push((c.user_data, result));
            }
        }
        for (op, result) in finished {
            if let Some(o) = self.ops.get_mut(&op) {
                o.in_disk = false;
            }
            self.core.call(|r| r.on_disk(op, result));
        }
        // Actions may produce more actions for this handle (an on_pulled leads to a disk
        // write): a few rounds, bounded.
        for _ in 0..4 {
            let mut actions = std::mem::take(&mut self.backlog);
            actions.extend(self.inbox.take());
            if actions.is_empty() {
                break;
            }
            work += actions.len();
            for action in actions {
                if let Some(back) = self.execute(action) {
                    self.backlog.push_back(back);
                }
            }
        }
        work
    }

    pub fn pop_reply(&mut self) -> Option<Reply> {
        self.replies.pop_front()
    }

    /// The eventfds of this handle's disk queues (a sleeping owner waits on them too).
    pub fn eventfds(&self) -> Vec<RawFd> {
        self.disks.values().filter_map(ShardQueue::completion_eventfd).collect()
    }

    fn execute(&mut self, action: ReplicaAction) -> Option<ReplicaAction> {
        match action {
            ReplicaAction::Reply { op, reply, .. } => {
                self.ops.remove(&op);
                self.replies.push_back(reply);
                None
            }
            // The data is already in this process: the owner's buffers are the op's.
            ReplicaAction::Pull { op } => {
                self.core.call(|r| r.on_pulled(op, true));
                None
            }
            ReplicaAction::Push { op } => {
                self.core.call(|r| r.on_pushed(op, true));
                None
            }
            ReplicaAction::DiskRead { op, volume, offset, len } => self
                .submit_disk(op, volume, Op::Read, offset, u64::from(len), false)
                .err()
                .map(|()| ReplicaAction::DiskRead { op, volume, offset, len }),
            ReplicaAction::DiskWrite { op, volume, offset, len, fua } => self
                .submit_disk(op, volume, Op::Write, offset, u64::from(len), fua)
                .err()
                .map(|()| ReplicaAction::DiskWrite { op, volume, offset, len, fua }),
            ReplicaAction::DiskFlush { op, volume } => self
                .submit_disk(op, volume, Op::Flush, 0, 0, false)
                .err()
                .map(|()| ReplicaAction::DiskFlush { op, volume }),
            ReplicaAction::DiskDiscard { op, volume, offset, len } => self
                .submit_disk(op, volume, Op::Discard, offset, len, false)
                .err()
                .map(|()| ReplicaAction::DiskDiscard { op, volume, offset, len }),
            ReplicaAction::DiskZero { op, volume, offset, len } => self
                .submit_disk(op, volume, Op::WriteZeroes { unmap: false }, offset, len, false)
                .err()
                .map(|()| ReplicaAction::DiskZero { op, volume, offset, len }),
            ReplicaAction::Persist { .. }
            | ReplicaAction::ReadMeta { .. }
            | ReplicaAction::DropExtent { .. }
            | ReplicaAction::DropVolume { .. } => None,
        }
    }

    /// `Err(())`: the disk queue is full; try again later.
    fn submit_disk(&mut self, op: OpId, volume: u64, kind: Op, offset: u64, len: u64, fua: bool) -> Result<(), ()> {
        if !self.disks.contains_key(&volume) {
            let (_, size) = self.core.geometry(volume);
            let queue = self.core.store.data(volume, size).and_then(|backing| {
                ShardQueue::new(backing, ShardQueueConfig { depth: DISK_DEPTH, ..Default::default() })
                    .map_err(super::MemberError::from)
            });
            match queue {
                Ok(q) => {
                    self.disks.insert(volume, q);
                }
                Err(e) => {
                    tracing::error!(volume = format_args!("{volume:016x}"), error = %crate::control::chain(&e), "cannot open the local replica's data");
                    self.core.call(|r| r.on_disk(op, DiskResult::IoError));
                    return Ok(());
                }
            }
        }
        let Some(o) = self.ops.get_mut(&op) else {
            // The state machine waits for this disk result: without one the guest request
            // behind it would never complete.
            tracing::error!(op, "local member invariant broken: disk action for an unknown operation; it fails");
            debug_assert!(false, "local member invariant broken: disk action for unknown operation {op}");
            self.core.call(|r| r.on_disk(op, DiskResult::IoError));
            return Ok(());
        };
        let data = matches!(kind, Op::Read | Op::Write);
        let request = IoRequest {
            user_data: op,
            op: kind,
            offset_bytes: offset,
            len_bytes: len,
            iov: if data { o.iov.as_ptr() } else { std::ptr::null() },
            iov_count: if data { o.iov.len() as u32 } else { 0 },
            fua,
        };
        let queue = self.disks.get_mut(&volume).expect("opened above");
        // SAFETY: the iovecs live in the op's boxed slice, kept in `ops` until the op's reply
        // (the state machine answers only after this request completed); they point at
        // memory the owner keeps valid until then (`submit`'s contract).
        match unsafe { queue.submit(request) } {
            Ok(()) => {
                o.in_disk = true;
                Ok(())
            }
            Err(_) => Err(()),
        }
    }
}

impl Drop for LocalMember {
    fn drop(&mut self) {
        self.core.unregister_inbox(self.origin);
        // Requests still in the disk queues point into the owner's memory: wait for them (the
        // owner drops its handle only once its requests are answered, so this is rare).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.ops.values().any(|o| o.in_disk) && std::time::Instant::now() < deadline {
            for q in self.disks.values_mut() {
                q.poll();
                while let Some(c) = q.pop_completion() {
                    if let Some(o) = self.ops.get_mut(&c.user_data) {
                        o.in_disk = false;
                    }
                }
            }
            std::thread::yield_now();
        }
    }
}
