//! consul-leader against `etcdctl lock` on the same etcd member, interleaved round by round (an
//! ignored test, run on demand). It is the benchmark of issue 12 (the etcd engine) and of issue 13
//! (fast paths), which set the targets printed with the table:
//!
//! ```sh
//! cargo test --release --test bench_etcd -- --ignored --nocapture
//! CONSUL_LEADER_BENCH_ROUNDS=5 CONSUL_LEADER_BENCH_IDLE=2000 \
//!     cargo test --release --test bench_etcd -- --ignored --nocapture
//! ```
//!
//! Both tools hold the same lock name with the same TTL (3s) and run a small compiled child
//! (`tests/fixtures/child.c`, built with `cc`), so that no interpreter's start-up hides the
//! difference; its journal times every start and stop on one clock:
//!
//! * **clean handover**, on a quiet host and with `CONSUL_LEADER_BENCH_IDLE` (default 2,000) extra
//!   idle processes: the holder's command ends (SIGTERM to it); from its end to the start of the
//!   next holder's command, which was already waiting;
//! * **loss detection**: the holder's lease is revoked (`etcdctl lease revoke`); from the revoke
//!   to the stop signal reaching the holder's command. `etcdctl lock` never stops its command:
//!   the table says so when it is still running 5s later;
//! * **free lock**: one whole invocation running `true` (`run --wait 0 -- true` against
//!   `etcdctl lock NAME true`);
//! * **try-once on a held lock**: `run --wait 0` exits 75 after one read, writing nothing;
//!   `etcdctl lock` has no way to give up, so only ours is timed;
//! * **idle memory and CPU** of a leader and of a standby: the tool's own processes (ours: the
//!   wrapper and its keeper; etcdctl's: itself), never the command's tree; proportional memory
//!   (PSS) and CPU time over 10s from `/proc/<pid>/schedstat`, given per minute.
//!
//! It prints min / median / max per tool and the ratio of the medians (consul-leader /
//! etcdctl).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::{Cluster, EtcdTiming, etcd_wrapper, lock_name, skip_without_etcd, status};
use common::leader::{DEADLINE, Event, Fixture, MARKER_ENV, now_us, parent};
use common::{IdleProcesses, Proc, bin_path, wait_until_sync};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const TIMING: EtcdTiming = EtcdTiming {
    ttl: "3s",
    silence: "3s",
    grace: "1s",
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    ConsulLeader,
    Etcdctl,
}

const TOOLS: [Tool; 2] = [Tool::ConsulLeader, Tool::Etcdctl];

struct Bench {
    etcd: Cluster,
    fx: Fixture,
    /// The compiled child.
    child: PathBuf,
}

impl Bench {
    /// A holder (or waiter) of `name` running the compiled child.
    fn holder(&self, tool: Tool, name: &str) -> Proc {
        let child = self.child.to_str().unwrap();
        match tool {
            Tool::ConsulLeader => etcd_wrapper(&self.fx, &self.etcd.endpoints(), name, &TIMING)
                .env("CONSUL_LEADER_LOG", "consul_leader=warn")
                .command(&[child])
                .spawn(),
            Tool::Etcdctl => {
                let mut cmd = self
                    .etcd
                    .etcdctl_command(&["lock", "--ttl", "3", name, child]);
                cmd.env(MARKER_ENV, &self.fx.marker)
                    .env("CL_CHILD_JOURNAL", &self.fx.journal);
                Proc::spawn(cmd)
            }
        }
    }

    fn starts(&self) -> Vec<Event> {
        self.fx
            .events()
            .into_iter()
            .filter(Event::is_main_start)
            .collect()
    }

    /// Waits for a main start not among `known`.
    fn new_start(&self, known: &[u32]) -> Event {
        let mut found = None;
        wait_until_sync("a command starts", DEADLINE, || {
            found = self.starts().into_iter().find(|e| !known.contains(&e.pid));
            found.is_some()
        });
        found.unwrap()
    }

    fn known(&self) -> Vec<u32> {
        self.starts().iter().map(|e| e.pid).collect()
    }

