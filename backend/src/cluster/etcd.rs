//! A blocking facade over the async `etcd-client` crate: keys relative to a prefix, bytes as
//! values, revisions for compare-and-swap, and every call bounded by a timeout.
//!
//! The facade owns a tokio runtime with one worker thread (the gRPC connections' background
//! tasks run there); a call runs on the caller's thread inside `Runtime::block_on`, so several
//! daemon threads can call at once through clones of one [`Etcd`]. It must not be called from
//! inside an async runtime.

use super::error::{Cause, EtcdError};
use etcd_client as ec;
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tonic::Code;

/// Default root of hcblk's keys.
pub const DEFAULT_PREFIX: &str = "/hcblk/v1";
/// Default bound on reaching etcd at [`Etcd::connect`] (and on each new connection later).
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on every call, from the caller's point of view.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Operations per transaction: etcd's default `--max-txn-ops`.
pub const TXN_OPS_MAX: usize = 128;
/// Longest key accepted, relative to the prefix.
pub const KEY_BYTES_MAX: usize = 1024;
/// Keys fetched per range request by [`Etcd::list`].
const LIST_PAGE_KEYS: i64 = 500;
/// Pages [`Etcd::list`] reads before it refuses: a bound on memory and time.
const LIST_PAGES_MAX: i64 = 10_000;
/// Keys [`Etcd::list`] returns at most (5 million).
const LIST_KEYS_MAX: i64 = LIST_PAGES_MAX * LIST_PAGE_KEYS;
/// Longest timeout accepted in [`EtcdConfig`]; anything longer is a unit mistake.
const TIMEOUT_MAX: Duration = Duration::from_secs(600);

/// Where etcd is and how long to wait for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, `http://HOST:PORT` or `HOST:PORT`; at least one.
    /// No default. TLS (`https://`) is not supported by this build.
    pub endpoints: Vec<String>,
    /// Root of all keys, absolute, without a trailing `/`. Default [`DEFAULT_PREFIX`].
    pub prefix: String,
    /// Bound on establishing a connection. Default [`DEFAULT_DIAL_TIMEOUT`] (2 s).
    pub dial_timeout: Duration,
    /// Bound on every call, retries and pages included. Default [`DEFAULT_REQUEST_TIMEOUT`] (5 s).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration with the default prefix and timeouts.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Checks every field; returns the endpoints as URLs.
    fn validate(&self) -> Result<Vec<Endpoint>, EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoint given".into()));
        }
        let endpoints = self.endpoints.iter().map(|e| Endpoint::parse(e)).collect::<Result<Vec<_>, _>>()?;
        let p = &self.prefix;
        if !p.starts_with('/') || p.ends_with('/') || p.len() < 2 {
            return Err(EtcdError::Config(format!(
                "prefix {p:?} must be absolute and must not end with '/' (e.g. {DEFAULT_PREFIX})"
            )));
        }
        check_key(&p[1..]).map_err(|_| {
            EtcdError::Config(format!("prefix {p:?}: segments must be non-empty printable ASCII without spaces"))
        })?;
        for (name, t) in [("dial timeout", self.dial_timeout), ("request timeout", self.request_timeout)] {
            if t.is_zero() || t > TIMEOUT_MAX {
                return Err(EtcdError::Config(format!("{name} {t:?} is out of range (0, {TIMEOUT_MAX:?}]")));
            }
        }
        Ok(endpoints)
    }
}

#[derive(Clone, Debug)]
struct Endpoint {
    /// `http://HOST:PORT`, as given to the gRPC client.
    url: String,
}

impl Endpoint {
    fn parse(s: &str) -> Result<Self, EtcdError> {
        let bad = |why: &str| EtcdError::Config(format!("etcd endpoint {s:?}: {why}"));
        if s.starts_with("https://") {
            return Err(bad("TLS (https) is not supported; use http://HOST:PORT"));
        }
        let authority = s.strip_prefix("http://").unwrap_or(s);
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) || authority.contains("://") {
            return Err(bad("expected http://HOST:PORT"));
        }
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(bad("no port (etcd's client port is usually 2379)"));
        };
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("expected http://HOST:PORT with a port in 1..=65535"));
        }
        Ok(Self { url: format!("http://{authority}") })
    }
}

/// A lease: keys attached to it are deleted when it expires or is revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    /// Hex, as etcdctl prints lease ids.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted lease and the TTL etcd chose (at least the one asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// One key as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// Relative to the prefix, e.g. `volumes/vol0`.
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last change of this key: what a compare-and-swap expects.
    pub mod_revision: u64,
    /// Revision that created this key (since it last did not exist).
    pub create_revision: u64,
    /// Changes since creation (1 = just created).
    pub version: u64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A write that rides in the same transaction as a compare-and-swap, unconditionally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put { key: key.into(), value: value.into() }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// Result of [`Etcd::create_all`] and [`Etcd::create_with_lease`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Every key was absent and is now written, at this revision.
    Created { revision: u64 },
    /// At least one key existed, so nothing was written; these are the keys that existed, as
    /// read in the same transaction.
    Exists { present: Vec<Kv> },
}

