//! The etcd facade against a real etcd (`/usr/bin/etcd`, Debian package etcd-server), one per
//! test on its own loopback ports: compare-and-swap races, atomic creation, listing, and what a
//! caller sees when etcd is down, frozen or killed in the middle of a write.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use backend::cluster::{keys, CasOutcome, CreateOutcome, Etcd, EtcdConfig, EtcdError, Op};
use hcblk_tests::etcd::EtcdServer;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// An etcd of its own in a temp dir (removed after the server is killed: fields drop in order).
struct Fixture {
    server: EtcdServer,
    _dir: tempfile::TempDir,
}

fn etcd_server(name: &str) -> Fixture {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = EtcdServer::start_loopback(name, dir.path()).expect("start etcd");
    Fixture { server, _dir: dir }
}

fn config(endpoint: &str, request_timeout: Duration) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![endpoint.to_owned()]);
    c.request_timeout = request_timeout;
    c.dial_timeout = Duration::from_secs(1);
    c
}

fn connect(f: &Fixture) -> Etcd {
    Etcd::connect(config(&f.server.endpoint(), Duration::from_secs(5))).expect("connect")
}

fn committed(o: CasOutcome) -> u64 {
    match o {
        CasOutcome::Committed { revision } => revision,
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[test]
fn cas_race_from_one_revision_has_exactly_one_winner_100_times() {
    let f = etcd_server("race");
    let etcd = connect(&f);
    let key = keys::volume("vol0").unwrap();
    let mut rev = committed(etcd.compare_and_swap(&key, 0, b"gen0", &[]).unwrap());
    for round in 0..100u32 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                // Clones of one client on two threads: the facade is shared the way daemon
                // threads share it.
                let etcd = etcd.clone();
                let key = key.clone();
                let barrier = barrier.clone();
                let value = format!("{who}{round}").into_bytes();
                thread::spawn(move || {
                    barrier.wait();
                    (value.clone(), etcd.compare_and_swap(&key, rev, &value, &[]).unwrap())
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter(|(_, o)| matches!(o, CasOutcome::Committed { .. })).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let (win_value, win) = winners[0];
        let win_rev = committed(win.clone());
        let (_, lost) = results.iter().find(|(_, o)| matches!(o, CasOutcome::Conflict { .. })).unwrap();
        // The loser learns the winner's value and revision from the same transaction.
        let CasOutcome::Conflict { current: Some(current) } = lost else { panic!("round {round}: {lost:?}") };
        assert_eq!((&current.value, current.mod_revision), (win_value, win_rev), "round {round}");
        let stored = etcd.get(&key).unwrap().unwrap();
        assert_eq!((&stored.value, stored.mod_revision), (win_value, win_rev));
        assert!(win_rev > rev);
        rev = win_rev;
    }
}

#[test]
fn create_all_writes_every_key_or_none() {
    let f = etcd_server("create");
    let etcd = connect(&f);
    let vol = keys::volume("vol0").unwrap();
    let id = keys::volume_id(7);
    let out = etcd.create_all(&[(&vol, &b"{}"[..]), (&id, &b"vol0"[..])]).unwrap();
    let CreateOutcome::Created { revision } = out else { panic!("first create must succeed: {out:?}") };
    for k in [&vol, &id] {
        let kv = etcd.get(k).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version, kv.lease), (revision, revision, 1, None));
    }

    // A second volume that reuses id 7: one key exists, so nothing is written.
    let vol1 = keys::volume("vol1").unwrap();
    let out = etcd.create_all(&[(&vol1, &b"{}"[..]), (&id, &b"vol1"[..])]).unwrap();
    let CreateOutcome::Exists { present } = out else { panic!("{out:?}") };
    assert_eq!(present.len(), 1);
    assert_eq!((present[0].key.as_str(), present[0].value.as_slice()), (id.as_str(), &b"vol0"[..]));
    assert_eq!(etcd.get(&vol1).unwrap(), None, "the absent key must not have been written");
    assert_eq!(etcd.get(&id).unwrap().unwrap().value, b"vol0");

    // Create-if-absent of the cluster identity: the loser reads the winner's id.
    let first = etcd.create_all(&[(keys::CLUSTER, &br#"{"cluster_id":1}"#[..])]).unwrap();
    assert!(matches!(first, CreateOutcome::Created { .. }));
    let second = etcd.create_all(&[(keys::CLUSTER, &br#"{"cluster_id":2}"#[..])]).unwrap();
    let CreateOutcome::Exists { present } = second else { panic!("{second:?}") };
    assert_eq!(present[0].value, br#"{"cluster_id":1}"#);

    // Refused before sending.
    let dup = etcd.create_all(&[(&vol1, &b"a"[..]), (&vol1, &b"b"[..])]).unwrap_err();
    assert!(matches!(dup, EtcdError::InvalidRequest(_)), "{dup:?}");
    let none: [(&str, &[u8]); 0] = [];
    assert!(matches!(etcd.create_all(&none), Err(EtcdError::InvalidRequest(_))));
}

#[test]
fn cas_and_delete_carry_extra_ops_in_the_same_transaction() {
    let f = etcd_server("extra");
    let etcd = connect(&f);
    let vol = keys::volume("vol0").unwrap();
    let id = keys::volume_id(1);
    let audit = keys::audit("vol0", "2026-01-01T00:00:00Z").unwrap();

    // "Must not exist" (0) creates; expecting 0 again conflicts and shows the current value.
    let r1 = committed(etcd.compare_and_swap(&vol, 0, b"v1", &[Op::put(&id, "vol0")]).unwrap());
    assert_eq!(etcd.get(&id).unwrap().unwrap().mod_revision, r1, "extra op in the same revision");
    let out = etcd.compare_and_swap(&vol, 0, b"v2", &[]).unwrap();
    let CasOutcome::Conflict { current: Some(cur) } = out else { panic!("{out:?}") };
    assert_eq!((cur.value.as_slice(), cur.mod_revision), (&b"v1"[..], r1));

    // A stale revision writes nothing, extra ops included.
    let out = etcd.compare_and_swap(&vol, r1 + 100, b"v2", &[Op::put(&audit, "accepted")]).unwrap();
    assert!(matches!(out, CasOutcome::Conflict { current: Some(_) }), "{out:?}");
    assert_eq!(etcd.get(&audit).unwrap(), None);

    let r2 = committed(etcd.compare_and_swap(&vol, r1, b"v2", &[Op::put(&audit, "accepted")]).unwrap());
    assert_eq!(etcd.get(&audit).unwrap().unwrap().mod_revision, r2);

    // Delete the volume and its index entry together, only at the revision read.
    let out = etcd.compare_and_delete(&vol, r1, &[Op::delete(&id)]).unwrap();
    assert!(matches!(out, CasOutcome::Conflict { current: Some(ref kv) } if kv.mod_revision == r2), "{out:?}");
    assert!(etcd.get(&id).unwrap().is_some());
    committed(etcd.compare_and_delete(&vol, r2, &[Op::delete(&id)]).unwrap());
    assert_eq!((etcd.get(&vol).unwrap(), etcd.get(&id).unwrap()), (None, None));
    // Gone: a CAS against any revision conflicts with "absent".
    assert_eq!(etcd.compare_and_delete(&vol, r2, &[]).unwrap(), CasOutcome::Conflict { current: None });

    // Refused before sending: nothing to delete, a key written twice, a malformed key.
    assert!(matches!(etcd.compare_and_delete(&vol, 0, &[]), Err(EtcdError::InvalidRequest(_))));
    assert!(matches!(etcd.compare_and_swap(&vol, 0, b"x", &[Op::delete(&vol)]), Err(EtcdError::InvalidRequest(_))));
    assert!(matches!(etcd.compare_and_swap("/abs", 0, b"x", &[]), Err(EtcdError::InvalidRequest(_))));
    assert!(matches!(etcd.get("volumes//x"), Err(EtcdError::InvalidRequest(_))));
}

#[test]
fn list_reads_every_page_at_one_revision_and_stays_under_its_prefix() {
    let f = etcd_server("list");
    let etcd = connect(&f);
    // 1200 volumes: three pages of 500, written 120 per transaction.
    let names: Vec<String> = (0..1200).map(|i| format!("vol{i:04}")).collect();
    for chunk in names.chunks(120) {
        let kvs: Vec<(String, Vec<u8>)> =
            chunk.iter().map(|n| (keys::volume(n).unwrap(), n.clone().into_bytes())).collect();
        assert!(matches!(etcd.create_all(&kvs).unwrap(), CreateOutcome::Created { .. }));
    }
    etcd.create_all(&[(keys::node("n1").unwrap(), b"{}")]).unwrap();
    // A key that shares the text prefix but is not under `volumes/`.
    etcd.create_all(&[("volumes-old/x", b"{}")]).unwrap();

    let (vols, revision) = etcd.list(keys::VOLUMES).unwrap();
    let listed: Vec<&str> = vols.iter().map(|kv| keys::name_under(keys::VOLUMES, &kv.key).unwrap()).collect();
    assert_eq!(listed, names, "every volume once, in key order");
    assert!(vols.iter().all(|kv| kv.mod_revision <= revision));
    assert_eq!(vols[7].value, b"vol0007");

    let (all, _) = etcd.list("").unwrap();
    assert_eq!(all.len(), 1202);
    let (nodes, _) = etcd.list(keys::NODES).unwrap();
    assert_eq!(nodes.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["nodes/n1"]);
    assert_eq!(etcd.list("audit/").unwrap().0, vec![]);

    // Another prefix is another world.
    let mut other = config(&f.server.endpoint(), Duration::from_secs(5));
    other.prefix = "/hcblk/test-other".into();
    let other = Etcd::connect(other).unwrap();
    assert_eq!(other.list("").unwrap().0, vec![]);
    assert_eq!(other.get(&keys::node("n1").unwrap()).unwrap(), None);
}

#[test]
fn connect_to_a_dead_etcd_is_one_clear_error_at_once() {
    let mut f = etcd_server("down");
    let endpoint = f.server.endpoint();
    f.server.kill().unwrap();
    let mut c = config(&endpoint, Duration::from_secs(5));
    c.dial_timeout = Duration::from_secs(5);
    let started = Instant::now();
    let e = Etcd::connect(c).unwrap_err();
    // A refused connection is an answer: no waiting for the dial timeout.
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert!(matches!(e, EtcdError::Unreachable { .. }), "{e:?}");
    let line = backend::control::chain(&e);
    eprintln!("{line}");
    assert!(line.starts_with(&format!("etcd is unreachable: no answer from {endpoint} within 5s")), "{line}");
    assert!(line.contains("Connection refused"), "{line}");
}

#[test]
fn a_dead_endpoint_among_live_ones_is_not_waited_for() {
    let f = etcd_server("two-endpoints");
    let dead = hcblk_tests::etcd::free_loopback_addr().unwrap();
    let endpoints = vec![format!("http://{dead}"), f.server.endpoint()];
    let mut c = config(&endpoints[0], Duration::from_secs(2));
    c.endpoints = endpoints;
    let started = Instant::now();
    let etcd = Etcd::connect(c).unwrap();
    for i in 0..20u64 {
        let key = keys::volume_id(i);
        committed(etcd.compare_and_swap(&key, 0, b"x", &[]).unwrap());
        assert_eq!(etcd.get(&key).unwrap().unwrap().value, b"x");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn after_a_timeout_the_next_call_goes_to_the_next_endpoint() {
    let f = etcd_server("failover");
    // Two ways to the one member, as if it were two members: through a proxy, and direct.
    let proxy = hcblk_tests::etcd::TcpProxy::start(f.server.client_addr()).unwrap();
    let mut c = config(&proxy.endpoint(), Duration::from_secs(1));
    c.endpoints.push(f.server.endpoint());
    let etcd = Etcd::connect(c).unwrap();
    let key = keys::volume("vol0").unwrap();
    let rev = committed(etcd.compare_and_swap(&key, 0, b"v1", &[]).unwrap());

    proxy.partition();
    // The first endpoint answers nothing: the write is not resent elsewhere (it may have
    // arrived), it reports an unknown outcome after the timeout...
    let e = etcd.compare_and_swap(&key, rev, b"v2", &[]).unwrap_err();
    assert!(matches!(e, EtcdError::OutcomeUnknown { .. }), "{e:?}");
    // ...and the next calls go to the other endpoint at once.
    let started = Instant::now();
    let kv = etcd.get(&key).unwrap().unwrap();
    let rev = if kv.value == b"v2" { kv.mod_revision } else { rev };
    committed(etcd.compare_and_swap(&key, rev, b"v3", &[]).unwrap());
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
}

#[test]
fn connect_to_a_frozen_etcd_gives_up_after_the_dial_timeout() {
    let f = etcd_server("frozen-connect");
    f.server.freeze().unwrap();
    let started = Instant::now();
    // The kernel still accepts TCP connections for the frozen process; only gRPC goes unanswered.
    let e = Etcd::connect(config(&f.server.endpoint(), Duration::from_secs(5))).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, EtcdError::Unreachable { .. }), "{e:?}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "took {took:?}");
    f.server.resume().unwrap();
}

#[test]
fn cas_in_flight_when_etcd_is_killed_has_an_unknown_outcome_and_the_client_recovers() {
    let mut f = etcd_server("killed");
    let etcd = Etcd::connect(config(&f.server.endpoint(), Duration::from_secs(3))).unwrap();
    let key = keys::volume("vol0").unwrap();
    let rev = committed(etcd.compare_and_swap(&key, 0, b"v1", &[]).unwrap());

    // Frozen first, so the request is surely on its way (sent, unanswered) when the kill comes.
    f.server.freeze().unwrap();
    let cas = {
        let etcd = etcd.clone();
        let key = key.clone();
        thread::spawn(move || {
            let started = Instant::now();
            (etcd.compare_and_swap(&key, rev, b"v2", &[]), started.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(300));
    f.server.kill().unwrap();
    let (result, took) = cas.join().unwrap();
    let e = result.unwrap_err();
    assert!(matches!(e, EtcdError::OutcomeUnknown { .. }), "{e:?}");
    assert!(took < Duration::from_secs(3) + Duration::from_millis(500), "took {took:?}");
    let line = backend::control::chain(&e);
    eprintln!("{line}");
    assert!(line.contains("outcome unknown") && line.contains("re-read"), "{line}");

    // While etcd is down, connections are refused: a write provably never leaves, so it is
    // "unreachable" (nothing done), not "unknown", and so is a read; both at once.
    let started = Instant::now();
    let e = etcd.compare_and_swap(&key, rev, b"v3", &[]).unwrap_err();
    assert!(matches!(e, EtcdError::Unreachable { .. }), "{e:?}");
    assert!(backend::control::chain(&e).contains("Connection refused"), "{e:?}");
    assert!(matches!(etcd.get(&key), Err(EtcdError::Unreachable { .. })));
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());

    // Same data dir: the committed revision survived, and the same client works again.
    f.server.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let current = loop {
        match etcd.get(&key) {
            Ok(kv) => break kv.unwrap(),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the client to reconnect: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("client did not recover: {e:?}"),
        }
    };
    // Re-read decides: the killed CAS either landed (v2) or not (v1); the refused one (v3) never.
    assert!(current.value == b"v1" || current.value == b"v2", "{current:?}");
    assert!(current.value != b"v1" || current.mod_revision == rev);
    committed(etcd.compare_and_swap(&key, current.mod_revision, b"v4", &[]).unwrap());
    assert_eq!(etcd.get(&key).unwrap().unwrap().value, b"v4");
}

#[test]
fn frozen_etcd_makes_a_cas_unknown_within_the_timeout_and_reads_unreachable() {
    let f = etcd_server("hung");
    let etcd = Etcd::connect(config(&f.server.endpoint(), Duration::from_secs(1))).unwrap();
    let key = keys::volume("vol0").unwrap();
    let rev = committed(etcd.compare_and_swap(&key, 0, b"v1", &[]).unwrap());
    f.server.freeze().unwrap();

    let started = Instant::now();
    let e = etcd.compare_and_swap(&key, rev, b"v2", &[]).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, EtcdError::OutcomeUnknown { .. }), "{e:?}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(2), "took {took:?}");

    let started = Instant::now();
    let e = etcd.get(&key).unwrap_err();
    assert!(matches!(e, EtcdError::Unreachable { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

    // Thawed, etcd processes what it had received: the CAS sent while frozen may land now,
    // which is exactly why the caller must re-read after OutcomeUnknown.
    f.server.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let kv = loop {
        match etcd.get(&key) {
            Ok(kv) => break kv.unwrap(),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for etcd: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("client did not recover: {e:?}"),
        }
    };
    assert!(kv.value == b"v1" || kv.value == b"v2", "{kv:?}");
}
