//! Who may connect to a volume's vhost-user socket, and binding it that way.
//!
//! Connecting to a Unix socket needs write permission on its file, and whoever connects to a
//! volume's socket is its VM: it reads and writes the whole disk. So the file's group and mode
//! are set on every bind (create, re-export at start, re-bind of a vanished file), never left
//! to the umask, and never wider than asked for, even for an instant: the mode is set on the
//! socket before `bind` (Linux creates the file with the socket's mode less the umask), and
//! the group and the exact mode on the file right after, before `listen`, so no frontend can
//! connect through looser permissions than the final ones.
//!
//! libvirt runs QEMU as an unprivileged user (`libvirt-qemu` on Debian) and never relabels
//! vhost-user sockets, so giving the sockets that user's group is how such a VM reaches its disk.

use std::ffi::CString;
use std::fs::{self, File, Permissions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

/// Mode of a volume socket without `--socket-group`: the daemon's user only.
pub const MODE_DEFAULT: u32 = 0o600;
/// Mode of a volume socket with `--socket-group`: the group may connect.
pub const MODE_GROUP_DEFAULT: u32 = 0o660;
/// Connections waiting to be accepted; a volume serves one frontend at a time, and QEMU
/// reconnecting is the only other one knocking.
const BACKLOG: i32 = 16;
/// Bound on the buffer `getgrnam_r` may ask for (a group listing every user of a large
/// directory service fits well within it).
const GROUP_BUFFER_BYTES_MAX: usize = 1 << 20;

/// Ownership and permissions of a volume's socket file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// The file's group; `None`: the daemon's own (primary) group. Default `None`.
    pub gid: Option<u32>,
    /// Permission bits (at most 0o777). Default [`MODE_DEFAULT`].
    pub mode: u32,
}

impl Default for SocketAccess {
    fn default() -> Self {
        Self { gid: None, mode: MODE_DEFAULT }
    }
}

/// Binds a listening Unix stream socket at `path` whose file has exactly `access`.
///
/// On failure no file is left at `path` (a file that was there before is not touched: `bind`
/// fails with `EADDRINUSE` on it).
pub fn bind_listener(path: &Path, access: &SocketAccess) -> io::Result<UnixListener> {
    assert!(access.mode <= 0o777, "socket mode {:o} has bits beyond the permissions", access.mode);
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    // fchmod on the socket itself: `bind` creates the file with this mode less the umask, so
    // it is never more open than `access.mode` (std's bind would use 0777 less the umask).
    let socket = File::from(OwnedFd::from(socket));
    socket.set_permissions(Permissions::from_mode(access.mode))?;
    let socket = Socket::from(OwnedFd::from(socket));
    socket.bind(&SockAddr::unix(path)?)?;
    let finish = || -> io::Result<()> {
        if let Some(gid) = access.gid {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        // Again on the file: the umask may have taken bits away (systemd's UMask=0077 does).
        fs::set_permissions(path, Permissions::from_mode(access.mode))?;
        socket.listen(BACKLOG)
    };
    if let Err(e) = finish() {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(OwnedFd::from(socket)))
}

/// Whether members of group `gid` may traverse the directory `metadata` describes (its
/// search bit for them).
pub fn group_can_traverse(metadata: &fs::Metadata, gid: u32) -> bool {
    let mode = metadata.mode();
    mode & 0o001 != 0 || (metadata.gid() == gid && mode & 0o010 != 0)
}

/// The id of group `name` (through NSS, as `chgrp` finds it), or `name` itself if it is a
/// number and no group has that name. `None`: no such group.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    match group_by_name(name)? {
        Some(gid) => Ok(Some(gid)),
        None => Ok(name.parse().ok()),
    }
}

fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "group name contains a NUL byte"))?;
    let mut buffer_bytes = 1024;
    loop {
        let mut buffer = vec![0 as libc::c_char; buffer_bytes];
        // SAFETY: `group` is a plain C struct of pointers and integers, for which all-zero
        // bytes are a valid value; getgrnam_r overwrites it.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `c_name` is NUL-terminated; `group`, `buffer` (of the length passed) and
        // `result` are live and writable for the whole call. The strings getgrnam_r stores in
        // `group` point into `buffer`, and only the integer `gr_gid` is read after it.
        let rc =
            unsafe { libc::getgrnam_r(c_name.as_ptr(), &mut group, buffer.as_mut_ptr(), buffer.len(), &mut result) };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(group.gr_gid)),
            libc::ERANGE if buffer_bytes < GROUP_BUFFER_BYTES_MAX => buffer_bytes *= 4,
            // getgrnam_r(3): these too mean "not found" for some NSS modules.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            rc => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn binds_with_exactly_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        // Under the usual umask 022, 0660 needs the chmod after bind (0640 without it).
        for mode in [0o600, 0o660, 0o640] {
            let path = dir.path().join(format!("{mode:o}.sock"));
            let listener = bind_listener(&path, &SocketAccess { gid: None, mode }).unwrap();
            let metadata = fs::metadata(&path).unwrap();
            assert!(metadata.file_type().is_socket());
            assert_eq!(metadata.mode() & 0o7777, mode);
            UnixStream::connect(&path).unwrap();
            drop(listener);
        }
    }

    #[test]
    fn gives_the_file_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        // Our own primary group: a chown any user may do.
        let gid = fs::metadata(dir.path()).unwrap().gid();
        let _listener = bind_listener(&path, &SocketAccess { gid: Some(gid), mode: 0o660 }).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().gid(), gid);
    }

    #[test]
    fn a_failed_bind_leaves_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        fs::write(&path, b"not ours").unwrap();
        let err = bind_listener(&path, &SocketAccess::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"not ours");
    }

    #[test]
    fn groups_by_name_and_number() {
        // base-passwd gives every Debian system group 0 named root.
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("4242").unwrap(), Some(4242));
        assert_eq!(group_id("no-such-group-hcblk").unwrap(), None);
        assert!(group_id("nul\0byte").is_err());
    }

    #[test]
    fn traversal_by_others_or_by_the_owning_group() {
        let dir = tempfile::tempdir().unwrap();
        let gid = fs::metadata(dir.path()).unwrap().gid();
        let other = gid.wrapping_add(1);
        for (mode, own_group, other_group) in [
            (0o700, false, false),
            (0o710, true, false),
            (0o750, true, false),
            (0o701, true, true),
            (0o755, true, true),
        ] {
            fs::set_permissions(dir.path(), Permissions::from_mode(mode)).unwrap();
            let metadata = fs::metadata(dir.path()).unwrap();
            assert_eq!(group_can_traverse(&metadata, gid), own_group, "{mode:o}");
            assert_eq!(group_can_traverse(&metadata, other), other_group, "{mode:o}");
        }
    }
}
