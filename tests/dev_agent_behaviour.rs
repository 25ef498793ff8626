//! Behaviour of `consul-leader dev-agent` beyond the §10 checklist of `../shared/consul-api.md`:
//! blocking queries under load and on sessions, TTL timers and renew, lock-delay after each kind
//! of invalidation, sessions bound to checks, ACL token handling, the binary's own start and stop,
//! and the finer points of the HTTP and KV sections. Every expectation cites the spec section it
//! comes from; where the spec hedges, only what it states clearly is asserted.
//!
//! Run against a real agent with `CONSUL_LEADER_TEST_ADDR=host:port`; tests that need
//! dev-agent-only options (a lowered session TTL minimum, an ACL token) then skip with a note.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// "At once": a woken or immediate request must answer well within this, even on a busy machine.
const PROMPT: Duration = Duration::from_secs(5);

/// Generous deadline for an asynchronous effect (a check synced to the catalog, a timer firing).
const EVENTUALLY: Duration = Duration::from_secs(15);

fn spawn_get(http: &Http, path: String) -> tokio::task::JoinHandle<Resp> {
    let http = http.clone();
    tokio::spawn(async move { http.get(&path).await })
}

/// Registers a TTL check that starts `passing`, so sessions can bind to it at once.
async fn passing_check(a: &DevAgent, base: &str, ttl: &str) -> String {
    let id = a.name(base);
    a.register_check(json!({"Name": id, "TTL": ttl, "Status": "passing"}))
        .await;
    id
}

async fn deregister_check(a: &DevAgent, id: &str) {
    a.put(&format!("/v1/agent/check/deregister/{id}"), Vec::new())
        .await;
}

// ---------------------------------------------------------------------------------------------
// Blocking queries (§4.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn blocking_get_with_stale_index_on_existing_key_is_immediate() {
    let a = DevAgent::start();
    a.kv_put("a", b"v1").await;
    let old = a.get(&a.kv_path("a")).await.index();
    a.kv_put("a", b"v2").await;
    let r = a
        .get(&format!("{}?index={old}&wait=30s", a.kv_path("a")))
        .await
        .expect_status(200);
    assert!(r.elapsed < PROMPT, "took {:?}", r.elapsed);
    assert!(r.index() > old);
    assert_eq!(r.json()[0]["Value"], json!(b64(b"v2")));
}

#[tokio::test]
async fn blocking_get_wakes_on_delete_with_404() {
    let a = DevAgent::start();
    a.kv_put("a", b"v").await;
    let i = a.get(&a.kv_path("a")).await.index();
    let mut blocked = spawn_get(a.http(), format!("{}?index={i}&wait=30s", a.kv_path("a")));
    assert_pending("blocking GET", &mut blocked, Duration::from_millis(500)).await;
    assert!(a.delete(&a.kv_path("a")).await.expect_bool());
    let r = join_within("blocking GET after delete", blocked, PROMPT).await;
    let r = r.expect_status(404);
    assert!(
        r.index() > i,
        "a deleted key reports the (higher) table index"
    );
}

#[tokio::test]
async fn blocking_identical_put_does_not_wake() {
    // Since 1.6 an identical set writes nothing and wakes no watcher (§3.3).
    let a = DevAgent::start();
    a.kv_put("a", b"same").await;
    let i = a.get(&a.kv_path("a")).await.index();
    let mut blocked = spawn_get(a.http(), format!("{}?index={i}&wait=30s", a.kv_path("a")));
    assert_pending("blocking GET", &mut blocked, Duration::from_millis(500)).await;
    a.kv_put("a", b"same").await;
    assert_pending(
        "after an identical PUT",
        &mut blocked,
        Duration::from_secs(1),
    )
    .await;
    a.kv_put("a", b"changed").await;
    let r = join_within("after a real change", blocked, PROMPT).await;
    assert_eq!(
        r.expect_status(200).json()[0]["Value"],
        json!(b64(b"changed"))
    );
}

#[tokio::test]
async fn blocking_recurse_ignores_writes_outside_prefix() {
    // A non-empty prefix's index is the largest ModifyIndex/tombstone under it (§3.2), so a
    // write elsewhere does not raise it and the query keeps waiting.
    let a = DevAgent::start();
    a.kv_put("dir/x", b"1").await;
    let i = a
        .get(&format!("{}?recurse", a.kv_path("dir/")))
        .await
        .expect_status(200)
        .index();
    let mut blocked = spawn_get(
        a.http(),
        format!("{}?recurse&index={i}&wait=30s", a.kv_path("dir/")),
    );
    assert_pending("blocking recurse", &mut blocked, Duration::from_millis(500)).await;
    a.kv_put("elsewhere", b"2").await;
    assert_pending(
        "after a write outside the prefix",
        &mut blocked,
        Duration::from_secs(1),
    )
    .await;
    a.kv_put("dir/y", b"3").await;
    let r = join_within("after a write under the prefix", blocked, PROMPT).await;
    let v = r.expect_status(200).json();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
}

