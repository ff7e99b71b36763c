//! The cluster volume manager: the daemon's volumes when it runs in cluster mode. Volume
//! documents live in etcd ([`EtcdMeta`]); any node's daemon creates, lists, resizes, deletes
//! and describes any volume, and attaches (owns and exports) volumes on its own node through
//! an [`Attacher`].
//!
//! Every operation checks what it can before it writes, and writes once: one etcd transaction
//! (create: the document and its id index; delete: both and the published status; accept-risk:
//! the document and an audit record). Read-modify-write goes through compare-and-swap on the
//! revision read, retried from a fresh read when the volume's owner changed it meanwhile (it
//! changes membership on its own), at most [`CAS_ATTEMPTS`] times. A refused request writes
//! nothing.
//!
//! Periodic work ([`ClusterVolumes::tick`], every [`TICK`] on the daemon's main thread): for
//! each volume attached here, grow the export when the document grew (a `volume resize` on
//! another node), and publish the owner's status under `status/<name>` when it changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replication::owner::SyncProgress;
use replication::placement::{self, PlacementRequest};
use replication::{NodeInfo, RiskAcceptance, VolumeMeta};

use super::api::{
    ClusterStatus, ClusterSync, ClusterVolumeInfo, CreateRequest, MemberInfo, NodeEntry, VolumeBacking, VolumeInfo,
    VolumeState,
};
use super::attach::{AttachedVolume, Attacher, OwnerStatus};
use super::exporter::stop_side_by_side;
use super::store::{self, BackingType, EXTENT_BYTES_DEFAULT, REGION_BYTES};
use super::units::format_rfc3339_nanos;
use super::volumes::{check_socket_path, remove_stale_socket, QUEUE_SIZE};
use super::Error;
use crate::cluster::{
    keys, CreateVolume, EtcdMeta, LeaseId, MetaError, MetaStore, MetaWrite, NodeRegistration, Op, PublishedStatus,
    PublishedSync, VOLUME_DOC_BYTES_MAX,
};
use crate::{ExportConfig, PollConfig};

/// Default replicas of a cluster volume.
pub const REPLICAS_DEFAULT: u8 = 3;
/// How often the manager's periodic work runs.
pub const TICK: Duration = Duration::from_secs(2);
/// Compare-and-swap attempts of one operation before it gives up ([`Error::Contended`]).
pub const CAS_ATTEMPTS: u32 = 8;
/// Attempts to find an unused random volume id (a collision is a 2^-64 event; this bounds a
/// broken random source).
const ID_ATTEMPTS: u32 = 8;
/// Longest `accept-risk --reason`, in bytes.
pub const REASON_BYTES_MAX: usize = 1024;
/// Longest `by` of an accept-risk (user@host).
const BY_BYTES_MAX: usize = 256;

/// The cluster manager's part of the daemon's configuration.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name.
    pub node: String,
    /// One vhost-user socket per attached volume, `SOCKET_DIR/NAME.sock`.
    pub socket_dir: PathBuf,
    /// The daemon's polling; a replicated volume gets exactly one poller thread, pinned to
    /// the next of `poll.cpus` in turn (unpinned if the list is empty).
    pub poll: PollConfig,
}

struct Attached<H> {
    handle: H,
    socket: PathBuf,
    /// The size the export serves; grown when the document grows.
    exported_bytes: u64,
    rates: SyncRates,
    /// What was last written to `status/<name>`.
    published: Option<PublishedStatus>,
    fenced_logged: bool,
}

pub struct ClusterVolumes<A: Attacher> {
    config: ClusterConfig,
    meta: EtcdMeta,
    attacher: A,
    registration: Arc<NodeRegistration>,
    next_cpu: usize,
    attached: BTreeMap<String, Attached<A::Handle>>,
    /// The lease the published statuses hang on: after a re-registration they are gone and
    /// are written again.
    published_lease: Option<LeaseId>,
    /// The volumes this node owned could not be listed at start: retried every tick.
    reattach_pending: bool,
}

impl<A: Attacher> ClusterVolumes<A> {
    pub fn new(config: ClusterConfig, meta: EtcdMeta, attacher: A, registration: Arc<NodeRegistration>) -> Self {
        Self {
            config,
            meta,
            attacher,
            registration,
            next_cpu: 0,
            attached: BTreeMap::new(),
            published_lease: None,
            reattach_pending: false,
        }
    }

    pub fn node(&self) -> &str {
        &self.config.node
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.config.socket_dir.join(format!("{name}.sock"))
    }

