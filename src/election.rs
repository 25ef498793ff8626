//! The rules of leadership, as pure functions over what we observed: how to read the lock key, how
//! long a new leader's child must wait (the silence), when a leader must stop on its own (the
//! fence), when a release may be marked clean, and how long to back off. The driver in `app`
//! performs the I/O and asks these functions what to do; they are unit-tested here without a
//! network.
//!
//! # Why two children never run at once
//!
//! Let `T` be the session TTL, `g` the grace period, `d` lock-delay, `s` silence and `m` the fence
//! margin ([`fence_margin`]). Durations are compared across hosts, instants never are; each host
//! measures on `CLOCK_BOOTTIME`, which counts suspend ([`crate::clock`]).
//!
//! 1. **The fence.** A leader renews every `T/3` and remembers `R`, the *send* time of its last
//!    successful renew. Consul processed that renew at or after `R`, so it cannot expire the
//!    session before `R + T` (in practice it waits `2T`). If no later renew succeeds, the stop
//!    sequence starts at `R + T - g - m` and the child group is gone by `R + T - m`
//!    ([`Fence`]), without reaching Consul at all; if the wrapper itself is stalled, its keeper
//!    process enforces the same fence. `config` refuses `g >= T/2`, which leaves room to retry
//!    renews before the fence.
//! 2. **Early invalidation.** Consul may invalidate the session at any moment `I >= R`: a bound
//!    check that goes critical does it at once, and the node's `serfHealth` goes critical
//!    seconds into a partition (hashicorp/consul #9788); so does a `session destroy`. The key is
//!    free from `I`, while a leader that cannot hear about it keeps its child until its fence,
//!    up to `R + T - m < I + T`. The next child must therefore not start before `I + T`.
//! 3. **The successor's wait.** A contender that finds the key free, not marked clean, first sees
//!    it so at some `F >= I`. Consul refuses it the key until `I + d_h` (the holder's lock-delay),
//!    and it starts its child no earlier than `F + w`, with `w` = [`owed_wait`]: the largest of
//!    its own `s`, the holder's `T_h` unless `d_h >= T_h`, and the holder's own debt (6). If
//!    `d_h >= T_h`, the acquire is already past `I + T_h`; otherwise `F + w >= I + T_h`. The
//!    holder writes `T_h` and `d_h` into the key's value ([`HolderValue`]) so that a successor
//!    configured differently honours them. Silence and lock-delay count from (about) the same
//!    moment, so they overlap rather than add up. `config` refuses `max(d, s) < T`, so that the
//!    rule holds between hosts sharing one configuration even when the holder's value says
//!    nothing of its timing (a `consul lock` holder, an older consul-leader), and so that Consul's
//!    lock-delay alone holds back successors that know no silence (`consul lock`) when `d >= T`.
//! 4. **A key that vanished.** A missing key (deleted by an operator, restored from an old
//!    snapshot, lost by an agent) names no holder, and Consul applies no lock-delay to a key
//!    that does not exist. A contender that finds it missing (or never locked) owes
//!    `max(s, T)` from its first sighting `F`, assuming the lost holder shared its
//!    configuration. The vanishing happened at `D <= F`. A healthy holder sees it on its watch
//!    within `v` and is gone by `D + v + g`: its blocking reads are bounded so that
//!    `v < T - g - m` even when the connection a read waits on died without a sound while its
//!    renews still get through ([`WatchPace`]). A holder cut off from Consul made its last renew
//!    before the cut, so it is gone by `R + T - m`, with `R <= D + r` (`r` a round trip): the
//!    margin `m` covers it. Either way, before `F + T`.
//! 5. **The clean mark.** A holder writes `"released": "clean"` only when no earlier child of the
//!    key can still run ([`may_mark_clean`]): it owed no wait, or its wait passed (a child of its
//!    own only ever starts after that, and is confirmed gone before any release). A successor
//!    that sees the mark starts at once.
//! 6. **Debts are inherited.** A holder that leaves before its wait passed (a stop signal during
//!    the silence, a fatal error, a crash) releases without the mark, and the wait it still owed
//!    when it sent its acquire is in its value (`owed_ms`). Its successor first sees the key
//!    free at `F` after that acquire, so `F + owed >= ` the end of the debt it inherits.
//! 7. **Our own previous term.** After a loss, a wrapper that stays in the race
//!    (`--on-lost recontend`) may find the key still naming the session of its own previous
//!    term, which this very process ended by confirming its child gone. Then nothing of that
//!    holder can run; what is owed is only what that term itself still owed to earlier holders,
//!    which the process knows to the instant ([`PreviousTerm`]). A restarted wrapper (a new
//!    process, even with the same `--id`) cannot prove it, and waits as anyone else.
//! 8. **Priority** (`--priority-window`) only delays *other* contenders' acquires after an unclean
//!    end; it never shortens a wait, so it cannot break 1 to 7.
//! 9. **Fencing tokens.** A child's token is the `ModifyIndex` of the acquire that admitted it: a
//!    Raft index, which grows with every write in the cluster, across deletions and
//!    recreations of the key. (An agent or cluster that loses its Raft state starts its indexes
//!    again; nothing outside the cluster can fix that.)

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::clock::BootTime;
use crate::consul::SessionId;
use crate::wire::{KvEntry, LOCK_FLAG_VALUE, SEMAPHORE_FLAG_VALUE};