    fn wait_waiters(&self, name: &str, n: usize) {
        wait_until_sync("the waiter queues", DEADLINE, || {
            status(&self.etcd.endpoints(), name)["waiters"]
                .as_array()
                .is_some_and(|w| w.len() == n)
        });
    }

    /// Ends a holder: SIGTERM for ours; for etcdctl, its command (it does not stop it itself).
    fn end(&self, tool: Tool, p: &mut Proc, child: u32) {
        match tool {
            Tool::ConsulLeader => p.signal(Signal::SIGTERM),
            Tool::Etcdctl => {
                let _ = kill(Pid::from_raw(child as i32), Signal::SIGKILL);
            }
        }
        p.wait_exit(DEADLINE).expect("the holder exits");
        self.fx.wait_none_left(DEADLINE);
    }

    /// A lock released clean once, so that our first holder does not wait the first-run silence.
    fn warm_lock(&self, what: &str) -> String {
        let name = lock_name(what);
        let mut w = etcd_wrapper(&self.fx, &self.etcd.endpoints(), &name, &TIMING)
            .command(&["true"])
            .spawn();
        assert_eq!(w.wait_exit(DEADLINE).and_then(|s| s.code()), Some(0));
        name
    }

    fn clean_handover(&self, tool: Tool) -> u64 {
        let name = self.warm_lock("handover");
        let known = self.known();
        let mut h = self.holder(tool, &name);
        let first = self.new_start(&known);
        let mut w = self.holder(tool, &name);
        self.wait_waiters(&name, 1);
        let known = self.known();
        let _ = kill(Pid::from_raw(first.pid as i32), Signal::SIGTERM);
        let next = self.new_start(&known);
        let ended = self
            .fx
            .events()
            .iter()
            .find(|e| e.pid == first.pid && e.kind == "stop")
            .map(|e| e.time_us)
            .expect("the holder's command journalled its end");
        let _ = h.wait_exit(DEADLINE);
        self.end(tool, &mut w, next.pid);
        next.time_us - ended
    }

