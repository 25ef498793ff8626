//! etcd's mutex, the recipe of etcd's `concurrency` package as `etcdctl lock NAME` uses it (layout
//! in `crate::etcd`): a lease with TTL `--ttl`, kept alive every TTL/3; the key
//! `NAME/<lease id in hex>` bound to it; the lowest create revision under `NAME/` holds the lock;
//! every waiter watches only the deletion of the key just before its own, so a release wakes one
//! waiter (no thundering herd) and the queue is first come, first served. `etcdctl lock NAME`
//! therefore excludes us and is excluded by us. Our key's create revision is the fencing token.
//!
//! # Why two children never run at once, on etcd
//!
//! The argument of `election`'s module docs, with etcd's terms. `T` is `--ttl`, `g` the grace,
//! `s` the silence, `m` the fence margin; a *term* is one lease.
//!
//! 1. **What a renew proves.** A renew is a keep-alive on the lease followed, once we hold the
//!    lock, by a linearizable read of our own key; it succeeds only if the keep-alive answered
//!    with a TTL above 0 *and* the read shows our key with our create revision. Let `R` be the
//!    send time of the keep-alive of the last successful renew. Then:
//!    (a) our key was still ours at some moment after `R` (a linearizable read is served at a
//!    point after it was sent), so whoever frees the lock does so at some `I > R`;
//!    (b) etcd's lessor refreshed the lease after `R` to expire no earlier than `R + T`: a
//!    renew sets the expiry to now + TTL on the leader; followers never expire leases; a new
//!    leader first refreshes every lease to its promotion time + TTL + one election timeout
//!    (`lessor.Promote`), which also covers the old leader that keeps renewing until its
//!    check-quorum notices it was deposed (at most an election timeout later); lease
//!    checkpoints (off by default in 3.4) only ever restore a later expiry. One window remains:
//!    before etcd 3.4.31 and 3.5.13 a stalled old leader could acknowledge a keep-alive that the
//!    new leader never saw (etcd #15247, fixed by `ensureLeadership`), and then the lease can
//!    expire before `R + T`. The code does not rely on (b) for consul-leader successors, only
//!    (a): (b) is what keeps a renewing holder from false losses, and what protects an
//!    `etcdctl lock` successor, which waits for nothing but the key's deletion.
//! 2. **The fence.** With no later renew, the stop sequence starts at `R + T - g - m` and the
//!    child group is gone by `R + T - m` ([`election::Fence`]; `app` hands every new fence to
//!    the supervisor), whether etcd can be reached or not: nothing of this protocol is needed
//!    for it. `config` refuses `g >= T/2`.
//! 3. **Early frees.** Our key can go at any moment `I > R`: `etcdctl lease revoke`, `etcdctl
//!    del`, a lease that a stale leader revoked, a cluster restored from a snapshot. A connected
//!    holder sees it on the watch of its own key within a round trip and stops; a cut-off one
//!    keeps its child until `R + T - m < I + T`. etcd has no lock-delay, so the successor's own
//!    wait must cover that alone: it starts its child no earlier than `F + max(s, T_h)`, where
//!    `F >= I` is when it saw the previous holder gone and `T_h` that holder's TTL (from its
//!    record), and `config` refuses `--silence` below `--ttl` on etcd, so that holders sharing
//!    one configuration are safe even when no record says more.
//! 4. **The record and the clean mark.** etcd deletes a holder's key when it leaves, so what
//!    Consul keeps in the key's value lives in the marker key `NAME.consul-leader`, outside the
//!    prefix (`etcdctl lock` never sees it): a holder writes it, guarded by its own key still
//!    existing with its create revision, when it wins (its timing and what it still owed:
//!    `"released"` absent) before its child may start, and again when it releases, marked
//!    `"released": "clean"` only if `election::may_mark_clean` allows it, in the same
//!    transaction that deletes its key. A winner reads the marker in the transaction that
//!    checks it still wins (compare-and-swap on the marker's mod revision) and owes
//!    (`owed_until`): nothing after a clean mark; the holder's debt after a record without it
//!    (it crashed, was cut off, lost its key: `election::owed_wait`); `max(s, T)` when there is
//!    no marker at all (a brand-new lock, a deleted marker: the vanished key rule of
//!    `election`, 4). A cluster restored from a snapshot that still held an older, clean
//!    record brings that record back; as with a Consul snapshot, nothing outside the cluster
//!    can tell (restore with the wrappers stopped). A stale holder cannot overwrite a newer
//!    record: every write
//!    of the marker is guarded by the writer's own key, which is gone once another holds the
//!    lock. A holder that leaves no record is not consul-leader (`etcdctl lock` writes empty
//!    values): when a waiter sees such a key go just ahead of it, it also owes `max(s, T)`.
//!    An `etcdctl lock` holder that came and went while nobody waited leaves no trace at all,
//!    and `etcdctl` never stops its command anyway: nothing can be guaranteed after one.
//! 5. **Our own previous term** (`--on-lost recontend`): a record naming this process's
//!    previous lease owes only what that term still owed (`election::PreviousTerm`).
//! 6. **Fencing tokens.** The child's token is our key's create revision: etcd's revision grows
//!    with every write in the cluster, so every new holder's is larger (a restored snapshot
//!    starts from its own revision; nothing outside the cluster can fix that).
//!
//! Requests are bounded ([`crate::etcd::REQUEST_TIMEOUT`]) and retried with jittered backoff
//! when transient (a member down, no leader during an election, a timeout); a definitive answer
//! (permission denied, bad credentials) ends the run with etcd's own message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchFilterType, WatchOptions,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use super::{AbortOnDrop, ContendEnd, OpenError, Protocol, Renewal, SessionEnd, Verdict};
use crate::clock::BootTime;
use crate::config::{EtcdConfig, RunConfig};
use crate::consul::SessionId;
use crate::election::{
    self, FreeWatch, HolderValue, KeyView, LastHolder, PreviousTerm, RenewPace, Timing,
};
use crate::etcd::{
    self as wire, Entry, EtcdError, Marker, REQUEST_TIMEOUT, bounded, lease_hex, lock_key,
    marker_key, prefix,
};
use crate::notify;

