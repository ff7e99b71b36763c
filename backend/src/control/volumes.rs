//! The volume manager: every operation validates everything first, then acts, and on a failure
//! part-way undoes what it did, so a refused request changes nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use replica::{Backing, BackingConfig};

use super::api::{CreateRequest, VolumeInfo};
use super::exporter::{stop_side_by_side, ExportHandle, Exporter};
use super::store::{self, BackingType, Store, VolumeRecord, EXTENT_BYTES_DEFAULT, FORMAT};
use super::Error;
use crate::{ExportConfig, PollConfig};

/// `sun_path` holds 108 bytes including the terminating NUL.
const SOCKET_PATH_BYTES_MAX: usize = 107;
/// The largest virtqueue a frontend may configure (QEMU's vhost-user-blk default is 256).
pub(crate) const QUEUE_SIZE: u16 = 256;
/// What a request for a cluster-only feature is told by a standalone daemon.
pub(crate) const NEEDS_CLUSTER: &str =
    "needs cluster mode (start the daemon with --etcd, --node, --listen and a cluster secret)";

struct Live<H> {
    record: VolumeRecord,
    export: H,
}

pub struct Volumes<E: Exporter<Backing>> {
    exporter: E,
    store: Store,
    socket_dir: PathBuf,
    poll: PollConfig,
    live: BTreeMap<String, Live<E::Handle>>,
}

