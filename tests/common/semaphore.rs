//! Raw-HTTP helpers for semaphore tests (`run --limit N`): reading a prefix the way
//! `api.Semaphore` lays it out, leaving `.lock` clean, and a contender that behaves as Go's
//! `api.Semaphore` (and so `consul lock -n`) does, step for step, to check interoperation.

use base64::Engine;
use serde_json::{Value, json};

use super::DevAgent;

/// `api.SemaphoreFlagValue`.
pub const SEMAPHORE_FLAGS: u64 = 16210313421097356768;

fn decode(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

/// The entries under `<prefix><name>/` (empty when there are none).
pub async fn listing(agent: &DevAgent, name: &str) -> Vec<Value> {
    let r = agent
        .get(&format!("{}/?recurse", agent.kv_path(name)))
        .await;
    match r.status {
        404 => Vec::new(),
        200 => r.json().as_array().cloned().unwrap_or_default(),
        s => panic!("listing {name}/ answered {s}: {}", r.text()),
    }
}

/// `<name>/.lock`: its raw value bytes, the value parsed, its ModifyIndex and flags.
pub struct LockKey {
    pub raw: Vec<u8>,
    pub value: Value,
    pub modify_index: u64,
    pub flags: u64,
}

impl LockKey {
    /// The sessions in `Holders`, sorted.
    pub fn holders(&self) -> Vec<String> {
        let mut h: Vec<String> = self.value["Holders"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        h.sort();
        h
    }

    /// consul-leader's record of holder `session`, if any.
    pub fn record(&self, session: &str) -> Option<&Value> {
        self.value["ConsulLeader"]["holders"].get(session)
    }
}

pub async fn lock_key(agent: &DevAgent, name: &str) -> Option<LockKey> {
    let e = agent.kv_entry(&format!("{name}/.lock")).await?;
    let raw = decode(&e["Value"]);
    Some(LockKey {
        value: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
        modify_index: e["ModifyIndex"].as_u64().unwrap(),
        flags: e["Flags"].as_u64().unwrap(),
    })
}

/// Sessions holding their own contender key `<name>/<session>`.
pub async fn live_contenders(agent: &DevAgent, name: &str) -> Vec<String> {
    let dir = format!("{}/", agent.key(name));
    listing(agent, name)
        .await
        .iter()
        .filter_map(|e| {
            let key = e["Key"].as_str()?;
            let session = e["Session"].as_str()?;
            (key.strip_prefix(&dir) == Some(session)).then(|| session.to_string())
        })
        .collect()
}

/// Creates `<name>/.lock` with `limit` and no holder, as consul-leader leaves it after clean
/// releases: its free slots owe no wait. Tests whose subject is not the first run on a new prefix
/// use it (a new prefix owes max(silence, TTL), since nothing tells what ran before).
pub async fn clean_semaphore(agent: &DevAgent, name: &str, limit: u32) {
    let value = json!({"Limit": limit, "Holders": {}, "ConsulLeader": {"holders": {}}});
    let path = format!(
        "{}?cas=0&flags={SEMAPHORE_FLAGS}",
        agent.kv_path(&format!("{name}/.lock"))
    );
    assert!(
        agent.put(&path, value.to_string()).await.expect_bool(),
        "create {name}/.lock"
    );
}

/// `semaphoreLock` encoded as Go's `json.Marshal` does: `Limit`, then `Holders` with sorted keys;
/// nothing else (Go drops fields it does not know).
fn go_encode(limit: i64, holders: &[String]) -> String {
    let mut holders = holders.to_vec();
    holders.sort();
    let inner: Vec<String> = holders.iter().map(|h| format!("\"{h}\":true")).collect();
    format!("{{\"Limit\":{limit},\"Holders\":{{{}}}}}", inner.join(","))
}

/// What `api.Semaphore.Acquire` does, without waiting: a session with Behavior `delete`, the
/// contender key with the semaphore flags, then one check-and-set on `.lock` adding itself after
/// pruning holders whose keys are gone (Go prunes every one of them). Returns the session when it
/// got a slot, `None` when the semaphore is full.
pub async fn go_acquire(agent: &DevAgent, name: &str, limit: i64) -> Option<String> {
    let session = agent
        .create_session(json!({
            "Name": "Consul API Semaphore",
            "TTL": "60s",
            "Behavior": "delete",
            "LockDelay": "0s",
        }))
        .await;
    let path = format!(
        "{}?acquire={session}&flags={SEMAPHORE_FLAGS}",
        agent.kv_path(&format!("{name}/{session}"))
    );
    assert!(agent.put(&path, Vec::new()).await.expect_bool());
    loop {
        let lock = lock_key(agent, name).await;
        let (cas, mut holders) = match &lock {
            None => (0, Vec::new()),
            Some(l) => {
                assert_eq!(
                    l.flags, SEMAPHORE_FLAGS,
                    "Existing key does not match semaphore use"
                );
                assert_eq!(l.value["Limit"], json!(limit), "semaphore limit conflict");
                (l.modify_index, l.holders())
            }
        };
        let alive = live_contenders(agent, name).await;
        holders.retain(|h| alive.contains(h));
        if holders.len() as i64 >= limit {
            agent.destroy_session(&session).await;
            return None;
        }
        holders.push(session.clone());
        let path = format!(
            "{}?cas={cas}&flags={SEMAPHORE_FLAGS}",
            agent.kv_path(&format!("{name}/.lock"))
        );
        if agent
            .put(&path, go_encode(limit, &holders))
            .await
            .expect_bool()
        {
            return Some(session);
        }
    }
}

/// What `api.Semaphore.Release` does, then the session's end: remove itself from `Holders` by
/// check-and-set (in Go's encoding, which drops consul-leader's field), delete its contender key,
/// destroy the session.
pub async fn go_release(agent: &DevAgent, name: &str, session: &str) {
    loop {
        let l = lock_key(agent, name).await.expect(".lock exists");
        let limit = l.value["Limit"].as_i64().unwrap();
        let holders: Vec<String> = l.holders().into_iter().filter(|h| h != session).collect();
        let path = format!(
            "{}?cas={}&flags={SEMAPHORE_FLAGS}",
            agent.kv_path(&format!("{name}/.lock")),
            l.modify_index
        );
        if agent
            .put(&path, go_encode(limit, &holders))
            .await
            .expect_bool()
        {
            break;
        }
    }
    agent
        .delete(&agent.kv_path(&format!("{name}/{session}")))
        .await
        .expect_status(200);
    agent.destroy_session(session).await;
}
