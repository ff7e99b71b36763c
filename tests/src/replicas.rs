//! The replica comparator: reads every in-sync member's replica file of a volume, extent by
//! extent, straight from the nodes' data directories, and checks they are byte-for-byte
//! equal; plus what the tests read about a volume's layout and its resyncs.
//!
//! # What is read from `volume info --json`
//!
//! [`Layout::from_info_json`] reads the cluster-mode form (`docs/cli.md`):
//!
//! ```text
//! size_bytes, extent_bytes, generation           at the top level
//! cluster.id                                     the volume id (a number, or 16 hex digits)
//! cluster.owner                                  node name or null
//! cluster.extents                                [[{"node": "n1", "state": "in_sync"|"stale"|"rebuilding", "up": true}, ...], ...]
//! cluster.status.region_bytes                    (optional) resync granularity
//! ```
//!
//! and [`Syncs::from_info_json`] the resyncs in progress from `cluster.status.syncs`, each
//! `{"node", "extent", "rebuild", "regions_done", "regions_total", "bytes_done"}`. The authority on the
//! layout is the volume's document in etcd ([`Layout::from_meta`]); the tests use both and
//! the comparator takes either.
//!
//! # What is read from a daemon log
//!
//! [`resyncs_in_log`] finds finished resyncs in an owner's log: the owner's
//! `replica sync done: back in sync … node=N extent=E regions=R` lines for the node.

use anyhow::{anyhow, bail, Context, Result};
use replication::{MemberState, VolumeMeta};
use serde_json::Value;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes compared per read.
const CHUNK: usize = 1 << 20;

/// A volume's geometry and membership, as the comparator needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub id: u64,
    pub size_bytes: u64,
    pub extent_bytes: u64,
    pub region_bytes: Option<u64>,
    pub owner: Option<String>,
    pub generation: Option<u64>,
    /// Per extent: (node, state).
    pub extents: Vec<Vec<(String, MemberState)>>,
}

fn parse_id(v: &Value) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| anyhow!("volume id {n} is not a u64")),
        Value::String(s) => {
            let hex = s.strip_prefix("0x").unwrap_or(s);
            if (s.starts_with("0x") || s.len() == 16) && !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                u64::from_str_radix(hex, 16).with_context(|| format!("volume id {s:?}"))
            } else {
                bail!("volume id {s:?}: expected a number or 16 hex digits")
            }
        }
        other => bail!("volume id {other}: expected a number or 16 hex digits"),
    }
}

fn parse_state(s: &str) -> Result<MemberState> {
    match s {
        "in_sync" => Ok(MemberState::InSync),
        "stale" => Ok(MemberState::Stale),
        "rebuilding" => Ok(MemberState::Rebuilding),
        other => bail!("member state {other:?} (in_sync, stale or rebuilding)"),
    }
}

fn u64_field(doc: &Value, name: &str) -> Result<u64> {
    doc.get(name).and_then(Value::as_u64).ok_or_else(|| anyhow!("no numeric `{name}`"))
}

impl Layout {
    pub fn from_meta(m: &VolumeMeta) -> Self {
        Self {
            id: m.id,
            size_bytes: m.size_bytes,
            extent_bytes: m.extent_bytes,
            region_bytes: Some(m.region_bytes),
            owner: m.owner.clone(),
            generation: Some(m.generation),
            extents: m
                .extents
                .iter()
                .map(|e| e.members.iter().map(|mb| (mb.node.clone(), mb.state)).collect())
                .collect(),
        }
    }

