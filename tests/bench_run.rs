//! Benchmarks for `consul-leader run`: the timing figures that design §7 keeps out of the tests
//! (loss detection, handover times, self-fencing against its bound, memory, idle CPU). They are
//! ignored tests, so they need no extra crates and never run with the ordinary suite:
//!
//! ```sh
//! cargo test --release --test bench_run -- --ignored --nocapture --test-threads 1
//! CONSUL_LEADER_BENCH_ROUNDS=5 cargo test --release --test bench_run -- --ignored --nocapture \
//!     --test-threads 1 bench_2    # fewer rounds, one benchmark
//! ```
//!
//! Each benchmark repeats its scenario `CONSUL_LEADER_BENCH_ROUNDS` times (default 20; the slow
//! ones, whose rounds take a TTL or more, a quarter of that) against a local dev agent started with
//! `--session-ttl-min 1s`, on a fresh key per round, and prints min / median / p90 / max (nearest
//! rank) of each measure, next to the bound or expected value it should meet:
//!
//! * `bench_1_loss_detection`: `PUT /v1/session/destroy/<leader's session>` (the timestamp is taken
//!   just before the request) to the child's `signal TERM` journal line. Default timings.
//! * `bench_2_clean_handover`: two contenders; SIGTERM to the leading wrapper to the standby's
//!   child `start` line, and the old child's `stop` to the new child's `start`. The default 15 s
//!   silence must be skipped after a clean release, and is.
//! * `bench_3a/3b_self_fencing_*`: the leader talks to the agent through a `FaultProxy`; at a
//!   random point of its renew period the proxy black-holes everything. Measured: black-hole start
//!   to the child's TERM, against the bound last renew + TTL − grace; the bound is counted from the
//!   black-hole start, an upper limit since the last renew was sent before it. TTL 3 s / grace 1 s,
//!   and the defaults TTL 15 s / grace 5 s (fewer rounds).
//! * `bench_4a/4b_unclean_handover_*`: SIGKILL of the leading wrapper at a random point of its
//!   renew period, to the standby's child `start`, next to the floor last renew + 2 × TTL (when the
//!   agent expires the session) + max(lock-delay, silence). Short timings, and the defaults.
//! * `bench_5_wrapper_memory`: VmRSS and VmHWM (`/proc/<pid>/status`) of wrappers that have led for
//!   three renew periods with a sleeping child, and of standby wrappers waiting on the same keys.
//! * `bench_6_idle_cpu`: utime + stime (`/proc/<pid>/stat`) of idle leading and standby wrappers,
//!   and of the dev agent, over a 30 s window; and, since an idle wrapper uses less than one
//!   10 ms tick in that time, the on-CPU nanoseconds of their threads (`/proc/<pid>/task/*/schedstat`).
//!
//! Every table is followed by the dev agent's VmRSS / VmHWM after the benchmark's rounds.
//!
//! How the times are taken: the child fixture journals `start`, `signal` and `stop` lines with
//! CLOCK_REALTIME microseconds, the clock of [`now_us`], so the test stamps its own actions with
//! `now_us()` and reads the reactions from the journal; waits are on conditions (journal lines,
//! log lines, HTTP state), never on fixed sleeps. The only deliberate pauses are inputs: the random
//! phase at which a fault hits, and the CPU window. The last renew comes from the wrapper's own
//! `renewed session` debug line (JSON log timestamp), written right after the renew's answer: at
//! most a loopback round trip after the renew was sent.
//!
//! Everything runs on loopback, bounded in count and time; every round checks that none of its
//! processes is left. `CONSUL_LEADER_TEST_ADDR` is ignored: the short TTLs and the fault proxy need
//! a local dev agent.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, UNIX_EPOCH};

use common::leader::{
    DEADLINE, DeathWatch, Event, Fixture, Timing, WrapperBuilder, exit_of, lifetimes, lock_state,
    now_us, overlaps,
};
use common::proxy::{FaultProxy, Mode};
use common::{DevAgent, Http, Proc, TEST_ADDR_ENV, wait_until_sync};
use nix::sys::signal::Signal;
use rand::Rng;
use serde_json::Value;

/// Rounds per benchmark.
const ROUNDS_ENV: &str = "CONSUL_LEADER_BENCH_ROUNDS";
const DEFAULT_ROUNDS: usize = 20;

