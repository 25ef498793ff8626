//! Consul's semaphore, in the layout of Go's `api.Semaphore` and `consul lock -n N`: at most `N`
//! holders at once under a prefix, each running its own child. `run --limit N` (N > 1) uses it;
//! `--limit 1` is the mutex on the key itself (`lock::consul`).
//!
//! # Layout (the same keys, flags and JSON as `api.Semaphore`)
//!
//! * Each contender's own key `PREFIX/<session>`, acquired by its session, with the flags value
//!   `SEMAPHORE_FLAG_VALUE`. The session is created with Behavior `delete`, so Consul deletes the
//!   key when it invalidates the session: a holder whose contender key is gone is dead.
//! * The coordination key `PREFIX/.lock`, with the same flags and the value
//!   `{"Limit":N,"Holders":{"<session>":true,...}}`, changed only by check-and-set on its
//!   ModifyIndex (`?cas=`). A contender joins by adding itself to `Holders`; a holder leaves by
//!   removing itself, then deleting its contender key.
//! * A contender that finds another `Limit` (or a `.lock` used for something else) refuses and
//!   starts nothing, as `api.Semaphore` does.
//! * consul-leader adds one field to the value, `ConsulLeader` ([`Ext`]): what each holder it
//!   admitted wrote of itself (its timing, the wait it still owed, its fencing token), which
//!   version admitted whom, and how many free slots have an unknown past. Go's decoder ignores
//!   the field; Go's encoder drops it, so after a `consul lock -n` contender writes `.lock`, the
//!   successors of the holders it describes fall back to their own configuration (below).
//!
//! # Why at most N children run at once
//!
//! `election`'s module docs argue it for one key; this is the same argument per slot. Every
//! holder renews its session, fences itself and is fenced by the supervisor's keeper exactly as
//! the mutex's leader is (`lock::session`, `election::Fence`): a holder whose session is
//! invalidated at `I` has no child left at `I + T_h`, where `T_h` is its TTL (election, 1 and 2).
//!
//! 1. **A slot is taken from a holder that did not leave cleanly only by the one contender that
//!    removes it from `Holders`, and that contender is counted in its place.** A dead holder
//!    stays in `Holders`, so it keeps counting against the limit, until a check-and-set removes
//!    it; each of our check-and-sets removes at most one dead holder and adds the writer
//!    ([`admitted_value`]). So every child that may still run belongs to a session in `Holders`,
//!    or to one that a session in `Holders` pruned and has not yet waited out: never more than N.
//! 2. **Consul's lock-delay protects nothing here**: it applies to the dead holder's own
//!    contender key, which nobody else acquires. The pruner's wait alone covers the dead holder's
//!    fence: it starts its child no earlier than `F + w`, where `F` is its first sighting of the
//!    holder dead (its contender key gone, `F >= I`) and `w` = [`debt`] = the largest of its own
//!    silence, the holder's TTL and the wait the holder itself still owed when it was admitted
//!    (election, 6). `F + w >= I + T_h`.
//! 3. **Where the dead holder's timing comes from.** Behavior `delete` takes the contender key,
//!    and its value, with the session; so each holder's timing is written into `.lock` itself,
//!    by the check-and-set that admits it, and survives there until its slot is taken. When
//!    `.lock` does not say (a `consul lock -n` holder, or a record a Go writer dropped), the
//!    successor assumes the dead holder shared its own configuration: `max(s, T)`, as the mutex
//!    does for values that say nothing.
//! 4. **Free slots.** Our holders free a slot only by a clean release (election, 5): the child
//!    group is confirmed gone and no wait was owed any more; a successor takes such a slot and
//!    starts at once. A holder that leaves owing a wait (a stop signal during its wait, an error)
//!    does not remove itself: its session ends, it is a dead holder, and whoever takes its slot
//!    inherits the debt (2). Free slots whose past is unknown (a new or deleted `.lock`, slots a
//!    Go writer freed) are counted in [`Ext::unknown`] and owe `max(s, T)` from the first
//!    sighting of the event that made them unknown ([`Ext::unknown_id`]), as a missing key does
//!    for the mutex (election, 4).
//! 5. **Fencing tokens.** A holder's token is the ModifyIndex of the check-and-set that admitted
//!    it: a Raft index, cluster-wide and growing. Consul's `?cas` answers only `true`, so the
//!    holder reads it back: `.lock` still carries the version that admitted it (`admitted`
//!    names it), or the next writer, who replaced exactly that version, copied its ModifyIndex
//!    into the holder's record. If a Go writer replaced it first, the holder takes `.lock`'s
//!    ModifyIndex as it reads it back, still showing it a holder: a later index, but still
//!    below that of whoever later takes its slot, since that check-and-set comes after.
//!
//! `consul lock -n` and `api.Semaphore` contenders on the same prefix are excluded by the same
//! keys, but they do not wait for anything: one of them that prunes a dead consul-leader holder
//! starts at once, while that holder's child may still run until its fence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep};
use tracing::{debug, info, warn};

use super::session::{self, Errors, MAX_BLOCK, next_index};
use super::{AbortOnDrop, ContendEnd, OpenError, Protocol, Renewal, Verdict};
use crate::clock::BootTime;
use crate::config::RunConfig;
use crate::consul::{Client, ConsulError, ConsulIndex, ReadOpts, SessionId};
use crate::election::{self, HolderValue, Timing, WatchPace};
use crate::wire::{KvEntry, LOCK_FLAG_VALUE, SEMAPHORE_FLAG_VALUE};

/// The coordination key's name under the prefix (`api.DefaultSemaphoreKey`).
pub const LOCK_KEY: &str = ".lock";

/// The largest `--limit`: `.lock` carries a record of each holder (a few hundred bytes), and
/// Consul refuses values above 512 KiB.
pub const MAX_LIMIT: u32 = 512;

/// `PREFIX/.lock`.
pub fn lock_key(prefix: &str) -> String {
    format!("{prefix}/{LOCK_KEY}")
}

/// `PREFIX/<session>`, a contender's own key.
pub fn contender_key(prefix: &str, session: &str) -> String {
    format!("{prefix}/{session}")
}

// ---------------------------------------------------------------------------------------------
// The coordination key's value
// ---------------------------------------------------------------------------------------------

/// The value of `PREFIX/.lock`: `api.Semaphore`'s `semaphoreLock` (`Limit`, `Holders`, in that
/// order, so that without [`Ext`] it encodes byte for byte as Go does), plus [`Ext`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LockValue {
    #[serde(rename = "Limit", default)]
    pub limit: i64,
    /// A set: Go maps each holder's session to `true`.
    #[serde(rename = "Holders", default, deserialize_with = "null_as_empty")]
    pub holders: BTreeMap<String, bool>,
    #[serde(
        rename = "ConsulLeader",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ext: Option<Ext>,
}

/// Go writes a nil map as `null`.
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, bool>, D::Error> {
    Ok(Option::<BTreeMap<String, bool>>::deserialize(d)?.unwrap_or_default())
}

/// What consul-leader keeps in `.lock` beside `api.Semaphore`'s fields (module docs, 3 to 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ext {
    /// The holder this version of the value admitted: the version's ModifyIndex is its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted: Option<String>,
    /// What each holder admitted by consul-leader wrote of itself, by session.
    #[serde(default)]
    pub holders: BTreeMap<String, SlotRecord>,
    /// How many free slots have an unknown past.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unknown: u64,
    /// Names the event that made them unknown: a contender counts their wait from its first
    /// sighting of this name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unknown_id: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One holder's record in [`Ext::holders`]: the mutex's holder value (who, since when, its