    /// See the module documentation for the fields read.
    pub fn from_info_json(info: &Value) -> Result<Self> {
        // `volume info --json` in cluster mode: geometry at the top level, the layout under
        // `cluster` (`id`, `owner`, and `extents` as one array of members per extent).
        let parse = || -> Result<Self> {
            let cluster =
                info.get("cluster").filter(|c| c.is_object()).ok_or_else(|| anyhow!("no `cluster` section"))?;
            let id = parse_id(cluster.get("id").ok_or_else(|| anyhow!("no `cluster.id`"))?)?;
            let size_bytes = u64_field(info, "size_bytes")?;
            let extent_bytes = u64_field(info, "extent_bytes")?;
            if extent_bytes == 0 {
                bail!("extent_bytes is 0");
            }
            let extents = cluster
                .get("extents")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("no `cluster.extents` array"))?
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    e.as_array()
                        .ok_or_else(|| anyhow!("extent {i} is not an array of members"))?
                        .iter()
                        .map(|m| {
                            let node = m
                                .get("node")
                                .and_then(Value::as_str)
                                .ok_or_else(|| anyhow!("extent {i}: a member without `node`"))?;
                            let state = m
                                .get("state")
                                .and_then(Value::as_str)
                                .ok_or_else(|| anyhow!("extent {i}: member {node} without `state`"))?;
                            Ok((node.to_owned(), parse_state(state)?))
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            if extents.len() as u64 != size_bytes.div_ceil(extent_bytes) {
                bail!("{} extents for {size_bytes} bytes in extents of {extent_bytes}", extents.len());
            }
            Ok(Self {
                id,
                size_bytes,
                extent_bytes,
                region_bytes: cluster.get("status").and_then(|s| s.get("region_bytes")).and_then(Value::as_u64),
                owner: cluster.get("owner").and_then(Value::as_str).map(str::to_owned),
                generation: info.get("generation").and_then(Value::as_u64),
                extents,
            })
        };
        parse().with_context(|| format!("`volume info --json` does not describe the volume's layout as expected (see hcblk_tests::replicas):\n{info}"))
    }

    /// In-sync members of extent `i`.
    pub fn in_sync(&self, i: usize) -> Vec<&str> {
        self.extents[i].iter().filter(|(_, s)| *s == MemberState::InSync).map(|(n, _)| n.as_str()).collect()
    }

    /// Byte range of extent `i` inside the volume.
    pub fn extent_range(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.extent_bytes;
        (start, (start + self.extent_bytes).min(self.size_bytes))
    }

    /// True when every extent has exactly `n` members, all in sync, none of them in `not_on`.
    pub fn whole_with(&self, n: usize, not_on: &[&str]) -> bool {
        self.extents.iter().all(|e| {
            e.len() == n && e.iter().all(|(node, s)| *s == MemberState::InSync && !not_on.contains(&node.as_str()))
        })
    }

    /// Every node holding a member of any extent, in first-seen order.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for (n, _) in self.extents.iter().flatten() {
            if !v.contains(n) {
                v.push(n.clone());
            }
        }
        v
    }

    /// The state of `node`'s member of extent `i`, if it is one.
    pub fn state_of(&self, i: usize, node: &str) -> Option<MemberState> {
        self.extents[i].iter().find(|(n, _)| n == node).map(|(_, s)| *s)
    }

    /// One line per extent: `e0: n1=in_sync n2=stale ...`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "volume {:016x}, {} bytes, owner {:?}, generation {:?}",
            self.id, self.size_bytes, self.owner, self.generation
        );
        for (i, e) in self.extents.iter().enumerate() {
            let members: Vec<String> = e.iter().map(|(n, st)| format!("{n}={st:?}")).collect();
            s += &format!("\n  extent {i}: {}", members.join(" "));
        }
        s
    }
}

/// What [`compare_in_sync`] found.
#[derive(Clone, Debug, Default)]
pub struct CompareReport {
    /// (extent, in-sync members compared).
    pub extents: Vec<(usize, Vec<String>)>,
    pub bytes_compared: u64,
    /// Files shorter than an extent they hold (the rest compared as zeros, as a sparse file).
    pub short_files: Vec<PathBuf>,
}

fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read_at(&mut buf[got..], offset + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Checks that the in-sync members of every extent hold the same bytes for that extent.
/// `path_of(node)` is the node's replica file of this volume. Extents with fewer than two
/// in-sync members are skipped (nothing to compare), unless `min_in_sync` says otherwise.
pub fn compare_in_sync(
    layout: &Layout,
    min_in_sync: usize,
    path_of: impl Fn(&str) -> Result<PathBuf>,
) -> Result<CompareReport> {
    let mut report = CompareReport::default();
    for i in 0..layout.extents.len() {
        let members = layout.in_sync(i);
        if members.len() < min_in_sync {
            bail!(
                "extent {i} has {} in-sync members, expected at least {min_in_sync}\n{}",
                members.len(),
                layout.describe()
            );
        }
        if members.len() < 2 {
            continue;
        }
        let (start, end) = layout.extent_range(i);
        let files = members
            .iter()
            .map(|n| {
                let p = path_of(n)?;
                // A replica service creates a volume's data file at its first disk operation:
                // a member that was never written to has none, and holds zeros.
                let f = match File::open(&p) {
                    Ok(f) => Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("open {n}'s replica {} (extent {i} in sync there)", p.display()))
                    }
                };
                if f.as_ref().map_or(Ok(0), |f| f.metadata().map(|m| m.len()))? < end {
                    report.short_files.push(p.clone());
                }
                Ok((n.to_string(), p, f))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut bufs: Vec<Vec<u8>> = files.iter().map(|_| vec![0u8; CHUNK]).collect();
        let mut at = start;
        while at < end {
            let len = CHUNK.min((end - at) as usize);
            for ((_, p, f), buf) in files.iter().zip(bufs.iter_mut()) {
                let buf = &mut buf[..len];
                let got = match f {
                    Some(f) => read_full(f, buf, at).with_context(|| format!("read {}", p.display()))?,
                    None => 0,
                };
                // Past the end of a sparse file: zeros.
                buf[got..].fill(0);
            }
            for k in 1..files.len() {
                if bufs[k][..len] != bufs[0][..len] {
                    let first = bufs[0][..len].iter().zip(&bufs[k][..len]).position(|(a, b)| a != b).unwrap_or(0);
                    let off = at + first as u64;
                    let show = |b: &[u8]| format!("{:02x?}", &b[first..(first + 16).min(len)]);
                    bail!(
                        "replicas of extent {i} differ at volume offset {off} (byte {} of the extent): {} ({}) has {} , {} ({}) has {}\n{}",
                        off - start,
                        files[0].0,
                        files[0].1.display(),
                        show(&bufs[0]),
                        files[k].0,
                        files[k].1.display(),
                        show(&bufs[k]),
                        layout.describe()
                    );
                }
            }
            report.bytes_compared += len as u64 * files.len() as u64;
            at += len as u64;
        }
        report.extents.push((i, members.iter().map(|s| s.to_string()).collect()));
    }
    Ok(report)
}

/// One resync or rebuild, as reported by the owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncSeen {
    pub node: String,
    pub extent: Option<u32>,
    pub rebuild: Option<bool>,
    pub regions_done: u64,
    pub regions_total: Option<u64>,
    pub bytes_done: Option<u64>,
}

/// Resyncs in progress from `volume info --json`.
pub struct Syncs;

impl Syncs {
    pub fn from_info_json(info: &Value) -> Vec<SyncSeen> {
        let list = info.get("cluster").and_then(|c| c.get("status")).and_then(|s| s.get("syncs"));
        let Some(list) = list.and_then(Value::as_array) else { return Vec::new() };
        list.iter()
            .filter_map(|s| {
                Some(SyncSeen {
                    node: s.get("node")?.as_str()?.to_owned(),
                    extent: s.get("extent").and_then(Value::as_u64).map(|e| e as u32),
                    rebuild: s.get("rebuild").and_then(Value::as_bool),
                    regions_done: s.get("regions_done").and_then(Value::as_u64).unwrap_or(0),
                    regions_total: s.get("regions_total").and_then(Value::as_u64),
                    bytes_done: s.get("bytes_done").and_then(Value::as_u64),
                })
            })
            .collect()
    }
}

