//! The supervisor owns the child on the wrapper's side: it starts the command through a *keeper*
//! process (`keeper`), forwards the fence and signals to it, learns from it how the command ended,
//! and does not return from a stop until the keeper reports the command's whole tree gone, so
//! that the app may release the lock. It never talks to Consul.
//!
//! # Process model
//!
//! ```text
//! wrapper ── keeper ── command ── ...
//! ```
//!
//! The keeper is the command's parent and subreaper, in a process group of its own, with the
//! command in a cgroup of its own where the machine allows it (`cgroup::detect`, decided once in
//! [`Supervisor::new`]). It enforces the fence on its own clock and outlives a wrapper that dies
//! long enough to stop the whole tree; `keeper`'s module docs give the guarantees and the safety
//! argument. The wrapper signals nothing of the tree itself: it asks the keeper, the only process
//! that knows when a pid may no longer be signalled.
//!
//! The wrapper stays a child subreaper too, as the second line: if the keeper is killed (by an
//! administrator, the OOM killer), the command dies with it (`PR_SET_PDEATHSIG`) and whatever it
//! left re-parents to the wrapper, which then kills it all itself (through the cgroup, and a walk
//! down from itself) before the lock is released. This module therefore owns reaping for the
//! whole process: it calls `waitpid(-1)` and reaps whatever it finds. Nothing else in the wrapper
//! may start children and wait for them (`tokio::process` included).
//!
//! # The terminal
//!
//! When the wrapper's stdin is a terminal and the wrapper's group is its foreground, the command
//! gets the foreground (it takes it itself before `exec`), so it can read the terminal, and Ctrl-C
//! and Ctrl-\ reach the command's group alone, as in a shell. The wrapper takes the foreground back
//! once the command's tree is gone. When a terminal stop (Ctrl-Z) stops the command, the wrapper
//! takes the terminal back and stops itself with the same signal, so that the shell sees the job
//! stopped; when continued (`fg`), it gives the terminal back if it is in the foreground again
//! and continues the command. While the wrapper is stopped its session is not renewed: past the
//! fence, the keeper stops the command, and the wrapper, continued, counts leadership lost. Under
//! cron or systemd (no terminal) none of this happens.

use std::ffi::c_int;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::libc;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, sleep};

use crate::cgroup::{self, Placement};
use crate::clock::BootTime;
use crate::election::Fence;
use crate::keeper::{self, FRAME, FromKeeper, ToKeeper};
use crate::proctree;

/// How often to look again while waiting for processes nobody tells us about (the fallback
/// after a lost keeper, and waits for the keeper's own exit).
const POLL: Duration = Duration::from_millis(20);

/// How long the wrapper waits for the keeper to report the command started (or not).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The signal that asks the command to stop: the keeper's own stops (at the fence, or when
    /// the wrapper is gone) begin with it.
    pub stop_signal: Signal,
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

/// How a command ended, for log lines: "exited with code 0", or "still running".
fn describe(status: Option<ChildExit>) -> String {
    status.map_or_else(|| "still running".to_string(), |s| s.to_string())
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

/// A process group id. Not a pid: only the keeper signals it, as `-pgid`, while it pins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pgid(Pid);

impl fmt::Display for Pgid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Stop signals whose default action does not end a process: a command that does not handle one
/// ignores it (or is stopped by it, and our SIGCONT resumes it), so every stop waits out the whole
/// grace and ends in SIGKILL.
pub fn stop_signal_does_nothing_by_default(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGWINCH
            | Signal::SIGCHLD
            | Signal::SIGURG
            | Signal::SIGCONT
            | Signal::SIGTSTP
            | Signal::SIGTTIN
            | Signal::SIGTTOU
    )
}

/// Starts, watches and stops the command. One per wrapper process; one command at a time.
pub struct Supervisor {
    sigchld: tokio::signal::unix::Signal,
    me: Pid,
    my_pgrp: Pid,
    /// Where the command's cgroup goes, decided once.
    placement: Placement,
    child: Option<Running>,
    /// The outcome of the last stop, returned again by a repeated stop.
    last: Option<StopOutcome>,
    warned_stop_signal: bool,
    /// A keeper started ahead of time ([`Supervisor::prepare`]), waiting for what to run: the
    /// exec of the keeper stays off the path from winning the lock to the command's start.
    spare: Option<KeeperLink>,
}

/// The command between spawn and the end of its stop.
struct Running {
    pid: Pid,
    pgid: Pgid,
    /// Set when the keeper reports the exit (or we reap the command ourselves after losing the
    /// keeper).
    status: Option<ChildExit>,
    keeper: KeeperLink,
    /// The leader's current fence (see `election::Fence`), as last sent to the keeper.
    fence: Fence,
    /// The command's cgroup, if it has one: the fallback kills through it.
    cgroup: Option<PathBuf>,
    /// Whether the command was given the terminal's foreground.
    terminal: bool,
    /// The keeper stopped the command at the fence by itself.
    fenced: bool,
    /// A job-control stop of the command, not yet followed.
    suspended: Option<i32>,
    /// The keeper reported the tree empty; `killed` as it said.
    done: Option<bool>,
}

/// The wrapper's end of the keeper.
struct KeeperLink {
    pid: Pid,
    /// Set once we reaped it.
    reaped: bool,
    /// The only write end of the keeper's input: closing it tells the keeper we are gone.
    to: Option<OwnedFd>,
    from: AsyncFd<OwnedFd>,
    /// The keeper closed its end (it exited, or was killed).
    eof: bool,
    pending: Vec<u8>,
}

