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
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use crate::cli::{OnLost, RestartPolicy, RunArgs};
use crate::clock::{self, BootTime};
use crate::config::{Engine, RunConfig};
use crate::consul::Client;
use crate::election::{self, Fence, PreviousTerm};
use crate::exit;
use crate::lock::consul::ConsulMutex;
use crate::lock::etcd::EtcdMutex;
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
    // Every line of this run carries these fields in JSON logs (`pid`: the command's, once it
    // runs). ERROR level, so that `-q` keeps them too. Entered around `block_on`: every task of
    // the current-thread runtime, spawned ones included, runs inside it.
    let span = tracing::error_span!(
        "run",
        key = %cfg.key,
        session = tracing::field::Empty,
        pid = tracing::field::Empty,
        fencing_token = tracing::field::Empty,
    );
    let outcome = span.in_scope(|| runtime.block_on(run(cfg)));
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
///
/// Stop signals (TERM and INT, and HUP and QUIT unless forwarded: design §4) stop the wrapper;
/// the `--forward-signals` go to the command's group.
struct Signals {
    rx: mpsc::UnboundedReceiver<Signal>,
    stop_flag: Arc<AtomicUsize>,
    stop: Vec<Signal>,
}

impl Signals {
    fn install(stop: &[Signal], forward: &[Signal]) -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let stop_flag = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        for sig in stop.iter().chain(forward.iter()).copied() {
            if stop.contains(&sig) {
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
        Ok(Self {
            rx,
            stop_flag,
            stop: stop.to_vec(),
        })
    }

    fn is_stop(&self, sig: Signal) -> bool {
        self.stop.contains(&sig)
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
            if self.is_stop(sig) {
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
    /// Leadership was lost (the child, if any, is already stopped); with what the term still
    /// owed to earlier holders (`None`: nothing, e.g. because its child ran).
    Lost(String, Option<BootTime>),
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
    let signals = match Signals::install(&cfg.stop_signals, &cfg.forward_signals) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
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
    match cfg.engine.clone() {
        Engine::Consul(consul) => {
            let client = match Client::new(consul) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    error!("cannot set up the HTTP client: {e:#}");
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
        Engine::Etcd(etcd) => {
            let client = match crate::etcd::connect(&etcd, &etcd.endpoints).await {
                Ok(c) => c,
                Err(e) => {
                    error!(
                        "cannot connect to etcd at {}: {e}",
                        etcd.endpoints.join(",")
                    );
                    return Outcome::Code(exit::INTERNAL);
                }
            };
            Leader {
                lock: EtcdMutex::new(client, etcd, cfg.clone()),
                cfg,
                signals,
                supervisor,
            }
            .run()
            .await
        }
    }
}

impl<P: Protocol> Leader<P> {
    async fn run(&mut self) -> Outcome {
        // Try-once (cron): one read answers "busy" without writing a session.
        if self.cfg.wait == Some(Duration::ZERO) {
            if let Some(why) = self.lock.busy().await {
                info!(
                    "not leader of {}: {why}; exiting with {}",
                    self.cfg.key, self.cfg.busy_exit_code
                );
                return Outcome::Code(self.cfg.busy_exit_code);
            }
        }
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
            tracing::Span::current().record("session", tracing::field::display(term.id()));
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
                TermEnd::Lost(reason, owed_until) => {
                    // This process confirmed its child gone: the next term need not wait for it
                    // (election's module docs, 7).
                    self.lock.remember(PreviousTerm {
                        session: term.id(),
                        owed_until,
                    });
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
        // The keeper's exec is paid while contending, not between the win and the command.
        self.supervisor.prepare(&env_remove());
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
        tracing::Span::current().record("fencing_token", won.fencing_token());
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

        // From here on the wait owed to earlier holders has passed, so every release is clean.
        let mut restarts = Restarts::new(self.cfg.restart);
        loop {
            let status = match self
                .run_child(term, &won, &mut renewals, &mut verdicts)
                .await
            {
                Ok(status) => status,
                Err(end) => return end,
            };
            // The command exited on its own and its leftovers are gone.
            let Some(delay) = restarts.after_exit(status) else {
                self.lock.release(term, &won, true).await;
                return TermEnd::Done(Outcome::Code(status.exit_code()));
            };
            if restarts.limit_reached() {
                let r = self.cfg.restart;
                warn!(
                    "the command started {} times within {} (--restart-limit): stepping down so that another host can take over",
                    r.limit,
                    humantime::format_duration(r.period)
                );
                self.lock.release(term, &won, true).await;
                return TermEnd::Done(Outcome::Code(status.exit_code()));
            }
            info!(
                "restarting the command in {} (--restart {})",
                humantime::format_duration(round_ms(delay)),
                restarts.policy_name()
            );
            notify::status(&format!(
                "leader, restarting the command in {}",
                humantime::format_duration(round_ms(delay))
            ));
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    () = sleep_until(wake) => break,
                    ended = ended(&mut verdicts, &mut renewals, &cfg) => {
                        // A moved fence needs no action: no child runs.
                        if let Ok(verdict) = ended {
                            return self.end_without_child(term, &won, verdict).await;
                        }
                    }
                    sig = self.signals.next_stop() => {
                        self.lock.release(term, &won, true).await;
                        return TermEnd::Done(Outcome::Signal(sig));
                    }
                }
            }
        }
    }

    /// Runs the command once, while leadership holds: `Ok(status)` when it exited on its own
    /// (and everything it left is gone), `Err(end)` when the term ends (a loss, a stop signal;
    /// the child is stopped and the release done).
    async fn run_child(
        &mut self,
        term: &mut P::Term,
        won: &P::Won,
        renewals: &mut watch::Receiver<Renewal>,
        verdicts: &mut mpsc::Receiver<Verdict>,
    ) -> Result<ChildExit, TermEnd> {
        let cfg = self.cfg.clone();
        // The last moment to honour a stop signal without starting anything.
        tokio::task::yield_now().await;
        if let Some(sig) = self.signals.pending_stop() {
            self.lock.release(term, won, true).await;
            return Err(TermEnd::Done(Outcome::Signal(sig)));
        }
        // Nor may a child start past the fence. A session that could not be renewed lately (a
        // Consul election, a slow agent) is not lost for that: wait for a renew to succeed, or
        // for the renewer to learn that the session is gone.
        let mut announced = false;
        let fence = loop {
            let r = renewals.borrow_and_update().clone();
            if let Some(end) = r.end {
                return Err(self.end_without_child(term, won, verdict_of(end)).await);
            }
            let fence = Fence::after_renew(r.last_ok_sent, cfg.ttl, cfg.grace);
            if !fence.stop_at.has_passed() {
                break fence;
            }
            if !announced {
                warn!(
                    "the session has not been renewed lately; the command starts once a renew succeeds"
                );
                announced = true;
            }
            tokio::select! {
                changed = renewals.changed() => {
                    if changed.is_err() && renewals.borrow().end.is_none() {
                        let reason = "the session could not be renewed before the command was to start";
                        error!("lost leadership on {}: {reason}", cfg.key);
                        return Err(TermEnd::Lost(reason.into(), None));
                    }
                }
                verdict = verdicts.recv() => {
                    let verdict = verdict.unwrap_or_else(|| Verdict::Lost("the key watcher stopped".into()));
                    return Err(self.end_without_child(term, won, verdict).await);
                }
                sig = self.signals.next_stop() => {
                    self.lock.release(term, won, true).await;
                    return Err(TermEnd::Done(Outcome::Signal(sig)));
                }
            }
        };
        let spec = self.child_spec(&term.id(), won.fencing_token(), won.child_env());
        let pid = match self.supervisor.spawn(&spec, fence) {
            Ok(pid) => pid,
            Err(e) => {
                error!("{e}");
                self.lock.release(term, won, true).await;
                return Err(TermEnd::Done(Outcome::Code(e.exit_code())));
            }
        };
        tracing::Span::current().record("pid", pid);
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
                status = self.supervisor.wait() => break match self.supervisor.fenced() {
                    // The keeper stopped the command at the fence: leadership is over, whatever
                    // a late renew says now.
                    Some(reason) => Why::Ended(Verdict::Lost(reason.into())),
                    None => Why::Exited(status),
                },
                ended = ended(verdicts, renewals, &cfg) => match ended {
                    Ok(verdict) => break Why::Ended(verdict),
                    // Each renew moves the fence: the supervisor's keeper enforces it too.
                    Err(fence) => self.supervisor.set_fence(fence),
                },
                sig = self.signals.recv() => {
                    if self.signals.is_stop(sig) {
                        break Why::Signal(sig);
                    }
                    debug!("forwarding {sig} to the command");
                    self.supervisor.signal_group(sig);
                }
            }
        };

        let stop_signal = match &why {
            Why::Exited(status) => {
                debug!("the command {status}; cleaning up what it left");
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
                if !signals.is_stop(sig) {
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
        if let Why::Exited(status) = &why {
            info!("the command {status}");
        }
        info!("the command's process group is gone");

        // Our own child ran and is gone, and it only started once the wait owed to earlier
        // holders had passed: whatever ended the term, a release is clean.
        let by_signal = match why {
            Why::Signal(sig) => Some(sig),
            _ => requested.get(),
        };
        Err(match (why, by_signal) {
            (Why::Exited(status), None) => return Ok(status),
            (Why::Ended(Verdict::Lost(reason)), None) => TermEnd::Lost(reason, None),
            (Why::Ended(Verdict::Lost(_)), Some(sig)) => TermEnd::Done(Outcome::Signal(sig)),
            (Why::Ended(Verdict::Fatal(_)), sig) => {
                self.lock.release(term, won, true).await;
                TermEnd::Done(sig.map_or(Outcome::Code(exit::INTERNAL), Outcome::Signal))
            }
            (_, Some(sig)) => {
                self.lock.release(term, won, true).await;
                TermEnd::Done(Outcome::Signal(sig))
            }
            (Why::Signal(_), None) => unreachable!("a signal stop always has its signal"),
        })
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
                    "lost leadership on {} while no command ran: {reason}",
                    self.cfg.key
                );
                TermEnd::Lost(reason, won.owed_until())
            }
            Verdict::Fatal(msg) => {
                error!("{msg}");
                let clean = election::may_mark_clean(won.owed_until(), BootTime::now());
                self.lock.release(term, won, clean).await;
                TermEnd::Done(Outcome::Code(exit::INTERNAL))
            }
        }
    }

    fn child_spec(
        &self,
        session: &str,
        fencing_token: u64,
        protocol_env: Vec<(String, String)>,
    ) -> ChildSpec {
        ChildSpec {
            argv: self.cfg.command.clone(),
            shell: self.cfg.shell,
            env_set: [
                ("CONSUL_LEADER_KEY".into(), self.cfg.key.clone()),
                ("CONSUL_LEADER_SESSION".into(), session.to_string()),
                (
                    "CONSUL_LEADER_FENCING_TOKEN".into(),
                    fencing_token.to_string(),
                ),
                ("CONSUL_LOCK_HELD".into(), "true".into()),
            ]
            .into_iter()
            .chain(protocol_env)
            .collect(),
            env_remove: env_remove(),
            stop_signal: self.cfg.stop_signal,
        }
    }
}

/// Variables the command (and its keeper) must not inherit: the Consul token, etcd's credentials,
/// and systemd's notification settings, which are the wrapper's.
fn env_remove() -> Vec<String> {
    [
        "CONSUL_HTTP_TOKEN",
        "CONSUL_HTTP_TOKEN_FILE",
        // etcd credentials: ETCDCTL_USER may carry the password (NAME:PASSWORD).
        "ETCDCTL_PASSWORD",
        "ETCDCTL_USER",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// The restart policy's bookkeeping within one term (`--restart`, `--restart-delay`,
/// `--restart-limit`).
struct Restarts {
    cfg: crate::config::Restart,
    /// When the command started, within the last `period`.
    starts: std::collections::VecDeque<Instant>,
    /// Restarts in a row of a command that did not run long: the delay doubles with each.
    streak: u32,
}

impl Restarts {
    fn new(cfg: crate::config::Restart) -> Self {
        Self {
            cfg,
            starts: std::collections::VecDeque::from([Instant::now()]),
            streak: 0,
        }
    }

    fn policy_name(&self) -> &'static str {
        match self.cfg.policy {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    /// After the command exited with `status`: the pause before restarting it, or `None` when
    /// the policy does not restart it. Records the coming start.
    fn after_exit(&mut self, status: ChildExit) -> Option<Duration> {
        let restart = match self.cfg.policy {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure => status != ChildExit::Exited(0),
            RestartPolicy::Always => true,
        };
        if !restart {
            return None;
        }
        let now = Instant::now();
        // A command that ran at least the longest pause was not crash-looping: start over.
        let ran = self
            .starts
            .back()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t));
        if ran >= self.cfg.max_delay {
            self.streak = 0;
        }
        let delay = self
            .cfg
            .delay
            .saturating_mul(1u32 << self.streak.min(20))
            .min(self.cfg.max_delay);
        self.streak += 1;
        while self
            .starts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.cfg.period)
        {
            self.starts.pop_front();
        }
        self.starts.push_back(now + delay);
        Some(delay)
    }

    /// Whether the start just recorded would be one too many within the period.
    fn limit_reached(&self) -> bool {
        self.starts.len() > self.cfg.limit as usize
    }
}

/// What a session's end means for the leader.
fn verdict_of(end: SessionEnd) -> Verdict {
    match end {
        SessionEnd::Gone => {
            Verdict::Lost("the session expired or was destroyed: a renew found it gone".into())
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
            "no session renew succeeded for {}; stopping before the session may expire",
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
