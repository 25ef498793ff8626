//! The keeper: a small process between the wrapper and the command that owns the command's whole
//! tree and enforces the leader's fence even when the wrapper cannot.
//!
//! # Process model
//!
//! ```text
//! wrapper (consul-leader run)            subreaper; talks to Consul; decides
//!   └─ keeper (consul-leader __keeper)   own process group, own subreaper, ignores every signal
//!        └─ command                      own process group; own cgroup where allowed
//!             └─ ...                     orphans, daemons, `setsid` sessions: all re-parent
//!                                        to the keeper, never past it
//! ```
//!
//! The wrapper starts the keeper and the keeper starts the command, so the keeper is the
//! command's parent and a child subreaper: every process under the command that loses its parent
//! (a double fork, a daemon that called `setsid`) is re-parented to the keeper, never to init. The
//! command's tree is therefore exactly the keeper's subtree, found by walking down from the keeper
//! (`proctree`), at a cost that follows the tree, not the host. Where the machine allows it the
//! command also runs in a cgroup of its own (`cgroup`), killed atomically with `cgroup.kill`.
//!
//! The wrapper holds the only write end of the keeper's input pipe. It sends the fence after
//! every successful renew, stop requests and signals to forward; the keeper answers with the
//! command's pid, its exit, job-control stops and the end of the tree ([`ToKeeper`],
//! [`FromKeeper`]: fixed 24-byte frames, after one length-prefixed JSON [`Config`]).
//!
//! # What the keeper guarantees
//!
//! - **The fence holds without the wrapper.** The keeper arms a `CLOCK_BOOTTIME` timerfd
//!   (suspend counts, as on Consul's servers; see `clock`) at the fence's `stop_at`. If it passes
//!   without a newer fence, the keeper runs the stop sequence itself: the stop signal and SIGCONT
//!   to the tree, then SIGKILL at `gone_by`, so a wrapper that is SIGSTOPped, swapped out or
//!   stuck in a debugger cannot keep its command past the moment Consul may give the lock to
//!   another. When the wrapper is healthy its own timer (same fence) starts the stop at the same
//!   moment; whichever request comes second only ever moves the SIGKILL earlier, never sends the
//!   stop signal again.
//! - **Nothing outlives the wrapper.** End of file on the input pipe means the wrapper is gone
//!   (SIGKILL, a crash): the keeper runs the stop sequence with the configured stop signal and a
//!   grace that ends at `gone_by` at the latest, then exits. Escaped sessions and double forks are
//!   in its subtree (and in its cgroup), so they go too, within the grace plus the time a SIGKILL
//!   takes.
//! - **It reports the end only when the tree is empty**: the command has exited, no other child
//!   of the keeper is alive (every live descendant hangs below one of them), and the cgroup, if
//!   any, is not populated. Only then may the wrapper release the lock.
//!
//! # Which pids the keeper may signal
//!
//! A pid or pgid that has been reaped may be reused by an unrelated process. The keeper keeps the
//! command's zombie unreaped until the very end (it observes the exit with `WNOWAIT`), so the
//! command's pid and process group stay allocated for the keeper's whole life and `kill(-pgid)` can
//! only reach the command's group. The keeper is the only process that signals the tree: the
//! wrapper asks it to, over the pipe, so no signal is ever sent after the keeper has reaped the
//! command and exited. Processes outside the group are signalled right after the walk that found
//! them, with no reaping in between; the one remaining race (a process reaped by its own parent
//! between the walk and the kill, and its pid reused in those microseconds) is accepted, and does
//! not exist for the final SIGKILL when a cgroup is in use.
//!
//! # Why a fresh `exec` of the binary, not a bare fork
//!
//! The keeper used to be (as the guard) a fork of the wrapper that never execs. A fork of a
//! multi-threaded process may only make async-signal-safe calls, which rules out everything the
//! keeper now does: starting the command with `std::process::Command`, reading `/proc`, parsing
//! JSON. So the wrapper execs `/proc/self/exe __keeper`: the running binary's own file, even
//! after an upgrade renamed another over its path (the kernel keeps the old inode), and it costs a
//! fresh process image with a small heap instead of a copy-on-write snapshot of the wrapper's
//! (which the wrapper's writes would turn into private copies over time). Unit tests, whose
//! binary is the test harness, fork and call [`run`] instead (`supervisor`).
//!
//! # Job control
//!
//! When the wrapper owned the terminal's foreground, the command takes it before its `exec`
//! (`tcsetpgrp` with SIGTTOU ignored, as a shell's child does), so it can read the terminal.
//! When a terminal stop signal stops the command (Ctrl-Z), the keeper reports it; the wrapper
//! then takes the terminal back and stops itself, so the shell sees its job stopped, and on `fg`
//! gives the terminal back and continues the command (`supervisor`).