/// At most this many renews in flight at once (one regular, the rest hedges).
const MAX_RENEWS_IN_FLIGHT: usize = 5;

/// Our key in the queue, once it exists; shared with the renewer, which checks it with each
/// renew once `held`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mine {
    key: String,
    rev: i64,
    held: bool,
}

type Shared<T> = Arc<Mutex<T>>;

fn get<T: Clone>(s: &Shared<T>) -> T {
    s.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn set<T>(s: &Shared<T>, v: T) {
    *s.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

/// One lease's life.
pub struct Term {
    lease: i64,
    renewals: watch::Receiver<Renewal>,
    _renewer: AbortOnDrop,
    mine: Shared<Option<Mine>>,
    /// The last key just ahead of ours that we saw deleted (its last value, when the watch
    /// gave it), and when: the previous holder may have been that key.
    ahead_gone: Option<(Option<Entry>, BootTime)>,
    /// Whose key we last announced waiting behind, so that the log says it once.
    announced: Option<String>,
}

impl super::Term for Term {
    fn id(&self) -> String {
        lease_hex(self.lease)
    }

    fn renewals(&self) -> watch::Receiver<Renewal> {
        self.renewals.clone()
    }
}

/// The lock won.
#[derive(Debug, Clone)]
pub struct Won {
    pub key: String,
    /// Our key's create revision: the fencing token.
    pub rev: i64,
    /// The revision of the transaction that confirmed the win: `ETCD_LOCK_REV`, as `etcdctl
    /// lock` sets it (the revision of the response that gave it the lock).
    pub confirmed_rev: i64,
    /// What we wrote into our key and the marker.
    pub value: HolderValue,
    pub owed_until: Option<BootTime>,
}

impl super::Won for Won {
    fn fencing_token(&self) -> u64 {
        u64::try_from(self.rev).unwrap_or(0)
    }

    fn owed_until(&self) -> Option<BootTime> {
        self.owed_until
    }

    fn child_env(&self) -> Vec<(String, String)> {
        vec![
            ("ETCD_LOCK_KEY".into(), self.key.clone()),
            ("ETCD_LOCK_REV".into(), self.confirmed_rev.to_string()),
        ]
    }
}

pub struct EtcdMutex {
    client: Client,
    etcd: EtcdConfig,
    cfg: RunConfig,
    previous: Option<PreviousTerm>,
}

impl EtcdMutex {
    pub fn new(client: Client, etcd: EtcdConfig, cfg: RunConfig) -> Self {
        Self {
            client,
            etcd,
            cfg,
            previous: None,
        }
    }

    fn timing(&self) -> Timing {
        // etcd has no lock-delay: only the silence holds a successor back.
        Timing {
            lock_delay: Duration::ZERO,
            ..self.cfg.timing()
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, EtcdError> {
        bounded(REQUEST_TIMEOUT, self.client.clone().txn(txn)).await
    }

    /// Deletes our key, if it is still ours.
    async fn leave_queue(&self, mine: &Mine) -> Result<(), EtcdError> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                mine.key.as_str(),
                CompareOp::Equal,
                mine.rev,
            )])
            .and_then([TxnOp::delete(mine.key.as_str(), None)]);
        self.txn(txn).await.map(|_| ())
    }

    /// One read, writing nothing: the first key of the queue (the holder), if any. A marker that
    /// consul-leader did not write is an error.
    async fn holder(&self) -> Result<Option<Entry>, EtcdError> {
        let name = &self.cfg.key;
        let marker = marker_key(name);
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let look = Txn::new().and_then([
            TxnOp::get(prefix(name).as_str(), Some(first)),
            TxnOp::get(marker.as_str(), None),
        ]);
        let r = self.txn(look).await?;
        let got = gets(&r);
        check_marker(name, &marker, got.get(1))?;
        Ok(got.into_iter().next().and_then(|g| g.into_iter().next()))
    }

    /// One step of contending; see [`Step`].
    async fn step(&self, term: &mut Term, deadline: Option<Instant>) -> Result<Step, EtcdError> {
        let name = &self.cfg.key;
        let pfx = prefix(name);
        let marker = marker_key(name);
        let first = || {
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1)
        };
        let mine = get(&term.mine);
        let Some(mine) = mine else {
            // Join the queue. With --wait 0, one read answers a busy lock first, and nothing
            // is written.
            let try_once = deadline.is_some_and(|d| d <= Instant::now());
            if try_once {
                if let Some(owner) = self.holder().await? {
                    info!("the lock on {name} is held by {}", describe(&owner));
                    return Ok(Step::Busy);
                }
            }
            let key = lock_key(name, term.lease);
            let value = self.value(term, Duration::ZERO);
            let join = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.as_str(),
                        value.to_bytes(),
                        Some(PutOptions::new().with_lease(term.lease)),
                    ),
                    TxnOp::get(pfx.as_str(), Some(first())),
                    TxnOp::get(marker.as_str(), None),
                ])
                .or_else([
                    TxnOp::get(key.as_str(), None),
                    TxnOp::get(pfx.as_str(), Some(first())),
                    TxnOp::get(marker.as_str(), None),
                ]);
            let r = self.txn(join).await?;
            let rev = if r.succeeded() {
                header_rev(&r)
            } else {
                match gets(&r).first().and_then(|g| g.first()) {
                    Some(e) => e.create_revision,
                    None => return Ok(Step::Again),
                }
            };
            let mine = Mine {
                key,
                rev,
                held: false,
            };
            set(&term.mine, Some(mine.clone()));
            debug!("queued as {} (create revision {rev})", mine.key);
            let g = gets(&r);
            let owner = g.get(g.len().saturating_sub(2)).and_then(|g| g.first());
            if owner.is_some_and(|o| o.create_revision == rev) {
                let seen = check_marker(name, &marker, g.last())?;
                return self.claim(term, &mine, seen, BootTime::now()).await;
            }
            if try_once {
                // Someone queued first between the read and our put: as `TryLock`, leave.
                set(&term.mine, None);
                self.leave_queue(&mine).await?;
                if let Some(o) = owner {
                    info!("the lock on {name} is held by {}", describe(o));
                }
                return Ok(Step::Busy);
            }
            return Ok(Step::Again);
        };

        // In the queue: find the key just ahead of ours, and who holds the lock.
        let look = Txn::new().and_then([
            TxnOp::get(
                pfx.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_max_create_revision(mine.rev - 1)
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(1),
                ),
            ),
            TxnOp::get(pfx.as_str(), Some(first())),
            TxnOp::get(marker.as_str(), None),
        ]);
        let r = self.txn(look).await?;
        let at = header_rev(&r);
        let g = gets(&r);
        let ahead = g.first().and_then(|g| g.first()).cloned();
        let owner = g.get(1).and_then(|g| g.first()).cloned();
        let seen = check_marker(name, &marker, g.get(2))?;
        let Some(ahead) = ahead else {
            if owner
                .as_ref()
                .is_some_and(|o| o.create_revision == mine.rev)
            {
                let since = term
                    .ahead_gone
                    .as_ref()
                    .map_or_else(BootTime::now, |(_, t)| *t);
                return self.claim(term, &mine, seen, since).await;
            }
            // Our key is gone (deleted by hand while we waited): queue again, at the back.
            warn!(
                "our key {} in the queue of {name} was deleted; queueing again",
                mine.key
            );
            set(&term.mine, None);
            return Ok(Step::Again);
        };
        if let Some(o) = &owner {
            let who = describe(o);
            if term.announced.as_ref() != Some(&who) {
                info!("waiting for the lock on {name}, held by {who}");
                notify::status(&format!("standby, {name} is held by {who}"));
                term.announced = Some(who);
            }
        }
        // Wait for the deletion of the key just ahead, and of nothing else. What we saw go
        // before this key is not the previous holder any more.
        term.ahead_gone = None;
        let opts = WatchOptions::new()
            .with_start_revision(at + 1)
            .with_prev_key()
            .with_filters([WatchFilterType::NoPut]);
        let mut stream = bounded(
            REQUEST_TIMEOUT,
            self.client.clone().watch(ahead.key.as_str(), Some(opts)),
        )
        .await?;
        let wait = async {
            loop {
                let Some(resp) = stream.message().await.map_err(EtcdError::from)? else {
                    return Err(EtcdError::Transient("etcd closed the watch".into()));
                };
                if resp.canceled() {
                    // Compacted past our start, or the member lost its leader: look again.
                    debug!("the watch on {} ended: {}", ahead.key, resp.cancel_reason());
                    return Ok(());
                }
                for ev in resp.events() {
                    if ev.event_type() == EventType::Delete {
                        term.ahead_gone = Some((ev.prev_kv().map(Entry::from), BootTime::now()));
                        return Ok(());
                    }
                }
            }
        };
        let r = tokio::select! {
            r = wait => r.map(|()| Step::Again),
            () = until(deadline) => Ok(Step::Busy),
        };
        if term.ahead_gone.is_none() {
            // The watch ended without showing the deletion (an error, a compaction): if the
            // key is gone now, nothing tells what it held, so count it as a holder without a
            // record, gone now.
            term.ahead_gone = Some((None, BootTime::now()));
        }
        r
    }

    /// The value our key and the marker hold while we contend or hold the lock.
    fn value(&self, term: &Term, owed: Duration) -> HolderValue {
        HolderValue::new(
            &self.cfg.host,
            &self.cfg.id,
            &SessionId(lease_hex(term.lease)),
            &self.timing(),
            owed,
        )
    }

    /// Our key is the first of the queue: record that we hold the lock in the marker (if it is
    /// still what we read) and decide what we owe. `since` is when we saw the previous holder
    /// gone (module docs, 3 and 4).
    async fn claim(
        &self,
        term: &mut Term,
        mine: &Mine,
        seen: Option<(Marker, i64)>,
        since: BootTime,
    ) -> Result<Step, EtcdError> {
        let marker = marker_key(&self.cfg.key);
        let now = BootTime::now();
        let owed_until = owed_until(
            seen.as_ref().map(|(m, _)| m),
            term.ahead_gone.as_ref().map(|(e, _)| e.as_ref()),
            &self.timing(),
            self.previous.as_ref(),
            since,
            now,
        );
        let owed = owed_until.map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        let value = self.value(term, owed);
        let record = Marker::new(&mine.key, mine.rev, value.clone());
        let marker_rev = seen.as_ref().map_or(0, |(_, rev)| *rev);
        let txn = Txn::new()
            .when([
                Compare::create_revision(mine.key.as_str(), CompareOp::Equal, mine.rev),
                Compare::mod_revision(marker.as_str(), CompareOp::Equal, marker_rev),
            ])
            .and_then([
                TxnOp::put(marker.as_str(), record.to_bytes(), None),
                TxnOp::put(
                    mine.key.as_str(),
                    value.to_bytes(),
                    Some(PutOptions::new().with_lease(term.lease)),
                ),
            ]);
        let r = self.txn(txn).await?;
        if !r.succeeded() {
            // Our key went, or the marker changed since we read it: look again.
            debug!("the claim on {} did not apply; looking again", mine.key);
            return Ok(Step::Again);
        }
        let held = Mine {
            held: true,
            ..mine.clone()
        };
        set(&term.mine, Some(held));
        term.ahead_gone = None;
        Ok(Step::Won(Box::new(Won {
            key: mine.key.clone(),
            rev: mine.rev,
            confirmed_rev: header_rev(&r),
            value,
            owed_until,
        })))
    }

    /// Writes the record of our end into the marker (clean when `clean`) and deletes our key,
    /// in one transaction guarded by our key (module docs, 4).
    async fn release_record(&self, term: &Term, won: &Won, clean: bool) {
        let value = if clean {
            won.value.released_clean()
        } else {
            won.value.clone()
        };
        let record = Marker::new(&won.key, won.rev, value);
        let marker = marker_key(&self.cfg.key);
        // From here on our key may go: the renewer must not count that as a loss.
        set(&term.mine, None);
        let txn = Txn::new()
            .when([Compare::create_revision(
                won.key.as_str(),
                CompareOp::Equal,
                won.rev,
            )])
            .and_then([
                TxnOp::put(marker.as_str(), record.to_bytes(), None),
                TxnOp::delete(won.key.as_str(), Some(DeleteOptions::new())),
            ]);
        // Not succeeded: our key is not ours any more, nothing to release.
        super::release_with_retries(
            &self.cfg.key,
            clean,
            "revoking the lease",
            EtcdError::is_transient,
            || async { self.txn(txn.clone()).await.map(|r| r.succeeded()) },
        )
        .await;
    }
}

