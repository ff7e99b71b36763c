//! The backend driven by an independent vhost-user frontend (libblkio), in one process.

mod common;

use std::time::Duration;

use backend::PollMode;
use blkio::{Blkio, ReqFlags};
use common::{pattern, Client, Volume};
use replica::BackingKind;

const MIB: u64 = 1 << 20;

#[test]
fn every_request_type_on_a_file_volume() {
    common::init_logs();
    common::require_hugepages();
    let vol = Volume::new();
    let export = vol.export(vol.backing(BackingKind::File, 64 * MIB, 512, false), 1, PollMode::Adaptive);
    let mut client = Client::connect(&vol.socket, 1, 1 << 20);
    assert_eq!(client.capacity(), 64 * MIB);

    let data = pattern(1, 256 << 10);
    client.buf()[..data.len()].copy_from_slice(&data);
    assert_eq!(client.write(0, 8 * MIB, 0, data.len()), 0);
    client.buf()[..data.len()].fill(0);
    assert_eq!(client.read(0, 8 * MIB, 0, data.len()), 0);
    assert_eq!(&client.buf()[..data.len()], &data[..]);

    // Unaligned guest buffer (bounce path in the shard), 512-byte granular offset.
    let odd = pattern(2, 4096 + 512);
    client.buf()[300..300 + odd.len()].copy_from_slice(&odd);
    assert_eq!(client.write(0, 3 * MIB + 512, 300, odd.len()), 0);
    client.buf()[..8192].fill(0);
    assert_eq!(client.read(0, 3 * MIB + 512, 0, odd.len()), 0);
    assert_eq!(&client.buf()[..odd.len()], &odd[..]);

    client.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(client.wait(0), 0);

    client.queues[0].write_zeroes(8 * MIB, 64 << 10, 0, ReqFlags::empty());
    assert_eq!(client.wait(0), 0);
    client.queues[0].discard(8 * MIB + (128 << 10), 64 << 10, 0, ReqFlags::empty());
    assert_eq!(client.wait(0), 0);
    assert_eq!(client.read(0, 8 * MIB, 0, 256 << 10), 0);
    let back = client.buf()[..256 << 10].to_vec();
    assert!(back[..64 << 10].iter().all(|b| *b == 0), "write-zeroes range must read zero");
    assert_eq!(&back[64 << 10..128 << 10], &data[64 << 10..128 << 10]);
    assert_eq!(&back[192 << 10..], &data[192 << 10..]);

    // Past the end: the guest gets an error, nothing else happens.
    assert_ne!(client.read(0, 64 * MIB - 4096, 0, 8192), 0);
    assert!(export.completed_requests() >= 9);

    // The data is really in the backing file.
    drop(client);
    export.stop();
    let file = std::fs::read(&vol.image).unwrap();
    assert_eq!(&file[(8 * MIB) as usize + (64 << 10)..(8 * MIB) as usize + (128 << 10)], &data[64 << 10..128 << 10]);
}

#[test]
fn all_queues_concurrently_keep_data_intact() {
    common::init_logs();
    common::require_hugepages();
    let vol = Volume::new();
    let queues = 4;
    let export = vol.export(vol.backing(BackingKind::File, 64 * MIB, 4096, false), queues as u16, PollMode::Adaptive);
    let mut client = Client::connect(&vol.socket, queues, 8 << 20);
    assert_eq!(client.queues.len(), queues);
    // Each queue owns a 2 MiB area of the buffer and of the disk; 16 writes of 128 KiB in
    // flight per queue at once.
    let chunk = 128usize << 10;
    for q in 0..queues {
        let data = pattern(10 + q as u64, 2 << 20);
        client.buf()[q * (2 << 20)..(q + 1) * (2 << 20)].copy_from_slice(&data);
    }
    for q in 0..queues {
        for i in 0..16 {
            let buf = client.ptr(q * (2 << 20) + i * chunk);
            client.queues[q].write((q as u64) * 4 * MIB + (i * chunk) as u64, buf, chunk, i, ReqFlags::empty());
        }
    }
    for q in 0..queues {
        for _ in 0..16 {
            assert_eq!(client.wait(q), 0);
        }
    }
    client.buf().fill(0);
    for q in 0..queues {
        for i in 0..16 {
            let buf = client.ptr(q * (2 << 20) + i * chunk);
            client.queues[q].read((q as u64) * 4 * MIB + (i * chunk) as u64, buf, chunk, i, ReqFlags::empty());
        }
    }
    for q in 0..queues {
        for _ in 0..16 {
            assert_eq!(client.wait(q), 0);
        }
    }
    for q in 0..queues {
        let data = pattern(10 + q as u64, 2 << 20);
        assert!(client.buf()[q * (2 << 20)..(q + 1) * (2 << 20)] == data[..], "queue {q} data corrupted");
    }
    drop(client);
    export.stop();
}

