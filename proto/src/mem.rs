//! Registered memory and per-request access keys (leaf module: holds the
//! raw pointers into guest RAM / hugepage buffers and the copies between them).
//!
//! A region is raw host memory registered once (a guest memory region, a
//! hugepage buffer). A *grant* opens byte ranges of one region to the peer
//! under a fresh key; the peer addresses them by virtual address, as with
//! VA-based verbs memory regions. A key covers exactly the granted ranges
//! and stops working the moment it is revoked.
//!
//! We never form Rust references to registered memory: the guest may change
//! it at any time, so it is only touched through raw pointers by `copy`,
//! `readv` and `writev`.

use crate::wire::{Segment, MAX_SEGMENTS};
use crate::TransportError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A registered memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionId(pub u32);

/// An access key granted for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub u32);

/// What a peer may do with a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The peer may read (it pulls WRITE data).
    RemoteRead,
    /// The peer may write (it pushes READ data).
    RemoteWrite,
}

/// A byte range of a local registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSeg {
    pub region: RegionId,
    pub offset: u64,
    pub len: u32,
}

/// A key and the remote segments it opens, ready to put in a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub key: Key,
    pub segments: Vec<Segment>,
}

/// Bounds of a registry.
pub const MAX_REGIONS: usize = 1024;
/// Live grants per registry (one per in-flight request, plus long-lived windows).
pub const MAX_GRANTS: usize = 8192;

#[derive(Debug)]
pub(crate) struct Region {
    base: *mut u8,
    len: usize,
}

// SAFETY: `Region` is an address range; `Registry::register`'s contract makes
// the memory valid for reads and writes from any thread until deregistration,
// and it is only accessed through raw-pointer copies and vectored syscalls.
unsafe impl Send for Region {}
// SAFETY: as for `Send`; `Region` has no interior state of its own.
unsafe impl Sync for Region {}

/// A raw, validated piece of registered memory. Holding it keeps its region
/// registered (deregistration reports `Busy` while any `IoPtr` lives).
#[derive(Debug, Clone)]
pub(crate) struct IoPtr {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
    _region: Arc<Region>,
}

// SAFETY: points into a `Region`, which is Send/Sync (see above), and keeps it alive.
unsafe impl Send for IoPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for IoPtr {}

/// A local buffer made of registered pieces, with a byte cursor view.
#[derive(Debug, Clone, Default)]
pub(crate) struct LocalBuf {
    pub(crate) pieces: Vec<IoPtr>,
    pub(crate) total: usize,
}

impl LocalBuf {
    /// The pieces covering `[off, off + len)`, trimmed to that range.
    pub(crate) fn sub(&self, mut off: usize, mut len: usize) -> Vec<IoPtr> {
        let mut out = Vec::new();
        for p in &self.pieces {
            if len == 0 {
                break;
            }
            if off >= p.len {
                off -= p.len;
                continue;
            }
            let take = (p.len - off).min(len);
            // `off + take <= p.len`, so the result stays inside the piece.
            out.push(IoPtr {
                ptr: p.ptr.wrapping_add(off),
                len: take,
                _region: p._region.clone(),
            });
            len -= take;
            off = 0;
        }
        out
    }
}

#[derive(Debug)]
struct GrantEntry {
    access: Access,
    region: Arc<Region>,
    /// (address, length) ranges, each inside `region`.
    ranges: Vec<(u64, u32)>,
}

#[derive(Debug, Default)]
struct Inner {
    regions: HashMap<u32, Arc<Region>>,
    grants: HashMap<u32, GrantEntry>,
    next_region: u32,
    next_key: u32,
}

/// Why a peer's access was refused (reported as `Status::AccessDenied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    UnknownKey,
    WrongAccess,
    OutOfWindow,
}