/// timing and the wait it still owed when admitted) and, once known, its fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SlotRecord {
    #[serde(flatten)]
    pub holder: HolderValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

impl LockValue {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a listing of the prefix
// ---------------------------------------------------------------------------------------------

/// What `PREFIX/.lock` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockKey {
    /// No `.lock` (never made, deleted, lost by the agent), or one with an empty value: a new
    /// semaphore, as `api.Semaphore` reads it. `modify_index` is 0 when it does not exist.
    Fresh { modify_index: u64 },
    /// A semaphore's coordination key.
    Semaphore { modify_index: u64, value: LockValue },
    /// A key with other flags: a lock (`consul lock` without `-n`) or plain data.
    Foreign { flags: u64 },
    /// The semaphore's flags, but a value that is not a semaphore's.
    Garbled { detail: String },
}

/// One listing of `PREFIX/`, as the rules need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub lock: LockKey,
    /// Sessions that hold their own contender key `PREFIX/<session>`.
    pub alive: BTreeSet<String>,
    /// The values of the contender keys, by session (consul-leader contenders write who they are).
    pub contenders: BTreeMap<String, Option<HolderValue>>,
    /// The listing's index.
    pub index: u64,
}

/// Reads a listing of `PREFIX/` (`entries` in any order).
pub fn observe(prefix: &str, entries: &[KvEntry], index: u64) -> Observed {
    let lock_name = lock_key(prefix);
    let dir = format!("{prefix}/");
    let mut lock = LockKey::Fresh { modify_index: 0 };
    let mut alive = BTreeSet::new();
    let mut contenders = BTreeMap::new();
    for e in entries {
        if e.key == lock_name {
            lock = read_lock_key(e);
            continue;
        }
        let Some(name) = e.key.strip_prefix(&dir) else {
            continue;
        };
        if name.contains('/') {
            continue;
        }
        if e.session.as_deref() == Some(name) {
            alive.insert(name.to_string());
            contenders.insert(name.to_string(), HolderValue::parse(&e.value_bytes()));
        }
    }
    Observed {
        lock,
        alive,
        contenders,
        index,
    }
}

/// Reads the `.lock` entry itself.
pub fn read_lock_key(e: &KvEntry) -> LockKey {
    if e.flags != SEMAPHORE_FLAG_VALUE {
        return LockKey::Foreign { flags: e.flags };
    }
    let bytes = e.value_bytes();
    // api.Semaphore's decodeLock: no value is a new semaphore.
    if bytes.is_empty() {
        return LockKey::Fresh {
            modify_index: e.modify_index,
        };
    }
    match serde_json::from_slice::<LockValue>(&bytes) {
        Ok(value) => LockKey::Semaphore {
            modify_index: e.modify_index,
            value,
        },
        Err(err) => LockKey::Garbled {
            detail: err.to_string(),
        },
    }
}

/// The semaphore as a contender with limit `limit` reads it, once it agrees with what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    pub limit: u64,
    /// `.lock`'s ModifyIndex, which a check-and-set must name (0: create it).
    pub cas: u64,
    /// `.lock`'s value (empty holders for a new semaphore).
    pub value: LockValue,
    /// Free slots whose past is unknown, and the name of the event that made them so.
    pub unknown: u64,
    pub unknown_id: String,
}

impl Slots {
    pub fn free(&self) -> u64 {
        self.limit.saturating_sub(self.value.holders.len() as u64)
    }

    /// The record of `session`, when consul-leader wrote one.
    pub fn record(&self, session: &str) -> Option<&SlotRecord> {
        self.value.ext.as_ref()?.holders.get(session)
    }

    /// The fencing token of holder `session` (module docs, 5): the ModifyIndex of the version
    /// that admitted it when `.lock` still is that version or a later writer recorded it, else
    /// `.lock`'s current ModifyIndex.
    pub fn token_of(&self, session: &str) -> u64 {
        match &self.value.ext {
            Some(ext) if ext.admitted.as_deref() == Some(session) => self.cas,
            Some(ext) => ext
                .holders
                .get(session)
                .and_then(|r| r.token)
                .unwrap_or(self.cas),
            None => self.cas,
        }
    }
}

/// Why a contender refuses a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// `.lock` says another limit.
    Limit { theirs: i64, ours: u64 },
    /// `.lock` is not a semaphore's key.
    Foreign { flags: u64 },
    /// `.lock` has the semaphore's flags and a value no semaphore wrote.
    Garbled { detail: String },
    /// The prefix itself is held as a lock (`--limit 1` on the same `--key`, or `consul lock` /
    /// `api.Lock` on it), by this session.
    HeldAsLock { session: String },
}

impl Conflict {
    /// The error for the operator: what is wrong, and what to do.
    pub fn message(&self, prefix: &str) -> String {
        let lock = lock_key(prefix);
        match self {
            Conflict::Limit { theirs, ours } => format!(
                "semaphore limit conflict on {prefix}: {lock} says Limit {theirs}, and --limit is \
                 {ours}; every contender must use the same limit (consul lock -n and api.Semaphore \
                 refuse a mismatch too). Use --limit {theirs}, or change the limit once no holder \
                 is left by deleting {lock}"
            ),
            Conflict::Foreign { flags } if *flags == LOCK_FLAG_VALUE => format!(
                "{lock} is a lock (`consul lock {prefix}` without -n, or consul-leader --key \
                 {lock}), not a semaphore; use another --key, or --limit 1 --key {lock} to share \
                 that lock"
            ),
            Conflict::Foreign { flags } => format!(
                "{lock} holds data that is not a semaphore (flags {flags}); consul-leader will not \
                 overwrite it. Choose another --key, or delete the key if it is stale"
            ),
            Conflict::HeldAsLock { session } => format!(
                "{prefix} is held as a lock (run --limit 1 --key {prefix}, or consul lock / \
                 api.Lock on it) by session {session}; a semaphore on the prefix {prefix} would \
                 run beside it. Every contender on {prefix} must use the same --limit"
            ),
            Conflict::Garbled { detail } => format!(
                "{lock} has the semaphore flags, but its value is not a semaphore's ({detail}); \
                 consul-leader will not overwrite it. Delete the key if it is stale"
            ),
        }
    }
}

/// Checks what was found against our limit and counts the slots (module docs, 4).
pub fn read_slots(obs: &Observed, limit: u64) -> Result<Slots, Conflict> {
    match &obs.lock {
        LockKey::Foreign { flags } => Err(Conflict::Foreign { flags: *flags }),
        LockKey::Garbled { detail } => Err(Conflict::Garbled {
            detail: detail.clone(),
        }),
        LockKey::Fresh { modify_index } => Ok(Slots {
            limit,
            cas: *modify_index,
            value: LockValue {
                limit: limit as i64,
                holders: BTreeMap::new(),
                ext: None,
            },
            unknown: limit,
            // A missing key's listing index grows with every deletion under the prefix, so a
            // `.lock` deleted again is a new event; an empty one is named by its own index.
            unknown_id: if *modify_index == 0 {
                format!("missing@{}", obs.index)
            } else {
                format!("empty@{modify_index}")
            },
        }),
        LockKey::Semaphore {
            modify_index,
            value,
        } => {
            if value.limit != limit as i64 {
                return Err(Conflict::Limit {
                    theirs: value.limit,
                    ours: limit,
                });
            }
            let free = limit.saturating_sub(value.holders.len() as u64);
            let (unknown, unknown_id) = match &value.ext {
                Some(ext) => (ext.unknown.min(free), ext.unknown_id.clone()),
                // Written by api.Semaphore (or by hand): nothing says how its free slots were
                // freed.
                None => (free, format!("foreign@{modify_index}")),
            };
            Ok(Slots {
                limit,
                cas: *modify_index,
                value: value.clone(),
                unknown,
                unknown_id,
            })
        }
    }
}