/// What one step of contending found.
enum Step {
    Won(Box<Won>),
    /// Not leader within `--wait`.
    Busy,
    /// Look again (a key ahead of ours went, a watch ended, our key vanished).
    Again,
}

/// Resolves at `deadline`, never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The revision in a response's header.
fn header_rev(r: &TxnResponse) -> i64 {
    r.header().map_or(0, |h| h.revision())
}

/// The key-values of each `get` of a transaction, in order.
fn gets(r: &TxnResponse) -> Vec<Vec<Entry>> {
    r.op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().iter().map(Entry::from).collect()),
            _ => None,
        })
        .collect()
}

/// The marker as read (with its mod revision), `None` when there is none; data that is not
/// ours at that key is refused rather than overwritten.
fn check_marker(
    name: &str,
    marker: &str,
    got: Option<&Vec<Entry>>,
) -> Result<Option<(Marker, i64)>, EtcdError> {
    let Some(e) = got.and_then(|g| g.first()) else {
        return Ok(None);
    };
    match Marker::parse(&e.value) {
        Ok(m) => Ok(Some((m, e.mod_revision))),
        Err(()) => Err(EtcdError::Fatal(format!(
            "the key {marker} holds data that consul-leader did not write; it keeps the record of \
             the lock {name} there and will not overwrite it: delete that key if it is stale, or \
             choose another --key"
        ))),
    }
}

