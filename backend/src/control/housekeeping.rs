//! A cluster daemon's background work beside the API: the replica garbage collection (every
//! [`GC_EVERY`]: each volume this node holds replicas of is looked up in etcd by id, and its
//! current document, or its absence, handed to the replica service, which drops extents it no
//! longer holds) and the free-space update of the node's registration (every
//! [`FREE_SPACE_EVERY`], written only when it changed).
//!
//! One thread, `hcblk-housekeeping`; it blocks on etcd (bounded by the request timeout), never
//! on the API's main thread.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replication::{NodeInfo, VolumeMeta};

use super::Error;
use crate::cluster::{MetaError, MetaStore, NodeRegistration};
use crate::member::Members;

pub const GC_EVERY: Duration = Duration::from_secs(5);
pub const FREE_SPACE_EVERY: Duration = Duration::from_secs(10);

/// What housekeeping needs of the replica service ([`Members`]).
pub trait ReplicaHost: Send + Sync {
    /// Volume ids this node holds replicas of.
    fn held_volumes(&self) -> Vec<u64>;
    /// The volume's current document; `None`: it was deleted.
    fn on_layout(&self, volume: u64, meta: Option<&VolumeMeta>);
    /// Bytes allocated to replicas on this node's disk.
    fn used_bytes(&self) -> u64;
}

impl ReplicaHost for Members {
    fn held_volumes(&self) -> Vec<u64> {
        Members::held_volumes(self)
    }
    fn on_layout(&self, volume: u64, meta: Option<&VolumeMeta>) {
        Members::on_layout(self, volume, meta);
    }
    fn used_bytes(&self) -> u64 {
        Members::used_bytes(self)
    }
}

/// One garbage-collection round: every held volume's document, by id, handed to `host`.
/// Only an answer from etcd counts: a volume whose lookup fails is skipped (never reported as
/// deleted), and the round stops at the first [`MetaError::Unavailable`]. Returns how many
/// volumes were looked at.
pub fn collect_garbage(meta: &dyn MetaStore, host: &dyn ReplicaHost) -> Result<usize, MetaError> {
    let mut seen = 0;
    for id in host.held_volumes() {
        match meta.read_volume_by_id(id) {
            Ok(doc) => {
                if doc.is_none() {
                    tracing::info!(volume_id = id, "volume deleted: dropping its replicas here");
                }
                host.on_layout(id, doc.as_ref());
                seen += 1;
            }
            Err(e @ MetaError::Unavailable(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(volume_id = id, error = %super::chain(&e), "cannot read the volume's document; its replicas stay")
            }
        }
    }
    Ok(seen)
}

/// The node's registration value with `free_bytes` = capacity − what replicas use.
pub fn node_value(template: &NodeInfo, used_bytes: u64) -> Vec<u8> {
    let info = NodeInfo { free_bytes: template.capacity_bytes.saturating_sub(used_bytes), ..template.clone() };
    // Plain data with string keys: serialisation cannot fail.
    serde_json::to_vec(&info).unwrap_or_default()
}

/// The running housekeeping thread; dropping it stops it.
pub struct Housekeeping {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Housekeeping {
    pub fn start(
        meta: Arc<dyn MetaStore>,
        host: Arc<dyn ReplicaHost>,
        registration: Arc<NodeRegistration>,
        template: NodeInfo,
    ) -> Result<Self, Error> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hcblk-housekeeping".into())
            .spawn(move || run(&*meta, &*host, &registration, &template, &stopped))
            .map_err(Error::io("start the housekeeping thread"))?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Housekeeping {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    meta: &dyn MetaStore,
    host: &dyn ReplicaHost,
    registration: &NodeRegistration,
    template: &NodeInfo,
    stopped: &mpsc::Receiver<()>,
) {
    let mut next_gc = Instant::now() + GC_EVERY;
    let mut next_free = Instant::now() + FREE_SPACE_EVERY;
    let mut last_value = node_value(template, host.used_bytes());
    loop {
        let wait = next_gc.min(next_free).saturating_duration_since(Instant::now());
        match stopped.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Stopped (the sender is dropped).
            _ => return,
        }
        let now = Instant::now();
        if now >= next_gc {
            if let Err(e) = collect_garbage(meta, host) {
                tracing::debug!(error = %super::chain(&e), "replica garbage collection postponed");
            }
            next_gc = Instant::now() + GC_EVERY;
        }
        if now >= next_free {
            let value = node_value(template, host.used_bytes());
            if value != last_value {
                registration.update(value.clone());
                last_value = value;
            }
            next_free = Instant::now() + FREE_SPACE_EVERY;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use replication::{ExtentMeta, Locality, Member, MemberState};

    use super::*;
    use crate::cluster::MemoryMeta;

    #[derive(Default)]
    struct FakeHost {
        held: Vec<u64>,
        layouts: Mutex<Vec<(u64, Option<u64>)>>,
    }

    impl ReplicaHost for FakeHost {
        fn held_volumes(&self) -> Vec<u64> {
            self.held.clone()
        }
        fn on_layout(&self, volume: u64, meta: Option<&VolumeMeta>) {
            self.layouts.lock().unwrap().push((volume, meta.map(|m| m.size_bytes)));
        }
        fn used_bytes(&self) -> u64 {
            7
        }
    }

    fn doc(name: &str, id: u64) -> VolumeMeta {
        VolumeMeta {
            format: replication::meta::META_FORMAT,
            name: name.into(),
            id,
            size_bytes: 16 << 20,
            block_size: 512,
            extent_bytes: 16 << 20,
            region_bytes: 1 << 20,
            replicas: 1,
            min_replicas: 1,
            queues: 1,
            serial: name.into(),
            read_only: false,
            locality: Locality::Prefer,
            created_unix_s: 0,
            generation: 0,
            owner: None,
            epoch: 1,
            extents: vec![ExtentMeta { members: vec![Member::new("n1", MemberState::InSync)] }],
            risk_accepted: None,
        }
    }

    #[test]
    fn held_volumes_get_their_document_or_none_and_an_outage_drops_nothing() {
        let meta = MemoryMeta::new();
        meta.put_volume(doc("a", 1));
        let host = FakeHost { held: vec![1, 2], ..FakeHost::default() };
        assert_eq!(collect_garbage(&meta, &host).unwrap(), 2);
        assert_eq!(*host.layouts.lock().unwrap(), vec![(1, Some(16 << 20)), (2, None)]);

        host.layouts.lock().unwrap().clear();
        meta.set_down(true);
        assert!(matches!(collect_garbage(&meta, &host), Err(MetaError::Unavailable(_))));
        assert!(host.layouts.lock().unwrap().is_empty(), "etcd down is not 'deleted'");
    }

    #[test]
    fn free_space_is_capacity_minus_used() {
        let template = NodeInfo {
            name: "n1".into(),
            id: replication::node_id("n1"),
            address: "10.0.0.1:7400".into(),
            zone: Some("z".into()),
            capacity_bytes: 100,
            free_bytes: 0,
            version: "v".into(),
            started_unix_s: 1,
        };
        let info: NodeInfo = serde_json::from_slice(&node_value(&template, 30)).unwrap();
        assert_eq!(info, NodeInfo { free_bytes: 70, ..template.clone() });
        let info: NodeInfo = serde_json::from_slice(&node_value(&template, 300)).unwrap();
        assert_eq!(info.free_bytes, 0);
    }
}
