//! Never two leaders, for real: one regression test per hole of the leadership protocol found by
//! issue 8, each named after the fault it pins and driven from outside the binary (a fault proxy
//! between a wrapper and the agent, session destroys, failed checks, key deletes, agent restarts,
//! signals), while the child fixture's journal and a [`DeathWatch`] record every lifetime.
//!
//! The contract these tests hold the wrapper to (`design.md` §3, `election`'s safety argument),
//! with T = `--ttl`, d = `--lock-delay`, s = `--silence`, g = `--grace`:
//!
//! * `max(d, s) >= T`, or `run` exits 2 at once: a leader cut off from Consul keeps its child until
//!   (last good renew) + T - margin, while a session can be invalidated (a failed check, a destroy,
//!   `serfHealth`) at any moment after that renew.
//! * The holder writes `ttl_ms`, `lock_delay_ms` and `owed_ms` into the key's value; a successor
//!   that finds the key free and not released clean starts no earlier than F + max(its own s, the
//!   holder's `ttl_ms` when the holder's `lock_delay_ms` < `ttl_ms`, the holder's `owed_ms`), F
//!   being its first sighting of the free key.
//! * `"released":"clean"` only when no earlier child can still run.
//! * A missing key (or LockIndex 0) owes max(s, T) from the first sighting; the fencing token is
//!   the acquire's ModifyIndex.
//! * Transient errors (connection errors, timeouts, 5xx, 429) are retried while waiting or
//!   leading; definitive ones (403, 400) are fatal with Consul's own text.
//! * Bad input (keys, durations, a command that cannot run) is refused before any session exists.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::leader::{
    DEADLINE, DeathWatch, Event, Fixture, Timing, WrapperBuilder, exit_of, lifetimes, local_agent,
    lock_state, now_us, overlaps, read_env_file, sessions_for,
};
use common::proxy::{FaultProxy, Mode};
use common::{DevAgent, Proc, bin_path, wait_until_sync};
use nix::sys::signal::Signal;

/// Holds a fault for a fixed time on purpose: the fault's duration is the test's input, not a
/// stand-in for waiting on a condition.
fn hold_fault(d: Duration) {
    std::thread::sleep(d);
}

/// Clock granularity between the wrapper's monotonic clock and the journal's realtime one.
const CLOCK_SLACK_US: u64 = 50_000;

/// `--ttl 6s --lock-delay 1s --silence 6s --grace 1s`: safe by the new rule through the silence,
/// with a lock-delay short enough that a successor acquires long before the old fence.
const T6_D1_S6: Timing = Timing {
    ttl: "6s",
    lock_delay: "1s",
    silence: "6s",
    grace: "1s",
};

/// `--ttl 3s --lock-delay 3s --silence 3s --grace 1s`: every wait is T.
const T3_D3_S3: Timing = Timing {
    ttl: "3s",
    lock_delay: "3s",
    silence: "3s",
    grace: "1s",
};

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn secs(us: i64) -> String {
    format!("{:+.3}s", us as f64 / 1e6)
}

/// The journal's `main` starts, in order.
fn main_starts(events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| e.is_main_start())
        .cloned()
        .collect()
}

/// The `nth` main child's start (pid, time), waiting for it.
fn wait_nth_start(fx: &Fixture, nth: usize, what: &str) -> (u32, u64) {
    let events = fx.wait_journal(what, |ev| main_starts(ev).len() > nth);
    let e = &main_starts(&events)[nth];
    (e.pid, e.time_us)
}

