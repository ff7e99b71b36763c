use std::io;
use std::path::PathBuf;

/// Errors of the control plane: operator mistakes (refused before anything changes), metadata
/// store failures, API transport failures, and failures of the backing or export they wrap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid size {input:?}: {reason}")]
    InvalidSize { input: String, reason: String },
    /// A request or a configuration value that is refused as given (never silently fixed).
    #[error("{0}")]
    Invalid(String),
    #[error("volume {0} already exists")]
    VolumeExists(String),
    #[error("no volume named {0}")]
    NoSuchVolume(String),
    #[error("cannot shrink volume {name} from {current} to {requested} bytes (grow only)")]
    Shrink { name: String, current: u64, requested: u64 },
    #[error("volume {name} is in use by a connected frontend; stop the VM first or pass --force")]
    InUse { name: String },
    #[error("vhost-user socket path {path} is in use by another process")]
    SocketInUse { path: PathBuf },
    #[error("cannot open the backing of volume {name}")]
    Backing {
        name: String,
        #[source]
        source: replica::Error,
    },
    #[error("cannot export volume {name}")]
    Export {
        name: String,
        #[source]
        source: crate::Error,
    },
    #[error("cannot resize volume {name}")]
    Resize {
        name: String,
        #[source]
        source: crate::Error,
    },
    #[error("cannot write volume metadata {path}")]
    StoreWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read volume metadata {path}")]
    StoreRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "volume metadata {path} is corrupt (fix or move it away; the daemon will not drop a volume silently): {reason}"
    )]
    StoreCorrupt { path: PathBuf, reason: String },
    #[error(
        "hugepage pool has {free_pages} free 2 MiB pages, fewer than the {needed_pages} that \
         --hugepages-mb {hugepages_mb} needs; reserve more with `echo 64 > /proc/sys/vm/nr_hugepages`"
    )]
    Hugepages { free_pages: u64, needed_pages: u64, hugepages_mb: u32 },
    #[error(
        "hugepage pool is unknown (no HugePages_Free in /proc/meminfo); hcblk needs hugepages: \
         `echo 64 > /proc/sys/vm/nr_hugepages`"
    )]
    HugepagesUnknown,
    #[error("data directory {path} is in use by another hcblk daemon")]
    DataDirLocked { path: PathBuf },
    #[error("another hcblk daemon is serving the API socket {path}")]
    ApiSocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot listen on the API socket {path}")]
    ApiListen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the hcblk daemon at {path} (is `hcblk daemon` running? see --api-socket)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API exchange with the daemon failed")]
    ApiIo(#[source] io::Error),
    #[error("malformed API message: {0}")]
    Protocol(String),
    /// The daemon refused or failed the request; the message holds its whole error chain.
    #[error("{0}")]
    Remote(String),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Cluster mode: etcd did not answer, or holds a document that is not valid.
    #[error(transparent)]
    Meta(#[from] crate::cluster::MetaError),
    #[error(transparent)]
    Etcd(#[from] crate::cluster::EtcdError),
    #[error(transparent)]
    Registration(#[from] crate::cluster::RegistrationError),
    #[error("cannot place the volume's extents")]
    Placement(#[source] replication::placement::PlacementError),
    #[error("volume {name} is attached on node {node}, which is up; detach it there, or pass --force to take it over")]
    AttachedElsewhere { name: String, node: String },
    #[error("volume {name} is attached on node {node}; detach it first or pass --force")]
    Attached { name: String, node: String },
    #[error("volume {name} is already attached on this node (socket {socket})")]
    AlreadyAttached { name: String, socket: PathBuf },
    #[error("volume {name} is not attached{}", match .owner { Some(o) => format!(" here (its owner is node {o}: detach it there)"), None => String::new() })]
    NotAttached { name: String, owner: Option<String> },
    #[error("cannot attach volume {name}")]
    Attach {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot detach volume {name}")]
    Detach {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A compare-and-swap kept losing to other writers (the owner changing membership).
    #[error("volume {name} kept changing in etcd during the {op}; retry")]
    Contended { name: String, op: &'static str },
    #[error("cluster secret")]
    Secret(#[source] proto::auth::SecretError),
    #[error("--transport")]
    Transport(#[source] proto::TransportError),
    #[error("cannot start the replica service")]
    Members(#[source] crate::member::MemberError),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// The error and all its causes on one line, `a: b: c`, as the daemon sends them to the CLI.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    // Bounded: error chains are short, but a cyclic source() would otherwise never end.
    for _ in 0..32 {
        let Some(c) = cause else { break };
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
