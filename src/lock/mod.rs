//! Lock protocols: how a contender wins, holds and leaves a lock on one engine. `app` drives a
//! protocol and the supervisor and is the only place where the two meet; a protocol never sees
//! the child, and the supervisor never sees Consul.
//!
//! A protocol runs in *terms*: a term is one session's life (`open`, contend, hold, release,
//! `close`). While a term is open, a background task renews the session and publishes each
//! success as a [`Renewal`], from which `election::Fence` derives the leader's deadlines.
//!
//! Today there is one protocol, Consul's mutex in the layout of Go's `api.Lock` ([`consul`]).

pub mod consul;

use crate::clock::BootTime;

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
