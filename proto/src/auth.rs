//! Mutual challenge-response authentication over a shared cluster secret.
//!
//! ```text
//! initiator                                   acceptor
//!   HELLO {cluster, node_c, nonce_c}  ───────▶  cluster must match
//!            ◀───────  CHALLENGE {node_s, nonce_s, mac_s = H("hcblk-srv" ‖ ctx)}
//!   verify mac_s (acceptor knows the secret)
//!   AUTH {mac_c = H("hcblk-cli" ‖ ctx)}  ─────▶  verify mac_c
//!            ◀───────  READY (or ERROR, then close)
//! ctx = cluster ‖ node_c ‖ node_s ‖ nonce_c ‖ nonce_s,  H = HMAC-SHA256(secret, ·)
//! ```
//! The secret never crosses the wire; both nonces are fresh per connection, so
//! a recorded exchange cannot be replayed, and the two labels keep one side's
//! MAC from being reflected back as the other's. Tags are compared in
//! constant time (`Mac::verify_slice`).

use crate::wire::{MAC_LEN, NONCE_LEN};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use thiserror::Error;

/// Shortest secret accepted: 128 bits.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SecretError {
    #[error("cannot read cluster secret {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster secret is {0} bytes, at least {MIN_SECRET_LEN} required")]
    TooShort(usize),
}

/// The cluster's shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let b = bytes.into();
        if b.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(b.len()));
        }
        Ok(Self(b))
    }

    /// Reads a secret file; surrounding whitespace (a trailing newline) is not part of it.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let raw =
            std::fs::read(path).map_err(|source| SecretError::Read { path: path.display().to_string(), source })?;
        let start = raw.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(raw.len());
        let end = raw.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
        Self::new(raw[start..end].to_vec())
    }
}

/// The values both sides bind into their MACs.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub cluster_id: u64,
    pub client_node: u64,
    pub server_node: u64,
    pub client_nonce: [u8; NONCE_LEN],
    pub server_nonce: [u8; NONCE_LEN],
}

/// Which side computes the tag.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Client,
    Server,
}

fn hmac(secret: &Secret, role: Role, ctx: &Context) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(&secret.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(match role {
        Role::Client => b"hcblk-cli",
        Role::Server => b"hcblk-srv",
    });
    m.update(&ctx.cluster_id.to_le_bytes());
    m.update(&ctx.client_node.to_le_bytes());
    m.update(&ctx.server_node.to_le_bytes());
    m.update(&ctx.client_nonce);
    m.update(&ctx.server_nonce);
    m
}

pub fn tag(secret: &Secret, role: Role, ctx: &Context) -> [u8; MAC_LEN] {
    hmac(secret, role, ctx).finalize().into_bytes().into()
}

/// Constant-time check of a peer's tag.
pub fn verify(secret: &Secret, role: Role, ctx: &Context, mac: &[u8; MAC_LEN]) -> bool {
    hmac(secret, role, ctx).verify_slice(mac).is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_bind_role_secret_and_context() {
        let s = Secret::new(*b"0123456789abcdef").unwrap();
        let other = Secret::new(*b"0123456789abcdeX").unwrap();
        let ctx =
            Context { cluster_id: 1, client_node: 2, server_node: 3, client_nonce: [1; 32], server_nonce: [2; 32] };
        let t = tag(&s, Role::Client, &ctx);
        assert!(verify(&s, Role::Client, &ctx, &t));
        assert!(!verify(&s, Role::Server, &ctx, &t), "a client tag must not pass as a server tag");
        assert!(!verify(&other, Role::Client, &ctx, &t));
        let mut ctx2 = ctx;
        ctx2.server_nonce[0] ^= 1;
        assert!(!verify(&s, Role::Client, &ctx2, &t));
        assert!(Secret::new(*b"short").is_err());
    }
}
