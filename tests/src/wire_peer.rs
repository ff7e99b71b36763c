//! `hcblk-wire-peer`: a test replica for the wire protocol (v2). It holds an
//! in-memory "disk" and serves READ/WRITE descriptors by one-sided
//! operations on the initiator's granted buffers, as a real replica does:
//! WRITE → one-sided READ of the guest segments into the disk, READ →
//! one-sided WRITE of disk bytes into the guest segments, then COMPLETION.
//! An inline WRITE's payload arrives with its descriptor and is copied into
//! the disk at once. FLUSH completes at once (memory is the medium);
//! DISCARD/WRITE_ZEROES/PROMISE/CLEAR_DIRTY answer `Unsupported`. Generation,
//! epoch, incarnation and floor are not checked: this peer exists to
//! exercise the transport.

use anyhow::{Context, Result};
use proto::tcp::{TcpAcceptor, TcpEndpoint};
use proto::wire::{Completion, Descriptor};
use proto::{Config, Endpoint, LocalSeg, Message, OpCompletion, Registry, Status};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// Validated peer configuration.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub listen: String,
    pub transport: Config,
    /// Size of the in-memory disk; default 64 MiB.
    pub disk_bytes: usize,
    /// Byte at every disk offset `o` initially: `pattern(o)`.
    pub seed: u8,
}

/// Initial disk contents, so reads before any write are checkable.
pub fn pattern(seed: u8, offset: u64) -> u8 {
    (offset.wrapping_mul(31).wrapping_add(offset >> 9) as u8) ^ seed
}

/// Serves connections one after another until killed.
pub fn run(cfg: PeerConfig) -> Result<()> {
    let registry = Arc::new(Registry::new());
    let mut disk: Vec<u8> = (0..cfg.disk_bytes as u64).map(|o| pattern(cfg.seed, o)).collect();
    // SAFETY: `disk` is never touched through Rust references after this
    // point and lives until the process exits (this function never returns Ok).
    let region = unsafe { registry.register(disk.as_mut_ptr(), disk.len()) }.context("register disk")?;
    let acceptor = TcpAcceptor::bind(&cfg.listen, cfg.transport.clone(), registry)
        .with_context(|| format!("listen on {}", cfg.listen))?;
    println!("READY {}", acceptor.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let ep = match acceptor.accept() {
            Ok(ep) => ep,
            // Refused peers are logged by the acceptor; wait for the next.
            Err(_) => continue,
        };
        serve(ep, region, cfg.disk_bytes as u64);
    }
}

fn complete(ep: &mut TcpEndpoint, request_id: u64, status: Status, bytes: u32) -> bool {
    let m = Message::Completion(Completion { request_id, status, bytes });
    loop {
        match ep.send(&m) {
            Ok(()) => return true,
            Err(proto::TransportError::QueueFull) => std::thread::sleep(Duration::from_micros(50)),
            Err(_) => return false,
        }
    }
}

fn start(ep: &mut TcpEndpoint, d: &Descriptor, write: bool, region: proto::RegionId, disk_bytes: u64) -> bool {
    let in_bounds = d.offset.checked_add(d.length.into()).is_some_and(|e| e <= disk_bytes);
    if !in_bounds {
        return complete(ep, d.request_id, Status::BadRequest, 0);
    }
    let local = [LocalSeg { region, offset: d.offset, len: d.length }];
    if let Some(data) = &d.inline {
        // The data came with the descriptor: no one-sided READ.
        let status = match ep.registry().copy_to_local(&local, data) {
            Ok(()) => Status::Ok,
            Err(_) => Status::IoError,
        };
        let bytes = if status == Status::Ok { d.length } else { 0 };
        return complete(ep, d.request_id, status, bytes);
    }
    let posted = if write {
        ep.post_read(&d.segments, &local, d.request_id)
    } else {
        ep.post_write(&d.segments, &local, d.request_id)
    };
    match posted {
        Ok(()) => true,
        Err(proto::TransportError::TooManyInFlight(_)) => complete(ep, d.request_id, Status::Busy, 0),
        Err(_) => false,
    }
}

fn serve(mut ep: TcpEndpoint, region: proto::RegionId, disk_bytes: u64) {
    let mut comps = [OpCompletion::EMPTY; 64];
    let mut idle = 0u32;
    loop {
        let mut busy = false;
        loop {
            match ep.poll_recv() {
                Ok(Some(m)) => {
                    busy = true;
                    let ok = match m {
                        Message::Write(d) => start(&mut ep, &d, true, region, disk_bytes),
                        Message::Read(d) => start(&mut ep, &d, false, region, disk_bytes),
                        Message::Flush(f) => complete(&mut ep, f.request_id, Status::Ok, 0),
                        Message::Discard(r) | Message::WriteZeroes(r) => {
                            complete(&mut ep, r.request_id, Status::Unsupported, 0)
                        }
                        Message::Promise(p) => complete(&mut ep, p.request_id, Status::Unsupported, 0),
                        Message::ClearDirty(c) => complete(&mut ep, c.request_id, Status::Unsupported, 0),
                        _ => true,
                    };
                    if !ok {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        let n = ep.poll_completions(&mut comps);
        for c in &comps[..n] {
            busy = true;
            if !complete(&mut ep, c.user_data, c.status, c.bytes) {
                return;
            }
        }
        if busy {
            idle = 0;
        } else {
            idle += 1;
            if idle > 2000 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                std::thread::yield_now();
            }
        }
    }
}