/// The product's defaults (design §3).
const DEFAULTS: Timing = Timing {
    ttl: "15s",
    lock_delay: "15s",
    silence: "15s",
    grace: "5s",
};

/// Short timings for the scenarios whose rounds last a few TTLs.
const SHORT: Timing = Timing {
    ttl: "3s",
    lock_delay: "1s",
    silence: "1s",
    grace: "1s",
};

/// Deadline for a step that waits out an expiry: with the defaults, a SIGKILLed leader's successor
/// starts up to 2 × 15 s + 15 s after the kill.
const SLOW_STEP: Duration = Duration::from_secs(120);

/// The idle-CPU measuring window.
const CPU_WINDOW: Duration = Duration::from_secs(30);

/// The log level that shows every renew, and the filter the wrapper reads it from.
const DEBUG_LOG: (&str, &str) = ("CONSUL_LEADER_LOG", "consul_leader=debug");

// ---------------------------------------------------------------------------------------------
// 1. Loss detection
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_1_loss_detection() {
    let agent = local_agent();
    let n = rounds();
    let (mut to_term, mut to_stop) = (Vec::new(), Vec::new());
    for i in 0..n {
        let fx = Fixture::new();
        let name = format!("loss-{i}");
        let mut w = WrapperBuilder::new(&agent, &fx, &agent.key(&name), &DEFAULTS).spawn();
        wait_events(&fx, "the child started", DEADLINE, |ev| {
            main_starts(ev) >= 1
        });
        let session = lock_state(&agent, &name)
            .await
            .and_then(|(s, _, _)| s)
            .expect("the wrapper holds the key once its child runs");
        let destroyed = now_us();
        agent.destroy_session(&session).await;
        let ev = wait_events(&fx, "the child got TERM and stopped", DEADLINE, |ev| {
            ev.iter().any(is_stop)
        });
        to_term.push(ms_between(destroyed, find(&ev, is_term).time_us));
        to_stop.push(ms_between(destroyed, find(&ev, is_stop).time_us));
        let st = exit_of(&mut w);
        assert_eq!(st.code(), Some(76), "{}", w.output_report());
        fx.wait_none_left(DEADLINE);
    }
    Table::new(
        format!(
            "1. loss detection: session destroyed under the leader ({n} rounds, {})",
            describe(&DEFAULTS)
        ),
        "ms",
        1,
    )
    .row(
        "PUT session/destroy -> child's TERM",
        to_term,
        "milliseconds (design §3.8)",
    )
    .row("PUT session/destroy -> child's stop line", to_stop, "-")
    .print();
    print_agent_memory(&agent);
}

// ---------------------------------------------------------------------------------------------
// 2. Clean handover
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_2_clean_handover() {
    let agent = local_agent();
    let n = rounds();
    let silence = dur(DEFAULTS.silence);
    let (mut to_old_stop, mut gap, mut to_new_start) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let fx = Fixture::new();
        let key = agent.key(&format!("clean-{i}"));
        let mut a = WrapperBuilder::new(&agent, &fx, &key, &DEFAULTS).spawn();
        wait_events(&fx, "the first child started", DEADLINE, |ev| {
            main_starts(ev) >= 1
        });
        let mut b = WrapperBuilder::new(&agent, &fx, &key, &DEFAULTS).spawn();
        wait_standby(&b);

        let sent = now_us();
        a.signal(Signal::SIGTERM);
        let ev = wait_events(&fx, "the standby's child started", DEADLINE, |ev| {
            main_starts(ev) >= 2
        });
        let starts: Vec<&Event> = ev.iter().filter(|e| e.is_main_start()).collect();
        let (old, new) = (starts[0], starts[1]);
        let old_stop = find(&ev, |e| e.pid == old.pid && is_stop(e)).time_us;
        assert!(
            old_stop <= new.time_us,
            "the new child started before the old one stopped: {ev:?}"
        );
        assert!(
            new.time_us < sent + us(silence),
            "the handover took {:.0} ms: the {silence:?} silence was not skipped after a clean \
             release\n{}",
            ms_between(sent, new.time_us),
            b.output_report()
        );
        to_old_stop.push(ms_between(sent, old_stop));
        gap.push(ms_between(old_stop, new.time_us));
        to_new_start.push(ms_between(sent, new.time_us));

        let st = exit_of(&mut a);
        assert_eq!(
            st_signal(st),
            Some(Signal::SIGTERM as i32),
            "{}",
            a.output_report()
        );
        b.signal(Signal::SIGTERM);
        exit_of(&mut b);
        fx.wait_none_left(DEADLINE);
    }
    Table::new(
        format!(
            "2. clean handover: SIGTERM to the leader, one standby ({n} rounds, {})",
            describe(&DEFAULTS)
        ),
        "ms",
        1,
    )
    .row(
        "SIGTERM to leader -> old child's stop line",
        to_old_stop,
        "-",
    )
    .row(
        "old child's stop -> new child's start",
        gap,
        "no silence (clean release)",
    )
    .row(
        "SIGTERM to leader -> new child's start",
        to_new_start,
        &format!("< silence {} (skipped)", DEFAULTS.silence),
    )
    .print();
    print_agent_memory(&agent);
}

