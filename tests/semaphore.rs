//! `run --limit N` end to end (issue 11): the real binary against a dev agent (or the real agent of
//! `CONSUL_LEADER_TEST_ADDR`), children journalling what they do, raw HTTP to check the layout
//! against `api.Semaphore`'s and to act as a Go contender. Each test is named after what it pins;
//! overlaps are proven from the journal (`lifetimes`, `most_at_once`).

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::leader::{
    DEADLINE, DeathWatch, Event, Fixture, Timing, WrapperBuilder, agent, exit_of, lifetimes,
    local_agent, most_at_once, now_us, pid_alive, read_env_file, sessions_for, wrapper_of,
};
use common::proxy::{FaultProxy, Mode};
use common::semaphore::{
    SEMAPHORE_FLAGS, clean_semaphore, go_acquire, go_release, listing, live_contenders, lock_key,
};
use common::{DevAgent, Proc, bin_path, wait_until, wait_until_sync};
use nix::sys::signal::Signal;

/// Holds a fault for a fixed time on purpose: its length is the test's input, not a stand-in for
/// waiting on a condition.
fn hold_fault(d: Duration) {
    std::thread::sleep(d);
}

fn secs(t: &str) -> u64 {
    humantime::parse_duration(t).unwrap().as_micros() as u64
}

fn starts(events: &[Event]) -> Vec<&Event> {
    events.iter().filter(|e| e.is_main_start()).collect()
}

/// Pids of `main` children that started and are still alive.
fn running(fx: &Fixture) -> Vec<u32> {
    let events = fx.events();
    starts(&events)
        .iter()
        .map(|e| e.pid)
        .filter(|pid| pid_alive(*pid) && !events.iter().any(|s| s.pid == *pid && s.kind == "stop"))
        .collect()
}

/// Asserts that at most `limit` children ever ran at once, from the journal and the deaths seen.
fn assert_at_most(fx: &Fixture, deaths: &BTreeMap<u32, u64>, limit: usize) {
    let lives = lifetimes(&fx.events(), deaths);
    let (most, pids) = most_at_once(&lives);
    assert!(
        most <= limit,
        "{most} children ran at once with --limit {limit}: {pids:?}\n{lives:?}"
    );
}

/// The session whose contender key a wrapper's child runs under (its environment says).
fn child_session(fx: &Fixture, child: u32) -> String {
    let env = std::fs::read(format!("/proc/{child}/environ")).unwrap_or_default();
    env.split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"CONSUL_LEADER_SESSION="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| panic!("child {child} has no session; journal {:?}", fx.events()))
}

fn status(agent: &DevAgent, key: &str, json: bool) -> std::process::Output {
    let mut cmd = Command::new(bin_path());
    cmd.args(["status", "--key", key])
        .env("CONSUL_HTTP_ADDR", agent.addr())
        .env_remove("CONSUL_HTTP_TOKEN");
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("run status")
}

