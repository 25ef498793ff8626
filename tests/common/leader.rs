//! Harness for tests of `consul-leader run`: a wrapper process driving the child fixture
//! (`tests/fixtures/child.sh`), the fixture's journal, and a scanner for processes a test left.
//!
//! Every test gets a unique marker; the fixture and everything it starts carry it in
//! `CONSUL_LEADER_TEST_MARKER`, so leftovers are found by scanning `/proc/*/environ`, and
//! [`Fixture`]'s drop SIGKILLs whatever still carries it, so a failing test leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{DevAgent, Proc, bin_path, unique};

/// The environment variable that tags every process a test's child fixture starts.
pub const MARKER_ENV: &str = "CONSUL_LEADER_TEST_MARKER";

/// Generous deadline for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Timing knobs that suit the agent: short against a dev agent (its TTL minimum is lowered),
/// Consul's minimum against a real one.
#[derive(Debug, Clone)]
pub struct Timing {
    pub ttl: &'static str,
    pub lock_delay: &'static str,
    pub silence: &'static str,
    pub grace: &'static str,
}

/// Short timings for a local dev agent whose session TTL minimum is lowered to 1s. The silence
/// covers the TTL, as the wrapper demands (max(lock-delay, silence) >= TTL).
pub const SHORT: Timing = Timing {
    ttl: "3s",
    lock_delay: "1s",
    silence: "3s",
    grace: "1s",
};

/// A dev agent with a lowered session TTL minimum, or the real agent of `CONSUL_LEADER_TEST_ADDR`.
pub fn agent() -> (DevAgent, Timing) {
    if DevAgent::is_real() {
        let timing = Timing {
            ttl: "10s",
            lock_delay: "2s",
            silence: "10s",
            grace: "1s",
        };
        (DevAgent::start(), timing)
    } else {
        let agent = DevAgent::builder()
            .ttl_min("1s")
            .start()
            .expect("a local dev agent");
        (agent, SHORT)
    }
}

/// A local dev agent with a lowered session TTL minimum, for tests that need one (a fault proxy in
/// front of it, short TTLs); `None`, after a note, when the suite runs against a real agent.
pub fn local_agent() -> Option<DevAgent> {
    if DevAgent::is_real() {
        eprintln!(
            "SKIPPED: this test needs a local dev agent (a proxy in front of it, short TTLs)"
        );
        return None;
    }
    DevAgent::builder().ttl_min("1s").start()
}

/// Waits for a wrapper to exit and returns its status; on time-out, fails with its output.
pub fn exit_of(w: &mut Proc) -> std::process::ExitStatus {
    w.wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("the wrapper did not exit in time\n{}", w.output_report()))
}

/// One test's fixture state: its marker, journal and scratch directory.
pub struct Fixture {
    pub marker: String,
    pub dir: PathBuf,
    pub journal: PathBuf,
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    pub fn new() -> Fixture {
        let marker = format!("cl-test-{}", unique(12));
        let dir = std::env::temp_dir().join(&marker);
        std::fs::create_dir_all(&dir).expect("create the test's scratch directory");
        let journal = dir.join("journal");
        std::fs::write(&journal, "").expect("create the journal");
        Fixture {
            marker,
            dir,
            journal,
        }
    }

    /// The child fixture script.
    pub fn child_script() -> String {
        format!("{}/tests/fixtures/child.sh", env!("CARGO_MANIFEST_DIR"))
    }

    /// `tests/fixtures/child.c` compiled into this fixture's directory with the system's C
    /// compiler (`cc`): a child that journals like the script's `main`, for benchmarks that must
    /// not time an interpreter's start-up. `None`, with the compiler's complaint on stderr, when
    /// it cannot be built.
    pub fn compiled_child(&self) -> Option<PathBuf> {
        let out = self.dir.join("child");
        let source = format!("{}/tests/fixtures/child.c", env!("CARGO_MANIFEST_DIR"));
        let built = Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(&source)
            .status();
        match built {
            Ok(st) if st.success() => Some(out),
            other => {
                eprintln!("cannot compile {source} with cc: {other:?}");
                None
            }
        }
    }

    /// The journal's events, in order.
    pub fn events(&self) -> Vec<Event> {
        std::fs::read_to_string(&self.journal)
            .unwrap_or_default()
            .lines()
            .filter_map(Event::parse)
            .collect()
    }

    /// Pids of live processes carrying this test's marker.
    pub fn live(&self) -> Vec<u32> {
        marked_processes(&self.marker)
    }

