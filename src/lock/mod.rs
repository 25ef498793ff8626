//! Lock protocols: how a contender wins, holds and leaves a lock on one engine. `app` drives a
//! protocol and the supervisor and is the only place where the two meet; a protocol never sees
//! the child, and the supervisor never sees Consul.
//!
//! A protocol runs in *terms*: a term is one session's life (`open`, contend, hold, release,
//! `close`). While a term is open, a background task renews the session and publishes each
//! success as a [`Renewal`], from which `election::Fence` derives the leader's deadlines.
//!
//! [`Protocol`] is the seam: `app` is generic over it, and each protocol lives in its own module
//! with its pure rules in `election` (or beside it), unit-tested. Two protocols run on Consul:
//! the mutex in the layout of Go's `api.Lock` ([`consul`], `--limit 1`) and the semaphore in the
//! layout of `api.Semaphore` ([`semaphore`], `--limit N`); both live in sessions opened, renewed
//! and destroyed by [`session`]. One runs on etcd: etcd's mutex in the layout of its
//! `concurrency` package and `etcdctl lock` ([`etcd`]), where a term is a lease.

pub mod consul;
pub mod etcd;
pub mod semaphore;
pub mod session;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::clock::BootTime;
use crate::election::PreviousTerm;

/// One engine's way to win, hold and leave a lock. Every method but [`Protocol::open`] is
/// cancel-safe where `app` races it against signals.
pub trait Protocol {
    type Term: Term;
    type Won: Won;

    /// One attempt to open a term (create a session, grant a lease) and start renewing it. Not
    /// cancel-safe: a dropped attempt could leave a session to expire, so `app` finishes it.
    async fn open(&self) -> Result<Self::Term, OpenError>;

    /// Ends a term (destroys its session), trying up to `attempts` times.
    async fn close(&self, term: Self::Term, attempts: u32);

    /// Contends until the lock is ours, `deadline` passes, the session ends, or something
    /// definitive happens. An acquire cut short is remembered for [`Protocol::abandon`].
    async fn contend(
        &self,
        term: &mut Self::Term,
        deadline: Option<Instant>,
    ) -> Result<Self::Won, ContendEnd>;

    /// Watches the lock won: the receiver gets the first sign that it is no longer ours.
    fn watch(&self, term: &Self::Term, won: &Self::Won) -> (AbortOnDrop, mpsc::Receiver<Verdict>);

    /// Releases the lock, marked clean when `clean` (`election::may_mark_clean`). Called only
    /// once no child of ours is running.
    async fn release(&self, term: &Self::Term, won: &Self::Won, clean: bool);

    /// After a contention was cut short: lets go of a lock an acquire may have taken.
    async fn abandon(&self, term: &mut Self::Term);

    /// One read that tells, without opening a term, that the lock is certainly not to be had
    /// now: `Some(why)` (held, or another holder has priority). For `--wait 0`, so that the
    /// usual cron case writes nothing to the engine. `None` when it may be free, or on any
    /// error (the full path then reports it).
    async fn busy(&self) -> Option<String> {
        None
    }

    /// Remembers this process's previous term after a loss, for the next contention
    /// (`election::PreviousTerm`). Protocols that cannot use it ignore it.
    fn remember(&mut self, previous: PreviousTerm) {
        let _ = previous;
    }
}

/// An open term.
pub trait Term {
    /// The session (or lease) id, for logs and the child's environment.
    fn id(&self) -> String;
    /// The renewer's reports.
    fn renewals(&self) -> watch::Receiver<Renewal>;
}

/// A lock won.
pub trait Won {
    /// The child's `CONSUL_LEADER_FENCING_TOKEN`: a cluster-wide index that grows with every
    /// holder.
    fn fencing_token(&self) -> u64;
    /// Until when the child must wait for earlier holders (`None`: it may start at once).
    fn owed_until(&self) -> Option<BootTime>;
    /// Variables this protocol gives the child beside the common ones, so that scripts written
    /// for the engine's own tool keep working (etcd: `ETCD_LOCK_KEY` and `ETCD_LOCK_REV`, as
    /// `etcdctl lock` sets them). None by default.
    fn child_env(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Why a term could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenError {
    /// What failed and what to do, for the operator.
    pub message: String,
    /// Worth retrying: the engine may answer differently in a moment.
    pub transient: bool,
    /// The engine could not be reached at all (connection refused, TLS failed): on the very
    /// first attempt, most likely a wrong address or certificate, reported at once.
    pub unreachable: bool,
}

/// How a protocol releases a lock it won: up to five attempts, transient errors (`transient`)
/// retried with backoff, the outcome logged once. `attempt` sends one release and answers whether
/// the lock was still ours to release (`false`: already lost, nothing to do); `otherwise` names
/// what still frees the lock when every attempt fails (ending the session or the lease).
pub(crate) async fn release_with_retries<E, F, Fut>(
    key: &str,
    clean: bool,
    otherwise: &str,
    transient: impl Fn(&E) -> bool,
    mut attempt: F,
) where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, E>>,
{
    for n in 0..5 {
        match attempt().await {
            Ok(true) => {
                if clean {
                    tracing::info!("released the lock on {key}");
                } else {
                    tracing::info!(
                        "released the lock on {key}, not marked clean: the wait for earlier holders had not passed"
                    );
                }
                return;
            }
            Ok(false) => return,
            Err(e) if transient(&e) && n < 4 => {
                tracing::debug!("release failed: {e}; retrying");
                tokio::time::sleep(crate::election::backoff(
                    n,
                    std::time::Duration::from_millis(200),
                    std::time::Duration::from_secs(2),
                ))
                .await;
            }
            Err(e) => {
                tracing::warn!("cannot release the lock on {key}: {e}; {otherwise} releases it");
                return;
            }
        }
    }
}

/// Aborts a task when dropped, so that nothing of a term outlives it.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    pub fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(task))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a term's renewer publishes: the send time of the last successful renew and, once it
/// happened, how the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    pub last_ok_sent: BootTime,
    pub end: Option<SessionEnd>,
}

/// How a session ended under a term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The engine no longer knows it: expired, destroyed, invalidated by a failed check.
    Gone,
    /// A definitive answer (an ACL refusal, a bad request) that no retry can change; the text
    /// says what the engine answered.
    Fatal(String),
}

/// Why leadership ends while held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Another holder, a vanished key, a lost session: the usual loss (`--on-lost` decides).
    Lost(String),
    /// The engine refuses us for good (ACLs): stop and exit 125.
    Fatal(String),
}

/// Why a contention ended without the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContendEnd {
    /// Not leader within `--wait`.
    Busy,
    /// The session ended while we waited: open a new term.
    SessionGone,
    /// A definitive error; the text says what and what to do.
    Fatal(String),
}
