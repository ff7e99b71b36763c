//! `hcblk daemon`: preflight, bring the volumes back, serve the local API until a signal.
//!
//! Threads: one accepts API connections; one per connection (at most
//! [`api::CONNECTIONS_MAX`]) reads its request under a timeout; they hand decoded requests to
//! the main thread, which alone owns the volumes and carries requests out one at a time. So
//! operations never interleave, and exports need not be shareable between threads. The main
//! thread also runs the volume manager's periodic work ([`Manager::tick`]) between requests.
//!
//! Standalone (no cluster flags): volumes are records in the data dir ([`Volumes`]).
//!
//! Cluster mode (`--etcd ...`), in this order: the standalone preflight; the cluster secret
//! and the transport; etcd (one clear error if it does not answer) and a look at whether the
//! node name is taken; the data dir; the cluster key (its id, created on first start); the
//! replica service ([`Members::start`]); the node registration under a lease (with free space
//! = capacity − what replicas use); the housekeeping thread (replica garbage collection, free
//! space updates); the volumes this node owned, attached again; then the API accepts. On
//! SIGTERM the exports and the replica service stop and the registration is revoked, but
//! ownership stays in etcd: the next start attaches the volumes again. Only `volume detach`
//! releases a volume.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replica::Backing;
use replication::NodeInfo;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use super::api::{self, Request, Response};
use super::attach::{OwnerSettings, ReplicatedAttacher};
use super::cluster::{random_nonzero_u64, ClusterConfig, ClusterVolumes, TICK};
use super::exporter::{Exporter, VhostUser};
use super::housekeeping::{node_value, Housekeeping};
use super::notify::Notifier;
use super::volumes::{Volumes, NEEDS_CLUSTER};
use super::Error;
use crate::cluster::{
    keys, Etcd, EtcdConfig, EtcdMeta, MetaStore, NodeRegistration, RegistrationConfig, RegistrationError,
};
use crate::member::{MemberConfig, Members};
use crate::replicated::LeaseClock;
use crate::socket::group_can_traverse;
use crate::{permissions, PollConfig, SocketAccess};

/// The environment variable a cluster secret may come from (instead of a file), so that it
/// never shows on a command line.
pub const SECRET_ENV: &str = "HCBLK_CLUSTER_SECRET";

/// `hcblk daemon`, validated. Paths are absolute.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Metadata and file backings (`DATA_DIR/volumes/`); cluster mode: replicas
    /// (`DATA_DIR/replicas/`). Default /var/lib/hcblk.
    pub data_dir: PathBuf,
    /// One vhost-user socket per volume, `SOCKET_DIR/NAME.sock`. Default /run/hcblk.
    pub socket_dir: PathBuf,
    /// Group and mode of every volume socket (`--socket-group`, `--socket-mode`). Default:
    /// the daemon's group, 0600 (0660 with a group).
    pub socket_access: SocketAccess,
    /// `--socket-group` as given, for messages. Default none.
    pub socket_group: Option<String>,
    /// The local API. Default /run/hcblk/api.sock.
    pub api_socket: PathBuf,
    /// Default: adaptive, 1000 us idle, pinned to every online core.
    pub poll: PollConfig,
    /// Free hugepage memory required at start, for the data path's own buffers. Default 64.
    pub hugepages_mb: u32,
    /// Cluster mode; `None`: standalone (the default).
    pub cluster: Option<ClusterOptions>,
}

/// The cluster flags of `hcblk daemon`, validated.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// etcd client URLs (`--etcd`, comma-separated). No default.
    pub etcd: Vec<String>,
    /// This node's name (`--node`), unique in the cluster. No default.
    pub node: String,
    /// The replica service's address (`--listen`), registered for peers to dial: a specific
    /// address and port. No default.
    pub listen: SocketAddr,
    /// `--cluster-secret-file`, or [`SECRET_ENV`]; exactly one of them.
    pub secret: SecretSource,
    /// Failure domain (`--zone`); default none: the node is its own domain.
    pub zone: Option<String>,
    /// `--transport`; default auto (rdma if a device is usable, else tcp).
    pub transport: proto::TransportKind,
    /// `--io-timeout`, `--replace-after`, `--resync-rate`.
    pub owner: OwnerSettings,
    /// `--capacity`; default: the free space of the data dir's filesystem at start.
    pub capacity_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    /// [`SECRET_ENV`], read at start.
    Env,
}