#[tokio::test]
async fn blocking_200_readers_on_one_key_all_wake_on_one_write() {
    const READERS: usize = 200;
    let a = DevAgent::start();
    a.kv_put("hot", b"v1").await;
    let i = a.get(&a.kv_path("hot")).await.index();
    let path = format!("{}?index={i}&wait=60s", a.kv_path("hot"));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..READERS {
        let http = a.http().clone();
        let path = path.clone();
        set.spawn(async move { http.get(&path).await });
    }
    // Only confirms that the readers are blocked; the wake-up itself is awaited below.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(set.len(), READERS);
    if let Some(Ok(r)) = set.try_join_next() {
        panic!(
            "a reader returned before the write: {} {}",
            r.status,
            r.text()
        );
    }

    let wrote = Instant::now();
    a.kv_put("hot", b"v2").await;
    let mut woken = 0;
    let deadline = Duration::from_secs(20);
    while let Some(res) =
        tokio::time::timeout(deadline.saturating_sub(wrote.elapsed()), set.join_next())
            .await
            .unwrap_or_else(|_| {
                panic!("only {woken} of {READERS} readers woke within {deadline:?}")
            })
    {
        let r = res.expect("reader task").expect_status(200);
        assert!(r.index() > i);
        assert_eq!(r.json()[0]["Value"], json!(b64(b"v2")));
        woken += 1;
    }
    assert_eq!(woken, READERS);
    eprintln!(
        "{READERS} readers woke within {:?} of the write",
        wrote.elapsed()
    );
}

#[tokio::test]
async fn blocking_session_info_on_missing_session_ignores_other_sessions() {
    if DevAgent::is_real() {
        // Parallel tests move the shared sessions table index, so the index this test starts
        // from may already be stale when its blocking request arrives (an immediate answer).
        return skip(
            "blocking_session_info_on_missing_session_ignores_other_sessions",
            "needs a sessions table no other test writes to",
        );
    }
    // §2.4/§4.3: info on a missing session reports "not found", so it waits for that session
    // itself; other session writes do not release it. At the deadline it answers 200 [].
    let a = DevAgent::start();
    a.create_session(json!({})).await;
    let missing = uuid::Uuid::new_v4().to_string();
    let r = a
        .get(&format!("/v1/session/info/{missing}"))
        .await
        .expect_status(200);
    let i = r.index();
    let mut blocked = spawn_get(
        a.http(),
        format!("/v1/session/info/{missing}?index={i}&wait=6s"),
    );
    assert_pending("blocking info", &mut blocked, Duration::from_secs(1)).await;
    a.create_session(json!({})).await;
    assert_pending(
        "after another session was created",
        &mut blocked,
        Duration::from_millis(1500),
    )
    .await;
    let r = join_within(
        "blocking info until its wait ran out",
        blocked,
        Duration::from_secs(30),
    )
    .await;
    let r = r.expect_status(200);
    assert_eq!(r.json(), json!([]));
    assert!(r.index() >= i);
    assert!(
        r.elapsed >= Duration::from_millis(5900),
        "returned after {:?}",
        r.elapsed
    );
}

#[tokio::test]
async fn blocking_session_info_wakes_on_destroy() {
    if DevAgent::is_real() {
        // Both use the sessions table index (§2.4), which every parallel test moves.
        return skip(
            "blocking_session_info_wakes_on_destroy",
            "needs a sessions table no other test writes to",
        );
    }
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    let i = a.get(&format!("/v1/session/info/{s}")).await.index();
    let mut blocked = spawn_get(a.http(), format!("/v1/session/info/{s}?index={i}&wait=30s"));
    assert_pending("blocking info", &mut blocked, Duration::from_millis(500)).await;
    a.destroy_session(&s).await;
    let r = join_within("blocking info after destroy", blocked, PROMPT).await;
    let r = r.expect_status(200);
    assert_eq!(r.json(), json!([]));
    assert!(r.index() > i);
}

#[tokio::test]
async fn blocking_session_list_wakes_on_create() {
    if DevAgent::is_real() {
        // Both use the sessions table index (§2.4), which every parallel test moves.
        return skip(
            "blocking_session_list_wakes_on_create",
            "needs a sessions table no other test writes to",
        );
    }
    let a = DevAgent::start();
    let i = a.get("/v1/session/list").await.expect_status(200).index();
    let mut blocked = spawn_get(a.http(), format!("/v1/session/list?index={i}&wait=30s"));
    assert_pending("blocking list", &mut blocked, Duration::from_millis(500)).await;
    let s = a.create_session(json!({})).await;
    let r = join_within("blocking list after create", blocked, PROMPT).await;
    let r = r.expect_status(200);
    assert!(r.index() > i);
    let v = r.json();
    assert!(
        v.as_array().unwrap().iter().any(|e| e["ID"] == json!(s)),
        "{v}"
    );
}

// ---------------------------------------------------------------------------------------------
// Session TTL (§2.2, §2.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ttl_renew_rearms_the_timer() {
    let Some(a) = DevAgent::builder().ttl_min("1s").start() else {
        return;
    };
    // TTL 2s: the session lives 4s after its last renew. Renew every 500 ms for 10 s, well past
    // 2×TTL, the way a client's renew loop does; the interval paces the client, it waits on no
    // condition.
    let s = a.create_session(json!({"TTL": "2s"})).await;
    assert!(a.acquire("K", &s, b"v").await);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while started.elapsed() < Duration::from_secs(10) {
        tick.tick().await;
        let r = a
            .put(&format!("/v1/session/renew/{s}"), Vec::new())
            .await
            .expect_status(200);
        assert_eq!(r.json()[0]["ID"], json!(s));
    }
    assert!(
        a.session_info(&s).await.is_some(),
        "renewed session expired"
    );
    assert_eq!(a.kv_entry("K").await.unwrap()["Session"], json!(s));

    // Left alone now, it expires.
    let last_renew = Instant::now();
    wait_until(
        "the session expires once renews stop",
        Duration::from_secs(4 + 10),
        || async { a.session_info(&s).await.is_none() },
    )
    .await;
    assert!(last_renew.elapsed() + Duration::from_millis(100) >= Duration::from_secs(2));
    let r = a
        .put(&format!("/v1/session/renew/{s}"), Vec::new())
        .await
        .expect_status(404);
    assert_body_starts(&r, "Session id '");
}

