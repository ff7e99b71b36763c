//! The `hcblk` command line (docs/cli.md): arguments, their validation into configs and
//! requests, and how answers are printed.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use replication::Locality;

use super::api::{self, ClusterStatus, CreateRequest, NodeEntry, Request, Response, VolumeInfo};
use super::attach::OwnerSettings;
use super::daemon::{self, ClusterOptions, DaemonConfig, SecretSource, SECRET_ENV};
use super::store::{self, BackingType};
use super::units::{
    format_duration_s, format_rfc3339, format_size_exact, format_size_human, format_size_short, parse_cpu_list,
    parse_duration, parse_rate, parse_size,
};
use super::Error;
use crate::{socket, PollConfig, PollMode, SocketAccess};

#[derive(Debug, Parser)]
#[command(name = "hcblk", version, about = "hcblk: vhost-user-blk volumes for QEMU guests")]
pub struct Cli {
    /// The daemon's local control socket.
    #[arg(long, global = true, env = "HCBLK_API_SOCKET", default_value = "/run/hcblk/api.sock")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon in the foreground until SIGINT/SIGTERM.
    // Boxed: the daemon's flags outweigh every other verb's several times.
    Daemon(Box<DaemonArgs>),
    /// Manage volumes through the daemon.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Cluster mode: the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Cluster mode: the whole cluster at a glance.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Metadata and file backings (DIR/volumes/); cluster mode: replicas (DIR/replicas/).
    #[arg(long, default_value = "/var/lib/hcblk")]
    pub data_dir: PathBuf,
    /// One vhost-user socket per volume, DIR/NAME.sock.
    #[arg(long, default_value = "/run/hcblk")]
    pub socket_dir: PathBuf,
    /// Group of every volume socket, e.g. libvirt-qemu so that libvirt's QEMU may connect
    /// [default: the daemon's group].
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Mode of every volume socket, octal; connecting needs write permission
    /// [default: 0600, 0660 with --socket-group].
    #[arg(long)]
    pub socket_mode: Option<String>,
    /// always, adaptive or never. adaptive busy-polls while the guest is busy and its core is
    /// not wanted by another thread; always busy-polls for good (give it cores of its own).
    #[arg(long, default_value = "adaptive")]
    pub poll: String,
    /// Adaptive polling: idle time before a poller sleeps on the kick eventfd.
    #[arg(long, default_value_t = 1000)]
    pub poll_idle_us: u64,
    /// Cores the pollers are pinned to, e.g. "1" or "0-1", one poller per core: cores kept
    /// for storage, not the VMs' [default: none, pollers unpinned, one per queue].
    #[arg(long)]
    pub cpus: Option<String>,
    /// Free hugepage memory (MiB) required at start, for the data path's own buffers.
    #[arg(long, default_value_t = 64)]
    pub hugepages_mb: u32,
    /// Cluster mode: etcd client URLs, comma-separated (http://HOST:PORT,...).
    #[arg(long)]
    pub etcd: Option<String>,
    /// Cluster mode: this node's name, unique in the cluster.
    #[arg(long)]
    pub node: Option<String>,
    /// Cluster mode: address and port of the replica service, as peers reach it.
    #[arg(long)]
    pub listen: Option<String>,
    /// Cluster mode: file holding the cluster secret (or set HCBLK_CLUSTER_SECRET instead).
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
    /// Cluster mode: failure domain; replicas of an extent go to distinct zones [default: the node].
    #[arg(long)]
    pub zone: Option<String>,
    /// Cluster mode: auto, tcp or rdma [default: auto].
    #[arg(long)]
    pub transport: Option<String>,
    /// Cluster mode: replace a member whose node has been down this long [default: 10m].
    #[arg(long)]
    pub replace_after: Option<String>,
    /// Cluster mode: fail a replica that does not answer a request within this [default: 5s].
    #[arg(long)]
    pub io_timeout: Option<String>,
    /// Cluster mode: resync/rebuild rate limit per volume, bytes/s, 0 = none [default: 64M].
    #[arg(long)]
    pub resync_rate: Option<String>,
    /// Cluster mode: disk space offered to replicas [default: free space of the data dir's filesystem].
    #[arg(long)]
    pub capacity: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (standalone: and export it; cluster mode: place it, not attached).
    Create(CreateArgs),
    /// One line per volume.
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one volume, as `key: value` lines.
    Info {
        name: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (live: a connected guest sees the new size).
    Resize {
        name: String,
        /// The new size: bytes with an optional K/M/G/T suffix (binary).
        #[arg(long)]
        size: String,
    },
    /// Remove the volume (standalone: and its backing file if hcblk created it).
    Delete {
        name: String,
        /// Delete even while a VM is connected (cluster mode: while attached anywhere).
        #[arg(long)]
        force: bool,
    },
    /// Cluster mode: this node becomes the volume's owner and exports it.
    Attach {
        name: String,
        /// Take the volume over from another node that is still up.
        #[arg(long)]
        force: bool,
    },
    /// Cluster mode: stop this node's export and release the volume.
    Detach { name: String },
    /// Cluster mode: let writes go on with fewer than min-replicas replicas in sync.
    AcceptRisk {
        name: String,
        /// Why (recorded with who and when).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// One line per node: NAME ADDRESS ZONE STATE CAPACITY USED.
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes up and down, volumes by health, resyncs in progress.
    Status {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    /// Bytes with an optional K/M/G/T suffix (binary), e.g. 10G.
    #[arg(long)]
    pub size: String,
    /// 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Virtqueues (1-16).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Standalone: file, device, ram or null.
    #[arg(long, default_value = "file")]
    pub backing: String,
    /// Standalone: file or block device [file default: DATA_DIR/volumes/NAME.img, created sparse].
    #[arg(long)]
    pub path: Option<PathBuf>,
    #[arg(long)]
    pub read_only: bool,
    /// Serial the guest reads (at most 20 bytes) [default: from the name].
    #[arg(long)]
    pub serial: Option<String>,
    /// Replicas of every extent, on distinct nodes and zones (1-5) [default: 3; standalone: 1].
    #[arg(long)]
    pub replicas: Option<u8>,
    /// Replicas that must be in sync for writes to go on [default: a majority, N/2+1].
    #[arg(long)]
    pub min_replicas: Option<u8>,
    /// Extent size, a power of two from 16M to 4G [default: 1G].
    #[arg(long)]
    pub extent_size: Option<String>,
    /// Cluster mode: prefer (a replica of every extent on this node) or none [default: prefer].
    #[arg(long)]
    pub locality: Option<String>,
}

/// Bounds of the cluster flags; anything outside is a unit mistake, refused.
const IO_TIMEOUT_MIN: Duration = Duration::from_millis(100);
const IO_TIMEOUT_MAX: Duration = Duration::from_secs(600);
const REPLACE_AFTER_MIN: Duration = Duration::from_secs(10);
const REPLACE_AFTER_MAX: Duration = Duration::from_secs(30 * 86_400);
/// A resync slower than a region a second would never end.
const RESYNC_RATE_MIN: u64 = 1 << 20;

impl TryFrom<(DaemonArgs, PathBuf)> for DaemonConfig {
    type Error = Error;
    fn try_from((args, api_socket): (DaemonArgs, PathBuf)) -> Result<Self, Error> {
        let cluster = cluster_options(&args, std::env::var_os(SECRET_ENV).is_some())?;
        let mode: PollMode = args.poll.parse().map_err(Error::Invalid)?;
        if args.poll_idle_us == 0 || args.poll_idle_us > 1_000_000 {
            return Err(Error::Invalid(format!(
                "--poll-idle-us {} is out of range 1..=1000000 (for no polling use --poll never)",
                args.poll_idle_us
            )));
        }
        if args.hugepages_mb == 0 || args.hugepages_mb > 1 << 20 {
            return Err(Error::Invalid(format!("--hugepages-mb {} is out of range 1..=1048576", args.hugepages_mb)));
        }
        let online_path = "/sys/devices/system/cpu/online";
        let online = std::fs::read_to_string(online_path).map_err(Error::io(format!("read {online_path}")))?;
        let online = parse_cpu_list(&online)?;
        let cpus = match args.cpus {
            None => Vec::new(),
            Some(list) => {
                let cpus = parse_cpu_list(&list)?;
                if let Some(offline) = cpus.iter().find(|c| !online.contains(c)) {
                    return Err(Error::Invalid(format!("--cpus {list}: CPU {offline} is not online")));
                }
                cpus
            }
        };
        let socket_access = socket_access(args.socket_group.as_deref(), args.socket_mode.as_deref())?;
        let absolute = |p: &PathBuf| std::path::absolute(p).map_err(Error::io(format!("resolve {}", p.display())));
        Ok(Self {
            data_dir: absolute(&args.data_dir)?,
            socket_dir: absolute(&args.socket_dir)?,
            socket_access,
            socket_group: args.socket_group,
            api_socket: absolute(&api_socket)?,
            poll: PollConfig { mode, idle: Duration::from_micros(args.poll_idle_us), cpus, one_poller: false },
            hugepages_mb: args.hugepages_mb,
            cluster,
        })
    }
}

/// `--socket-group` and `--socket-mode`, validated. Refused: a group that does not exist, a
/// mode that is not octal permission bits, one that lets every local user connect (and so
/// read and write every VM's disk), and, with a group, one that does not let the group connect.
fn socket_access(group: Option<&str>, mode: Option<&str>) -> Result<SocketAccess, Error> {
    let gid = match group {
        None => None,
        Some(name) => {
            let gid = socket::group_id(name).map_err(Error::io(format!("look up --socket-group {name}")))?;
            Some(gid.ok_or_else(|| Error::Invalid(format!("--socket-group {name}: no such group")))?)
        }
    };
    let mode = match mode {
        None if gid.is_some() => socket::MODE_GROUP_DEFAULT,
        None => socket::MODE_DEFAULT,
        Some(text) => {
            let digits = text.strip_prefix("0o").unwrap_or(text);
            let mode = (!digits.is_empty() && digits.len() <= 4 && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)))
                .then(|| u32::from_str_radix(digits, 8).ok())
                .flatten()
                .filter(|&m| m <= 0o777)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "--socket-mode {text:?}: expected octal permission bits from 0000 to 0777, e.g. 0660"
                    ))
                })?;
            if mode & 0o002 != 0 {
                return Err(Error::Invalid(format!(
                    "--socket-mode {text}: lets every local user connect, as the VM, to its disk (o+w); \
                     give the sockets a group instead (--socket-group)"
                )));
            }
            if gid.is_some() && mode & 0o020 == 0 {
                return Err(Error::Invalid(format!(
                    "--socket-mode {text}: --socket-group could not connect (connecting needs write permission, g+w)"
                )));
            }
            mode
        }
    };
    Ok(SocketAccess { gid, mode })
}

