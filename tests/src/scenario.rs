//! Steps the replication scenarios share: create and attach a replicated volume, read its
//! layout, wait for membership changes, watch resyncs, and the final checks every scenario
//! ends with (acknowledged data verified, in-sync replicas byte-for-byte equal and holding
//! every acknowledged write, no daemon panicked).

use crate::cluster_fixture::{wait_for_every, Cluster};
use crate::replicas::{compare_in_sync, resyncs_in_log, CompareReport, Layout, SyncSeen, Syncs};
use crate::verify::{self, BlkClient, Ledger, Observed, Workload, WorkloadConfig, BLOCK};
use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;
/// How often layouts are polled from etcd (each poll spawns `etcdctl`).
pub const LAYOUT_POLL: Duration = Duration::from_millis(400);

/// A volume a scenario created and attached.
#[derive(Clone, Debug)]
pub struct Vol {
    pub name: String,
    /// The node it is attached on.
    pub owner: String,
    pub socket: PathBuf,
    pub size_bytes: u64,
}

/// `volume create NAME --size SIZE --replicas R --min-replicas M --extent-size E` on `node`,
/// then `volume attach` there.
pub fn create_and_attach(
    c: &Cluster,
    node: &str,
    name: &str,
    size_mib: u64,
    replicas: u8,
    min: u8,
    extent_mib: u64,
) -> Result<Vol> {
    let size = format!("{size_mib}M");
    let extent = format!("{extent_mib}M");
    c.create_volume(
        node,
        name,
        &size,
        &["--replicas", &replicas.to_string(), "--min-replicas", &min.to_string(), "--extent-size", &extent],
    )?;
    let socket = c.attach(node, name, false)?;
    Ok(Vol { name: name.into(), owner: node.into(), socket, size_bytes: size_mib * MIB })
}

/// The volume's layout from its document in etcd.
pub fn layout(c: &Cluster, name: &str) -> Result<Layout> {
    let meta = c.volume_meta(name)?.with_context(|| format!("no volume document for {name} in etcd"))?;
    Ok(Layout::from_meta(&meta))
}

/// Polls the layout in etcd until `pred` holds; returns it. `watch` (if any) is polled at the
/// same time, collecting resync progress from the owner.
pub fn wait_layout(
    c: &Cluster,
    name: &str,
    timeout: Duration,
    what: &str,
    mut watch: Option<&mut SyncWatch>,
    pred: impl Fn(&Layout) -> bool,
) -> Result<Layout> {
    let mut last = None;
    let r = wait_for_every(timeout, LAYOUT_POLL, what, || {
        if let Some(w) = watch.as_deref_mut() {
            w.poll(c);
        }
        let l = layout(c, name)?;
        let ok = pred(&l);
        last = Some(l.clone());
        Ok(ok.then_some(l))
    });
    r.with_context(|| match &last {
        Some(l) => format!("last layout of {name}: {}", l.describe()),
        None => format!("no layout of {name} read"),
    })
}

/// A member of extent `extent` that is not one of `not`.
pub fn member_except(l: &Layout, extent: usize, not: &[&str]) -> Result<String> {
    l.extents[extent]
        .iter()
        .map(|(n, _)| n)
        .find(|n| !not.contains(&n.as_str()))
        .cloned()
        .with_context(|| format!("extent {extent} has no member besides {not:?}: {}", l.describe()))
}

/// Resync progress seen in the owner's `volume info --json` while a scenario waits.
#[derive(Debug)]
pub struct SyncWatch {
    owner: String,
    volume: String,
    /// Per (node, extent, rebuild): the largest progress seen.
    pub seen: Vec<SyncSeen>,
    /// Errors of `volume info` (the owner may be busy); the last one.
    pub last_error: Option<String>,
}

impl SyncWatch {
    pub fn new(owner: &str, volume: &str) -> Self {
        Self { owner: owner.into(), volume: volume.into(), seen: Vec::new(), last_error: None }
    }

    pub fn poll(&mut self, c: &Cluster) {
        match c.volume_info(&self.owner, &self.volume) {
            Ok(info) => {
                for s in Syncs::from_info_json(&info) {
                    match self
                        .seen
                        .iter_mut()
                        .find(|x| x.node == s.node && x.extent == s.extent && x.rebuild == s.rebuild)
                    {
                        Some(x) => {
                            x.regions_done = x.regions_done.max(s.regions_done);
                            x.regions_total = x.regions_total.max(s.regions_total);
                            x.bytes_done = x.bytes_done.max(s.bytes_done);
                        }
                        None => self.seen.push(s),
                    }
                }
            }
            Err(e) => self.last_error = Some(format!("{e:#}")),
        }
    }
}

