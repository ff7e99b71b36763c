//! The daemon's local API: one JSON request line, one JSON response line, per connection, on a
//! Unix stream socket (`--api-socket`).
//!
//! ```text
//! -> {"op":"create","name":"vm1","size_bytes":10737418240,"block_size":512,"queues":1,
//!     "backing":"file","path":null,"read_only":false,"serial":null,
//!     "replicas":null,"min_replicas":null,"extent_bytes":null,"locality":null}
//! -> {"op":"list"}
//! -> {"op":"info","name":"vm1"}
//! -> {"op":"resize","name":"vm1","size_bytes":21474836480}
//! -> {"op":"delete","name":"vm1","force":false}
//! -> {"op":"attach","name":"vm1","force":false}                 cluster mode only
//! -> {"op":"detach","name":"vm1"}                               cluster mode only
//! -> {"op":"accept_risk","name":"vm1","reason":"..","by":"root@h1"}  cluster mode only
//! -> {"op":"node_list"}                                         cluster mode only
//! -> {"op":"cluster_status"}                                    cluster mode only
//! <- {"status":"volume","volume":{VolumeInfo}}        create, info, resize, attach, accept_risk
//! <- {"status":"volumes","volumes":[{VolumeInfo},..]} list
//! <- {"status":"deleted","name":"vm1"}                delete
//! <- {"status":"detached","name":"vm1"}               detach
//! <- {"status":"nodes","nodes":[{NodeEntry},..]}      node_list
//! <- {"status":"cluster","cluster":{ClusterStatus}}   cluster_status
//! <- {"status":"error","message":"a: b: c"}           any refusal or failure
//! ```
//!
//! Limits: a request line is at most [`REQUEST_BYTES_MAX`]; the daemon waits at most
//! [`REQUEST_TIMEOUT`] for it; at most [`CONNECTIONS_MAX`] connections are served at once.
//! Whatever arrives on the socket is untrusted: it is decoded into a [`Request`] or answered with
//! an error response, and never stops the daemon.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use replication::{Locality, MemberState, RiskAcceptance};
use serde::{Deserialize, Serialize};

use super::store::{BackingType, VolumeRecord};
use super::Error;
use crate::cluster::{PublishedStatus, PublishedSync};

pub const REQUEST_BYTES_MAX: usize = 64 << 10;
/// A list of many volumes is long, but bounded: a volume's info is well under 4 KiB.
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the CLI waits for the daemon to carry a request out: creating a volume allocates
/// its backing and starts its export, which is quick; attaching a replicated volume waits at
/// most 30 s for its replicas, detaching as long for the guest's requests in flight, each
/// etcd call at most 5 s. Never wait forever.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
pub const CONNECTIONS_MAX: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Create(CreateRequest),
    /// A struct variant (not a unit one) so that unknown fields are refused here too.
    List {},
    Info {
        name: String,
    },
    Resize {
        name: String,
        size_bytes: u64,
    },
    Delete {
        name: String,
        /// Delete even while a frontend is connected (cluster mode: while attached anywhere).
        #[serde(default)]
        force: bool,
    },
    /// Cluster mode: this node becomes the volume's owner and exports it.
    Attach {
        name: String,
        /// Take the volume over even though its owner is still registered.
        #[serde(default)]
        force: bool,
    },
    /// Cluster mode: stops this node's export and releases ownership.
    Detach {
        name: String,
    },
    /// Cluster mode: records the operator's decision to let writes go on with fewer than
    /// min_replicas members in sync.
    AcceptRisk {
        name: String,
        reason: String,
        /// Who decided (user@host, as the CLI saw it).
        by: String,
    },
    NodeList {},
    ClusterStatus {},
}