    /// `None`: the command was not stopped within 5s.
    fn loss_detection(&self, tool: Tool) -> Option<u64> {
        let name = self.warm_lock("loss");
        let known = self.known();
        let mut h = self.holder(tool, &name);
        let child = self.new_start(&known);
        let lease = status(&self.etcd.endpoints(), &name)["owner"]["lease"]
            .as_str()
            .unwrap()
            .to_string();
        let revoked = now_us();
        self.etcd.etcdctl(&["lease", "revoke", &lease]);
        let end = Instant::now() + Duration::from_secs(5);
        let mut seen = None;
        while Instant::now() < end && seen.is_none() {
            seen = self
                .fx
                .events()
                .iter()
                .find(|e| e.pid == child.pid && e.kind == "signal")
                .map(|e| e.time_us - revoked);
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = kill(Pid::from_raw(child.pid as i32), Signal::SIGKILL);
        let _ = h.wait_exit(DEADLINE);
        self.fx.wait_none_left(DEADLINE);
        seen
    }

    /// The whole invocation on a free lock, in microseconds.
    fn try_once_free(&self, tool: Tool) -> u64 {
        let name = self.warm_lock("once");
        let mut cmd = match tool {
            Tool::ConsulLeader => {
                let mut c = Command::new(bin_path());
                c.args(["run", "-q", "--etcd-endpoints", &self.etcd.endpoints()])
                    .args([
                        "--key",
                        &name,
                        "--ttl",
                        "3s",
                        "--silence",
                        "3s",
                        "--grace",
                        "1s",
                    ])
                    .args(["--wait", "0", "--", "true"]);
                c
            }
            Tool::Etcdctl => self
                .etcd
                .etcdctl_command(&["lock", "--ttl", "3", &name, "true"]),
        };
        cmd.env_remove("CONSUL_HTTP_ADDR")
            .env_remove("ETCDCTL_ENDPOINTS");
        let started = Instant::now();
        let out = cmd.output().unwrap();
        let took = started.elapsed().as_micros() as u64;
        assert!(out.status.success(), "{tool:?}: {out:?}");
        took
    }

    /// `run --wait 0` on a held lock: its whole invocation, exit 75.
    fn try_once_busy(&self) -> u64 {
        let name = self.warm_lock("busy");
        let known = self.known();
        let mut h = self.holder(Tool::ConsulLeader, &name);
        let child = self.new_start(&known);
        let started = Instant::now();
        let out = Command::new(bin_path())
            .args(["run", "-q", "--etcd-endpoints", &self.etcd.endpoints()])
            .args([
                "--key",
                &name,
                "--ttl",
                "3s",
                "--silence",
                "3s",
                "--grace",
                "1s",
            ])
            .args(["--wait", "0", "--", "true"])
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("ETCDCTL_ENDPOINTS")
            .output()
            .unwrap();
        let took = started.elapsed().as_micros() as u64;
        assert_eq!(out.status.code(), Some(75));
        self.end(Tool::ConsulLeader, &mut h, child.pid);
        took
    }

    /// The tool's own PSS (KiB) and CPU time (ms per minute, measured over 10s), as the leader
    /// and as a standby waiting behind it: `[(leader), (standby)]`.
    fn idle(&self, tool: Tool) -> [(u64, u64); 2] {
        let name = self.warm_lock("idle");
        let known = self.known();
        let mut h = self.holder(tool, &name);
        let child = self.new_start(&known);
        let mut w = self.holder(tool, &name);
        self.wait_waiters(&name, 1);
        // The processes that hold the lock: the wrapper and its keeper, or etcdctl (the
        // command's parent); never the command's own tree.
        let leader = match tool {
            Tool::ConsulLeader => h.pid(),
            Tool::Etcdctl => parent(child.pid).unwrap(),
        };
        let sets = [tool_pids(leader, child.pid), tool_pids(w.pid(), 0)];
        std::thread::sleep(Duration::from_secs(1));
        let cpu0: Vec<u64> = sets
            .iter()
            .map(|p| p.iter().map(|p| cpu_ns(*p)).sum())
            .collect();
        std::thread::sleep(Duration::from_secs(10));
        let measure = |i: usize| {
            let cpu = sets[i].iter().map(|p| cpu_ns(*p)).sum::<u64>() - cpu0[i];
            let pss = sets[i].iter().map(|p| pss_kib(*p)).sum();
            (pss, cpu * 6 / 1_000_000)
        };
        let out = [measure(0), measure(1)];
        let known = self.known();
        let _ = kill(Pid::from_raw(child.pid as i32), Signal::SIGTERM);
        let _ = h.wait_exit(DEADLINE);
        let next = self.new_start(&known);
        self.end(tool, &mut w, next.pid);
        out
    }
}

/// CPU time the process has run, in nanoseconds (`/proc/<pid>/schedstat`, exact, unlike the
/// clock ticks of `/proc/<pid>/stat`).
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Proportional set size (shared pages split between their users), in KiB.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `root` and its descendants, without `command` and the command's descendants.
fn tool_pids(root: u32, command: u32) -> Vec<u32> {
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let under = |mut pid: u32, top: u32| {
        for _ in 0..32 {
            if pid == top {
                return true;
            }
            match parent(pid) {
                Some(p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    all.into_iter()
        .filter(|p| under(*p, root) && !under(*p, command))
        .collect()
}

/// min / median / max of `v`, divided by `unit`.
fn mmm(v: &[u64], unit: f64) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let f = |x: u64| x as f64 / unit;
    format!(
        "{:.1} / {:.1} / {:.1}",
        f(s[0]),
        f(s[s.len() / 2]),
        f(s[s.len() - 1])
    )
}

fn median(v: &[u64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).map_or(f64::NAN, |x| *x as f64)
}

#[test]
#[ignore = "a benchmark; see the module docs"]
fn bench_etcd_against_etcdctl_lock() {
    if skip_without_etcd("bench_etcd_against_etcdctl_lock") {
        return;
    }
    let number = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = number("CONSUL_LEADER_BENCH_ROUNDS", 10);
    let idle_count = number("CONSUL_LEADER_BENCH_IDLE", 2000);
    let fx = Fixture::new();
    let Some(child) = fx.compiled_child() else {
        panic!("the benchmark needs a C compiler (cc) for its child: apt-get install gcc");
    };
    let b = Bench {
        etcd: Cluster::single(),
        fx,
        child,
    };
    let mut handover = [Vec::new(), Vec::new()];
    let mut crowded = [Vec::new(), Vec::new()];
    let mut loss = [Vec::new(), Vec::new()];
    let mut never = [0usize, 0];
    let mut free = [Vec::new(), Vec::new()];
    let mut busy = Vec::new();
    let mut mem = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    let mut cpu = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for round in 1..=rounds {
        for (i, tool) in TOOLS.iter().enumerate() {
            handover[i].push(b.clean_handover(*tool));
            match b.loss_detection(*tool) {
                Some(us) => loss[i].push(us),
                None => never[i] += 1,
            }
            free[i].push(b.try_once_free(*tool));
            if round <= rounds.div_ceil(3) {
                for (role, (pss, ms)) in b.idle(*tool).into_iter().enumerate() {
                    mem[role][i].push(pss);
                    cpu[role][i].push(ms);
                }
            }
        }
        busy.push(b.try_once_busy());
        eprintln!("round {round}/{rounds} done");
    }
    // The same handovers with a crowded host, after all the quiet ones.
    let crowd = IdleProcesses::start(idle_count);
    for _ in 0..rounds {
        for (i, tool) in TOOLS.iter().enumerate() {
            crowded[i].push(b.clean_handover(*tool));
        }
    }
    drop(crowd);
    let ratio = |a: &[u64], e: &[u64]| {
        let r = median(a) / median(e);
        if r.is_finite() {
            format!("{r:.2}")
        } else {
            "-".into()
        }
    };
    let never_note = |i: usize| {
        if never[i] > 0 {
            format!(" (never stopped: {}/{rounds})", never[i])
        } else {
            String::new()
        }
    };
    let mut out = String::new();
    out.push_str(&format!(
        "bench_etcd: consul-leader and etcdctl lock on one etcd member, {rounds} rounds, \
         interleaved; min / median / max\n\
         | scenario | consul-leader | etcdctl lock | ratio (median) | target |\n|---|---|---|---|---|\n"
    ));
    out.push_str(&format!(
        "| clean handover, quiet host (ms) | {} | {} | {} | <= 1.0 |\n",
        mmm(&handover[0], 1000.0),
        mmm(&handover[1], 1000.0),
        ratio(&handover[0], &handover[1])
    ));
    out.push_str(&format!(
        "| clean handover, {idle_count} extra idle processes (ms) | {} | {} | {} | <= 1.0 |\n",
        mmm(&crowded[0], 1000.0),
        mmm(&crowded[1], 1000.0),
        ratio(&crowded[0], &crowded[1])
    ));
    out.push_str(&format!(
        "| free lock, `true` end to end (ms) | {} | {} | {} | <= 0.5 |\n",
        mmm(&free[0], 1000.0),
        mmm(&free[1], 1000.0),
        ratio(&free[0], &free[1])
    ));
    out.push_str(&format!(
        "| try-once, held lock (ms) | {} (exit 75, nothing written) | no way to give up | - | <= 3 ms |\n",
        mmm(&busy, 1000.0)
    ));
    out.push_str(&format!(
        "| loss detection, lease revoked (ms) | {}{} | {}{} | - | - |\n",
        mmm(&loss[0], 1000.0),
        never_note(0),
        if loss[1].is_empty() {
            "never stops its command".to_string()
        } else {
            mmm(&loss[1], 1000.0)
        },
        never_note(1)
    ));
    for (role, name) in ["leader", "standby"].iter().enumerate() {
        out.push_str(&format!(
            "| idle memory, {name}, PSS (MiB) | {} | {} | {} | - |\n",
            mmm(&mem[role][0], 1024.0),
            mmm(&mem[role][1], 1024.0),
            ratio(&mem[role][0], &mem[role][1])
        ));
        out.push_str(&format!(
            "| idle CPU, {name} (ms per minute) | {} | {} | {} | - |\n",
            mmm(&cpu[role][0], 1.0),
            mmm(&cpu[role][1], 1.0),
            ratio(&cpu[role][0], &cpu[role][1])
        ));
    }
    eprintln!("{out}");
}
