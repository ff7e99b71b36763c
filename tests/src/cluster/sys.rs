//! The two syscalls the harness makes outside netlink: who we are, and
//! moving a thread into a network namespace.

use anyhow::{Context, Result};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Moves the calling thread into the network namespace at `path` (a file
/// under /run/netns); other threads are unaffected.
pub fn setns(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: `f` is an open namespace file for the duration of the call;
    // setns only changes this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns(CLONE_NEWNET) into {}", path.display()));
    }
    Ok(())
}