impl Request {
    /// The request's name in logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Create(_) => "create",
            Request::List {} => "list",
            Request::Info { .. } => "info",
            Request::Resize { .. } => "resize",
            Request::Delete { .. } => "delete",
            Request::Attach { .. } => "attach",
            Request::Detach { .. } => "detach",
            Request::AcceptRisk { .. } => "accept-risk",
            Request::NodeList {} => "node list",
            Request::ClusterStatus {} => "cluster status",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub size_bytes: u64,
    /// Default 512.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Default 1.
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Default file.
    #[serde(default = "default_backing")]
    pub backing: BackingType,
    /// Absolute. File: default DATA_DIR/volumes/NAME.img; device: required.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
    /// Default: derived from the name.
    #[serde(default)]
    pub serial: Option<String>,
    /// Default: 3 in cluster mode (1..=5), 1 standalone (where only 1 is accepted).
    #[serde(default)]
    pub replicas: Option<u8>,
    /// Default: a majority of the replicas, N/2+1.
    #[serde(default)]
    pub min_replicas: Option<u8>,
    /// Default 1 GiB; a power of two from 16 MiB to 4 GiB.
    #[serde(default)]
    pub extent_bytes: Option<u64>,
    /// Cluster mode only; default prefer.
    #[serde(default)]
    pub locality: Option<Locality>,
}

fn default_block_size() -> u32 {
    512
}
fn default_queues() -> u16 {
    1
}
fn default_backing() -> BackingType {
    BackingType::File
}

/// What serves a volume, as the API and the CLI name it: a standalone volume's backing
/// ([`BackingType`]), or `replicated` for a cluster volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeBacking {
    File,
    Device,
    Ram,
    Null,
    Replicated,
}

impl From<BackingType> for VolumeBacking {
    fn from(t: BackingType) -> Self {
        match t {
            BackingType::File => Self::File,
            BackingType::Device => Self::Device,
            BackingType::Ram => Self::Ram,
            BackingType::Null => Self::Null,
        }
    }
}

impl VolumeBacking {
    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Device => "device",
            Self::Ram => "ram",
            Self::Null => "null",
            Self::Replicated => "replicated",
        }
    }
}

/// What the daemon tells about a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub queues: u16,
    pub backing: VolumeBacking,
    pub path: Option<PathBuf>,
    pub created_backing: bool,
    pub read_only: bool,
    pub serial: String,
    pub created_unix_s: u64,
    /// The vhost-user socket QEMU connects to; `None` for a cluster volume not attached on
    /// the node that answers.
    pub socket: Option<PathBuf>,
    /// Whether a frontend is connected right now (to the answering node's export).
    pub connected: bool,
    /// Guest requests the answering node's export refused since it started serving the volume
    /// (malformed descriptor chains, sectors out of range, unsupported request types, writes
    /// to a read-only volume); 0 where it is not exported. Their log lines are rate-limited.
    #[serde(default)]
    pub rejected_requests: u64,
    pub replicas: u8,
    pub min_replicas: u8,
    pub extent_bytes: u64,
    /// Bumped by every attach (cluster) or daemon start serving the volume (standalone).
    pub generation: u64,
    /// Membership epoch.
    pub epoch: u32,
    /// Cluster mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterVolumeInfo>,
}

impl VolumeInfo {
    pub fn new(record: &VolumeRecord, socket: PathBuf, connected: bool, rejected_requests: u64) -> Self {
        Self {
            name: record.name.clone(),
            size_bytes: record.size_bytes,
            block_size: record.block_size,
            queues: record.queues,
            backing: record.backing.into(),
            path: record.path.clone(),
            created_backing: record.created_backing,
            read_only: record.read_only,
            serial: record.serial.clone(),
            created_unix_s: record.created_unix_s,
            socket: Some(socket),
            connected,
            rejected_requests,
            replicas: record.replicas,
            min_replicas: record.min_replicas,
            extent_bytes: record.extent_bytes,
            generation: record.generation,
            epoch: record.epoch,
            cluster: None,
        }
    }
}

/// A cluster volume's health, from its document and its owner's published status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Every extent has all its replicas in sync.
    Healthy,
    /// Some member is stale, rebuilding or missing; writes go on (min_replicas in sync, or a
    /// recorded acceptance of the risk).
    Degraded,
    /// Some extent's writes wait: fewer than min_replicas in sync and no recorded acceptance.
    Suspended,
    /// No owner: no node serves it.
    Detached,
}

impl VolumeState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Suspended => "suspended",
            Self::Detached => "detached",
        }
    }
}

