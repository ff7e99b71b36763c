//! The cluster control plane against a real etcd: a daemon's cluster volume manager served on
//! an API socket in this process, driven by the `hcblk` CLI as a process exactly as an
//! operator would; attaching goes through a fake of the replicated volume (it claims and
//! releases the volume in etcd like the real one, and binds the socket), since the data path
//! needs the replicas' nodes. Every operator mistake must be one `error:` line, exit status 1,
//! and leave etcd's revision where it was.
//!
//! The daemon itself in cluster mode is run as a process for its start-up refusals (before the
//! replica service starts).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use backend::cluster::{keys, Etcd, EtcdConfig, EtcdMeta, MetaStore, MetaWrite, NodeRegistration, RegistrationConfig};
use backend::control::api::VolumeInfo;
use backend::control::attach::{AttachedVolume, Attacher, OwnerStatus};
use backend::control::cluster::{ClusterConfig, ClusterVolumes};
use backend::control::daemon::{self, Inbox, Stopper};
use backend::control::Error;
use backend::{ExportConfig, PollConfig};
use hcblk_tests::cluster_fixture::output_within;
use hcblk_tests::etcd::EtcdServer;
use replication::owner::SyncProgress;
use replication::{MemberState, NodeInfo, VolumeMeta};

const HCBLK: &str = env!("CARGO_BIN_EXE_hcblk");
const GIB: u64 = 1 << 30;
const TTL: Duration = Duration::from_secs(2);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---- a fake of the replicated volume ----------------------------------------------------------

/// What the test sees of, and injects into, the fake volumes.
#[derive(Default)]
struct FakeState {
    fail_attach: AtomicBool,
    connected: AtomicBool,
    /// Every `resize` of an export: (volume, size).
    resized: Mutex<Vec<(String, u64)>>,
    /// What every attached volume reports as its syncs in progress.
    syncs: Mutex<Vec<SyncProgress>>,
    /// Every export started: (volume, cpus of its poll config).
    exports: Mutex<Vec<(String, Vec<usize>)>>,
}

/// Claims (generation + 1, owner = node) and releases the volume by compare-and-swap, like the
/// replicated volume's owner does; binds the socket like an export.
struct FakeAttacher {
    node: String,
    meta: EtcdMeta,
    state: Arc<FakeState>,
}

struct FakeHandle {
    name: String,
    node: String,
    meta: EtcdMeta,
    generation: u64,
    socket: PathBuf,
    _listener: UnixListener,
    state: Arc<FakeState>,
}

impl Attacher for FakeAttacher {
    type Handle = FakeHandle;

    fn attach(&self, name: &str, export: ExportConfig, _takeover_of: Option<&str>) -> Result<FakeHandle, Error> {
        if self.state.fail_attach.load(Ordering::Relaxed) {
            return Err(Error::Attach { name: name.into(), source: "injected attach failure".into() });
        }
        let generation = loop {
            let (doc, revision) = self.meta.read_volume(name)?.ok_or_else(|| Error::NoSuchVolume(name.into()))?;
            let claimed = VolumeMeta { generation: doc.generation + 1, owner: Some(self.node.clone()), ..doc };
            if let MetaWrite::Committed { .. } = self.meta.write_volume(name, revision, &claimed)? {
                break claimed.generation;
            }
        };
        let listener = UnixListener::bind(&export.socket_path).map_err(|source| Error::Export {
            name: name.into(),
            source: backend::Error::Listen { path: export.socket_path.clone(), source },
        })?;
        self.state.exports.lock().unwrap().push((name.into(), export.poll.cpus.clone()));
        Ok(FakeHandle {
            name: name.into(),
            node: self.node.clone(),
            meta: self.meta.clone(),
            generation,
            socket: export.socket_path,
            _listener: listener,
            state: Arc::clone(&self.state),
        })
    }
}

