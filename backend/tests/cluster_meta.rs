//! `EtcdMeta`, the cluster's metadata adapter, against a real etcd (`/usr/bin/etcd`, one per
//! test on its own loopback ports): a volume and its id index created and deleted together,
//! compare-and-swap races with exactly one winner and the current document for the loser,
//! writes whose outcome is unknown reported as "unavailable", node listing, published status
//! under a lease, the cluster id created once, and the registration's lease clock.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use backend::cluster::{
    keys, CreateVolume, Etcd, EtcdConfig, EtcdMeta, MetaError, MetaStore, MetaWrite, NodeRegistration, Op,
    PublishedStatus, PublishedSync, RegistrationConfig,
};
use hcblk_tests::etcd::{EtcdServer, TcpProxy};
use replication::{ExtentMeta, Locality, Member, MemberState, NodeInfo, VolumeMeta};

/// Short enough for fast tests, long enough for etcd's minimum TTL under the launcher's
/// election timeout.
const TTL: Duration = Duration::from_secs(2);

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

fn connect(endpoint: &str, request_timeout: Duration) -> Etcd {
    let mut c = EtcdConfig::new(vec![endpoint.to_owned()]);
    c.request_timeout = request_timeout;
    c.dial_timeout = Duration::from_secs(1);
    Etcd::connect(c).expect("connect")
}

fn meta_of(f: &Fixture) -> EtcdMeta {
    EtcdMeta::new(connect(&f.server.endpoint(), Duration::from_secs(5)))
}

/// The store's revision: moves with every write, and only then.
fn revision(meta: &EtcdMeta) -> u64 {
    meta.etcd().list("").unwrap().1
}

fn volume(name: &str, id: u64) -> VolumeMeta {
    let member = |n: &str| Member::new(n, MemberState::InSync);
    VolumeMeta {
        format: replication::meta::META_FORMAT,
        name: name.into(),
        id,
        size_bytes: 3 << 30,
        block_size: 512,
        extent_bytes: 1 << 30,
        region_bytes: 1 << 20,
        replicas: 3,
        min_replicas: 2,
        queues: 1,
        serial: name.into(),
        read_only: false,
        locality: Locality::Prefer,
        created_unix_s: 1,
        generation: 0,
        owner: None,
        epoch: 1,
        extents: (0..3).map(|_| ExtentMeta { members: vec![member("n1"), member("n2"), member("n3")] }).collect(),
        risk_accepted: None,
    }
}

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        id: replication::node_id(name),
        address: "127.0.0.1:7400".into(),
        zone: None,
        capacity_bytes: 100 << 30,
        free_bytes: 90 << 30,
        version: "test".into(),
        started_unix_s: 1,
    }
}

fn created(outcome: CreateVolume) -> i64 {
    match outcome {
        CreateVolume::Created { revision } => revision,
        other => panic!("expected a create, got {other:?}"),
    }
}