/// How much was copied to `node` after `log_offset` of the owner's log, by the log's finished
/// syncs and the progress `watch` saw (the larger per extent): (regions, the records).
pub fn resynced_regions(
    c: &Cluster,
    owner: &str,
    node: &str,
    log_offset: usize,
    watch: &SyncWatch,
) -> Result<(u64, Vec<SyncSeen>)> {
    let log = c.log(owner)?;
    let from_log = resyncs_in_log(log.get(log_offset..).unwrap_or(""), node);
    let mut per_extent: std::collections::BTreeMap<Option<u32>, u64> = Default::default();
    for s in from_log.iter().chain(watch.seen.iter().filter(|s| s.node == node)) {
        let regions = s.regions_total.unwrap_or(0).max(s.regions_done);
        let e = per_extent.entry(s.extent).or_default();
        *e = (*e).max(regions);
    }
    let records: Vec<SyncSeen> =
        from_log.into_iter().chain(watch.seen.iter().filter(|s| s.node == node).cloned()).collect();
    Ok((per_extent.values().sum(), records))
}

/// A client with `queue_depth` slots of `blocks_per_write` blocks on `socket`, running `cfg`.
pub fn start_workload(socket: &std::path::Path, cfg: WorkloadConfig) -> Result<Workload> {
    let client = BlkClient::connect(socket, cfg.queue_depth.max(1), (cfg.blocks_per_write as usize) * BLOCK)?;
    Workload::start(client, cfg)
}

/// A fresh client for verification (64 KiB reads).
pub fn verify_client(socket: &std::path::Path) -> Result<BlkClient> {
    BlkClient::connect(socket, 1, 256 * BLOCK)
}

/// The final checks of a scenario, against the layout in etcd:
/// * every extent has at least `min_in_sync` in-sync members, and their replica files are
///   byte-for-byte equal;
/// * every in-sync member's replica file holds, for the blocks `ledgers` cover, what the
///   ledgers allow (so no replica silently misses an acknowledged write).
pub fn check_replicas(c: &Cluster, name: &str, ledgers: &[&Ledger], min_in_sync: usize) -> Result<CompareReport> {
    let l = layout(c, name)?;
    let report = compare_in_sync(&l, min_in_sync, |node| c.replica_path(node, l.id))?;
    let (first, end) = ledger_span(ledgers);
    for (i, _) in l.extents.iter().enumerate() {
        let (start, stop) = l.extent_range(i);
        let (b0, b1) = ((start / BLOCK as u64).max(first), (stop / BLOCK as u64).min(end));
        if b0 >= b1 {
            continue;
        }
        for node in l.in_sync(i) {
            let path = c.replica_path(node, l.id)?;
            let r = verify::verify_file(&path, ledgers, b0, b1 - b0, &Observed::Zero)?;
            r.ensure_ok().with_context(|| {
                format!("{node}'s replica of extent {i} ({}) misses acknowledged writes", path.display())
            })?;
        }
    }
    Ok(report)
}

/// The blocks any of `ledgers` covers: [first, end).
pub fn ledger_span(ledgers: &[&Ledger]) -> (u64, u64) {
    let first = ledgers.iter().map(|l| l.first_block).min().unwrap_or(0);
    let end = ledgers.iter().map(|l| l.first_block + l.blocks).max().unwrap_or(0);
    (first, end)
}

/// Reads everything the ledgers cover through a new client on `socket` and checks it.
pub fn verify_through(socket: &std::path::Path, ledgers: &[&Ledger]) -> Result<verify::VerifyReport> {
    let mut client = verify_client(socket)?;
    let (first, end) = ledger_span(ledgers);
    let r = verify::verify(&mut client, ledgers, first, end - first, &Observed::Zero)?;
    eprintln!(
        "verify through {}: {} blocks, {} written, {} zero, {:.1?}",
        socket.display(),
        r.blocks_checked,
        r.written,
        r.zero,
        r.elapsed
    );
    r.ensure_ok()?;
    Ok(r)
}

/// No daemon log mentions a panic.
pub fn ensure_no_panics(c: &Cluster) -> Result<()> {
    for n in c.node_names() {
        let log = c.log(&n)?;
        if let Some(line) = log.lines().find(|l| l.contains("panicked at")) {
            bail!("{n}'s daemon panicked: {line}");
        }
    }
    Ok(())
}

/// Waits until `w` completed `n` more writes; the error says how far it got.
pub fn progress(w: &Workload, n: u64, timeout: Duration, what: &str) -> Result<Duration> {
    let start = Instant::now();
    w.wait_for_progress(n, timeout).with_context(|| format!("writes while {what}"))?;
    Ok(start.elapsed())
}

/// Every replica file on `node` (of any volume) is all zeros or absent: the node wrote nothing.
pub fn replica_files_blank(c: &Cluster, node: &str) -> Result<Vec<PathBuf>> {
    let dir = c.data_dir(node)?.join("replicas");
    let mut files = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(files) };
    for e in rd {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "img") {
            let data = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
            if let Some(at) = data.iter().position(|&b| b != 0) {
                bail!("{node} wrote data into {} (first non-zero byte at {at})", p.display());
            }
            files.push(p);
        }
    }
    Ok(files)
}

/// Checks that `cond` never stops holding for `duration`, polling every 200 ms.
pub fn holds_for(duration: Duration, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < duration {
        ensure!(cond()?, "{what} stopped holding after {:.1?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
