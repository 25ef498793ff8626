//! The dev agent's whole state machine: KV entries, tombstones, sessions, the node's checks, the
//! global index and the per-table indexes, lock-delays and the timers for session TTLs and TTL
//! checks. Every mutation of Consul's data happens here, under one lock, so the rules of
//! consul-api.md §2, §3, §5.4 and §6 live in one place and the HTTP handlers stay thin.
//!
//! Index rule (§6): one counter; a write that really changes something takes the next value and
//! stamps it on every entry and table it touched. Writes that change nothing (an identical set, a
//! refused CAS or acquire, destroying an unknown session) take no index, which clients cannot tell
//! apart from real Consul's gaps.
//!
//! Time is passed in (`now`) rather than read here, so the timing rules are testable without
//! sleeping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Notify;

use super::gofmt::{SECOND, quote};
use super::watch::Watches;
use crate::wire::{KvEntry, ServiceCheck};

/// Consul's `MaxLockDelay`: the cap applied when a lock-delay is recorded.
pub const MAX_LOCK_DELAY: i64 = 60 * SECOND;
/// Consul's `SessionTTLMultiplier`: a session lives this many TTLs after its last renew.
pub const SESSION_TTL_MULTIPLIER: u32 = 2;
/// The check every session binds by default, owned by the agent's node.
pub const SERF_CHECK_ID: &str = "serfHealth";

pub const PASSING: &str = "passing";
pub const WARNING: &str = "warning";
pub const CRITICAL: &str = "critical";