/// What the daemon's main thread serves requests with: the standalone [`Volumes`] or the
/// cluster's [`ClusterVolumes`].
pub trait Manager {
    fn execute(&mut self, request: Request) -> Result<Response, Error>;
    /// How often [`Manager::tick`] runs; `None`: never.
    fn tick_every(&self) -> Option<Duration> {
        None
    }
    /// Periodic work, between requests.
    fn tick(&mut self) {}
}

impl<E: Exporter<Backing>> Manager for Volumes<E> {
    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        match request {
            Request::Create(create) => self.create(create).map(|volume| Response::Volume { volume }),
            Request::List {} => Ok(Response::Volumes { volumes: self.list() }),
            Request::Info { name } => self.get(&name).map(|volume| Response::Volume { volume }),
            Request::Resize { name, size_bytes } => {
                self.resize(&name, size_bytes).map(|volume| Response::Volume { volume })
            }
            Request::Delete { name, force } => self.delete(&name, force).map(|()| Response::Deleted { name }),
            Request::Attach { .. }
            | Request::Detach { .. }
            | Request::AcceptRisk { .. }
            | Request::NodeList {}
            | Request::ClusterStatus {} => Err(Error::Invalid(format!("{} {NEEDS_CLUSTER}", request.op()))),
        }
    }
}

impl<A: super::attach::Attacher> Manager for ClusterVolumes<A> {
    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        match request {
            Request::Create(create) => self.create(create).map(|volume| Response::Volume { volume }),
            Request::List {} => self.list().map(|volumes| Response::Volumes { volumes }),
            Request::Info { name } => self.info(&name).map(|volume| Response::Volume { volume }),
            Request::Resize { name, size_bytes } => {
                self.resize(&name, size_bytes).map(|volume| Response::Volume { volume })
            }
            Request::Delete { name, force } => self.delete(&name, force).map(|()| Response::Deleted { name }),
            Request::Attach { name, force } => self.attach(&name, force).map(|volume| Response::Volume { volume }),
            Request::Detach { name } => self.detach(&name).map(|()| Response::Detached { name }),
            Request::AcceptRisk { name, reason, by } => {
                self.accept_risk(&name, &reason, &by).map(|volume| Response::Volume { volume })
            }
            Request::NodeList {} => self.nodes().map(|nodes| Response::Nodes { nodes }),
            Request::ClusterStatus {} => self.cluster_status().map(|cluster| Response::Cluster { cluster }),
        }
    }
    fn tick_every(&self) -> Option<Duration> {
        Some(TICK)
    }
    fn tick(&mut self) {
        ClusterVolumes::tick(self);
    }
}

/// Requests flow from connection threads to the main thread.
enum Event {
    Request(Request, mpsc::Sender<Response>),
    /// A signal (its number), or a stop asked for in-process.
    Stop(i32),
}

/// The main thread's end of the API: connection threads send it requests.
pub struct Inbox {
    events: mpsc::SyncSender<Event>,
    inbox: mpsc::Receiver<Event>,
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Inbox {
    pub fn new() -> Self {
        let (events, inbox) = mpsc::sync_channel(api::CONNECTIONS_MAX);
        Self { events, inbox }
    }

    /// Accepts API connections on `listener` from a thread of its own, for good.
    pub fn accept(&self, listener: UnixListener) -> Result<(), Error> {
        let events = self.events.clone();
        std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(listener, events))
            .map(|_| ())
            .map_err(Error::io("start the API thread"))
    }

