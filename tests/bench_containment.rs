//! Benchmark: what the host's process count costs a handover (issue 9, item 3). An ignored test,
//! run on demand:
//!
//! ```sh
//! cargo test --release --test bench_containment -- --ignored --nocapture
//! CONSUL_LEADER_BENCH_ROUNDS=40 CONSUL_LEADER_BENCH_IDLE=2000 \
//!     cargo test --release --test bench_containment -- --ignored --nocapture
//! ```
//!
//! The scenario is the clean handover of `bench_run`'s benchmark 2: two contenders on a fresh key
//! per round (the product's default timings), SIGTERM to the leading wrapper, and the time to
//! the standby's child `start` line (and, on the way, to the old child's `signal TERM` line). It
//! runs `CONSUL_LEADER_BENCH_ROUNDS` rounds (default 20) on the quiet host, then the same with
//! `CONSUL_LEADER_BENCH_IDLE` (default 2,000) extra idle processes (`sleep`), and prints both
//! side by side with the ratio of the medians. A stop whose cost follows the command's own tree
//! keeps that ratio near 1; the target is at most 2. (Before the keeper, each stop read
//! `/proc/*/stat` for every process on the host several times: 7 ms became 104 ms.)
//!
//! How the times are taken: the child fixture journals with CLOCK_REALTIME microseconds, the clock
//! of `now_us`, which stamps the SIGTERM; every wait is on a condition, and every round checks
//! that none of its processes is left.

mod common;

use common::leader::{DEADLINE, Event, Fixture, Timing, WrapperBuilder, exit_of, now_us};
use common::{DevAgent, IdleProcesses, Proc, wait_until_sync};
use nix::sys::signal::Signal;

const ROUNDS_ENV: &str = "CONSUL_LEADER_BENCH_ROUNDS";
const IDLE_ENV: &str = "CONSUL_LEADER_BENCH_IDLE";

/// The product's defaults (design §3).
const DEFAULTS: Timing = Timing {
    ttl: "15s",
    lock_delay: "15s",
    silence: "15s",
    grace: "5s",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_containment -- --ignored --nocapture"]
async fn bench_handover_with_idle_host_processes() {
    let rounds = number(ROUNDS_ENV, 20);
    let idle = number(IDLE_ENV, 2000);
    let agent = DevAgent::builder().ttl_min("1s").spawn_local();

    let quiet = handovers(&agent, "quiet", rounds);
    let crowd = IdleProcesses::start(idle);
    let busy = handovers(&agent, "busy", rounds);
    drop(crowd);

    let kind = if cfg!(debug_assertions) {
        "DEBUG build: use --release for real numbers"
    } else {
        "release build"
    };
    println!();
    println!(
        "clean handover, {rounds} rounds each, quiet host vs {idle} extra idle processes [{kind}]"
    );
    let head = format!(
        "{:<40} {:>14} {:>14} {:>14} {:>14} {:>7}",
        "measure (ms)", "quiet med", "quiet p90", "+idle med", "+idle p90", "ratio"
    );
    println!("{head}");
    println!("{}", "-".repeat(head.len()));
    let mut worst = 0.0f64;
    for (what, q, b) in [
        (
            "SIGTERM to leader -> old child's TERM",
            &quiet.to_term,
            &busy.to_term,
        ),
        (
            "SIGTERM to leader -> new child's start",
            &quiet.to_start,
            &busy.to_start,
        ),
    ] {
        let (qm, qp, bm, bp) = (median(q), p90(q), median(b), p90(b));
        let ratio = bm / qm;
        worst = worst.max(ratio);
        println!("{what:<40} {qm:>14.1} {qp:>14.1} {bm:>14.1} {bp:>14.1} {ratio:>6.2}x");
    }
    println!("target: the ratio of medians at most 2x; worst here {worst:.2}x");
}

/// The measures of one block of rounds, in milliseconds.
struct Handovers {
    to_term: Vec<f64>,
    to_start: Vec<f64>,
}

fn handovers(agent: &DevAgent, label: &str, rounds: usize) -> Handovers {
    let mut out = Handovers {
        to_term: Vec::new(),
        to_start: Vec::new(),
    };
    for i in 0..rounds {
        let fx = Fixture::new();
        let key = agent.key(&format!("{label}-{i}"));
        let mut a = WrapperBuilder::new(agent, &fx, &key, &DEFAULTS).spawn();
        wait_events(&fx, "the first child started", |ev| main_starts(ev) >= 1);
        let mut b = WrapperBuilder::new(agent, &fx, &key, &DEFAULTS).spawn();
        wait_until_sync("the second wrapper waits for the lock", DEADLINE, || {
            b.stderr_text().contains("waiting for the lock")
        });

        let sent = now_us();
        a.signal(Signal::SIGTERM);
        let ev = wait_events(&fx, "the standby's child started", |ev| {
            main_starts(ev) >= 2
        });
        let starts: Vec<&Event> = ev.iter().filter(|e| e.is_main_start()).collect();
        let (old, new) = (starts[0], starts[1]);
        let term = ev
            .iter()
            .find(|e| e.pid == old.pid && e.kind == "signal" && e.detail == "TERM")
            .expect("the old child journalled its TERM");
        out.to_term.push(ms_between(sent, term.time_us));
        out.to_start.push(ms_between(sent, new.time_us));
        exit_of(&mut a);
        stop(&mut b);
        fx.wait_none_left(DEADLINE);
    }
    out
}

fn stop(w: &mut Proc) {
    w.signal(Signal::SIGTERM);
    exit_of(w);
}

fn number(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn main_starts(ev: &[Event]) -> usize {
    ev.iter().filter(|e| e.is_main_start()).count()
}

fn wait_events(fx: &Fixture, what: &str, cond: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    wait_until_sync(what, DEADLINE, || {
        events = fx.events();
        cond(&events)
    });
    events
}

/// Milliseconds from `from` to `to` (both µs since the epoch).
fn ms_between(from: u64, to: u64) -> f64 {
    (to as i64 - from as i64) as f64 / 1000.0
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// Nearest rank.
fn rank(samples: &[f64], p: f64) -> f64 {
    let s = sorted(samples);
    let r = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[r - 1]
}

fn median(samples: &[f64]) -> f64 {
    rank(samples, 0.5)
}

fn p90(samples: &[f64]) -> f64 {
    rank(samples, 0.9)
}
