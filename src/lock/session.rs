//! What the Consul lock protocols share: the session a term lives in and the habits of their
//! requests. A session is created with the contender's checks and timing ([`request`], [`open`]),
//! renewed by a hedged renewer that publishes each success as a [`Renewal`] (from which
//! `election::Fence` derives the leader's deadlines), and destroyed at the end of the term
//! ([`destroy`]). Blocking reads follow Consul's index rules ([`next_index`]); failed requests are
//! retried with jittered backoff and logged once ([`Errors`]).
//!
//! The mutex (`lock::consul`) and the semaphore (`lock::semaphore`) both use it, so that every
//! slot of a semaphore fences itself exactly as the mutex's leader does.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use super::{AbortOnDrop, OpenError, Renewal, SessionEnd, Verdict};
use crate::clock::BootTime;
use crate::config::RunConfig;
use crate::consul::{Client, ConsulError, ConsulIndex, ReadOpts, SessionId, SessionRequest};
use crate::election::{self, RenewPace, WatchPace};

/// At most this many renews in flight at once (one regular, the rest hedges).
const MAX_RENEWS_IN_FLIGHT: usize = 5;

/// The longest a contender blocks in one read.
pub const MAX_BLOCK: Duration = Duration::from_secs(300);

/// A leader's watch: blocking `?consistent` reads through `read` from `index`, paced by `pace`
/// (how long each may block and take: `election::WatchPace`), each answer judged by `lost`
/// (`Some(reason)`: the lock is no longer ours); reports the first sign on `tx`. After an error
/// the watch starts over from index 0, on a fresh connection, a read that answers at once: an
/// agent that restarted without its state has a lower index, and a blocking read on the old one
/// would wait its whole wait time instead of reporting what vanished; the connection that failed
/// may be dead. Transient errors are retried briskly (the fence covers a Consul we cannot reach);
/// a definitive one is reported as fatal. `what` names the key or prefix in messages.
pub async fn watch<T, Fut>(
    what: String,
    mut read: impl FnMut(ReadOpts) -> Fut,
    lost: impl Fn(&T, ConsulIndex) -> Option<String>,
    mut index: ConsulIndex,
    pace: WatchPace,
    tx: mpsc::Sender<Verdict>,
) where
    Fut: std::future::Future<Output = Result<(T, ConsulIndex), ConsulError>>,
{
    let mut attempt = 0u32;
    loop {
        let opts = ReadOpts {
            index,
            wait: Some(pace.wait),
            consistent: true,
            timeout: Some(if attempt == 0 {
                pace.timeout
            } else {
                pace.retry_timeout
            }),
            fresh: attempt > 0,
        };
        match read(opts).await {
            Ok((answer, new_index)) => {
                attempt = 0;
                if let Some(reason) = lost(&answer, new_index) {
                    let _ = tx.send(Verdict::Lost(reason)).await;
                    return;
                }
                index = next_index(index, new_index);
            }
            Err(e) if !e.is_transient() => {
                let _ = tx
                    .send(Verdict::Fatal(format!("cannot watch {what}: {e}")))
                    .await;
                return;
            }
            Err(e) => {
                debug!("watching {what} failed: {e}; retrying from index 0");
                index = ConsulIndex(0);
                sleep(election::backoff(
                    attempt,
                    election::WATCH_FIRST_RETRY,
                    Duration::from_millis(500),
                ))
                .await;
                attempt += 1;
            }
        }
    }
}

/// A session just created, with its renewer running.
pub struct Opened {
    pub id: SessionId,
    /// The renewer's reports.
    pub renewals: watch::Receiver<Renewal>,
    /// The renewer itself: dropping it stops the renews.
    pub renewer: AbortOnDrop,
}

/// The session a contender with `cfg` asks for: its name, TTL and lock-delay, and exactly the
/// checks it binds (the node's `serfHealth` unless `--no-node-check`, plus every `--check`), with
/// Behavior `release`; a protocol that needs another Behavior sets it.
pub fn request(cfg: &RunConfig) -> SessionRequest {
    let mut checks = Vec::new();
    if cfg.node_check {
        checks.push("serfHealth".to_string());
    }
    checks.extend(cfg.checks.iter().cloned());
    SessionRequest::new(cfg.session_name.clone(), cfg.ttl, cfg.lock_delay, checks)
}

/// One attempt to create a session; on success its renewer runs. An attempt takes at most the
/// client's short timeout.
pub async fn open(
    client: &Arc<Client>,
    req: &SessionRequest,
    ttl: Duration,
    grace: Duration,
) -> Result<Opened, OpenError> {
    let sent = BootTime::now();
    let id = client.session_create(req).await.map_err(|e| OpenError {
        message: format!("cannot create a Consul session: {}", session_hint(&e)),
        transient: e.is_transient(),
        unreachable: matches!(e, ConsulError::Unreachable { .. } | ConsulError::Tls { .. }),
    })?;
    debug!("created session {id}");
    let (tx, rx) = watch::channel(Renewal {
        last_ok_sent: sent,
        end: None,
    });
    let renewer = tokio::spawn(keep_session(client.clone(), id.clone(), ttl, grace, tx));
    Ok(Opened {
        id,
        renewals: rx,
        renewer: AbortOnDrop(renewer),
    })
}

/// Destroys a session whose renewer is already stopped, trying up to `attempts` times; Consul
/// expires it anyway after at most twice its `ttl`.
pub async fn destroy(client: &Client, session: &SessionId, attempts: u32, ttl: Duration) {
    for attempt in 0..attempts {
        match client.session_destroy(session).await {
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
                    humantime::format_duration(ttl * 2)
                );
                return;
            }
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
pub fn next_index(old: ConsulIndex, new: ConsulIndex) -> ConsulIndex {
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
pub struct Errors {
    what: String,
    attempt: u32,
}

impl Errors {
    pub fn new(what: String) -> Self {
        Self { what, attempt: 0 }
    }

    pub fn ok(&mut self) {
        if self.attempt > 0 {
            info!("{} works again", self.what.trim_start_matches("cannot "));
        }
        self.attempt = 0;
    }

    pub async fn retry(&mut self, e: &ConsulError) {
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
    let mut in_flight: JoinSet<(BootTime, Instant, Result<bool, ConsulError>)> = JoinSet::new();
    loop {
        tokio::select! {
            () = sleep_until(next) => {
                if in_flight.len() < MAX_RENEWS_IN_FLIGHT {
                    let client = client.clone();
                    let session = session.clone();
                    // A hedge (another renew is still out) takes a fresh connection.
                    let fresh = !in_flight.is_empty();
                    in_flight.spawn(async move {
                        let sent = BootTime::now();
                        let sent_mono = Instant::now();
                        let r = client.session_renew(&session, useful, fresh).await;
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
