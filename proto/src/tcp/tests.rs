use super::handshake::{read_msg, write_msg};
use super::*;
use crate::auth::{self, Role, Secret};
use crate::wire::{Completion, Descriptor};
use std::io::{Read, Write};
use std::time::Duration;

fn cfg(node: u64) -> Config {
    let mut c = Config::new(42, node, Secret::new(*b"tcp-test-secret-0123").unwrap());
    c.handshake_timeout = Duration::from_secs(3);
    c
}

fn pair_with(server_cfg: Config, client_cfg: Config) -> (TcpEndpoint, Result<TcpEndpoint, TransportError>) {
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

/// A deadline for a test's raw handshake steps.
fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

/// A hand-driven peer: completes the authenticated handshake with the
/// cluster secret (the `auth` module directly), then the test writes
/// whatever frames it likes on the returned stream. Returns the acceptor's
/// endpoint for it too.
fn raw_peer(server_cfg: Config) -> (TcpEndpoint, TcpStream) {
    let acc = TcpAcceptor::bind("127.0.0.1:0", server_cfg, Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    let c = cfg(2);
    let mut raw = TcpStream::connect(addr).unwrap();
    let cn = [5u8; 32];
    let hello = Message::Hello(wire::Hello { cluster_id: c.cluster_id, node_id: 2, nonce: cn });
    write_msg(&mut raw, &hello, &soon()).unwrap();
    let Message::Challenge(ch) = read_msg(&mut raw, &soon()).unwrap() else { panic!("expected CHALLENGE") };
    let ctx = auth::Context {
        cluster_id: c.cluster_id,
        client_node: 2,
        server_node: ch.node_id,
        client_nonce: cn,
        server_nonce: ch.nonce,
    };
    assert!(auth::verify(&c.secret, Role::Server, &ctx, &ch.mac));
    let mac = auth::tag(&c.secret, Role::Client, &ctx);
    write_msg(&mut raw, &Message::Auth(mac), &soon()).unwrap();
    assert_eq!(read_msg(&mut raw, &soon()).unwrap(), Message::Ready);
    let server = acc.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (server, raw)
}

/// Writes one crafted frame (and its payload) on a raw stream.
fn send_raw(raw: &mut TcpStream, m: &Message, payload: &[u8]) {
    let mut b = m.to_vec().unwrap();
    b.extend_from_slice(payload);
    raw.write_all(&b).unwrap();
}

/// Reads one frame and its payload from a raw stream.
fn read_raw(raw: &mut TcpStream) -> (Message, Vec<u8>) {
    let mut frame = vec![0u8; HEADER_LEN];
    raw.read_exact(&mut frame).unwrap();
    let h = wire::decode_header(&frame).unwrap();
    frame.resize(HEADER_LEN + h.body_len as usize, 0);
    raw.read_exact(&mut frame[HEADER_LEN..]).unwrap();
    let (m, used) = wire::decode(&frame).unwrap();
    let payload = frame[used - m.payload_len()..used].to_vec();
    (m, payload)
}

fn wait_completions(ep: &mut dyn Endpoint, n: usize) -> Vec<OpCompletion> {
    let mut got = Vec::new();
    let mut buf = [OpCompletion::EMPTY; 64];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        let k = ep.poll_completions(&mut buf);
        got.extend_from_slice(&buf[..k]);
        assert!(Instant::now() < deadline, "timed out with {} of {n} completions", got.len());
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
    let grant = client.grant(g, &[(0, 4096), (10000, 100), (30000, 20000)], Access::RemoteRead).unwrap();
    let desc = Descriptor {
        request_id: 1,
        volume: 1,
        epoch: 1,
        offset: 512,
        length: 24196,
        flags: 0,
        segments: grant.segments.clone(),
        ..Descriptor::default()
    };
    client.send(&Message::Write(desc)).unwrap();
    let Message::Write(w) = wait_msg(&mut server) else { panic!("expected WRITE") };
    server.post_read(&w.segments, &[LocalSeg { region: d, offset: 512, len: w.length }], 77).unwrap();
    let c = wait_completions(&mut server, 1);
    assert_eq!(c[0], OpCompletion { user_data: 77, status: Status::Ok, bytes: 24196 });
    server.send(&Message::Completion(Completion { request_id: 1, status: Status::Ok, bytes: 24196 })).unwrap();
    assert!(matches!(wait_msg(&mut client), Message::Completion(Completion { request_id: 1, status: Status::Ok, .. })));
    client.revoke(grant.key).unwrap();
    // READ: the server pushes its disk bytes into two other guest ranges.
    let rgrant = client.grant(g, &[(50000, 4000), (60000, 5000)], Access::RemoteWrite).unwrap();
    server.post_write(&rgrant.segments, &[LocalSeg { region: d, offset: 512, len: 9000 }], 78).unwrap();
    let c = wait_completions(&mut server, 1);
    assert_eq!(c[0], OpCompletion { user_data: 78, status: Status::Ok, bytes: 9000 });
    // The revoked WRITE key is refused and the connection carries on.
    server.post_read(&w.segments, &[LocalSeg { region: d, offset: 0, len: w.length }], 79).unwrap();
    assert_eq!(wait_completions(&mut server, 1)[0].status, Status::AccessDenied);
    // A foreign key: the READ key does not open the WRITE ranges (and is write-only anyway).
    let forged = [Segment { addr: grant.segments[0].addr, key: rgrant.key.0, len: 4096 }];
    server.post_write(&forged, &[LocalSeg { region: d, offset: 0, len: 4096 }], 80).unwrap();
    assert_eq!(wait_completions(&mut server, 1)[0].status, Status::AccessDenied);
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
    let window = server.grant(s, &[(0, 32 * 8192)], Access::RemoteRead).unwrap();
    let base = window.segments[0].addr;
    for i in 0..32u64 {
        let remote = [
            Segment { addr: base + i * 8192, key: window.key.0, len: 4096 },
            Segment { addr: base + i * 8192 + 4096, key: window.key.0, len: 4096 },
        ];
        client.post_read(&remote, &[LocalSeg { region: l, offset: i * 8192, len: 8192 }], i).unwrap();
    }
    let remote = [Segment { addr: base, key: window.key.0, len: 1 }];
    assert!(matches!(
        client.post_read(&remote, &[LocalSeg { region: l, offset: 0, len: 1 }], 99),
        Err(TransportError::TooManyInFlight(32))
    ));
    let mut c = wait_completions(&mut client, 32);
    c.sort_by_key(|c| c.user_data);
    assert!(c.iter().enumerate().all(|(i, c)| c.user_data == i as u64 && c.status == Status::Ok && c.bytes == 8192));
    drop(client);
    drop(server);
    assert_eq!(src, dst);
}

/// Waits until the acceptor has counted `n` refused handshakes.
fn wait_refused(acc: &TcpAcceptor, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while acc.stats().refused < n {
        assert!(Instant::now() < deadline, "{:?}", acc.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn wrong_secret_is_refused() {
    let mut bad = cfg(2);
    bad.secret = Secret::new(*b"not-the-cluster-secret").unwrap();
    let acc = TcpAcceptor::bind("127.0.0.1:0", cfg(1), Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    let e = TcpEndpoint::connect(addr, &bad, Arc::new(Registry::new())).unwrap_err();
    assert!(matches!(e, TransportError::AuthFailed(_)), "{e}");
    // The initiator notices the forged acceptor proof first and aborts; the
    // acceptor counts a refusal and hands nothing to `accept`.
    wait_refused(&acc, 1);
    assert!(acc.accept_timeout(Duration::from_millis(100)).unwrap().is_none());
    assert_eq!(acc.stats().authenticated, 0);
}

#[test]
fn unknown_major_version_is_refused_with_a_clear_error() {
    let acc = TcpAcceptor::bind("127.0.0.1:0", cfg(1), Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = Message::Hello(wire::Hello { cluster_id: 42, node_id: 2, nonce: [0; 32] }).to_vec().unwrap();
    hello[2] = wire::VERSION_MAJOR + 1;
    s.write_all(&hello).unwrap();
    let Message::Error(e) = read_msg(&mut s, &soon()).unwrap() else { panic!("expected ERROR") };
    assert_eq!(e.code, ERR_VERSION);
    assert!(e.text.contains("major versions differ"), "{}", e.text);
    wait_refused(&acc, 1);
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
    assert!(matches!(server.poll_recv(), Err(TransportError::Disconnected)));
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
    let g = client.grant(r, &[(0, 4 << 20)], Access::RemoteRead).unwrap();
    for i in 0..8 {
        server.post_read(&g.segments, &[LocalSeg { region: l, offset: 0, len: 4 << 20 }], i).unwrap();
    }
    drop(client);
    let c = wait_completions(&mut server, 8);
    assert!(c.iter().any(|c| c.status == Status::ConnectionLost), "{c:?}");
    assert!(!server.is_connected());
    assert!(server.post_read(&g.segments, &[LocalSeg { region: l, offset: 0, len: 16 }], 9).is_err());
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
    assert!(server.is_connected() && client.is_connected(), "heartbeats must keep an idle connection alive");
    drop((server, client));

    // A peer that authenticates and then never sends another byte.
    let (server, raw) = raw_peer(sc);
    let start = Instant::now();
    while server.is_connected() {
        assert!(start.elapsed() < Duration::from_secs(5), "silent peer never declared dead");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(start.elapsed() >= Duration::from_millis(300), "declared dead too early");
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
        let m = Message::Completion(Completion { request_id: sent, status: Status::Ok, bytes: 0 });
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
    client.send(&Message::Completion(Completion { request_id: sent, status: Status::Ok, bytes: 0 })).unwrap();
}

#[test]
fn the_handshake_deadline_covers_the_whole_handshake() {
    // A peer trickling its HELLO one byte per 100 ms: each read would see a
    // byte well within a per-read timeout, but the handshake as a whole
    // must end at `handshake_timeout`.
    let mut sc = cfg(1);
    sc.handshake_timeout = Duration::from_millis(600);
    let acc = TcpAcceptor::bind("127.0.0.1:0", sc, Arc::new(Registry::new())).unwrap();
    let mut s = TcpStream::connect(acc.local_addr().unwrap()).unwrap();
    s.set_nonblocking(true).unwrap();
    let hello = Message::Hello(wire::Hello { cluster_id: 42, node_id: 2, nonce: [1; 32] }).to_vec().unwrap();
    let t0 = Instant::now();
    let mut closed_after = None;
    for b in &hello {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            closed_after = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        match s.read(&mut [0u8; 64]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => {
                closed_after = Some(t0.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("the trickling peer was never closed");
    assert!(closed_after < Duration::from_millis(1500), "closed after {closed_after:?}");
    wait_refused(&acc, 1);
}

#[test]
fn idle_and_trickling_sockets_do_not_keep_a_member_out() {
    let sc = cfg(1);
    let acc = TcpAcceptor::bind("127.0.0.1:0", sc, Arc::new(Registry::new())).unwrap();
    let addr = acc.local_addr().unwrap();
    // 200 sockets that never send a byte...
    let idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // ...and 8 that trickle a HELLO, one byte per 200 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let loris = std::thread::spawn(move || {
        let hello = Message::Hello(wire::Hello { cluster_id: 42, node_id: 3, nonce: [2; 32] }).to_vec().unwrap();
        let mut socks: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for b in &hello {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            for s in &mut socks {
                let _ = s.write_all(std::slice::from_ref(b));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    // A member now connects and must be in within about a second.
    let t0 = Instant::now();
    let client = TcpEndpoint::connect(addr, &cfg(2), Arc::new(Registry::new())).unwrap();
    let server = acc.accept_timeout(Duration::from_secs(2)).unwrap().unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "member authenticated after {took:?}");
    assert_eq!(server.peer_node_id(), 2);
    assert!(client.is_connected() && server.is_connected());
    let st = acc.stats();
    assert_eq!(st.authenticated, 1, "{st:?}");
    // Every socket beyond the bound was evicted (or, on a slow machine,
    // timed out first).
    assert!(st.evicted + st.refused >= 200 + 8 + 1 - MAX_PENDING_HANDSHAKES as u64, "{st:?}");
    stop.store(true, Ordering::Relaxed);
    loris.join().unwrap();
    drop(idle);
}

#[test]
fn a_response_in_the_wrong_direction_is_a_protocol_error() {
    // One-sided WRITE answered with a DATA_READ_RESP carrying bytes: they
    // must not land in our source buffer, and the WRITE must not complete Ok.
    let (mut server, mut raw) = raw_peer(cfg(1));
    let mut src = vec![0x11u8; 4096];
    // SAFETY: `src` outlives `server` (dropped below before `src` is read).
    let r = unsafe { server.register_region(src.as_mut_ptr(), src.len()) }.unwrap();
    let remote = [Segment { addr: 0x10000, key: 7, len: 4096 }];
    let local = [LocalSeg { region: r, offset: 0, len: 4096 }];
    server.post_write(&remote, &local, 1).unwrap();
    let (Message::DataWrite(d), payload) = read_raw(&mut raw) else { panic!("expected DATA_WRITE") };
    assert_eq!(payload, vec![0x11u8; 4096]);
    let resp = DataResp { op_id: d.op_id, status: Status::Ok, len: 4096 };
    send_raw(&mut raw, &Message::DataReadResp(resp), &[0xee; 4096]);
    let c = wait_completions(&mut server, 1);
    assert_eq!(c[0].status, Status::ConnectionLost, "{c:?}");
    assert!(!server.is_connected());
    let (Message::Error(e), _) = read_raw(&mut raw) else { panic!("expected ERROR") };
    assert_eq!(e.code, ERR_PROTOCOL);
    drop(server);
    assert_eq!(src, vec![0x11u8; 4096], "peer bytes written into the source");

    // One-sided READ answered with a DATA_WRITE_ACK: nothing was transferred.
    let (mut server, mut raw) = raw_peer(cfg(1));
    let mut dst = vec![0u8; 4096];
    // SAFETY: as above.
    let r = unsafe { server.register_region(dst.as_mut_ptr(), dst.len()) }.unwrap();
    let local = [LocalSeg { region: r, offset: 0, len: 4096 }];
    server.post_read(&remote, &local, 2).unwrap();
    let (Message::DataRead(d), _) = read_raw(&mut raw) else { panic!("expected DATA_READ") };
    let ack = DataResp { op_id: d.op_id, status: Status::Ok, len: 4096 };
    send_raw(&mut raw, &Message::DataWriteAck(ack), &[]);
    let c = wait_completions(&mut server, 1);
    assert_eq!(c[0].status, Status::ConnectionLost, "{c:?}");
    assert!(!server.is_connected());
    drop(server);
    drop(dst);
}

#[test]
fn a_repeated_response_does_not_complete_a_torn_transfer() {
    // A two-segment READ: segment 0 answered twice, segment 1 never.
    let (mut server, mut raw) = raw_peer(cfg(1));
    let mut dst = vec![0u8; 8192];
    // SAFETY: `dst` outlives `server`.
    let r = unsafe { server.register_region(dst.as_mut_ptr(), dst.len()) }.unwrap();
    let remote = [Segment { addr: 0x10000, key: 7, len: 4096 }, Segment { addr: 0x20000, key: 7, len: 4096 }];
    let local = [LocalSeg { region: r, offset: 0, len: 8192 }];
    server.post_read(&remote, &local, 3).unwrap();
    let (Message::DataRead(first), _) = read_raw(&mut raw) else { panic!("expected DATA_READ") };
    let (Message::DataRead(_second), _) = read_raw(&mut raw) else { panic!("expected DATA_READ") };
    let resp = Message::DataReadResp(DataResp { op_id: first.op_id, status: Status::Ok, len: 4096 });
    send_raw(&mut raw, &resp, &[0xab; 4096]);
    send_raw(&mut raw, &resp, &[0xcd; 4096]);
    let c = wait_completions(&mut server, 1);
    assert_eq!(c[0].status, Status::ConnectionLost, "{c:?}");
    assert_eq!(c[0].bytes, 0);
    assert!(!server.is_connected());
    drop(server);
    drop(dst);
}

/// Every `warn` line of this test binary, for the log-rate tests.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let b = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || W(b.clone()))
            .finish();
        tracing::subscriber::set_global_default(sub).expect("no other subscriber in tests");
        buf
    })
    .clone()
}

#[test]
fn refused_accesses_are_logged_rate_limited() {
    let logs = captured_logs();
    let (server, mut raw) = raw_peer(cfg(1));
    let me = format!("peer={}", raw.local_addr().unwrap());
    const N: u64 = 2000;
    for i in 0..N {
        let m = Message::DataRead(DataReq { op_id: i, addr: 0x1000, key: 0xdead, len: 512 });
        send_raw(&mut raw, &m, &[]);
    }
    for i in 0..N {
        let (Message::DataReadResp(r), _) = read_raw(&mut raw) else { panic!("expected DATA_READ_RESP") };
        assert_eq!((r.op_id, r.status), (i, Status::AccessDenied));
    }
    // Each refusal failed one operation only.
    assert!(server.is_connected());
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.is_connected() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let text = String::from_utf8(lock(&logs).clone()).unwrap();
    let mine: Vec<&str> = text.lines().filter(|l| l.contains(&me)).collect();
    let refused = mine.iter().filter(|l| l.contains("refused one-sided read")).count() as u64;
    const SUMMARY: &str = " more refused one-sided accesses not logged";
    let summarised: u64 = mine
        .iter()
        .filter_map(|l| l.find(SUMMARY).map(|at| &l[..at]))
        .map(|head| head.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(refused <= u64::from(crate::ratelimit::LOG_BURST), "{refused} refusal lines");
    assert_eq!(refused + summarised, N, "{mine:#?}");
}

#[test]
fn an_oversized_data_read_is_refused_naming_its_limit() {
    let (server, mut raw) = raw_peer(cfg(1));
    let m = Message::DataRead(DataReq { op_id: 1, addr: 0x1000, key: 1, len: 512 });
    let mut b = m.to_vec().unwrap();
    // 5 MiB: within a descriptor's limit, over a data frame's.
    b[HEADER_LEN + 20..HEADER_LEN + 24].copy_from_slice(&(5u32 << 20).to_le_bytes());
    raw.write_all(&b).unwrap();
    let (Message::Error(e), _) = read_raw(&mut raw) else { panic!("expected ERROR") };
    assert_eq!(e.code, ERR_PROTOCOL);
    assert!(e.text.contains(&MAX_DATA_LEN.to_string()), "{}", e.text);
    assert!(!e.text.contains(&wire::MAX_IO_LEN.to_string()), "{}", e.text);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.is_connected() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn inline_desc(request_id: u64, offset: u64, length: u32) -> Descriptor {
    Descriptor {
        request_id,
        volume: 1,
        generation: 2,
        offset,
        length,
        flags: wire::FLAG_INLINE,
        epoch: 3,
        incarnation: 4,
        floor: request_id,
        ..Descriptor::default()
    }
}

#[test]
fn inline_writes_arrive_with_their_payload_in_aligned_buffers() {
    let (mut server, client) = pair_with(cfg(1), cfg(2));
    let mut client = client.unwrap();
    let mut guest: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + 5) as u8).collect();
    // SAFETY: `guest` outlives the endpoints (dropped explicitly below).
    let g = unsafe { client.register_region(guest.as_mut_ptr(), guest.len()) }.unwrap();
    let seg = |offset: u64, len: u32| LocalSeg { region: g, offset, len };
    // (request id, guest pieces): 1 byte, two pieces, the largest, and a
    // segmented WRITE between them to check the stream stays framed.
    let cases: Vec<(u64, Vec<LocalSeg>)> =
        vec![(1, vec![seg(7, 1)]), (2, vec![seg(100, 3000), seg(50_000, 5000)]), (3, vec![seg(0, wire::MAX_INLINE)])];
    for (id, pieces) in &cases {
        let len = pieces.iter().map(|p| p.len).sum();
        client.send_inline(&Message::Write(inline_desc(*id, 4096 * id, len)), pieces).unwrap();
        if *id == 2 {
            let grant = client.grant(g, &[(0, 512)], Access::RemoteRead).unwrap();
            let d = Descriptor { request_id: 99, length: 512, segments: grant.segments, ..Descriptor::default() };
            client.send(&Message::Write(d)).unwrap();
        }
    }
    let mut got = Vec::new();
    while got.len() < cases.len() + 1 {
        got.push(wait_msg(&mut server));
    }
    let expect = |pieces: &[LocalSeg]| -> Vec<u8> {
        pieces.iter().flat_map(|p| guest[p.offset as usize..p.offset as usize + p.len as usize].to_vec()).collect()
    };
    let mut inline = got.iter().filter_map(|m| match m {
        Message::Write(d) if d.is_inline() => Some(d),
        _ => None,
    });
    for (id, pieces) in &cases {
        let d = inline.next().unwrap();
        assert_eq!((d.request_id, d.offset, d.floor), (*id, 4096 * id, *id));
        let data = d.inline.as_ref().expect("payload attached");
        assert_eq!(data.len(), d.length as usize);
        assert_eq!(&data[..], &expect(pieces)[..], "request {id}");
        assert_eq!(data.as_ptr() as usize % crate::inline::INLINE_ALIGN, 0);
        assert_eq!(data.capacity() % crate::inline::INLINE_ALIGN, 0);
    }
    assert!(matches!(&got[2], Message::Write(d) if d.request_id == 99 && d.inline.is_none()));
    assert!(server.inline_bytes_held() >= 4096 + 8192 + 65536);
    // Forwarding a received inline WRITE with `send` carries its payload.
    let Message::Write(fwd) = got.remove(1) else { panic!("expected WRITE") };
    server.send(&Message::Write(fwd.clone())).unwrap();
    drop(got);
    let Message::Write(back) = wait_msg(&mut client) else { panic!("expected WRITE") };
    assert_eq!(back, fwd);
    drop(fwd);
    // Buffers go back to the pool once the messages are dropped.
    assert_eq!(server.inline_bytes_held(), 0);

    // Misuse is refused before anything is sent.
    let d = inline_desc(5, 0, 10);
    assert!(matches!(client.send(&Message::Write(d.clone())), Err(TransportError::Inline(_))));
    assert!(matches!(
        client.send_inline(&Message::Write(d.clone()), &[seg(0, 9)]),
        Err(TransportError::LengthMismatch { .. })
    ));
    let not_inline = Descriptor { flags: 0, ..d.clone() };
    assert!(matches!(client.send_inline(&Message::Write(not_inline), &[seg(0, 10)]), Err(TransportError::Inline(_))));
    assert!(matches!(client.send_inline(&Message::Read(d), &[seg(0, 10)]), Err(TransportError::Inline(_))));
    let big = inline_desc(6, 0, wire::MAX_INLINE + 1);
    assert!(client.send_inline(&Message::Write(big), &[seg(0, wire::MAX_INLINE + 1)]).is_err());
    assert!(client.is_connected() && server.is_connected());
    drop(server);
    drop(client);
    guest.clear();
}

#[test]
fn a_flood_of_inline_writes_meets_backpressure_and_memory_stays_bounded() {
    const BUDGET: usize = 256 << 10;
    let mut sc = cfg(1);
    sc.inline_budget = BUDGET;
    let mut cc = cfg(2);
    cc.send_queue = 16;
    let (mut server, client) = pair_with(sc, cc);
    let mut client = client.unwrap();
    let len = wire::MAX_INLINE;
    let mut guest: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    // SAFETY: `guest` outlives the endpoints.
    let g = unsafe { client.register_region(guest.as_mut_ptr(), guest.len()) }.unwrap();
    let payload = [LocalSeg { region: g, offset: 0, len }];
    // The server's application does not poll: its inline buffers run out,
    // its transport stops reading, and the client meets QueueFull.
    let mut sent = 0u64;
    let full = loop {
        match client.send_inline(&Message::Write(inline_desc(sent, 0, len)), &payload) {
            Ok(()) => sent += 1,
            Err(TransportError::QueueFull) => break true,
            Err(e) => panic!("{e}"),
        }
        assert!(server.inline_bytes_held() <= BUDGET);
        if sent > 100_000 {
            break false;
        }
    };
    assert!(full, "send queue never filled after {sent} inline writes");
    std::thread::sleep(Duration::from_millis(100));
    assert!(server.inline_bytes_held() <= BUDGET);
    assert!(client.is_connected() && server.is_connected());
    // Messages the application holds count too: with four 64 KiB
    // payloads held, nothing more is received until one is released.
    let mut held: VecDeque<Message> = (0..BUDGET / len as usize).map(|_| wait_msg(&mut server)).collect();
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(server.poll_recv().unwrap().is_none());
        std::thread::yield_now();
    }
    let mut next = 0u64;
    let check = |m: &Message, next: u64| {
        let Message::Write(d) = m else { panic!("expected WRITE") };
        assert_eq!(d.request_id, next);
        assert_eq!(&d.inline.as_ref().unwrap()[..], &guest[..]);
    };
    // Release them one by one, then drain everything, in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < sent {
        if let Some(m) = held.pop_front() {
            check(&m, next);
            next += 1;
            continue;
        }
        match server.poll_recv().unwrap() {
            Some(m) => {
                check(&m, next);
                next += 1;
            }
            None => {
                assert!(Instant::now() < deadline, "received {next} of {sent}");
                std::thread::yield_now();
            }
        }
    }
    assert_eq!(server.inline_bytes_held(), 0);
    drop(server);
    drop(client);
    guest.clear();
}

fn readable(fd: std::os::fd::RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd the kernel may write.
    unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
}

/// A caller can sleep on `poll_fd` instead of spinning: it becomes readable when a message
/// or a completion arrives (whoever took the bytes off the socket) and unreadable once the
/// caller found nothing more to poll; a failed connection makes it readable too.
#[test]
fn poll_fd_wakes_a_sleeping_caller_and_goes_quiet_when_drained() {
    let (mut server, client) = pair_with(cfg(1), cfg(2));
    let mut client = client.unwrap();
    let fd = server.poll_fd().expect("tcp has a poll fd");
    assert!(!readable(fd, 50), "nothing sent yet");
    let flush =
        |id| Message::Flush(crate::wire::Flush { request_id: id, volume: 7, generation: 1, ..Default::default() });
    for round in 0..3 {
        // Give the background receiver time to take the bytes: the socket is then empty,
        // and only the notification can wake the caller.
        client.send(&flush(round)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(readable(fd, 2000), "round {round}: a message arrived but the fd is not readable");
        assert!(matches!(server.poll_recv().unwrap(), Some(Message::Flush(_))));
        assert!(server.poll_recv().unwrap().is_none());
        assert_eq!(server.poll_completions(&mut [OpCompletion::EMPTY; 4]), 0);
        assert!(!readable(fd, 0), "round {round}: drained, yet still readable");
    }
    drop(client);
    assert!(readable(fd, 5000), "a failed connection must wake the caller");
    assert!(server.poll_recv().is_err());
}

/// A setting out of range is refused before any socket is touched, never
/// quietly replaced by one the transport prefers.
#[test]
fn out_of_range_settings_are_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    for (field, set, value) in [
        ("max_inflight", (|c: &mut Config, v| c.max_inflight = v) as fn(&mut Config, usize), 0),
        ("max_inflight", |c, v| c.max_inflight = v, crate::MAX_INFLIGHT_MAX + 1),
        ("send_queue", |c, v| c.send_queue = v, 0),
        ("send_queue", |c, v| c.send_queue = v, crate::QUEUE_MAX + 1),
        ("recv_queue", |c, v| c.recv_queue = v, 0),
        ("recv_queue", |c, v| c.recv_queue = v, usize::MAX),
    ] {
        let mut bad = cfg(1);
        set(&mut bad, value);
        let refused = |r: Result<(), TransportError>| matches!(r, Err(TransportError::Config { field: f, value: v, .. }) if f == field && v == value);
        assert!(
            refused(TcpAcceptor::bind("127.0.0.1:0", bad.clone(), Arc::new(Registry::new())).map(drop)),
            "bind {field} {value}"
        );
        assert!(
            refused(TcpEndpoint::connect(addr, &bad, Arc::new(Registry::new())).map(drop)),
            "connect {field} {value}"
        );
        assert!(refused(crate::loopback::pair(&bad, &cfg(2)).map(drop)), "loopback {field} {value}");
        let message = bad.validate().unwrap_err().to_string();
        assert!(message.contains(field) && message.contains(&value.to_string()), "{message}");
    }
    // Nothing connected to the listener: connect refused the setting before the socket.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
    // The limits themselves are allowed.
    let mut edge = cfg(1);
    edge.max_inflight = crate::MAX_INFLIGHT_MAX;
    edge.send_queue = 1;
    edge.recv_queue = crate::QUEUE_MAX;
    edge.validate().unwrap();
    crate::loopback::pair(&edge, &cfg(2)).unwrap();
}