/// The layout is `api.Semaphore`'s, byte for byte where it can be checked: the flags of both keys,
/// `.lock`'s JSON field names and order, the contender key held by its session, Behavior `delete`.
#[tokio::test]
async fn layout_matches_api_semaphore() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("layout");
    let env_file = fx.dir.join("env");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .env("CL_CHILD_ENV_FILE", env_file.to_str().unwrap())
        .spawn();
    let events = fx.wait_journal("the child started", |ev| !starts(ev).is_empty());
    let session = child_session(&fx, starts(&events)[0].pid);

    let lock = lock_key(&agent, "layout").await.expect(".lock exists");
    assert_eq!(lock.flags, SEMAPHORE_FLAGS);
    // Go's semaphoreLock first, in its field order and encoding; our own field after it.
    let head = format!("{{\"Limit\":2,\"Holders\":{{\"{session}\":true}}");
    assert!(
        String::from_utf8_lossy(&lock.raw).starts_with(&head),
        "{}",
        String::from_utf8_lossy(&lock.raw)
    );
    assert_eq!(lock.holders(), std::slice::from_ref(&session));
    assert!(lock.value["ConsulLeader"].is_object());
    // The contender key: PREFIX/<session>, the semaphore flags, acquired by the session.
    let entries = listing(&agent, "layout").await;
    let mine = entries
        .iter()
        .find(|e| e["Key"] == format!("{key}/{session}"))
        .unwrap_or_else(|| panic!("no contender key in {entries:?}"));
    assert_eq!(mine["Flags"].as_u64(), Some(SEMAPHORE_FLAGS));
    assert_eq!(mine["Session"], session.as_str());
    assert_eq!(
        entries.len(),
        2,
        "only .lock and the contender key: {entries:?}"
    );
    let info = agent
        .session_info(&session)
        .await
        .expect("the session lives");
    assert_eq!(info["Behavior"], "delete");
    // The fencing token is the ModifyIndex of the check-and-set that admitted the child.
    let env = read_env_file(&env_file);
    assert_eq!(
        env.get("CONSUL_LEADER_FENCING_TOKEN").map(String::as_str),
        Some(lock.modify_index.to_string().as_str())
    );
    assert_eq!(
        env.get("CONSUL_LOCK_HELD").map(String::as_str),
        Some("true")
    );

    // A clean release removes us from Holders, then the contender key goes, then the session.
    w.signal(Signal::SIGTERM);
    let st = exit_of(&mut w);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGTERM as i32),
        "{}",
        w.output_report()
    );
    let lock = lock_key(&agent, "layout").await.unwrap();
    assert!(
        String::from_utf8_lossy(&lock.raw).starts_with("{\"Limit\":2,\"Holders\":{}"),
        "{}",
        String::from_utf8_lossy(&lock.raw)
    );
    assert!(live_contenders(&agent, "layout").await.is_empty());
    wait_until("the session is gone", DEADLINE, || async {
        agent.session_info(&session).await.is_none()
    })
    .await;
    fx.wait_none_left(DEADLINE);
}

/// An `api.Semaphore` contender (what `consul lock -n` runs) shares the prefix: it counts against
/// the limit, our writes keep its entry, and a slot it frees (in Go's encoding, which drops our
/// records) is treated as one of unknown past: the next child waits max(silence, TTL).
#[tokio::test]
async fn interoperates_with_an_api_semaphore_contender() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("interop");
    let go = go_acquire(&agent, "interop", 2).await.expect("a free slot");
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .spawn();
    fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .spawn();
    wait_until_sync("B waits for a slot", DEADLINE, || {
        b.stderr_text().contains("waiting for a slot")
    });
    let lock = lock_key(&agent, "interop").await.unwrap();
    assert!(lock.holders().contains(&go), "{:?}", lock.value);
    assert_eq!(lock.value["Limit"], 2);
    // A Go contender finds the semaphore full.
    assert_eq!(go_acquire(&agent, "interop", 2).await, None);

    let freed = now_us();
    go_release(&agent, "interop", &go).await;
    let events = fx.wait_journal("B's child started", |ev| starts(ev).len() == 2);
    let b_start = starts(&events)[1].time_us;
    assert!(
        b_start >= freed + secs(timing.silence).max(secs(timing.ttl)),
        "B started {}us after the Go holder freed its slot; a slot a Go writer freed owes \
         max(silence, TTL)",
        b_start - freed
    );
    let lock = lock_key(&agent, "interop").await.unwrap();
    assert_eq!(lock.holders().len(), 2);
    assert!(!lock.holders().contains(&go));
    for w in [&mut a, &mut b] {
        w.signal(Signal::SIGTERM);
        let st = exit_of(w);
        assert_eq!(
            st.signal(),
            Some(Signal::SIGTERM as i32),
            "{}",
            w.output_report()
        );
    }
    assert_at_most(&fx, &BTreeMap::new(), 2);
    fx.wait_none_left(DEADLINE);
}