/// `--limit 1 --key K` locks `K` itself while `--limit N --key K` uses `K/.lock`, so the two would
/// not exclude each other (unlike `consul lock -n 1` and `-n 2`, which share `.lock`): a
/// contender refuses a prefix that is held as a lock right now.
pub fn check_bare_key(entry: Option<&KvEntry>) -> Result<(), Conflict> {
    match entry {
        Some(e) if e.flags == LOCK_FLAG_VALUE => match &e.session {
            Some(session) => Err(Conflict::HeldAsLock {
                session: session.clone(),
            }),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// The rules: which slot to take, what it owes, what to write
// ---------------------------------------------------------------------------------------------

/// What a contender has seen, to date the waits it owes: when it first saw each holder dead,
/// and when it first saw the current unknown slots.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SlotWatch {
    dead_since: BTreeMap<String, BootTime>,
    unknown_since: Option<(String, BootTime)>,
}

impl SlotWatch {
    /// Records one listing read at `now`.
    pub fn observe(&mut self, slots: &Slots, alive: &BTreeSet<String>, now: BootTime) {
        let dead: BTreeSet<&String> = slots
            .value
            .holders
            .keys()
            .filter(|s| !alive.contains(*s))
            .collect();
        self.dead_since.retain(|s, _| dead.contains(s));
        for d in dead {
            self.dead_since.entry(d.clone()).or_insert(now);
        }
        if slots.unknown == 0 {
            self.unknown_since = None;
        } else if self
            .unknown_since
            .as_ref()
            .is_none_or(|(id, _)| *id != slots.unknown_id)
        {
            self.unknown_since = Some((slots.unknown_id.clone(), now));
        }
    }
}

/// Which slot a contender takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A free slot its last holder left cleanly: nothing is owed.
    Clean,
    /// A free slot with an unknown past.
    Unknown,
    /// The slot of this dead holder, removed from `Holders` in the same write.
    Prune(String),
}

/// What a contender does after reading the semaphore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// It is a holder already (a check-and-set whose answer it did not see went through).
    Member,
    /// Every slot is held by a live holder: wait for a change.
    Full,
    /// Take this slot; the child waits until `owed_until` (`None`: starts at once).
    Join {
        choice: Choice,
        owed_until: Option<BootTime>,
    },
}

/// What a successor owes a holder whose slot it takes, from its first sighting of the holder
/// dead (module docs, 2 and 3): its own silence, the holder's TTL and the holder's own debt, or
/// `max(s, T)` of its own when `.lock` holds no record of the holder.
pub fn debt(record: Option<&SlotRecord>, own: &Timing) -> Duration {
    let unknown = own.silence.max(own.ttl);
    match record {
        None => unknown,
        Some(r) => {
            let ttl = r.holder.ttl_ms.map_or(own.ttl, Duration::from_millis);
            let owed = Duration::from_millis(r.holder.owed_ms.unwrap_or(0));
            own.silence.max(ttl).max(owed)
        }
    }
}

/// Picks the slot whose wait ends first (module docs, 1 to 4).
pub fn choose(
    slots: &Slots,
    alive: &BTreeSet<String>,
    me: &SessionId,
    own: &Timing,
    watch: &SlotWatch,
    now: BootTime,
) -> Next {
    if slots.value.holders.contains_key(&me.0) {
        return Next::Member;
    }
    let until = |since: Option<BootTime>, wait: Duration| {
        let end = since.unwrap_or(now) + wait;
        (end > now).then_some(end)
    };
    let mut candidates: Vec<(Choice, Option<BootTime>)> = Vec::new();
    let free = slots.free();
    if free > slots.unknown {
        candidates.push((Choice::Clean, None));
    }
    // Pruning keeps the count; never add to a `.lock` that already holds more than its limit.
    if slots.value.holders.len() as u64 <= slots.limit {
        for d in slots.value.holders.keys().filter(|s| !alive.contains(*s)) {
            let since = watch.dead_since.get(d).copied();
            candidates.push((
                Choice::Prune(d.clone()),
                until(since, debt(slots.record(d), own)),
            ));
        }
    }
    if free > 0 && slots.unknown > 0 {
        let since = watch
            .unknown_since
            .as_ref()
            .filter(|(id, _)| *id == slots.unknown_id)
            .map(|(_, t)| *t);
        candidates.push((Choice::Unknown, until(since, own.silence.max(own.ttl))));
    }
    // The earliest start; on a tie, the first listed.
    let mut best: Option<(Choice, Option<BootTime>)> = None;
    for (choice, owed) in candidates {
        let better = match &best {
            None => true,
            Some((_, b)) => match (owed, b) {
                (None, Some(_)) => true,
                (Some(o), Some(b)) => o < *b,
                _ => false,
            },
        };
        if better {
            best = Some((choice, owed));
        }
    }
    match best {
        Some((choice, owed_until)) => Next::Join { choice, owed_until },
        None => Next::Full,
    }
}

/// Starts the next version of the value from `slots`: our extension carried over (or begun,
/// over a value Go wrote, with its free slots unknown), and the token of the holder the replaced
/// version admitted recorded, since that version's ModifyIndex is its token (module docs, 5).
fn next_version(slots: &Slots) -> (LockValue, Ext) {
    let mut value = slots.value.clone();
    value.limit = slots.limit as i64;
    let mut ext = value.ext.take().unwrap_or_default();
    if let Some(a) = ext.admitted.take()
        && let Some(r) = ext.holders.get_mut(&a)
    {
        r.token.get_or_insert(slots.cas);
    }
    ext.unknown = slots.unknown;
    ext.unknown_id = slots.unknown_id.clone();
    (value, ext)
}

/// Ends a version: drops records of sessions that are no longer holders.
fn finish_version(mut value: LockValue, mut ext: Ext) -> LockValue {
    ext.holders.retain(|s, _| value.holders.contains_key(s));
    if ext.unknown == 0 {
        ext.unknown_id.clear();
    }
    value.ext = Some(ext);
    value
}

/// The value that admits `me` into the slot `choice`, with `record` (module docs, 1).
pub fn admitted_value(
    slots: &Slots,
    me: &SessionId,
    choice: &Choice,
    record: SlotRecord,
) -> LockValue {
    let (mut value, mut ext) = next_version(slots);
    match choice {
        Choice::Clean => {}
        Choice::Unknown => ext.unknown = ext.unknown.saturating_sub(1),
        Choice::Prune(d) => {
            value.holders.remove(d);
        }
    }
    value.holders.insert(me.0.clone(), true);
    ext.holders.insert(me.0.clone(), record);
    ext.admitted = Some(me.0.clone());
    finish_version(value, ext)
}

/// The value without `me`, for a clean release (its slot is free and clean); `None` when `me` is
/// not a holder.
pub fn released_value(slots: &Slots, me: &SessionId) -> Option<LockValue> {
    if !slots.value.holders.contains_key(&me.0) {
        return None;
    }
    let (mut value, ext) = next_version(slots);
    value.holders.remove(&me.0);
    Some(finish_version(value, ext))
}

