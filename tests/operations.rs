//! What an operator touches around `run`: systemd notifications received on a datagram socket the
//! test binds as `NOTIFY_SOCKET`, log formats and `-q`, and the ACL token never reaching a log line
//! or the child's environment.

mod common;

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::leader::{
    DEADLINE, Fixture, SHORT, WrapperBuilder, agent, exit_of, local_agent, now_us, read_env_file,
};
use common::proxy::{FaultProxy, Mode};
use common::{DevAgent, wait_until_sync};
use nix::sys::signal::Signal;

/// A `NOTIFY_SOCKET` of the test's own: every datagram, with the time it arrived.
struct NotifySocket {
    path: std::path::PathBuf,
    messages: Arc<Mutex<Vec<(u64, String)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(fx: &Fixture) -> NotifySocket {
        let path = fx.dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let messages: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (messages, stop) = (messages.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let now = now_us();
                        let mut m = messages.lock().unwrap();
                        m.extend(text.lines().map(|l| (now, l.to_string())));
                    }
                }
            })
        };
        NotifySocket {
            path,
            messages,
            stop,
            thread: Some(thread),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn times_of(&self, line: &str) -> Vec<u64> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l == line)
            .map(|(t, _)| *t)
            .collect()
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) {
        wait_until_sync(what, DEADLINE, || self.lines().iter().any(|l| pred(l)));
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("notify");
    let leader_sock = NotifySocket::bind(&fx);
    let env_file = fx.dir.join("env");
    let mut leader = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("NOTIFY_SOCKET", leader_sock.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .env("CL_CHILD_ENV_FILE", env_file.to_str().unwrap())
        .spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    leader_sock.wait_for("READY=1", |l| l == "READY=1");
    leader_sock.wait_for("a leader status", |l| {
        l.starts_with("STATUS=leader since ") && l.contains("child pid")
    });
    wait_until_sync("a few watchdog pings", DEADLINE, || {
        leader_sock.times_of("WATCHDOG=1").len() >= 3
    });

    // The child sees none of systemd's variables: they belong to the wrapper.
    let env = read_env_file(&env_file);
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        assert!(!env.contains_key(var), "{var} leaked into the child");
    }

    // A standby is READY too (so systemd does not time it out) and says who leads.
    let fx2 = Fixture::new();
    let standby_sock = NotifySocket::bind(&fx2);
    let mut standby = WrapperBuilder::new(&agent, &fx2, &key, &timing)
        .env("NOTIFY_SOCKET", standby_sock.path.to_str().unwrap())
        .spawn();
    standby_sock.wait_for("READY=1", |l| l == "READY=1");
    standby_sock.wait_for("a standby status", |l| {
        l.starts_with("STATUS=standby, leader is ")
    });

    standby.signal(Signal::SIGTERM);
    let _ = exit_of(&mut standby);
    leader.signal(Signal::SIGTERM);
    let _ = exit_of(&mut leader);
    assert!(
        leader_sock.lines().iter().any(|l| l == "STOPPING=1"),
        "{:?}",
        leader_sock.lines()
    );
    fx.wait_none_left(DEADLINE);
}

#[test]
fn watchdog_pings_stop_when_the_session_cannot_renew() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let key = agent.key("watchdog");
    let sock = NotifySocket::bind(&fx);
    let timing = SHORT;
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("NOTIFY_SOCKET", sock.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "200000")
        .spawn();
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    wait_until_sync("watchdog pings", DEADLINE, || {
        sock.times_of("WATCHDOG=1").len() >= 2
    });
    proxy.set_mode(Mode::Blackhole);
    let events = fx.wait_journal("the fence stopped the child", |ev| {
        ev.iter().any(|e| e.kind == "signal" && e.detail == "TERM")
    });
    let fenced = events.iter().find(|e| e.kind == "signal").unwrap().time_us;
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(76), "{}", w.output_report());
    // Pings stop at the fence: none arrives later than one ping interval after it.
    let late: Vec<u64> = sock
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t > fenced + 200_000)
        .collect();
    assert!(late.is_empty(), "watchdog pings after the fence: {late:?}");
    fx.wait_none_left(DEADLINE);
}