/// The timing a contender runs with: what its own fence needs, and what it owes others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl: Duration,
    pub lock_delay: Duration,
    pub silence: Duration,
}

/// What we write into the lock key's value: who holds it, the timing its successors must honour,
/// and whether it left cleanly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HolderValue {
    /// `host:pid`, a name a person can find.
    #[serde(default)]
    pub holder: String,
    /// The holder's stable identity (`--id`): who gets the lock back first after a fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub session: String,
    /// RFC 3339, UTC.
    #[serde(default)]
    pub acquired_at: String,
    #[serde(default)]
    pub version: String,
    /// The holder's session TTL, in milliseconds: how long after its last renew its child may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// The holder's session lock-delay, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_delay_ms: Option<u64>,
    /// The wait the holder still owed to earlier holders when it sent its acquire (module docs, 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owed_ms: Option<u64>,
    /// The holder's `--priority-window` in milliseconds, when it set one. Each contender uses
    /// its own window; in a fleet that shares its settings this one is theirs, and `status`
    /// uses it to say until when the holder has priority after a fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_window_ms: Option<u64>,
    /// `"clean"` once the holder released knowing no earlier child of the key can still run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<String>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl HolderValue {
    /// The value contender `id` on `host` with `timing` acquires with, still owing `owed` to
    /// earlier holders.
    pub fn new(host: &str, id: &str, session: &SessionId, timing: &Timing, owed: Duration) -> Self {
        Self {
            holder: format!("{host}:{}", std::process::id()),
            id: Some(id.to_string()),
            host: host.to_string(),
            pid: std::process::id(),
            session: session.0.clone(),
            acquired_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ttl_ms: Some(millis(timing.ttl)),
            lock_delay_ms: Some(millis(timing.lock_delay)),
            owed_ms: Some(millis(owed)),
            priority_window_ms: None,
            released: None,
            released_at: None,
        }
    }

    /// The same value, marked as cleanly released now.
    pub fn released_clean(&self) -> Self {
        Self {
            released: Some("clean".to_string()),
            released_at: Some(
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ),
            ..self.clone()
        }
    }

    pub fn is_clean(&self) -> bool {
        self.released.as_deref() == Some("clean")
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a key's value; `None` for values not written by consul-leader (e.g. `consul lock`).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(bytes)
            .ok()
            .filter(|v| !v.session.is_empty())
    }

    /// What this holder's successor owes it (module docs, 3 and 6), judged with `own` timing
    /// where the value does not say (values of older versions).
    fn debt(&self, own: &Timing) -> Duration {
        let ttl = self.ttl_ms.map_or(own.ttl, Duration::from_millis);
        let lock_delay = self
            .lock_delay_ms
            .map_or(own.lock_delay, Duration::from_millis);
        fence_debt(ttl, lock_delay).max(self.owed_ms.map_or(Duration::ZERO, Duration::from_millis))
    }
}

