//! The authenticated handshake on a fresh stream (see [`crate::auth`]),
//! shared by the `tcp` transport and the `rdma` transport's out-of-band
//! connection.
//!
//! The whole handshake runs under one [`Deadline`] (`Config::handshake_timeout`):
//! every blocking call gets only the time that is left, so a peer trickling
//! one byte at a time cannot stretch it (a per-call timeout would be reset by
//! every byte).

use super::{ERR_AUTH, ERR_CLUSTER, ERR_PROTOCOL, ERR_VERSION};
use crate::auth::{self, Role};
use crate::wire::{self, ErrorMsg, Message, HEADER_LEN, MAX_CONTROL_BODY};
use crate::{Config, TransportError};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The instant by which a handshake must be over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Instant);

const TIMED_OUT: TransportError = TransportError::Handshake("not completed within handshake_timeout");

impl Deadline {
    pub(crate) fn after(d: Duration) -> Self {
        Self(Instant::now() + d)
    }

    /// Time left; the handshake has failed when none is.
    fn left(&self) -> Result<Duration, TransportError> {
        let left = self.0.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TIMED_OUT);
        }
        Ok(left)
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// `read_exact` where the whole read, not each `read`, is bounded by `deadline`.
pub(crate) fn read_exact_by(
    sock: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: &Deadline,
) -> Result<(), TransportError> {
    while !buf.is_empty() {
        sock.set_read_timeout(Some(deadline.left()?)).map_err(io("setsockopt"))?;
        match sock.read(buf) {
            Ok(0) => {
                return Err(TransportError::Io { what: "handshake receive", source: ErrorKind::UnexpectedEof.into() })
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(TIMED_OUT),
            Err(e) => return Err(io("handshake receive")(e)),
        }
    }
    Ok(())
}

/// `write_all` bounded by `deadline` as a whole.
pub(crate) fn write_all_by(sock: &mut TcpStream, mut buf: &[u8], deadline: &Deadline) -> Result<(), TransportError> {
    while !buf.is_empty() {
        sock.set_write_timeout(Some(deadline.left()?)).map_err(io("setsockopt"))?;
        match sock.write(buf) {
            Ok(0) => return Err(TransportError::Disconnected),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(TIMED_OUT),
            Err(e) => return Err(io("handshake send")(e)),
        }
    }
    Ok(())
}

pub(crate) fn write_msg(sock: &mut TcpStream, m: &Message, deadline: &Deadline) -> Result<(), TransportError> {
    write_all_by(sock, &m.to_vec().map_err(TransportError::Encode)?, deadline)
}

/// Reads one control frame (handshake only; frames with a payload are refused).
pub(crate) fn read_msg(sock: &mut TcpStream, deadline: &Deadline) -> Result<Message, TransportError> {
    let mut hdr = [0u8; HEADER_LEN];
    read_exact_by(sock, &mut hdr, deadline)?;
    let h = wire::decode_header(&hdr).map_err(TransportError::Decode)?;
    let len = h.body_len as usize;
    if h.prefix_len() != len {
        return Err(TransportError::Handshake("data frame during the handshake"));
    }
    let mut body = [0u8; MAX_CONTROL_BODY];
    // A frame without payload is bounded by MAX_CONTROL_BODY (decode_header).
    let body = body.get_mut(..len).ok_or(TransportError::Handshake("oversized frame during the handshake"))?;
    read_exact_by(sock, body, deadline)?;
    wire::decode_body(&h, body).map_err(TransportError::Decode)
}

/// Best effort: tells the peer why before the socket is closed.
fn refuse(sock: &mut TcpStream, code: u32, text: &str, deadline: &Deadline) {
    let _ = write_msg(sock, &Message::Error(ErrorMsg { code, text: text.to_owned() }), deadline);
}

fn refused(e: ErrorMsg) -> TransportError {
    if e.code == ERR_AUTH {
        TransportError::AuthFailed("the acceptor rejected our proof of the cluster secret")
    } else {
        TransportError::Refused { code: e.code, text: e.text }
    }
}

/// Initiator side of the authenticated handshake on a fresh stream;
/// returns the acceptor's node id. Also used on the `rdma` transport's
/// out-of-band connection.
pub(crate) fn client_handshake(sock: &mut TcpStream, cfg: &Config, deadline: &Deadline) -> Result<u64, TransportError> {
    let client_nonce = auth::nonce().map_err(io("getrandom"))?;
    write_msg(
        sock,
        &Message::Hello(wire::Hello { cluster_id: cfg.cluster_id, node_id: cfg.node_id, nonce: client_nonce }),
        deadline,
    )?;
    let ch = match read_msg(sock, deadline)? {
        Message::Challenge(c) => c,
        Message::Error(e) => return Err(refused(e)),
        _ => return Err(TransportError::Handshake("expected CHALLENGE")),
    };
    let ctx = auth::Context {
        cluster_id: cfg.cluster_id,
        client_node: cfg.node_id,
        server_node: ch.node_id,
        client_nonce,
        server_nonce: ch.nonce,
    };
    if !auth::verify(&cfg.secret, Role::Server, &ctx, &ch.mac) {
        refuse(sock, ERR_AUTH, "acceptor proof invalid", deadline);
        return Err(TransportError::AuthFailed("the acceptor does not know the cluster secret"));
    }
    write_msg(sock, &Message::Auth(auth::tag(&cfg.secret, Role::Client, &ctx)), deadline)?;
    match read_msg(sock, deadline) {
        Ok(Message::Ready) => {}
        Ok(Message::Error(e)) => return Err(refused(e)),
        Ok(_) => return Err(TransportError::Handshake("expected READY")),
        // The acceptor closes right after refusing; losing the race to read
        // its ERROR still means we were refused.
        Err(TransportError::Io { source, .. })
            if source.kind() == ErrorKind::UnexpectedEof || source.kind() == ErrorKind::ConnectionReset =>
        {
            return Err(TransportError::AuthFailed("the acceptor closed the connection during authentication"))
        }
        Err(e) => return Err(e),
    }
    Ok(ch.node_id)
}

/// Acceptor side of the authenticated handshake; returns the initiator's node id.
pub(crate) fn server_handshake(sock: &mut TcpStream, cfg: &Config, deadline: &Deadline) -> Result<u64, TransportError> {
    let hello = match read_msg(sock, deadline) {
        Ok(Message::Hello(h)) => h,
        Ok(_) => {
            refuse(sock, ERR_PROTOCOL, "expected HELLO", deadline);
            return Err(TransportError::Handshake("expected HELLO"));
        }
        Err(TransportError::Decode(e)) => {
            let code =
                if matches!(e, wire::DecodeError::UnsupportedVersion { .. }) { ERR_VERSION } else { ERR_PROTOCOL };
            refuse(sock, code, &e.to_string(), deadline);
            return Err(TransportError::Decode(e));
        }
        Err(e) => return Err(e),
    };
    if hello.cluster_id != cfg.cluster_id {
        refuse(sock, ERR_CLUSTER, "wrong cluster", deadline);
        return Err(TransportError::Handshake("peer belongs to another cluster"));
    }
    let server_nonce = auth::nonce().map_err(io("getrandom"))?;
    let ctx = auth::Context {
        cluster_id: cfg.cluster_id,
        client_node: hello.node_id,
        server_node: cfg.node_id,
        client_nonce: hello.nonce,
        server_nonce,
    };
    let mac = auth::tag(&cfg.secret, Role::Server, &ctx);
    write_msg(sock, &Message::Challenge(wire::Challenge { node_id: cfg.node_id, nonce: server_nonce, mac }), deadline)?;
    match read_msg(sock, deadline)? {
        Message::Auth(mac) if auth::verify(&cfg.secret, Role::Client, &ctx, &mac) => {}
        Message::Auth(_) => {
            refuse(sock, ERR_AUTH, "authentication failed", deadline);
            return Err(TransportError::AuthFailed("initiator does not know the cluster secret"));
        }
        Message::Error(e) if e.code == ERR_AUTH => {
            return Err(TransportError::AuthFailed(
                "the initiator rejected our proof: it holds another cluster secret",
            ));
        }
        Message::Error(e) => return Err(refused(e)),
        _ => {
            refuse(sock, ERR_PROTOCOL, "expected AUTH", deadline);
            return Err(TransportError::Handshake("expected AUTH"));
        }
    }
    write_msg(sock, &Message::Ready, deadline)?;
    Ok(hello.node_id)
}