use std::ffi::{OsString, c_int};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroup;
use crate::clock::BootTime;
use crate::proctree;

/// The hidden first argument that makes `consul-leader` a keeper (see `main`).
pub const SUBCOMMAND: &str = "__keeper";

/// Size of every frame on the pipes.
pub const FRAME: usize = 24;

/// How often the keeper repeats its SIGKILL while anything of the tree is left.
const KILL_RETRY: Duration = Duration::from_millis(50);

/// Largest configuration the keeper accepts (argv and environment are bounded by the kernel's
/// `ARG_MAX`, 2 MiB by default, anyway).
const MAX_CONFIG: usize = 16 << 20;

/// What the keeper needs to start and stop the command, sent once, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub program: String,
    pub args: Vec<String>,
    pub env_set: Vec<(String, String)>,
    pub env_remove: Vec<String>,
    /// The signal the keeper's own stops begin with (a raw number).
    pub stop_signal: i32,
    /// The first fence, in nanoseconds of `CLOCK_BOOTTIME`.
    pub stop_at_ns: u64,
    pub gone_by_ns: u64,
    /// Create the command's cgroup in this directory.
    pub cgroup_parent: Option<PathBuf>,
    /// Give the command the terminal's foreground (stdin is a terminal and the wrapper owned it).
    pub foreground: bool,
}

/// Wrapper to keeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToKeeper {
    /// A renew moved the fence.
    Fence {
        stop_at: BootTime,
        gone_by: BootTime,
    },
    /// Send this signal to the command's process group.
    Signal(i32),
    /// Begin the stop sequence with `sig`; SIGKILL at `kill_at` (or `gone_by`, if earlier).
    Stop { sig: i32, kill_at: BootTime },
    /// SIGKILL now.
    Hurry,
}

/// Keeper to wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromKeeper {
    /// The command runs, with this pid (and group); `cgroup`: in its own cgroup.
    Spawned { pid: i32, cgroup: bool },
    /// The command could not be started: this errno; the keeper exits.
    SpawnFailed { errno: i32 },
    /// The command exited: a raw wait status, as `waitpid` reports it.
    Exited { raw: i32 },
    /// The command was stopped by this signal (job control).
    Suspended { sig: i32 },
    /// The fence passed without a newer one: the keeper began the stop sequence itself.
    Fenced,
    /// The tree is empty (`killed`: something needed SIGKILL); the keeper exits.
    Done { killed: bool },
}

fn frame(tag: u32, arg: i32, a: u64, b: u64) -> [u8; FRAME] {
    let mut out = [0u8; FRAME];
    out[0..4].copy_from_slice(&tag.to_le_bytes());
    out[4..8].copy_from_slice(&arg.to_le_bytes());
    out[8..16].copy_from_slice(&a.to_le_bytes());
    out[16..24].copy_from_slice(&b.to_le_bytes());
    out
}

fn unframe(buf: &[u8; FRAME]) -> (u32, i32, u64, u64) {
    let word = |r: std::ops::Range<usize>| -> [u8; 8] { buf[r].try_into().unwrap() };
    (
        u32::from_le_bytes(buf[0..4].try_into().unwrap()),
        i32::from_le_bytes(buf[4..8].try_into().unwrap()),
        u64::from_le_bytes(word(8..16)),
        u64::from_le_bytes(word(16..24)),
    )
}

fn ns(t: BootTime) -> u64 {
    t.since_boot().as_nanos().min(u64::MAX as u128) as u64
}

fn boot(ns: u64) -> BootTime {
    BootTime::from_since_boot(Duration::from_nanos(ns))
}

impl ToKeeper {
    pub fn encode(&self) -> [u8; FRAME] {
        match *self {
            ToKeeper::Fence { stop_at, gone_by } => frame(1, 0, ns(stop_at), ns(gone_by)),
            ToKeeper::Signal(sig) => frame(2, sig, 0, 0),
            ToKeeper::Stop { sig, kill_at } => frame(3, sig, ns(kill_at), 0),
            ToKeeper::Hurry => frame(4, 0, 0, 0),
        }
    }

    pub fn decode(buf: &[u8; FRAME]) -> Option<ToKeeper> {
        Some(match unframe(buf) {
            (1, _, a, b) => ToKeeper::Fence {
                stop_at: boot(a),
                gone_by: boot(b),
            },
            (2, sig, _, _) => ToKeeper::Signal(sig),
            (3, sig, a, _) => ToKeeper::Stop {
                sig,
                kill_at: boot(a),
            },
            (4, _, _, _) => ToKeeper::Hurry,
            _ => return None,
        })
    }
}