/// Registered regions and live grants of one node; shared by its endpoints
/// so that registrations survive a reconnection.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let mut seed = [0u8; 4];
        // Unpredictable first key: a stale or guessed key from an earlier
        // process incarnation is unlikely to hit a live one. Falling back to a
        // fixed start only weakens that heuristic, never the checks.
        let _ = getrandom::getrandom(&mut seed);
        let inner = Inner {
            next_key: u32::from_le_bytes(seed) | 1,
            next_region: 1,
            ..Default::default()
        };
        Self {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps half-updated
        // (every mutation is a single insert/remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes, from any thread,
    /// until `deregister` of the returned id returns `Ok` or the registry is
    /// dropped (every endpoint using it is dropped). The peer may read and
    /// write granted ranges concurrently with the caller; no Rust reference
    /// to that memory may be held across a grant.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<RegionId, TransportError> {
        if ptr.is_null() || len == 0 || (ptr as usize).checked_add(len).is_none() {
            return Err(TransportError::BadRegion);
        }
        let mut g = self.lock();
        if g.regions.len() >= MAX_REGIONS {
            return Err(TransportError::Limit("regions"));
        }
        let id = g.next_region;
        g.next_region = g.next_region.wrapping_add(1).max(1);
        g.regions.insert(id, Arc::new(Region { base: ptr, len }));
        Ok(RegionId(id))
    }

    /// Forgets a region. `Busy` while a grant or an in-flight operation uses it.
    pub fn deregister(&self, id: RegionId) -> Result<(), TransportError> {
        let mut g = self.lock();
        let r = g
            .regions
            .get(&id.0)
            .ok_or(TransportError::UnknownRegion(id.0))?;
        if Arc::strong_count(r) > 1 {
            return Err(TransportError::Busy);
        }
        g.regions.remove(&id.0);
        Ok(())
    }

    /// Opens `ranges` (offset, length within `region`) to the peer under a new key.
    pub fn grant(
        &self,
        region: RegionId,
        ranges: &[(u64, u32)],
        access: Access,
    ) -> Result<Grant, TransportError> {
        if ranges.is_empty() || ranges.len() > MAX_SEGMENTS {
            return Err(TransportError::Limit("ranges per grant"));
        }
        let mut g = self.lock();
        if g.grants.len() >= MAX_GRANTS {
            return Err(TransportError::Limit("grants"));
        }
        let r = g
            .regions
            .get(&region.0)
            .ok_or(TransportError::UnknownRegion(region.0))?
            .clone();
        let mut abs = Vec::with_capacity(ranges.len());
        for &(off, len) in ranges {
            let end = off
                .checked_add(len.into())
                .ok_or(TransportError::OutOfRegion)?;
            if len == 0 || end > r.len as u64 {
                return Err(TransportError::OutOfRegion);
            }
            abs.push((r.base as u64 + off, len));
        }
        let mut key = g.next_key;
        while key == 0 || g.grants.contains_key(&key) {
            key = key.wrapping_add(1);
        }
        g.next_key = key.wrapping_add(1);
        let segments = abs
            .iter()
            .map(|&(addr, len)| Segment { addr, key, len })
            .collect();
        g.grants.insert(
            key,
            GrantEntry {
                access,
                region: r,
                ranges: abs,
            },
        );
        Ok(Grant {
            key: Key(key),
            segments,
        })
    }

    /// Revokes a key; later accesses with it are refused.
    pub fn revoke(&self, key: Key) -> Result<(), TransportError> {
        self.lock()
            .grants
            .remove(&key.0)
            .map(|_| ())
            .ok_or(TransportError::UnknownKey(key.0))
    }

    /// Checks a peer's access and returns the memory it addresses.
    pub(crate) fn check_remote(
        &self,
        key: u32,
        addr: u64,
        len: u32,
        want: Access,
    ) -> Result<IoPtr, Denied> {
        let g = self.lock();
        let e = g.grants.get(&key).ok_or(Denied::UnknownKey)?;
        if e.access != want {
            return Err(Denied::WrongAccess);
        }
        let end = addr.checked_add(len.into()).ok_or(Denied::OutOfWindow)?;
        let inside = e
            .ranges
            .iter()
            .any(|&(a, l)| addr >= a && end <= a + u64::from(l));
        if !inside || len == 0 {
            return Err(Denied::OutOfWindow);
        }
        let off = (addr - e.region.base as u64) as usize;
        // `off + len` lies inside the region: the range was checked against it at grant time.
        Ok(IoPtr {
            ptr: e.region.base.wrapping_add(off),
            len: len as usize,
            _region: e.region.clone(),
        })
    }

    /// Resolves local segments to registered memory.
    pub(crate) fn local(&self, segs: &[LocalSeg]) -> Result<LocalBuf, TransportError> {
        let g = self.lock();
        let mut buf = LocalBuf {
            pieces: Vec::with_capacity(segs.len()),
            total: 0,
        };
        for s in segs {
            let r = g
                .regions
                .get(&s.region.0)
                .ok_or(TransportError::UnknownRegion(s.region.0))?;
            let end = s
                .offset
                .checked_add(s.len.into())
                .ok_or(TransportError::OutOfRegion)?;
            if s.len == 0 || end > r.len as u64 {
                return Err(TransportError::OutOfRegion);
            }
            buf.pieces.push(IoPtr {
                ptr: r.base.wrapping_add(s.offset as usize),
                len: s.len as usize,
                _region: r.clone(),
            });
            buf.total += s.len as usize;
        }
        Ok(buf)
    }

    #[cfg(test)]
    pub(crate) fn live_grants(&self) -> usize {
        self.lock().grants.len()
    }
}

