//! The replication drivers end to end in one process: three replica services on loopback
//! (each with its own data dir), volume metadata in the in-memory store, a replicated volume
//! attached on n1 and exported over vhost-user, and libblkio as the guest. Data written
//! through the guest must be read back intact and be byte-identical on every in-sync replica,
//! including after a replica node stops and comes back (resync).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::cluster::{MemoryMeta, MetaStore};
use backend::member::{MemberConfig, Members};
use backend::replicated::{AttachConfig, ReplicatedVolume};
use backend::PollMode;
use common::{Client, Volume as Fixture};
use replication::owner::OwnerConfig;
use replication::{node_id, ExtentMeta, Locality, Member, MemberState, NodeInfo, VolumeMeta};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const EXTENT: u64 = 16 * MIB;

struct Node {
    name: String,
    dir: tempfile::TempDir,
    members: Option<Arc<Members>>,
    port: u16,
}

fn transport(name: &str) -> proto::Config {
    proto::Config::new(7, node_id(name), proto::auth::Secret::new(b"replicated-test-cluster-secret".to_vec()).unwrap())
}

fn start_member(node: &mut Node, meta: &Arc<MemoryMeta>) {
    let listen = format!("127.0.0.1:{}", node.port).parse().unwrap();
    let members = Members::start(MemberConfig {
        node: node.name.clone(),
        data_dir: node.dir.path().to_owned(),
        listen,
        transport: transport(&node.name),
        kind: proto::TransportKind::Tcp,
        meta: Arc::clone(meta) as Arc<dyn MetaStore>,
        staging_bytes: 8 << 20,
        spin: Duration::from_micros(50),
    })
    .expect("start replica service");
    node.port = members.listen_addr().port();
    meta.put_node(NodeInfo {
        name: node.name.clone(),
        id: node_id(&node.name),
        address: members.listen_addr().to_string(),
        zone: None,
        capacity_bytes: 1 << 40,
        free_bytes: 1 << 40,
        version: "test".into(),
        started_unix_s: 0,
    });
    node.members = Some(members);
}

fn volume_meta() -> VolumeMeta {
    let member = |n: &str| Member::new(n, MemberState::InSync);
    VolumeMeta {
        format: replication::meta::META_FORMAT,
        name: "vol".into(),
        id: 0x1234,
        size_bytes: SIZE,
        block_size: 512,
        extent_bytes: EXTENT,
        region_bytes: MIB,
        replicas: 3,
        min_replicas: 2,
        queues: 1,
        serial: "vol".into(),
        read_only: false,
        locality: Locality::Prefer,
        created_unix_s: 0,
        generation: 0,
        owner: None,
        epoch: 1,
        extents: (0..SIZE / EXTENT)
            .map(|_| ExtentMeta { members: vec![member("n1"), member("n2"), member("n3")] })
            .collect(),
        risk_accepted: None,
    }
}

fn replica_file(node: &Node) -> PathBuf {
    node.dir.path().join("replicas").join(format!("{:016x}.img", 0x1234))
}

fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((offset as usize + i) / 512) as u8 ^ seed ^ (i as u8).rotate_left(3)).collect()
}

fn read_file(path: &PathBuf, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset).unwrap();
    buf[n..].fill(0);
    buf
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn attach(node: &Node, meta: &Arc<MemoryMeta>) -> Result<Arc<ReplicatedVolume>, backend::replicated::AttachError> {
    let mut owner = OwnerConfig::new(&node.name, "vol");
    owner.io_timeout = 2_000_000_000;
    owner.probe_interval = 200_000_000;
    owner.meta_poll = 200_000_000;
    owner.nodes_poll = 200_000_000;
    owner.clean_after = 500_000_000;
    // As `volume attach --force`: whoever owns it now is taken over.
    owner.takeover_of = meta.volume("vol").and_then(|m| m.owner);
    ReplicatedVolume::attach(AttachConfig {
        node: node.name.clone(),
        volume: "vol".into(),
        meta: Arc::clone(meta) as Arc<dyn MetaStore>,
        members: Arc::clone(node.members.as_ref().unwrap()),
        transport: transport(&node.name),
        kind: proto::TransportKind::Tcp,
        owner,
        lease: None,
        attach_timeout: Duration::from_secs(20),
    })
}

