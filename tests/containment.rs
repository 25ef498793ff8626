//! A child tree that cannot outlive its lock (issue 9): the real binary against a dev agent, the
//! child fixture's journal, real signals, a real terminal. Each test is named after the fault it
//! pins; every one of them failed on the code before the keeper.
//!
//! No test here kills a process the wrapper should have stopped: a process left behind is a
//! failure (`Fixture::wait_none_left`), never something the harness tidies up.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::leader::{
    DEADLINE, DeathWatch, Event, Fixture, SHORT, Timing, WrapperBuilder, exit_of, lifetimes,
    local_agent, now_us, overlaps, parent, pid_alive, state,
};
use common::proxy::{FaultProxy, Mode};
use common::{Proc, wait_until_sync};
use nix::sys::signal::Signal;

/// The variable that keeps the wrapper from giving its command a cgroup (for the path without).
const CGROUP_ENV: &str = "CONSUL_LEADER_CGROUP";

fn main_starts(ev: &[Event]) -> Vec<&Event> {
    ev.iter().filter(|e| e.is_main_start()).collect()
}

fn count(ev: &[Event], pid: u32, kind: &str, detail: &str) -> usize {
    ev.iter()
        .filter(|e| e.pid == pid && e.kind == kind && e.detail == detail)
        .count()
}

fn grace_of(t: &Timing) -> Duration {
    humantime::parse_duration(t.grace).unwrap()
}

