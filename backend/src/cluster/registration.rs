//! A node's presence in etcd: `nodes/<name>` attached to a lease that a background thread keeps
//! alive. The key disappears when the daemon stops (the lease is revoked) or dies (the lease
//! expires one TTL after the last renewal), which is how the other nodes see it go.

use super::etcd::{CasOutcome, CreateOutcome, Etcd, Kv, Lease, LeaseId};
use super::{keys, EtcdError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Default lease TTL of a node registration.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Longest wait between two attempts while the node is not registered.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Shortest time between two writes of a changed value: a caller updating in a loop costs
/// etcd at most ten writes a second (values in between are skipped; the latest is written).
const UPDATE_SPACING: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// Lease TTL, whole seconds in 1..=600; the lease is renewed every TTL/3, so the node key
    /// outlives a dead daemon by at most one TTL. Default [`DEFAULT_TTL`] (10 s).
    pub ttl: Duration,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self { ttl: DEFAULT_TTL }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrationError {
    /// Another live daemon holds the name (or this one's previous run, which crashed less than
    /// a TTL ago: its key goes away when its lease expires).
    #[error(
        "node name {name:?} is registered in etcd by another live daemon (lease {lease}, {}); \
         two daemons must not share a node name. If that daemon is gone, its registration \
         expires within the time left",
        match .ttl_left { Some(t) => format!("{} s left", t.as_secs()), None => "time left unknown".into() }
    )]
    NameInUse { name: String, lease: LeaseId, ttl_left: Option<Duration> },
    /// The node key exists but is attached to no lease, so it will never expire by itself.
    #[error(
        "etcd key {key} exists without a lease (not written by an hcblk daemon); delete it to register \
         node {name:?}"
    )]
    KeyWithoutLease { name: String, key: String },
    #[error("invalid node registration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("cannot start the node registration thread")]
    Thread(#[source] std::io::Error),
}

/// Keeps `nodes/<name>` registered under a lease from a background thread.
///
/// When the lease is lost (etcd unreachable for longer than the TTL, or the lease expired or
/// was revoked) it says so ([`is_registered`](Self::is_registered) turns false, logged once)
/// and grants a new lease and writes the key again as soon as etcd answers. Dropping it stops
/// the thread and revokes the lease, so the key disappears at once; that takes at most two
/// request timeouts (a call in flight, then the revoke).
#[derive(Debug)]
pub struct NodeRegistration {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    etcd: Etcd,
    name: String,
    key: String,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    registered: AtomicBool,
}

