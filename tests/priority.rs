//! Leader priority after a transient fault (`--id`, `--priority-window`), the restart policy
//! while leading (`--restart`, `--restart-delay`, `--restart-limit`) and `--forward-signals`,
//! driving the real binary against a dev agent. Every test also checks, from the child fixture's
//! journal, that no two children ever ran at once: neither option may weaken that.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::leader::{
    DEADLINE, DeathWatch, Event, Fixture, Timing, WrapperBuilder, clean_key, exit_of, lifetimes,
    local_agent, lock_state, now_us, overlaps, read_env_file,
};
use common::proxy::{FaultProxy, Mode};
use common::{DevAgent, Proc, wait_until_sync};
use nix::sys::signal::Signal;

/// TTL 3s, lock-delay 2s, silence 3s, grace 500ms: lock-delay well below the window, so that the
/// window, not Consul, is what holds the other contender back.
const TIMING: Timing = Timing {
    ttl: "3s",
    lock_delay: "2s",
    silence: "3s",
    grace: "500ms",
};
const WINDOW: Duration = Duration::from_secs(8);

fn contender<'a>(agent: &'a DevAgent, fx: &'a Fixture, key: &str, id: &str) -> WrapperBuilder<'a> {
    WrapperBuilder::new(agent, fx, key, &TIMING)
        .flag("--id", id)
        .flag("--priority-window", "8s")
        .flag("--on-lost", "recontend")
}

fn starts(events: &[Event]) -> Vec<&Event> {
    events.iter().filter(|e| e.is_main_start()).collect()
}

fn assert_no_overlap(fx: &Fixture, deaths: &DeathWatch) {
    let lives = lifetimes(&fx.events(), &deaths.ended());
    assert!(
        overlaps(&lives).is_empty(),
        "children overlapped: {:?}",
        overlaps(&lives)
    );
}

/// The session of whoever holds `name` now.
async fn holder_session(agent: &DevAgent, name: &str) -> String {
    lock_state(agent, name)
        .await
        .and_then(|s| s.0)
        .expect("the key is held")
}

/// Which wrapper started the child with `pid`.
fn started_by(w: &Proc, pid: u32) -> bool {
    w.stderr_text()
        .contains(&format!("started the command, pid {pid}"))
}

/// A session destroyed under the leader (a transient fault): the leader, staying in the race,
/// gets the key back as soon as lock-delay allows and restarts its command at once (its own
/// process stopped the old child), although another contender was waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_fault_returns_the_lock_to_the_previous_holder_first() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("prio-back");
    clean_key(&agent, "prio-back").await;
    let mut a = contender(&agent, &fx, &key, "host-a").spawn();
    fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let mut b = contender(&agent, &fx, &key, "host-b").spawn();
    wait_until_sync("B waits", DEADLINE, || {
        b.stderr_text().contains("waiting for the lock")
    });
    let session = holder_session(&agent, "prio-back").await;
    let fault = now_us();
    agent.destroy_session(&session).await;
    let events = fx.wait_journal("a second child started", |ev| starts(ev).len() >= 2);
    let second = starts(&events)[1];
    assert!(
        started_by(&a, second.pid),
        "the previous holder must get the lock back first; B: {}",
        b.stderr_text()
    );
    assert!(
        b.stderr_text().contains("has priority"),
        "B must say why it waits: {}",
        b.stderr_text()
    );
    // Back after lock-delay (2s), not after lock-delay plus a silence.
    let back = second.time_us - fault;
    assert!(
        back < 2_000_000 + 2_500_000,
        "A's command ran again {back}us after the fault; lock-delay is 2s and A owes no silence"
    );
    assert_no_overlap(&fx, &deaths);
    a.signal(Signal::SIGTERM);
    assert_eq!(exit_of(&mut a).signal(), Some(Signal::SIGTERM as i32));
    // A's release is clean: B starts at once.
    fx.wait_journal("B's child started", |ev| starts(ev).len() >= 3);
    b.signal(Signal::SIGTERM);
    let _ = exit_of(&mut b);
    assert_no_overlap(&fx, &deaths);
    fx.wait_none_left(DEADLINE);
}