// ---------------------------------------------------------------------------------------------
// 3. Self-fencing under a black-hole
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_3a_self_fencing_ttl_3s() {
    self_fencing("3a", &SHORT, rounds()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_3b_self_fencing_defaults() {
    self_fencing("3b", &DEFAULTS, slow_rounds()).await;
}

async fn self_fencing(label: &str, timing: &Timing, n: usize) {
    let agent = local_agent();
    let (ttl, grace) = (dur(timing.ttl), dur(timing.grace));
    let bound = ttl - grace;
    let fence = bound - fence_margin(ttl);
    let (mut cut_term, mut renew_term, mut cut_stop) = (Vec::new(), Vec::new(), Vec::new());
    let mut late = Vec::new();
    for i in 0..n {
        let proxy = FaultProxy::start(agent.addr().parse().expect("a socket address"));
        let fx = Fixture::new();
        let key = agent.key(&format!("fence-{i}"));
        let mut w = WrapperBuilder::new(&agent, &fx, &key, timing)
            .flag("--log-format", "json")
            .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
            .env(DEBUG_LOG.0, DEBUG_LOG.1)
            .spawn();
        wait_events(&fx, "the child started", DEADLINE, |ev| {
            main_starts(ev) >= 1
        });
        wait_until_sync("a first renew", DEADLINE, || renewals(&w) >= 1);
        random_phase(ttl / 3);

        let cut = now_us();
        proxy.set_mode(Mode::Blackhole);
        let ev = wait_events(&fx, "the child got TERM and stopped", DEADLINE, |ev| {
            ev.iter().any(is_stop)
        });
        let term = find(&ev, is_term).time_us;
        let stop = find(&ev, is_stop).time_us;
        let renewed = last_renew_us(&w).expect("the wrapper logged its renews");
        cut_term.push(ms_between(cut, term));
        renew_term.push(ms_between(renewed, term));
        cut_stop.push(ms_between(cut, stop));
        if term > cut + us(bound) {
            late.push(format!(
                "round {i}: TERM {:.1} ms after the black-hole",
                ms_between(cut, term)
            ));
        }

        // Measured; now let the wrapper reach the agent again (the hung connections are reset)
        // so that it can destroy its session and exit instead of timing out against the void.
        proxy.pin_all(Mode::Reset);
        proxy.set_mode(Mode::Pass);
        let st = exit_of(&mut w);
        assert_eq!(st.code(), Some(76), "{}", w.output_report());
        fx.wait_none_left(DEADLINE);
    }
    Table::new(
        format!(
            "{label}. self-fencing: leader black-holed at a random point of its renew period \
             ({n} rounds, {})",
            describe(timing)
        ),
        "ms",
        1,
    )
    .row(
        "black-hole start -> child's TERM",
        cut_term,
        &format!(
            "<= {} (TTL - grace, upper limit)",
            ms_text(bound.as_secs_f64() * 1e3)
        ),
    )
    .row(
        "last renew (logged) -> child's TERM",
        renew_term,
        &format!(
            "fence at TTL - grace - margin = {}",
            ms_text(fence.as_secs_f64() * 1e3)
        ),
    )
    .row(
        "black-hole start -> child's stop line",
        cut_stop,
        &format!(
            "<= {} (TTL: gone before expiry)",
            ms_text(ttl.as_secs_f64() * 1e3)
        ),
    )
    .print();
    print_agent_memory(&agent);
    assert!(late.is_empty(), "the stop signal came too late: {late:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. Unclean handover
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_4a_unclean_handover_ttl_3s() {
    unclean_handover("4a", &SHORT, rounds()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_4b_unclean_handover_defaults() {
    unclean_handover("4b", &DEFAULTS, slow_rounds()).await;
}

async fn unclean_handover(label: &str, timing: &Timing, n: usize) {
    let agent = local_agent();
    let ttl = dur(timing.ttl);
    let wait = dur(timing.lock_delay).max(dur(timing.silence));
    let mut rows: [Vec<f64>; 6] = Default::default();
    let mut overlapping = Vec::new();
    for i in 0..n {
        let fx = Fixture::new();
        let deaths = DeathWatch::start(&fx.journal);
        let name = format!("unclean-{i}");
        let key = agent.key(&name);
        let mut a = WrapperBuilder::new(&agent, &fx, &key, timing)
            .flag("--log-format", "json")
            .env(DEBUG_LOG.0, DEBUG_LOG.1)
            .spawn();
        wait_events(&fx, "the first child started", DEADLINE, |ev| {
            main_starts(ev) >= 1
        });
        let mut b = WrapperBuilder::new(&agent, &fx, &key, timing).spawn();
        wait_standby(&b);
        wait_until_sync("a first renew", DEADLINE, || renewals(&a) >= 1);
        random_phase(ttl / 3);

        // Our own blocking watch on the key: the agent releases it when it expires the session.
        let released = tokio::spawn(wait_released(agent.http().clone(), agent.kv_path(&name)));
        let killed = now_us();
        a.signal(Signal::SIGKILL);
        let ev = wait_events(&fx, "the standby's child started", SLOW_STEP, |ev| {
            main_starts(ev) >= 2
        });
        let released = released.await.expect("the release watch");
        let starts: Vec<&Event> = ev.iter().filter(|e| e.is_main_start()).collect();
        let (old, new) = (starts[0], starts[1].time_us);
        wait_until_sync("the old child is seen dead", DEADLINE, || {
            deaths.ended().contains_key(&old.pid)
        });
        let old_gone = deaths.ended()[&old.pid];
        a.wait_exit(DEADLINE)
            .expect("the SIGKILLed wrapper is reaped");
        let renewed = last_renew_us(&a).expect("the wrapper logged its renews");
        let floor = renewed + us(2 * ttl + wait);

        rows[0].push(ms_between(killed, old_gone));
        rows[1].push(ms_between(renewed, released));
        rows[2].push(ms_between(released, new));
        rows[3].push(ms_between(killed, new));
        rows[4].push(ms_between(killed, floor));
        rows[5].push(ms_between(floor, new));
        overlapping.extend(overlaps(&lifetimes(&ev, &deaths.ended())));

        b.signal(Signal::SIGTERM);
        exit_of(&mut b);
        fx.wait_none_left(DEADLINE);
    }
    let [old_gone, expiry, after_release, to_start, floor, excess] = rows;
    let f = |d: Duration| ms_text(d.as_secs_f64() * 1e3);
    Table::new(
        format!(
            "{label}. unclean handover: SIGKILL of the leader at a random point of its renew \
             period, one standby ({n} rounds, {})",
            describe(timing)
        ),
        "ms",
        1,
    )
    .row(
        "SIGKILL -> old child gone (5 ms polling)",
        old_gone,
        "the group dies with the wrapper",
    )
    .row(
        "last renew (logged) -> agent released the key",
        expiry,
        &format!("2 x TTL = {} (dev agent expiry)", f(2 * ttl)),
    )
    .row(
        "agent released the key -> new child's start",
        after_release,
        &format!("max(lock-delay, silence) = {}", f(wait)),
    )
    .row(
        "SIGKILL -> new child's start",
        to_start,
        "floor + a little (next rows)",
    )
    .row(
        "floor: last renew + 2 TTL + max(d, s) - SIGKILL",
        floor,
        &format!(
            "between {} and {}",
            f(2 * ttl - ttl / 3 + wait),
            f(2 * ttl + wait)
        ),
    )
    .row("new child's start - floor", excess, ">= 0 (about)")
    .print();
    print_agent_memory(&agent);
    assert!(
        overlapping.is_empty(),
        "children overlapped: {overlapping:?}"
    );
}

/// Blocks on the key at `path` until it has no `Session`; returns when that was seen (µs).
async fn wait_released(http: Http, path: String) -> u64 {
    let mut index = 0;
    loop {
        let r = http
            .get(&format!("{path}?index={index}&wait=60s"))
            .await
            .expect_status(200);
        let v = r.json();
        if v[0].get("Session").is_none() {
            return now_us();
        }
        index = r.index();
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Memory, 6. idle CPU
// ---------------------------------------------------------------------------------------------

/// Leading and standby wrappers, one pair per key, all on one fixture.
struct Pairs {
    fx: Fixture,
    leaders: Vec<Proc>,
    standbys: Vec<Proc>,
}

impl Pairs {
    fn start(agent: &DevAgent, n: usize, what: &str, debug: bool) -> Pairs {
        let fx = Fixture::new();
        let (mut leaders, mut standbys) = (Vec::new(), Vec::new());
        for i in 0..n {
            let key = agent.key(&format!("{what}-{i}"));
            let spawn = || {
                let b = WrapperBuilder::new(agent, &fx, &key, &DEFAULTS);
                if debug {
                    b.env(DEBUG_LOG.0, DEBUG_LOG.1).spawn()
                } else {
                    b.spawn()
                }
            };
            leaders.push(spawn());
            wait_events(&fx, "the leader's child started", DEADLINE, |ev| {
                main_starts(ev) > i
            });
            let s = spawn();
            wait_standby(&s);
            standbys.push(s);
        }
        Pairs {
            fx,
            leaders,
            standbys,
        }
    }

    /// Stops the standbys first (so that none takes over), then the leaders.
    fn stop(mut self) {
        for w in self.standbys.iter_mut().chain(self.leaders.iter_mut()) {
            w.signal(Signal::SIGTERM);
            exit_of(w);
        }
        self.fx.wait_none_left(DEADLINE);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_5_wrapper_memory() {
    let agent = local_agent();
    let n = slow_rounds();
    let pairs = Pairs::start(&agent, n, "mem", true);
    // Three renew periods (TTL/3 each) of leading: steady state, past the first renews.
    wait_until_sync("every leader renewed three times", SLOW_STEP, || {
        pairs.leaders.iter().all(|w| renewals(w) >= 3)
    });
    let sample = |ws: &[Proc], field: &str| -> Vec<f64> {
        ws.iter()
            .map(|w| {
                status_kib(w.pid(), field).expect("the wrapper's /proc status") as f64 / 1024.0
            })
            .collect()
    };
    let table = Table::new(
        format!(
            "5. wrapper memory: {n} leaders (sleeping child, 3+ renews) and {n} standbys, {}",
            describe(&DEFAULTS)
        ),
        "MiB",
        2,
    )
    .row("leader VmRSS", sample(&pairs.leaders, "VmRSS"), "-")
    .row("leader VmHWM (peak)", sample(&pairs.leaders, "VmHWM"), "-")
    .row("standby VmRSS", sample(&pairs.standbys, "VmRSS"), "-")
    .row(
        "standby VmHWM (peak)",
        sample(&pairs.standbys, "VmHWM"),
        "-",
    );
    let agent_pid = agent.pid().expect("a local dev agent");
    let table = table
        .row(
            "dev agent VmRSS (after the rounds)",
            vec![status_kib(agent_pid, "VmRSS").unwrap_or(0) as f64 / 1024.0],
            "-",
        )
        .row(
            "dev agent VmHWM (after the rounds)",
            vec![status_kib(agent_pid, "VmHWM").unwrap_or(0) as f64 / 1024.0],
            "-",
        );
    pairs.stop();
    table.print();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test bench_run -- --ignored --nocapture"]
async fn bench_6_idle_cpu() {
    let agent = local_agent();
    let n = slow_rounds();
    // As deployed: the default log level.
    let pairs = Pairs::start(&agent, n, "cpu", false);
    let agent_pid = agent.pid().expect("a local dev agent");
    let all: Vec<u32> = pairs
        .leaders
        .iter()
        .chain(&pairs.standbys)
        .map(Proc::pid)
        .chain([agent_pid])
        .collect();
    let before: Vec<(u64, u64)> = all.iter().map(|p| (cpu_ticks(*p), cpu_ns(*p))).collect();
    // The window is the measurement's input, not a wait for a condition.
    std::thread::sleep(CPU_WINDOW);
    let after: Vec<(u64, u64)> = all.iter().map(|p| (cpu_ticks(*p), cpu_ns(*p))).collect();
    pairs.stop();

    let hz = clock_ticks_per_second();
    let used: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.0 - b.0) as f64 * 1000.0 / hz)
        .collect();
    let precise: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.1.saturating_sub(b.1) as f64 / 1e6)
        .collect();
    let share = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        format!(
            "median {:.3}% of one core",
            rank(&s, 0.5) / (CPU_WINDOW.as_secs_f64() * 1000.0) * 100.0
        )
    };
    let (leaders, rest) = used.split_at(n);
    let (standbys, dev) = rest.split_at(n);
    let (p_leaders, rest) = precise.split_at(n);
    let (p_standbys, p_dev) = rest.split_at(n);
    Table::new(
        format!(
            "6. idle CPU over {}s: {n} leaders with a sleeping child, {n} standbys, {}",
            CPU_WINDOW.as_secs(),
            describe(&DEFAULTS)
        ),
        "ms",
        2,
    )
    .row(
        &format!("leader utime+stime ({hz:.0} ticks/s)"),
        leaders.to_vec(),
        &share(leaders),
    )
    .row(
        &format!("standby utime+stime ({hz:.0} ticks/s)"),
        standbys.to_vec(),
        &share(standbys),
    )
    .row(
        &format!("dev agent utime+stime ({hz:.0} ticks/s)"),
        dev.to_vec(),
        &share(dev),
    )
    .row(
        "leader on-CPU time (task schedstat)",
        p_leaders.to_vec(),
        &share(p_leaders),
    )
    .row(
        "standby on-CPU time (task schedstat)",
        p_standbys.to_vec(),
        &share(p_standbys),
    )
    .row(
        "dev agent on-CPU time (task schedstat)",
        p_dev.to_vec(),
        &share(p_dev),
    )
    .print();
    print_agent_memory(&agent);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn rounds() -> usize {
    match std::env::var(ROUNDS_ENV) {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{ROUNDS_ENV}={v:?} is not a positive number")),
        Err(_) => DEFAULT_ROUNDS,
    }
}

/// Rounds for the benchmarks whose rounds take a TTL or more.
fn slow_rounds() -> usize {
    (rounds() / 4).max(1)
}

fn local_agent() -> DevAgent {
    if DevAgent::is_real() {
        eprintln!("note: {TEST_ADDR_ENV} is ignored; these benchmarks need a local dev agent");
    }
    DevAgent::builder().ttl_min("1s").spawn_local()
}

fn dur(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("bad duration {s:?}: {e}"))
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn describe(t: &Timing) -> String {
    format!(
        "TTL {} lock-delay {} silence {} grace {}",
        t.ttl, t.lock_delay, t.silence, t.grace
    )
}

/// `election::fence_margin`, for the expected fence time in the table.
fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Milliseconds from `from` to `to` (both µs since the epoch); negative if `to` is earlier.
fn ms_between(from: u64, to: u64) -> f64 {
    (to as i64 - from as i64) as f64 / 1000.0
}

fn ms_text(ms: f64) -> String {
    format!("{ms:.0} ms")
}

/// Sleeps a time drawn uniformly from [0, max): a fault then hits at a random point of the renew
/// period, as a real one would. This pause is the benchmark's input, not a wait for a condition.
fn random_phase(max: Duration) {
    std::thread::sleep(max.mul_f64(rand::rng().random_range(0.0..1.0)));
}

fn is_term(e: &Event) -> bool {
    e.kind == "signal" && e.detail == "TERM"
}

fn is_stop(e: &Event) -> bool {
    e.kind == "stop"
}

fn main_starts(ev: &[Event]) -> usize {
    ev.iter().filter(|e| e.is_main_start()).count()
}

#[track_caller]
fn find(ev: &[Event], pred: impl Fn(&Event) -> bool) -> &Event {
    ev.iter()
        .find(|e| pred(e))
        .unwrap_or_else(|| panic!("no such event in the journal: {ev:?}"))
}

/// Like `Fixture::wait_journal`, with a deadline of our own.
fn wait_events(
    fx: &Fixture,
    what: &str,
    deadline: Duration,
    cond: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    wait_until_sync(what, deadline, || {
        events = fx.events();
        cond(&events)
    });
    events
}

fn wait_standby(w: &Proc) {
    wait_until_sync("the second wrapper waits for the lock", DEADLINE, || {
        w.stderr_text().contains("waiting for the lock")
    });
}

fn st_signal(st: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    st.signal()
}

/// How many renews the wrapper has logged (needs the debug level).
fn renewals(w: &Proc) -> usize {
    w.stderr_text().matches("renewed session").count()
}

/// The timestamp (µs since the epoch) of the wrapper's last `renewed session` line, from its JSON
/// log. It is written right after the renew's answer: at most a loopback round trip after the
/// renew was sent, so times measured from it are at most that much short.
fn last_renew_us(w: &Proc) -> Option<u64> {
    w.stderr_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("renewed session"))
        })
        .filter_map(|v| {
            let t = humantime::parse_rfc3339(v["timestamp"].as_str()?).ok()?;
            Some(t.duration_since(UNIX_EPOCH).ok()?.as_micros() as u64)
        })
        .next_back()
}

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM, ...).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime of a process (all its threads), in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
    let (_, rest) = stat.rsplit_once(')').expect("a stat line");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> u64 { f[n - 3].parse().expect("a tick count") };
    field(14) + field(15)
}

/// Time on the CPU of a process's live threads, in nanoseconds: the sum of the first field of
/// `/proc/<pid>/task/*/schedstat`. Far finer than the ticks of `cpu_ticks` (an idle wrapper uses
/// less than one tick in 30 s), but a thread that exits takes its share with it: a lower bound.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `getconf CLK_TCK` (the unit of utime and stime); 100 on every Linux we know of.
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn print_agent_memory(agent: &DevAgent) {
    let pid = agent.pid().expect("a local dev agent");
    let mib = |f: &str| {
        status_kib(pid, f)
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "dev agent after the rounds: VmRSS {}, VmHWM {}",
        mib("VmRSS"),
        mib("VmHWM")
    );
}

/// The value at nearest rank `p` (0..=1) of sorted samples.
fn rank(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let r = ((p * n as f64).ceil() as usize).clamp(1, n);
    sorted[r - 1]
}

/// A printed table: one row per measure, its samples summarised.
struct Table {
    title: String,
    unit: &'static str,
    decimals: usize,
    rows: Vec<(String, Vec<f64>, String)>,
}

impl Table {
    fn new(title: String, unit: &'static str, decimals: usize) -> Table {
        Table {
            title,
            unit,
            decimals,
            rows: Vec::new(),
        }
    }

    fn row(mut self, what: &str, samples: Vec<f64>, bound: &str) -> Table {
        self.rows
            .push((what.to_string(), samples, bound.to_string()));
        self
    }

    fn print(&self) {
        let kind = if cfg!(debug_assertions) {
            "DEBUG build: use --release for real numbers"
        } else {
            "release build"
        };
        let u = self.unit;
        println!();
        println!("{} [{kind}]", self.title);
        let head = format!(
            "{:<48} {:>3} {:>9} {:>9} {:>9} {:>9}  bound / expected",
            "measure",
            "n",
            format!("min {u}"),
            format!("med {u}"),
            format!("p90 {u}"),
            format!("max {u}"),
        );
        println!("{head}");
        println!("{}", "-".repeat(head.len() + 16));
        let d = self.decimals;
        for (what, samples, bound) in &self.rows {
            let mut s = samples.clone();
            s.sort_by(f64::total_cmp);
            if s.is_empty() {
                println!("{what:<48} {:>3}", 0);
                continue;
            }
            println!(
                "{what:<48} {:>3} {:>9.d$} {:>9.d$} {:>9.d$} {:>9.d$}  {bound}",
                s.len(),
                s[0],
                rank(&s, 0.5),
                rank(&s, 0.9),
                s[s.len() - 1],
            );
        }
    }
}
