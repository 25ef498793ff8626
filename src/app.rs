//! `consul-leader run`: the one place where leadership (Consul) and the child (supervisor) meet.
//!
//! A *term* is one session's life: create the session, contend for the key, wait out the silence,
//! run the child while leadership holds, stop the child group, release, destroy the session.
//! "Became leader" starts the child, "lost" stops it, "child exited" releases. The rules that decide
//! (classification, silence, fencing deadline, backoff) live in `election`; this module performs
//! the I/O and keeps every await interruptible by the wrapper's signals.

use std::cell::Cell;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use crate::cli::{OnLost, RunArgs};
use crate::clock::{self, BootTime};
use crate::config::RunConfig;
use crate::consul::{Client, ConsulError, ConsulIndex, ReadOpts, SessionId, SessionRequest};
use crate::election::{self, Fence, FreeWatch, HolderValue, KeyView};
use crate::exit;
use crate::notify;
use crate::supervisor::{ChildExit, ChildSpec, Supervisor};
use crate::wire::LOCK_FLAG_VALUE;

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

/// What the session keeper reports: the send time of the last successful renew, or that the
/// session is gone.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    last_ok_sent: BootTime,
    gone: bool,
}

/// How one term ended.
enum TermEnd {
    /// Exit the wrapper with this outcome after destroying the session.
    Done(Outcome),
    /// Leadership was lost (the child, if any, is already stopped).
    Lost(String),
    /// The session disappeared before we won the lock: start a new one.
    SessionGone,
}

/// Why a contention ended without the lock.
enum ContendEnd {
    Busy,
    SessionGone,
    Fatal(String),
}

struct Acquired {
    /// What we wrote into the key: released (marked clean) with the same holder and time.
    value: HolderValue,
    fencing_token: u64,
    index: ConsulIndex,
    silence_until: Option<Instant>,
}

struct Leader {
    cfg: RunConfig,
    client: Arc<Client>,
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
    let mut leader = Leader {
        cfg,
        client,
        signals,
        supervisor,
    };
    leader.run().await
}