/// The previous holder does not come back (it exits on the loss): the other contender takes
/// over once the window, counted from its first sight of the free key, has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_holder_that_does_not_return_is_replaced_after_the_window() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("prio-gone");
    clean_key(&agent, "prio-gone").await;
    let mut a = contender(&agent, &fx, &key, "host-a")
        .flag("--on-lost", "exit")
        .spawn();
    fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let mut b = contender(&agent, &fx, &key, "host-b").spawn();
    wait_until_sync("B waits", DEADLINE, || {
        b.stderr_text().contains("waiting for the lock")
    });
    let session = holder_session(&agent, "prio-gone").await;
    let fault = now_us();
    agent.destroy_session(&session).await;
    assert_eq!(exit_of(&mut a).code(), Some(76), "{}", a.output_report());
    // While B defers, `status` names who has priority and until when at the latest.
    let asked = std::time::SystemTime::now();
    let o = std::process::Command::new(common::bin_path())
        .args(["status", "--json", "--key", &key])
        .env("CONSUL_HTTP_ADDR", agent.addr())
        .env_remove("CONSUL_HTTP_TOKEN")
        .output()
        .expect("run status");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status --json");
    assert_eq!(json["priority"], "host-a", "{json}");
    assert_eq!(json["priority_window_ms"], 8000, "{json}");
    let until = humantime::parse_rfc3339(json["priority_until"].as_str().expect("priority_until"))
        .expect("an RFC 3339 time");
    let ahead = until
        .duration_since(asked)
        .expect("priority_until is after the question");
    assert!(
        ahead <= WINDOW + Duration::from_secs(2) && ahead + Duration::from_secs(2) >= WINDOW,
        "priority_until is {ahead:?} after the question; the window is {WINDOW:?}"
    );
    let events = fx.wait_journal("B's child started", |ev| starts(ev).len() >= 2);
    let late = starts(&events)[1].time_us - fault;
    assert!(
        late + 300_000 >= WINDOW.as_micros() as u64,
        "B started {late}us after the fault, inside A's priority window of {WINDOW:?}"
    );
    assert!(
        late < WINDOW.as_micros() as u64 + 5_000_000,
        "B started {late}us after the fault; the window is {WINDOW:?}"
    );
    assert_no_overlap(&fx, &deaths);
    b.signal(Signal::SIGTERM);
    let _ = exit_of(&mut b);
    fx.wait_none_left(DEADLINE);
}

/// A clean release is the holder's choice to leave: no priority, the other starts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_release_gives_no_priority() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("prio-clean");
    clean_key(&agent, "prio-clean").await;
    let mut a = contender(&agent, &fx, &key, "host-a").spawn();
    fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let mut b = contender(&agent, &fx, &key, "host-b").spawn();
    wait_until_sync("B waits", DEADLINE, || {
        b.stderr_text().contains("waiting for the lock")
    });
    a.signal(Signal::SIGTERM);
    assert_eq!(exit_of(&mut a).signal(), Some(Signal::SIGTERM as i32));
    let stopped = now_us();
    let events = fx.wait_journal("B's child started", |ev| starts(ev).len() >= 2);
    let gap = starts(&events)[1].time_us.saturating_sub(stopped);
    assert!(
        gap < 2_000_000,
        "B started {gap}us after A's clean release; it owes no wait and A has no priority"
    );
    assert!(!b.stderr_text().contains("has priority"));
    assert_no_overlap(&fx, &deaths);
    b.signal(Signal::SIGTERM);
    let _ = exit_of(&mut b);
    fx.wait_none_left(DEADLINE);
}

/// A partitioned leader whose session is destroyed while it is cut off keeps its child until its
/// fence; the other contender leaves it the key for the window, and when the partition heals,
/// the old leader takes it back. Priority never lets two children run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_with_a_partitioned_old_leader_never_overlaps() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("prio-part");
    clean_key(&agent, "prio-part").await;
    let mut a = contender(&agent, &fx, &key, "host-a")
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .spawn();
    let events = fx.wait_journal("A's child started", |ev| starts(ev).len() == 1);
    let a_child = starts(&events)[0].pid;
    let mut b = contender(&agent, &fx, &key, "host-b").spawn();
    wait_until_sync("B waits", DEADLINE, || {
        b.stderr_text().contains("waiting for the lock")
    });
    let session = holder_session(&agent, "prio-part").await;
    proxy.set_mode(Mode::Blackhole);
    agent.destroy_session(&session).await;
    // A cannot hear about it: its fence stops the child.
    wait_until_sync("A's child is gone (its fence)", DEADLINE, || {
        deaths.ended().contains_key(&a_child)
    });
    proxy.pin_all(Mode::Reset);
    proxy.set_mode(Mode::Pass);
    let events = fx.wait_journal("a second child started", |ev| starts(ev).len() >= 2);
    let second = starts(&events)[1];
    let by_a = started_by(&a, second.pid);
    let by_b = started_by(&b, second.pid);
    assert!(by_a || by_b, "someone started child {}", second.pid);
    assert_no_overlap(&fx, &deaths);
    for w in [&mut a, &mut b] {
        w.signal(Signal::SIGTERM);
        let _ = exit_of(w);
    }
    assert_no_overlap(&fx, &deaths);
    fx.wait_none_left(DEADLINE);
}