fn committed(write: MetaWrite) -> i64 {
    match write {
        MetaWrite::Committed { revision } => revision,
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[test]
fn a_volume_and_its_id_index_are_created_and_deleted_together() {
    let f = etcd_server("create");
    let meta = meta_of(&f);
    let v = volume("vol0", 42);
    let rev = created(meta.create_volume(&v).unwrap());
    assert_eq!(meta.read_volume("vol0").unwrap(), Some((v.clone(), rev)));
    assert_eq!(meta.read_volume_by_id(42).unwrap(), Some(v.clone()));
    assert_eq!(meta.etcd().get(&keys::volume_id(42)).unwrap().unwrap().value, b"vol0");

    // The name, or the id, taken: nothing written at all.
    let before = revision(&meta);
    assert_eq!(meta.create_volume(&volume("vol0", 43)).unwrap(), CreateVolume::NameTaken);
    assert_eq!(meta.create_volume(&volume("vol1", 42)).unwrap(), CreateVolume::IdTaken);
    assert_eq!(revision(&meta), before);
    assert_eq!(meta.read_volume("vol1").unwrap(), None);
    assert_eq!(meta.read_volume_by_id(43).unwrap(), None);

    // An invalid document or one too large for etcd is refused before it is sent.
    let mut bad = volume("vol2", 44);
    bad.extents.pop();
    assert!(matches!(meta.create_volume(&bad), Err(MetaError::Malformed { .. })));
    assert_eq!(revision(&meta), before);

    // Delete: document, id index and published status in one transaction; a stale revision
    // is a conflict with the current document.
    let status = PublishedStatus { node: "n1".into(), phase: "serving".into(), ..PublishedStatus::default() };
    meta.etcd().compare_and_swap(&keys::status("vol0").unwrap(), 0, &status.to_json(), &[]).unwrap();
    let later = committed(meta.write_volume("vol0", rev, &VolumeMeta { epoch: 2, ..v.clone() }).unwrap());
    let MetaWrite::Conflict(Some(conflict)) = meta.delete_volume("vol0", rev, 42).unwrap() else {
        panic!("a delete on a stale revision must conflict")
    };
    let (current, current_rev) = *conflict;
    assert_eq!((current.epoch, current_rev), (2, later));
    committed(meta.delete_volume("vol0", later, 42).unwrap());
    assert_eq!(meta.read_volume("vol0").unwrap(), None);
    assert_eq!(meta.read_volume_by_id(42).unwrap(), None);
    assert_eq!(meta.etcd().get(&keys::volume_id(42)).unwrap(), None);
    assert_eq!(meta.read_status("vol0").unwrap(), None);
    assert_eq!(meta.delete_volume("vol0", later, 42).unwrap(), MetaWrite::Conflict(None));

    // The name reused by a new volume: the old id finds nothing, the new one finds it.
    created(meta.create_volume(&volume("vol0", 77)).unwrap());
    assert_eq!(meta.read_volume_by_id(42).unwrap(), None);
    assert_eq!(meta.read_volume_by_id(77).unwrap().map(|m| m.id), Some(77));
    let names: Vec<String> = meta.list_volumes().unwrap().into_iter().map(|(m, _)| m.name).collect();
    assert_eq!(names, ["vol0"]);
}

#[test]
fn a_cas_race_from_one_revision_has_one_winner_and_the_loser_gets_the_current_document() {
    let f = etcd_server("race");
    let meta = meta_of(&f);
    let v = volume("vol0", 1);
    let mut rev = created(meta.create_volume(&v).unwrap());
    for round in 0..30u64 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let meta = meta.clone();
                let barrier = Arc::clone(&barrier);
                let doc = VolumeMeta { owner: Some(format!("{who}{round}")), generation: round + 1, ..v.clone() };
                thread::spawn(move || {
                    barrier.wait();
                    (doc.clone(), meta.write_volume("vol0", rev, &doc).unwrap())
                })
            })
            .collect();
        let results: Vec<(VolumeMeta, MetaWrite)> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter(|(_, w)| matches!(w, MetaWrite::Committed { .. })).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let (won, win) = winners[0];
        let win_rev = committed(win.clone());
        let (_, lost) = results.iter().find(|(_, w)| matches!(w, MetaWrite::Conflict(_))).unwrap();
        assert_eq!(lost, &MetaWrite::Conflict(Some(Box::new((won.clone(), win_rev)))), "round {round}");
        rev = win_rev;
    }
    // Expecting 0 ("absent") never creates a document without its index: it is a conflict.
    let before = revision(&meta);
    let MetaWrite::Conflict(Some(conflict)) = meta.write_volume("vol0", 0, &v).unwrap() else { panic!() };
    let (current, _) = *conflict;
    assert_eq!(current.generation, 30);
    assert_eq!(meta.write_volume("nothing", 0, &volume("nothing", 5)).unwrap(), MetaWrite::Conflict(None));
    assert_eq!(meta.write_volume("nothing", 7, &volume("nothing", 5)).unwrap(), MetaWrite::Conflict(None));
    // A document of another volume is never written under this name.
    assert!(matches!(meta.write_volume("vol0", rev, &volume("other", 1)), Err(MetaError::Malformed { .. })));
    assert_eq!(revision(&meta), before);
}