/// What only a cluster volume has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVolumeInfo {
    /// Wire identity.
    pub id: u64,
    pub locality: Locality,
    /// The node serving it to its VM.
    pub owner: Option<String>,
    /// The owner is registered (its lease alive).
    pub owner_up: bool,
    /// The answering node is the owner and exports it.
    pub attached_here: bool,
    pub state: VolumeState,
    pub risk_accepted: Option<RiskAcceptance>,
    /// One entry per extent, its members in document order (empty in a `list` answer).
    pub extents: Vec<Vec<MemberInfo>>,
    /// The owner's status: live if the answering node owns it, else what the owner published.
    pub status: Option<PublishedStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub node: String,
    pub state: MemberState,
    /// Its node is registered.
    pub up: bool,
}

/// One node as `node list` shows it: registered ones (up) with what they registered, and
/// nodes that volume documents name but that are not registered (down) with their name only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    pub up: bool,
    pub address: Option<String>,
    pub zone: Option<String>,
    pub capacity_bytes: Option<u64>,
    /// Capacity minus the free space it registered.
    pub used_bytes: Option<u64>,
    /// Bytes of the extents volume documents place on it (placement keeps them free).
    pub reserved_bytes: u64,
    pub version: Option<String>,
    pub started_unix_s: Option<u64>,
}

/// `cluster status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    pub nodes_up: Vec<String>,
    pub nodes_down: Vec<String>,
    pub healthy: Vec<String>,
    pub degraded: Vec<String>,
    pub suspended: Vec<String>,
    pub detached: Vec<String>,
    pub syncs: Vec<ClusterSync>,
}

/// A resync or rebuild in progress, as its volume's owner reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSync {
    pub volume: String,
    pub owner: String,
    pub region_bytes: u64,
    pub sync: PublishedSync,
}

// One response per API call, built, sent and dropped: boxing the large variant would save
// nothing but add an allocation and a Box at every construction site.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Volume { volume: VolumeInfo },
    Volumes { volumes: Vec<VolumeInfo> },
    Deleted { name: String },
    Detached { name: String },
    Nodes { nodes: Vec<NodeEntry> },
    Cluster { cluster: ClusterStatus },
    Error { message: String },
}

impl Response {
    pub fn error(error: &Error) -> Self {
        Self::Error { message: super::error::chain(error) }
    }
}

/// Reads one line of at most `max` bytes (newline excluded). A longer line, EOF before the
/// newline, or a timeout is an error.
fn read_line(stream: &UnixStream, max: usize) -> Result<Vec<u8>, Error> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut reader = BufReader::new(stream.take(limit));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).map_err(Error::ApiIo)?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > max {
            Error::Protocol(format!("line longer than {max} bytes"))
        } else {
            Error::Protocol("connection closed before the end of the line".into())
        });
    }
    line.pop();
    Ok(line)
}

fn write_line<T: Serialize>(mut stream: &UnixStream, value: &T) -> Result<(), Error> {
    let mut bytes = serde_json::to_vec(value).map_err(|e| Error::Protocol(e.to_string()))?;
    bytes.push(b'\n');
    stream.write_all(&bytes).map_err(Error::ApiIo)?;
    stream.flush().map_err(Error::ApiIo)
}

/// Decodes a request line; anything else than one well-formed request is an error.
pub fn decode_request(line: &[u8]) -> Result<Request, Error> {
    serde_json::from_slice(line).map_err(|e| Error::Protocol(format!("bad request: {e}")))
}

/// Server side: reads and decodes the request of a freshly accepted connection.
pub fn read_request(stream: &UnixStream) -> Result<Request, Error> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(Error::ApiIo)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(Error::ApiIo)?;
    decode_request(&read_line(stream, REQUEST_BYTES_MAX)?)
}

pub fn write_response(stream: &UnixStream, response: &Response) -> Result<(), Error> {
    write_line(stream, response)
}