    /// Waits until no process carries the marker; panics listing them after `deadline`.
    pub fn wait_none_left(&self, deadline: Duration) {
        let end = std::time::Instant::now() + deadline;
        loop {
            let live = self.live();
            if live.is_empty() {
                return;
            }
            if std::time::Instant::now() >= end {
                panic!(
                    "processes of this test are still alive: {}",
                    describe_pids(&live)
                );
            }
            std::thread::sleep(super::POLL_INTERVAL);
        }
    }

    /// Waits until the journal satisfies `cond`, returning the events then.
    pub fn wait_journal(&self, what: &str, cond: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let mut events = Vec::new();
        super::wait_until_sync(what, DEADLINE, || {
            events = self.events();
            cond(&events)
        });
        events
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Whatever the test left: kill it, so that a failed test does not poison the next ones.
        for pid in self.live() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One line of the child fixture's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub pid: u32,
    /// Microseconds since the epoch (CLOCK_REALTIME).
    pub time_us: u64,
    pub detail: String,
}

impl Event {
    fn parse(line: &str) -> Option<Event> {
        let mut parts = line.splitn(4, ' ');
        Some(Event {
            kind: parts.next()?.to_string(),
            pid: parts.next()?.parse().ok()?,
            time_us: parts.next()?.parse().ok()?,
            detail: parts.next().unwrap_or("").to_string(),
        })
    }

    pub fn is_main_start(&self) -> bool {
        self.kind == "start" && self.detail == "main"
    }
}

/// Now, in the journal's clock (microseconds since the epoch).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Lifetimes of the `main` children in the journal: (pid, start, end), end `None` if still running
/// by the journal (a SIGKILLed child writes no stop line; its end is taken from `ended`).
pub fn lifetimes(events: &[Event], ended: &BTreeMap<u32, u64>) -> Vec<(u32, u64, Option<u64>)> {
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e.is_main_start()) {
        let stop = events
            .iter()
            .find(|s| s.pid == e.pid && s.kind == "stop")
            .map(|s| s.time_us)
            .or_else(|| ended.get(&e.pid).copied());
        out.push((e.pid, e.time_us, stop));
    }
    out
}

/// Every pair of overlapping lifetimes, as a readable list (empty when none overlap).
pub fn overlaps(lives: &[(u32, u64, Option<u64>)]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, a) in lives.iter().enumerate() {
        for b in &lives[i + 1..] {
            let a_end = a.2.unwrap_or(u64::MAX);
            let b_end = b.2.unwrap_or(u64::MAX);
            if a.1 < b_end && b.1 < a_end {
                found.push(format!(
                    "child {} {:?} overlaps child {} {:?}",
                    a.0,
                    (a.1, a.2),
                    b.0,
                    (b.1, b.2)
                ));
            }
        }
    }
    found
}

/// The most lifetimes that overlap at one moment, and the pids alive then (a semaphore of limit N
/// must never show more than N).
pub fn most_at_once(lives: &[(u32, u64, Option<u64>)]) -> (usize, Vec<u32>) {
    let mut best = (0, Vec::new());
    for a in lives {
        // Every overlap contains the start of one of its lifetimes.
        let at = a.1;
        let alive: Vec<u32> = lives
            .iter()
            .filter(|b| b.1 <= at && at < b.2.unwrap_or(u64::MAX))
            .map(|b| b.0)
            .collect();
        if alive.len() > best.0 {
            best = (alive.len(), alive);
        }
    }
    best
}

/// Pids of live (not zombie) processes whose environment holds `MARKER_ENV=marker`, except the
/// wrappers this test process started itself (their `Proc` owns and reaps them): what is left is
/// what the wrappers started, which no wrapper may leave behind.
pub fn marked_processes(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let needle = format!("{MARKER_ENV}={marker}");
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|var| var == needle.as_bytes()) {
            continue;
        }
        if is_zombie(pid) || parent(pid) == Some(me) || is_spare_keeper(pid, me) {
            continue;
        }
        pids.push(pid);
    }
    pids
}

/// A keeper that one of this test's live wrappers started ahead of time and that runs nothing yet
/// (a standby's: `Supervisor::prepare`), caught before or after its exec (it is the same binary
/// either way). It is the wrapper's, like the wrapper itself, and exits when the wrapper does. A
/// keeper with a command, or one whose wrapper is gone, still counts.
fn is_spare_keeper(pid: u32, me: u32) -> bool {
    let ours = std::fs::canonicalize(super::bin_path()).ok();
    if std::fs::read_link(format!("/proc/{pid}/exe")).ok() != ours {
        return false;
    }
    let has_children = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .is_ok_and(|c| !c.trim().is_empty())
        });
    let under_a_live_wrapper = parent(pid).is_some_and(|w| pid_alive(w) && parent(w) == Some(me));
    !has_children && under_a_live_wrapper
}

