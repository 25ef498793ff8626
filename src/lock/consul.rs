//! Consul's mutex, in the layout of Go's `api.Lock` and `consul lock`: a session with a TTL, the
//! lock key acquired with that session and the `api.Lock` flags value, a JSON value that says who
//! holds it (with the timing its successors must honour), blocking reads to wait and to watch.
//!
//! Every request retries what may change on retry (connection errors, timeouts, 5xx, 429) with
//! jittered backoff, logging the first failure only; a definitive answer (403, 400, a missing
//! check) ends the term with Consul's own text. The rules (how to read the key, how long to wait,
//! when a release may be marked clean) are `election`'s; this module performs the requests.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep};
use tracing::info;

use super::session::{self, Errors, MAX_BLOCK, next_index};
use super::{AbortOnDrop, ContendEnd, OpenError, Protocol, Renewal, Verdict};
use crate::clock::BootTime;
use crate::config::RunConfig;
use crate::consul::{Client, ConsulError, ConsulIndex, ReadOpts, SessionId};
use crate::election::{self, FreeWatch, HolderValue, KeyView, PreviousTerm, WatchPace};
use crate::notify;
use crate::wire::{KvEntry, LOCK_FLAG_VALUE, SEMAPHORE_FLAG_VALUE};

/// One session's life.
pub struct Term {
    pub session: SessionId,
    renewals: watch::Receiver<Renewal>,
    _renewer: AbortOnDrop,
    /// The value of an acquire we sent but whose answer we did not see (cut short by a stop
    /// signal, or lost in transit): the key may be ours.
    in_flight: Option<HolderValue>,
    /// What we saw of the key while contending: the wait we owe, and so whether a release may
    /// be marked clean.
    free_watch: FreeWatch,
}

impl super::Term for Term {
    fn id(&self) -> String {
        self.session.0.clone()
    }

    fn renewals(&self) -> watch::Receiver<Renewal> {
        self.renewals.clone()
    }
}

/// The lock won.
#[derive(Debug, Clone)]
pub struct Won {
    /// What we wrote into the key; a release writes it back (marked clean when earned).
    pub value: HolderValue,
    /// The ModifyIndex of our acquire (election's module docs, 9).
    pub fencing_token: u64,
    /// Where the leader's watch starts.
    pub index: ConsulIndex,
    /// Until when the child must wait for earlier holders (`None`: it may start at once).
    pub owed_until: Option<BootTime>,
}

impl super::Won for Won {
    fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    fn owed_until(&self) -> Option<BootTime> {
        self.owed_until
    }
}

pub struct ConsulMutex {
    client: Arc<Client>,
    cfg: RunConfig,
    /// This process's previous term, once one ended (election's module docs, 7).
    previous: Option<PreviousTerm>,
    /// Whether the first contention checked that no semaphore runs under the key.
    prefix_checked: std::cell::Cell<bool>,
}

impl ConsulMutex {
    pub fn new(client: Arc<Client>, cfg: RunConfig) -> Self {
        Self {
            client,
            cfg,
            previous: None,
            prefix_checked: std::cell::Cell::new(false),
        }
    }

    /// `--limit 1 --key K` locks K itself, while `--limit N --key K` (and `consul lock -n`) keep
    /// their semaphore in `K/.lock`: the two would not exclude each other, and a fleet half-way
    /// through a change of `--limit` could run N + 1 commands. Refuse when `K/.lock` holds a
    /// semaphore. Checked once, at the first contention: it costs a read.
    async fn refuse_a_semaphore_under_the_key(&self) -> Result<(), ContendEnd> {
        if self.prefix_checked.replace(true) {
            return Ok(());
        }
        let lock = format!("{}/.lock", self.cfg.key);
        match self.client.kv_get(&lock, ReadOpts::default()).await {
            Ok((Some(e), _)) if e.flags == SEMAPHORE_FLAG_VALUE => Err(ContendEnd::Fatal(format!(
                "{lock} holds a semaphore (run --limit N, or consul lock -n), which a lock on {} \
                 would not exclude; use the same --limit on every host of this key",
                self.cfg.key
            ))),
            // Anything else, errors included: the contention that follows reads the key itself
            // and handles its errors.
            _ => Ok(()),
        }
    }

