//! What a thread with nothing to do sleeps on: one epoll set over every source of work for a
//! replicated volume's core — the replica connections' notification fds, the local member's
//! disk completion eventfds, and a wake eventfd for the metadata and connector threads — and
//! a second set that adds the guest-completion eventfd, which is what the poller sleeps on.
//!
//! An epoll fd is itself pollable, so the poller's `completion_eventfd` can be the outer set:
//! a poller asleep with requests in flight wakes for a replica's reply as for a completion,
//! and drives the core itself instead of waiting for another thread to.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub(crate) struct EpollSet {
    fd: OwnedFd,
    members: BTreeSet<RawFd>,
}

impl EpollSet {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(raw) }, members: BTreeSet::new() })
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
        // SAFETY: `ev` is a live epoll_event; `fd` is an open descriptor the caller keeps open
        // while it is a member (`sync` removes descriptors before their owners close them).
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn add(&mut self, fd: RawFd) -> io::Result<()> {
        if self.members.insert(fd) {
            self.ctl(libc::EPOLL_CTL_ADD, fd)?;
        }
        Ok(())
    }

    /// Makes the set exactly `fds` (plus what was added with `add` and is listed in `keep`).
    pub(crate) fn sync(&mut self, fds: &BTreeSet<RawFd>, keep: &[RawFd]) {
        let gone: Vec<RawFd> =
            self.members.iter().copied().filter(|fd| !fds.contains(fd) && !keep.contains(fd)).collect();
        for fd in gone {
            self.members.remove(&fd);
            // A descriptor closed already left the set by itself (ENOENT/EBADF): fine.
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd);
        }
        for &fd in fds {
            if !self.members.contains(&fd) {
                if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, fd) {
                    tracing::warn!(fd, error = %e, "cannot watch a descriptor; its events are seen on the next timer");
                    continue;
                }
                self.members.insert(fd);
            }
        }
    }
}

/// Sleeps until `fd` is readable or `timeout` passes (microsecond precision).
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: one live pollfd and a live timespec; no signal mask change.
    unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
}

/// Resets a non-blocking eventfd (its owner keeps it open while it is passed here).
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd kept open by its owner.
    let _ = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
}

/// Makes a (non-blocking) eventfd readable.
pub(crate) fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to an eventfd kept open by its owner.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}
