use super::*;
use crate::auth::Secret;
use crate::wire::{Completion, Descriptor};
use std::time::Duration;

fn cfg(node: u64) -> Config {
    let mut c = Config::new(42, node, Secret::new(*b"tcp-test-secret-0123").unwrap());
    c.handshake_timeout = Duration::from_secs(3);
    c
}

fn pair_with(
    server_cfg: Config,
    client_cfg: Config,
) -> (TcpEndpoint, Result<TcpEndpoint, TransportError>) {
    let acc = TcpAcceptor::bind("127.0.0.1:0", server_cfg, Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    let t = std::thread::spawn(move || acc.accept());
    let client = TcpEndpoint::connect(addr, &client_cfg, Arc::new(Registry::new()));
    let server = t.join().unwrap();
    match server {
        Ok(s) => (s, client),
        Err(e) => panic!("accept failed: {e}; client: {client:?}"),
    }
}

fn wait_completions(ep: &mut dyn Endpoint, n: usize) -> Vec<OpCompletion> {
    let mut got = Vec::new();
    let mut buf = [OpCompletion::EMPTY; 64];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        let k = ep.poll_completions(&mut buf);
        got.extend_from_slice(&buf[..k]);
        assert!(
            Instant::now() < deadline,
            "timed out with {} of {n} completions",
            got.len()
        );
        if k == 0 {
            std::thread::yield_now();
        }
    }
    got
}

fn wait_msg(ep: &mut dyn Endpoint) -> Message {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(m) = ep.poll_recv().unwrap() {
            return m;
        }
        assert!(Instant::now() < deadline, "timed out waiting for a message");
        std::thread::yield_now();
    }
}

#[test]
fn multi_segment_one_sided_read_and_write() {
    let (mut server, client) = pair_with(cfg(1), cfg(2));
    let mut client = client.unwrap();
    assert_eq!(server.peer_node_id(), 2);
    assert_eq!(client.peer_node_id(), 1);
    let mut guest: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut disk = vec![0u8; 65536];
    // SAFETY: the buffers are dropped after the endpoints (explicit drops below).
    let g = unsafe { client.register_region(guest.as_mut_ptr(), guest.len()) }.unwrap();
    // SAFETY: as above.
    let d = unsafe { server.register_region(disk.as_mut_ptr(), disk.len()) }.unwrap();
    // WRITE: the server pulls three guest segments into its disk buffer.
    let grant = client
        .grant(
            g,
            &[(0, 4096), (10000, 100), (30000, 20000)],
            Access::RemoteRead,
        )
        .unwrap();
    let desc = Descriptor {
        request_id: 1,
        volume: 1,
        epoch: 1,
        offset: 512,
        length: 24196,
        flags: 0,
        segments: grant.segments.clone(),
    };
    client.send(&Message::Write(desc)).unwrap();
    let Message::Write(w) = wait_msg(&mut server) else {
        panic!("expected WRITE")
    };
    server
        .post_read(
            &w.segments,
            &[LocalSeg {
                region: d,
                offset: 512,
                len: w.length,
            }],
            77,
        )
        .unwrap();
    let c = wait_completions(&mut server, 1);
    assert_eq!(
        c[0],
        OpCompletion {
            user_data: 77,
            status: Status::Ok,
            bytes: 24196
        }
    );
    server
        .send(&Message::Completion(Completion {
            request_id: 1,
            status: Status::Ok,
            bytes: 24196,
        }))
        .unwrap();
    assert!(matches!(
        wait_msg(&mut client),
        Message::Completion(Completion {
            request_id: 1,
            status: Status::Ok,
            ..
        })
    ));
    client.revoke(grant.key).unwrap();
    // READ: the server pushes its disk bytes into two other guest ranges.
    let rgrant = client
        .grant(g, &[(50000, 4000), (60000, 5000)], Access::RemoteWrite)
        .unwrap();
    server
        .post_write(
            &rgrant.segments,
            &[LocalSeg {
                region: d,
                offset: 512,
                len: 9000,
            }],
            78,
        )
        .unwrap();
    let c = wait_completions(&mut server, 1);
    assert_eq!(
        c[0],
        OpCompletion {
            user_data: 78,
            status: Status::Ok,
            bytes: 9000
        }
    );
    // The revoked WRITE key is refused and the connection carries on.
    server
        .post_read(
            &w.segments,
            &[LocalSeg {
                region: d,
                offset: 0,
                len: w.length,
            }],
            79,
        )
        .unwrap();
    assert_eq!(
        wait_completions(&mut server, 1)[0].status,
        Status::AccessDenied
    );
    // A foreign key: the READ key does not open the WRITE ranges (and is write-only anyway).
    let forged = [Segment {
        addr: grant.segments[0].addr,
        key: rgrant.key.0,
        len: 4096,
    }];
    server
        .post_write(
            &forged,
            &[LocalSeg {
                region: d,
                offset: 0,
                len: 4096,
            }],
            80,
        )
        .unwrap();
    assert_eq!(
        wait_completions(&mut server, 1)[0].status,
        Status::AccessDenied
    );
    assert!(server.is_connected() && client.is_connected());
    client.revoke(rgrant.key).unwrap();
    drop(server);
    drop(client);
    let expect: Vec<u8> = [&guest[0..4096], &guest[10000..10100], &guest[30000..50000]].concat();
    assert_eq!(&disk[512..512 + 24196], &expect[..]);
    assert_eq!(&guest[50000..54000], &disk[512..4512]);
    assert_eq!(&guest[60000..65000], &disk[4512..9512]);
}

