//! The seam between the control plane and the data path: the volume managers start, resize
//! and stop exports through these traits, so their logic (validation, rollback, persistence)
//! is tested against [`fake::FakeExporter`] without a vhost-user frontend.
//!
//! An exporter serves volumes of type `V`: the local shard ([`replica::Backing`]) for the
//! standalone manager, the replicated volume for the cluster's (through
//! [`Attacher`](super::attach::Attacher), which also claims the volume in etcd).

use std::sync::{Arc, Mutex};

use crate::{Export, ExportConfig, SocketAccess, Volume};

pub trait Exporter<V: Volume> {
    type Handle: ExportHandle;
    /// Binds `config.socket_path` and serves frontends on it until the handle is stopped.
    fn start(&self, config: ExportConfig, volume: Arc<V>) -> Result<Self::Handle, crate::Error>;
}

/// `Send`: a daemon that stops stops its exports side by side (their drains overlap).
pub trait ExportHandle: Send {
    /// Grows the backing and tells a connected frontend.
    fn resize(&self, new_size_bytes: u64) -> Result<(), crate::Error>;
    fn is_connected(&self) -> bool;
    /// Guest requests refused since the export started.
    fn rejected_requests(&self) -> u64;
    /// Stops serving, waits for in-flight requests and removes the socket.
    fn stop(self);
}

/// Runs `stop` on every item, each on a thread of its own (here, if one cannot be started),
/// and returns once all have returned: a daemon's exports stop side by side, so their drains
/// overlap and the whole stop takes about as long as the slowest one.
pub(crate) fn stop_side_by_side<T: Send>(items: impl IntoIterator<Item = T>, stop: impl Fn(T) + Sync) {
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|item| Mutex::new(Some(item))).collect();
    let run = |slot: &Mutex<Option<T>>| {
        let item = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(item) = item {
            stop(item);
        }
    };
    std::thread::scope(|scope| {
        for slot in &slots {
            if std::thread::Builder::new().name("stop-export".into()).spawn_scoped(scope, || run(slot)).is_err() {
                run(slot);
            }
        }
    });
}

/// The real data path: [`Export`] over vhost-user.
#[derive(Clone, Copy, Debug, Default)]
pub struct VhostUser {
    /// Group and mode of every volume socket (`--socket-group`, `--socket-mode`): a property
    /// of the daemon, not of a volume, so it lives here rather than in each `ExportConfig`.
    pub socket_access: SocketAccess,
}

impl<V: Volume> Exporter<V> for VhostUser {
    type Handle = Export<V>;
    fn start(&self, config: ExportConfig, volume: Arc<V>) -> Result<Export<V>, crate::Error> {
        Export::start_with_access(config, volume, self.socket_access)
    }
}

impl<V: Volume> ExportHandle for Export<V> {
    fn resize(&self, new_size_bytes: u64) -> Result<(), crate::Error> {
        Export::resize(self, new_size_bytes)
    }
    fn is_connected(&self) -> bool {
        Export::is_connected(self)
    }
    fn rejected_requests(&self) -> u64 {
        Export::rejected_requests(self)
    }
    fn stop(self) {
        Export::stop(self);
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{ExportHandle, Exporter};
    use crate::{ExportConfig, Volume};

    /// Behaves like the real export at the socket level (binds it, refuses one in use, removes
    /// it on stop) and grows the volume on resize; failures can be injected.
    #[derive(Default)]
    pub(crate) struct FakeExporter {
        pub fail_start: AtomicBool,
        pub fail_resize: Arc<AtomicBool>,
        /// What every export reports as `is_connected`.
        pub connected: Arc<AtomicBool>,
        pub started: Mutex<Vec<ExportConfig>>,
    }

    pub(crate) struct FakeExport<V> {
        _listener: UnixListener,
        path: PathBuf,
        volume: Arc<V>,
        fail_resize: Arc<AtomicBool>,
        connected: Arc<AtomicBool>,
    }

    impl<V: Volume> Exporter<V> for FakeExporter {
        type Handle = FakeExport<V>;
        fn start(&self, config: ExportConfig, volume: Arc<V>) -> Result<FakeExport<V>, crate::Error> {
            if self.fail_start.load(Ordering::Relaxed) {
                return Err(crate::Error::Config("injected start failure".into()));
            }
            let path = config.socket_path.clone();
            if path.exists() {
                if UnixStream::connect(&path).is_ok() {
                    return Err(crate::Error::SocketInUse { path });
                }
                std::fs::remove_file(&path).map_err(|source| crate::Error::Listen { path: path.clone(), source })?;
            }
            let listener =
                UnixListener::bind(&path).map_err(|source| crate::Error::Listen { path: path.clone(), source })?;
            self.started.lock().unwrap().push(config);
            Ok(FakeExport {
                _listener: listener,
                path,
                volume,
                fail_resize: Arc::clone(&self.fail_resize),
                connected: Arc::clone(&self.connected),
            })
        }
    }

    impl<V: Volume> ExportHandle for FakeExport<V> {
        fn resize(&self, new_size_bytes: u64) -> Result<(), crate::Error> {
            if self.fail_resize.load(Ordering::Relaxed) {
                return Err(crate::Error::ConfigChange(std::io::Error::other("injected resize failure")));
            }
            self.volume.grow(new_size_bytes)
        }
        fn is_connected(&self) -> bool {
            self.connected.load(Ordering::Relaxed)
        }
        fn rejected_requests(&self) -> u64 {
            // No guest ever reaches a fake export.
            0
        }
        fn stop(self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use super::stop_side_by_side;

    #[test]
    fn exports_stop_side_by_side_each_once() {
        let stopped: Vec<AtomicU32> = (0..6).map(|_| AtomicU32::new(0)).collect();
        let started = Instant::now();
        // Six stops of 300 ms each: 1.8 s one after the other.
        stop_side_by_side(0..6, |i: usize| {
            std::thread::sleep(Duration::from_millis(300));
            stopped[i].fetch_add(1, Ordering::Relaxed);
        });
        let took = started.elapsed();
        assert!(stopped.iter().all(|n| n.load(Ordering::Relaxed) == 1), "every item stopped once: {stopped:?}");
        assert!(took < Duration::from_millis(1200), "the stops did not overlap: {took:?}");
    }
}