/// What the lock key tells a contender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyView {
    /// No such key: it never existed, or it was deleted, or the agent lost it. Nothing tells
    /// which, so an old child may still run (module docs, 4).
    Absent,
    /// Nobody holds it now.
    Free {
        /// The key's LockIndex: a new acquire (and release) since we last looked changes it.
        lock_index: u64,
        /// How the last holder left.
        last: LastHolder,
    },
    /// Our session holds it.
    Ours,
    /// Another session holds it.
    Held {
        session: String,
        holder: Option<Box<HolderValue>>,
    },
    /// The key is used for something other than a lock; we must not touch it.
    Foreign { flags: u64 },
}

/// How the last holder of a free key left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastHolder {
    /// Released clean: no earlier child of the key can still run.
    Clean,
    /// Not clean. `None` when the value is not ours to read (`consul lock`, `api.Lock`).
    Unclean(Option<Box<HolderValue>>),
    /// Never locked (LockIndex 0): a key written by hand or restored; as unknown as a missing key.
    Never,
}

/// Classifies the key as a contender sees it.
pub fn classify(entry: Option<&KvEntry>, ours: &SessionId) -> KeyView {
    let Some(e) = entry else {
        return KeyView::Absent;
    };
    if e.flags != LOCK_FLAG_VALUE {
        return KeyView::Foreign { flags: e.flags };
    }
    match &e.session {
        Some(s) if *s == ours.0 => KeyView::Ours,
        Some(s) => KeyView::Held {
            session: s.clone(),
            holder: HolderValue::parse(&e.value_bytes()).map(Box::new),
        },
        None => {
            let last = if e.lock_index == 0 {
                LastHolder::Never
            } else {
                match HolderValue::parse(&e.value_bytes()) {
                    Some(v) if v.is_clean() => LastHolder::Clean,
                    other => LastHolder::Unclean(other.map(Box::new)),
                }
            };
            KeyView::Free {
                lock_index: e.lock_index,
                last,
            }
        }
    }
}

/// What a successor must wait, from its first sighting of the free key, for the fence of a holder
/// with this TTL and lock-delay: nothing when Consul's lock-delay outlasts the fence, else the TTL.
fn fence_debt(ttl: Duration, lock_delay: Duration) -> Duration {
    if lock_delay >= ttl {
        Duration::ZERO
    } else {
        ttl
    }
}

/// How long after first seeing the key free (or missing) a new leader's child must wait
/// (module docs, 3 to 6). `None` for a view that is not free.
pub fn owed_wait(view: &KeyView, own: &Timing) -> Option<Duration> {
    let unknown = own.silence.max(own.ttl);
    match view {
        KeyView::Absent => Some(unknown),
        KeyView::Free { last, .. } => Some(match last {
            LastHolder::Clean => Duration::ZERO,
            LastHolder::Never => unknown,
            LastHolder::Unclean(Some(v)) => own.silence.max(v.debt(own)),
            // A holder that wrote nothing of its timing: assume it shared ours.
            LastHolder::Unclean(None) => own.silence.max(fence_debt(own.ttl, own.lock_delay)),
        }),
        KeyView::Ours | KeyView::Held { .. } | KeyView::Foreign { .. } => None,
    }
}

/// Whether a holder that is leaving may mark its release clean (module docs, 5): only when the
/// wait it owed to earlier holders (`owed_until`, `None` for none) has passed.
pub fn may_mark_clean(owed_until: Option<BootTime>, now: BootTime) -> bool {
    owed_until.is_none_or(|until| now >= until)
}

/// Explains a foreign key to the operator.
pub fn foreign_key_error(key: &str, flags: u64) -> String {
    let what = if flags == SEMAPHORE_FLAG_VALUE {
        "a Consul semaphore".to_string()
    } else {
        format!("data that is not a lock (flags {flags})")
    };
    format!(
        "key {key} holds {what}; consul-leader will not overwrite it. Choose another --key, or delete the key if it is stale"
    )
}

/// Describes a holder for log lines: `host:pid (session S)`, or just the session.
pub fn describe_holder(session: &str, holder: Option<&HolderValue>) -> String {
    match holder {
        Some(h) => format!("{} (session {session})", h.holder),
        None => format!("session {session}"),
    }
}

/// What a wrapper remembers of its own previous term, for the next one: a key that still names
/// that term's session was left by this very process, which confirmed its child gone, so the
/// only wait owed is what that term itself still owed (module docs, 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousTerm {
    pub session: String,
    /// What the previous term still owed to earlier holders when it ended (`None`: nothing,
    /// e.g. because its child ran).
    pub owed_until: Option<BootTime>,
}

