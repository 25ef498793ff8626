//! The dev agent: a single-node, in-memory server that speaks the subset of Consul's HTTP API that
//! leader election needs (see ../shared/consul-api.md), for trying the tool and for tests on
//! machines without Consul. Like `consul agent -dev` it keeps nothing on disk; unlike it, answers
//! are compact JSON unless `?pretty` is given.
//!
//! This module owns the process side: the runtime, the listener and its accept loop, the timer
//! task that expires sessions and TTL checks, and signals. `http` routes requests, `kv`, `session`
//! and `agent` handle them, `state` is the store, `watch` wakes blocking queries.

mod agent;
mod gofmt;
mod http;
mod kv;
mod session;
mod state;
mod watch;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use crate::cli::DevAgentArgs;
use state::Store;

/// The agent's fixed identity and settings.
pub struct Config {
    pub listen: SocketAddr,
    pub node: String,
    pub node_id: String,
    pub datacenter: String,
    /// Consul's `session_ttl_min`, in nanoseconds.
    pub session_ttl_min: gofmt::GoDuration,
    /// With a token, the agent is default-deny and this is the only secret that works.
    pub acl_token: Option<String>,
}

/// Shared by every connection and by the timer task.
pub struct Agent {
    pub config: Config,
    store: Mutex<Store>,
    reaper: Arc<Notify>,
}

impl Agent {
    fn new(config: Config) -> Self {
        let reaper = Arc::new(Notify::new());
        Self {
            store: Mutex::new(Store::new(&config.node, reaper.clone())),
            config,
            reaper,
        }
    }

    /// Locks the store. A panic while holding the lock leaves the store as consistent as the
    /// last completed operation, so a poisoned lock is still used rather than taking the agent
    /// down.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn main(args: DevAgentArgs) -> ExitCode {
    let node = args.node.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "dev-agent".into())
    });
    let config = Config {
        listen: args.listen,
        node,
        node_id: uuid::Uuid::new_v4().to_string(),
        datacenter: args.datacenter.clone(),
        session_ttl_min: i64::try_from(args.session_ttl_min.as_nanos()).unwrap_or(i64::MAX),
        acl_token: args.acl_token.clone().filter(|t| !t.is_empty()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("consul-leader dev-agent: cannot start the runtime: {e}");
            return ExitCode::from(crate::exit::INTERNAL);
        }
    };
    let code = runtime.block_on(run(config));
    // Blocked queries may still be parked; they hold nothing worth waiting for.
    runtime.shutdown_background();
    code
}

async fn run(mut config: Config) -> ExitCode {
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::AddrInUse => "address in use".to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                std::io::ErrorKind::AddrNotAvailable => "address not available".to_string(),
                _ => e.to_string(),
            };
            // One line, starting with what failed, so scripts can match it.
            eprintln!(
                "cannot listen on {}: {why}; pick another with --listen",
                config.listen
            );
            return ExitCode::from(crate::exit::INTERNAL);
        }
    };
    let addr = listener.local_addr().unwrap_or(config.listen);
    config.listen = addr;
    let agent = Arc::new(Agent::new(config));

    eprintln!(
        "consul-leader dev-agent: WARNING: all data is in memory and lost on exit; for \
         development and tests only, never for production"
    );
    {
        // Tests wait for this line to know the port; it must reach the pipe at once.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "dev-agent listening on {addr}");
        let _ = out.flush();
    }

    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("consul-leader dev-agent: cannot install signal handlers: {e}");
            return ExitCode::from(crate::exit::INTERNAL);
        }
    };

    tokio::spawn(reap_timers(agent.clone()));
    tokio::select! {
        _ = accept_loop(listener, agent) => {}
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    ExitCode::SUCCESS
}

/// Accepts TCP connections for ever. A TLS or unix-socket listener would be another loop that
/// hands its streams to the same [`serve_connection`].
async fn accept_loop(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(TokioIo::new(stream), agent.clone()));
            }
            Err(e) => {
                // Usually descriptor exhaustion: back off briefly instead of spinning.
                eprintln!("consul-leader dev-agent: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection of any transport.
pub async fn serve_connection<IO>(io: IO, agent: Arc<Agent>)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let agent = agent.clone();
        async move { Ok::<_, Infallible>(http::handle(agent, req).await) }
    });
    let mut builder = http1::Builder::new();
    // Go writes canonical header names (X-Consul-Index); people compare captures by eye.
    builder.title_case_headers(true);
    let _ = builder.serve_connection(io, service).await;
}

/// Fires session-TTL and check-TTL timers at their exact deadlines: sleeps until the earliest
/// one, and is woken early when the store arms an earlier deadline.
async fn reap_timers(agent: Arc<Agent>) {
    loop {
        let notified = agent.reaper.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = agent.store().fire_due_timers(std::time::Instant::now());
        match next {
            Some(at) => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                }
            }
            None => notified.await,
        }
    }
}
