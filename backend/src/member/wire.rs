//! The replication state machines' messages as `proto` frames, and back.
//!
//! One to one: WRITE/READ/FLUSH/DISCARD/WRITE_ZEROES/PROMISE/CLEAR_DIRTY carry a
//! [`Request`], COMPLETION and PROMISE_ACK a [`Reply`]. The wire's `epoch` is the owner's
//! session epoch for the addressed replica ([`Stamp::epoch`]). Descriptors do not name the
//! extent: it is the offset's, by the volume's extent size.

use proto::wire::{
    self, ClearDirty, Completion, Descriptor, Flush, Message, Promise, PromiseAck, RangeOp, FLAG_FUA, FLAG_INLINE,
};
use replication::{Bitmap, Reply, Request, Stamp, Status};

pub fn status_to_wire(s: Status) -> wire::Status {
    match s {
        Status::Ok => wire::Status::Ok,
        Status::IoError => wire::Status::IoError,
        Status::NoSpace => wire::Status::NoSpace,
        Status::AccessDenied => wire::Status::AccessDenied,
        Status::BadRequest => wire::Status::BadRequest,
        Status::StaleEpoch => wire::Status::StaleEpoch,
        Status::StaleGeneration => wire::Status::StaleGeneration,
        Status::StaleIncarnation => wire::Status::StaleIncarnation,
        Status::NotMember => wire::Status::NotMember,
        Status::Duplicate => wire::Status::Duplicate,
        Status::NotOwner => wire::Status::NotOwner,
        Status::NotPromised => wire::Status::NotPromised,
        Status::ConnectionLost => wire::Status::ConnectionLost,
    }
}

pub fn status_from_wire(s: wire::Status) -> Status {
    match s {
        wire::Status::Ok => Status::Ok,
        wire::Status::IoError => Status::IoError,
        wire::Status::NoSpace => Status::NoSpace,
        wire::Status::AccessDenied => Status::AccessDenied,
        wire::Status::StaleEpoch => Status::StaleEpoch,
        wire::Status::StaleGeneration => Status::StaleGeneration,
        wire::Status::StaleIncarnation => Status::StaleIncarnation,
        wire::Status::NotMember => Status::NotMember,
        wire::Status::Duplicate => Status::Duplicate,
        wire::Status::NotOwner => Status::NotOwner,
        wire::Status::NotPromised => Status::NotPromised,
        wire::Status::ConnectionLost => Status::ConnectionLost,
        // A peer that cannot do what was asked, or is over its bound: its replica failed.
        wire::Status::BadRequest | wire::Status::Unsupported | wire::Status::Busy => Status::BadRequest,
        _ => Status::BadRequest,
    }
}

fn stamp(volume: u64, generation: u64, epoch: u32, incarnation: u64, floor: u64) -> Stamp {
    Stamp { volume, generation, epoch, incarnation, floor }
}