/// Copies `dst.len()`-summed bytes from `src` pieces into `dst` pieces.
pub(crate) fn copy(src: &[IoPtr], dst: &[IoPtr]) {
    let (mut si, mut so, mut di, mut d_off) = (0usize, 0usize, 0usize, 0usize);
    while si < src.len() && di < dst.len() {
        let n = (src[si].len - so).min(dst[di].len - d_off);
        // SAFETY: both pieces were validated against registered regions
        // (`check_remote`/`local`), `so + n <= src.len` and `d_off + n <= dst.len`,
        // and each `IoPtr` keeps its region registered, so both ranges are valid
        // memory per `Registry::register`'s contract. `ptr::copy` tolerates overlap.
        unsafe { std::ptr::copy(src[si].ptr.add(so), dst[di].ptr.add(d_off), n) };
        so += n;
        d_off += n;
        if so == src[si].len {
            si += 1;
            so = 0;
        }
        if d_off == dst[di].len {
            di += 1;
            d_off = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_exactly_their_ranges() {
        let mut mem = vec![0u8; 8192];
        let reg = Registry::new();
        // SAFETY: `mem` outlives `reg` (declared before it) and is not borrowed while registered.
        let r = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        let g1 = reg
            .grant(r, &[(0, 512), (4096, 1024)], Access::RemoteRead)
            .unwrap();
        let g2 = reg.grant(r, &[(1024, 512)], Access::RemoteRead).unwrap();
        let s = g1.segments[1];
        assert!(reg
            .check_remote(g1.key.0, s.addr, s.len, Access::RemoteRead)
            .is_ok());
        assert!(reg
            .check_remote(g1.key.0, s.addr + 512, 512, Access::RemoteRead)
            .is_ok());
        assert_eq!(
            reg.check_remote(g1.key.0, s.addr + 512, 513, Access::RemoteRead)
                .unwrap_err(),
            Denied::OutOfWindow
        );
        assert_eq!(
            reg.check_remote(g1.key.0, s.addr, s.len, Access::RemoteWrite)
                .unwrap_err(),
            Denied::WrongAccess
        );
        // Another request's key does not open this request's bytes.
        assert_eq!(
            reg.check_remote(g2.key.0, s.addr, 512, Access::RemoteRead)
                .unwrap_err(),
            Denied::OutOfWindow
        );
        assert!(matches!(reg.deregister(r), Err(TransportError::Busy)));
        reg.revoke(g1.key).unwrap();
        assert_eq!(
            reg.check_remote(g1.key.0, s.addr, s.len, Access::RemoteRead)
                .unwrap_err(),
            Denied::UnknownKey
        );
        reg.revoke(g2.key).unwrap();
        assert_eq!(reg.live_grants(), 0);
        reg.deregister(r).unwrap();
        assert!(reg.grant(r, &[(0, 1)], Access::RemoteRead).is_err());
        drop(mem);
    }

    #[test]
    fn grants_outside_the_region_are_refused() {
        let mut mem = vec![0u8; 4096];
        let reg = Registry::new();
        // SAFETY: `mem` outlives `reg`.
        let r = unsafe { reg.register(mem.as_mut_ptr(), mem.len()) }.unwrap();
        assert!(reg.grant(r, &[(4000, 97)], Access::RemoteRead).is_err());
        assert!(reg.grant(r, &[(u64::MAX, 2)], Access::RemoteRead).is_err());
        assert!(reg
            .local(&[LocalSeg {
                region: r,
                offset: 4095,
                len: 2
            }])
            .is_err());
        let b = reg
            .local(&[
                LocalSeg {
                    region: r,
                    offset: 0,
                    len: 100,
                },
                LocalSeg {
                    region: r,
                    offset: 200,
                    len: 100,
                },
            ])
            .unwrap();
        let sub = b.sub(50, 100);
        assert_eq!(sub.iter().map(|p| p.len).collect::<Vec<_>>(), vec![50, 50]);
        drop(b);
        drop(sub);
        reg.deregister(r).unwrap();
        drop(mem);
    }
}