/// A contender whose --limit differs from the prefix's, that finds a lock at PREFIX/.lock, or
/// that finds the prefix itself held as a lock (`--limit 1` on the same --key), refuses with exit
/// 125 and starts nothing.
#[tokio::test]
async fn mismatched_limit_is_refused() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("limits");
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .spawn();
    fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "3")
        .spawn();
    let st = exit_of(&mut b);
    assert_eq!(st.code(), Some(125), "{}", b.output_report());
    let err = b.stderr_text();
    assert!(
        err.contains("semaphore limit conflict") && err.contains("Limit 2"),
        "{err}"
    );
    assert_eq!(starts(&fx.events()).len(), 1, "B started nothing");
    assert_eq!(lock_key(&agent, "limits").await.unwrap().holders().len(), 1);
    wait_until("B's session is gone", DEADLINE, || async {
        sessions_for(&agent, &key).await.len() == 1
    })
    .await;

    // `consul lock PREFIX` (without -n) holds PREFIX/.lock with the lock flags.
    let other = agent.key("a-lock");
    let s = agent
        .create_session(serde_json::json!({"TTL": "60s", "Name": "other"}))
        .await;
    assert!(common::leader::acquire_as_lock(&agent, "a-lock/.lock", &s, b"").await);
    let mut c = WrapperBuilder::new(&agent, &fx, &other, &timing)
        .flag("--limit", "2")
        .spawn();
    let st = exit_of(&mut c);
    assert_eq!(st.code(), Some(125), "{}", c.output_report());
    assert!(c.stderr_text().contains("is a lock"), "{}", c.stderr_text());
    agent.destroy_session(&s).await;

    // `--limit 1 --key K` holds K itself: a semaphore on the prefix K would run beside it.
    let mixed = agent.key("mixed");
    let mut m = WrapperBuilder::new(&agent, &fx, &mixed, &timing).spawn();
    wait_until("the lock on K is held", DEADLINE, || async {
        common::leader::lock_state(&agent, "mixed")
            .await
            .is_some_and(|(session, _, _)| session.is_some())
    })
    .await;
    let mut d = WrapperBuilder::new(&agent, &fx, &mixed, &timing)
        .flag("--limit", "2")
        .spawn();
    let st = exit_of(&mut d);
    assert_eq!(st.code(), Some(125), "{}", d.output_report());
    assert!(
        d.stderr_text().contains("must use the same --limit"),
        "{}",
        d.stderr_text()
    );

    // And the other way round: `--limit 1 --key K` while `K/.lock` is A's semaphore.
    let mut e = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    let st = exit_of(&mut e);
    assert_eq!(st.code(), Some(125), "{}", e.output_report());
    assert!(
        e.stderr_text().contains("holds a semaphore"),
        "{}",
        e.stderr_text()
    );

    for w in [&mut a, &mut m] {
        w.signal(Signal::SIGTERM);
        let _ = exit_of(w);
    }
    assert!(
        starts(&fx.events()).iter().all(|ev| [d.pid(), e.pid()]
            .iter()
            .all(|p| wrapper_of(ev.pid) != Some(*p))),
        "D and E started nothing"
    );
    fx.wait_none_left(DEADLINE);
}

/// `--wait 0` on a full semaphore: exit 75 at once, after one non-blocking read, having written
/// nothing under the prefix and left no session.
#[tokio::test]
async fn wait_zero_on_a_full_semaphore_exits_75_at_once() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("full");
    clean_semaphore(&agent, "full", 2).await;
    let g1 = go_acquire(&agent, "full", 2).await.unwrap();
    let g2 = go_acquire(&agent, "full", 2).await.unwrap();
    let before = listing(&agent, "full").await;
    let started = Instant::now();
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .flag("--wait", "0")
        .spawn();
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(75), "{}", w.output_report());
    // A blocking read would have waited for a change (none comes) or for the 3s TTL's fence.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(fx.events().is_empty(), "nothing was started");
    assert_eq!(listing(&agent, "full").await, before, "nothing was written");
    wait_until("no session of the wrapper is left", DEADLINE, || async {
        sessions_for(&agent, &key).await.is_empty()
    })
    .await;
    go_release(&agent, "full", &g1).await;
    go_release(&agent, "full", &g2).await;
}