/// Tracks what a contender has seen of the key, to decide its wait when it wins.
#[derive(Debug, Default, Clone)]
pub struct FreeWatch {
    /// When we first saw the key free (or missing) in the current free period, and which period:
    /// the key's LockIndex then (`None` while it is missing). A new acquire in between, even one
    /// we did not see, changes the LockIndex and starts a new period.
    since: Option<(BootTime, Option<u64>)>,
    /// The wait owed from `since`, as the key last looked.
    owed: Duration,
    /// A wait owed until a known moment instead (our own previous term's debt).
    owed_until: Option<BootTime>,
    /// The last holder's lock-delay, when its value says.
    holder_lock_delay: Option<Duration>,
    /// The id of a last holder that lost the lock uncleanly: it has priority.
    lost_by: Option<String>,
}

impl FreeWatch {
    /// Records one observation of the key made at `now`; `previous` is this process's own
    /// previous term, if any.
    pub fn observe(
        &mut self,
        view: &KeyView,
        own: &Timing,
        previous: Option<&PreviousTerm>,
        now: BootTime,
    ) {
        let period = match view {
            KeyView::Absent => None,
            KeyView::Free { lock_index, .. } => Some(*lock_index),
            KeyView::Held { .. } => {
                self.since = None;
                return;
            }
            KeyView::Ours | KeyView::Foreign { .. } => return,
        };
        if self.since.is_none_or(|(_, p)| p != period) {
            self.since = Some((now, period));
        }
        let last = match view {
            KeyView::Free {
                last: LastHolder::Unclean(Some(v)),
                ..
            } => Some(v),
            _ => None,
        };
        match (last, previous) {
            (Some(v), Some(p)) if v.session == p.session => {
                self.owed = Duration::ZERO;
                self.owed_until = p.owed_until;
            }
            _ => {
                self.owed = owed_wait(view, own).unwrap_or_default();
                self.owed_until = None;
            }
        }
        self.holder_lock_delay = last.and_then(|v| v.lock_delay_ms.map(Duration::from_millis));
        self.lost_by = last.and_then(|v| v.id.clone());
    }

    /// Until when contender `own_id` must leave the free key to the holder that lost it to a
    /// fault (module docs, 8), and that holder's id; `None` when nobody has priority over us.
    pub fn priority(&self, own_id: &str, window: Duration) -> Option<(BootTime, &str)> {
        let (since, _) = self.since?;
        let by = self.lost_by.as_deref().filter(|by| *by != own_id)?;
        (!window.is_zero()).then_some((since + window, by))
    }

    /// When the lock-delay that refuses the key probably ends: the last holder's lock-delay (or
    /// `own`) after the key was first seen free (its session ended about then). `None` when the
    /// key has not been seen free.
    pub fn lock_delay_ends(&self, own: Duration) -> Option<BootTime> {
        self.since
            .map(|(t, _)| t + self.holder_lock_delay.unwrap_or(own))
    }

    /// Until when our child must wait, having acquired (or sent the acquire) at `now`: `None`
    /// means it may start at once.
    pub fn owed_until(&self, now: BootTime) -> Option<BootTime> {
        let relative =
            (!self.owed.is_zero()).then(|| self.since.map_or(now, |(t, _)| t) + self.owed);
        let until = relative.max(self.owed_until)?;
        (until > now).then_some(until)
    }
}

/// Margin kept between the end of the stop sequence and the earliest moment Consul may invalidate
/// the session: a twentieth of the TTL, between 100ms and 1s.
pub fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// How a leader watches its key (or its semaphore's prefix) with blocking reads, so that a
/// healthy leader sees its key vanish in time (module docs, 4) even when the connection a read
/// waits on died without a sound (a NAT or firewall that lost its state, while renews get through
/// on fresh connections): each read blocks at most `wait` and is given up after `timeout`; the
/// read after a failure goes out on a fresh connection and answers at once (index 0), within
/// `retry_timeout`. With `B = T - g - m`: `wait = B/3`, `timeout = B/2` (room for Consul's jitter
/// of wait/16 and the round trip), `retry_timeout = B/2 - 2 x 50ms`; a vanishing is seen within
/// `timeout + ` the first retry pause (at most 62.5ms) `+ retry_timeout < B`, so the child is
/// gone before `T - m` after it, and the successor waits at least `T` (4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchPace {
    pub wait: Duration,
    pub timeout: Duration,
    pub retry_timeout: Duration,
}