/// The wrapper that started `child`: the parent of the child's keeper (`supervisor`'s module
/// docs: wrapper -> keeper -> command).
pub fn wrapper_of(child: u32) -> Option<u32> {
    parent(parent(child)?)
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The state letter of `pid` (`R`, `S`, `T` for stopped, `Z`...), from `/proc/<pid>/stat`.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn describe_pids(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            format!("{p} ({})", cmd.trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds a `consul-leader run` wrapper around the child fixture.
pub struct WrapperBuilder<'a> {
    engine: Engine<'a>,
    fixture: &'a Fixture,
    key: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    command: Option<Vec<String>>,
}

/// Where a wrapper's lock lives.
enum Engine<'a> {
    Consul(&'a DevAgent),
    /// etcd's client endpoints, comma-separated.
    Etcd(String),
}

impl<'a> WrapperBuilder<'a> {
    /// `run --key KEY` against a dev agent (or the real agent of `CONSUL_LEADER_TEST_ADDR`).
    pub fn new(agent: &'a DevAgent, fixture: &'a Fixture, key: &str, timing: &Timing) -> Self {
        Self::with(
            Engine::Consul(agent),
            fixture,
            key,
            &[
                "--ttl",
                timing.ttl,
                "--lock-delay",
                timing.lock_delay,
                "--silence",
                timing.silence,
                "--grace",
                timing.grace,
            ],
        )
    }

    /// `run --etcd-endpoints ENDPOINTS --key NAME`, with `args` (the timing flags).
    pub fn etcd(fixture: &'a Fixture, endpoints: &str, name: &str, args: &[&str]) -> Self {
        Self::with(Engine::Etcd(endpoints.to_string()), fixture, name, args)
    }

    fn with(engine: Engine<'a>, fixture: &'a Fixture, key: &str, args: &[&str]) -> Self {
        WrapperBuilder {
            engine,
            fixture,
            key: key.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            command: None,
        }
    }

    /// Sets (or replaces) a flag of `run`.
    pub fn flag(mut self, name: &str, value: &str) -> Self {
        if let Some(i) = self.args.iter().position(|a| a == name) {
            self.args[i + 1] = value.to_string();
        } else {
            self.args.push(name.to_string());
            self.args.push(value.to_string());
        }
        self
    }

    /// Adds a flag without a value.
    pub fn switch(mut self, name: &str) -> Self {
        self.args.push(name.to_string());
        self
    }

    /// An environment variable for the wrapper (and so, unless removed, the child).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Runs this command instead of the child fixture.
    pub fn command(mut self, argv: &[&str]) -> Self {
        self.command = Some(argv.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn spawn(self) -> Proc {
        Proc::spawn(self.into_command())
    }

    /// The wrapper's command line and environment, to spawn with settings of the caller's own
    /// (a controlling terminal, say).
    pub fn into_command(self) -> Command {
        let mut cmd = Command::new(bin_path());
        cmd.arg("run");
        if let Engine::Etcd(endpoints) = &self.engine {
            cmd.arg("--etcd-endpoints").arg(endpoints);
        }
        cmd.arg("--key").arg(&self.key).args(&self.args).arg("--");
        match &self.command {
            Some(argv) => cmd.args(argv),
            None => cmd.arg("bash").arg(Fixture::child_script()),
        };
        cmd.env(MARKER_ENV, &self.fixture.marker)
            .env("CL_CHILD_JOURNAL", &self.fixture.journal)
            .env_remove("CONSUL_LEADER_LOG");
        match &self.engine {
            Engine::Consul(agent) => {
                cmd.env("CONSUL_HTTP_ADDR", agent.addr())
                    .env_remove("CONSUL_HTTP_TOKEN")
                    .env_remove("CONSUL_HTTP_TOKEN_FILE");
                if !DevAgent::is_real() {
                    // Test agents lower their session_ttl_min to 1s, and the tests use TTLs
                    // below Consul's 10s minimum, which the wrapper refuses unless told the
                    // agent's minimum.
                    cmd.env("CONSUL_LEADER_TTL_MIN", "1s");
                }
            }
            // The engine rule: no Consul address, no second list of endpoints.
            Engine::Etcd(_) => {
                cmd.env_remove("CONSUL_HTTP_ADDR")
                    .env_remove("ETCDCTL_ENDPOINTS");
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// The session IDs on the agent whose name mentions `key` (our wrappers name sessions after it).
pub async fn sessions_for(agent: &DevAgent, key: &str) -> Vec<String> {
    let v = agent
        .get("/v1/session/list")
        .await
        .expect_status(200)
        .json();
    v.as_array()
        .map(|list| {
            list.iter()
                .filter(|s| s["Name"].as_str().is_some_and(|n| n.contains(key)))
                .filter_map(|s| s["ID"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The lock key's entry decoded: (session, lock index, value JSON).
pub async fn lock_state(
    agent: &DevAgent,
    name: &str,
) -> Option<(Option<String>, u64, serde_json::Value)> {
    let e = agent.kv_entry(name).await?;
    let session = e["Session"].as_str().map(String::from);
    let lock_index = e["LockIndex"].as_u64().unwrap_or(0);
    let value = e["Value"]
        .as_str()
        .and_then(|v| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(v).ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    Some((session, lock_index, value))
}

/// Reads `KEY=value` lines written by the fixture's `CL_CHILD_ENV_FILE`.
pub fn read_env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Records when each `main` child of a journal disappears, for children that cannot say so
/// themselves (SIGKILL leaves no stop line). A background thread polls `/proc` every few
/// milliseconds; a recorded time is an upper bound of the death, which keeps overlap checks
/// conservative: a lifetime can only look longer than it was.
pub struct DeathWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ended: std::sync::Arc<std::sync::Mutex<BTreeMap<u32, u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeathWatch {
    pub fn start(journal: &Path) -> DeathWatch {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let ended: Arc<Mutex<BTreeMap<u32, u64>>> = Arc::default();
        let journal = journal.to_path_buf();
        let thread = {
            let (stop, ended) = (stop.clone(), ended.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let text = std::fs::read_to_string(&journal).unwrap_or_default();
                    for e in text
                        .lines()
                        .filter_map(Event::parse)
                        .filter(Event::is_main_start)
                    {
                        if ended.lock().unwrap().contains_key(&e.pid) {
                            continue;
                        }
                        if !pid_alive(e.pid) {
                            ended.lock().unwrap().insert(e.pid, now_us());
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        DeathWatch {
            stop,
            ended,
            thread: Some(thread),
        }
    }

    /// Observed death times so far, by pid.
    pub fn ended(&self) -> BTreeMap<u32, u64> {
        self.ended.lock().unwrap().clone()
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    !is_zombie(pid)
}

/// The Go `api.Lock` flags value: a key acquired with it is a lock that our wrappers wait for.
pub const LOCK_FLAGS: u64 = 3304740253564472344;

/// Acquires `name` for `session` the way `consul lock` does (lock flags, `value`).
pub async fn acquire_as_lock(agent: &DevAgent, name: &str, session: &str, value: &[u8]) -> bool {
    let path = format!(
        "{}?acquire={session}&flags={LOCK_FLAGS}",
        agent.kv_path(name)
    );
    agent.put(&path, value.to_vec()).await.expect_bool()
}

/// Leaves key `name` free and released clean, as a consul-leader holder that confirmed its child
/// gone leaves it, so that the next wrapper owes no wait. Tests whose subject is not the first
/// run of a brand-new key use it: a missing key owes max(silence, TTL), since nothing tells
/// whether an old holder's child still runs.
pub async fn clean_key(agent: &DevAgent, name: &str) {
    let session = agent
        .create_session(serde_json::json!({
            "Name": agent.name("clean-key"),
            "TTL": "30s",
            "LockDelay": "0s",
        }))
        .await;
    let value = serde_json::json!({
        "holder": "test-harness:0",
        "host": "test-harness",
        "pid": 0,
        "session": session,
        "acquired_at": "1970-01-01T00:00:00Z",
        "version": "test",
        "released": "clean",
    })
    .to_string();
    assert!(
        acquire_as_lock(agent, name, &session, value.as_bytes()).await,
        "acquire {name} to mark it clean"
    );
    let path = format!(
        "{}?release={session}&flags={LOCK_FLAGS}",
        agent.kv_path(name)
    );
    assert!(agent.put(&path, value.into_bytes()).await.expect_bool());
    agent.destroy_session(&session).await;
}

/// The key's ModifyIndex: while a wrapper holds it, its child's fencing token.
pub async fn modify_index(agent: &DevAgent, name: &str) -> Option<u64> {
    agent.kv_entry(name).await?["ModifyIndex"].as_u64()
}