    /// Releases the key, writing `value` back, marked clean when `clean` (election's module
    /// docs, 5). Called only once no child of ours is running.
    async fn release_value(&self, term: &Term, value: &HolderValue, clean: bool) {
        let body = if clean {
            value.released_clean()
        } else {
            value.clone()
        }
        .to_bytes();
        // `false`: not ours (never acquired, or already lost), nothing to release.
        super::release_with_retries(
            &self.cfg.key,
            clean,
            "destroying the session",
            ConsulError::is_transient,
            || {
                self.client
                    .kv_release(&self.cfg.key, &term.session, LOCK_FLAG_VALUE, body.clone())
            },
        )
        .await;
    }

    /// How long to pause after an acquire refused by lock-delay: until the delay probably ends,
    /// then briskly, with jitter so that contenders do not knock in lockstep.
    fn lock_delay_pause(&self, term: &Term, attempt: u32) -> Duration {
        let now = BootTime::now();
        let brisk = election::backoff(
            attempt,
            Duration::from_millis(25),
            Duration::from_millis(250),
        );
        match term.free_watch.lock_delay_ends(self.cfg.lock_delay) {
            Some(end) if end > now + brisk => end.saturating_duration_since(now) + brisk / 2,
            _ => brisk,
        }
    }
}

impl Protocol for ConsulMutex {
    type Term = Term;
    type Won = Won;

    /// One attempt to create a session; on success the term's renewer runs.
    async fn open(&self) -> Result<Term, OpenError> {
        let session::Opened {
            id,
            renewals,
            renewer,
        } = session::open(
            &self.client,
            &session::request(&self.cfg),
            self.cfg.ttl,
            self.cfg.grace,
        )
        .await?;
        Ok(Term {
            session: id,
            renewals,
            _renewer: renewer,
            in_flight: None,
            free_watch: FreeWatch::default(),
        })
    }

    /// Ends a term: destroys its session (trying up to `attempts` times).
    async fn close(&self, term: Term, attempts: u32) {
        let id = term.session.clone();
        drop(term); // stops the renewer first
        session::destroy(&self.client, &id, attempts, self.cfg.ttl).await;
    }