/// The number after `key=` or `key: ` in `line` (`key` given without the separator).
fn number_after(line: &str, key: &str) -> Option<u64> {
    for sep in ["=", ": ", ":"] {
        let pat = format!("{key}{sep}");
        if let Some(at) = line.find(&pat) {
            let rest = &line[at + pat.len()..];
            let digits: String = rest.trim_start_matches('"').chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// Whether `line` names `node` as a whole word (`n1` must not match `n10`).
fn names_node(line: &str, node: &str) -> bool {
    line.match_indices(node).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + node.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        !word(before) && !word(after)
    })
}

/// Finished resyncs (and rebuilds) to `node` in an owner's log; see the module documentation.
pub fn resyncs_in_log(log: &str, node: &str) -> Vec<SyncSeen> {
    log.lines()
        .filter(|l| {
            // The owner's line (backend/src/replicated/core.rs):
            // `replica sync done: back in sync volume=V node=N extent=E regions=R`.
            l.contains("replica sync done") && names_node(l, node)
        })
        .filter_map(|l| {
            Some(SyncSeen {
                node: node.to_owned(),
                extent: number_after(l, "extent").map(|e| e as u32),
                rebuild: None,
                regions_done: number_after(l, "regions")?,
                regions_total: None,
                bytes_done: None,
            })
        })
        .collect()
}

/// Hashes a file's bytes in `[offset, offset + len)` (zeros past its end), to compare a
/// replica file before and after something that must not write it.
pub fn digest_range(path: &Path, offset: u64, len: u64) -> Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = CHUNK.min((end - at) as usize);
        let got = read_full(&f, &mut buf[..n], at)?;
        buf[got..n].fill(0);
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info() -> Value {
        json!({
            "name": "v", "size_bytes": 3u64 << 20, "extent_bytes": 2u64 << 20, "generation": 4,
            "cluster": {
                "id": "00000000000004d2", "owner": "n1",
                "extents": [
                    [{"node": "a", "state": "in_sync", "up": true}, {"node": "b", "state": "in_sync", "up": true}, {"node": "c", "state": "stale", "up": false}],
                    [{"node": "a", "state": "in_sync", "up": true}, {"node": "b", "state": "rebuilding", "up": true}, {"node": "d", "state": "in_sync", "up": true}]
                ],
                "status": {
                    "phase": "serving", "region_bytes": 1u64 << 20,
                    "syncs": [{"node": "c", "extent": 0, "rebuild": false, "regions_done": 2, "regions_total": 5, "bytes_done": 2097152}]
                }
            }
        })
    }

    #[test]
    fn layout_from_info_json() {
        let l = Layout::from_info_json(&info()).unwrap();
        assert_eq!(l.id, 1234);
        assert_eq!(l.in_sync(0), vec!["a", "b"]);
        assert_eq!(l.in_sync(1), vec!["a", "d"]);
        assert_eq!(l.extent_range(1), (2 << 20, 3 << 20));
        assert_eq!(l.owner.as_deref(), Some("n1"));
        assert!(!l.whole_with(3, &[]));
        assert_eq!(l.nodes(), vec!["a", "b", "c", "d"]);
        let mut numeric = info();
        numeric["cluster"]["id"] = json!(99);
        assert_eq!(Layout::from_info_json(&numeric).unwrap().id, 99);
        let mut bad = info();
        bad["cluster"]["extents"][0][0]["state"] = json!("confused");
        let e = format!("{:#}", Layout::from_info_json(&bad).unwrap_err());
        assert!(e.contains("confused"), "{e}");
        let s = Syncs::from_info_json(&info());
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].regions_done, s[0].regions_total, s[0].extent), (2, Some(5), Some(0)));
    }

    #[test]
    fn resyncs_are_found_in_logs() {
        let log = "\
2024 INFO backend::replicated::core: replica sync done: back in sync volume=v node=n3 extent=0 regions=3
2024 INFO backend::replicated::core: replica sync done: back in sync volume=v node=n3 extent=1 regions=2
2024 INFO backend::replicated::core: replica sync done: back in sync volume=v node=n30 extent=1 regions=99
2024 INFO backend::replicated::core: replica sync started volume=v node=n3 extent=2 regions=7 kind=resync
";
        let s = resyncs_in_log(log, "n3");
        assert_eq!(s.iter().map(|s| (s.extent, s.regions_done)).collect::<Vec<_>>(), vec![(Some(0), 3), (Some(1), 2)]);
    }

    #[test]
    fn comparator_finds_the_first_difference_and_skips_stale_members() {
        let dir = std::env::temp_dir().join(format!("hcblk-cmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l = Layout::from_info_json(&info()).unwrap();
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        for n in ["a", "b", "d"] {
            std::fs::write(dir.join(n), &data).unwrap();
        }
        // c is stale in extent 0 and holds garbage: not compared.
        std::fs::write(dir.join("c"), vec![0xffu8; 1 << 20]).unwrap();
        let path_of = |n: &str| Ok(dir.join(n));
        let r = compare_in_sync(&l, 2, path_of).unwrap();
        assert_eq!(r.extents.len(), 2);
        assert_eq!(r.bytes_compared, (2 << 20) * 2 + (1 << 20) * 2);
        // One byte differs in d's copy of extent 1.
        let mut d = data.clone();
        d[(2 << 20) + 12345] ^= 0x40;
        std::fs::write(dir.join("d"), &d).unwrap();
        let e = compare_in_sync(&l, 2, path_of).unwrap_err().to_string();
        assert!(e.contains(&format!("volume offset {}", (2 << 20) + 12345)) && e.contains("extent 1"), "{e}");
        // A short file compares as zeros past its end.
        std::fs::write(dir.join("d"), &data[..(2 << 20) + 100]).unwrap();
        let e = compare_in_sync(&l, 2, path_of).unwrap_err().to_string();
        assert!(e.contains(&format!("volume offset {}", (2 << 20) + 100)), "{e}");
        assert!(compare_in_sync(&l, 3, path_of).is_err(), "extent 0 has only 2 in sync");
        let a = digest_range(&dir.join("a"), 0, 1 << 20).unwrap();
        assert_eq!(a, digest_range(&dir.join("b"), 0, 1 << 20).unwrap());
        assert_ne!(a, digest_range(&dir.join("c"), 0, 1 << 20).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
