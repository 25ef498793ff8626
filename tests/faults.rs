//! Never two leaders: faults injected from outside the binary (a TCP proxy between a wrapper and
//! the agent, session destroys, failed checks, SIGKILL) while the child fixture's journal records
//! every lifetime. Each test checks the safety bounds of `election`'s module docs.

mod common;

use std::time::Duration;

use common::leader::{
    DEADLINE, DeathWatch, Fixture, SHORT, Timing, WrapperBuilder, exit_of, lifetimes, local_agent,
    lock_state, now_us, overlaps,
};
use common::proxy::{FaultProxy, Mode};
use common::{Proc, wait_until, wait_until_sync};
use nix::sys::signal::Signal;

/// Holds a fault for a fixed time on purpose: the fault's duration is the test's input, not a
/// stand-in for waiting on a condition.
fn hold_fault(d: Duration) {
    std::thread::sleep(d);
}

/// 1. Black-hole the leader: its child is stopped before (last renew + TTL), the other contender
///    starts only after the session expired plus max(lock-delay, silence), and nothing overlaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_blackholed_leader_fences_itself_before_its_session_can_expire() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("blackhole");
    let timing = Timing {
        ttl: "3s",
        lock_delay: "1s",
        silence: "3s",
        grace: "1s",
    };
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CL_CHILD_EXIT_ON", "")
        .spawn();
    fx.wait_journal("A's child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let (a_session, _, _) = lock_state(&agent, "blackhole").await.unwrap();
    let a_session = a_session.unwrap();
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    wait_until_sync("B waits", DEADLINE, || {
        b.stderr_text().contains("waiting for the lock")
    });

    let cut = now_us();
    proxy.set_mode(Mode::Blackhole);
    // A cannot renew any more: its last good renew was sent before `cut`.
    let events = fx.wait_journal("A's child got its stop signal", |ev| {
        ev.iter().any(|e| e.kind == "signal" && e.detail == "TERM")
    });
    let term = events
        .iter()
        .find(|e| e.kind == "signal" && e.detail == "TERM")
        .unwrap();
    let ttl_us = 3_000_000;
    assert!(
        term.time_us < cut + ttl_us,
        "the stop signal came {}us after the cut; it must come before last renew + TTL",
        term.time_us - cut
    );
    // The whole group is gone (it ignored TERM: SIGKILL after grace) before cut + TTL.
    let a_child = events.iter().find(|e| e.is_main_start()).unwrap().pid;
    wait_until_sync("A's child is dead", DEADLINE, || {
        deaths.ended().contains_key(&a_child)
    });
    assert!(
        deaths.ended()[&a_child] < cut + ttl_us,
        "A's child outlived last renew + TTL"
    );

    // The agent expires A's session (at most 2 x TTL after its last renew), then B waits out
    // max(lock-delay, silence) from when it saw the key free.
    let expired_at = std::cell::Cell::new(0u64);
    wait_until("A's session expired on the agent", DEADLINE, || async {
        let gone = agent.session_info(&a_session).await.is_none();
        if gone && expired_at.get() == 0 {
            expired_at.set(now_us());
        }
        gone
    })
    .await;
    let events = fx.wait_journal("B's child started", |ev| {
        ev.iter().filter(|e| e.is_main_start()).count() >= 2
    });
    let b_start = events
        .iter()
        .filter(|e| e.is_main_start())
        .nth(1)
        .unwrap()
        .time_us;
    let poll_slack = 500_000;
    assert!(
        b_start + poll_slack >= expired_at.get() + 3_000_000,
        "B started {}us after A's session expired; silence is 3s",
        b_start as i64 - expired_at.get() as i64
    );
    let lives = lifetimes(&events, &deaths.ended());
    assert!(
        overlaps(&lives).is_empty(),
        "children overlapped: {:?}",
        overlaps(&lives)
    );

    // A counts itself lost and exits with 76, even though it cannot reach the agent.
    let st = exit_of(&mut a);
    assert_eq!(st.code(), Some(76), "{}", a.output_report());
    b.signal(Signal::SIGTERM);
    let _ = exit_of(&mut b);
    fx.wait_none_left(DEADLINE);
}

/// 2. A 3-second black-hole with TTL 15s, timed to cover a renew, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_short_blackhole_is_tolerated() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let key = agent.key("blip");
    let timing = Timing {
        ttl: "15s",
        lock_delay: "15s",
        silence: "15s",
        grace: "5s",
    };
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CONSUL_LEADER_LOG", "consul_leader=debug")
        .spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let (session, _, _) = lock_state(&agent, "blip").await.unwrap();
    let renewals = |w: &Proc| w.stderr_text().matches("renewed session").count();
    wait_until_sync("a first renew", DEADLINE, || renewals(&w) >= 1);
    // Renews come every TTL/3 = 5s: a black-hole from 3.5s to 6.5s after one covers the next.
    hold_fault(Duration::from_millis(3500));
    let before = renewals(&w);
    proxy.set_mode(Mode::Blackhole);
    hold_fault(Duration::from_secs(3));
    proxy.set_mode(Mode::Pass);
    wait_until_sync("a renew succeeds after the black-hole", DEADLINE, || {
        renewals(&w) > before
    });
    assert!(
        fx.events().iter().all(|e| e.kind != "signal"),
        "the child was signalled: {:?}\n{}",
        fx.events(),
        w.output_report()
    );
    assert_eq!(
        lock_state(&agent, "blip").await.unwrap().0,
        session,
        "same holder"
    );
    assert!(w.try_status().is_none(), "{}", w.output_report());
    w.signal(Signal::SIGTERM);
    let _ = exit_of(&mut w);
    fx.wait_none_left(DEADLINE);
}

/// 3. The agent answers 500 or 429 for a while: no false loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_server_errors_are_not_a_loss() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let key = agent.key("errors");
    let timing = Timing {
        ttl: "6s",
        lock_delay: "3s",
        silence: "6s",
        grace: "1s",
    };
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let (session, _, _) = lock_state(&agent, "errors").await.unwrap();
    for (status, body) in [(500, "rpc error making call: No cluster leader"), (429, "")] {
        proxy.fail_http(status, body.to_string());
        let before = w.stderr_text().matches("session renew failed").count();
        wait_until_sync("a renew fails", DEADLINE, || {
            w.stderr_text().matches("session renew failed").count() > before
        });
        proxy.set_mode(Mode::Pass);
        let healed = w.stderr_text().matches("session renew works again").count();
        wait_until_sync("renew works again", DEADLINE, || {
            w.stderr_text().matches("session renew works again").count() > healed
        });
    }
    assert!(
        fx.events().iter().all(|e| e.kind != "signal"),
        "{}",
        w.output_report()
    );
    assert_eq!(lock_state(&agent, "errors").await.unwrap().0, session);
    w.signal(Signal::SIGTERM);
    let _ = exit_of(&mut w);
    fx.wait_none_left(DEADLINE);
}

/// 4. A check bound with --check goes critical: the child is stopped at once.
#[tokio::test]
async fn f4_failed_bound_check_ends_leadership() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let key = agent.key("check");
    let check = agent.name("app-health");
    agent
        .register_check(serde_json::json!({"Name": check, "TTL": "10m"}))
        .await;
    agent.check_update("pass", &check).await;
    let timing = SHORT;
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--check", &check)
        .spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    agent.check_update("fail", &check).await;
    fx.wait_journal("the child got TERM", |ev| {
        ev.iter().any(|e| e.kind == "signal" && e.detail == "TERM")
    });
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(76), "{}", w.output_report());
    fx.wait_none_left(DEADLINE);
}