impl AttachedVolume for FakeHandle {
    fn resize(&self, new_size_bytes: u64) -> Result<(), backend::Error> {
        self.state.resized.lock().unwrap().push((self.name.clone(), new_size_bytes));
        Ok(())
    }
    fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::Relaxed)
    }
    fn rejected_requests(&self) -> u64 {
        // No guest ever reaches a fake handle.
        0
    }
    fn status(&self) -> OwnerStatus {
        let doc = self.meta.read_volume(&self.name).ok().flatten().map(|(m, _)| m);
        let phase = match &doc {
            None => "fenced: the volume no longer exists in etcd".to_owned(),
            Some(m) if m.owner.as_deref() != Some(self.node.as_str()) || m.generation != self.generation => {
                format!("fenced: now owned by {:?}", m.owner)
            }
            Some(_) => "serving".to_owned(),
        };
        OwnerStatus {
            phase,
            generation: self.generation,
            epoch: doc.as_ref().map_or(0, |m| m.epoch),
            size_bytes: doc.as_ref().map(|m| m.size_bytes),
            region_bytes: doc.as_ref().map_or(0, |m| m.region_bytes),
            suspended_extents: Vec::new(),
            unreconciled_regions: 0,
            syncs: self.state.syncs.lock().unwrap().clone(),
        }
    }
    fn detach(self) -> Result<(), Error> {
        let _ = std::fs::remove_file(&self.socket);
        loop {
            let Some((doc, revision)) = self.meta.read_volume(&self.name)? else { return Ok(()) };
            if doc.owner.as_deref() != Some(self.node.as_str()) || doc.generation != self.generation {
                return Ok(()); // taken over: nothing to release
            }
            if let MetaWrite::Committed { .. } =
                self.meta.write_volume(&self.name, revision, &VolumeMeta { owner: None, ..doc })?
            {
                return Ok(());
            }
        }
    }
    fn stop(self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

type Manager = ClusterVolumes<FakeAttacher>;

// ---- the cluster: etcd, registered nodes, daemons ----------------------------------------------

struct Cluster {
    regs: BTreeMap<String, Arc<NodeRegistration>>,
    meta: EtcdMeta,
    server: EtcdServer,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new(name: &str) -> Self {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let server = EtcdServer::start_loopback(name, &dir.path().join("etcd")).expect("start etcd");
        let mut config = EtcdConfig::new(vec![server.endpoint()]);
        config.dial_timeout = Duration::from_secs(1);
        let meta = EtcdMeta::new(Etcd::connect(config).expect("connect"));
        Self { regs: BTreeMap::new(), meta, server, dir }
    }

    /// Registers `name` as a running daemon would (capacity 100 GiB, all free).
    fn register(&mut self, name: &str, zone: Option<&str>) {
        let info = NodeInfo {
            name: name.into(),
            id: replication::node_id(name),
            address: format!("127.0.0.1:{}", 7400 + self.regs.len()),
            zone: zone.map(Into::into),
            capacity_bytes: 100 * GIB,
            free_bytes: 100 * GIB,
            version: "test".into(),
            started_unix_s: 1,
        };
        let reg = NodeRegistration::start(
            self.meta.etcd(),
            name,
            serde_json::to_vec(&info).unwrap(),
            RegistrationConfig { ttl: TTL },
        )
        .expect("register");
        self.regs.insert(name.into(), Arc::new(reg));
    }

    /// Revokes `name`'s registration: the node is down.
    fn take_down(&mut self, name: &str) {
        let reg = self.regs.remove(name).expect("registered");
        Arc::try_unwrap(reg).map_err(|_| "still shared").unwrap().deregister().unwrap();
    }

    fn manager(&self, node: &str, state: &Arc<FakeState>) -> Manager {
        let socket_dir = self.dir.path().join(node).join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        let config = ClusterConfig {
            node: node.into(),
            socket_dir,
            poll: PollConfig { cpus: vec![0, 1], ..PollConfig::default() },
        };
        let attacher = FakeAttacher { node: node.into(), meta: self.meta.clone(), state: Arc::clone(state) };
        ClusterVolumes::new(config, self.meta.clone(), attacher, Arc::clone(&self.regs[node]))
    }

    /// A daemon's control plane for `node`, serving the API on a socket of its own.
    fn serve(&self, node: &str, state: &Arc<FakeState>) -> ApiDaemon {
        ApiDaemon::start(self.manager(node, state), &self.dir.path().join(node).join("api.sock"))
    }

    fn revision(&self) -> u64 {
        self.meta.etcd().list("").unwrap().1
    }

    fn doc(&self, name: &str) -> VolumeMeta {
        self.meta.read_volume(name).unwrap().expect("volume exists").0
    }

    /// Changes a volume's document as its owner would (membership), by compare-and-swap.
    fn edit(&self, name: &str, f: impl Fn(&mut VolumeMeta)) {
        loop {
            let (mut doc, revision) = self.meta.read_volume(name).unwrap().unwrap();
            f(&mut doc);
            if let MetaWrite::Committed { .. } = self.meta.write_volume(name, revision, &doc).unwrap() {
                return;
            }
        }
    }
}

struct ApiDaemon {
    api: PathBuf,
    stopper: Stopper,
    thread: Option<JoinHandle<Manager>>,
}

impl ApiDaemon {
    fn start(manager: Manager, api: &Path) -> Self {
        let listener = daemon::bind_api_socket(api).unwrap();
        let inbox = Inbox::new();
        let stopper = inbox.stopper();
        inbox.accept(listener).unwrap();
        let thread = thread::spawn(move || {
            let mut manager = manager;
            daemon::serve(&mut manager, &inbox);
            manager
        });
        Self { api: api.to_owned(), stopper, thread: Some(thread) }
    }

    /// Stops serving and hands the manager back (its exports still running).
    fn stop(mut self) -> Manager {
        self.stopper.stop();
        self.thread.take().unwrap().join().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(HCBLK);
        command.arg("--api-socket").arg(&self.api).args(args).env("USER", "tester");
        output_within(command, Duration::from_secs(60), "hcblk").expect("run hcblk")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "hcblk {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn info(&self, name: &str) -> BTreeMap<String, String> {
        self.ok(&["volume", "info", name])
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap_or_else(|| panic!("not `key: value`: {l:?}"));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn json(&self, name: &str) -> VolumeInfo {
        serde_json::from_str(&self.ok(&["volume", "info", name, "--json"])).unwrap()
    }
}

impl Drop for ApiDaemon {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stopper.stop();
            if let Ok(mut manager) = thread.join() {
                manager.shutdown();
            }
        }
    }
}

