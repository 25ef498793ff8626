//! `consul-leader run` end to end: the real binary against a dev agent (or the real agent of
//! `CONSUL_LEADER_TEST_ADDR`), the child fixture's journal, real signals. Each test is named after
//! the scenario of the `run` issue it pins.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::leader::{
    DEADLINE, Fixture, WrapperBuilder, acquire_as_lock, agent, clean_key, exit_of, lifetimes,
    lock_state, now_us, overlaps, parent, pid_alive, read_env_file, sessions_for,
};
use common::{Proc, wait_until};
use nix::sys::signal::Signal;

/// Count of journal events of `kind` with `detail`.
fn count(events: &[common::leader::Event], kind: &str, detail: &str) -> usize {
    events
        .iter()
        .filter(|e| e.kind == kind && e.detail == detail)
        .count()
}

async fn assert_no_session(agent: &common::DevAgent, key: &str) {
    wait_until("no session of this key is left", DEADLINE, || async {
        sessions_for(agent, key).await.is_empty()
    })
    .await;
}

// 1. One contender: exit code passthrough, 128+n, no session left, value says released clean.
#[tokio::test]
async fn t1_exit_code_passes_through_and_release_is_clean() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("one");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CL_CHILD_EXIT_CODE", "3")
        .spawn();
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(3), "{}", w.output_report());
    let (session, lock_index, value) = lock_state(&agent, "one").await.expect("the key exists");
    assert_eq!(session, None, "the key is released");
    assert_eq!(lock_index, 1);
    assert_eq!(value["released"], "clean", "value: {value}");
    assert_no_session(&agent, &key).await;
    fx.wait_none_left(DEADLINE);
}

#[tokio::test]
async fn t1_signal_death_becomes_128_plus_n() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("sig");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CL_CHILD_KILL_SELF", "USR2")
        .spawn();
    let st = exit_of(&mut w);
    assert_eq!(
        st.code(),
        Some(128 + Signal::SIGUSR2 as i32),
        "{}",
        w.output_report()
    );
    assert_no_session(&agent, &key).await;
}

// 2. Three contenders: never two children at once; SIGTERM hands over with no silence wait.
#[tokio::test]
async fn t2_three_contenders_hand_over_cleanly_one_at_a_time() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("three");
    clean_key(&agent, "three").await;
    // A silence far longer than the deadlines below: a handover that waited it would time out.
    let mut wrappers: Vec<Proc> = (0..3)
        .map(|_| {
            WrapperBuilder::new(&agent, &fx, &key, &timing)
                .flag("--silence", "10m")
                .spawn()
        })
        .collect();
    for round in 1..=3 {
        let events = fx.wait_journal(&format!("child number {round} started"), |ev| {
            ev.iter().filter(|e| e.is_main_start()).count() >= round
        });
        let starts: Vec<_> = events.iter().filter(|e| e.is_main_start()).collect();
        assert_eq!(
            starts.len(),
            round,
            "exactly one more child started: {events:?}"
        );
        let lock_index = lock_state(&agent, "three").await.unwrap().1;
        assert_eq!(
            lock_index,
            round as u64 + 1,
            "each new holder bumps LockIndex"
        );
        // Find the leading wrapper (the parent of the child's keeper) and stop it.
        let child_pid = starts.last().unwrap().pid;
        let leader = wrappers
            .iter()
            .position(|w| parent(child_pid).and_then(parent) == Some(w.pid()))
            .unwrap_or_else(|| panic!("no wrapper is the parent of child {child_pid}"));
        let mut w = wrappers.remove(leader);
        w.signal(Signal::SIGTERM);
        let st = exit_of(&mut w);
        assert_eq!(
            st.signal(),
            Some(Signal::SIGTERM as i32),
            "{}",
            w.output_report()
        );
    }
    let events = fx.events();
    let lives = lifetimes(&events, &BTreeMap::new());
    assert_eq!(lives.len(), 3);
    assert!(
        overlaps(&lives).is_empty(),
        "children overlapped: {:?}",
        overlaps(&lives)
    );
    assert_no_session(&agent, &key).await;
    fx.wait_none_left(DEADLINE);
}

