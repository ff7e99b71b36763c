//! A vhost-user frontend that plays a misbehaving guest: it lays out split virtqueues in a
//! shared memfd and writes descriptor chains by hand, byte for byte, so tests can hand the
//! backend chains no real driver (QEMU, libblkio) would ever build.
//!
//! ```text
//!  guest memory (one memfd, GPA 0 .. mem_bytes, MEM_BYTES unless RawOptions says otherwise)
//!  0x0000_0000  unused page (a ring at GPA 0 reads as "not set up" to virtio-queue)
//!  0x0000_1000  queue 0: desc table | +0x1000 avail ring | +0x2000 used ring
//!  0x0000_5000  queue 1: ...                                  (RING_STRIDE apart)
//!  DATA_START   request buffers, handed out by `alloc`
//! ```
//!
//! The frontend owns the driver side of the rings: free descriptor indices, the avail index,
//! the used entries it has consumed. The rings are read and written through vm-memory over the
//! frontend's own mapping of the memfd, which the backend maps too: as one memory region, or
//! cut into several adjacent ones (`RawOptions::region_cuts`) to play a frontend whose guest
//! buffers straddle regions.
//!
//! With `RawOptions::inflight` it also plays QEMU's part of inflight I/O tracking: it asks the
//! backend for an inflight region (GET_INFLIGHT_FD) and hands it back (SET_INFLIGHT_FD) on
//! every connection. [`RawFrontend::reconnect`] is QEMU reconnecting to a backend that died:
//! the same guest memory, rings and inflight region, a new connection, `SET_VRING_BASE` at the
//! used ring's index (what QEMU sends when it could not ask the dead backend), and new kick
//! eventfds (the kicks the guest made meanwhile went to QEMU, not to the new backend).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Default guest memory size.
pub const MEM_BYTES: u64 = 32 << 20;
/// Where request buffers start; everything below belongs to the rings.
pub const DATA_START: u64 = 1 << 20;
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
/// The layout above fits rings of up to 256 entries in one page each.
pub const MAX_QUEUE_SIZE: u16 = 256;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

#[derive(Clone, Debug)]
pub struct RawOptions {
    pub num_queues: usize,
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX (used_event/avail_event suppression) or not.
    pub event_idx: bool,
    /// Guest memory size; default `MEM_BYTES`.
    pub mem_bytes: u64,
    /// Guest addresses (page-aligned, above `DATA_START`, ascending) where the memory table
    /// the backend gets is cut into adjacent regions. Empty: one region.
    pub region_cuts: Vec<u64>,
    /// Negotiate INFLIGHT_SHMFD and track requests in an inflight region, as QEMU does.
    pub inflight: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: MAX_QUEUE_SIZE,
            event_idx: false,
            mem_bytes: MEM_BYTES,
            region_cuts: Vec::new(),
            inflight: false,
        }
    }
}

/// A setup message the backend refused (or a connection that failed) in `try_connect`.
#[derive(Debug)]
pub struct SetupError {
    /// The message, e.g. "SET_MEM_TABLE".
    pub step: &'static str,
    /// What the vhost crate reported (a refused message with REPLY_ACK, a closed socket, ...).
    pub error: String,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.error)
    }
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> SetupError {
    move |error| SetupError { step, error: error.to_string() }
}

/// Connects and negotiates up to guest memory: the virtio features `options` asks for (as far
/// as offered), protocol features MQ, REPLY_ACK and CONFIG plus `extra` (as far as offered),
/// and every later message acknowledged, so that a refused one fails where it is sent. Returns
/// the frontend, the features the backend offered and those negotiated.
pub fn handshake(
    socket: &Path,
    options: &RawOptions,
    extra: VhostUserProtocolFeatures,
) -> Result<(Frontend, u64, u64), SetupError> {
    let mut frontend = Frontend::connect(socket, options.num_queues as u64).map_err(step("connect"))?;
    let offered = frontend.get_features().map_err(step("GET_FEATURES"))?;
    let mut wanted = 1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_MQ
        | 1 << VIRTIO_BLK_F_DISCARD
        | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        | 1 << VIRTIO_BLK_F_RO
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if options.event_idx {
        wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let features = offered & wanted;
    assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0, "backend offers no protocol features");
    assert_eq!(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0, options.event_idx, "EVENT_IDX not offered");
    frontend.set_owner().map_err(step("SET_OWNER"))?;
    frontend.set_features(features).map_err(step("SET_FEATURES"))?;
    let protocol = frontend.get_protocol_features().map_err(step("GET_PROTOCOL_FEATURES"))?
        & (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | extra);
    assert!(protocol.contains(extra), "backend does not offer {extra:?}");
    frontend.set_protocol_features(protocol).map_err(step("SET_PROTOCOL_FEATURES"))?;
    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // Every setup message is acknowledged, so a refused one fails here, not later.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let queue_num = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
    assert!(queue_num >= options.num_queues as u64, "backend offers {queue_num} queues");
    Ok((frontend, offered, features))
}

