//! Targeted wakeups for blocking queries.
//!
//! A blocked query registers interest in exactly what it reads (one key, one key prefix, or the
//! sessions table) while it still holds the store lock, and enables its `Notified` before the lock
//! is released, so a write that lands in between cannot be missed. Writers wake only the
//! registrations that their change touches: a write to `a/b` looks up the key `a/b` and the
//! prefixes `""`, `a`, `a/`, `a/b` — a handful of hash lookups, whatever the number of blocked
//! queries. Nothing is broadcast to every waiter, so a thousand idle watchers cost nothing per
//! write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Agent;
use super::gofmt::{GoDuration, MINUTE};
use super::http::QueryOpts;
use super::state::Store;

/// Consul's `default_query_time` and `max_query_time`.
const DEFAULT_WAIT: GoDuration = 5 * MINUTE;
const MAX_WAIT: GoDuration = 10 * MINUTE;
/// Consul's `JitterFraction`: up to wait/16 is added so that many watchers do not return together.
const JITTER_FRACTION: u64 = 16;

/// What a blocking query waits on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WatchSpec {
    /// One KV key (single-key GET, including a missing key).
    Key(String),
    /// Every key with this string prefix (recurse and keys listings).
    Prefix(String),
    /// The sessions table (session info, list, node).
    Sessions,
}

struct Entry {
    notify: Arc<Notify>,
    users: usize,
}

/// The registrations, kept inside the store so that registering and writing are ordered by the
/// store lock.
pub struct Watches {
    keys: HashMap<String, Entry>,
    prefixes: HashMap<String, Entry>,
    sessions: Arc<Notify>,
}

impl Default for Watches {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            prefixes: HashMap::new(),
            sessions: Arc::new(Notify::new()),
        }
    }
}

impl Watches {
    /// Registers one more user of `spec` and returns the `Notify` to wait on. Pair every call with
    /// [`Watches::unregister`].
    pub fn register(&mut self, spec: &WatchSpec) -> Arc<Notify> {
        let map = match spec {
            WatchSpec::Key(k) => (&mut self.keys, k),
            WatchSpec::Prefix(p) => (&mut self.prefixes, p),
            WatchSpec::Sessions => return self.sessions.clone(),
        };
        let entry = map.0.entry(map.1.clone()).or_insert_with(|| Entry {
            notify: Arc::new(Notify::new()),
            users: 0,
        });
        entry.users += 1;
        entry.notify.clone()
    }

    /// Drops one user of `spec`; the entry goes away with its last user so the maps stay as small
    /// as the set of currently blocked queries.
    pub fn unregister(&mut self, spec: &WatchSpec) {
        let (map, k) = match spec {
            WatchSpec::Key(k) => (&mut self.keys, k),
            WatchSpec::Prefix(p) => (&mut self.prefixes, p),
            WatchSpec::Sessions => return,
        };
        if let Some(e) = map.get_mut(k) {
            e.users -= 1;
            if e.users == 0 {
                map.remove(k);
            }
        }
    }

    /// Wakes everything that watches `key`: the key itself and every registered prefix of it.
    pub fn touch_key(&self, key: &str) {
        if let Some(e) = self.keys.get(key) {
            e.notify.notify_waiters();
        }
        if self.prefixes.is_empty() {
            return;
        }
        for (i, _) in key.char_indices().chain(std::iter::once((key.len(), ' '))) {
            if let Some(e) = self.prefixes.get(&key[..i]) {
                e.notify.notify_waiters();
            }
        }
    }

    /// Wakes everything that reads the sessions table.
    pub fn touch_sessions(&self) {
        self.sessions.notify_waiters();
    }

    #[cfg(test)]
    pub fn registered(&self) -> usize {
        self.keys.len() + self.prefixes.len()
    }
}

/// The wait a blocking query really gets (§4.2): absent or ≤ 0 means five minutes, more than ten
/// minutes is cut to ten, then jitter in `[0, wait/16)` is added.
pub fn effective_wait(wait: GoDuration) -> Duration {
    let w = if wait <= 0 {
        DEFAULT_WAIT
    } else {
        wait.min(MAX_WAIT)
    } as u64;
    let span = w / JITTER_FRACTION;
    let jitter = if span == 0 {
        0
    } else {
        rand::rng().random_range(0..span)
    };
    Duration::from_nanos(w + jitter)
}

