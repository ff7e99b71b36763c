//! Crash-safe volume metadata: one JSON file per volume.
//!
//! Layout under `DATA_DIR/volumes/`:
//!
//! ```text
//! NAME.json           the volume's record (below); present <=> the volume exists
//! NAME.img            a file backing hcblk created (the default --path of a file volume)
//! .NAME.json.tmp      a record being written; removed at start (never read)
//! .NAME.deleting      the record of a volume whose deletion began; finished at start
//! ```
//!
//! A record is replaced by writing `.NAME.json.tmp`, fsync-ing it, renaming it over `NAME.json`
//! and fsync-ing the directory, so after a crash either the old or the new record is there,
//! whole. Deletion renames `NAME.json` to `.NAME.deleting` (the atomic commit point), then
//! removes what the volume owned, then the marker. Names cannot start with '.', so the
//! dot-files never collide with a volume.
//!
//! ```json
//! {"format":2,"name":"vm1","size_bytes":10737418240,"block_size":512,"queues":1,
//!  "backing":"file","path":"/var/lib/hcblk/volumes/vm1.img","created_backing":true,
//!  "read_only":false,"serial":"vm1","created_unix_s":1795317910,
//!  "replicas":1,"min_replicas":1,"extent_bytes":1073741824,"generation":3,"epoch":1}
//! ```
//!
//! Format 2 adds the fields a replicated volume's document has (`replicas`, `min_replicas`,
//! `extent_bytes`, `generation`, `epoch`), so that `volume info` reads the same in both modes.
//! A standalone volume has one replica, its membership never changes (epoch 1), and its
//! generation counts the daemon starts that served it: it is bumped, durably, before the
//! export starts. Format 1 records (the first eleven fields only) are still read: they are
//! upgraded in memory (replicas 1, min_replicas 1, the default extent size, generation 0,
//! epoch 1) and written as format 2 by the next save, which is the generation bump of the
//! next start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use replica::BackingKind;
use replication::meta::REGIONS_PER_EXTENT_MAX;
use serde::{Deserialize, Serialize};

use super::Error;

/// The record format this code writes.
pub const FORMAT: u32 = 2;
/// The first format, still read (and upgraded in memory).
const FORMAT_1: u32 = 1;
/// Granularity of dirty tracking and resync of a replicated volume (`VolumeMeta.region_bytes`).
pub const REGION_BYTES: u64 = 1 << 20;
/// Default extent size: see docs/cli.md (`--extent-size`) for why.
pub const EXTENT_BYTES_DEFAULT: u64 = 1 << 30;
/// Smallest extent size accepted: smaller extents only make the volume document longer.
pub const EXTENT_BYTES_MIN: u64 = 16 << 20;
/// Largest extent size: an extent's dirty bitmap (one bit per region) must fit one message.
pub const EXTENT_BYTES_MAX: u64 = REGIONS_PER_EXTENT_MAX * REGION_BYTES;
const _: () = assert!(EXTENT_BYTES_MAX == 4 << 30 && EXTENT_BYTES_MIN <= EXTENT_BYTES_DEFAULT);
const _: () = assert!(EXTENT_BYTES_DEFAULT <= EXTENT_BYTES_MAX && EXTENT_BYTES_MIN >= REGION_BYTES);
/// Records are a few hundred bytes; anything much larger is not ours.
const RECORD_BYTES_MAX: u64 = 64 << 10;
/// Volume names: also file names and socket names, hence the short, plain alphabet.
pub const NAME_BYTES_MAX: usize = 64;
/// VIRTIO_BLK_T_GET_ID returns at most 20 bytes.
pub const SERIAL_BYTES_MAX: usize = 20;
pub const QUEUES_MAX: u16 = 16;

/// [`BackingKind`] as stored and sent over the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackingType {
    File,
    Device,
    Ram,
    Null,
}

impl From<BackingType> for BackingKind {
    fn from(t: BackingType) -> Self {
        match t {
            BackingType::File => Self::File,
            BackingType::Device => Self::Device,
            BackingType::Ram => Self::Ram,
            BackingType::Null => Self::Null,
        }
    }
}