fn cluster(names: &[&str], meta: &Arc<MemoryMeta>) -> Vec<Node> {
    let mut nodes: Vec<Node> = names
        .iter()
        .map(|n| Node { name: (*n).into(), dir: tempfile::tempdir().unwrap(), members: None, port: 0 })
        .collect();
    for node in &mut nodes {
        start_member(node, meta);
    }
    nodes
}

#[test]
fn replicated_writes_reach_every_replica_and_survive_a_member_restart() {
    common::with_watchdog(Duration::from_secs(180), || {
        let meta = Arc::new(MemoryMeta::new());
        let mut nodes = cluster(&["n1", "n2", "n3"], &meta);
        meta.put_volume(volume_meta());
        let volume = attach(&nodes[0], &meta).expect("attach");
        assert_eq!(meta.volume("vol").unwrap().owner.as_deref(), Some("n1"));
        let fixture = Fixture::new();
        let export = fixture.export(Arc::clone(&volume), 1, PollMode::Adaptive);
        let mut client = Client::connect(&fixture.socket, 1, 8 << 20);
        assert_eq!(client.capacity(), SIZE);

        // Writes small (inline) and large (pulled), one across an extent boundary.
        let writes: [(u64, usize, u8); 5] = [
            (0, 4096, 1),
            (MIB + 512, 512, 2),
            (EXTENT - 8192, 64 << 10, 3),
            (3 * MIB, 1 << 20, 4),
            (SIZE - 4096, 4096, 5),
        ];
        for &(offset, len, seed) in &writes {
            client.buf()[..len].copy_from_slice(&pattern(offset, len, seed));
            assert_eq!(client.write(0, offset, 0, len), 0, "write at {offset}");
        }
        for &(offset, len, seed) in &writes {
            client.buf()[..len].fill(0);
            assert_eq!(client.read(0, offset, 0, len), 0, "read at {offset}");
            assert!(client.buf()[..len] == pattern(offset, len, seed)[..], "data read back at {offset}");
            for node in &nodes {
                assert!(
                    read_file(&replica_file(node), offset, len) == pattern(offset, len, seed),
                    "replica {} at {offset}",
                    node.name
                );
            }
        }

        // n3 stops: writes go on (n3 is removed from the in-sync sets), then n3 comes back
        // with a new incarnation and is resynced.
        nodes[2].members.take().unwrap().stop();
        let during: [(u64, usize, u8); 2] = [(2 * MIB, 8192, 6), (EXTENT + 4 * MIB, 128 << 10, 7)];
        for &(offset, len, seed) in &during {
            client.buf()[..len].copy_from_slice(&pattern(offset, len, seed));
            assert_eq!(client.write(0, offset, 0, len), 0, "write at {offset} with n3 down");
        }
        let doc = meta.volume("vol").unwrap();
        assert!(doc.extents.iter().all(|e| !e.is_in_sync("n3")), "n3 removed from the in-sync sets: {:?}", doc.extents);
        start_member(&mut nodes[2], &meta);
        wait_until("n3 is in sync again", Duration::from_secs(60), || {
            meta.volume("vol").unwrap().extents.iter().all(|e| e.is_in_sync("n3"))
        });
        for &(offset, len, seed) in writes.iter().chain(&during) {
            for node in &nodes {
                assert!(
                    read_file(&replica_file(node), offset, len) == pattern(offset, len, seed),
                    "replica {} at {offset} after resync",
                    node.name
                );
            }
        }
        drop(client);
        export.stop();
        volume.detach(Duration::from_secs(10)).expect("detach");
        assert_eq!(meta.volume("vol").unwrap().owner, None);
    });
}