    /// Names of the volumes attached here.
    pub fn attached(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    /// Attaches again every volume whose document names this node as its owner (a restart
    /// keeps ownership; the VM's QEMU reconnects to the socket). Failures are logged, not
    /// fatal: this daemon also serves other owners' replicas. Returns how many were attached.
    pub fn reattach_owned(&mut self) -> usize {
        let docs = match self.meta.list_volumes() {
            Ok(docs) => docs,
            Err(e) => {
                tracing::error!(error = %super::chain(&e), "cannot list the volumes this node owns; retrying");
                self.reattach_pending = true;
                return 0;
            }
        };
        self.reattach_pending = false;
        let mut attached = 0;
        for (meta, _) in docs {
            if meta.owner.as_deref() != Some(self.config.node.as_str()) || self.attached.contains_key(&meta.name) {
                continue;
            }
            match self.attach(&meta.name, false) {
                Ok(info) => {
                    attached += 1;
                    let socket = info.socket.map(|s| s.display().to_string()).unwrap_or_default();
                    tracing::info!(volume = %meta.name, socket, "owned before the restart: attached again");
                }
                Err(e) => {
                    tracing::error!(volume = %meta.name, error = %super::chain(&e),
                        "owned before the restart, but cannot attach it again; `hcblk volume attach` retries")
                }
            }
        }
        attached
    }

    fn read(&self, name: &str) -> Result<(VolumeMeta, i64), Error> {
        store::validate_name(name)?;
        self.meta.read_volume(name)?.ok_or_else(|| Error::NoSuchVolume(name.to_owned()))
    }

    pub fn create(&mut self, request: CreateRequest) -> Result<VolumeInfo, Error> {
        let name = request.name.clone();
        store::validate_name(&name)?;
        store::validate_geometry(request.size_bytes, request.block_size, request.queues)?;
        let serial = request.serial.clone().unwrap_or_else(|| store::default_serial(&name));
        store::validate_serial(&serial)?;
        if request.backing != BackingType::File || request.path.is_some() {
            return Err(Error::Invalid(
                "--backing and --path are for standalone volumes: a cluster volume's replicas live in each \
                 member's data dir"
                    .into(),
            ));
        }
        let replicas = request.replicas.unwrap_or(REPLICAS_DEFAULT);
        if replicas == 0 || replicas > replication::meta::REPLICAS_MAX {
            return Err(Error::Invalid(format!(
                "--replicas {replicas} is out of range 1..={}",
                replication::meta::REPLICAS_MAX
            )));
        }
        let min_replicas = request.min_replicas.unwrap_or(replicas / 2 + 1);
        if min_replicas == 0 || min_replicas > replicas {
            return Err(Error::Invalid(format!("--min-replicas {min_replicas} is out of range 1..={replicas}")));
        }
        let extent_bytes = request.extent_bytes.unwrap_or(EXTENT_BYTES_DEFAULT);
        store::validate_extent_bytes(extent_bytes)?;
        if self.meta.read_volume(&name)?.is_some() {
            return Err(Error::VolumeExists(name));
        }
        let docs = self.meta.list_volumes()?;
        let nodes = self.placement_nodes(&docs)?;
        let locality = request.locality.unwrap_or_default();
        let mut meta = VolumeMeta {
            format: replication::meta::META_FORMAT,
            name: name.clone(),
            id: u64::MAX,
            size_bytes: request.size_bytes,
            block_size: request.block_size,
            extent_bytes,
            region_bytes: REGION_BYTES,
            replicas,
            min_replicas,
            queues: request.queues,
            serial,
            read_only: request.read_only,
            locality,
            created_unix_s: now_unix_s(),
            generation: 0,
            owner: None,
            epoch: 1,
            extents: Vec::new(),
            risk_accepted: None,
        };
        check_doc_capacity(
            &meta,
            request.size_bytes.div_ceil(extent_bytes),
            &nodes,
            "create it with a larger --extent-size",
        )?;
        meta.extents = placement::place(
            &PlacementRequest {
                size_bytes: request.size_bytes,
                extent_bytes,
                replicas,
                locality,
                local: Some(&self.config.node),
            },
            &nodes,
        )
        .map_err(Error::Placement)?;
        meta.validate().map_err(Error::Invalid)?;
        // What the answer shows: the document as created, the nodes as listed for placement.
        let up: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
        for _ in 0..ID_ATTEMPTS {
            meta.id = random_nonzero_u64()?;
            match self.meta.create_volume(&meta) {
                Ok(CreateVolume::Created { .. }) => {
                    tracing::info!(volume = %name, id = meta.id, size_bytes = meta.size_bytes, extents = meta.extents.len(),
                        replicas, min_replicas, "volume created");
                    return Ok(self.volume_info(&meta, &up, None, true));
                }
                Ok(CreateVolume::NameTaken) => return Err(Error::VolumeExists(name)),
                Ok(CreateVolume::IdTaken) => continue,
                Err(MetaError::Unavailable(cause)) => {
                    // It may have landed: our id in the document says it did.
                    if let Ok(Some((stored, _))) = self.meta.read_volume(&name) {
                        if stored.id == meta.id {
                            return Ok(self.volume_info(&stored, &up, None, true));
                        }
                    }
                    return Err(Error::Meta(MetaError::Unavailable(cause)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Invalid(format!("no unused volume id after {ID_ATTEMPTS} random draws")))
    }

    /// The registered nodes, with the free space placement may use: what each registered,
    /// but never more than its capacity minus the extents volume documents already place on
    /// it (replicas are sparse files; placement reserves their full size, so a node never
    /// runs out of space under extents it accepted).
    fn placement_nodes(&self, docs: &[(VolumeMeta, i64)]) -> Result<Vec<NodeInfo>, Error> {
        let mut nodes = self.meta.list_nodes()?;
        let reserved = reserved_bytes(docs.iter().map(|(m, _)| m));
        for n in &mut nodes {
            let r = reserved.get(&n.name).copied().unwrap_or(0);
            n.free_bytes = n.free_bytes.min(n.capacity_bytes.saturating_sub(r));
        }
        Ok(nodes)
    }

    pub fn info(&self, name: &str) -> Result<VolumeInfo, Error> {
        let (meta, _) = self.read(name)?;
        let up = self.up_nodes()?;
        let status = match self.attached.get(name) {
            Some(a) => Some(self.publishable(&a.handle.status(), &a.rates)),
            None if meta.owner.is_some() => match self.meta.read_status(name) {
                Ok(status) => status,
                Err(e) => {
                    tracing::warn!(volume = name, error = %super::chain(&e), "cannot read the owner's status");
                    None
                }
            },
            None => None,
        };
        Ok(self.volume_info(&meta, &up, status, true))
    }

    pub fn list(&self) -> Result<Vec<VolumeInfo>, Error> {
        let docs = self.meta.list_volumes()?;
        let up = self.up_nodes()?;
        let mut statuses = self.meta.list_statuses()?;
        Ok(docs
            .iter()
            .map(|(meta, _)| {
                let status = match self.attached.get(&meta.name) {
                    Some(a) => Some(self.publishable(&a.handle.status(), &a.rates)),
                    None => statuses.remove(&meta.name),
                };
                self.volume_info(meta, &up, status, false)
            })
            .collect())
    }

    fn up_nodes(&self) -> Result<BTreeSet<String>, Error> {
        Ok(self.meta.list_nodes()?.into_iter().map(|n| n.name).collect())
    }

    fn volume_info(
        &self,
        meta: &VolumeMeta,
        up: &BTreeSet<String>,
        status: Option<PublishedStatus>,
        with_extents: bool,
    ) -> VolumeInfo {
        let attached = self.attached.get(&meta.name);
        // A status left by an owner that is no longer the owner (taken over, lease still
        // alive) says nothing about the volume now.
        let status = status.filter(|s| meta.owner.as_deref() == Some(s.node.as_str()));
        let extents = if with_extents {
            meta.extents
                .iter()
                .map(|e| {
                    e.members
                        .iter()
                        .map(|m| MemberInfo { node: m.node.clone(), state: m.state, up: up.contains(&m.node) })
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        VolumeInfo {
            name: meta.name.clone(),
            size_bytes: meta.size_bytes,
            block_size: meta.block_size,
            queues: meta.queues,
            backing: VolumeBacking::Replicated,
            path: None,
            created_backing: false,
            read_only: meta.read_only,
            serial: meta.serial.clone(),
            created_unix_s: meta.created_unix_s,
            socket: attached.map(|a| a.socket.clone()),
            connected: attached.is_some_and(|a| a.handle.is_connected()),
            rejected_requests: attached.map_or(0, |a| a.handle.rejected_requests()),
            replicas: meta.replicas,
            min_replicas: meta.min_replicas,
            extent_bytes: meta.extent_bytes,
            generation: meta.generation,
            epoch: meta.epoch,
            cluster: Some(ClusterVolumeInfo {
                id: meta.id,
                locality: meta.locality,
                owner: meta.owner.clone(),
                owner_up: meta.owner.as_ref().is_some_and(|o| up.contains(o)),
                attached_here: attached.is_some(),
                state: volume_state(meta, status.as_ref()),
                risk_accepted: meta.risk_accepted.clone(),
                extents,
                status,
            }),
        }
    }

    /// Grow only. The document (size and the new extents, placed like a create's) is
    /// committed first; then, if the volume is attached here, the export grows and the guest
    /// is told. An owner elsewhere grows its export when its metadata poll reads the new size.
    pub fn resize(&mut self, name: &str, new_size_bytes: u64) -> Result<VolumeInfo, Error> {
        let mut committed = false;
        for _ in 0..CAS_ATTEMPTS {
            let (meta, revision) = self.read(name)?;
            if new_size_bytes < meta.size_bytes {
                return Err(Error::Shrink {
                    name: name.to_owned(),
                    current: meta.size_bytes,
                    requested: new_size_bytes,
                });
            }
            store::validate_geometry(new_size_bytes, meta.block_size, meta.queues)?;
            if new_size_bytes == meta.size_bytes {
                return self.info(name);
            }
            if meta.read_only {
                return Err(Error::Invalid(format!("volume {name} is read-only and cannot be resized")));
            }
            let grown = self.grown(&meta, new_size_bytes)?;
            match self.meta.write_volume(name, revision, &grown)? {
                MetaWrite::Committed { .. } => {
                    committed = true;
                    tracing::info!(
                        volume = name,
                        from_bytes = meta.size_bytes,
                        to_bytes = new_size_bytes,
                        extents = grown.extents.len(),
                        "volume resized in etcd"
                    );
                    break;
                }
                MetaWrite::Conflict(_) => continue,
            }
        }
        if !committed {
            return Err(Error::Contended { name: name.to_owned(), op: "resize" });
        }
        if let Some(a) = self.attached.get_mut(name) {
            if let Err(source) = a.handle.resize(new_size_bytes) {
                // The document holds the new size; the tick grows the export again later.
                return Err(Error::Resize { name: name.to_owned(), source });
            }
            a.exported_bytes = a.exported_bytes.max(new_size_bytes);
        }
        self.info(name)
    }

    /// `meta` grown to `new_size_bytes`, with members for the extents it gains, placed like a
    /// create's (anchored on the owner when it is up, else on this node).
    fn grown(&self, meta: &VolumeMeta, new_size_bytes: u64) -> Result<VolumeMeta, Error> {
        let mut grown = VolumeMeta { size_bytes: new_size_bytes, ..meta.clone() };
        let have = meta.extents.len() as u64;
        let need = new_size_bytes.div_ceil(meta.extent_bytes);
        if need > have {
            let docs = self.meta.list_volumes()?;
            let nodes = self.placement_nodes(&docs)?;
            check_doc_capacity(meta, need, &nodes, "it cannot grow this far with its extent size")?;
            let anchor = match meta.owner.as_deref() {
                Some(owner) if nodes.iter().any(|n| n.name == owner) => owner,
                _ => self.config.node.as_str(),
            };
            let tail = placement::place(
                &PlacementRequest {
                    size_bytes: new_size_bytes - have * meta.extent_bytes,
                    extent_bytes: meta.extent_bytes,
                    replicas: meta.replicas,
                    locality: meta.locality,
                    local: Some(anchor),
                },
                &nodes,
            )
            .map_err(Error::Placement)?;
            grown.extents.extend(tail);
            // New extents are new memberships.
            grown.epoch = grown.epoch.wrapping_add(1).max(1);
        }
        grown.validate().map_err(Error::Invalid)?;
        Ok(grown)
    }

    /// Refused while attached anywhere unless `force`. One transaction removes the document,
    /// its id index and the published status; each member's garbage collection then drops
    /// its replica data. A forced delete of a volume attached here stops its export after.
    pub fn delete(&mut self, name: &str, force: bool) -> Result<(), Error> {
        for _ in 0..CAS_ATTEMPTS {
            let (meta, revision) = self.read(name)?;
            if let Some(owner) = &meta.owner {
                if !force {
                    return Err(Error::Attached { name: name.to_owned(), node: owner.clone() });
                }
            }
            match self.meta.delete_volume(name, revision, meta.id)? {
                MetaWrite::Committed { .. } => {
                    tracing::info!(volume = name, id = meta.id, forced = force, "volume deleted");
                    if let Some(a) = self.attached.remove(name) {
                        a.handle.stop();
                        remove_stale_socket(&a.socket);
                    }
                    return Ok(());
                }
                MetaWrite::Conflict(_) => continue,
            }
        }
        Err(Error::Contended { name: name.to_owned(), op: "delete" })
    }

    /// Records the operator's acceptance of running below min_replicas in the document, and an
    /// audit record `audit/<name>/<time>` in the same transaction.
    pub fn accept_risk(&mut self, name: &str, reason: &str, by: &str) -> Result<VolumeInfo, Error> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > REASON_BYTES_MAX || reason.chars().any(char::is_control) {
            return Err(Error::Invalid(format!(
                "--reason must be 1 to {REASON_BYTES_MAX} bytes of text on one line (it is recorded for audit)"
            )));
        }
        if by.is_empty() || by.len() > BY_BYTES_MAX || by.chars().any(char::is_control) {
            return Err(Error::Invalid(format!("who accepts the risk ({by:?}) must be 1 to {BY_BYTES_MAX} bytes")));
        }
        for _ in 0..CAS_ATTEMPTS {
            let (meta, revision) = self.read(name)?;
            if meta.is_whole() {
                return Err(Error::Invalid(format!(
                    "volume {name} has every replica in sync: there is no risk to accept"
                )));
            }
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let acceptance = RiskAcceptance { by: by.to_owned(), at_unix_s: now.as_secs(), reason: reason.to_owned() };
            let accepted = VolumeMeta { risk_accepted: Some(acceptance.clone()), ..meta.clone() };
            let audit = serde_json::json!({
                "action": "accept-risk",
                "volume": name,
                "by": acceptance.by,
                "at_unix_s": acceptance.at_unix_s,
                "reason": acceptance.reason,
                "node": self.config.node,
                "generation": meta.generation,
                "epoch": meta.epoch,
                "writable_extents": (0..meta.extent_count()).filter(|&i| meta.writable(i)).count(),
                "extents": meta.extent_count(),
            });
            let key = keys::audit(name, &format_rfc3339_nanos(now))?;
            let extra = [Op::put(key, audit.to_string())];
            match self.meta.write_volume_with(name, revision, &accepted, &extra)? {
                MetaWrite::Committed { .. } => {
                    tracing::warn!(volume = name, by, reason, "risk of running below min_replicas accepted");
                    return self.info(name);
                }
                MetaWrite::Conflict(_) => continue,
            }
        }
        Err(Error::Contended { name: name.to_owned(), op: "accept-risk" })
    }

    /// Makes this node the volume's owner and exports it. Refused if another node owns it and
    /// is still registered, unless `force`; an owner whose node is gone is taken over.
    pub fn attach(&mut self, name: &str, force: bool) -> Result<VolumeInfo, Error> {
        store::validate_name(name)?;
        if let Some(a) = self.attached.get(name) {
            return Err(Error::AlreadyAttached { name: name.to_owned(), socket: a.socket.clone() });
        }
        let (meta, _) = self.read(name)?;
        let takeover_of = meta.owner.as_deref().filter(|o| *o != self.config.node);
        if let Some(owner) = takeover_of {
            let up = self.meta.read_node(owner)?.is_some();
            if up && !force {
                return Err(Error::AttachedElsewhere { name: name.to_owned(), node: owner.to_owned() });
            }
            let why = if up { "forced" } else { "its node is not registered" };
            tracing::warn!(volume = name, owner, why, "taking the volume over");
        }
        let socket = self.socket_path(name);
        check_socket_path(&socket)?;
        let cpus = &self.config.poll.cpus;
        let cpu = (!cpus.is_empty()).then(|| cpus[self.next_cpu % cpus.len()]);
        let export = ExportConfig {
            name: name.to_owned(),
            socket_path: socket.clone(),
            num_queues: meta.queues,
            queue_size: QUEUE_SIZE,
            serial: meta.serial.clone(),
            // One poller thread: all the volume's queues go through one replication client.
            poll: PollConfig { cpus: cpu.into_iter().collect(), one_poller: true, ..self.config.poll.clone() },
        };
        let handle = self.attacher.attach(name, export, takeover_of)?;
        self.next_cpu = self.next_cpu.wrapping_add(1);
        let exported_bytes = handle.status().size_bytes.unwrap_or(meta.size_bytes);
        tracing::info!(volume = name, socket = %socket.display(), cpu, "volume attached");
        self.attached.insert(
            name.to_owned(),
            Attached {
                handle,
                socket,
                exported_bytes,
                rates: SyncRates::default(),
                published: None,
                fenced_logged: false,
            },
        );
        self.info(name)
    }

    /// Stops this node's export and releases ownership. A volume this node owns in etcd but
    /// does not export (its attach after a restart failed) is released all the same.
    pub fn detach(&mut self, name: &str) -> Result<(), Error> {
        store::validate_name(name)?;
        if let Some(a) = self.attached.remove(name) {
            let result = a.handle.detach();
            remove_stale_socket(&a.socket);
            self.forget_status(name);
            result?;
            tracing::info!(volume = name, "volume detached");
            return Ok(());
        }
        for _ in 0..CAS_ATTEMPTS {
            let (meta, revision) = self.read(name)?;
            if meta.owner.as_deref() != Some(self.config.node.as_str()) {
                return Err(Error::NotAttached { name: name.to_owned(), owner: meta.owner });
            }
            let released = VolumeMeta { owner: None, ..meta };
            match self.meta.write_volume(name, revision, &released)? {
                MetaWrite::Committed { .. } => {
                    self.forget_status(name);
                    tracing::info!(volume = name, "released a volume this node owned but did not export");
                    return Ok(());
                }
                MetaWrite::Conflict(_) => continue,
            }
        }
        Err(Error::Contended { name: name.to_owned(), op: "detach" })
    }

    /// Removes this node's published status of `name` (it would also go with the lease).
    fn forget_status(&self, name: &str) {
        if let Err(e) = self.meta.remove_status(name, self.registration.lease()) {
            tracing::debug!(volume = name, error = %super::chain(&e), "cannot remove the published status");
        }
    }

    /// Registered nodes (up) and the nodes volume documents name that are not registered
    /// (down), sorted by name.
    pub fn nodes(&self) -> Result<Vec<NodeEntry>, Error> {
        let registered = self.meta.list_nodes()?;
        let docs = self.meta.list_volumes()?;
        let reserved = reserved_bytes(docs.iter().map(|(m, _)| m));
        let mut entries: BTreeMap<String, NodeEntry> = registered
            .into_iter()
            .map(|n| {
                let entry = NodeEntry {
                    name: n.name.clone(),
                    up: true,
                    address: Some(n.address),
                    zone: n.zone,
                    capacity_bytes: Some(n.capacity_bytes),
                    used_bytes: Some(n.capacity_bytes.saturating_sub(n.free_bytes)),
                    reserved_bytes: reserved.get(&n.name).copied().unwrap_or(0),
                    version: Some(n.version),
                    started_unix_s: Some(n.started_unix_s),
                };
                (n.name, entry)
            })
            .collect();
        for name in named_nodes(docs.iter().map(|(m, _)| m)) {
            entries.entry(name.clone()).or_insert_with(|| NodeEntry {
                reserved_bytes: reserved.get(&name).copied().unwrap_or(0),
                name,
                up: false,
                address: None,
                zone: None,
                capacity_bytes: None,
                used_bytes: None,
                version: None,
                started_unix_s: None,
            });
        }
        Ok(entries.into_values().collect())
    }

    pub fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        let nodes = self.nodes()?;
        let docs = self.meta.list_volumes()?;
        let mut statuses = self.meta.list_statuses()?;
        for (name, a) in &self.attached {
            statuses.insert(name.clone(), self.publishable(&a.handle.status(), &a.rates));
        }
        let mut status = ClusterStatus {
            node: self.config.node.clone(),
            nodes_up: nodes.iter().filter(|n| n.up).map(|n| n.name.clone()).collect(),
            nodes_down: nodes.iter().filter(|n| !n.up).map(|n| n.name.clone()).collect(),
            healthy: Vec::new(),
            degraded: Vec::new(),
            suspended: Vec::new(),
            detached: Vec::new(),
            syncs: Vec::new(),
        };
        for (meta, _) in &docs {
            let published = statuses.remove(&meta.name).filter(|s| meta.owner.as_deref() == Some(s.node.as_str()));
            let list = match volume_state(meta, published.as_ref()) {
                VolumeState::Healthy => &mut status.healthy,
                VolumeState::Degraded => &mut status.degraded,
                VolumeState::Suspended => &mut status.suspended,
                VolumeState::Detached => &mut status.detached,
            };
            list.push(meta.name.clone());
            if let Some(published) = published {
                for sync in published.syncs {
                    status.syncs.push(ClusterSync {
                        volume: meta.name.clone(),
                        owner: published.node.clone(),
                        region_bytes: published.region_bytes,
                        sync,
                    });
                }
            }
        }
        Ok(status)
    }

    /// The periodic work: attach what could not be listed at start, grow exports whose
    /// document grew, publish changed statuses.
    pub fn tick(&mut self) {
        if self.reattach_pending {
            self.reattach_owned();
        }
        let lease = if self.registration.is_registered() { self.registration.lease() } else { None };
        if lease != self.published_lease {
            // Statuses under the old lease are gone with it.
            for a in self.attached.values_mut() {
                a.published = None;
            }
            self.published_lease = lease;
        }
        let now = Instant::now();
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            let status = match self.attached.get_mut(&name) {
                Some(a) => {
                    let status = a.handle.status();
                    a.rates.update(&status.syncs, now);
                    grow_export(&name, a, &status);
                    status
                }
                None => continue,
            };
            let Some(a) = self.attached.get(&name) else { continue };
            if status.phase.starts_with("fenced") {
                // Not ours any more: whatever we would publish would contradict the owner's.
                if !a.fenced_logged {
                    tracing::warn!(volume = %name, phase = %status.phase,
                        "the volume was taken from this node; its guest gets I/O errors until `hcblk volume detach`");
                }
                if let Some(a) = self.attached.get_mut(&name) {
                    a.fenced_logged = true;
                }
                continue;
            }
            let published = self.publishable(&status, &a.rates);
            if a.published.as_ref().is_some_and(|p| p.same_as(&published)) {
                continue;
            }
            let Some(lease) = lease else { continue };
            match self.meta.put_status(&name, &published, lease) {
                Ok(()) => {
                    if let Some(a) = self.attached.get_mut(&name) {
                        a.published = Some(published);
                    }
                }
                Err(e) => {
                    tracing::debug!(volume = %name, error = %super::chain(&e), "cannot publish the volume's status");
                    // etcd is not answering: the others would only wait as long.
                    if matches!(e, MetaError::Unavailable(_)) {
                        break;
                    }
                }
            }
        }
    }

    /// Stops every export (daemon shutdown), side by side (see [`stop_side_by_side`]);
    /// ownership stays in etcd.
    pub fn shutdown(&mut self) {
        let attached = std::mem::take(&mut self.attached);
        stop_side_by_side(attached, |(name, a)| {
            a.handle.stop();
            remove_stale_socket(&a.socket);
            tracing::info!(volume = %name, "export stopped; the volume stays owned by this node");
        });
    }

    fn publishable(&self, status: &OwnerStatus, rates: &SyncRates) -> PublishedStatus {
        published_status(&self.config.node, status, rates, now_unix_s())
    }
}

/// Grows `a`'s export to the size the owner's document holds, if it grew.
fn grow_export<H: AttachedVolume>(name: &str, a: &mut Attached<H>, status: &OwnerStatus) {
    let Some(size) = status.size_bytes.filter(|&s| s > a.exported_bytes) else { return };
    match a.handle.resize(size) {
        Ok(()) => {
            tracing::info!(
                volume = name,
                from_bytes = a.exported_bytes,
                to_bytes = size,
                "export grown to the document's size"
            );
            a.exported_bytes = size;
        }
        Err(e) => tracing::warn!(volume = name, error = %super::chain(&e), "cannot grow the export; retrying"),
    }
}

/// The status an owner publishes (and shows) for its volume.
pub fn published_status(node: &str, status: &OwnerStatus, rates: &SyncRates, now_unix_s: u64) -> PublishedStatus {
    PublishedStatus {
        node: node.to_owned(),
        phase: status.phase.clone(),
        generation: status.generation,
        epoch: status.epoch,
        suspended_extents: status.suspended_extents.clone(),
        unreconciled_regions: status.unreconciled_regions,
        region_bytes: if status.region_bytes == 0 { REGION_BYTES } else { status.region_bytes },
        updated_unix_s: now_unix_s,
        syncs: status
            .syncs
            .iter()
            .map(|s| PublishedSync {
                node: s.node.clone(),
                extent: s.extent,
                rebuild: s.rebuild,
                regions_done: s.regions_done,
                regions_total: s.regions_total,
                bytes_done: s.bytes_done,
                rate_bytes_per_s: rates.rate(s),
            })
            .collect(),
    }
}

/// The volume's state: detached without an owner; suspended when some extent's writes wait
/// (too few in sync per the document, or per its owner); degraded when some member is not in
/// sync or missing; healthy otherwise.
pub fn volume_state(meta: &VolumeMeta, status: Option<&PublishedStatus>) -> VolumeState {
    if meta.owner.is_none() {
        VolumeState::Detached
    } else if (0..meta.extent_count()).any(|i| !meta.writable(i))
        || status.is_some_and(|s| !s.suspended_extents.is_empty())
    {
        VolumeState::Suspended
    } else if !meta.is_whole() {
        VolumeState::Degraded
    } else {
        VolumeState::Healthy
    }
}

/// Bytes of extents each node holds according to `docs`.
pub fn reserved_bytes<'a>(docs: impl Iterator<Item = &'a VolumeMeta>) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for meta in docs {
        for (i, extent) in meta.extents.iter().enumerate() {
            let bytes = meta.extent_len(i as u32);
            for m in &extent.members {
                let r = out.entry(m.node.clone()).or_default();
                *r = r.saturating_add(bytes);
            }
        }
    }
    out
}

/// Every node a document names (member or owner).
fn named_nodes<'a>(docs: impl Iterator<Item = &'a VolumeMeta>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for meta in docs {
        out.extend(meta.member_nodes());
        out.extend(meta.owner.clone());
    }
    out
}

/// Refuses a volume of `extents` extents whose document could outgrow
/// [`VOLUME_DOC_BYTES_MAX`] at its largest: every member named like the longest registered
/// node name, rebuilding, with the largest incarnation, and an accepted risk with the longest
/// reason. Checked before placement, so that the document never becomes too large for etcd as
/// members change state.
fn check_doc_capacity(meta: &VolumeMeta, extents: u64, nodes: &[NodeInfo], advice: &str) -> Result<(), Error> {
    let name_len = nodes.iter().map(|n| n.name.len()).max().unwrap_or(store::NAME_BYTES_MAX);
    let worst = worst_doc_bytes(meta, extents, name_len);
    if worst > VOLUME_DOC_BYTES_MAX as u64 {
        let per_extent = worst_doc_bytes(meta, 1, name_len) - worst_doc_bytes(meta, 0, name_len);
        let most = (VOLUME_DOC_BYTES_MAX as u64).saturating_sub(worst_doc_bytes(meta, 0, name_len)) / per_extent.max(1);
        return Err(Error::Invalid(format!(
            "volume {}: {extents} extents of {} bytes are more than the {most} its metadata (one etcd document \
             of at most {VOLUME_DOC_BYTES_MAX} bytes) holds at {} replicas; {advice}",
            meta.name, meta.extent_bytes, meta.replicas
        )));
    }
    Ok(())
}

/// The largest `meta`'s document can become with `extents` extents (see
/// [`check_doc_capacity`]).
fn worst_doc_bytes(meta: &VolumeMeta, extents: u64, name_len: usize) -> u64 {
    let risk =
        RiskAcceptance { by: "x".repeat(BY_BYTES_MAX), at_unix_s: u64::MAX, reason: "x".repeat(REASON_BYTES_MAX) };
    let base = VolumeMeta {
        extents: Vec::new(),
        owner: Some("x".repeat(name_len)),
        generation: u64::MAX,
        epoch: u32::MAX,
        risk_accepted: Some(risk),
        ..meta.clone()
    };
    let member = replication::Member {
        node: "x".repeat(name_len),
        state: replication::MemberState::Rebuilding,
        incarnation: u64::MAX,
    };
    let extent = replication::ExtentMeta { members: vec![member; usize::from(meta.replicas)] };
    // One more byte per extent: the comma between them.
    let per_extent = serde_json::to_vec(&extent).map_or(0, |b| b.len() as u64) + 1;
    (base.to_json().len() as u64).saturating_add(per_extent.saturating_mul(extents))
}

fn now_unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A random id, never 0 (0 means "nobody" on the wire).
pub(crate) fn random_nonzero_u64() -> Result<u64, Error> {
    let nonce = proto::auth::nonce().map_err(Error::io("draw a random id"))?;
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&nonce[..8]);
    Ok(u64::from_le_bytes(bytes).max(1))
}

/// Resync and rebuild rates, measured from the progress the owner reports at each tick (the
/// owner's own clock is not ours to read).
#[derive(Debug, Default)]
pub struct SyncRates {
    samples: BTreeMap<(String, u32, bool), RateSample>,
}

#[derive(Debug)]
struct RateSample {
    bytes_done: u64,
    at: Instant,
    rate_bytes_per_s: Option<u64>,
}

impl SyncRates {
    /// Takes one sample of every sync in progress; syncs that ended are forgotten. The rate
    /// is smoothed over the last samples (each new one weighs half).
    pub fn update(&mut self, syncs: &[SyncProgress], now: Instant) {
        let mut next = BTreeMap::new();
        for s in syncs {
            let key = (s.node.clone(), s.extent, s.rebuild);
            let rate = match self.samples.remove(&key) {
                Some(prev) if s.bytes_done >= prev.bytes_done && now > prev.at => {
                    let seconds = now.duration_since(prev.at).as_secs_f64();
                    let instant = (s.bytes_done - prev.bytes_done) as f64 / seconds;
                    let smoothed = match prev.rate_bytes_per_s {
                        Some(r) => (r as f64 + instant) / 2.0,
                        None => instant,
                    };
                    Some(smoothed as u64)
                }
                // A restarted sync (progress went back): measure anew.
                _ => None,
            };
            next.insert(key, RateSample { bytes_done: s.bytes_done, at: now, rate_bytes_per_s: rate });
        }
        self.samples = next;
    }

