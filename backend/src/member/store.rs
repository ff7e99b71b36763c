//! Where a node keeps its replicas, under `DATA_DIR/replicas/`:
//!
//! ```text
//! <volume id, 16 hex digits>.img    the replica's data: a sparse file the volume's size; only
//!                                    the extents this node holds are ever written, at their
//!                                    volume offsets (O_DIRECT through the io_uring shard)
//! <volume id>.state                 the replica state record (promise, epoch, dirty bitmaps)
//! ```
//!
//! The state file holds two slots of [`SLOT_BYTES`], written alternately, each:
//!
//! ```text
//!  0        8          16         20        24
//!  +--------+----------+----------+---------+---------------------------------------------+
//!  | magic  | version  | length   | rsvd 0  | PersistedVolume::encode (self-checking)     |
//!  | HCBLKS | u64      | u32      | u32     | `length` bytes                              |
//!  +--------+----------+----------+---------+---------------------------------------------+
//! ```
//!
//! A record is durable when `persist` returns: the slot not holding the newest version is
//! overwritten and fdatasync'd, so a crash mid-write leaves the other slot intact; at start the
//! newest slot whose record checks out wins. A failed fdatasync is fatal for the daemon (the
//! kernel may have dropped the dirty pages: retrying would report success for data that is
//! gone), which is why `persist` returns an error the caller must not swallow.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use replica::{Backing, BackingConfig, BackingKind};
use replication::replica::PersistedVolume;

use super::MemberError;

/// Room for one state record: about 8000 extents (each extent's bitmap takes at most 512
/// bytes).
pub const SLOT_BYTES: u64 = 4 << 20;
const SLOT_MAGIC: &[u8; 8] = b"HCBLKST1";
const SLOT_HEADER: usize = 24;

struct VolumeFiles {
    state: File,
    /// Version of the newest slot on disk.
    version: u64,
    data: Option<Arc<Backing>>,
}

pub struct Store {
    dir: PathBuf,
    volumes: Mutex<BTreeMap<u64, VolumeFiles>>,
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> MemberError {
    move |source| MemberError::Io { what, source }
}

impl Store {
    /// Opens (creating) the directory and loads every replica state record in it.
    pub fn open(data_dir: &Path) -> Result<(Self, Vec<PersistedVolume>), MemberError> {
        let dir = data_dir.join("replicas");
        crate::permissions::create_dir(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let mut volumes = BTreeMap::new();
        let mut loaded = Vec::new();
        let entries = fs::read_dir(&dir).map_err(io_err(format!("list {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
            let path = entry.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".state"))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            let state = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(format!("open {}", path.display())))?;
            match read_newest(&state).map_err(io_err(format!("read {}", path.display())))? {
                Some((version, record)) => {
                    if record.volume != id {
                        return Err(MemberError::Corrupt {
                            path,
                            reason: format!("holds volume {:016x}", record.volume),
                        });
                    }
                    volumes.insert(id, VolumeFiles { state, version, data: None });
                    loaded.push(record);
                }
                None => {
                    // Created, never completely written (a crash during the first promise):
                    // nothing was promised from it.
                    tracing::warn!(path = %path.display(), "replica state record without a valid slot; ignoring it");
                }
            }
        }
        Ok((Self { dir, volumes: Mutex::new(volumes) }, loaded))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, VolumeFiles>> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn data_path(&self, volume: u64) -> PathBuf {
        self.dir.join(format!("{volume:016x}.img"))
    }

    fn state_path(&self, volume: u64) -> PathBuf {
        self.dir.join(format!("{volume:016x}.state"))
    }

    /// Makes `state` durable.
    pub fn persist(&self, state: &PersistedVolume) -> Result<(), MemberError> {
        let record = state.encode();
        if record.len() + SLOT_HEADER > SLOT_BYTES as usize {
            return Err(MemberError::Io {
                what: format!("write the state of volume {:016x}", state.volume),
                source: io::Error::other(format!("record of {} bytes exceeds a {SLOT_BYTES}-byte slot", record.len())),
            });
        }
        let mut volumes = self.lock();
        let files = match volumes.entry(state.volume) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let path = self.dir.join(format!("{:016x}.state", state.volume));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(crate::permissions::FILE_MODE)
                    .open(&path)
                    .map_err(io_err(format!("create {}", path.display())))?;
                sync_dir(&self.dir).map_err(io_err(format!("sync {}", self.dir.display())))?;
                e.insert(VolumeFiles { state: file, version: 0, data: None })
            }
        };
        let version = files.version + 1;
        let mut slot = Vec::with_capacity(SLOT_HEADER + record.len());
        slot.extend_from_slice(SLOT_MAGIC);
        slot.extend_from_slice(&version.to_le_bytes());
        slot.extend_from_slice(&(record.len() as u32).to_le_bytes());
        slot.extend_from_slice(&0u32.to_le_bytes());
        slot.extend_from_slice(&record);
        let offset = (version % 2) * SLOT_BYTES;
        let what = || format!("write the state of volume {:016x}", state.volume);
        files.state.write_all_at(&slot, offset).map_err(io_err(what()))?;
        files.state.sync_data().map_err(io_err(what()))?;
        files.version = version;
        Ok(())
    }