/// A clean release frees the slot for the next contender at once (no wait, even a 10-minute
/// silence), and every exit is exact: by the wrapper's signal, or the child's code.
#[tokio::test]
async fn clean_release_hands_the_slot_over_at_once() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("handover");
    clean_semaphore(&agent, "handover", 2).await;
    let spawn = |exit_code: Option<&str>| {
        let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
            .flag("--limit", "2")
            .flag("--silence", "10m");
        if let Some(c) = exit_code {
            b = b.env("CL_CHILD_EXIT_CODE", c);
        }
        b.spawn()
    };
    let mut a = spawn(None);
    let mut b = spawn(None);
    let events = fx.wait_journal("two children started", |ev| starts(ev).len() == 2);
    let mut c = spawn(Some("3"));
    wait_until_sync("C waits for a slot", DEADLINE, || {
        c.stderr_text().contains("waiting for a slot")
    });
    // Stop whichever wrapper runs the first child.
    let first = starts(&events)[0].pid;
    let (holder, other) = if wrapper_of(first) == Some(a.pid()) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    holder.signal(Signal::SIGTERM);
    let st = exit_of(holder);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGTERM as i32),
        "{}",
        holder.output_report()
    );
    // C takes the slot at once, its child exits 3 and C exits 3, releasing clean.
    let st = exit_of(&mut c);
    assert_eq!(st.code(), Some(3), "{}", c.output_report());
    assert_eq!(starts(&fx.events()).len(), 3);
    other.signal(Signal::SIGINT);
    let st = exit_of(other);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGINT as i32),
        "{}",
        other.output_report()
    );
    let lock = lock_key(&agent, "handover").await.unwrap();
    assert!(lock.holders().is_empty(), "{:?}", lock.value);
    assert_eq!(lock.value["ConsulLeader"].get("unknown"), None);
    assert_at_most(&fx, &BTreeMap::new(), 2);
    wait_until("no session is left", DEADLINE, || async {
        sessions_for(&agent, &key).await.is_empty()
    })
    .await;
    fx.wait_none_left(DEADLINE);
}

/// The slot of a holder whose session was destroyed is taken by the waiting contender only after
/// the holder's TTL (6s, from its record in .lock: longer than the taker's own 3s), counted from
/// the moment its key went.
#[tokio::test]
async fn pruned_slot_is_reused_only_after_the_owed_wait() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("pruned");
    clean_semaphore(&agent, "pruned", 2).await;
    let long = Timing {
        ttl: "6s",
        lock_delay: "1s",
        silence: "6s",
        grace: "1s",
    };
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &long)
        .flag("--limit", "2")
        .spawn();
    let events = fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let a_session = child_session(&fx, starts(&events)[0].pid);
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .spawn();
    fx.wait_journal("B's child started", |ev| starts(ev).len() == 2);
    let mut c = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .spawn();
    wait_until_sync("C waits for a slot", DEADLINE, || {
        c.stderr_text().contains("waiting for a slot")
    });
    let record = lock_key(&agent, "pruned").await.unwrap();
    assert_eq!(record.record(&a_session).unwrap()["ttl_ms"], 6000);

    let destroyed = now_us();
    agent.destroy_session(&a_session).await;
    let st = exit_of(&mut a);
    assert_eq!(st.code(), Some(76), "{}", a.output_report());
    let events = fx.wait_journal("C's child started", |ev| starts(ev).len() == 3);
    let c_start = starts(&events)[2].time_us;
    assert!(
        c_start >= destroyed + secs(long.ttl),
        "C started {}us after A's session ended; A's TTL is 6s",
        c_start - destroyed
    );
    assert!(
        c.stderr_text()
            .contains(&format!("took the slot of session {a_session}")),
        "{}",
        c.output_report()
    );
    let lock = lock_key(&agent, "pruned").await.unwrap();
    assert!(!lock.holders().contains(&a_session));
    assert_eq!(lock.holders().len(), 2);
    for w in [&mut b, &mut c] {
        w.signal(Signal::SIGTERM);
        let _ = exit_of(w);
    }
    assert_at_most(&fx, &deaths.ended(), 2);
    fx.wait_none_left(DEADLINE);
}