/// A key of the queue, for log lines: `host:pid (lease L)` for ours, the key for others.
fn describe(e: &Entry) -> String {
    match e.holder() {
        Some(v) => format!("{} (lease {})", v.holder, lease_hex(e.lease)),
        None => format!("{} (not consul-leader: etcdctl lock?)", e.key),
    }
}

/// Until when a new holder's child must wait (module docs, 3 to 5): what the marker's record
/// says (`None`: no marker), plus the wait owed to a holder that left no record when one went
/// just ahead of us (`ahead`: `Some(None)` when its last value is unknown). `since` is when we
/// saw the previous holder gone; `None` means the child may start at once.
pub fn owed_until(
    marker: Option<&Marker>,
    ahead: Option<Option<&Entry>>,
    own: &Timing,
    previous: Option<&PreviousTerm>,
    since: BootTime,
    now: BootTime,
) -> Option<BootTime> {
    let last = match marker {
        None => KeyView::Absent,
        Some(m) if m.holder.is_clean() => KeyView::Free {
            lock_index: 0,
            last: LastHolder::Clean,
        },
        Some(m) => KeyView::Free {
            lock_index: 0,
            last: LastHolder::Unclean(Some(Box::new(m.holder.clone()))),
        },
    };
    let mut watch = FreeWatch::default();
    watch.observe(&last, own, previous, since);
    let from_record = watch.owed_until(now);
    let unrecorded = ahead.is_some_and(|e| e.is_none_or(|e| e.holder().is_none()));
    let from_unrecorded = unrecorded
        .then(|| {
            let unknown = KeyView::Free {
                lock_index: 0,
                last: LastHolder::Unclean(None),
            };
            since + election::owed_wait(&unknown, own).unwrap_or_default()
        })
        .filter(|until| *until > now);
    from_record.max(from_unrecorded)
}

