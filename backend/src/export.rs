//! One volume exported on one vhost-user socket.
//!
//! A serving thread waits for a frontend, serves it until it goes away, and waits for the next
//! one (one at a time: every connection gets a fresh device over the same volume). While it
//! waits it watches the listening socket and a stop eventfd in one epoll set, and wakes at
//! least every [`SOCKET_CHECK`] to check that the socket file still names its socket: a file
//! removed under a running daemon (by an operator, a tmpfiles cleaner) is bound again, with a
//! warning, instead of leaving the volume unreachable for the next frontend. A file someone
//! else is listening on is left alone (and reported).
//!
//! Every bind gives the file the export's [`SocketAccess`] (group and mode), so that a
//! re-bound file lets in the same frontends as the first one.
//!
//! Stopping never depends on the file. With a frontend connected, the pollers first take no new
//! request and complete the ones they have (`BlkDevice::drain`), so that the guest sees them
//! done and the next daemon has nothing to resubmit; then the stop signals the eventfd (and
//! shuts the frontend's socket down) and waits for the serving thread: all within
//! [`STOP_TIMEOUT`].

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{BlkDevice, DeviceConfig};
use crate::request::ID_BYTES;
use crate::socket::{self, SocketAccess};
use crate::volume::{GuestMem, Volume};
use crate::{Error, PollConfig, Rejections};

/// Longest the serving thread waits between two checks of the socket file.
pub const SOCKET_CHECK: Duration = Duration::from_secs(1);
/// Longest `stop` (and drop) takes: the connected frontend's requests in flight drain first,
/// into the used rings, before the connection is closed (normally in milliseconds), then the
/// serving thread ends. Requests still in flight at this bound (a disk that does not answer)
/// are left behind with an error in the log, and so is a thread still busy; such requests
/// are still marked in the frontend's inflight region, so the next daemon resubmits them.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Epoll ids of the serving thread's waits.
/// How long a second frontend waits, while the volume has one, before it is closed: time for
/// the first to be seen leaving when the second is the same VM reconnecting at once.
const REFUSE_AFTER: Duration = Duration::from_secs(1);
const LISTENER_EVENT: u64 = 0;
const STOP_EVENT: u64 = 1;

#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Volume name, for logs.
    pub name: String,
    pub socket_path: PathBuf,
    /// Virtqueues offered (BLK_F_MQ). Default 1.
    pub num_queues: u16,
    /// Largest virtqueue the frontend may configure. Default 256.
    pub queue_size: u16,
    /// Returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes are sent).
    pub serial: String,
    pub poll: PollConfig,
}