/// The cluster flags, validated; `None` without `--etcd` (standalone), where every other
/// cluster flag is refused. `env_secret`: whether [`SECRET_ENV`] is set.
fn cluster_options(args: &DaemonArgs, env_secret: bool) -> Result<Option<ClusterOptions>, Error> {
    let cluster_only = [
        ("--node", args.node.is_some()),
        ("--listen", args.listen.is_some()),
        ("--cluster-secret-file", args.cluster_secret_file.is_some()),
        ("--zone", args.zone.is_some()),
        ("--transport", args.transport.is_some()),
        ("--replace-after", args.replace_after.is_some()),
        ("--io-timeout", args.io_timeout.is_some()),
        ("--resync-rate", args.resync_rate.is_some()),
        ("--capacity", args.capacity.is_some()),
    ];
    let Some(etcd) = &args.etcd else {
        if let Some((flag, _)) = cluster_only.iter().find(|(_, given)| *given) {
            return Err(Error::Invalid(format!("{flag} is a cluster-mode flag: give --etcd URLS too")));
        }
        return Ok(None);
    };
    let endpoints: Vec<String> = etcd.split(',').map(|e| e.trim().to_owned()).collect();
    if endpoints.iter().any(String::is_empty) {
        return Err(Error::Invalid(format!("--etcd {etcd:?}: expected comma-separated http://HOST:PORT URLs")));
    }
    let (Some(node), Some(listen)) = (&args.node, &args.listen) else {
        return Err(Error::Invalid("cluster mode (--etcd) also needs --node NAME and --listen ADDR:PORT".into()));
    };
    validate_label("node name", node)?;
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| Error::Invalid(format!("--listen {listen:?}: expected ADDR:PORT, e.g. 10.0.0.1:7400")))?;
    if listen.ip().is_unspecified() || listen.port() == 0 {
        return Err(Error::Invalid(format!(
            "--listen {listen}: give the address and port peers reach this node at (it is registered for them)"
        )));
    }
    let secret = match (&args.cluster_secret_file, env_secret) {
        (Some(_), true) => {
            return Err(Error::Invalid(format!(
                "the cluster secret is given twice (--cluster-secret-file and {SECRET_ENV}): give one"
            )))
        }
        (None, false) => {
            return Err(Error::Invalid(format!(
                "cluster mode needs the cluster secret: --cluster-secret-file PATH or the environment variable {SECRET_ENV}"
            )))
        }
        (Some(path), false) => {
            SecretSource::File(std::path::absolute(path).map_err(Error::io(format!("resolve {}", path.display())))?)
        }
        (None, true) => SecretSource::Env,
    };
    if let Some(zone) = &args.zone {
        validate_label("zone", zone)?;
    }
    let transport = match args.transport.as_deref() {
        None => proto::TransportKind::Auto,
        Some(t @ ("auto" | "tcp" | "rdma")) => t.parse().map_err(Error::Transport)?,
        Some(other) => return Err(Error::Invalid(format!("--transport {other:?}: expected auto, tcp or rdma"))),
    };
    let defaults = OwnerSettings::default();
    let io_timeout = match &args.io_timeout {
        None => defaults.io_timeout,
        Some(s) => in_range("--io-timeout", parse_duration(s)?, IO_TIMEOUT_MIN, IO_TIMEOUT_MAX)?,
    };
    let replace_after = match &args.replace_after {
        None => defaults.replace_after,
        Some(s) => in_range("--replace-after", parse_duration(s)?, REPLACE_AFTER_MIN, REPLACE_AFTER_MAX)?,
    };
    if replace_after <= io_timeout {
        return Err(Error::Invalid(format!(
            "--replace-after {replace_after:?} must be longer than --io-timeout {io_timeout:?}"
        )));
    }
    let resync_bytes_per_s = match &args.resync_rate {
        None => defaults.resync_bytes_per_s,
        Some(s) => {
            let rate = parse_rate(s)?;
            if rate != 0 && rate < RESYNC_RATE_MIN {
                return Err(Error::Invalid(format!(
                    "--resync-rate {s}: at least 1M (a region a second), or 0 for no limit"
                )));
            }
            rate
        }
    };
    let capacity_bytes = match &args.capacity {
        None => None,
        Some(s) => match parse_size(s)? {
            0 => return Err(Error::Invalid("--capacity must be greater than 0".into())),
            c => Some(c),
        },
    };
    Ok(Some(ClusterOptions {
        etcd: endpoints,
        node: node.clone(),
        listen,
        secret,
        zone: args.zone.clone(),
        transport,
        owner: OwnerSettings { io_timeout, replace_after, resync_bytes_per_s },
        capacity_bytes,
    }))
}