impl Protocol for EtcdMutex {
    type Term = Term;
    type Won = Won;

    /// Grants a lease with TTL `--ttl` and starts keeping it alive.
    async fn open(&self) -> Result<Term, OpenError> {
        let sent = BootTime::now();
        let ttl = i64::try_from(self.cfg.ttl.as_secs()).unwrap_or(i64::MAX);
        let granted = wire::on_any_endpoint(&self.etcd, &self.client, |mut c| async move {
            bounded(REQUEST_TIMEOUT, c.lease_grant(ttl, None)).await
        })
        .await
        .map_err(|e| OpenError {
            message: format!(
                "cannot grant an etcd lease at {}: {e}{}",
                self.etcd.endpoints.join(","),
                grant_hint(&e)
            ),
            transient: e.is_transient(),
            unreachable: e.is_unreachable(),
        })?;
        let lease = granted.id();
        // etcd raises a TTL below its minimum (1.5 election timeouts), never lowers one: a
        // longer lease only keeps our key longer after a crash. A shorter one would break the
        // fence, so it is refused.
        if granted.ttl() < ttl {
            let _ = bounded(REQUEST_TIMEOUT, self.client.clone().lease_revoke(lease)).await;
            return Err(OpenError {
                message: format!(
                    "etcd granted a lease of {}s for --ttl {}s; lower --ttl",
                    granted.ttl(),
                    ttl
                ),
                transient: false,
                unreachable: false,
            });
        }
        debug!("granted lease {} ({}s)", lease_hex(lease), granted.ttl());
        let (tx, rx) = watch::channel(Renewal {
            last_ok_sent: sent,
            end: None,
        });
        let mine: Shared<Option<Mine>> = Arc::default();
        let renewer = AbortOnDrop::spawn(keep_lease(
            self.client.clone(),
            self.etcd.clone(),
            lease,
            mine.clone(),
            self.cfg.ttl,
            self.cfg.grace,
            tx,
        ));
        Ok(Term {
            lease,
            renewals: rx,
            _renewer: renewer,
            mine,
            ahead_gone: None,
            announced: None,
        })
    }

    /// Revokes the lease, which deletes our key if it is still there.
    async fn close(&self, term: Term, attempts: u32) {
        let lease = term.lease;
        drop(term); // stops the renewer first
        for attempt in 0..attempts {
            match bounded(REQUEST_TIMEOUT, self.client.clone().lease_revoke(lease)).await {
                Ok(_) | Err(EtcdError::NotFound(_)) => {
                    debug!("revoked lease {}", lease_hex(lease));
                    return;
                }
                Err(e) if e.is_transient() && attempt + 1 < attempts => {
                    sleep(election::backoff(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(1),
                    ))
                    .await;
                }
                Err(e) => {
                    warn!(
                        "cannot revoke lease {}: {e}; etcd will expire it after at most {}",
                        lease_hex(lease),
                        humantime::format_duration(self.cfg.ttl)
                    );
                    return;
                }
            }
        }
    }