/// The VM moves to a node that holds no replica while its old owner still runs: the old
/// owner is fenced (its guest gets errors, never stale data), the new one reads what the old
/// one acknowledged from remote members and its writes reach every replica.
#[test]
fn a_new_owner_fences_the_old_one_and_reads_remote_replicas() {
    common::with_watchdog(Duration::from_secs(180), || {
        let meta = Arc::new(MemoryMeta::new());
        let nodes = cluster(&["n1", "n2", "n3", "n4"], &meta);
        meta.put_volume(volume_meta());

        let old = attach(&nodes[0], &meta).expect("attach on n1");
        let fixture1 = Fixture::new();
        let export1 = fixture1.export(Arc::clone(&old), 1, PollMode::Adaptive);
        let mut guest1 = Client::connect(&fixture1.socket, 1, 1 << 20);
        let (a_off, a_len) = (5 * MIB, 256 << 10);
        guest1.buf()[..a_len].copy_from_slice(&pattern(a_off, a_len, 0xa1));
        assert_eq!(guest1.write(0, a_off, 0, a_len), 0, "write on n1");

        // n4 takes the volume over (a VM restarted there; its owner does not wait for n1).
        let new = attach(&nodes[3], &meta).expect("attach on n4");
        assert_eq!(meta.volume("vol").unwrap().owner.as_deref(), Some("n4"));
        assert!(meta.volume("vol").unwrap().extents.iter().all(|e| e.member("n4").is_none()), "n4 holds no replica");

        // The old owner learns it lost the volume on its first write to any member.
        guest1.buf()[..4096].copy_from_slice(&pattern(0, 4096, 0xee));
        assert_ne!(guest1.write(0, 0, 0, 4096), 0, "a fenced owner's write must fail");
        wait_until("n1 is fenced", Duration::from_secs(10), || old.status().phase.starts_with("fenced"));
        assert_ne!(guest1.read(0, a_off, 0, 4096), 0, "a fenced owner serves no reads");

        let fixture4 = Fixture::new();
        let export4 = fixture4.export(Arc::clone(&new), 1, PollMode::Adaptive);
        let mut guest4 = Client::connect(&fixture4.socket, 1, 1 << 20);
        guest4.buf()[..a_len].fill(0);
        assert_eq!(guest4.read(0, a_off, 0, a_len), 0, "remote read on n4");
        assert!(guest4.buf()[..a_len] == pattern(a_off, a_len, 0xa1)[..], "n4 reads what n1 acknowledged");
        guest4.buf()[..4096].fill(0xff);
        assert_eq!(guest4.read(0, 0, 0, 4096), 0);
        assert!(guest4.buf()[..4096].iter().all(|&b| b == 0), "the fenced write reached no replica");

        let (b_off, b_len) = (EXTENT * 2 + 12288, 128 << 10);
        guest4.buf()[..b_len].copy_from_slice(&pattern(b_off, b_len, 0xb4));
        assert_eq!(guest4.write(0, b_off, 0, b_len), 0, "write on n4");
        for node in &nodes[..3] {
            assert!(
                read_file(&replica_file(node), b_off, b_len) == pattern(b_off, b_len, 0xb4),
                "replica {} has n4's write",
                node.name
            );
            assert!(
                read_file(&replica_file(node), 0, 4096).iter().all(|&b| b == 0),
                "replica {} never saw the fenced write",
                node.name
            );
        }
        assert!(!replica_file(&nodes[3]).exists(), "n4 keeps no data of a volume it holds no replica of");

        drop(guest1);
        export1.stop();
        assert!(
            old.detach(Duration::from_secs(5)).is_err() || meta.volume("vol").unwrap().owner.as_deref() == Some("n4"),
            "a fenced owner cannot release n4's claim"
        );
        assert_eq!(meta.volume("vol").unwrap().owner.as_deref(), Some("n4"));
        drop(guest4);
        export4.stop();
        new.detach(Duration::from_secs(10)).expect("detach n4");
        assert_eq!(meta.volume("vol").unwrap().owner, None);
    });
}