fn in_range(flag: &str, d: Duration, min: Duration, max: Duration) -> Result<Duration, Error> {
    if d < min || d > max {
        return Err(Error::Invalid(format!("{flag} {d:?} is out of range {min:?}..={max:?}")));
    }
    Ok(d)
}

/// Node names and zones: the alphabet of volume names (they become key segments and appear
/// in every document).
fn validate_label(what: &str, value: &str) -> Result<(), Error> {
    store::validate_name(value).map_err(|e| match e {
        Error::InvalidName { name, reason } => Error::Invalid(format!("invalid {what} {name:?}: {reason}")),
        other => other,
    })
}

impl TryFrom<CreateArgs> for CreateRequest {
    type Error = Error;
    fn try_from(args: CreateArgs) -> Result<Self, Error> {
        let backing: BackingType = args.backing.parse()?;
        // The daemon runs elsewhere: a relative path means relative to where the CLI runs.
        let path = match args.path {
            Some(p) => Some(std::path::absolute(&p).map_err(Error::io(format!("resolve {}", p.display())))?),
            None => None,
        };
        let extent_bytes = match args.extent_size {
            Some(s) => {
                let bytes = parse_size(&s)?;
                store::validate_extent_bytes(bytes)?;
                Some(bytes)
            }
            None => None,
        };
        let locality = match args.locality {
            Some(l) => Some(l.parse::<Locality>().map_err(|e| Error::Invalid(format!("--locality: {e}")))?),
            None => None,
        };
        Ok(Self {
            name: args.name,
            size_bytes: parse_size(&args.size)?,
            block_size: args.block_size,
            queues: args.queues,
            backing,
            path,
            read_only: args.read_only,
            serial: args.serial,
            replicas: args.replicas,
            min_replicas: args.min_replicas,
            extent_bytes,
            locality,
        })
    }
}

/// What `hcblk --version` prints after the name, and the daemon logs: the package version, with
/// `+BUILD_ID` when the binary was built with one (`HCBLK_BUILD_ID`).
pub fn version(package: &str, build_id: Option<&str>) -> &'static str {
    let version = match build_id.map(str::trim).filter(|id| !id.is_empty()) {
        Some(id) => format!("{package}+{id}"),
        None => package.to_owned(),
    };
    // Once per process, and clap keeps `&'static str`s.
    version.leak()
}

/// Parses the command line (exits with clap's message on an error, `--help` or `--version`).
pub fn parse(version: &'static str) -> Cli {
    let matches = Cli::command().version(version).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Runs the command; `version` as [`version`] made it.
pub fn run(cli: Cli, version: &str) -> Result<(), Error> {
    let (request, json) = match cli.command {
        Command::Daemon(args) => return daemon::run(DaemonConfig::try_from((*args, cli.api_socket))?, version),
        Command::Volume(command) => volume_request(command)?,
        Command::Node(NodeCommand::List { json }) => (Request::NodeList {}, json),
        Command::Cluster(ClusterCommand::Status { json }) => (Request::ClusterStatus {}, json),
    };
    let response = api::call(&cli.api_socket, &request)?;
    let mut out = io::stdout().lock();
    let printed = if json { print_json(&mut out, &response) } else { print_response(&mut out, &request, &response) };
    printed.and_then(|()| out.flush()).map_err(Error::io("write to stdout"))
}

/// The request, and whether its answer is printed as JSON.
fn volume_request(command: VolumeCommand) -> Result<(Request, bool), Error> {
    Ok(match command {
        VolumeCommand::Create(args) => (Request::Create(args.try_into()?), false),
        VolumeCommand::List { json } => (Request::List {}, json),
        VolumeCommand::Info { name, json } => (Request::Info { name }, json),
        VolumeCommand::Resize { name, size } => (Request::Resize { name, size_bytes: parse_size(&size)? }, false),
        VolumeCommand::Delete { name, force } => (Request::Delete { name, force }, false),
        VolumeCommand::Attach { name, force } => (Request::Attach { name, force }, false),
        VolumeCommand::Detach { name } => (Request::Detach { name }, false),
        VolumeCommand::AcceptRisk { name, reason } => (Request::AcceptRisk { name, reason, by: operator() }, false),
    })
}

/// Who runs the CLI, `user@host`, for the audit record of an accept-risk.
fn operator() -> String {
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "unknown".into(), |h| h.trim().to_owned());
    format!("{user}@{host}")
}

