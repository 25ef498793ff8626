//! What leader priority buys, measured on the real binary against a local dev agent: the time
//! from the end of a transient fault (the leader's session destroyed) to a command running again,
//! when the previous holder comes back (`--on-lost recontend`, priority) against when another
//! host takes over (the previous holder exits on the loss). Ignored: run on demand with
//!
//! ```sh
//! cargo test --release --test bench_priority -- --ignored --nocapture
//! ```
//!
//! `CONSUL_LEADER_BENCH_ROUNDS` (default 5) sets the rounds of each case. Timings: TTL 10s,
//! lock-delay 5s, silence 10s, grace 1s, priority window 12s.

mod common;

use std::time::Duration;

use common::leader::{
    DEADLINE, Fixture, Timing, WrapperBuilder, clean_key, exit_of, lock_state, now_us,
};
use common::{DevAgent, Proc, wait_until_sync};
use nix::sys::signal::Signal;

const TIMING: Timing = Timing {
    ttl: "10s",
    lock_delay: "5s",
    silence: "10s",
    grace: "1s",
};

fn rounds() -> usize {
    std::env::var("CONSUL_LEADER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

fn wrapper(agent: &DevAgent, fx: &Fixture, key: &str, id: &str, on_lost: &str) -> Proc {
    WrapperBuilder::new(agent, fx, key, &TIMING)
        .flag("--id", id)
        .flag("--priority-window", "12s")
        .flag("--on-lost", on_lost)
        .spawn()
}

fn starts(fx: &Fixture) -> usize {
    fx.events().iter().filter(|e| e.is_main_start()).count()
}

/// One round: A leads, B waits, A's session is destroyed; returns the fault-to-new-command time
/// and whether A (the previous holder) was the one running it.
async fn round(agent: &DevAgent, name: &str, a_returns: bool) -> (Duration, bool) {
    let fx = Fixture::new();
    let key = agent.key(name);
    clean_key(agent, name).await;
    let mut a = wrapper(
        agent,
        &fx,
        &key,
        "host-a",
        if a_returns { "recontend" } else { "exit" },
    );
    fx.wait_journal("A's command runs", |ev| {
        ev.iter().filter(|e| e.is_main_start()).count() == 1
    });
    let mut b = wrapper(agent, &fx, &key, "host-b", "recontend");
    wait_until_sync("B waits", DEADLINE, || {
        b.stderr_text().contains("waiting for the lock")
    });
    let session = lock_state(agent, name).await.and_then(|s| s.0).unwrap();
    let fault = now_us();
    agent.destroy_session(&session).await;
    let events = fx.wait_journal("a command runs again", |ev| {
        ev.iter().filter(|e| e.is_main_start()).count() >= 2
    });
    let second = events.iter().filter(|e| e.is_main_start()).nth(1).unwrap();
    let by_a = a
        .stderr_text()
        .contains(&format!("started the command, pid {}", second.pid));
    for w in [&mut a, &mut b] {
        w.signal(Signal::SIGTERM);
        let _ = exit_of(w);
    }
    assert!(starts(&fx) >= 2);
    fx.wait_none_left(DEADLINE);
    (Duration::from_micros(second.time_us - fault), by_a)
}

fn summary(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "{name:<44} min {:>7.2}s  median {:>7.2}s  max {:>7.2}s",
        v[0].as_secs_f64(),
        v[(v.len() - 1) / 2].as_secs_f64(),
        v[v.len() - 1].as_secs_f64()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark; see the module docs"]
async fn bench_priority_return_against_takeover() {
    let Some(agent) = DevAgent::builder().start() else {
        return;
    };
    let mut back = Vec::new();
    let mut takeover = Vec::new();
    for i in 0..rounds() {
        // Interleaved, so that both cases see the same machine.
        let (t, by_a) = round(&agent, &format!("prio-back-{i}"), true).await;
        assert!(
            by_a,
            "with priority, the previous holder runs the command again"
        );
        back.push(t);
        let (t, by_a) = round(&agent, &format!("prio-over-{i}"), false).await;
        assert!(!by_a);
        takeover.push(t);
    }
    let ratio =
        takeover[(takeover.len() - 1) / 2].as_secs_f64() / back[(back.len() - 1) / 2].as_secs_f64();
    eprintln!(
        "fault (session destroyed) to a command running again; TTL 10s, lock-delay 5s, silence \
         10s, --priority-window 12s, {} rounds each\n{}\n{}\ntakeover / return (medians): {ratio:.2}",
        back.len(),
        summary("same host again (priority, recontend)", back),
        summary("another host takes over (holder gone)", takeover),
    );
}