    /// Makes [`serve`] return (tests, in-process daemons).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.events.clone())
    }

    /// Turns SIGINT/SIGTERM into a stop; a second signal exits at once.
    fn install_signals(&self) -> Result<Handle, Error> {
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(Error::io("install signal handlers"))?;
        let handle = signals.handle();
        let events = self.events.clone();
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
                    let _ = events.send(Event::Stop(signal));
                }
            })
            .map_err(Error::io("start the signal thread"))?;
        Ok(handle)
    }
}

#[derive(Clone)]
pub struct Stopper(mpsc::SyncSender<Event>);

impl Stopper {
    pub fn stop(&self) {
        let _ = self.0.send(Event::Stop(0));
    }
}

/// Runs the daemon until SIGINT/SIGTERM. `version` (`hcblk --version`) goes into the ready line
/// and, in cluster mode, into the node's registration.
pub fn run(config: DaemonConfig, version: &str) -> Result<(), Error> {
    let notifier = Notifier::from_env()?;
    check_hugepages(replica::free_hugepages(), config.hugepages_mb)?;
    // Before creating anything: a second daemon must leave the first one's files alone.
    check_api_socket(&config.api_socket)?;
    let cluster = match &config.cluster {
        Some(options) => Some((options, connect_cluster(options)?)),
        None => None,
    };
    // The socket dir first: refusing it must leave nothing created.
    prepare_socket_dir(&config)?;
    let data_dir = &config.data_dir;
    permissions::create_dir(data_dir).map_err(Error::io(format!("create directory {}", data_dir.display())))?;
    let _lock = lock_data_dir(data_dir)?;
    // Under the lock: no other daemon is writing these files.
    permissions::tighten_data_dir(data_dir).map_err(Error::io(format!("restrict access to {}", data_dir.display())))?;
    let listener = bind_api_socket(&config.api_socket)?;
    let notifier = notifier.as_ref();
    let result = match cluster {
        None => serve_standalone(&config, version, listener, notifier),
        Some((options, connected)) => serve_cluster(&config, version, options, connected, listener, notifier),
    };
    let _ = fs::remove_file(&config.api_socket);
    result
}

fn serve_standalone(
    config: &DaemonConfig,
    version: &str,
    listener: UnixListener,
    notifier: Option<&Notifier>,
) -> Result<(), Error> {
    let inbox = Inbox::new();
    let signals = inbox.install_signals()?;
    // Volumes are restored while the API socket is already bound: clients (and a second
    // daemon's liveness check) queue in the backlog instead of finding no daemon.
    let exporter = VhostUser { socket_access: config.socket_access };
    let mut volumes = Volumes::open(exporter, &config.data_dir, &config.socket_dir, config.poll.clone())?;
    let restored = volumes.list().len();
    tracing::info!(volumes = restored, data_dir = %config.data_dir.display(), "volumes restored");
    inbox.accept(listener)?;
    // Scripts and tests wait for this exact line, so it does not depend on RUST_LOG.
    eprintln!("hcblk daemon ready api={} version={version}", config.api_socket.display());
    notify_ready(notifier, &format!("ready; volumes restored: {restored}"));
    serve(&mut volumes, &inbox);
    notify_stopping(notifier);
    signals.close();
    volumes.shutdown();
    tracing::info!("daemon stopped");
    Ok(())
}

/// What cluster mode has checked before anything is created locally.
struct Connected {
    secret: proto::auth::Secret,
    kind: proto::TransportKind,
    meta: EtcdMeta,
}