impl FromKeeper {
    pub fn encode(&self) -> [u8; FRAME] {
        match *self {
            FromKeeper::Spawned { pid, cgroup } => frame(101, pid, u64::from(cgroup), 0),
            FromKeeper::SpawnFailed { errno } => frame(102, errno, 0, 0),
            FromKeeper::Exited { raw } => frame(103, raw, 0, 0),
            FromKeeper::Suspended { sig } => frame(104, sig, 0, 0),
            FromKeeper::Fenced => frame(105, 0, 0, 0),
            FromKeeper::Done { killed } => frame(106, i32::from(killed), 0, 0),
        }
    }

    pub fn decode(buf: &[u8; FRAME]) -> Option<FromKeeper> {
        Some(match unframe(buf) {
            (101, pid, a, _) => FromKeeper::Spawned {
                pid,
                cgroup: a != 0,
            },
            (102, errno, _, _) => FromKeeper::SpawnFailed { errno },
            (103, raw, _, _) => FromKeeper::Exited { raw },
            (104, sig, _, _) => FromKeeper::Suspended { sig },
            (105, _, _, _) => FromKeeper::Fenced,
            (106, killed, _, _) => FromKeeper::Done {
                killed: killed != 0,
            },
            _ => return None,
        })
    }
}

/// The name of the command's cgroup, from the keeper's pid (unique while the keeper lives; the
/// wrapper derives the same name to clean up after a keeper that was killed).
pub fn cgroup_name(keeper: Pid) -> String {
    format!("consul-leader-{keeper}")
}

/// `main` calls this first: when the process was started as `consul-leader __keeper <in> <out>`,
/// it runs the keeper and returns its exit code; otherwise `None`, and the command line is parsed
/// as usual.
pub fn main_if_keeper() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).take(4).collect();
    if args.first().map(|a| a.as_os_str()) != Some(SUBCOMMAND.as_ref()) {
        return None;
    }
    let fd = |i: usize| -> Option<RawFd> { args.get(i)?.to_str()?.parse().ok().filter(|n| *n > 2) };
    let (Some(input), Some(output)) = (fd(1), fd(2)) else {
        eprintln!("consul-leader: {SUBCOMMAND} is internal to `consul-leader run`");
        return Some(ExitCode::from(crate::exit::USAGE));
    };
    // SAFETY: the wrapper passed these two descriptors to us open, one end of each pipe; nothing
    // else in this fresh process owns them.
    let (input, output) = unsafe { (OwnedFd::from_raw_fd(input), OwnedFd::from_raw_fd(output)) };
    Some(ExitCode::from(run(input, output)))
}

/// The keeper's whole life: reads the configuration from `input`, starts the command, serves
/// until the command's tree is empty. Returns the keeper's exit code.
pub fn run(input: OwnedFd, output: OwnedFd) -> u8 {
    let max_signal = libc::SIGRTMAX();
    // Dispositions first, then the mask: the wrapper blocked every signal before starting us, so
    // that a signal sent to its group in the meantime could not kill us; once ignored, such a
    // pending signal is discarded.
    for sig in 1..=max_signal {
        if sig != libc::SIGCHLD {
            set_disposition(sig, libc::SIG_IGN);
        }
    }
    set_disposition(libc::SIGCHLD, libc::SIG_DFL);
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    if signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&chld), None).is_err() {
        return 1;
    }
    // Our own group: job control aimed at the wrapper's group (Ctrl-Z, `kill -STOP %1`) must not
    // stop the process that enforces the fence.
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let _ = nix::sys::prctl::set_name(c"cl-keeper");
    if nix::sys::prctl::set_child_subreaper(true).is_err() {
        return 1;
    }
    for fd in [input.as_raw_fd(), output.as_raw_fd()] {
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // A stopped wrapper must never hold the keeper up on a full pipe (`send`).
    let _ = nix::fcntl::fcntl(
        &output,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut input = std::fs::File::from(input);
    let cfg = match read_config(&mut input) {
        Ok(cfg) => cfg,
        // The wrapper went away before it told us what to run: there is nothing to keep.
        Err(_) => return 1,
    };
    let (sigfd, timer) = match (
        SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC),
        TimerFd::new(
            ClockId::CLOCK_BOOTTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        ),
    ) {
        (Ok(s), Ok(t)) => (s, t),
        _ => {
            send(
                &output,
                FromKeeper::SpawnFailed {
                    errno: Errno::last_raw(),
                },
            );
            return 1;
        }
    };
    let me = nix::unistd::getpid();
    let mut cgroup = cfg
        .cgroup_parent
        .as_deref()
        .and_then(|parent| Cgroup::create(parent, &cgroup_name(me)).ok());
    let mut spawned = spawn_command(&cfg, me, max_signal, cgroup.as_ref());
    if spawned.is_err() && cgroup.is_some() {
        // Perhaps the placement failed (the spawn error does not say which step did): the command
        // matters more than its cgroup. A second failure is the command's own.
        if let Some(cg) = cgroup.take() {
            cg.remove();
        }
        spawned = spawn_command(&cfg, me, max_signal, None);
    }
    let cmd = match spawned {
        Ok(pid) => pid,
        Err(err) => {
            send(
                &output,
                FromKeeper::SpawnFailed {
                    errno: err.raw_os_error().unwrap_or(libc::EIO),
                },
            );
            return 1;
        }
    };
    send(
        &output,
        FromKeeper::Spawned {
            pid: cmd.as_raw(),
            cgroup: cgroup.is_some(),
        },
    );
    let keeper = Keeper {
        stop_signal: cfg.stop_signal,
        fence: (boot(cfg.stop_at_ns), boot(cfg.gone_by_ns)),
        output,
        me,
        cmd,
        exited: false,
        cgroup,
        phase: Phase::Running,
        killed: false,
    };
    keeper.serve(input, sigfd, timer)
}

