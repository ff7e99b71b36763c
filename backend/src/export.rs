//! One volume exported on one vhost-user socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use crate::device::{BlkDevice, DeviceConfig};
use crate::request::ID_BYTES;
use crate::volume::{GuestMem, Volume};
use crate::{Error, PollConfig};

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

/// A running export of volume `V`. Dropping it (or `stop`) closes the socket and stops its
/// threads.
pub struct Export<V: Volume> {
    shared: Arc<ExportShared<V>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct ExportShared<V: Volume> {
    config: ExportConfig,
    volume: Arc<V>,
    stopping: AtomicBool,
    connected: AtomicBool,
    /// The device of the current (or next) connection.
    device: Mutex<Option<Arc<BlkDevice<V>>>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
}

impl<V: Volume> Export<V> {
    /// Binds the socket (refusing one that another process is listening on) and starts serving
    /// frontends on it, one at a time, until stopped.
    pub fn start(config: ExportConfig, volume: Arc<V>) -> Result<Self, Error> {
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
        let listener = Listener::new(&path, true)
            .map_err(|e| Error::Listen { path: path.clone(), source: std::io::Error::other(e) })?;
        let shared = Arc::new(ExportShared {
            config,
            volume,
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            device: Mutex::new(None),
            shutdown: Mutex::new(None),
        });
        // The first device is made here so that a bad configuration (or an empty hugepage pool)
        // fails `start` instead of a background thread.
        let first = shared.new_device()?;
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("export-{}", shared.config.name))
            .spawn(move || thread_shared.serve(listener, first))
            .map_err(Error::Daemon)?;
        tracing::info!(volume = %shared.config.name, socket = %path.display(), "exported");
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Grows the volume and tells a connected frontend through a config-change message.
    pub fn resize(&self, new_size_bytes: u64) -> Result<(), Error> {
        self.shared.volume.grow(new_size_bytes)?;
        let device = self.shared.device.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if self.is_connected() {
            if let Some(device) = device {
                match device.notify_config_change() {
                    Ok(true) => tracing::info!(volume = %self.shared.config.name, new_size_bytes, "frontend told of the new size"),
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

    /// Stops serving and waits for in-flight requests and threads to finish.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(device) = self.shared.device.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            device.stop();
        }
        if let Some(handle) = self.shared.shutdown.lock().unwrap_or_else(|p| p.into_inner()).take() {
            handle.shutdown();
        }
        // Wakes the accept() the serving thread may be blocked in.
        let _ = UnixStream::connect(&self.shared.config.socket_path);
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.shared.config.socket_path);
        tracing::info!(volume = %self.shared.config.name, "export stopped");
    }
}

impl<V: Volume> Drop for Export<V> {
    fn drop(&mut self) {
        self.shutdown();
    }
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
        };
        Ok(Arc::new(BlkDevice::new(config, Arc::clone(&self.volume))?))
    }

    /// Serves one frontend after another until the export stops.
    fn serve(&self, mut listener: Listener, first: Arc<BlkDevice<V>>) {
        let mut next = Some(first);
        while !self.stopping.load(Ordering::Acquire) {
            let device = match next.take().map_or_else(|| self.new_device(), Ok) {
                Ok(device) => device,
                Err(e) => {
                    tracing::error!(volume = %self.config.name, error = %e, "cannot set up the device; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            *self.device.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&device));
            if let Err(e) = self.serve_one(&mut listener, &device) {
                if !self.stopping.load(Ordering::Acquire) {
                    tracing::warn!(volume = %self.config.name, error = %e, "connection ended with an error");
                }
            }
        }
    }

    fn serve_one(&self, listener: &mut Listener, device: &Arc<BlkDevice<V>>) -> Result<(), String> {
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let mut daemon = VhostUserDaemon::new(self.config.name.clone(), Arc::clone(device), mem)
            .map_err(|e| e.to_string())?;
        let handlers = daemon.get_epoll_handlers();
        for (thread, handler) in handlers.iter().enumerate() {
            if let Some((fd, id)) = device.completion_event(thread) {
                handler.register_listener(fd, EventSet::IN, id).map_err(|e| e.to_string())?;
            }
        }
        let started = daemon.start(listener).map_err(|e| e.to_string());
        let result = if self.stopping.load(Ordering::Acquire) {
            // The connection was our own wake-up call from `Export::stop`.
            Ok(())
        } else if let Err(e) = started {
            Err(e)
        } else {
            tracing::info!(volume = %self.config.name, "frontend connected");
            *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
            self.connected.store(true, Ordering::Release);
            let waited = daemon.wait().map_err(|e| e.to_string());
            self.connected.store(false, Ordering::Release);
            *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tracing::info!(volume = %self.config.name, "frontend disconnected");
            waited
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