    async fn contend(&self, term: &mut Term, deadline: Option<Instant>) -> Result<Won, ContendEnd> {
        let mut failures = 0u32;
        loop {
            if term.renewals.borrow().end.is_some() {
                return Err(ContendEnd::SessionGone);
            }
            match self.step(term, deadline).await {
                Ok(Step::Won(won)) => return Ok(*won),
                Ok(Step::Busy) => return Err(ContendEnd::Busy),
                Ok(Step::Again) => {
                    if failures > 0 {
                        info!("etcd answers again");
                        failures = 0;
                    }
                }
                Err(EtcdError::Fatal(msg)) => {
                    return Err(ContendEnd::Fatal(format!(
                        "cannot contend for {}: {msg}",
                        self.cfg.key
                    )));
                }
                Err(e) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(ContendEnd::Busy);
                    }
                    if failures == 0 {
                        warn!("cannot contend for {}: {e}; retrying", self.cfg.key);
                    } else {
                        debug!("cannot contend for {}: {e}; retrying", self.cfg.key);
                    }
                    let pause = election::backoff(
                        failures,
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                    );
                    failures += 1;
                    tokio::select! {
                        () = sleep(pause) => {}
                        () = until(deadline) => return Err(ContendEnd::Busy),
                    }
                }
            }
        }
    }

    /// Watches our own key: its deletion (lease revoked or expired, `etcdctl del`) or its
    /// replacement ends leadership within a round trip.
    fn watch(&self, term: &Term, won: &Won) -> (AbortOnDrop, mpsc::Receiver<Verdict>) {
        let (tx, rx) = mpsc::channel(1);
        let task = AbortOnDrop::spawn(watch_own_key(
            self.client.clone(),
            won.key.clone(),
            won.rev,
            term.lease,
            won.confirmed_rev,
            tx,
        ));
        (task, rx)
    }

    async fn release(&self, term: &Term, won: &Won, clean: bool) {
        self.release_record(term, won, clean).await;
    }

    /// `--wait 0`: one read of the queue, before any lease is granted; its first key holds the
    /// lock. An unreachable cluster answers `None`, and the normal path reports the error.
    async fn busy(&self) -> Option<String> {
        // An error (a marker we did not write, too) is reported by the normal path.
        let owner = self.holder().await.ok()??;
        Some(format!("held by {}", describe(&owner)))
    }

    /// After a contention was cut short: leave the queue. A claim whose answer we did not see
    /// left a record without the clean mark, which makes our successor wait: safe.
    async fn abandon(&self, term: &mut Term) {
        if let Some(mine) = get(&term.mine) {
            set(&term.mine, None);
            if let Err(e) = self.leave_queue(&mine).await {
                debug!(
                    "cannot delete {}: {e}; revoking the lease deletes it",
                    mine.key
                );
            }
        }
    }

    fn remember(&mut self, previous: PreviousTerm) {
        self.previous = Some(previous);
    }
}

/// What to add to a failed lease grant so that the operator knows what to change.
fn grant_hint(e: &EtcdError) -> &'static str {
    match e {
        EtcdError::Unreachable(_) => {
            "; is --etcd-endpoints (or ETCDCTL_ENDPOINTS) right, and is etcd up?"
        }
        EtcdError::Fatal(m) if m.contains("permission") || m.contains("auth") => {
            "; check --etcd-user / ETCDCTL_USER and the user's role"
        }
        _ => "",
    }
}

/// The outcome of one renew.
enum Renewed {
    /// The lease lives (and our key, when we held it, is still ours).
    Alive,
    /// The lease or our key is gone.
    Gone(&'static str),
}

/// An open keep-alive stream: the regular renews share one, as `etcdctl` keeps one for its whole
/// life, instead of opening a gRPC stream per renew.
type KeepAliveStream = (LeaseKeeper, LeaseKeepAliveStream);

/// One renew: a keep-alive (on `stream` when one is open, else on a new stream), then, while we
/// hold the lock, a linearizable read of our key (module docs, 1). Returns the stream, still
/// open, when the renew went through, for the next regular renew.
async fn renew_once(
    mut client: Client,
    lease: i64,
    mine: Option<Mine>,
    limit: Duration,
    stream: Option<KeepAliveStream>,
) -> (Result<Renewed, EtcdError>, Option<KeepAliveStream>) {
    let work = async {
        let stream = match stream {
            Some((mut keeper, mut answers)) => {
                keeper.keep_alive().await.map_err(EtcdError::from)?;
                match answers.message().await.map_err(EtcdError::from)? {
                    Some(answer) if answer.ttl() > 0 => (keeper, answers),
                    Some(_) => return Ok((Renewed::Gone("the lease was not found"), None)),
                    None => return Err(EtcdError::Transient("etcd closed the keep-alive".into())),
                }
            }
            // Opening a stream sends the first keep-alive and waits for its answer.
            None => match client
                .lease_keep_alive(lease)
                .await
                .map_err(EtcdError::from)
            {
                Ok(opened) => opened,
                Err(EtcdError::NotFound(_)) => {
                    return Ok((Renewed::Gone("the lease was not found"), None));
                }
                Err(e) => return Err(e),
            },
        };
        let Some(mine) = mine.filter(|m| m.held) else {
            return Ok((Renewed::Alive, Some(stream)));
        };
        let r = client
            .get(mine.key.as_str(), None)
            .await
            .map_err(EtcdError::from)?;
        let ours = r
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == mine.rev && kv.lease() == lease);
        Ok(if ours {
            (Renewed::Alive, Some(stream))
        } else {
            (Renewed::Gone("our key is gone"), None)
        })
    };
    // A renew cut short drops its stream with it: a late answer can never be mistaken for the
    // next renew's.
    match tokio::time::timeout(limit, work).await {
        Ok(Ok((renewed, stream))) => (Ok(renewed), stream),
        Ok(Err(e)) => (Err(e), None),
        Err(_) => (
            Err(EtcdError::Transient(format!(
                "the renew got no answer within {}",
                humantime::format_duration(limit)
            ))),
            None,
        ),
    }
}

