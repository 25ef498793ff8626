//! Shared harness for the integration tests: real processes, real HTTP, no fixed sleeps.
//!
//! * [`Proc`] spawns a process, keeps draining its stdout and stderr (so it can never block on a
//!   full pipe), can wait for a stdout line or for its exit, and on drop stops it (SIGTERM, then
//!   SIGKILL) and reaps it, so no process outlives its test. When a test panics, the captured output
//!   of every `Proc` it still owns is printed.
//! * [`DevAgent`] is the agent under test: `consul-leader dev-agent --listen 127.0.0.1:0` on a free
//!   port, or, when `CONSUL_LEADER_TEST_ADDR` is set, a real Consul agent at that address. Every
//!   `DevAgent` has a unique key prefix and name suffix so that tests can share one real agent.
//! * [`Http`] is a raw HTTP client (reqwest, redirects disabled) that returns status, headers and
//!   body bytes as a [`Resp`]; it never interprets an error status.
//! * [`wait_until`] / [`wait_for`] poll a condition with a short interval and a generous deadline.

// Each test binary (`tests/*.rs`) compiles this module and uses a different subset of it, so some
// helpers are unused in every binary. `#[expect(dead_code)]` would fail in the binaries that do use
// them; this one module-level allow is the exception our style accepts.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

pub mod etcd;
pub mod leader;
pub mod proxy;
pub mod semaphore;

/// The environment variable that points the suite at a real Consul agent (`host:port` or
/// `http://host:port`) instead of a dev agent of our own.
pub const TEST_ADDR_ENV: &str = "CONSUL_LEADER_TEST_ADDR";

/// How long a dev agent gets to print its listening line. Generous: a busy 2-core CI machine may
/// still be linking other test binaries while this one runs.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// How long a stopped process gets to exit after SIGTERM before it is SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Poll interval of [`wait_until`] and friends.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Upper bound for any single HTTP request, so a broken server fails a test instead of hanging it.
/// Blocking queries in the tests use waits far below this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The path of the binary under test, built by cargo for integration tests.
pub fn bin_path() -> &'static str {
    env!("CARGO_BIN_EXE_consul-leader")
}

/// A short random hex string, for unique key prefixes and check names.
pub fn unique(len: usize) -> String {
    let s = uuid::Uuid::new_v4().simple().to_string();
    s[..len.min(s.len())].to_string()
}

/// True when `CONSUL_LEADER_TEST_ADDR` points the suite at a real agent.
pub fn real_agent_addr() -> Option<String> {
    std::env::var(TEST_ADDR_ENV)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Prints why a test is skipped (only under a real agent; see [`DevAgentBuilder::start`]).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// The rounds of a long randomized run: `var` if set (a bad number is an error, not the
/// default), else `default`.
pub fn chaos_rounds(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{var}={v:?} is not a number of rounds"))
        })
        .unwrap_or(default)
}