fn connect_cluster(options: &ClusterOptions) -> Result<Connected, Error> {
    let secret = match &options.secret {
        SecretSource::File(path) => proto::auth::Secret::from_file(path).map_err(Error::Secret)?,
        SecretSource::Env => {
            let value =
                std::env::var_os(SECRET_ENV).ok_or_else(|| Error::Invalid(format!("{SECRET_ENV} is not set")))?;
            proto::auth::Secret::new(value.as_bytes().to_vec()).map_err(Error::Secret)?
        }
    };
    let kind = proto::resolve_transport(options.transport).map_err(Error::Transport)?;
    let etcd = Etcd::connect(EtcdConfig::new(options.etcd.clone()))?;
    // A look before anything starts: a second daemon with this name would otherwise bind
    // its replica service first. The registration itself decides (atomically) later.
    let key = keys::node(&options.node)?;
    if let Some(kv) = etcd.get(&key)?.filter(|kv| !is_previous_run(&kv.value, options)) {
        return Err(match kv.lease {
            Some(lease) => RegistrationError::NameInUse {
                name: options.node.clone(),
                lease,
                ttl_left: etcd.lease_time_to_live(lease).ok().flatten(),
            },
            None => RegistrationError::KeyWithoutLease { name: options.node.clone(), key },
        }
        .into());
    }
    Ok(Connected { secret, kind, meta: EtcdMeta::new(etcd) })
}

/// How long the replica service polls before it sleeps: never with `--poll never`, else up
/// to 50 µs (the idle time of `--poll adaptive`, capped: it serves every owner of this node's
/// replicas from one thread, and a node's cores belong to its VMs first).
fn member_spin(poll: &crate::PollConfig) -> std::time::Duration {
    match poll.mode {
        crate::PollMode::Never => std::time::Duration::ZERO,
        _ => poll.idle.min(std::time::Duration::from_micros(50)),
    }
}

/// A node registration written by this node's own earlier run: same name (the key) and the
/// same replica service address. Another live daemon with that address would hold the port,
/// and this start fails when it binds it; one on another host has another address.
fn is_previous_run(value: &[u8], options: &ClusterOptions) -> bool {
    serde_json::from_slice::<NodeInfo>(value)
        .is_ok_and(|n| n.name == options.node && n.address == options.listen.to_string())
}

fn serve_cluster(
    config: &DaemonConfig,
    version: &str,
    options: &ClusterOptions,
    connected: Connected,
    listener: UnixListener,
    notifier: Option<&Notifier>,
) -> Result<(), Error> {
    let Connected { secret, kind, meta } = connected;
    let node = options.node.clone();
    let capacity_bytes = match options.capacity_bytes {
        Some(c) => c,
        None => fs_free_bytes(&config.data_dir)?,
    };
    let now_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let cluster_id = meta.cluster_id(random_nonzero_u64()?, now_unix_s)?;
    let transport = proto::Config::new(cluster_id, replication::node_id(&node), secret);
    let store: Arc<dyn MetaStore> = Arc::new(meta.clone());
    let inbox = Inbox::new();
    let signals = inbox.install_signals()?;
    let members = Members::start(MemberConfig {
        node: node.clone(),
        data_dir: config.data_dir.clone(),
        listen: options.listen,
        transport: transport.clone(),
        kind,
        meta: Arc::clone(&store),
        // Half of what --hugepages-mb reserves for the data path; the rest is the pollers'.
        staging_bytes: MemberConfig::STAGING_DEFAULT.min((config.hugepages_mb as usize) << 19),
        spin: member_spin(&config.poll),
    })
    .map_err(Error::Members)?;
    let template = NodeInfo {
        name: node.clone(),
        id: replication::node_id(&node),
        address: options.listen.to_string(),
        zone: options.zone.clone(),
        capacity_bytes,
        free_bytes: 0,
        version: version.to_owned(),
        started_unix_s: now_unix_s,
    };
    let value = node_value(&template, members.used_bytes());
    let previous = |v: &[u8]| is_previous_run(v, options);
    let registration =
        match NodeRegistration::start_reclaiming(meta.etcd(), &node, value, RegistrationConfig::default(), previous) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                members.stop();
                return Err(e.into());
            }
        };
    tracing::info!(node = %node, cluster_id, address = %options.listen, transport = ?kind, capacity_bytes, "joined the cluster");
    let housekeeping = Housekeeping::start(
        Arc::clone(&store),
        Arc::clone(&members) as Arc<dyn super::housekeeping::ReplicaHost>,
        Arc::clone(&registration),
        template,
    );
    let housekeeping = match housekeeping {
        Ok(h) => h,
        Err(e) => {
            members.stop();
            return Err(e);
        }
    };
    let lease_clock: LeaseClock = {
        let registration = Arc::clone(&registration);
        Arc::new(move || registration.valid_until())
    };
    let attacher = ReplicatedAttacher {
        node: node.clone(),
        meta: Arc::clone(&store),
        members: Arc::clone(&members),
        transport,
        kind,
        owner: options.owner,
        lease: Some(lease_clock),
        exporter: VhostUser { socket_access: config.socket_access },
    };
    let cluster_config =
        ClusterConfig { node: node.clone(), socket_dir: config.socket_dir.clone(), poll: config.poll.clone() };
    let mut volumes = ClusterVolumes::new(cluster_config, meta, attacher, Arc::clone(&registration));
    let attached = volumes.reattach_owned();
    tracing::info!(attached, "volumes owned by this node attached");
    inbox.accept(listener)?;
    eprintln!("hcblk daemon ready api={} version={version} node={node}", config.api_socket.display());
    notify_ready(notifier, &format!("ready as node {node}; volumes attached: {attached}"));

    serve(&mut volumes, &inbox);
    notify_stopping(notifier);
    signals.close();
    volumes.shutdown();
    drop(volumes);
    housekeeping.stop();
    members.stop();
    // The attacher's lease clock and the housekeeping thread are gone: the last reference.
    match Arc::try_unwrap(registration) {
        Ok(registration) => {
            if let Err(e) = registration.deregister() {
                tracing::warn!(error = %super::chain(&e), "cannot revoke the node's lease; it expires within its TTL");
            }
        }
        Err(_) => tracing::warn!("the node registration is still in use; its lease expires within its TTL"),
    }
    tracing::info!("daemon stopped; volumes owned here stay owned and are attached again at the next start");
    Ok(())
}

