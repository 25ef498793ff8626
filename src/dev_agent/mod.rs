//! The dev agent: a single-node, in-memory server that speaks the subset of Consul's HTTP API that
//! leader election needs (see ../shared/consul-api.md), for trying the tool and for tests on
//! machines without Consul. Like `consul agent -dev` it keeps nothing on disk; unlike it, answers
//! are compact JSON unless `?pretty` is given.
//!
//! This module owns the process side: the runtime, the listener (TCP or a unix socket, plain or
//! TLS) and its accept loop, the timer task that expires sessions and TTL checks, and signals. `http` routes requests, `kv`, `session`
//! and `agent` handle them, `state` is the store, `watch` wakes blocking queries.

mod agent;
mod gofmt;
mod http;
mod kv;
mod session;
mod state;
mod tls;
mod watch;

use std::convert::Infallible;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use crate::cli::{DevAgentArgs, Listen};
use state::Store;

/// The agent's fixed identity and settings.
pub struct Config {
    /// After binding, the actual address (the port chosen for port 0).
    pub listen: Listen,
    pub node: String,
    pub node_id: String,
    pub datacenter: String,
    /// Consul's `session_ttl_min`, in nanoseconds.
    pub session_ttl_min: gofmt::GoDuration,
    /// With a token, the agent is default-deny and this is the only secret that works.
    pub acl_token: Option<String>,
    /// How long a write waits before it is applied (`--commit-latency`; zero by default).
    pub commit_latency: std::time::Duration,
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
    // Certificates are checked before anything listens, so a bad file never leaves a half-started
    // agent behind.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match tls::acceptor(cert, key, args.tls_client_ca.as_deref()) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(crate::exit::INTERNAL);
            }
        },
        // clap makes --tls-cert and --tls-key a pair.
        _ => None,
    };
    let config = Config {
        listen: args.listen.clone(),
        node,
        node_id: uuid::Uuid::new_v4().to_string(),
        datacenter: args.datacenter.clone(),
        session_ttl_min: i64::try_from(args.session_ttl_min.as_nanos()).unwrap_or(i64::MAX),
        acl_token: args.acl_token.clone().filter(|t| !t.is_empty()),
        commit_latency: args.commit_latency,
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
    let code = runtime.block_on(run(config, tls));
    // Blocked queries may still be parked; they hold nothing worth waiting for.
    runtime.shutdown_background();
    code
}

/// A bound listener of either transport.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

async fn run(mut config: Config, tls: Option<TlsAcceptor>) -> ExitCode {
    let bound = match &config.listen {
        Listen::Tcp(addr) => TcpListener::bind(addr)
            .await
            .map_err(|e| io_reason(&e))
            .map(|l| {
                let addr = l.local_addr().unwrap_or(*addr);
                (Listener::Tcp(l), Listen::Tcp(addr), None)
            }),
        Listen::Unix(path) => bind_unix(path)
            .await
            .map(|(l, guard)| (Listener::Unix(l), Listen::Unix(path.clone()), Some(guard))),
    };
    let (listener, addr, _socket_file) = match bound {
        Ok(b) => b,
        Err(why) => {
            // One line, starting with what failed, so scripts can match it.
            eprintln!(
                "cannot listen on {}: {why}; pick another with --listen",
                config.listen
            );
            return ExitCode::from(crate::exit::INTERNAL);
        }
    };
    config.listen = addr.clone();
    let agent = Arc::new(Agent::new(config));

    eprintln!(
        "consul-leader dev-agent: WARNING: all data is in memory and lost on exit; for \
         development and tests only, never for production{}",
        if tls.is_some() {
            " (serving HTTPS)"
        } else {
            ""
        }
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
        _ = accept_loop(listener, tls, agent) => {}
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    ExitCode::SUCCESS
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "address in use".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        std::io::ErrorKind::AddrNotAvailable => "address not available".to_string(),
        _ => e.to_string(),
    }
}

/// Removes the socket file when the agent exits cleanly, but only if it is still the one this
/// agent bound: another agent may have replaced it in the meantime.
struct SocketFile {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.dev_ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a unix socket at `path`. A socket file left by an agent that died is removed first, but
/// only when nothing accepts connections on it; any other kind of file is left alone.
async fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
        Ok(m) if !m.file_type().is_socket() => {
            return Err("the path exists and is not a socket".into());
        }
        Ok(_) => match tokio::net::UnixStream::connect(path).await {
            Ok(_) => return Err("address in use (something accepts connections on it)".into()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove the stale socket file: {e}"))?;
            }
            Err(e) => return Err(io_reason(&e)),
        },
    }
    let listener = UnixListener::bind(path).map_err(|e| io_reason(&e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev_ino: (m.dev(), m.ino()),
    };
    Ok((listener, file))
}

/// Accepts connections for ever and serves each on its own task.
async fn accept_loop(listener: Listener, tls: Option<TlsAcceptor>, agent: Arc<Agent>) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_stream(stream, tls.clone(), agent.clone()));
            }),
            Listener::Unix(l) => l.accept().await.map(|(stream, _)| {
                tokio::spawn(serve_stream(stream, tls.clone(), agent.clone()));
            }),
        };
        if let Err(e) = accepted {
            // Usually descriptor exhaustion: back off briefly instead of spinning.
            eprintln!("consul-leader dev-agent: accept failed: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A client that opens a connection and never completes the handshake gives up its task after
/// this long.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the TLS handshake when the agent serves HTTPS, then HTTP. A failed handshake (an
/// untrusted or missing client certificate, a plain-HTTP client) ends only this connection; it is
/// the client's error to report, so it is logged at debug level only.
async fn serve_stream<S>(stream: S, tls: Option<TlsAcceptor>, agent: Arc<Agent>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(acceptor) = tls else {
        return serve_connection(TokioIo::new(stream), agent).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), agent).await,
        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
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