/// Why one frontend connection ended badly. The export carries on with the next frontend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    #[error("cannot set up the vhost-user device")]
    Setup(#[source] vhost_user_backend::Error),
    #[error("cannot watch the completions of poller {thread}")]
    Completions {
        thread: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot accept the frontend")]
    Accept(#[source] vhost_user_backend::Error),
    #[error("the frontend connection failed")]
    Connection(#[source] vhost_user_backend::Error),
}

/// A running export of volume `V`. Dropping it (or `stop`) closes the socket and stops its
/// threads.
pub struct Export<V: Volume> {
    shared: Arc<ExportShared<V>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Disconnected once the serving thread has ended (its sender is dropped, even by a
    /// panic): what `stop` waits on, with a timeout, before joining it.
    finished: mpsc::Receiver<()>,
}

struct ExportShared<V: Volume> {
    config: ExportConfig,
    volume: Arc<V>,
    stopping: AtomicBool,
    connected: AtomicBool,
    /// The device of the current (or next) connection.
    device: Mutex<Option<Arc<BlkDevice<V>>>>,
    /// Ends the current connection; published before `stopping` is looked at (see
    /// `serve_one`), so that `stop` either finds it or the serving thread sees `stopping`.
    shutdown: Mutex<Option<ShutdownHandle>>,
    /// Wakes the serving thread out of its wait for a frontend.
    stop_event: EventFd,
    /// Group and mode of the socket file, at every bind.
    access: SocketAccess,
    /// (device, inode) of the socket file the export bound last: only that file is removed
    /// at stop, never one another process bound at the same path.
    bound: Mutex<Option<(u64, u64)>>,
    /// Guest requests refused, over every connection.
    rejections: Arc<Rejections>,
}

/// The listening socket and the identity of the file it was bound at.
struct Bound {
    listener: Listener,
    id: Option<(u64, u64)>,
}

/// The (device, inode) of the file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn bind(path: &Path, access: &SocketAccess) -> io::Result<Bound> {
    let listener = socket::bind_listener(path, access)?;
    let id = file_id(path);
    // From a UnixListener, vhost's Listener does not remove the file when dropped: the export
    // decides (only its own file, at stop).
    Ok(Bound { listener: Listener::from(listener), id })
}

/// The error and its causes on one line, `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    // Bounded: error chains are short, but a cyclic source() would otherwise never end.
    for _ in 0..16 {
        let Some(c) = cause else { break };
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl<V: Volume> Export<V> {
    /// [`Export::start_with_access`] with the default [`SocketAccess`]: the file is the
    /// daemon's user's only.
    pub fn start(config: ExportConfig, volume: Arc<V>) -> Result<Self, Error> {
        Self::start_with_access(config, volume, SocketAccess::default())
    }

    /// Binds the socket (refusing one that another process is listening on), its file with
    /// `access`, and starts serving frontends on it, one at a time, until stopped.
    pub fn start_with_access(config: ExportConfig, volume: Arc<V>, access: SocketAccess) -> Result<Self, Error> {
        let path = config.socket_path.clone();
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(Error::SocketInUse { path });
            }
            // Left over by a process that is gone.
            std::fs::remove_file(&path).map_err(|source| Error::Listen { path: path.clone(), source })?;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Listen { path: path.clone(), source })?;
        }
        let bound = bind(&path, &access).map_err(|source| Error::Listen { path: path.clone(), source })?;
        let stop_event = EventFd::new(EFD_NONBLOCK).map_err(Error::Daemon)?;
        let shared = Arc::new(ExportShared {
            config,
            volume,
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            device: Mutex::new(None),
            shutdown: Mutex::new(None),
            stop_event,
            access,
            bound: Mutex::new(bound.id),
            rejections: Arc::new(Rejections::default()),
        });
        // The first device is made here so that a bad configuration (or an empty hugepage pool)
        // fails `start` instead of a background thread.
        let first = shared.new_device()?;
        let epoll = shared.new_epoll(&bound).map_err(Error::Daemon)?;
        let thread_shared = Arc::clone(&shared);
        let (finished_tx, finished) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("export-{}", shared.config.name))
            .spawn(move || {
                let _finished = finished_tx;
                thread_shared.serve(bound, epoll, first);
            })
            .map_err(Error::Daemon)?;
        tracing::info!(volume = %shared.config.name, socket = %path.display(), "exported");
        Ok(Self { shared, thread: Some(thread), finished })
    }

    /// Grows the volume and tells a connected frontend through a config-change message.
    pub fn resize(&self, new_size_bytes: u64) -> Result<(), Error> {
        self.shared.volume.grow(new_size_bytes)?;
        let device = self.shared.device.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if self.is_connected() {
            if let Some(device) = device {
                match device.notify_config_change() {
                    Ok(true) => {
                        tracing::info!(volume = %self.shared.config.name, new_size_bytes, "frontend told of the new size")
                    }
                    Ok(false) => tracing::info!(
                        volume = %self.shared.config.name,
                        "frontend has no backend-request channel; it sees the new size on its next GET_CONFIG"
                    ),
                    Err(e) => return Err(Error::ConfigChange(e)),
                }
            }
        }
        Ok(())
    }

    pub fn socket_path(&self) -> &Path {
        &self.shared.config.socket_path
    }

    pub fn volume(&self) -> &Arc<V> {
        &self.shared.volume
    }

    /// Whether a frontend is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Requests completed on the current (or, once it ended, the last) frontend connection;
    /// each connection starts counting from zero.
    pub fn completed_requests(&self) -> u64 {
        let device = self.shared.device.lock().unwrap_or_else(|p| p.into_inner()).clone();
        device.map_or(0, |d| d.completed_requests())
    }

    /// Guest requests refused (malformed descriptor chains, sectors out of range, ...) since
    /// the export started, over every connection.
    pub fn rejected_requests(&self) -> u64 {
        self.shared.rejections.count()
    }

    /// Stops serving and waits (at most [`STOP_TIMEOUT`]) for in-flight requests and threads
    /// to finish.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        let name = &self.shared.config.name;
        let started = Instant::now();
        let deadline = started + STOP_TIMEOUT;
        self.shared.stopping.store(true, Ordering::SeqCst);
        let device = self.shared.device.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(device) = device {
            if self.shared.connected.load(Ordering::Acquire) {
                // Before the connection closes: the guest gets its completions (and their
                // interrupts) from us, and the next daemon finds nothing to resubmit.
                if device.drain(deadline) {
                    tracing::debug!(volume = %name, elapsed_us = started.elapsed().as_micros() as u64, "export drained");
                } else {
                    tracing::error!(volume = %name, "requests still in flight {STOP_TIMEOUT:?} after the stop request; the next start resubmits them");
                }
            } else {
                device.stop();
            }
        }
        if let Some(handle) = self.shared.shutdown.lock().unwrap_or_else(|p| p.into_inner()).take() {
            handle.shutdown();
        }
        if let Err(e) = self.shared.stop_event.write(1) {
            tracing::error!(volume = %name, error = %e, "cannot wake the serving thread");
        }
        match self.finished.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!(volume = %name, "export still busy {STOP_TIMEOUT:?} after the stop request; leaving its thread behind");
            }
            // The sender is only ever dropped: the thread is done, the join returns at once.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    tracing::error!(volume = %name, "the export's serving thread panicked");
                }
            }
        }
        let path = &self.shared.config.socket_path;
        let ours = *self.shared.bound.lock().unwrap_or_else(|p| p.into_inner());
        if ours.is_some() && file_id(path) == ours {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(volume = %name, "export stopped");
    }
}

