//! `consul-leader run`: the one place where leadership (a lock protocol, `lock`) and the child
//! (`supervisor`) meet.
//!
//! A *term* is one session's life: open it, contend for the key, wait out what is owed to
//! earlier holders (the silence), run the child while leadership holds, stop the child group,
//! release, close. "Became leader" starts the child, "lost" stops it, "child exited" releases.
//! The rules that decide (the wait owed, the fence, the clean mark, backoff) live in `election`;
//! the requests in `lock`; this module keeps every await interruptible by the wrapper's signals
//! and hands every new fence to the supervisor, whose keeper enforces it.

use std::cell::Cell;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep};
use tracing::{debug, error, info, warn};

use crate::cli::{OnLost, RunArgs};
use crate::clock::{self, BootTime};
use crate::config::RunConfig;
use crate::consul::Client;
use crate::election::{self, Fence};
use crate::exit;
use crate::lock::consul::ConsulMutex;
use crate::lock::semaphore::ConsulSemaphore;
use crate::lock::{AbortOnDrop, ContendEnd, Protocol, Renewal, SessionEnd, Term, Verdict, Won};
use crate::notify;
use crate::supervisor::{self, ChildExit, ChildSpec, Supervisor};

/// How the wrapper ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Code(u8),
    /// Stopped by this signal: after cleaning up, the wrapper dies by it too.
    Signal(Signal),
}

/// Signals that stop the wrapper (design §4); others are forwarded to the child's group.
const STOP_SIGNALS: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];
const FORWARD_SIGNALS: [Signal; 3] = [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGWINCH];

pub fn main(args: Box<RunArgs>) -> ExitCode {
    let cfg = match RunConfig::from_args(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("consul-leader: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    crate::logging::init(cfg.quiet, cfg.verbose, cfg.log_format);
    // A command that cannot start is told now, before a session exists: with `--wait 0` from
    // cron, finding it only after winning the lock would run the job on no host that slot.
    if let Err(e) = supervisor::check_command(&cfg.command, cfg.shell) {
        error!("{e}");
        return ExitCode::from(e.exit_code());
    }
    // A current-thread runtime on the main thread: the child is spawned from this thread, and its
    // PR_SET_PDEATHSIG fires when the spawning *thread* exits, so it must be one that lives as long
    // as the process.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let outcome = runtime.block_on(run(cfg));
    drop(runtime);
    match outcome {
        Outcome::Code(code) => ExitCode::from(code),
        Outcome::Signal(sig) => die_by(sig),
    }
}

/// Ends the process by `sig`, so that a caller sees the same signal death it sent.
fn die_by(sig: Signal) -> ExitCode {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, raise, signal};
    // SAFETY: restoring the default disposition is always sound; no handler code runs.
    let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(sig);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
    let _ = raise(sig);
    // Only reached if the default action does not end the process.
    ExitCode::from(128 + sig as u8)
}

/// The wrapper's signals: an async stream for the driver, plus a flag set inside the signal
/// handler itself, so that a stop signal that arrived a moment before a spawn is seen even if the
/// stream has not been polled yet.
struct Signals {
    rx: mpsc::UnboundedReceiver<Signal>,
    stop_flag: Arc<AtomicUsize>,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let stop_flag = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        for sig in STOP_SIGNALS.iter().chain(FORWARD_SIGNALS.iter()).copied() {
            if STOP_SIGNALS.contains(&sig) {
                signal_hook::flag::register_usize(sig as i32, stop_flag.clone(), sig as usize)?;
            }
            let mut stream = signal(SignalKind::from_raw(sig as i32))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self { rx, stop_flag })
    }

    async fn recv(&mut self) -> Signal {
        match self.rx.recv().await {
            Some(sig) => sig,
            // The forwarding tasks live as long as the runtime; never reached in practice.
            None => std::future::pending().await,
        }
    }

    /// The next stop signal; forwardable ones are dropped (there is no child to forward them to).
    async fn next_stop(&mut self) -> Signal {
        loop {
            let sig = self.recv().await;
            if STOP_SIGNALS.contains(&sig) {
                return sig;
            }
            debug!("ignoring {sig}: no command is running");
        }
    }

    /// A stop signal that has arrived but not been handled yet, if any.
    fn pending_stop(&self) -> Option<Signal> {
        match self.stop_flag.load(Ordering::SeqCst) {
            0 => None,
            n => Signal::try_from(n as i32).ok(),
        }
    }
}