/// Exit status 1, one `error:` line, nothing on stdout; returns the line.
fn refused(out: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what} should exit 1; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one error line, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{what}: {stderr:?}");
    assert!(out.stdout.is_empty(), "{what} printed on stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    lines[0].to_owned()
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn three_zones(name: &str) -> Cluster {
    let mut c = Cluster::new(name);
    c.register("n1", Some("a"));
    c.register("n2", Some("b"));
    c.register("n3", Some("c"));
    c
}

// ---- tests -------------------------------------------------------------------------------------

#[test]
fn create_places_extents_and_every_node_describes_the_volume() {
    let mut c = three_zones("create");
    c.register("n4", Some("c"));
    let state = Arc::new(FakeState::default());
    let n1 = c.serve("n1", &state);

    let out = n1.ok(&["volume", "create", "v1", "--size", "3G"]);
    assert_eq!(out, "volume v1 created\nextents: 3 x 1G, replicas 3 (min 2)\n");
    let doc = c.doc("v1");
    assert_eq!((doc.size_bytes, doc.extent_bytes, doc.region_bytes), (3 * GIB, GIB, 1 << 20));
    assert_eq!((doc.replicas, doc.min_replicas, doc.generation, doc.epoch, doc.owner.as_deref()), (3, 2, 0, 1, None));
    assert_ne!(doc.id, 0);
    assert_eq!(c.meta.etcd().get(&keys::volume_id(doc.id)).unwrap().unwrap().value, b"v1");
    for extent in &doc.extents {
        let nodes: Vec<&str> = extent.members.iter().map(|m| m.node.as_str()).collect();
        assert_eq!(nodes[0], "n1", "locality: the creating node first");
        assert!(extent.members.iter().all(|m| m.state == MemberState::InSync));
        assert!(!(nodes.contains(&"n3") && nodes.contains(&"n4")), "n3 and n4 share zone c: {nodes:?}");
        assert_eq!(nodes.len(), 3);
    }

    let out = n1.ok(&[
        "volume",
        "create",
        "v2",
        "--size",
        "100M",
        "--replicas",
        "1",
        "--extent-size",
        "16M",
        "--locality",
        "none",
    ]);
    assert_eq!(out, "volume v2 created\nextents: 7 x 16M, replicas 1 (min 1)\n");
    let out =
        n1.ok(&["volume", "create", "v3", "--size", "1G", "--replicas", "2", "--block-size", "4096", "--queues", "4"]);
    assert_eq!(out, "volume v3 created\nextents: 1 x 1G, replicas 2 (min 2)\n");
    let out = n1.ok(&["volume", "create", "v5", "--size", "1G", "--min-replicas", "1"]);
    assert_eq!(out, "volume v5 created\nextents: 1 x 1G, replicas 3 (min 1)\n");
    // Four zones' worth of replicas in three zones: refused, naming why.
    let out = n1.cli(&["volume", "create", "v6", "--size", "1G", "--replicas", "4"]);
    let line = refused(out, "4 replicas in 3 zones");
    assert!(
        line.contains("4 replicas need 4 nodes in distinct failure domains; the cluster has 3 up (4 nodes)"),
        "{line}"
    );
    assert_eq!(c.doc("v3").block_size, 4096);
    assert_eq!(c.doc("v3").queues, 4);

    // Another node's daemon sees the same volumes.
    let n2 = c.serve("n2", &state);
    for daemon in [&n1, &n2] {
        let list = daemon.ok(&["volume", "list"]);
        let names: Vec<&str> = list.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
        assert_eq!(names, ["v1", "v2", "v3", "v5"], "{list}");
        assert!(list.lines().all(|l| l.contains("detached") && l.ends_with(" -")), "{list}");
        let info = daemon.info("v1");
        for (key, value) in [
            ("size", "3221225472"),
            ("backing", "replicated"),
            ("socket", "-"),
            ("replicas", "3"),
            ("min_replicas", "2"),
            ("extent_size", "1G"),
            ("owner", "-"),
            ("generation", "0"),
            ("epoch", "1"),
            ("state", "detached"),
            ("risk_accepted", "no"),
            ("locality", "prefer"),
        ] {
            assert_eq!(info.get(key).map(String::as_str), Some(value), "{key} in {info:?}");
        }
        for i in 0..3 {
            let line = &info[&format!("extent {i}")];
            assert!(line.starts_with("n1 in_sync, ") && line.matches("in_sync").count() == 3, "{line}");
        }
        let json = daemon.json("v1");
        let cluster = json.cluster.expect("a cluster volume");
        assert_eq!((cluster.id, cluster.extents.len(), json.extent_bytes), (doc.id, 3, GIB));
    }

    let nodes = n2.ok(&["node", "list"]);
    let rows: Vec<Vec<&str>> = nodes.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 4, "{nodes}");
    for (row, (name, zone)) in rows.iter().zip([("n1", "a"), ("n2", "b"), ("n3", "c"), ("n4", "c")]) {
        assert_eq!((row[0], row[2], row[3], row[4], row[5]), (name, zone, "up", "100G", "0"), "{nodes}");
    }
    let json: serde_json::Value = serde_json::from_str(&n2.ok(&["node", "list", "--json"])).unwrap();
    // n1 holds a member of every extent of v1 (3 GiB) and v3 (1 GiB), and v5's.
    let reserved = json[0]["reserved_bytes"].as_u64().unwrap();
    assert!(reserved >= 5 * GIB, "{json}");
    let status = n1.ok(&["cluster", "status"]);
    assert!(status.contains("\nnodes: 4 up, 0 down\n"), "{status}");
    assert!(status.contains("\nvolumes: 0 healthy, 0 degraded, 0 suspended, 4 detached\n"), "{status}");
    assert!(status.contains("\nresyncs: 0 in progress\n"), "{status}");
}