/// A notification that cannot be sent is logged, not fatal: the daemon serves either way, and
/// systemd, if it is the one waiting, reports the start as timed out.
fn notify_ready(notifier: Option<&Notifier>, status: &str) {
    if let Some(Err(e)) = notifier.map(|n| n.ready(status)) {
        tracing::warn!(error = %e, "cannot tell the service manager that the daemon is ready");
    }
}

fn notify_stopping(notifier: Option<&Notifier>) {
    if let Some(Err(e)) = notifier.map(Notifier::stopping) {
        tracing::warn!(error = %e, "cannot tell the service manager that the daemon is stopping");
    }
}

/// Creates the socket dir if it is missing, for the socket group if there is one (0750, the
/// group's; else 0755), whatever the umask; refuses an existing one that the socket group
/// cannot traverse, since its VMs could not reach their sockets (it is left as it is: the
/// operator, or tmpfiles.d, owns it). Its parents are only checked, with a warning: the
/// group's members may reach them through another of their groups.
fn prepare_socket_dir(config: &DaemonConfig) -> Result<(), Error> {
    let dir = &config.socket_dir;
    let what = || format!("create the socket directory {}", dir.display());
    let gid = config.socket_access.gid;
    let group = config.socket_group.as_deref().unwrap_or("-");
    match fs::metadata(dir) {
        Ok(metadata) => {
            if !metadata.is_dir() {
                return Err(Error::Invalid(format!("--socket-dir {} is not a directory", dir.display())));
            }
            if let Some(gid) = gid.filter(|&gid| !group_can_traverse(&metadata, gid)) {
                return Err(Error::Invalid(format!(
                    "--socket-dir {} (mode {:04o}, group id {}) does not let --socket-group {group} (id {gid}) reach                      the sockets: `chgrp {group} {0}; chmod g+x {0}` (packaging/hcblk.tmpfiles does this for /run/hcblk),                      or remove it and hcblk creates it",
                    dir.display(),
                    metadata.mode() & 0o7777,
                    metadata.gid(),
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent).map_err(Error::io(what()))?;
            }
            fs::create_dir(dir).map_err(Error::io(what()))?;
            if let Some(gid) = gid {
                std::os::unix::fs::chown(dir, None, Some(gid)).map_err(Error::io(what()))?;
            }
            let mode = if gid.is_some() { 0o750 } else { 0o755 };
            fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(Error::io(what()))?;
        }
        Err(source) => {
            return Err(Error::Io { what: format!("inspect the socket directory {}", dir.display()), source })
        }
    }
    if let Some(gid) = gid {
        for parent in dir.ancestors().skip(1) {
            if fs::metadata(parent).is_ok_and(|m| !group_can_traverse(&m, gid)) {
                tracing::warn!(
                    directory = %parent.display(),
                    group,
                    "the socket group may not traverse this parent of the socket dir; its VMs reach their sockets only \
                     if QEMU's user may through another group"
                );
            }
        }
    }
    Ok(())
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
fn fs_free_bytes(dir: &Path) -> Result<u64, Error> {
    let what = || format!("read the free space of {}", dir.display());
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} contains a NUL byte", dir.display())))?;
    // SAFETY: `statvfs` is a plain C struct of integers, for which all-zero bytes are a valid
    // value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is a live, writable
    // `statvfs` that the call fills in.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::Io { what: what(), source: io::Error::last_os_error() });
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Carries out requests until a stop arrives (or every sender is gone), running the
/// manager's periodic work in between.
pub fn serve<M: Manager>(manager: &mut M, inbox: &Inbox) {
    let every = manager.tick_every();
    let mut next_tick = every.map(|d| Instant::now() + d);
    loop {
        let event = match next_tick {
            None => inbox.inbox.recv().ok(),
            Some(at) => match inbox.inbox.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(event) => Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        match event {
            Some(Event::Request(request, reply)) => {
                let response = execute(manager, request);
                let _ = reply.send(response);
            }
            Some(Event::Stop(signal)) => {
                tracing::info!(signal, "stopping");
                return;
            }
            None if next_tick.is_none() => return,
            None => {}
        }
        // Also after a request: a busy API must not starve the periodic work.
        if let (Some(every), Some(at)) = (every, next_tick) {
            if Instant::now() >= at {
                manager.tick();
                next_tick = Some(Instant::now() + every);
            }
        }
    }
}

pub(crate) fn execute<M: Manager>(manager: &mut M, request: Request) -> Response {
    let op = request.op();
    manager.execute(request).unwrap_or_else(|error| {
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
pub fn check_api_socket(path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(Error::NotASocket { path: path.to_owned() }),
        Ok(_) if UnixStream::connect(path).is_ok() => Err(Error::ApiSocketInUse { path: path.to_owned() }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io { what: format!("inspect the API socket {}", path.display()), source }),
    }
}

/// Binds the API socket (mode 0600), replacing a stale one; refuses one a live daemon serves.
pub fn bind_api_socket(path: &Path) -> Result<UnixListener, Error> {
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
        .mode(permissions::FILE_MODE)
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
        let inbox = Inbox::new();
        let stop = inbox.stopper();
        inbox.accept(listener).unwrap();
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
            replicas: None,
            min_replicas: None,
            extent_bytes: None,
            locality: None,
        });
        let Response::Volume { volume } = api::call(&api_path, &create).unwrap() else { panic!() };
        assert_eq!(volume.name, "vm");
        let err = api::call(&api_path, &create).unwrap_err();
        assert_eq!(err.to_string(), "volume vm already exists");
        let Response::Volumes { volumes } = api::call(&api_path, &Request::List {}).unwrap() else { panic!() };
        assert_eq!(volumes.len(), 1);
        // Cluster verbs are refused by a standalone daemon, in one line.
        let err = api::call(&api_path, &Request::Attach { name: "vm".into(), force: false }).unwrap_err();
        assert!(err.to_string().starts_with("attach needs cluster mode"), "{err}");
        let err = api::call(&api_path, &Request::NodeList {}).unwrap_err();
        assert!(err.to_string().contains("needs cluster mode"), "{err}");

        stop.stop();
        assert_eq!(server.join().unwrap(), 1);
    }
}
