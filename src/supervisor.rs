//! The supervisor owns the child: it starts the command in a process group of its own, reaps it,
//! forwards signals to the group, and stops the group and everything the command left behind
//! (stop signal, grace, SIGKILL) before the app may release the lock. It never talks to Consul.
//!
//! # Process model
//!
//! - The wrapper is a *child subreaper*: when a process under the command loses its parent
//!   (a daemon that double-forks, a grandchild whose parent exited) it is re-parented to us, not
//!   to init, so we can find it in `/proc` and must reap it. This module therefore owns reaping for
//!   the whole process: it calls `waitpid(-1)` and reaps whatever it finds. Nothing else in the
//!   wrapper may start children and wait for them (`tokio::process` included).
//! - The command runs in its own process group (pgid = its pid), with an empty signal mask,
//!   default signal dispositions, inherited stdio, and `PR_SET_PDEATHSIG(SIGKILL)`: if the wrapper
//!   dies, the kernel kills the command. PDEATHSIG fires when the *thread* that forked exits, so
//!   the app must spawn from a thread that lives as long as the process (the main thread, with a
//!   current-thread runtime).
//! - PDEATHSIG reaches the command only. A *guard* process ([`Guard`]) kills the rest of the group
//!   when the wrapper dies without stopping it (SIGKILL, a crash). Descendants that left the group
//!   (`setsid`) are out of its reach: a normal stop finds and kills them through `/proc`, and a
//!   wrapper that may be SIGKILLed should run under a service manager that kills its whole cgroup
//!   (systemd's default `KillMode=control-group`).
//!
//! # Which pids we may signal
//!
//! Signalling a pid or a pgid that has been reaped could hit an unrelated process once the number
//! is reused. A number cannot be reused while any process (zombies included) still holds it as
//! its pid or pgid, and every process under the command is reaped either by its own parent, itself
//! under the command, or by us (orphans come to us). So:
//!
//! - `kill(-pgid)` is sent only while the group is *pinned*: while the guard, which is a member of
//!   the group and our own child, is not yet reaped, or while the command itself (the group leader)
//!   is not yet reaped. Otherwise the group is signalled member by member, as found in `/proc`.
//! - Pids found in `/proc` are signalled right after the scan, with no reaping in between; the one
//!   remaining race (a process reaped by its own parent between our scan and our kill, and its pid
//!   reused in those microseconds) is accepted.

use std::collections::HashMap;
use std::ffi::c_int;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::unistd::{ForkResult, Pid};
use tokio::time::{Instant, sleep, sleep_until};

use crate::election::Fence;

/// How often to look at `/proc` while waiting for processes we are not told about: SIGCHLD only
/// reports our own children, not grandchildren that exit while their parent is alive.
const POLL: Duration = Duration::from_millis(20);

/// How often to complain about processes that survive SIGKILL (uninterruptible sleep, usually a
/// hung filesystem).
const STUCK_WARNING_EVERY: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSpec {
    /// The command and its arguments; must not be empty.
    pub argv: Vec<String>,
    /// Run `argv` joined with spaces through `/bin/sh -c` instead of executing it directly.
    pub shell: bool,
    /// Variables added to the inherited environment (applied after `env_remove`).
    pub env_set: Vec<(String, String)>,
    /// Variables removed from the inherited environment (tokens, `NOTIFY_SOCKET`).
    pub env_remove: Vec<String>,
}

/// Why the command could not be started. The kind decides the exit code (design §5).
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command `{program}` not found; {}", not_found_hint(.program))]
    NotFound {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("command `{program}` cannot be executed; is it an executable file (chmod +x)?")]
    CannotExecute {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start command `{program}`")]
    Other {
        program: String,
        #[source]
        source: io::Error,
    },
}

fn not_found_hint(program: &str) -> &'static str {
    if program.contains('/') {
        "does the path exist?"
    } else {
        "is it on PATH?"
    }
}

impl SpawnError {
    /// 127 for not found, 126 for cannot execute, 125 otherwise, as a shell would report them.
    pub fn exit_code(&self) -> u8 {
        match self {
            SpawnError::NotFound { .. } => crate::exit::NOT_FOUND,
            SpawnError::CannotExecute { .. } => crate::exit::CANNOT_EXECUTE,
            SpawnError::Other { .. } => crate::exit::INTERNAL,
        }
    }

    fn from_io(program: &str, source: io::Error) -> Self {
        let program = program.to_owned();
        match source.raw_os_error() {
            Some(libc::ENOENT) => SpawnError::NotFound { program, source },
            // What a shell reports as 126: the file is there but exec refuses it.
            Some(
                libc::EACCES
                | libc::EPERM
                | libc::ENOEXEC
                | libc::EISDIR
                | libc::ENOTDIR
                | libc::ELOOP
                | libc::ETXTBSY
                | libc::ENAMETOOLONG
                | libc::E2BIG,
            ) => SpawnError::CannotExecute { program, source },
            _ => SpawnError::Other { program, source },
        }
    }
}

/// Checks, before any lock is taken, that [`Supervisor::spawn`] will find something to execute:
/// the program at its path, or on `PATH` the way `execvp` searches it (a directory that denies
/// us is remembered, the search goes on, and "permission denied" wins over "not found"), and
/// that we may execute it; `/bin/sh` for `--shell`. What only `exec` can tell (a file that is
/// not a program) is still found at spawn.
pub fn check_command(argv: &[String], shell: bool) -> Result<(), SpawnError> {
    let program = match (shell, argv.first()) {
        (true, _) => "/bin/sh",
        (false, Some(p)) => p.as_str(),
        (false, None) => return Ok(()), // config refuses an empty command
    };
    let fail = |source: io::Error| SpawnError::from_io(program, source);
    if program.contains('/') {
        return may_execute(Path::new(program)).map_err(fail);
    }
    // glibc's execvp searches this when PATH is unset.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    let mut denied = None;
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        match may_execute(&dir.join(program)) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => denied = Some(e),
            Err(_) => {}
        }
    }
    Err(fail(denied.unwrap_or_else(|| {
        io::Error::from_raw_os_error(libc::ENOENT)
    })))
}

/// Whether `path` is a file we may execute, with the error `execve` would give.
fn may_execute(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).map_err(io::Error::from)
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal number (a raw number: real-time signals have no name in nix).
    Signaled(i32),
}

impl ChildExit {
    fn from_wait_status(raw: c_int) -> Option<Self> {
        let status = std::process::ExitStatus::from_raw(raw);
        match (status.code(), status.signal()) {
            (Some(code), _) => Some(ChildExit::Exited(code)),
            (None, Some(sig)) => Some(ChildExit::Signaled(sig)),
            // Stopped or continued: not reported, we never ask for WUNTRACED or WCONTINUED.
            (None, None) => None,
        }
    }