/// A request from the wire; `extent_bytes` is the volume's extent size as this replica knows
/// it (any value if it does not: the replica then refuses the request anyway).
pub fn request_from_wire(m: &Message, extent_bytes: u64) -> Option<Request> {
    let extent = |offset: u64| (offset / extent_bytes.max(1)).min(u64::from(u32::MAX)) as u32;
    Some(match m {
        Message::Write(d) => Request::Write {
            seq: d.request_id,
            stamp: stamp(d.volume, d.generation, d.epoch, d.incarnation, d.floor),
            extent: extent(d.offset),
            offset: d.offset,
            len: d.length,
            fua: d.flags & FLAG_FUA != 0,
            inline: d.is_inline(),
        },
        Message::Read(d) => Request::Read {
            seq: d.request_id,
            stamp: stamp(d.volume, d.generation, d.epoch, d.incarnation, d.floor),
            extent: extent(d.offset),
            offset: d.offset,
            len: d.length,
        },
        Message::Flush(f) => {
            Request::Flush { seq: f.request_id, stamp: stamp(f.volume, f.generation, f.epoch, f.incarnation, f.floor) }
        }
        Message::Discard(r) => Request::Discard {
            seq: r.request_id,
            stamp: stamp(r.volume, r.generation, r.epoch, r.incarnation, r.floor),
            extent: extent(r.offset),
            offset: r.offset,
            len: r.length,
        },
        Message::WriteZeroes(r) => Request::WriteZeroes {
            seq: r.request_id,
            stamp: stamp(r.volume, r.generation, r.epoch, r.incarnation, r.floor),
            extent: extent(r.offset),
            offset: r.offset,
            len: r.length,
        },
        Message::Promise(p) => Request::Promise {
            seq: p.request_id,
            volume: p.volume,
            generation: p.generation,
            epoch: p.epoch,
            extent: p.extent,
        },
        Message::ClearDirty(c) => Request::ClearDirty {
            seq: c.request_id,
            stamp: stamp(c.volume, c.generation, c.epoch, c.incarnation, 0),
            extent: c.extent,
            first: c.first_region,
            count: c.region_count,
            upto: c.upto,
        },
        _ => return None,
    })
}

/// The frame for a request; a WRITE or READ gets `segments` (remote windows onto the owner's
/// memory), an inline WRITE none (its payload is sent with it).
pub fn request_to_wire(r: &Request, segments: wire::Segments) -> Message {
    let desc = |seq, stamp: &Stamp, offset, length, flags| Descriptor {
        request_id: seq,
        volume: stamp.volume,
        generation: stamp.generation,
        offset,
        length,
        flags,
        epoch: stamp.epoch,
        incarnation: stamp.incarnation,
        floor: stamp.floor,
        segments: segments.clone(),
        inline: None,
    };
    let range = |seq, stamp: &Stamp, offset, length| RangeOp {
        request_id: seq,
        volume: stamp.volume,
        generation: stamp.generation,
        offset,
        length,
        flags: 0,
        epoch: stamp.epoch,
        incarnation: stamp.incarnation,
        floor: stamp.floor,
    };
    match r {
        Request::Write { seq, stamp, offset, len, fua, inline, .. } => {
            let mut flags = if *fua { FLAG_FUA } else { 0 };
            if *inline {
                flags |= FLAG_INLINE;
            }
            let mut d = desc(*seq, stamp, *offset, *len, flags);
            if *inline {
                d.segments.clear();
            }
            Message::Write(d)
        }
        Request::Read { seq, stamp, offset, len, .. } => Message::Read(desc(*seq, stamp, *offset, *len, 0)),
        Request::Flush { seq, stamp } => Message::Flush(Flush {
            request_id: *seq,
            volume: stamp.volume,
            generation: stamp.generation,
            epoch: stamp.epoch,
            incarnation: stamp.incarnation,
            floor: stamp.floor,
        }),
        Request::Discard { seq, stamp, offset, len, .. } => Message::Discard(range(*seq, stamp, *offset, *len)),
        Request::WriteZeroes { seq, stamp, offset, len, .. } => Message::WriteZeroes(range(*seq, stamp, *offset, *len)),
        Request::Promise { seq, volume, generation, epoch, extent } => Message::Promise(Promise {
            request_id: *seq,
            volume: *volume,
            generation: *generation,
            epoch: *epoch,
            extent: *extent,
        }),
        Request::ClearDirty { seq, stamp, extent, first, count, upto } => Message::ClearDirty(ClearDirty {
            request_id: *seq,
            volume: stamp.volume,
            generation: stamp.generation,
            epoch: stamp.epoch,
            extent: *extent,
            incarnation: stamp.incarnation,
            first_region: *first,
            region_count: *count,
            upto: *upto,
        }),
    }
}

