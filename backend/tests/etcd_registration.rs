//! Node registration under a lease against a real etcd: the key follows the daemon's life,
//! a lost lease (cut off from etcd for longer than the TTL, revoked, etcd restarted) is noticed
//! and replaced, and a node name is never registered twice.

use std::thread;
use std::time::{Duration, Instant};

use backend::cluster::{keys, CasOutcome, Etcd, EtcdConfig, NodeRegistration, RegistrationConfig, RegistrationError};
use hcblk_tests::etcd::{EtcdServer, TcpProxy};

/// Short enough for fast tests, long enough for etcd's minimum TTL under the launcher's
/// election timeout.
const TTL: Duration = Duration::from_secs(2);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

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

fn connect(endpoint: &str) -> Etcd {
    let mut c = EtcdConfig::new(vec![endpoint.to_owned()]);
    c.dial_timeout = Duration::from_secs(1);
    c.request_timeout = Duration::from_secs(1);
    Etcd::connect(c).expect("connect")
}

fn config() -> RegistrationConfig {
    RegistrationConfig { ttl: TTL }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn node_value(etcd: &Etcd, name: &str) -> Option<Vec<u8>> {
    etcd.get(&keys::node(name).unwrap()).unwrap().map(|kv| kv.value)
}

#[test]
fn registration_holds_the_key_under_a_lease_updates_it_and_revokes_on_drop() {
    let f = etcd_server("reg-basic");
    let etcd = connect(&f.server.endpoint());
    let reg = NodeRegistration::start(&etcd, "n1", b"free=10".to_vec(), config()).unwrap();
    assert!(reg.is_registered());
    let kv = etcd.get("nodes/n1").unwrap().unwrap();
    assert_eq!(kv.value, b"free=10");
    assert_eq!(kv.lease, reg.lease());
    let lease = kv.lease.unwrap();

    reg.update(b"free=9".to_vec());
    wait_for("updated value", Duration::from_secs(2), || node_value(&etcd, "n1").as_deref() == Some(b"free=9"));
    assert_eq!(etcd.get("nodes/n1").unwrap().unwrap().lease, Some(lease), "update keeps the lease");

    // Updates every 5 ms (each slower than a write to a local etcd): the latest value lands,
    // the ones in between are skipped, so etcd sees one write per 100 ms at most, not one per
    // call.
    let version_before = etcd.get("nodes/n1").unwrap().unwrap().version;
    let started = Instant::now();
    for i in 0..100 {
        reg.update(format!("free={i}").into_bytes());
        thread::sleep(Duration::from_millis(5));
    }
    wait_for("last value of the burst", Duration::from_secs(2), || {
        node_value(&etcd, "n1").as_deref() == Some(b"free=99")
    });
    let writes = etcd.get("nodes/n1").unwrap().unwrap().version - version_before;
    let bound = started.elapsed().as_millis() / 100 + 2;
    assert!(u128::from(writes) <= bound, "{writes} writes for 100 updates (bound {bound})");

    // Kept alive well past the TTL.
    thread::sleep(TTL * 2);
    assert!(reg.is_registered());
    assert_eq!(node_value(&etcd, "n1").as_deref(), Some(&b"free=99"[..]));

    // A clean stop removes the node at once, not one TTL later.
    let started = Instant::now();
    drop(reg);
    assert!(started.elapsed() < Duration::from_secs(1), "drop took {:?}", started.elapsed());
    assert_eq!(node_value(&etcd, "n1"), None);
    assert_eq!(etcd.lease_time_to_live(lease).unwrap(), None);
}

#[test]
fn a_second_registration_of_a_name_is_refused() {
    let f = etcd_server("reg-twice");
    let etcd = connect(&f.server.endpoint());
    let first = NodeRegistration::start(&etcd, "n1", b"a".to_vec(), config()).unwrap();
    let other = connect(&f.server.endpoint());
    let e = NodeRegistration::start(&other, "n1", b"b".to_vec(), config()).unwrap_err();
    let RegistrationError::NameInUse { name, lease, ttl_left } = &e else { panic!("{e:?}") };
    assert_eq!((name.as_str(), Some(*lease)), ("n1", first.lease()));
    assert!(ttl_left.is_some_and(|t| t <= TTL), "{ttl_left:?}");
    let msg = e.to_string();
    assert!(msg.contains("\"n1\"") && msg.contains("another live daemon"), "{msg}");
    // The refused daemon left nothing behind: the first one's value and lease are intact.
    let kv = etcd.get("nodes/n1").unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.lease), (&b"a"[..], first.lease()));
    assert!(first.is_registered());

    // A different name is fine; a key written by hand (no lease) is refused with its own error.
    let n2 = NodeRegistration::start(&other, "n2", b"b".to_vec(), config()).unwrap();
    assert!(n2.is_registered());
    etcd.create_all(&[("nodes/n3", b"manual")]).unwrap();
    let e = NodeRegistration::start(&other, "n3", b"c".to_vec(), config()).unwrap_err();
    assert!(matches!(e, RegistrationError::KeyWithoutLease { .. }), "{e:?}");

    // Once the first stops, the name is free.
    drop(first);
    let again = NodeRegistration::start(&other, "n1", b"b".to_vec(), config()).unwrap();
    assert!(again.is_registered());
    assert!(matches!(
        NodeRegistration::start(&other, "n1", b"x".to_vec(), RegistrationConfig { ttl: Duration::from_millis(1500) }),
        Err(RegistrationError::Invalid(_))
    ));
}