    /// The wrapper's exit code for this outcome: the code itself, or 128 + n for signal n, as a
    /// shell reports it.
    pub fn exit_code(self) -> u8 {
        match self {
            ChildExit::Exited(code) => (code & 0xff) as u8,
            ChildExit::Signaled(sig) => 128u8.saturating_add((sig & 0x7f) as u8),
        }
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChildExit::Exited(code) => write!(f, "exited with code {code}"),
            ChildExit::Signaled(sig) => match Signal::try_from(sig) {
                Ok(name) => write!(f, "killed by signal {sig} ({name})"),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
        }
    }
}

/// What [`Supervisor::stop`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    /// How the command ended; `None` when no command was running.
    pub status: Option<ChildExit>,
    /// Whether some process outlived the grace period (or the hurry) and was SIGKILLed.
    pub killed: bool,
}

/// A process group id. Not a pid: it is signalled as `-pgid`, and only while pinned (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pgid(Pid);

impl fmt::Display for Pgid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Starts, watches and stops the command. One per wrapper process; one command at a time.
pub struct Supervisor {
    sigchld: tokio::signal::unix::Signal,
    me: Pid,
    my_pgrp: Pid,
    /// Highest signal number, read before any fork (glibc computes it; the forked side must not).
    max_signal: c_int,
    child: Option<Running>,
    /// The outcome of the last stop, returned again by a repeated stop.
    last: Option<StopOutcome>,
}

/// The command between spawn and the end of its stop.
struct Running {
    pid: Pid,
    pgid: Pgid,
    /// Set when we reap `pid`.
    status: Option<ChildExit>,
    /// `Some` until we reap the guard.
    guard: Option<Guard>,
    /// The leader's current fence (see `election::Fence`): the group must be gone by its
    /// `gone_by` even if the wrapper cannot act.
    fence: Fence,
}

impl Running {
    /// Whether `kill(-pgid)` can reach only this group (module doc).
    fn pinned(&self) -> bool {
        self.guard.is_some() || self.status.is_none()
    }
}

/// A process that kills the command's group if the wrapper dies without stopping it.
///
/// It is a fork of the wrapper that never execs (so it needs no executable path, works in the
/// unit-test binary, and survives the wrapper's binary being replaced on disk by an upgrade).
/// It ignores every signal it can, joins the command's process group, closes every descriptor but
/// the read end of a pipe whose write end only the wrapper holds, and blocks reading it. End of
/// file means the wrapper is gone: it sends SIGKILL to the group, which includes itself, and exits.
///
/// Why it joins the group instead of standing apart: a guard in a group of its own would be
/// unsound. If the wrapper died after the group had emptied and been reaped but before it
/// dismissed the guard, the guard would signal a pgid that may have been reused by then, and no
/// ordering of "dismiss" and "reap" in the wrapper closes that window, because the last member
/// may exit and be reaped at any moment. As a member, the guard itself keeps the pgid allocated for
/// as long as it lives, so its `kill(-pgid, SIGKILL)` can only reach the command's group, whenever
/// EOF comes. For the same reason the wrapper may send `kill(-pgid)` at any time until it reaps
/// the guard.
///
/// Costs: `ps` shows it with the wrapper's command line (its name is `cl-guard`), and it shares
/// the wrapper's memory copy-on-write, writing almost none of it.
///
/// - Ctrl-C in a terminal goes to the foreground group (the wrapper's), not to this one, and the
///   guard ignores SIGINT anyway; it ignores the stop signal and forwarded signals sent to the
///   group too (SIGKILL aside, which the final stage sends and which is what we want).
/// - The wrapper dismisses it with SIGKILL by pid once the group is empty (safe: it is our
///   unreaped child), then reaps it. The pipe closes after that, when nobody reads it.
/// - The write end is close-on-exec, and a later guard closes all inherited descriptors, so
///   nothing but the wrapper keeps the pipe open.
/// - It does not count as a leftover of the command and is never signalled as one.
/// - Between the command's exec and the guard joining the group (microseconds, both inside
///   [`Supervisor::spawn`]) a SIGKILLed wrapper leaves grandchildren unguarded; accepted.
struct Guard {
    pid: Pid,
    /// The write end. Dropping it while the guard lives makes the guard kill the group.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "held, never read: dropping it is what closes the pipe"
        )
    )]
    pipe: Option<OwnedFd>,
}

impl Supervisor {
    /// Makes this process a child subreaper and subscribes to SIGCHLD. Call it early, inside the
    /// runtime (with time and signal drivers enabled), before anything can become our orphan.
    pub fn new() -> anyhow::Result<Self> {
        nix::sys::prctl::set_child_subreaper(true)
            .context("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER)")?;
        let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .context("cannot subscribe to SIGCHLD")?;
        Ok(Supervisor {
            sigchld,
            me: nix::unistd::getpid(),
            my_pgrp: nix::unistd::getpgrp(),
            max_signal: libc::SIGRTMAX(),
            child: None,
            last: None,
        })
    }