#[test]
fn operator_mistakes_are_one_error_line_and_leave_etcd_unchanged() {
    let c = three_zones("mistakes");
    let state = Arc::new(FakeState::default());
    let n1 = c.serve("n1", &state);
    n1.ok(&["volume", "create", "v", "--size", "3G"]);
    n1.ok(&["volume", "create", "busy", "--size", "1G"]);
    // `busy` is attached on n2, which is up.
    let mut n2 = c.manager("n2", &state);
    n2.attach("busy", false).unwrap();
    let too_long = "x".repeat(1025);

    let before = c.revision();
    let cases: &[(&[&str], &str)] = &[
        (&["volume", "create", "v", "--size", "1G"], "volume v already exists"),
        (&["volume", "create", ".x", "--size", "1G"], "invalid volume name"),
        (&["volume", "create", "x", "--size", "1000"], "not a multiple of the block size"),
        (&["volume", "create", "x", "--size", "0"], "greater than 0"),
        (&["volume", "create", "x", "--size", "1G", "--replicas", "6"], "out of range 1..=5"),
        (&["volume", "create", "x", "--size", "1G", "--replicas", "0"], "out of range 1..=5"),
        (&["volume", "create", "x", "--size", "1G", "--replicas", "4"], "distinct failure domains"),
        (&["volume", "create", "x", "--size", "1G", "--min-replicas", "4"], "--min-replicas 4 is out of range 1..=3"),
        (&["volume", "create", "x", "--size", "1G", "--replicas", "2", "--min-replicas", "3"], "out of range 1..=2"),
        (&["volume", "create", "x", "--size", "1G", "--extent-size", "8G"], "power of two from 16M to 4G"),
        (&["volume", "create", "x", "--size", "1G", "--extent-size", "1M"], "power of two from 16M to 4G"),
        (&["volume", "create", "x", "--size", "1G", "--locality", "far"], "unknown locality"),
        (&["volume", "create", "x", "--size", "1G", "--backing", "null"], "standalone volumes"),
        (&["volume", "create", "x", "--size", "1G", "--path", "/tmp/x.img"], "standalone volumes"),
        (&["volume", "create", "x", "--size", "1G", "--block-size", "1024"], "block size 1024"),
        (&["volume", "create", "x", "--size", "1G", "--queues", "17"], "queues 17"),
        (&["volume", "create", "x", "--size", "1G", "--serial", &too_long[..21]], "serial"),
        (&["volume", "create", "x", "--size", "200G"], "not enough free space"),
        (&["volume", "create", "x", "--size", "64T", "--extent-size", "16M"], "larger --extent-size"),
        (&["volume", "create", "x", "--size", "1P"], "larger --extent-size"),
        (&["volume", "info", "nope"], "no volume named nope"),
        (&["volume", "info", "a/b"], "invalid volume name"),
        (&["volume", "resize", "v", "--size", "1G"], "cannot shrink volume v"),
        (&["volume", "resize", "v", "--size", "3221225473"], "not a multiple of the block size"),
        (&["volume", "resize", "nope", "--size", "9G"], "no volume named nope"),
        (&["volume", "resize", "v", "--size", "200G"], "not enough free space"),
        (&["volume", "resize", "v", "--size", "1P"], "cannot grow this far"),
        (&["volume", "delete", "nope"], "no volume named nope"),
        (&["volume", "delete", "busy"], "attached on node n2; detach it first or pass --force"),
        (&["volume", "attach", "nope"], "no volume named nope"),
        (&["volume", "attach", "busy"], "attached on node n2, which is up"),
        (&["volume", "detach", "v"], "volume v is not attached"),
        (&["volume", "detach", "busy"], "its owner is node n2"),
        (&["volume", "detach", "nope"], "no volume named nope"),
        (&["volume", "accept-risk", "v", "--reason", "maintenance"], "no risk to accept"),
        (&["volume", "accept-risk", "v", "--reason", "  "], "--reason must be"),
        (&["volume", "accept-risk", "v", "--reason", &too_long], "--reason must be"),
        (&["volume", "accept-risk", "nope", "--reason", "x"], "no volume named nope"),
    ];
    for (args, why) in cases {
        let line = refused(n1.cli(args), &format!("{args:?}"));
        assert!(line.contains(why), "{args:?}: {line}");
        assert_eq!(c.revision(), before, "{args:?} changed etcd");
    }
    assert!(!c.dir.path().join("n1/sock/busy.sock").exists());
    // Attaching the same volume twice on one node (once its status is published, which is
    // the only write a tick makes, and only on a change).
    n1.ok(&["volume", "attach", "v"]);
    wait_for("status/v published", Duration::from_secs(10), || c.meta.read_status("v").unwrap().is_some());
    let before = c.revision();
    let line = refused(n1.cli(&["volume", "attach", "v"]), "attach twice");
    assert!(line.contains("already attached on this node"), "{line}");
    assert_eq!(c.revision(), before);
    // A failed attach leaves nothing behind here either.
    state.fail_attach.store(true, Ordering::Relaxed);
    n1.ok(&["volume", "create", "w", "--size", "1G"]);
    let before = c.revision();
    let line = refused(n1.cli(&["volume", "attach", "w"]), "failing attach");
    assert!(line.contains("cannot attach volume w: injected attach failure"), "{line}");
    assert_eq!(c.revision(), before);
    assert!(!c.dir.path().join("n1/sock/w.sock").exists());
    n2.shutdown();
}