// 3. Session destroyed under the leader: the child is stopped at once, the wrapper exits 76.
#[tokio::test]
async fn t3_session_destroy_stops_the_child_and_exits_lost() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("destroy");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let (session, _, _) = lock_state(&agent, "destroy").await.unwrap();
    agent.destroy_session(&session.expect("held")).await;
    let events = fx.wait_journal("the child got TERM", |ev| count(ev, "signal", "TERM") >= 1);
    assert_eq!(count(&events, "signal", "TERM"), 1);
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(76), "{}", w.output_report());
    assert!(
        w.stderr_text().contains("lost leadership"),
        "{}",
        w.stderr_text()
    );
    assert_no_session(&agent, &key).await;
    fx.wait_none_left(DEADLINE);
}

#[tokio::test]
async fn t3_recontend_leads_again_after_a_loss() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("again");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--on-lost", "recontend")
        .spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let (session, _, _) = lock_state(&agent, "again").await.unwrap();
    agent.destroy_session(&session.unwrap()).await;
    let events = fx.wait_journal("a second child started", |ev| {
        ev.iter().filter(|e| e.is_main_start()).count() >= 2
    });
    assert!(
        w.try_status().is_none(),
        "the wrapper stays: {}",
        w.output_report()
    );
    let lives = lifetimes(&events, &BTreeMap::new());
    assert!(overlaps(&lives).is_empty(), "{:?}", overlaps(&lives));
    let (_, lock_index, _) = lock_state(&agent, "again").await.unwrap();
    assert_eq!(lock_index, 2, "a new term means a new fencing token");
    w.signal(Signal::SIGTERM);
    assert_eq!(exit_of(&mut w).signal(), Some(Signal::SIGTERM as i32));
    assert_no_session(&agent, &key).await;
    fx.wait_none_left(DEADLINE);
}

// 4. A child that ignores TERM, with grandchildren (one setsid): all dead after grace, and only
//    then is the key released.
#[tokio::test]
async fn t4_stubborn_tree_is_killed_before_the_release() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("tree");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CL_CHILD_EXIT_ON", "")
        .env("CL_CHILD_GRANDCHILDREN", "ignore-term setsid")
        .spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    assert!(
        fx.live().len() >= 3,
        "the child and its two grandchildren run"
    );
    w.signal(Signal::SIGTERM);
    // The moment the key shows released, nothing of the tree may be alive.
    wait_until("the key is released", DEADLINE, || async {
        let released = lock_state(&agent, "tree")
            .await
            .is_some_and(|s| s.0.is_none());
        if released {
            assert!(
                fx.live().is_empty(),
                "released while processes live: {:?}",
                fx.live()
            );
        }
        released
    })
    .await;
    let st = exit_of(&mut w);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGTERM as i32),
        "{}",
        w.output_report()
    );
    fx.wait_none_left(Duration::from_secs(1));
    assert_no_session(&agent, &key).await;
}

// 5. TERM, INT, HUP in every phase: prompt clean exit by that signal, no child, no session.
async fn signal_in_phase(phase: &str, sig: Signal) {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let name = format!("phase-{phase}-{}", sig.as_str().to_lowercase());
    let key = agent.key(&name);
    let mut holder: Option<String> = None;
    match phase {
        "waiting" => {
            let s = agent
                .create_session(serde_json::json!({"TTL": "60s", "Name": "other"}))
                .await;
            assert!(acquire_as_lock(&agent, &name, &s, b"x").await);
            holder = Some(s);
        }
        "silence" => {
            // A previous holder that vanished without a clean release: the next leader waits
            // out its silence.
            let s = agent
                .create_session(serde_json::json!({"LockDelay": "0s", "Name": "gone"}))
                .await;
            let path = format!(
                "{}?acquire={s}&flags=3304740253564472344",
                agent.kv_path(&name)
            );
            assert!(agent.put(&path, b"{}".to_vec()).await.expect_bool());
            agent.destroy_session(&s).await;
        }
        _ => {}
    }
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing);
    if phase == "silence" {
        b = b.flag("--silence", "10m");
    }
    if phase == "stopping" {
        b = b.env("CL_CHILD_EXIT_ON", "").flag("--grace", "1s");
    }
    let mut w = b.spawn();
    match phase {
        "waiting" => {
            let who = "waiting for the lock";
            common::wait_until_sync(who, DEADLINE, || w.stderr_text().contains(who));
        }
        "silence" => {
            let what = "silence";
            common::wait_until_sync(what, DEADLINE, || w.stderr_text().contains("silence:"));
        }
        _ => {
            fx.wait_journal("the child started", |ev| {
                ev.iter().any(|e| e.is_main_start())
            });
        }
    }
    if phase == "stopping" {
        // Start the stop sequence; the child ignores TERM, so the wrapper is now in its grace.
        w.signal(Signal::SIGTERM);
        fx.wait_journal("the child got TERM", |ev| count(ev, "signal", "TERM") >= 1);
    }
    w.signal(sig);
    let st = exit_of(&mut w);
    let expected = if phase == "stopping" {
        Signal::SIGTERM
    } else {
        sig
    };
    assert_eq!(
        st.signal(),
        Some(expected as i32),
        "{phase}/{sig}: {}",
        w.output_report()
    );
    if phase == "waiting" || phase == "silence" {
        assert!(
            fx.events().iter().all(|e| !e.is_main_start()),
            "no child may start"
        );
    }
    fx.wait_none_left(DEADLINE);
    assert_no_session(&agent, &key).await;
    if let Some(s) = holder {
        agent.destroy_session(&s).await;
    }
}

