//! `hcblk daemon`: preflight, re-export every volume, serve the local API until a signal.
//!
//! Threads: one accepts API connections; one per connection (at most
//! [`api::CONNECTIONS_MAX`]) reads its request under a timeout; they hand decoded requests to
//! the main thread, which alone owns the volumes and carries requests out one at a time. So
//! operations never interleave, and exports need not be shareable between threads.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::api::{self, Request, Response};
use super::exporter::{Exporter, VhostUser};
use super::volumes::Volumes;
use super::Error;
use crate::PollConfig;

/// `hcblk daemon`, validated. Paths are absolute.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Metadata and file backings (`DATA_DIR/volumes/`). Default /var/lib/hcblk.
    pub data_dir: PathBuf,
    /// One vhost-user socket per volume, `SOCKET_DIR/NAME.sock`. Default /run/hcblk.
    pub socket_dir: PathBuf,
    /// The local API. Default /run/hcblk/api.sock.
    pub api_socket: PathBuf,
    /// Default: adaptive, 1000 us idle, pinned to every online core.
    pub poll: PollConfig,
    /// Free hugepage memory required at start, for the data path's own buffers. Default 64.
    pub hugepages_mb: u32,
}

/// Requests flow from connection threads to the main thread.
enum Event {
    Request(Request, mpsc::Sender<Response>),
    Signal(i32),
}

pub fn run(config: DaemonConfig) -> Result<(), Error> {
    check_hugepages(replica::free_hugepages(), config.hugepages_mb)?;
    // Before creating anything: a second daemon must leave the first one's files alone.
    check_api_socket(&config.api_socket)?;
    for dir in [&config.data_dir, &config.socket_dir] {
        fs::create_dir_all(dir).map_err(Error::io(format!("create directory {}", dir.display())))?;
    }
    let _lock = lock_data_dir(&config.data_dir)?;
    let listener = bind_api_socket(&config.api_socket)?;
    let result = serve_until_signal(&config, listener);
    let _ = fs::remove_file(&config.api_socket);
    result
}

fn serve_until_signal(config: &DaemonConfig, listener: UnixListener) -> Result<(), Error> {
    let (events, inbox) = mpsc::sync_channel(api::CONNECTIONS_MAX);
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(Error::io("install signal handlers"))?;
    let signal_handle = signals.handle();
    let signal_events = events.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                received += 1;
                if received > 1 {
                    tracing::warn!(signal, "second signal: exiting without stopping exports");
                    std::process::exit(1);
                }
                let _ = signal_events.send(Event::Signal(signal));
            }
        })
        .map_err(Error::io("start the signal thread"))?;

    // Volumes are restored while the API socket is already bound: clients (and a second
    // daemon's liveness check) queue in the backlog instead of finding no daemon.
    let mut volumes = Volumes::open(VhostUser, &config.data_dir, &config.socket_dir, config.poll.clone())?;
    tracing::info!(volumes = volumes.list().len(), data_dir = %config.data_dir.display(), "volumes restored");

    std::thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || accept_loop(listener, events))
        .map_err(Error::io("start the API thread"))?;
    // Scripts and tests wait for this exact line, so it does not depend on RUST_LOG.
    eprintln!("hcblk daemon ready api={}", config.api_socket.display());

    serve(&mut volumes, &inbox);
    signal_handle.close();
    volumes.shutdown();
    tracing::info!("daemon stopped");
    Ok(())
}

/// Carries out requests until a signal arrives (or every sender is gone).
fn serve<E: Exporter>(volumes: &mut Volumes<E>, inbox: &mpsc::Receiver<Event>) {
    while let Ok(event) = inbox.recv() {
        match event {
            Event::Request(request, reply) => {
                let response = execute(volumes, request);
                let _ = reply.send(response);
            }
            Event::Signal(signal) => {
                tracing::info!(signal, "stopping");
                return;
            }
        }
    }
}

