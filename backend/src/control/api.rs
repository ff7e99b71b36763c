//! The daemon's local API: one JSON request line, one JSON response line, per connection, on a
//! Unix stream socket (`--api-socket`).
//!
//! ```text
//! -> {"op":"create","name":"vm1","size_bytes":10737418240,"block_size":512,"queues":1,
//!     "backing":"file","path":null,"read_only":false,"serial":null}
//! -> {"op":"list"}
//! -> {"op":"info","name":"vm1"}
//! -> {"op":"resize","name":"vm1","size_bytes":21474836480}
//! -> {"op":"delete","name":"vm1","force":false}
//! <- {"status":"volume","volume":{VolumeInfo}}        create, info, resize
//! <- {"status":"volumes","volumes":[{VolumeInfo},..]} list
//! <- {"status":"deleted","name":"vm1"}                delete
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

use serde::{Deserialize, Serialize};

use super::store::{BackingType, VolumeRecord};
use super::Error;

pub const REQUEST_BYTES_MAX: usize = 64 << 10;
/// A list of many volumes is long, but bounded: a volume's info is well under 4 KiB.
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the CLI waits for the daemon to carry a request out: creating a volume allocates
/// its backing and starts its export, which is quick, but never wait forever.
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
        /// Delete even while a frontend is connected.
        #[serde(default)]
        force: bool,
    },
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

/// What the daemon tells about a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub queues: u16,
    pub backing: BackingType,
    pub path: Option<PathBuf>,
    pub created_backing: bool,
    pub read_only: bool,
    pub serial: String,
    pub created_unix_s: u64,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// Whether a frontend is connected right now.
    pub connected: bool,
}

impl VolumeInfo {
    pub fn new(record: &VolumeRecord, socket: PathBuf, connected: bool) -> Self {
        Self {
            name: record.name.clone(),
            size_bytes: record.size_bytes,
            block_size: record.block_size,
            queues: record.queues,
            backing: record.backing,
            path: record.path.clone(),
            created_backing: record.created_backing,
            read_only: record.read_only,
            serial: record.serial.clone(),
            created_unix_s: record.created_unix_s,
            socket,
            connected,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Volume { volume: VolumeInfo },
    Volumes { volumes: Vec<VolumeInfo> },
    Deleted { name: String },
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
            }),
            Request::List {},
            Request::Info { name: "vm1".into() },
            Request::Resize { name: "vm1".into(), size_bytes: 2 << 30 },
            Request::Delete { name: "vm1".into(), force: true },
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
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let garbage: [&[u8]; 12] = [
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