    /// The volume's data file, opened (created sparse, or grown) to `size_bytes`.
    pub fn data(&self, volume: u64, size_bytes: u64) -> Result<Arc<Backing>, MemberError> {
        let mut volumes = self.lock();
        if let Some(files) = volumes.get(&volume) {
            if let Some(data) = &files.data {
                if data.capacity_bytes() < size_bytes {
                    data.resize(size_bytes)?;
                }
                return Ok(Arc::clone(data));
            }
        }
        let backing = Arc::new(Backing::open(&BackingConfig {
            kind: BackingKind::File,
            path: Some(self.data_path(volume)),
            size_bytes,
            block_size: 512,
            read_only: false,
            create: true,
        })?);
        if let Some(files) = volumes.get_mut(&volume) {
            files.data = Some(Arc::clone(&backing));
        }
        Ok(backing)
    }

    /// Releases the space of `[offset, offset + len)` of the volume's data (an extent this
    /// node no longer holds).
    pub fn drop_range(&self, volume: u64, offset: u64, len: u64) -> Result<(), MemberError> {
        let path = self.data_path(volume);
        let file = match OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(format!("open {}", path.display()))(e)),
        };
        // SAFETY: plain syscall on an open fd with in-range values.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(io_err(format!("release {len} bytes at {offset} of {}", path.display()))(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Removes the volume's files (the volume was deleted).
    pub fn drop_volume(&self, volume: u64) -> Result<(), MemberError> {
        self.lock().remove(&volume);
        for path in [self.data_path(volume), self.state_path(volume)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("remove {}", path.display()))(e)),
            }
        }
        sync_dir(&self.dir).map_err(io_err(format!("sync {}", self.dir.display())))
    }

    /// Bytes the replicas' data files take on disk.
    pub fn used_bytes(&self) -> u64 {
        let Ok(entries) = fs::read_dir(&self.dir) else { return 0 };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

/// The newest slot whose record checks out.
fn read_newest(file: &File) -> io::Result<Option<(u64, PersistedVolume)>> {
    let mut best: Option<(u64, PersistedVolume)> = None;
    let len = file.metadata()?.len();
    for slot in 0..2u64 {
        let offset = slot * SLOT_BYTES;
        if offset + SLOT_HEADER as u64 > len {
            continue;
        }
        let mut header = [0u8; SLOT_HEADER];
        file.read_exact_at(&mut header, offset)?;
        if &header[..8] != SLOT_MAGIC {
            continue;
        }
        let version = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let record_len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as u64;
        if record_len + SLOT_HEADER as u64 > SLOT_BYTES || offset + SLOT_HEADER as u64 + record_len > len {
            continue;
        }
        let mut record = vec![0u8; record_len as usize];
        file.read_exact_at(&mut record, offset + SLOT_HEADER as u64)?;
        let Ok(decoded) = PersistedVolume::decode(&record) else { continue };
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, decoded));
        }
    }
    Ok(best)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::Bitmap;

    fn state(volume: u64, promised: u64) -> PersistedVolume {
        let mut bits = Bitmap::new(8);
        bits.set(3);
        PersistedVolume {
            volume,
            name: "vm".into(),
            size_bytes: 8 << 20,
            extent_bytes: 8 << 20,
            region_bytes: 1 << 20,
            promised,
            owner: 9,
            epoch: 1,
            extents: [(0, bits)].into_iter().collect(),
        }
    }

    #[test]
    fn records_survive_reopen_and_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, loaded) = Store::open(dir.path()).unwrap();
            assert!(loaded.is_empty());
            store.persist(&state(5, 1)).unwrap();
            store.persist(&state(5, 2)).unwrap();
            store.persist(&state(5, 3)).unwrap();
        }
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![state(5, 3)]);
        // Tear the newest slot (version 3 is in slot 1): the other one wins.
        let path = dir.path().join("replicas").join(format!("{:016x}.state", 5));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 16], SLOT_BYTES + SLOT_HEADER as u64 + 10).unwrap();
        drop(f);
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded, vec![state(5, 2)]);
        store.drop_volume(5).unwrap();
        assert!(Store::open(dir.path()).unwrap().1.is_empty());
    }

    #[test]
    fn data_files_are_sparse_and_ranges_released() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.persist(&state(7, 1)).unwrap();
        let data = store.data(7, 64 << 20).unwrap();
        assert_eq!(data.capacity_bytes(), 64 << 20);
        assert!(store.used_bytes() < 1 << 20, "sparse");
        let path = store.data_path(7);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&vec![1u8; 1 << 20], 0).unwrap();
        f.sync_all().unwrap();
        assert!(store.used_bytes() >= 1 << 20);
        store.drop_range(7, 0, 1 << 20).unwrap();
        assert!(store.used_bytes() < 1 << 20);
        assert_eq!(store.data(7, 128 << 20).unwrap().capacity_bytes(), 128 << 20, "grows");
    }
}