#[test]
fn attach_resize_accept_risk_detach_and_delete() {
    let c = three_zones("lifecycle");
    let state = Arc::new(FakeState::default());
    let n1 = c.serve("n1", &state);
    n1.ok(&["volume", "create", "v", "--size", "2G", "--queues", "2"]);
    let socket = c.dir.path().join("n1/sock/v.sock");
    let out = n1.ok(&["volume", "attach", "v"]);
    assert_eq!(out, format!("volume v attached\nsocket: {}\n", socket.display()));
    assert!(is_socket(&socket));
    let doc = c.doc("v");
    assert_eq!((doc.owner.as_deref(), doc.generation), (Some("n1"), 1));
    assert_eq!(state.exports.lock().unwrap().as_slice(), [("v".to_owned(), vec![0])], "one poller, first cpu");
    let info = n1.info("v");
    assert_eq!(info["owner"], "n1 (this node)");
    assert_eq!(info["state"], "healthy");
    assert_eq!(info["socket"], socket.display().to_string());
    assert_eq!(info["phase"], "serving");
    assert_eq!(info["generation"], "1");
    // The owner publishes its status under its lease within a tick.
    wait_for("status/v published", Duration::from_secs(10), || c.meta.read_status("v").unwrap().is_some());
    let published = c.meta.read_status("v").unwrap().unwrap();
    assert_eq!((published.node.as_str(), published.phase.as_str(), published.generation), ("n1", "serving", 1));
    assert_eq!(c.meta.etcd().get("status/v").unwrap().unwrap().lease, c.regs["n1"].lease());

    // Grow: the document first (size, new extents, new epoch), then the export.
    let out = n1.ok(&["volume", "resize", "v", "--size", "3G"]);
    assert_eq!(out, "volume v resized to 3221225472 bytes (3.00 GiB)\n");
    let doc = c.doc("v");
    assert_eq!((doc.size_bytes, doc.extents.len(), doc.epoch), (3 * GIB, 3, 2));
    assert_eq!(doc.extents[2].members[0].node, "n1", "placed like a create: the owner first");
    assert_eq!(state.resized.lock().unwrap().as_slice(), [("v".to_owned(), 3 * GIB)]);
    // Same size: nothing to do (measured once the new epoch is published).
    wait_for("epoch 2 published", Duration::from_secs(10), || {
        c.meta.read_status("v").unwrap().is_some_and(|s| s.epoch == 2)
    });
    let before = c.revision();
    n1.ok(&["volume", "resize", "v", "--size", "3G"]);
    assert_eq!(c.revision(), before);

    // The owner marks n3 stale in extent 0: degraded; then n2 too: suspended.
    c.edit("v", |m| {
        m.extents[0].members[2].state = MemberState::Stale;
        m.epoch += 1;
    });
    let info = n1.info("v");
    assert_eq!(info["state"], "degraded");
    assert_eq!(info["extent 0"], "n1 in_sync, n2 in_sync, n3 stale");
    c.edit("v", |m| {
        m.extents[0].members[1].state = MemberState::Stale;
        m.epoch += 1;
    });
    assert_eq!(n1.info("v")["state"], "suspended");
    assert!(n1.ok(&["cluster", "status"]).contains("\nvolumes: 0 healthy, 0 degraded, 1 suspended (v), 0 detached\n"));

    // Accepting the risk: recorded in the document and in an audit record, in one transaction.
    let out = n1.ok(&["volume", "accept-risk", "v", "--reason", "n2 and n3 are being replaced"]);
    assert!(out.starts_with("volume v: risk accepted by tester@"), "{out}");
    let risk = c.doc("v").risk_accepted.expect("recorded");
    assert!(risk.by.starts_with("tester@") && risk.reason == "n2 and n3 are being replaced", "{risk:?}");
    let (audits, _) = c.meta.etcd().list(&keys::audit_prefix("v").unwrap()).unwrap();
    assert_eq!(audits.len(), 1);
    let audit: serde_json::Value = serde_json::from_slice(&audits[0].value).unwrap();
    assert_eq!(
        (audit["action"].as_str(), audit["reason"].as_str()),
        (Some("accept-risk"), Some("n2 and n3 are being replaced"))
    );
    assert_eq!(audits[0].mod_revision, c.meta.read_volume("v").unwrap().unwrap().1 as u64, "same transaction");
    let info = n1.info("v");
    assert_eq!(info["state"], "degraded", "writes go on: the risk is accepted");
    assert!(
        info["risk_accepted"].starts_with("by tester@")
            && info["risk_accepted"].ends_with(": n2 and n3 are being replaced")
    );

    // A resync in progress: its progress, rate and ETA, here and in the published status.
    let sync = |regions_done: u32| SyncProgress {
        node: "n3".into(),
        extent: 0,
        rebuild: false,
        regions_done,
        regions_total: 1024,
        bytes_done: u64::from(regions_done) << 20,
        started: 0,
    };
    *state.syncs.lock().unwrap() = vec![sync(100)];
    wait_for("the first sample published", Duration::from_secs(10), || {
        c.meta.read_status("v").unwrap().is_some_and(|s| s.syncs.len() == 1)
    });
    *state.syncs.lock().unwrap() = vec![sync(300)];
    wait_for("a rate measured", Duration::from_secs(10), || {
        c.meta.read_status("v").unwrap().is_some_and(|s| s.syncs.first().is_some_and(|s| s.rate_bytes_per_s.is_some()))
    });
    let line = n1.info("v")["resync 0 n3"].clone();
    assert!(line.starts_with("resync 300/1024 regions (29%), ") && line.contains("/s, eta "), "{line}");
    let status = n1.ok(&["cluster", "status"]);
    assert!(
        status
            .contains("\nresyncs: 1 in progress\n  v extent 0 n3 resync [#####---------------] 300/1024 regions (29%)"),
        "{status}"
    );
    // Another node reads the owner's published status.
    let n2 = c.serve("n2", &state);
    let line = n2.info("v")["resync 0 n3"].clone();
    assert!(line.starts_with("resync 300/1024 regions (29%), ") && line.contains("/s, eta "), "{line}");
    assert_eq!(n2.info("v")["owner"], "n1");
    state.syncs.lock().unwrap().clear();

    // Detach: ownership released, socket and published status gone.
    assert_eq!(n1.ok(&["volume", "detach", "v"]), "volume v detached\n");
    assert_eq!(c.doc("v").owner, None);
    assert!(!socket.exists());
    assert_eq!(c.meta.read_status("v").unwrap(), None);
    assert_eq!(n2.info("v")["state"], "detached");

    // Delete: the document and its id index in one transaction.
    let id = c.doc("v").id;
    assert_eq!(n2.ok(&["volume", "delete", "v"]), "volume v deleted\n");
    assert_eq!(c.meta.read_volume("v").unwrap(), None);
    assert_eq!(c.meta.etcd().get(&keys::volume_id(id)).unwrap(), None);
    assert!(n1.ok(&["volume", "list"]).is_empty());

    // A forced delete of a volume attached here stops its export too.
    n1.ok(&["volume", "create", "w", "--size", "1G"]);
    n1.ok(&["volume", "attach", "w"]);
    assert_eq!(state.exports.lock().unwrap().last().unwrap(), &("w".to_owned(), vec![1]), "the next cpu");
    refused(n1.cli(&["volume", "delete", "w"]), "delete attached");
    assert_eq!(n1.ok(&["volume", "delete", "w", "--force"]), "volume w deleted\n");
    assert!(!c.dir.path().join("n1/sock/w.sock").exists());
    assert_eq!(c.meta.read_volume("w").unwrap(), None);
}