/// How one term ended.
enum TermEnd {
    /// Exit the wrapper with this outcome after closing the term.
    Done(Outcome),
    /// Leadership was lost (the child, if any, is already stopped).
    Lost(String),
    /// The session ended before we won the lock: open a new term.
    SessionGone,
}

/// The driver: one lock protocol, the wrapper's signals, the supervisor.
struct Leader<P: Protocol> {
    cfg: RunConfig,
    lock: P,
    signals: Signals,
    supervisor: Supervisor,
}

async fn run(cfg: RunConfig) -> Outcome {
    // Signals first: from here on, TERM/INT/HUP/QUIT are honoured at every moment.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return Outcome::Code(exit::INTERNAL);
        }
    };
    let client = match Client::new(cfg.consul.clone()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            error!("cannot set up the HTTP client: {e:#}");
            return Outcome::Code(exit::INTERNAL);
        }
    };
    let supervisor = match Supervisor::new() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot set up child supervision: {e:#}");
            return Outcome::Code(exit::INTERNAL);
        }
    };
    // `--limit 1` is the mutex on the key; more is a semaphore under it as a prefix.
    if cfg.limit > 1 {
        Leader {
            lock: ConsulSemaphore::new(client, cfg.clone()),
            cfg,
            signals,
            supervisor,
        }
        .run()
        .await
    } else {
        Leader {
            lock: ConsulMutex::new(client, cfg.clone()),
            cfg,
            signals,
            supervisor,
        }
        .run()
        .await
    }
}

impl<P: Protocol> Leader<P> {
    async fn run(&mut self) -> Outcome {
        let mut first_term = true;
        loop {
            if let Some(sig) = self.signals.pending_stop() {
                return Outcome::Signal(sig);
            }
            let deadline = self.cfg.wait.map(|w| Instant::now() + w);
            let mut term = match self.open_term(first_term, deadline).await {
                Ok(t) => t,
                Err(outcome) => return outcome,
            };
            first_term = false;
            let _watchdog = notify::watchdog_interval().map(|every| {
                AbortOnDrop::spawn(ping_watchdog(
                    every,
                    term.renewals(),
                    self.cfg.ttl,
                    self.cfg.grace,
                ))
            });
            notify::ready(&format!("contending for {}", self.cfg.key));
            let end = self.term(&mut term, deadline).await;
            match end {
                TermEnd::Done(outcome) => {
                    notify::stopping("stopping");
                    self.lock.close(term, 3).await;
                    return outcome;
                }
                TermEnd::SessionGone => {
                    warn!(
                        "session {} is gone (expired or destroyed); creating a new one",
                        term.id()
                    );
                }
                TermEnd::Lost(reason) => {
                    // The loss itself was logged where it was seen. One try: after a fence the
                    // agent is likely unreachable, and Consul expires the session anyway.
                    self.lock.close(term, 1).await;
                    match self.cfg.on_lost {
                        OnLost::Exit => {
                            notify::stopping(&format!("lost leadership: {reason}"));
                            return Outcome::Code(self.cfg.lost_exit_code);
                        }
                        OnLost::Recontend => info!("contending for {} again", self.cfg.key),
                    }
                }
            }
        }
    }

    /// Opens a term (creates a session). Transient errors (5xx, 429, time-outs) are retried with
    /// backoff until the `--wait` deadline; an agent that cannot be reached at all on the very
    /// first attempt is reported at once, since a wrong address or certificate is the usual
    /// cause. A stop signal ends the wait; an attempt already sent is finished first, so that a
    /// session it created is destroyed rather than left to expire.
    async fn open_term(
        &mut self,
        first: bool,
        deadline: Option<Instant>,
    ) -> Result<P::Term, Outcome> {
        let mut attempt = 0u32;
        loop {
            let opening = self.lock.open();
            tokio::pin!(opening);
            let result = tokio::select! {
                r = &mut opening => r,
                sig = self.signals.next_stop() => {
                    if let Ok(term) = opening.await {
                        self.lock.close(term, 1).await;
                    }
                    return Err(Outcome::Signal(sig));
                }
            };
            let e = match result {
                Ok(term) => return Ok(term),
                Err(e) => e,
            };
            let expired = deadline.is_some_and(|d| Instant::now() >= d);
            if !e.transient || expired || (first && attempt == 0 && e.unreachable) {
                error!("{}", e.message);
                return Err(Outcome::Code(exit::INTERNAL));
            }
            if attempt == 0 {
                warn!("{}; retrying", e.message);
            } else {
                debug!("{}; retrying", e.message);
            }
            let mut pause =
                election::backoff(attempt, Duration::from_millis(500), Duration::from_secs(5));
            if let Some(d) = deadline {
                pause = pause.min(d.saturating_duration_since(Instant::now()));
            }
            attempt += 1;
            tokio::select! {
                _ = sleep(pause) => {}
                sig = self.signals.next_stop() => return Err(Outcome::Signal(sig)),
            }
        }
    }

