//! Where a volume's extents live: `replicas` members per extent on distinct nodes in distinct
//! failure domains, balancing free capacity, and (by default) one member of every extent on
//! the node the volume is created on so that its reads stay local.
//!
//! Pure functions over the registered nodes: the caller reads the nodes from etcd and commits
//! the result in the same compare-and-swap as the rest of the volume's metadata.

use std::collections::BTreeMap;

use crate::meta::{ExtentMeta, Locality, Member, MemberState, NodeInfo, VolumeMeta};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    #[error("{replicas} replicas need {replicas} nodes in distinct failure domains; the cluster has {domains} up ({nodes} nodes)")]
    TooFewDomains { replicas: u8, domains: usize, nodes: usize },
    #[error(
        "not enough free space: extent {extent} needs {bytes} bytes on {replicas} nodes in distinct failure domains"
    )]
    NoSpace { extent: u32, bytes: u64, replicas: u8 },
    #[error("node {0} is not registered (is its daemon running in cluster mode?)")]
    UnknownNode(String),
}

/// What a new volume needs.
#[derive(Debug, Clone)]
pub struct PlacementRequest<'a> {
    pub size_bytes: u64,
    pub extent_bytes: u64,
    pub replicas: u8,
    pub locality: Locality,
    /// The node the volume is created on (locality's anchor).
    pub local: Option<&'a str>,
}

/// Chooses the members of every extent of a new volume. All start in sync (a new volume reads
/// as zeroes everywhere).
pub fn place(req: &PlacementRequest<'_>, nodes: &[NodeInfo]) -> Result<Vec<ExtentMeta>, PlacementError> {
    let domains = count_domains(nodes);
    if domains < usize::from(req.replicas) {
        return Err(PlacementError::TooFewDomains { replicas: req.replicas, domains, nodes: nodes.len() });
    }
    let anchor = match (req.locality, req.local) {
        (Locality::Prefer, Some(local)) => {
            Some(nodes.iter().find(|n| n.name == local).ok_or_else(|| PlacementError::UnknownNode(local.to_owned()))?)
        }
        _ => None,
    };
    let mut free: BTreeMap<&str, u64> = nodes.iter().map(|n| (n.name.as_str(), n.free_bytes)).collect();
    let extents = req.size_bytes.div_ceil(req.extent_bytes);
    let mut out = Vec::with_capacity(extents as usize);
    for i in 0..extents {
        let bytes = req.size_bytes.saturating_sub(i * req.extent_bytes).min(req.extent_bytes);
        let mut chosen: Vec<&NodeInfo> = Vec::with_capacity(usize::from(req.replicas));
        if let Some(anchor) = anchor {
            if free[anchor.name.as_str()] >= bytes {
                chosen.push(anchor);
            }
        }
        while chosen.len() < usize::from(req.replicas) {
            let next = best_candidate(nodes, &chosen, &free, bytes, i).ok_or(PlacementError::NoSpace {
                extent: i as u32,
                bytes,
                replicas: req.replicas,
            })?;
            chosen.push(next);
        }
        for n in &chosen {
            *free.get_mut(n.name.as_str()).expect("chosen from nodes") -= bytes;
        }
        out.push(ExtentMeta { members: chosen.iter().map(|n| Member::new(&n.name, MemberState::InSync)).collect() });
    }
    Ok(out)
}

/// A node to replace `lost` in extent `extent` of `meta`: not yet a member, in a failure
/// domain none of the remaining members uses, with room for the extent; the roomiest wins.
pub fn replacement<'n>(meta: &VolumeMeta, extent: u32, lost: &str, nodes: &'n [NodeInfo]) -> Option<&'n NodeInfo> {
    let e = &meta.extents[extent as usize];
    let others: Vec<&NodeInfo> =
        e.members.iter().filter(|m| m.node != lost).filter_map(|m| nodes.iter().find(|n| n.name == m.node)).collect();
    let bytes = meta.extent_len(extent);
    let free: BTreeMap<&str, u64> = nodes.iter().map(|n| (n.name.as_str(), n.free_bytes)).collect();
    nodes
        .iter()
        .filter(|n| n.name != lost && e.member(&n.name).is_none())
        .filter(|n| !others.iter().any(|o| o.failure_domain() == n.failure_domain()))
        .filter(|n| free[n.name.as_str()] >= bytes)
        .max_by_key(|n| (n.free_bytes, spread_key(&n.name, extent.into())))
}

fn count_domains(nodes: &[NodeInfo]) -> usize {
    let mut domains: Vec<&str> = nodes.iter().map(NodeInfo::failure_domain).collect();
    domains.sort_unstable();
    domains.dedup();
    domains.len()
}