/// Keeps the lease alive every TTL/3 and publishes each success (by the keep-alive's send time)
/// or the term's end, as `lock::consul` renews a session: a renew is given as long as its success
/// could still help (until the fence it would buy has passed), and while one is outstanding
/// another is sent every TTL/10 on a fresh connection to the next endpoint in turn (at most
/// [`MAX_RENEWS_IN_FLIGHT`] at once), so a member that hangs costs no false loss while another
/// answers. Transient errors are retried with backoff and are not a loss by themselves: the
/// leader's fence decides that.
async fn keep_lease(
    client: Client,
    etcd: EtcdConfig,
    lease: i64,
    mine: Shared<Option<Mine>>,
    ttl: Duration,
    grace: Duration,
    tx: watch::Sender<Renewal>,
) {
    let RenewPace {
        period,
        hedge,
        useful,
    } = RenewPace::new(ttl, grace);
    let first = tx.borrow().last_ok_sent;
    let since_first = BootTime::now().saturating_duration_since(first);
    let mut next = Instant::now() + period.saturating_sub(since_first);
    let mut last_ok = first;
    let mut failures = 0u32;
    let mut hedges = 0usize;
    // The regular renews' keep-alive stream, while no regular renew has it.
    let mut stream: Option<KeepAliveStream> = None;
    type Done = (
        BootTime,
        Instant,
        Option<Mine>,
        Result<Renewed, EtcdError>,
        Option<KeepAliveStream>,
    );
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    loop {
        tokio::select! {
            () = sleep_until(next) => {
                if in_flight.len() < MAX_RENEWS_IN_FLIGHT {
                    let checked = get(&mine);
                    let regular = in_flight.is_empty();
                    let main = client.clone();
                    let endpoint = etcd.endpoints[hedges % etcd.endpoints.len()].clone();
                    let etcd = etcd.clone();
                    let own_stream = if regular { stream.take() } else { None };
                    if !regular {
                        hedges += 1;
                    }
                    in_flight.spawn(async move {
                        let sent = BootTime::now();
                        let sent_mono = Instant::now();
                        let client = if regular {
                            Ok(main)
                        } else {
                            wire::connect(&etcd, &[endpoint]).await
                        };
                        let (r, back) = match client {
                            Ok(c) => renew_once(c, lease, checked.clone(), useful, own_stream).await,
                            Err(e) => (Err(e), None),
                        };
                        // A hedge's stream is its own connection's: not kept.
                        (sent, sent_mono, checked, r, if regular { back } else { None })
                    });
                }
                next = Instant::now() + hedge;
            }
            Some(done) = in_flight.join_next() => {
                let Ok((sent, sent_mono, checked, result, back)) = done else { continue };
                if back.is_some() {
                    stream = back;
                }
                match result {
                    Ok(Renewed::Alive) => {
                        if failures > 0 {
                            info!("the lease keep-alive works again");
                            failures = 0;
                        }
                        debug!("renewed lease {}", lease_hex(lease));
                        if sent > last_ok {
                            last_ok = sent;
                            tx.send_modify(|r| r.last_ok_sent = sent);
                            next = sent_mono + period;
                        }
                    }
                    // Our key was checked, but we let it go since (a release): not a loss.
                    Ok(Renewed::Gone(_)) if checked.is_some() && get(&mine) != checked => {}
                    Ok(Renewed::Gone(what)) => {
                        debug!("lease {}: {what}", lease_hex(lease));
                        tx.send_modify(|r| r.end = Some(SessionEnd::Gone));
                        return;
                    }
                    Err(EtcdError::Fatal(e)) => {
                        tx.send_modify(|r| r.end = Some(SessionEnd::Fatal(e)));
                        return;
                    }
                    Err(e) => {
                        if failures == 0 {
                            warn!("the lease keep-alive failed: {e}; retrying");
                        } else {
                            debug!("the lease keep-alive failed again: {e}");
                        }
                        let retry = Instant::now()
                            + election::backoff(failures, Duration::from_millis(200), period / 2);
                        failures += 1;
                        next = next.min(retry);
                    }
                }
            }
        }
    }
}