#[test]
fn ownership_moves_between_nodes_and_survives_a_restart() {
    let mut c = three_zones("ownership");
    let state = Arc::new(FakeState::default());
    let n1 = c.serve("n1", &state);
    n1.ok(&["volume", "create", "v", "--size", "2G"]);
    n1.ok(&["volume", "create", "u", "--size", "1G"]);
    let mut n2 = c.manager("n2", &state);
    n2.attach("v", false).unwrap();
    n2.attach("u", false).unwrap();
    n2.tick();
    let info = n1.info("v");
    assert_eq!((info["owner"].as_str(), info["phase"].as_str()), ("n2", "serving"));
    assert_eq!(info["socket"], "-");

    // Another node grows it: the owner's export follows at its next tick.
    n1.ok(&["volume", "resize", "v", "--size", "4G"]);
    assert!(state.resized.lock().unwrap().is_empty(), "not attached on n1");
    n2.tick();
    assert_eq!(state.resized.lock().unwrap().as_slice(), [("v".to_owned(), 4 * GIB)]);
    n2.tick();
    assert_eq!(state.resized.lock().unwrap().len(), 1, "grown once");

    // Taking v over from a live node needs --force; the old owner is fenced and publishes no more.
    refused(n1.cli(&["volume", "attach", "v"]), "attach of a volume owned by a live node");
    n1.ok(&["volume", "attach", "v", "--force"]);
    let doc = c.doc("v");
    assert_eq!((doc.owner.as_deref(), doc.generation), (Some("n1"), 2));
    n2.tick();
    wait_for("n1's status", Duration::from_secs(10), || {
        c.meta.read_status("v").unwrap().is_some_and(|s| s.node == "n1")
    });
    n2.tick();
    assert_eq!(c.meta.read_status("v").unwrap().unwrap().node, "n1", "the fenced owner does not overwrite it");
    // Its detach releases nothing: v stays n1's.
    n2.detach("v").unwrap();
    assert_eq!(c.doc("v").owner.as_deref(), Some("n1"));

    // n2 goes down holding u: u is taken over without --force, and n2 shows as down.
    n2.shutdown();
    drop(n2);
    c.take_down("n2");
    n1.ok(&["volume", "attach", "u"]);
    assert_eq!(c.doc("u").owner.as_deref(), Some("n1"));
    let nodes = n1.ok(&["node", "list"]);
    assert!(
        nodes.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["n2", "-", "-", "down", "-", "-"]),
        "{nodes}"
    );
    let status = n1.ok(&["cluster", "status"]);
    assert!(status.contains("\nnodes: 2 up, 1 down (n2)\n"), "{status}");
    assert!(n1.info("v")["extent 0"].contains("(down)"));

    // n1 restarts: exports stop, ownership stays, and the next start attaches both again.
    let mut manager = n1.stop();
    manager.shutdown();
    drop(manager);
    assert_eq!(c.doc("v").owner.as_deref(), Some("n1"));
    assert!(!c.dir.path().join("n1/sock/v.sock").exists());
    let mut restarted = c.manager("n1", &state);
    assert_eq!(restarted.reattach_owned(), 2);
    assert_eq!(restarted.attached(), ["u", "v"]);
    assert!(is_socket(&c.dir.path().join("n1/sock/v.sock")));
    assert_eq!(c.doc("v").generation, 3);
    // A volume owned here but not exported (its attach failed) is released by detach.
    restarted.shutdown();
    let mut restarted = c.manager("n1", &state);
    restarted.detach("u").unwrap();
    assert_eq!(c.doc("u").owner, None);
    assert!(matches!(restarted.detach("u"), Err(Error::NotAttached { .. })));
}