#[tokio::test]
async fn ttl_expiry_releases_lock_wakes_holder_watch_and_applies_lock_delay() {
    let Some(a) = DevAgent::builder().ttl_min("1s").start() else {
        return;
    };
    let s = a
        .create_session(json!({"TTL": "1s", "LockDelay": "3s"}))
        .await;
    let s2 = a.create_session(json!({})).await;
    // The invalidation cannot precede the acquire: a sound lower bound for the lock-delay.
    let before_acquire = Instant::now();
    assert!(a.acquire("K", &s, b"v").await);
    let mi = a.get(&a.kv_path("K")).await.index();
    // A holder's monitor: a consistent blocking read, woken by the invalidation (§8 monitorLock).
    let watch = spawn_get(
        a.http(),
        format!("{}?consistent&index={mi}&wait=60s", a.kv_path("K")),
    );
    let lower = wait_unlocked(&a, "K", before_acquire, EVENTUALLY).await;
    let r = join_within("the holder's watch after expiry", watch, PROMPT).await;
    assert!(absent(&r.expect_status(200).json()[0], "Session"));
    assert!(a.session_info(&s).await.is_none());
    assert_lock_delay(&a, "K", &s2, Duration::from_secs(3), lower).await;
}

#[tokio::test]
async fn ttl_expiry_with_behavior_delete_deletes_the_key() {
    let Some(a) = DevAgent::builder().ttl_min("1s").start() else {
        return;
    };
    let s = a
        .create_session(json!({"TTL": "1s", "Behavior": "delete"}))
        .await;
    assert!(a.acquire("K", &s, b"v").await);
    wait_until("the key is deleted", EVENTUALLY, || async {
        a.kv_entry("K").await.is_none()
    })
    .await;
    assert!(a.session_info(&s).await.is_none());
}

#[tokio::test]
async fn ttl_min_flag_sets_the_lower_bound() {
    let Some(a) = DevAgent::builder().ttl_min("1s").start() else {
        return;
    };
    a.create_session(json!({"TTL": "1s"})).await;
    let r = a
        .put("/v1/session/create", json!({"TTL": "999ms"}).to_string())
        .await
        .expect_status(500);
    assert_body_contains(&r, "Invalid Session TTL");
}

// ---------------------------------------------------------------------------------------------
// Lock-delay (§2.5, §3.5)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn lock_delay_zero_allows_immediate_acquire() {
    let a = DevAgent::start();
    let s = a.create_session(json!({"LockDelay": "0s"})).await;
    let s2 = a.create_session(json!({})).await;
    assert!(a.acquire("K", &s, b"v").await);
    a.destroy_session(&s).await;
    assert!(
        a.acquire("K", &s2, b"v2").await,
        "no lock-delay with LockDelay 0"
    );
}

#[tokio::test]
async fn lock_delay_refuses_even_an_invalid_session() {
    // The lock-delay check comes before the session check (§3.3 Lock step 2): false, not 500.
    let a = DevAgent::start();
    let s = a.create_session(json!({"LockDelay": "30s"})).await;
    assert!(a.acquire("K", &s, b"v").await);
    a.destroy_session(&s).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    assert!(!a.acquire("K", &unknown, b"x").await);
    // Other keys are not delayed.
    let s2 = a.create_session(json!({})).await;
    assert!(a.acquire("other", &s2, b"x").await);
}

#[tokio::test]
async fn lock_delay_after_check_fail() {
    let a = DevAgent::start();
    let c = passing_check(&a, "ld", "60s").await;
    let s = a
        .create_session(json!({"NodeChecks": ["serfHealth", c], "LockDelay": "2s"}))
        .await;
    let s2 = a.create_session(json!({})).await;
    assert!(a.acquire("K", &s, b"v").await);
    let before = Instant::now();
    a.check_update("fail", &c).await;
    let lower = wait_unlocked(&a, "K", before, EVENTUALLY).await;
    assert!(a.session_info(&s).await.is_none());
    assert_lock_delay(&a, "K", &s2, Duration::from_secs(2), lower).await;
    deregister_check(&a, &c).await;
}

// ---------------------------------------------------------------------------------------------
// Sessions bound to checks (§2.1, §5.3, §5.4)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn check_warn_does_not_invalidate_but_fail_does() {
    let a = DevAgent::start();
    let c = passing_check(&a, "w", "60s").await;
    let barrier = passing_check(&a, "barrier", "60s").await;
    let s = a.create_session(json!({"NodeChecks": [c]})).await;
    let sb = a.create_session(json!({"NodeChecks": [barrier]})).await;
    assert!(a.acquire("K", &s, b"v").await);

    a.check_update("warn", &c).await;
    // Failing a second check, afterwards, is the barrier: once its session is gone, the warn
    // has been processed too.
    a.check_update("fail", &barrier).await;
    wait_until("the barrier session is gone", EVENTUALLY, || async {
        a.session_info(&sb).await.is_none()
    })
    .await;
    assert!(
        a.session_info(&s).await.is_some(),
        "warning must not invalidate"
    );
    assert_eq!(a.kv_entry("K").await.unwrap()["Session"], json!(s));

    a.check_update("fail", &c).await;
    wait_unlocked(&a, "K", Instant::now(), EVENTUALLY).await;
    assert!(a.session_info(&s).await.is_none());
    deregister_check(&a, &c).await;
    deregister_check(&a, &barrier).await;
}

