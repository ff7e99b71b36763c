//! Reserving 2 MiB hugepages for daemons under test, and giving them back.
//!
//! hcblk daemons refuse to start without free hugepages (`--hugepages-mb`), and this machine's
//! pool is empty by default. A [`Reservation`] raises `/proc/sys/vm/nr_hugepages` by the pages
//! it needs — relative to the current value, so other users of the pool keep theirs — checks
//! that the kernel really found them, and lowers it by the same number on drop.
//!
//! The read-modify-write of the sysctl is serialised between the processes of this crate by an
//! flock on [`LOCK_PATH`] (several test binaries may run at once) and between the threads of
//! one process by a mutex.

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::Mutex;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
/// Serialises the sysctl's read-modify-write between processes.
pub const LOCK_PATH: &str = "/tmp/hcblk-tests-hugepages.lock";
/// More pages than any test needs means a bug in the caller, not a bigger machine.
const PAGES_MAX: u64 = 4096;

static LOCAL: Mutex<()> = Mutex::new(());

/// Pages added to the pool by this value; removed again on drop.
#[derive(Debug)]
pub struct Reservation {
    pages: u64,
}

/// `HugePages_Total` and `HugePages_Free` from /proc/meminfo.
pub fn pool() -> Result<(u64, u64)> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    match (field("HugePages_Total:"), field("HugePages_Free:")) {
        (Some(t), Some(f)) => Ok((t, f)),
        _ => bail!("/proc/meminfo has no HugePages_Total/HugePages_Free: this kernel has no hugetlbfs"),
    }
}

/// Runs `f` holding both locks.
fn locked<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _local = LOCAL.lock().unwrap_or_else(|p| p.into_inner());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .with_context(|| format!("open {LOCK_PATH}"))?;
    flock(&file, libc::LOCK_EX)?;
    let r = f();
    // Closing the file releases the lock too; unlocking first just says so.
    let _ = flock(&file, libc::LOCK_UN);
    r
}

fn flock(file: &File, op: libc::c_int) -> Result<()> {
    // SAFETY: `file` is an open descriptor for the duration of the call; flock only changes
    // the advisory lock state of that open file description.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("flock {LOCK_PATH}"));
    }
    Ok(())
}

fn read_nr() -> Result<u64> {
    let s = fs::read_to_string(NR_HUGEPAGES).with_context(|| format!("read {NR_HUGEPAGES}"))?;
    s.trim().parse().with_context(|| format!("{NR_HUGEPAGES} holds {s:?}"))
}

fn write_nr(n: u64) -> Result<()> {
    fs::write(NR_HUGEPAGES, n.to_string())
        .with_context(|| format!("write {n} to {NR_HUGEPAGES} (hugepage reservation needs root)"))
}

impl Reservation {
    /// Adds `pages` free hugepages to the pool. Fails, with the pool restored, if the kernel
    /// could not find that many (fragmented memory).
    pub fn reserve(pages: u64) -> Result<Self> {
        if pages == 0 || pages > PAGES_MAX {
            bail!("hugepage reservation of {pages} pages (1..={PAGES_MAX})");
        }
        locked(|| {
            let before = read_nr()?;
            let (total_before, _) = pool()?;
            write_nr(before + pages)?;
            let (total, _) = pool()?;
            if total < total_before + pages {
                let _ = write_nr(before);
                bail!(
                    "asked the kernel for {pages} more hugepages ({before} -> {}), it found {}: \
                     not enough contiguous free memory",
                    before + pages,
                    total.saturating_sub(total_before)
                );
            }
            Ok(Self { pages })
        })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let pages = self.pages;
        let r = locked(|| {
            let now = read_nr()?;
            // Someone may have set an absolute value meanwhile; never go below zero.
            write_nr(now.saturating_sub(pages))
        });
        if let Err(e) = r {
            eprintln!("hugepages: could not give back {pages} pages: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_pool_is_readable() {
        let (total, free) = pool().unwrap();
        assert!(free <= total);
    }

    #[test]
    fn absurd_reservations_are_refused() {
        assert!(Reservation::reserve(0).is_err());
        assert!(Reservation::reserve(PAGES_MAX + 1).is_err());
    }
}