// ---- the daemon process in cluster mode ---------------------------------------------------------

struct DaemonDirs {
    dir: tempfile::TempDir,
}

impl DaemonDirs {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn secret(&self, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join("secret");
        std::fs::write(&path, bytes).unwrap();
        path
    }
    fn command(&self, cluster: &[&str]) -> Command {
        let mut command = Command::new(HCBLK);
        command
            .env("RUST_LOG", "info")
            .env_remove(daemon::SECRET_ENV)
            .arg("--api-socket")
            .arg(self.dir.path().join("api.sock"))
            .arg("daemon")
            .arg("--data-dir")
            .arg(self.data())
            .arg("--socket-dir")
            .arg(self.dir.path().join("sock"))
            .args(["--poll", "never", "--hugepages-mb", "2"])
            .args(cluster)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }
}

#[test]
fn cluster_daemon_start_up_refusals_change_nothing() {
    let mut c = Cluster::new("daemon");
    let dirs = DaemonDirs::new();
    let secret = dirs.secret(b"0123456789abcdef0123\n");
    let secret = secret.to_str().unwrap();
    let endpoint = c.server.endpoint();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let closed = format!("http://{closed}");
    let cluster_with = |etcd: &str, node: &str, transport: &str| {
        vec![
            "--etcd".to_owned(),
            etcd.to_owned(),
            "--node".into(),
            node.into(),
            "--listen".into(),
            "127.0.0.1:7450".into(),
            "--transport".into(),
            transport.into(),
        ]
    };
    let cluster = |etcd: &str, node: &str| cluster_with(etcd, node, "tcp");
    let with = |base: Vec<String>, extra: &[&str]| -> Vec<String> {
        base.into_iter().chain(extra.iter().map(|s| s.to_string())).collect()
    };
    let run = |args: &[String], env_secret: Option<&str>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = dirs.command(&args);
        if let Some(s) = env_secret {
            command.env(daemon::SECRET_ENV, s);
        }
        // A refusal is immediate; a daemon that starts instead would run until killed.
        output_within(command, Duration::from_secs(60), "hcblk daemon").unwrap()
    };
    // "taken" registers 127.0.0.1:7400 (a live daemon); these starts listen elsewhere, or the
    // daemon would rightly take it for its own run killed a moment ago and reclaim it.
    c.register("taken", None);
    let before = c.revision();
    let short = dirs.dir.path().join("short");
    std::fs::write(&short, b"tooshort").unwrap();
    let short = short.to_str().unwrap();
    let cases: Vec<(Vec<String>, Option<&str>, &str)> = vec![
        (with(cluster(&closed, "n1"), &["--cluster-secret-file", secret]), None, "etcd is unreachable"),
        (cluster(&endpoint, "n1"), None, "needs the cluster secret"),
        (with(cluster(&endpoint, "n1"), &["--cluster-secret-file", secret]), Some("0123456789abcdef"), "given twice"),
        (with(cluster(&endpoint, "n1"), &["--cluster-secret-file", short]), None, "at least 16 required"),
        (
            with(cluster(&endpoint, "n1"), &["--cluster-secret-file", "/nonexistent/secret"]),
            None,
            "cannot read cluster secret",
        ),
        (cluster(&endpoint, "n1"), Some("short"), "at least 16 required"),
        (
            with(cluster(&endpoint, "taken"), &["--cluster-secret-file", secret]),
            None,
            "registered in etcd by another live daemon",
        ),
        (vec!["--zone".into(), "a".into()], None, "--zone is a cluster-mode flag"),
        (with(cluster_with(&endpoint, "n1", "rdma"), &["--cluster-secret-file", secret]), None, "--transport"),
        (with(cluster(&endpoint, "n1"), &["--cluster-secret-file", secret, "--io-timeout", "5"]), None, "no unit"),
    ];
    for (args, env_secret, why) in cases {
        let out = run(&args, env_secret);
        let line = refused(out, &format!("{args:?}"));
        assert!(line.contains(why), "{args:?}: {line}");
        assert!(!dirs.data().exists(), "{args:?} created the data dir");
        assert_eq!(c.revision(), before, "{args:?} wrote to etcd");
    }
}