    pub fn rate(&self, s: &SyncProgress) -> Option<u64> {
        self.samples.get(&(s.node.clone(), s.extent, s.rebuild)).and_then(|r| r.rate_bytes_per_s)
    }
}

#[cfg(test)]
mod tests {
    use replication::{ExtentMeta, Locality, Member, MemberState};

    use super::*;

    fn meta(states: &[&[MemberState]]) -> VolumeMeta {
        let extents: Vec<ExtentMeta> = states
            .iter()
            .map(|ext| ExtentMeta {
                members: ext.iter().enumerate().map(|(i, s)| Member::new(&format!("n{}", i + 1), *s)).collect(),
            })
            .collect();
        VolumeMeta {
            format: replication::meta::META_FORMAT,
            name: "vol".into(),
            id: 1,
            size_bytes: (extents.len() as u64) * (1 << 30) - (512 << 20),
            block_size: 512,
            extent_bytes: 1 << 30,
            region_bytes: 1 << 20,
            replicas: 3,
            min_replicas: 2,
            queues: 1,
            serial: "vol".into(),
            read_only: false,
            locality: Locality::Prefer,
            created_unix_s: 0,
            generation: 1,
            owner: Some("n1".into()),
            epoch: 1,
            extents,
            risk_accepted: None,
        }
    }