    /// One term with a live session: contend, then lead.
    async fn term(&mut self, term: &mut P::Term, deadline: Option<Instant>) -> TermEnd {
        let mut renewals = term.renewals();
        let contended = tokio::select! {
            r = self.lock.contend(term, deadline) => r,
            end = session_ended(&mut renewals) => Err(match end {
                SessionEnd::Gone => ContendEnd::SessionGone,
                SessionEnd::Fatal(msg) => ContendEnd::Fatal(format!("cannot renew the session: {msg}")),
            }),
            sig = self.signals.next_stop() => {
                // An acquire may have been in flight: let go of the key (no child ran).
                self.lock.abandon(term).await;
                return TermEnd::Done(Outcome::Signal(sig));
            }
        };
        match contended {
            Ok(won) => self.lead(term, won).await,
            Err(ContendEnd::Busy) => {
                info!(
                    "not leader of {} within --wait; exiting with {}",
                    self.cfg.key, self.cfg.busy_exit_code
                );
                TermEnd::Done(Outcome::Code(self.cfg.busy_exit_code))
            }
            Err(ContendEnd::SessionGone) => TermEnd::SessionGone,
            Err(ContendEnd::Fatal(msg)) => {
                error!("{msg}");
                self.lock.abandon(term).await;
                TermEnd::Done(Outcome::Code(exit::INTERNAL))
            }
        }
    }