pub(crate) fn execute<E: Exporter>(volumes: &mut Volumes<E>, request: Request) -> Response {
    let op = match &request {
        Request::Create(_) => "create",
        Request::List {} => "list",
        Request::Info { .. } => "info",
        Request::Resize { .. } => "resize",
        Request::Delete { .. } => "delete",
    };
    let result = match request {
        Request::Create(create) => volumes.create(create).map(|volume| Response::Volume { volume }),
        Request::List {} => Ok(Response::Volumes { volumes: volumes.list() }),
        Request::Info { name } => volumes.get(&name).map(|volume| Response::Volume { volume }),
        Request::Resize { name, size_bytes } => {
            volumes.resize(&name, size_bytes).map(|volume| Response::Volume { volume })
        }
        Request::Delete { name, force } => volumes.delete(&name, force).map(|()| Response::Deleted { name }),
    };
    result.unwrap_or_else(|error| {
        tracing::info!(op, error = %super::error::chain(&error), "request refused");
        Response::error(&error)
    })
}

fn accept_loop(listener: UnixListener, events: mpsc::SyncSender<Event>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends: back off rather than spin on a failing accept.
                tracing::warn!(error = %e, "API accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::Acquire) >= api::CONNECTIONS_MAX {
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let busy = Error::Invalid(format!(
                "the daemon is serving {} API connections already; retry",
                api::CONNECTIONS_MAX
            ));
            let _ = api::write_response(&stream, &Response::error(&busy));
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let guard = ActiveGuard(Arc::clone(&active));
        let events = events.clone();
        let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
            let _guard = guard;
            handle_connection(&stream, &events);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start an API connection thread");
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn handle_connection(stream: &UnixStream, events: &mpsc::SyncSender<Event>) {
    let response = match api::read_request(stream) {
        Ok(request) => {
            let (reply, answer) = mpsc::channel();
            let stopping = || Response::error(&Error::Invalid("the daemon is stopping".into()));
            if events.send(Event::Request(request, reply)).is_err() {
                stopping()
            } else {
                answer.recv().unwrap_or_else(|_| stopping())
            }
        }
        Err(error) => {
            tracing::debug!(error = %super::error::chain(&error), "bad API request");
            let _ = api::write_response(stream, &Response::error(&error));
            // Closing a Unix socket with unread input resets it, and the client would see the
            // reset instead of our answer: drain what it still sends, bounded (and under the
            // read timeout), first.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = io::copy(&mut io::Read::take(stream, DRAIN_BYTES_MAX), &mut io::sink());
            return;
        }
    };
    if let Err(e) = api::write_response(stream, &response) {
        tracing::debug!(error = %super::error::chain(&e), "cannot answer an API client");
    }
}

/// How much of a bad request's remainder is read away before the connection is closed.
const DRAIN_BYTES_MAX: u64 = 1 << 20;

/// Refuses to start without enough free hugepages: the data path's bounce buffers come from
/// the pool, and finding it empty later would fail volumes one by one instead of once, here.
pub fn check_hugepages(free_pages: Option<u64>, hugepages_mb: u32) -> Result<(), Error> {
    let free_pages = free_pages.ok_or(Error::HugepagesUnknown)?;
    let page_bytes = replica::HUGEPAGE_SIZE_BYTES as u64;
    let needed_pages = (u64::from(hugepages_mb) << 20).div_ceil(page_bytes).max(1);
    if free_pages < needed_pages {
        return Err(Error::Hugepages { free_pages, needed_pages, hugepages_mb });
    }
    Ok(())
}

/// Fails if a live daemon answers on the API socket, or the path is something else.
fn check_api_socket(path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(Error::NotASocket { path: path.to_owned() }),
        Ok(_) if UnixStream::connect(path).is_ok() => Err(Error::ApiSocketInUse { path: path.to_owned() }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io { what: format!("inspect the API socket {}", path.display()), source }),
    }
}

fn bind_api_socket(path: &Path) -> Result<UnixListener, Error> {
    // Checked again under the data-dir lock: another daemon may have started meanwhile.
    check_api_socket(path)?;
    if fs::symlink_metadata(path).is_ok() {
        tracing::info!(path = %path.display(), "removing a stale API socket");
        fs::remove_file(path).map_err(|source| Error::ApiListen { path: path.to_owned(), source })?;
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| Error::ApiListen { path: path.to_owned(), source })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::ApiListen { path: path.to_owned(), source })?;
    // Whoever can connect can create and delete volumes: the owner only.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|source| Error::ApiListen { path: path.to_owned(), source })?;
    Ok(listener)
}

