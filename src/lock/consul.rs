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
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use super::{AbortOnDrop, ContendEnd, OpenError, Protocol, Renewal, SessionEnd, Verdict};
use crate::clock::BootTime;
use crate::config::RunConfig;
use crate::consul::{Client, ConsulError, ConsulIndex, ReadOpts, SessionId, SessionRequest};
use crate::election::{self, Fence, FreeWatch, HolderValue, KeyView, PreviousTerm};
use crate::notify;
use crate::wire::LOCK_FLAG_VALUE;

/// At most this many renews in flight at once (one regular, the rest hedges).
const MAX_RENEWS_IN_FLIGHT: usize = 5;

/// The longest a contender blocks in one read.
const MAX_BLOCK: Duration = Duration::from_secs(300);

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
}

impl ConsulMutex {
    pub fn new(client: Arc<Client>, cfg: RunConfig) -> Self {
        Self {
            client,
            cfg,
            previous: None,
        }
    }

    fn session_request(&self) -> SessionRequest {
        let mut checks = Vec::new();
        if self.cfg.node_check {
            checks.push("serfHealth".to_string());
        }
        checks.extend(self.cfg.checks.iter().cloned());
        SessionRequest::new(
            self.cfg.session_name.clone(),
            self.cfg.ttl,
            self.cfg.lock_delay,
            checks,
        )
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
        for attempt in 0..5 {
            match self
                .client
                .kv_release(&self.cfg.key, &term.session, LOCK_FLAG_VALUE, body.clone())
                .await
            {
                Ok(true) => {
                    if clean {
                        info!("released the lock on {}", self.cfg.key);
                    } else {
                        info!(
                            "released the lock on {}, not marked clean: the wait for earlier holders had not passed",
                            self.cfg.key
                        );
                    }
                    return;
                }
                // Not ours (never acquired, or already lost): nothing to release.
                Ok(false) => return,
                Err(e) if e.is_transient() && attempt < 4 => {
                    debug!("release failed: {e}; retrying");
                    sleep(election::backoff(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(2),
                    ))
                    .await;
                }
                Err(e) => {
                    warn!(
                        "cannot release the lock on {}: {e}; destroying the session releases it",
                        self.cfg.key
                    );
                    return;
                }
            }
        }
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

    /// One attempt to create a session; on success the term's renewer runs. An attempt takes
    /// at most the client's short timeout.
    async fn open(&self) -> Result<Term, OpenError> {
        let sent = BootTime::now();
        let session = self
            .client
            .session_create(&self.session_request())
            .await
            .map_err(|e| OpenError {
                message: format!("cannot create a Consul session: {}", session_hint(&e)),
                transient: e.is_transient(),
                unreachable: matches!(e, ConsulError::Unreachable { .. } | ConsulError::Tls { .. }),
            })?;
        debug!("created session {session}");
        let (tx, rx) = watch::channel(Renewal {
            last_ok_sent: sent,
            end: None,
        });
        let renewer = tokio::spawn(keep_session(
            self.client.clone(),
            session.clone(),
            self.cfg.ttl,
            self.cfg.grace,
            tx,
        ));
        Ok(Term {
            session,
            renewals: rx,
            _renewer: AbortOnDrop(renewer),
            in_flight: None,
            free_watch: FreeWatch::default(),
        })
    }

    /// Ends a term: destroys its session (trying up to `attempts` times).
    async fn close(&self, term: Term, attempts: u32) {
        let session = term.session.clone();
        drop(term); // stops the renewer first
        for attempt in 0..attempts {
            match self.client.session_destroy(&session).await {
                Ok(()) => {
                    debug!("destroyed session {session}");
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
                        "cannot destroy session {session}: {e}; Consul will expire it after at most {}",
                        humantime::format_duration(self.cfg.ttl * 2)
                    );
                    return;
                }
            }
        }
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
                    consistent: false,
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
            let value = HolderValue::new(&cfg.host, &cfg.id, &session, &timing, owed);
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
            self.cfg.ttl * 2,
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

/// What to add to a failed session create so that the operator knows what to change.
fn session_hint(e: &ConsulError) -> String {
    match e {
        ConsulError::Status { body, .. } if body.contains("Session TTL") => {
            format!("{e}; the agent's session_ttl_min is larger than --ttl, raise --ttl")
        }
        ConsulError::Status { body, .. } if body.contains("Missing check") => format!(
            "{e}; check the --check IDs, or pass --no-node-check if the node has no serfHealth"
        ),
        ConsulError::Status { body, .. } if body.contains("critical") => format!(
            "{e}; Consul binds no failing check to a session: make the check pass, or leave it out \
             (--check, --no-node-check)"
        ),
        _ => e.to_string(),
    }
}

/// The next index to block on after a read answered `new` (Consul's blocking-query rules): an
/// index that goes backwards (an agent that restarted and lost its state, a restored snapshot)
/// resets the watch to 0, which reads at once; 0 itself is never blocked on.
fn next_index(old: ConsulIndex, new: ConsulIndex) -> ConsulIndex {
    if new < old {
        ConsulIndex(0)
    } else if new.0 == 0 {
        ConsulIndex(1)
    } else {
        new
    }
}

/// Failures of one kind of request in a row: the first is logged, the rest only at debug level;
/// each retry waits a jittered, growing pause.
struct Errors {
    what: String,
    attempt: u32,
}

impl Errors {
    fn new(what: String) -> Self {
        Self { what, attempt: 0 }
    }

    fn ok(&mut self) {
        if self.attempt > 0 {
            info!("{} works again", self.what.trim_start_matches("cannot "));
        }
        self.attempt = 0;
    }

    async fn retry(&mut self, e: &ConsulError) {
        if self.attempt == 0 {
            warn!("{}: {e}; retrying", self.what);
        } else {
            debug!("{}: {e}; retrying", self.what);
        }
        let pause = election::backoff(
            self.attempt,
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        self.attempt += 1;
        sleep(pause).await;
    }
}

/// Renews the session every TTL/3 and publishes each success (by its send time) or the session's
/// end. A renew is given as long as its success could still help (until the fence it would buy
/// has passed), and while one is outstanding another is sent, on a fresh connection, every
/// TTL/10 (at most [`MAX_RENEWS_IN_FLIGHT`] at once): a slow agent costs no false loss while its
/// answers come within `T - g - m - max(T/10, latency/5)`, about half the TTL with the defaults.
/// Transient errors are retried with backoff and are not a loss by themselves: the leader's fence
/// decides that.
async fn keep_session(
    client: Arc<Client>,
    session: SessionId,
    ttl: Duration,
    grace: Duration,
    tx: watch::Sender<Renewal>,
) {
    let period = ttl / 3;
    let hedge = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let first = tx.borrow().last_ok_sent;
    // A renew sent at S buys the fence S + (T - g - m); past that its answer is useless.
    let useful = {
        let f = Fence::after_renew(first, ttl, grace);
        f.stop_at
            .saturating_duration_since(first)
            .max(Duration::from_millis(100))
    };
    let since_first = BootTime::now().saturating_duration_since(first);
    let mut next = Instant::now() + period.saturating_sub(since_first);
    let mut last_ok = first;
    let mut failures = 0u32;
    let mut in_flight: JoinSet<(BootTime, Instant, Result<bool, ConsulError>)> = JoinSet::new();
    loop {
        tokio::select! {
            () = sleep_until(next) => {
                if in_flight.len() < MAX_RENEWS_IN_FLIGHT {
                    let client = client.clone();
                    let session = session.clone();
                    in_flight.spawn(async move {
                        let sent = BootTime::now();
                        let sent_mono = Instant::now();
                        let r = client.session_renew(&session, useful).await;
                        (sent, sent_mono, r.map(|found| found.is_some()))
                    });
                }
                // If this one is still out by then, hedge with another.
                next = Instant::now() + hedge;
            }
            Some(done) = in_flight.join_next() => {
                let Ok((sent, sent_mono, result)) = done else { continue };
                match result {
                    Ok(true) => {
                        if failures > 0 {
                            info!("session renew works again");
                            failures = 0;
                        }
                        debug!("renewed session {session}");
                        if sent > last_ok {
                            last_ok = sent;
                            tx.send_modify(|r| r.last_ok_sent = sent);
                            next = sent_mono + period;
                        }
                    }
                    Ok(false) => {
                        tx.send_modify(|r| r.end = Some(SessionEnd::Gone));
                        return;
                    }
                    Err(e) if !e.is_transient() => {
                        tx.send_modify(|r| r.end = Some(SessionEnd::Fatal(e.to_string())));
                        return;
                    }
                    Err(e) => {
                        if failures == 0 {
                            warn!("session renew failed: {e}; retrying");
                        } else {
                            debug!("session renew failed again: {e}");
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

/// Watches the lock key with blocking `?consistent` reads; reports the first sign that it is no
/// longer ours. After an error the watch starts over from index 0, a read that answers at once:
/// an agent that restarted without its state has a lower index, and a blocking read on the old
/// one would wait its whole wait time instead of reporting the vanished key. Transient errors are
/// retried briskly (the fence covers a Consul we cannot reach); a definitive one is reported.
async fn watch_key(
    client: Arc<Client>,
    key: String,
    session: SessionId,
    mut index: ConsulIndex,
    wait: Duration,
    tx: mpsc::Sender<Verdict>,
) {
    let mut attempt = 0u32;
    loop {
        let opts = ReadOpts {
            index,
            wait: Some(wait),
            consistent: true,
        };
        match client.kv_get(&key, opts).await {
            Ok((entry, new_index)) => {
                attempt = 0;
                let reason = match entry {
                    None => Some("the key was deleted".to_string()),
                    Some(e) => match e.session {
                        Some(s) if s == session.0 => None,
                        Some(s) => Some(format!("the key is now held by session {s}")),
                        None => {
                            Some("Consul released the key (the session was invalidated)".into())
                        }
                    },
                };
                if let Some(reason) = reason {
                    let _ = tx.send(Verdict::Lost(reason)).await;
                    return;
                }
                index = next_index(index, new_index);
            }
            Err(e) if !e.is_transient() => {
                let _ = tx
                    .send(Verdict::Fatal(format!("cannot watch {key}: {e}")))
                    .await;
                return;
            }
            Err(e) => {
                debug!("watching {key} failed: {e}; retrying from index 0");
                index = ConsulIndex(0);
                sleep(election::backoff(
                    attempt,
                    Duration::from_millis(50),
                    Duration::from_millis(500),
                ))
                .await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_index_follows_consuls_rules() {
        let i = ConsulIndex;
        assert_eq!(next_index(i(5), i(9)), i(9));
        assert_eq!(next_index(i(9), i(9)), i(9));
        // Backwards (state lost): start over with a read that answers at once.
        assert_eq!(next_index(i(9), i(3)), i(0));
        assert_eq!(next_index(i(0), i(0)), i(1));
    }
}
