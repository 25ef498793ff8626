//! The rules of leadership, as pure functions over what we observed: how to read the lock key, when
//! the child may start (silence), when the leader must stop on its own (self-fencing), and how long
//! to back off. The driver in `app` performs the I/O and asks these functions what to do; they are
//! unit-tested here without a network.
//!
//! # Why two children never run at once
//!
//! Let `T` be the session TTL, `g` the grace period, `d` lock-delay and `s` silence.
//!
//! 1. A leader renews every `T/3` and remembers `R`, the *send* time of its last successful renew.
//!    Consul received that renew no earlier than `R`, and it invalidates a session no sooner than
//!    `T` after the last renew it received (in practice `2T`). So the session, and with it our
//!    lock, is valid at least until `R + T`, whatever the network does.
//! 2. If no renew succeeds, the leader starts its stop sequence at `fence_at = R + T - g - m`
//!    (`m` a small margin). The stop sequence sends the stop signal, waits at most `g`, then
//!    SIGKILLs the group and reaps it, so the child group is gone by `R + T - m`: before Consul can
//!    have invalidated the session. It does this without needing to reach Consul at all.
//!    `config` refuses `g >= T/2`, so there is always room for renew retries before `fence_at`.
//! 3. A new leader can only acquire the key after the old session was invalidated (by then the old
//!    child is gone, by 2), and Consul then refuses the key for `d` more. The new leader also waits
//!    `s` from the moment it first saw the key free before it starts its child. Both are counted
//!    from (about) the same moment, so they overlap rather than add up.
//! 4. When the session is ended from outside while the old leader is healthy (an operator's
//!    `session destroy`, a failed check), the old leader notices within a round trip and stops its
//!    child within `g`; `config` requires `max(d, s) >= g`, so the new child starts after that.
//! 5. A clean release (the child group confirmed empty, then the value marked `"released":
//!    "clean"`) proves the old child is gone, so the next leader skips the silence.

use std::time::{Duration, Instant, SystemTime};

use crate::clock::BootTime;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::consul::SessionId;
use crate::wire::{KvEntry, LOCK_FLAG_VALUE, SEMAPHORE_FLAG_VALUE};

/// What we write into the lock key's value: who holds it, and whether they left cleanly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HolderValue {
    /// `host:pid`, a name a person can find.
    #[serde(default)]
    pub holder: String,
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
    /// `"clean"` once the holder released after confirming its child group was gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<String>,
}

impl HolderValue {
    pub fn new(host: &str, session: &SessionId) -> Self {
        Self {
            holder: format!("{host}:{}", std::process::id()),
            host: host.to_string(),
            pid: std::process::id(),
            session: session.0.clone(),
            acquired_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            released: None,
            released_at: None,
        }
    }

    /// The same value, marked as cleanly released now.
    pub fn released_clean(&self) -> Self {
        Self {
            released: Some("clean".to_string()),
            released_at: Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
            ..self.clone()
        }
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
}

/// What the lock key tells a contender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyView {
    /// No such key: nobody ever held it (or it was deleted), so there is no previous holder.
    Absent,
    /// Nobody holds it now.
    Free {
        /// The previous holder confirmed its child group gone before releasing.
        clean: bool,
        /// The key was locked at least once before.
        had_holder: bool,
    },
    /// Our session holds it.
    Ours { lock_index: u64 },
    /// Another session holds it.
    Held {
        session: String,
        holder: Option<HolderValue>,
    },
    /// The key is used for something other than a lock; we must not touch it.
    Foreign { flags: u64 },
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
        Some(s) if *s == ours.0 => KeyView::Ours {
            lock_index: e.lock_index,
        },
        Some(s) => KeyView::Held {
            session: s.clone(),
            holder: HolderValue::parse(&e.value_bytes()),
        },
        None => {
            let clean = HolderValue::parse(&e.value_bytes())
                .is_some_and(|v| v.released.as_deref() == Some("clean"));
            KeyView::Free {
                clean,
                had_holder: e.lock_index > 0,
            }
        }
    }
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

/// Tracks what a contender has seen of the key, to decide the silence when it wins.
#[derive(Debug, Default, Clone)]
pub struct FreeWatch {
    /// When we first saw the key free in the current free period.
    first_seen_free: Option<Instant>,
    /// Whether the free key, as last seen, needs a silence before our child may start.
    needs_silence: bool,
}

impl FreeWatch {
    /// Records one observation of the key made at `now`.
    pub fn observe(&mut self, view: &KeyView, now: Instant) {
        match view {
            KeyView::Absent => {
                self.first_seen_free.get_or_insert(now);
                self.needs_silence = false;
            }
            KeyView::Free { clean, had_holder } => {
                self.first_seen_free.get_or_insert(now);
                self.needs_silence = *had_holder && !clean;
            }
            KeyView::Held { .. } => {
                self.first_seen_free = None;
                self.needs_silence = false;
            }
            KeyView::Ours { .. } | KeyView::Foreign { .. } => {}
        }
    }

    /// When the lock-delay that refuses the key probably ends: `lock_delay` after the key was
    /// first seen free (the previous holder's session ended about then, and contenders usually
    /// share one configuration). `None` when the key has not been seen free.
    pub fn lock_delay_ends(&self, lock_delay: Duration) -> Option<Instant> {
        self.first_seen_free.map(|t| t + lock_delay)
    }

    /// When our child may start, having acquired at `now`: `None` means at once.
    pub fn silence_until(&self, silence: Duration, now: Instant) -> Option<Instant> {
        if !self.needs_silence || silence.is_zero() {
            return None;
        }
        let until = self.first_seen_free.unwrap_or(now) + silence;
        (until > now).then_some(until)
    }
}