/// The answer's payload as one line of JSON (the API's, for tests and scripts).
fn print_json(out: &mut impl Write, response: &Response) -> io::Result<()> {
    let line = match response {
        Response::Volume { volume } => serde_json::to_string(volume),
        Response::Volumes { volumes } => serde_json::to_string(volumes),
        Response::Nodes { nodes } => serde_json::to_string(nodes),
        Response::Cluster { cluster } => serde_json::to_string(cluster),
        other => serde_json::to_string(other),
    };
    writeln!(out, "{}", line.map_err(io::Error::other)?)
}

fn print_response(out: &mut impl Write, request: &Request, response: &Response) -> io::Result<()> {
    match (request, response) {
        (Request::Create(_), Response::Volume { volume }) => {
            writeln!(out, "volume {} created", volume.name)?;
            match &volume.cluster {
                None => writeln!(out, "socket: {}", socket_text(volume)),
                Some(_) => writeln!(
                    out,
                    "extents: {} x {}, replicas {} (min {})",
                    volume.size_bytes.div_ceil(volume.extent_bytes.max(1)),
                    format_size_exact(volume.extent_bytes),
                    volume.replicas,
                    volume.min_replicas
                ),
            }
        }
        (Request::Attach { .. }, Response::Volume { volume }) => {
            writeln!(out, "volume {} attached", volume.name)?;
            writeln!(out, "socket: {}", socket_text(volume))
        }
        (Request::AcceptRisk { .. }, Response::Volume { volume }) => {
            let risk = volume.cluster.as_ref().and_then(|c| c.risk_accepted.as_ref());
            match risk {
                Some(r) => writeln!(out, "volume {}: risk accepted by {}: {}", volume.name, r.by, r.reason),
                None => writeln!(out, "volume {}: risk accepted", volume.name),
            }
        }
        (Request::Resize { .. }, Response::Volume { volume }) => writeln!(
            out,
            "volume {} resized to {} bytes ({})",
            volume.name,
            volume.size_bytes,
            format_size_human(volume.size_bytes)
        ),
        (_, Response::Volume { volume }) => print_info(out, volume),
        (_, Response::Volumes { volumes }) => print_list(out, volumes),
        (_, Response::Deleted { name }) => writeln!(out, "volume {name} deleted"),
        (_, Response::Detached { name }) => writeln!(out, "volume {name} detached"),
        (_, Response::Nodes { nodes }) => print_nodes(out, nodes),
        (_, Response::Cluster { cluster }) => print_cluster(out, cluster),
        // `api::call` turns these into errors.
        (_, Response::Error { message }) => writeln!(out, "error: {message}"),
    }
}

fn socket_text(v: &VolumeInfo) -> String {
    v.socket.as_ref().map_or_else(|| "-".to_owned(), |p| p.display().to_string())
}