/// A crash-looping command: restarted with a doubling delay while the lock is held (the fencing
/// token stays the term's), then, past the limit, the wrapper steps down (clean release, the
/// command's last exit code) and the waiting contender takes over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_reaches_the_restart_limit_and_steps_down() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("crash-loop");
    clean_key(&agent, "crash-loop").await;
    let env_file = fx.dir.join("env");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &TIMING)
        .env("CL_CHILD_EXIT_CODE", "9")
        .env("CL_CHILD_ENV_FILE", env_file.to_str().unwrap())
        .flag("--restart", "on-failure")
        .flag("--restart-delay", "100ms")
        .flag("--restart-limit", "3/1m")
        .spawn();
    let events = fx.wait_journal("three starts", |ev| starts(ev).len() >= 3);
    let token = read_env_file(&env_file)["CONSUL_LEADER_FENCING_TOKEN"].clone();
    // Another contender arrives while the third run is still cleaning up or about to.
    let mut c = WrapperBuilder::new(&agent, &fx, &key, &TIMING).spawn();
    let st = exit_of(&mut b);
    assert_eq!(st.code(), Some(9), "{}", b.output_report());
    let log = b.stderr_text();
    assert!(log.contains("restarting the command in 100ms"), "{log}");
    assert!(log.contains("restarting the command in 200ms"), "{log}");
    assert!(log.contains("stepping down"), "{log}");
    assert_eq!(starts(&events).len(), 3, "exactly three starts: {events:?}");
    assert_eq!(
        read_env_file(&env_file)["CONSUL_LEADER_FENCING_TOKEN"],
        token,
        "the fencing token stays the same within one term"
    );
    // The stepped-down wrapper released clean: C starts without a silence.
    let events = fx.wait_journal("C's child started", |ev| starts(ev).len() >= 4);
    assert!(starts(&events)[3].time_us > starts(&events)[2].time_us);
    assert_no_overlap(&fx, &deaths);
    c.signal(Signal::SIGTERM);
    let _ = exit_of(&mut c);
    fx.wait_none_left(DEADLINE);
}

/// A stop signal during the pause before a restart ends the wrapper at once, by that signal,
/// with a clean release and no further start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_during_the_restart_backoff_ends_the_wrapper_at_once() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let key = agent.key("backoff");
    clean_key(&agent, "backoff").await;
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &TIMING)
        .env("CL_CHILD_EXIT_CODE", "1")
        .flag("--restart", "always")
        .flag("--restart-delay", "10m")
        .spawn();
    wait_until_sync("the wrapper pauses before a restart", DEADLINE, || {
        w.stderr_text().contains("restarting the command in 10m")
    });
    w.signal(Signal::SIGTERM);
    let st = exit_of(&mut w);
    assert_eq!(
        st.signal(),
        Some(Signal::SIGTERM as i32),
        "{}",
        w.output_report()
    );
    assert_eq!(starts(&fx.events()).len(), 1, "no restart after the signal");
    let (session, _, value) = lock_state(&agent, "backoff").await.unwrap();
    assert_eq!(session, None);
    assert_eq!(value["released"], "clean", "{value}");
    fx.wait_none_left(DEADLINE);
}

/// `--forward-signals HUP`: HUP reaches the command and no longer stops it; TERM still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hup_is_forwarded_to_the_command_when_asked() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let key = agent.key("hup");
    clean_key(&agent, "hup").await;
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &TIMING)
        .flag("--forward-signals", "HUP,USR1")
        // The fixture exits on HUP by default; here it only journals it.
        .env("CL_CHILD_EXIT_ON", "TERM INT QUIT")
        .spawn();
    fx.wait_journal("the child started", |ev| starts(ev).len() == 1);
    w.signal(Signal::SIGHUP);
    fx.wait_journal("the child got HUP", |ev| {
        ev.iter().any(|e| e.kind == "signal" && e.detail == "HUP")
    });
    assert!(w.try_status().is_none(), "HUP must not stop the wrapper");
    w.signal(Signal::SIGTERM);
    assert_eq!(exit_of(&mut w).signal(), Some(Signal::SIGTERM as i32));
    fx.wait_none_left(DEADLINE);
}

/// What the usage errors of these options say.
#[test]
fn priority_restart_and_forwarding_options_are_checked() {
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(common::bin_path());
        cmd.args(["run", "--key", "k"])
            .args(extra)
            .args(["--", "true"]);
        cmd.output().unwrap()
    };
    for (args, needle) in [
        (
            &["--forward-signals", "TERM"][..],
            "TERM and INT always stop",
        ),
        (
            &["--stop-signal", "USR1", "--forward-signals", "USR1"][..],
            "--forward-signals",
        ),
        (&["--restart-limit", "0/10m"][..], "--restart-limit"),
        (&["--restart-limit", "five"][..], "N/PERIOD"),
        (&["--id", " padded"][..], "--id"),
    ] {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