#[test]
fn many_operations_in_flight_and_the_limit() {
    let mut sc = cfg(1);
    sc.max_inflight = 32;
    let mut cc = cfg(2);
    cc.max_inflight = 32;
    let (mut server, client) = pair_with(sc, cc);
    let mut client = client.unwrap();
    let mut src: Vec<u8> = (0..32 * 8192u32).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; 32 * 8192];
    // SAFETY: buffers outlive the endpoints.
    let s = unsafe { server.register_region(src.as_mut_ptr(), src.len()) }.unwrap();
    // SAFETY: as above.
    let l = unsafe { client.register_region(dst.as_mut_ptr(), dst.len()) }.unwrap();
    let window = server
        .grant(s, &[(0, 32 * 8192)], Access::RemoteRead)
        .unwrap();
    let base = window.segments[0].addr;
    for i in 0..32u64 {
        let remote = [
            Segment {
                addr: base + i * 8192,
                key: window.key.0,
                len: 4096,
            },
            Segment {
                addr: base + i * 8192 + 4096,
                key: window.key.0,
                len: 4096,
            },
        ];
        client
            .post_read(
                &remote,
                &[LocalSeg {
                    region: l,
                    offset: i * 8192,
                    len: 8192,
                }],
                i,
            )
            .unwrap();
    }
    let remote = [Segment {
        addr: base,
        key: window.key.0,
        len: 1,
    }];
    assert!(matches!(
        client.post_read(
            &remote,
            &[LocalSeg {
                region: l,
                offset: 0,
                len: 1
            }],
            99
        ),
        Err(TransportError::TooManyInFlight(32))
    ));
    let mut c = wait_completions(&mut client, 32);
    c.sort_by_key(|c| c.user_data);
    assert!(c
        .iter()
        .enumerate()
        .all(|(i, c)| c.user_data == i as u64 && c.status == Status::Ok && c.bytes == 8192));
    drop(client);
    drop(server);
    assert_eq!(src, dst);
}

#[test]
fn wrong_secret_is_refused() {
    let mut bad = cfg(2);
    bad.secret = Secret::new(*b"not-the-cluster-secret").unwrap();
    let acc = TcpAcceptor::bind("127.0.0.1:0", cfg(1), Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    let t = std::thread::spawn(move || acc.accept().map(|_| ()));
    let e = TcpEndpoint::connect(addr, &bad, Arc::new(Registry::new())).unwrap_err();
    assert!(matches!(e, TransportError::AuthFailed(_)), "{e}");
    // The initiator notices the forged acceptor proof first and aborts; the
    // acceptor sees an error too.
    assert!(t.join().unwrap().is_err());
}

#[test]
fn unknown_major_version_is_refused_with_a_clear_error() {
    let acc = TcpAcceptor::bind("127.0.0.1:0", cfg(1), Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    let t = std::thread::spawn(move || acc.accept().map(|_| ()));
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = Message::Hello(wire::Hello {
        cluster_id: 42,
        node_id: 2,
        nonce: [0; 32],
    })
    .to_vec()
    .unwrap();
    hello[2] = wire::VERSION_MAJOR + 1;
    s.write_all(&hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let Message::Error(e) = read_msg(&mut s).unwrap() else {
        panic!("expected ERROR")
    };
    assert_eq!(e.code, ERR_VERSION);
    assert!(e.text.contains("major versions differ"), "{}", e.text);
    let err = t.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Decode(wire::DecodeError::UnsupportedVersion { .. })
        ),
        "{err}"
    );
}

#[test]
fn garbage_after_handshake_closes_only_that_connection() {
    let (mut server, client) = pair_with(cfg(1), cfg(2));
    let client = client.unwrap();
    // Write garbage straight onto the client's socket.
    (&client.conn.sock).write_all(&[0xde; 64]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.is_connected() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        server.poll_recv(),
        Err(TransportError::Disconnected)
    ));
}

