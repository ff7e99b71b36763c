//! Socket syscalls the standard library does not expose: vectored I/O from
//! and into registered memory, `MSG_DONTWAIT` sends, TCP timeouts.

use crate::mem::IoPtr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most iovecs per syscall (Linux `UIO_MAXIOV` is 1024).
pub(crate) const MAX_IOV: usize = 1024;

/// One element of an outgoing gather list: bytes we own or registered memory.
pub(crate) enum Chunk<'a> {
    Bytes(&'a [u8]),
    Mem(&'a IoPtr),
}

/// `sendmsg` of `chunks`, skipping the first `skip` bytes. Returns bytes sent.
pub(crate) fn send_vectored(
    fd: BorrowedFd<'_>,
    chunks: &[Chunk<'_>],
    mut skip: usize,
    dontwait: bool,
) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(chunks.len().min(MAX_IOV));
    for c in chunks {
        let (p, l) = match c {
            Chunk::Bytes(b) => (b.as_ptr() as *mut u8, b.len()),
            Chunk::Mem(m) => (m.ptr, m.len),
        };
        if skip >= l {
            skip -= l;
            continue;
        }
        iov.push(libc::iovec { iov_base: p.wrapping_add(skip).cast(), iov_len: l - skip });
        skip = 0;
        if iov.len() == MAX_IOV {
            break;
        }
    }
    if iov.is_empty() {
        return Ok(0);
    }
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    let flags = libc::MSG_NOSIGNAL | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: every iovec points either into a slice borrowed for this call
    // or into registered memory kept registered by the `IoPtr` the caller
    // borrows; the kernel only reads from them.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // n >= 0 checked above.
    Ok(n as usize)
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: `val` is a live c_int and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Abort the connection if sent data stays unacknowledged this long.
pub(crate) fn set_user_timeout(fd: BorrowedFd<'_>, ms: u32) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms.min(i32::MAX as u32) as libc::c_int)
}

/// `recv` into `buf`: `Ok(0)` is end of stream, `WouldBlock` no data.
/// With `wait`, blocks until `buf` is full (`MSG_WAITALL`, bounded by
/// `SO_RCVTIMEO`), else returns at once (`MSG_DONTWAIT`).
pub(crate) fn recv_some(fd: BorrowedFd<'_>, buf: &mut [u8], wait: bool) -> io::Result<usize> {
    let flags = if wait { libc::MSG_WAITALL } else { libc::MSG_DONTWAIT };
    loop {
        // SAFETY: `buf` is a live, exclusively borrowed byte slice of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            // n >= 0 checked.
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recvmsg` straight into registered memory, skipping the first `skip`
/// bytes of `pieces`; `wait` as for [`recv_some`]. `Ok(0)` is end of stream.
pub(crate) fn recv_into_some(fd: BorrowedFd<'_>, pieces: &[IoPtr], mut skip: usize, wait: bool) -> io::Result<usize> {
    let flags = if wait { libc::MSG_WAITALL } else { libc::MSG_DONTWAIT };
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(pieces.len().min(MAX_IOV));
    for p in pieces {
        if skip >= p.len {
            skip -= p.len;
            continue;
        }
        iov.push(libc::iovec { iov_base: p.ptr.wrapping_add(skip).cast(), iov_len: p.len - skip });
        skip = 0;
        if iov.len() == MAX_IOV {
            break;
        }
    }
    if iov.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "nothing left to receive"));
    }
    // SAFETY: all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    loop {
        // SAFETY: each iovec points into registered memory validated by
        // `Registry::local`/`check_remote` and kept registered by `pieces`;
        // writing there is what registration permits.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            // n >= 0 checked.
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits up to `timeout_ms` for `fd` to become readable (or hung up), or
/// also writable when `write`.
pub(crate) fn wait_fd(fd: BorrowedFd<'_>, write: bool, timeout_ms: i32) -> io::Result<bool> {
    let events = libc::POLLIN | if write { libc::POLLOUT } else { 0 };
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: one valid pollfd, count 1.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

/// A non-blocking eventfd: the "something to poll" signal a transport gives its caller.
pub(crate) struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }))
    }

    /// Makes the descriptor readable (adds 1 to its counter).
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to a descriptor this struct owns. A full
        // counter (EAGAIN) still leaves it readable, which is all a signal must do.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Makes it unreadable again (reads the counter back to 0).
    pub(crate) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from a non-blocking descriptor this struct
        // owns; EAGAIN (already clear) is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