#[test]
fn an_unanswered_write_is_unavailable_and_a_re_read_tells_what_happened() {
    let f = etcd_server("frozen");
    let meta = EtcdMeta::new(connect(&f.server.endpoint(), Duration::from_millis(700)));
    let v = volume("vol0", 1);
    let rev = created(meta.create_volume(&v).unwrap());
    f.server.freeze().unwrap();
    let started = Instant::now();
    let write = meta.write_volume("vol0", rev, &VolumeMeta { epoch: 2, ..v.clone() });
    assert!(matches!(write, Err(MetaError::Unavailable(_))), "{write:?}");
    let text = backend::control::chain(&write.unwrap_err());
    assert!(text.contains("outcome unknown"), "{text}");
    assert!(matches!(meta.read_volume("vol0"), Err(MetaError::Unavailable(_))));
    assert!(matches!(meta.read_volume_by_id(1), Err(MetaError::Unavailable(_))));
    assert!(matches!(meta.list_nodes(), Err(MetaError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    f.server.resume().unwrap();
    // It may or may not have landed (the client gave up on it; etcd may still apply it): the
    // re-read decides, and a retry of the same compare-and-swap agrees with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (doc, now_rev) = loop {
        match meta.read_volume("vol0") {
            Ok(Some(found)) => break found,
            other => assert!(Instant::now() < deadline, "etcd never answered again: {other:?}"),
        }
        thread::sleep(Duration::from_millis(50));
    };
    let retry = meta.write_volume("vol0", rev, &VolumeMeta { epoch: 2, ..v.clone() }).unwrap();
    if doc.epoch == 2 {
        assert_eq!(retry, MetaWrite::Conflict(Some(Box::new((doc, now_rev)))), "landed: the retry conflicts");
    } else {
        assert_eq!((doc.epoch, now_rev), (1, rev), "not landed: nothing changed");
        committed(retry);
    }
}

#[test]
fn nodes_are_listed_from_their_registrations_and_foreign_data_is_named() {
    let f = etcd_server("nodes");
    let meta = meta_of(&f);
    assert_eq!(meta.list_nodes().unwrap(), []);
    let config = RegistrationConfig { ttl: TTL };
    let regs: Vec<NodeRegistration> = ["n2", "n1"]
        .iter()
        .map(|n| {
            NodeRegistration::start(meta.etcd(), n, serde_json::to_vec(&node(n)).unwrap(), config.clone()).unwrap()
        })
        .collect();
    assert_eq!(meta.list_nodes().unwrap(), [node("n1"), node("n2")]);
    let (info, lease) = meta.read_node("n1").unwrap().unwrap();
    assert_eq!((info, lease), (node("n1"), regs[1].lease()));
    assert_eq!(meta.read_node("n9").unwrap(), None);
    drop(regs);
    assert_eq!(meta.list_nodes().unwrap(), []);

    // A key under nodes/ that no daemon wrote: the listing names it instead of guessing.
    meta.etcd().compare_and_swap(&keys::node("bad").unwrap(), 0, b"{\"name\":\"bad\"}", &[]).unwrap();
    let err = meta.list_nodes().unwrap_err();
    assert!(matches!(&err, MetaError::Malformed { key, .. } if key == "nodes/bad"), "{err:?}");
    // So does a volume document that does not validate.
    meta.etcd().compare_and_swap(&keys::volume("junk").unwrap(), 0, b"{}", &[]).unwrap();
    assert!(matches!(meta.read_volume("junk"), Err(MetaError::Malformed { .. })));
    assert!(matches!(meta.list_volumes(), Err(MetaError::Malformed { .. })));
}

#[test]
fn status_keys_hang_on_the_publishers_lease() {
    let f = etcd_server("status");
    let meta = meta_of(&f);
    let config = RegistrationConfig { ttl: TTL };
    let n1 =
        NodeRegistration::start(meta.etcd(), "n1", serde_json::to_vec(&node("n1")).unwrap(), config.clone()).unwrap();
    let n2 = NodeRegistration::start(meta.etcd(), "n2", serde_json::to_vec(&node("n2")).unwrap(), config).unwrap();
    let status = |node: &str, done| PublishedStatus {
        node: node.into(),
        phase: "serving".into(),
        generation: 3,
        epoch: 4,
        region_bytes: 1 << 20,
        updated_unix_s: 9,
        syncs: vec![PublishedSync {
            node: "n3".into(),
            extent: 1,
            rebuild: false,
            regions_done: done,
            regions_total: 10,
            bytes_done: u64::from(done) << 20,
            rate_bytes_per_s: Some(1 << 20),
        }],
        ..PublishedStatus::default()
    };
    meta.put_status("vol0", &status("n1", 1), n1.lease().unwrap()).unwrap();
    meta.put_status("vol0", &status("n1", 2), n1.lease().unwrap()).unwrap();
    meta.put_status("vol1", &status("n2", 5), n2.lease().unwrap()).unwrap();
    assert_eq!(meta.read_status("vol0").unwrap(), Some(status("n1", 2)));
    let all = meta.list_statuses().unwrap();
    assert_eq!(all.keys().collect::<Vec<_>>(), ["vol0", "vol1"]);
    // A new owner takes the key over under its own lease.
    meta.put_status("vol0", &status("n2", 3), n2.lease().unwrap()).unwrap();
    assert_eq!(meta.etcd().get("status/vol0").unwrap().unwrap().lease, n2.lease());
    // The old owner's removal leaves the new owner's status alone.
    meta.remove_status("vol0", n1.lease()).unwrap();
    assert_eq!(meta.read_status("vol0").unwrap(), Some(status("n2", 3)));
    // A malformed status is left out of the listing (logged), and named when read.
    meta.etcd().compare_and_swap("status/junk", 0, b"{", &[]).unwrap();
    assert_eq!(meta.list_statuses().unwrap().len(), 2);
    assert!(matches!(meta.read_status("junk"), Err(MetaError::Malformed { .. })));
    // The publisher's lease goes: so do its statuses.
    drop(n2);
    assert_eq!(meta.read_status("vol0").unwrap(), None);
    assert_eq!(meta.read_status("vol1").unwrap(), None);
    // A put under a lease that is gone is refused, not written without it.
    let gone = n1.lease().unwrap();
    drop(n1);
    assert!(matches!(meta.put_status("vol0", &status("n1", 1), gone), Err(MetaError::Unavailable(_))));
    assert_eq!(meta.read_status("vol0").unwrap(), None);
}

#[test]
fn the_cluster_id_is_created_once() {
    let f = etcd_server("cluster-id");
    let meta = meta_of(&f);
    assert_eq!(meta.cluster_id(1234, 5).unwrap(), 1234);
    let before = revision(&meta);
    assert_eq!(meta.cluster_id(9999, 6).unwrap(), 1234, "the stored id wins");
    assert_eq!(revision(&meta), before);
    assert!(meta.cluster_id(0, 6).is_err());
    let doc: serde_json::Value = serde_json::from_slice(&meta.etcd().get("cluster").unwrap().unwrap().value).unwrap();
    assert_eq!(doc, serde_json::json!({"cluster_id": 1234, "created_unix_s": 5}));
}

#[test]
fn the_lease_clock_is_conservative_and_stops_when_the_lease_may_be_gone() {
    let f = etcd_server("lease-clock");
    let proxy = TcpProxy::start(f.server.client_addr()).unwrap();
    let etcd = connect(&proxy.endpoint(), Duration::from_millis(500));
    let before = Instant::now();
    let reg =
        NodeRegistration::start(&etcd, "n1", serde_json::to_vec(&node("n1")).unwrap(), RegistrationConfig { ttl: TTL })
            .unwrap();
    let until = reg.valid_until().expect("registered");
    assert!(until > Instant::now() && until <= Instant::now() + TTL, "{:?} from now", until - Instant::now());
    assert!(until >= before + TTL, "etcd grants at least the TTL asked for, from no earlier than the send");
    // Renewals move it forward.
    thread::sleep(TTL);
    let renewed = reg.valid_until().expect("still registered");
    assert!(renewed > until, "{renewed:?} <= {until:?}");

    // Cut off from etcd: it stops advancing, and turns None once the lease may have expired.
    proxy.partition();
    let cut = Instant::now();
    let last = reg.valid_until().expect("not noticed yet");
    let deadline = cut + TTL * 3;
    loop {
        match reg.valid_until() {
            None => break,
            Some(t) => {
                assert!(t <= last + TTL / 2, "advanced while cut off: {t:?} vs {last:?}");
                assert!(Instant::now() < deadline, "never turned None");
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(last <= Instant::now(), "None only once the last deadline has passed (or the key went)");
    proxy.heal();
    let deadline = Instant::now() + TTL * 5;
    while reg.valid_until().is_none() {
        assert!(Instant::now() < deadline, "never registered again");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(reg.valid_until().unwrap() > Instant::now());
    // Operator decisions ride with the volume document in one transaction (accept-risk).
    let meta = EtcdMeta::new(etcd);
    let v = volume("vol0", 1);
    let rev = created(meta.create_volume(&v).unwrap());
    let audit = keys::audit("vol0", "2026-01-01T00:00:00.000000001Z").unwrap();
    committed(
        meta.write_volume_with("vol0", rev, &VolumeMeta { epoch: 5, ..v.clone() }, &[Op::put(audit.clone(), "x")])
            .unwrap(),
    );
    assert_eq!(meta.etcd().get(&audit).unwrap().unwrap().value, b"x");
    let audit2 = keys::audit("vol0", "2026-01-01T00:00:00.000000002Z").unwrap();
    let stale = meta.write_volume_with("vol0", rev, &v, &[Op::put(audit2.clone(), "y")]).unwrap();
    assert!(matches!(stale, MetaWrite::Conflict(Some(_))));
    assert_eq!(meta.etcd().get(&audit2).unwrap(), None, "a refused write carries nothing with it");
}
