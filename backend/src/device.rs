//! The vhost-user-blk device a frontend (QEMU, libblkio) negotiates with.
//!
//! One `BlkDevice` lives for one frontend connection: a reconnecting frontend gets a fresh
//! device (fresh vrings, fresh poller state) over the same volume. Queue state is per poller
//! thread; nothing on the per-request path is shared by all queues.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use replica::{Backing, ShardQueue, ShardQueueConfig};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::export::PollConfig;
use crate::poller::Poller;
use crate::request::{Limits, ID_BYTES, SECTOR_SHIFT};
use crate::Error;

pub(crate) type GuestMem = GuestMemoryMmap<()>;
pub(crate) type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
pub(crate) type Vring = VringRwLock<GuestMemAtomic>;

/// Discard and write-zeroes: one segment of at most 2 GiB per request.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most data descriptors per request we accept (config seg_max).
const SEG_MAX: u32 = 126;

/// What a device needs to know about the volume it serves.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub name: String,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; ID_BYTES],
    pub poll: PollConfig,
}

/// Per-queue counters the frontend thread reads while a poller runs.
#[derive(Debug, Default)]
pub(crate) struct QueueShared {
    /// Requests taken from the avail ring and not yet in the used ring.
    pub(crate) in_flight: AtomicU32,
}

pub struct BlkDevice {
    pub(crate) config: DeviceConfig,
    pub(crate) backing: Arc<Backing>,
    /// Which queues each poller thread serves (bit i = queue i).
    queue_masks: Vec<u64>,
    pollers: Vec<Mutex<Poller>>,
    pub(crate) queues: Vec<QueueShared>,
    pub(crate) mem: RwLock<Option<GuestMemAtomic>>,
    pub(crate) event_idx: AtomicBool,
    acked_features: AtomicU64,
    backend_req: Mutex<Option<Backend>>,
    /// Set when the connection ends or the export stops: pollers drain and return.
    pub(crate) stopping: AtomicBool,
    /// Requests completed, for metrics.
    pub(crate) completed: AtomicU64,
}

impl BlkDevice {
    pub fn new(config: DeviceConfig, backing: Arc<Backing>) -> Result<Self, Error> {
        if config.num_queues == 0 || config.num_queues > 64 {
            return Err(Error::Config(format!("{} queues: between 1 and 64 are supported", config.num_queues)));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size < 4 {
            return Err(Error::Config(format!("queue size {} is not a power of two >= 4", config.queue_size)));
        }
        let threads = if config.poll.cpus.is_empty() {
            config.num_queues as usize
        } else {
            config.poll.cpus.len().min(config.num_queues as usize)
        };
        let mut queue_masks = vec![0u64; threads];
        for queue in 0..config.num_queues as usize {
            queue_masks[queue % threads] |= 1 << queue;
        }
        // A shard queue deep enough for every descriptor of every virtqueue a thread serves.
        let mut pollers = Vec::with_capacity(threads);
        for (thread, mask) in queue_masks.iter().enumerate() {
            let depth = u32::from(config.queue_size) * mask.count_ones();
            let shard = ShardQueue::new(Arc::clone(&backing), ShardQueueConfig { depth })?;
            let cpu = config.poll.cpus.get(thread).copied();
            pollers.push(Mutex::new(Poller::new(shard, *mask, cpu, config.queue_size, SEG_MAX)));
        }
        let queues = (0..config.num_queues).map(|_| QueueShared::default()).collect();
        Ok(Self {
            config,
            backing,
            queue_masks,
            pollers,
            queues,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            backend_req: Mutex::new(None),
            stopping: AtomicBool::new(false),
            completed: AtomicU64::new(0),
        })
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.backing.capacity_bytes() >> SECTOR_SHIFT,
            read_only: self.backing.read_only(),
            seg_max: SEG_MAX,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        }
    }

    /// The eventfd that wakes poller `thread` when its shard completes I/O, and the epoll id
    /// to register it under (ids up to `num_queues` belong to the framework).
    pub(crate) fn completion_event(&self, thread: usize) -> Option<(std::os::fd::RawFd, u64)> {
        let poller = self.pollers.get(thread)?.lock().unwrap_or_else(|p| p.into_inner());
        poller.completion_eventfd().map(|fd| (fd, self.completion_event_id()))
    }

    fn completion_event_id(&self) -> u64 {
        u64::from(self.config.num_queues) + 1
    }

    /// Tells the frontend to re-read the config space (new capacity).
    pub(crate) fn notify_config_change(&self) -> std::io::Result<bool> {
        let guard = self.backend_req.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(backend) => backend.handle_config_change().map(|_| true),
            None => Ok(false),
        }
    }

    /// Ends the connection's pollers: they drain what is in flight and return.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let capacity = self.backing.capacity_bytes() >> SECTOR_SHIFT;
        let block_size = self.backing.block_size();
        let physical = self.backing.dio_offset_align().max(block_size);
        let physical_exp = (physical / block_size).trailing_zeros() as u8;
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (4..8): not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20): not offered.
        c[20..24].copy_from_slice(&block_size.to_le_bytes());
        c[24] = physical_exp;
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size, in logical blocks
        c[28..32].copy_from_slice(&0u32.to_le_bytes()); // opt_io_size
        c[32] = 1; // writeback: the guest must FLUSH for durability
        c[34..36].copy_from_slice(&self.config.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&(block_size >> SECTOR_SHIFT).to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.config.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.config.queue_size as usize
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.backing.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The frontend asks for any window; what lies past our config space reads as zero.
        let space = self.config_space();
        let size = (size as usize).min(256);
        let mut out = vec![0u8; size];
        let start = (offset as usize).min(space.len());
        let end = (offset as usize).saturating_add(size).min(space.len());
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        // Only `writeback` is writable in virtio-blk, and only with CONFIG_WCE, not offered.
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "config space is read-only"))
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> std::io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.backend_req.lock().unwrap_or_else(|p| p.into_inner()) = Some(backend);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.queue_masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: the frontend must find every accepted request in the used ring.
        let Some(queue) = self.queues.get(queue_index as usize) else { return Ok(()) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while queue.in_flight.load(Ordering::Acquire) != 0 {
            if Instant::now() > deadline {
                tracing::error!(volume = %self.config.name, queue = queue_index, "requests still in flight after 30 s at GET_VRING_BASE");
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "requests still in flight"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], thread_id: usize) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(poller) = self.pollers.get(thread_id) else { return Ok(()) };
        let mut poller = poller.lock().unwrap_or_else(|p| p.into_inner());
        if u64::from(device_event) == self.completion_event_id() {
            poller.consume_completion_event();
        }
        // Never an Err: the framework ends the worker thread on one, and a guest's mistake
        // must not stop the queue.
        poller.run(self, vrings);
        Ok(())
    }
}