/// A device-readable descriptor (flags and next are filled in by `submit_chain`).
pub fn readable(addr: GuestAddress, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr.0, len, 0, 0))
}

/// A device-writable descriptor.
pub fn writable(addr: GuestAddress, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr.0, len, VRING_DESC_F_WRITE as u16, 0))
}

/// A descriptor with every field as given, for chains whose links are part of the test.
pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

pub fn header(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One discard / write-zeroes segment.
pub fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

struct RawQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    kick: EventFd,
    call: EventFd,
    /// The avail index the next published head gets.
    avail_idx: u16,
    /// Used entries consumed so far.
    used_seen: u16,
    free: Vec<u16>,
    /// Table indices of each chain in flight, by head, returned to `free` when it is used.
    chains: HashMap<u16, Vec<u16>>,
    /// Interrupts received (sum of the call eventfd's counter).
    calls: u64,
}

pub struct RawFrontend {
    /// `None` only inside `reconnect`, between the old connection and the new one.
    frontend: Option<Frontend>,
    /// What the backend offered at GET_FEATURES.
    offered: u64,
    mem: GuestMemoryMmap<()>,
    mem_bytes: u64,
    /// The memory table the backend gets (its fds are the mapping's memfd, which `mem` keeps
    /// open).
    table: Vec<VhostUserMemoryRegionInfo>,
    /// Where the rings start in the frontend's address space (the table's user addresses).
    host_base: u64,
    queues: Vec<RawQueue>,
    options: RawOptions,
    /// The inflight region the backend made, handed back on every connection.
    inflight: Option<(VhostUserInflight, File)>,
    next_alloc: u64,
}

impl RawFrontend {
    /// Connects, negotiates, shares guest memory and enables `options.num_queues` rings.
    pub fn connect(socket: &Path, options: RawOptions) -> Self {
        Self::try_connect(socket, options).unwrap_or_else(|e| panic!("vhost-user setup with {}: {e}", socket.display()))
    }