#[derive(Debug)]
struct State {
    value: Vec<u8>,
    /// Bumped by every `update`; the thread writes until it has written this generation.
    value_generation: u64,
    stop: bool,
    /// The lease in use, kept up to date by the thread; revoked on drop.
    lease: Option<LeaseId>,
    /// When the lease runs out at the earliest: the send time of the last acknowledged grant
    /// or renewal plus its TTL. `None` without a lease.
    valid_until: Option<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl NodeRegistration {
    /// Grants a lease and creates `nodes/<name>` = `value` under it, then starts the keep-alive
    /// thread. Fails with [`RegistrationError::NameInUse`] if another live lease holds the key.
    pub fn start(
        etcd: &Etcd,
        name: &str,
        value: Vec<u8>,
        config: RegistrationConfig,
    ) -> Result<Self, RegistrationError> {
        Self::start_reclaiming(etcd, name, value, config, |_| false)
    }

    /// As [`start`](Self::start), but a key held by a live lease whose value
    /// `is_previous_run` recognises (this node's own earlier run, killed less than a TTL ago)
    /// is taken over: that lease is revoked and the key created afresh. A restart after a
    /// crash then need not wait for the dead run's lease to expire.
    pub fn start_reclaiming(
        etcd: &Etcd,
        name: &str,
        value: Vec<u8>,
        config: RegistrationConfig,
        is_previous_run: impl Fn(&[u8]) -> bool,
    ) -> Result<Self, RegistrationError> {
        let key = keys::node(name)?;
        if let Some(kv) = etcd.get(&key)? {
            if let Some(lease) = kv.lease.filter(|_| is_previous_run(&kv.value)) {
                tracing::warn!(node = name, lease = %lease, "registration of this node's previous run still live (it did not stop cleanly): revoking it");
                etcd.lease_revoke(lease)?;
            }
        }
        let ttl = config.ttl;
        if ttl.subsec_nanos() != 0 || !(1..=600).contains(&ttl.as_secs()) {
            return Err(RegistrationError::Invalid(format!("lease TTL {ttl:?}: whole seconds in 1..=600")));
        }
        let sent = Instant::now();
        let lease = etcd.lease_grant(ttl)?;
        let created = etcd.create_with_lease(&key, &value, lease.id);
        if !matches!(created, Ok(CreateOutcome::Created { .. })) {
            // Not ours after all (or unknown): the lease must not linger. Revoking also deletes
            // the key if an unanswered create did land.
            let _ = etcd.lease_revoke(lease.id);
        }
        match created? {
            CreateOutcome::Created { .. } => {}
            CreateOutcome::Exists { present } => return Err(in_use(etcd, name, &key, present.first())),
        }
        tracing::info!(node = name, lease = %lease.id, ttl_s = lease.ttl.as_secs(), "registered in etcd");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                value,
                value_generation: 0,
                stop: false,
                lease: Some(lease.id),
                valid_until: Some(sent + lease.ttl),
            }),
            wake: Condvar::new(),
            registered: AtomicBool::new(true),
        });
        let mut worker = Worker {
            etcd: etcd.clone(),
            shared: shared.clone(),
            name: name.to_owned(),
            key: key.clone(),
            ttl,
            lease: Some(lease),
            renewed: sent,
            written_generation: 0,
            failing: false,
            conflict_logged: false,
        };
        let thread = thread::Builder::new().name("hcblk-etcd-reg".into()).spawn(move || worker.run()).map_err(|e| {
            let _ = etcd.lease_revoke(lease.id);
            RegistrationError::Thread(e)
        })?;
        Ok(Self { shared, thread: Some(thread), etcd: etcd.clone(), name: name.to_owned(), key })
    }

    /// Whether `nodes/<name>` is believed present under our lease: true after a renewal etcd
    /// acknowledged less than one TTL ago (the key was also checked then), false from the
    /// moment the lease may have expired until it is registered again. It turns false early
    /// rather than late: a lost lease is noticed no later than one TTL after the last renewal.
    pub fn is_registered(&self) -> bool {
        self.shared.registered.load(Ordering::SeqCst)
    }

    /// Until when this node's registration is certainly alive, as far as it knows: the time the
    /// last acknowledged lease grant or renewal was *sent* plus the lease's TTL (the send time,
    /// not the answer's: etcd started the TTL no earlier than that, so this is never later
    /// than the real expiry). `None` while not registered. A replicated volume's owner starts
    /// no guest I/O past it: by then another node may have taken the volume over.
    pub fn valid_until(&self) -> Option<Instant> {
        if !self.is_registered() {
            return None;
        }
        self.shared.lock().valid_until
    }

    /// Replaces the value; the background thread writes it at once (keeping the lease), or
    /// with the next registration if the node is not registered now.
    pub fn update(&self, value: Vec<u8>) {
        let mut st = self.shared.lock();
        st.value = value;
        st.value_generation += 1;
        drop(st);
        self.shared.wake.notify_all();
    }

    /// The lease currently holding the key, if any.
    pub fn lease(&self) -> Option<LeaseId> {
        self.shared.lock().lease
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nodes/<name>`, relative to the prefix.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stops the thread and revokes the lease, reporting a failed revoke (the key then expires
    /// one TTL later). Dropping does the same and only logs.
    pub fn deregister(mut self) -> Result<(), EtcdError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), EtcdError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        let _ = thread.join();
        self.shared.registered.store(false, Ordering::SeqCst);
        let Some(lease) = self.shared.lock().lease.take() else {
            return Ok(());
        };
        match self.etcd.lease_revoke(lease) {
            Ok(()) | Err(EtcdError::LeaseNotFound { .. }) => {
                tracing::info!(node = %self.name, lease = %lease, "deregistered from etcd");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for NodeRegistration {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(node = %self.name, error = %crate::control::chain(&e),
                "cannot revoke the node's etcd lease; its key expires within one TTL");
        }
    }
}

/// The error for a node key found in place.
fn in_use(etcd: &Etcd, name: &str, key: &str, present: Option<&Kv>) -> RegistrationError {
    match present.and_then(|kv| kv.lease) {
        Some(lease) => RegistrationError::NameInUse {
            name: name.to_owned(),
            lease,
            ttl_left: etcd.lease_time_to_live(lease).ok().flatten(),
        },
        None => RegistrationError::KeyWithoutLease { name: name.to_owned(), key: key.to_owned() },
    }
}

/// The background thread's state.
struct Worker {
    etcd: Etcd,
    shared: Arc<Shared>,
    name: String,
    key: String,
    ttl: Duration,
    lease: Option<Lease>,
    /// When the last acknowledged renewal (or the grant) was sent: the lease lives at least one
    /// TTL from then.
    renewed: Instant,
    written_generation: u64,
    /// The last attempt failed: wait for the next tick instead of retrying an update at once.
    failing: bool,
    /// The "name taken" error was logged (once per episode).
    conflict_logged: bool,
}

/// What a tick found.
enum Tick {
    Ok,
    /// etcd did not answer or refused; retry at the next tick.
    Failed,
}

impl Worker {
    fn run(&mut self) {
        let renew_every = self.ttl / 3;
        let mut next = Instant::now() + renew_every;
        let mut last_tick = Instant::now();
        loop {
            let (value, generation) = {
                let mut st = self.shared.lock();
                loop {
                    if st.stop {
                        st.lease = self.lease.map(|l| l.id);
                        return;
                    }
                    let now = Instant::now();
                    let changed = st.value_generation != self.written_generation && !self.failing && self.registered();
                    let due = if changed { next.min(last_tick + UPDATE_SPACING) } else { next };
                    if now >= due {
                        break;
                    }
                    st = self.shared.wake.wait_timeout(st, due - now).unwrap_or_else(PoisonError::into_inner).0;
                }
                (st.value.clone(), st.value_generation)
            };
            let tick = self.tick(&value, generation);
            last_tick = Instant::now();
            self.failing = matches!(tick, Tick::Failed);
            let mut st = self.shared.lock();
            st.lease = self.lease.map(|l| l.id);
            st.valid_until = self.lease.map(|l| self.renewed + l.ttl);
            drop(st);
            let wait = if self.registered() { renew_every } else { renew_every.min(RETRY_MAX) };
            next = Instant::now() + wait;
        }
    }

    fn registered(&self) -> bool {
        self.shared.registered.load(Ordering::SeqCst)
    }

    /// Records the state; logs transitions only.
    fn set_registered(&mut self, now: bool, why: &str) {
        let was = self.shared.registered.swap(now, Ordering::SeqCst);
        if was == now {
            return;
        }
        if now {
            self.conflict_logged = false;
            if let Some(lease) = self.lease {
                tracing::info!(node = %self.name, lease = %lease.id, "registered in etcd again");
            }
        } else {
            tracing::warn!(node = %self.name, reason = why,
                "node registration lost; re-registering as soon as etcd answers");
        }
    }

    fn tick(&mut self, value: &[u8], generation: u64) -> Tick {
        if let Some(lease) = self.lease {
            let sent = Instant::now();
            match self.etcd.lease_keep_alive(lease.id) {
                Ok(()) => {
                    self.renewed = sent;
                    // Published now, before the key is checked: an owner waiting on the lease
                    // clock should not wait for one more round trip.
                    self.shared.lock().valid_until = Some(sent + lease.ttl);
                    return self.ensure_key(lease, value, generation);
                }
                Err(EtcdError::LeaseNotFound { .. }) => {
                    self.lease = None;
                    self.set_registered(false, "the lease expired or was revoked");
                }
                Err(e) => {
                    tracing::debug!(node = %self.name, error = %crate::control::chain(&e), "lease renewal failed");
                    if self.renewed.elapsed() >= lease.ttl {
                        let why = "no renewal acknowledged for a whole TTL: the lease may have expired";
                        self.set_registered(false, why);
                    }
                    return Tick::Failed;
                }
            }
        }
        self.register_anew(value, generation)
    }

    /// With a live lease: makes sure the key holds our latest value under it.
    fn ensure_key(&mut self, lease: Lease, value: &[u8], generation: u64) -> Tick {
        if self.registered() && generation == self.written_generation {
            // Nothing to write; check the key is still ours (an operator may have deleted it).
            match self.etcd.get(&self.key) {
                Ok(Some(kv)) if kv.lease == Some(lease.id) => return Tick::Ok,
                Ok(_) => self.set_registered(false, "the node key was deleted or replaced"),
                Err(e) => {
                    tracing::debug!(node = %self.name, error = %crate::control::chain(&e), "cannot read the node key");
                    return Tick::Failed;
                }
            }
        }
        match self.etcd.update_leased(&self.key, value, lease.id) {
            Ok(CasOutcome::Committed { .. }) => self.written(generation),
            // The key is gone but the lease lives (deleted by hand): create it again.
            Ok(CasOutcome::Conflict { current: None }) => {
                match self.etcd.create_with_lease(&self.key, value, lease.id) {
                    Ok(CreateOutcome::Created { .. }) => self.written(generation),
                    Ok(CreateOutcome::Exists { present }) => self.taken(present.first()),
                    Err(e) => self.failed(e),
                }
            }
            Ok(CasOutcome::Conflict { current: Some(kv) }) => self.taken(Some(&kv)),
            Err(EtcdError::LeaseNotFound { .. }) => {
                self.lease = None;
                self.set_registered(false, "the lease expired or was revoked");
                Tick::Failed
            }
            Err(e) => self.failed(e),
        }
    }

    /// Without a lease: grants one and creates the key under it.
    fn register_anew(&mut self, value: &[u8], generation: u64) -> Tick {
        // Look first: while another lease holds the name, granting and revoking a lease every
        // retry would only churn etcd.
        match self.etcd.get(&self.key) {
            Ok(Some(kv)) => return self.taken(Some(&kv)),
            Ok(None) => {}
            Err(e) => return self.failed(e),
        }
        let sent = Instant::now();
        let lease = match self.etcd.lease_grant(self.ttl) {
            Ok(l) => l,
            Err(e) => return self.failed(e),
        };
        match self.etcd.create_with_lease(&self.key, value, lease.id) {
            Ok(CreateOutcome::Created { .. }) => {
                self.lease = Some(lease);
                self.renewed = sent;
                self.written(generation)
            }
            Ok(CreateOutcome::Exists { present }) => {
                let _ = self.etcd.lease_revoke(lease.id);
                self.taken(present.first())
            }
            Err(e) => {
                // An unanswered create may have landed: revoking removes it with the lease.
                let _ = self.etcd.lease_revoke(lease.id);
                self.failed(e)
            }
        }
    }

    fn written(&mut self, generation: u64) -> Tick {
        self.written_generation = generation;
        self.set_registered(true, "");
        Tick::Ok
    }

    fn failed(&mut self, e: EtcdError) -> Tick {
        tracing::debug!(node = %self.name, error = %crate::control::chain(&e), "node registration attempt failed");
        Tick::Failed
    }

    /// Someone else's lease holds our name: give ours up and keep trying (the other holder may
    /// be a previous run of this daemon whose lease has not expired yet).
    fn taken(&mut self, present: Option<&Kv>) -> Tick {
        if let Some(lease) = self.lease.take() {
            let _ = self.etcd.lease_revoke(lease.id);
        }
        self.set_registered(false, "the node name is held by another lease");
        if !self.conflict_logged {
            self.conflict_logged = true;
            let err = in_use(&self.etcd, &self.name, &self.key, present);
            tracing::error!(node = %self.name, error = %err, "cannot re-register");
        }
        Tick::Failed
    }
}
