//! The seam between the cluster volume manager and replicated volumes: attaching claims the
//! volume in etcd and starts its vhost-user export; the handle resizes, reports the owner's
//! status, detaches (releasing ownership) or stops (keeping it). The manager's logic is tested
//! against fakes of these traits (`backend/tests/cluster_control.rs`), since a real attach
//! needs the volume's replicas up.
//!
//! [`ReplicatedAttacher`] is the real one: [`ReplicatedVolume::attach`], then an export of it
//! through an [`Exporter`] (vhost-user in the daemon).

use std::sync::Arc;
use std::time::Duration;

use replication::owner::{OwnerConfig, SyncProgress};

use super::exporter::{ExportHandle, Exporter};
use super::Error;
use crate::cluster::MetaStore;
use crate::member::Members;
use crate::replicated::{AttachConfig, DetachError, LeaseClock, ReplicatedVolume, VolumeStatus};
use crate::ExportConfig;

/// How long an attach waits for the claim, the members' promises and the first membership
/// changes before it gives up (and releases what it claimed).
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a detach waits for the guest's requests in flight.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(30);

pub trait Attacher {
    type Handle: AttachedVolume;
    /// Claims volume `name` for this node (its generation + 1, owner = this node) and serves it
    /// on `export.socket_path`. On failure nothing is left running here, and a claim that was
    /// made is released. `takeover_of`: the other node the caller found owning it and agreed
    /// to take it from (down, or forced); a volume owned by any other node is refused.
    fn attach(&self, name: &str, export: ExportConfig, takeover_of: Option<&str>) -> Result<Self::Handle, Error>;
}

/// A volume this node owns and exports.
/// `Send`: a daemon that stops stops its exports side by side (their drains overlap).
pub trait AttachedVolume: Send {
    /// Grows the export to the size the document already holds (the manager commits it
    /// first) and tells a connected guest.
    fn resize(&self, new_size_bytes: u64) -> Result<(), crate::Error>;
    fn is_connected(&self) -> bool;
    /// Guest requests the export refused since the attach.
    fn rejected_requests(&self) -> u64;
    fn status(&self) -> OwnerStatus;
    /// Stops the export (its requests in flight finish first), then releases the volume in
    /// etcd (owner none). A volume that another node took over meanwhile has nothing to
    /// release: that is not an error.
    fn detach(self) -> Result<(), Error>;
    /// Stops the export and the replication client; the ownership stays in etcd, so the next
    /// start of this daemon attaches the volume again (daemon shutdown, forced delete).
    fn stop(self);
}

/// What the control plane needs of the owner's view of its volume
/// ([`crate::replicated::VolumeStatus`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerStatus {
    /// `attaching`, `serving`, `detaching`, `detached` or `fenced: REASON`.
    pub phase: String,
    pub generation: u64,
    /// Of the document the owner last committed or read; 0 before it read one.
    pub epoch: u32,
    /// The size in that document: a size grown by another node's `volume resize` shows here
    /// within the owner's metadata poll, and the manager then grows the export.
    pub size_bytes: Option<u64>,
    pub region_bytes: u64,
    pub suspended_extents: Vec<u32>,
    pub unreconciled_regions: u32,
    pub syncs: Vec<SyncProgress>,
}

impl From<VolumeStatus> for OwnerStatus {
    fn from(s: VolumeStatus) -> Self {
        Self {
            phase: s.phase,
            generation: s.generation,
            epoch: s.meta.as_ref().map_or(0, |m| m.epoch),
            size_bytes: s.meta.as_ref().map(|m| m.size_bytes),
            region_bytes: s.meta.as_ref().map_or(0, |m| m.region_bytes),
            suspended_extents: s.suspended_extents,
            unreconciled_regions: s.unreconciled_regions,
            syncs: s.syncs,
        }
    }
}