fn print_info(out: &mut impl Write, v: &VolumeInfo) -> io::Result<()> {
    let path = v.path.as_ref().map_or_else(|| "-".to_owned(), |p| p.display().to_string());
    writeln!(out, "name: {}", v.name)?;
    writeln!(out, "size: {}", v.size_bytes)?;
    writeln!(out, "size_human: {} ({})", format_size_human(v.size_bytes), format_size_exact(v.size_bytes))?;
    writeln!(out, "block_size: {}", v.block_size)?;
    writeln!(out, "queues: {}", v.queues)?;
    writeln!(out, "backing: {}", v.backing.name())?;
    writeln!(out, "path: {path}")?;
    writeln!(out, "created_backing: {}", v.created_backing)?;
    writeln!(out, "read_only: {}", v.read_only)?;
    writeln!(out, "serial: {}", v.serial)?;
    writeln!(out, "socket: {}", socket_text(v))?;
    writeln!(out, "connected: {}", v.connected)?;
    writeln!(out, "rejected_requests: {}", v.rejected_requests)?;
    writeln!(out, "created: {}", format_rfc3339(v.created_unix_s))?;
    writeln!(out, "replicas: {}", v.replicas)?;
    writeln!(out, "min_replicas: {}", v.min_replicas)?;
    writeln!(out, "extent_size: {}", format_size_exact(v.extent_bytes))?;
    writeln!(out, "generation: {}", v.generation)?;
    writeln!(out, "epoch: {}", v.epoch)?;
    let Some(c) = &v.cluster else { return Ok(()) };
    writeln!(out, "id: {}", c.id)?;
    writeln!(out, "locality: {}", if c.locality == Locality::Prefer { "prefer" } else { "none" })?;
    match &c.owner {
        None => writeln!(out, "owner: -")?,
        Some(o) if c.attached_here => writeln!(out, "owner: {o} (this node)")?,
        Some(o) if c.owner_up => writeln!(out, "owner: {o}")?,
        Some(o) => writeln!(out, "owner: {o} (down)")?,
    }
    writeln!(out, "state: {}", c.state.name())?;
    match &c.risk_accepted {
        None => writeln!(out, "risk_accepted: no")?,
        Some(r) => writeln!(out, "risk_accepted: by {} at {}: {}", r.by, format_rfc3339(r.at_unix_s), r.reason)?,
    }
    if let Some(status) = &c.status {
        writeln!(out, "phase: {}", status.phase)?;
        if !status.suspended_extents.is_empty() {
            let list: Vec<String> = status.suspended_extents.iter().map(u32::to_string).collect();
            writeln!(out, "suspended_extents: {}", list.join(" "))?;
        }
        if status.unreconciled_regions > 0 {
            writeln!(out, "unreconciled_regions: {}", status.unreconciled_regions)?;
        }
    }
    for (i, members) in c.extents.iter().enumerate() {
        let members: Vec<String> = members
            .iter()
            .map(|m| {
                let state =
                    serde_json::to_value(m.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                if m.up {
                    format!("{} {state}", m.node)
                } else {
                    format!("{} {state} (down)", m.node)
                }
            })
            .collect();
        writeln!(out, "extent {i}: {}", members.join(", "))?;
    }
    if let Some(status) = &c.status {
        for s in &status.syncs {
            writeln!(
                out,
                "resync {} {}: {} {}",
                s.extent,
                s.node,
                if s.rebuild { "rebuild" } else { "resync" },
                progress_text(s, status.region_bytes)
            )?;
        }
    }
    Ok(())
}

/// `256/1024 regions (25%), 64.00 MiB/s, eta 12s`.
fn progress_text(s: &crate::cluster::PublishedSync, region_bytes: u64) -> String {
    let rate = s.rate_bytes_per_s.map_or_else(|| "rate -".to_owned(), |r| format!("{}/s", format_size_human(r)));
    let eta = s.eta_s(region_bytes).map_or_else(|| "eta -".to_owned(), |e| format!("eta {}", format_duration_s(e)));
    format!("{}/{} regions ({}%), {rate}, {eta}", s.regions_done, s.regions_total, s.percent())
}

fn print_list(out: &mut impl Write, volumes: &[VolumeInfo]) -> io::Result<()> {
    let width = volumes.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let owner_width =
        volumes.iter().filter_map(|v| v.cluster.as_ref()?.owner.as_ref().map(String::len)).max().unwrap_or(1);
    for v in volumes {
        match &v.cluster {
            None => writeln!(
                out,
                "{:width$}  {:>7}  {:<6}  {}",
                v.name,
                format_size_exact(v.size_bytes),
                v.backing.name(),
                socket_text(v)
            )?,
            Some(c) => writeln!(
                out,
                "{:width$}  {:>7}  {}/{}  {:<owner_width$}  {:<9}  {}",
                v.name,
                format_size_exact(v.size_bytes),
                v.replicas,
                v.min_replicas,
                c.owner.as_deref().unwrap_or("-"),
                c.state.name(),
                socket_text(v)
            )?,
        }
    }
    Ok(())
}

fn print_nodes(out: &mut impl Write, nodes: &[NodeEntry]) -> io::Result<()> {
    let rows: Vec<[String; 6]> = nodes
        .iter()
        .map(|n| {
            let size = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), format_size_short);
            [
                n.name.clone(),
                n.address.clone().unwrap_or_else(|| "-".into()),
                n.zone.clone().unwrap_or_else(|| "-".into()),
                if n.up { "up" } else { "down" }.to_owned(),
                size(n.capacity_bytes),
                size(n.used_bytes),
            ]
        })
        .collect();
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in rows {
        let [name, address, zone, state, capacity, used] = row;
        let [w0, w1, w2, w3, w4, w5] = widths;
        writeln!(out, "{name:w0$}  {address:w1$}  {zone:w2$}  {state:w3$}  {capacity:>w4$}  {used:>w5$}")?;
    }
    Ok(())
}

/// Width of the resync progress bar, in characters.
const BAR_WIDTH: usize = 20;