fn read_config(input: &mut std::fs::File) -> io::Result<Config> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONFIG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "config too large",
        ));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(io::Error::other)
}

/// Writes the length-prefixed configuration (the wrapper's side of [`read_config`]).
pub fn write_config(output: &OwnedFd, cfg: &Config) -> io::Result<()> {
    let body = serde_json::to_vec(cfg).map_err(io::Error::other)?;
    let mut msg = (body.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&body);
    std::fs::File::from(output.try_clone()?).write_all(&msg)
}

/// Sends one frame, without blocking and without caring whether anyone listens: a wrapper that
/// is gone or stopped must never hold the keeper up.
fn send(output: &OwnedFd, msg: FromKeeper) {
    let _ = nix::unistd::write(output, &msg.encode());
}

/// Starts the command as our child, in its own process group (and cgroup), with the terminal's
/// foreground if asked.
fn spawn_command(
    cfg: &Config,
    me: Pid,
    max_signal: c_int,
    cgroup: Option<&Cgroup>,
) -> io::Result<Pid> {
    if let Some(cg) = cgroup.filter(|_| !force_migration()) {
        match spawn_into_cgroup(cfg, me, max_signal, cg.dir_fd()) {
            Ok(pid) => return Ok(pid),
            Err(Some(err)) => return Err(err),
            Err(None) => {} // clone3 refused here: move the command in instead
        }
    }
    let mut command = Command::new(&cfg.program);
    command.args(&cfg.args);
    for name in &cfg.env_remove {
        command.env_remove(name);
    }
    for (name, value) in &cfg.env_set {
        command.env(name, value);
    }
    command.process_group(0);
    let procs = cgroup.map(Cgroup::procs_fd);
    let foreground = cfg.foreground;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (write, tcsetpgrp, rt_sigaction, sigprocmask, prctl, getpid, getppid); it neither
    // allocates nor takes locks. (The keeper is single-threaded anyway.)
    unsafe {
        command.pre_exec(move || before_exec(me, max_signal, procs, foreground));
    }
    let child = command.spawn()?;
    // `std::process::Child` does not wait on drop; the keeper reaps with waitid/waitpid.
    Ok(Pid::from_raw(child.id() as i32))
}

