//! Where a volume's bytes live.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{Error, HugeBuffer};

// <linux/fs.h> block-device ioctls that the libc crate does not carry.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
pub(crate) const BLKDISCARD: libc::c_ulong = 0x1277;
pub(crate) const BLKZEROOUT: libc::c_ulong = 0x127f;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    /// A regular file, opened with O_DIRECT.
    File,
    /// A raw block device, opened with O_DIRECT.
    Device,
    /// Hugepage memory: no persistence, for measuring the data path without a disk.
    Ram,
    /// Writes are dropped and reads leave the buffer untouched: measures the data path alone.
    Null,
}

impl BackingKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Device => "device",
            Self::Ram => "ram",
            Self::Null => "null",
        }
    }

    pub fn is_persistent(self) -> bool {
        matches!(self, Self::File | Self::Device)
    }
}

impl std::str::FromStr for BackingKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "file" => Ok(Self::File),
            "device" => Ok(Self::Device),
            "ram" => Ok(Self::Ram),
            "null" => Ok(Self::Null),
            other => Err(format!("unknown backing {other:?} (file, device, ram or null)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BackingConfig {
    pub kind: BackingKind,
    /// File or device path; required for `File` and `Device`.
    pub path: Option<PathBuf>,
    pub size_bytes: u64,
    /// The logical block size the volume exposes: 512 or 4096.
    pub block_size: u32,
    pub read_only: bool,
    /// For `File`: create the file (sparse) if it does not exist.
    pub create: bool,
}

/// An open backing, shared by every queue of a volume.
pub struct Backing {
    kind: BackingKind,
    path: Option<PathBuf>,
    file: Option<File>,
    capacity_bytes: AtomicU64,
    block_size: u32,
    read_only: bool,
    /// O_DIRECT needs file offsets and lengths aligned to this.
    dio_offset_align: u32,
    /// O_DIRECT needs buffer addresses and lengths aligned to this.
    dio_mem_align: u32,
    ram: Option<HugeBuffer>,
    /// Serialises every write of a volume whose blocks are smaller than the device's O_DIRECT
    /// unit: a read-modify-write of a device block must not interleave with another write to
    /// the same device block.
    pub(crate) rmw_lock: Mutex<()>,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("capacity_bytes", &self.capacity_bytes())
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

impl Backing {
    pub fn open(config: &BackingConfig) -> Result<Self, Error> {
        if config.block_size != 512 && config.block_size != 4096 {
            return Err(Error::BlockSize(config.block_size));
        }
        if config.size_bytes == 0 || !config.size_bytes.is_multiple_of(u64::from(config.block_size)) {
            return Err(Error::SizeNotAligned { size: config.size_bytes, block_size: config.block_size });
        }
        let mut backing = Self {
            kind: config.kind,
            path: config.path.clone(),
            file: None,
            capacity_bytes: AtomicU64::new(config.size_bytes),
            block_size: config.block_size,
            read_only: config.read_only,
            dio_offset_align: 1,
            dio_mem_align: 1,
            ram: None,
            rmw_lock: Mutex::new(()),
        };
        match config.kind {
            BackingKind::File | BackingKind::Device => {
                let path = config.path.as_deref().ok_or_else(|| Error::Open {
                    path: PathBuf::new(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "a file or device backing needs a path",
                    ),
                })?;
                let file = open_direct(path, config)?;
                let (offset_align, mem_align) = dio_alignment(&file, config.kind, path)?;
                backing.dio_offset_align = offset_align;
                backing.dio_mem_align = mem_align;
                backing.file = Some(file);
            }
            BackingKind::Ram => {
                let len =
                    usize::try_from(config.size_bytes).map_err(|_| Error::HugepagesExhausted { bytes: usize::MAX })?;
                backing.ram = Some(HugeBuffer::new(len)?);
            }
            BackingKind::Null => {}
        }
        Ok(backing)
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes.load(Ordering::Acquire)
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn dio_offset_align(&self) -> u32 {
        self.dio_offset_align
    }

    pub fn dio_mem_align(&self) -> u32 {
        self.dio_mem_align
    }

    /// True when a volume block is smaller than the device's O_DIRECT unit, so writes need a
    /// read-modify-write of whole device blocks.
    pub fn needs_rmw(&self) -> bool {
        self.block_size < self.dio_offset_align
    }

    pub(crate) fn raw_fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub(crate) fn ram(&self) -> Option<&HugeBuffer> {
        self.ram.as_ref()
    }

    /// Grows the volume to `new_size_bytes`. Files are extended (sparse); devices must already
    /// be large enough; `ram` cannot grow in place.
    pub fn resize(&self, new_size_bytes: u64) -> Result<(), Error> {
        let current = self.capacity_bytes();
        if new_size_bytes < current {
            return Err(Error::Shrink { current, requested: new_size_bytes });
        }
        if !new_size_bytes.is_multiple_of(u64::from(self.block_size)) {
            return Err(Error::SizeNotAligned { size: new_size_bytes, block_size: self.block_size });
        }
        match self.kind {
            BackingKind::File => {
                let path = self.path.clone().unwrap_or_default();
                let file = self.file.as_ref().ok_or(Error::NotResizable { kind: "file" })?;
                let len = file.metadata().map_err(|source| Error::Size { path: path.clone(), source })?.len();
                if len < new_size_bytes {
                    file.set_len(new_size_bytes).map_err(|source| Error::Size { path, source })?;
                }
            }
            BackingKind::Device => {
                let path = self.path.clone().unwrap_or_default();
                let file = self.file.as_ref().ok_or(Error::NotResizable { kind: "device" })?;
                let device_bytes = block_device_bytes(file, &path)?;
                if device_bytes < new_size_bytes {
                    return Err(Error::DeviceTooSmall { path, device_bytes, size: new_size_bytes });
                }
            }
            BackingKind::Ram => return Err(Error::NotResizable { kind: "ram" }),
            BackingKind::Null => {}
        }
        self.capacity_bytes.store(new_size_bytes, Ordering::Release);
        Ok(())
    }
}

fn open_direct(path: &Path, config: &BackingConfig) -> Result<File, Error> {
    let open_err = |source| Error::Open { path: path.to_owned(), source };
    if config.kind == BackingKind::File && config.create && !path.exists() {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(open_err)?;
        }
        // The owner only: the file holds a VM's whole disk.
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(open_err)?;
        file.set_len(config.size_bytes).map_err(|source| Error::Size { path: path.to_owned(), source })?;
        file.sync_all().map_err(open_err)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!config.read_only)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let metadata = file.metadata().map_err(open_err)?;
    match config.kind {
        BackingKind::File => {
            if !metadata.is_file() {
                return Err(Error::NotAFile { path: path.to_owned() });
            }
            if metadata.len() < config.size_bytes {
                if config.read_only {
                    return Err(Error::DeviceTooSmall {
                        path: path.to_owned(),
                        device_bytes: metadata.len(),
                        size: config.size_bytes,
                    });
                }
                file.set_len(config.size_bytes).map_err(|source| Error::Size { path: path.to_owned(), source })?;
            }
        }
        BackingKind::Device => {
            if !metadata.file_type().is_block_device() {
                return Err(Error::NotABlockDevice { path: path.to_owned() });
            }
            let device_bytes = block_device_bytes(&file, path)?;
            if device_bytes < config.size_bytes {
                return Err(Error::DeviceTooSmall { path: path.to_owned(), device_bytes, size: config.size_bytes });
            }
        }
        BackingKind::Ram | BackingKind::Null => {}
    }
    Ok(file)
}

fn block_device_bytes(file: &File, path: &Path) -> Result<u64, Error> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes as *mut u64) };
    if rc != 0 {
        return Err(Error::Size { path: path.to_owned(), source: std::io::Error::last_os_error() });
    }
    Ok(bytes)
}

/// The O_DIRECT alignment (file offset, memory) the kernel asks of this file.
fn dio_alignment(file: &File, kind: BackingKind, path: &Path) -> Result<(u32, u32), Error> {
    if kind == BackingKind::Device {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut sector as *mut libc::c_int) };
        if rc != 0 || sector <= 0 {
            return Err(Error::Size { path: path.to_owned(), source: std::io::Error::last_os_error() });
        }
        let sector = sector as u32;
        return Ok((sector, sector));
    }
    // SAFETY: statx is plain old data; all-zeroes is a valid value that the kernel overwrites.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the path is an empty C string used with AT_EMPTY_PATH, and `stx`
    // is a live, writable statx the kernel fills in.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        return Ok((stx.stx_dio_offset_align, stx.stx_dio_mem_align.max(1)));
    }
    // Kernels or filesystems that do not report it: the page size is always enough.
    Ok((4096, 4096))
}