    /// Starts the command and its guard; returns the command's pid. Synchronous and quick: it
    /// returns once the command has been exec'd (or failed to be). It is safe to call
    /// [`Supervisor::stop`] right after, which is what the app does when a stop signal arrived
    /// while spawning.
    pub fn spawn(&mut self, spec: &ChildSpec, fence: Fence) -> Result<u32, SpawnError> {
        let (program, args) = match (spec.shell, spec.argv.split_first()) {
            (true, _) => (
                "/bin/sh".to_owned(),
                vec!["-c".to_owned(), spec.argv.join(" ")],
            ),
            (false, Some((program, args))) => (program.clone(), args.to_vec()),
            (false, None) => {
                let source = io::Error::new(io::ErrorKind::InvalidInput, "empty command line");
                return Err(SpawnError::Other {
                    program: String::new(),
                    source,
                });
            }
        };
        if self.child.is_some() {
            let source = io::Error::other("a command is already running");
            return Err(SpawnError::Other { program, source });
        }

        let mut command = Command::new(&program);
        command.args(&args);
        for name in &spec.env_remove {
            command.env_remove(name);
        }
        for (name, value) in &spec.env_set {
            command.env(name, value);
        }
        command.process_group(0);
        let parent = self.me;
        let max_signal = self.max_signal;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (signal, sigemptyset, sigprocmask, prctl, getppid); it neither
        // allocates nor takes locks.
        unsafe {
            command.pre_exec(move || reset_before_exec(parent, max_signal));
        }
        let child = command
            .spawn()
            .map_err(|source| SpawnError::from_io(&program, source))?;
        let pid = Pid::from_raw(child.id() as i32);
        // `std::process::Child` does not wait on drop; we reap through waitpid(-1).
        drop(child);
        let pgid = Pgid(pid);

        let guard = match spawn_guard(pgid, max_signal) {
            Ok(guard) => guard,
            Err(source) => {
                // Without a guard a SIGKILLed wrapper would leave the group running: refuse.
                // The group is pinned by its unreaped leader.
                let _ = signal::killpg(pgid.0, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
                let source = io::Error::other(format!("cannot start the guard process: {source}"));
                return Err(SpawnError::Other { program, source });
            }
        };
        tracing::debug!(
            pid = pid.as_raw(),
            guard = guard.pid.as_raw(),
            program,
            "command started"
        );
        self.child = Some(Running {
            pid,
            pgid,
            status: None,
            guard: Some(guard),
            fence,
        });
        self.last = None;
        Ok(pid.as_raw() as u32)
    }

    /// Moves the fence after a successful renew. The child group must be gone by
    /// `fence.gone_by` whatever happens to the wrapper.
    pub fn set_fence(&mut self, fence: Fence) {
        if let Some(run) = &mut self.child {
            run.fence = fence;
        }
    }

    /// The running command's pid, until its stop completes.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the app keeps the pid spawn returns")
    )]
    pub fn child_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|run| run.pid.as_raw() as u32)
    }

    /// Sends `sig` to the command's whole process group (USR1, USR2, WINCH forwarding). Does
    /// nothing when no command is running or its group is gone.
    pub fn signal_group(&self, sig: Signal) {
        let Some(run) = &self.child else { return };
        if run.pinned() {
            if let Err(err) = signal::killpg(run.pgid.0, sig) {
                tracing::debug!(pgid = %run.pgid, %sig, %err, "cannot signal the process group");
            }
            return;
        }
        for proc in self.leftovers(run) {
            if proc.pgrp == run.pgid.0 {
                let _ = signal::kill(proc.pid, sig);
            }
        }
    }

    /// Resolves when the command (the direct child) exits, reaping adopted orphans meanwhile.
    /// Cancel-safe, so it can sit in a `select!`. Once the command has exited it resolves at once
    /// with the same status until [`Supervisor::stop`] has cleaned up; with no command it never
    /// resolves.
    pub async fn wait(&mut self) -> ChildExit {
        loop {
            self.reap();
            match &self.child {
                None => std::future::pending::<()>().await,
                Some(Running {
                    status: Some(status),
                    ..
                }) => return *status,
                Some(_) => {}
            }
            self.next_sigchld(Duration::MAX).await;
        }
    }

    /// The stop sequence (design §4). Sends `sig` and SIGCONT to the command's group and to
    /// every other process the command left behind (descendants that left the group, orphans we
    /// adopted); waits up to `grace` for all of them to be gone, or until `hurry` resolves (a
    /// second TERM or INT; pass `std::future::pending()` for none); then SIGKILLs whatever is
    /// left and reaps until nothing is. Only then does it return, so the lock can be released.
    ///
    /// Also the cleanup after the command exited on its own: the app calls it before releasing
    /// the lock, to kill what the command left behind. With no command it returns at once (the
    /// last outcome again, if there was one). Not meant to be cancelled: a dropped stop leaves
    /// the command running, and calling it again starts over.
    pub async fn stop(
        &mut self,
        sig: Signal,
        grace: Duration,
        hurry: impl Future<Output = ()>,
    ) -> StopOutcome {
        if self.child.is_none() {
            return self.last.unwrap_or(StopOutcome {
                status: None,
                killed: false,
            });
        }
        // Capped so that a "for ever" grace cannot overflow the clock.
        let deadline = Instant::now() + grace.min(Duration::from_secs(10 * 365 * 86_400));
        self.reap();
        if self.send_stop_signal(sig) {
            let mut hurry = std::pin::pin!(hurry);
            loop {
                self.reap();
                if self.current_leftovers().is_empty() {
                    break;
                }
                tokio::select! {
                    () = self.next_sigchld(POLL) => {}
                    () = sleep_until(deadline) => {
                        tracing::debug!("grace period over");
                        break;
                    }
                    () = hurry.as_mut() => {
                        tracing::debug!("told to hurry: skipping the rest of the grace period");
                        break;
                    }
                }
            }
        }
        let killed = self.kill_leftovers().await;
        self.dismiss_guard().await;

        let run = self.child.take().expect("a command was running");
        let outcome = StopOutcome {
            status: run.status,
            killed,
        };
        tracing::debug!(
            pid = run.pid.as_raw(),
            ?outcome,
            "command stopped; nothing left"
        );
        self.last = Some(outcome);
        outcome
    }

    /// Sends the stop signal and SIGCONT (a stopped process cannot act on it) to the group and to
    /// the leftovers outside it, each exactly once. Returns whether anything was left to signal.
    fn send_stop_signal(&self, sig: Signal) -> bool {
        let Some(run) = &self.child else { return false };
        let leftovers = self.leftovers(run);
        if leftovers.is_empty() {
            return false;
        }
        tracing::debug!(pgid = %run.pgid, %sig, count = leftovers.len(), "sending the stop signal");
        if run.pinned() {
            for s in [sig, Signal::SIGCONT] {
                let _ = signal::killpg(run.pgid.0, s);
            }
        }
        for proc in leftovers {
            if run.pinned() && proc.pgrp == run.pgid.0 {
                continue; // reached through the group
            }
            for s in [sig, Signal::SIGCONT] {
                let _ = signal::kill(proc.pid, s);
            }
        }
        true
    }

    /// SIGKILLs the group and every leftover until none is left; returns whether any was.
    async fn kill_leftovers(&mut self) -> bool {
        let mut killed = false;
        let mut warn_at = Instant::now() + STUCK_WARNING_EVERY;
        loop {
            self.reap();
            if !self.kill_leftovers_once() {
                return killed;
            }
            if !killed {
                tracing::warn!("processes outlived the stop signal; sending SIGKILL");
                killed = true;
            }
            if Instant::now() >= warn_at {
                let left = self.current_leftovers();
                let pids: Vec<i32> = left.iter().map(|p| p.pid.as_raw()).collect();
                tracing::warn!(?pids, "processes survive SIGKILL; still waiting for them");
                warn_at = Instant::now() + STUCK_WARNING_EVERY;
            }
            self.next_sigchld(POLL).await;
        }
    }

    /// One round of SIGKILL, without waiting. Returns whether there was anything to kill.
    fn kill_leftovers_once(&self) -> bool {
        let Some(run) = &self.child else { return false };
        let leftovers = self.leftovers(run);
        if leftovers.is_empty() {
            return false;
        }
        // The whole group at once, so that nothing forks in between; this kills the guard too,
        // which is fine: the group dies with it, and the guard stays a zombie (pinning the
        // group) until we reap it.
        if run.pinned() {
            let _ = signal::killpg(run.pgid.0, Signal::SIGKILL);
        }
        for proc in leftovers {
            let _ = signal::kill(proc.pid, Signal::SIGKILL);
        }
        true
    }

    /// Ends the guard once the group is gone, and reaps it.
    async fn dismiss_guard(&mut self) {
        if let Some(guard) = self.child.as_ref().and_then(|run| run.guard.as_ref()) {
            // By pid, not through the pipe: closing the pipe is the signal to kill the group.
            let _ = signal::kill(guard.pid, Signal::SIGKILL);
        }
        while self.child.as_ref().is_some_and(|run| run.guard.is_some()) {
            self.next_sigchld(POLL).await;
            self.reap();
        }
    }

    /// Waits for a SIGCHLD, or `tick` at most.
    async fn next_sigchld(&mut self, tick: Duration) {
        tokio::select! {
            got = self.sigchld.recv() => {
                if got.is_none() {
                    // The signal driver is gone (runtime shutting down): fall back to polling.
                    sleep(tick.min(POLL)).await;
                }
            }
            () = sleep(tick) => {}
        }
    }

    /// Reaps every child that has exited, recording the command's status and the guard's end;
    /// anything else (adopted orphans) is reaped silently.
    fn reap(&mut self) {
        loop {
            let mut raw: c_int = 0;
            // SAFETY: waitpid only writes the status through the pointer, which points to a
            // local that outlives the call.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid == 0 {
                return; // children remain, none has exited
            }
            if pid < 0 {
                if Errno::last() == Errno::EINTR {
                    continue;
                }
                return; // ECHILD: no children at all
            }
            self.reaped(Pid::from_raw(pid), raw);
        }
    }

    fn reaped(&mut self, pid: Pid, raw: c_int) {
        if let Some(run) = &mut self.child {
            if pid == run.pid {
                run.status = ChildExit::from_wait_status(raw);
                tracing::debug!(pid = pid.as_raw(), status = ?run.status, "command exited");
                return;
            }
            if run.guard.as_ref().is_some_and(|guard| guard.pid == pid) {
                tracing::debug!(pid = pid.as_raw(), "guard reaped");
                run.guard = None;
                return;
            }
        }
        tracing::debug!(pid = pid.as_raw(), "reaped an orphan");
    }

    fn current_leftovers(&self) -> Vec<Proc> {
        match &self.child {
            Some(run) => self.leftovers(run),
            None => Vec::new(),
        }
    }

    /// Every live or unreaped process the command left behind, found by walking `/proc`: our
    /// children outside our own process group (the command, and orphans from its tree that we
    /// adopted) and all their descendants, except the guard. Processes the wrapper started in
    /// its own group are not the command's and are left alone (there are none in the app; in
    /// the test binary other tests may have some).
    fn leftovers(&self, run: &Running) -> Vec<Proc> {
        let guard = run.guard.as_ref().map(|guard| guard.pid);
        match scan_proc() {
            Ok(procs) => descendants(&procs, self.me, self.my_pgrp, guard),
            Err(err) => {
                tracing::warn!(%err, "cannot read /proc; only the command itself is tracked");
                match run.status {
                    None => vec![Proc {
                        pid: run.pid,
                        ppid: self.me,
                        pgrp: run.pgid.0,
                    }],
                    Some(_) => Vec::new(),
                }
            }
        }
    }

    /// Simulates the wrapper's death for the guard: closes the pipe without dismissing it.
    #[cfg(test)]
    fn abandon_guard(&mut self) {
        if let Some(guard) = self.child.as_mut().and_then(|run| run.guard.as_mut()) {
            guard.pipe = None;
        }
    }

    #[cfg(test)]
    fn guard_pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(|run| run.guard.as_ref())
            .map(|guard| guard.pid)
    }
}