fn wait_standby(w: &Proc) {
    wait_until_sync("the second wrapper waits for the lock", DEADLINE, || {
        w.stderr_text().contains("waiting for the lock")
    });
}

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/<pid>/cgroup`).
fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Whether a wrapper started by this test process can give its command a cgroup of its own,
/// judged from outside by the same rule the wrapper applies; `Err(why)` when it cannot.
fn cgroup_available() -> Result<(), String> {
    let own = cgroup_of(std::process::id()).ok_or("no cgroup v2 hierarchy")?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let point = mountinfo
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| before.split_whitespace().nth(4).map(str::to_owned))?
        })
        .ok_or("cgroup2 is not mounted")?;
    if std::path::Path::new("/run/systemd/system").is_dir() && own != "/" {
        return Err(format!(
            "under systemd, cgroup {own} is the wrapper's only if delegated"
        ));
    }
    let dir = format!("{point}{}", own.trim_end_matches('/'));
    nix::unistd::access(dir.as_str(), nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("{dir} is not writable: {e}"))
}

// ---------------------------------------------------------------------------------------------
// 1. A paused wrapper keeps its child running past its fence
// ---------------------------------------------------------------------------------------------

/// SIGSTOP of the leading wrapper alone, while a second contender waits: the keeper stops the
/// child at the fence although the wrapper cannot run, so the successor's child never overlaps
/// it; continued, the wrapper counts the lock lost (76).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_wrapper_cannot_keep_its_child_past_the_fence() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("paused");
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &SHORT).spawn();
    let events = fx.wait_journal("A's child started", |ev| !main_starts(ev).is_empty());
    let a_child = main_starts(&events)[0].pid;
    let mut b = WrapperBuilder::new(&agent, &fx, &key, &SHORT).spawn();
    wait_standby(&b);

    a.signal(Signal::SIGSTOP);
    let paused_at = now_us();
    wait_until_sync("A is stopped", DEADLINE, || state(a.pid()) == Some('T'));
    let events = fx.wait_journal("A's child stopped", |ev| {
        ev.iter().any(|e| e.pid == a_child && e.kind == "stop")
    });
    assert_eq!(
        state(a.pid()),
        Some('T'),
        "the wrapper is still stopped: its keeper stopped the child"
    );
    assert_eq!(count(&events, a_child, "signal", "TERM"), 1, "{events:?}");
    let stopped = events
        .iter()
        .find(|e| e.pid == a_child && e.kind == "stop")
        .unwrap();
    let ttl_us = 3_000_000;
    assert!(
        stopped.time_us < paused_at + ttl_us,
        "A's child stopped {}us after the pause, past its last renew + TTL",
        stopped.time_us - paused_at
    );

    // Consul expires A's session; B leads, and its child never overlaps A's.
    let events = fx.wait_journal("B's child started", |ev| main_starts(ev).len() >= 2);
    let lives = lifetimes(&events, &deaths.ended());
    assert!(
        overlaps(&lives).is_empty(),
        "children overlapped: {:?}",
        overlaps(&lives)
    );
    assert!(
        state(a.pid()) == Some('T'),
        "A stayed stopped all along: nothing of this was its doing"
    );

    a.signal(Signal::SIGCONT);
    let st = exit_of(&mut a);
    assert_eq!(st.code(), Some(76), "{}", a.output_report());
    b.signal(Signal::SIGTERM);
    exit_of(&mut b);
    fx.wait_none_left(DEADLINE);
}

/// The wrapper's own timer and the keeper's fire at the same fence (a black-holed leader): the
/// child gets the stop signal once, not once from each. (Not a fault of the old code, which had
/// one timer: it pins that the keeper's second one adds no second stop signal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_child_gets_the_stop_signal_once() {
    let Some(agent) = local_agent() else { return };
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let key = agent.key("once");
    let mut a = WrapperBuilder::new(&agent, &fx, &key, &SHORT)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CL_CHILD_EXIT_ON", "") // survives TERM: the whole grace runs, then SIGKILL
        .spawn();
    let events = fx.wait_journal("the child started", |ev| !main_starts(ev).is_empty());
    let child = main_starts(&events)[0].pid;
    proxy.set_mode(Mode::Blackhole);
    wait_until_sync("the child is gone", DEADLINE, || !pid_alive(child));
    let st = exit_of(&mut a);
    assert_eq!(st.code(), Some(76), "{}", a.output_report());
    let events = fx.events();
    assert_eq!(count(&events, child, "signal", "TERM"), 1, "{events:?}");
    fx.wait_none_left(DEADLINE);
}

// ---------------------------------------------------------------------------------------------
// 2. A SIGKILLed wrapper leaves daemons behind
// ---------------------------------------------------------------------------------------------

/// SIGKILL of the leading wrapper whose command started a grandchild that ignores TERM, one in a
/// session of its own and a double-forked daemon: all of them, and the keeper, are gone within
/// the grace plus a second, with nobody's help, before the next leader's child starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_wrapper_leaves_no_daemon_behind() {
    sigkilled_wrapper_leaves_nothing(true).await;
}

/// The same without a cgroup: the keeper's walk down its own subtree finds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_wrapper_leaves_no_daemon_behind_without_a_cgroup() {
    sigkilled_wrapper_leaves_nothing(false).await;
}

async fn sigkilled_wrapper_leaves_nothing(cgroup: bool) {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let deaths = DeathWatch::start(&fx.journal);
    let key = agent.key("killed");
    let leader = |grandchildren: bool| {
        let mut w = WrapperBuilder::new(&agent, &fx, &key, &SHORT);
        if grandchildren {
            w = w.env("CL_CHILD_GRANDCHILDREN", "ignore-term setsid daemon");
        }
        if !cgroup {
            w = w.env(CGROUP_ENV, "off");
        }
        w.spawn()
    };
    let mut a = leader(true);
    let events = fx.wait_journal("A's child started", |ev| !main_starts(ev).is_empty());
    let a_child = main_starts(&events)[0].pid;
    // Everything that carries the marker but the wrappers: the keeper, the command, the three
    // grandchildren.
    let tree = fx.live();
    // How the tree is held, checked after the fault itself (so that the old code fails on what
    // matters, not on its different shape).
    let mut shape = Vec::new();
    if tree.len() != 5 {
        shape.push(format!(
            "keeper, child, three grandchildren expected: {tree:?}"
        ));
    }
    let keeper = parent(a_child).unwrap();
    if parent(keeper) != Some(a.pid()) {
        shape.push("the wrapper is not the keeper's parent".to_owned());
    }
    for pid in &tree {
        if *pid != keeper && !is_below(*pid, keeper) {
            shape.push(format!("{pid} is not in the keeper's subtree"));
        }
    }
    let own_cgroup = format!("/consul-leader-{keeper}");
    match (cgroup, cgroup_available()) {
        (true, Ok(())) => {
            for pid in tree.iter().filter(|p| **p != keeper) {
                let cg = cgroup_of(*pid).unwrap_or_default();
                if !cg.ends_with(&own_cgroup) {
                    shape.push(format!("{pid} is in cgroup {cg}"));
                }
            }
        }
        (true, Err(why)) => eprintln!("SKIPPED the cgroup check: {why}"),
        (false, _) => {
            let cg = cgroup_of(a_child).unwrap_or_default();
            if cg.contains("/consul-leader-") {
                shape.push(format!("in cgroup {cg} with {CGROUP_ENV}=off"));
            }
        }
    }
    let mut b = leader(false);
    wait_standby(&b);

    a.signal(Signal::SIGKILL);
    let killed = Instant::now();
    assert_eq!(exit_of(&mut a).signal(), Some(Signal::SIGKILL as i32));
    wait_until_sync("A's tree is gone", DEADLINE, || {
        tree.iter().all(|pid| !pid_alive(*pid))
    });
    let took = killed.elapsed();
    let bound = grace_of(&SHORT) + Duration::from_secs(1);
    assert!(
        took <= bound,
        "A's tree took {took:?} to go after the SIGKILL; the bound is grace + 1s = {bound:?}"
    );
    let events = fx.events();
    for role in ["setsid", "daemon"] {
        let pid = events
            .iter()
            .find(|e| e.kind == "start" && e.detail == role)
            .unwrap()
            .pid;
        assert_eq!(
            count(&events, pid, "signal", "TERM"),
            1,
            "the {role} grandchild was asked to stop first: {events:?}"
        );
    }
    assert!(shape.is_empty(), "{shape:#?}");
    if cgroup {
        let gone = wait_for_path_gone(&own_cgroup);
        assert!(gone, "the command's cgroup {own_cgroup} was not removed");
    }

    let events = fx.wait_journal("B's child started", |ev| main_starts(ev).len() >= 2);
    let lives = lifetimes(&events, &deaths.ended());
    assert!(
        overlaps(&lives).is_empty(),
        "children overlapped: {:?}",
        overlaps(&lives)
    );
    b.signal(Signal::SIGTERM);
    exit_of(&mut b);
    fx.wait_none_left(DEADLINE);
}

/// Whether `pid` descends from `ancestor`.
fn is_below(pid: u32, ancestor: u32) -> bool {
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

/// Waits until no cgroup directory ends with `suffix` under the cgroup2 mount (where the
/// wrapper's own cgroup is); true once gone.
fn wait_for_path_gone(suffix: &str) -> bool {
    let Some(own) = cgroup_of(std::process::id()) else {
        return true;
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(point) = mountinfo.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(str::to_owned))?
    }) else {
        return true;
    };
    let dir = format!("{point}{}{suffix}", own.trim_end_matches('/'));
    let end = Instant::now() + DEADLINE;
    while std::path::Path::new(&dir).exists() {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// After a clean run, the command's cgroup is removed; with `CONSUL_LEADER_CGROUP=off` the
/// command stays in the wrapper's cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_cgroup_is_removed_after_the_run() {
    if let Err(why) = cgroup_available() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let key = agent.key("cgroup");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &SHORT).spawn();
    let events = fx.wait_journal("the child started", |ev| !main_starts(ev).is_empty());
    let child = main_starts(&events)[0].pid;
    let keeper = parent(child).unwrap();
    let cg = cgroup_of(child).unwrap();
    assert!(cg.ends_with(&format!("/consul-leader-{keeper}")), "{cg}");
    assert_eq!(
        cgroup_of(keeper),
        cgroup_of(w.pid()),
        "the keeper stays outside the command's cgroup"
    );
    w.signal(Signal::SIGTERM);
    exit_of(&mut w);
    assert!(wait_for_path_gone(&format!("/consul-leader-{keeper}")));
    fx.wait_none_left(DEADLINE);
}

// ---------------------------------------------------------------------------------------------
// 4. An interactive command freezes
// ---------------------------------------------------------------------------------------------

/// A pseudo-terminal whose master this test holds; what is written to the terminal is drained
/// (so nothing blocks on a full buffer) and kept.
struct Terminal {
    master: OwnedFd,
    slave: std::ffi::CString,
    output: Arc<Mutex<Vec<u8>>>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Terminal {
    fn open() -> Terminal {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
            nix::fcntl::fcntl(
                // SAFETY: both descriptors are open and owned by `pty` for this call.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .unwrap();
        }
        let name = nix::unistd::ttyname(&pty.slave).expect("ttyname");
        let slave = std::ffi::CString::new(name.into_os_string().into_encoded_bytes()).unwrap();
        let output: Arc<Mutex<Vec<u8>>> = Arc::default();
        let done: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let reader = pty.master.try_clone().unwrap();
        let (store, stop) = (output.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match nix::unistd::read(&reader, &mut buf) {
                    Ok(n) if n > 0 => store.lock().unwrap().extend_from_slice(&buf[..n]),
                    // EIO while no process has the terminal open (before the first, after the
                    // last): look again shortly.
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Terminal {
            master: pty.master,
            slave,
            output,
            done,
        }
    }

    /// Makes `cmd` start a session whose controlling terminal is this one, on its stdin.
    fn control(&self, cmd: &mut Command) {
        let slave = self.slave.clone();
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe calls
        // (setsid, open, dup2, close) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A session leader without a terminal acquires the first one it opens.
                let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
                if fd < 0 || libc::dup2(fd, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }

    /// Types `bytes` on the terminal's keyboard.
    fn type_in(&self, bytes: &[u8]) {
        nix::unistd::write(&self.master, bytes).unwrap();
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }
}

/// A command that reads its terminal while its wrapper runs in the terminal's foreground gets
/// the line, instead of being stopped by SIGTTIN; Ctrl-C interrupts the command, as in a shell,
/// and the wrapper exits 130 (128 + SIGINT) after releasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_command_is_not_frozen_by_sigttin() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let key = agent.key("tty");
    let terminal = Terminal::open();
    let mut cmd = WrapperBuilder::new(&agent, &fx, &key, &SHORT)
        .env("CL_CHILD_READ_STDIN", "1")
        .into_command();
    terminal.control(&mut cmd);
    let mut w = Proc::spawn(cmd);
    let events = fx.wait_journal("the child started", |ev| !main_starts(ev).is_empty());
    let child = main_starts(&events)[0].pid;

    terminal.type_in(b"hello\n");
    let events = fx.wait_journal("the child read its terminal", |ev| {
        ev.iter().any(|e| e.kind == "read") || state(child) == Some('T') // stopped by SIGTTIN: fail now, not at the deadline
    });
    assert!(
        count(&events, child, "read", "hello") == 1,
        "the child did not read the line (state {:?}): {events:?}\n{}",
        state(child),
        w.output_report()
    );

    terminal.type_in(b"\x03"); // Ctrl-C
    let st = exit_of(&mut w);
    assert_eq!(
        st.code(),
        Some(128 + Signal::SIGINT as i32),
        "{}",
        w.output_report()
    );
    assert_eq!(count(&fx.events(), child, "signal", "INT"), 1);
    assert!(
        w.stderr_text().contains("released the lock"),
        "{}",
        w.stderr_text()
    );
    fx.wait_none_left(DEADLINE);
}

/// Under a shell with job control: Ctrl-Z stops the job (the shell reports it stopped, status
/// 148), `fg` resumes it and the command reads the terminal again, Ctrl-C ends it (130).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_z_stops_the_job_and_fg_resumes_it() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let key = agent.key("jobs");
    let terminal = Terminal::open();
    let status = fx.dir.join("status");
    let log = fx.dir.join("wrapper.log");
    let wrapper = WrapperBuilder::new(&agent, &fx, &key, &SHORT)
        .env("CL_CHILD_READ_STDIN", "1")
        .into_command();
    // The wrapper's command line, quoted for the shell.
    let line: Vec<String> = std::iter::once(wrapper.get_program())
        .chain(wrapper.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect();
    // `set -m`: job control, as in an interactive shell. The job shell starts with the terminal
    // on all three descriptors and keeps it on its stderr, through which bash moves the
    // foreground; the wrapper's log goes to a file.
    let job = format!(
        "set -m\n{line} 2>>{log}\necho \"status=$?\" >>{status}\n\
         fg\necho \"status=$?\" >>{status}\n",
        line = line.join(" "),
        log = shell_quote(&log.to_string_lossy()),
        status = shell_quote(&status.to_string_lossy()),
    );
    let mut shell = Command::new("bash");
    shell
        .arg("-c")
        .arg("exec bash -c \"$CL_TEST_JOB\" >/dev/tty 2>&1")
        .env("CL_TEST_JOB", job);
    for (k, v) in wrapper.get_envs() {
        match v {
            Some(v) => shell.env(k, v),
            None => shell.env_remove(k),
        };
    }
    terminal.control(&mut shell);
    let mut sh = Proc::spawn(shell);
    let statuses = || std::fs::read_to_string(&status).unwrap_or_default();
    let report = |sh: &Proc| {
        format!(
            "{}\n--- terminal:\n{}\n--- wrapper log:\n{}",
            sh.output_report(),
            terminal.output(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };

    let step = |what: &str, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + DEADLINE;
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting until {what} (statuses {:?}, journal {:?}): {}",
                statuses(),
                fx.events(),
                report(&sh)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    step("the child started", &|| {
        !main_starts(&fx.events()).is_empty()
    });
    let child = main_starts(&fx.events())[0].pid;
    let read = |line: &str| count(&fx.events(), child, "read", line) == 1;
    terminal.type_in(b"hello\n");
    step("the child read a line", &|| read("hello"));

    terminal.type_in(b"\x1a"); // Ctrl-Z
    step("the shell saw the job stop", &|| {
        statuses().contains("status=148")
    });
    step("the shell reports the job stopped", &|| {
        terminal.output().contains("Stopped")
    });
    // `fg` follows at once: the wrapper gives the terminal back to the command and continues it.
    terminal.type_in(b"after\n");
    step("the child read after fg", &|| read("after"));
    terminal.type_in(b"\x03"); // Ctrl-C
    step("the job ended", &|| statuses().contains("status=130"));
    let st = exit_of(&mut sh);
    assert_eq!(st.code(), Some(0), "{}", report(&sh));
    assert_eq!(statuses(), "status=148\nstatus=130\n", "{}", report(&sh));
    fx.wait_none_left(DEADLINE);
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------------
// 5. Smaller
// ---------------------------------------------------------------------------------------------

/// A stop signal that a program ignores by default makes every stop wait out the grace: the
/// wrapper says so when it starts the command, and still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_that_does_nothing_is_warned_about() {
    let Some(agent) = local_agent() else { return };
    let fx = Fixture::new();
    let key = agent.key("winch");
    let mut w = WrapperBuilder::new(&agent, &fx, &key, &SHORT)
        .flag("--stop-signal", "WINCH")
        .env("CL_CHILD_EXIT_CODE", "0")
        .spawn();
    let st = exit_of(&mut w);
    assert_eq!(st.code(), Some(0), "{}", w.output_report());
    let err = w.stderr_text();
    assert!(
        err.contains("--stop-signal SIGWINCH does nothing to a program that does not handle it"),
        "{err}"
    );
    fx.wait_none_left(DEADLINE);
}
