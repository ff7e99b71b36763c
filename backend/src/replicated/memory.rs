//! Guest memory and the owner's copy buffers, registered with the transport once, and
//! per-request keys cut from them.
//!
//! A guest request's iovecs point into the frontend's memory table; each lies inside one of
//! its regions. Every region of the table is registered once (per table) in the volume's
//! [`Registry`]; a request to a peer grants exactly its byte ranges, one key per region they
//! lie in, revoked when the request retires. Regions a new table drops are deregistered once
//! no grant pins them any more.

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::wire::Segments;
use proto::{Access, Key, LocalSeg, RegionId, Registry, TransportError};
use replica::HugeBuffer;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::volume::GuestMem;

struct Registered {
    id: RegionId,
    len: usize,
}

pub(crate) struct Memory {
    registry: Arc<Registry>,
    /// Guest regions registered, by host start address.
    regions: BTreeMap<usize, Registered>,
    /// The table the regions belong to: keeps the mappings alive while they are registered.
    tables: Vec<Arc<GuestMem>>,
    /// Regions of older tables still pinned by grants.
    retiring: Vec<(RegionId, Arc<GuestMem>)>,
    /// The owner's copy buffers (resync, rebuild, reconcile), each `slot_bytes` long.
    slots: Vec<(HugeBuffer, RegionId)>,
}

// SAFETY: the raw region addresses are keys and bounds only; the memory behind them is kept
// mapped by the `GuestMem` Arcs held here and reached only through the registry's checked
// pieces or the iovecs of requests whose owners keep it valid.
unsafe impl Send for Memory {}

impl Memory {
    pub(crate) fn new(registry: Arc<Registry>, slots: u32, slot_bytes: usize) -> Result<Self, replica::Error> {
        let mut out =
            Self { registry, regions: BTreeMap::new(), tables: Vec::new(), retiring: Vec::new(), slots: Vec::new() };
        for _ in 0..slots {
            let buf = HugeBuffer::new(slot_bytes)?;
            // SAFETY: the buffer lives in `slots` as long as this registry's users: `Memory`
            // is dropped after the endpoints (see `Core`'s field order and drop).
            let id = unsafe { out.registry.register(buf.as_ptr(), buf.len()) }
                .map_err(|e| replica::Error::Io(std::io::Error::other(e)))?;
            out.slots.push((buf, id));
        }
        Ok(out)
    }

    /// A new memory table (`None`: the connection ended).
    pub(crate) fn set_table(&mut self, table: Option<&Arc<GuestMem>>) -> Result<(), TransportError> {
        let mut wanted: BTreeMap<usize, usize> = BTreeMap::new();
        if let Some(table) = table {
            for r in table.iter() {
                let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else { continue };
                wanted.insert(host as usize, r.len() as usize);
            }
        }
        // Drop what the new table no longer has (or has at another size).
        let stale: Vec<usize> =
            self.regions.iter().filter(|(a, r)| wanted.get(a) != Some(&r.len)).map(|(a, _)| *a).collect();
        let old_table = self.tables.last().cloned();
        for addr in stale {
            let r = self.regions.remove(&addr).expect("listed");
            if let Some(t) = &old_table {
                self.retiring.push((r.id, Arc::clone(t)));
            }
        }
        for (&addr, &len) in &wanted {
            if self.regions.contains_key(&addr) {
                continue;
            }
            // SAFETY: the region is mapped by `table`, which is kept in `tables` (below) for
            // as long as the registration lives; the peer reaches it only through grants.
            let id = unsafe { self.registry.register(addr as *mut u8, len) }?;
            self.regions.insert(addr, Registered { id, len });
        }
        if let Some(t) = table {
            self.tables = vec![Arc::clone(t)];
        } else {
            self.tables.clear();
        }
        self.retire();
        Ok(())
    }

    /// Deregisters old regions no grant pins any more.
    pub(crate) fn retire(&mut self) {
        let registry = &self.registry;
        self.retiring.retain(|(id, _)| matches!(registry.deregister(*id), Err(TransportError::Busy)));
    }

    fn locate(&self, addr: usize, len: usize) -> Option<(RegionId, u64)> {
        let (&start, r) = self.regions.range(..=addr).next_back()?;
        (addr + len <= start + r.len).then_some((r.id, (addr - start) as u64))
    }

    pub(crate) fn slot(&self, slot: u32) -> Option<(*mut u8, usize, RegionId)> {
        self.slots.get(slot as usize).map(|(b, id)| (b.as_ptr(), b.len(), *id))
    }

    /// The registered pieces `iov` lies in, for an inline send.
    pub(crate) fn local_segs(&self, iov: &[libc::iovec]) -> Option<Vec<LocalSeg>> {
        iov.iter()
            .map(|v| self.piece(v).map(|(region, offset)| LocalSeg { region, offset, len: v.iov_len as u32 }))
            .collect()
    }

    fn piece(&self, v: &libc::iovec) -> Option<(RegionId, u64)> {
        let addr = v.iov_base as usize;
        if let Some(found) = self.locate(addr, v.iov_len) {
            return Some(found);
        }
        self.slots.iter().find_map(|(b, id)| {
            let start = b.as_ptr() as usize;
            (addr >= start && addr + v.iov_len <= start + b.len()).then(|| (*id, (addr - start) as u64))
        })
    }

    /// Opens exactly `iov`'s bytes to the peer; returns the remote segments, in order, and
    /// the keys to revoke when the request retires.
    pub(crate) fn grant(&self, iov: &[libc::iovec], access: Access) -> Result<(Segments, Vec<Key>), TransportError> {
        let mut segments = Segments::new();
        let mut keys = Vec::new();
        let mut i = 0;
        while i < iov.len() {
            let (region, _) = self.piece(&iov[i]).ok_or(TransportError::OutOfRegion)?;
            // Consecutive iovecs in the same region share one key.
            let mut ranges = Vec::new();
            while i < iov.len() {
                let (r, offset) = self.piece(&iov[i]).ok_or(TransportError::OutOfRegion)?;
                if r != region || ranges.len() == proto::wire::MAX_SEGMENTS {
                    break;
                }
                ranges.push((offset, iov[i].iov_len as u32));
                i += 1;
            }
            let grant = match self.registry.grant(region, &ranges, access) {
                Ok(g) => g,
                Err(e) => {
                    for k in keys {
                        let _ = self.registry.revoke(k);
                    }
                    return Err(e);
                }
            };
            keys.push(grant.key);
            segments.extend(grant.segments.iter().copied());
        }
        Ok((segments, keys))
    }

    pub(crate) fn revoke(&self, keys: &[Key]) {
        for k in keys {
            let _ = self.registry.revoke(*k);
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        for (_, r) in std::mem::take(&mut self.regions) {
            let _ = self.registry.deregister(r.id);
        }
        for (id, _) in std::mem::take(&mut self.retiring) {
            let _ = self.registry.deregister(id);
        }
        for (_, id) in &self.slots {
            let _ = self.registry.deregister(*id);
        }
    }
}