/// One stored KV entry.
#[derive(Debug, Clone)]
pub struct KvRec {
    pub lock_index: u64,
    pub flags: u64,
    pub value: Bytes,
    pub session: Option<String>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl KvRec {
    pub fn to_wire(&self, key: &str) -> KvEntry {
        KvEntry {
            lock_index: self.lock_index,
            key: key.to_string(),
            flags: self.flags,
            value: KvEntry::encode_value(&self.value),
            session: self.session.clone(),
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }
}

/// The operation a KV PUT asks for (§3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Set,
    Cas(u64),
    Lock(String),
    Unlock(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Release,
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// A validated session-create request (see `session.rs` for decoding).
#[derive(Debug, Clone)]
pub struct NewSession {
    pub name: String,
    pub node: String,
    pub lock_delay: i64,
    pub behavior: Behavior,
    pub ttl: String,
    pub ttl_ns: i64,
    pub node_checks: Option<Vec<String>>,
    pub service_checks: Option<Vec<ServiceCheck>>,
    pub checks: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub spec: NewSession,
    pub create_index: u64,
    pub modify_index: u64,
    deadline: Option<Instant>,
}

/// The session JSON shape of §2.1. `wire::SessionEntry` carries `LockDelay` as u64, but Consul
/// prints the negative values that small negative inputs produce (`-5` → `-5000000000`), so the
/// agent writes this mirror of it (same names, same order).
#[derive(Serialize)]
pub struct SessionJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    #[serde(rename = "Name")]
    name: &'a str,
    #[serde(rename = "Node")]
    node: &'a str,
    #[serde(rename = "LockDelay")]
    lock_delay: i64,
    #[serde(rename = "Behavior")]
    behavior: &'a str,
    #[serde(rename = "TTL")]
    ttl: &'a str,
    #[serde(rename = "NodeChecks")]
    node_checks: &'a Option<Vec<String>>,
    #[serde(rename = "ServiceChecks")]
    service_checks: &'a Option<Vec<ServiceCheck>>,
    #[serde(rename = "Checks", skip_serializing_if = "Vec::is_empty")]
    checks: &'a Vec<String>,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

impl Session {
    pub fn to_json(&self) -> SessionJson<'_> {
        SessionJson {
            id: &self.id,
            name: &self.spec.name,
            node: &self.spec.node,
            lock_delay: self.spec.lock_delay,
            behavior: self.spec.behavior.as_str(),
            ttl: &self.spec.ttl,
            node_checks: &self.spec.node_checks,
            service_checks: &self.spec.service_checks,
            checks: &self.spec.checks,
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }

    /// Every check ID the session is bound to, in Consul's `CheckIDs()` order.
    fn bound_checks(&self) -> impl Iterator<Item = &str> {
        let s = &self.spec;
        s.checks
            .iter()
            .map(String::as_str)
            .chain(s.node_checks.iter().flatten().map(String::as_str))
            .chain(s.service_checks.iter().flatten().map(|c| c.id.as_str()))
    }
}

/// A check on the agent's node.
#[derive(Debug, Clone)]
pub struct Check {
    pub id: String,
    pub name: String,
    pub status: String,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    /// Nanoseconds; `None` for checks the agent does not own (serfHealth), which cannot be
    /// updated through the TTL endpoints.
    pub ttl: Option<i64>,
    pub create_index: u64,
    pub modify_index: u64,
    deadline: Option<Instant>,
}

/// A check registration (`CheckDefinition`), already validated.
#[derive(Debug, Clone)]
pub struct NewCheck {
    pub id: String,
    pub name: String,
    pub status: String,
    pub notes: String,
    pub service_id: String,
    pub ttl: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Keyed by the lower-case session ID.
    Session(String),
    Check(String),
}

pub struct Store {
    node: String,
    index: u64,
    kvs: BTreeMap<String, KvRec>,
    tombstones: BTreeMap<String, u64>,
    kvs_index: u64,
    tombstones_index: u64,
    sessions_index: u64,
    checks_index: u64,
    /// Keyed by the lower-case ID: Consul's session index lower-cases, so lookups ignore case and
    /// listing is in ID order.
    sessions: BTreeMap<String, Session>,
    checks: BTreeMap<String, Check>,
    lock_delays: HashMap<String, Instant>,
    timers: BTreeSet<(Instant, Timer)>,
    /// Woken when a newly armed timer is the earliest, so the reaper can sleep exactly until the
    /// next deadline instead of polling.
    reaper: Arc<Notify>,
    pub watches: Watches,
}

impl Store {
    /// A store holding the agent's node with a passing `serfHealth`, as a live Consul node has.
    pub fn new(node: &str, reaper: Arc<Notify>) -> Self {
        let mut s = Store {
            node: node.to_string(),
            index: 0,
            kvs: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            kvs_index: 0,
            tombstones_index: 0,
            sessions_index: 0,
            checks_index: 0,
            sessions: BTreeMap::new(),
            checks: BTreeMap::new(),
            lock_delays: HashMap::new(),
            timers: BTreeSet::new(),
            reaper,
            watches: Watches::default(),
        };
        let idx = s.next_index();
        s.checks.insert(
            SERF_CHECK_ID.into(),
            Check {
                id: SERF_CHECK_ID.into(),
                name: "Serf Health Status".into(),
                status: PASSING.into(),
                notes: String::new(),
                output: "Agent alive and reachable".into(),
                service_id: String::new(),
                ttl: None,
                create_index: idx,
                modify_index: idx,
                deadline: None,
            },
        );
        s.checks_index = idx;
        s
    }

    /// The raft index of the last write (what Consul's raft stats call the last log index).
    pub fn raft_index(&self) -> u64 {
        self.index
    }

    fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    // ---- KV ----------------------------------------------------------------------------------

    /// The KV table index: the later of the `kvs` and `tombstones` tables (0 when empty).
    pub fn kv_table_index(&self) -> u64 {
        self.kvs_index.max(self.tombstones_index)
    }

    pub fn kv_get(&self, key: &str) -> Option<&KvRec> {
        self.kvs.get(key)
    }

    fn kv_range<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a KvRec)> {
        self.kvs
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The sub-index rule shared by recurse and keys (§3.2): the newest entry or tombstone under a
    /// non-empty prefix, else the table index.
    fn prefix_index(&self, prefix: &str, entries_max: u64) -> u64 {
        let sub = if prefix.is_empty() {
            self.kv_table_index()
        } else {
            let grave = self
                .tombstones
                .range::<str, _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, &i)| i)
                .max()
                .unwrap_or(0);
            entries_max.max(grave)
        };
        if sub != 0 { sub } else { self.kv_table_index() }
    }

    /// Entries under `prefix` (plain string prefix) in key order, and the query index.
    pub fn kv_list(&self, prefix: &str) -> (Vec<KvEntry>, u64) {
        let mut max = 0;
        let entries: Vec<KvEntry> = self
            .kv_range(prefix)
            .map(|(k, e)| {
                max = max.max(e.modify_index);
                e.to_wire(k)
            })
            .collect();
        (entries, self.prefix_index(prefix, max))
    }

    /// Key names under `prefix`, cut after the first `separator` past the prefix, and the index.
    pub fn kv_keys(&self, prefix: &str, separator: &str) -> (Vec<String>, u64) {
        let mut max = 0;
        let mut keys: Vec<String> = Vec::new();
        for (k, e) in self.kv_range(prefix) {
            max = max.max(e.modify_index);
            if !separator.is_empty()
                && let Some(pos) = k[prefix.len()..].find(separator)
            {
                let cut = &k[..prefix.len() + pos + separator.len()];
                // Consul only drops repeats of the previous key; keys are sorted, so that is all.
                if keys.last().map(String::as_str) != Some(cut) {
                    keys.push(cut.to_string());
                }
                continue;
            }
            keys.push(k.clone());
        }
        (keys, self.prefix_index(prefix, max))
    }

    /// Applies a KV PUT (§3.3). `Ok(false)` is a refused CAS/acquire/release; `Err` is a 500.
    pub fn kv_apply(
        &mut self,
        key: &str,
        op: KvOp,
        flags: u64,
        value: Bytes,
        now: Instant,
    ) -> Result<bool, String> {
        match op {
            KvOp::Set => {
                let session = self.kvs.get(key).and_then(|e| e.session.clone());
                self.kv_write(key, 0, flags, value, session);
                Ok(true)
            }
            KvOp::Cas(n) => {
                let ok = match self.kvs.get(key) {
                    None => n == 0,
                    Some(e) => n != 0 && e.modify_index == n,
                };
                if ok {
                    let session = self.kvs.get(key).and_then(|e| e.session.clone());
                    self.kv_write(key, 0, flags, value, session);
                }
                Ok(ok)
            }
            KvOp::Lock(s) => {
                // Lock-delay is enforced before anything else, whoever asks (§3.3 step 2).
                if let Some(&until) = self.lock_delays.get(key) {
                    if until > now {
                        return Ok(false);
                    }
                    self.lock_delays.remove(key);
                }
                if s.is_empty() {
                    return Err("raft apply failed: missing session".into());
                }
                if !self.sessions.contains_key(&s.to_ascii_lowercase()) {
                    return Err(format!("raft apply failed: invalid session {}", quote(&s)));
                }
                let lock_index = match self.kvs.get(key) {
                    None => 1,
                    Some(e) => match &e.session {
                        Some(holder) if *holder == s => e.lock_index,
                        Some(_) => return Ok(false),
                        None => e.lock_index + 1,
                    },
                };
                self.kv_write(key, lock_index, flags, value, Some(s));
                Ok(true)
            }
            KvOp::Unlock(s) => {
                if s.is_empty() {
                    return Err("raft apply failed: missing session".into());
                }
                let lock_index = match self.kvs.get(key) {
                    Some(e) if e.session.as_deref() == Some(s.as_str()) => e.lock_index,
                    _ => return Ok(false),
                };
                self.kv_write(key, lock_index, flags, value, None);
                Ok(true)
            }
        }
    }

    /// Creates or replaces an entry. An identical write is skipped entirely: no index, no wakeup
    /// (Consul ≥ 1.6).
    fn kv_write(
        &mut self,
        key: &str,
        lock_index: u64,
        flags: u64,
        value: Bytes,
        session: Option<String>,
    ) {
        let create_index = match self.kvs.get(key) {
            Some(e)
                if e.lock_index == lock_index
                    && e.flags == flags
                    && e.value == value
                    && e.session == session =>
            {
                return;
            }
            Some(e) => Some(e.create_index),
            None => None,
        };
        let idx = self.next_index();
        self.kvs.insert(
            key.to_string(),
            KvRec {
                lock_index,
                flags,
                value,
                session,
                create_index: create_index.unwrap_or(idx),
                modify_index: idx,
            },
        );
        self.kvs_index = idx;
        self.watches.touch_key(key);
    }

    /// DELETE of one key (§3.4). A CAS delete of a missing key answers true and writes nothing.
    pub fn kv_delete(&mut self, key: &str, cas: Option<u64>) -> bool {
        match (self.kvs.get(key), cas) {
            (None, _) => true,
            (Some(e), Some(n)) if e.modify_index != n => false,
            _ => {
                let idx = self.next_index();
                self.kv_delete_at(key, idx);
                true
            }
        }
    }

    fn kv_delete_at(&mut self, key: &str, idx: u64) {
        if self.kvs.remove(key).is_some() {
            self.tombstones.insert(key.to_string(), idx);
            self.tombstones_index = idx;
            self.kvs_index = idx;
            self.watches.touch_key(key);
        }
    }

    /// DELETE with `recurse`: everything under the string prefix, one tombstone for the prefix.
    pub fn kv_delete_tree(&mut self, prefix: &str) {
        let keys: Vec<String> = self.kv_range(prefix).map(|(k, _)| k.clone()).collect();
        if keys.is_empty() {
            return;
        }
        let idx = self.next_index();
        for k in &keys {
            self.kvs.remove(k);
            self.watches.touch_key(k);
        }
        if !prefix.is_empty() {
            self.tombstones.insert(prefix.to_string(), idx);
            self.tombstones_index = idx;
        }
        self.kvs_index = idx;
    }

    // ---- sessions ----------------------------------------------------------------------------

    pub fn sessions_index(&self) -> u64 {
        self.sessions_index
    }

    pub fn session_get(&self, id: &str) -> Option<&Session> {
        self.sessions.get(&id.to_ascii_lowercase())
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// Commits a session create (§2.1 step 5): the node must exist, and every bound check must
    /// exist and not be critical. Errors are the state store's texts, wrapped as modern Consul does.
    pub fn session_create(&mut self, spec: NewSession, now: Instant) -> Result<String, String> {
        if !spec.node.eq_ignore_ascii_case(&self.node) {
            return Err("apply failed: Missing node registration".into());
        }
        let probe = Session {
            id: String::new(),
            spec,
            create_index: 0,
            modify_index: 0,
            deadline: None,
        };
        for id in probe.bound_checks() {
            match self.checks.get(id) {
                None => return Err(format!("apply failed: Missing check '{id}' registration")),
                Some(c) if c.status == CRITICAL => {
                    return Err(format!("apply failed: Check '{id}' is in critical state"));
                }
                Some(_) => {}
            }
        }
        let id = loop {
            let id = uuid::Uuid::new_v4().to_string();
            if !self.sessions.contains_key(&id) {
                break id;
            }
        };
        let idx = self.next_index();
        let mut sess = probe;
        sess.id = id.clone();
        sess.create_index = idx;
        sess.modify_index = idx;
        self.sessions.insert(id.clone(), sess);
        self.sessions_index = idx;
        self.arm_session_timer(&id, now);
        self.watches.touch_sessions();
        Ok(id)
    }

    /// Re-arms the TTL timer (§2.3). Uses no index and changes nothing visible.
    pub fn session_renew(&mut self, id: &str, now: Instant) -> Option<&Session> {
        let key = id.to_ascii_lowercase();
        if !self.sessions.contains_key(&key) {
            return None;
        }
        self.arm_session_timer(&key, now);
        self.sessions.get(&key)
    }

    fn arm_session_timer(&mut self, key: &str, now: Instant) {
        let Some(sess) = self.sessions.get_mut(key) else {
            return;
        };
        let ttl = sess.spec.ttl_ns;
        if ttl <= 0 {
            return;
        }
        let deadline = now + Duration::from_nanos(ttl as u64) * SESSION_TTL_MULTIPLIER;
        let old = sess.deadline.replace(deadline);
        self.set_timer(old, deadline, Timer::Session(key.to_string()));
    }

    fn set_timer(&mut self, old: Option<Instant>, deadline: Instant, timer: Timer) {
        if let Some(old) = old {
            self.timers.remove(&(old, timer.clone()));
        }
        let earliest = self.timers.first().is_none_or(|(t, _)| deadline < *t);
        self.timers.insert((deadline, timer));
        if earliest {
            self.reaper.notify_one();
        }
    }

    /// Destroys a session; `false` if it did not exist (which callers still answer with `true`).
    pub fn session_destroy(&mut self, id: &str, now: Instant) -> bool {
        let key = id.to_ascii_lowercase();
        if !self.sessions.contains_key(&key) {
            return false;
        }
        let idx = self.next_index();
        self.invalidate_session(&key, idx, now);
        true
    }

    /// The one invalidation path (§2.5), shared by destroy, TTL expiry and check failure: delete
    /// the session, release or delete every key it holds at `idx`, and start the lock-delay.
    fn invalidate_session(&mut self, key: &str, idx: u64, now: Instant) {
        let Some(sess) = self.sessions.remove(key) else {
            return;
        };
        if let Some(d) = sess.deadline {
            self.timers.remove(&(d, Timer::Session(key.to_string())));
        }
        self.sessions_index = idx;
        let delay = sess.spec.lock_delay.min(MAX_LOCK_DELAY);
        let held: Vec<String> = self
            .kvs
            .iter()
            .filter(|(_, e)| e.session.as_deref() == Some(sess.id.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        for k in held {
            match sess.spec.behavior {
                Behavior::Release => {
                    if let Some(e) = self.kvs.get_mut(&k) {
                        e.session = None;
                        e.modify_index = idx;
                    }
                    self.kvs_index = idx;
                    self.watches.touch_key(&k);
                }
                Behavior::Delete => self.kv_delete_at(&k, idx),
            }
            if delay > 0 {
                self.lock_delays
                    .insert(k, now + Duration::from_nanos(delay as u64));
            }
        }
        self.watches.touch_sessions();
    }

    fn invalidate_sessions_bound_to(&mut self, check_id: &str, idx: u64, now: Instant) {
        let bound: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.bound_checks().any(|c| c == check_id))
            .map(|(k, _)| k.clone())
            .collect();
        for k in bound {
            self.invalidate_session(&k, idx, now);
        }
    }

    // ---- checks ------------------------------------------------------------------------------

    pub fn checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.values()
    }

    #[cfg(test)]
    pub fn check_get(&self, id: &str) -> Option<&Check> {
        self.checks.get(id)
    }

    /// Registers (or replaces) a TTL check. A critical status, the default, invalidates sessions
    /// bound to a check of the same ID in the same write (§5.4).
    pub fn check_register(&mut self, def: NewCheck, now: Instant) {
        let idx = self.next_index();
        let old = self.checks.remove(&def.id);
        let create_index = old.as_ref().map_or(idx, |c| c.create_index);
        let old_deadline = old.and_then(|c| c.deadline);
        let deadline = now + Duration::from_nanos(def.ttl as u64);
        let critical = def.status == CRITICAL;
        self.checks.insert(
            def.id.clone(),
            Check {
                id: def.id.clone(),
                name: def.name,
                status: def.status,
                notes: def.notes,
                output: String::new(),
                service_id: def.service_id,
                ttl: Some(def.ttl),
                create_index,
                modify_index: idx,
                deadline: Some(deadline),
            },
        );
        self.checks_index = idx;
        self.set_timer(old_deadline, deadline, Timer::Check(def.id.clone()));
        if critical {
            self.invalidate_sessions_bound_to(&def.id, idx, now);
        }
    }

    /// A TTL check update (pass/warn/fail/update): re-arms the TTL whatever the status.
    pub fn check_update(
        &mut self,
        id: &str,
        status: &str,
        output: &str,
        now: Instant,
    ) -> Result<(), String> {
        let (ttl, old_deadline) = match self.checks.get(id) {
            Some(c) if c.ttl.is_some() => (c.ttl.unwrap_or(0), c.deadline),
            _ => {
                return Err(format!(
                    "CheckID {} does not have associated TTL",
                    quote(id)
                ));
            }
        };
        let deadline = now + Duration::from_nanos(ttl as u64);
        if let Some(c) = self.checks.get_mut(id) {
            c.deadline = Some(deadline);
        }
        self.set_timer(old_deadline, deadline, Timer::Check(id.to_string()));
        self.set_check_status(id, status, output, now);
        Ok(())
    }

    fn set_check_status(&mut self, id: &str, status: &str, output: &str, now: Instant) {
        let Some(c) = self.checks.get(id) else {
            return;
        };
        if c.status == status && c.output == output {
            return;
        }
        let idx = self.next_index();
        if let Some(c) = self.checks.get_mut(id) {
            c.status = status.to_string();
            c.output = output.to_string();
            c.modify_index = idx;
        }
        self.checks_index = idx;
        if status == CRITICAL {
            self.invalidate_sessions_bound_to(id, idx, now);
        }
    }

    /// Removes an agent-owned check and invalidates the sessions bound to it. `false` when there is
    /// no such (agent-owned) check.
    pub fn check_deregister(&mut self, id: &str, now: Instant) -> bool {
        match self.checks.get(id) {
            Some(c) if c.ttl.is_some() => {}
            _ => return false,
        }
        let Some(c) = self.checks.remove(id) else {
            return false;
        };
        if let Some(d) = c.deadline {
            self.timers.remove(&(d, Timer::Check(id.to_string())));
        }
        let idx = self.next_index();
        self.checks_index = idx;
        self.invalidate_sessions_bound_to(id, idx, now);
        true
    }

    // ---- timers ------------------------------------------------------------------------------

    /// Fires every timer due at `now` and returns the next deadline.
    pub fn fire_due_timers(&mut self, now: Instant) -> Option<Instant> {
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let Some((_, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Session(key) => {
                    if let Some(s) = self.sessions.get_mut(&key) {
                        s.deadline = None;
                    }
                    let idx = self.next_index();
                    self.invalidate_session(&key, idx, now);
                }
                Timer::Check(id) => {
                    let Some(c) = self.checks.get_mut(&id) else {
                        continue;
                    };
                    c.deadline = None;
                    let output = if c.output.is_empty() {
                        "TTL expired".to_string()
                    } else {
                        format!(
                            "TTL expired (last output before timeout follows): {}",
                            c.output
                        )
                    };
                    self.set_check_status(&id, CRITICAL, &output, now);
                }
            }
        }
        self.timers.first().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new("n1", Arc::new(Notify::new()))
    }

    fn session(store: &mut Store, behavior: Behavior, lock_delay: i64, ttl_ns: i64) -> String {
        store
            .session_create(
                NewSession {
                    name: String::new(),
                    node: "n1".into(),
                    lock_delay,
                    behavior,
                    ttl: String::new(),
                    ttl_ns,
                    node_checks: Some(vec![SERF_CHECK_ID.into()]),
                    service_checks: None,
                    checks: vec![],
                },
                Instant::now(),
            )
            .unwrap()
    }

    fn put(s: &mut Store, key: &str, op: KvOp, v: &str) -> Result<bool, String> {
        s.kv_apply(key, op, 0, Bytes::from(v.to_string()), Instant::now())
    }

    #[test]
    fn empty_store_reports_zero_for_http_to_raise() {
        let s = store();
        assert_eq!(s.kv_table_index(), 0);
        assert_eq!(s.kv_list("").1, 0);
    }

    #[test]
    fn identical_set_takes_no_index() {
        let mut s = store();
        put(&mut s, "a", KvOp::Set, "x").unwrap();
        let m = s.kv_get("a").unwrap().modify_index;
        put(&mut s, "a", KvOp::Set, "x").unwrap();
        assert_eq!(s.kv_get("a").unwrap().modify_index, m);
        put(&mut s, "a", KvOp::Set, "y").unwrap();
        assert!(s.kv_get("a").unwrap().modify_index > m);
        assert_eq!(s.kv_get("a").unwrap().create_index, m);
    }

    #[test]
    fn lock_index_counts_new_acquisitions() {
        let mut s = store();
        let a = session(&mut s, Behavior::Release, 0, 0);
        let b = session(&mut s, Behavior::Release, 0, 0);
        assert_eq!(put(&mut s, "L", KvOp::Lock(a.clone()), "v1"), Ok(true));
        assert_eq!(put(&mut s, "L", KvOp::Lock(a.clone()), "v2"), Ok(true));
        assert_eq!(s.kv_get("L").unwrap().lock_index, 1);
        assert_eq!(put(&mut s, "L", KvOp::Lock(b.clone()), "v"), Ok(false));
        assert_eq!(put(&mut s, "L", KvOp::Unlock(b.clone()), "v"), Ok(false));
        assert_eq!(put(&mut s, "L", KvOp::Unlock(a.clone()), "v2"), Ok(true));
        assert_eq!(put(&mut s, "L", KvOp::Lock(b.clone()), "v"), Ok(true));
        assert_eq!(s.kv_get("L").unwrap().lock_index, 2);
        // A plain set keeps the holder but resets LockIndex.
        put(&mut s, "L", KvOp::Set, "w").unwrap();
        let e = s.kv_get("L").unwrap();
        assert_eq!(e.session.as_deref(), Some(b.as_str()));
        assert_eq!(e.lock_index, 0);
        assert!(put(&mut s, "L", KvOp::Lock(String::new()), "").is_err());
        assert_eq!(
            put(&mut s, "L", KvOp::Lock("nope".into()), ""),
            Err("raft apply failed: invalid session \"nope\"".into())
        );
    }

    #[test]
    fn destroy_releases_and_sets_capped_lock_delay() {
        let mut s = store();
        let a = session(&mut s, Behavior::Release, 3600 * SECOND, 0);
        put(&mut s, "L", KvOp::Lock(a.clone()), "v").unwrap();
        let before = s.kv_get("L").unwrap().modify_index;
        let now = Instant::now();
        assert!(s.session_destroy(&a.to_uppercase(), now));
        let e = s.kv_get("L").unwrap();
        assert_eq!(e.session, None);
        assert_eq!(e.lock_index, 1);
        assert!(e.modify_index > before);
        let until = s.lock_delays["L"];
        assert_eq!(until - now, Duration::from_secs(60));
        let b = session(&mut s, Behavior::Release, 0, 0);
        assert_eq!(
            s.kv_apply("L", KvOp::Lock(b.clone()), 0, Bytes::new(), now),
            Ok(false)
        );
        assert_eq!(
            s.kv_apply("L", KvOp::Lock(b), 0, Bytes::new(), until),
            Ok(true)
        );
    }

    #[test]
    fn delete_behaviour_deletes_with_tombstone() {
        let mut s = store();
        let a = session(&mut s, Behavior::Delete, 0, 0);
        put(&mut s, "D", KvOp::Lock(a.clone()), "v").unwrap();
        s.session_destroy(&a, Instant::now());
        assert!(s.kv_get("D").is_none());
        assert!(s.lock_delays.is_empty());
        assert_eq!(s.kv_table_index(), s.index);
    }

    #[test]
    fn session_ttl_expires_at_twice_ttl() {
        let mut s = store();
        let t0 = Instant::now();
        let a = s
            .session_create(
                NewSession {
                    name: String::new(),
                    node: "N1".into(),
                    lock_delay: 0,
                    behavior: Behavior::Release,
                    ttl: "10s".into(),
                    ttl_ns: 10 * SECOND,
                    node_checks: None,
                    service_checks: None,
                    checks: vec![],
                },
                t0,
            )
            .unwrap();
        let next = s.fire_due_timers(t0 + Duration::from_secs(15));
        assert_eq!(next, Some(t0 + Duration::from_secs(20)));
        assert!(s.session_get(&a).is_some());
        s.fire_due_timers(t0 + Duration::from_secs(20));
        assert!(s.session_get(&a).is_none());
    }

    #[test]
    fn session_create_checks_rules() {
        let mut s = store();
        let mut spec = NewSession {
            name: String::new(),
            node: "ghost".into(),
            lock_delay: 0,
            behavior: Behavior::Release,
            ttl: String::new(),
            ttl_ns: 0,
            node_checks: Some(vec!["serfHealth".into(), "c1".into()]),
            service_checks: None,
            checks: vec![],
        };
        let now = Instant::now();
        assert_eq!(
            s.session_create(spec.clone(), now),
            Err("apply failed: Missing node registration".into())
        );
        spec.node = "n1".into();
        assert_eq!(
            s.session_create(spec.clone(), now),
            Err("apply failed: Missing check 'c1' registration".into())
        );
        let def = NewCheck {
            id: "c1".into(),
            name: "c1".into(),
            status: CRITICAL.into(),
            notes: String::new(),
            service_id: String::new(),
            ttl: 5 * SECOND,
        };
        s.check_register(def, now);
        assert_eq!(
            s.session_create(spec.clone(), now),
            Err("apply failed: Check 'c1' is in critical state".into())
        );
        s.check_update("c1", PASSING, "", now).unwrap();
        let id = s.session_create(spec, now).unwrap();
        s.check_update("c1", WARNING, "", now).unwrap();
        assert!(s.session_get(&id).is_some());
        // The TTL check expires exactly TTL after its last update and takes the session with it.
        s.fire_due_timers(now + Duration::from_secs(5));
        assert!(s.session_get(&id).is_none());
        let c = s.check_get("c1").unwrap();
        assert_eq!(c.status, CRITICAL);
        assert_eq!(c.output, "TTL expired");
    }

    #[test]
    fn session_json_matches_wire_shape() {
        let mut s = store();
        let id = session(&mut s, Behavior::Delete, 15 * SECOND, 0);
        let sess = s.session_get(&id).unwrap();
        let ours = serde_json::to_string(&sess.to_json()).unwrap();
        let wire = crate::wire::SessionEntry {
            id: id.clone(),
            name: String::new(),
            node: "n1".into(),
            lock_delay: 15_000_000_000,
            behavior: "delete".into(),
            ttl: String::new(),
            node_checks: Some(vec![SERF_CHECK_ID.into()]),
            service_checks: None,
            checks: vec![],
            create_index: sess.create_index,
            modify_index: sess.modify_index,
        };
        assert_eq!(ours, serde_json::to_string(&wire).unwrap());
    }

    #[test]
    fn keys_with_separator() {
        let mut s = store();
        for k in [
            "foo/bar/baz",
            "foo/bar/zip",
            "foo/bar/zip/zam",
            "foo/bar/zip/zorp",
        ] {
            put(&mut s, k, KvOp::Set, "x").unwrap();
        }
        let (keys, _) = s.kv_keys("foo/bar/", "/");
        assert_eq!(keys, ["foo/bar/baz", "foo/bar/zip", "foo/bar/zip/"]);
    }

    #[test]
    fn tombstones_keep_prefix_index_from_going_back() {
        let mut s = store();
        put(&mut s, "p/a", KvOp::Set, "x").unwrap();
        put(&mut s, "p/b", KvOp::Set, "x").unwrap();
        assert!(s.kv_delete("p/b", None));
        let (entries, idx) = s.kv_list("p/");
        assert_eq!(entries.len(), 1);
        assert_eq!(idx, s.index);
        assert!(s.kv_delete("p/a", Some(999)).eq(&false));
        assert!(s.kv_delete("missing", Some(5)));
    }
}