#[test]
fn cut_off_longer_than_the_ttl_the_node_key_expires_and_registration_recovers() {
    let f = etcd_server("reg-cut");
    let proxy = TcpProxy::start(f.server.client_addr()).unwrap();
    // The registration reaches etcd only through the proxy; the observer directly.
    let through_proxy = connect(&proxy.endpoint());
    let observer = connect(&f.server.endpoint());
    let reg = NodeRegistration::start(&through_proxy, "n1", b"v1".to_vec(), config()).unwrap();
    let old_lease = reg.lease().unwrap();

    proxy.partition();
    // etcd, alive, expires the lease one TTL after the last renewal and deletes the key.
    let gone = wait_for("node key expired", TTL * 3, || node_value(&observer, "n1").is_none());
    assert!(gone >= TTL / 3, "the key went away too early ({gone:?}): it must outlive a short cut");
    // The daemon noticed on its own, without hearing from etcd.
    wait_for("registration reported lost", TTL * 2, || !reg.is_registered());
    // A value changed meanwhile is written with the next registration.
    reg.update(b"v2".to_vec());

    proxy.heal();
    wait_for("registered again", Duration::from_secs(5), || reg.is_registered());
    let kv = observer.get("nodes/n1").unwrap().expect("node key back");
    assert_eq!(kv.value, b"v2");
    let new_lease = kv.lease.unwrap();
    assert_ne!(new_lease, old_lease, "the expired lease is replaced by a new one");
    assert_eq!(reg.lease(), Some(new_lease));
    assert_eq!(observer.lease_time_to_live(old_lease).unwrap(), None);

    // And it is kept alive again.
    thread::sleep(TTL * 2);
    assert!(reg.is_registered());
    assert!(node_value(&observer, "n1").is_some());
}

#[test]
fn a_revoked_lease_or_a_deleted_key_is_replaced_at_the_next_renewal() {
    let f = etcd_server("reg-revoked");
    let etcd = connect(&f.server.endpoint());
    let reg = NodeRegistration::start(&etcd, "n1", b"v1".to_vec(), config()).unwrap();
    let first = reg.lease().unwrap();

    // As if the lease had expired on the server.
    etcd.lease_revoke(first).unwrap();
    assert_eq!(node_value(&etcd, "n1"), None);
    wait_for("new lease", Duration::from_secs(3), || reg.lease().is_some_and(|l| l != first) && reg.is_registered());
    let kv = etcd.get("nodes/n1").unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.lease), (&b"v1"[..], reg.lease()));

    // An operator deletes the key; the lease is still alive: the key comes back under it.
    let lease = reg.lease().unwrap();
    let rev = kv.mod_revision;
    assert!(matches!(etcd.compare_and_delete("nodes/n1", rev, &[]).unwrap(), CasOutcome::Committed { .. }));
    // The renewal thread writes the key back, then records that it is registered again.
    wait_for("key restored", Duration::from_secs(3), || {
        etcd.get("nodes/n1").unwrap().is_some_and(|kv| kv.lease == Some(lease)) && reg.is_registered()
    });
}

#[test]
fn registration_survives_an_etcd_restart() {
    let mut f = etcd_server("reg-restart");
    let etcd = connect(&f.server.endpoint());
    let reg = NodeRegistration::start(&etcd, "n1", b"v1".to_vec(), config()).unwrap();
    f.server.kill().unwrap();
    // Down for longer than the TTL: the daemon must assume its lease is gone.
    wait_for("registration reported lost", TTL * 2, || !reg.is_registered());
    f.server.restart().unwrap();
    // etcd renews every lease when a leader takes over, so the old lease may live on; either
    // way the node is registered again, under a live lease, with its value.
    wait_for("registered again", Duration::from_secs(6), || reg.is_registered());
    let kv = etcd.get("nodes/n1").unwrap().expect("node key");
    assert_eq!((kv.value.as_slice(), kv.lease), (&b"v1"[..], reg.lease()));
    assert!(etcd.lease_time_to_live(kv.lease.unwrap()).unwrap().is_some());
}