#[test]
fn peer_gone_mid_transfer_fails_in_flight_operations() {
    let mut sc = cfg(1);
    sc.dead_after = Duration::from_millis(600);
    sc.heartbeat = Duration::from_millis(100);
    let (mut server, client) = pair_with(sc, cfg(2));
    let mut client = client.unwrap();
    let mut big = vec![1u8; 4 << 20];
    let mut local = vec![0u8; 4 << 20];
    // SAFETY: buffers outlive the endpoints.
    let r = unsafe { client.register_region(big.as_mut_ptr(), big.len()) }.unwrap();
    // SAFETY: as above.
    let l = unsafe { server.register_region(local.as_mut_ptr(), local.len()) }.unwrap();
    let g = client
        .grant(r, &[(0, 4 << 20)], Access::RemoteRead)
        .unwrap();
    for i in 0..8 {
        server
            .post_read(
                &g.segments,
                &[LocalSeg {
                    region: l,
                    offset: 0,
                    len: 4 << 20,
                }],
                i,
            )
            .unwrap();
    }
    drop(client);
    let c = wait_completions(&mut server, 8);
    assert!(
        c.iter().any(|c| c.status == Status::ConnectionLost),
        "{c:?}"
    );
    assert!(!server.is_connected());
    assert!(server
        .post_read(
            &g.segments,
            &[LocalSeg {
                region: l,
                offset: 0,
                len: 16
            }],
            9
        )
        .is_err());
    drop(server);
    drop(big);
    drop(local);
}

#[test]
fn silent_peer_is_declared_dead_and_heartbeats_keep_idle_links_up() {
    let mut sc = cfg(1);
    sc.dead_after = Duration::from_millis(500);
    sc.heartbeat = Duration::from_millis(100);
    let mut cc = cfg(2);
    cc.heartbeat = Duration::from_millis(100);
    let (server, client) = pair_with(sc.clone(), cc);
    let client = client.unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        server.is_connected() && client.is_connected(),
        "heartbeats must keep an idle connection alive"
    );
    drop((server, client));

    // A peer that authenticates and then never sends another byte.
    let acc = TcpAcceptor::bind("127.0.0.1:0", sc, Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    let t = std::thread::spawn(move || acc.accept());
    let c = cfg(2);
    let mut raw = TcpStream::connect(addr).unwrap();
    let cn = [5u8; 32];
    write_msg(
        &mut raw,
        &Message::Hello(wire::Hello {
            cluster_id: c.cluster_id,
            node_id: 2,
            nonce: cn,
        }),
    )
    .unwrap();
    let Message::Challenge(ch) = read_msg(&mut raw).unwrap() else {
        panic!("expected CHALLENGE")
    };
    let ctx = auth::Context {
        cluster_id: c.cluster_id,
        client_node: 2,
        server_node: ch.node_id,
        client_nonce: cn,
        server_nonce: ch.nonce,
    };
    write_msg(
        &mut raw,
        &Message::Auth(auth::tag(&c.secret, Role::Client, &ctx)),
    )
    .unwrap();
    assert_eq!(read_msg(&mut raw).unwrap(), Message::Ready);
    let server = t.join().unwrap().unwrap();
    let start = Instant::now();
    while server.is_connected() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "silent peer never declared dead"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "declared dead too early"
    );
    drop(raw);
}

#[test]
fn a_peer_that_stops_reading_pushes_back_and_memory_stays_bounded() {
    let mut sc = cfg(1);
    sc.recv_queue = 4;
    let mut cc = cfg(2);
    cc.send_queue = 8;
    let (mut server, client) = pair_with(sc, cc);
    let mut client = client.unwrap();
    // The server's application does not poll: its receive queue fills, the
    // transport stops reading, the socket buffers fill, and the client's
    // bounded send queue reports QueueFull instead of growing.
    let mut sent = 0u64;
    let full = loop {
        let m = Message::Completion(Completion {
            request_id: sent,
            status: Status::Ok,
            bytes: 0,
        });
        match client.send(&m) {
            Ok(()) => sent += 1,
            Err(TransportError::QueueFull) => break true,
            Err(e) => panic!("{e}"),
        }
        if sent > 5_000_000 {
            break false;
        }
    };
    assert!(full, "send queue never filled after {sent} messages");
    assert!(client.is_connected() && server.is_connected());
    // Once the server polls again, everything sent arrives, in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 0u64;
    while next < sent {
        match server.poll_recv().unwrap() {
            Some(Message::Completion(c)) => {
                assert_eq!(c.request_id, next);
                next += 1;
            }
            Some(m) => panic!("unexpected {m:?}"),
            None => {
                assert!(Instant::now() < deadline, "received {next} of {sent}");
                std::thread::yield_now();
            }
        }
    }
    client
        .send(&Message::Completion(Completion {
            request_id: sent,
            status: Status::Ok,
            bytes: 0,
        }))
        .unwrap();
}
