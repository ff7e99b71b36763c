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
pub(crate) fn send_vectored(fd: BorrowedFd<'_>, chunks: &[Chunk<'_>], mut skip: usize, dontwait: bool) -> io::Result<usize> {
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

/// Reads exactly the bytes the pieces cover, straight into them.
pub(crate) fn recv_exact_into(fd: BorrowedFd<'_>, pieces: &[IoPtr]) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = pieces.iter().map(IoPtr::iovec).collect();
    let mut start = 0usize;
    while start < iov.len() {
        let cnt = (iov.len() - start).min(MAX_IOV);
        // SAFETY: all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[start..].as_mut_ptr();
        msg.msg_iovlen = cnt;
        // SAFETY: each iovec points into registered memory validated by
        // `Registry::local`/`check_remote` and kept registered by `pieces`;
        // writing there is what registration permits.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // n > 0 checked above.
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            let v = &mut iov[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: `val` is a live c_int and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, opt, (&val as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
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