pub fn reply_to_wire(r: &Reply, bytes: u32) -> Message {
    match r {
        Reply::Done { seq, status } => {
            Message::Completion(Completion { request_id: *seq, status: status_to_wire(*status), bytes })
        }
        Reply::Promised { seq, status, epoch, incarnation, promised, bitmap } => Message::PromiseAck(PromiseAck {
            request_id: *seq,
            status: status_to_wire(*status),
            epoch: *epoch,
            incarnation: *incarnation,
            promised: *promised,
            bitmap: bitmap.to_bytes(),
        }),
    }
}

/// A reply from the wire; `regions` is the bitmap length the owner expects for the extent the
/// promise asked about (a bitmap of another length is refused as malformed).
pub fn reply_from_wire(m: &Message, regions: impl Fn(u64) -> Option<u32>) -> Option<Reply> {
    match m {
        Message::Completion(c) => Some(Reply::Done { seq: c.request_id, status: status_from_wire(c.status) }),
        Message::PromiseAck(p) => {
            let bitmap = if p.status == wire::Status::Ok {
                let bits = regions(p.request_id)?;
                Bitmap::from_bytes(bits, &p.bitmap)?
            } else {
                Bitmap::default()
            };
            Some(Reply::Promised {
                seq: p.request_id,
                status: status_from_wire(p.status),
                epoch: p.epoch,
                incarnation: p.incarnation,
                promised: p.promised,
                bitmap,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let stamp = Stamp { volume: 7, generation: 3, epoch: 2, incarnation: 99, floor: 10 };
        let seg = proto::Segment { addr: 4096, key: 5, len: 8192 };
        let requests = [
            Request::Write { seq: 11, stamp, extent: 2, offset: 2 << 20, len: 8192, fua: true, inline: false },
            Request::Write { seq: 12, stamp, extent: 2, offset: 2 << 20, len: 4096, fua: false, inline: true },
            Request::Read { seq: 13, stamp, extent: 2, offset: (2 << 20) + 512, len: 8192 },
            Request::Flush { seq: 14, stamp },
            Request::Discard { seq: 15, stamp, extent: 2, offset: 2 << 20, len: 1 << 20 },
            Request::WriteZeroes { seq: 16, stamp, extent: 2, offset: 2 << 20, len: 1 << 20 },
            Request::Promise { seq: 17, volume: 7, generation: 3, epoch: 2, extent: 2 },
            Request::ClearDirty {
                seq: 18,
                stamp: Stamp { floor: 0, ..stamp },
                extent: 2,
                first: 1,
                count: 3,
                upto: 10,
            },
        ];
        for r in requests {
            let mut segs = wire::Segments::new();
            segs.push(seg);
            if let Request::Write { len, .. } | Request::Read { len, .. } = &r {
                segs[0].len = *len;
            }
            let m = request_to_wire(&r, segs);
            m.validate().unwrap();
            assert_eq!(request_from_wire(&m, 1 << 20), Some(r));
        }
        let mut bits = Bitmap::new(10);
        bits.set(9);
        let replies = [
            Reply::Done { seq: 1, status: Status::StaleGeneration },
            Reply::Promised { seq: 2, status: Status::Ok, epoch: 3, incarnation: 4, promised: 5, bitmap: bits },
            Reply::Promised {
                seq: 3,
                status: Status::NotMember,
                epoch: 0,
                incarnation: 4,
                promised: 0,
                bitmap: Bitmap::default(),
            },
        ];
        for r in replies {
            let m = reply_to_wire(&r, 0);
            assert_eq!(reply_from_wire(&m, |_| Some(10)), Some(r));
        }
        // A bitmap of the wrong length is refused.
        let m = reply_to_wire(
            &Reply::Promised {
                seq: 2,
                status: Status::Ok,
                epoch: 3,
                incarnation: 4,
                promised: 5,
                bitmap: Bitmap::new(10),
            },
            0,
        );
        assert_eq!(reply_from_wire(&m, |_| Some(64)), None);
    }
}