/// The kernel's `struct clone_args` (the layout of version 2, which added `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Linux 5.7; every kernel with `cgroup.kill` (5.14) has it.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts the command created straight into the cgroup (`clone3` with `CLONE_INTO_CGROUP`, what
/// systemd does), which spares the migration's wait for an RCU grace period (see
/// `Cgroup::procs_fd`). `std::process::Command` cannot do that, so this is the small part of it
/// that we need: the same environment, the same `PATH` search as `execvp` (`ENOEXEC` runs the file
/// with `/bin/sh`), the same errors. `Err(None)`: `clone3` is refused here (an old kernel, a
/// seccomp profile that answers `ENOSYS`, a cgroup that takes no processes), so the caller falls
/// back to `Command` and a migration.
pub(crate) fn spawn_into_cgroup(
    cfg: &Config,
    me: Pid,
    max_signal: c_int,
    cgroup: RawFd,
) -> Result<Pid, Option<io::Error>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStringExt;

    let invalid = || {
        Some(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte in the command",
        ))
    };
    // Everything the child needs is built here: between clone3 and exec it may not allocate.
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(name, _)| !cfg.env_remove.iter().any(|r| name == r.as_str()))
        .filter(|(name, _)| !cfg.env_set.iter().any(|(k, _)| name == k.as_str()))
        .collect();
    env.extend(cfg.env_set.iter().map(|(k, v)| (k.into(), v.into())));
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone());
    let envp: Vec<CString> = env
        .into_iter()
        .map(|(mut k, v)| {
            k.push("=");
            k.push(v);
            CString::new(k.into_vec())
        })
        .collect::<Result<_, _>>()
        .map_err(|_| invalid())?;
    let argv: Vec<CString> = std::iter::once(&cfg.program)
        .chain(&cfg.args)
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid())?;
    let candidates = exec_candidates(&cfg.program, path.as_deref())
        .into_iter()
        .map(|c| CString::new(c.into_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid())?;
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
    // For ENOEXEC: `/bin/sh <file> args...`; the file goes into slot 1 in the child.
    let sh = c"/bin/sh";
    let mut sh_argv_p: Vec<*const libc::c_char> = vec![sh.as_ptr(), std::ptr::null()];
    sh_argv_p.extend(&argv_p[1..]);
    let (report_r, report_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Some(e.into()))?;

    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    // SAFETY: without CLONE_VM, clone3 is a fork: the child gets a copy of this (single-threaded)
    // process and returns 0 here, on its own copy of the stack. The child runs `exec_child`,
    // which makes only async-signal-safe system calls on memory prepared above and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        let child = ExecChild {
            parent: me,
            max_signal,
            foreground: cfg.foreground,
            report: report_w.as_raw_fd(),
            candidates: &candidates,
            argv: &argv_p,
            envp: &envp_p,
        };
        // SAFETY: as above; `sh_argv_p` is this copy's own.
        unsafe { child.run(&mut sh_argv_p) }
    }
    if pid < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(
                libc::ENOSYS
                | libc::EINVAL
                | libc::E2BIG
                | libc::EPERM
                | libc::EACCES
                | libc::EBUSY
                | libc::EOPNOTSUPP,
            ) => Err(None),
            _ => Err(Some(err)),
        };
    }
    drop(report_w);
    let pid = Pid::from_raw(pid as i32);
    // Nothing to read means the exec closed the pipe: the command runs.
    let mut errno = [0u8; 4];
    let mut got = 0;
    let mut report = std::fs::File::from(report_r);
    while got < errno.len() {
        match report.read(&mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
    Err(Some(io::Error::from_raw_os_error(i32::from_ne_bytes(
        errno,
    ))))
}

/// The paths `execvp` would try for `program`, in order: the program itself when it names a
/// path, else each directory of `PATH` (an empty entry is the current directory; no `PATH` is
/// glibc's default, `/bin:/usr/bin`).
fn exec_candidates(program: &str, path: Option<&std::ffi::OsStr>) -> Vec<OsString> {
    use std::os::unix::ffi::OsStrExt;
    if program.is_empty() || program.contains('/') {
        return vec![program.into()];
    }
    let path = path.map_or(&b"/bin:/usr/bin"[..], |p| p.as_bytes());
    path.split(|b| *b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { &b"."[..] } else { dir };
            let mut full = dir.to_vec();
            full.push(b'/');
            full.extend_from_slice(program.as_bytes());
            std::os::unix::ffi::OsStringExt::from_vec(full)
        })
        .collect()
}

/// The command's side of [`spawn_into_cgroup`], between `clone3` and `exec`.
struct ExecChild<'a> {
    parent: Pid,
    max_signal: c_int,
    foreground: bool,
    /// Close-on-exec: an exec closes it unwritten; a failure writes its errno.
    report: RawFd,
    candidates: &'a [std::ffi::CString],
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
}