/// Margin kept between the end of the stop sequence and the earliest moment Consul may invalidate
/// the session: a twentieth of the TTL, between 100ms and 1s.
pub fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

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

    fn sid(s: &str) -> SessionId {
        SessionId(s.into())
    }

    fn entry(session: Option<&str>, lock_index: u64, value: Option<HolderValue>) -> KvEntry {
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

    #[test]
    fn classify_reads_every_kind_of_key() {
        let me = sid("me");
        assert_eq!(classify(None, &me), KeyView::Absent);
        assert_eq!(
            classify(Some(&entry(Some("me"), 3, None)), &me),
            KeyView::Ours { lock_index: 3 }
        );
        let held = HolderValue::new("h1", &sid("other"));
        match classify(Some(&entry(Some("other"), 1, Some(held.clone()))), &me) {
            KeyView::Held { session, holder } => {
                assert_eq!(session, "other");
                assert_eq!(holder, Some(held.clone()));
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            classify(Some(&entry(None, 1, Some(held.released_clean()))), &me),
            KeyView::Free {
                clean: true,
                had_holder: true
            }
        );
        assert_eq!(
            classify(Some(&entry(None, 1, Some(held))), &me),
            KeyView::Free {
                clean: false,
                had_holder: true
            }
        );
        // consul lock leaves an empty value: not clean.
        assert_eq!(
            classify(Some(&entry(None, 2, None)), &me),
            KeyView::Free {
                clean: false,
                had_holder: true
            }
        );
        let mut plain = entry(None, 0, None);
        plain.flags = 0;
        assert_eq!(classify(Some(&plain), &me), KeyView::Foreign { flags: 0 });
    }

    #[test]
    fn silence_counts_from_the_first_free_sighting() {
        let t0 = Instant::now();
        let silence = Duration::from_secs(15);
        let mut w = FreeWatch::default();
        w.observe(
            &KeyView::Held {
                session: "x".into(),
                holder: None,
            },
            t0,
        );
        let dirty = KeyView::Free {
            clean: false,
            had_holder: true,
        };
        w.observe(&dirty, t0 + Duration::from_secs(1));
        w.observe(&dirty, t0 + Duration::from_secs(10));
        // Acquired at t0+12 (after lock-delay): silence ends 15s after t0+1, not after t0+12.
        let now = t0 + Duration::from_secs(12);
        assert_eq!(
            w.silence_until(silence, now),
            Some(t0 + Duration::from_secs(16))
        );
        // Acquired after the silence already passed: start at once.
        assert_eq!(w.silence_until(silence, t0 + Duration::from_secs(20)), None);
    }

    #[test]
    fn no_silence_after_clean_release_or_for_a_new_key() {
        let t0 = Instant::now();
        let s = Duration::from_secs(15);
        let mut w = FreeWatch::default();
        w.observe(
            &KeyView::Free {
                clean: true,
                had_holder: true,
            },
            t0,
        );
        assert_eq!(w.silence_until(s, t0), None);
        let mut w = FreeWatch::default();
        w.observe(&KeyView::Absent, t0);
        assert_eq!(w.silence_until(s, t0), None);
        let mut w = FreeWatch::default();
        w.observe(
            &KeyView::Free {
                clean: false,
                had_holder: false,
            },
            t0,
        );
        assert_eq!(w.silence_until(s, t0), None);
    }

    #[test]
    fn a_new_holder_restarts_the_free_period() {
        let t0 = Instant::now();
        let mut w = FreeWatch::default();
        let dirty = KeyView::Free {
            clean: false,
            had_holder: true,
        };
        w.observe(&dirty, t0);
        w.observe(
            &KeyView::Held {
                session: "y".into(),
                holder: None,
            },
            t0 + Duration::from_secs(2),
        );
        w.observe(&dirty, t0 + Duration::from_secs(5));
        assert_eq!(
            w.silence_until(Duration::from_secs(15), t0 + Duration::from_secs(5)),
            Some(t0 + Duration::from_secs(20))
        );
    }

    #[test]
    fn lock_delay_is_expected_to_end_a_lock_delay_after_the_first_free_sighting() {
        let t0 = Instant::now();
        let mut w = FreeWatch::default();
        assert_eq!(w.lock_delay_ends(Duration::from_secs(15)), None);
        w.observe(
            &KeyView::Free {
                clean: false,
                had_holder: true,
            },
            t0,
        );
        w.observe(
            &KeyView::Free {
                clean: false,
                had_holder: true,
            },
            t0 + Duration::from_secs(3),
        );
        assert_eq!(
            w.lock_delay_ends(Duration::from_secs(15)),
            Some(t0 + Duration::from_secs(15))
        );
    }

    #[test]
    fn fence_leaves_grace_and_margin_inside_the_ttl() {
        let r = BootTime::from_since_boot(Duration::from_secs(100));
        let ttl = Duration::from_secs(15);
        let grace = Duration::from_secs(5);
        let f = Fence::after_renew(r, ttl, grace);
        assert_eq!(f.stop_at, r + Duration::from_millis(15_000 - 5_000 - 750));
        assert_eq!(f.gone_by, r + Duration::from_millis(15_000 - 750));
        // Stop started at the fence: it ends (grace later) before R + TTL.
        assert!(f.stop_at + grace < r + ttl);
        // A stop that starts late is cut short so that it still ends before R + TTL - margin.
        let late = r + Duration::from_secs(12);
        assert_eq!(f.grace_left(grace, late), Duration::from_millis(2_250));
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