/// The whole daemon in cluster mode: registration, the replica service, create, attach, and
/// ownership kept across a restart (attached again at start).
#[test]
fn cluster_daemon_registers_creates_and_keeps_ownership_across_a_restart() {
    let c = Cluster::new("daemon-full");
    let dirs = DaemonDirs::new();
    let secret = dirs.secret(b"0123456789abcdef0123");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let args = [
        "--etcd",
        &c.server.endpoint(),
        "--node",
        "solo",
        "--listen",
        &listen,
        "--transport",
        "tcp",
        "--cluster-secret-file",
    ];
    let start = || {
        let mut args: Vec<&str> = args.to_vec();
        args.push(secret.to_str().unwrap());
        let mut child = dirs.command(&args).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "no ready line");
            match lines.next() {
                Some(Ok(line)) if line.starts_with("hcblk daemon ready api=") => {
                    assert!(line.ends_with(" node=solo"), "{line}");
                    break;
                }
                Some(Ok(line)) => eprintln!("daemon: {line}"),
                other => panic!("daemon exited before its ready line: {other:?} {:?}", child.try_wait()),
            }
        }
        thread::spawn(move || for _ in lines {});
        child
    };
    let cli = |args: &[&str]| {
        let mut command = Command::new(HCBLK);
        command.arg("--api-socket").arg(dirs.dir.path().join("api.sock")).args(args);
        output_within(command, Duration::from_secs(60), "hcblk").unwrap()
    };
    let mut child = start();
    assert!(c.meta.read_node("solo").unwrap().is_some());
    assert!(c.meta.etcd().get(keys::CLUSTER).unwrap().is_some());
    let out = cli(&["volume", "create", "v", "--size", "1G", "--replicas", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["volume", "attach", "v"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.doc("v").owner.as_deref(), Some("solo"));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    assert_eq!(c.meta.read_node("solo").unwrap(), None, "deregistered");
    assert_eq!(c.doc("v").owner.as_deref(), Some("solo"), "ownership kept");
    let mut child = start();
    assert!(is_socket(&dirs.dir.path().join("sock/v.sock")), "attached again at start");
    // kill -9: its registration's lease is still live (10 s TTL), yet the next start of the
    // same node must not wait for it, and the volume is attached again.
    child.kill().unwrap();
    child.wait().unwrap();
    let restarted = Instant::now();
    let mut child = start();
    assert!(restarted.elapsed() < Duration::from_secs(8), "restart after kill -9 took {:?}", restarted.elapsed());
    assert!(c.meta.read_node("solo").unwrap().is_some(), "registered again");
    assert!(is_socket(&dirs.dir.path().join("sock/v.sock")), "attached again after kill -9");
    assert_eq!(c.doc("v").owner.as_deref(), Some("solo"));
    let _ = child.kill();
    let _ = child.wait();
}