#[test]
fn json_logs_one_object_per_line_and_quiet_keeps_only_errors() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("logs");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .flag("--log-format", "json")
        .env("CL_CHILD_EXIT_CODE", "0")
        .spawn();
    assert_eq!(exit_of(&mut w).code(), Some(0), "{}", w.output_report());
    let lines: Vec<String> = w.stderr_text().lines().map(String::from).collect();
    assert!(lines.len() >= 3, "{lines:?}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["message"].is_string() && v["level"].is_string(), "{line}");
    }
    // The key, session, fencing token and the command's pid are fields, on every line once known.
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let acquired = objects
        .iter()
        .find(|v| v["message"].as_str().unwrap().contains("acquired the lock"))
        .unwrap_or_else(|| panic!("no `acquired` line: {lines:?}"));
    assert_eq!(acquired["key"], key.as_str(), "{acquired}");
    assert!(
        acquired["session"].as_str().is_some_and(|s| s.len() == 36),
        "{acquired}"
    );
    assert!(acquired["fencing_token"].as_u64().is_some(), "{acquired}");
    let released = objects
        .iter()
        .find(|v| v["message"].as_str().unwrap().contains("released the lock"))
        .unwrap_or_else(|| panic!("no `released` line: {lines:?}"));
    assert!(released["pid"].as_u64().is_some(), "{released}");
    assert_eq!(released["session"], acquired["session"]);

    let mut q = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .switch("-q")
        .env("CL_CHILD_EXIT_CODE", "0")
        .spawn();
    assert_eq!(exit_of(&mut q).code(), Some(0), "{}", q.output_report());
    assert_eq!(q.stderr_text(), "", "-q prints nothing when all goes well");
}

#[tokio::test]
async fn the_token_never_reaches_a_log_line_or_the_child() {
    if DevAgent::is_real() {
        eprintln!("SKIPPED: needs a dev agent with --acl-token");
        return;
    }
    let token = "tok-4f1d9c0e-very-secret";
    let agent = DevAgent::builder()
        .ttl_min("1s")
        .acl_token(token)
        .start()
        .unwrap();
    let fx = Fixture::new();
    let key = agent.key("secret");
    let timing = SHORT;
    let env_file = fx.dir.join("env");
    let token_file = fx.dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();

    // Held by someone else first, so the wrapper logs who it waits for.
    let http = agent.http_with_token(token);
    let other = common::create_session_with(&http, serde_json::json!({"Name": "other"})).await;
    let path = format!(
        "{}?acquire={other}&flags={}",
        agent.kv_path("secret"),
        common::leader::LOCK_FLAGS
    );
    assert!(http.put(&path, b"x".to_vec()).await.expect_bool());
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CONSUL_HTTP_TOKEN", token)
        .env("CONSUL_HTTP_TOKEN_FILE", token_file.to_str().unwrap())
        .env("CL_CHILD_ENV_FILE", env_file.to_str().unwrap())
        .env("CONSUL_LEADER_LOG", "consul_leader=debug")
        .spawn();
    wait_until_sync("the wrapper waits", DEADLINE, || {
        w.stderr_text().contains("waiting for the lock")
    });
    let r = http
        .put(&format!("/v1/session/destroy/{other}"), Vec::new())
        .await;
    assert_eq!(r.status, 200);
    fx.wait_journal("the child started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    w.signal(Signal::SIGTERM);
    let _ = exit_of(&mut w);
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        !env.contains(token),
        "the token is in the child's environment"
    );
    assert!(
        !env.contains("CONSUL_HTTP_TOKEN"),
        "token variables reached the child"
    );
    assert!(
        !w.stderr_text().contains(token),
        "the token is in the log:\n{}",
        w.stderr_text()
    );

    // A wrong token: a clear 403 error that names the permission, and still no token in it.
    let wrong = "tok-wrong-0c7e5b";
    let mut bad = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("CONSUL_HTTP_TOKEN", wrong)
        .spawn();
    assert_eq!(
        exit_of(&mut bad).code(),
        Some(125),
        "{}",
        bad.output_report()
    );
    let err = bad.stderr_text();
    assert!(err.contains("session:write"), "{err}");
    assert!(!err.contains(wrong), "{err}");
}