impl Drop for Supervisor {
    /// The app stops the command before dropping us; this is the fallback for panics and early
    /// returns: SIGKILL everything at once and reap, without a runtime and within a bound.
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.reap();
            let anything = self.kill_leftovers_once();
            if let Some(guard) = self.child.as_ref().and_then(|run| run.guard.as_ref()) {
                let _ = signal::kill(guard.pid, Signal::SIGKILL);
            } else if !anything {
                break;
            }
            if std::time::Instant::now() >= deadline {
                // Dropping the pipe below makes a surviving guard kill the group.
                tracing::warn!("processes survive SIGKILL; giving up on reaping them");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: Pid,
    ppid: Pid,
    pgrp: Pid,
}

fn scan_proc() -> io::Result<Vec<Proc>> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may exit between readdir and read: skip it.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(proc) = parse_stat(&stat) {
                procs.push(proc);
            }
        }
    }
    Ok(procs)
}

/// Parses `pid (comm) state ppid pgrp ...`; comm may contain spaces and parentheses, so the
/// fields after it are found from the last `)`.
fn parse_stat(stat: &str) -> Option<Proc> {
    let (head, tail) = stat.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut fields = tail.split_ascii_whitespace().skip(1); // state
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Proc {
        pid: Pid::from_raw(pid),
        ppid: Pid::from_raw(ppid),
        pgrp: Pid::from_raw(pgrp),
    })
}

/// The processes under `me`'s children that are outside `my_pgrp`, those children included,
/// minus `exclude` (the guard).
fn descendants(procs: &[Proc], me: Pid, my_pgrp: Pid, exclude: Option<Pid>) -> Vec<Proc> {
    let mut children: HashMap<Pid, Vec<Proc>> = HashMap::new();
    for proc in procs {
        children.entry(proc.ppid).or_default().push(*proc);
    }
    let mut found = Vec::new();
    let mut todo: Vec<Proc> = children
        .get(&me)
        .into_iter()
        .flatten()
        .filter(|proc| proc.pgrp != my_pgrp)
        .copied()
        .collect();
    while let Some(proc) = todo.pop() {
        if Some(proc.pid) == exclude || proc.pid == me {
            continue;
        }
        found.push(proc);
        todo.extend(children.get(&proc.pid).into_iter().flatten().copied());
    }
    found
}