#[test]
fn read_only_volume_refuses_writes() {
    common::init_logs();
    common::require_hugepages();
    let vol = Volume::new();
    drop(vol.backing(BackingKind::File, 16 * MIB, 512, false));
    let export = vol.export(vol.backing(BackingKind::File, 16 * MIB, 512, true), 1, PollMode::Never);
    // A frontend that wants write access is refused at start: the device offers VIRTIO_BLK_F_RO.
    let mut writer = Blkio::new("virtio-blk-vhost-user").unwrap();
    writer.set_str("path", vol.socket.to_str().unwrap()).unwrap();
    writer.connect().unwrap();
    assert!(writer.start().is_err(), "read-write start of a read-only device must fail");
    drop(writer);
    std::thread::sleep(Duration::from_millis(100));
    let mut client = Client::connect_with(&vol.socket, 1, 1 << 20, true);
    assert!(client.blkio.get_bool("read-only").unwrap());
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    // (Writes that reach the device anyway are refused by the parser: see bad_input.rs.)
    drop(client);
    export.stop();
}

#[test]
fn resize_is_seen_through_get_config() {
    common::init_logs();
    common::require_hugepages();
    let vol = Volume::new();
    let export = vol.export(vol.backing(BackingKind::File, 16 * MIB, 512, false), 1, PollMode::Adaptive);
    let mut client = Client::connect(&vol.socket, 1, 1 << 20);
    assert_eq!(client.capacity(), 16 * MIB);
    assert_ne!(client.read(0, 20 * MIB, 0, 4096), 0);
    export.resize(32 * MIB).expect("grow");
    assert_eq!(client.capacity(), 32 * MIB);
    assert_eq!(client.read(0, 20 * MIB, 0, 4096), 0);
    assert!(export.resize(8 * MIB).is_err(), "shrinking must be refused");
    assert_eq!(std::fs::metadata(&vol.image).unwrap().len(), 32 * MIB);
    drop(client);
    export.stop();
}