    /// Holds the lock: the wait owed to earlier holders, the child, and the stop sequence.
    async fn lead(&mut self, term: &mut P::Term, won: P::Won) -> TermEnd {
        let cfg = self.cfg.clone();
        info!(
            "acquired the lock on {} (fencing token {})",
            cfg.key,
            won.fencing_token()
        );
        let (_watcher, mut verdicts) = self.lock.watch(term, &won);
        let mut renewals = term.renewals();

        if let Some(until) = won.owed_until() {
            info!(
                "silence: the previous holder's command may still run; starting the command in {}",
                humantime::format_duration(round_ms(until.remaining()))
            );
            notify::status("leader, waiting out the silence before starting the command");
            loop {
                tokio::select! {
                    () = clock::sleep_until(until) => break,
                    ended = ended(&mut verdicts, &mut renewals, &cfg) => {
                        // A moved fence (Err) needs no action: no child runs yet.
                        if let Ok(verdict) = ended {
                            return self.end_without_child(term, &won, verdict).await;
                        }
                    }
                    sig = self.signals.next_stop() => {
                        // The wait has not passed: no clean mark (election's module docs, 5).
                        let clean = election::may_mark_clean(Some(until), BootTime::now());
                        self.lock.release(term, &won, clean).await;
                        return TermEnd::Done(Outcome::Signal(sig));
                    }
                }
            }
        }

        // The last moment to honour a stop signal without starting anything. The wait passed,
        // so the release is clean.
        tokio::task::yield_now().await;
        if let Some(sig) = self.signals.pending_stop() {
            self.lock.release(term, &won, true).await;
            return TermEnd::Done(Outcome::Signal(sig));
        }
        // Nor may a child start when the session cannot be trusted any more.
        let r = renewals.borrow().clone();
        let fence = Fence::after_renew(r.last_ok_sent, cfg.ttl, cfg.grace);
        if let Some(end) = r.end {
            return self.end_without_child(term, &won, verdict_of(end)).await;
        }
        if fence.stop_at.has_passed() {
            let reason = "the session could not be renewed before the command was to start";
            error!("lost leadership on {}: {reason}", cfg.key);
            return TermEnd::Lost(reason.into());
        }
        let spec = self.child_spec(&term.id(), won.fencing_token());
        let pid = match self.supervisor.spawn(&spec, fence) {
            Ok(pid) => pid,
            Err(e) => {
                error!("{e}");
                self.lock.release(term, &won, true).await;
                return TermEnd::Done(Outcome::Code(e.exit_code()));
            }
        };
        info!("started the command, pid {pid}");
        notify::status(&format!(
            "leader since {}, child pid {}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            pid
        ));

        enum Why {
            Exited(ChildExit),
            Ended(Verdict),
            Signal(Signal),
        }
        let why = loop {
            tokio::select! {
                status = self.supervisor.wait() => break Why::Exited(status),
                ended = ended(&mut verdicts, &mut renewals, &cfg) => match ended {
                    Ok(verdict) => break Why::Ended(verdict),
                    // Each renew moves the fence: the supervisor's keeper enforces it too.
                    Err(fence) => self.supervisor.set_fence(fence),
                },
                sig = self.signals.recv() => {
                    if STOP_SIGNALS.contains(&sig) {
                        break Why::Signal(sig);
                    }
                    debug!("forwarding {sig} to the command");
                    self.supervisor.signal_group(sig);
                }
            }
        };

        let stop_signal = match &why {
            Why::Exited(status) => {
                info!("the command {status}");
                cfg.stop_signal
            }
            Why::Ended(Verdict::Lost(reason)) => {
                error!(
                    "lost leadership on {}: {reason}; stopping the command",
                    cfg.key
                );
                cfg.stop_signal
            }
            Why::Ended(Verdict::Fatal(msg)) => {
                error!("{msg}; stopping the command");
                cfg.stop_signal
            }
            Why::Signal(sig) => {
                info!("received {sig}; stopping the command");
                *sig
            }
        };
        notify::status("stopping the command");
        let last_ok = renewals.borrow().last_ok_sent;
        let grace =
            Fence::after_renew(last_ok, cfg.ttl, cfg.grace).grace_left(cfg.grace, BootTime::now());
        // While the group stops: a stop signal makes the wrapper exit afterwards (even after a
        // loss with --on-lost recontend), and a second TERM or INT, counting the one that started
        // the stop, skips the rest of the grace.
        let requested: Cell<Option<Signal>> = Cell::new(None);
        let mut hurries = usize::from(matches!(why, Why::Signal(Signal::SIGTERM | Signal::SIGINT)));
        let signals = &mut self.signals;
        let hurry = async {
            loop {
                let sig = signals.recv().await;
                if !STOP_SIGNALS.contains(&sig) {
                    continue;
                }
                if requested.get().is_none() {
                    requested.set(Some(sig));
                }
                if sig == Signal::SIGTERM || sig == Signal::SIGINT {
                    hurries += 1;
                    if hurries >= 2 {
                        info!("received {sig} again; skipping the grace period");
                        return;
                    }
                }
            }
        };
        self.supervisor.stop(stop_signal, grace, hurry).await;
        info!("the command's process group is gone");

        // Our own child ran and is gone, and it only started once the wait owed to earlier
        // holders had passed: whatever ended the term, a release is clean.
        let by_signal = match why {
            Why::Signal(sig) => Some(sig),
            _ => requested.get(),
        };
        match (why, by_signal) {
            (Why::Ended(Verdict::Lost(reason)), None) => TermEnd::Lost(reason),
            (Why::Ended(Verdict::Lost(_)), Some(sig)) => TermEnd::Done(Outcome::Signal(sig)),
            (Why::Ended(Verdict::Fatal(_)), sig) => {
                self.lock.release(term, &won, true).await;
                TermEnd::Done(sig.map_or(Outcome::Code(exit::INTERNAL), Outcome::Signal))
            }
            (_, Some(sig)) => {
                self.lock.release(term, &won, true).await;
                TermEnd::Done(Outcome::Signal(sig))
            }
            (Why::Exited(status), None) => {
                self.lock.release(term, &won, true).await;
                TermEnd::Done(Outcome::Code(status.exit_code()))
            }
            (Why::Signal(_), None) => unreachable!("a signal stop always has its signal"),
        }
    }