impl WatchPace {
    pub fn new(ttl: Duration, grace: Duration) -> Self {
        let budget = ttl.saturating_sub(grace + fence_margin(ttl));
        Self {
            wait: budget / 3,
            timeout: budget / 2,
            // Long enough for a slow agent: with blocking reads given up, the retries alone
            // still see a change within the budget while the agent answers within about B/2.
            retry_timeout: (budget / 2).saturating_sub(WATCH_FIRST_RETRY * 2),
        }
    }
}

/// How a renewer paces itself, for a Consul session and an etcd lease alike: a renew every TTL/3;
/// while one is outstanding, another on a fresh connection every `hedge` (TTL/10, within 100ms
/// and 2s); and how long a renew stays worth waiting for: one sent at `S` buys the fence
/// `S + (T - g - m)` ([`Fence::after_renew`]), so past that its answer is useless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewPace {
    pub period: Duration,
    pub hedge: Duration,
    pub useful: Duration,
}

impl RenewPace {
    pub fn new(ttl: Duration, grace: Duration) -> Self {
        Self {
            period: ttl / 3,
            hedge: (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(2)),
            useful: ttl
                .saturating_sub(grace + fence_margin(ttl))
                .max(Duration::from_millis(100)),
        }
    }
}

/// The pause before a leader's watch retries a failed read, doubling to 500ms ([`backoff`]).
pub const WATCH_FIRST_RETRY: Duration = Duration::from_millis(50);

/// A leader's fence after a successful renew: the one place that turns "the last good renew was
/// sent at `R`" into deadlines (see the module docs). The wrapper stops its child when `stop_at`
/// passes without a new renew; the supervisor's keeper enforces the same fence if the wrapper
/// cannot (stalled, stopped); the child group must be gone by `gone_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// When the stop sequence must begin: `R + T - g - m`.
    pub stop_at: BootTime,
    /// When the child group must be gone: `R + T - m`. Past this, only SIGKILL is left.
    pub gone_by: BootTime,
}

impl Fence {
    /// The fence that a renew sent at `last_renew_sent` buys.
    pub fn after_renew(last_renew_sent: BootTime, ttl: Duration, grace: Duration) -> Fence {
        let gone_by = last_renew_sent + ttl.saturating_sub(fence_margin(ttl));
        Fence {
            stop_at: gone_by - grace,
            gone_by,
        }
    }

    /// The grace a stop sequence may use when it starts at `now`: never past `gone_by`.
    pub fn grace_left(&self, grace: Duration, now: BootTime) -> Duration {
        grace.min(self.gone_by.saturating_duration_since(now))
    }
}