#[tokio::test]
async fn check_ttl_expiry_invalidates_bound_session() {
    let a = DevAgent::start();
    let ttl = Duration::from_secs(4);
    let c = a.name("ttl");
    a.register_check(json!({"Name": c, "TTL": "4s"})).await;
    let passed = Instant::now();
    a.check_update("pass", &c).await;
    let s = a
        .create_session(json!({"NodeChecks": ["serfHealth", c]}))
        .await;
    assert!(a.acquire("K", &s, b"v").await);
    // Left alone, the check goes critical TTL after its last update (no ×2 for checks).
    wait_unlocked(&a, "K", passed, ttl + EVENTUALLY).await;
    let seen = passed.elapsed();
    assert!(a.session_info(&s).await.is_none());
    assert!(
        seen + Duration::from_millis(100) >= ttl,
        "invalidated {seen:?} after the pass, before the check's {ttl:?} TTL"
    );
    deregister_check(&a, &c).await;
}

#[tokio::test]
async fn check_deregister_invalidates_bound_session() {
    let a = DevAgent::start();
    let c = passing_check(&a, "dereg", "60s").await;
    let s = a.create_session(json!({"NodeChecks": [c]})).await;
    assert!(a.acquire("K", &s, b"v").await);
    deregister_check(&a, &c).await;
    wait_unlocked(&a, "K", Instant::now(), EVENTUALLY).await;
    assert!(a.session_info(&s).await.is_none());
}

#[tokio::test]
async fn session_check_binding_rules() {
    // The worked cases of §2.1, checked by behaviour: fail c1 once, and exactly the sessions
    // bound to it die (in the same transaction, so no barrier is needed for the survivors).
    let a = DevAgent::start();
    let c1 = passing_check(&a, "c1", "60s").await;
    let cases: Vec<(Value, bool)> = vec![
        (json!({}), false),
        (json!({"Checks": []}), false),
        (json!({"NodeChecks": []}), false),
        (json!({"NodeChecks": [c1]}), true),
        (json!({"Checks": [c1]}), true),
        (json!({"Checks": [c1], "NodeChecks": []}), false),
    ];
    let mut ids = Vec::new();
    for (body, _) in &cases {
        ids.push(a.create_session(body.clone()).await);
    }
    a.check_update("fail", &c1).await;
    wait_until("the sessions bound to c1 are gone", EVENTUALLY, || async {
        for ((_, dies), id) in cases.iter().zip(&ids) {
            if *dies && a.session_info(id).await.is_some() {
                return false;
            }
        }
        true
    })
    .await;
    for ((body, dies), id) in cases.iter().zip(&ids) {
        if !dies {
            assert!(
                a.session_info(id).await.is_some(),
                "session created with {body} is not bound to c1 and must survive"
            );
        }
    }
    deregister_check(&a, &c1).await;
}

#[tokio::test]
async fn session_create_with_unknown_check_is_500() {
    let a = DevAgent::start();
    let ghost = a.name("ghost");
    let r = a
        .put(
            "/v1/session/create",
            json!({"NodeChecks": [ghost]}).to_string(),
        )
        .await
        .expect_status(500);
    assert_body_contains(&r, &format!("Missing check '{ghost}' registration"));
}

#[tokio::test]
async fn check_register_and_update_errors() {
    let a = DevAgent::start();
    let r = a
        .put(
            "/v1/agent/check/register",
            json!({"Name": a.name("x"), "TTL": "10s", "Status": "bogus"}).to_string(),
        )
        .await
        .expect_status(400);
    assert_body_starts(&r, "Bad check status");
    let r = a
        .put("/v1/agent/check/register", "{not json")
        .await
        .expect_status(400);
    assert_body_starts(&r, "Request decode failed");

    let c = passing_check(&a, "upd", "60s").await;
    let r = a
        .put(
            &format!("/v1/agent/check/update/{c}"),
            json!({"Status": "bogus"}).to_string(),
        )
        .await
        .expect_status(400);
    assert_body_starts(&r, "Invalid check status: 'bogus'");
    // Modern agents take updates only with PUT (§9, 1.0).
    a.get(&format!("/v1/agent/check/pass/{c}"))
        .await
        .expect_status(405);
    a.put(&format!("/v1/agent/check/pass/{c}?note=fine"), Vec::new())
        .await
        .expect_status(200);
    deregister_check(&a, &c).await;
}

#[tokio::test]
async fn check_update_critical_invalidates_bound_session() {
    let a = DevAgent::start();
    let c = passing_check(&a, "upd", "60s").await;
    let s = a.create_session(json!({"NodeChecks": [c]})).await;
    a.put(
        &format!("/v1/agent/check/update/{c}"),
        json!({"Status": "critical", "Output": "down"}).to_string(),
    )
    .await
    .expect_status(200);
    wait_until("the session is gone", EVENTUALLY, || async {
        a.session_info(&s).await.is_none()
    })
    .await;
    deregister_check(&a, &c).await;
}

// ---------------------------------------------------------------------------------------------
// ACL tokens (§1.3, §1.4), dev agent started with --acl-token
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "s3cret-token";

#[track_caller]
fn assert_denied(r: &Resp) {
    let t = r.text();
    assert_eq!(
        r.status, 403,
        "{}: expected 403, got {} {t:?}",
        r.what, r.status
    );
    assert!(
        t.starts_with("Permission denied") || t.starts_with("ACL not found"),
        "{}: 403 body {t:?}",
        r.what
    );
}