    /// Leadership ended before a child started: after a loss nothing is left to do (the key is
    /// not ours); after a definitive error let go of the key, clean only if the wait passed.
    async fn end_without_child(
        &mut self,
        term: &P::Term,
        won: &P::Won,
        verdict: Verdict,
    ) -> TermEnd {
        match verdict {
            Verdict::Lost(reason) => {
                error!(
                    "lost leadership on {} before the command started: {reason}",
                    self.cfg.key
                );
                TermEnd::Lost(reason)
            }
            Verdict::Fatal(msg) => {
                error!("{msg}");
                let clean = election::may_mark_clean(won.owed_until(), BootTime::now());
                self.lock.release(term, won, clean).await;
                TermEnd::Done(Outcome::Code(exit::INTERNAL))
            }
        }
    }

    fn child_spec(&self, session: &str, fencing_token: u64) -> ChildSpec {
        ChildSpec {
            argv: self.cfg.command.clone(),
            shell: self.cfg.shell,
            env_set: vec![
                ("CONSUL_LEADER_KEY".into(), self.cfg.key.clone()),
                ("CONSUL_LEADER_SESSION".into(), session.to_string()),
                (
                    "CONSUL_LEADER_FENCING_TOKEN".into(),
                    fencing_token.to_string(),
                ),
                ("CONSUL_LOCK_HELD".into(), "true".into()),
            ],
            env_remove: [
                "CONSUL_HTTP_TOKEN",
                "CONSUL_HTTP_TOKEN_FILE",
                "NOTIFY_SOCKET",
                "WATCHDOG_USEC",
                "WATCHDOG_PID",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// What a session's end means for the leader.
fn verdict_of(end: SessionEnd) -> Verdict {
    match end {
        SessionEnd::Gone => {
            Verdict::Lost("the session expired or was destroyed (renew answered 404)".into())
        }
        SessionEnd::Fatal(msg) => Verdict::Fatal(format!("cannot renew the session: {msg}")),
    }
}

/// Resolves when the renewer reports the session's end.
async fn session_ended(renewals: &mut watch::Receiver<Renewal>) -> SessionEnd {
    loop {
        if let Some(end) = renewals.borrow_and_update().end.clone() {
            return end;
        }
        if renewals.changed().await.is_err() {
            // The renewer ended without a verdict: it was aborted. Wait for ever.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves with `Ok(verdict)` when leadership ends: the key watcher saw another owner or a
/// definitive error, the session ended, or no renew succeeded in time (self-fencing; see
/// `election`). Resolves with `Err(fence)` when a renew moved the fence, so that the caller can
/// hand it on.
async fn ended(
    verdicts: &mut mpsc::Receiver<Verdict>,
    renewals: &mut watch::Receiver<Renewal>,
    cfg: &RunConfig,
) -> Result<Verdict, Fence> {
    let r = renewals.borrow_and_update().clone();
    if let Some(end) = r.end {
        return Ok(verdict_of(end));
    }
    let fence = Fence::after_renew(r.last_ok_sent, cfg.ttl, cfg.grace);
    let fenced = || {
        Verdict::Lost(format!(
            "no session renew succeeded for {}; stopping before Consul may expire the session",
            humantime::format_duration(round_ms(
                fence.stop_at.saturating_duration_since(r.last_ok_sent)
            ))
        ))
    };
    tokio::select! {
        verdict = verdicts.recv() => {
            Ok(verdict.unwrap_or_else(|| Verdict::Lost("the key watcher stopped".into())))
        }
        () = clock::sleep_until(fence.stop_at) => Ok(fenced()),
        changed = renewals.changed() => {
            let r = renewals.borrow_and_update().clone();
            if let Some(end) = r.end {
                return Ok(verdict_of(end));
            }
            if changed.is_err() {
                // Renewer gone without a verdict: only the fence can end us now.
                clock::sleep_until(fence.stop_at).await;
                return Ok(fenced());
            }
            Err(Fence::after_renew(r.last_ok_sent, cfg.ttl, cfg.grace))
        }
    }
}

/// Pings systemd's watchdog while the session renews: a wrapper whose session has gone past its
/// fence deadline, or that cannot renew at all, stops pinging and lets systemd act.
async fn ping_watchdog(
    every: Duration,
    renewals: watch::Receiver<Renewal>,
    ttl: Duration,
    grace: Duration,
) {
    loop {
        let r = renewals.borrow().clone();
        let fence = Fence::after_renew(r.last_ok_sent, ttl, grace);
        if r.end.is_none() && !fence.stop_at.has_passed() {
            notify::watchdog();
        }
        sleep(every).await;
    }
}