impl<V: Volume> Drop for Export<V> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the wait for a frontend ended with.
enum Wake {
    Frontend,
    Stop,
    /// Nothing within `SOCKET_CHECK`.
    Timeout,
}

impl<V: Volume> ExportShared<V> {
    fn new_device(&self) -> Result<Arc<BlkDevice<V>>, Error> {
        let mut serial = [0u8; ID_BYTES];
        let bytes = self.config.serial.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&bytes[..n]);
        let config = DeviceConfig {
            name: self.config.name.clone(),
            num_queues: self.config.num_queues,
            queue_size: self.config.queue_size,
            serial,
            poll: self.config.poll.clone(),
            rejections: Arc::clone(&self.rejections),
        };
        Ok(Arc::new(BlkDevice::new(config, Arc::clone(&self.volume))?))
    }

    fn new_epoll(&self, bound: &Bound) -> io::Result<Epoll> {
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, bound.listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_EVENT))?;
        epoll.ctl(ControlOperation::Add, self.stop_event.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_EVENT))?;
        Ok(epoll)
    }

    fn wait(&self, epoll: &Epoll) -> io::Result<Wake> {
        let mut events = [EpollEvent::default(); 2];
        let timeout_ms = i32::try_from(SOCKET_CHECK.as_millis()).unwrap_or(i32::MAX);
        let n = match epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Wake::Timeout),
            Err(e) => return Err(e),
        };
        let ready = &events[..n.min(events.len())];
        if ready.iter().any(|e| e.data() == STOP_EVENT) {
            return Ok(Wake::Stop);
        }
        Ok(if ready.iter().any(|e| e.data() == LISTENER_EVENT) { Wake::Frontend } else { Wake::Timeout })
    }

    /// Serves one frontend after another until the export stops.
    fn serve(&self, mut bound: Bound, epoll: Epoll, first: Arc<BlkDevice<V>>) {
        let mut next = Some(first);
        // The last problem with the socket file that was logged, so that a lasting one is
        // logged once, not every SOCKET_CHECK.
        let mut socket_problem: Option<String> = None;
        while !self.stopping.load(Ordering::SeqCst) {
            match self.wait(&epoll) {
                Ok(Wake::Frontend) => {}
                Ok(Wake::Stop) => break,
                Ok(Wake::Timeout) => {
                    self.check_socket_file(&mut bound, &epoll, &mut socket_problem);
                    continue;
                }
                Err(e) => {
                    tracing::error!(volume = %self.config.name, error = %e, "cannot wait for a frontend; retrying in 1 s");
                    std::thread::sleep(SOCKET_CHECK);
                    continue;
                }
            }
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let device = match next.take().map_or_else(|| self.new_device(), Ok) {
                Ok(device) => device,
                Err(e) => {
                    tracing::error!(volume = %self.config.name, error = %chain(&e), "cannot set up the device; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            *self.device.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&device));
            match self.serve_one(&mut bound.listener, &device) {
                Ok(()) => {}
                Err(e) if self.stopping.load(Ordering::SeqCst) => {
                    tracing::debug!(volume = %self.config.name, error = %chain(&e), "connection ended by the stop");
                }
                Err(e @ ConnectionError::Accept(_)) => {
                    // Not the frontend's doing (out of descriptors, say): do not spin on it.
                    tracing::warn!(volume = %self.config.name, error = %chain(&e), "cannot accept a frontend; retrying in 100 ms");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    tracing::warn!(volume = %self.config.name, error = %chain(&e), "connection ended with an error")
                }
            }
        }
    }

    /// Binds the socket again if its file is gone, or is a stale socket of some other process.
    fn check_socket_file(&self, bound: &mut Bound, epoll: &Epoll, logged: &mut Option<String>) {
        let path = &self.config.socket_path;
        let now = file_id(path);
        if now.is_some() && now == bound.id {
            *logged = None;
            return;
        }
        let mut report = |problem: String, error: bool| {
            if logged.as_deref() != Some(problem.as_str()) {
                if error {
                    tracing::error!(volume = %self.config.name, socket = %path.display(), "{problem}");
                } else {
                    tracing::warn!(volume = %self.config.name, socket = %path.display(), "{problem}");
                }
                *logged = Some(problem);
            }
        };
        if now.is_some() {
            if UnixStream::connect(path).is_ok() {
                report("the socket file was replaced by one another process listens on; leaving it alone".into(), true);
                return;
            }
            if let Err(e) = std::fs::remove_file(path) {
                report(format!("the socket file was replaced and cannot be removed: {e}"), true);
                return;
            }
        }
        let new = match bind(path, &self.access) {
            Ok(new) => new,
            Err(e) => {
                report(format!("the socket file is gone and cannot be bound again: {e}"), true);
                return;
            }
        };
        let swapped = epoll
            .ctl(ControlOperation::Add, new.listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_EVENT))
            .and_then(|()| epoll.ctl(ControlOperation::Delete, bound.listener.as_raw_fd(), EpollEvent::default()));
        if let Err(e) = swapped {
            let _ = std::fs::remove_file(path);
            report(format!("the socket file is gone and its new socket cannot be watched: {e}"), true);
            return;
        }
        *bound = new;
        *self.bound.lock().unwrap_or_else(|p| p.into_inner()) = bound.id;
        *logged = None;
        tracing::warn!(volume = %self.config.name, socket = %path.display(), "the socket file had vanished; bound a new one");
    }

    /// Waits for the connection to end while closing every other frontend that connects
    /// meanwhile (after [`REFUSE_AFTER`]). A volume has one frontend at a time; left in the listen backlog, a second one
    /// (the volume attached to another VM by mistake) would wait for its handshake's answer with
    /// its whole main loop blocked, monitor included, for as long as the first VM keeps the
    /// volume. Closed at once, its `device_add` (or start) fails in a moment instead.
    fn wait_turning_away_others(
        &self,
        daemon: &mut VhostUserDaemon<Arc<BlkDevice<V>>>,
        listener: &Listener,
    ) -> vhost_user_backend::Result<()> {
        let done = match EventFd::new(EFD_NONBLOCK) {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(volume = %self.config.name, error = %e, "cannot watch for other frontends while one is connected");
                return daemon.wait();
            }
        };
        // Non-blocking while watched: a frontend that gives up between readiness and accept
        // must not leave the watcher blocked in accept().
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::warn!(volume = %self.config.name, error = %e, "cannot watch for other frontends while one is connected");
            return daemon.wait();
        }
        let waited = std::thread::scope(|scope| {
            scope.spawn(|| self.turn_away_others(listener, &done));
            let waited = daemon.wait();
            if let Err(e) = done.write(1) {
                // Without the wake-up the watcher would never return and the scope never end.
                tracing::error!(volume = %self.config.name, error = %e, "cannot stop the watch for other frontends");
                debug_assert!(false, "eventfd write failed: {e}");
            }
            waited
        });
        if let Err(e) = listener.set_nonblocking(false) {
            tracing::error!(volume = %self.config.name, error = %e, "cannot make the listener blocking again");
        }
        waited
    }

    fn turn_away_others(&self, listener: &Listener, done: &EventFd) {
        const OTHER: u64 = 0;
        const DONE: u64 = 1;
        let watch = Epoll::new().and_then(|epoll| {
            epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, OTHER))?;
            epoll.ctl(ControlOperation::Add, done.as_raw_fd(), EpollEvent::new(EventSet::IN, DONE))?;
            Ok(epoll)
        });
        // The end of the current connection alone: a frontend that reconnects at once (a VM
        // restarted, a client that closed and opened again) may come before this connection's
        // thread has seen the old one close, and must then be served, not refused.
        let watch = watch.and_then(|epoll| {
            let ended = Epoll::new()?;
            ended.ctl(ControlOperation::Add, done.as_raw_fd(), EpollEvent::new(EventSet::IN, DONE))?;
            Ok((epoll, ended))
        });
        let (epoll, ended) = match watch {
            Ok(both) => both,
            Err(e) => {
                tracing::warn!(volume = %self.config.name, error = %e, "cannot watch for other frontends; they will wait in the backlog");
                return;
            }
        };
        let mut refused = 0u64;
        let mut ready = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(volume = %self.config.name, error = %e, "cannot watch for other frontends; they will wait in the backlog");
                    return;
                }
            };
            if ready[..n].iter().any(|e| e.data() == DONE) {
                return;
            }
            // Another frontend waits: refused only if the current one is still there after
            // a grace period; if it leaves meanwhile, the waiting one is the next to be served.
            match ended.wait(REFUSE_AFTER.as_millis() as i32, &mut ready[..1]) {
                Ok(0) => {}
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(volume = %self.config.name, error = %e, "cannot watch for other frontends; they will wait in the backlog");
                    return;
                }
            }
            match listener.accept() {
                Ok(Some(other)) => {
                    drop(other);
                    refused += 1;
                    // A line per doubling: a frontend with reconnect-ms retries for ever.
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            volume = %self.config.name,
                            refused,
                            "another frontend connected while the volume has one; closed it (detach the volume from the other VM first)"
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(volume = %self.config.name, error = %e, "cannot accept (to refuse) another frontend; retrying in 100 ms");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn serve_one(&self, listener: &mut Listener, device: &Arc<BlkDevice<V>>) -> Result<(), ConnectionError> {
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let mut daemon =
            VhostUserDaemon::new(self.config.name.clone(), Arc::clone(device), mem).map_err(ConnectionError::Setup)?;
        let handlers = daemon.get_epoll_handlers();
        for (thread, handler) in handlers.iter().enumerate() {
            if let Some((fd, id)) = device.completion_event(thread) {
                handler
                    .register_listener(fd, EventSet::IN, id)
                    .map_err(|source| ConnectionError::Completions { thread, source })?;
            }
        }
        // The listener is readable: a frontend is waiting, so this accept does not block.
        let result = match daemon.start(listener) {
            Err(e) => Err(ConnectionError::Accept(e)),
            Ok(()) => {
                let handle = daemon.shutdown_handle();
                *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = handle.clone();
                if self.stopping.load(Ordering::SeqCst) {
                    // `stop` may have looked for the handle before it was published.
                    if let Some(handle) = handle {
                        handle.shutdown();
                    }
                }
                tracing::info!(volume = %self.config.name, "frontend connected");
                self.connected.store(true, Ordering::Release);
                let waited = match self.wait_turning_away_others(&mut daemon, listener) {
                    // The frontend closed the socket between two messages: the VM stopped, was
                    // killed, or the volume was hot-unplugged. The normal end of a connection,
                    // not a warning. (One that closes it halfway through a message is still
                    // reported: `PartialMessage`.)
                    Err(vhost_user_backend::Error::HandleRequest(VhostUserError::Disconnected)) => Ok(()),
                    other => other.map_err(ConnectionError::Connection),
                };
                self.connected.store(false, Ordering::Release);
                *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(volume = %self.config.name, "frontend disconnected");
                waited
            }
        };
        // Pollers finish what is in flight, then the worker threads exit (dropping the daemon
        // joins them); only then may the volume forget the guest's memory.
        device.stop();
        for handler in &handlers {
            handler.send_exit_event();
        }
        drop(handlers);
        drop(daemon);
        device.disconnected();
        result
    }
}