    use MemberState::{InSync as I, Rebuilding as R, Stale as S};

    #[test]
    fn states() {
        let healthy = meta(&[&[I, I, I], &[I, I, I]]);
        assert_eq!(volume_state(&healthy, None), VolumeState::Healthy);
        assert_eq!(volume_state(&VolumeMeta { owner: None, ..healthy.clone() }, None), VolumeState::Detached);
        let degraded = meta(&[&[I, I, S], &[I, I, I]]);
        assert_eq!(volume_state(&degraded, None), VolumeState::Degraded);
        let mut two = meta(&[&[I, I], &[I, I, I]]);
        two.extents[0].members.truncate(2);
        assert_eq!(volume_state(&two, None), VolumeState::Degraded, "a missing member");
        let suspended = meta(&[&[I, S, R], &[I, I, I]]);
        assert_eq!(volume_state(&suspended, None), VolumeState::Suspended);
        let accepted = VolumeMeta {
            risk_accepted: Some(RiskAcceptance { by: "a".into(), at_unix_s: 1, reason: "r".into() }),
            ..suspended
        };
        assert_eq!(volume_state(&accepted, None), VolumeState::Degraded);
        let waiting = PublishedStatus { suspended_extents: vec![1], ..PublishedStatus::default() };
        assert_eq!(volume_state(&healthy, Some(&waiting)), VolumeState::Suspended, "the owner knows better");
    }