impl ExecChild<'_> {
    /// # Safety
    ///
    /// Only in the child of `clone3`: it makes only async-signal-safe system calls on memory that
    /// was prepared before the clone, and ends in `exec` or `_exit`.
    unsafe fn run(&self, sh_argv: &mut [*const libc::c_char]) -> ! {
        // SAFETY: setpgid on ourselves, no memory involved.
        if unsafe { libc::setpgid(0, 0) } != 0 {
            self.fail(Errno::last_raw());
        }
        if let Err(err) = before_exec(self.parent, self.max_signal, None, self.foreground) {
            self.fail(err.raw_os_error().unwrap_or(libc::EIO));
        }
        let mut failure = libc::ENOENT;
        let mut denied = false;
        for candidate in self.candidates {
            // SAFETY: NUL-terminated strings and null-terminated pointer arrays built before the
            // clone, alive in this copy of the memory.
            unsafe { libc::execve(candidate.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
            failure = Errno::last_raw();
            match failure {
                libc::ENOEXEC => {
                    // What execvp does with a file that has no `#!`: run it with the shell.
                    sh_argv[1] = candidate.as_ptr();
                    // SAFETY: as above.
                    unsafe { libc::execve(sh_argv[0], sh_argv.as_ptr(), self.envp.as_ptr()) };
                    failure = Errno::last_raw();
                    break;
                }
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => break,
            }
        }
        if denied && matches!(failure, libc::ENOENT | libc::ENOTDIR) {
            failure = libc::EACCES;
        }
        self.fail(failure)
    }

    fn fail(&self, errno: c_int) -> ! {
        let bytes = errno.to_ne_bytes();
        // SAFETY: write from a local buffer, then _exit without running any exit handlers.
        unsafe {
            libc::write(self.report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    }
}

/// Runs in the command's process between fork and exec (std has already made it the leader of
/// its own process group).
fn before_exec(
    parent: Pid,
    max_signal: c_int,
    cgroup_procs: Option<RawFd>,
    foreground: bool,
) -> io::Result<()> {
    // SAFETY: write, tcsetpgrp, getpid, sigemptyset, sigprocmask and prctl are async-signal-safe
    // system calls on memory and descriptors this process owns (set_disposition: see there).
    unsafe {
        if let Some(fd) = cgroup_procs {
            // "0" moves the writer itself, before it can start anything.
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        if foreground {
            // Allowed from a background group because SIGTTOU is still ignored here (inherited
            // from the keeper); a failure leaves the command in the background, as before.
            libc::tcsetpgrp(0, libc::getpid());
        }
        for sig in 1..=max_signal {
            set_disposition(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        // The keeper outlives the command by design; if it is killed anyway, the command goes
        // with it (what is left re-parents to the wrapper, which cleans up; see `supervisor`).
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // The keeper may have died between fork and prctl, before PDEATHSIG was armed: then we have
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
/// like any other (test environments have been seen with 32 ignored); to a program not linked
/// with glibc they are ordinary real-time signals. SIGKILL and SIGSTOP cannot be changed and are
/// skipped.
pub fn set_disposition(sig: c_int, handler: libc::sighandler_t) {
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

/// Where the keeper is in the stop sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No stop yet: the fence timer runs.
    Running,
    /// The stop signal was sent; SIGKILL at `kill_at` unless the tree is empty first.
    Stopping { kill_at: BootTime },
    /// SIGKILL sent; repeated until the tree is empty.
    Killing,
}

struct Keeper {
    stop_signal: i32,
    /// (stop_at, gone_by) of the current fence.
    fence: (BootTime, BootTime),
    output: OwnedFd,
    me: Pid,
    /// The command: its pid and its process group's id.
    cmd: Pid,
    /// The command has exited; its zombie is kept until the end (module docs).
    exited: bool,
    cgroup: Option<Cgroup>,
    phase: Phase,
    killed: bool,
}

impl Keeper {
    fn serve(mut self, input: std::fs::File, sigfd: SignalFd, timer: TimerFd) -> u8 {
        let mut input = Some(input);
        let mut pending: Vec<u8> = Vec::new();
        loop {
            self.observe_children();
            if self.exited && self.tree_empty() {
                return self.finish();
            }
            let now = BootTime::now();
            if self.phase == Phase::Running && now >= self.fence.0 {
                send(&self.output, FromKeeper::Fenced);
                self.begin_stop(self.stop_signal, self.fence.1);
            }
            if let Phase::Stopping { kill_at } = self.phase {
                if now >= kill_at {
                    self.killed = true;
                    self.phase = Phase::Killing;
                }
            }
            if self.phase == Phase::Killing {
                self.kill_all();
            }
            let wake = match self.phase {
                Phase::Running => self.fence.0,
                Phase::Stopping { kill_at } => kill_at,
                Phase::Killing => now + KILL_RETRY,
            };
            // An absolute expiry of zero would disarm the timer: never ask for less than 1ns.
            let when = wake.since_boot().max(Duration::from_nanos(1));
            let _ = timer.set(
                Expiration::OneShot(TimeSpec::from_duration(when)),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME,
            );

            let mut fds = vec![
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(timer.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(input) = &input {
                fds.push(PollFd::new(input.as_fd(), PollFlags::POLLIN));
            }
            let events_at = fds.len();
            if let Some(cg) = &self.cgroup {
                fds.push(PollFd::new(cg.events_fd(), PollFlags::POLLPRI));
            }
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => {
                    // Cannot wait: fall back to a short sleep rather than spin or give up.
                    std::thread::sleep(KILL_RETRY);
                }
            }
            let input_ready = input.is_some()
                && fds
                    .get(2)
                    .and_then(PollFd::revents)
                    .is_some_and(|r| !r.is_empty());
            let events_ready = self.cgroup.is_some()
                && fds
                    .get(events_at)
                    .and_then(PollFd::revents)
                    .is_some_and(|r| !r.is_empty());
            drop(fds);

            while let Ok(Some(_)) = sigfd.read_signal() {}
            let _ = timer.wait(); // non-blocking: clears an expiry, or EAGAIN
            if events_ready {
                // Reading re-arms POLLPRI; the value itself is read where it matters.
                let _ = self.cgroup.as_ref().map(Cgroup::populated);
            }
            if input_ready {
                let mut buf = [0u8; 4096];
                let got = input.as_mut().map(|f| f.read(&mut buf));
                match got {
                    Some(Ok(0)) | Some(Err(_)) => {
                        input = None;
                        self.wrapper_gone();
                    }
                    Some(Ok(n)) => {
                        pending.extend_from_slice(&buf[..n]);
                        while pending.len() >= FRAME {
                            let frame: [u8; FRAME] = pending[..FRAME].try_into().unwrap();
                            pending.drain(..FRAME);
                            if let Some(msg) = ToKeeper::decode(&frame) {
                                self.handle(msg);
                            }
                        }
                    }
                    None => {}
                }
            }
        }
    }

    fn handle(&mut self, msg: ToKeeper) {
        match msg {
            ToKeeper::Fence { stop_at, gone_by } => {
                if self.phase == Phase::Running {
                    self.fence = (stop_at, gone_by);
                }
            }
            ToKeeper::Signal(sig) => {
                // The group is pinned by the command, unreaped until we exit (module docs).
                // SAFETY: kill with a negative pid signals a process group; no memory involved.
                unsafe { libc::kill(-self.cmd.as_raw(), sig) };
            }
            ToKeeper::Stop { sig, kill_at } => self.begin_stop(sig, kill_at),
            ToKeeper::Hurry => {
                if self.phase != Phase::Killing {
                    self.killed = !(self.exited && self.tree_empty());
                    self.phase = Phase::Killing;
                }
            }
        }
    }

    /// The wrapper closed the pipe: it is gone. Stop with the grace the fence allows.
    fn wrapper_gone(&mut self) {
        if self.phase == Phase::Running {
            let grace = self.fence.1.saturating_duration_since(self.fence.0);
            self.begin_stop(self.stop_signal, BootTime::now() + grace);
        }
    }

    /// Starts the stop sequence, once: a later request can only bring the SIGKILL forward.
    fn begin_stop(&mut self, sig: i32, kill_at: BootTime) {
        let kill_at = kill_at.min(self.fence.1);
        match self.phase {
            Phase::Running => {
                self.phase = Phase::Stopping { kill_at };
                self.signal_tree(sig);
            }
            Phase::Stopping { kill_at: before } => {
                self.phase = Phase::Stopping {
                    kill_at: before.min(kill_at),
                };
            }
            Phase::Killing => {}
        }
    }

    /// `sig` and SIGCONT (a stopped process cannot act on it) to the command's group, and to every
    /// process of the tree outside it, each once.
    fn signal_tree(&self, sig: i32) {
        let group = self.cmd.as_raw();
        for s in [sig, libc::SIGCONT] {
            // SAFETY: signals the pinned group (module docs); no memory involved.
            unsafe { libc::kill(-group, s) };
        }
        for pid in proctree::descendants(self.me) {
            if pid == self.cmd {
                continue;
            }
            match proctree::stat(pid) {
                Some(stat) if stat.pgrp.as_raw() != group && !stat.is_zombie() => {
                    for s in [sig, libc::SIGCONT] {
                        // SAFETY: a pid found by the walk just now (module docs); no memory.
                        unsafe { libc::kill(pid.as_raw(), s) };
                    }
                }
                _ => {}
            }
        }
    }

    /// SIGKILL to everything: the cgroup at once, the group, and every process of the tree.
    fn kill_all(&self) {
        if let Some(cg) = &self.cgroup {
            let _ = cg.kill();
        }
        // SAFETY: signals the pinned group, then pids the walk found just now (module docs).
        unsafe { libc::kill(-self.cmd.as_raw(), libc::SIGKILL) };
        for pid in proctree::descendants(self.me) {
            if pid != self.cmd {
                // SAFETY: as above.
                unsafe { libc::kill(pid.as_raw(), libc::SIGKILL) };
            }
        }
    }

    /// Notes the command's stops and exit, and reaps every other child that has exited.
    fn observe_children(&mut self) {
        if !self.exited {
            if let Some((libc::CLD_STOPPED, sig)) = waitid(self.cmd, libc::WSTOPPED | libc::WNOHANG)
            {
                send(&self.output, FromKeeper::Suspended { sig });
            }
            // WNOWAIT: the zombie stays, and with it the pid and the group (module docs).
            if let Some((code, status)) =
                waitid(self.cmd, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
            {
                self.exited = true;
                send(
                    &self.output,
                    FromKeeper::Exited {
                        raw: raw_status(code, status),
                    },
                );
            }
        }
        for pid in proctree::children(self.me) {
            if pid != self.cmd {
                // Adopted orphans: reaped as they die. Only exited ones are reaped.
                let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            }
        }
    }

    /// Whether nothing of the tree is alive, the command aside: no other child of ours is (every
    /// live descendant hangs below one), and the cgroup is empty.
    fn tree_empty(&self) -> bool {
        let others_alive = proctree::children(self.me).into_iter().any(|pid| {
            pid != self.cmd && proctree::stat(pid).is_some_and(|stat| !stat.is_zombie())
        });
        !others_alive && !self.cgroup.as_ref().is_some_and(Cgroup::populated)
    }

    /// The tree is empty: reap the command, remove its cgroup, tell the wrapper, exit.
    fn finish(mut self) -> u8 {
        let _ = nix::sys::wait::waitpid(self.cmd, None);
        if let Some(cg) = self.cgroup.take() {
            cg.remove();
        }
        send(
            &self.output,
            FromKeeper::Done {
                killed: self.killed,
            },
        );
        0
    }
}

/// `waitid(P_PID, pid, flags)`: `Some((si_code, si_status))` when there was something to report.
fn waitid(pid: Pid, flags: c_int) -> Option<(c_int, c_int)> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`, which outlives the call.
    let r = unsafe { libc::waitid(libc::P_PID, pid.as_raw() as libc::id_t, &mut info, flags) };
    if r != 0 {
        return None;
    }
    // SAFETY: waitid filled a SIGCHLD siginfo (or left it zeroed: si_pid 0), whose union holds
    // si_pid and si_status.
    let (from, status) = unsafe { (info.si_pid(), info.si_status()) };
    (from != 0).then_some((info.si_code, status))
}

/// The `waitpid`-style status for a `waitid` report, so that the wrapper decodes one format.
fn raw_status(code: c_int, status: c_int) -> i32 {
    match code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    }
}

/// Whether to move the command into its cgroup although `clone3` would work: only a unit test
/// asks, to test the fallback.
fn force_migration() -> bool {
    #[cfg(test)]
    return tests::FORCE_MIGRATION.load(std::sync::atomic::Ordering::SeqCst);
    #[cfg(not(test))]
    false
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Set by a unit test to take the fallback (migration) path; the keeper, forked in the unit
    /// tests, sees the value the test set.
    pub static FORCE_MIGRATION: AtomicBool = AtomicBool::new(false);

    #[test]
    fn frames_round_trip() {
        let t = |s: u64| boot(s * 1_000_000_000 + 7);
        for msg in [
            ToKeeper::Fence {
                stop_at: t(10),
                gone_by: t(15),
            },
            ToKeeper::Signal(libc::SIGUSR1),
            ToKeeper::Stop {
                sig: libc::SIGTERM,
                kill_at: t(3),
            },
            ToKeeper::Hurry,
        ] {
            assert_eq!(ToKeeper::decode(&msg.encode()), Some(msg));
        }
        for msg in [
            FromKeeper::Spawned {
                pid: 4242,
                cgroup: true,
            },
            FromKeeper::SpawnFailed {
                errno: libc::ENOENT,
            },
            FromKeeper::Exited { raw: 3 << 8 },
            FromKeeper::Suspended { sig: libc::SIGTSTP },
            FromKeeper::Fenced,
            FromKeeper::Done { killed: true },
        ] {
            assert_eq!(FromKeeper::decode(&msg.encode()), Some(msg));
        }
        assert_eq!(ToKeeper::decode(&[0u8; FRAME]), None);
        assert_eq!(FromKeeper::decode(&[9u8; FRAME]), None);
    }

    #[test]
    fn exec_candidates_follow_execvp() {
        let path = Some(std::ffi::OsStr::new("/usr/local/bin::/bin"));
        let got = |p: &str, path| -> Vec<String> {
            exec_candidates(p, path)
                .into_iter()
                .map(|c| c.into_string().unwrap())
                .collect()
        };
        assert_eq!(got("ls", path), ["/usr/local/bin/ls", "./ls", "/bin/ls"]);
        assert_eq!(got("./run.sh", path), ["./run.sh"]);
        assert_eq!(got("/bin/true", None), ["/bin/true"]);
        assert_eq!(got("ls", None), ["/bin/ls", "/usr/bin/ls"]);
    }

    #[test]
    fn waitid_codes_become_wait_statuses() {
        use std::os::unix::process::ExitStatusExt;
        let status = |raw| std::process::ExitStatus::from_raw(raw);
        assert_eq!(status(raw_status(libc::CLD_EXITED, 3)).code(), Some(3));
        assert_eq!(status(raw_status(libc::CLD_KILLED, 9)).signal(), Some(9));
        let dumped = status(raw_status(libc::CLD_DUMPED, 6));
        assert_eq!((dumped.signal(), dumped.core_dumped()), (Some(6), true));
        // Real-time signals have no name, but a number.
        assert_eq!(status(raw_status(libc::CLD_KILLED, 40)).signal(), Some(40));
    }
}