/// The roomiest node that is not chosen yet and shares no failure domain with the chosen ones.
/// Ties (equal free space, as on a fresh cluster) are broken by a per-extent hash, so extents
/// spread over the nodes instead of piling onto the alphabetically first ones.
fn best_candidate<'n>(
    nodes: &'n [NodeInfo],
    chosen: &[&NodeInfo],
    free: &BTreeMap<&str, u64>,
    bytes: u64,
    extent: u64,
) -> Option<&'n NodeInfo> {
    nodes
        .iter()
        .filter(|n| !chosen.iter().any(|c| c.name == n.name || c.failure_domain() == n.failure_domain()))
        .filter(|n| free[n.name.as_str()] >= bytes)
        .max_by_key(|n| (free[n.name.as_str()], spread_key(&n.name, extent)))
}

fn spread_key(name: &str, extent: u64) -> u64 {
    // FNV-1a over the name, mixed with the extent index: deterministic, cheap, well spread.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ extent.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, zone: Option<&str>, free: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            id: crate::meta::node_id(name),
            address: "198.18.1.1:7400".into(),
            zone: zone.map(Into::into),
            capacity_bytes: free,
            free_bytes: free,
            version: "test".into(),
            started_unix_s: 0,
        }
    }

    const G: u64 = 1 << 30;

    #[test]
    fn distinct_nodes_local_first_and_balanced() {
        let nodes: Vec<NodeInfo> = (1..=5).map(|i| node(&format!("n{i}"), None, 100 * G)).collect();
        let req = PlacementRequest {
            size_bytes: 20 * G,
            extent_bytes: G,
            replicas: 3,
            locality: Locality::Prefer,
            local: Some("n3"),
        };
        let extents = place(&req, &nodes).unwrap();
        assert_eq!(extents.len(), 20);
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        for e in &extents {
            assert_eq!(e.members[0].node, "n3", "locality: the creating node first");
            let mut names: Vec<&str> = e.members.iter().map(|m| m.node.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), 3);
            for m in &e.members {
                *per_node.entry(m.node.clone()).or_default() += 1;
            }
        }
        assert_eq!(per_node["n3"], 20);
        for n in ["n1", "n2", "n4", "n5"] {
            assert!((9..=11).contains(&per_node[n]), "{per_node:?}");
        }
    }

    #[test]
    fn zones_are_failure_domains() {
        let nodes = vec![
            node("a1", Some("a"), 100 * G),
            node("a2", Some("a"), 100 * G),
            node("b1", Some("b"), 100 * G),
            node("c1", Some("c"), 100 * G),
        ];
        let req =
            PlacementRequest { size_bytes: 8 * G, extent_bytes: G, replicas: 3, locality: Locality::None, local: None };
        for e in place(&req, &nodes).unwrap() {
            let zones: Vec<&str> = e.members.iter().map(|m| &m.node[..1]).collect();
            assert!(zones.contains(&"a") && zones.contains(&"b") && zones.contains(&"c"), "{zones:?}");
        }
        let four = PlacementRequest { replicas: 4, ..req };
        assert!(matches!(place(&four, &nodes), Err(PlacementError::TooFewDomains { domains: 3, .. })));
    }

    #[test]
    fn capacity_is_respected_and_named() {
        let nodes =
            vec![node("n1", None, 2 * G), node("n2", None, 10 * G), node("n3", None, 10 * G), node("n4", None, 10 * G)];
        let req = PlacementRequest {
            size_bytes: 4 * G,
            extent_bytes: G,
            replicas: 3,
            locality: Locality::Prefer,
            local: Some("n1"),
        };
        let extents = place(&req, &nodes).unwrap();
        let on_n1 = extents.iter().filter(|e| e.member("n1").is_some()).count();
        assert_eq!(on_n1, 2, "n1 holds what fits, the rest goes elsewhere");
        let huge = PlacementRequest { size_bytes: 40 * G, ..req };
        assert!(matches!(place(&huge, &nodes), Err(PlacementError::NoSpace { .. })));
        let unknown = PlacementRequest { local: Some("zz"), ..req };
        assert!(matches!(place(&unknown, &nodes), Err(PlacementError::UnknownNode(_))));
    }

    #[test]
    fn replacement_avoids_members_and_their_domains() {
        let nodes = vec![
            node("n1", None, 10 * G),
            node("n2", None, 10 * G),
            node("n3", None, 10 * G),
            node("n4", None, 5 * G),
            node("n5", None, 9 * G),
        ];
        let req = PlacementRequest {
            size_bytes: G,
            extent_bytes: G,
            replicas: 3,
            locality: Locality::Prefer,
            local: Some("n1"),
        };
        let extents = place(&req, &nodes).unwrap();
        let mut meta = crate::meta::tests_support::meta_with(extents);
        meta.extents[0].members = vec![
            Member::new("n1", MemberState::InSync),
            Member::new("n2", MemberState::InSync),
            Member::new("n3", MemberState::InSync),
        ];
        let r = replacement(&meta, 0, "n2", &nodes).unwrap();
        assert_eq!(r.name, "n5", "roomiest non-member");
        let only_members: Vec<NodeInfo> = nodes[..3].to_vec();
        assert!(replacement(&meta, 0, "n2", &only_members).is_none());
    }
}