impl BackingType {
    pub fn name(self) -> &'static str {
        BackingKind::from(self).name()
    }
}

impl std::str::FromStr for BackingType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.parse::<BackingKind>().map_err(Error::Invalid)? {
            BackingKind::File => Ok(Self::File),
            BackingKind::Device => Ok(Self::Device),
            BackingKind::Ram => Ok(Self::Ram),
            BackingKind::Null => Ok(Self::Null),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// Always [`FORMAT`] in memory (format 1 is upgraded when read); a reader refuses formats
    /// it does not know.
    pub format: u32,
    pub name: String,
    pub size_bytes: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// 1..=[`QUEUES_MAX`].
    pub queues: u16,
    pub backing: BackingType,
    /// Absolute path of a file or device backing; `None` for ram and null.
    pub path: Option<PathBuf>,
    /// hcblk created the backing file, so deleting the volume removes it.
    pub created_backing: bool,
    pub read_only: bool,
    pub serial: String,
    pub created_unix_s: u64,
    /// Always 1 for a standalone volume.
    pub replicas: u8,
    /// Always 1 for a standalone volume.
    pub min_replicas: u8,
    /// A power of two in [`EXTENT_BYTES_MIN`]..=[`EXTENT_BYTES_MAX`]; default
    /// [`EXTENT_BYTES_DEFAULT`]. Recorded only: a standalone volume is one local file.
    pub extent_bytes: u64,
    /// Daemon starts (and the create) that served this volume; bumped before each.
    pub generation: u64,
    /// Membership epoch: 1, as a standalone volume's membership never changes.
    pub epoch: u32,
}

/// Format 1, as written before format 2: read and upgraded, never written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordV1 {
    format: u32,
    name: String,
    size_bytes: u64,
    block_size: u32,
    queues: u16,
    backing: BackingType,
    path: Option<PathBuf>,
    created_backing: bool,
    read_only: bool,
    serial: String,
    created_unix_s: u64,
}

impl From<RecordV1> for VolumeRecord {
    fn from(v1: RecordV1) -> Self {
        debug_assert_eq!(v1.format, FORMAT_1);
        Self {
            format: FORMAT,
            name: v1.name,
            size_bytes: v1.size_bytes,
            block_size: v1.block_size,
            queues: v1.queues,
            backing: v1.backing,
            path: v1.path,
            created_backing: v1.created_backing,
            read_only: v1.read_only,
            serial: v1.serial,
            created_unix_s: v1.created_unix_s,
            replicas: 1,
            min_replicas: 1,
            extent_bytes: EXTENT_BYTES_DEFAULT,
            generation: 0,
            epoch: 1,
        }
    }
}

impl VolumeRecord {
    /// Every invariant a record must hold; checked before a record is written and after one
    /// is read, so a hand-edited or corrupt file is refused rather than half-used.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("unknown format {} (this hcblk reads {FORMAT})", self.format));
        }
        validate_name(&self.name).map_err(|e| e.to_string())?;
        validate_geometry(self.size_bytes, self.block_size, self.queues).map_err(|e| e.to_string())?;
        validate_serial(&self.serial).map_err(|e| e.to_string())?;
        if self.replicas != 1 || self.min_replicas != 1 {
            return Err(format!(
                "replicas {} and min_replicas {} (a standalone volume has exactly 1 of each)",
                self.replicas, self.min_replicas
            ));
        }
        validate_extent_bytes(self.extent_bytes).map_err(|e| e.to_string())?;
        if self.epoch == 0 {
            return Err("epoch 0 (epochs start at 1)".into());
        }
        match (self.backing, &self.path) {
            (BackingType::File | BackingType::Device, None) => Err("a file or device backing needs a path".into()),
            (BackingType::File | BackingType::Device, Some(p)) if !p.is_absolute() => {
                Err(format!("backing path {} is not absolute", p.display()))
            }
            (BackingType::Ram | BackingType::Null, Some(_)) => Err("a ram or null backing has no path".into()),
            (BackingType::Device | BackingType::Ram | BackingType::Null, _) if self.created_backing => {
                Err("only a file backing can be created by hcblk".into())
            }
            _ => Ok(()),
        }
    }
}

