//! systemd's readiness protocol (sd_notify(3)), spoken directly: one datagram of
//! `KEY=VALUE` lines to the Unix socket named by `$NOTIFY_SOCKET`, a path or, with a leading
//! '@', a name in the abstract namespace. The daemon says `READY=1` once its API socket
//! accepts (so `systemctl start hcblk` returns when `hcblk volume ...` works, and units ordered
//! after it start then) and `STOPPING=1` when a signal stops it.
//!
//! Written here rather than taken from libsystemd: the protocol is a single `sendto`, and the
//! daemon then needs no C library beyond libc to be installed.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use super::Error;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Where readiness and stop notifications go.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names; `None` if it is not set (not started by systemd as
    /// a notify service). A value that names no socket is refused: whoever set it waits for a
    /// readiness that would never come.
    pub fn from_env() -> Result<Option<Self>, Error> {
        std::env::var_os(NOTIFY_SOCKET_ENV).map(|value| Self::new(&value)).transpose()
    }

    /// A notifier for the address `value` (a `$NOTIFY_SOCKET` value).
    pub fn new(value: &OsStr) -> Result<Self, Error> {
        let bytes = value.as_bytes();
        let refused = |why: &str| Error::Invalid(format!("{NOTIFY_SOCKET_ENV}={value:?}: {why}"));
        let address = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(value).map_err(|e| refused(&e.to_string()))?,
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map_err(|e| refused(&e.to_string()))?,
            _ => return Err(refused("not an absolute path, nor an abstract socket name starting with '@'")),
        };
        let socket = UnixDatagram::unbound().map_err(Error::io("create the notification socket"))?;
        Ok(Self { socket, address })
    }

    /// `READY=1`, with a status line for `systemctl status`.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={status}"))
    }

    /// `STOPPING=1`: systemd shows the unit as deactivating while exports drain.
    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1\nSTATUS=stopping")
    }

    fn send(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.address)?;
        if sent != state.len() {
            return Err(io::Error::other(format!("sent {sent} of {} bytes", state.len())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buffer = [0u8; 512];
        let n = socket.recv(&mut buffer).unwrap();
        String::from_utf8(buffer[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifies_a_socket_at_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.as_os_str()).unwrap();
        notifier.ready("serving").unwrap();
        assert_eq!(received(&systemd), "READY=1\nSTATUS=serving");
        notifier.stopping().unwrap();
        assert_eq!(received(&systemd), "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        // Unique per run: the abstract namespace is shared by the whole network namespace.
        let name = format!("hcblk-notify-test-{}", std::process::id());
        let systemd = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.ready("x").unwrap();
        assert_eq!(received(&systemd), "READY=1\nSTATUS=x");
    }

    #[test]
    fn a_value_naming_no_socket_is_refused() {
        for value in ["", "relative/path", "vsock:2:1234"] {
            let err = Notifier::new(OsStr::new(value)).unwrap_err();
            assert!(err.to_string().starts_with("NOTIFY_SOCKET="), "{value}: {err}");
        }
        let too_long = format!("/{}", "x".repeat(200));
        assert!(Notifier::new(OsStr::new(&too_long)).is_err());
        // Nobody listening: the send fails, the caller decides (the daemon logs it).
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::new(dir.path().join("nobody").as_os_str()).unwrap();
        assert!(notifier.ready("x").is_err());
    }
}