#[tokio::test]
async fn acl_missing_or_wrong_token_is_403() {
    let Some(a) = DevAgent::builder().acl_token(SECRET).start() else {
        return;
    };
    let h = a.http();
    let missing_key = a.kv_path("missing");
    let put_key = a.kv_path("k");
    type Variant = (&'static str, &'static str, &'static str);
    let variants: [Variant; 5] = [
        ("none", "", ""),
        ("wrong header", "X-Consul-Token", "wrong"),
        ("wrong query", "", "?token=wrong"),
        ("wrong bearer", "Authorization", "Bearer wrong"),
        ("bare Authorization", "Authorization", SECRET),
    ];
    for (what, header, value) in variants {
        let (hname, hvalue, query) = match (header, value) {
            ("", q) => (None, None, q.to_string()),
            (n, v) => (Some(n), Some(v), String::new()),
        };
        for (method, path) in [
            ("GET", missing_key.clone()),
            ("PUT", put_key.clone()),
            ("PUT", "/v1/session/create".to_string()),
            ("GET", "/v1/agent/self".to_string()),
        ] {
            let mut req = h.request(method, &format!("{path}{query}"));
            if let (Some(n), Some(v)) = (hname, hvalue) {
                req = req.header(n, v);
            }
            if method == "PUT" {
                // Session create decodes its body in the HTTP handler, before the RPC checks the
                // token, so it needs valid JSON to reach the ACL check at all.
                let body = if path.contains("/session/") {
                    "{}"
                } else {
                    "x"
                };
                req = req.body(body);
            }
            let r = req.send().await;
            assert_denied(&r);
            eprintln!("{what}: {} -> 403", r.what);
        }
    }
    // Nothing was written.
    let r = h
        .request("GET", &put_key)
        .header("X-Consul-Token", SECRET)
        .send()
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
}

#[tokio::test]
async fn acl_accepted_token_forms() {
    let Some(a) = DevAgent::builder().acl_token(SECRET).start() else {
        return;
    };
    let h = a.http();
    let forms: [(&str, &str, String); 5] = [
        ("header", "X-Consul-Token", SECRET.to_string()),
        ("query", "", format!("?token={SECRET}")),
        ("bearer", "Authorization", format!("Bearer {SECRET}")),
        (
            "bearer, any case",
            "Authorization",
            format!("bEaReR {SECRET}"),
        ),
        (
            "bearer, first word",
            "Authorization",
            format!("Bearer {SECRET} extra"),
        ),
    ];
    for (i, (what, header, value)) in forms.iter().enumerate() {
        let key = a.kv_path(&format!("k{i}"));
        let (query, hdr) = if header.is_empty() {
            (value.clone(), None)
        } else {
            (String::new(), Some((*header, value.as_str())))
        };
        let with = |method: &str, path: String| {
            let mut req = h.request(method, &format!("{path}{query}"));
            if let Some((n, v)) = hdr {
                req = req.header(n, v);
            }
            req
        };
        let r = with("PUT", key.clone()).body("v").send().await;
        assert!(r.clone().expect_bool(), "{what}: PUT {}", r.text());
        with("GET", key.clone()).send().await.expect_status(200);
        let r = with("PUT", "/v1/session/create".to_string())
            .body("{}")
            .send()
            .await
            .expect_status(200);
        assert!(r.json()["ID"].is_string(), "{what}");
        with("GET", "/v1/agent/self".to_string())
            .send()
            .await
            .expect_status(200);
    }
}

#[tokio::test]
async fn acl_token_precedence() {
    let Some(a) = DevAgent::builder().acl_token(SECRET).start() else {
        return;
    };
    let h = a.http();
    let key = a.kv_path("k");
    let put = |query: String| h.request("PUT", &format!("{key}{query}")).body("v");

    // ?token= comes first.
    let r = put(format!("?token={SECRET}"))
        .header("X-Consul-Token", "wrong")
        .send()
        .await;
    assert!(r.expect_bool());
    assert_denied(
        &put("?token=wrong".to_string())
            .header("X-Consul-Token", SECRET)
            .send()
            .await,
    );
    // An empty ?token= is skipped.
    let r = put("?token=".to_string())
        .header("X-Consul-Token", SECRET)
        .send()
        .await;
    assert!(r.expect_bool());
    // X-Consul-Token comes before Authorization.
    assert_denied(
        &put(String::new())
            .header("X-Consul-Token", "wrong")
            .header("Authorization", &format!("Bearer {SECRET}"))
            .send()
            .await,
    );
    // The scheme must be bearer.
    assert_denied(
        &put(String::new())
            .header("Authorization", &format!("Basic {SECRET}"))
            .send()
            .await,
    );
}

// ---------------------------------------------------------------------------------------------
// The binary itself
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn binary_prints_listening_line_and_answers() {
    let a = DevAgent::builder().spawn_local();
    let first = a.proc().unwrap().stdout_text();
    let first = first.lines().next().unwrap_or_default().to_string();
    assert_eq!(first, format!("dev-agent listening on {}", a.addr()));
    assert!(a.addr().starts_with("127.0.0.1:"));
    assert_ne!(
        a.addr(),
        "127.0.0.1:0",
        "port 0 must be replaced by the real port"
    );
    let r = a.get("/v1/status/leader").await.expect_status(200);
    assert!(r.json().is_string());
}

async fn assert_signal_stops_cleanly(sig: Signal) {
    let mut a = DevAgent::builder().spawn_local();
    a.kv_put("k", b"v").await;
    // A long blocking query in flight must not hold up the shutdown.
    let i = a.get(&a.kv_path("k")).await.index();
    let http = a.http().clone();
    let path = format!("{}?index={i}&wait=5m", a.kv_path("k"));
    // try_send: the request may fail when the agent goes away, and that is fine here.
    let mut blocked =
        tokio::spawn(async move { http.request("GET", &path).try_send().await.is_ok() });
    assert_pending(
        "blocking GET before the signal",
        &mut blocked,
        Duration::from_millis(300),
    )
    .await;

    let p = a.proc_mut().unwrap();
    let sent = Instant::now();
    p.signal(sig);
    let status = p
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("dev agent still running 10s after {sig}"));
    assert!(
        status.success(),
        "dev agent exited with {status} after {sig}, expected 0\n{}",
        p.output_report()
    );
    eprintln!("dev agent exited 0 {:?} after {sig}", sent.elapsed());
    blocked.abort();
}