/// Watches our own key from just after the win: the first sign that it is not ours any more
/// (deleted: the lease was revoked or expired, or someone deleted it; replaced) is reported.
/// After a broken watch the key is read again, so a deletion during the gap is not missed; a
/// definitive error is reported as such.
async fn watch_own_key(
    client: Client,
    key: String,
    rev: i64,
    lease: i64,
    mut seen: i64,
    tx: mpsc::Sender<Verdict>,
) {
    let mut attempt = 0u32;
    loop {
        let verdict = async {
            let opts = WatchOptions::new().with_start_revision(seen + 1);
            let mut stream = bounded(
                REQUEST_TIMEOUT,
                client.clone().watch(key.as_str(), Some(opts)),
            )
            .await?;
            loop {
                let Some(resp) = stream.message().await.map_err(EtcdError::from)? else {
                    return Err(EtcdError::Transient("etcd closed the watch".into()));
                };
                if resp.canceled() {
                    return Err(EtcdError::Transient(format!(
                        "etcd ended the watch: {}",
                        resp.cancel_reason()
                    )));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    seen = seen.max(kv.mod_revision());
                    if ev.event_type() == EventType::Delete {
                        return Ok(Verdict::Lost(format!(
                            "our key {key} was deleted (the lease was revoked or expired, or \
                             the key was deleted by hand)"
                        )));
                    }
                    if kv.create_revision() != rev || kv.lease() != lease {
                        return Ok(Verdict::Lost(format!("our key {key} was replaced")));
                    }
                }
            }
        };
        let err = match verdict.await {
            Ok(v) => {
                let _ = tx.send(v).await;
                return;
            }
            Err(EtcdError::Fatal(e)) => {
                let _ = tx
                    .send(Verdict::Fatal(format!("cannot watch {key}: {e}")))
                    .await;
                return;
            }
            Err(e) => e,
        };
        debug!("watching {key} failed: {err}; reading it again");
        sleep(election::backoff(
            attempt,
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .await;
        attempt += 1;
        // A fresh read tells whether the key went while the watch was down.
        match bounded(REQUEST_TIMEOUT, client.clone().get(key.as_str(), None)).await {
            Ok(r) => {
                let ours = r
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.create_revision() == rev && kv.lease() == lease);
                if !ours {
                    let _ = tx
                        .send(Verdict::Lost(format!(
                            "our key {key} is gone (the lease was revoked or expired, or the key \
                             was deleted by hand)"
                        )))
                        .await;
                    return;
                }
                if let Some(h) = r.header() {
                    seen = h.revision();
                }
                attempt = 0;
            }
            Err(EtcdError::Fatal(e)) => {
                let _ = tx
                    .send(Verdict::Fatal(format!("cannot read {key}: {e}")))
                    .await;
                return;
            }
            Err(e) => debug!("reading {key} failed: {e}; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn at(n: u64) -> BootTime {
        BootTime::from_since_boot(secs(1000 + n))
    }

    /// TTL 5s, silence 5s, no lock-delay: the etcd rule.
    const OWN: Timing = Timing {
        ttl: Duration::from_secs(5),
        lock_delay: Duration::ZERO,
        silence: Duration::from_secs(5),
    };

    fn holder(ttl: u64, owed: u64, lease: &str) -> HolderValue {
        let t = Timing {
            ttl: secs(ttl),
            lock_delay: Duration::ZERO,
            silence: secs(ttl),
        };
        HolderValue::new("h1", "h1", &SessionId(lease.into()), &t, secs(owed))
    }

    fn marker(v: HolderValue) -> Marker {
        Marker::new("k/1", 7, v)
    }

    fn entry(value: &[u8]) -> Entry {
        Entry {
            key: "k/2".into(),
            create_revision: 9,
            mod_revision: 9,
            lease: 2,
            value: value.to_vec(),
        }
    }

    #[test]
    fn a_clean_record_owes_nothing_and_no_record_owes_the_full_wait() {
        let clean = marker(holder(5, 0, "1").released_clean());
        assert_eq!(
            owed_until(Some(&clean), None, &OWN, None, at(0), at(0)),
            None
        );
        // A brand-new lock, or a marker deleted by hand: max(s, T) from the sighting.
        assert_eq!(
            owed_until(None, None, &OWN, None, at(0), at(1)),
            Some(at(5))
        );
    }

    #[test]
    fn an_unclean_record_owes_the_holders_own_ttl_and_debt() {
        let crashed = marker(holder(9, 0, "1"));
        assert_eq!(
            owed_until(Some(&crashed), None, &OWN, None, at(2), at(3)),
            Some(at(11))
        );
        let indebted = marker(holder(5, 12, "1"));
        assert_eq!(
            owed_until(Some(&indebted), None, &OWN, None, at(0), at(0)),
            Some(at(12))
        );
        // Counted from when the holder was seen gone, not from the claim.
        assert_eq!(
            owed_until(Some(&crashed), None, &OWN, None, at(0), at(20)),
            None
        );
    }

    #[test]
    fn a_holder_without_a_record_just_ahead_owes_the_silence_even_after_a_clean_record() {
        let clean = marker(holder(5, 0, "1").released_clean());
        // etcdctl lock writes an empty value.
        let etcdctl = entry(b"");
        assert_eq!(
            owed_until(Some(&clean), Some(Some(&etcdctl)), &OWN, None, at(0), at(0)),
            Some(at(5))
        );
        // A deletion whose last value the watch did not give: as unknown.
        assert_eq!(
            owed_until(Some(&clean), Some(None), &OWN, None, at(0), at(0)),
            Some(at(5))
        );
        // A consul-leader waiter that gave up left its place, not a holder's debt: the
        // record decides.
        let waiter = entry(&holder(5, 0, "2").to_bytes());
        assert_eq!(
            owed_until(Some(&clean), Some(Some(&waiter)), &OWN, None, at(0), at(0)),
            None
        );
    }

    #[test]
    fn our_own_previous_term_owes_only_its_own_debt() {
        let mine = marker(holder(9, 0, "1f"));
        let previous = PreviousTerm {
            session: "1f".into(),
            owed_until: None,
        };
        assert_eq!(
            owed_until(Some(&mine), None, &OWN, Some(&previous), at(0), at(0)),
            None
        );
        let other = PreviousTerm {
            session: "2e".into(),
            owed_until: None,
        };
        assert_eq!(
            owed_until(Some(&mine), None, &OWN, Some(&other), at(0), at(0)),
            Some(at(9))
        );
    }
}