/// A holder stopped while it still waits for earlier holders does not free its slot: it stays in
/// Holders with the wait it owed, and whoever takes its slot waits that out too.
#[tokio::test]
async fn a_holder_stopped_during_its_wait_passes_its_debt_on() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("debt");
    let t0 = now_us();
    // A new prefix: A owes max(silence, TTL) = 8s before its first child.
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .flag("--silence", "8s")
        .spawn();
    wait_until_sync("A waits out its silence", DEADLINE, || {
        a.stderr_text().contains("silence:")
    });
    let a_session = lock_key(&agent, "debt").await.unwrap().holders()[0].clone();
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .spawn();
    wait_until_sync("B is admitted", DEADLINE, || {
        b.stderr_text().contains("acquired")
    });
    a.signal(Signal::SIGTERM);
    let st = exit_of(&mut a);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGTERM as i32),
        "{}",
        a.output_report()
    );
    let lock = lock_key(&agent, "debt").await.unwrap();
    assert!(
        lock.holders().contains(&a_session),
        "A left its slot: {:?}",
        lock.value
    );
    assert!(
        lock.record(&a_session).unwrap()["owed_ms"]
            .as_u64()
            .unwrap()
            > 7_000,
        "{:?}",
        lock.value
    );
    let mut c = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "2")
        .spawn();
    let events = fx.wait_journal("C's child started", |ev| {
        ev.iter()
            .filter(|e| e.is_main_start())
            .any(|e| wrapper_of(e.pid) == Some(c.pid()))
    });
    let c_start = starts(&events)
        .iter()
        .find(|e| wrapper_of(e.pid) == Some(c.pid()))
        .unwrap()
        .time_us;
    assert!(
        c_start >= t0 + 8_000_000,
        "C started {}us after A began its 8s wait",
        c_start - t0
    );
    assert!(
        starts(&events)
            .iter()
            .all(|e| wrapper_of(e.pid) != Some(a.pid())),
        "A started no child"
    );
    for w in [&mut b, &mut c] {
        w.signal(Signal::SIGTERM);
        let _ = exit_of(w);
    }
    assert_at_most(&fx, &BTreeMap::new(), 2);
    fx.wait_none_left(DEADLINE);
}