/// One daemon per data directory: two would each believe they own the same backings.
fn lock_data_dir(dir: &Path) -> Result<File, Error> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io(format!("open {}", path.display())))?;
    // SAFETY: flock only reads its integer arguments; the fd is open, owned by `file`, which
    // outlives the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::DataDirLocked { path: dir.to_owned() });
        }
        return Err(Error::Io { what: format!("lock {}", path.display()), source: error });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::super::api::CreateRequest;
    use super::super::exporter::fake::FakeExporter;
    use super::super::store::BackingType;
    use super::*;

    #[test]
    fn hugepage_preflight() {
        check_hugepages(Some(32), 64).unwrap();
        check_hugepages(Some(1), 1).unwrap();
        let err = check_hugepages(Some(0), 64).unwrap_err();
        assert!(err.to_string().contains("0 free") && err.to_string().contains("nr_hugepages"), "{err}");
        assert!(check_hugepages(Some(31), 64).is_err());
        assert!(check_hugepages(None, 64).is_err());
        assert!(check_hugepages(Some(0), 0).is_err(), "at least one page is always needed");
    }

    #[test]
    fn one_daemon_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let lock = lock_data_dir(dir.path()).unwrap();
        assert!(matches!(lock_data_dir(dir.path()), Err(Error::DataDirLocked { .. })));
        drop(lock);
        lock_data_dir(dir.path()).unwrap();
    }

    #[test]
    fn api_socket_liveness() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = bind_api_socket(&path).unwrap();
        assert!(matches!(check_api_socket(&path), Err(Error::ApiSocketInUse { .. })));
        assert!(matches!(bind_api_socket(&path), Err(Error::ApiSocketInUse { .. })));
        drop(listener);
        // Stale: replaced.
        let _listener = bind_api_socket(&path).unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(bind_api_socket(&file), Err(Error::NotASocket { .. })));
    }

    /// The whole serving path in one process: accept loop, connection threads, the main loop.
    #[test]
    fn serves_requests_and_survives_garbage() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let api_path = dir.path().join("api.sock");
        let listener = bind_api_socket(&api_path).unwrap();
        let (events, inbox) = mpsc::sync_channel(api::CONNECTIONS_MAX);
        let stop = events.clone();
        std::thread::spawn(move || accept_loop(listener, events));
        let data = dir.path().join("data");
        let sockets = dir.path().join("sock");
        fs::create_dir_all(&sockets).unwrap();
        let server = std::thread::spawn(move || {
            let mut volumes = Volumes::open(FakeExporter::default(), &data, &sockets, PollConfig::default()).unwrap();
            serve(&mut volumes, &inbox);
            volumes.list().len()
        });

        for garbage in [&b"not json\n"[..], b"{\"op\":\"list\"", b"", &[b'['; 70_000][..]] {
            let mut stream = UnixStream::connect(&api_path).unwrap();
            stream.write_all(garbage).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("{\"status\":\"error\""), "{answer}");
        }
        let create = Request::Create(CreateRequest {
            name: "vm".into(),
            size_bytes: 1 << 20,
            block_size: 512,
            queues: 1,
            backing: BackingType::Null,
            path: None,
            read_only: false,
            serial: None,
        });
        let Response::Volume { volume } = api::call(&api_path, &create).unwrap() else { panic!() };
        assert_eq!(volume.name, "vm");
        let err = api::call(&api_path, &create).unwrap_err();
        assert_eq!(err.to_string(), "volume vm already exists");
        let Response::Volumes { volumes } = api::call(&api_path, &Request::List {}).unwrap() else { panic!() };
        assert_eq!(volumes.len(), 1);

        stop.send(Event::Signal(SIGTERM)).unwrap();
        assert_eq!(server.join().unwrap(), 1);
    }
}