#[test]
fn frontend_can_reconnect_after_disconnecting() {
    common::init_logs();
    common::require_hugepages();
    let vol = Volume::new();
    let export = vol.export(vol.backing(BackingKind::File, 16 * MIB, 512, false), 2, PollMode::Always);
    for round in 0..3u64 {
        let mut client = Client::connect(&vol.socket, 2, 1 << 20);
        let data = pattern(100 + round, 64 << 10);
        client.buf()[..data.len()].copy_from_slice(&data);
        assert_eq!(client.write(1, round * MIB, 0, data.len()), 0);
        client.buf().fill(0);
        assert_eq!(client.read(0, round * MIB, 0, data.len()), 0);
        assert_eq!(&client.buf()[..data.len()], &data[..]);
        drop(client);
        // Wait for the backend to notice the disconnect before reconnecting.
        for _ in 0..200 {
            if !export.is_connected() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    export.stop();
}

#[test]
fn data_survives_an_export_restart() {
    common::init_logs();
    common::require_hugepages();
    let vol = Volume::new();
    let data = pattern(7, 1 << 20);
    {
        let export = vol.export(vol.backing(BackingKind::File, 16 * MIB, 512, false), 1, PollMode::Adaptive);
        let mut client = Client::connect(&vol.socket, 1, 1 << 20);
        client.buf().copy_from_slice(&data);
        assert_eq!(client.write(0, 5 * MIB, 0, data.len()), 0);
        client.queues[0].flush(0, ReqFlags::empty());
        assert_eq!(client.wait(0), 0);
        drop(client);
        export.stop();
    }
    let export = vol.export(vol.backing(BackingKind::File, 16 * MIB, 512, false), 1, PollMode::Adaptive);
    let mut client = Client::connect(&vol.socket, 1, 1 << 20);
    assert_eq!(client.read(0, 5 * MIB, 0, data.len()), 0);
    assert!(client.buf() == &data[..]);
    drop(client);
    export.stop();
}

#[test]
fn ram_and_null_backings_serve_requests() {
    common::init_logs();
    common::require_hugepages();
    let vol = Volume::new();
    let export = vol.export(vol.backing(BackingKind::Ram, 8 * MIB, 4096, false), 1, PollMode::Always);
    let mut client = Client::connect(&vol.socket, 1, 1 << 20);
    let data = pattern(3, 64 << 10);
    client.buf()[..data.len()].copy_from_slice(&data);
    assert_eq!(client.write(0, MIB, 0, data.len()), 0);
    client.buf().fill(0);
    assert_eq!(client.read(0, MIB, 0, data.len()), 0);
    assert_eq!(&client.buf()[..data.len()], &data[..]);
    drop(client);
    export.stop();

    let vol = Volume::new();
    let export = vol.export(vol.backing(BackingKind::Null, 8 * MIB, 512, false), 1, PollMode::Never);
    let mut client = Client::connect(&vol.socket, 1, 1 << 20);
    assert_eq!(client.write(0, 0, 0, 4096), 0);
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    drop(client);
    export.stop();
}

/// A volume has one frontend at a time. A second one (the volume attached to another VM by
/// mistake) is closed at once, so that its connect fails in a moment instead of hanging in the
/// listen backlog (QEMU would wait there with its main loop blocked); the first frontend keeps
/// working, and once it leaves the next one connects.
#[test]
fn a_second_frontend_is_turned_away_while_the_first_keeps_working() {
    common::with_watchdog(Duration::from_secs(120), || {
        let vol = Volume::new();
        let export = vol.export(vol.backing(BackingKind::File, 16 * MIB, 512, false), 1, PollMode::Adaptive);
        let mut first = Client::connect(&vol.socket, 1, 1 << 20);
        let data = pattern(7, 64 << 10);
        first.buf()[..data.len()].copy_from_slice(&data);
        assert_eq!(first.write(0, MIB, 0, data.len()), 0);

        for attempt in 0..3 {
            let started = std::time::Instant::now();
            let mut second = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
            second.set_str("path", vol.socket.to_str().unwrap()).unwrap();
            let refused = second.connect().is_err() || second.start().is_err();
            assert!(refused, "attempt {attempt}: a second frontend was served while the first is connected");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "attempt {attempt}: the second frontend waited {:?} to be refused",
                started.elapsed()
            );
        }

        // The first frontend did not notice.
        first.buf()[..data.len()].fill(0);
        assert_eq!(first.read(0, MIB, 0, data.len()), 0);
        assert_eq!(&first.buf()[..data.len()], &data[..]);
        drop(first);

        // Once it has gone (the export notices the disconnect), the next frontend is served.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while export.is_connected() {
            assert!(std::time::Instant::now() < deadline, "the export still has the first frontend 10 s after it left");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut next = Client::connect(&vol.socket, 1, 1 << 20);
        assert_eq!(next.read(0, MIB, 0, data.len()), 0);
        assert_eq!(&next.buf()[..data.len()], &data[..]);
        drop(next);
        drop(export);
    });
}