/// The daemon's settings for the owners it runs (`hcblk daemon --io-timeout --replace-after
/// --resync-rate`); the rest of [`OwnerConfig`] keeps its defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerSettings {
    /// A replica that has not answered a request after this long is failed. Default 5 s.
    pub io_timeout: Duration,
    /// A member whose node has been gone from etcd this long is replaced. Default 10 min.
    pub replace_after: Duration,
    /// Resync and rebuild rate limit per volume, bytes per second (0: unlimited). Default
    /// 64 MiB/s.
    pub resync_bytes_per_s: u64,
}

impl Default for OwnerSettings {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(5),
            replace_after: Duration::from_secs(600),
            resync_bytes_per_s: 64 << 20,
        }
    }
}

impl OwnerSettings {
    pub fn owner_config(&self, node: &str, volume: &str) -> OwnerConfig {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut config = OwnerConfig::new(node, volume);
        config.io_timeout = nanos(self.io_timeout);
        config.replace_after = nanos(self.replace_after);
        config.copy_bytes_per_s = self.resync_bytes_per_s;
        config
    }
}

/// Attaches replicated volumes for real: the daemon's.
pub struct ReplicatedAttacher<E> {
    pub node: String,
    pub meta: Arc<dyn MetaStore>,
    pub members: Arc<Members>,
    pub transport: proto::Config,
    /// `Tcp` or `Rdma`, already resolved.
    pub kind: proto::TransportKind,
    pub owner: OwnerSettings,
    /// The node registration's [`valid_until`](crate::cluster::NodeRegistration::valid_until).
    pub lease: Option<LeaseClock>,
    pub exporter: E,
}

impl<E: Exporter<ReplicatedVolume>> Attacher for ReplicatedAttacher<E> {
    type Handle = ReplicatedHandle<E::Handle>;

    fn attach(&self, name: &str, export: ExportConfig, takeover_of: Option<&str>) -> Result<Self::Handle, Error> {
        let mut owner = self.owner.owner_config(&self.node, name);
        owner.takeover_of = takeover_of.map(str::to_owned);
        let config = AttachConfig {
            node: self.node.clone(),
            volume: name.to_owned(),
            meta: Arc::clone(&self.meta),
            members: Arc::clone(&self.members),
            transport: self.transport.clone(),
            kind: self.kind,
            owner,
            lease: self.lease.clone(),
            attach_timeout: ATTACH_TIMEOUT,
        };
        let volume = ReplicatedVolume::attach(config)
            .map_err(|e| Error::Attach { name: name.to_owned(), source: Box::new(e) })?;
        match self.exporter.start(export, Arc::clone(&volume)) {
            Ok(export) => Ok(ReplicatedHandle { volume, export }),
            Err(source) => {
                // Nothing serves it here: give the claim back rather than leave a volume owned
                // by a node that does not export it.
                if let Err(e) = volume.detach(DETACH_TIMEOUT) {
                    tracing::warn!(volume = name, error = %super::chain(&e), "cannot release a volume whose export failed");
                }
                Err(Error::Export { name: name.to_owned(), source })
            }
        }
    }
}

pub struct ReplicatedHandle<H> {
    volume: Arc<ReplicatedVolume>,
    export: H,
}

impl<H: ExportHandle> AttachedVolume for ReplicatedHandle<H> {
    fn resize(&self, new_size_bytes: u64) -> Result<(), crate::Error> {
        self.export.resize(new_size_bytes)
    }

    fn is_connected(&self) -> bool {
        self.export.is_connected()
    }

    fn rejected_requests(&self) -> u64 {
        self.export.rejected_requests()
    }

    fn status(&self) -> OwnerStatus {
        self.volume.status().into()
    }

    fn detach(self) -> Result<(), Error> {
        let name = self.volume.name().to_owned();
        self.export.stop();
        match self.volume.detach(DETACH_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(DetachError::Fenced(why)) => {
                tracing::warn!(volume = %name, reason = %why, "detached a volume another node had taken over");
                Ok(())
            }
            Err(e) => Err(Error::Detach { name, source: Box::new(e) }),
        }
    }

    fn stop(self) {
        self.export.stop();
        // The last reference: the replication client stops without releasing the volume.
        drop(self.volume);
    }
}