/// Result of a compare-and-swap or compare-and-delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key had the expected revision; the write and the extra ops are applied. `revision`
    /// is the key's new `mod_revision` (for a delete: the revision of the deletion).
    Committed { revision: u64 },
    /// The key had changed (or existed / did not exist against expectation): nothing was
    /// written. `current` is the key as read in the same transaction, so the caller can decide
    /// and retry without another round trip.
    Conflict { current: Option<Kv> },
}

/// What a failed call was doing, for its error.
struct Call<'a> {
    op: &'static str,
    key: &'a str,
    /// A write whose outcome is unknown when the answer does not arrive.
    write: bool,
    lease: Option<LeaseId>,
}

/// Failures inside a call: the client's own, or ours (a malformed answer).
enum Fail {
    Client(ec::Error),
    Etcd(EtcdError),
}

impl From<ec::Error> for Fail {
    fn from(e: ec::Error) -> Self {
        Fail::Client(e)
    }
}

impl From<EtcdError> for Fail {
    fn from(e: EtcdError) -> Self {
        Fail::Etcd(e)
    }
}

/// A blocking etcd client; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    /// One gRPC client per endpoint, each with a generation number bumped when a timeout makes
    /// us drop its connection and dial afresh (see [`Etcd::redial`]). Declared before `runtime`
    /// so they are dropped first, while the runtime still exists.
    clients: Vec<RwLock<(u64, ec::Client)>>,
    runtime: tokio::runtime::Runtime,
    /// The endpoint a call tries first: the last one that answered, or the one after the last
    /// that failed.
    preferred: AtomicUsize,
    endpoints: Vec<Endpoint>,
    /// The endpoints as one line, for errors.
    endpoints_line: String,
    options: ec::ConnectOptions,
    /// `prefix + "/"`: prepended to every relative key.
    root: String,
    config: EtcdConfig,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Etcd {
    /// Validates `config` and reads once from etcd, trying each endpoint in turn within one dial
    /// timeout each. If etcd is down the error is [`EtcdError::Unreachable`]: at once when every
    /// connection is refused, otherwise after the dial timeouts.
    pub fn connect(config: EtcdConfig) -> Result<Self, EtcdError> {
        let endpoints = config.validate()?;
        let endpoints_line = endpoints.iter().map(|e| e.url.as_str()).collect::<Vec<_>>().join(", ");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hcblk-etcd")
            .enable_all()
            .build()
            .map_err(EtcdError::Runtime)?;
        // require_leader: a member cut off from its quorum answers "no leader" at once instead
        // of holding the request until our timeout.
        let options = ec::ConnectOptions::new().with_connect_timeout(config.dial_timeout).with_require_leader(true);
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in &endpoints {
            let client = runtime
                .block_on(ec::Client::connect([e.url.as_str()], Some(options.clone())))
                .map_err(|err| EtcdError::Config(format!("etcd endpoint {}: {err}", e.url)))?;
            clients.push(RwLock::new((0, client)));
        }
        let root = format!("{}/", config.prefix);
        let etcd = Etcd {
            inner: Arc::new(Inner {
                clients,
                runtime,
                preferred: AtomicUsize::new(0),
                endpoints,
                endpoints_line,
                options,
                root,
                config,
            }),
        };
        // One real request, so "connected" means etcd answers (a port that accepts TCP may be
        // something else, or a member without a leader). A dial timeout per endpoint.
        let n = u32::try_from(etcd.inner.endpoints.len()).unwrap_or(u32::MAX);
        let budget = etcd.inner.config.dial_timeout.saturating_mul(n);
        let probe_key = etcd.inner.config.prefix.as_str();
        let probe =
            etcd.run_for(budget, Call { op: "probe", key: "", write: false, lease: None }, |mut c| async move {
                c.get(probe_key, Some(ec::GetOptions::new().with_count_only())).await?;
                Ok(())
            });
        let unreachable = |cause: String| EtcdError::Unreachable {
            endpoints: etcd.inner.endpoints_line.clone(),
            timeout: budget,
            cause: Cause(cause),
        };
        match probe {
            Ok(()) => Ok(etcd),
            Err(EtcdError::Unreachable { cause, .. }) => Err(unreachable(cause.0)),
            // "etcdserver: no leader": up, but unable to serve.
            Err(EtcdError::Server { code, message, .. }) if code == "Unavailable" => {
                Err(unreachable(format!("{code}: {message}")))
            }
            Err(e) => Err(e),
        }
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The value, revisions and lease of `key`, or `None` if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        check_key(key)?;
        let abs = self.abs(key);
        let resp = self.run(Call { op: "get", key, write: false, lease: None }, |mut c| {
            let abs = abs.as_str();
            async move { Ok(c.get(abs, None).await?) }
        })?;
        resp.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    /// Every key that starts with `prefix` (relative, a text prefix: `nodes/` lists the nodes,
    /// `""` everything under the root), in key order, read at one revision, which is returned
    /// with them: a watch from `revision + 1` misses nothing. Reads pages of 500 keys; the whole
    /// listing is bounded by one request timeout.
    pub fn list(&self, prefix: &str) -> Result<(Vec<Kv>, u64), EtcdError> {
        if !prefix.is_empty() {
            check_key(prefix.strip_suffix('/').unwrap_or(prefix))?;
        }
        let start = self.abs(prefix);
        let end = range_end(start.as_bytes());
        let call = Call { op: "list", key: prefix, write: false, lease: None };
        let (pages, revision) = self.run(call, |c| list_pages(c, start.as_bytes(), &end, prefix))?;
        let kvs = pages.iter().flatten().map(|kv| self.kv(kv)).collect::<Result<Vec<_>, _>>()?;
        Ok((kvs, revision_u64(revision, prefix)?))
    }

    /// Writes every key, atomically, if none of them exists (`version == 0`); otherwise writes
    /// nothing and returns the ones that exist.
    pub fn create_all<K: AsRef<str>, V: AsRef<[u8]>>(&self, kvs: &[(K, V)]) -> Result<CreateOutcome, EtcdError> {
        let Some(first) = kvs.first().map(|(k, _)| k.as_ref()) else {
            return Err(EtcdError::InvalidRequest("create_all of no key".into()));
        };
        check_ops(kvs.iter().map(|(k, _)| k.as_ref()), kvs.len())?;
        let mut when = Vec::with_capacity(kvs.len());
        let mut then = Vec::with_capacity(kvs.len());
        let mut orelse = Vec::with_capacity(kvs.len());
        for (k, v) in kvs {
            let abs = self.abs(k.as_ref());
            when.push(ec::Compare::version(abs.clone(), ec::CompareOp::Equal, 0));
            then.push(ec::TxnOp::put(abs.clone(), v.as_ref(), None));
            orelse.push(ec::TxnOp::get(abs, None));
        }
        self.create_txn("create", first, ec::Txn::new().when(when).and_then(then).or_else(orelse), None)
    }

    /// Writes `key` attached to `lease` if it does not exist.
    pub fn create_with_lease(&self, key: &str, value: &[u8], lease: LeaseId) -> Result<CreateOutcome, EtcdError> {
        check_key(key)?;
        let abs = self.abs(key);
        let txn = ec::Txn::new()
            .when([ec::Compare::version(abs.clone(), ec::CompareOp::Equal, 0)])
            .and_then([ec::TxnOp::put(abs.clone(), value, Some(ec::PutOptions::new().with_lease(lease.0)))])
            .or_else([ec::TxnOp::get(abs, None)]);
        self.create_txn("create", key, txn, Some(lease))
    }

    fn create_txn(
        &self,
        op: &'static str,
        key: &str,
        txn: ec::Txn,
        lease: Option<LeaseId>,
    ) -> Result<CreateOutcome, EtcdError> {
        let resp = self.run(Call { op, key, write: true, lease }, |mut c| {
            let txn = txn.clone();
            async move { Ok(c.txn(txn).await?) }
        })?;
        if resp.succeeded() {
            return Ok(CreateOutcome::Created { revision: self.header_revision(resp.header(), key)? });
        }
        let mut present = Vec::new();
        for r in resp.op_responses() {
            if let ec::TxnOpResponse::Get(g) = r {
                for kv in g.kvs() {
                    present.push(self.kv(kv)?);
                }
            }
        }
        Ok(CreateOutcome::Exists { present })
    }

    /// Writes `value` to `key` if the key's `mod_revision` is `expect_mod_revision` (`0`: if the
    /// key does not exist), together with `extra`, in one transaction. A put without a lease:
    /// the key is detached from any lease it had.
    pub fn compare_and_swap(
        &self,
        key: &str,
        expect_mod_revision: u64,
        value: &[u8],
        extra: &[Op],
    ) -> Result<CasOutcome, EtcdError> {
        let abs = self.abs(key);
        let main = ec::TxnOp::put(abs, value, None);
        self.cas("compare-and-swap", key, expect_mod_revision, main, extra)
    }

    /// Deletes `key` if its `mod_revision` is `expect_mod_revision`, together with `extra`, in
    /// one transaction. `expect_mod_revision` must not be 0 (there is nothing to delete).
    pub fn compare_and_delete(
        &self,
        key: &str,
        expect_mod_revision: u64,
        extra: &[Op],
    ) -> Result<CasOutcome, EtcdError> {
        if expect_mod_revision == 0 {
            return Err(EtcdError::InvalidRequest(format!(
                "compare-and-delete of {key} expecting revision 0 (absent): there would be nothing to delete"
            )));
        }
        let main = ec::TxnOp::delete(self.abs(key), None);
        self.cas("compare-and-delete", key, expect_mod_revision, main, extra)
    }

    fn cas(
        &self,
        op: &'static str,
        key: &str,
        expect: u64,
        main: ec::TxnOp,
        extra: &[Op],
    ) -> Result<CasOutcome, EtcdError> {
        check_ops(std::iter::once(key).chain(extra.iter().map(Op::key)), 1 + extra.len())?;
        let abs = self.abs(key);
        let compare = if expect == 0 {
            ec::Compare::version(abs.clone(), ec::CompareOp::Equal, 0)
        } else {
            let expect = i64::try_from(expect).map_err(|_| {
                EtcdError::InvalidRequest(format!("{op} of {key}: revision {expect} out of etcd's range"))
            })?;
            ec::Compare::mod_revision(abs.clone(), ec::CompareOp::Equal, expect)
        };
        let mut then = Vec::with_capacity(1 + extra.len());
        then.push(main);
        for o in extra {
            then.push(match o {
                Op::Put { key, value } => ec::TxnOp::put(self.abs(key), value.clone(), None),
                Op::Delete { key } => ec::TxnOp::delete(self.abs(key), None),
            });
        }
        let txn = ec::Txn::new().when([compare]).and_then(then).or_else([ec::TxnOp::get(abs, None)]);
        self.guarded(op, key, txn, None)
    }

    /// Writes `value` to `key`, still attached to `lease`, if the key exists and is attached to
    /// `lease`; a [`CasOutcome::Conflict`] otherwise (the key expired, was deleted, or belongs
    /// to someone else's lease now).
    pub fn update_leased(&self, key: &str, value: &[u8], lease: LeaseId) -> Result<CasOutcome, EtcdError> {
        check_key(key)?;
        let abs = self.abs(key);
        let txn = ec::Txn::new()
            .when([ec::Compare::lease(abs.clone(), ec::CompareOp::Equal, lease.0)])
            .and_then([ec::TxnOp::put(abs.clone(), value, Some(ec::PutOptions::new().with_lease(lease.0)))])
            .or_else([ec::TxnOp::get(abs, None)]);
        self.guarded("leased put", key, txn, Some(lease))
    }

    /// Writes `value` to `key` attached to `lease`, whatever the key held before (a status the
    /// previous owner published under its own lease is taken over). Returns the new revision.
    /// [`EtcdError::LeaseNotFound`] if the lease is gone.
    pub fn put_leased(&self, key: &str, value: &[u8], lease: LeaseId) -> Result<u64, EtcdError> {
        check_key(key)?;
        let abs = self.abs(key);
        let resp = self.run(Call { op: "leased put", key, write: true, lease: Some(lease) }, |mut c| {
            let abs = abs.as_str();
            async move { Ok(c.put(abs, value, Some(ec::PutOptions::new().with_lease(lease.0))).await?) }
        })?;
        self.header_revision(resp.header(), key)
    }

    /// Runs a transaction whose else-branch reads `key`.
    fn guarded(
        &self,
        op: &'static str,
        key: &str,
        txn: ec::Txn,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome, EtcdError> {
        let resp = self.run(Call { op, key, write: true, lease }, |mut c| {
            let txn = txn.clone();
            async move { Ok(c.txn(txn).await?) }
        })?;
        if resp.succeeded() {
            return Ok(CasOutcome::Committed { revision: self.header_revision(resp.header(), key)? });
        }
        let current = match resp.op_responses().into_iter().next() {
            Some(ec::TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| self.kv(kv)).transpose()?,
            _ => {
                return Err(EtcdError::Malformed {
                    key: key.to_owned(),
                    reason: format!("{op}: failed transaction without the read of its else-branch"),
                })
            }
        };
        Ok(CasOutcome::Conflict { current })
    }

    /// A new lease of `ttl` (whole seconds, at least 1). etcd may grant more than asked (its
    /// minimum follows its election timeout).
    pub fn lease_grant(&self, ttl: Duration) -> Result<Lease, EtcdError> {
        if ttl.subsec_nanos() != 0 || ttl.as_secs() == 0 || ttl > TIMEOUT_MAX {
            return Err(EtcdError::InvalidRequest(format!("lease TTL {ttl:?}: whole seconds in 1..=600")));
        }
        let secs = i64::try_from(ttl.as_secs()).expect("<= 600");
        let resp = self.run(Call { op: "lease grant", key: "", write: true, lease: None }, |mut c| async move {
            Ok(c.lease_grant(secs, None).await?)
        })?;
        if !resp.error().is_empty() {
            return Err(EtcdError::Server {
                op: "lease grant",
                key: String::new(),
                code: "LeaseGrant".into(),
                message: resp.error().to_owned(),
            });
        }
        let granted = u64::try_from(resp.ttl()).ok().filter(|&t| t > 0).ok_or_else(|| EtcdError::Malformed {
            key: String::new(),
            reason: format!("lease granted with TTL {} s", resp.ttl()),
        })?;
        Ok(Lease { id: LeaseId(resp.id()), ttl: Duration::from_secs(granted) })
    }

    /// Renews `lease` for its whole TTL, once. [`EtcdError::LeaseNotFound`] if it is gone.
    pub fn lease_keep_alive(&self, lease: LeaseId) -> Result<(), EtcdError> {
        // One request on a fresh stream: with one renewal every few seconds, a stream kept
        // open would only add a state (half-dead streams) to watch over.
        self.run(Call { op: "lease keep-alive", key: "", write: false, lease: Some(lease) }, |mut c| async move {
            let (_keeper, _stream) = c.lease_keep_alive(lease.0).await?;
            Ok(())
        })
    }

    /// Time left on `lease`, or `None` if it has expired or was revoked.
    pub fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, EtcdError> {
        let call = Call { op: "lease time-to-live", key: "", write: false, lease: Some(lease) };
        let resp = self.run(call, |mut c| async move { Ok(c.lease_time_to_live(lease.0, None).await?) })?;
        // etcd answers TTL -1 for a lease it does not know.
        Ok(u64::try_from(resp.ttl()).ok().map(Duration::from_secs))
    }

    /// Revokes `lease`: every key attached to it is deleted at once.
    /// [`EtcdError::LeaseNotFound`] if it had already expired.
    pub fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.run(Call { op: "lease revoke", key: "", write: true, lease: Some(lease) }, |mut c| async move {
            c.lease_revoke(lease.0).await?;
            Ok(())
        })
    }

    fn abs(&self, key: &str) -> String {
        format!("{}{key}", self.inner.root)
    }

    fn kv(&self, kv: &ec::KeyValue) -> Result<Kv, EtcdError> {
        let lossy = || String::from_utf8_lossy(kv.key()).into_owned();
        let abs = std::str::from_utf8(kv.key())
            .map_err(|_| EtcdError::Malformed { key: lossy(), reason: "key is not UTF-8".into() })?;
        let key = abs.strip_prefix(self.inner.root.as_str()).ok_or_else(|| EtcdError::Malformed {
            key: lossy(),
            reason: format!("key is outside the prefix {}", self.inner.root),
        })?;
        let rev = |what: &str, r: i64| {
            u64::try_from(r).map_err(|_| EtcdError::Malformed { key: key.to_owned(), reason: format!("{what} {r}") })
        };
        Ok(Kv {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            mod_revision: rev("mod_revision", kv.mod_revision())?,
            create_revision: rev("create_revision", kv.create_revision())?,
            version: rev("version", kv.version())?,
            lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
        })
    }

    fn header_revision(&self, h: Option<&ec::ResponseHeader>, key: &str) -> Result<u64, EtcdError> {
        match h {
            Some(h) => revision_u64(h.revision(), key),
            None => Err(EtcdError::Malformed { key: key.to_owned(), reason: "response without header".into() }),
        }
    }

    fn run<T, F, Fut>(&self, call: Call<'_>, f: F) -> Result<T, EtcdError>
    where
        F: Fn(ec::Client) -> Fut,
        Fut: Future<Output = Result<T, Fail>>,
    {
        self.run_for(self.inner.config.request_timeout, call, f)
    }

    /// Runs `f` on the caller's thread with the client of one endpoint after the other, all
    /// within `budget`. The next endpoint is tried only when the request provably never left
    /// (its connection could not be established); any other failure is final, since a write
    /// that may have been applied must not be sent again.
    fn run_for<T, F, Fut>(&self, budget: Duration, call: Call<'_>, f: F) -> Result<T, EtcdError>
    where
        F: Fn(ec::Client) -> Fut,
        Fut: Future<Output = Result<T, Fail>>,
    {
        let inner = &self.inner;
        let n = inner.endpoints.len();
        let deadline = Instant::now() + budget;
        let first = inner.preferred.load(Ordering::Relaxed) % n;
        let mut refused = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                break;
            };
            let (generation, client) = {
                let g = inner.clients[idx].read().unwrap_or_else(PoisonError::into_inner);
                (g.0, g.1.clone())
            };
            let out = inner.runtime.block_on(async { tokio::time::timeout(left, f(client)).await });
            let next = (idx + 1) % n;
            match out {
                Ok(Ok(v)) => {
                    inner.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(Fail::Etcd(e))) => return Err(e),
                Ok(Err(Fail::Client(e))) => {
                    if let Some(why) = never_sent(&e) {
                        refused.push(format!("{}: {why}", inner.endpoints[idx].url));
                        inner.preferred.store(next, Ordering::Relaxed);
                        continue;
                    }
                    let e = self.classify(&call, &inner.endpoints[idx].url, e, budget);
                    if matches!(e, EtcdError::Unreachable { .. } | EtcdError::OutcomeUnknown { .. }) {
                        // This member may be going away: the next call starts with another.
                        inner.preferred.store(next, Ordering::Relaxed);
                    }
                    return Err(e);
                }
                Err(_) => {
                    self.redial(idx, generation);
                    inner.preferred.store(next, Ordering::Relaxed);
                    let cause = Cause(format!("{}: no answer within {budget:?}", inner.endpoints[idx].url));
                    return Err(if call.write {
                        EtcdError::OutcomeUnknown { op: call.op, key: call.key.to_owned(), cause }
                    } else {
                        EtcdError::Unreachable { endpoints: inner.endpoints_line.clone(), timeout: budget, cause }
                    });
                }
            }
        }
        // No endpoint took the request (or the budget ran out between refusals): nothing was
        // sent, so even a write is merely "unreachable".
        if refused.is_empty() {
            refused.push(format!("no answer within {budget:?}"));
        }
        let cause = Cause(refused.join("; "));
        Err(EtcdError::Unreachable { endpoints: inner.endpoints_line.clone(), timeout: budget, cause })
    }

    /// After a timeout: replaces the endpoint's client, so later calls dial a new connection
    /// instead of queueing on one to a member that died silently (no RST), which the transport
    /// would only notice after the kernel's TCP timeouts, minutes later. Calls in flight keep
    /// the old client until they end. `generation` is the one the timed-out call used: when
    /// several calls time out together, only the first replaces it.
    fn redial(&self, idx: usize, generation: u64) {
        let mut g = self.inner.clients[idx].write().unwrap_or_else(PoisonError::into_inner);
        if g.0 != generation {
            return;
        }
        let url = self.inner.endpoints[idx].url.as_str();
        // Connecting is lazy (no I/O here); it needs the runtime only to spawn the balancer.
        match self.inner.runtime.block_on(ec::Client::connect([url], Some(self.inner.options.clone()))) {
            Ok(c) => *g = (generation + 1, c),
            Err(e) => tracing::warn!(endpoint = url, error = %e, "cannot rebuild the etcd client; keeping the old one"),
        }
    }

    /// Sorts a failure of `call` at endpoint `url` (bounded by `timeout`) into what the caller
    /// must do about it.
    fn classify(&self, call: &Call<'_>, url: &str, e: ec::Error, timeout: Duration) -> EtcdError {
        let unreachable = |cause: String| EtcdError::Unreachable {
            endpoints: self.inner.endpoints_line.clone(),
            timeout,
            cause: Cause(format!("{url}: {cause}")),
        };
        let unknown = |cause: String| EtcdError::OutcomeUnknown {
            op: call.op,
            key: call.key.to_owned(),
            cause: Cause(format!("{url}: {cause}")),
        };
        match e {
            ec::Error::GRpcStatus(s) => {
                let message = s.message().to_owned();
                if let Some(lease) = call.lease {
                    if s.code() == Code::NotFound && message.contains("lease not found") {
                        return EtcdError::LeaseNotFound { lease };
                    }
                }
                let cause = status_cause(&s);
                // etcd's own errors start with "etcdserver:"; others come from the transport.
                let from_etcd = message.starts_with("etcdserver:");
                match s.code() {
                    // The request may have reached etcd and been applied ("request timed out",
                    // "leader changed", a connection reset after sending).
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
                    | Code::Aborted
                        if call.write =>
                    {
                        unknown(cause)
                    }
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown if !from_etcd => {
                        unreachable(cause)
                    }
                    code => {
                        EtcdError::Server { op: call.op, key: call.key.to_owned(), code: format!("{code:?}"), message }
                    }
                }
            }
            ec::Error::LeaseKeepAliveError(m) if m.contains("lease not found") => match call.lease {
                Some(lease) => EtcdError::LeaseNotFound { lease },
                None => unreachable(m),
            },
            // The keep-alive stream ended before its first answer: the connection went away.
            ec::Error::WatchError(m) | ec::Error::LeaseKeepAliveError(m) => {
                if call.write {
                    unknown(m)
                } else {
                    unreachable(m)
                }
            }
            ec::Error::TransportError(t) => {
                let cause = error_chain(&t);
                if call.write {
                    unknown(cause)
                } else {
                    unreachable(cause)
                }
            }
            ec::Error::IoError(io) => {
                if call.write {
                    unknown(io.to_string())
                } else {
                    unreachable(io.to_string())
                }
            }
            other => EtcdError::InvalidRequest(format!("{} of {}: {other}", call.op, call.key)),
        }
    }
}

/// The pages of keys from `start` (inclusive) to `end` (exclusive), all read at the revision of
/// the first page, and that revision.
async fn list_pages(
    mut c: ec::Client,
    start: &[u8],
    end: &[u8],
    prefix: &str,
) -> Result<(Vec<Vec<ec::KeyValue>>, i64), Fail> {
    let mut pages = Vec::new();
    let mut from = start.to_vec();
    let mut revision = 0;
    for _ in 0..LIST_PAGES_MAX {
        let mut opts = ec::GetOptions::new().with_range(end).with_limit(LIST_PAGE_KEYS);
        if revision != 0 {
            // Later pages at the first page's revision: one consistent snapshot.
            opts = opts.with_revision(revision);
        }
        let mut resp = c.get(from.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = match resp.header() {
                Some(h) => h.revision(),
                None => {
                    let reason = "range response without header".into();
                    return Err(EtcdError::Malformed { key: prefix.to_owned(), reason }.into());
                }
            };
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        match kvs.last() {
            Some(last) if more => {
                // The smallest key after `last`.
                from = last.key().to_vec();
                from.push(0);
                pages.push(kvs);
            }
            _ => {
                pages.push(kvs);
                return Ok((pages, revision));
            }
        }
    }
    Err(EtcdError::InvalidRequest(format!("more than {LIST_KEYS_MAX} keys under one prefix")).into())
}

/// `CODE: message: causes`, one line.
fn status_cause(s: &tonic::Status) -> String {
    let head = format!("{:?}: {}", s.code(), s.message());
    match std::error::Error::source(s) {
        Some(src) => chain_onto(head, src),
        None => head,
    }
}

/// An error and its causes, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    match e.source() {
        Some(src) => chain_onto(e.to_string(), src),
        None => e.to_string(),
    }
}