/// Runs in the command's process between fork and exec: signal mask and dispositions back to
/// defaults (ignored signals would otherwise survive exec), and death with the wrapper.
fn reset_before_exec(parent: Pid, max_signal: c_int) -> io::Result<()> {
    // SAFETY: sigemptyset, sigprocmask and prctl are async-signal-safe system calls on memory we
    // own (set_disposition: see there).
    unsafe {
        for sig in 1..=max_signal {
            set_disposition(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // The wrapper may have died between fork and prctl, before PDEATHSIG was armed: then we have
    // been re-parented already and must not start the command.
    if nix::unistd::getppid() != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Sets the disposition of signal `sig` to `SIG_DFL` or `SIG_IGN`, async-signal-safely.
///
/// Through the raw system call, because glibc's `signal()` and `sigaction()` refuse signals 32
/// and 33, which it reserves for its threads, and a disposition of "ignore" for them is inherited
/// like any other (this test environment has 32 ignored); to a program not linked with glibc
/// they are ordinary real-time signals. SIGKILL and SIGSTOP cannot be changed and are skipped.
fn set_disposition(sig: c_int, handler: libc::sighandler_t) {
    if sig == libc::SIGKILL || sig == libc::SIGSTOP {
        return;
    }
    // The kernel's struct sigaction starts with the handler on the architectures we build for;
    // flags, restorer and mask stay zero, which is what "no handler code" needs. Its sigset is
    // 8 bytes.
    let action: [libc::c_ulong; 4] = [handler as libc::c_ulong, 0, 0, 0];
    // SAFETY: rt_sigaction reads `action` (large enough for every layout) and writes nothing,
    // since the old-action pointer is null.
    let done = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            action.as_ptr(),
            std::ptr::null::<u8>(),
            8,
        )
    };
    if done != 0 {
        // SAFETY: plain signal() as the fallback, with no handler code.
        unsafe { libc::signal(sig, handler) };
    }
}

/// Forks the guard (see [`Guard`]) into `pgid`.
fn spawn_guard(pgid: Pgid, max_signal: c_int) -> io::Result<Guard> {
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let max_fd = open_files_limit();
    // Block every signal across the fork, so that the guard cannot be killed by a signal sent to
    // the group before it has set its dispositions to "ignore".
    let mut old_mask = SigSet::empty();
    signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )?;
    // SAFETY: the child branch runs `guard_main`, which makes only async-signal-safe calls and
    // never returns (it ends in _exit), so nothing of the parent's state is used after the fork.
    let forked = unsafe { nix::unistd::fork() };
    if let Ok(ForkResult::Child) = forked {
        guard_main(read_end.as_raw_fd(), pgid, max_signal, max_fd);
    }
    signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None)?;
    let ForkResult::Parent { child } = forked? else {
        unreachable!("the child branch never returns");
    };
    drop(read_end);
    // Join from this side too (the guard does it as well, whichever runs first), so that the
    // guard is a member, pinning the group, when spawn returns.
    if let Err(err) = nix::unistd::setpgid(child, pgid.0) {
        let _ = signal::kill(child, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        return Err(err.into());
    }
    Ok(Guard {
        pid: child,
        pipe: Some(write_end),
    })
}

/// The guard's whole life, in the forked child. Only async-signal-safe calls: the wrapper's
/// other threads may have held locks (malloc, stdio) at the moment of the fork.
fn guard_main(pipe: RawFd, pgid: Pgid, max_signal: c_int, max_fd: c_int) -> ! {
    let pgid = pgid.0.as_raw();
    // SAFETY: plain system calls on descriptors and memory this process owns; every one is
    // async-signal-safe, none allocates, and the function ends in _exit without unwinding.
    unsafe {
        for sig in 1..=max_signal {
            set_disposition(sig, libc::SIG_IGN);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_NAME, c"cl-guard".as_ptr());
        if libc::setpgid(0, pgid) != 0 {
            libc::_exit(1);
        }
        // Keep only the pipe, as stdin: holding the wrapper's other descriptors (sockets, the
        // write end of a pipe a caller reads to EOF, another guard's pipe) would be a leak.
        if pipe != 0 && libc::dup2(pipe, 0) < 0 {
            libc::_exit(1);
        }
        if libc::syscall(
            libc::SYS_close_range,
            1 as libc::c_uint,
            libc::c_uint::MAX,
            0,
        ) != 0
        {
            for fd in 1..max_fd {
                libc::close(fd);
            }
        }
        let mut byte = 0u8;
        loop {
            let n = libc::read(0, (&raw mut byte).cast(), 1);
            if n > 0 || (n < 0 && Errno::last_raw() == libc::EINTR) {
                continue; // nothing is ever written; only EOF matters
            }
            break; // EOF, or an error we cannot recover from: fail safe
        }
        libc::kill(-pgid, libc::SIGKILL);
        libc::_exit(0)
    }
}

/// The soft limit on open files, capped: the guard's fallback when close_range is missing.
fn open_files_limit() -> c_int {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok {
        limit.rlim_cur.min(65_536) as c_int
    } else {
        1024
    }
}

#[cfg(test)]
mod tests {
    //! Real processes and real signals. SIGCHLD, `waitpid(-1)` and the subreaper flag are
    //! process-wide, so the tests that start commands run one at a time (`SERIAL`); every test
    //! kills its marked processes on the way out, even when it fails.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Generous: a loaded CI machine may be slow, and a passing test never waits this long.
    const DEADLINE: Duration = Duration::from_secs(30);

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/child.sh");
    const MARKER_VAR: &str = "CONSUL_LEADER_TEST_MARKER";

    /// A scratch directory and a marker for one test. Dropping it SIGKILLs every process that
    /// carries the marker and removes the directory.
    struct TestEnv {
        dir: PathBuf,
        marker: String,
    }

    impl TestEnv {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let marker = format!("{name}-{}-{n}", std::process::id());
            let dir = std::env::temp_dir().join(format!("consul-leader-{marker}"));
            std::fs::create_dir_all(&dir).unwrap();
            TestEnv { dir, marker }
        }

        fn journal(&self) -> PathBuf {
            self.dir.join("journal")
        }

        /// A spec running the fixture with the marker, the journal and `vars`.
        fn child(&self, vars: &[(&str, &str)]) -> ChildSpec {
            let mut env_set = vec![
                (MARKER_VAR.to_owned(), self.marker.clone()),
                (
                    "CL_CHILD_JOURNAL".to_owned(),
                    self.journal().display().to_string(),
                ),
            ];
            env_set.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            ChildSpec {
                argv: vec![FIXTURE.to_owned()],
                shell: false,
                env_set,
                env_remove: vec![],
            }
        }

        fn lines(&self) -> Vec<Line> {
            let text = std::fs::read_to_string(self.journal()).unwrap_or_default();
            text.lines().filter_map(Line::parse).collect()
        }

        /// Polls the journal until `pred` holds; panics with the journal after DEADLINE.
        async fn wait_journal(&self, what: &str, pred: impl Fn(&[Line]) -> bool) -> Vec<Line> {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let lines = self.lines();
                if pred(&lines) {
                    return lines;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; journal: {lines:#?}"
                );
                sleep(Duration::from_millis(10)).await;
            }
        }

        /// Waits for the fixture's `start ... main` line (everything set up); returns its pid.
        async fn started(&self) -> i32 {
            let lines = self
                .wait_journal("the child to start", |l| find(l, "start", "main").is_some())
                .await;
            find(&lines, "start", "main").unwrap().pid
        }

        fn alive(&self) -> Vec<i32> {
            marked_processes(&self.marker)
        }
    }

    impl Drop for TestEnv {
        fn drop(&mut self) {
            for pid in marked_processes(&self.marker) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Live processes whose environment holds `MARKER_VAR=marker` (zombies have no environment).
    fn marked_processes(marker: &str) -> Vec<i32> {
        let needle = format!("{MARKER_VAR}={marker}");
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
                if environ
                    .split(|b| *b == 0)
                    .any(|var| var == needle.as_bytes())
                {
                    found.push(pid);
                }
            }
        }
        found
    }

    fn is_live(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z'),
            Err(_) => false,
        }
    }

    /// One journal line: `<event> <pid> <time_us> <detail>`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Line {
        event: String,
        pid: i32,
        detail: String,
    }

    impl Line {
        fn parse(line: &str) -> Option<Line> {
            let mut fields = line.split(' ');
            let event = fields.next()?.to_owned();
            let pid = fields.next()?.parse().ok()?;
            let _time_us: u64 = fields.next()?.parse().ok()?;
            let detail = fields.next()?.to_owned();
            Some(Line { event, pid, detail })
        }
    }

    fn find<'a>(lines: &'a [Line], event: &str, detail: &str) -> Option<&'a Line> {
        lines
            .iter()
            .find(|l| l.event == event && l.detail == detail)
    }

    fn has(lines: &[Line], event: &str, pid: i32, detail: &str) -> bool {
        lines
            .iter()
            .any(|l| l.event == event && l.pid == pid && l.detail == detail)
    }

    /// Fails the test instead of hanging it.
    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(DEADLINE, fut).await {
            Ok(value) => value,
            Err(_) => panic!("timed out: {what}"),
        }
    }

    fn never() -> std::future::Pending<()> {
        std::future::pending()
    }

    /// A fence no test reaches.
    fn far_fence() -> Fence {
        let far = crate::clock::BootTime::now() + Duration::from_secs(3600);
        Fence {
            stop_at: far,
            gone_by: far,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn exit_code_passes_through() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("exit-code");
        let mut sup = Supervisor::new().unwrap();
        let pid = sup
            .spawn(&env.child(&[("CL_CHILD_EXIT_CODE", "3")]), far_fence())
            .unwrap();
        assert_eq!(sup.child_pid(), Some(pid));
        let status = within("wait", sup.wait()).await;
        assert_eq!(status, ChildExit::Exited(3));
        assert_eq!(status.exit_code(), 3);
        // Until stopped, wait keeps answering.
        assert_eq!(within("wait again", sup.wait()).await, ChildExit::Exited(3));
        let outcome = within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Exited(3)),
                killed: false
            }
        );
        assert_eq!(sup.child_pid(), None);
        // Stopping again is harmless and tells the same story.
        assert_eq!(sup.stop(Signal::SIGTERM, DEADLINE, never()).await, outcome);
        assert!(env.alive().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn death_by_signal_maps_to_128_plus_n() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("signal-death");
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(&env.child(&[("CL_CHILD_KILL_SELF", "USR2")]), far_fence())
            .unwrap();
        let status = within("wait", sup.wait()).await;
        assert_eq!(status, ChildExit::Signaled(libc::SIGUSR2));
        assert_eq!(status.exit_code(), 128 + 12);
        assert_eq!(status.to_string(), "killed by signal 12 (SIGUSR2)");
        within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shell_mode_runs_through_sh() {
        let _serial = SERIAL.lock().await;
        let mut sup = Supervisor::new().unwrap();
        let spec = ChildSpec {
            argv: vec!["test -n \"$0\" &&".to_owned(), "exit 7".to_owned()],
            shell: true,
            env_set: vec![],
            env_remove: vec![],
        };
        sup.spawn(&spec, far_fence()).unwrap();
        assert_eq!(within("wait", sup.wait()).await, ChildExit::Exited(7));
        within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn missing_command_is_127() {
        let _serial = SERIAL.lock().await;
        let mut sup = Supervisor::new().unwrap();
        let spec = ChildSpec {
            argv: vec!["consul-leader-test-no-such-command".to_owned()],
            shell: false,
            env_set: vec![],
            env_remove: vec![],
        };
        let err = sup.spawn(&spec, far_fence()).unwrap_err();
        assert!(matches!(err, SpawnError::NotFound { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 127);
        assert_eq!(
            err.to_string(),
            "command `consul-leader-test-no-such-command` not found; is it on PATH?"
        );
        assert_eq!(sup.child_pid(), None);
        // Nothing to stop, and the supervisor is still usable.
        let outcome = sup.stop(Signal::SIGTERM, DEADLINE, never()).await;
        assert_eq!(
            outcome,
            StopOutcome {
                status: None,
                killed: false
            }
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn file_that_cannot_be_executed_is_126() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("not-executable");
        let mut sup = Supervisor::new().unwrap();
        let script = env.dir.join("script");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap(); // mode 0644: no x bit
        for path in [script.as_path(), env.dir.as_path()] {
            let spec = ChildSpec {
                argv: vec![path.display().to_string()],
                shell: false,
                env_set: vec![],
                env_remove: vec![],
            };
            let err = sup.spawn(&spec, far_fence()).unwrap_err();
            assert!(
                matches!(err, SpawnError::CannotExecute { .. }),
                "{path:?}: {err:?}"
            );
            assert_eq!(err.exit_code(), 126);
            assert!(err.to_string().contains("cannot be executed"), "{err}");
        }
        let other = SpawnError::from_io("x", io::Error::from_raw_os_error(libc::EAGAIN));
        assert_eq!(other.exit_code(), 125);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn environment_is_set_and_removed() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("environment");
        // A variable the test itself inherited, to see it removed (edition 2024 makes set_var
        // unsafe, and other tests run in parallel threads).
        let inherited = ["CARGO_MANIFEST_DIR", "HOME", "PATH"]
            .into_iter()
            .find(|name| std::env::var_os(name).is_some() && *name != "PATH")
            .expect("the test runs with CARGO_MANIFEST_DIR or HOME set");
        let env_file = env.dir.join("env");
        let mut spec = env.child(&[("CL_CHILD_ENV_FILE", &env_file.display().to_string())]);
        spec.env_set
            .push(("CONSUL_LEADER_KEY".to_owned(), "svc/a b=c".to_owned()));
        spec.env_remove = vec![inherited.to_owned(), "CONSUL_HTTP_TOKEN".to_owned()];
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(&spec, far_fence()).unwrap();
        env.started().await;
        let recorded = std::fs::read_to_string(&env_file).unwrap();
        let lines: Vec<&str> = recorded.lines().collect();
        assert!(lines.contains(&"CONSUL_LEADER_KEY=svc/a b=c"), "{recorded}");
        assert!(
            lines.contains(&format!("{MARKER_VAR}={}", env.marker).as_str()),
            "{recorded}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with(&format!("{inherited}="))),
            "{recorded}"
        );
        assert!(
            !lines.iter().any(|l| l.starts_with("CONSUL_HTTP_TOKEN=")),
            "{recorded}"
        );
        within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn signal_mask_and_dispositions_are_reset() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("sigreset");
        // Blocked in this thread (the mask is inherited through fork), ignored in this process
        // (harmless for the other tests: nothing here raises SIGXFSZ).
        let mut blocked = SigSet::empty();
        blocked.add(Signal::SIGUSR2);
        let mut old_mask = SigSet::empty();
        signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), Some(&mut old_mask))
            .unwrap();
        // SAFETY: installs SIG_IGN, no handler code; restored below.
        let old_xfsz =
            unsafe { signal::signal(Signal::SIGXFSZ, signal::SigHandler::SigIgn) }.unwrap();

        let status_file = env.dir.join("status");
        let spec = ChildSpec {
            argv: vec![
                "cp".into(),
                "/proc/self/status".into(),
                status_file.display().to_string(),
            ],
            shell: false,
            env_set: vec![],
            env_remove: vec![],
        };
        let mut sup = Supervisor::new().unwrap();
        let spawned = sup.spawn(&spec, far_fence());

        signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None).unwrap();
        // SAFETY: as above.
        unsafe { signal::signal(Signal::SIGXFSZ, old_xfsz) }.unwrap();

        spawned.unwrap();
        assert_eq!(within("wait", sup.wait()).await, ChildExit::Exited(0));
        within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
        let status = std::fs::read_to_string(&status_file).unwrap();
        for field in ["SigBlk", "SigIgn"] {
            let line = status.lines().find(|l| l.starts_with(field)).unwrap();
            assert_eq!(
                line.split_whitespace().nth(1),
                Some("0000000000000000"),
                "{line}"
            );
        }
        assert!(status.contains("\nPPid:"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_child_that_exits_on_term() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("stop-polite");
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(&env.child(&[]), far_fence()).unwrap();
        let pid = env.started().await;
        let begun = Instant::now();
        let outcome = within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
        assert!(begun.elapsed() < DEADLINE, "stop waited out the grace");
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Signaled(15)),
                killed: false
            }
        );
        let lines = env.lines();
        assert!(has(&lines, "signal", pid, "TERM"), "{lines:#?}");
        assert!(has(&lines, "stop", pid, "kill=TERM"), "{lines:#?}");
        assert!(env.alive().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_kills_a_tree_that_ignores_term() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("stop-stubborn");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[
            ("CL_CHILD_EXIT_ON", ""),
            ("CL_CHILD_GRANDCHILDREN", "ignore-term setsid"),
        ]);
        sup.spawn(&spec, far_fence()).unwrap();
        let pid = env.started().await;
        let lines = env.lines();
        let setsid = find(&lines, "start", "setsid").unwrap().pid;
        assert_eq!(env.alive().len(), 3, "main and two grandchildren");

        let grace = Duration::from_millis(500);
        let begun = Instant::now();
        let outcome = within("stop", sup.stop(Signal::SIGTERM, grace, never())).await;
        assert!(
            begun.elapsed() >= grace,
            "SIGKILL before the grace was over"
        );
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Signaled(9)),
                killed: true
            }
        );
        let lines = env.lines();
        assert!(has(&lines, "signal", pid, "TERM"), "{lines:#?}");
        assert!(
            has(&lines, "signal", setsid, "TERM"),
            "outside the group, still asked first"
        );
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hurry_skips_the_grace() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("hurry");
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(&env.child(&[("CL_CHILD_EXIT_ON", "")]), far_fence())
            .unwrap();
        let pid = env.started().await;
        // The second signal comes once the child has seen the first.
        let hurry = async {
            env.wait_journal("TERM to arrive", |l| has(l, "signal", pid, "TERM"))
                .await;
        };
        let begun = Instant::now();
        let long_grace = DEADLINE * 10;
        let outcome = within("stop", sup.stop(Signal::SIGTERM, long_grace, hurry)).await;
        assert!(begun.elapsed() < DEADLINE);
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Signaled(9)),
                killed: true
            }
        );
        assert!(env.alive().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn signal_group_reaches_the_child() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("forward");
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(
            &env.child(&[("CL_CHILD_GRANDCHILDREN", "setsid")]),
            far_fence(),
        )
        .unwrap();
        let pid = env.started().await;
        sup.signal_group(Signal::SIGUSR1);
        sup.signal_group(Signal::SIGWINCH);
        env.wait_journal("USR1 and WINCH", |l| {
            has(l, "signal", pid, "USR1") && has(l, "signal", pid, "WINCH")
        })
        .await;
        // A process that left the group is not part of it.
        let setsid = find(&env.lines(), "start", "setsid").unwrap().pid;
        // The setsid grandchild survives HUP: SIGKILL after a short grace.
        let grace = Duration::from_millis(200);
        let outcome = within("stop", sup.stop(Signal::SIGHUP, grace, never())).await;
        let expected = StopOutcome {
            status: Some(ChildExit::Signaled(libc::SIGHUP)),
            killed: true,
        };
        assert_eq!(outcome, expected);
        let lines = env.lines();
        assert!(!has(&lines, "signal", setsid, "USR1"), "{lines:#?}");
        assert!(has(&lines, "signal", setsid, "HUP"), "{lines:#?}");
        assert!(env.alive().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_after_exit_cleans_up_leftovers() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("leftovers");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[
            ("CL_CHILD_GRANDCHILDREN", "ignore-term setsid"),
            ("CL_CHILD_EXIT_CODE", "0"),
        ]);
        sup.spawn(&spec, far_fence()).unwrap();
        assert_eq!(within("wait", sup.wait()).await, ChildExit::Exited(0));
        assert_eq!(env.alive().len(), 2, "both grandchildren outlive the child");
        let outcome = within(
            "stop",
            sup.stop(Signal::SIGTERM, Duration::from_millis(200), never()),
        )
        .await;
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Exited(0)),
                killed: true
            }
        );
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_right_after_spawn() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("early-stop");
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(
            &env.child(&[("CL_CHILD_GRANDCHILDREN", "setsid")]),
            far_fence(),
        )
        .unwrap();
        // The setsid grandchild may have started (it survives TERM) or not: a short grace.
        let grace = Duration::from_millis(200);
        let outcome = within("stop", sup.stop(Signal::SIGTERM, grace, never())).await;
        assert!(outcome.status.is_some());
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
        // The supervisor can start the next command.
        sup.spawn(&env.child(&[("CL_CHILD_EXIT_CODE", "4")]), far_fence())
            .unwrap();
        assert_eq!(within("wait", sup.wait()).await, ChildExit::Exited(4));
        within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn guard_kills_the_group_when_the_wrapper_goes() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("guard");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[
            ("CL_CHILD_EXIT_ON", ""),
            ("CL_CHILD_GRANDCHILDREN", "ignore-term setsid"),
        ]);
        let pid = sup.spawn(&spec, far_fence()).unwrap() as i32;
        env.started().await;
        let lines = env.lines();
        let in_group = find(&lines, "start", "ignore-term").unwrap().pid;
        let setsid = find(&lines, "start", "setsid").unwrap().pid;
        let guard = sup.guard_pid().unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{guard}/stat")).unwrap();
        assert_eq!(
            parse_stat(&stat).unwrap().pgrp.as_raw(),
            pid,
            "the guard is in the group"
        );

        // Signals sent to the group do not move the guard.
        sup.signal_group(Signal::SIGTERM);
        sup.signal_group(Signal::SIGINT);
        env.wait_journal("TERM", |l| has(l, "signal", pid, "TERM"))
            .await;
        assert!(is_live(guard.as_raw()));

        sup.abandon_guard();
        let deadline = Instant::now() + DEADLINE;
        while is_live(pid) || is_live(in_group) || is_live(guard.as_raw()) {
            assert!(
                Instant::now() < deadline,
                "the guard did not kill the group"
            );
            sleep(Duration::from_millis(10)).await;
        }
        // Out of the guard's reach by design; the normal stop still finds it.
        assert!(is_live(setsid));
        let outcome = within("stop", sup.stop(Signal::SIGTERM, Duration::ZERO, never())).await;
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Signaled(9)),
                killed: true
            }
        );
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    /// Set for the wrapper process of `group_dies_with_a_sigkilled_wrapper`.
    const WRAPPER_JOURNAL_VAR: &str = "CL_TEST_WRAPPER_JOURNAL";

    /// Not a test: the wrapper that `group_dies_with_a_sigkilled_wrapper` starts (this same test
    /// binary, filtered to this function) and SIGKILLs. Returns at once when run by hand.
    #[tokio::test(flavor = "current_thread")]
    #[ignore = "helper process of group_dies_with_a_sigkilled_wrapper"]
    async fn wrapper_to_be_killed() {
        let Some(journal) = std::env::var_os(WRAPPER_JOURNAL_VAR) else {
            return;
        };
        let marker = std::env::var(MARKER_VAR).unwrap();
        let spec = ChildSpec {
            argv: vec![FIXTURE.to_owned()],
            shell: false,
            env_set: vec![
                (
                    "CL_CHILD_JOURNAL".to_owned(),
                    journal.into_string().unwrap(),
                ),
                (MARKER_VAR.to_owned(), marker),
                ("CL_CHILD_EXIT_ON".to_owned(), String::new()),
                (
                    "CL_CHILD_GRANDCHILDREN".to_owned(),
                    "ignore-term setsid".to_owned(),
                ),
            ],
            env_remove: vec![WRAPPER_JOURNAL_VAR.to_owned()],
        };
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(&spec, far_fence()).unwrap();
        sup.wait().await; // until SIGKILLed
    }

    /// End to end: PDEATHSIG and the guard, with a real wrapper process killed by SIGKILL.
    #[tokio::test(flavor = "current_thread")]
    async fn group_dies_with_a_sigkilled_wrapper() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("wrapper-killed");
        // We are the dead wrapper's subreaper: its orphans come to us and we reap them.
        let mut sup = Supervisor::new().unwrap();
        let mut wrapper = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "supervisor::tests::wrapper_to_be_killed",
                "--ignored",
            ])
            .env(WRAPPER_JOURNAL_VAR, env.journal())
            .env(MARKER_VAR, &env.marker) // so that TestEnv's drop kills it if we fail
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        env.started().await;
        let lines = env.lines();
        let main = find(&lines, "start", "main").unwrap().pid;
        let in_group = find(&lines, "start", "ignore-term").unwrap().pid;
        let setsid = find(&lines, "start", "setsid").unwrap().pid;

        wrapper.kill().unwrap(); // SIGKILL
        wrapper.wait().unwrap();
        let deadline = Instant::now() + DEADLINE;
        // Everything but the setsid grandchild: the command (PDEATHSIG), the grandchild in its
        // group and the guard (which inherited the marker from the wrapper it was forked from).
        // The setsid one left the group, so it is out of the guard's reach (the module doc says
        // what covers it).
        while env.alive() != [setsid] {
            sup.reap();
            assert!(
                Instant::now() < deadline,
                "the group outlived its wrapper: {:?}",
                env.alive()
            );
            sleep(Duration::from_millis(10)).await;
        }
        assert!(!is_live(main) && !is_live(in_group));
        signal::kill(Pid::from_raw(setsid), Signal::SIGKILL).unwrap();
        while is_live(setsid) {
            assert!(
                Instant::now() < deadline,
                "setsid grandchild survives SIGKILL"
            );
            sleep(Duration::from_millis(10)).await;
        }
        sup.reap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn drop_kills_everything() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("drop");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[
            ("CL_CHILD_EXIT_ON", ""),
            ("CL_CHILD_GRANDCHILDREN", "ignore-term setsid"),
        ]);
        sup.spawn(&spec, far_fence()).unwrap();
        env.started().await;
        let guard = sup.guard_pid().unwrap();
        drop(sup);
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
        assert!(
            !Path::new(&format!("/proc/{guard}")).exists(),
            "guard not reaped"
        );
    }

    #[test]
    fn parses_proc_stat_with_awkward_names() {
        let stat = "42 (a) b (c) d) S 7 42 42 0 -1 4194560 0";
        assert_eq!(
            parse_stat(stat),
            Some(Proc {
                pid: Pid::from_raw(42),
                ppid: Pid::from_raw(7),
                pgrp: Pid::from_raw(42)
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_skip_own_group_and_guard() {
        let p = |pid, ppid, pgrp| Proc {
            pid: Pid::from_raw(pid),
            ppid: Pid::from_raw(ppid),
            pgrp: Pid::from_raw(pgrp),
        };
        let me = Pid::from_raw(10);
        let procs = [
            p(1, 0, 1),
            p(10, 1, 10),  // the wrapper
            p(11, 10, 10), // something the wrapper started in its own group
            p(12, 11, 10), // ... and its child
            p(20, 10, 20), // the command
            p(21, 20, 20), // its child
            p(22, 21, 22), // a setsid grandchild
            p(23, 10, 20), // the guard
            p(30, 10, 30), // an adopted orphan
            p(31, 1, 31),  // unrelated
        ];
        let mut found: Vec<i32> = descendants(&procs, me, me, Some(Pid::from_raw(23)))
            .iter()
            .map(|p| p.pid.as_raw())
            .collect();
        found.sort();
        assert_eq!(found, [20, 21, 22, 30]);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ChildExit::Exited(0).exit_code(), 0);
        assert_eq!(ChildExit::Exited(255).exit_code(), 255);
        assert_eq!(ChildExit::Signaled(9).exit_code(), 137);
        assert_eq!(
            ChildExit::Signaled(15).to_string(),
            "killed by signal 15 (SIGTERM)"
        );
        assert_eq!(ChildExit::Exited(3).to_string(), "exited with code 3");
    }
}
