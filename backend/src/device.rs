//! The vhost-user-blk device a frontend (QEMU, libblkio) negotiates with.
//!
//! One `BlkDevice` lives for one frontend connection: a reconnecting frontend gets a fresh
//! device (fresh vrings, fresh poller state) over the same volume. Queue state is per poller
//! thread; nothing on the per-request path is shared by all queues. The device knows its
//! volume only as a [`Volume`]: geometry for the config space, one queue per poller thread,
//! and the guest memory table, which it hands on whenever the frontend changes it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::inflight::{self, InflightRegion};
use crate::poller::{GuestMemAtomic, PollConfig, PollContext, Poller, QueueShared, Rejections, Vring};
use crate::request::{Limits, ID_BYTES, SECTOR_SHIFT};
use crate::volume::{GuestMem, Volume};
use crate::Error;

/// Discard and write-zeroes: one segment of at most 2 GiB per request.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most data descriptors per request we accept (config `seg_max`): QEMU's long-standing value,
/// a 128-entry ring less the header and status descriptors.
pub const SEG_MAX: u32 = 126;
/// Largest data descriptor we accept (config `size_max`): 4 MiB, the replication wire's
/// largest remote segment. A guest buffer that lies in one guest memory region then always
/// fits one remote segment, so a replicated volume never has to cut a guest buffer, only
/// requests (at extent boundaries, and into wire-sized pieces: 128 remote segments, 16 MiB per
/// descriptor). It also bounds how many memory regions a segment can touch, which sizes the
/// poller's iovec arrays (see `poller::IOVECS_PER_REQUEST_MAX`). The largest request a guest
/// may send is `SEG_MAX` × `SIZE_MAX` = 504 MiB.
pub const SIZE_MAX: u32 = 4 << 20;
/// Above this many guest memory regions in one `SIZE_MAX` window, a request whose segments all
/// cross that window could need more iovecs than one submission carries (126 × 8 = 1008 <=
/// 1024): the device warns when a memory table exceeds it.
const REGIONS_PER_SEGMENT_MAX: usize = 8;

/// What a device needs to know about the volume it serves.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub name: String,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; ID_BYTES],
    pub poll: PollConfig,
    /// Counts (and rate-limits the logs of) the guest requests the volume refuses; shared by
    /// every connection to the volume.
    pub rejections: Arc<Rejections>,
}

pub struct BlkDevice<V: Volume> {
    num_queues: u16,
    queue_size: u16,
    volume: Arc<V>,
    /// Which queues each poller thread serves (bit i = queue i).
    queue_masks: Vec<u64>,
    pollers: Vec<Mutex<Poller<V::Queue>>>,
    /// Shared with the pollers: counters, stop flag, limits, identity.
    ctx: PollContext,
    mem: RwLock<Option<GuestMemAtomic>>,
    acked_features: AtomicU64,
    backend_req: Mutex<Option<Backend>>,
    /// The inflight region the frontend set (SET_INFLIGHT_FD), used by vrings started after.
    inflight: Mutex<Option<Arc<InflightRegion>>>,
}