#[tokio::test]
async fn t5_signals_while_waiting() {
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signal_in_phase("waiting", sig).await;
    }
}

#[tokio::test]
async fn t5_signals_during_silence() {
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signal_in_phase("silence", sig).await;
    }
}

#[tokio::test]
async fn t5_signals_while_running() {
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signal_in_phase("running", sig).await;
    }
}

#[tokio::test]
async fn t5_signals_while_stopping() {
    // A second TERM or INT skips the grace; HUP during stopping is just part of the same stop.
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signal_in_phase("stopping", sig).await;
    }
}

// 6. --wait 0 on a held key: exit 75 at once, nothing started, no session left.
#[tokio::test]
async fn t6_wait_zero_on_a_held_key_exits_busy() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("busy");
    let s = agent
        .create_session(serde_json::json!({"TTL": "60s", "Name": "other"}))
        .await;
    assert!(acquire_as_lock(&agent, "busy", &s, b"x").await);
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--wait", "0")
        .spawn();
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(75), "{}", w.output_report());
    assert!(fx.events().is_empty(), "nothing was started");
    assert_no_session(&agent, &key).await;
    agent.destroy_session(&s).await;
}

/// The cron case writes nothing to Consul: one read answers "busy", no session is created (a
/// create and a destroy are two Raft writes per host per slot on a real cluster).
#[tokio::test]
async fn try_once_on_a_held_key_creates_no_session() {
    let Some(agent) = common::leader::local_agent() else {
        return;
    };
    let fx = Fixture::new();
    let key = agent.key("busy-read");
    let s = agent
        .create_session(serde_json::json!({"TTL": "60s", "Name": "other"}))
        .await;
    assert!(acquire_as_lock(&agent, "busy-read", &s, b"x").await);
    let sessions_index = || async { agent.get("/v1/session/list").await.index() };
    let before = sessions_index().await;
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &common::leader::SHORT)
        .flag("--wait", "0")
        .spawn();
    assert_eq!(exit_of(&mut w).code(), Some(75), "{}", w.output_report());
    assert!(
        w.stderr_text().contains("held by session"),
        "{}",
        w.stderr_text()
    );
    assert_eq!(
        sessions_index().await,
        before,
        "no session was created or destroyed"
    );
    agent.destroy_session(&s).await;
}