impl Supervisor {
    /// Makes this process a child subreaper, subscribes to SIGCHLD and decides where the
    /// command's cgroup goes. Call it early, inside the runtime (with time and signal drivers
    /// enabled), before anything can become our orphan.
    pub fn new() -> anyhow::Result<Self> {
        nix::sys::prctl::set_child_subreaper(true)
            .context("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER)")?;
        open_standard_descriptors();
        let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .context("cannot subscribe to SIGCHLD")?;
        let placement = cgroup::detect();
        match &placement {
            Placement::Under(dir) => {
                tracing::debug!(parent = %dir.display(), "the command will run in a cgroup of its own")
            }
            Placement::Nowhere(why) => tracing::debug!(
                "the command will run without a cgroup of its own ({why}); the keeper tracks its tree"
            ),
        }
        Ok(Supervisor {
            sigchld,
            me: nix::unistd::getpid(),
            my_pgrp: nix::unistd::getpgrp(),
            placement,
            child: None,
            last: None,
            warned_stop_signal: false,
            spare: None,
        })
    }

    /// Starts a keeper ahead of time, while the wrapper waits for the lock, so that
    /// [`Supervisor::spawn`] only has to hand it the command: the exec of a fresh copy of the
    /// binary (a few milliseconds) is then paid while standing by, not during a handover. It
    /// waits on its pipe and exits when the pipe closes. Does nothing when one is ready or a
    /// command runs; a failure here is only logged (spawn starts a keeper itself).
    pub fn prepare(&mut self, env_remove: &[String]) {
        if self.child.is_some() || self.spare.is_some() {
            return;
        }
        match self.start_keeper(env_remove) {
            Ok(link) => self.spare = Some(link),
            Err(err) => tracing::debug!(%err, "cannot start a keeper ahead of time"),
        }
    }