/// A seeded randomized run: the seed comes from `seed_env` (to replay a run) or is drawn fresh,
/// and is printed before the run and again after its summary, or after its failure, so that any
/// run can be replayed. `body` runs with the seed and returns the summary.
pub fn seeded_run(label: &str, seed_env: &str, body: impl FnOnce(u64) -> String) {
    let seed = match std::env::var(seed_env) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{seed_env}={v:?} is not a u64")),
        Err(_) => rand::random::<u64>(),
    };
    let replay = format!("{label} seed: {seed} (replay with {seed_env}={seed})");
    eprintln!("{replay}");
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(seed))) {
        Ok(summary) => eprintln!("{summary}\n{replay}"),
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(a panic without a message)".into());
            panic!("{msg}\n{replay}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Output captured from one stream of a child, plus a channel of its lines as they arrive.
struct Stream {
    text: Arc<Mutex<String>>,
    lines: mpsc::Receiver<String>,
    /// Set when the reader hit EOF: everything the writers wrote is in `text`.
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl Stream {
    /// Starts a thread that reads `r` line by line until EOF, so the child can never block on a
    /// full pipe, storing everything and forwarding each line.
    fn drain(r: impl Read + Send + 'static, name: &str) -> Stream {
        let text = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let store = Arc::clone(&text);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let eof = Arc::clone(&done);
        thread::Builder::new()
            .name(format!("drain-{name}"))
            .spawn(move || {
                let mut r = BufReader::new(r);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => {
                            eof.store(true, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf).into_owned();
                            store.lock().unwrap().push_str(&line);
                            // The receiver may be gone; the text is still kept.
                            let _ = tx.send(line.trim_end_matches(['\n', '\r']).to_string());
                        }
                    }
                }
            })
            .expect("spawn drain thread");
        Stream {
            text,
            lines: rx,
            done,
        }
    }

    fn is_done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A child process owned by a test. Dropping it stops (SIGTERM, then SIGKILL) and reaps it.
pub struct Proc {
    child: Child,
    what: String,
    stdout: Stream,
    stderr: Stream,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with piped stdout/stderr and null stdin.
    pub fn spawn(mut cmd: Command) -> Proc {
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("error spawning {what}: {e}"));
        let stdout = Stream::drain(child.stdout.take().unwrap(), "stdout");
        let stderr = Stream::drain(child.stderr.take().unwrap(), "stderr");
        Proc {
            child,
            what,
            stdout,
            stderr,
            status: None,
        }
    }

    /// The command line, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        self.stdout.text.lock().unwrap().clone()
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.text.lock().unwrap().clone()
    }

    /// Both streams, labelled, for failure messages.
    pub fn output_report(&self) -> String {
        format!(
            "--- {} (pid {})\n--- stdout:\n{}\n--- stderr:\n{}\n--- status: {:?}",
            self.what,
            self.pid(),
            self.stdout_text(),
            self.stderr_text(),
            self.status
        )
    }

    /// Waits for the next stdout line for which `pick` returns `Some`, skipping others. Returns
    /// `None` if the deadline passes or stdout closes first.
    pub fn wait_stdout_line<T>(
        &mut self,
        deadline: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Option<T> {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.stdout.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = pick(&line) {
                        return Some(v);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Sends a signal to the child (not to a group).
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            // The child may already have exited and not been reaped: ESRCH is not an error then.
            let _ = signal::kill(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// The exit status if the child has exited (reaping it), without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
            if self.status.is_some() {
                self.settle_output();
            }
        }
        self.status
    }

    /// After the exit, lets the drain threads read what is still in the pipes, so that a test
    /// that asserts on the output sees all of it. Bounded: a grandchild may hold a pipe open.
    fn settle_output(&self) {
        let end = Instant::now() + Duration::from_secs(2);
        while !(self.stdout.is_done() && self.stderr.is_done()) && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `deadline` for the child to exit; polls, so never blocks past the deadline.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; always reaps. Returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(st) = self.try_status() {
            return st;
        }
        self.signal(Signal::SIGTERM);
        if let Some(st) = self.wait_exit(STOP_GRACE) {
            return st;
        }
        let _ = self.child.kill();
        let st = self.child.wait().expect("wait after SIGKILL");
        self.status = Some(st);
        st
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("{}", self.output_report());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent under test
// ---------------------------------------------------------------------------------------------

/// Options for a dev agent. Options only a dev agent has (a lowered session TTL minimum, an ACL
/// token) make [`DevAgentBuilder::start`] skip the test under a real agent.
#[derive(Debug, Clone)]
pub struct DevAgentBuilder {
    node: String,
    datacenter: Option<String>,
    ttl_min: Option<String>,
    acl_token: Option<String>,
    extra: Vec<String>,
}

impl Default for DevAgentBuilder {
    fn default() -> Self {
        DevAgentBuilder {
            // The conformance checklist's setup names the node `n1`.
            node: "n1".to_string(),
            datacenter: None,
            ttl_min: None,
            acl_token: None,
            extra: Vec::new(),
        }
    }
}

impl DevAgentBuilder {
    /// `--node NAME` (ignored under a real agent, whose node name tests read from `/v1/agent/self`).
    pub fn node(mut self, name: &str) -> Self {
        self.node = name.to_string();
        self
    }

    /// `--datacenter NAME` (ignored under a real agent).
    pub fn datacenter(mut self, name: &str) -> Self {
        self.datacenter = Some(name.to_string());
        self
    }

    /// `--session-ttl-min DUR`; dev agent only.
    pub fn ttl_min(mut self, dur: &str) -> Self {
        self.ttl_min = Some(dur.to_string());
        self
    }

    /// `--acl-token TOKEN`; dev agent only. The agent's [`DevAgent::http`] does not send it.
    pub fn acl_token(mut self, token: &str) -> Self {
        self.acl_token = Some(token.to_string());
        self
    }

    /// Any further argument for `dev-agent`; dev agent only.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    fn dev_only_options(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.ttl_min.is_some() {
            v.push("--session-ttl-min");
        }
        if self.acl_token.is_some() {
            v.push("--acl-token");
        }
        if !self.extra.is_empty() {
            v.push("extra dev-agent arguments");
        }
        v
    }

    /// The `dev-agent` argument list (without the binary).
    pub fn args(&self, listen: &str) -> Vec<String> {
        let mut a = vec![
            "dev-agent".to_string(),
            "--listen".to_string(),
            listen.to_string(),
            "--node".to_string(),
            self.node.clone(),
        ];
        if let Some(dc) = &self.datacenter {
            a.extend(["--datacenter".to_string(), dc.clone()]);
        }
        if let Some(t) = &self.ttl_min {
            a.extend(["--session-ttl-min".to_string(), t.clone()]);
        }
        if let Some(t) = &self.acl_token {
            a.extend(["--acl-token".to_string(), t.clone()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// Starts the agent for a test: a dev agent of its own, or the real agent named by
    /// `CONSUL_LEADER_TEST_ADDR`. Returns `None` (after printing a note) when the test needs
    /// dev-agent-only options and a real agent was asked for: the caller then returns early.
    pub fn start(self) -> Option<DevAgent> {
        if let Some(addr) = real_agent_addr() {
            let dev_only = self.dev_only_options();
            if !dev_only.is_empty() {
                eprintln!(
                    "SKIPPED: this test needs {} (dev agent only), and {TEST_ADDR_ENV}={addr}",
                    dev_only.join(", ")
                );
                return None;
            }
            return Some(DevAgent::external(&addr));
        }
        Some(self.spawn_local())
    }

    /// Always spawns a local dev agent, even when `CONSUL_LEADER_TEST_ADDR` is set (for tests of
    /// the binary itself). Panics, printing its output, if it does not come up in time.
    pub fn spawn_local(self) -> DevAgent {
        let mut cmd = Command::new(bin_path());
        cmd.args(self.args("127.0.0.1:0"));
        // Keep the agent's own logging quiet and predictable regardless of the caller's env.
        cmd.env_remove(TEST_ADDR_ENV);
        let mut proc = Proc::spawn(cmd);
        let addr = proc.wait_stdout_line(START_DEADLINE, parse_listening_line);
        let Some(addr) = addr else {
            // stdout closed (the agent exited) or the deadline passed.
            match proc.wait_exit(Duration::from_millis(500)) {
                // `proc`'s drop prints its output while this panic unwinds.
                Some(status) => panic!(
                    "dev agent exited ({status}) without printing `dev-agent listening on \
                     <ip:port>`"
                ),
                None => panic!(
                    "dev agent did not print `dev-agent listening on <ip:port>` within \
                     {START_DEADLINE:?}"
                ),
            }
        };
        DevAgent {
            base: format!("http://{addr}"),
            addr: addr.to_string(),
            proc: Some(proc),
            http: Http::new(&format!("http://{addr}")),
            prefix: format!("t-{}/", unique(8)),
            suffix: format!("-{}", unique(6)),
        }
    }
}

/// Parses `dev-agent listening on <ip:port>` (the whole line).
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("dev-agent listening on ")
        .and_then(|a| a.trim().parse().ok())
}

/// The agent a test talks to. Dropping it stops a dev agent it started.
pub struct DevAgent {
    base: String,
    addr: String,
    proc: Option<Proc>,
    http: Http,
    prefix: String,
    suffix: String,
}

impl DevAgent {
    /// A default agent (node `n1`, datacenter `dc1`, stock session TTL minimum).
    pub fn start() -> DevAgent {
        DevAgentBuilder::default()
            .start()
            .expect("the default builder has no dev-agent-only options")
    }

    pub fn builder() -> DevAgentBuilder {
        DevAgentBuilder::default()
    }

    /// True when tests run against a real agent (`CONSUL_LEADER_TEST_ADDR`).
    pub fn is_real() -> bool {
        real_agent_addr().is_some()
    }

    fn external(addr: &str) -> DevAgent {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        let host_port = base
            .split_once("://")
            .map(|(_, rest)| rest.to_string())
            .unwrap_or_default();
        DevAgent {
            http: Http::new(&base),
            base,
            addr: host_port,
            proc: None,
            prefix: format!("t-{}/", unique(8)),
            suffix: format!("-{}", unique(6)),
        }
    }

    /// `ip:port` (or `host:port` for a real agent).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://ip:port`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The dev agent's process, if this test started one.
    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    pub fn proc_mut(&mut self) -> Option<&mut Proc> {
        self.proc.as_mut()
    }

    /// Restarts this test's local dev agent on the same address with empty state, the way an
    /// agent that lost its data comes back (a crash of an agent without persistence, a wiped data
    /// directory): the old process is SIGKILLed and reaped, then `dev-agent` starts again with
    /// `builder`'s options (for example a different [`DevAgentBuilder::acl_token`]) on the same
    /// port, so clients, proxies and wrappers keep their address. Its indexes start over. Returns
    /// once the new agent accepts connections; a port taken meanwhile is retried until
    /// [`START_DEADLINE`]. Panics for a real agent (`CONSUL_LEADER_TEST_ADDR`), which a test
    /// cannot restart.
    pub fn restart(&mut self, builder: DevAgentBuilder) {
        let old = self
            .proc
            .as_mut()
            .unwrap_or_else(|| panic!("cannot restart the real agent at {}", self.addr));
        old.signal(Signal::SIGKILL);
        old.wait_exit(STOP_GRACE)
            .unwrap_or_else(|| panic!("the dev agent did not die of SIGKILL"));
        let end = Instant::now() + START_DEADLINE;
        loop {
            let mut cmd = Command::new(bin_path());
            cmd.args(builder.args(&self.addr));
            cmd.env_remove(TEST_ADDR_ENV);
            let mut proc = Proc::spawn(cmd);
            let left = end.saturating_duration_since(Instant::now());
            match proc.wait_stdout_line(left, parse_listening_line) {
                Some(addr) => {
                    assert_eq!(addr.to_string(), self.addr, "restarted on another address");
                    self.proc = Some(proc);
                    break;
                }
                // It could not listen (the port was taken in between): try again.
                None if Instant::now() < end => thread::sleep(POLL_INTERVAL),
                None => panic!(
                    "the dev agent did not come back on {} within {START_DEADLINE:?}\n{}",
                    self.addr,
                    proc.output_report()
                ),
            }
        }
        // Pooled connections went to the old process.
        self.http = Http::new(&self.base);
    }

    /// The dev agent's pid, if this test started one.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The dev agent's stderr so far (empty under a real agent).
    pub fn stderr_text(&self) -> String {
        self.proc
            .as_ref()
            .map(Proc::stderr_text)
            .unwrap_or_default()
    }

    /// A client without a token.
    pub fn http(&self) -> &Http {
        &self.http
    }

    /// A client that sends `X-Consul-Token: <token>` on every request.
    pub fn http_with_token(&self, token: &str) -> Http {
        Http::new(&self.base).with_default_header("X-Consul-Token", token)
    }

    /// This test's unique key prefix, ending in `/` (e.g. `t-1a2b3c4d/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key under this test's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `/v1/kv/<prefix><name>`.
    pub fn kv_path(&self, name: &str) -> String {
        format!("/v1/kv/{}", self.key(name))
    }

    /// A name made unique for this test (for check IDs on a shared real agent).
    pub fn name(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }

    // --- shortcuts over `http()` ---

    pub async fn get(&self, path: &str) -> Resp {
        self.http.get(path).await
    }

    pub async fn put(&self, path: &str, body: impl Into<Vec<u8>>) -> Resp {
        self.http.put(path, body).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.http.delete(path).await
    }

    pub async fn request(&self, method: &str, path: &str) -> Resp {
        self.http.request(method, path).send().await
    }

    // --- domain helpers; each asserts the call succeeded where success is the only option ---

    /// The agent's node name, from `/v1/agent/self`.
    pub async fn node_name(&self) -> String {
        let r = self.get("/v1/agent/self").await.expect_status(200);
        r.json()["Config"]["NodeName"]
            .as_str()
            .unwrap_or_else(|| panic!("Config.NodeName is not a string: {}", r.text()))
            .to_string()
    }

    /// `PUT /v1/session/create` with `body` (JSON); asserts 200 and returns the ID.
    pub async fn create_session(&self, body: Value) -> String {
        create_session_with(&self.http, body).await
    }

    /// `PUT /v1/session/destroy/<id>`; asserts 200 `true`.
    pub async fn destroy_session(&self, id: &str) {
        let r = self
            .put(&format!("/v1/session/destroy/{id}"), Vec::new())
            .await
            .expect_status(200);
        assert_eq!(r.json(), json!(true), "destroy {id}");
    }

    /// The session object from `/v1/session/info/<id>`, or `None` when the answer is `[]`.
    pub async fn session_info(&self, id: &str) -> Option<Value> {
        let r = self
            .get(&format!("/v1/session/info/{id}"))
            .await
            .expect_status(200);
        let v = r.json();
        let arr = v
            .as_array()
            .unwrap_or_else(|| panic!("session info is not an array: {v}"));
        assert!(
            arr.len() <= 1,
            "session info has more than one element: {v}"
        );
        arr.first().cloned()
    }

    /// The entry object of `/v1/kv/<prefix><name>`, or `None` on 404.
    pub async fn kv_entry(&self, name: &str) -> Option<Value> {
        let r = self.get(&self.kv_path(name)).await;
        match r.status {
            404 => None,
            200 => {
                let v = r.json();
                let arr = v
                    .as_array()
                    .unwrap_or_else(|| panic!("KV GET is not an array: {v}"));
                assert_eq!(arr.len(), 1, "KV GET of one key: {v}");
                Some(arr[0].clone())
            }
            s => panic!("KV GET {} answered {s}: {}", self.key(name), r.text()),
        }
    }

    /// Plain `PUT /v1/kv/<prefix><name>`; asserts 200 `true`.
    pub async fn kv_put(&self, name: &str, value: &[u8]) {
        let r = self
            .put(&self.kv_path(name), value.to_vec())
            .await
            .expect_status(200);
        assert_eq!(r.json(), json!(true), "PUT {}", self.key(name));
    }

    /// `PUT ?acquire=<session>`; asserts 200 and returns the boolean answer.
    pub async fn acquire(&self, name: &str, session: &str, value: &[u8]) -> bool {
        let path = format!("{}?acquire={session}", self.kv_path(name));
        self.put(&path, value.to_vec()).await.expect_bool()
    }

    /// `PUT ?release=<session>`; asserts 200 and returns the boolean answer.
    pub async fn release(&self, name: &str, session: &str, value: &[u8]) -> bool {
        let path = format!("{}?release={session}", self.kv_path(name));
        self.put(&path, value.to_vec()).await.expect_bool()
    }

    /// `PUT /v1/agent/check/register` with `body`; asserts 200.
    pub async fn register_check(&self, body: Value) {
        self.put("/v1/agent/check/register", body.to_string())
            .await
            .expect_status(200);
    }

    /// `PUT /v1/agent/check/<pass|warn|fail>/<id>`; asserts 200.
    pub async fn check_update(&self, verb: &str, id: &str) {
        self.put(&format!("/v1/agent/check/{verb}/{id}"), Vec::new())
            .await
            .expect_status(200);
    }
}

/// Checks a lock-delay of `delay` on key `name` (under the agent's prefix), set by a session
/// invalidation that the server performed after `lower_bound`:
/// * an acquire by `session` answered less than `delay` after `lower_bound` must be refused (an
///   answer later than that, on a very slow machine, is inconclusive and only noted);
/// * the first acquire that succeeds must be answered at least `delay` after `lower_bound`.
pub async fn assert_lock_delay(
    a: &DevAgent,
    name: &str,
    session: &str,
    delay: Duration,
    lower_bound: Instant,
) {
    let got = a.acquire(name, session, b"next").await;
    let answered = lower_bound.elapsed();
    if answered < delay {
        assert!(
            !got,
            "an acquire answered {answered:?} after the invalidation must be refused by the \
             {delay:?} lock-delay"
        );
    } else {
        eprintln!(
            "note: the first acquire was answered {answered:?} after the invalidation, past the \
             {delay:?} lock-delay; the machine is too slow to check the refusal"
        );
    }
    if !got {
        wait_until(
            "the acquire succeeds once the lock-delay is over",
            delay + Duration::from_secs(15),
            || async { a.acquire(name, session, b"next").await },
        )
        .await;
    }
    // Allows for clock granularity on the server.
    let tolerance = Duration::from_millis(100);
    assert!(
        lower_bound.elapsed() + tolerance >= delay,
        "the acquire succeeded {:?} after the invalidation, before the {delay:?} lock-delay ended",
        lower_bound.elapsed()
    );
    assert_eq!(a.kv_entry(name).await.unwrap()["Session"], json!(session));
}

/// Polls key `name` until it exists without a `Session` (released by an invalidation). Returns
/// the latest instant known to precede the release: the send time of the last read that still
/// saw the key held, or `since` if none did, so `since` must be an instant before which the
/// release cannot have happened (e.g. taken before the acquire, or before the request that
/// invalidates the session). Panics after `deadline` (counted from `since`).
pub async fn wait_unlocked(
    a: &DevAgent,
    name: &str,
    since: Instant,
    deadline: Duration,
) -> Instant {
    let mut last_held = since;
    loop {
        let sent = Instant::now();
        match a.kv_entry(name).await {
            Some(e) if absent(&e, "Session") => return last_held,
            Some(_) => last_held = last_held.max(sent),
            None => panic!("key {} vanished while waiting for its release", a.key(name)),
        }
        if since.elapsed() >= deadline {
            panic!(
                "timed out after {deadline:?} waiting until {} is released",
                a.key(name)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `PUT /v1/session/create` through `http`; asserts 200 and returns the ID.
pub async fn create_session_with(http: &Http, body: Value) -> String {
    let r = http
        .put("/v1/session/create", body.to_string())
        .await
        .expect_status(200);
    let v = r.json();
    v["ID"]
        .as_str()
        .unwrap_or_else(|| panic!("session create answered without a string ID: {v}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

static CRYPTO: Once = Once::new();

/// A raw HTTP client: redirects disabled (so 301 can be seen), no proxy, keep-alive connections.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
    default_headers: Vec<(String, String)>,
}

impl Http {
    pub fn new(base: &str) -> Http {
        // reqwest is built with `rustls-no-provider`: a provider must be installed before any
        // client is built, even for plain http. Another test may have installed it already.
        CRYPTO.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .http1_only()
            .build()
            .expect("build reqwest client");
        Http {
            client,
            base: base.trim_end_matches('/').to_string(),
            default_headers: Vec::new(),
        }
    }

    /// A copy that sends `name: value` on every request.
    pub fn with_default_header(mut self, name: &str, value: &str) -> Http {
        self.default_headers
            .push((name.to_string(), value.to_string()));
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Starts a request; `path` starts with `/` and may carry a query string.
    pub fn request(&self, method: &str, path: &str) -> Req {
        Req {
            http: self.clone(),
            method: method.to_string(),
            path: path.to_string(),
            headers: self.default_headers.clone(),
            body: None,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request("GET", path).send().await
    }

    pub async fn put(&self, path: &str, body: impl Into<Vec<u8>>) -> Resp {
        self.request("PUT", path).body(body).send().await
    }

    pub async fn post(&self, path: &str, body: impl Into<Vec<u8>>) -> Resp {
        self.request("POST", path).body(body).send().await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path).send().await
    }

    pub async fn options(&self, path: &str) -> Resp {
        self.request("OPTIONS", path).send().await
    }
}

/// A request being built by [`Http::request`].
pub struct Req {
    http: Http,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Req {
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets a body with a Content-Length (an empty body sends `Content-Length: 0`).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = Some(body.into());
        self
    }

    /// Sends the request. Panics on a transport error (connection refused, timeout), with the
    /// method and URL; any HTTP status is returned as is.
    pub async fn send(self) -> Resp {
        self.try_send()
            .await
            .unwrap_or_else(|e| panic!("HTTP request failed: {e:#}"))
    }

    /// Sends the request; a transport error is returned, not a panic.
    pub async fn try_send(self) -> anyhow::Result<Resp> {
        let url = format!("{}{}", self.http.base, self.path);
        let method = reqwest::Method::from_bytes(self.method.as_bytes())?;
        let mut rb = self.http.client.request(method, &url);
        for (k, v) in &self.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some(b) = self.body {
            rb = rb.body(b);
        }
        let what = format!("{} {url}", self.method);
        let started = Instant::now();
        let resp = rb
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| anyhow::anyhow!("{what}: reading body: {e:?}"))?;
        Ok(Resp {
            what,
            status,
            headers,
            body: body.to_vec(),
            elapsed: started.elapsed(),
        })
    }
}

/// A response: status, headers and the body bytes, unparsed.
#[derive(Debug, Clone)]
pub struct Resp {
    /// `METHOD URL`, for messages.
    pub what: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// From sending the request to having read the whole body.
    pub elapsed: Duration,
}

impl Resp {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: body is not JSON ({e}); status {}, body {:?}",
                self.what,
                self.status,
                self.text()
            )
        })
    }

    /// A header's value as a string (the first one if repeated).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// `X-Consul-Index` as a number; panics if it is missing or not a number.
    pub fn index(&self) -> u64 {
        let h = self
            .header("X-Consul-Index")
            .unwrap_or_else(|| panic!("{}: no X-Consul-Index header: {self:?}", self.what));
        h.parse()
            .unwrap_or_else(|_| panic!("{}: X-Consul-Index {h:?} is not a u64", self.what))
    }

    /// Asserts the status, printing the body on mismatch; returns self for chaining.
    #[track_caller]
    pub fn expect_status(self, status: u16) -> Resp {
        assert_eq!(
            self.status,
            status,
            "{}: expected status {status}, got {} with body {:?}",
            self.what,
            self.status,
            self.text()
        );
        self
    }

    /// Asserts 200 and a JSON boolean body; returns it.
    #[track_caller]
    pub fn expect_bool(self) -> bool {
        let r = self.expect_status(200);
        match r.json() {
            Value::Bool(b) => b,
            v => panic!("{}: expected a JSON boolean, got {v}", r.what),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Polls `cond` every [`POLL_INTERVAL`] until it is true; panics with `what` after `deadline`.
/// Returns the time it took.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if cond().await {
            return started.elapsed();
        }
        if started.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Some`; panics with `what` after
/// `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if started.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Synchronous [`wait_until`], for code outside a runtime.
pub fn wait_until_sync(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if cond() {
            return started.elapsed();
        }
        if started.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Asserts that a spawned request is still pending after `dwell`. The timer only confirms that
/// the request is blocked; it never stands in for waiting on a change.
pub async fn assert_pending<T: std::fmt::Debug>(
    what: &str,
    task: &mut tokio::task::JoinHandle<T>,
    dwell: Duration,
) {
    if let Ok(done) = tokio::time::timeout(dwell, &mut *task).await {
        panic!("{what}: expected the request to still be blocked, but it returned: {done:?}");
    }
}

/// Awaits a spawned request, failing after `deadline`.
pub async fn join_within<T>(what: &str, task: tokio::task::JoinHandle<T>, deadline: Duration) -> T {
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: task failed: {e}"),
        Err(_) => panic!("{what}: did not finish within {deadline:?}"),
    }
}

/// Asserts that a response body starts with `prefix`, naming the request when it does not.
#[track_caller]
pub fn assert_body_starts(r: &Resp, prefix: &str) {
    let t = r.text();
    assert!(
        t.starts_with(prefix),
        "{}: body {t:?} should start with {prefix:?}",
        r.what
    );
}

/// Asserts that a response body contains `needle`, naming the request when it does not.
#[track_caller]
pub fn assert_body_contains(r: &Resp, needle: &str) {
    let t = r.text();
    assert!(
        t.contains(needle),
        "{}: body {t:?} should contain {needle:?}",
        r.what
    );
}

/// Peak resident set size (VmHWM) of a process, in KiB, from `/proc/<pid>/status`.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// JSON helpers
// ---------------------------------------------------------------------------------------------

/// Base64 (standard, padded) of `bytes`, as Consul puts KV values on the wire.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// True for a lower-case 8-4-4-4-12 hex UUID, the form go-uuid produces.
pub fn is_lower_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// A field as u64; panics with the object if missing.
#[track_caller]
pub fn u64_field(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} is not a u64 in {v}"))
}

/// True when `field` is absent from the object `v`.
pub fn absent(v: &Value, field: &str) -> bool {
    v.as_object().is_some_and(|o| !o.contains_key(field))
}

/// True when `field` is absent, null, or an empty array.
pub fn empty_list(v: &Value, field: &str) -> bool {
    match v.get(field) {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        _ => false,
    }
}

/// `count` idle processes (`sleep`), for benchmarks that compare a quiet host with a busy one;
/// killed and reaped on drop.
pub struct IdleProcesses(Vec<Child>);

impl IdleProcesses {
    pub fn start(count: usize) -> IdleProcesses {
        let mut all = IdleProcesses(Vec::with_capacity(count));
        for _ in 0..count {
            let child = Command::new("sleep")
                .arg("1000000")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn an idle process (is `ulimit -u` high enough?)");
            all.0.push(child);
        }
        all
    }
}

impl Drop for IdleProcesses {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}