// 7. SIGKILL to the leading wrapper: its child dies; the next leader starts only after the
//    session expired and the silence passed since the key was seen free.
#[tokio::test]
async fn t7_sigkilled_leader_takes_its_child_along_and_the_next_waits() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("kill");
    let silence = humantime::parse_duration(timing.silence).unwrap();
    let mut first = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CL_CHILD_GRANDCHILDREN", "ignore-term")
        .spawn();
    let events = fx.wait_journal("the first child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let first_child = events.iter().find(|e| e.is_main_start()).unwrap().pid;
    let mut second = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    common::wait_until_sync("the second wrapper waits", DEADLINE, || {
        second.stderr_text().contains("waiting for the lock")
    });
    first.signal(Signal::SIGKILL);
    let _ = exit_of(&mut first);
    // The child and the grandchild in its group die with the wrapper.
    common::wait_until_sync("the first child's tree is gone", DEADLINE, || {
        !pid_alive(first_child) && fx.live().is_empty()
    });
    let killed_at = now_us();
    // Watch for the moment Consul frees the key (the session expires after up to 2 x TTL).
    let freed_at = std::cell::Cell::new(0u64);
    wait_until("the key is freed by session expiry", DEADLINE, || async {
        let free = lock_state(&agent, "kill")
            .await
            .is_some_and(|s| s.0.is_none() || s.1 >= 2);
        if free && freed_at.get() == 0 {
            freed_at.set(now_us());
        }
        free
    })
    .await;
    let events = fx.wait_journal("the second child started", |ev| {
        ev.iter().filter(|e| e.is_main_start()).count() >= 2
    });
    let second_start = events
        .iter()
        .filter(|e| e.is_main_start())
        .nth(1)
        .unwrap()
        .time_us;
    assert!(
        second_start > killed_at,
        "the second child started after the first died"
    );
    // Lower bound: the silence counted from when the second wrapper first saw the key free,
    // which is no earlier than the expiry, which is at least TTL after the first's last renew. Our
    // own `freed_at` observation comes after the real expiry, so allow its polling delay.
    let gap = second_start.saturating_sub(freed_at.get());
    let poll_slack = 500_000;
    assert!(
        gap + poll_slack >= silence.as_micros() as u64,
        "the second child started {gap}us after the key was freed; silence is {silence:?}"
    );
    assert!(
        fx.events()
            .iter()
            .any(|e| e.is_main_start() && e.pid != first_child)
    );
    second.signal(Signal::SIGTERM);
    let _ = exit_of(&mut second);
    fx.wait_none_left(DEADLINE);
}

// 8. Commands that cannot run: 127 / 126 at once, a clear message, no session created and the
//    key never touched.
#[tokio::test]
async fn t8_missing_and_unexecutable_commands() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("nocmd");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .command(&["/nonexistent/definitely-not-here"])
        .spawn();
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(127), "{}", w.output_report());
    assert!(w.stderr_text().contains("not found"), "{}", w.stderr_text());
    assert_eq!(
        lock_state(&agent, "nocmd").await,
        None,
        "the key was never acquired"
    );
    assert_no_session(&agent, &key).await;

    let file = fx.dir.join("not-executable");
    std::fs::write(&file, "#!/bin/sh\necho hi\n").unwrap();
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .command(&[file.to_str().unwrap()])
        .spawn();
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(126), "{}", w.output_report());
    assert!(
        w.stderr_text().contains("cannot be executed"),
        "{}",
        w.stderr_text()
    );
    assert_no_session(&agent, &key).await;
}

// 9. USR1 reaches the child; its environment holds the fencing token, which grows per holder.
#[tokio::test]
async fn t9_signals_are_forwarded_and_the_fencing_token_grows() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("fence");
    let mut tokens = Vec::new();
    for round in 0..2 {
        let env_file = fx.dir.join(format!("env-{round}"));
        let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
            .env("CL_CHILD_ENV_FILE", env_file.to_str().unwrap())
            .env("CONSUL_HTTP_TOKEN", "")
            .spawn();
        fx.wait_journal("the child started", |ev| {
            ev.iter().filter(|e| e.is_main_start()).count() > round
        });
        w.signal(Signal::SIGUSR1);
        fx.wait_journal("USR1 reached the child", |ev| {
            count(ev, "signal", "USR1") > round
        });
        let env = read_env_file(&env_file);
        assert_eq!(env.get("CONSUL_LEADER_KEY"), Some(&key));
        assert_eq!(
            env.get("CONSUL_LOCK_HELD").map(String::as_str),
            Some("true")
        );
        assert!(
            env.get("CONSUL_LEADER_SESSION")
                .is_some_and(|s| s.len() == 36)
        );
        assert!(
            !env.contains_key("CONSUL_HTTP_TOKEN"),
            "token variables are removed"
        );
        let token: u64 = env["CONSUL_LEADER_FENCING_TOKEN"].parse().unwrap();
        tokens.push(token);
        w.signal(Signal::SIGTERM);
        let _ = exit_of(&mut w);
    }
    assert!(tokens[1] > tokens[0], "fencing tokens grow: {tokens:?}");
    fx.wait_none_left(DEADLINE);
}