/// `status --key PREFIX` shows the limit, each holder (holder, pid, since, fencing token) and the
/// free slots, in text and JSON; exit 0 while held, 1 once free.
#[tokio::test]
async fn status_shows_the_limit_holders_and_free_slots() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("status");
    clean_semaphore(&agent, "status", 3).await;
    let env = |n: &str| fx.dir.join(format!("env-{n}"));
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "3")
        .env("CL_CHILD_ENV_FILE", env("a").to_str().unwrap())
        .spawn();
    fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--limit", "3")
        .env("CL_CHILD_ENV_FILE", env("b").to_str().unwrap())
        .spawn();
    fx.wait_journal("B's child started", |ev| starts(ev).len() == 2);
    let token = |n: &str| -> u64 {
        read_env_file(&env(n))["CONSUL_LEADER_FENCING_TOKEN"]
            .parse()
            .unwrap()
    };
    assert!(token("b") > token("a"), "tokens grow with each admission");

    let o = status(&agent, &key, false);
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("limit 3"), "{t}");
    assert!(t.contains("held: 2 of 3 slots held"), "{t}");
    assert!(t.contains(&format!(":{}", a.pid())), "{t}");
    assert!(t.contains(&format!("fencing token {}", token("a"))), "{t}");
    assert!(t.contains("free slots      1"), "{t}");
    // The coordination key itself is not a lock (exit 3); its answer points at the prefix.
    let o = status(&agent, &format!("{key}/.lock"), false);
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(3), "{t}");
    assert!(
        t.contains(&format!("status --key {key} shows each holder")),
        "{t}"
    );

    let o = status(&agent, &key, true);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["kind"], "semaphore");
    assert_eq!(j["limit"], 3);
    assert_eq!(j["free"], 1);
    let holders = j["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 2);
    for (w, n) in [(&a, "a"), (&b, "b")] {
        let h = holders
            .iter()
            .find(|h| h["pid"] == w.pid())
            .unwrap_or_else(|| panic!("no holder with pid {}: {j}", w.pid()));
        assert_eq!(h["fencing_token"], token(n), "{j}");
        assert_eq!(h["alive"], true);
        assert!(h["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{j}");
    }

    for w in [&mut a, &mut b] {
        w.signal(Signal::SIGTERM);
        let _ = exit_of(w);
    }
    let o = status(&agent, &key, true);
    assert_eq!(o.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (j["state"].as_str(), j["free"].as_u64()),
        (Some("free"), Some(3))
    );
    fx.wait_none_left(DEADLINE);
}

/// N=2 with four contenders, each behind a fault proxy of its own: SIGTERM, SIGKILL, a session
/// destroy, a black-hole, and a black-hole during which the session is destroyed each hit a holder
/// in turn, and the journal never shows three children at once. Wrappers recontend after a loss;
/// each one stopped is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n2_four_contenders_never_run_three_children_through_faults() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("four");
    let timing = Timing {
        ttl: "3s",
        lock_delay: "1s",
        silence: "3s",
        grace: "500ms",
    };
    clean_semaphore(&agent, "four", 2).await;
    struct Contender {
        proc: Proc,
        proxy: FaultProxy,
    }
    let spawn = |fx: &Fixture| {
        let proxy = FaultProxy::start(agent.addr().parse().unwrap());
        let proc = WrapperBuilder::new(&agent, fx, &key, &timing)
            .flag("--limit", "2")
            .flag("--on-lost", "recontend")
            .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
            .env("CL_CHILD_GRANDCHILDREN", "ignore-term")
            .spawn();
        Contender { proc, proxy }
    };
    let mut all: Vec<Contender> = (0..4).map(|_| spawn(&fx)).collect();
    // Two children run; returns them with the index of each one's wrapper.
    let holders = |all: &Vec<Contender>| -> Vec<(u32, usize)> {
        let mut found = Vec::new();
        wait_until_sync("two children run", DEADLINE, || {
            found = running(&fx)
                .into_iter()
                .filter_map(|c| {
                    let w = all
                        .iter()
                        .position(|w| wrapper_of(c) == Some(w.proc.pid()))?;
                    Some((c, w))
                })
                .collect();
            found.len() == 2
        });
        found
    };

    // SIGTERM: a clean handover.
    let (_, w) = holders(&all)[0];
    let mut gone = all.remove(w);
    gone.proc.signal(Signal::SIGTERM);
    let st = exit_of(&mut gone.proc);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGTERM as i32),
        "{}",
        gone.proc.output_report()
    );
    all.push(spawn(&fx));

    // SIGKILL: the wrapper's child group dies with it; its slot is taken after its session
    // expires and the wait passes. What left the group (none here) would be the cgroup's job.
    let (child, w) = holders(&all)[0];
    let mut gone = all.remove(w);
    gone.proc.signal(Signal::SIGKILL);
    let st = exit_of(&mut gone.proc);
    assert_eq!(st.signal(), Some(Signal::SIGKILL as i32));
    wait_until_sync("the SIGKILLed wrapper's child is gone", DEADLINE, || {
        !pid_alive(child)
    });
    all.push(spawn(&fx));

    // A session destroy: the holder stops its child at once and contends again.
    let (child, _) = holders(&all)[0];
    agent.destroy_session(&child_session(&fx, child)).await;
    wait_until_sync("the destroyed holder's child is gone", DEADLINE, || {
        !pid_alive(child)
    });

    // A black-hole longer than the TTL: the holder fences itself, then heals and recontends.
    let (child, w) = holders(&all)[0];
    all[w].proxy.set_mode(Mode::Blackhole);
    wait_until_sync("the black-holed holder's child is gone", DEADLINE, || {
        !pid_alive(child)
    });
    hold_fault(Duration::from_secs(4));
    all[w].proxy.set_mode(Mode::Pass);

    // A partition in which Consul invalidates the session at once (a bound check going
    // critical, serfHealth on a cut-off node): the holder cannot hear of it and keeps its child
    // until its fence, so whoever takes the slot must wait the holder's TTL from then.
    let (child, w) = holders(&all)[0];
    all[w].proxy.set_mode(Mode::Blackhole);
    agent.destroy_session(&child_session(&fx, child)).await;
    wait_until_sync("the cut-off holder's child is gone", DEADLINE, || {
        !pid_alive(child)
    });
    all[w].proxy.set_mode(Mode::Pass);
    holders(&all);

    for c in &mut all {
        c.proc.signal(Signal::SIGTERM);
    }
    for c in &mut all {
        let st = exit_of(&mut c.proc);
        assert_eq!(
            st.signal(),
            Some(Signal::SIGTERM as i32),
            "{}",
            c.proc.output_report()
        );
    }
    fx.wait_none_left(DEADLINE);
    let deaths = deaths.ended();
    assert_at_most(&fx, &deaths, 2);
    assert!(starts(&fx.events()).len() >= 6, "{:?}", fx.events());
    // A SIGKILLed holder's slot stays counted until a successor takes it.
    let left = lock_key(&agent, "four").await.unwrap();
    assert!(left.holders().len() <= 2, "{:?}", left.value);
}