/// Jittered exponential backoff: attempt 0 waits about `base`, doubling up to `cap`, each wait
/// drawn from [75%, 125%] so that contenders do not retry in lockstep.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let d = exp.min(cap.max(base));
    let factor = rand::rng().random_range(0.75..1.25);
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaders_watch_is_never_blind_past_its_fence_budget() {
        for (ttl, grace) in [
            (3, 500),
            (6, 1000),
            (10, 4900),
            (15, 5000),
            (60, 500),
            (86400, 5000),
        ] {
            let (ttl, grace) = (Duration::from_secs(ttl), Duration::from_millis(grace));
            let pace = WatchPace::new(ttl, grace);
            let budget = ttl - grace - fence_margin(ttl);
            // A dead blocking read given up, the first retry pause (with backoff's jitter), and
            // the retry on a fresh connection.
            let blind = pace.timeout + WATCH_FIRST_RETRY.mul_f64(1.25) + pace.retry_timeout;
            assert!(blind < budget, "{ttl:?} {grace:?}: {pace:?}");
            // Room for Consul's jitter and a round trip in each blocking read.
            assert!(pace.timeout > pace.wait + pace.wait / 16, "{pace:?}");
        }
    }

    #[test]
    fn a_renew_is_useful_exactly_until_the_fence_it_would_buy() {
        let sent = BootTime::now();
        for (ttl, grace) in [(3, 500), (10, 4900), (15, 5000), (86400, 5000)] {
            let (ttl, grace) = (Duration::from_secs(ttl), Duration::from_millis(grace));
            let pace = RenewPace::new(ttl, grace);
            let fence = Fence::after_renew(sent, ttl, grace);
            assert_eq!(sent + pace.useful, fence.stop_at, "{ttl:?} {grace:?}");
            // A hedge goes out before the regular period comes round again.
            assert!(pace.hedge < pace.period, "{pace:?}");
        }
    }

    fn sid(s: &str) -> SessionId {
        SessionId(s.into())
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn at(n: u64) -> BootTime {
        BootTime::from_since_boot(secs(1000 + n))
    }

    /// T 3s, lock-delay 1s, silence 3s: valid, the silence covers the TTL.
    const OWN: Timing = Timing {
        ttl: Duration::from_secs(3),
        lock_delay: Duration::from_secs(1),
        silence: Duration::from_secs(3),
    };

    fn holder(ttl: u64, lock_delay: u64, owed: u64) -> HolderValue {
        let t = Timing {
            ttl: secs(ttl),
            lock_delay: secs(lock_delay),
            silence: secs(ttl),
        };
        HolderValue::new("h1", "h1", &sid("other"), &t, secs(owed))
    }

    fn entry(session: Option<&str>, lock_index: u64, value: Option<&HolderValue>) -> KvEntry {
        KvEntry {
            lock_index,
            key: "k".into(),
            flags: LOCK_FLAG_VALUE,
            value: KvEntry::encode_value(&value.map(|v| v.to_bytes()).unwrap_or_default()),
            session: session.map(Into::into),
            create_index: 1,
            modify_index: 2,
        }
    }

    fn free(lock_index: u64, last: LastHolder) -> KeyView {
        KeyView::Free { lock_index, last }
    }

    #[test]
    fn classify_reads_every_kind_of_key() {
        let me = sid("me");
        assert_eq!(classify(None, &me), KeyView::Absent);
        assert_eq!(
            classify(Some(&entry(Some("me"), 3, None)), &me),
            KeyView::Ours
        );
        let held = holder(15, 15, 0);
        match classify(Some(&entry(Some("other"), 1, Some(&held))), &me) {
            KeyView::Held { session, holder } => {
                assert_eq!(session, "other");
                assert_eq!(holder.as_deref(), Some(&held));
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            classify(Some(&entry(None, 1, Some(&held.released_clean()))), &me),
            free(1, LastHolder::Clean)
        );
        assert_eq!(
            classify(Some(&entry(None, 1, Some(&held))), &me),
            free(1, LastHolder::Unclean(Some(Box::new(held))))
        );
        // consul lock leaves an empty value: not clean, and nothing known of its timing.
        assert_eq!(
            classify(Some(&entry(None, 2, None)), &me),
            free(2, LastHolder::Unclean(None))
        );
        // A lock-flagged key nobody ever locked says nothing about its past.
        assert_eq!(
            classify(Some(&entry(None, 0, None)), &me),
            free(0, LastHolder::Never)
        );
        let mut plain = entry(None, 0, None);
        plain.flags = 0;
        assert_eq!(classify(Some(&plain), &me), KeyView::Foreign { flags: 0 });
    }

    #[test]
    fn holder_value_carries_its_timing_and_reads_old_values() {
        let v = holder(6, 1, 2);
        let json: serde_json::Value = serde_json::from_slice(&v.to_bytes()).unwrap();
        assert_eq!(json["ttl_ms"], 6000);
        assert_eq!(json["lock_delay_ms"], 1000);
        assert_eq!(json["owed_ms"], 2000);
        assert!(json.get("released").is_none());
        assert_eq!(HolderValue::parse(&v.to_bytes()), Some(v.clone()));
        // A value written before the timing fields existed still parses.
        let old = br#"{"holder":"h:1","host":"h","pid":1,"session":"s","acquired_at":"x","version":"0.1.0"}"#;
        let parsed = HolderValue::parse(old).unwrap();
        assert_eq!(parsed.ttl_ms, None);
        assert!(!parsed.is_clean());
    }

    #[test]
    fn what_a_successor_owes() {
        let owed = |v: KeyView| owed_wait(&v, &OWN).unwrap();
        // A clean release: nothing.
        assert_eq!(owed(free(4, LastHolder::Clean)), Duration::ZERO);
        // Nothing known of the past (missing, never locked): max(s, T) of our own.
        let relies_on_delay = Timing {
            ttl: secs(15),
            lock_delay: secs(15),
            silence: secs(1),
        };
        assert_eq!(
            owed_wait(&KeyView::Absent, &relies_on_delay),
            Some(secs(15))
        );
        assert_eq!(owed(free(0, LastHolder::Never)), secs(3));
        // A holder whose lock-delay is short: its TTL, even though ours is shorter.
        assert_eq!(
            owed(free(
                5,
                LastHolder::Unclean(Some(Box::new(holder(6, 1, 0))))
            )),
            secs(6)
        );
        // A holder whose lock-delay covers its fence: Consul holds us back; our silence only.
        assert_eq!(
            owed(free(
                5,
                LastHolder::Unclean(Some(Box::new(holder(6, 6, 0))))
            )),
            secs(3)
        );
        // A holder that left owing a wait passes the debt on.
        assert_eq!(
            owed(free(
                5,
                LastHolder::Unclean(Some(Box::new(holder(6, 6, 5))))
            )),
            secs(5)
        );
        // consul lock, or an older consul-leader: as if configured like us.
        assert_eq!(owed(free(5, LastHolder::Unclean(None))), secs(3));
        assert_eq!(
            owed_wait(&free(5, LastHolder::Unclean(None)), &relies_on_delay),
            Some(secs(1))
        );
        assert_eq!(owed_wait(&KeyView::Ours, &OWN), None);
    }

    #[test]
    fn the_wait_counts_from_the_first_free_sighting() {
        let mut w = FreeWatch::default();
        w.observe(
            &KeyView::Held {
                session: "x".into(),
                holder: None,
            },
            &OWN,
            None,
            at(0),
        );
        let dirty = free(7, LastHolder::Unclean(Some(Box::new(holder(15, 1, 0)))));
        w.observe(&dirty, &OWN, None, at(1));
        w.observe(&dirty, &OWN, None, at(10));
        // Acquired at 12 (after lock-delay): the holder's 15s end 15s after 1, not after 12.
        assert_eq!(w.owed_until(at(12)), Some(at(16)));
        // Acquired after the wait already passed: start at once.
        assert_eq!(w.owed_until(at(20)), None);
    }

    #[test]
    fn no_wait_after_a_clean_release_and_a_full_one_for_a_missing_key() {
        let mut w = FreeWatch::default();
        w.observe(&free(3, LastHolder::Clean), &OWN, None, at(0));
        assert_eq!(w.owed_until(at(0)), None);
        let mut w = FreeWatch::default();
        w.observe(&KeyView::Absent, &OWN, None, at(0));
        assert_eq!(w.owed_until(at(0)), Some(at(3)));
    }

    #[test]
    fn a_new_holder_restarts_the_free_period() {
        let dirty = free(7, LastHolder::Unclean(None));
        // Seen in between.
        let mut w = FreeWatch::default();
        w.observe(&dirty, &OWN, None, at(0));
        w.observe(
            &KeyView::Held {
                session: "y".into(),
                holder: None,
            },
            &OWN,
            None,
            at(2),
        );
        w.observe(&free(8, LastHolder::Unclean(None)), &OWN, None, at(5));
        assert_eq!(w.owed_until(at(5)), Some(at(8)));
        // Not seen: the LockIndex tells.
        let mut w = FreeWatch::default();
        w.observe(&dirty, &OWN, None, at(0));
        w.observe(&free(8, LastHolder::Unclean(None)), &OWN, None, at(5));
        assert_eq!(w.owed_until(at(5)), Some(at(8)));
        // A key that vanishes, or reappears, starts over too.
        let mut w = FreeWatch::default();
        w.observe(&dirty, &OWN, None, at(0));
        w.observe(&KeyView::Absent, &OWN, None, at(2));
        assert_eq!(w.owed_until(at(2)), Some(at(5)));
        w.observe(&free(1, LastHolder::Unclean(None)), &OWN, None, at(4));
        assert_eq!(w.owed_until(at(4)), Some(at(7)));
    }

    #[test]
    fn lock_delay_is_the_last_holders_when_it_says() {
        let mut w = FreeWatch::default();
        assert_eq!(w.lock_delay_ends(secs(15)), None);
        w.observe(&free(2, LastHolder::Unclean(None)), &OWN, None, at(0));
        w.observe(&free(2, LastHolder::Unclean(None)), &OWN, None, at(3));
        assert_eq!(w.lock_delay_ends(secs(15)), Some(at(15)));
        w.observe(
            &free(2, LastHolder::Unclean(Some(Box::new(holder(9, 4, 0))))),
            &OWN,
            None,
            at(4),
        );
        assert_eq!(w.lock_delay_ends(secs(15)), Some(at(4)));
    }

    #[test]
    fn our_own_previous_term_owes_only_its_own_debt() {
        let v = holder(15, 1, 0); // session "other"
        let dirty = free(7, LastHolder::Unclean(Some(Box::new(v))));
        let mine = PreviousTerm {
            session: "other".into(),
            owed_until: None,
        };
        let mut w = FreeWatch::default();
        w.observe(&dirty, &OWN, Some(&mine), at(0));
        assert_eq!(
            w.owed_until(at(0)),
            None,
            "our own child is gone: nothing owed"
        );
        // Lost during its own silence: what it still owed, to the instant.
        let mid_silence = PreviousTerm {
            session: "other".into(),
            owed_until: Some(at(4)),
        };
        w.observe(&dirty, &OWN, Some(&mid_silence), at(1));
        assert_eq!(w.owed_until(at(1)), Some(at(4)));
        // Another session's value: the usual wait, whatever we remember.
        let someone_else = PreviousTerm {
            session: "mine-was-another".into(),
            owed_until: None,
        };
        let mut w = FreeWatch::default();
        w.observe(&dirty, &OWN, Some(&someone_else), at(0));
        assert_eq!(w.owed_until(at(0)), Some(at(15)));
    }

    #[test]
    fn a_holder_that_lost_to_a_fault_has_priority_for_the_window() {
        let window = secs(20);
        let mut w = FreeWatch::default();
        w.observe(
            &free(7, LastHolder::Unclean(Some(Box::new(holder(15, 15, 0))))),
            &OWN,
            None,
            at(2),
        );
        // Others wait from their first sighting; the holder itself ("h1") does not.
        assert_eq!(w.priority("web-9", window), Some((at(22), "h1")));
        assert_eq!(w.priority("h1", window), None);
        assert_eq!(w.priority("web-9", Duration::ZERO), None, "0 turns it off");
        // A clean release, a missing key, a consul lock value: nobody has priority.
        for view in [
            free(8, LastHolder::Clean),
            KeyView::Absent,
            free(9, LastHolder::Unclean(None)),
        ] {
            let mut w = FreeWatch::default();
            w.observe(&view, &OWN, None, at(0));
            assert_eq!(w.priority("web-9", window), None, "{view:?}");
        }
    }

    #[test]
    fn the_clean_mark_is_earned_only_once_the_wait_passed() {
        assert!(may_mark_clean(None, at(0)));
        assert!(!may_mark_clean(Some(at(5)), at(4)));
        assert!(may_mark_clean(Some(at(5)), at(5)));
    }

    #[test]
    fn fence_leaves_grace_and_margin_inside_the_ttl() {
        let r = at(100);
        let ttl = secs(15);
        let grace = secs(5);
        let f = Fence::after_renew(r, ttl, grace);
        assert_eq!(f.stop_at, r + Duration::from_millis(15_000 - 5_000 - 750));
        assert_eq!(f.gone_by, r + Duration::from_millis(15_000 - 750));
        // Stop started at the fence: it ends (grace later) before R + TTL.
        assert!(f.stop_at + grace < r + ttl);
        // A stop that starts late is cut short so that it still ends before R + TTL - margin.
        assert_eq!(
            f.grace_left(grace, r + secs(12)),
            Duration::from_millis(2_250)
        );
        assert_eq!(f.grace_left(grace, r + ttl), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for attempt in 0..40 {
            let d = backoff(attempt, base, cap);
            assert!(
                d >= base.mul_f64(0.75) && d <= cap.mul_f64(1.25),
                "{attempt}: {d:?}"
            );
        }
        assert!(backoff(0, base, cap) <= Duration::from_millis(125));
    }
}
