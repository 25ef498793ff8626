//! `consul-leader status` through the real binary: held, free, cleanly released, ended without a
//! clean release, held by `consul lock`, absent, not a lock; text and JSON; exit codes.

mod common;

use std::process::{Command, Output};

use common::leader::{
    DEADLINE, Fixture, LOCK_FLAGS, WrapperBuilder, acquire_as_lock, agent, lock_state, modify_index,
};
use common::{DevAgent, bin_path};
use nix::sys::signal::Signal;
use serde_json::Value;

fn status(agent: &DevAgent, key: &str, json: bool) -> Output {
    let mut cmd = Command::new(bin_path());
    cmd.args(["status", "--key", key])
        .env("CONSUL_HTTP_ADDR", agent.addr());
    if json {
        cmd.arg("--json");
    }
    cmd.env_remove("CONSUL_HTTP_TOKEN")
        .output()
        .expect("run status")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

#[tokio::test]
async fn status_follows_a_key_through_its_life() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("life");

    // Absent.
    let o = status(&agent, &key, false);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("free (the key does not exist)"),
        "{}",
        text(&o)
    );
    assert_eq!(json(&status(&agent, &key, true))["state"], "absent");

    // Held by a wrapper.
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let (session, _, _) = lock_state(&agent, "life").await.unwrap();
    let token = modify_index(&agent, "life").await.unwrap();
    let o = status(&agent, &key, false);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("state           held"), "{t}");
    assert!(
        t.contains(&format!(":{}", w.pid())),
        "the holder names the wrapper's pid: {t}"
    );
    let j = json(&status(&agent, &key, true));
    assert_eq!(j["held"], true);
    assert_eq!(j["session"], session.clone().unwrap());
    assert_eq!(j["pid"], w.pid());
    assert_eq!(j["fencing_token"], token, "the acquire's ModifyIndex");
    assert_eq!(j["written_by"], "consul-leader");
    assert!(j["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{j}");
    assert!(j["node"].is_string(), "{j}");

    // Released cleanly.
    w.signal(Signal::SIGTERM);
    let _ = w.wait_exit(DEADLINE).expect("the wrapper exits");
    let o = status(&agent, &key, false);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("released        cleanly, at "),
        "{}",
        text(&o)
    );
    let j = json(&status(&agent, &key, true));
    assert_eq!(
        (j["state"].as_str(), j["released_clean"].as_bool()),
        (Some("free"), Some(true))
    );

    // Held again, then ended from outside: free, but not cleanly.
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    fx.wait_journal("the second child started", |ev| {
        ev.iter().filter(|e| e.is_main_start()).count() >= 2
    });
    let (session, _, _) = lock_state(&agent, "life").await.unwrap();
    agent.destroy_session(&session.unwrap()).await;
    assert_eq!(w.wait_exit(DEADLINE).and_then(|s| s.code()), Some(76));
    let j = json(&status(&agent, &key, true));
    assert_eq!(j["released_clean"], false, "{j}");
    assert!(text(&status(&agent, &key, false)).contains("not cleanly"));
    fx.wait_none_left(DEADLINE);
}

#[tokio::test]
async fn status_reads_consul_lock_keys_and_names_other_keys() {
    let (agent, _) = agent();
    let session = agent
        .create_session(serde_json::json!({"Name": "Consul lock for 'backup' at 'jobs/backup'"}))
        .await;
    assert!(acquire_as_lock(&agent, "clock", &session, b"").await);
    let o = status(&agent, &agent.key("clock"), false);
    assert_eq!(o.status.code(), Some(0));
    let t = text(&o);
    assert!(
        t.contains("Consul lock for 'backup'"),
        "the session name is shown: {t}"
    );
    assert!(t.contains("consul lock / api.Lock"), "{t}");
    let j = json(&status(&agent, &agent.key("clock"), true));
    assert_eq!(
        (j["held"].as_bool(), j["flags"].as_u64()),
        (Some(true), Some(LOCK_FLAGS))
    );
    agent.destroy_session(&session).await;

    // Plain data and a semaphore are not "free": each gets its own answer and exit 3.
    agent.kv_put("plain", b"some data").await;
    let o = status(&agent, &agent.key("plain"), false);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("not a lock: the key holds data"),
        "{}",
        text(&o)
    );
    assert_eq!(
        json(&status(&agent, &agent.key("plain"), true))["state"],
        "data"
    );

    // `consul lock -n 2 sem` writes `sem/.lock` with the semaphore flags and this value.
    let holder = agent
        .create_session(serde_json::json!({"Name": "sem"}))
        .await;
    let path = format!(
        "{}?flags={}",
        agent.kv_path("sem/.lock"),
        16210313421097356768u64
    );
    let value = format!(r#"{{"Limit":2,"Holders":{{"{holder}":true}}}}"#);
    assert!(agent.http().put(&path, value).await.expect_bool());
    let o = status(&agent, &agent.key("sem/.lock"), false);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("semaphore") && t.contains(&holder), "{t}");
    let j = json(&status(&agent, &agent.key("sem/.lock"), true));
    assert_eq!(
        (j["state"].as_str(), j["limit"].as_u64()),
        (Some("semaphore"), Some(2))
    );
    agent.destroy_session(&holder).await;
}

#[test]
fn status_errors_say_what_to_fix() {
    let o = Command::new(bin_path())
        .args(["status", "--key", "jobs/x"])
        .env("CONSUL_HTTP_ADDR", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("CONSUL_HTTP_ADDR"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let o = Command::new(bin_path())
        .args(["status", "--key", "/jobs/x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("leading slash"));
}

/// A wrapper that waited before it won records when it won, not when it began to wait.
#[tokio::test]
async fn since_is_when_the_lock_was_won() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("since");
    let mut first = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    fx.wait_journal("the first child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let mut second = WrapperBuilder::new(&agent, &fx, &key, &timing).spawn();
    common::wait_until_sync("the second waits", DEADLINE, || {
        second.stderr_text().contains("waiting for the lock")
    });
    // Let the second wait across a second boundary (`since` has whole seconds): the wait is the
    // scenario's input, not a stand-in for a condition.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let handed_over = std::time::SystemTime::now();
    first.signal(Signal::SIGTERM);
    let _ = first.wait_exit(DEADLINE).expect("the first wrapper exits");
    fx.wait_journal("the second child started", |ev| {
        ev.iter().filter(|e| e.is_main_start()).count() >= 2
    });
    let j = json(&status(&agent, &key, true));
    assert_eq!(j["pid"], second.pid(), "{j}");
    let since = humantime::parse_rfc3339(j["since"].as_str().unwrap()).unwrap();
    let floor = handed_over - std::time::Duration::from_secs(1);
    assert!(
        since >= floor,
        "since {j} is before the handover at {handed_over:?}"
    );
    second.signal(Signal::SIGTERM);
    let _ = second.wait_exit(DEADLINE);
    fx.wait_none_left(DEADLINE);
}