    /// Starts the keeper and, through it, the command under `fence`; returns the command's pid.
    /// Synchronous and quick: it returns once the command has been exec'd (or failed to be). It is
    /// safe to call [`Supervisor::stop`] right after, which is what the app does when a stop
    /// signal arrived while spawning.
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
        if !self.warned_stop_signal && stop_signal_does_nothing_by_default(spec.stop_signal) {
            self.warned_stop_signal = true;
            tracing::warn!(
                "--stop-signal {} does nothing to a program that does not handle it: unless the \
                 command does, every stop will wait the whole grace period and then SIGKILL it; \
                 TERM, INT, HUP or QUIT end a program by default",
                spec.stop_signal
            );
        }
        let terminal = foreground_terminal();
        if terminal {
            // From now on the wrapper is in the background of its own terminal: a log line must
            // not stop it (TOSTOP), and it must be able to take the foreground back.
            keeper::set_disposition(libc::SIGTTOU, libc::SIG_IGN);
        }
        let config = keeper::Config {
            program: program.clone(),
            args,
            env_set: spec.env_set.clone(),
            env_remove: spec.env_remove.clone(),
            stop_signal: spec.stop_signal as i32,
            stop_at_ns: fence.stop_at.since_boot().as_nanos() as u64,
            gone_by_ns: fence.gone_by.since_boot().as_nanos() as u64,
            cgroup_parent: match &self.placement {
                Placement::Under(dir) => Some(dir.clone()),
                Placement::Nowhere(_) => None,
            },
            foreground: terminal,
        };
        let other = |source: io::Error| SpawnError::Other {
            program: program.clone(),
            source,
        };
        // The keeper started ahead of time, if it is still there to take the config.
        let spare = self.spare.take().and_then(|mut link| {
            let sent = link
                .to
                .as_ref()
                .ok_or_else(|| io::Error::other("no pipe"))
                .and_then(|to| keeper::write_config(to, &config));
            match sent {
                Ok(()) => Some(link),
                Err(err) => {
                    tracing::debug!(%err, "the keeper started ahead of time is gone; starting another");
                    self.bury(&mut link);
                    None
                }
            }
        });
        let (mut link, first) = match spare {
            Some(mut link) => {
                let first = link.first_reply();
                (link, first)
            }
            None => {
                let mut link = self.start_keeper(&spec.env_remove).map_err(|err| {
                    other(io::Error::other(format!(
                        "cannot start the keeper process: {err}"
                    )))
                })?;
                let first = link
                    .to
                    .as_ref()
                    .ok_or_else(|| io::Error::other("no pipe"))
                    .and_then(|to| keeper::write_config(to, &config))
                    .and_then(|()| link.first_reply());
                (link, first)
            }
        };
        let (pid, in_cgroup) = match first {
            Ok(FromKeeper::Spawned { pid, cgroup }) => (Pid::from_raw(pid), cgroup),
            Ok(FromKeeper::SpawnFailed { errno }) => {
                self.bury(&mut link);
                return Err(SpawnError::from_io(
                    &program,
                    io::Error::from_raw_os_error(errno),
                ));
            }
            Ok(other_reply) => {
                self.bury(&mut link);
                return Err(other(io::Error::other(format!(
                    "the keeper process answered {other_reply:?}"
                ))));
            }
            Err(err) => {
                self.bury(&mut link);
                return Err(other(io::Error::other(format!(
                    "the keeper process failed: {err}"
                ))));
            }
        };
        let cgroup = match (&self.placement, in_cgroup) {
            (Placement::Under(dir), true) => Some(dir.join(keeper::cgroup_name(link.pid))),
            _ => None,
        };
        match (&self.placement, &cgroup) {
            (_, Some(dir)) => {
                tracing::debug!(cgroup = %dir.display(), "the command has its own cgroup")
            }
            (Placement::Under(dir), None) => tracing::warn!(
                "cannot give the command a cgroup of its own under {}; the keeper tracks its \
                 tree without one",
                dir.display()
            ),
            (Placement::Nowhere(_), None) => {}
        }
        tracing::debug!(
            pid = pid.as_raw(),
            keeper = link.pid.as_raw(),
            program,
            terminal,
            "command started"
        );
        self.child = Some(Running {
            pid,
            pgid: Pgid(pid),
            status: None,
            keeper: link,
            fence,
            cgroup,
            terminal,
            fenced: false,
            suspended: None,
            done: None,
        });
        self.last = None;
        Ok(pid.as_raw() as u32)
    }

    /// Moves the fence after a successful renew: the keeper enforces it if the wrapper cannot.
    pub fn set_fence(&mut self, fence: Fence) {
        if let Some(run) = &mut self.child {
            run.fence = fence;
            run.keeper.send(ToKeeper::Fence {
                stop_at: fence.stop_at,
                gone_by: fence.gone_by,
            });
        }
    }

    /// Why the keeper stopped the command by itself, if it did: its fence passed before a newer
    /// one reached it. Leadership is then over whatever the session says now: the app treats it
    /// as lost.
    pub fn fenced(&self) -> Option<&'static str> {
        self.child.as_ref().filter(|run| run.fenced).map(|_| {
            "the fence passed before a renewed one reached the keeper, which stopped the command \
             (was the wrapper paused or starved?)"
        })
    }

    /// The running command's pid, until its stop completes.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the app keeps the pid spawn returns")
    )]
    pub fn child_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|run| run.pid.as_raw() as u32)
    }

    /// Sends `sig` to the command's whole process group (USR1, USR2, WINCH forwarding), through
    /// the keeper. Does nothing when no command is running or its tree is gone.
    pub fn signal_group(&self, sig: Signal) {
        if let Some(run) = &self.child {
            run.keeper.send(ToKeeper::Signal(sig as i32));
        }
    }

    /// Resolves when the command (the direct child) exits, reaping adopted orphans meanwhile.
    /// Cancel-safe, so it can sit in a `select!`. Once the command has exited it resolves at once
    /// with the same status until [`Supervisor::stop`] has cleaned up; with no command it never
    /// resolves. A job-control stop of the command is followed here (module docs).
    pub async fn wait(&mut self) -> ChildExit {
        loop {
            self.reap();
            self.pump();
            let Some(run) = &mut self.child else {
                return std::future::pending().await;
            };
            if let Some(status) = run.status {
                return status;
            }
            if let Some(sig) = run.suspended.take() {
                self.follow_suspension(sig);
                continue;
            }
            self.next_event(Duration::MAX).await;
        }
    }

    /// The stop sequence (design §4), run by the keeper: `sig` and SIGCONT to the command's group
    /// and to every other process of its tree; up to `grace` for all of them to be gone, or until
    /// `hurry` resolves (a second TERM or INT; pass `std::future::pending()` for none), and never
    /// past the fence's `gone_by`; then SIGKILL to whatever is left, until nothing is. Only then
    /// does it return, so the lock can be released. If the keeper already began a stop (at the
    /// fence), the command does not get the stop signal twice: this only brings the SIGKILL
    /// forward.
    ///
    /// Also the cleanup after the command exited on its own: the app calls it before releasing
    /// the lock, to kill what the command left behind. With no command it returns at once (the
    /// last outcome again, if there was one). Not meant to be cancelled: a dropped stop leaves
    /// the stop to the keeper's fence, and calling it again goes on waiting.
    pub async fn stop(
        &mut self,
        sig: Signal,
        grace: Duration,
        hurry: impl Future<Output = ()>,
    ) -> StopOutcome {
        let Some(run) = &self.child else {
            return self.last.unwrap_or(StopOutcome {
                status: None,
                killed: false,
            });
        };
        // Capped so that a "for ever" grace cannot overflow the clock.
        let kill_at = BootTime::now() + grace.min(Duration::from_secs(10 * 365 * 86_400));
        run.keeper.send(ToKeeper::Stop {
            sig: sig as i32,
            kill_at,
        });
        tracing::debug!(pgid = %run.pgid, %sig, "asked the keeper to stop the command");
        let mut hurry = std::pin::pin!(hurry);
        let mut hurried = false;
        loop {
            self.reap();
            self.pump();
            let run = self.child.as_ref().expect("a command is running");
            if run.done.is_some() || run.keeper.eof || run.keeper.reaped {
                break;
            }
            tokio::select! {
                () = self.next_event(Duration::MAX) => {}
                () = hurry.as_mut(), if !hurried => {
                    tracing::debug!("told to hurry: skipping the rest of the grace period");
                    hurried = true;
                    if let Some(run) = &self.child {
                        run.keeper.send(ToKeeper::Hurry);
                    }
                }
            }
        }
        let killed_by_us = self.after_keeper().await;
        let run = self.child.take().expect("a command was running");
        if run.terminal {
            take_terminal_back(run.pgid, self.my_pgrp);
        }
        let outcome = StopOutcome {
            status: run.status,
            killed: run.done.unwrap_or(false) || killed_by_us,
        };
        if outcome.killed {
            tracing::warn!("processes outlived the stop signal and were SIGKILLed");
        }
        tracing::debug!(
            pid = run.pid.as_raw(),
            status = %outcome.status.map_or("not started".to_string(), |s| s.to_string()),
            killed = outcome.killed,
            "command stopped; nothing left"
        );
        self.last = Some(outcome);
        outcome
    }

    /// Starts the keeper with two fresh pipes; returns our end of them. `env_remove`: variables
    /// the keeper's own environment need not hold either (tokens).
    fn start_keeper(&self, env_remove: &[String]) -> io::Result<KeeperLink> {
        let (to_keeper_r, to_keeper_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (from_keeper_r, from_keeper_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let pid = launch_keeper(
            &to_keeper_r,
            &from_keeper_w,
            &[to_keeper_w.as_raw_fd(), from_keeper_r.as_raw_fd()],
            env_remove,
        )?;
        drop((to_keeper_r, from_keeper_w));
        nix::fcntl::fcntl(&from_keeper_r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, so its descriptor stays open and the
        // same until the `AsyncFd` is dropped.
        let from = unsafe { AsyncFd::register(from_keeper_r) }.map_err(io::Error::from)?;
        Ok(KeeperLink {
            pid,
            reaped: false,
            to: Some(to_keeper_w),
            from,
            eof: false,
            pending: Vec::new(),
        })
    }

    /// A keeper that will not run a command: close its pipe and reap it.
    fn bury(&mut self, link: &mut KeeperLink) {
        link.to = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match nix::sys::wait::waitpid(link.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
                _ => return,
            }
            if std::time::Instant::now() >= deadline {
                // It is our unreaped child: the pid is still ours to signal.
                let _ = signal::kill(link.pid, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(link.pid, None);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Once the keeper is done (or gone): wait for its exit, and if it went without reporting the
    /// tree empty, kill what is left ourselves. Returns whether we had to kill anything.
    async fn after_keeper(&mut self) -> bool {
        let Some(run) = &mut self.child else {
            return false;
        };
        run.keeper.to = None;
        let mut killed = false;
        if run.done.is_none() {
            tracing::warn!(
                keeper = run.keeper.pid.as_raw(),
                "the keeper process ended without finishing the stop; cleaning up its tree here"
            );
            killed = self.kill_what_the_keeper_left().await;
        }
        // The keeper exits right after its last report.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.reap();
            if self.child.as_ref().is_none_or(|run| run.keeper.reaped) {
                break;
            }
            if Instant::now() >= deadline {
                if let Some(run) = &self.child {
                    // Our unreaped child: the pid is still ours to signal.
                    let _ = signal::kill(run.keeper.pid, Signal::SIGKILL);
                }
            }
            self.next_sigchld(POLL).await;
        }
        if let Some(dir) = self.child.as_ref().and_then(|run| run.cgroup.clone()) {
            cgroup::remove_dir(&dir);
        }
        killed
    }

    /// The fallback when the keeper is lost: the command died with it (PDEATHSIG) and what was
    /// below it re-parented to us. SIGKILL through the cgroup and to every process under our
    /// children outside our own group, until none is left.
    async fn kill_what_the_keeper_left(&mut self) -> bool {
        let cgroup = self.child.as_ref().and_then(|run| run.cgroup.clone());
        let mut killed = false;
        let mut warn_at = Instant::now() + STUCK_WARNING_EVERY;
        loop {
            self.reap();
            let left = self.own_leftovers();
            let populated = cgroup.as_ref().is_some_and(|dir| {
                std::fs::read_to_string(dir.join("cgroup.events"))
                    .ok()
                    .and_then(|text| cgroup::parse_populated(&text))
                    .unwrap_or(false)
            });
            if left.is_empty() && !populated {
                return killed;
            }
            killed = true;
            if let Some(dir) = &cgroup {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
            for pid in &left {
                // Found just now, with no reaping since (keeper's module docs).
                let _ = signal::kill(*pid, Signal::SIGKILL);
            }
            if Instant::now() >= warn_at {
                let pids: Vec<String> = left.iter().map(|p| p.to_string()).collect();
                tracing::warn!(
                    pids = %pids.join(" "),
                    "processes survive SIGKILL (a hung filesystem?); still waiting for them"
                );
                warn_at = Instant::now() + STUCK_WARNING_EVERY;
            }
            self.next_sigchld(POLL).await;
        }
    }

    /// Live processes under our children outside our own process group (the keeper's orphans),
    /// the unreaped keeper aside. Processes the wrapper started in its own group are not the
    /// command's (there are none in the app; in the test binary other tests may have some).
    fn own_leftovers(&self) -> Vec<Pid> {
        let keeper = self
            .child
            .as_ref()
            .filter(|run| !run.keeper.reaped)
            .map(|run| run.keeper.pid);
        let mut found = Vec::new();
        for child in proctree::children(self.me) {
            let Some(stat) = proctree::stat(child) else {
                continue;
            };
            if stat.pgrp == self.my_pgrp || Some(child) == keeper || stat.is_zombie() {
                continue;
            }
            found.push(child);
            found.extend(proctree::descendants(child));
        }
        found
    }

    /// Reads every report the keeper has sent so far.
    fn pump(&mut self) {
        let Some(run) = &mut self.child else { return };
        let mut buf = [0u8; 4096];
        while !run.keeper.eof {
            match nix::unistd::read(run.keeper.from.get_ref(), &mut buf) {
                Ok(0) => run.keeper.eof = true,
                Ok(n) => run.keeper.pending.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(err) => {
                    tracing::debug!(%err, "cannot read from the keeper");
                    run.keeper.eof = true;
                }
            }
        }
        while run.keeper.pending.len() >= FRAME {
            let frame: [u8; FRAME] = run.keeper.pending[..FRAME].try_into().unwrap();
            run.keeper.pending.drain(..FRAME);
            match FromKeeper::decode(&frame) {
                Some(FromKeeper::Exited { raw }) => {
                    run.status = run.status.or(ChildExit::from_wait_status(raw));
                    tracing::debug!(pid = run.pid.as_raw(), status = %describe(run.status), "command exited");
                }
                Some(FromKeeper::Fenced) => {
                    run.fenced = true;
                    tracing::warn!(
                        "the fence passed without a renewed one: the keeper began the stop \
                         sequence"
                    );
                }
                Some(FromKeeper::Suspended { sig }) => run.suspended = Some(sig),
                Some(FromKeeper::Done { killed }) => run.done = Some(killed),
                Some(_) => tracing::debug!("unexpected report from the keeper"),
                None => tracing::debug!("unreadable report from the keeper"),
            }
        }
    }

    /// Waits for a report from the keeper, a SIGCHLD, or `tick` at most.
    async fn next_event(&mut self, tick: Duration) {
        let Supervisor { sigchld, child, .. } = self;
        let keeper = child
            .as_ref()
            .filter(|run| !run.keeper.eof)
            .map(|run| &run.keeper.from);
        let report = async {
            match keeper {
                Some(from) => match from.readable().await {
                    Ok(mut ready) => ready.clear_ready(),
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = report => {}
            got = sigchld.recv() => {
                if got.is_none() {
                    // The signal driver is gone (runtime shutting down): fall back to polling.
                    sleep(tick.min(POLL)).await;
                }
            }
            () = sleep(tick.min(Duration::from_secs(86_400))) => {}
        }
    }

    /// Waits for a SIGCHLD, or `tick` at most.
    async fn next_sigchld(&mut self, tick: Duration) {
        tokio::select! {
            got = self.sigchld.recv() => {
                if got.is_none() {
                    sleep(tick.min(POLL)).await;
                }
            }
            () = sleep(tick) => {}
        }
    }

    /// Reaps every child that has exited: the keeper, the command (only if the keeper is lost
    /// and it re-parented to us), adopted orphans (silently).
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
            if pid == run.keeper.pid {
                tracing::debug!(pid = pid.as_raw(), "keeper reaped");
                run.keeper.reaped = true;
                return;
            }
            if pid == run.pid {
                run.status = run.status.or(ChildExit::from_wait_status(raw));
                tracing::debug!(pid = pid.as_raw(), status = %describe(run.status), "command reaped here");
                return;
            }
        }
        tracing::debug!(pid = pid.as_raw(), "reaped an orphan");
    }

    /// Follows a job-control stop of the command (module docs): only when we gave it the
    /// terminal, and only for the terminal's stop signals.
    fn follow_suspension(&mut self, sig: c_int) {
        let Some(run) = &self.child else { return };
        if !run.terminal || ![libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU].contains(&sig) {
            return;
        }
        let stdin = std::io::stdin();
        if nix::unistd::tcgetpgrp(stdin.as_fd()) == Ok(run.pgid.0) {
            let _ = nix::unistd::tcsetpgrp(stdin.as_fd(), self.my_pgrp);
        }
        tracing::info!(
            "the command was stopped (signal {sig}); stopping too, so that the shell sees the job \
             stopped. The session is not renewed while stopped: resume soon (fg)"
        );
        // SIGTTOU is ignored here (set at spawn): stop by SIGSTOP instead.
        let own = if sig == libc::SIGTTOU {
            libc::SIGSTOP
        } else {
            sig
        };
        // SAFETY: kill on our own pid; no memory involved. The stop takes effect before kill
        // returns, and we go on from here once continued.
        unsafe { libc::kill(self.me.as_raw(), own) };
        if nix::unistd::tcgetpgrp(stdin.as_fd()) == Ok(self.my_pgrp) {
            let _ = nix::unistd::tcsetpgrp(stdin.as_fd(), run.pgid.0);
        }
        run.keeper.send(ToKeeper::Signal(libc::SIGCONT));
        tracing::info!("continued; the command continues too");
    }

    /// Simulates the wrapper's death for the keeper: closes its pipe without telling it anything.
    #[cfg(test)]
    fn abandon_keeper(&mut self) {
        if let Some(run) = &mut self.child {
            run.keeper.to = None;
        }
    }

    #[cfg(test)]
    fn keeper_pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|run| run.keeper.pid)
    }
}

impl KeeperLink {
    /// Sends one frame without blocking: the keeper always reads, and a full pipe (a stopped
    /// keeper) must not stop the wrapper. A message that cannot be delivered is dropped: the
    /// keeper then keeps an older fence (earlier, so on the safe side) or misses a forwarded
    /// signal.
    fn send(&self, msg: ToKeeper) {
        let Some(to) = &self.to else { return };
        if let Err(err) = nix::unistd::write(to, &msg.encode()) {
            tracing::debug!(%err, "cannot write to the keeper");
        }
    }

    /// Blocks (up to [`SPAWN_TIMEOUT`]) for the keeper's first report: the command started, or
    /// could not be. Then makes the input pipe non-blocking for the rest.
    fn first_reply(&mut self) -> io::Result<FromKeeper> {
        let mut frame = [0u8; FRAME];
        let mut got = 0;
        let deadline = std::time::Instant::now() + SPAWN_TIMEOUT;
        while got < FRAME {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut fds = [nix::poll::PollFd::new(
                self.from.get_ref().as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            match nix::poll::poll(
                &mut fds,
                nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
            ) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")),
                Ok(_) | Err(Errno::EINTR) => {}
                Err(err) => return Err(err.into()),
            }
            match nix::unistd::read(self.from.get_ref(), &mut frame[got..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "it exited before starting the command",
                    ));
                }
                Ok(n) => got += n,
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(err) => return Err(err.into()),
            }
        }
        if let Some(to) = &self.to {
            nix::fcntl::fcntl(to, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        FromKeeper::decode(&frame).ok_or_else(|| io::Error::other("unreadable answer"))
    }
}

impl Drop for Supervisor {
    /// The app stops the command before dropping us; this is the fallback for panics and early
    /// returns: SIGKILL everything at once and reap, without a runtime and within a bound.
    fn drop(&mut self) {
        let Some(run) = &mut self.child else { return };
        run.keeper.send(ToKeeper::Hurry);
        // Closing the pipe would do it too, with a grace: Hurry first makes it immediate.
        run.keeper.to = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.reap();
            let Some(run) = &self.child else { return };
            if run.keeper.reaped {
                break;
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!("the keeper did not finish in time; killing it");
                // Our unreaped child: the pid is still ours to signal.
                let _ = signal::kill(run.keeper.pid, Signal::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Whatever a killed keeper left re-parents to us: a bounded last sweep.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.reap();
            let left = self.own_leftovers();
            if left.is_empty() || std::time::Instant::now() >= deadline {
                break;
            }
            for pid in left {
                let _ = signal::kill(pid, Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(run) = &self.child {
            if run.terminal {
                take_terminal_back(run.pgid, self.my_pgrp);
            }
        }
    }
}

/// Opens `/dev/null` on any of descriptors 0, 1 and 2 that is closed (a wrapper started with
/// one closed), so that the keeper's pipes can never land there and be taken for the command's
/// stdio.
fn open_standard_descriptors() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on a raw number only asks whether it is an open descriptor.
        let closed =
            unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 && Errno::last() == Errno::EBADF;
        if closed {
            // The lowest free descriptor is `fd` itself; it stays open for the process's life.
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                Ok(null) => std::mem::forget(null),
                Err(err) => {
                    tracing::warn!(fd, %err, "cannot open /dev/null on a closed descriptor")
                }
            }
        }
    }
}

/// Whether the command should get the terminal: our stdin is a terminal whose foreground is our
/// own process group (not under cron, systemd, a pipe, or `&`).
fn foreground_terminal() -> bool {
    let stdin = std::io::stdin();
    nix::unistd::isatty(stdin.as_fd()).unwrap_or(false)
        && nix::unistd::tcgetpgrp(stdin.as_fd()) == Ok(nix::unistd::getpgrp())
}

/// Gives the terminal's foreground back to our group if the command's group still has it.
fn take_terminal_back(command: Pgid, mine: Pid) {
    let stdin = std::io::stdin();
    if nix::unistd::tcgetpgrp(stdin.as_fd()) == Ok(command.0) {
        // SIGTTOU is ignored (set at spawn): allowed from the background.
        if let Err(err) = nix::unistd::tcsetpgrp(stdin.as_fd(), mine) {
            tracing::debug!(%err, "cannot take the terminal back");
        }
    }
}

/// Starts the keeper process with `input` and `output` as its pipe ends; `ours` are our own ends,
/// which it must not hold. The shipped binary execs itself (`keeper`'s module docs say why).
#[cfg(not(test))]
fn launch_keeper(
    input: &OwnedFd,
    output: &OwnedFd,
    ours: &[RawFd],
    env_remove: &[String],
) -> io::Result<Pid> {
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    let _ = ours; // close-on-exec: the exec closes them
    let (input, output) = (input.as_raw_fd(), output.as_raw_fd());
    let mut command = Command::new("/proc/self/exe");
    for name in env_remove {
        command.env_remove(name);
    }
    command
        .arg0(
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "consul-leader".into()),
        )
        .arg(keeper::SUBCOMMAND)
        .arg(input.to_string())
        .arg(output.to_string());
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (fcntl, sigfillset, sigprocmask on its own descriptors and mask).
    unsafe {
        command.pre_exec(move || {
            for fd in [input, output] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Blocked across the exec, so that a signal sent to our group meanwhile cannot kill
            // the keeper before it ignores it (keeper::run).
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            if libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// The unit tests' keeper: the test harness binary cannot exec a keeper, so it forks and runs
/// [`keeper::run`] in the child. Only here does Rust code run after a fork of a multi-threaded
/// process (glibc makes malloc safe across fork; the keeper takes no other lock that a test
/// thread could hold). The shipped binary always execs.
#[cfg(test)]
fn launch_keeper(
    input: &OwnedFd,
    output: &OwnedFd,
    ours: &[RawFd],
    _env_remove: &[String],
) -> io::Result<Pid> {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let mut old_mask = SigSet::empty();
    signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )?;
    // SAFETY: test-only (see above). The child never returns into the caller: it ends in _exit.
    let forked = unsafe { nix::unistd::fork() };
    if let Ok(nix::unistd::ForkResult::Child) = forked {
        let (input, output) = (input.as_raw_fd(), output.as_raw_fd());
        for fd in ours {
            // SAFETY: closing our copies of the wrapper's ends, so the keeper sees EOF when the
            // wrapper closes its own.
            unsafe { libc::close(*fd) };
        }
        let code = std::panic::catch_unwind(|| {
            use std::os::fd::FromRawFd;
            // SAFETY: fresh copies in this forked process; nothing else here uses them.
            let (i, o) = unsafe { (OwnedFd::from_raw_fd(input), OwnedFd::from_raw_fd(output)) };
            keeper::run(i, o)
        })
        .unwrap_or(101);
        // SAFETY: ends the forked child without running the test harness's exit handlers.
        unsafe { libc::_exit(i32::from(code)) };
    }
    signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None)?;
    match forked? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => unreachable!("the child branch never returns"),
    }
}

#[cfg(test)]
mod tests {
    //! Real processes and real signals. SIGCHLD, `waitpid(-1)` and the subreaper flag are
    //! process-wide, so the tests that start commands run one at a time (`SERIAL`); every test
    //! kills its marked processes on the way out, even when it fails.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    use nix::sys::signal::{SigSet, SigmaskHow};

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
                stop_signal: Signal::SIGTERM,
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
            stop_signal: Signal::SIGTERM,
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
            stop_signal: Signal::SIGTERM,
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
                stop_signal: Signal::SIGTERM,
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
            stop_signal: Signal::SIGTERM,
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

    /// A fence whose stop sequence begins `stop_in` from now and gives `grace` before SIGKILL.
    fn fence_in(stop_in: Duration, grace: Duration) -> Fence {
        let stop_at = crate::clock::BootTime::now() + stop_in;
        Fence {
            stop_at,
            gone_by: stop_at + grace,
        }
    }

    fn count(lines: &[Line], event: &str, detail: &str) -> usize {
        lines
            .iter()
            .filter(|l| l.event == event && l.detail == detail)
            .count()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn keeper_is_the_parent_and_subreaper_of_the_tree() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("subreaper");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[("CL_CHILD_GRANDCHILDREN", "setsid daemon")]);
        let pid = sup.spawn(&spec, far_fence()).unwrap() as i32;
        env.started().await;
        let keeper = sup.keeper_pid().unwrap();
        let daemon = find(&env.lines(), "start", "daemon").unwrap().pid;
        let parent = |pid: i32| proctree::stat(Pid::from_raw(pid)).unwrap().ppid;
        assert_eq!(parent(pid), keeper, "the keeper starts the command");
        // The daemon's parent exited right after forking it: it was adopted by the keeper, not
        // by us or init.
        assert_eq!(parent(daemon), keeper, "orphans re-parent to the keeper");
        let keeper_stat = proctree::stat(keeper).unwrap();
        assert_eq!(
            keeper_stat.pgrp, keeper,
            "the keeper leads a group of its own"
        );
        let grace = Duration::from_millis(300);
        let outcome = within("stop", sup.stop(Signal::SIGTERM, grace, never())).await;
        assert_eq!(outcome.status, Some(ChildExit::Signaled(15)));
        assert!(
            outcome.killed,
            "the setsid and daemon grandchildren survive TERM"
        );
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn keeper_enforces_the_fence_by_itself() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("fence");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[
            ("CL_CHILD_EXIT_ON", ""),
            ("CL_CHILD_GRANDCHILDREN", "setsid"),
        ]);
        let grace = Duration::from_millis(300);
        let fence = fence_in(Duration::from_millis(500), grace);
        sup.spawn(&spec, fence).unwrap();
        let pid = env.started().await;
        // The wrapper does nothing: no stop, no new fence. The keeper stops the tree at the fence.
        let status = within("the command to end", sup.wait()).await;
        assert_eq!(
            status,
            ChildExit::Signaled(9),
            "it ignores TERM: SIGKILL at gone_by"
        );
        assert!(
            fence.gone_by.has_passed(),
            "SIGKILL came before gone_by: the grace was cut short"
        );
        assert!(sup.fenced().is_some(), "the app must count this a loss");
        let lines = env.lines();
        assert_eq!(
            count(&lines, "signal", "TERM"),
            2,
            "main and setsid: {lines:#?}"
        );
        assert!(has(&lines, "signal", pid, "TERM"), "{lines:#?}");
        // The app's own stop after a fenced exit: no second stop signal, nothing left.
        let outcome = within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Signaled(9)),
                killed: true
            }
        );
        assert_eq!(count(&env.lines(), "signal", "TERM"), 2);
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_renewed_fence_holds_the_keeper_back() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("renewed");
        let mut sup = Supervisor::new().unwrap();
        let first = fence_in(Duration::from_millis(300), Duration::from_millis(100));
        sup.spawn(&env.child(&[]), first).unwrap();
        let pid = env.started().await;
        sup.set_fence(far_fence());
        // Messages reach the keeper in order: once it forwarded this, it has the new fence.
        sup.signal_group(Signal::SIGUSR1);
        env.wait_journal("USR1", |l| has(l, "signal", pid, "USR1"))
            .await;
        // The input of this test is time itself: wait until the first fence's SIGKILL moment is
        // well past, then check that nothing was stopped.
        crate::clock::sleep_until(first.gone_by + Duration::from_millis(300)).await;
        sup.reap();
        sup.pump();
        assert!(
            is_live(pid),
            "the keeper stopped the command at an old fence"
        );
        assert!(sup.fenced().is_none());
        assert_eq!(count(&env.lines(), "signal", "TERM"), 0);
        within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stop_after_the_fence_sends_no_second_stop_signal() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("once");
        let mut sup = Supervisor::new().unwrap();
        let fence = fence_in(Duration::from_millis(200), DEADLINE);
        sup.spawn(&env.child(&[("CL_CHILD_EXIT_ON", "")]), fence)
            .unwrap();
        let pid = env.started().await;
        env.wait_journal("the keeper's TERM", |l| has(l, "signal", pid, "TERM"))
            .await;
        // The wrapper's own stop comes second: it only brings the SIGKILL forward.
        let grace = Duration::from_millis(200);
        let outcome = within("stop", sup.stop(Signal::SIGTERM, grace, never())).await;
        assert_eq!(outcome.status, Some(ChildExit::Signaled(9)));
        assert_eq!(count(&env.lines(), "signal", "TERM"), 1, "TERM twice");
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn keeper_stops_the_whole_tree_when_the_wrapper_goes() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("abandoned");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[("CL_CHILD_GRANDCHILDREN", "ignore-term setsid daemon")]);
        let grace = Duration::from_millis(300);
        let pid = sup
            .spawn(&spec, fence_in(Duration::from_secs(3600), grace))
            .unwrap() as i32;
        env.started().await;
        let lines = env.lines();
        let setsid = find(&lines, "start", "setsid").unwrap().pid;
        let keeper = sup.keeper_pid().unwrap();

        sup.abandon_keeper();
        let deadline = Instant::now() + DEADLINE;
        while !env.alive().is_empty() || is_live(keeper.as_raw()) {
            assert!(
                Instant::now() < deadline,
                "the keeper left processes behind: {:?}",
                env.alive()
            );
            sleep(Duration::from_millis(10)).await;
        }
        let lines = env.lines();
        assert!(
            has(&lines, "signal", pid, "TERM"),
            "asked first: {lines:#?}"
        );
        assert!(
            has(&lines, "signal", setsid, "TERM"),
            "asked first: {lines:#?}"
        );
        let outcome = within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
        assert_eq!(
            outcome,
            StopOutcome {
                status: Some(ChildExit::Signaled(15)),
                killed: true
            }
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_killed_keeper_leaves_nothing_behind() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("keeper-killed");
        let mut sup = Supervisor::new().unwrap();
        let spec = env.child(&[("CL_CHILD_GRANDCHILDREN", "ignore-term setsid daemon")]);
        sup.spawn(&spec, far_fence()).unwrap();
        env.started().await;
        // Not something the app does: the OOM killer, or an administrator.
        signal::kill(sup.keeper_pid().unwrap(), Signal::SIGKILL).unwrap();
        // The command dies with its keeper (PDEATHSIG); the rest re-parents to us.
        let status = within("the command to end", sup.wait()).await;
        assert_eq!(status, ChildExit::Signaled(9));
        let outcome = within("stop", sup.stop(Signal::SIGTERM, DEADLINE, never())).await;
        assert!(outcome.killed);
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    /// Set for the wrapper process of `tree_dies_with_a_sigkilled_wrapper`.
    const WRAPPER_JOURNAL_VAR: &str = "CL_TEST_WRAPPER_JOURNAL";

    /// Not a test: the wrapper that `tree_dies_with_a_sigkilled_wrapper` starts (this same test
    /// binary, filtered to this function) and SIGKILLs. Returns at once when run by hand.
    #[tokio::test(flavor = "current_thread")]
    #[ignore = "helper process of tree_dies_with_a_sigkilled_wrapper"]
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
                    "ignore-term setsid daemon".to_owned(),
                ),
            ],
            env_remove: vec![WRAPPER_JOURNAL_VAR.to_owned()],
            stop_signal: Signal::SIGTERM,
        };
        let mut sup = Supervisor::new().unwrap();
        sup.spawn(
            &spec,
            fence_in(Duration::from_secs(3600), Duration::from_millis(300)),
        )
        .unwrap();
        sup.wait().await; // until SIGKILLed
    }

    /// End to end: a real wrapper process killed by SIGKILL; its keeper stops the whole tree,
    /// escaped sessions and double forks included, and nobody has to clean up after it.
    #[tokio::test(flavor = "current_thread")]
    async fn tree_dies_with_a_sigkilled_wrapper() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("wrapper-killed");
        // We are the dead wrapper's subreaper: its keeper comes to us and we reap it.
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
        wrapper.kill().unwrap(); // SIGKILL
        wrapper.wait().unwrap();
        let deadline = Instant::now() + DEADLINE;
        // Everything: the command, its group, the setsid and daemon grandchildren, the keeper
        // (which inherited the marker from the wrapper it was forked from).
        while !env.alive().is_empty() {
            sup.reap();
            assert!(
                Instant::now() < deadline,
                "the tree outlived its wrapper: {:?}",
                env.alive()
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
        let keeper = sup.keeper_pid().unwrap();
        drop(sup);
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
        assert!(
            !Path::new(&format!("/proc/{keeper}")).exists(),
            "keeper not reaped"
        );
    }

    /// The cgroup the placement gives a command on this machine, or `None` (after a note).
    fn cgroup_parent(sup: &Supervisor, test: &str) -> Option<PathBuf> {
        match &sup.placement {
            Placement::Under(dir) => Some(dir.clone()),
            Placement::Nowhere(why) => {
                eprintln!("SKIPPED {test}: no cgroup for commands here ({why})");
                None
            }
        }
    }

    fn cgroup_path_of(pid: i32) -> String {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        crate::cgroup::own_cgroup_v2(&text).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn command_is_created_in_its_cgroup() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("clone3");
        let mut sup = Supervisor::new().unwrap();
        let Some(_) = cgroup_parent(&sup, "command_is_created_in_its_cgroup") else {
            return;
        };
        let spec = env.child(&[("CL_CHILD_GRANDCHILDREN", "setsid daemon")]);
        let pid = sup.spawn(&spec, far_fence()).unwrap() as i32;
        env.started().await;
        let keeper = sup.keeper_pid().unwrap();
        let name = format!("/{}", keeper::cgroup_name(keeper));
        for p in env.alive().into_iter().filter(|p| *p != keeper.as_raw()) {
            assert!(
                cgroup_path_of(p).ends_with(&name),
                "{p}: {}",
                cgroup_path_of(p)
            );
        }
        assert!(cgroup_path_of(pid).ends_with(&name));
        let grace = Duration::from_millis(200);
        within("stop", sup.stop(Signal::SIGTERM, grace, never())).await;
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn command_is_moved_into_its_cgroup_where_clone3_is_refused() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("migrate");
        let mut sup = Supervisor::new().unwrap();
        let Some(_) = cgroup_parent(&sup, "command_is_moved_into_its_cgroup") else {
            return;
        };
        keeper::tests::FORCE_MIGRATION.store(true, std::sync::atomic::Ordering::SeqCst);
        let spawned = sup.spawn(
            &env.child(&[("CL_CHILD_GRANDCHILDREN", "setsid")]),
            far_fence(),
        );
        keeper::tests::FORCE_MIGRATION.store(false, std::sync::atomic::Ordering::SeqCst);
        let pid = spawned.unwrap() as i32;
        env.started().await;
        let keeper = sup.keeper_pid().unwrap();
        let name = format!("/{}", keeper::cgroup_name(keeper));
        for p in env.alive().into_iter().filter(|p| *p != keeper.as_raw()) {
            assert!(
                cgroup_path_of(p).ends_with(&name),
                "{p}: {}",
                cgroup_path_of(p)
            );
        }
        assert!(cgroup_path_of(pid).ends_with(&name));
        let grace = Duration::from_millis(200);
        within("stop", sup.stop(Signal::SIGTERM, grace, never())).await;
        assert!(env.alive().is_empty(), "left behind: {:?}", env.alive());
    }

    /// `clone3` reports the same errors as `Command` (and execvp): what decides 126 and 127.
    #[tokio::test(flavor = "current_thread")]
    async fn clone3_spawn_reports_exec_errors_as_execvp_does() {
        let _serial = SERIAL.lock().await;
        let env = TestEnv::new("clone3-errors");
        let sup = Supervisor::new().unwrap();
        let Some(parent) = cgroup_parent(&sup, "clone3_spawn_reports_exec_errors") else {
            return;
        };
        let cg = crate::cgroup::Cgroup::create(&parent, &format!("{}-test", env.marker)).unwrap();
        let me = nix::unistd::getpid();
        let spawn = |program: &str| {
            let cfg = keeper::Config {
                program: program.to_owned(),
                args: vec![],
                env_set: vec![],
                env_remove: vec![],
                stop_signal: libc::SIGTERM,
                stop_at_ns: 0,
                gone_by_ns: 0,
                cgroup_parent: None,
                foreground: false,
            };
            keeper::spawn_into_cgroup(&cfg, me, libc::SIGRTMAX(), cg.dir_fd())
        };
        let errno = |r: Result<Pid, Option<io::Error>>| r.unwrap_err().unwrap().raw_os_error();
        assert_eq!(
            errno(spawn("consul-leader-test-no-such-command")),
            Some(libc::ENOENT)
        );
        let script = env.dir.join("script");
        std::fs::write(&script, "exit 3\n").unwrap(); // no #!: execvp runs it with /bin/sh
        assert_eq!(errno(spawn(script.to_str().unwrap())), Some(libc::EACCES));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pid = spawn(script.to_str().unwrap()).unwrap();
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 3));
        let pid = spawn("true").unwrap(); // found on PATH
        assert_eq!(
            nix::sys::wait::waitpid(pid, None).unwrap(),
            nix::sys::wait::WaitStatus::Exited(pid, 0)
        );
        cg.remove();
    }

    #[test]
    fn stop_signals_that_do_nothing() {
        for sig in [
            Signal::SIGWINCH,
            Signal::SIGCHLD,
            Signal::SIGURG,
            Signal::SIGCONT,
        ] {
            assert!(stop_signal_does_nothing_by_default(sig), "{sig}");
        }
        for sig in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGUSR1,
        ] {
            assert!(!stop_signal_does_nothing_by_default(sig), "{sig}");
        }
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