impl<E: Exporter<Backing>> Volumes<E> {
    /// Loads the metadata under `data_dir`, finishes interrupted deletions and re-exports every
    /// volume. Fails (stopping whatever it had started) if any volume cannot be brought back:
    /// a daemon that silently left a VM's disk out would be worse than one that does not start.
    pub fn open(exporter: E, data_dir: &Path, socket_dir: &Path, poll: PollConfig) -> Result<Self, Error> {
        let (store, loaded) = Store::open(&data_dir.join("volumes"))?;
        let mut volumes = Self { exporter, store, socket_dir: socket_dir.to_owned(), poll, live: BTreeMap::new() };
        for record in loaded.pending_deletes {
            if let Err(e) = volumes.finish_delete(&record) {
                // The marker stays, so the next start (or a create of that name) tries again.
                tracing::warn!(volume = %record.name, error = %super::error::chain(&e), "cannot finish an interrupted deletion");
            }
        }
        for record in loaded.volumes {
            // The generation counts the starts that served the volume: durable before serving.
            let record = VolumeRecord { generation: record.generation + 1, ..record };
            if let Err(e) = volumes.store.save(&record) {
                volumes.shutdown();
                return Err(e);
            }
            match volumes.start(&record, false) {
                Ok(export) => {
                    tracing::info!(volume = %record.name, size_bytes = record.size_bytes, backing = record.backing.name(), "volume restored");
                    volumes.live.insert(record.name.clone(), Live { record, export });
                }
                Err(e) => {
                    volumes.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(volumes)
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.socket_dir.join(format!("{name}.sock"))
    }

    fn default_backing_path(&self, name: &str) -> PathBuf {
        self.store.dir().join(format!("{name}.img"))
    }

    fn info(&self, live: &Live<E::Handle>) -> VolumeInfo {
        VolumeInfo::new(
            &live.record,
            self.socket_path(&live.record.name),
            live.export.is_connected(),
            live.export.rejected_requests(),
        )
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        self.live.values().map(|l| self.info(l)).collect()
    }

    pub fn get(&self, name: &str) -> Result<VolumeInfo, Error> {
        self.live.get(name).map(|l| self.info(l)).ok_or_else(|| Error::NoSuchVolume(name.to_owned()))
    }

    pub fn create(&mut self, request: CreateRequest) -> Result<VolumeInfo, Error> {
        let name = request.name.clone();
        store::validate_name(&name)?;
        if self.live.contains_key(&name) {
            return Err(Error::VolumeExists(name));
        }
        store::validate_geometry(request.size_bytes, request.block_size, request.queues)?;
        let serial = match request.serial {
            Some(serial) => serial,
            None => store::default_serial(&name),
        };
        store::validate_serial(&serial)?;
        if let Some(replicas) = request.replicas.filter(|&r| r != 1) {
            return Err(Error::Invalid(format!("--replicas {replicas} {NEEDS_CLUSTER}; a standalone volume has 1")));
        }
        if let Some(min) = request.min_replicas.filter(|&m| m != 1) {
            return Err(Error::Invalid(format!("--min-replicas {min} {NEEDS_CLUSTER}; a standalone volume has 1")));
        }
        if request.locality.is_some() {
            return Err(Error::Invalid(format!("--locality {NEEDS_CLUSTER}")));
        }
        let extent_bytes = request.extent_bytes.unwrap_or(EXTENT_BYTES_DEFAULT);
        store::validate_extent_bytes(extent_bytes)?;
        // A deletion of this name that did not finish owns files a new volume could reuse.
        if let Some(pending) = self.store.pending_delete(&name)? {
            self.finish_delete(&pending)?;
        }
        let (path, undo) = self.check_backing_path(&name, request.backing, request.path)?;
        let socket = self.socket_path(&name);
        check_socket_path(&socket)?;
        let record = VolumeRecord {
            format: FORMAT,
            name: name.clone(),
            size_bytes: request.size_bytes,
            block_size: request.block_size,
            queues: request.queues,
            backing: request.backing,
            path,
            created_backing: undo.created,
            read_only: request.read_only,
            serial,
            created_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            replicas: 1,
            min_replicas: 1,
            extent_bytes,
            // Served from now on: the first generation.
            generation: 1,
            epoch: 1,
        };
        record.validate().map_err(Error::Invalid)?;

        let export = match self.start(&record, true) {
            Ok(export) => export,
            Err(e) => {
                undo.run();
                return Err(e);
            }
        };
        if let Err(e) = self.store.save(&record) {
            export.stop();
            undo.run();
            return Err(e);
        }
        tracing::info!(volume = %name, size_bytes = record.size_bytes, backing = record.backing.name(), socket = %socket.display(), "volume created");
        self.live.insert(name.clone(), Live { record, export });
        self.get(&name)
    }

    /// Grow only. The new size is persisted *before* the export grows: after a crash between
    /// the two the volume comes back larger (the file is extended on open), never smaller than
    /// a size the guest was already shown.
    pub fn resize(&mut self, name: &str, new_size_bytes: u64) -> Result<VolumeInfo, Error> {
        let live = self.live.get(name).ok_or_else(|| Error::NoSuchVolume(name.to_owned()))?;
        let current = live.record.size_bytes;
        if new_size_bytes < current {
            return Err(Error::Shrink { name: name.to_owned(), current, requested: new_size_bytes });
        }
        store::validate_geometry(new_size_bytes, live.record.block_size, live.record.queues)?;
        if new_size_bytes == current {
            return self.get(name);
        }
        if live.record.backing == BackingType::Ram {
            return Err(Error::Invalid(format!("volume {name} has a ram backing, which cannot be resized")));
        }
        if live.record.read_only {
            return Err(Error::Invalid(format!("volume {name} is read-only and cannot be resized")));
        }
        let old = live.record.clone();
        let new = VolumeRecord { size_bytes: new_size_bytes, ..old.clone() };
        self.store.save(&new)?;
        if let Err(source) = live.export.resize(new_size_bytes) {
            let error = Error::Resize { name: name.to_owned(), source };
            if let Err(restore) = self.store.save(&old) {
                tracing::error!(volume = %name, error = %super::error::chain(&restore), "cannot restore the old size in the metadata; the volume comes back larger after a restart");
            }
            return Err(error);
        }
        tracing::info!(volume = %name, from_bytes = current, to_bytes = new_size_bytes, "volume resized");
        if let Some(live) = self.live.get_mut(name) {
            live.record = new;
        }
        self.get(name)
    }

    pub fn delete(&mut self, name: &str, force: bool) -> Result<(), Error> {
        let live = self.live.get(name).ok_or_else(|| Error::NoSuchVolume(name.to_owned()))?;
        if live.export.is_connected() && !force {
            return Err(Error::InUse { name: name.to_owned() });
        }
        // The commit point; until it succeeds nothing has changed.
        self.store.begin_delete(name)?;
        let Some(live) = self.live.remove(name) else { return Ok(()) };
        live.export.stop();
        remove_stale_socket(&self.socket_path(name));
        tracing::info!(volume = %name, "volume deleted");
        self.finish_delete(&live.record)
    }

    /// Stops every export (daemon shutdown), side by side: their requests in flight drain at
    /// the same time, so the whole stop takes one export's bound
    /// ([`crate::export::STOP_TIMEOUT`]), however many volumes there are. The metadata stays.
    pub fn shutdown(&mut self) {
        let live = std::mem::take(&mut self.live);
        let exports = live.into_iter().map(|(name, live)| (self.socket_path(&name), live.export));
        stop_side_by_side(exports, |(socket, export)| {
            export.stop();
            remove_stale_socket(&socket);
        });
    }

    /// Removes what a deleted volume owned, then its deletion marker.
    fn finish_delete(&self, record: &VolumeRecord) -> Result<(), Error> {
        if record.created_backing {
            if let Some(path) = &record.path {
                match fs::remove_file(path) {
                    Ok(()) => tracing::info!(volume = %record.name, path = %path.display(), "backing file removed"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(Error::Io { what: format!("remove the backing file {}", path.display()), source })
                    }
                }
            }
        }
        self.store.finish_delete(&record.name)
    }

    fn start(&self, record: &VolumeRecord, create: bool) -> Result<E::Handle, Error> {
        let backing = Backing::open(&BackingConfig {
            kind: record.backing.into(),
            path: record.path.clone(),
            size_bytes: record.size_bytes,
            block_size: record.block_size,
            read_only: record.read_only,
            create: create && record.created_backing,
        })
        .map_err(|source| Error::Backing { name: record.name.clone(), source })?;
        let config = ExportConfig {
            name: record.name.clone(),
            socket_path: self.socket_path(&record.name),
            num_queues: record.queues,
            queue_size: QUEUE_SIZE,
            serial: record.serial.clone(),
            poll: self.poll.clone(),
        };
        self.exporter
            .start(config, Arc::new(backing))
            .map_err(|source| Error::Export { name: record.name.clone(), source })
    }

    /// Resolves and checks a volume's backing path before anything is created, and returns how
    /// to undo what opening the backing may do to it.
    fn check_backing_path(
        &self,
        name: &str,
        backing: BackingType,
        path: Option<PathBuf>,
    ) -> Result<(Option<PathBuf>, BackingUndo), Error> {
        let path = match (backing, path) {
            (BackingType::Ram | BackingType::Null, Some(_)) => {
                return Err(Error::Invalid(format!("a {} backing takes no --path", backing.name())))
            }
            (BackingType::Ram | BackingType::Null, None) => return Ok((None, BackingUndo::none())),
            (BackingType::Device, None) => {
                return Err(Error::Invalid("a device backing needs --path (a block device)".into()))
            }
            (BackingType::File, None) => {
                let path = self.default_backing_path(name);
                if fs::symlink_metadata(&path).is_ok() {
                    return Err(Error::Invalid(format!(
                        "{} already exists but belongs to no volume (left over from a crash?); \
                         remove it, or adopt it with --path",
                        path.display()
                    )));
                }
                self.check_path_unused(&path)?;
                return Ok((Some(path.clone()), BackingUndo::created(path)));
            }
            (_, Some(path)) => path,
        };
        if !path.is_absolute() {
            return Err(Error::Invalid(format!("backing path {} is not absolute", path.display())));
        }
        self.check_not_ours(name, &path)?;
        self.check_path_unused(&path)?;
        let metadata = match fs::metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(Error::Io { what: format!("inspect backing path {}", path.display()), source }),
        };
        match (backing, metadata) {
            (BackingType::Device, None) => {
                Err(Error::Invalid(format!("backing path {} does not exist", path.display())))
            }
            (BackingType::Device, Some(m)) if !m.file_type().is_block_device() => {
                Err(Error::Invalid(format!("backing path {} is not a block device", path.display())))
            }
            (BackingType::Device, Some(_)) => Ok((Some(path), BackingUndo::none())),
            (_, Some(m)) if !m.is_file() => {
                Err(Error::Invalid(format!("backing path {} is not a regular file", path.display())))
            }
            (_, Some(m)) => Ok((Some(path.clone()), BackingUndo::adopted(path, m.len()))),
            (_, None) => {
                let parent = path.parent().unwrap_or(Path::new("/"));
                if !parent.is_dir() {
                    return Err(Error::Invalid(format!(
                        "backing path {}: directory {} does not exist",
                        path.display(),
                        parent.display()
                    )));
                }
                Ok((Some(path.clone()), BackingUndo::created(path)))
            }
        }
    }

    /// Adopting one of our own files (a record, the lock, another volume's image) as a backing
    /// would let the guest overwrite it; only this volume's default image may be adopted.
    fn check_not_ours(&self, name: &str, path: &Path) -> Result<(), Error> {
        let canonical = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let wanted = match (path.parent(), path.file_name()) {
            (Some(parent), Some(file)) => canonical(parent).join(file),
            _ => path.to_owned(),
        };
        let data_dir = canonical(self.store.dir().parent().unwrap_or(self.store.dir()));
        if wanted.starts_with(&data_dir) && wanted != canonical(&self.default_backing_path(name)) {
            return Err(Error::Invalid(format!(
                "backing path {} is inside hcblk's data directory {}; omit --path to use the default",
                path.display(),
                data_dir.display()
            )));
        }
        Ok(())
    }

    fn check_path_unused(&self, path: &Path) -> Result<(), Error> {
        let wanted = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        for live in self.live.values() {
            let Some(theirs) = &live.record.path else { continue };
            let theirs = fs::canonicalize(theirs).unwrap_or_else(|_| theirs.clone());
            if theirs == wanted {
                return Err(Error::Invalid(format!(
                    "backing path {} is already used by volume {}",
                    path.display(),
                    live.record.name
                )));
            }
        }
        Ok(())
    }
}

/// How to put a backing path back as it was before a create that failed.
struct BackingUndo {
    path: Option<PathBuf>,
    /// hcblk creates the file: undo removes it.
    created: bool,
    /// An existing file opened at a larger size is extended: undo truncates it back.
    original_len: Option<u64>,
}

impl BackingUndo {
    fn none() -> Self {
        Self { path: None, created: false, original_len: None }
    }
    fn created(path: PathBuf) -> Self {
        Self { path: Some(path), created: true, original_len: None }
    }
    fn adopted(path: PathBuf, len: u64) -> Self {
        Self { path: Some(path), created: false, original_len: Some(len) }
    }

    fn run(self) {
        let Some(path) = self.path else { return };
        let result = if self.created {
            match fs::remove_file(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        } else if let Some(len) = self.original_len {
            fs::OpenOptions::new().write(true).open(&path).and_then(|f| {
                if f.metadata()?.len() != len {
                    f.set_len(len)?;
                }
                Ok(())
            })
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "cannot undo a failed create on the backing path");
        }
    }
}

/// Refuses a socket path that is too long, held by a live process, or not a socket; removes a
/// stale socket left by a process that is gone.
pub(crate) fn check_socket_path(path: &Path) -> Result<(), Error> {
    if path.as_os_str().len() > SOCKET_PATH_BYTES_MAX {
        return Err(Error::Invalid(format!(
            "socket path {} is longer than {SOCKET_PATH_BYTES_MAX} bytes; use a shorter --socket-dir or name",
            path.display()
        )));
    }
    let metadata = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(Error::Io { what: format!("inspect socket path {}", path.display()), source }),
    };
    if !metadata.file_type().is_socket() {
        return Err(Error::NotASocket { path: path.to_owned() });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(Error::SocketInUse { path: path.to_owned() });
    }
    fs::remove_file(path).map_err(Error::io(format!("remove the stale socket {}", path.display())))
}

pub(crate) fn remove_stale_socket(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::Ordering;

    use super::super::exporter::fake::FakeExporter;
    use super::*;

    struct Setup {
        dir: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Self {
            Self { dir: tempfile::tempdir().unwrap() }
        }
        fn data(&self) -> PathBuf {
            self.dir.path().join("data")
        }
        fn sockets(&self) -> PathBuf {
            self.dir.path().join("sock")
        }
        fn open(&self) -> Volumes<FakeExporter> {
            fs::create_dir_all(self.sockets()).unwrap();
            Volumes::open(FakeExporter::default(), &self.data(), &self.sockets(), PollConfig::default()).unwrap()
        }
        fn img(&self, name: &str) -> PathBuf {
            self.data().join("volumes").join(format!("{name}.img"))
        }
        fn json(&self, name: &str) -> PathBuf {
            self.data().join("volumes").join(format!("{name}.json"))
        }
        /// Every file under the temp dir with its length, to show that nothing changed.
        fn snapshot(&self) -> Vec<(PathBuf, u64)> {
            fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
                let Ok(entries) = fs::read_dir(dir) else { return };
                for entry in entries {
                    let entry = entry.unwrap();
                    let m = fs::symlink_metadata(entry.path()).unwrap();
                    out.push((entry.path(), m.len()));
                    if m.is_dir() {
                        walk(&entry.path(), out);
                    }
                }
            }
            let mut out = Vec::new();
            walk(self.dir.path(), &mut out);
            out.sort();
            out
        }
    }