/// The systemd unit in `contrib/` (and in the README) runs as systemd would run it: its ExecStart
/// arguments against a dev agent, `NOTIFY_SOCKET` and `WATCHDOG_USEC` set, and on stop SIGTERM to
/// the main process only (`KillMode=mixed`), which must finish well within `TimeoutStopSec`.
#[test]
fn the_systemd_unit_works_as_systemd_runs_it() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/systemd/report-worker.service"
    ))
    .unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(unit.trim()),
        "README.md must show contrib/systemd/report-worker.service as it is"
    );
    let setting = |name: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("the unit has no {name}="))
            .to_string()
    };
    assert_eq!(setting("Type"), "notify");
    assert_eq!(setting("KillMode"), "mixed");
    let timeout = humantime::parse_duration(&setting("TimeoutStopSec")).unwrap();

    let exec = setting("ExecStart");
    let mut argv: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        argv[0].ends_with("consul-leader") && argv[1] == "run",
        "{exec}"
    );
    let sep = argv.iter().position(|a| *a == "--").unwrap();
    argv.truncate(sep);
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let sock = NotifySocket::bind(&fx);
    let key = agent.key("unit");
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("NOTIFY_SOCKET", sock.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "1000000");
    // The unit's own options, with the test's key (the builder already gave --key).
    let mut rest = argv[2..].iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "--key" => {
                rest.next();
            }
            a if a.starts_with("--") => {
                let value = rest.next().unwrap();
                b = b.flag(a, value);
            }
            a => panic!("unexpected argument {a} in {exec}"),
        }
    }
    let mut w = b.spawn();
    fx.wait_journal("the worker started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    sock.wait_for("READY=1", |l| l == "READY=1");
    let stop_started = std::time::Instant::now();
    w.signal(Signal::SIGTERM);
    let st = w
        .wait_exit(timeout)
        .expect("the wrapper stops within TimeoutStopSec");
    assert!(stop_started.elapsed() < timeout);
    assert_eq!(st.signal(), Some(Signal::SIGTERM as i32));
    fx.wait_none_left(DEADLINE);
}

/// Reads a systemd `EnvironmentFile`: `NAME=value` lines; `#` comments and blank lines skipped.
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Expands an `ExecStart=` line the way systemd does: `${NAME}` is one word, an unbraced `$NAME`
/// is split at whitespace (no words when empty).
fn expand_exec(line: &str, env: &[(String, String)]) -> Vec<String> {
    let value = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            argv.push(value(name));
        } else if let Some(name) = word.strip_prefix('$') {
            argv.extend(value(name).split_whitespace().map(str::to_string));
        } else {
            argv.push(word.to_string());
        }
    }
    argv
}

/// The template unit the package installs, with the example environment file it documents, runs
/// as systemd would run it: the file's variables in the environment (the empty token file
/// setting counts as unset), ExecStart expanded by systemd's rules, the test's key and command in
/// place of the example's, SIGTERM to the main process on stop.
#[test]
fn the_template_unit_runs_the_example_environment_file_as_systemd_would() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/systemd/");
    let unit = std::fs::read_to_string(format!("{dir}consul-leader@.service")).unwrap();
    let env_text = std::fs::read_to_string(format!("{dir}singleton.env")).unwrap();
    let setting = |name: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("the unit has no {name}="))
            .to_string()
    };
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(unit.trim()) && readme.contains(env_text.trim()),
        "README.md must show consul-leader@.service and singleton.env as they are"
    );
    assert_eq!(setting("EnvironmentFile"), "/etc/consul-leader/%i.env");
    assert_eq!(setting("RestartPreventExitStatus"), "2");
    assert_eq!(setting("KillMode"), "mixed");
    let timeout = humantime::parse_duration(&setting("TimeoutStopSec")).unwrap();

    let (agent, timing) = agent();
    let fx = Fixture::new();
    let key = agent.key("template");
    let mut env = environment_file(&env_text);
    for (name, value) in env.iter_mut() {
        match name.as_str() {
            "KEY" => *value = key.clone(),
            "COMMAND" => *value = format!("bash {}", Fixture::child_script()),
            "CONSUL_HTTP_ADDR" => *value = agent.addr().to_string(),
            _ => {}
        }
    }
    assert!(
        env.iter()
            .any(|(k, v)| k == "CONSUL_HTTP_TOKEN_FILE" && v.is_empty()),
        "the example leaves the token file empty: {env:?}"
    );
    let argv = expand_exec(&setting("ExecStart"), &env);
    assert_eq!(argv[0], "consul-leader");
    assert_eq!(&argv[1..4], ["run", "--key", key.as_str()]);
    let sep = argv.iter().position(|a| a == "--").unwrap();

    let sock = NotifySocket::bind(&fx);
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &timing)
        .env("NOTIFY_SOCKET", sock.path.to_str().unwrap())
        .command(
            &argv[sep + 1..]
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
    for (name, value) in &env {
        if name.starts_with("CONSUL_") {
            b = b.env(name, value);
        }
    }
    let mut options = argv[4..sep].iter();
    while let Some(flag) = options.next() {
        b = b.flag(
            flag,
            options.next().expect("every example option takes a value"),
        );
    }
    let mut w = b.spawn();
    fx.wait_journal("the command started", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    sock.wait_for("READY=1", |l| l == "READY=1");
    w.signal(Signal::SIGTERM);
    let st = w
        .wait_exit(timeout)
        .expect("the wrapper stops within TimeoutStopSec");
    assert_eq!(
        st.signal(),
        Some(Signal::SIGTERM as i32),
        "{}",
        w.output_report()
    );
    fx.wait_none_left(DEADLINE);
}