    #[test]
    fn reservations_count_each_members_extent_length() {
        let m = meta(&[&[I, I, I], &[I, S, R]]);
        let r = reserved_bytes([&m, &m].into_iter());
        // The last extent is half inside the volume.
        assert_eq!(r["n1"], 2 * ((1 << 30) + (512 << 20)));
        assert_eq!(r.len(), 3);
        let mut m2 = m.clone();
        m2.owner = Some("n9".into());
        let named = named_nodes([&m2].into_iter());
        assert_eq!(named.into_iter().collect::<Vec<_>>(), ["n1", "n2", "n3", "n9"]);
    }

    #[test]
    fn rates_are_measured_between_samples_and_forget_ended_syncs() {
        let sync = |bytes_done| SyncProgress {
            node: "n2".into(),
            extent: 3,
            rebuild: true,
            regions_done: (bytes_done >> 20) as u32,
            regions_total: 1024,
            bytes_done,
            started: 0,
        };
        let t0 = Instant::now();
        let mut rates = SyncRates::default();
        rates.update(&[sync(0)], t0);
        assert_eq!(rates.rate(&sync(0)), None, "one sample is no rate");
        rates.update(&[sync(128 << 20)], t0 + Duration::from_secs(2));
        assert_eq!(rates.rate(&sync(0)), Some(64 << 20));
        rates.update(&[sync(128 << 20)], t0 + Duration::from_secs(4));
        assert_eq!(rates.rate(&sync(0)), Some(32 << 20), "smoothed: half the old, half the new");
        rates.update(&[sync(1 << 20)], t0 + Duration::from_secs(6));
        assert_eq!(rates.rate(&sync(0)), None, "went back: a new sync");
        rates.update(&[], t0 + Duration::from_secs(8));
        assert!(rates.samples.is_empty());
        let published = published_status(
            "n1",
            &OwnerStatus { phase: "serving".into(), syncs: vec![sync(1 << 20)], ..OwnerStatus::default() },
            &rates,
            5,
        );
        assert_eq!((published.region_bytes, published.syncs[0].rate_bytes_per_s), (REGION_BYTES, None));
    }

