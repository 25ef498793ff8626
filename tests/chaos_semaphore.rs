//! Randomized fault injection on a semaphore (`run --limit N`): `limit + 1` to `limit + 3`
//! wrappers contend for a prefix of limit 2 or 3, each talking to a local dev agent through a
//! [`FaultProxy`] of its own, while a seeded random sequence of faults hits one holder per round:
//!
//! * SIGTERM of its wrapper (a clean release: the slot is free at once);
//! * SIGKILL of its wrapper (its child group dies with it; what left the group is killed by the
//!   test, as a service manager's cgroup kill would; the slot is taken after the session expires);
//! * its child crashing (SIGKILL from the test; the wrapper exits 137 and releases clean);
//! * `PUT /v1/session/destroy` of its session;
//! * a black-hole of random length on its proxy, then healed (short ones are tolerated, long ones
//!   make it fence itself);
//! * a black-hole during which its session is destroyed: a partition in which Consul invalidates
//!   the session at once (a bound check going critical), so the holder keeps its child until its
//!   fence, and the slot's next holder must wait the dead holder's TTL.
//!
//! Children are configured at random per wrapper (ignoring TERM, grandchildren that ignore TERM
//! or call `setsid`). Wrappers run with `--on-lost recontend`; one that ends is replaced.
//!
//! After every round the checker asserts, from the fixture's journal and a [`DeathWatch`]:
//!
//! * never more than `limit` children at once (`most_at_once`);
//! * every child's fencing token is its own (each admission is its own check-and-set);
//! * `.lock` keeps the limit and never lists more than `limit` holders;
//! * no process outside a live wrapper's tree survives a round;
//!
//! and at the end, after SIGTERM to every wrapper: each exits by it, no process is left, no live
//! holder is left in `.lock`, and no session once those of SIGKILLed wrappers expired.
//!
//! # Running
//!
//! * The short run, part of the normal suite (about a minute):
//!   `cargo test --test chaos_semaphore`.
//! * The long run, with a summary: `CONSUL_LEADER_SEM_CHAOS_ROUNDS=200 cargo test --release --test
//!   chaos_semaphore -- --ignored --nocapture chaos_semaphore_long` (200 rounds by default).
//! * Every run prints `semaphore chaos seed: N (replay with CONSUL_LEADER_SEM_CHAOS_SEED=N)`, at
//!   the start and with any failure. The seed fixes the limit, the number of wrappers, the
//!   children, the faults, their lengths and phases; which contender wins a race is up to the
//!   processes.
//! * Skipped under a real agent (`CONSUL_LEADER_TEST_ADDR`): the proxies need a local agent.
//!
//! Timing: TTL 3s, lock-delay 1s, silence 3s, grace 500ms (as `chaos.rs`, so that a renew
//! placed badly in a short black-hole still lands before the fence).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::leader::{
    DEADLINE, DeathWatch, Fixture, Timing, WrapperBuilder, lifetimes, most_at_once, parent,
    pid_alive, sessions_for, wrapper_of,
};
use common::proxy::{FaultProxy, Mode};
use common::semaphore::{clean_semaphore, live_contenders, lock_key};
use common::{DevAgent, Proc, skip};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

const SEED_ENV: &str = "CONSUL_LEADER_SEM_CHAOS_SEED";
const ROUNDS_ENV: &str = "CONSUL_LEADER_SEM_CHAOS_ROUNDS";
/// Rounds of the short run: about a minute.
const SHORT_ROUNDS: usize = 12;
const LONG_ROUNDS_DEFAULT: usize = 200;

fn timing() -> Timing {
    Timing {
        ttl: "3s",
        lock_delay: "1s",
        silence: "3s",
        grace: "500ms",
    }
}

/// Waits a random phase before a fault, so that faults land at every point of the holder's renew
/// cycle: the phase is the round's input, not a stand-in for waiting on a condition.
fn offset_fault(d: Duration) {
    std::thread::sleep(d);
}

/// Holds a fault for its length: the round's input, not a stand-in for waiting on a condition.
fn hold_fault(d: Duration) {
    std::thread::sleep(d);
}

#[test]
fn chaos_semaphore_short() {
    run_chaos("chaos_semaphore_short", SHORT_ROUNDS);
}

#[test]
#[ignore = "a long randomized run; see the module docs"]
fn chaos_semaphore_long() {
    let rounds = common::chaos_rounds(ROUNDS_ENV, LONG_ROUNDS_DEFAULT);
    run_chaos("chaos_semaphore_long", rounds);
}