#[tokio::test]
async fn binary_exits_0_on_sigterm() {
    assert_signal_stops_cleanly(Signal::SIGTERM).await;
}

#[tokio::test]
async fn binary_exits_0_on_sigint() {
    assert_signal_stops_cleanly(Signal::SIGINT).await;
}

#[test]
fn binary_listen_on_busy_port_fails_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = std::process::Command::new(bin_path());
    cmd.args(DevAgentBuilder::default().args(&addr));
    let mut p = Proc::spawn(cmd);
    let status = p.wait_exit(START_DEADLINE).unwrap_or_else(|| {
        panic!(
            "dev agent on a busy port did not exit\n{}",
            p.output_report()
        )
    });
    assert!(
        !status.success(),
        "exit status {status}\n{}",
        p.output_report()
    );
    let stderr = p.stderr_text();
    assert!(
        stderr.lines().any(|l| l.contains(&addr)),
        "no stderr line names {addr}:\n{stderr}"
    );
    assert!(
        !p.stdout_text().contains("dev-agent listening on"),
        "{}",
        p.output_report()
    );
    drop(taken);
}

// ---------------------------------------------------------------------------------------------
// HTTP layer details (§1)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http_redirects_subtree_root_and_unclean_paths() {
    let a = DevAgent::start();
    let r = a.get("/v1/kv").await.expect_status(301);
    let loc = r.header("Location").unwrap_or_default();
    assert!(loc.ends_with("/v1/kv/"), "Location {loc:?}");
    // `//` in a key path is not clean: 301 to the cleaned path (§1.1).
    let r = a
        .put(&format!("/v1/kv/{}a//b", a.prefix()), "v")
        .await
        .expect_status(301);
    let loc = r.header("Location").unwrap_or_default();
    assert!(
        loc.ends_with(&format!("/v1/kv/{}a/b", a.prefix())),
        "Location {loc:?}"
    );
    assert!(
        a.kv_entry("a/b").await.is_none(),
        "a redirect writes nothing"
    );
}

#[tokio::test]
async fn http_head_is_405_and_options_on_session_create() {
    let a = DevAgent::start();
    let r = a
        .request("HEAD", &a.kv_path("foo"))
        .await
        .expect_status(405);
    assert_eq!(r.header("Allow").as_deref(), Some("OPTIONS,GET,PUT,DELETE"));
    let r = a
        .http()
        .options("/v1/session/create")
        .await
        .expect_status(200);
    assert_eq!(r.header("Allow").as_deref(), Some("OPTIONS,PUT"));
    let r = a
        .request("DELETE", "/v1/session/list")
        .await
        .expect_status(405);
    assert_eq!(r.header("Allow").as_deref(), Some("OPTIONS,GET"));
}

#[tokio::test]
async fn http_enterprise_parameters_are_400() {
    let a = DevAgent::start();
    let r = a
        .http()
        .request("GET", &a.kv_path("foo"))
        .header("X-Consul-Namespace", "default")
        .send()
        .await
        .expect_status(400);
    assert_body_starts(&r, "Invalid header: \"X-Consul-Namespace\"");
    assert_body_contains(&r, "Namespaces are a Consul Enterprise feature");
    let r = a
        .get(&format!("{}?partition=default", a.kv_path("foo")))
        .await
        .expect_status(400);
    assert_body_contains(&r, "Partitions are a Consul Enterprise feature");
    let r = a
        .http()
        .request("GET", &a.kv_path("foo"))
        .header("X-Consul-Partition", "default")
        .send()
        .await
        .expect_status(400);
    assert_body_contains(&r, "Partitions are a Consul Enterprise feature");
    // An empty ns is not "non-empty": accepted.
    a.get(&format!("{}?ns=", a.kv_path("foo")))
        .await
        .expect_status(404);
}

#[tokio::test]
async fn http_dc_parameter() {
    let a = DevAgent::builder()
        .datacenter("dc7")
        .start()
        .expect("no dev-only options");
    let dc = a.get("/v1/agent/self").await.json()["Config"]["Datacenter"]
        .as_str()
        .unwrap()
        .to_string();
    if !DevAgent::is_real() {
        assert_eq!(dc, "dc7", "--datacenter");
    }
    a.kv_put("k", b"v").await;
    a.get(&format!("{}?dc={dc}", a.kv_path("k")))
        .await
        .expect_status(200);
    a.get(&format!("{}?dc=", a.kv_path("k")))
        .await
        .expect_status(200);
    let other = a.name("nodc");
    let r = a
        .get(&format!("{}?dc={other}", a.kv_path("k")))
        .await
        .expect_status(500);
    assert_body_contains(&r, "No path to datacenter");
    let r = a
        .put(&format!("/v1/session/create?dc={other}"), "{}")
        .await
        .expect_status(500);
    assert_body_contains(&r, "No path to datacenter");
}