    #[test]
    fn document_capacity_is_bounded_at_its_worst() {
        let m = meta(&[&[I, I, I]]);
        let nodes = |len: usize| {
            vec![NodeInfo {
                name: "n".repeat(len),
                id: 1,
                address: "a:1".into(),
                zone: None,
                capacity_bytes: 0,
                free_bytes: 0,
                version: String::new(),
                started_unix_s: 0,
            }]
        };
        // The estimate is an upper bound of a real document of that many extents.
        let mut big = m.clone();
        big.extents = vec![big.extents[0].clone(); 1000];
        assert!(worst_doc_bytes(&m, 1000, 2) >= big.to_json().len() as u64);
        // About 4,800 extents of 3 replicas with short node names: 4.7 TiB in 1 GiB extents.
        check_doc_capacity(&m, 4500, &nodes(2), "").unwrap();
        let err = check_doc_capacity(&m, 6000, &nodes(2), "use a larger --extent-size").unwrap_err().to_string();
        assert!(err.contains("6000 extents") && err.contains("larger --extent-size"), "{err}");
        assert!(check_doc_capacity(&m, 4500, &nodes(64), "").is_err(), "long names take room");
    }

    #[test]
    fn random_ids_are_not_zero_and_differ() {
        let a = random_nonzero_u64().unwrap();
        let b = random_nonzero_u64().unwrap();
        assert!(a != 0 && b != 0 && a != b);
    }
}