fn run_chaos(test: &str, rounds: usize) {
    if DevAgent::is_real() {
        skip(test, "the fault proxies need a local dev agent");
        return;
    }
    common::seeded_run("semaphore chaos", SEED_ENV, |seed| {
        let mut chaos = Chaos::start(seed);
        for _ in 0..rounds {
            chaos.round();
        }
        chaos.finish()
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Term,
    Kill,
    Crash,
    Destroy,
    Blackhole,
    PartitionDestroy,
}

const KINDS: [Kind; 6] = [
    Kind::Term,
    Kind::Kill,
    Kind::Crash,
    Kind::Destroy,
    Kind::Blackhole,
    Kind::PartitionDestroy,
];

struct Contender {
    // Field order is drop order: the wrapper stops before its proxy goes away.
    proc: Proc,
    proxy: FaultProxy,
    id: usize,
    conf: String,
}

struct Chaos {
    rng: StdRng,
    rt: tokio::runtime::Runtime,
    // Drop order: wrappers, then the death watch and fixture, then the agent.
    contenders: Vec<Contender>,
    retired: Vec<Proc>,
    deaths: DeathWatch,
    fx: Fixture,
    agent: DevAgent,
    key: String,
    limit: usize,
    wrappers: usize,
    next_id: usize,
    round: usize,
    log: Vec<String>,
    faults: BTreeMap<Kind, usize>,
    /// Fault to `limit` children running again, per kind.
    refill: BTreeMap<Kind, Vec<Duration>>,
    /// Fencing tokens seen, by child.
    tokens: BTreeMap<u32, u64>,
    escaped_killed: usize,
}

impl Chaos {
    fn start(seed: u64) -> Chaos {
        let mut rng = StdRng::seed_from_u64(seed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let agent = DevAgent::builder()
            .ttl_min("1s")
            .start()
            .expect("a local dev agent");
        let limit = rng.random_range(2..=3);
        let wrappers = limit + rng.random_range(1..=3);
        let fx = Fixture::new();
        let deaths = DeathWatch::start(&fx.journal);
        let key = agent.key("sem");
        let mut chaos = Chaos {
            rng,
            rt,
            contenders: Vec::new(),
            retired: Vec::new(),
            deaths,
            fx,
            agent,
            key,
            limit,
            wrappers,
            next_id: 0,
            round: 0,
            log: Vec::new(),
            faults: BTreeMap::new(),
            refill: BTreeMap::new(),
            tokens: BTreeMap::new(),
            escaped_killed: 0,
        };
        // Start from clean slots, so that the first round does not wait for an unknown past.
        chaos
            .rt
            .block_on(clean_semaphore(&chaos.agent, "sem", limit as u32));
        chaos.note(format!("limit {limit}, {wrappers} wrappers"));
        for _ in 0..wrappers {
            chaos.spawn();
        }
        chaos
    }

    fn note(&mut self, line: String) {
        eprintln!("[semaphore chaos round {}] {line}", self.round);
        self.log.push(format!("round {}: {line}", self.round));
    }

    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(30).rev().collect();
        let outputs: Vec<String> = self
            .contenders
            .iter()
            .map(|c| format!("wrapper #{} ({}):\n{}", c.id, c.conf, c.proc.stderr_text()))
            .collect();
        panic!(
            "{what}\nlast notes:\n{}\njournal: {:?}\n{}",
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            self.fx.events(),
            outputs.join("\n")
        );
    }

    fn spawn(&mut self) {
        self.next_id += 1;
        let id = self.next_id;
        let exits_on_term = self.rng.random_bool(0.7);
        let grandchildren = *["", "ignore-term", "setsid", "ignore-term setsid"]
            .choose(&mut self.rng)
            .unwrap();
        let conf = format!(
            "{}{}",
            if exits_on_term {
                "exits on TERM"
            } else {
                "ignores TERM"
            },
            if grandchildren.is_empty() {
                String::new()
            } else {
                format!(", grandchildren: {grandchildren}")
            }
        );
        let proxy = FaultProxy::start(self.agent.addr().parse().unwrap());
        let mut b = WrapperBuilder::new(&self.agent, &self.fx, &self.key, &timing())
            .flag("--limit", &self.limit.to_string())
            .flag("--on-lost", "recontend")
            .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
            .env("CL_CHILD_GRANDCHILDREN", grandchildren);
        if !exits_on_term {
            b = b.env("CL_CHILD_EXIT_ON", "");
        }
        let proc = b.spawn();
        self.note(format!("wrapper #{id} (pid {}): {conf}", proc.pid()));
        self.contenders.push(Contender {
            proc,
            proxy,
            id,
            conf,
        });
    }

    /// Running `main` children whose parent is a live wrapper, with that wrapper's position.
    fn holders(&self) -> Vec<(u32, usize)> {
        let events = self.fx.events();
        events
            .iter()
            .filter(|e| e.is_main_start())
            .filter(|e| {
                pid_alive(e.pid) && !events.iter().any(|s| s.pid == e.pid && s.kind == "stop")
            })
            .filter_map(|e| {
                let p = wrapper_of(e.pid)?;
                let i = self.contenders.iter().position(|c| c.proc.pid() == p)?;
                Some((e.pid, i))
            })
            .collect()
    }

    /// Waits until `limit` children run; returns them.
    fn wait_full(&mut self) -> Vec<(u32, usize)> {
        let end = Instant::now() + DEADLINE;
        loop {
            let h = self.holders();
            if h.len() == self.limit {
                for (child, _) in &h {
                    if let Some(t) =
                        proc_env(*child, "CONSUL_LEADER_FENCING_TOKEN").and_then(|t| t.parse().ok())
                    {
                        self.tokens.entry(*child).or_insert(t);
                    }
                }
                return h;
            }
            if h.len() > self.limit {
                self.fail(format!(
                    "{} children run with --limit {}",
                    h.len(),
                    self.limit
                ));
            }
            if Instant::now() >= end {
                self.fail(format!(
                    "only {} of {} slots were filled within {DEADLINE:?}",
                    h.len(),
                    self.limit
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn session_of(&self, child: u32) -> String {
        proc_env(child, "CONSUL_LEADER_SESSION")
            .unwrap_or_else(|| self.fail(format!("child {child} has no session")))
    }

    /// Stops tracking wrapper `i` once it exited as expected, and starts a replacement.
    fn retire(&mut self, i: usize, what: &str, expect: impl Fn(std::process::ExitStatus) -> bool) {
        let mut c = self.contenders.remove(i);
        let st = c
            .proc
            .wait_exit(DEADLINE)
            .unwrap_or_else(|| self.fail(format!("wrapper #{} did not exit after {what}", c.id)));
        if !expect(st) {
            self.fail(format!(
                "wrapper #{} ended with {st:?} after {what}\n{}",
                c.id,
                c.proc.output_report()
            ));
        }
        self.retired.push(c.proc);
        self.spawn();
    }

    fn wait_gone(&self, child: u32, what: &str) {
        let end = Instant::now() + DEADLINE;
        while pid_alive(child) {
            if Instant::now() >= end {
                self.fail(format!("child {child} still runs after {what}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn round(&mut self) {
        self.round += 1;
        let holders = self.wait_full();
        self.check();
        let &(child, i) = holders.choose(&mut self.rng).unwrap();
        let kind = *KINDS.choose(&mut self.rng).unwrap();
        *self.faults.entry(kind).or_default() += 1;
        let session = self.session_of(child);
        let id = self.contenders[i].id;
        offset_fault(Duration::from_millis(self.rng.random_range(0..1000)));
        let started = Instant::now();
        match kind {
            Kind::Term => {
                self.note(format!("SIGTERM wrapper #{id} (child {child})"));
                self.contenders[i].proc.signal(Signal::SIGTERM);
                self.retire(i, "SIGTERM", |st| {
                    st.signal() == Some(Signal::SIGTERM as i32)
                });
            }
            Kind::Kill => {
                self.note(format!("SIGKILL wrapper #{id} (child {child})"));
                self.contenders[i].proc.signal(Signal::SIGKILL);
                // What left the child's group is out of a SIGKILLed wrapper's reach; under
                // systemd the cgroup kill takes it. The group itself is the wrapper's guard's job.
                for pid in self.fx.live() {
                    if proc_env(pid, "CONSUL_LEADER_SESSION").as_deref() == Some(&session)
                        && pgid(pid) != Some(child)
                    {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        self.escaped_killed += 1;
                    }
                }
                self.retire(i, "SIGKILL", |st| {
                    st.signal() == Some(Signal::SIGKILL as i32)
                });
                self.wait_gone(child, "its wrapper was SIGKILLed");
            }
            Kind::Crash => {
                self.note(format!("SIGKILL child {child} of wrapper #{id}"));
                let _ = kill(Pid::from_raw(child as i32), Signal::SIGKILL);
                self.retire(i, "its child was SIGKILLed", |st| st.code() == Some(137));
            }
            Kind::Destroy => {
                self.note(format!("destroy session {session} of wrapper #{id}"));
                self.rt.block_on(self.agent.destroy_session(&session));
                self.wait_gone(child, "its session was destroyed");
            }
            Kind::Blackhole => {
                let len = Duration::from_millis(self.rng.random_range(200..5_000));
                self.note(format!("black-hole wrapper #{id} for {len:?}"));
                self.contenders[i].proxy.set_mode(Mode::Blackhole);
                hold_fault(len);
                self.contenders[i].proxy.set_mode(Mode::Pass);
            }
            Kind::PartitionDestroy => {
                let len = Duration::from_millis(self.rng.random_range(0..4_000));
                self.note(format!(
                    "black-hole wrapper #{id}, destroy session {session}, heal after {len:?}"
                ));
                self.contenders[i].proxy.set_mode(Mode::Blackhole);
                self.rt.block_on(self.agent.destroy_session(&session));
                hold_fault(len);
                self.wait_gone(child, "its fence (cut off, session destroyed)");
                self.contenders[i].proxy.set_mode(Mode::Pass);
            }
        }
        self.wait_full();
        self.refill.entry(kind).or_default().push(started.elapsed());
        self.check();
    }

    /// The invariants that hold at any moment (module docs).
    fn check(&self) {
        let lives = lifetimes(&self.fx.events(), &self.deaths.ended());
        let (most, pids) = most_at_once(&lives);
        if most > self.limit {
            self.fail(format!(
                "{most} children ran at once with --limit {}: {pids:?}",
                self.limit
            ));
        }
        let mut seen = BTreeMap::new();
        for (child, token) in &self.tokens {
            if let Some(other) = seen.insert(*token, *child) {
                self.fail(format!(
                    "children {other} and {child} got the same fencing token {token}"
                ));
            }
        }
        let lock = self
            .rt
            .block_on(lock_key(&self.agent, "sem"))
            .unwrap_or_else(|| self.fail("the semaphore's .lock is gone".into()));
        if lock.value["Limit"] != self.limit || lock.holders().len() > self.limit {
            self.fail(format!(".lock broke its limit: {}", lock.value));
        }
        let wrappers: BTreeSet<u32> = self.contenders.iter().map(|c| c.proc.pid()).collect();
        let strays: Vec<u32> = self
            .fx
            .live()
            .into_iter()
            .filter(|p| pid_alive(*p) && !wrappers.iter().any(|w| descends_from(*p, *w)))
            .collect();
        if !strays.is_empty() {
            self.fail(format!(
                "processes outside every live wrapper's tree: {strays:?}"
            ));
        }
    }

    fn finish(mut self) -> String {
        self.note("stopping every wrapper with SIGTERM".into());
        for c in &self.contenders {
            c.proc.signal(Signal::SIGTERM);
        }
        let contenders = std::mem::take(&mut self.contenders);
        for mut c in contenders {
            let st = c
                .proc
                .wait_exit(DEADLINE)
                .unwrap_or_else(|| self.fail(format!("wrapper #{} did not exit", c.id)));
            if st.signal() != Some(Signal::SIGTERM as i32) {
                self.fail(format!(
                    "wrapper #{} ended with {st:?} after the final SIGTERM\n{}",
                    c.id,
                    c.proc.output_report()
                ));
            }
            self.retired.push(c.proc);
        }
        self.fx.wait_none_left(DEADLINE);
        self.check();
        let live = self.rt.block_on(live_contenders(&self.agent, "sem"));
        let lock = self.rt.block_on(lock_key(&self.agent, "sem")).unwrap();
        if lock.holders().iter().any(|h| live.contains(h)) {
            self.fail(format!("a live holder is left: {}", lock.value));
        }
        let deadline = Instant::now() + DEADLINE;
        while !self
            .rt
            .block_on(sessions_for(&self.agent, &self.key))
            .is_empty()
        {
            if Instant::now() >= deadline {
                self.fail("sessions are left after every wrapper stopped".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let lives = lifetimes(&self.fx.events(), &self.deaths.ended());
        let mut out = format!(
            "semaphore chaos: limit {}, {} wrappers at a time ({} in all), {} rounds, {} children, \
             most at once {}; escaped grandchildren of SIGKILLed wrappers killed: {}\n",
            self.limit,
            self.wrappers,
            self.next_id,
            self.round,
            lives.len(),
            most_at_once(&lives).0,
            self.escaped_killed
        );
        for (kind, n) in &self.faults {
            let times = &self.refill[kind];
            let max = times.iter().max().copied().unwrap_or_default();
            let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
            out.push_str(&format!(
                "  {kind:?}: {n}, slots full again after {mean:.1?} on average, {max:.1?} at most\n"
            ));
        }
        out
    }
}

/// A variable of a process's environment.
fn proc_env(pid: u32, var: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{var}=");
    env.split(|b| *b == 0).find_map(|v| {
        v.strip_prefix(prefix.as_bytes())
            .map(|rest| String::from_utf8_lossy(rest).into_owned())
    })
}

/// A process's group, from `/proc/<pid>/stat`.
fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        match parent(p) {
            Some(pp) if pp == ancestor => return true,
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}