    fn create(name: &str, size_bytes: u64, backing: BackingType) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            size_bytes,
            block_size: 512,
            queues: 1,
            backing,
            path: None,
            read_only: false,
            serial: None,
            replicas: None,
            min_replicas: None,
            extent_bytes: None,
            locality: None,
        }
    }

    #[test]
    fn create_list_resize_delete_a_file_volume() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        let info = volumes.create(create("vm1", 1 << 20, BackingType::File)).unwrap();
        let socket = info.socket.clone().unwrap();
        assert_eq!(socket, setup.sockets().join("vm1.sock"));
        assert!(socket.exists());
        assert_eq!(info.path.as_deref(), Some(setup.img("vm1").as_path()));
        assert!(info.created_backing);
        assert_eq!(fs::metadata(setup.img("vm1")).unwrap().len(), 1 << 20);
        assert!(setup.json("vm1").exists());
        assert_eq!(volumes.list(), vec![info.clone()]);

        let grown = volumes.resize("vm1", 2 << 20).unwrap();
        assert_eq!(grown.size_bytes, 2 << 20);
        assert_eq!(fs::metadata(setup.img("vm1")).unwrap().len(), 2 << 20);

        volumes.delete("vm1", false).unwrap();
        assert!(volumes.list().is_empty());
        assert!(!socket.exists());
        assert!(!setup.img("vm1").exists());
        assert!(!setup.json("vm1").exists());
        assert!(matches!(volumes.get("vm1"), Err(Error::NoSuchVolume(_))));
    }

    #[test]
    fn refused_creates_change_nothing() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        volumes.create(create("taken", 1 << 20, BackingType::Null)).unwrap();
        let existing = setup.dir.path().join("existing.img");
        fs::write(&existing, vec![7u8; 4096]).unwrap();
        let in_use = UnixListener::bind(setup.sockets().join("busy.sock")).unwrap();
        fs::write(setup.sockets().join("regular.sock"), b"").unwrap();
        let before = setup.snapshot();

        let with = |f: &dyn Fn(&mut CreateRequest)| {
            let mut r = create("new", 1 << 20, BackingType::File);
            f(&mut r);
            r
        };
        let refused = [
            with(&|r| r.name = "taken".into()),
            with(&|r| r.name = ".hidden".into()),
            with(&|r| r.size_bytes = 1000),
            with(&|r| r.size_bytes = 0),
            with(&|r| r.block_size = 1024),
            with(&|r| r.queues = 0),
            with(&|r| r.queues = 17),
            with(&|r| r.serial = Some("x".repeat(21))),
            with(&|r| r.backing = BackingType::Device),
            with(&|r| {
                r.backing = BackingType::Device;
                r.path = Some("/nonexistent/disk".into());
            }),
            with(&|r| {
                r.backing = BackingType::Device;
                r.path = Some(existing.clone());
            }),
            with(&|r| r.path = Some("/nonexistent-dir/x.img".into())),
            with(&|r| r.path = Some("relative.img".into())),
            with(&|r| r.path = Some(setup.dir.path().to_owned())),
            with(&|r| {
                r.backing = BackingType::Null;
                r.path = Some(existing.clone());
            }),
            with(&|r| r.path = Some(setup.json("taken"))),
            with(&|r| r.path = Some(setup.data().join("lock"))),
            with(&|r| r.path = Some(setup.data().join("volumes").join("other.img"))),
            with(&|r| r.name = "busy".into()),
            with(&|r| r.name = "regular".into()),
            with(&|r| r.replicas = Some(3)),
            with(&|r| r.min_replicas = Some(2)),
            with(&|r| r.locality = Some(replication::Locality::None)),
            with(&|r| r.extent_bytes = Some(3 << 20)),
            with(&|r| r.extent_bytes = Some(8 << 30)),
        ];
        for request in refused {
            let what = format!("{request:?}");
            let err = volumes.create(request).unwrap_err();
            assert_eq!(setup.snapshot(), before, "{what} changed files ({err})");
            assert_eq!(volumes.list().len(), 1, "{what}");
        }
        drop(in_use);
    }

    #[test]
    fn failures_after_the_backing_is_created_are_rolled_back() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        let before = setup.snapshot();
        volumes.exporter.fail_start.store(true, Ordering::Relaxed);
        let err = volumes.create(create("vm", 1 << 20, BackingType::File)).unwrap_err();
        assert!(matches!(err, Error::Export { .. }), "{err}");
        assert_eq!(setup.snapshot(), before);

        // An adopted file that had to be extended is truncated back.
        let existing = setup.dir.path().join("small.img");
        fs::write(&existing, vec![7u8; 4096]).unwrap();
        let before = setup.snapshot();
        let mut request = create("vm", 1 << 20, BackingType::File);
        request.path = Some(existing.clone());
        volumes.create(request.clone()).unwrap_err();
        assert_eq!(setup.snapshot(), before);
        assert_eq!(fs::read(&existing).unwrap(), vec![7u8; 4096]);

        // A metadata write that fails rolls back the export and the file.
        volumes.exporter.fail_start.store(false, Ordering::Relaxed);
        volumes.store.fail_save.store(true, Ordering::Relaxed);
        let err = volumes.create(request.clone()).unwrap_err();
        assert!(matches!(err, Error::StoreWrite { .. }), "{err}");
        assert_eq!(setup.snapshot(), before);
        assert_eq!(fs::read(&existing).unwrap(), vec![7u8; 4096]);
        assert!(!setup.sockets().join("vm.sock").exists());
        assert!(volumes.list().is_empty());
        volumes.store.fail_save.store(true, Ordering::Relaxed);
        let err = volumes.create(create("vm", 1 << 20, BackingType::File)).unwrap_err();
        assert!(matches!(err, Error::StoreWrite { .. }), "{err}");
        assert_eq!(setup.snapshot(), before);
        // And with nothing injected the same request goes through.
        volumes.create(request).unwrap();
    }

    #[test]
    fn resize_is_grow_only_and_refusals_change_nothing() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        volumes.create(create("vm", 1 << 20, BackingType::File)).unwrap();
        let before = setup.snapshot();
        assert!(matches!(volumes.resize("vm", 1 << 19), Err(Error::Shrink { .. })));
        assert!(volumes.resize("vm", (1 << 20) + 100).is_err());
        assert!(matches!(volumes.resize("nope", 2 << 20), Err(Error::NoSuchVolume(_))));
        assert_eq!(volumes.resize("vm", 1 << 20).unwrap().size_bytes, 1 << 20);
        // The export refuses: the persisted size goes back to the old one.
        volumes.exporter.fail_resize.store(true, Ordering::Relaxed);
        assert!(matches!(volumes.resize("vm", 2 << 20), Err(Error::Resize { .. })));
        assert_eq!(setup.snapshot(), before);
        assert_eq!(volumes.get("vm").unwrap().size_bytes, 1 << 20);
        drop(volumes);
        let volumes = setup.open();
        assert_eq!(volumes.get("vm").unwrap().size_bytes, 1 << 20);
    }

    #[test]
    fn restart_restores_volumes_and_their_data() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        volumes.create(create("a", 1 << 20, BackingType::File)).unwrap();
        volumes.create(create("b", 4 << 20, BackingType::Null)).unwrap();
        volumes.resize("a", 3 << 20).unwrap();
        let listed = volumes.list();
        assert!(listed.iter().all(|v| v.generation == 1), "{listed:?}");
        fs::write(setup.img("a"), vec![0x5a; 3 << 20]).unwrap();
        volumes.shutdown();
        assert!(!setup.sockets().join("a.sock").exists());

        let volumes = setup.open();
        // The same volumes, one generation later.
        let bumped: Vec<VolumeInfo> = listed.into_iter().map(|v| VolumeInfo { generation: 2, ..v }).collect();
        assert_eq!(volumes.list(), bumped);
        assert!(setup.sockets().join("a.sock").exists());
        assert!(fs::read(setup.img("a")).unwrap().iter().all(|b| *b == 0x5a));
        let started = volumes.exporter.started.lock().unwrap();
        assert_eq!(started.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn a_missing_backing_file_stops_the_restart() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        volumes.create(create("ok", 1 << 20, BackingType::Null)).unwrap();
        volumes.create(create("lost", 1 << 20, BackingType::File)).unwrap();
        volumes.shutdown();
        fs::remove_file(setup.img("lost")).unwrap();
        let err = Volumes::open(FakeExporter::default(), &setup.data(), &setup.sockets(), PollConfig::default())
            .err()
            .unwrap();
        let text = super::super::error::chain(&err);
        assert!(text.contains("lost") && text.contains("lost.img"), "{text}");
        assert!(!setup.img("lost").exists(), "a lost backing is not silently recreated");
        assert!(!setup.sockets().join("ok.sock").exists(), "exports started before are stopped");
    }

    #[test]
    fn delete_refuses_a_connected_volume_unless_forced() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        volumes.create(create("vm", 1 << 20, BackingType::File)).unwrap();
        volumes.exporter.connected.store(true, Ordering::Relaxed);
        let before = setup.snapshot();
        assert!(matches!(volumes.delete("vm", false), Err(Error::InUse { .. })));
        assert_eq!(setup.snapshot(), before);
        volumes.delete("vm", true).unwrap();
        assert!(!setup.img("vm").exists());
    }

    #[test]
    fn an_interrupted_delete_is_finished_at_start() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        volumes.create(create("vm", 1 << 20, BackingType::File)).unwrap();
        volumes.shutdown();
        // The crash: committed the deletion, removed nothing else.
        volumes.store.begin_delete("vm").unwrap();
        let volumes = setup.open();
        assert!(volumes.list().is_empty());
        assert!(!setup.img("vm").exists());
        assert!(fs::read_dir(setup.data().join("volumes")).unwrap().next().is_none());
    }

    #[test]
    fn an_adopted_file_survives_delete() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        let mine = setup.dir.path().join("mine.img");
        fs::write(&mine, vec![1u8; 1 << 20]).unwrap();
        let mut request = create("vm", 1 << 20, BackingType::File);
        request.path = Some(mine.clone());
        let info = volumes.create(request.clone()).unwrap();
        assert!(!info.created_backing);
        request.name = "other".into();
        assert!(volumes.create(request).is_err(), "two volumes on one file");
        volumes.delete("vm", false).unwrap();
        assert_eq!(fs::read(&mine).unwrap(), vec![1u8; 1 << 20]);
    }

    #[test]
    fn an_orphan_default_backing_is_not_reused() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        fs::create_dir_all(setup.data().join("volumes")).unwrap();
        fs::write(setup.img("vm"), b"stale data").unwrap();
        let err = volumes.create(create("vm", 1 << 20, BackingType::File)).unwrap_err();
        assert!(err.to_string().contains("belongs to no volume"), "{err}");
        assert_eq!(fs::read(setup.img("vm")).unwrap(), b"stale data");
        // Adopting it explicitly is the way out.
        let mut request = create("vm", 1 << 20, BackingType::File);
        request.path = Some(setup.img("vm"));
        assert!(!volumes.create(request).unwrap().created_backing);
        assert!(fs::read(setup.img("vm")).unwrap().starts_with(b"stale data"));
    }

    #[test]
    fn socket_paths_too_long_for_sun_path_are_refused() {
        let long = PathBuf::from(format!("/run/{}/vm.sock", "d".repeat(100)));
        let err = check_socket_path(&long).unwrap_err();
        assert!(err.to_string().contains("longer than 107 bytes"), "{err}");
        check_socket_path(Path::new("/nonexistent/vm.sock")).unwrap();
    }

    #[test]
    fn ram_volumes_cannot_resize() {
        let setup = Setup::new();
        let mut volumes = setup.open();
        if replica::free_hugepages().unwrap_or(0) < 1 {
            panic!("this test needs free hugepages: echo 64 > /proc/sys/vm/nr_hugepages");
        }
        volumes.create(create("r", 2 << 20, BackingType::Ram)).unwrap();
        let err = volumes.resize("r", 4 << 20).unwrap_err();
        assert!(err.to_string().contains("ram"), "{err}");
        assert_eq!(volumes.get("r").unwrap().size_bytes, 2 << 20);
    }
}