#[tokio::test]
async fn http_json_responses_carry_vary_and_large_ones_are_gzipped() {
    let a = DevAgent::start();
    a.kv_put("k", b"v").await;
    let r = a.get(&a.kv_path("k")).await.expect_status(200);
    assert_eq!(
        r.header("Content-Type").as_deref(),
        Some("application/json")
    );
    let vary = r.header("Vary").unwrap_or_default();
    assert!(vary.contains("Accept-Encoding"), "Vary {vary:?}");

    // Three 1000-byte values: the recurse body is well over 1400 bytes.
    for n in ["g/1", "g/2", "g/3"] {
        a.kv_put(n, &[b'z'; 1000]).await;
    }
    let r = a
        .http()
        .request("GET", &format!("{}?recurse", a.kv_path("g/")))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect_status(200);
    assert_eq!(r.header("Content-Encoding").as_deref(), Some("gzip"));
    assert_eq!(&r.body[..2], &[0x1f, 0x8b], "gzip magic");
    // Without Accept-Encoding, plain JSON.
    let r = a
        .get(&format!("{}?recurse", a.kv_path("g/")))
        .await
        .expect_status(200);
    assert!(r.header("Content-Encoding").is_none());
    assert_eq!(r.json().as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn http_index_header_is_never_zero_on_reads() {
    let a = DevAgent::start();
    let s = uuid::Uuid::new_v4();
    for path in [
        a.kv_path("none"),
        format!("{}?keys", a.kv_path("none/")),
        format!("{}?recurse", a.kv_path("none/")),
        format!("/v1/session/info/{s}"),
        "/v1/session/list".to_string(),
        format!("/v1/session/node/{}", a.name("ghost")),
    ] {
        let r = a.get(&path).await;
        assert!(r.index() >= 1, "{}: index {}", r.what, r.index());
        assert!(r.header("X-Consul-Knownleader").is_some(), "{}", r.what);
        assert!(r.header("X-Consul-Lastcontact").is_some(), "{}", r.what);
    }
}

// ---------------------------------------------------------------------------------------------
// KV details (§3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn kv_percent_encoded_key() {
    let a = DevAgent::start();
    let r = a
        .put(&format!("/v1/kv/{}a%3Fb%23c%20d", a.prefix()), "v")
        .await;
    assert!(r.expect_bool());
    let r = a
        .get(&format!("/v1/kv/{}a%3Fb%23c%20d", a.prefix()))
        .await
        .expect_status(200);
    assert_eq!(r.json()[0]["Key"], json!(a.key("a?b#c d")));
}

#[tokio::test]
async fn kv_recurse_is_a_sorted_string_prefix_match() {
    let a = DevAgent::start();
    for k in ["foobar", "foo/x", "fop", "foo"] {
        a.kv_put(k, k.as_bytes()).await;
    }
    let r = a
        .get(&format!("{}?recurse", a.kv_path("foo")))
        .await
        .expect_status(200);
    let v = r.json();
    let keys: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, [a.key("foo"), a.key("foo/x"), a.key("foobar")]);
    let max = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| u64_field(e, "ModifyIndex"))
        .max()
        .unwrap();
    assert_eq!(r.index(), max, "recurse index is the largest ModifyIndex");
    // Presence only: recurse=false still recurses, and raw is ignored with recurse.
    let r = a
        .get(&format!("{}?recurse=false&raw", a.kv_path("foo")))
        .await
        .expect_status(200);
    assert_eq!(r.json().as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn kv_keys_sorting_and_separator_spellings() {
    let a = DevAgent::start();
    for k in ["d/b", "d/a/1", "d/a/2", "d/c/x/y", "d/B"] {
        a.kv_put(k, b"v").await;
    }
    let r = a
        .get(&format!("{}?keys", a.kv_path("d/")))
        .await
        .expect_status(200);
    assert_eq!(
        r.json(),
        json!([
            a.key("d/B"),
            a.key("d/a/1"),
            a.key("d/a/2"),
            a.key("d/b"),
            a.key("d/c/x/y")
        ]),
        "byte order"
    );
    let want = json!([a.key("d/B"), a.key("d/a/"), a.key("d/b"), a.key("d/c/")]);
    let r = a
        .get(&format!("{}?keys&seperator=/", a.kv_path("d/")))
        .await
        .expect_status(200);
    assert_eq!(r.json(), want, "the old spelling `seperator`");
    let r = a
        .get(&format!("{}?keys&seperator=x&separator=/", a.kv_path("d/")))
        .await
        .expect_status(200);
    assert_eq!(r.json(), want, "`separator` wins");
    // keys takes precedence over recurse.
    let r = a
        .get(&format!("{}?keys&recurse&separator=/", a.kv_path("d/")))
        .await
        .expect_status(200);
    assert_eq!(r.json(), want);
}

#[tokio::test]
async fn kv_delete_recurse() {
    let a = DevAgent::start();
    for k in ["r/1", "r/2/3", "rr"] {
        a.kv_put(k, b"v").await;
    }
    let r = a
        .delete(&format!("{}?recurse&cas=1", a.kv_path("r/")))
        .await
        .expect_status(400);
    assert_body_starts(&r, "Conflicting flags:");
    assert!(
        a.delete(&format!("{}?recurse", a.kv_path("r/")))
            .await
            .expect_bool()
    );
    assert!(a.kv_entry("r/1").await.is_none());
    assert!(a.kv_entry("r/2/3").await.is_none());
    assert!(a.kv_entry("rr").await.is_some(), "outside the prefix r/");
    assert!(
        a.delete(&format!("{}?recurse", a.kv_path("nothing/")))
            .await
            .expect_bool(),
        "true even when nothing matched"
    );
    assert!(a.delete(&a.kv_path("never")).await.expect_bool());
    let r = a.delete("/v1/kv/").await.expect_status(400);
    assert_body_starts(&r, "Missing key name");
}

#[tokio::test]
async fn kv_acquire_and_release_replace_value_and_flags() {
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    a.kv_put("K", b"plain").await;
    let created = a.kv_entry("K").await.unwrap();
    let r = a
        .put(&format!("{}?acquire={s}&flags=7", a.kv_path("K")), "v1")
        .await;
    assert!(r.expect_bool());
    let e = a.kv_entry("K").await.unwrap();
    assert_eq!(e["Flags"], json!(7));
    assert_eq!(
        e["LockIndex"],
        json!(1),
        "an existing, unheld key: old LockIndex + 1"
    );
    assert_eq!(e["CreateIndex"], created["CreateIndex"]);
    // Re-acquire without flags: Flags becomes 0 (§3.3 step 4).
    assert!(a.acquire("K", &s, b"v2").await);
    assert_eq!(a.kv_entry("K").await.unwrap()["Flags"], json!(0));
    // Release with flags and an empty body: the value is wiped to null.
    let r = a
        .put(
            &format!("{}?release={s}&flags=9", a.kv_path("K")),
            Vec::new(),
        )
        .await;
    assert!(r.expect_bool());
    let e = a.kv_entry("K").await.unwrap();
    assert!(e["Value"].is_null(), "{e}");
    assert_eq!(e["Flags"], json!(9));
    assert!(absent(&e, "Session"));
    assert_eq!(e["LockIndex"], json!(1));
    // Flags up to 2^64-1.
    let r = a
        .put(
            &format!("{}?flags=18446744073709551615", a.kv_path("K")),
            "x",
        )
        .await;
    assert!(r.expect_bool());
    assert_eq!(a.kv_entry("K").await.unwrap()["Flags"], json!(u64::MAX));
}

#[tokio::test]
async fn kv_release_edge_cases() {
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    // No existence check on the session: an unknown one is just `false`.
    let unknown = uuid::Uuid::new_v4().to_string();
    a.kv_put("K", b"v").await;
    assert!(!a.release("K", &unknown, b"x").await);
    assert!(!a.release("K", &s, b"x").await, "not held at all");
    assert!(!a.release("missing", &s, b"x").await, "missing key");
    let r = a
        .put(&format!("{}?release", a.kv_path("K")), "x")
        .await
        .expect_status(500);
    assert_body_contains(&r, "missing session");
    assert_eq!(a.kv_entry("K").await.unwrap()["Value"], json!(b64(b"v")));
}

#[tokio::test]
async fn kv_delete_and_put_ignore_locks() {
    // §3.4: a lock protects a key from neither delete nor PUT.
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    assert!(a.acquire("K", &s, b"v").await);
    assert!(a.delete(&a.kv_path("K")).await.expect_bool());
    assert!(a.kv_entry("K").await.is_none());
}

// ---------------------------------------------------------------------------------------------
// Session details (§2)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn session_empty_ids_are_400() {
    let a = DevAgent::start();
    let r = a.get("/v1/session/info/").await.expect_status(400);
    assert_body_starts(&r, "Missing session");
    let r = a
        .put("/v1/session/renew/", Vec::new())
        .await
        .expect_status(400);
    assert_body_starts(&r, "Missing session");
    let r = a.get("/v1/session/node/").await.expect_status(400);
    assert_body_starts(&r, "Missing node name");
}