    /// Contends for the key until we hold it, the wait runs out, the session ends, or something
    /// definitive happens. Cancel-safe: an acquire cut short is remembered in the term, and
    /// [`ConsulMutex::abandon`] lets go of it.
    async fn contend(&self, term: &mut Term, deadline: Option<Instant>) -> Result<Won, ContendEnd> {
        let cfg = &self.cfg;
        let client = &self.client;
        let timing = cfg.timing();
        let session = term.session.clone();
        let mut index = ConsulIndex(0);
        let mut announced: Option<String> = None;
        let mut delay_attempt = 0u32;
        let mut errors = Errors::new(format!("cannot read {}", cfg.key));
        let expired = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        // While a previous holder has priority: read no longer than until it ends.
        let mut priority_ends: Option<Instant> = None;
        self.refuse_a_semaphore_under_the_key().await?;
        loop {
            if term.renewals.borrow().end.is_some() {
                return Err(ContendEnd::SessionGone);
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let priority_left = priority_ends.map(|p| p.saturating_duration_since(Instant::now()));
            let wait = [remaining, priority_left]
                .into_iter()
                .flatten()
                .fold(MAX_BLOCK, Duration::min);
            let opts = if index.0 == 0 || wait.is_zero() {
                ReadOpts::default()
            } else {
                ReadOpts {
                    index,
                    wait: Some(wait),
                    ..ReadOpts::default()
                }
            };
            let (entry, new_index) = match client.kv_get(&cfg.key, opts).await {
                Ok(r) => {
                    errors.ok();
                    r
                }
                Err(e) if e.is_transient() && !expired(deadline) => {
                    errors.retry(&e).await;
                    index = ConsulIndex(0);
                    continue;
                }
                Err(e) => return Err(ContendEnd::Fatal(format!("cannot read {}: {e}", cfg.key))),
            };
            let view = election::classify(entry.as_ref(), &session);
            term.free_watch
                .observe(&view, &timing, self.previous.as_ref(), BootTime::now());
            priority_ends = None;
            match view {
                KeyView::Foreign { flags } => {
                    return Err(ContendEnd::Fatal(election::foreign_key_error(
                        &cfg.key, flags,
                    )));
                }
                KeyView::Held {
                    session: other,
                    holder,
                } => {
                    let who = election::describe_holder(&other, holder.as_deref());
                    if announced.as_deref() != Some(who.as_str()) {
                        info!("waiting for the lock on {}: held by {who}", cfg.key);
                        notify::status(&format!("standby, leader is {who}"));
                        announced = Some(who);
                    }
                    if expired(deadline) {
                        return Err(ContendEnd::Busy);
                    }
                    delay_attempt = 0;
                    index = next_index(index, new_index);
                    continue;
                }
                KeyView::Ours | KeyView::Absent | KeyView::Free { .. } => {}
            }
            // Leave the key to a previous holder that lost it to a fault, for the window: it
            // gets it back first (election's module docs, 8).
            let now = BootTime::now();
            if let Some((until, by)) = term.free_watch.priority(&cfg.id, cfg.priority_window) {
                if until > now {
                    let left = until.saturating_duration_since(now);
                    let who = format!("priority of {by}");
                    if announced.as_deref() != Some(who.as_str()) {
                        info!(
                            "the lock on {} is free, but its previous holder {by} lost it to a fault and has priority; trying in {}",
                            cfg.key,
                            humantime::format_duration(Duration::from_millis(
                                left.as_millis() as u64
                            ))
                        );
                        notify::status(&format!("standby, {by} has priority"));
                        announced = Some(who);
                    }
                    if expired(deadline) {
                        return Err(ContendEnd::Busy);
                    }
                    priority_ends = Some(Instant::now() + left);
                    index = next_index(index, new_index);
                    continue;
                }
            }
            // Made at each attempt, so that `acquired_at` says when we won and `owed_ms` what we
            // still owed when we sent it (election's module docs, 6).
            let owed_until = term.free_watch.owed_until(now);
            let owed = owed_until.map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
            let value = HolderValue {
                priority_window_ms: (!cfg.priority_window.is_zero())
                    .then(|| u64::try_from(cfg.priority_window.as_millis()).unwrap_or(u64::MAX)),
                ..HolderValue::new(&cfg.host, &cfg.id, &session, &timing, owed)
            };
            term.in_flight = Some(value.clone());
            let failed = match client
                .kv_acquire(&cfg.key, &session, LOCK_FLAG_VALUE, value.to_bytes())
                .await
            {
                Ok(true) => {
                    // Read back what we hold: its ModifyIndex is the fencing token, and its index
                    // is where the leader's watch starts.
                    let read = ReadOpts {
                        consistent: true,
                        ..ReadOpts::default()
                    };
                    match client.kv_get(&cfg.key, read).await {
                        Ok((Some(e), idx)) if e.session.as_deref() == Some(session.0.as_str()) => {
                            term.in_flight = None;
                            return Ok(Won {
                                value,
                                fencing_token: e.modify_index,
                                index: idx,
                                owed_until,
                            });
                        }
                        Ok(_) => {
                            // Lost between acquire and read-back (session destroyed): start over.
                            term.in_flight = None;
                            index = ConsulIndex(0);
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Ok(false) => {
                    term.in_flight = None;
                    // Refused while the key looked free: either someone else won the race (the
                    // next read shows them and we block on it), or Consul's lock-delay is in force.
                    index = ConsulIndex(0);
                    match client.kv_get(&cfg.key, ReadOpts::default()).await {
                        Ok((entry, _)) => {
                            let view = election::classify(entry.as_ref(), &session);
                            term.free_watch.observe(
                                &view,
                                &timing,
                                self.previous.as_ref(),
                                BootTime::now(),
                            );
                            if matches!(view, KeyView::Free { .. } | KeyView::Absent) {
                                if delay_attempt == 0 {
                                    info!(
                                        "the lock on {} is free but Consul's lock-delay is in force; retrying",
                                        cfg.key
                                    );
                                }
                                if expired(deadline) {
                                    return Err(ContendEnd::Busy);
                                }
                                let mut pause = self.lock_delay_pause(term, delay_attempt);
                                if let Some(d) = deadline {
                                    pause = pause.min(d.saturating_duration_since(Instant::now()));
                                }
                                delay_attempt += 1;
                                sleep(pause).await;
                            }
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Err(ConsulError::Status { body, .. }) if body.contains("invalid session") => {
                    return Err(ContendEnd::SessionGone);
                }
                Err(e) => e,
            };
            // An error on the acquire path: retry the transient ones with backoff, from a fresh
            // read (which tells whether the acquire went through).
            if !failed.is_transient() || expired(deadline) {
                return Err(ContendEnd::Fatal(format!(
                    "cannot acquire {}: {failed}",
                    cfg.key
                )));
            }
            errors.retry(&failed).await;
            index = ConsulIndex(0);
        }
    }

    /// Starts watching the key we won: the receiver gets the first sign that it is no longer ours.
    fn watch(&self, term: &Term, won: &Won) -> (AbortOnDrop, mpsc::Receiver<Verdict>) {
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(watch_key(
            self.client.clone(),
            self.cfg.key.clone(),
            term.session.clone(),
            won.index,
            WatchPace::new(self.cfg.ttl, self.cfg.grace),
            tx,
        ));
        (AbortOnDrop(task), rx)
    }

    async fn release(&self, term: &Term, won: &Won, clean: bool) {
        self.release_value(term, &won.value, clean).await;
    }
    /// After a contention was cut short (a stop signal, a definitive error): if an acquire may
    /// have gone through, let go of the key, marked clean only when no wait was owed any more.
    async fn busy(&self) -> Option<String> {
        let (entry, _) = self
            .client
            .kv_get(&self.cfg.key, ReadOpts::default())
            .await
            .ok()?;
        // No session of ours exists yet: any session in the key is another's.
        let view = election::classify(entry.as_ref(), &SessionId(String::new()));
        match view {
            KeyView::Held { session, holder } => Some(format!(
                "held by {}",
                election::describe_holder(&session, holder.as_deref())
            )),
            KeyView::Free { .. } => {
                let mut watch = FreeWatch::default();
                watch.observe(&view, &self.cfg.timing(), None, BootTime::now());
                watch
                    .priority(&self.cfg.id, self.cfg.priority_window)
                    .map(|(_, by)| format!("its previous holder {by} has priority"))
            }
            _ => None,
        }
    }

    fn remember(&mut self, previous: PreviousTerm) {
        self.previous = Some(previous);
    }

    async fn abandon(&self, term: &mut Term) {
        if let Some(value) = term.in_flight.take() {
            let clean = election::may_mark_clean(
                term.free_watch.owed_until(BootTime::now()),
                BootTime::now(),
            );
            self.release_value(term, &value, clean).await;
        }
    }
}

/// Watches the lock key (`session::watch`): lost when the key is gone, or held by another
/// session, or by none (Consul released it as it invalidated our session).
async fn watch_key(
    client: Arc<Client>,
    key: String,
    session: SessionId,
    index: ConsulIndex,
    pace: WatchPace,
    tx: mpsc::Sender<Verdict>,
) {
    let read = |opts| {
        let (client, key) = (client.clone(), key.clone());
        async move { client.kv_get(&key, opts).await }
    };
    let lost = |entry: &Option<KvEntry>, _| match entry {
        None => Some("the key was deleted".to_string()),
        Some(e) => match &e.session {
            Some(s) if *s == session.0 => None,
            Some(s) => Some(format!("the key is now held by session {s}")),
            None => Some("Consul released the key (the session was invalidated)".into()),
        },
    };
    session::watch(key.clone(), read, lost, index, pace, tx).await;
}
