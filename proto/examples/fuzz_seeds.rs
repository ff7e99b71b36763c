//! Writes the fuzzer's seed corpus: one valid frame of each type (payload
//! included) plus a stream of several, from the codec itself, so the seeds
//! follow the layout. `wire`'s test `fuzz_seeds_are_valid_frames` checks
//! the committed seeds still decode.
//!
//! ```sh
//! cargo run -p hcblk-proto --example fuzz_seeds -- proto/fuzz/seeds
//! ```

use proto::wire::*;
use proto::{InlineData, Segment, Segments, Status};

fn frame(m: &Message, payload: &[u8]) -> Vec<u8> {
    assert_eq!(m.payload_len(), payload.len(), "{m:?}");
    let mut b = m.to_vec().expect("a valid seed");
    b.extend_from_slice(payload);
    b
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "proto/fuzz/seeds".into());
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    let seg = |addr, len| Segment { addr, key: 7, len };
    let desc = Descriptor {
        request_id: 9,
        volume: 1,
        generation: 3,
        offset: 4096,
        length: 4608,
        flags: FLAG_FUA,
        epoch: 2,
        incarnation: 5,
        floor: 8,
        segments: Segments::from_slice(&[seg(0x1000, 4096), seg(0x9000, 512)]),
        inline: None,
    };
    let read1 =
        Descriptor { length: 512, flags: 0, segments: Segments::from_slice(&[seg(0x2000, 512)]), ..desc.clone() };
    let inline = Descriptor { length: 11, flags: FLAG_INLINE, segments: Segments::new(), ..desc.clone() };
    let range = RangeOp {
        request_id: 10,
        volume: 1,
        generation: 3,
        offset: 1 << 20,
        length: 65536,
        flags: 0,
        epoch: 2,
        incarnation: 5,
        floor: 8,
    };
    let data = DataReq { op_id: 0x100_0000_0100, addr: 0x1000, key: 7, len: 8 };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("hello", frame(&Message::Hello(Hello { cluster_id: 1, node_id: 2, nonce: [3; 32] }), &[])),
        ("challenge", frame(&Message::Challenge(Challenge { node_id: 1, nonce: [4; 32], mac: [5; 32] }), &[])),
        ("auth", frame(&Message::Auth([6; 32]), &[])),
        ("ready", frame(&Message::Ready, &[])),
        ("write2", frame(&Message::Write(desc.clone()), &[])),
        ("write_inline", frame(&Message::Write(inline.clone()), b"inline data")),
        ("read1", frame(&Message::Read(read1), &[])),
        (
            "flush",
            frame(
                &Message::Flush(Flush { request_id: 11, volume: 1, generation: 3, epoch: 2, incarnation: 5, floor: 8 }),
                &[],
            ),
        ),
        ("discard", frame(&Message::Discard(range), &[])),
        ("wzeroes", frame(&Message::WriteZeroes(range), &[])),
        (
            "promise",
            frame(&Message::Promise(Promise { request_id: 12, volume: 1, generation: 3, epoch: 2, extent: 40 }), &[]),
        ),
        (
            "clear_dirty",
            frame(
                &Message::ClearDirty(ClearDirty {
                    request_id: 13,
                    volume: 1,
                    generation: 3,
                    epoch: 2,
                    extent: 40,
                    incarnation: 5,
                    first_region: 16,
                    region_count: 4,
                    upto: 12,
                }),
                &[],
            ),
        ),
        ("completion", frame(&Message::Completion(Completion { request_id: 9, status: Status::Ok, bytes: 4608 }), &[])),
        ("heartbeat", frame(&Message::Heartbeat(Heartbeat { sequence: 1, time_us: 2 }), &[])),
        ("error", frame(&Message::Error(ErrorMsg { code: 4, text: "bad".into() }), &[])),
        (
            "promise_ack",
            frame(
                &Message::PromiseAck(PromiseAck {
                    request_id: 12,
                    status: Status::Ok,
                    epoch: 2,
                    incarnation: 5,
                    promised: 40,
                    bitmap: vec![0xf0, 0x0f, 0x01],
                }),
                &[],
            ),
        ),
        ("dataread", frame(&Message::DataRead(data), &[])),
        ("datawrite", frame(&Message::DataWrite(data), b"payload!")),
        (
            "dataresp",
            frame(&Message::DataReadResp(DataResp { op_id: data.op_id, status: Status::Ok, len: 4 }), b"abcd"),
        ),
        (
            "dataack",
            frame(&Message::DataWriteAck(DataResp { op_id: data.op_id, status: Status::AccessDenied, len: 0 }), &[]),
        ),
    ];
    let mut stream = Vec::new();
    for (name, bytes) in &seeds {
        if matches!(*name, "write2" | "completion" | "datawrite" | "write_inline" | "heartbeat") {
            stream.extend_from_slice(bytes);
        }
        std::fs::write(dir.join(name), bytes)?;
    }
    std::fs::write(dir.join("stream"), stream)?;
    // An attached payload encodes like a received one.
    let mut with = inline;
    with.inline = Some(InlineData::copy_from(b"inline data"));
    assert_eq!(frame(&Message::Write(with), b"inline data"), seeds[5].1, "inline seed");
    println!("{} seeds written to {}", seeds.len() + 1, dir.display());
    Ok(())
}