/// One run of a query under the store lock: the answer, its raw index, and whether it is a
/// "not found" in the sense of §4.3.
pub struct Answer<T> {
    pub value: T,
    pub index: u64,
    pub not_found: bool,
}

/// Keeps a watch registered while a query blocks, and takes it out however the query ends
/// (answer, timeout, or the client going away and the future being dropped).
struct Registration {
    agent: Arc<Agent>,
    spec: WatchSpec,
    notify: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.agent.store().watches.unregister(&self.spec);
    }
}

/// Consul's blocking-query loop (§4.3). `run` is evaluated under the store lock; the returned
/// index is at least 1.
pub async fn blocking_query<T>(
    agent: &Arc<Agent>,
    opts: QueryOpts,
    spec: WatchSpec,
    mut run: impl FnMut(&Store) -> Answer<T>,
) -> (T, u64) {
    if opts.index == 0 {
        let a = run(&agent.store());
        return (a.value, a.index.max(1));
    }
    let deadline = Instant::now() + effective_wait(opts.wait);
    let mut min_index = opts.index;
    let mut not_found_seen = false;
    let mut registration: Option<Registration> = None;
    loop {
        // The locked section is a plain block so that no guard lives across an await.
        let mut notified = {
            let mut store = agent.store();
            let a = run(&store);
            let index = a.index.max(1);
            if a.not_found {
                // Still missing after a wakeup: other writes moved the table index, but this
                // item did not change, so they do not count.
                if not_found_seen {
                    min_index = index;
                }
                not_found_seen = true;
            }
            if index > min_index {
                drop(store);
                return (a.value, index);
            }
            let notify = match &registration {
                Some(r) => r.notify.clone(),
                None => {
                    let notify = store.watches.register(&spec);
                    registration = Some(Registration {
                        agent: agent.clone(),
                        spec: spec.clone(),
                        notify: notify.clone(),
                    });
                    notify
                }
            };
            // Enabled while the lock is held: any write after we unlock is sure to wake us.
            let mut notified = Box::pin(notify.notified_owned());
            notified.as_mut().enable();
            notified
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {
                let a = run(&agent.store());
                return (a.value, a.index.max(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_only_matching_watchers() {
        let mut w = Watches::default();
        let key = w.register(&WatchSpec::Key("a/b".into()));
        let other = w.register(&WatchSpec::Key("a/c".into()));
        let prefix = w.register(&WatchSpec::Prefix("a/".into()));
        let k = key.notified();
        let o = other.notified();
        let p = prefix.notified();
        tokio::pin!(k, o, p);
        k.as_mut().enable();
        o.as_mut().enable();
        p.as_mut().enable();
        w.touch_key("a/b");
        let waker = futures_noop();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(k.as_mut().poll(&mut cx).is_ready());
        assert!(p.as_mut().poll(&mut cx).is_ready());
        assert!(o.as_mut().poll(&mut cx).is_pending());
        w.unregister(&WatchSpec::Key("a/b".into()));
        w.unregister(&WatchSpec::Key("a/c".into()));
        w.unregister(&WatchSpec::Prefix("a/".into()));
        assert_eq!(w.registered(), 0);
    }

    fn futures_noop() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }

    #[test]
    fn wait_is_clamped_with_bounded_jitter() {
        use super::super::gofmt::SECOND;
        for _ in 0..100 {
            let w = effective_wait(2 * SECOND);
            assert!(w >= Duration::from_secs(2) && w < Duration::from_millis(2125));
            let w = effective_wait(0);
            assert!(w >= Duration::from_secs(300) && w < Duration::from_millis(318_750));
            let w = effective_wait(3600 * SECOND);
            assert!(w >= Duration::from_secs(600) && w < Duration::from_millis(637_500));
        }
    }

    use std::future::Future;
}