/// Asserts that no two children's lifetimes overlapped; on failure says for how long they did.
fn assert_no_overlap(fx: &Fixture, deaths: &DeathWatch, who: &[&Proc]) {
    let lives = lifetimes(&fx.events(), &deaths.ended());
    let found = overlaps(&lives);
    if found.is_empty() {
        return;
    }
    let now = now_us();
    let mut measured = Vec::new();
    for (i, a) in lives.iter().enumerate() {
        for b in &lives[i + 1..] {
            let (a_end, b_end) = (a.2.unwrap_or(now), b.2.unwrap_or(now));
            if a.1 < b_end && b.1 < a_end {
                let together = a_end.min(b_end) - a.1.max(b.1);
                measured.push(format!(
                    "children {} and {} ran together for {}",
                    a.0,
                    b.0,
                    secs(together as i64)
                ));
            }
        }
    }
    panic!(
        "two children ran at once: {measured:?}\n{found:?}\n{}",
        who.iter()
            .map(|p| p.output_report())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// True when one of the wrapper's log lines (after its time and level) starts with `start`.
fn logged(w: &Proc, start: &str) -> bool {
    w.stderr_text().lines().any(|line| {
        let mut rest = line.trim_start();
        for _ in 0..2 {
            rest = rest.split_once(' ').map_or("", |(_, r)| r).trim_start();
        }
        rest.starts_with(start)
    })
}

/// Successful renews the wrapper logged (it runs with `CONSUL_LEADER_LOG=consul_leader=debug`).
fn renews(w: &Proc) -> usize {
    w.stderr_text().matches("renewed session").count()
}

/// Waits for the wrapper's next successful renew and returns at once: the moment to cut it off
/// "right after a renew", so that its fence (that renew's send time + T - margin) is as late as
/// it can be.
fn right_after_a_renew(w: &Proc) {
    let before = renews(w);
    wait_until_sync("the leader renews its session", DEADLINE, || {
        renews(w) > before
    });
}

/// The fencing token the child of `env_file` got.
fn token_of(env_file: &Path) -> u64 {
    let env = read_env_file(env_file);
    env.get("CONSUL_LEADER_FENCING_TOKEN")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no fencing token in {env:?}"))
}

/// The key's `ModifyIndex`, as `GET /v1/kv/<key>` shows it.
async fn modify_index(agent: &DevAgent, name: &str) -> u64 {
    let e = agent
        .kv_entry(name)
        .await
        .unwrap_or_else(|| panic!("{} does not exist", agent.key(name)));
    e["ModifyIndex"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ModifyIndex in {e}"))
}

/// Asserts that the wrapper ended by `sig`.
#[track_caller]
fn assert_died_by(w: &mut Proc, sig: Signal) {
    let st = exit_of(w);
    assert_eq!(st.signal(), Some(sig as i32), "{}", w.output_report());
}

/// Asserts that the wrapper exited with `code`.
#[track_caller]
fn assert_exit_code(w: &mut Proc, code: i32) {
    let st = exit_of(w);
    assert_eq!(st.code(), Some(code), "{}", w.output_report());
}

/// Waits until B (whose wrapper is already spawned) waits for the lock.
#[track_caller]
fn wait_standby(b: &Proc) {
    wait_until_sync("B waits", DEADLINE, || {
        b.stderr_text().contains("waiting for the lock on")
    });
}

/// Waits for the second child to start and for `a_child` to be gone: `(gone, started)`.
#[track_caller]
fn wait_handover(fx: &Fixture, deaths: &DeathWatch, a_child: u32) -> (u64, u64) {
    let (_, b_start) = wait_nth_start(fx, 1, "B's child started");
    wait_until_sync("A's child is gone", DEADLINE, || {
        deaths.ended().contains_key(&a_child)
    });
    (deaths.ended()[&a_child], b_start)
}

/// Asserts that leader `a` stopped because its watch saw its key change hands (deleted, or
/// already the successor's), not because its fence passed.
#[track_caller]
fn assert_watch_saw_the_key_change_hands(a: &Proc) {
    let seen = a.stderr_text();
    assert!(
        seen.contains("lost leadership")
            && (seen.contains("the key was deleted") || seen.contains("the key is now held by")),
        "A must stop because its watch saw the key change hands: {seen}"
    );
}

/// The end of a handover: the old leader exits with the lost code, the new one dies by SIGTERM,
/// and nothing the test started is left.
#[track_caller]
fn old_lost_new_stopped(fx: &Fixture, old: &mut Proc, new: &mut Proc) {
    assert_exit_code(old, 76);
    new.signal(Signal::SIGTERM);
    assert_died_by(new, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

/// Asserts that nothing of `key` is on the agent: no session named after it, no key.
async fn assert_untouched(agent: &DevAgent, name: &str) {
    let key = agent.key(name);
    assert!(
        sessions_for(agent, &key).await.is_empty(),
        "a session was created for {key}"
    );
    assert_eq!(
        lock_state(agent, name).await,
        None,
        "{key} was created on the agent"
    );
}

/// The local dev agent's options for a restart: the same lowered TTL minimum.
fn restart_options() -> common::DevAgentBuilder {
    DevAgent::builder().ttl_min("1s")
}

// ---------------------------------------------------------------------------------------------
// 1. Partitioned leader whose session is invalidated early
// ---------------------------------------------------------------------------------------------

/// A combination in which a successor could start while a partitioned leader's child still runs
/// (lock-delay and silence both below the TTL) is a usage error: exit 2 at once, one line naming
/// `--silence`/`--lock-delay` and `--ttl`, nothing on the agent. Combinations the rule allows run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_invalidated_early_config_that_could_overlap_is_refused() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let refused = [
        // The issue's measurement, scaled: overlap ~T - lock-delay.
        Timing {
            ttl: "6s",
            lock_delay: "1s",
            silence: "1s",
            grace: "500ms",
        },
        // Just short of the TTL, both.
        Timing {
            ttl: "6s",
            lock_delay: "5s",
            silence: "5900ms",
            grace: "1s",
        },
    ];
    for (i, timing) in refused.iter().enumerate() {
        let name = format!("refused-{i}");
        let key = agent.key(&name);
        let started = Instant::now();
        let mut w = WrapperBuilder::new(&agent, &fx, &key, timing)
            .flag("--wait", "10s")
            .command(&["true"])
            .spawn();
        let st = exit_of(&mut w);
        let err = w.stderr_text();
        eprintln!(
            "{timing:?}: {st} after {:?}, stderr {err:?}",
            started.elapsed()
        );
        assert_eq!(
            st.code(),
            Some(2),
            "{timing:?} can overlap under a partition plus early invalidation\n{}",
            w.output_report()
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
        assert!(
            err.contains("--ttl") && (err.contains("--silence") || err.contains("--lock-delay")),
            "the error names what to raise: {err:?}"
        );
        assert_untouched(&agent, &name).await;
    }
    // Lock-delay or silence covering the TTL is enough.
    let allowed = [
        Timing {
            ttl: "3s",
            lock_delay: "3s",
            silence: "1s",
            grace: "1s",
        },
        Timing {
            ttl: "3s",
            lock_delay: "1s",
            silence: "3s",
            grace: "1s",
        },
    ];
    let mut runs: Vec<Proc> = allowed
        .iter()
        .enumerate()
        .map(|(i, t)| {
            WrapperBuilder::new(&agent, &fx, &agent.key(&format!("allowed-{i}")), t)
                .command(&["true"])
                .spawn()
        })
        .collect();
    for w in &mut runs {
        assert_exit_code(w, 0);
    }
    fx.wait_none_left(DEADLINE);
}

/// Hosts configured differently: holder A (T=6s, d=1s, s=6s) is black-holed right after a renew
/// and its session destroyed; successor B (T=3s, d=1s, s=3s) would, by its own silence, start 3s
/// after the free while A's child runs until about R + 5.7s. B must honour A's timing from the
/// key's value and start only after A's child is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_invalidated_early_successor_with_a_shorter_ttl_waits_for_the_holders_fence()
 {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let name = "mixed";
    let key = agent.key(name);
    // A first holder that releases clean, so that A owes nothing when it acquires (`owed_ms` 0)
    // and only its TTL in the value can hold B back.
    let mut z = WrapperBuilder::new(
        &agent,
        &fx,
        &key,
        &Timing {
            ttl: "1s",
            lock_delay: "1s",
            silence: "1s",
            grace: "200ms",
        },
    )
    .command(&["true"])
    .spawn();
    assert_exit_code(&mut z, 0);
    // A's child ignores TERM: it lives until A's fence SIGKILLs it, R + T - margin.
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CONSUL_LEADER_LOG", "consul_leader=debug")
        .env("CL_CHILD_EXIT_ON", "")
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    let (a_session, _, a_value) = lock_state(&agent, name).await.unwrap();
    let a_session = a_session.expect("A holds the key");
    let mut b = WrapperBuilder::new(
        &agent,
        &fx,
        &key,
        &Timing {
            ttl: "3s",
            lock_delay: "1s",
            silence: "3s",
            grace: "1s",
        },
    )
    .spawn();
    wait_standby(&b);

    right_after_a_renew(&a);
    let cut = now_us();
    proxy.set_mode(Mode::Blackhole);
    agent.destroy_session(&a_session).await;
    let destroyed = now_us();

    let (b_child, b_start) = wait_nth_start(&fx, 1, "B's child started");
    wait_until_sync("A's child is gone", DEADLINE, || {
        deaths.ended().contains_key(&a_child)
    });
    let a_end = deaths.ended()[&a_child];
    eprintln!(
        "cut at 0, destroyed {}, A's child gone {}, B's child {b_child} started {}",
        secs(destroyed as i64 - cut as i64),
        secs(a_end as i64 - cut as i64),
        secs(b_start as i64 - cut as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    // Each holder's timing is in the key's value, for successors configured differently.
    let (_, _, b_value) = lock_state(&agent, name).await.unwrap();
    assert_eq!(a_value["ttl_ms"], 6000, "A's value: {a_value}");
    assert_eq!(a_value["lock_delay_ms"], 1000, "A's value: {a_value}");
    assert_eq!(a_value["owed_ms"], 0, "A took a clean key: {a_value}");
    assert_eq!(b_value["ttl_ms"], 3000, "B's value: {b_value}");
    assert_eq!(b_value["lock_delay_ms"], 1000, "B's value: {b_value}");

    // Healed, A learns its session is gone and exits with the lost code.
    proxy.set_mode(Mode::Pass);
    old_lost_new_stopped(&fx, &mut a, &mut b);
}

// ---------------------------------------------------------------------------------------------
// 2. A stop signal during the silence
// ---------------------------------------------------------------------------------------------

/// Leader A (behind a proxy, with a bound `--check`) is black-holed right after a renew and its
/// check fails, so Consul frees the key at once while A's child runs until its fence. Contender W
/// wins after lock-delay and waits out its silence; it gets SIGTERM meanwhile. It knows nothing of
/// A's child, so it must release without the clean mark (and die by SIGTERM): the third contender
/// still waits, and no two children run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_during_silence_releases_without_the_clean_mark() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("sigterm-while-silent");
    let check = agent.name("a-health");
    agent
        .register_check(serde_json::json!({"Name": check, "TTL": "10m"}))
        .await;
    agent.check_update("pass", &check).await;
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .flag("--check", &check)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CONSUL_LEADER_LOG", "consul_leader=debug")
        .env("CL_CHILD_EXIT_ON", "")
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    let mut others: Vec<Proc> = (0..2)
        .map(|_| WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6).spawn())
        .collect();
    for w in &others {
        wait_until_sync("the contenders wait", DEADLINE, || {
            w.stderr_text().contains("waiting for the lock on")
        });
    }

    right_after_a_renew(&a);
    let cut = now_us();
    proxy.set_mode(Mode::Blackhole);
    agent.check_update("fail", &check).await;

    // The winner of the lock-delay race waits out its silence: stop it then.
    let winner = wait_until_found(&others, "a contender waits out its silence", |w| {
        logged(w, "silence:")
    });
    let mut w = others.remove(winner);
    w.signal(Signal::SIGTERM);
    let termed = now_us();
    assert_died_by(&mut w, Signal::SIGTERM);
    let mut x = others.pop().unwrap();

    let (x_child, x_start) = wait_nth_start(&fx, 1, "the third contender's child started");
    wait_until_sync("A's child is gone", DEADLINE, || {
        deaths.ended().contains_key(&a_child)
    });
    let a_end = deaths.ended()[&a_child];
    eprintln!(
        "cut at 0, SIGTERM to the waiting winner {}, A's child gone {}, child {x_child} started {}",
        secs(termed as i64 - cut as i64),
        secs(a_end as i64 - cut as i64),
        secs(x_start as i64 - cut as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &w, &x]);
    assert_eq!(
        main_starts(&fx.events()).len(),
        2,
        "the stopped winner started no child"
    );
    assert!(
        logged(&x, "silence:"),
        "the third contender waited a silence\n{}",
        x.output_report()
    );
    // Healed, A learns its session is gone and exits with the lost code.
    proxy.set_mode(Mode::Pass);
    old_lost_new_stopped(&fx, &mut a, &mut x);
}

/// Polls until one of `procs` satisfies `cond`; returns its index.
fn wait_until_found(procs: &[Proc], what: &str, cond: impl Fn(&Proc) -> bool) -> usize {
    let mut found = None;
    wait_until_sync(what, DEADLINE, || {
        found = procs.iter().position(&cond);
        found.is_some()
    });
    found.unwrap()
}

// ---------------------------------------------------------------------------------------------
// 3. A missing key; the fencing token
// ---------------------------------------------------------------------------------------------

/// A healthy leader's key is deleted (`DELETE /v1/kv/<key>`, an operator following a hint). The
/// leader sees it at once and stops its child, which takes 0.4s; Consul applies no lock-delay to a
/// missing key, so the waiting contender must wait max(s, T) from its first sighting of the
/// missing key instead of starting at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_under_a_healthy_leader_owes_the_silence() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let name = "deleted-healthy";
    let key = agent.key(name);
    let (a_env, b_env) = (fx.dir.join("a.env"), fx.dir.join("b.env"));
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T3_D3_S3)
        .env("CL_CHILD_STOP_DELAY_MS", "400")
        .env("CL_CHILD_ENV_FILE", a_env.to_str().unwrap())
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T3_D3_S3)
        .env("CL_CHILD_ENV_FILE", b_env.to_str().unwrap())
        .spawn();
    wait_standby(&b);

    let deleted = now_us();
    agent.delete(&agent.kv_path(name)).await.expect_status(200);

    let (_, b_start) = wait_nth_start(&fx, 1, "B's child started");
    wait_until_sync("A's child is gone", DEADLINE, || {
        deaths.ended().contains_key(&a_child)
            || fx
                .events()
                .iter()
                .any(|e| e.pid == a_child && e.kind == "stop")
    });
    let (a_token, b_token) = (token_of(&a_env), token_of(&b_env));
    eprintln!(
        "deleted at 0, B's child started {}; fencing tokens A {a_token}, B {b_token}",
        secs(b_start as i64 - deleted as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    assert!(
        b_start + CLOCK_SLACK_US >= deleted + us(Duration::from_secs(3)),
        "B started {} after the delete; a missing key owes max(silence, TTL) = 3s",
        secs(b_start as i64 - deleted as i64)
    );
    assert!(
        b_token > a_token,
        "the fencing token must grow across the deletion: A {a_token}, B {b_token}"
    );
    old_lost_new_stopped(&fx, &mut a, &mut b);
}

/// The leader is black-holed, then its key is deleted. It cannot see that and keeps its child
/// (which ignores TERM) until its fence, last renew + T - margin; the waiting contender must not
/// start before then: it owes max(s, T) from its first sighting of the missing key, which is
/// after the cut, so after the last renew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_under_a_partitioned_leader_owes_the_silence() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let name = "deleted-partitioned";
    let key = agent.key(name);
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CL_CHILD_EXIT_ON", "")
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6).spawn();
    wait_standby(&b);

    let cut = now_us();
    proxy.set_mode(Mode::Blackhole);
    agent.delete(&agent.kv_path(name)).await.expect_status(200);
    let deleted = now_us();

    let (a_end, b_start) = wait_handover(&fx, &deaths, a_child);
    eprintln!(
        "cut at 0, deleted {}, A's child gone {}, B's child started {}",
        secs(deleted as i64 - cut as i64),
        secs(a_end as i64 - cut as i64),
        secs(b_start as i64 - cut as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    assert!(
        b_start + CLOCK_SLACK_US >= deleted + us(Duration::from_secs(6)),
        "B started {} after the delete; a missing key owes max(silence, TTL) = 6s",
        secs(b_start as i64 - deleted as i64)
    );
    // A fenced itself; healed, it exits with the lost code.
    proxy.set_mode(Mode::Pass);
    old_lost_new_stopped(&fx, &mut a, &mut b);
}

/// The leader's connections die without a sound (a NAT or firewall that lost their state: every
/// connection open at the fault stops forwarding, new ones work), then its key is deleted. Its
/// renews go on through fresh connections (hedges), so its fence keeps moving; only its watch can
/// tell it the key is gone, and that watch was blocked on a dead connection. The waiting contender
/// owes max(s, T) from the deletion: the leader must notice and stop its child before then, so its
/// watch may not stay blind longer than T - g - margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_watch_connection_key_deleted_leader_stops_before_the_successor_starts() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let name = "dead-watch";
    let key = agent.key(name);
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    // A's watch sent its first blocking read when it won, a silence before its child started.
    let dead = proxy.pin_all(Mode::Blackhole);
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6).spawn();
    wait_standby(&b);
    agent.delete(&agent.kv_path(name)).await.expect_status(200);
    let deleted = now_us();

    let (a_end, b_start) = wait_handover(&fx, &deaths, a_child);
    eprintln!(
        "{} connections of A died; deleted at 0, A's child gone {}, B's child started {}",
        dead.len(),
        secs(a_end as i64 - deleted as i64),
        secs(b_start as i64 - deleted as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    // Seen by its watch (the key gone, or already B's: a missing key has no lock-delay), not
    // by its fence, which its renews kept moving.
    assert_watch_saw_the_key_change_hands(&a);
    old_lost_new_stopped(&fx, &mut a, &mut b);
}

/// The same deletion under a leader whose agent is slow (every request takes 1.8 to 3.6s through
/// the proxy, within T/2), so that its blocking reads run past their timeout and the watch
/// depends on its retries: those must still see the key gone before the successor starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_agent_key_deleted_leader_still_stops_before_the_successor_starts() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let name = "slow-delete";
    let key = agent.key(name);
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    proxy.set_mode(Mode::Delay(Duration::from_millis(900)));
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6).spawn();
    wait_standby(&b);
    // Long enough for A's blocking reads to start timing out.
    hold_fault(Duration::from_secs(4));
    agent.delete(&agent.kv_path(name)).await.expect_status(200);
    let deleted = now_us();

    let (a_end, b_start) = wait_handover(&fx, &deaths, a_child);
    eprintln!(
        "deleted at 0, A's child gone {}, B's child started {}",
        secs(a_end as i64 - deleted as i64),
        secs(b_start as i64 - deleted as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    assert_watch_saw_the_key_change_hands(&a);
    proxy.set_mode(Mode::Pass);
    old_lost_new_stopped(&fx, &mut a, &mut b);
}

/// The fencing token is the acquire's ModifyIndex (cluster-wide, monotonic): it equals the key's
/// ModifyIndex while held and grows across deletion and recreation of the key, where LockIndex
/// starts over at 1. And the first run on a brand-new key waits max(s, T): a missing key may have
/// been deleted while an old child still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_fencing_token_grows_across_recreation() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let name = "recreated";
    let key = agent.key(name);
    let owed = us(Duration::from_secs(3));

    let a_env = fx.dir.join("a.env");
    let a_spawned = now_us();
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CL_CHILD_ENV_FILE", a_env.to_str().unwrap())
        .spawn();
    let (_, a_start) = wait_nth_start(&fx, 0, "A's child started");
    let a_token = token_of(&a_env);
    let a_modify = modify_index(&agent, name).await;
    let a_lock_index = lock_state(&agent, name).await.unwrap().1;
    a.signal(Signal::SIGTERM);
    assert_died_by(&mut a, Signal::SIGTERM);
    assert_eq!(
        lock_state(&agent, name).await.unwrap().2["released"],
        "clean"
    );

    let deleted = now_us();
    agent.delete(&agent.kv_path(name)).await.expect_status(200);
    let b_env = fx.dir.join("b.env");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CL_CHILD_ENV_FILE", b_env.to_str().unwrap())
        .spawn();
    let (_, b_start) = wait_nth_start(&fx, 1, "B's child started");
    let b_token = token_of(&b_env);
    let b_modify = modify_index(&agent, name).await;
    let b_lock_index = lock_state(&agent, name).await.unwrap().1;
    eprintln!(
        "A: token {a_token}, ModifyIndex {a_modify}, LockIndex {a_lock_index}, started {} after \
         its spawn; B: token {b_token}, ModifyIndex {b_modify}, LockIndex {b_lock_index}, started \
         {} after the delete",
        secs(a_start as i64 - a_spawned as i64),
        secs(b_start as i64 - deleted as i64)
    );
    assert_eq!(a_token, a_modify, "A's token is its acquire's ModifyIndex");
    assert_eq!(b_token, b_modify, "B's token is its acquire's ModifyIndex");
    assert!(
        b_token > a_token,
        "the token grows across the deletion: A {a_token}, B {b_token}"
    );
    assert!(
        a_start + CLOCK_SLACK_US >= a_spawned + owed,
        "the first run on a brand-new key started {} after its wrapper; it owes max(s, T) = 3s",
        secs(a_start as i64 - a_spawned as i64)
    );
    assert!(
        b_start + CLOCK_SLACK_US >= deleted + owed,
        "the run after the deletion started {} after it; it owes max(s, T) = 3s",
        secs(b_start as i64 - deleted as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    b.signal(Signal::SIGTERM);
    assert_died_by(&mut b, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

// ---------------------------------------------------------------------------------------------
// 4. The agent restarts and loses its state
// ---------------------------------------------------------------------------------------------

/// The agent restarts on the same port with empty state while A leads (its child takes 1s to
/// stop) and B waits. A must notice once the agent is back (its key watch resets when the index
/// goes backwards) and stop its child; B finds the key missing and waits max(s, T) = 6s from
/// then; nothing overlaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_losing_state_stops_the_leader_and_the_successor_waits() {
    let Some(mut agent) = local_agent() else {
        return;
    };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let name = "restart";
    let key = agent.key(name);
    let timing = Timing {
        ttl: "6s",
        lock_delay: "1s",
        silence: "6s",
        grace: "2s",
    };
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CL_CHILD_STOP_DELAY_MS", "1000")
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    wait_standby(&b);

    let down = now_us();
    agent.restart(restart_options());
    let back = now_us();

    let events = fx.wait_journal("A's child got its stop signal", |ev| {
        ev.iter()
            .any(|e| e.pid == a_child && e.kind == "signal" && e.detail == "TERM")
    });
    let term = events
        .iter()
        .find(|e| e.pid == a_child && e.kind == "signal")
        .unwrap()
        .time_us;
    let (_, b_start) = wait_nth_start(&fx, 1, "B's child started");
    // A exits once its child is gone: then every lifetime is complete.
    let a_status = exit_of(&mut a);
    eprintln!(
        "agent down at 0, back {}, A's child got TERM {}, B's child started {}",
        secs(back as i64 - down as i64),
        secs(term as i64 - down as i64),
        secs(b_start as i64 - down as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    assert!(
        b_start + CLOCK_SLACK_US >= down + us(Duration::from_secs(6)),
        "B started {} after the agent lost the key; a missing key owes max(s, T) = 6s",
        secs(b_start as i64 - down as i64)
    );
    // "Within milliseconds once the agent is back"; the bound leaves room for one retry backoff
    // (the watch's connection broke with the old agent) on a busy machine.
    assert!(
        term <= back + us(Duration::from_millis(2500)),
        "A's child got its stop signal {} after the agent was back",
        secs(term as i64 - back as i64)
    );
    assert_eq!(a_status.code(), Some(76), "{}", a.output_report());
    b.signal(Signal::SIGTERM);
    assert_died_by(&mut b, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

/// The agent restarts with empty state and demands another ACL token. For leader A (old token)
/// the 403 is definitive: it stops its child at once and exits 125. Waiting contender B (old
/// token) exits 125 with Consul's own message. Contender C, started with the new token, finds the
/// key missing and waits max(s, T): nothing overlaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_losing_state_with_a_different_acl_token_is_fatal_and_nothing_overlaps() {
    let Some(mut agent) = DevAgent::builder()
        .ttl_min("1s")
        .acl_token("old-token")
        .start()
    else {
        return;
    };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("acl-restart");
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CONSUL_HTTP_TOKEN", "old-token")
        .spawn();
    let (a_child, _) = wait_nth_start(&fx, 0, "A's child started");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CONSUL_HTTP_TOKEN", "old-token")
        .spawn();
    wait_standby(&b);

    let down = now_us();
    agent.restart(restart_options().acl_token("new-token"));
    let back = now_us();
    let mut c = WrapperBuilder::new(&agent, &fx, &key, &T6_D1_S6)
        .env("CONSUL_HTTP_TOKEN", "new-token")
        .spawn();

    let (_, c_start) = wait_nth_start(&fx, 1, "C's child started");
    // A exits once its child is gone: then every lifetime is complete.
    let a_status = exit_of(&mut a);
    let events = fx.events();
    let term = events
        .iter()
        .find(|e| e.pid == a_child && e.kind == "signal" && e.detail == "TERM")
        .map(|e| e.time_us);
    eprintln!(
        "agent down at 0, back {}, A's child got TERM {:?}, C's child started {}",
        secs(back as i64 - down as i64),
        term.map(|t| secs(t as i64 - down as i64)),
        secs(c_start as i64 - down as i64)
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b, &c]);
    assert!(
        c_start + CLOCK_SLACK_US >= back + us(Duration::from_secs(6)),
        "C started {} after the agent came back without the key; it owes max(s, T) = 6s",
        secs(c_start as i64 - back as i64)
    );
    let term = term.expect("A's child got its stop signal");
    assert!(
        term <= back + us(Duration::from_millis(2500)),
        "A's child got its stop signal {} after the agent was back; a 403 is definitive",
        secs(term as i64 - back as i64)
    );
    assert_eq!(a_status.code(), Some(125), "{}", a.output_report());
    assert_exit_code(&mut b, 125);
    assert!(
        b.stderr_text().contains("ACL not found"),
        "B says what Consul said\n{}",
        b.output_report()
    );
    c.signal(Signal::SIGTERM);
    assert_died_by(&mut c, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

// ---------------------------------------------------------------------------------------------
// 5. Transient Consul errors
// ---------------------------------------------------------------------------------------------

const NO_LEADER: &str = "rpc error making call: No cluster leader";

/// A waiting contender's agent answers `500 No cluster leader` (as during every election among
/// Consul's servers) for 3 seconds: its blocking read is cut and every request gets the 500. It
/// must keep waiting (retrying with backoff, not hammering) and take over when the leader leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cluster_leader_500_keeps_a_waiting_contender_waiting() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("no-leader");
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T3_D3_S3).spawn();
    wait_nth_start(&fx, 0, "A's child started");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T3_D3_S3)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .spawn();
    wait_standby(&b);

    // New requests get the 500; the blocking read in flight is cut, as the servers' would be.
    proxy.fail_http(500, NO_LEADER);
    proxy.pin_all(Mode::Reset);
    let failed_at = Instant::now();
    hold_fault(Duration::from_secs(3));
    let answered = proxy.canned_responses();
    // A wrapper that gave up may still be trying to release through the 500s: its ERROR line
    // is the first sign, its exit the last.
    let status = b.try_status().or_else(|| {
        b.stderr_text()
            .lines()
            .any(|l| l.contains(" ERROR "))
            .then(|| b.wait_exit(Duration::from_secs(15)))
            .flatten()
    });
    eprintln!(
        "B got {answered} answers of 500 in {:?}; B's status then: {status:?}",
        failed_at.elapsed()
    );
    assert_eq!(
        status,
        None,
        "B must keep waiting through 500s\n{}",
        b.output_report()
    );
    assert!(answered >= 1, "B asked the agent during the fault");
    assert!(
        answered <= 50,
        "B sent {answered} requests in 3s: retries back off, they never hammer"
    );
    proxy.set_mode(Mode::Pass);

    // A leaves cleanly: B takes over at once, unless it gave up during the fault.
    a.signal(Signal::SIGTERM);
    assert_died_by(&mut a, Signal::SIGTERM);
    wait_until_sync("B's child starts (or B exits)", DEADLINE, || {
        main_starts(&fx.events()).len() >= 2 || b.try_status().is_some()
    });
    assert_eq!(
        b.try_status(),
        None,
        "B gave up on a transient error\n{}",
        b.output_report()
    );
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    b.signal(Signal::SIGTERM);
    assert_died_by(&mut b, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

/// A waiting contender whose agent is too slow for any renew to come back before the fence it
/// would buy (answers take longer than TTL - grace) still holds a session Consul keeps alive.
/// When the key comes free, it acquires it with that session: it must hold its command back until
/// a renew succeeds in time again, not count the lock it has just won as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_agent_beyond_the_fence_budget_does_not_cost_the_lock_just_won() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("slow-win");
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &T3_D3_S3).spawn();
    wait_nth_start(&fx, 0, "A's child started");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &T3_D3_S3)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .flag("--on-lost", "recontend")
        .spawn();
    wait_standby(&b);
    // Every answer now takes 3s or more: beyond B's fence budget (3s - 1s - 150ms).
    proxy.set_mode(Mode::Delay(Duration::from_millis(1_500)));
    a.signal(Signal::SIGTERM);
    assert_died_by(&mut a, Signal::SIGTERM);
    wait_until_sync("B acquires through the slow agent", DEADLINE, || {
        b.stderr_text().contains("acquired the lock on")
    });
    proxy.set_mode(Mode::Pass);
    wait_until_sync("B's child starts", DEADLINE, || {
        main_starts(&fx.events()).len() >= 2
    });
    let log = b.stderr_text();
    assert!(
        !log.contains("lost leadership"),
        "B counted the lock it had just won as lost\n{}",
        b.output_report()
    );
    assert_eq!(b.try_status(), None, "{}", b.output_report());
    assert_no_overlap(&fx, &deaths, &[&a, &b]);
    b.signal(Signal::SIGTERM);
    assert_died_by(&mut b, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

/// `consul-leader status` through an agent answering `500 No cluster leader` exits 125 and shows
/// Consul's message, not a complaint about a missing `X-Consul-Index` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cluster_leader_500_status_shows_consuls_message() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    proxy.fail_http(500, NO_LEADER);
    let out = Command::new(bin_path())
        .args(["status", "--key", &agent.key("no-leader-status")])
        .env("CONSUL_HTTP_ADDR", proxy.addr().to_string())
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_HTTP_TOKEN_FILE")
        .output()
        .expect("run status");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("status: {} with stderr {err:?}", out.status);
    assert_eq!(out.status.code(), Some(125), "stderr: {err}");
    assert!(err.contains("No cluster leader"), "stderr: {err}");
    assert!(!err.contains("X-Consul-Index"), "stderr: {err}");
}

// ---------------------------------------------------------------------------------------------
// 6. A slow agent
// ---------------------------------------------------------------------------------------------

/// Every request to the leader's agent takes 0.8-1.6s (a proxy delaying each chunk 400ms), within
/// T/2 = 1.5s give or take a chunk. Renews are slow but useful: the leader keeps its child for 4
/// TTLs with no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_agent_within_half_the_ttl_causes_no_false_loss() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let name = "slow";
    let key = agent.key(name);
    let timing = Timing {
        ttl: "3s",
        lock_delay: "3s",
        silence: "3s",
        grace: "500ms",
    };
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CONSUL_LEADER_LOG", "consul_leader=debug")
        .spawn();
    wait_nth_start(&fx, 0, "the child started");
    let (session, _, _) = lock_state(&agent, name).await.unwrap();

    proxy.set_mode(Mode::Delay(Duration::from_millis(400)));
    let before = renews(&w);
    hold_fault(Duration::from_secs(12));
    let during = renews(&w) - before;
    let lost = w.stderr_text().contains("lost leadership");
    let signalled = fx.events().iter().any(|e| e.kind == "signal");
    eprintln!(
        "12s of a slow agent: {during} renews succeeded, lost leadership: {lost}, child \
         signalled: {signalled}"
    );
    proxy.set_mode(Mode::Pass);
    assert!(!lost, "a false loss\n{}", w.output_report());
    assert!(!signalled, "the child was stopped: {:?}", fx.events());
    assert_eq!(w.try_status(), None, "{}", w.output_report());
    assert!(
        during >= 4,
        "only {during} renews succeeded in 4 TTLs\n{}",
        w.output_report()
    );
    assert_eq!(lock_state(&agent, name).await.unwrap().0, session);
    w.signal(Signal::SIGTERM);
    assert_died_by(&mut w, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

// ---------------------------------------------------------------------------------------------
// 7. Inputs
// ---------------------------------------------------------------------------------------------

/// `jobs/report` is held; keys that look the same but are not (`\r` from a CRLF file, a newline,
/// whitespace around it) or are blank are refused with exit 2 and the key shown escaped, instead
/// of running a second leader on a different key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_with_control_characters_or_whitespace_is_refused() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let held = agent.key("jobs/report");
    let mut a = WrapperBuilder::new(&agent, &fx, &held, &T3_D3_S3).spawn();
    wait_nth_start(&fx, 0, "the holder's child started");
    let sessions = || async {
        agent
            .get("/v1/session/list")
            .await
            .expect_status(200)
            .json()
            .as_array()
            .map_or(0, Vec::len)
    };
    let before = sessions().await;
    // The control character escaped the way Rust's `{:?}` or `escape_default` writes it.
    let bad = [
        (format!("{held}\r"), Some(["\\r", "\\u{d}", "\\x0d"])),
        (format!("{held}\n"), Some(["\\n", "\\u{a}", "\\x0a"])),
        (format!("{held}\t"), Some(["\\t", "\\u{9}", "\\x09"])),
        (format!(" {held}"), None),
        (format!("{held} "), None),
        ("   ".to_string(), None),
    ];
    let mut failures = Vec::new();
    for (key, escaped) in &bad {
        let mut w = WrapperBuilder::new(&agent, &fx, key, &T3_D3_S3)
            .flag("--wait", "10s")
            .env("CL_CHILD_EXIT_CODE", "0")
            .spawn();
        let st = exit_of(&mut w);
        let err = w.stderr_text();
        eprintln!("--key {key:?}: {st}, stderr {err:?}");
        if st.code() != Some(2) {
            failures.push(format!("--key {key:?}: {st}, expected exit code 2"));
            continue;
        }
        if err.trim_end().contains(['\r', '\n', '\t']) {
            failures.push(format!(
                "--key {key:?}: the error is not one line, or shows the key raw: {err:?}"
            ));
        }
        if let Some(forms) = escaped
            && !forms.iter().any(|f| err.contains(f))
        {
            failures.push(format!(
                "--key {key:?}: the error does not show the key escaped ({forms:?}): {err:?}"
            ));
        }
    }
    let starts = main_starts(&fx.events()).len();
    let after = sessions().await;
    assert!(
        failures.is_empty() && starts == 1 && after == before,
        "{failures:#?}\nchildren started: {starts} (only the holder's may); sessions before {before}, \
         after {after}"
    );
    a.signal(Signal::SIGTERM);
    assert_died_by(&mut a, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}

/// Durations that would overflow a deadline, or are absurd, are refused when the arguments are
/// parsed: exit 2, nothing on the agent (today some panic with 101, one after winning the lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_that_overflows_or_is_absurd_is_refused_at_parse_time() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let cases = [
        ("--grace", "18446744073709551615s"),
        ("--silence", "18446744073709551615s"),
        ("--wait", "18446744073709551615s"),
        ("--silence", "100y"),
    ];
    let mut failures = Vec::new();
    for (i, (flag, value)) in cases.iter().enumerate() {
        let name = format!("duration-{i}");
        let mut w = WrapperBuilder::new(&agent, &fx, &agent.key(&name), &T3_D3_S3)
            .flag(flag, value)
            .command(&["true"])
            .spawn();
        let st = exit_of(&mut w);
        let err = w.stderr_text();
        eprintln!("{flag} {value}: {st}, stderr {err:?}");
        if st.code() != Some(2) {
            failures.push(format!("{flag} {value}: {st}, expected exit code 2"));
        } else if !err.contains(flag) {
            failures.push(format!(
                "{flag} {value}: the error does not name {flag}: {err:?}"
            ));
        }
        let key = agent.key(&name);
        if !sessions_for(&agent, &key).await.is_empty() || lock_state(&agent, &name).await.is_some()
        {
            failures.push(format!(
                "{flag} {value}: left a session or the key on the agent"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    fx.wait_none_left(DEADLINE);
}

/// A command that does not exist (127) or cannot be executed (126) is found before any session is
/// created: the wrapper exits at once, even while another host holds the key, and the key is never
/// created or acquired (with the cron recipe, the slot's job would otherwise run nowhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unexecutable_command_is_found_before_any_session() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let not_executable = fx.dir.join("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let missing_in_path = format!("no-such-command-{}", common::unique(8));
    let cases = [
        ("missing-path", "/nonexistent/dir/command".to_string(), 127),
        ("missing-lookup", missing_in_path, 127),
        (
            "not-executable",
            not_executable.to_str().unwrap().to_string(),
            126,
        ),
    ];
    let mut failures = Vec::new();
    for (name, command, code) in &cases {
        let started = Instant::now();
        let mut w = WrapperBuilder::new(&agent, &fx, &agent.key(name), &T3_D3_S3)
            .flag("--wait", "10s")
            .command(&[command.as_str()])
            .spawn();
        let st = exit_of(&mut w);
        eprintln!("{command}: {st} after {:?}", started.elapsed());
        if st.code() != Some(*code) {
            failures.push(format!("{command}: {st}, expected exit code {code}"));
        }
        let key = agent.key(name);
        let state = lock_state(&agent, name).await;
        if !sessions_for(&agent, &key).await.is_empty() || state.is_some() {
            failures.push(format!(
                "{command}: the key was created or a session left: {state:?}"
            ));
        }
    }

    // While another wrapper holds the key: at once, not after waiting for the lock.
    let held = agent.key("held");
    let mut a = WrapperBuilder::new(&agent, &fx, &held, &T3_D3_S3).spawn();
    wait_nth_start(&fx, 0, "the holder's child started");
    let started = Instant::now();
    let mut w = WrapperBuilder::new(&agent, &fx, &held, &T3_D3_S3)
        .flag("--wait", "8s")
        .command(&["/nonexistent/dir/command"])
        .spawn();
    let st = exit_of(&mut w);
    let took = started.elapsed();
    eprintln!("behind a holder: {st} after {took:?}");
    if st.code() != Some(127) || took >= Duration::from_secs(5) {
        failures.push(format!(
            "behind a holder: {st} after {took:?}, expected 127 at once"
        ));
    }
    let left = sessions_for(&agent, &held).await.len();
    if left != 1 {
        failures.push(format!(
            "behind a holder: {left} sessions, only the holder's may exist"
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
    a.signal(Signal::SIGTERM);
    assert_died_by(&mut a, Signal::SIGTERM);
    fx.wait_none_left(DEADLINE);
}