/// Appends `cause` and its causes to `out`, skipping a text already said (transport errors
/// often repeat their parent's words: "transport error: transport error: ...").
fn chain_onto(mut out: String, cause: &dyn std::error::Error) -> String {
    let mut cause = Some(cause);
    // Bounded: error chains are short, but a cyclic source() would otherwise never end.
    for _ in 0..16 {
        let Some(c) = cause else { break };
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Why the request behind `e` was never sent, if it provably was not: tonic's reconnecting
/// service returns its connection's [`tonic::ConnectError`] instead of sending the request.
fn never_sent(e: &ec::Error) -> Option<String> {
    let top: &(dyn std::error::Error + 'static) = match e {
        ec::Error::GRpcStatus(s) => s,
        ec::Error::TransportError(t) => t,
        _ => return None,
    };
    let mut cause = Some(top);
    // Bounded: error chains are short, but a cyclic source() would otherwise never end.
    for _ in 0..16 {
        let c = cause?;
        if let Some(connect) = c.downcast_ref::<tonic::ConnectError>() {
            return Some(error_chain(connect));
        }
        cause = c.source();
    }
    None
}

fn revision_u64(r: i64, key: &str) -> Result<u64, EtcdError> {
    u64::try_from(r).map_err(|_| EtcdError::Malformed { key: key.to_owned(), reason: format!("revision {r}") })
}

/// The end of the range of keys that start with `prefix`: the prefix with its last byte below
/// 0xff incremented (etcd's convention; `\0` means "to the end").
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A relative key: `/`-separated segments of printable ASCII (no space), none empty, `.` or
/// `..`, at most [`KEY_BYTES_MAX`] bytes.
pub(crate) fn check_key(key: &str) -> Result<(), EtcdError> {
    let bad = |why: &str| Err(EtcdError::InvalidRequest(format!("key {key:?}: {why}")));
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > KEY_BYTES_MAX {
        return bad("longer than 1024 bytes");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("only printable ASCII without spaces is allowed");
    }
    if key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return bad("a segment is empty, '.' or '..' (keys are relative: no leading or trailing '/')");
    }
    Ok(())
}

/// Every key valid, none twice (etcd refuses a transaction that writes a key twice), at most
/// [`TXN_OPS_MAX`] operations.
fn check_ops<'a>(keys: impl Iterator<Item = &'a str>, count: usize) -> Result<(), EtcdError> {
    if count > TXN_OPS_MAX {
        return Err(EtcdError::InvalidRequest(format!(
            "{count} operations in one transaction (etcd allows {TXN_OPS_MAX})"
        )));
    }
    let mut seen = HashSet::with_capacity(count);
    for k in keys {
        check_key(k)?;
        if !seen.insert(k) {
            return Err(EtcdError::InvalidRequest(format!("key {k:?} is written twice in one transaction")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_are_refused_with_the_reason() {
        let e = Endpoint::parse("http://10.0.0.1:2379").unwrap();
        assert_eq!(e.url, "http://10.0.0.1:2379");
        let e = Endpoint::parse("etcd-a:2379/").unwrap();
        assert_eq!(e.url, "http://etcd-a:2379");
        assert_eq!(Endpoint::parse("http://[::1]:2379").unwrap().url, "http://[::1]:2379");
        for (bad, why) in [
            ("https://a:2379", "TLS"),
            ("http://a", "no port"),
            ("a:0", "port in 1..=65535"),
            ("a:http", "port in 1..=65535"),
            (":2379", "port in 1..=65535"),
            ("http://a:2379/v3", "expected"),
            ("", "expected"),
            ("unix://x:1", "expected"),
        ] {
            let msg = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(msg.contains(why), "{bad}: {msg}");
        }
    }

    #[test]
    fn config_is_validated_never_fixed() {
        let ok = EtcdConfig::new(vec!["127.0.0.1:2379".into()]);
        assert_eq!(ok.validate().unwrap().len(), 1);
        let mut c = ok.clone();
        c.endpoints.clear();
        assert!(matches!(c.validate(), Err(EtcdError::Config(_))));
        for prefix in ["hcblk", "/hcblk/", "/", "", "/a//b", "/a b"] {
            let mut c = ok.clone();
            c.prefix = prefix.into();
            assert!(matches!(c.validate(), Err(EtcdError::Config(_))), "{prefix:?}");
        }
        for t in [Duration::ZERO, Duration::from_secs(601)] {
            let mut c = ok.clone();
            c.request_timeout = t;
            assert!(matches!(c.validate(), Err(EtcdError::Config(_))), "{t:?}");
            let mut c = ok.clone();
            c.dial_timeout = t;
            assert!(matches!(c.validate(), Err(EtcdError::Config(_))), "{t:?}");
        }
    }

    #[test]
    fn keys_are_checked() {
        for good in ["cluster", "nodes/a", "audit/vol0/2026-01-01T00:00:00Z", "volume-ids/42"] {
            check_key(good).unwrap();
        }
        for bad in ["", "/nodes/a", "nodes/", "nodes//a", "a/./b", "a/../b", "a b", "nodé", "a\n"] {
            assert!(matches!(check_key(bad), Err(EtcdError::InvalidRequest(_))), "{bad:?}");
        }
        assert!(check_key(&"k".repeat(KEY_BYTES_MAX)).is_ok());
        assert!(check_key(&"k".repeat(KEY_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn transactions_refuse_duplicate_keys_and_too_many_ops() {
        check_ops(["a", "b"].into_iter(), 2).unwrap();
        let e = check_ops(["a", "b", "a"].into_iter(), 3).unwrap_err();
        assert!(e.to_string().contains("written twice"), "{e}");
        let many: Vec<String> = (0..=TXN_OPS_MAX).map(|i| format!("k{i}")).collect();
        let e = check_ops(many.iter().map(String::as_str), many.len()).unwrap_err();
        assert!(e.to_string().contains("129 operations"), "{e}");
    }

    #[test]
    fn range_end_covers_exactly_the_prefix() {
        assert_eq!(range_end(b"/hcblk/v1/nodes/"), b"/hcblk/v1/nodes0".to_vec());
        assert_eq!(range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn only_a_failed_connection_counts_as_never_sent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(connect.code(), Code::Unavailable);
        let why = never_sent(&ec::Error::GRpcStatus(connect)).expect("a connect error is never sent");
        assert!(why.contains("refused"), "{why}");
        // The same code from anywhere else (etcd's "request timed out", a reset connection)
        // says nothing about whether the request arrived.
        for s in [
            tonic::Status::unavailable("etcdserver: request timed out"),
            tonic::Status::from_error(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))),
        ] {
            assert_eq!(never_sent(&ec::Error::GRpcStatus(s)), None);
        }
        assert_eq!(never_sent(&ec::Error::InvalidArgs("x".into())), None);
    }

    #[test]
    fn the_client_can_be_shared_between_threads() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Etcd>();
    }

    #[test]
    fn lease_ids_print_in_hex_like_etcdctl() {
        assert_eq!(LeaseId(0x694d_7c1f_2a3b_0c01).to_string(), "694d7c1f2a3b0c01");
    }

    #[test]
    fn connect_to_nothing_is_one_unreachable_error_naming_every_endpoint() {
        // Two ports nobody listens on: bind, note, close.
        let ports: Vec<u16> =
            (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let started = Instant::now();
        let e = Etcd::connect(EtcdConfig::new(endpoints)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        let EtcdError::Unreachable { .. } = &e else { panic!("{e:?}") };
        let line = crate::control::chain(&e);
        for p in ports {
            assert!(line.contains(&format!("http://127.0.0.1:{p}")), "{line}");
        }
        assert!(line.contains("refused"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }
}