/// What the semaphore relies on from the agent, in raw HTTP (and so checked against a real Consul
/// under `CONSUL_LEADER_TEST_ADDR`): `?cas=0` creates `.lock` only once; a blocking `?recurse` read
/// of the prefix wakes when a Behavior `delete` session is destroyed, with its contender key gone
/// and a higher index; `.lock`, held by nobody, is untouched.
#[tokio::test]
async fn agent_primitives_the_semaphore_relies_on() {
    let agent = DevAgent::start();
    let s = agent
        .create_session(serde_json::json!({
            "Name": agent.name("prims"),
            "TTL": "60s",
            "Behavior": "delete",
            "LockDelay": "0s",
        }))
        .await;
    let contender = format!("prims/{s}");
    let path = format!(
        "{}?acquire={s}&flags={SEMAPHORE_FLAGS}",
        agent.kv_path(&contender)
    );
    assert!(agent.put(&path, Vec::new()).await.expect_bool());
    let lock_path = format!(
        "{}?cas=0&flags={SEMAPHORE_FLAGS}",
        agent.kv_path("prims/.lock")
    );
    let value = format!("{{\"Limit\":2,\"Holders\":{{\"{s}\":true}}}}");
    assert!(agent.put(&lock_path, value.clone()).await.expect_bool());
    assert!(
        !agent.put(&lock_path, value.clone()).await.expect_bool(),
        "cas=0 on an existing .lock"
    );
    let before = lock_key(&agent, "prims").await.unwrap();
    let list = format!("{}/?recurse", agent.kv_path("prims"));
    let r = agent.get(&list).await.expect_status(200);
    let index = r.index();
    assert_eq!(r.json().as_array().unwrap().len(), 2);

    let http = agent.http().clone();
    let blocked = format!("{list}&index={index}&wait=30s");
    let mut task = tokio::spawn(async move { http.get(&blocked).await });
    common::assert_pending(
        "a blocking listing with no change",
        &mut task,
        Duration::from_millis(300),
    )
    .await;
    agent.destroy_session(&s).await;
    let r = common::join_within("the listing wakes", task, Duration::from_secs(10))
        .await
        .expect_status(200);
    assert!(r.index() > index, "{} vs {index}", r.index());
    let keys: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, [agent.key("prims/.lock")]);
    assert!(agent.kv_entry(&contender).await.is_none());
    let after = lock_key(&agent, "prims").await.unwrap();
    assert_eq!(after.modify_index, before.modify_index);
    assert_eq!(after.raw, value.as_bytes());
}