impl<V: Volume> BlkDevice<V> {
    pub fn new(config: DeviceConfig, volume: Arc<V>) -> Result<Self, Error> {
        if config.num_queues == 0 || config.num_queues > 64 {
            return Err(Error::Config(format!("{} queues: between 1 and 64 are supported", config.num_queues)));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size < 4 {
            return Err(Error::Config(format!("queue size {} is not a power of two >= 4", config.queue_size)));
        }
        let threads = if config.poll.one_poller {
            1
        } else if config.poll.cpus.is_empty() {
            config.num_queues as usize
        } else {
            config.poll.cpus.len().min(config.num_queues as usize)
        };
        let mut queue_masks = vec![0u64; threads];
        for queue in 0..config.num_queues as usize {
            queue_masks[queue % threads] |= 1 << queue;
        }
        // A volume queue deep enough for every descriptor of every virtqueue a thread serves,
        // up to the deepest a volume queue may be: a thread serving more virtqueues than that
        // leaves the rest in the avail rings until requests complete (the poller stops taking
        // requests while its volume queue is full).
        let mut pollers = Vec::with_capacity(threads);
        for (thread, mask) in queue_masks.iter().enumerate() {
            let depth = (u32::from(config.queue_size) * mask.count_ones()).min(replica::ShardQueue::DEPTH_MAX);
            let queue = volume.new_queue(depth)?;
            let cpu = config.poll.cpus.get(thread).copied();
            pollers.push(Mutex::new(Poller::new(queue, *mask, cpu, config.queue_size, SEG_MAX)));
        }
        let ctx = PollContext {
            name: config.name,
            serial: config.serial,
            poll: config.poll,
            limits: Limits {
                // Read from the volume on every pass instead.
                capacity_sectors: 0,
                read_only: volume.read_only(),
                seg_max: SEG_MAX,
                size_max: SIZE_MAX,
                max_discard_sectors: MAX_DISCARD_SECTORS,
                max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            },
            queues: (0..config.num_queues).map(|_| QueueShared::default()).collect(),
            stopping: AtomicBool::new(false),
            completed: AtomicU64::new(0),
            rejections: config.rejections,
        };
        Ok(Self {
            num_queues: config.num_queues,
            queue_size: config.queue_size,
            volume,
            queue_masks,
            pollers,
            ctx,
            mem: RwLock::new(None),
            acked_features: AtomicU64::new(0),
            backend_req: Mutex::new(None),
            inflight: Mutex::new(None),
        })
    }

    /// Requests completed on this connection.
    pub fn completed_requests(&self) -> u64 {
        self.ctx.completed.load(Ordering::Relaxed)
    }

    /// The eventfd that wakes poller `thread` when its volume queue completes requests, and
    /// the epoll id to register it under (ids up to `num_queues` belong to the framework).
    pub(crate) fn completion_event(&self, thread: usize) -> Option<(std::os::fd::RawFd, u64)> {
        let poller = self.pollers.get(thread)?.lock().unwrap_or_else(|p| p.into_inner());
        poller.completion_eventfd().map(|fd| (fd, self.completion_event_id()))
    }

    fn completion_event_id(&self) -> u64 {
        u64::from(self.num_queues) + 1
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
        self.ctx.stopping.store(true, Ordering::Release);
    }

    /// Graceful stop, while the frontend is still connected: the pollers take no new request,
    /// and this returns once every request they had taken is in the used ring, the guest
    /// interrupted for it, or at `deadline`. Returns whether everything was drained; what was
    /// not stays marked in the frontend's inflight region for the next daemon to resubmit.
    ///
    /// A poller finishes its requests when it runs next: a running one sees `stopping` within
    /// a few passes, a sleeping one with requests in flight is woken by their completion; once
    /// stopping, it only drains (`Poller::run`). So a poller found idle (its lock free) with
    /// nothing in flight on its queues after the flag was set never takes a request again.
    pub(crate) fn drain(&self, deadline: Instant) -> bool {
        self.ctx.stopping.store(true, Ordering::SeqCst);
        let mut busy: Vec<usize> = (0..self.pollers.len()).collect();
        loop {
            busy.retain(|&thread| {
                let Some(poller) = self.pollers.get(thread) else { return false };
                let _idle = match poller.try_lock() {
                    Ok(guard) => guard,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return true,
                };
                let mask = self.queue_masks.get(thread).copied().unwrap_or(0);
                self.ctx
                    .queues
                    .iter()
                    .enumerate()
                    .any(|(queue, shared)| mask & (1 << queue) != 0 && shared.in_flight.load(Ordering::Acquire) != 0)
            });
            if busy.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The connection is over and its worker threads are gone: lets requests still in flight
    /// finish (a frontend that vanished never asked for them back), then tells the volume the
    /// guest memory is gone.
    pub(crate) fn disconnected(&self) {
        for poller in &self.pollers {
            let abandoned = poller.lock().unwrap_or_else(|p| p.into_inner()).abandon(&self.ctx);
            if abandoned > 0 {
                tracing::warn!(volume = %self.ctx.name, abandoned, "requests were still in flight when the connection ended");
            }
        }
        self.ctx.rejections.flush(&self.ctx.name);
        let had_memory = self.mem.write().unwrap_or_else(|p| p.into_inner()).take().is_some();
        if had_memory {
            if let Err(e) = self.volume.guest_memory_changed(None) {
                tracing::warn!(volume = %self.ctx.name, error = %e, "the volume could not release the guest memory");
            }
        }
    }

    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let capacity = self.volume.capacity_bytes() >> SECTOR_SHIFT;
        let block_size = self.volume.block_size();
        let physical = self.volume.physical_block_bytes().max(block_size);
        let physical_exp = (physical / block_size).trailing_zeros() as u8;
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20): not offered.
        c[20..24].copy_from_slice(&block_size.to_le_bytes());
        c[24] = physical_exp;
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size, in logical blocks
        c[28..32].copy_from_slice(&0u32.to_le_bytes()); // opt_io_size
        c[32] = 1; // writeback: the guest must FLUSH for durability
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&(block_size >> SECTOR_SHIFT).to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

/// The most regions of `mem` that one range of `window` bytes can touch: regions separated by
/// a gap in guest-physical space never share a valid buffer.
fn regions_per_window(mem: &GuestMem, window: u64) -> usize {
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.last_addr().0)).collect();
    let mut most = 0;
    for (first, &(_, first_last)) in regions.iter().enumerate() {
        // A range starting at the last byte of `first` reaches furthest.
        let reach = first_last.saturating_add(window.saturating_sub(1));
        let mut last = first_last;
        let mut touched = 1;
        for &(next_start, next_last) in &regions[first + 1..] {
            if last.checked_add(1) != Some(next_start) || next_start > reach {
                break;
            }
            touched += 1;
            last = next_last;
        }
        most = most.max(touched);
    }
    most
}

impl<V: Volume> VhostUserBackend for BlkDevice<V> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size as usize
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.volume.read_only() {
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
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The framework applies it to every vring's queue, which is where the poller uses it.
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
        let table = mem.memory().into_inner();
        let regions = regions_per_window(&table, u64::from(SIZE_MAX));
        if regions > REGIONS_PER_SEGMENT_MAX {
            tracing::warn!(
                volume = %self.ctx.name,
                regions,
                "one {SIZE_MAX}-byte window of guest memory spans {regions} memory regions: requests whose \
                 buffers cross more than {REGIONS_PER_SEGMENT_MAX} regions each may be refused"
            );
        }
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        self.volume.guest_memory_changed(Some(&table)).map_err(std::io::Error::other)
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

    fn get_inflight_fd(&self, request: &VhostUserInflight) -> std::io::Result<(VhostUserInflight, std::fs::File)> {
        match InflightRegion::create(request, self.num_queues, self.queue_size) {
            Ok((region, file)) => {
                tracing::info!(
                    volume = %self.ctx.name,
                    queues = region.num_queues,
                    queue_size = region.queue_size,
                    bytes = region.mmap_size,
                    "inflight region created"
                );
                Ok((region, file))
            }
            Err(e) => {
                tracing::error!(volume = %self.ctx.name, error = %e, "GET_INFLIGHT_FD refused; closing the connection");
                Err(e.into())
            }
        }
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: std::fs::File) -> std::io::Result<()> {
        match InflightRegion::open(msg, file, self.num_queues, self.queue_size) {
            Ok(region) => {
                tracing::debug!(volume = %self.ctx.name, queues = region.num_queues(), queue_size = region.queue_size(), "inflight region set");
                *self.inflight.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
                Ok(())
            }
            Err(e) => {
                tracing::error!(volume = %self.ctx.name, error = %e, "SET_INFLIGHT_FD refused; closing the connection");
                Err(e.into())
            }
        }
    }

    fn start_vring(&self, queue_index: u32, vring: &Vring) -> std::io::Result<()> {
        let Some(shared) = self.ctx.queues.get(queue_index as usize) else { return Ok(()) };
        let region = self.inflight.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(region) = region else {
            // No region set: requests are not tracked on this queue.
            shared.inflight.publish(inflight::QueueTracker::default());
            return Ok(());
        };
        let Some(mem) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            tracing::error!(volume = %self.ctx.name, queue = queue_index, "vring started before any memory table; closing the connection");
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "vring started before any memory table"));
        };
        let mut state = vring.get_mut();
        let table = mem.memory();
        let (tracker, recovered) = match inflight::recover(&region, queue_index, state.get_queue_mut(), &table) {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(volume = %self.ctx.name, queue = queue_index, error = %e, "inflight recovery refused; closing the connection");
                return Err(e.into());
            }
        };
        if recovered.resubmitted > 0 || recovered.last_batch > 0 {
            tracing::info!(
                volume = %self.ctx.name,
                queue = queue_index,
                resubmitted = recovered.resubmitted,
                out_of_ring_order = recovered.out_of_ring_order,
                completed_at_crash = recovered.last_batch,
                next_avail = virtio_queue::QueueT::next_avail(state.get_queue()),
                "recovered inflight requests"
            );
        }
        shared.inflight.publish(tracker);
        if let Some(kick) = state.get_kick() {
            if let Err(e) = inflight::kick(std::os::fd::AsRawFd::as_raw_fd(kick)) {
                tracing::warn!(volume = %self.ctx.name, queue = queue_index, error = %e, "cannot kick the restarted queue");
            }
        }
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: the frontend must find every accepted request in the used ring.
        let Some(queue) = self.ctx.queues.get(queue_index as usize) else { return Ok(()) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while queue.in_flight.load(Ordering::Acquire) != 0 {
            if Instant::now() > deadline {
                tracing::error!(volume = %self.ctx.name, queue = queue_index, "requests still in flight after 30 s at GET_VRING_BASE");
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "requests still in flight"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(poller) = self.pollers.get(thread_id) else { return Ok(()) };
        let mut poller = poller.lock().unwrap_or_else(|p| p.into_inner());
        if u64::from(device_event) == self.completion_event_id() {
            poller.consume_completion_event();
        }
        let Some(mem) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else { return Ok(()) };
        // Never an Err: the framework ends the worker thread on one, and a guest's mistake
        // must not stop the queue.
        poller.run(&self.ctx, &*self.volume, vrings, &mem);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    const K: u64 = 4096;
    const M: u64 = 1 << 20;

    fn table(ranges: &[(u64, u64)]) -> GuestMem {
        let ranges: Vec<(GuestAddress, usize)> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l as usize)).collect();
        GuestMem::from_ranges(&ranges).expect("valid test layout")
    }

    #[test]
    fn regions_per_window_counts_the_adjacent_regions_one_range_can_touch() {
        assert_eq!(regions_per_window(&table(&[(0, M)]), u64::from(SIZE_MAX)), 1);
        let two = table(&[(0, M), (M, M)]);
        assert_eq!(regions_per_window(&two, 1), 1);
        assert_eq!(regions_per_window(&two, 2), 2);
        // A gap in guest-physical space: no valid buffer spans it.
        assert_eq!(regions_per_window(&table(&[(0, M), (M + K, M)]), u64::from(SIZE_MAX)), 1);
        // Large | nine 4 KiB regions | large.
        let mut ranges = vec![(0, M)];
        ranges.extend((0..9).map(|i| (M + i * K, K)));
        ranges.push((M + 9 * K, M));
        let small = table(&ranges);
        assert_eq!(regions_per_window(&small, u64::from(SIZE_MAX)), 11);
        assert_eq!(regions_per_window(&small, 9 * K + 2), 11);
        assert_eq!(regions_per_window(&small, 9 * K + 1), 10);
        assert_eq!(regions_per_window(&small, 2 * K), 3);
        // Regions of at least SIZE_MAX: a segment touches at most two, what slots start with.
        let large = table(&[(0, 4 * M), (4 * M, 4 * M), (8 * M, 4 * M)]);
        assert_eq!(regions_per_window(&large, u64::from(SIZE_MAX)), 2);
    }
}