#[tokio::test]
async fn session_ids_are_case_insensitive() {
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    let info = a.session_info(&s.to_uppercase()).await;
    assert_eq!(info.map(|i| i["ID"].clone()), Some(json!(s)));
}

#[tokio::test]
async fn session_create_body_handling() {
    let a = DevAgent::start();
    let r = a
        .put("/v1/session/create", "{not json")
        .await
        .expect_status(400);
    assert_body_starts(&r, "Request decode failed");
    let r = a
        .put(
            "/v1/session/create",
            json!({"Checks": "serfHealth"}).to_string(),
        )
        .await
        .expect_status(400);
    assert_body_starts(&r, "Request decode failed");
    // Unknown fields are ignored in practice.
    let id = a
        .create_session(json!({"Name": "n", "Bogus": 1, "TTL": "", "Behavior": ""}))
        .await;
    let info = a.session_info(&id).await.unwrap();
    assert_eq!(info["Name"], json!("n"));
    assert_eq!(
        info["Behavior"],
        json!("release"),
        "an empty Behavior is release"
    );
    assert_eq!(info["TTL"], json!(""));
    // A LockDelay above 60 s is accepted (it is only capped when applied).
    let id = a.create_session(json!({"LockDelay": "90s"})).await;
    assert!(a.session_info(&id).await.is_some());
}

#[tokio::test]
async fn session_indexes_move_with_writes() {
    // §6: a session create takes an index, so a later KV write gets a larger ModifyIndex.
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    let created = u64_field(&a.session_info(&s).await.unwrap(), "CreateIndex");
    a.kv_put("after", b"v").await;
    let mi = u64_field(&a.kv_entry("after").await.unwrap(), "ModifyIndex");
    assert!(mi > created, "KV write {mi} after session create {created}");
    let r = a.get(&format!("/v1/session/info/{s}")).await;
    assert!(r.index() >= created);
}