impl Leader {
    async fn run(&mut self) -> Outcome {
        let mut first_session = true;
        loop {
            if let Some(sig) = self.signals.pending_stop() {
                return Outcome::Signal(sig);
            }
            let deadline = self.cfg.wait.map(|w| Instant::now() + w);
            let (session, created_sent) = match self.create_session(first_session).await {
                Ok(s) => s,
                Err(outcome) => return outcome,
            };
            first_session = false;
            let (renew_tx, renew_rx) = watch::channel(Renewal {
                last_ok_sent: created_sent,
                gone: false,
            });
            let keeper = tokio::spawn(keep_session(
                self.client.clone(),
                session.clone(),
                self.cfg.ttl,
                renew_tx,
            ));
            let watchdog = notify::watchdog_interval().map(|every| {
                tokio::spawn(ping_watchdog(
                    every,
                    renew_rx.clone(),
                    self.cfg.ttl,
                    self.cfg.grace,
                ))
            });
            notify::ready(&format!("contending for {}", self.cfg.key));
            let end = self.term(&session, renew_rx, deadline).await;
            keeper.abort();
            if let Some(w) = watchdog {
                w.abort();
            }
            match end {
                TermEnd::Done(outcome) => {
                    notify::stopping("stopping");
                    self.destroy_session(&session, 3).await;
                    return outcome;
                }
                TermEnd::SessionGone => {
                    warn!("session {session} is gone (expired or destroyed); creating a new one");
                }
                TermEnd::Lost(reason) => {
                    // The loss itself was logged where it was seen. One try: after a fence the
                    // agent is likely unreachable, and Consul expires the session anyway.
                    self.destroy_session(&session, 1).await;
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

    /// Creates a session. The first attempt fails fast (a wrong address or token should be told at
    /// once); later ones, after a loss, retry transient errors until a stop signal.
    async fn create_session(&mut self, first: bool) -> Result<(SessionId, BootTime), Outcome> {
        let mut checks = Vec::new();
        if self.cfg.node_check {
            checks.push("serfHealth".to_string());
        }
        checks.extend(self.cfg.checks.iter().cloned());
        let req = SessionRequest::new(
            self.cfg.session_name.clone(),
            self.cfg.ttl,
            self.cfg.lock_delay,
            checks,
        );
        let mut attempt = 0;
        loop {
            let sent = BootTime::now();
            let result = tokio::select! {
                r = self.client.session_create(&req) => r,
                sig = self.signals.next_stop() => return Err(Outcome::Signal(sig)),
            };
            match result {
                Ok(id) => {
                    debug!("created session {id}");
                    return Ok((id, sent));
                }
                Err(e) if !first && e.is_transient() => {
                    if attempt == 0 {
                        warn!("cannot create a session yet: {e}; retrying");
                    } else {
                        debug!("cannot create a session yet: {e}; retrying");
                    }
                    let pause = election::backoff(
                        attempt,
                        Duration::from_millis(500),
                        Duration::from_secs(5),
                    );
                    attempt += 1;
                    tokio::select! {
                        _ = sleep(pause) => {}
                        sig = self.signals.next_stop() => return Err(Outcome::Signal(sig)),
                    }
                }
                Err(e) => {
                    error!("cannot create a Consul session: {}", session_hint(&e));
                    return Err(Outcome::Code(exit::INTERNAL));
                }
            }
        }
    }

    async fn destroy_session(&self, session: &SessionId, attempts: u32) {
        for attempt in 0..attempts {
            match self.client.session_destroy(session).await {
                Ok(()) => {
                    debug!("destroyed session {session}");
                    return;
                }
                Err(e) if e.is_transient() && attempt + 1 < attempts => {
                    sleep(election::backoff(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(1),
                    ))
                    .await;
                }
                Err(e) => {
                    warn!(
                        "cannot destroy session {session}: {e}; Consul will expire it after at most {}",
                        humantime::format_duration(self.cfg.ttl * 2)
                    );
                    return;
                }
            }
        }
    }

    /// One term with a live session: contend, then lead.
    async fn term(
        &mut self,
        session: &SessionId,
        mut renewals: watch::Receiver<Renewal>,
        deadline: Option<Instant>,
    ) -> TermEnd {
        let mut free_watch = FreeWatch::default();
        let contended = tokio::select! {
            r = contend(&self.client, &self.cfg, session, deadline, &mut free_watch) => r,
            _ = session_gone(&mut renewals) => Err(ContendEnd::SessionGone),
            sig = self.signals.next_stop() => {
                // An acquire may have been in flight: let go of the key cleanly (no child ran).
                self.release(session, &HolderValue::new(&self.cfg.host, session)).await;
                return TermEnd::Done(Outcome::Signal(sig));
            }
        };
        let acquired = match contended {
            Ok(a) => a,
            Err(ContendEnd::Busy) => {
                info!(
                    "not leader of {} within --wait; exiting with {}",
                    self.cfg.key, self.cfg.busy_exit_code
                );
                return TermEnd::Done(Outcome::Code(self.cfg.busy_exit_code));
            }
            Err(ContendEnd::SessionGone) => return TermEnd::SessionGone,
            Err(ContendEnd::Fatal(msg)) => {
                error!("{msg}");
                self.release(session, &HolderValue::new(&self.cfg.host, session))
                    .await;
                return TermEnd::Done(Outcome::Code(exit::INTERNAL));
            }
        };
        self.lead(session, renewals, acquired).await
    }

    /// Holds the lock: silence, child, and the stop sequence.
    async fn lead(
        &mut self,
        session: &SessionId,
        mut renewals: watch::Receiver<Renewal>,
        acquired: Acquired,
    ) -> TermEnd {
        let cfg = self.cfg.clone();
        let value = acquired.value.clone();
        info!(
            "acquired the lock on {} (fencing token {})",
            cfg.key, acquired.fencing_token
        );
        let (lost_tx, mut lost_rx) = mpsc::channel::<String>(1);
        let watcher = tokio::spawn(watch_key(
            self.client.clone(),
            cfg.key.clone(),
            session.clone(),
            acquired.index,
            cfg.ttl * 2,
            lost_tx,
        ));
        let _abort_watcher = AbortOnDrop(watcher);

        if let Some(until) = acquired.silence_until {
            let left = until.saturating_duration_since(Instant::now());
            info!(
                "silence: the previous holder did not release cleanly; starting the command in {}",
                humantime::format_duration(round_ms(left))
            );
            notify::status("leader, waiting out the silence before starting the command");
            loop {
                tokio::select! {
                    _ = sleep_until(until) => break,
                    ended = lost(&mut lost_rx, &mut renewals, &cfg) => {
                        // A moved fence (Err) needs no action: no child runs yet.
                        if let Ok(reason) = ended {
                            error!("lost leadership on {} during the silence: {reason}", cfg.key);
                            return TermEnd::Lost(reason);
                        }
                    }
                    sig = self.signals.next_stop() => {
                        self.release(session, &value).await;
                        return TermEnd::Done(Outcome::Signal(sig));
                    }
                }
            }
        }

        // The last moment to honour a stop signal without starting anything.
        tokio::task::yield_now().await;
        if let Some(sig) = self.signals.pending_stop() {
            self.release(session, &value).await;
            return TermEnd::Done(Outcome::Signal(sig));
        }
        // Nor may a child start when the session cannot be trusted any more.
        let r = *renewals.borrow();
        let fence = Fence::after_renew(r.last_ok_sent, cfg.ttl, cfg.grace);
        if r.gone || fence.stop_at.has_passed() {
            let reason = "the session could not be renewed before the command was to start";
            error!("lost leadership on {}: {reason}", cfg.key);
            return TermEnd::Lost(reason.into());
        }
        let spec = self.child_spec(session, acquired.fencing_token);
        let pid = match self.supervisor.spawn(&spec, fence) {
            Ok(pid) => pid,
            Err(e) => {
                error!("{e}");
                self.release(session, &value).await;
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
            Lost(String),
            Signal(Signal),
        }
        let why = loop {
            tokio::select! {
                status = self.supervisor.wait() => break match self.supervisor.fenced() {
                    // The keeper stopped the command at the fence: leadership is over, whatever
                    // a late renew says now.
                    Some(reason) => Why::Lost(reason.into()),
                    None => Why::Exited(status),
                },
                ended = lost(&mut lost_rx, &mut renewals, &cfg) => match ended {
                    Ok(reason) => break Why::Lost(reason),
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
            Why::Lost(reason) => {
                error!(
                    "lost leadership on {}: {reason}; stopping the command",
                    cfg.key
                );
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

        let by_signal = match why {
            Why::Signal(sig) => Some(sig),
            _ => requested.get(),
        };
        match (why, by_signal) {
            (Why::Lost(reason), None) => TermEnd::Lost(reason),
            (Why::Lost(_), Some(sig)) => TermEnd::Done(Outcome::Signal(sig)),
            (_, Some(sig)) => {
                self.release(session, &value).await;
                TermEnd::Done(Outcome::Signal(sig))
            }
            (Why::Exited(status), None) => {
                self.release(session, &value).await;
                TermEnd::Done(Outcome::Code(status.exit_code()))
            }
            (Why::Signal(_), None) => unreachable!("a signal stop always has its signal"),
        }
    }

    fn child_spec(&self, session: &SessionId, fencing_token: u64) -> ChildSpec {
        ChildSpec {
            argv: self.cfg.command.clone(),
            shell: self.cfg.shell,
            env_set: vec![
                ("CONSUL_LEADER_KEY".into(), self.cfg.key.clone()),
                ("CONSUL_LEADER_SESSION".into(), session.0.clone()),
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
            stop_signal: self.cfg.stop_signal,
        }
    }

    /// Releases the key, marked clean: called only once no child of ours is running.
    async fn release(&self, session: &SessionId, value: &HolderValue) {
        let body = value.released_clean().to_bytes();
        for attempt in 0..5 {
            match self
                .client
                .kv_release(&self.cfg.key, session, LOCK_FLAG_VALUE, body.clone())
                .await
            {
                Ok(true) => {
                    info!("released the lock on {}", self.cfg.key);
                    return;
                }
                // Not ours (never acquired, or already lost): nothing to release.
                Ok(false) => return,
                Err(e) if e.is_transient() && attempt < 4 => {
                    debug!("release failed: {e}; retrying");
                    sleep(election::backoff(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(2),
                    ))
                    .await;
                }
                Err(e) => {
                    warn!(
                        "cannot release the lock on {}: {e}; destroying the session releases it",
                        self.cfg.key
                    );
                    return;
                }
            }
        }
    }
}

/// Aborts a task when dropped, so no watcher outlives its term.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn session_hint(e: &ConsulError) -> String {
    match e {
        ConsulError::Status { body, .. } if body.contains("Session TTL") => {
            format!("{e}; the agent's session_ttl_min is larger than --ttl, raise --ttl")
        }
        ConsulError::Status { body, .. } if body.contains("Missing check") => format!(
            "{e}; check the --check IDs, or pass --no-node-check if the node has no serfHealth"
        ),
        ConsulError::Status { body, .. } if body.contains("critical") => format!(
            "{e}; Consul binds no failing check to a session: make the check pass, or leave it out \
             (--check, --no-node-check)"
        ),
        _ => e.to_string(),
    }
}

/// Resolves when the session keeper reports the session gone.
async fn session_gone(renewals: &mut watch::Receiver<Renewal>) {
    loop {
        if renewals.borrow_and_update().gone {
            return;
        }
        if renewals.changed().await.is_err() {
            // The keeper ended without saying gone: it was aborted. Wait for ever.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves with `Ok(reason)` when leadership is lost: the key watcher saw another owner, the
/// session is gone, or no renew succeeded in time (self-fencing; see `election`). Resolves with
/// `Err(fence)` when a renew moved the fence, so that the caller can hand it on.
async fn lost(
    lost_rx: &mut mpsc::Receiver<String>,
    renewals: &mut watch::Receiver<Renewal>,
    cfg: &RunConfig,
) -> Result<String, Fence> {
    let r = *renewals.borrow_and_update();
    if r.gone {
        return Ok("the session expired or was destroyed (renew answered 404)".into());
    }
    let fence = Fence::after_renew(r.last_ok_sent, cfg.ttl, cfg.grace);
    tokio::select! {
        reason = lost_rx.recv() => {
            Ok(reason.unwrap_or_else(|| "the key watcher stopped".into()))
        }
        _ = clock::sleep_until(fence.stop_at) => {
            Ok(format!(
                "no session renew succeeded for {}; stopping before Consul may expire the session",
                humantime::format_duration(round_ms(fence.stop_at.saturating_duration_since(r.last_ok_sent)))
            ))
        }
        changed = renewals.changed() => {
            if changed.is_err() {
                // Keeper gone without a verdict: only the fence can end us now.
                clock::sleep_until(fence.stop_at).await;
                return Ok("no session renew succeeded in time".into());
            }
            let r = *renewals.borrow();
            if r.gone {
                return Ok("the session expired or was destroyed (renew answered 404)".into());
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
        let r = *renewals.borrow();
        let fence = Fence::after_renew(r.last_ok_sent, ttl, grace);
        if !r.gone && !fence.stop_at.has_passed() {
            notify::watchdog();
        }
        sleep(every).await;
    }
}

/// Renews the session every TTL/3 and reports each success (by its send time) or the session's end.
/// Errors are retried with jittered backoff; they are not a loss by themselves: the leader's fence
/// deadline decides that.
async fn keep_session(
    client: Arc<Client>,
    session: SessionId,
    ttl: Duration,
    tx: watch::Sender<Renewal>,
) {
    let period = ttl / 3;
    // A hung renew (a black-holed connection) is cut short at half the period, so that it fails
    // and is retried, on a new connection, well before the fence: with the defaults, a renew sent
    // into a partition gives up after 2.5s and the next try leaves 4s before the fence.
    let timeout = (period / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let since_ok = BootTime::now().saturating_duration_since(tx.borrow().last_ok_sent);
    let mut next = Instant::now() + period.saturating_sub(since_ok);
    let mut attempt = 0u32;
    loop {
        sleep_until(next).await;
        let sent = BootTime::now();
        let sent_mono = Instant::now();
        match client.session_renew(&session, timeout).await {
            Ok(Some(_)) => {
                if attempt > 0 {
                    info!("session renew works again");
                }
                debug!("renewed session {session}");
                attempt = 0;
                tx.send_modify(|r| r.last_ok_sent = sent);
                next = sent_mono + period;
            }
            Ok(None) => {
                tx.send_modify(|r| r.gone = true);
                return;
            }
            Err(e) => {
                if attempt == 0 {
                    warn!("session renew failed: {e}; retrying");
                } else {
                    debug!("session renew failed again: {e}");
                }
                next = Instant::now()
                    + election::backoff(attempt, Duration::from_millis(200), period / 2);
                attempt += 1;
            }
        }
    }
}

/// Watches the lock key with blocking `?consistent` reads; reports the first sign that it is no
/// longer ours. Errors are retried with backoff (the fence deadline covers a Consul we cannot reach).
async fn watch_key(
    client: Arc<Client>,
    key: String,
    session: SessionId,
    mut index: ConsulIndex,
    wait: Duration,
    lost_tx: mpsc::Sender<String>,
) {
    let mut attempt = 0u32;
    loop {
        let opts = ReadOpts {
            index,
            wait: Some(wait),
            consistent: true,
        };
        match client.kv_get(&key, opts).await {
            Ok((entry, new_index)) => {
                attempt = 0;
                let reason = match entry {
                    None => Some("the key was deleted".to_string()),
                    Some(e) => match e.session {
                        Some(s) if s == session.0 => None,
                        Some(s) => Some(format!("the key is now held by session {s}")),
                        None => {
                            Some("Consul released the key (the session was invalidated)".into())
                        }
                    },
                };
                if let Some(reason) = reason {
                    let _ = lost_tx.send(reason).await;
                    return;
                }
                // Consul's guidance: an index that goes backwards means start over.
                index = if new_index < index {
                    ConsulIndex(0)
                } else {
                    new_index
                };
            }
            Err(e) => {
                debug!("watching {key} failed: {e}; retrying");
                sleep(election::backoff(
                    attempt,
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                ))
                .await;
                attempt += 1;
            }
        }
    }
}

/// Contends for the key until we hold it, the wait runs out, or something fatal happens.
async fn contend(
    client: &Client,
    cfg: &RunConfig,
    session: &SessionId,
    deadline: Option<Instant>,
    free_watch: &mut FreeWatch,
) -> Result<Acquired, ContendEnd> {
    const MAX_BLOCK: Duration = Duration::from_secs(300);
    let mut index = ConsulIndex(0);
    let mut announced: Option<String> = None;
    let mut delay_attempt = 0u32;
    let mut error_attempt = 0u32;
    let expired = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let wait = remaining.unwrap_or(MAX_BLOCK).min(MAX_BLOCK);
        let opts = if index.0 == 0 || wait.is_zero() {
            ReadOpts::default()
        } else {
            ReadOpts {
                index,
                wait: Some(wait),
                consistent: false,
            }
        };
        let (entry, new_index) = match client.kv_get(&cfg.key, opts).await {
            Ok(r) => {
                error_attempt = 0;
                r
            }
            Err(e) if e.is_transient() => {
                if expired(deadline) {
                    return Err(ContendEnd::Fatal(format!("cannot read {}: {e}", cfg.key)));
                }
                if error_attempt == 0 {
                    warn!("cannot read {}: {e}; retrying", cfg.key);
                }
                sleep(election::backoff(
                    error_attempt,
                    Duration::from_millis(200),
                    Duration::from_secs(5),
                ))
                .await;
                error_attempt += 1;
                index = ConsulIndex(0);
                continue;
            }
            Err(e) => return Err(ContendEnd::Fatal(format!("cannot read {}: {e}", cfg.key))),
        };
        let view = election::classify(entry.as_ref(), session);
        free_watch.observe(&view, Instant::now().into_std());
        match view {
            KeyView::Foreign { flags } => {
                return Err(ContendEnd::Fatal(election::foreign_key_error(
                    &cfg.key, flags,
                )));
            }
            KeyView::Held {
                session: other,
                holder,
            } => {
                let who = election::describe_holder(&other, holder.as_ref());
                if announced.as_deref() != Some(who.as_str()) {
                    info!("waiting for the lock on {}: held by {who}", cfg.key);
                    notify::status(&format!("standby, leader is {who}"));
                    announced = Some(who);
                }
                if expired(deadline) {
                    return Err(ContendEnd::Busy);
                }
                delay_attempt = 0;
                index = if new_index.0 == 0 {
                    ConsulIndex(1)
                } else {
                    new_index
                };
                continue;
            }
            KeyView::Ours { .. } | KeyView::Absent | KeyView::Free { .. } => {}
        }
        // Made at each attempt, so that `acquired_at` says when we won, not when we began to wait.
        let value = HolderValue::new(&cfg.host, session);
        let failed: ConsulError = match client
            .kv_acquire(&cfg.key, session, LOCK_FLAG_VALUE, value.to_bytes())
            .await
        {
            Ok(true) => {
                // Read back what we hold: the LockIndex is the fencing token, and its index is
                // where the leader's watch starts.
                let read = ReadOpts {
                    consistent: true,
                    ..ReadOpts::default()
                };
                match client.kv_get(&cfg.key, read).await {
                    Ok((Some(e), idx)) if e.session.as_deref() == Some(session.0.as_str()) => {
                        let silence_until = free_watch
                            .silence_until(cfg.silence, Instant::now().into_std())
                            .map(Instant::from_std);
                        return Ok(Acquired {
                            value,
                            fencing_token: e.lock_index,
                            index: idx,
                            silence_until,
                        });
                    }
                    Ok(_) => {
                        // Lost between acquire and read-back (session destroyed): start over.
                        index = ConsulIndex(0);
                        continue;
                    }
                    Err(e) => e,
                }
            }
            Ok(false) => {
                // Refused while the key looked free: either someone else won the race (the next
                // read shows them and we block on it), or Consul's lock-delay is in force.
                index = ConsulIndex(0);
                match client.kv_get(&cfg.key, ReadOpts::default()).await {
                    Ok((entry, _)) => {
                        let view = election::classify(entry.as_ref(), session);
                        free_watch.observe(&view, Instant::now().into_std());
                        if matches!(view, KeyView::Free { .. } | KeyView::Absent) {
                            if delay_attempt == 0 {
                                info!(
                                    "the lock on {} is free but Consul's lock-delay is in force; retrying",
                                    cfg.key
                                );
                            }
                            if expired(deadline) {
                                return Err(ContendEnd::Busy);
                            }
                            // Sleep until the lock-delay probably ends, then retry briskly,
                            // with jitter so that contenders do not knock in lockstep.
                            let now = std::time::Instant::now();
                            let brisk = election::backoff(
                                delay_attempt,
                                Duration::from_millis(25),
                                Duration::from_millis(250),
                            );
                            let mut pause = match free_watch.lock_delay_ends(cfg.lock_delay) {
                                Some(end) if end > now + brisk => end - now + brisk / 2,
                                _ => brisk,
                            };
                            if let Some(d) = deadline {
                                pause = pause.min(d.saturating_duration_since(Instant::now()));
                            }
                            delay_attempt += 1;
                            sleep(pause).await;
                        }
                        continue;
                    }
                    Err(e) => e,
                }
            }
            Err(ConsulError::Status { body, .. }) if body.contains("invalid session") => {
                return Err(ContendEnd::SessionGone);
            }
            Err(e) => e,
        };
        // An error on the acquire path: retry the transient ones with backoff, from a fresh read.
        if !failed.is_transient() || expired(deadline) {
            return Err(ContendEnd::Fatal(format!(
                "cannot acquire {}: {failed}",
                cfg.key
            )));
        }
        warn!("cannot acquire {}: {failed}; retrying", cfg.key);
        sleep(election::backoff(
            error_attempt,
            Duration::from_millis(200),
            Duration::from_secs(5),
        ))
        .await;
        error_attempt += 1;
        index = ConsulIndex(0);
    }
}