    /// `connect`, with a message the backend refuses as an error instead of a panic.
    pub fn try_connect(socket: &Path, options: RawOptions) -> Result<Self, SetupError> {
        assert!(options.queue_size.is_power_of_two() && options.queue_size <= MAX_QUEUE_SIZE);
        assert!(RING_BASE + RING_STRIDE * options.num_queues as u64 <= DATA_START, "too many queues for the layout");
        let extra = if options.inflight {
            VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            VhostUserProtocolFeatures::empty()
        };
        let (mut frontend, offered, _) = handshake(socket, &options, extra)?;

        let mem_bytes = options.mem_bytes;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            mem_bytes as usize,
            Some(FileOffset::new(memfd(mem_bytes), 0)),
        )])
        .expect("map guest memory");
        let region = mem.find_region(GuestAddress(0)).expect("the one region");
        let whole = VhostUserMemoryRegionInfo::from_guest_region(region).expect("memfd-backed region");
        let host_base = whole.userspace_addr;
        // The same memfd, cut into adjacent regions at the given guest addresses.
        let mut bounds = vec![0];
        for &cut in &options.region_cuts {
            assert!(cut >= DATA_START && cut < mem_bytes && cut % 4096 == 0, "bad region cut {cut:#x}");
            assert!(cut > *bounds.last().expect("starts with 0"), "region cuts must ascend");
            bounds.push(cut);
        }
        bounds.push(mem_bytes);
        let table: Vec<VhostUserMemoryRegionInfo> = bounds
            .windows(2)
            .map(|w| VhostUserMemoryRegionInfo {
                guest_phys_addr: w[0],
                memory_size: w[1] - w[0],
                userspace_addr: host_base + w[0],
                mmap_offset: whole.mmap_offset + w[0],
                mmap_handle: whole.mmap_handle,
            })
            .collect();

        let inflight = if options.inflight {
            // QEMU asks once per device, with its queue count and size, and keeps the region.
            let request = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: options.num_queues as u16,
                queue_size: options.queue_size,
            };
            Some(frontend.get_inflight_fd(&request).map_err(step("GET_INFLIGHT_FD"))?)
        } else {
            None
        };
        let queues = (0..options.num_queues)
            .map(|index| {
                let base = RING_BASE + RING_STRIDE * index as u64;
                RawQueue {
                    size: options.queue_size,
                    desc: GuestAddress(base),
                    avail: GuestAddress(base + 0x1000),
                    used: GuestAddress(base + 0x2000),
                    kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
                    call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
                    avail_idx: 0,
                    used_seen: 0,
                    free: (0..options.queue_size).rev().collect(),
                    chains: HashMap::new(),
                    calls: 0,
                }
            })
            .collect();
        let mut raw = Self {
            frontend: Some(frontend),
            offered,
            mem,
            mem_bytes,
            table,
            host_base,
            queues,
            options,
            inflight,
            next_alloc: DATA_START,
        };
        raw.start_rings()?;
        Ok(raw)
    }

    /// The inflight region (if any), the memory table and the rings, as QEMU sends them when
    /// it starts the device: SET_INFLIGHT_FD, SET_MEM_TABLE, then per ring NUM, ADDR, BASE (at
    /// the used ring's index: where a fresh ring is, and what QEMU sends after losing a
    /// backend), CALL, KICK, ENABLE.
    fn start_rings(&mut self) -> Result<(), SetupError> {
        let frontend = self.frontend.as_mut().expect("connected");
        if let Some((region, file)) = &self.inflight {
            frontend.set_inflight_fd(region, file.as_raw_fd()).map_err(step("SET_INFLIGHT_FD"))?;
        }
        frontend.set_mem_table(&self.table).map_err(step("SET_MEM_TABLE"))?;
        for (index, queue) in self.queues.iter().enumerate() {
            frontend.set_vring_num(index, queue.size).map_err(step("SET_VRING_NUM"))?;
            // Ring addresses are given in the frontend's virtual address space.
            let config = VringConfigData {
                queue_max_size: queue.size,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: self.host_base + queue.desc.0,
                used_ring_addr: self.host_base + queue.used.0,
                avail_ring_addr: self.host_base + queue.avail.0,
                log_addr: None,
            };
            frontend.set_vring_addr(index, &config).map_err(step("SET_VRING_ADDR"))?;
            let used_idx =
                u16::from_le(self.mem.load(queue.used.unchecked_add(2), Ordering::Acquire).expect("read used idx"));
            frontend.set_vring_base(index, used_idx).map_err(step("SET_VRING_BASE"))?;
            frontend.set_vring_call(index, &queue.call).map_err(step("SET_VRING_CALL"))?;
            frontend.set_vring_kick(index, &queue.kick).map_err(step("SET_VRING_KICK"))?;
            frontend.set_vring_enable(index, true).map_err(step("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// QEMU reconnecting to a backend on `socket` after the previous one died: the same guest
    /// memory, rings (with whatever is in flight) and inflight region over a new connection,
    /// with new kick eventfds.
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), SetupError> {
        let extra = if self.inflight.is_some() {
            VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            VhostUserProtocolFeatures::empty()
        };
        // The old connection ends first: a backend serves one frontend at a time, and this
        // one is still connected if the backend did not die.
        self.frontend = None;
        let (frontend, offered, _) = handshake(socket, &self.options, extra)?;
        self.frontend = Some(frontend);
        self.offered = offered;
        for queue in &mut self.queues {
            queue.kick = EventFd::new(EFD_NONBLOCK).expect("kick eventfd");
        }
        self.start_rings()
    }

    /// The negotiated frontend, for messages the tests send by hand.
    pub fn frontend(&mut self) -> &mut Frontend {
        self.frontend.as_mut().expect("connected")
    }

    /// The inflight region the backend gave (with `RawOptions::inflight`).
    pub fn inflight_region(&self) -> Option<&(VhostUserInflight, File)> {
        self.inflight.as_ref()
    }

    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// `len` bytes of the device's config space from `offset`.
    pub fn config(&mut self, offset: u32, len: usize) -> Vec<u8> {
        let (_, data) = self
            .frontend()
            .get_config(offset, len as u32, VhostUserConfigFlags::empty(), &vec![0u8; len])
            .expect("GET_CONFIG");
        assert_eq!(data.len(), len, "GET_CONFIG returned {} bytes", data.len());
        data
    }

    /// Capacity in 512-byte sectors, from the device's config space.
    pub fn capacity_sectors(&mut self) -> u64 {
        u64::from_le_bytes(self.config(0, 8).try_into().expect("8 config bytes"))
    }

    /// Hands out `len` bytes of guest memory (512-byte aligned), wrapping around to the start
    /// of the data area when full: buffers of finished requests are reused.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let len = len.max(1).next_multiple_of(512);
        assert!(len <= self.mem_bytes - DATA_START, "{len} bytes do not fit in guest memory");
        if self.next_alloc + len > self.mem_bytes {
            self.next_alloc = DATA_START;
        }
        let at = self.next_alloc;
        self.next_alloc += len;
        GuestAddress(at)
    }

    /// Allocates a buffer holding `bytes`.
    pub fn put(&mut self, bytes: &[u8]) -> GuestAddress {
        let at = self.alloc(bytes.len() as u64);
        self.write(at, bytes);
        at
    }

    pub fn write(&self, at: GuestAddress, bytes: &[u8]) {
        self.mem.write_slice(bytes, at).expect("write guest memory");
    }

    pub fn read(&self, at: GuestAddress, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, at).expect("read guest memory");
        out
    }

    pub fn read_status(&self, at: GuestAddress) -> u8 {
        self.mem.read_obj(at).expect("read status byte")
    }

    /// Writes `descs` into free table slots, linked in order (NEXT on all but the last, other
    /// flags kept), publishes the head and kicks. Returns the head index.
    pub fn submit_chain(&mut self, queue: usize, descs: &[RawDescriptor]) -> u16 {
        assert!(!descs.is_empty());
        let q = &mut self.queues[queue];
        assert!(q.free.len() >= descs.len(), "{} descriptors free, chain needs {}", q.free.len(), descs.len());
        let indices: Vec<u16> = (0..descs.len()).map(|_| q.free.pop().expect("checked above")).collect();
        for (i, desc) in descs.iter().enumerate() {
            let desc = SplitDescriptor::from(*desc);
            let (flags, next) = match indices.get(i + 1) {
                Some(&next) => (desc.flags() | VRING_DESC_F_NEXT as u16, next),
                None => (desc.flags() & !(VRING_DESC_F_NEXT as u16), 0),
            };
            let linked = RawDescriptor::from(SplitDescriptor::new(desc.addr().0, desc.len(), flags, next));
            self.mem.write_obj(linked, q.desc.unchecked_add(16 * u64::from(indices[i]))).expect("write descriptor");
        }
        let head = indices[0];
        q.chains.insert(head, indices);
        self.publish(queue, head);
        head
    }

    /// Writes each `(index, descriptor)` verbatim, flags and next included, then publishes
    /// `head`: for chains whose links are the point of the test (loops, dangling next).
    pub fn submit_raw(&mut self, queue: usize, descs: &[(u16, RawDescriptor)], head: u16) -> u16 {
        let q = &mut self.queues[queue];
        let mut indices = Vec::with_capacity(descs.len());
        for &(index, desc) in descs {
            let slot =
                q.free.iter().position(|&i| i == index).unwrap_or_else(|| panic!("descriptor {index} is in use"));
            q.free.swap_remove(slot);
            indices.push(index);
            self.mem.write_obj(desc, q.desc.unchecked_add(16 * u64::from(index))).expect("write descriptor");
        }
        assert!(indices.contains(&head), "the head must be one of the written descriptors");
        q.chains.insert(head, indices);
        self.publish(queue, head);
        head
    }

    /// Publishes `head` without writing or tracking any descriptor: for heads that are not
    /// descriptor indices at all. The device must not return it (its id would be invalid).
    pub fn publish_untracked(&mut self, queue: usize, head: u16) {
        self.publish(queue, head);
    }

    fn publish(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        let slot = u64::from(q.avail_idx % q.size);
        self.mem.write_obj(head.to_le(), q.avail.unchecked_add(4 + 2 * slot)).expect("write avail ring");
        q.avail_idx = q.avail_idx.wrapping_add(1);
        // Release: the descriptors and ring entry are visible before the index that covers them.
        self.mem.store(q.avail_idx.to_le(), q.avail.unchecked_add(2), Ordering::Release).expect("write avail idx");
        std::sync::atomic::fence(Ordering::SeqCst);
        // Kicking always is allowed even when the device asked not to be (EVENT_IDX or
        // NO_NOTIFY); it only costs a wake-up.
        q.kick.write(1).expect("kick");
    }

    /// Waits for the next used entry of `queue`: (head, used length). Panics after `timeout`.
    pub fn wait_used(&mut self, queue: usize, timeout: Duration) -> (u16, u32) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.try_used(queue) {
                return used;
            }
            self.drain_calls(queue);
            assert!(Instant::now() < deadline, "queue {queue}: no used entry within {timeout:?}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Asserts that `queue` returns nothing for `window`.
    pub fn expect_no_used(&mut self, queue: usize, window: Duration) {
        let deadline = Instant::now() + window;
        while Instant::now() < deadline {
            if let Some((head, len)) = self.try_used(queue) {
                panic!("queue {queue}: unexpected used entry (head {head}, len {len})");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn try_used(&mut self, queue: usize) -> Option<(u16, u32)> {
        let q = &mut self.queues[queue];
        let used_idx = u16::from_le(self.mem.load(q.used.unchecked_add(2), Ordering::Acquire).expect("read used idx"));
        if used_idx == q.used_seen {
            return None;
        }
        let entry = q.used.unchecked_add(4 + 8 * u64::from(q.used_seen % q.size));
        let id: u32 = u32::from_le(self.mem.read_obj(entry).expect("read used id"));
        let len: u32 = u32::from_le(self.mem.read_obj(entry.unchecked_add(4)).expect("read used len"));
        q.used_seen = q.used_seen.wrapping_add(1);
        if self.options.event_idx {
            // used_event (the avail ring's last field): interrupt us for the next entry.
            let used_event = q.avail.unchecked_add(4 + 2 * u64::from(q.size));
            self.mem.store(q.used_seen.to_le(), used_event, Ordering::Release).expect("write used_event");
        }
        let head =
            u16::try_from(id).unwrap_or_else(|_| panic!("queue {queue}: used id {id} is not a descriptor index"));
        let indices =
            q.chains.remove(&head).unwrap_or_else(|| panic!("queue {queue}: used id {head} was not in flight"));
        q.free.extend(indices);
        Some((head, len))
    }

    fn drain_calls(&mut self, queue: usize) {
        let q = &mut self.queues[queue];
        if let Ok(n) = q.call.read() {
            q.calls += n;
        }
    }

    /// Interrupts received on `queue` so far.
    pub fn calls(&mut self, queue: usize) -> u64 {
        self.drain_calls(queue);
        self.queues[queue].calls
    }

    /// Waits until the call eventfd of `queue` has fired at least `at_least` times in total.
    pub fn wait_calls(&mut self, queue: usize, at_least: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.calls(queue) < at_least {
            assert!(Instant::now() < deadline, "queue {queue}: fewer than {at_least} interrupts within {timeout:?}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Chains in flight on `queue` (published, not yet used).
    pub fn in_flight(&self, queue: usize) -> usize {
        self.queues[queue].chains.len()
    }
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    memfd_with(len, 0)
}

/// A memfd of `len` bytes created with `flags` besides MFD_CLOEXEC (MFD_HUGETLB: on
/// hugetlbfs; `len` must then be a multiple of the huge page size).
pub fn memfd_with(len: u64, flags: libc::c_uint) -> File {
    let name = c"hcblk-raw-frontend";
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("size memfd");
    file
}