/// Why a holder is no longer one, from a listing of the prefix; `None` while it still is.
pub fn lost_reason(prefix: &str, obs: &Observed, me: &SessionId) -> Option<String> {
    let lock = lock_key(prefix);
    if !obs.alive.contains(&me.0) {
        return Some(format!(
            "our contender key {} is gone (the session was invalidated, or the key deleted)",
            contender_key(prefix, &me.0)
        ));
    }
    match &obs.lock {
        LockKey::Fresh { .. } => Some(format!("{lock} was deleted")),
        LockKey::Foreign { .. } | LockKey::Garbled { .. } => {
            Some(format!("{lock} was overwritten with something else"))
        }
        LockKey::Semaphore { value, .. } if !value.holders.contains_key(&me.0) => {
            Some(format!("we are no longer among the holders in {lock}"))
        }
        LockKey::Semaphore { .. } => None,
    }
}

/// Who holds the slots, for log lines.
fn describe_holders(slots: &Slots, obs: &Observed) -> String {
    slots
        .value
        .holders
        .keys()
        .map(|s| {
            let who = slots
                .record(s)
                .map(|r| r.holder.clone())
                .or_else(|| obs.contenders.get(s).cloned().flatten());
            let alive = if obs.alive.contains(s) { "" } else { ", gone" };
            match who {
                Some(h) => format!("{} (session {s}{alive})", h.holder),
                None => format!("session {s}{alive}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// The protocol
// ---------------------------------------------------------------------------------------------

/// One session's life.
pub struct Term {
    pub session: SessionId,
    renewals: watch::Receiver<Renewal>,
    _renewer: AbortOnDrop,
    /// What we saw of the semaphore while contending.
    slots: SlotWatch,
    /// The waits of our check-and-sets that may have gone through (sent, answer `true` or not
    /// seen): if a listing shows us a holder, one of them did, and we owe the longest.
    in_flight: Vec<Option<BootTime>>,
}

impl Term {
    fn owed_in_flight(&self) -> Option<BootTime> {
        self.in_flight.iter().flatten().max().copied()
    }
}

impl super::Term for Term {
    fn id(&self) -> String {
        self.session.0.clone()
    }

    fn renewals(&self) -> watch::Receiver<Renewal> {
        self.renewals.clone()
    }
}

/// A slot won.
#[derive(Debug, Clone)]
pub struct Won {
    /// The ModifyIndex of the check-and-set that admitted us (module docs, 5).
    pub fencing_token: u64,
    /// Where the holder's watch starts.
    pub index: ConsulIndex,
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

pub struct ConsulSemaphore {
    client: Arc<Client>,
    cfg: RunConfig,
    limit: u64,
}

impl ConsulSemaphore {
    pub fn new(client: Arc<Client>, cfg: RunConfig) -> Self {
        let limit = u64::from(cfg.limit);
        Self { client, cfg, limit }
    }

    fn prefix(&self) -> &str {
        &self.cfg.key
    }

    /// What a listing reads: `PREFIX/`, so that `PREFIX-other/...` keys stay out.
    fn dir(&self) -> String {
        format!("{}/", self.cfg.key)
    }

    /// Removes us from `Holders` (a clean release), then deletes our contender key, as
    /// `api.Semaphore`'s Release does. Called only once no child of ours is running, and only
    /// when the release is clean (module docs, 4).
    async fn release_slot(&self, term: &Term) {
        let lock = lock_key(self.prefix());
        let (mut races, mut attempt) = (0u32, 0u32);
        loop {
            let result = match self.client.kv_get(&lock, ReadOpts::default()).await {
                Ok((entry, index)) => {
                    let obs = Observed {
                        lock: entry
                            .as_ref()
                            .map_or(LockKey::Fresh { modify_index: 0 }, read_lock_key),
                        alive: BTreeSet::new(),
                        contenders: BTreeMap::new(),
                        index: index.0,
                    };
                    let Some(value) = read_slots(&obs, self.limit).ok().and_then(|slots| {
                        released_value(&slots, &term.session).map(|v| (slots.cas, v))
                    }) else {
                        // Not a holder (any more): nothing to release.
                        break;
                    };
                    self.client
                        .kv_cas(&lock, value.0, SEMAPHORE_FLAG_VALUE, value.1.to_bytes())
                        .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(true) => {
                    info!("released a slot of {}", self.prefix());
                    break;
                }
                // Someone else wrote first: read again.
                Ok(false) if races < 20 => races += 1,
                Err(e) if e.is_transient() && attempt < 4 => {
                    debug!("releasing the slot failed: {e}; retrying");
                    sleep(election::backoff(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(2),
                    ))
                    .await;
                    attempt += 1;
                }
                Ok(false) => {
                    warn!(
                        "cannot release the slot of {}: {lock} changes too often; ending the \
                         session makes us a dead holder, whose slot the next contender takes after \
                         its wait",
                        self.prefix()
                    );
                    return;
                }
                Err(e) => {
                    warn!(
                        "cannot release the slot of {}: {e}; ending the session makes us a dead \
                         holder, whose slot the next contender takes after its wait",
                        self.prefix()
                    );
                    return;
                }
            }
        }
        let key = contender_key(self.prefix(), &term.session.0);
        if let Err(e) = self.client.kv_delete(&key).await {
            debug!("cannot delete {key}: {e}; ending the session deletes it");
        }
    }

    /// Writes our contender key, so that a `Holders` entry of ours is never taken for a dead one.
    /// True when it is ours.
    async fn write_contender_key(&self, term: &Term) -> Result<bool, ConsulError> {
        let key = contender_key(self.prefix(), &term.session.0);
        let mut who = HolderValue::new(
            &self.cfg.host,
            &self.cfg.id,
            &term.session,
            &self.cfg.timing(),
            Duration::ZERO,
        );
        who.owed_ms = None;
        self.client
            .kv_acquire(&key, &term.session, SEMAPHORE_FLAG_VALUE, who.to_bytes())
            .await
    }
}

impl Protocol for ConsulSemaphore {
    type Term = Term;
    type Won = Won;

    /// One attempt to create a session with Behavior `delete` (as `api.Semaphore` creates them):
    /// Consul deletes our contender key with it.
    async fn open(&self) -> Result<Term, OpenError> {
        let mut req = session::request(&self.cfg);
        req.behavior = "delete";
        let session::Opened {
            id,
            renewals,
            renewer,
        } = session::open(&self.client, &req, self.cfg.ttl, self.cfg.grace).await?;
        Ok(Term {
            session: id,
            renewals,
            _renewer: renewer,
            slots: SlotWatch::default(),
            in_flight: Vec::new(),
        })
    }

    async fn close(&self, term: Term, attempts: u32) {
        let id = term.session.clone();
        drop(term); // stops the renewer first
        session::destroy(&self.client, &id, attempts, self.cfg.ttl).await;
    }

    /// Contends for a slot: blocking reads of the prefix while every slot is held, a
    /// check-and-set on `.lock` when one can be taken. Cancel-safe: a check-and-set cut short is
    /// remembered in the term, and [`ConsulSemaphore::abandon`] lets go of the slot.
    async fn contend(&self, term: &mut Term, deadline: Option<Instant>) -> Result<Won, ContendEnd> {
        let cfg = &self.cfg;
        let client = &self.client;
        let timing = cfg.timing();
        let session = term.session.clone();
        let prefix = self.prefix();
        let lock = lock_key(prefix);
        let mut index = ConsulIndex(0);
        let mut consistent = false;
        let mut announced: Option<String> = None;
        let mut errors = Errors::new(format!("cannot read {}", self.dir()));
        let expired = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        // A guard against a fleet that mixes --limit 1 and --limit N on one --key, checked once
        // per term; a failed read only skips it.
        match client.kv_get(prefix, ReadOpts::default()).await {
            Ok((entry, _)) => {
                check_bare_key(entry.as_ref()).map_err(|c| ContendEnd::Fatal(c.message(prefix)))?
            }
            Err(e) => debug!("cannot read {prefix} itself: {e}; not checking it for a lock"),
        }
        loop {
            if term.renewals.borrow().end.is_some() {
                return Err(ContendEnd::SessionGone);
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let wait = remaining.unwrap_or(MAX_BLOCK).min(MAX_BLOCK);
            let opts = if index.0 == 0 || wait.is_zero() {
                ReadOpts {
                    consistent,
                    ..ReadOpts::default()
                }
            } else {
                ReadOpts {
                    index,
                    wait: Some(wait),
                    ..ReadOpts::default()
                }
            };
            consistent = false;
            let (entries, new_index) = match client.kv_list(&self.dir(), opts).await {
                Ok(r) => {
                    errors.ok();
                    r
                }
                Err(e) if e.is_transient() && !expired(deadline) => {
                    errors.retry(&e).await;
                    index = ConsulIndex(0);
                    continue;
                }
                Err(e) => {
                    return Err(ContendEnd::Fatal(format!(
                        "cannot read {}: {e}",
                        self.dir()
                    )));
                }
            };
            if new_index < index {
                // The agent lost its state (or a snapshot was restored): what we saw before
                // tells nothing about what is there now.
                term.slots = SlotWatch::default();
            }
            let obs = observe(prefix, &entries, new_index.0);
            let slots =
                read_slots(&obs, self.limit).map_err(|c| ContendEnd::Fatal(c.message(prefix)))?;
            let now = BootTime::now();
            term.slots.observe(&slots, &obs.alive, now);
            let choice = match choose(&slots, &obs.alive, &session, &timing, &term.slots, now) {
                Next::Member => {
                    if !obs.alive.contains(&session.0) {
                        // Counted a holder, but our contender key is gone: the session ended.
                        return Err(ContendEnd::SessionGone);
                    }
                    // Our check-and-set went through; a holder nobody remembers admitting owes
                    // what a new slot does.
                    let owed_until = if term.in_flight.is_empty() {
                        Some(now + timing.silence.max(timing.ttl))
                    } else {
                        term.owed_in_flight()
                    };
                    term.in_flight.clear();
                    return Ok(Won {
                        fencing_token: slots.token_of(&session.0),
                        index: next_index(ConsulIndex(0), new_index),
                        owed_until,
                    });
                }
                Next::Full => {
                    let who = describe_holders(&slots, &obs);
                    if announced.as_deref() != Some(who.as_str()) {
                        info!(
                            "waiting for a slot of {prefix}: all {} are held by {who}",
                            self.limit
                        );
                        crate::notify::status(&format!("standby, all {} slots held", self.limit));
                        announced = Some(who);
                    }
                    if expired(deadline) {
                        return Err(ContendEnd::Busy);
                    }
                    index = next_index(index, new_index);
                    continue;
                }
                Next::Join { choice, owed_until } => (choice, owed_until),
            };
            let (choice, owed_until) = choice;
            if !obs.alive.contains(&session.0) {
                match self.write_contender_key(term).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(ContendEnd::Fatal(format!(
                            "cannot write our contender key {}: another session holds it",
                            contender_key(prefix, &session.0)
                        )));
                    }
                    Err(ConsulError::Status { body, .. }) if body.contains("invalid session") => {
                        return Err(ContendEnd::SessionGone);
                    }
                    Err(e) if e.is_transient() && !expired(deadline) => {
                        errors.retry(&e).await;
                        index = ConsulIndex(0);
                        continue;
                    }
                    Err(e) => {
                        return Err(ContendEnd::Fatal(format!(
                            "cannot write our contender key {}: {e}",
                            contender_key(prefix, &session.0)
                        )));
                    }
                }
            }
            // Made at each attempt, so that `acquired_at` says when we joined and `owed_ms`
            // what we still owed when we sent it (election's module docs, 6).
            let now = BootTime::now();
            let owed = owed_until.map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
            let record = SlotRecord {
                holder: HolderValue::new(&cfg.host, &cfg.id, &session, &timing, owed),
                token: None,
            };
            let value = admitted_value(&slots, &session, &choice, record);
            term.in_flight.push(owed_until);
            match client
                .kv_cas(&lock, slots.cas, SEMAPHORE_FLAG_VALUE, value.to_bytes())
                .await
            {
                Ok(true) => {
                    match &choice {
                        Choice::Clean => debug!("took a free slot of {prefix}"),
                        Choice::Unknown => {
                            info!("took a free slot of {prefix} whose last holder is unknown")
                        }
                        Choice::Prune(d) => {
                            info!("took the slot of session {d}, which ended without releasing it")
                        }
                    }
                    // Read back what admitted us: the fencing token, and where the watch starts.
                    index = ConsulIndex(0);
                    consistent = true;
                }
                Ok(false) => {
                    // Another writer was first: this attempt did not go through.
                    term.in_flight.pop();
                    index = ConsulIndex(0);
                }
                Err(e) if e.is_transient() && !expired(deadline) => {
                    errors.retry(&e).await;
                    index = ConsulIndex(0);
                }
                Err(e) => {
                    return Err(ContendEnd::Fatal(format!("cannot update {lock}: {e}")));
                }
            }
        }
    }

    /// Watches the slot won with blocking `?recurse&consistent` reads of the prefix, as
    /// `api.Semaphore`'s monitor does: the receiver gets the first sign that it is no longer ours.
    fn watch(&self, term: &Term, won: &Won) -> (AbortOnDrop, mpsc::Receiver<Verdict>) {
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(watch_slot(
            self.client.clone(),
            self.prefix().to_string(),
            term.session.clone(),
            won.index,
            WatchPace::new(self.cfg.ttl, self.cfg.grace),
            tx,
        ));
        (AbortOnDrop(task), rx)
    }

    /// A clean release frees the slot; an unclean one leaves it (module docs, 4): the session's
    /// end then makes us a dead holder, and whoever takes the slot inherits our wait.
    async fn release(&self, term: &Term, _won: &Won, clean: bool) {
        if clean {
            self.release_slot(term).await;
        } else {
            info!(
                "leaving the slot of {} without freeing it: the wait for earlier holders had not \
                 passed, and whoever takes the slot inherits it",
                self.prefix()
            );
        }
    }

    /// For `--wait 0`: one listing, busy when every slot is held by a live holder (a dead
    /// holder's slot, a free slot or a conflict is for the full path to handle).
    async fn busy(&self) -> Option<String> {
        let (entries, index) = self
            .client
            .kv_list(&self.dir(), ReadOpts::default())
            .await
            .ok()?;
        let obs = observe(self.prefix(), &entries, index.0);
        let slots = read_slots(&obs, self.limit).ok()?;
        let me = SessionId(String::new());
        let choice = choose(
            &slots,
            &obs.alive,
            &me,
            &self.cfg.timing(),
            &SlotWatch::default(),
            BootTime::now(),
        );
        (choice == Next::Full).then(|| {
            format!(
                "all {} slots are held by {}",
                self.limit,
                describe_holders(&slots, &obs)
            )
        })
    }

    /// After a contention was cut short: if a check-and-set may have admitted us, free the slot
    /// when no wait was owed any more, else leave it to be taken as a dead holder's.
    async fn abandon(&self, term: &mut Term) {
        if term.in_flight.is_empty() {
            return;
        }
        let owed = term.owed_in_flight();
        term.in_flight.clear();
        if election::may_mark_clean(owed, BootTime::now()) {
            self.release_slot(term).await;
        }
    }
}

/// Watches the prefix with blocking `?consistent` reads (`session::watch`); reports the first
/// sign that we are no longer a holder ([`lost_reason`]).
async fn watch_slot(
    client: Arc<Client>,
    prefix: String,
    session: SessionId,
    index: ConsulIndex,
    pace: WatchPace,
    tx: mpsc::Sender<Verdict>,
) {
    let dir = format!("{prefix}/");
    let read = |opts| {
        let (client, dir) = (client.clone(), dir.clone());
        async move { client.kv_list(&dir, opts).await }
    };
    let lost = |entries: &Vec<KvEntry>, at: ConsulIndex| {
        lost_reason(&prefix, &observe(&prefix, entries, at.0), &session)
    };
    session::watch(dir.clone(), read, lost, index, pace, tx).await;
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at_ms(n: u64) -> BootTime {
        BootTime::from_since_boot(secs(1000) + ms(n))
    }

    fn at(n: u64) -> BootTime {
        at_ms(n * 1000)
    }

    fn sid(s: &str) -> SessionId {
        SessionId(s.into())
    }

    /// T 3s, lock-delay 1s, silence 3s: the tests' SHORT timing.
    const OWN: Timing = Timing {
        ttl: Duration::from_secs(3),
        lock_delay: Duration::from_secs(1),
        silence: Duration::from_secs(3),
    };

    fn record(session: &str, ttl: u64, owed: u64) -> SlotRecord {
        let t = Timing {
            ttl: secs(ttl),
            lock_delay: secs(1),
            silence: secs(ttl),
        };
        SlotRecord {
            holder: HolderValue::new("h1", "h1", &sid(session), &t, secs(owed)),
            token: None,
        }
    }

    fn entry(key: &str, flags: u64, session: Option<&str>, value: &[u8], modify: u64) -> KvEntry {
        KvEntry {
            lock_index: u64::from(session.is_some()),
            key: key.into(),
            flags,
            value: KvEntry::encode_value(value),
            session: session.map(Into::into),
            create_index: 1,
            modify_index: modify,
        }
    }

    fn lock_entry(value: &LockValue, modify: u64) -> KvEntry {
        entry(
            "p/.lock",
            SEMAPHORE_FLAG_VALUE,
            None,
            &value.to_bytes(),
            modify,
        )
    }

    fn contender(session: &str) -> KvEntry {
        entry(
            &format!("p/{session}"),
            SEMAPHORE_FLAG_VALUE,
            Some(session),
            b"",
            3,
        )
    }

    fn alive(sessions: &[&str]) -> BTreeSet<String> {
        sessions.iter().map(|s| s.to_string()).collect()
    }

    /// A `.lock` as consul-leader writes it, with `holders` (each with a record of TTL `ttl`).
    fn ours(limit: i64, holders: &[&str], ttl: u64) -> LockValue {
        LockValue {
            limit,
            holders: holders.iter().map(|h| (h.to_string(), true)).collect(),
            ext: Some(Ext {
                admitted: None,
                holders: holders
                    .iter()
                    .map(|h| (h.to_string(), record(h, ttl, 0)))
                    .collect(),
                unknown: 0,
                unknown_id: String::new(),
            }),
        }
    }

    fn slots_of(value: &LockValue, modify: u64, limit: u64) -> Slots {
        let obs = observe("p", &[lock_entry(value, modify)], modify);
        read_slots(&obs, limit).unwrap()
    }

    #[test]
    fn the_coordination_value_encodes_as_api_semaphore_does() {
        let go = LockValue {
            limit: 2,
            holders: [("b".to_string(), true), ("a".to_string(), true)]
                .into_iter()
                .collect(),
            ext: None,
        };
        // Field names and order of Go's semaphoreLock; Go sorts map keys.
        assert_eq!(
            String::from_utf8(go.to_bytes()).unwrap(),
            r#"{"Limit":2,"Holders":{"a":true,"b":true}}"#
        );
        let empty = LockValue {
            limit: 3,
            ..LockValue::default()
        };
        assert_eq!(
            String::from_utf8(empty.to_bytes()).unwrap(),
            r#"{"Limit":3,"Holders":{}}"#
        );
        // Go writes a nil map as null.
        let parsed: LockValue = serde_json::from_str(r#"{"Limit":3,"Holders":null}"#).unwrap();
        assert!(parsed.holders.is_empty());
        // Our extension travels beside Go's fields, under a name Go's decoder ignores.
        let v = ours(2, &["a"], 6);
        let json: serde_json::Value = serde_json::from_slice(&v.to_bytes()).unwrap();
        assert_eq!(json["Limit"], 2);
        assert_eq!(json["Holders"]["a"], true);
        assert_eq!(json["ConsulLeader"]["holders"]["a"]["ttl_ms"], 6000);
        assert_eq!(json["ConsulLeader"]["holders"]["a"]["session"], "a");
        assert_eq!(
            serde_json::from_slice::<LockValue>(&v.to_bytes()).unwrap(),
            v
        );
    }

    #[test]
    fn a_listing_tells_the_lock_key_and_the_live_contenders() {
        let v = ours(2, &["s1", "s2"], 3);
        let entries = [
            lock_entry(&v, 9),
            contender("s1"),
            // s2's key is gone; a key without a session, and one held by another session, do
            // not make a contender alive; nor do deeper keys.
            entry("p/s3", SEMAPHORE_FLAG_VALUE, None, b"", 4),
            entry("p/s4", SEMAPHORE_FLAG_VALUE, Some("s1"), b"", 4),
            entry("p/x/s5", SEMAPHORE_FLAG_VALUE, Some("s5"), b"", 4),
        ];
        let obs = observe("p", &entries, 12);
        assert_eq!(obs.alive, alive(&["s1"]));
        assert_eq!(
            obs.lock,
            LockKey::Semaphore {
                modify_index: 9,
                value: v
            }
        );
        assert_eq!(
            observe("p", &[], 5).lock,
            LockKey::Fresh { modify_index: 0 }
        );
        // An empty value is a new semaphore to api.Semaphore too.
        let empty = entry("p/.lock", SEMAPHORE_FLAG_VALUE, None, b"", 7);
        assert_eq!(
            observe("p", &[empty], 7).lock,
            LockKey::Fresh { modify_index: 7 }
        );
    }

    #[test]
    fn another_limit_or_another_use_of_the_lock_key_is_refused() {
        let obs = observe("p", &[lock_entry(&ours(3, &[], 3), 4)], 4);
        assert_eq!(
            read_slots(&obs, 2),
            Err(Conflict::Limit { theirs: 3, ours: 2 })
        );
        let msg = Conflict::Limit { theirs: 3, ours: 2 }.message("p");
        assert!(
            msg.contains("Limit 3") && msg.contains("--limit is 2"),
            "{msg}"
        );
        // `consul lock p` (without -n) holds p/.lock with the lock flags.
        let lock = entry("p/.lock", LOCK_FLAG_VALUE, Some("x"), b"", 4);
        let obs = observe("p", &[lock], 4);
        assert_eq!(
            read_slots(&obs, 2),
            Err(Conflict::Foreign {
                flags: LOCK_FLAG_VALUE
            })
        );
        assert!(
            Conflict::Foreign {
                flags: LOCK_FLAG_VALUE
            }
            .message("p")
            .contains("is a lock")
        );
        let junk = entry("p/.lock", SEMAPHORE_FLAG_VALUE, None, b"not json", 4);
        assert!(matches!(
            read_slots(&observe("p", &[junk], 4), 2),
            Err(Conflict::Garbled { .. })
        ));
    }

    #[test]
    fn a_prefix_held_as_a_lock_is_refused() {
        assert_eq!(check_bare_key(None), Ok(()));
        let free = entry("p", LOCK_FLAG_VALUE, None, b"", 3);
        assert_eq!(check_bare_key(Some(&free)), Ok(()));
        let data = entry("p", 0, None, b"x", 3);
        assert_eq!(check_bare_key(Some(&data)), Ok(()));
        let held = entry("p", LOCK_FLAG_VALUE, Some("s9"), b"", 3);
        let c = check_bare_key(Some(&held)).unwrap_err();
        assert!(
            c.message("p").contains("same --limit"),
            "{}",
            c.message("p")
        );
    }

    #[test]
    fn a_new_semaphore_has_every_slot_unknown_and_owes_the_full_wait() {
        let obs = observe("p", &[], 5);
        let slots = read_slots(&obs, 2).unwrap();
        assert_eq!((slots.cas, slots.unknown, slots.free()), (0, 2, 2));
        let mut w = SlotWatch::default();
        w.observe(&slots, &obs.alive, at(0));
        w.observe(&slots, &obs.alive, at(1));
        // max(silence, TTL) from the first sighting, not from the latest.
        assert_eq!(
            choose(&slots, &obs.alive, &sid("me"), &OWN, &w, at(1)),
            Next::Join {
                choice: Choice::Unknown,
                owed_until: Some(at(3))
            }
        );
        let v = admitted_value(&slots, &sid("me"), &Choice::Unknown, record("me", 3, 3));
        assert_eq!(v.limit, 2);
        let ext = v.ext.as_ref().unwrap();
        assert_eq!(ext.unknown, 1, "one slot is still unknown");
        assert_eq!(ext.unknown_id, "missing@5");
        assert_eq!(ext.admitted.as_deref(), Some("me"));
    }

    #[test]
    fn free_slots_a_go_writer_left_are_unknown() {
        let go = LockValue {
            limit: 3,
            holders: [("g".to_string(), true)].into_iter().collect(),
            ext: None,
        };
        let slots = slots_of(&go, 8, 3);
        assert_eq!((slots.unknown, slots.unknown_id.as_str()), (2, "foreign@8"));
        let mut w = SlotWatch::default();
        w.observe(&slots, &alive(&["g"]), at(2));
        assert_eq!(
            choose(&slots, &alive(&["g"]), &sid("me"), &OWN, &w, at(2)),
            Next::Join {
                choice: Choice::Unknown,
                owed_until: Some(at(5))
            }
        );
        // The event keeps its name once we write over it, so others keep their first sighting.
        let v = admitted_value(&slots, &sid("me"), &Choice::Unknown, record("me", 3, 3));
        let next = slots_of(&v, 11, 3);
        assert_eq!((next.unknown, next.unknown_id.as_str()), (1, "foreign@8"));
        let mut w2 = w.clone();
        w2.observe(&next, &alive(&["g", "me"]), at(4));
        assert_eq!(
            choose(&next, &alive(&["g", "me"]), &sid("x"), &OWN, &w2, at(4)),
            Next::Join {
                choice: Choice::Unknown,
                owed_until: Some(at(5))
            }
        );
    }

    #[test]
    fn a_slot_released_clean_is_taken_at_once() {
        let v = ours(2, &["a", "b"], 3);
        let slots = slots_of(&v, 10, 2);
        let released = released_value(&slots, &sid("a")).unwrap();
        assert_eq!(released.holders.keys().collect::<Vec<_>>(), ["b"]);
        assert!(!released.ext.as_ref().unwrap().holders.contains_key("a"));
        let slots = slots_of(&released, 12, 2);
        assert_eq!(slots.unknown, 0);
        assert_eq!(
            choose(
                &slots,
                &alive(&["b"]),
                &sid("me"),
                &OWN,
                &SlotWatch::default(),
                at(0)
            ),
            Next::Join {
                choice: Choice::Clean,
                owed_until: None
            }
        );
        assert_eq!(released_value(&slots, &sid("a")), None, "not a holder");
    }

    #[test]
    fn all_slots_held_by_live_holders_is_full() {
        let slots = slots_of(&ours(2, &["a", "b"], 3), 10, 2);
        let w = SlotWatch::default();
        assert_eq!(
            choose(&slots, &alive(&["a", "b"]), &sid("me"), &OWN, &w, at(0)),
            Next::Full
        );
        assert_eq!(
            choose(&slots, &alive(&["a", "b"]), &sid("a"), &OWN, &w, at(0)),
            Next::Member
        );
    }

    #[test]
    fn a_dead_holders_slot_owes_its_debt_from_the_first_sighting() {
        // b's record says TTL 6s: more than our own silence and TTL.
        let slots = slots_of(&ours(2, &["a", "b"], 6), 10, 2);
        let live = alive(&["a"]);
        let mut w = SlotWatch::default();
        w.observe(&slots, &alive(&["a", "b"]), at(0));
        w.observe(&slots, &live, at(1));
        w.observe(&slots, &live, at(4));
        assert_eq!(
            choose(&slots, &live, &sid("me"), &OWN, &w, at(4)),
            Next::Join {
                choice: Choice::Prune("b".into()),
                owed_until: Some(at(7))
            }
        );
        // Once the debt has passed, at once.
        assert_eq!(
            choose(&slots, &live, &sid("me"), &OWN, &w, at(8)),
            Next::Join {
                choice: Choice::Prune("b".into()),
                owed_until: None
            }
        );
        // Lock-delay waives nothing here: it guards the dead holder's own key only.
        let rec = record("b", 6, 0);
        assert_eq!(rec.holder.lock_delay_ms, Some(1000));
        assert_eq!(debt(Some(&rec), &OWN), secs(6));
    }

    #[test]
    fn what_a_dead_holder_is_owed() {
        // Its TTL, our silence, or the wait it still owed itself, whichever is longest.
        assert_eq!(debt(Some(&record("x", 2, 0)), &OWN), secs(3));
        assert_eq!(debt(Some(&record("x", 9, 0)), &OWN), secs(9));
        assert_eq!(debt(Some(&record("x", 2, 7)), &OWN), secs(7));
        // No record (consul lock -n, or dropped by a Go writer): as if configured like us.
        let long = Timing {
            ttl: secs(15),
            lock_delay: secs(15),
            silence: secs(1),
        };
        assert_eq!(debt(None, &long), secs(15));
        assert_eq!(debt(None, &OWN), secs(3));
    }

    #[test]
    fn each_admission_takes_at_most_one_dead_holders_slot() {
        let slots = slots_of(&ours(2, &["d1", "d2"], 3), 10, 2);
        let none = alive(&[]);
        let mut w = SlotWatch::default();
        w.observe(&slots, &none, at(0));
        let Next::Join { choice, .. } = choose(&slots, &none, &sid("me"), &OWN, &w, at(0)) else {
            panic!("a dead holder's slot can be taken");
        };
        assert_eq!(choice, Choice::Prune("d1".into()));
        let v = admitted_value(&slots, &sid("me"), &choice, record("me", 3, 3));
        // d2 still counts against the limit: its child may run until its own successor waited.
        assert_eq!(v.holders.keys().collect::<Vec<_>>(), ["d2", "me"], "{v:?}");
        assert!(v.ext.as_ref().unwrap().holders.contains_key("d2"));
    }

    #[test]
    fn a_lock_key_over_its_limit_is_not_joined() {
        let slots = slots_of(&ours(2, &["a", "b", "d"], 3), 10, 2);
        assert_eq!(
            choose(
                &slots,
                &alive(&["a", "b"]),
                &sid("me"),
                &OWN,
                &SlotWatch::default(),
                at(0)
            ),
            Next::Full
        );
    }

    #[test]
    fn the_next_writer_records_the_token_of_the_version_it_replaces() {
        let slots = slots_of(&ours(3, &["a"], 3), 10, 3);
        let v = admitted_value(&slots, &sid("b"), &Choice::Clean, record("b", 3, 0));
        let slots = slots_of(&v, 14, 3);
        // .lock is still the version that admitted b: its ModifyIndex is b's token.
        assert_eq!(slots.token_of("b"), 14);
        // c's write replaces it and records 14 for b.
        let v = admitted_value(&slots, &sid("c"), &Choice::Clean, record("c", 3, 0));
        let slots = slots_of(&v, 20, 3);
        assert_eq!(slots.token_of("b"), 14);
        assert_eq!(slots.token_of("c"), 20);
        // A release carries it on, and so do later versions.
        let v = released_value(&slots, &sid("c")).unwrap();
        let slots = slots_of(&v, 25, 3);
        assert_eq!(slots.token_of("b"), 14);
        assert_eq!(slots.ext_admitted(), None);
        // A Go writer drops our records: the current ModifyIndex, which is later than the
        // admission and earlier than whoever takes the slot afterwards.
        let go = LockValue {
            ext: None,
            ..v.clone()
        };
        assert_eq!(slots_of(&go, 30, 3).token_of("b"), 30);
    }

    #[test]
    fn a_holder_is_lost_when_its_key_or_its_entry_is_gone() {
        let me = sid("me");
        let v = ours(2, &["me"], 3);
        let held = observe("p", &[lock_entry(&v, 4), contender("me")], 4);
        assert_eq!(lost_reason("p", &held, &me), None);
        let key_gone = observe("p", &[lock_entry(&v, 4)], 5);
        assert!(lost_reason("p", &key_gone, &me).unwrap().contains("p/me"));
        let pruned = observe("p", &[lock_entry(&ours(2, &[], 3), 6), contender("me")], 6);
        assert!(
            lost_reason("p", &pruned, &me)
                .unwrap()
                .contains("no longer among the holders")
        );
        let deleted = observe("p", &[contender("me")], 7);
        assert!(lost_reason("p", &deleted, &me).unwrap().contains("deleted"));
    }

    impl Slots {
        fn ext_admitted(&self) -> Option<&str> {
            self.value.ext.as_ref()?.admitted.as_deref()
        }
    }

    /// A model run of the rules: contenders with random timings join, release cleanly, leave
    /// during their wait, or die (their session invalidated while their child may run until
    /// their fence, `I + T`); at every moment at most `limit` children may run.
    #[test]
    fn model_never_more_than_limit_children_may_run() {
        #[derive(Debug)]
        enum State {
            Waiting,
            Holding {
                owed_until: Option<BootTime>,
                started: bool,
            },
        }
        struct Contender {
            session: SessionId,
            timing: Timing,
            watch: SlotWatch,
            state: State,
        }
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let limit = rng.random_range(2..=4u64);
            let mut value: Option<LockValue> = None;
            let mut modify = 0u64;
            let mut alive: BTreeSet<String> = BTreeSet::new();
            let mut contenders: Vec<Contender> = Vec::new();
            // Children of dead holders, by the end of their fence.
            let mut zombies: Vec<BootTime> = Vec::new();
            let mut next_id = 0u32;
            let mut t = 0u64;
            for _ in 0..400 {
                t += rng.random_range(0..700);
                let now = at_ms(t);
                let slots = |value: &Option<LockValue>, modify: u64| {
                    let entries: Vec<KvEntry> =
                        value.iter().map(|v| lock_entry(v, modify)).collect();
                    read_slots(&observe("p", &entries, modify.max(1)), limit).unwrap()
                };
                match rng.random_range(0..10) {
                    // A new contender.
                    0 | 1 if contenders.len() < 8 => {
                        next_id += 1;
                        let ttl = secs(rng.random_range(1..=6));
                        let silence = secs(rng.random_range(0..=6));
                        contenders.push(Contender {
                            session: sid(&format!("s{next_id}")),
                            timing: Timing {
                                ttl,
                                lock_delay: secs(1),
                                silence,
                            },
                            watch: SlotWatch::default(),
                            state: State::Waiting,
                        });
                    }
                    // A waiting contender reads the semaphore and takes what it may.
                    2..=5 => {
                        let Some(c) = contenders
                            .iter_mut()
                            .filter(|c| matches!(c.state, State::Waiting))
                            .nth(rng.random_range(0..8))
                        else {
                            continue;
                        };
                        let s = slots(&value, modify);
                        c.watch.observe(&s, &alive, now);
                        if let Next::Join { choice, owed_until } =
                            choose(&s, &alive, &c.session, &c.timing, &c.watch, now)
                        {
                            let owed = owed_until
                                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
                            let rec = SlotRecord {
                                holder: HolderValue::new("h", "h", &c.session, &c.timing, owed),
                                token: None,
                            };
                            value = Some(admitted_value(&s, &c.session, &choice, rec));
                            modify += 1;
                            alive.insert(c.session.0.clone());
                            c.state = State::Holding {
                                owed_until,
                                started: false,
                            };
                        }
                    }
                    // A holder leaves: cleanly once its wait passed (its child confirmed gone),
                    // else without freeing its slot, as a dead holder with no child.
                    6 | 7 => {
                        let Some(i) = (0..contenders.len())
                            .filter(|i| matches!(contenders[*i].state, State::Holding { .. }))
                            .nth(rng.random_range(0..4))
                        else {
                            continue;
                        };
                        let c = contenders.remove(i);
                        let State::Holding { owed_until, .. } = c.state else {
                            unreachable!()
                        };
                        if election::may_mark_clean(owed_until, now) {
                            let s = slots(&value, modify);
                            value = released_value(&s, &c.session);
                            modify += 1;
                        }
                        alive.remove(&c.session.0);
                    }
                    // A holder dies: its child (if any) may run until its fence.
                    8 => {
                        let Some(i) = (0..contenders.len())
                            .filter(|i| matches!(contenders[*i].state, State::Holding { .. }))
                            .nth(rng.random_range(0..4))
                        else {
                            continue;
                        };
                        let c = contenders.remove(i);
                        if let State::Holding { started: true, .. } = c.state {
                            zombies.push(now + c.timing.ttl);
                        }
                        alive.remove(&c.session.0);
                    }
                    _ => {}
                }
                // Children start once their wait passed.
                for c in &mut contenders {
                    if let State::Holding {
                        owed_until,
                        started,
                    } = &mut c.state
                        && owed_until.is_none_or(|u| now >= u)
                    {
                        *started = true;
                    }
                }
                let running = contenders
                    .iter()
                    .filter(|c| matches!(c.state, State::Holding { started: true, .. }))
                    .count()
                    + zombies.iter().filter(|end| **end > now).count();
                assert!(
                    running as u64 <= limit,
                    "seed {seed}, t {t}ms: {running} children may run with limit {limit}"
                );
            }
        }
    }
}