/// Client side: one request, one response. A refusal by the daemon is `Err(Error::Remote)`.
pub fn call(api_socket: &Path, request: &Request) -> Result<Response, Error> {
    let stream =
        UnixStream::connect(api_socket).map_err(|source| Error::Connect { path: api_socket.to_owned(), source })?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(Error::ApiIo)?;
    stream.set_read_timeout(Some(RESPONSE_TIMEOUT)).map_err(Error::ApiIo)?;
    write_line(&stream, request)?;
    let line = read_line(&stream, RESPONSE_BYTES_MAX)?;
    let response: Response =
        serde_json::from_slice(&line).map_err(|e| Error::Protocol(format!("bad response: {e}")))?;
    match response {
        Response::Error { message } => Err(Error::Remote(message)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Create(CreateRequest {
                name: "vm1".into(),
                size_bytes: 1 << 30,
                block_size: 4096,
                queues: 4,
                backing: BackingType::Device,
                path: Some("/dev/sdb".into()),
                read_only: true,
                serial: Some("S1".into()),
                replicas: Some(3),
                min_replicas: Some(2),
                extent_bytes: Some(256 << 20),
                locality: Some(Locality::None),
            }),
            Request::List {},
            Request::Info { name: "vm1".into() },
            Request::Resize { name: "vm1".into(), size_bytes: 2 << 30 },
            Request::Delete { name: "vm1".into(), force: true },
            Request::Attach { name: "vm1".into(), force: true },
            Request::Detach { name: "vm1".into() },
            Request::AcceptRisk { name: "vm1".into(), reason: "n3 is being replaced".into(), by: "root@h1".into() },
            Request::NodeList {},
            Request::ClusterStatus {},
        ];
        for request in requests {
            let line = serde_json::to_vec(&request).unwrap();
            assert!(!line.contains(&b'\n'));
            assert_eq!(decode_request(&line).unwrap(), request);
        }
    }

    #[test]
    fn create_defaults() {
        let request = decode_request(br#"{"op":"create","name":"a","size_bytes":4096}"#).unwrap();
        let Request::Create(create) = request else { panic!("{request:?}") };
        assert_eq!((create.block_size, create.queues, create.backing), (512, 1, BackingType::File));
        assert_eq!((create.path, create.read_only, create.serial), (None, false, None));
        assert_eq!(
            (create.replicas, create.min_replicas, create.extent_bytes, create.locality),
            (None, None, None, None)
        );
        let request = decode_request(br#"{"op":"attach","name":"a"}"#).unwrap();
        assert_eq!(request, Request::Attach { name: "a".into(), force: false });
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let garbage: [&[u8]; 17] = [
            b"",
            b"{",
            b"null",
            b"[]",
            b"\xff\xfe\x00",
            br#"{"op":"explode"}"#,
            br#"{"op":"info"}"#,
            br#"{"op":"info","name":7}"#,
            br#"{"op":"resize","name":"a","size_bytes":-1}"#,
            br#"{"op":"resize","name":"a","size_bytes":18446744073709551616}"#,
            br#"{"op":"list","extra":1}"#,
            br#"{"op":"create","name":"a","size_bytes":1,"backing":"tape"}"#,
            br#"{"op":"create","name":"a","size_bytes":1,"replicas":256}"#,
            br#"{"op":"create","name":"a","size_bytes":1,"locality":"far"}"#,
            br#"{"op":"accept_risk","name":"a","reason":"r"}"#,
            br#"{"op":"detach","name":"a","force":true}"#,
            br#"{"op":"node_list","x":1}"#,
        ];
        for line in garbage {
            assert!(decode_request(line).is_err(), "{:?} decoded", String::from_utf8_lossy(line));
        }
        // Deeply nested input must not overflow the stack (serde_json limits recursion).
        let deep = "[".repeat(100_000);
        assert!(decode_request(deep.as_bytes()).is_err());
    }

    #[test]
    fn lines_are_bounded() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut b = b;
            // The reader stops after max+1 bytes; the rest may fail to send, which is fine.
            let _ = b.write_all(&vec![b'x'; REQUEST_BYTES_MAX * 2]);
        });
        let err = read_line(&a, REQUEST_BYTES_MAX).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        drop(a);
        writer.join().unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        (&b).write_all(b"{\"op\":\"list\"}").unwrap();
        drop(b);
        let err = read_line(&a, REQUEST_BYTES_MAX).unwrap_err();
        assert!(err.to_string().contains("closed before"), "{err}");
    }

    #[test]
    fn a_silent_client_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        assert!(matches!(read_line(&a, 10), Err(Error::ApiIo(_))));
    }
}