/// `[A-Za-z0-9._-]{1,64}`, not starting with '.' (so never `.`/`..` nor one of our dot-files).
pub fn validate_name(name: &str) -> Result<(), Error> {
    let bad = |reason| Error::InvalidName { name: name.to_owned(), reason };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(bad("longer than 64 bytes"));
    }
    if name.starts_with('.') {
        return Err(bad("starts with '.'"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

pub fn validate_geometry(size_bytes: u64, block_size: u32, queues: u16) -> Result<(), Error> {
    if block_size != 512 && block_size != 4096 {
        return Err(Error::Invalid(format!("block size {block_size} is not supported (use 512 or 4096)")));
    }
    if size_bytes == 0 {
        return Err(Error::Invalid("size must be greater than 0".into()));
    }
    if !size_bytes.is_multiple_of(u64::from(block_size)) {
        return Err(Error::Invalid(format!(
            "size {size_bytes} bytes is not a multiple of the block size {block_size}"
        )));
    }
    if queues == 0 || queues > QUEUES_MAX {
        return Err(Error::Invalid(format!("queues {queues} is out of range 1..={QUEUES_MAX}")));
    }
    Ok(())
}

/// A power of two from [`EXTENT_BYTES_MIN`] (16 MiB) to [`EXTENT_BYTES_MAX`] (4 GiB).
pub fn validate_extent_bytes(extent_bytes: u64) -> Result<(), Error> {
    if !extent_bytes.is_power_of_two() || !(EXTENT_BYTES_MIN..=EXTENT_BYTES_MAX).contains(&extent_bytes) {
        return Err(Error::Invalid(format!("extent size {extent_bytes} bytes is not a power of two from 16M to 4G")));
    }
    Ok(())
}

/// At most 20 bytes of printable ASCII: the guest reads it as a C string of that length.
pub fn validate_serial(serial: &str) -> Result<(), Error> {
    if serial.is_empty() || serial.len() > SERIAL_BYTES_MAX {
        return Err(Error::Invalid(format!("serial {serial:?} must be 1 to {SERIAL_BYTES_MAX} bytes")));
    }
    if !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Invalid(format!("serial {serial:?} must be printable ASCII without spaces")));
    }
    Ok(())
}

/// The default serial: the name when it fits, else a prefix of it and a hash of the whole, so
/// that two long names sharing a prefix still get different serials.
pub fn default_serial(name: &str) -> String {
    if name.len() <= SERIAL_BYTES_MAX {
        return name.to_owned();
    }
    // FNV-1a: tiny, stable across releases (the serial must not change between restarts).
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    // Names are ASCII (validated), so byte slicing is on char boundaries.
    format!("{}-{hash:08x}", &name[..SERIAL_BYTES_MAX - 9])
}

/// What [`Store::open`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub volumes: Vec<VolumeRecord>,
    /// Deletions that began but did not finish before the last stop.
    pub pending_deletes: Vec<VolumeRecord>,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Fault point: the next save fails as if the disk refused the write.
    #[cfg(test)]
    pub(crate) fail_save: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens (creating) the directory and loads every record, removing interrupted writes.
    /// Any record that cannot be read or validated is an error naming its file.
    pub fn open(dir: &Path) -> Result<(Self, Loaded), Error> {
        crate::permissions::create_dir(dir).map_err(Error::io(format!("create directory {}", dir.display())))?;
        let store = Self {
            dir: dir.to_owned(),
            #[cfg(test)]
            fail_save: std::sync::atomic::AtomicBool::new(false),
        };
        let mut loaded = Loaded::default();
        let entries = fs::read_dir(dir).map_err(|source| Error::StoreRead { path: dir.to_owned(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| Error::StoreRead { path: dir.to_owned(), source })?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else { continue };
            let path = entry.path();
            if file_name.starts_with('.') && file_name.ends_with(".json.tmp") {
                tracing::info!(path = %path.display(), "removing an interrupted metadata write");
                fs::remove_file(&path).map_err(|source| Error::StoreWrite { path: path.clone(), source })?;
            } else if let Some(name) = file_name.strip_prefix('.').and_then(|n| n.strip_suffix(".deleting")) {
                loaded.pending_deletes.push(read_record(&path, name)?);
            } else if let Some(name) = file_name.strip_suffix(".json") {
                loaded.volumes.push(read_record(&path, name)?);
            }
        }
        loaded.volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((store, loaded))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.json.tmp"))
    }

    fn deleting_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.deleting"))
    }

    /// Writes (or replaces) a record durably: when this returns Ok the record survives a crash.
    pub fn save(&self, record: &VolumeRecord) -> Result<(), Error> {
        let temp = self.write_temp(record)?;
        self.commit(&temp, &record.name)
    }

    /// First half of [`Store::save`]: the record's bytes, durable in a file nobody reads yet.
    fn write_temp(&self, record: &VolumeRecord) -> Result<PathBuf, Error> {
        let temp = self.temp_path(&record.name);
        record.validate().map_err(|reason| Error::StoreCorrupt { path: temp.clone(), reason })?;
        let mut bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::StoreWrite { path: temp.clone(), source: io::Error::other(e) })?;
        bytes.push(b'\n');
        let write = || -> io::Result<()> {
            #[cfg(test)]
            if self.fail_save.swap(false, std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(crate::permissions::FILE_MODE)
                .open(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&temp);
            Error::StoreWrite { path: temp.clone(), source }
        })?;
        Ok(temp)
    }

    /// Second half: the rename is the commit point; the directory fsync makes it durable.
    fn commit(&self, temp: &Path, name: &str) -> Result<(), Error> {
        let path = self.record_path(name);
        fs::rename(temp, &path).map_err(|source| {
            let _ = fs::remove_file(temp);
            Error::StoreWrite { path: path.clone(), source }
        })?;
        // A failed directory fsync means we do not know whether the rename will survive a
        // crash; report it, since the caller is about to tell the operator "done".
        self.sync_dir().map_err(|source| Error::StoreWrite { path, source })
    }

    /// The commit point of a deletion: afterwards the volume is gone even if we crash before
    /// its backing and the marker are removed ([`Store::finish_delete`], or the next start).
    pub fn begin_delete(&self, name: &str) -> Result<(), Error> {
        let path = self.record_path(name);
        fs::rename(&path, self.deleting_path(name))
            .map_err(|source| Error::StoreWrite { path: path.clone(), source })?;
        self.sync_dir().map_err(|source| Error::StoreWrite { path, source })
    }

    pub fn finish_delete(&self, name: &str) -> Result<(), Error> {
        let marker = self.deleting_path(name);
        match fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(Error::StoreWrite { path: marker, source }),
        }
        self.sync_dir().map_err(|source| Error::StoreWrite { path: marker, source })
    }

    /// The record of an unfinished deletion of `name`, if there is one.
    pub fn pending_delete(&self, name: &str) -> Result<Option<VolumeRecord>, Error> {
        let marker = self.deleting_path(name);
        match fs::symlink_metadata(&marker) {
            Ok(_) => read_record(&marker, name).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::StoreRead { path: marker, source }),
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

fn read_record(path: &Path, expected_name: &str) -> Result<VolumeRecord, Error> {
    let file = File::open(path).map_err(|source| Error::StoreRead { path: path.to_owned(), source })?;
    let mut bytes = Vec::new();
    // One byte more than the limit, to tell "at the limit" from "over it".
    file.take(RECORD_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::StoreRead { path: path.to_owned(), source })?;
    decode_record(&bytes, expected_name).map_err(|reason| Error::StoreCorrupt { path: path.to_owned(), reason })
}

/// Decodes and validates the bytes of `NAME.json`: a file anyone with access to the data dir
/// may have edited or a crash may have torn, so everything is checked (and fuzzed).
pub fn decode_record(bytes: &[u8], expected_name: &str) -> Result<VolumeRecord, String> {
    if bytes.len() as u64 > RECORD_BYTES_MAX {
        return Err(format!("more than {RECORD_BYTES_MAX} bytes, more than a record can be"));
    }
    // The format decides which fields are expected, so look at it first.
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let Format { format } = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let record: VolumeRecord = match format {
        FORMAT_1 => serde_json::from_slice::<RecordV1>(bytes).map_err(|e| e.to_string())?.into(),
        FORMAT => serde_json::from_slice(bytes).map_err(|e| e.to_string())?,
        other => return Err(format!("unknown format {other} (this hcblk reads {FORMAT_1} and {FORMAT})")),
    };
    record.validate()?;
    if record.name != expected_name {
        return Err(format!("holds volume {:?}, but the file is named for {expected_name:?}", record.name));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            format: FORMAT,
            name: name.to_owned(),
            size_bytes: 1 << 20,
            block_size: 512,
            queues: 2,
            backing: BackingType::File,
            path: Some(PathBuf::from(format!("/var/lib/hcblk/volumes/{name}.img"))),
            created_backing: true,
            read_only: false,
            serial: default_serial(name),
            created_unix_s: 1_795_317_910,
            replicas: 1,
            min_replicas: 1,
            extent_bytes: EXTENT_BYTES_DEFAULT,
            generation: 1,
            epoch: 1,
        }
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.volumes.is_empty());
        let a = record("a");
        let mut b = record("b");
        b.backing = BackingType::Null;
        b.path = None;
        b.created_backing = false;
        store.save(&b).unwrap();
        store.save(&a).unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.volumes, vec![a.clone(), b]);
        let mut grown = a.clone();
        grown.size_bytes *= 2;
        store.save(&grown).unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.volumes[0], grown);
    }

    /// A record exactly as format 1 wrote it: read, upgraded in memory, written as format 2 by
    /// the next save, and read back the same.
    #[test]
    fn format_1_records_are_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = r#"{
  "format": 1,
  "name": "old",
  "size_bytes": 10737418240,
  "block_size": 512,
  "queues": 1,
  "backing": "file",
  "path": "/var/lib/hcblk/volumes/old.img",
  "created_backing": true,
  "read_only": false,
  "serial": "old",
  "created_unix_s": 1795317910
}
"#;
        fs::write(dir.path().join("old.json"), v1).unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        let expected = VolumeRecord {
            size_bytes: 10 << 30,
            queues: 1,
            generation: 0,
            path: Some("/var/lib/hcblk/volumes/old.img".into()),
            ..record("old")
        };
        assert_eq!(loaded.volumes, vec![expected.clone()]);
        // Untouched until saved.
        assert_eq!(fs::read_to_string(dir.path().join("old.json")).unwrap(), v1);
        let bumped = VolumeRecord { generation: 1, ..expected };
        store.save(&bumped).unwrap();
        let text = fs::read_to_string(dir.path().join("old.json")).unwrap();
        assert!(text.contains("\"format\": 2") && text.contains("\"generation\": 1"), "{text}");
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.volumes, vec![bumped]);
    }

    #[test]
    fn extent_sizes() {
        for good in [16 << 20, 1 << 30, 4 << 30] {
            validate_extent_bytes(good).unwrap();
        }
        for bad in [0, 8 << 20, 3 << 20, (1 << 30) + 1, 8 << 30] {
            assert!(validate_extent_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_crash_before_the_rename_keeps_the_old_record() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let old = record("vm");
        store.save(&old).unwrap();
        let mut new = old.clone();
        new.size_bytes *= 4;
        // The crash: the new bytes are durable in the temp file, the rename never happened.
        let temp = store.write_temp(&new).unwrap();
        assert!(temp.exists());
        // And a torn temp file from an earlier crash of another volume's write.
        fs::write(dir.path().join(".other.json.tmp"), b"{\"format\":1,\"na").unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.volumes, vec![old]);
        assert!(!temp.exists(), "interrupted writes are cleaned up at start");
        assert!(!dir.path().join(".other.json.tmp").exists());
    }

    #[test]
    fn a_crash_after_the_rename_has_the_new_record() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.save(&record("vm")).unwrap();
        let mut new = record("vm");
        new.size_bytes *= 4;
        let temp = store.write_temp(&new).unwrap();
        store.commit(&temp, "vm").unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.volumes, vec![new]);
    }

    #[test]
    fn corrupt_records_stop_the_load_and_are_named() {
        let huge = vec![b' '; RECORD_BYTES_MAX as usize + 1];
        // Format 2 fields in a format-1 record, and a format-2 record without them.
        let v1_with_v2_fields = r#"{"format":1,"name":"mixed","size_bytes":1048576,"block_size":512,"queues":1,
            "backing":"null","path":null,"created_backing":false,"read_only":false,"serial":"mixed",
            "created_unix_s":0,"generation":4}"#;
        let v2_without = r#"{"format":2,"name":"short","size_bytes":1048576,"block_size":512,"queues":1,
            "backing":"null","path":null,"created_backing":false,"read_only":false,"serial":"short",
            "created_unix_s":0}"#;
        let cases: [(&str, &[u8]); 11] = [
            ("huge", &huge),
            ("torn", b"{\"format\":1,\"name\":\"torn\""),
            ("garbage", b"\x00\xff\xfe not json"),
            ("misnamed", &serde_json::to_vec(&record("other")).unwrap()),
            ("future", &serde_json::to_vec(&VolumeRecord { format: 3, ..record("future") }).unwrap()),
            ("replicated", &serde_json::to_vec(&VolumeRecord { replicas: 3, ..record("replicated") }).unwrap()),
            ("extent", &serde_json::to_vec(&VolumeRecord { extent_bytes: 3 << 20, ..record("extent") }).unwrap()),
            ("epoch", &serde_json::to_vec(&VolumeRecord { epoch: 0, ..record("epoch") }).unwrap()),
            ("unaligned", &serde_json::to_vec(&VolumeRecord { size_bytes: 1000, ..record("unaligned") }).unwrap()),
            ("mixed", v1_with_v2_fields.as_bytes()),
            ("short", v2_without.as_bytes()),
        ];
        for (name, bytes) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = Store::open(dir.path()).unwrap();
            store.save(&record("good")).unwrap();
            let path = dir.path().join(format!("{name}.json"));
            fs::write(&path, bytes).unwrap();
            let err = Store::open(dir.path()).unwrap_err();
            let text = super::super::error::chain(&err);
            assert!(matches!(err, Error::StoreCorrupt { .. }), "{name}: {text}");
            assert!(text.contains(&path.display().to_string()), "{name}: {text}");
        }
    }

    #[test]
    fn deletion_is_committed_by_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.save(&record("gone")).unwrap();
        store.save(&record("kept")).unwrap();
        store.begin_delete("gone").unwrap();
        // Crash here: the volume is gone, its deletion is pending.
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.volumes, vec![record("kept")]);
        assert_eq!(loaded.pending_deletes, vec![record("gone")]);
        assert_eq!(store.pending_delete("gone").unwrap(), Some(record("gone")));
        store.finish_delete("gone").unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.pending_deletes.is_empty());
        assert_eq!(store.pending_delete("gone").unwrap(), None);
        assert!(store.begin_delete("never-existed").is_err());
    }

    #[test]
    fn names() {
        for good in ["a", "vm-1", "VM_1.disk", &"x".repeat(64)] {
            validate_name(good).unwrap();
        }
        for bad in ["", ".hidden", ".", "..", "a/b", "a b", "é", "a\n", &"x".repeat(65), "../x"] {
            assert!(validate_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn serials() {
        assert_eq!(default_serial("vm1"), "vm1");
        let long = default_serial("a-very-long-volume-name-for-a-database-vm");
        assert_eq!(long.len(), SERIAL_BYTES_MAX);
        assert_ne!(long, default_serial("a-very-long-volume-name-for-a-database-vm2"));
        assert_eq!(long, default_serial("a-very-long-volume-name-for-a-database-vm"));
        validate_serial(&long).unwrap();
        assert!(validate_serial("has space").is_err());
        assert!(validate_serial(&"x".repeat(21)).is_err());
        assert!(validate_serial("").is_err());
    }
}