fn print_cluster(out: &mut impl Write, c: &ClusterStatus) -> io::Result<()> {
    let names = |list: &[String]| if list.is_empty() { String::new() } else { format!(" ({})", list.join(", ")) };
    writeln!(out, "node: {}", c.node)?;
    writeln!(out, "nodes: {} up, {} down{}", c.nodes_up.len(), c.nodes_down.len(), names(&c.nodes_down))?;
    writeln!(
        out,
        "volumes: {} healthy, {} degraded{}, {} suspended{}, {} detached",
        c.healthy.len(),
        c.degraded.len(),
        names(&c.degraded),
        c.suspended.len(),
        names(&c.suspended),
        c.detached.len()
    )?;
    writeln!(out, "resyncs: {} in progress", c.syncs.len())?;
    for s in &c.syncs {
        let done = (s.sync.percent() as usize * BAR_WIDTH) / 100;
        let bar = format!("{}{}", "#".repeat(done), "-".repeat(BAR_WIDTH - done));
        writeln!(
            out,
            "  {} extent {} {} {} [{bar}] {}",
            s.volume,
            s.sync.extent,
            s.sync.node,
            if s.sync.rebuild { "rebuild" } else { "resync" },
            progress_text(&s.sync, s.region_bytes)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{PublishedStatus, PublishedSync};
    use crate::control::api::{ClusterSync, ClusterVolumeInfo, MemberInfo, VolumeBacking, VolumeState};
    use replication::{MemberState, RiskAcceptance};

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("hcblk").chain(args.iter().copied())).unwrap()
    }

    fn request(args: &[&str]) -> Result<(Request, bool), Error> {
        let Command::Volume(command) = parse(args).command else { panic!() };
        volume_request(command)
    }

    #[test]
    fn the_version_carries_the_build_id() {
        assert_eq!(version("0.1.0", None), "0.1.0");
        assert_eq!(version("0.1.0", Some("")), "0.1.0");
        assert_eq!(version("0.1.0", Some("g1a2b3c")), "0.1.0+g1a2b3c");
        let err = Cli::command()
            .version(version("0.1.0", Some("x")))
            .try_get_matches_from(["hcblk", "--version"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(err.to_string(), "hcblk 0.1.0+x\n");
    }

    #[test]
    fn create_arguments_become_a_request() {
        let (Request::Create(create), false) =
            request(&["volume", "create", "vm1", "--size", "10G", "--queues", "2", "--backing", "null"]).unwrap()
        else {
            panic!()
        };
        assert_eq!((create.size_bytes, create.queues, create.block_size), (10 << 30, 2, 512));
        assert_eq!(create.backing, BackingType::Null);
        assert_eq!(
            (create.replicas, create.min_replicas, create.extent_bytes, create.locality),
            (None, None, None, None)
        );

        let (Request::Create(create), _) = request(&[
            "volume",
            "create",
            "vm1",
            "--size",
            "10G",
            "--replicas",
            "3",
            "--min-replicas",
            "2",
            "--extent-size",
            "256M",
            "--locality",
            "none",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(create.replicas, Some(3));
        assert_eq!(create.min_replicas, Some(2));
        assert_eq!(create.extent_bytes, Some(256 << 20));
        assert_eq!(create.locality, Some(Locality::None));

        assert!(matches!(request(&["volume", "create", "vm1", "--size", "10X"]), Err(Error::InvalidSize { .. })));
        for bad in [
            &["--backing", "tape"][..],
            &["--extent-size", "3M"],
            &["--extent-size", "8G"],
            &["--extent-size", "8M"],
            &["--locality", "near"],
        ] {
            let mut args = vec!["volume", "create", "vm1", "--size", "1G"];
            args.extend_from_slice(bad);
            assert!(request(&args).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn cluster_verbs_become_requests() {
        assert_eq!(
            request(&["volume", "attach", "v", "--force"]).unwrap(),
            (Request::Attach { name: "v".into(), force: true }, false)
        );
        assert_eq!(request(&["volume", "detach", "v"]).unwrap(), (Request::Detach { name: "v".into() }, false));
        assert_eq!(request(&["volume", "info", "v", "--json"]).unwrap(), (Request::Info { name: "v".into() }, true));
        let (Request::AcceptRisk { name, reason, by }, _) =
            request(&["volume", "accept-risk", "v", "--reason", "n3 replaced"]).unwrap()
        else {
            panic!()
        };
        assert_eq!((name.as_str(), reason.as_str()), ("v", "n3 replaced"));
        assert!(by.contains('@'), "{by}");
        assert!(matches!(parse(&["node", "list"]).command, Command::Node(NodeCommand::List { json: false })));
        assert!(matches!(
            parse(&["cluster", "status", "--json"]).command,
            Command::Cluster(ClusterCommand::Status { json: true })
        ));
    }

    #[test]
    fn relative_paths_are_made_absolute_by_the_cli() {
        let (Request::Create(create), _) =
            request(&["volume", "create", "vm1", "--size", "1G", "--path", "disk.img"]).unwrap()
        else {
            panic!()
        };
        let path = create.path.unwrap();
        assert!(path.is_absolute() && path.ends_with("disk.img"), "{}", path.display());
    }

    fn daemon_args(extra: &[&str]) -> DaemonArgs {
        let mut args = vec!["--api-socket", "/tmp/x/api.sock", "daemon", "--data-dir", "rel/data"];
        args.extend_from_slice(extra);
        let Command::Daemon(d) = parse(&args).command else { panic!() };
        *d
    }

    #[test]
    fn daemon_config_validation() {
        let config = |extra: &[&str]| DaemonConfig::try_from((daemon_args(extra), PathBuf::from("/tmp/x/api.sock")));
        let ok = config(&[]).unwrap();
        assert!(ok.data_dir.is_absolute());
        assert_eq!(ok.poll.mode, PollMode::Adaptive);
        assert_eq!(ok.poll.idle, Duration::from_millis(1));
        assert!(ok.poll.cpus.is_empty(), "pollers are not pinned unless asked");
        assert_eq!(config(&["--cpus", "0"]).unwrap().poll.cpus, vec![0]);
        for bad in [
            &["--poll", "sometimes"][..],
            &["--poll-idle-us", "0"],
            &["--hugepages-mb", "0"],
            &["--cpus", "4095"],
            &["--cpus", "x"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn socket_group_and_mode() {
        let config = |extra: &[&str]| DaemonConfig::try_from((daemon_args(extra), PathBuf::from("/tmp/x/api.sock")));
        let access = |extra: &[&str]| config(extra).map(|c| c.socket_access);
        assert_eq!(access(&[]).unwrap(), SocketAccess { gid: None, mode: 0o600 });
        // Group 0 is root on every Debian system (base-passwd).
        let root = access(&["--socket-group", "root"]).unwrap();
        assert_eq!(root, SocketAccess { gid: Some(0), mode: 0o660 });
        assert_eq!(config(&["--socket-group", "root"]).unwrap().socket_group.as_deref(), Some("root"));
        assert_eq!(access(&["--socket-group", "root", "--socket-mode", "0670"]).unwrap().mode, 0o670);
        assert_eq!(access(&["--socket-mode", "640"]).unwrap(), SocketAccess { gid: None, mode: 0o640 });
        assert_eq!(access(&["--socket-mode", "0o600"]).unwrap().mode, 0o600);
        for (bad, says) in [
            (&["--socket-group", "no-such-group-hcblk"][..], "--socket-group no-such-group-hcblk: no such group"),
            (&["--socket-mode", "0668"], "expected octal permission bits"),
            (&["--socket-mode", "rw-rw----"], "expected octal permission bits"),
            (&["--socket-mode", ""], "expected octal permission bits"),
            (&["--socket-mode", "4660"], "expected octal permission bits"),
            (&["--socket-mode", "00660"], "expected octal permission bits"),
            (&["--socket-mode", "0666"], "lets every local user connect"),
            (&["--socket-group", "root", "--socket-mode", "0640"], "needs write permission, g+w"),
        ] {
            let err = config(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    const CLUSTER: [&str; 8] =
        ["--etcd", "http://127.0.0.1:2379", "--node", "n1", "--listen", "10.0.0.1:7400", "--cluster-secret-file", "s"];

    fn cluster(extra: &[&str], env_secret: bool) -> Result<Option<ClusterOptions>, Error> {
        let mut args = CLUSTER.to_vec();
        args.extend_from_slice(extra);
        cluster_options(&daemon_args(&args), env_secret)
    }

    #[test]
    fn cluster_flags_and_their_defaults() {
        assert!(cluster_options(&daemon_args(&[]), true).unwrap().is_none(), "no --etcd: standalone");
        let c = cluster(&[], false).unwrap().unwrap();
        assert_eq!(c.etcd, ["http://127.0.0.1:2379"]);
        assert_eq!((c.node.as_str(), c.listen.to_string().as_str()), ("n1", "10.0.0.1:7400"));
        assert!(matches!(&c.secret, SecretSource::File(p) if p.is_absolute() && p.ends_with("s")));
        assert_eq!((c.zone, c.transport, c.capacity_bytes), (None, proto::TransportKind::Auto, None));
        assert_eq!(c.owner, OwnerSettings::default());
        assert_eq!(
            (c.owner.io_timeout, c.owner.replace_after, c.owner.resync_bytes_per_s),
            (Duration::from_secs(5), Duration::from_secs(600), 64 << 20)
        );
        let c = cluster(
            &[
                "--zone",
                "rack-1",
                "--transport",
                "tcp",
                "--io-timeout",
                "2s",
                "--replace-after",
                "30m",
                "--resync-rate",
                "100M/s",
                "--capacity",
                "1T",
            ],
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.zone.as_deref(), c.transport, c.capacity_bytes),
            (Some("rack-1"), proto::TransportKind::Tcp, Some(1 << 40))
        );
        assert_eq!(
            c.owner,
            OwnerSettings {
                io_timeout: Duration::from_secs(2),
                replace_after: Duration::from_secs(1800),
                resync_bytes_per_s: 100 << 20
            }
        );
        assert_eq!(cluster(&["--resync-rate", "0"], false).unwrap().unwrap().owner.resync_bytes_per_s, 0);
        // The secret from the environment instead of a file.
        let mut args = CLUSTER[2..6].to_vec();
        args.push("--etcd=a:1,b:2");
        let c = cluster_options(&daemon_args(&args), true).unwrap().unwrap();
        assert_eq!((c.secret, c.etcd), (SecretSource::Env, vec!["a:1".to_owned(), "b:2".to_owned()]));
    }

    #[test]
    fn cluster_flag_mistakes_are_refused_with_the_reason() {
        let without_etcd = |extra: &[&str]| cluster_options(&daemon_args(extra), false).unwrap_err().to_string();
        assert!(without_etcd(&["--node", "n1"]).contains("--node is a cluster-mode flag"));
        assert!(without_etcd(&["--zone", "z"]).contains("--zone is a cluster-mode flag"));
        let err = |extra: &[&str], env: bool| cluster(extra, env).unwrap_err().to_string();
        assert!(err(&[], true).contains("given twice"), "{}", err(&[], true));
        let neither = cluster_options(&daemon_args(&CLUSTER[..6]), false).unwrap_err().to_string();
        assert!(neither.contains("needs the cluster secret") && neither.contains(SECRET_ENV), "{neither}");
        let missing =
            cluster_options(&daemon_args(&["--etcd", "a:1", "--cluster-secret-file", "s"]), false).unwrap_err();
        assert!(missing.to_string().contains("--node NAME and --listen"), "{missing}");
        for (bad, why) in [
            (&["--transport", "loopback"][..], "auto, tcp or rdma"),
            (&["--transport", "carrier-pigeon"], "auto, tcp or rdma"),
            (&["--zone", "a/b"], "invalid zone"),
            (&["--io-timeout", "5"], "no unit"),
            (&["--io-timeout", "50ms"], "out of range"),
            (&["--replace-after", "5s"], "out of range"),
            (&["--io-timeout", "11m"], "out of range"),
            (&["--io-timeout", "10m", "--replace-after", "10m"], "longer than --io-timeout"),
            (&["--resync-rate", "512K"], "at least 1M"),
            (&["--resync-rate", "fast"], "invalid size"),
            (&["--capacity", "0"], "greater than 0"),
        ] {
            let msg = err(bad, false);
            assert!(msg.contains(why), "{bad:?}: {msg}");
        }
        for (flag, value, why) in [
            ("--listen", "0.0.0.0:7400", "peers reach"),
            ("--listen", "10.0.0.1:0", "peers reach"),
            ("--listen", "host:7400", "ADDR:PORT"),
            ("--node", ".n1", "invalid node name"),
            ("--node", "n 1", "invalid node name"),
            ("--etcd", "a:1,,b:2", "comma-separated"),
        ] {
            let mut args = CLUSTER.to_vec();
            let at = args.iter().position(|a| *a == flag).unwrap();
            args[at + 1] = value;
            let msg = cluster_options(&daemon_args(&args), false).unwrap_err().to_string();
            assert!(msg.contains(why), "{flag} {value}: {msg}");
        }
    }

    fn standalone_volume() -> VolumeInfo {
        VolumeInfo {
            name: "vm1".into(),
            size_bytes: 10 << 30,
            block_size: 512,
            queues: 1,
            backing: VolumeBacking::File,
            path: Some("/d/volumes/vm1.img".into()),
            created_backing: true,
            read_only: false,
            serial: "vm1".into(),
            created_unix_s: 0,
            socket: Some("/run/hcblk/vm1.sock".into()),
            connected: false,
            rejected_requests: 7,
            replicas: 1,
            min_replicas: 1,
            extent_bytes: 1 << 30,
            generation: 3,
            epoch: 1,
            cluster: None,
        }
    }

    fn render(request: Request, response: Response) -> String {
        let mut out = Vec::new();
        print_response(&mut out, &request, &response).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn create_request() -> Request {
        Request::Create(CreateRequest {
            name: "vm1".into(),
            size_bytes: 10 << 30,
            block_size: 512,
            queues: 1,
            backing: BackingType::File,
            path: None,
            read_only: false,
            serial: None,
            replicas: None,
            min_replicas: None,
            extent_bytes: None,
            locality: None,
        })
    }

    #[test]
    fn output_formats() {
        let volume = standalone_volume();
        assert_eq!(
            render(create_request(), Response::Volume { volume: volume.clone() }),
            "volume vm1 created\nsocket: /run/hcblk/vm1.sock\n"
        );
        let info = render(Request::Info { name: "vm1".into() }, Response::Volume { volume: volume.clone() });
        assert!(info.contains("\nsize: 10737418240\n") && info.contains("\nsocket: /run/hcblk/vm1.sock\n"), "{info}");
        assert!(info.contains("\nbacking: file\n") && info.contains("\npath: /d/volumes/vm1.img\n"), "{info}");
        for line in
            ["replicas: 1", "min_replicas: 1", "extent_size: 1G", "generation: 3", "epoch: 1", "rejected_requests: 7"]
        {
            assert!(info.contains(&format!("\n{line}\n")), "{line}: {info}");
        }
        assert!(!info.contains("owner"), "{info}");
        let list = render(Request::List {}, Response::Volumes { volumes: vec![volume] });
        assert_eq!(list, "vm1      10G  file    /run/hcblk/vm1.sock\n");
    }

    fn cluster_volume() -> VolumeInfo {
        let member = |node: &str, state, up| MemberInfo { node: node.into(), state, up };
        VolumeInfo {
            backing: VolumeBacking::Replicated,
            path: None,
            created_backing: false,
            socket: None,
            replicas: 3,
            min_replicas: 2,
            size_bytes: (2 << 30) + (512 << 20),
            generation: 4,
            epoch: 9,
            cluster: Some(ClusterVolumeInfo {
                id: 77,
                locality: Locality::Prefer,
                owner: Some("n1".into()),
                owner_up: true,
                attached_here: false,
                state: VolumeState::Degraded,
                risk_accepted: Some(RiskAcceptance {
                    by: "root@h1".into(),
                    at_unix_s: 1_795_317_910,
                    reason: "n3 swap".into(),
                }),
                extents: vec![
                    vec![
                        member("n1", MemberState::InSync, true),
                        member("n2", MemberState::InSync, true),
                        member("n3", MemberState::Stale, false),
                    ],
                    vec![member("n1", MemberState::InSync, true), member("n2", MemberState::Rebuilding, true)],
                    vec![member("n1", MemberState::InSync, true)],
                ],
                status: Some(PublishedStatus {
                    node: "n1".into(),
                    phase: "serving".into(),
                    generation: 4,
                    epoch: 9,
                    suspended_extents: vec![],
                    unreconciled_regions: 0,
                    region_bytes: 1 << 20,
                    updated_unix_s: 0,
                    syncs: vec![PublishedSync {
                        node: "n2".into(),
                        extent: 1,
                        rebuild: true,
                        regions_done: 256,
                        regions_total: 1024,
                        bytes_done: 256 << 20,
                        rate_bytes_per_s: Some(64 << 20),
                    }],
                }),
            }),
            ..standalone_volume()
        }
    }

    #[test]
    fn cluster_output_formats() {
        let volume = cluster_volume();
        assert_eq!(
            render(create_request(), Response::Volume { volume: volume.clone() }),
            "volume vm1 created\nextents: 3 x 1G, replicas 3 (min 2)\n"
        );
        let info = render(Request::Info { name: "vm1".into() }, Response::Volume { volume: volume.clone() });
        for line in [
            "backing: replicated",
            "socket: -",
            "replicas: 3",
            "min_replicas: 2",
            "extent_size: 1G",
            "owner: n1",
            "generation: 4",
            "epoch: 9",
            "state: degraded",
            "risk_accepted: by root@h1 at 2026-11-22T03:25:10Z: n3 swap",
            "phase: serving",
            "extent 0: n1 in_sync, n2 in_sync, n3 stale (down)",
            "extent 1: n1 in_sync, n2 rebuilding",
            "extent 2: n1 in_sync",
            "resync 1 n2: rebuild 256/1024 regions (25%), 64.00 MiB/s, eta 12s",
        ] {
            assert!(info.contains(&format!("\n{line}\n")), "{line}: {info}");
        }
        // Every line is `key: value` for scripts.
        assert!(info.lines().all(|l| l.split_once(": ").is_some()), "{info}");
        let attached = render(
            Request::Attach { name: "vm1".into(), force: false },
            Response::Volume { volume: VolumeInfo { socket: Some("/run/hcblk/vm1.sock".into()), ..volume.clone() } },
        );
        assert_eq!(attached, "volume vm1 attached\nsocket: /run/hcblk/vm1.sock\n");
        let accepted = render(
            Request::AcceptRisk { name: "vm1".into(), reason: "x".into(), by: "y".into() },
            Response::Volume { volume: volume.clone() },
        );
        assert_eq!(accepted, "volume vm1: risk accepted by root@h1: n3 swap\n");
        let list = render(Request::List {}, Response::Volumes { volumes: vec![volume] });
        assert_eq!(list, "vm1    2560M  3/2  n1  degraded   -\n");
        assert_eq!(
            render(Request::Detach { name: "v".into() }, Response::Detached { name: "v".into() }),
            "volume v detached\n"
        );
    }

    #[test]
    fn node_and_cluster_output() {
        let nodes = vec![
            NodeEntry {
                name: "n1".into(),
                up: true,
                address: Some("10.0.0.1:7400".into()),
                zone: Some("a".into()),
                capacity_bytes: Some(1 << 40),
                used_bytes: Some(3 << 30),
                reserved_bytes: 30 << 30,
                version: Some("0.1.0".into()),
                started_unix_s: Some(0),
            },
            NodeEntry {
                name: "n22".into(),
                up: false,
                address: None,
                zone: None,
                capacity_bytes: None,
                used_bytes: None,
                reserved_bytes: 10 << 30,
                version: None,
                started_unix_s: None,
            },
        ];
        let text = render(Request::NodeList {}, Response::Nodes { nodes });
        assert_eq!(text, "n1   10.0.0.1:7400  a  up    1T  3G\nn22  -              -  down   -   -\n");

        let status = ClusterStatus {
            node: "n1".into(),
            nodes_up: vec!["n1".into(), "n2".into()],
            nodes_down: vec!["n3".into()],
            healthy: vec!["a".into()],
            degraded: vec!["b".into()],
            suspended: vec![],
            detached: vec!["c".into(), "d".into()],
            syncs: vec![ClusterSync {
                volume: "b".into(),
                owner: "n1".into(),
                region_bytes: 1 << 20,
                sync: PublishedSync {
                    node: "n2".into(),
                    extent: 0,
                    rebuild: false,
                    regions_done: 512,
                    regions_total: 1024,
                    bytes_done: 512 << 20,
                    rate_bytes_per_s: None,
                },
            }],
        };
        let text = render(Request::ClusterStatus {}, Response::Cluster { cluster: status });
        assert_eq!(
            text,
            "node: n1\nnodes: 2 up, 1 down (n3)\nvolumes: 1 healthy, 1 degraded (b), 0 suspended, 2 detached\n\
             resyncs: 1 in progress\n  b extent 0 n2 resync [##########----------] 512/1024 regions (50%), rate -, eta -\n"
        );
    }

    #[test]
    fn json_output_is_the_apis() {
        let volume = cluster_volume();
        let mut out = Vec::new();
        print_json(&mut out, &Response::Volume { volume: volume.clone() }).unwrap();
        assert!(out.ends_with(b"\n") && out.iter().filter(|b| **b == b'\n').count() == 1);
        let back: VolumeInfo = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, volume);
    }
}
