//! A fault-injection TCP proxy for the integration tests: faults come from outside the binary
//! (design §7). A test puts a [`FaultProxy`] between the client under test (the `consul-leader
//! run` wrapper, or the test's own [`Http`](super::Http) client) and the agent, then switches
//! [`Mode`]s at any time to partition, reset, slow down or impersonate the agent.
//!
//! * It runs on one dedicated thread with its own current-thread tokio runtime, so it works the
//!   same from `#[tokio::test]` (any flavour) and from plain sync tests, and never competes with
//!   the test's runtime. Dropping the proxy stops that thread and joins it: the listening port
//!   closes and every connection is closed with it.
//! * A mode applies to new **and** existing connections, globally ([`FaultProxy::set_mode`]) or
//!   pinned to one connection ([`FaultProxy::set_mode_for`], which wins over the global mode).
//! * Counters ([`FaultProxy::accepted`], [`FaultProxy::upstream_connects`],
//!   [`FaultProxy::bytes_up`], ...) and [`FaultProxy::connections`] let a test wait on a
//!   condition ("the wrapper has reconnected": `accepted()` grew) instead of sleeping.
//! * It only ever connects to the upstream it was given, which must be a loopback address.
//!
//! What each mode does is documented on [`Mode`]. The choice that matters most: switching from
//! [`Mode::Blackhole`] back to [`Mode::Pass`] **resumes** the hung connections, with every byte
//! sent during the partition delivered late and in order. That is what TCP does when a
//! partition heals within its retransmission window, and it is the harder case for a client: a
//! stale answer to a request it may have given up on arrives on an old connection. To model a
//! partition that outlives the TCP stream (conntrack or NAT state lost, a peer rebooted), pin the
//! old connections first: `proxy.pin_all(Mode::Blackhole)` keeps them hung forever,
//! `proxy.pin_all(Mode::Reset)` resets them, and then `proxy.set_mode(Mode::Pass)` lets new
//! connections through.
//!
//! ```ignore
//! let agent = DevAgent::builder().spawn_local();
//! let proxy = FaultProxy::start(agent.addr().parse().unwrap());
//! let http = Http::new(&proxy.url());
//! http.get("/v1/status/leader").await.expect_status(200);
//!
//! proxy.set_mode(Mode::Blackhole); // a partition: requests hang, nothing is closed
//! let hung = tokio::time::timeout(Duration::from_secs(1), http.get("/v1/status/leader")).await;
//! assert!(hung.is_err());
//!
//! proxy.fail_http(500, "rpc error: No cluster leader"); // the agent answers 500, no upstream
//! proxy.set_mode(Mode::Reset); // every connection gets an RST, now and on connect
//! proxy.set_mode(Mode::Pass);
//! let before = proxy.accepted();
//! // ... start the wrapper against proxy.url(), then:
//! wait_until("the wrapper reconnected", DEADLINE, || async { proxy.accepted() > before }).await;
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Bytes read from a socket at a time; also the most a pump holds in memory per direction.
const CHUNK: usize = 16 * 1024;

/// Live connections beyond this are reset on accept, so a runaway client cannot make the proxy
/// hold an unbounded number of sockets.
const MAX_CONNECTIONS: usize = 256;

/// The largest request head a canned-response connection buffers before giving up on framing.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// The largest request body a canned-response connection buffers (Consul caps KV values at
/// 512 KiB); larger requests are answered and the connection is closed.
const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;

/// What the proxy does with connections. Applies to new connections and, from the moment
/// [`FaultProxy::set_mode`] returns, to existing ones: every byte the proxy has not started to
/// write yet is subject to the new mode (a chunk already being written is finished, except
/// under `Reset`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways, half-closes included.
    Pass,
    /// A network partition: nothing is forwarded, nothing is answered, nothing is closed. New
    /// connections are accepted (the client's connect succeeds) but not connected upstream;
    /// existing ones stop reading in both directions, so the peers' sends fill the socket
    /// buffers and then block, exactly as when packets are dropped. No RST, no FIN.
    ///
    /// Leaving `Blackhole` resumes every connection: bytes held during the partition are
    /// delivered, and waiting new connections connect upstream then (see the module docs for
    /// modelling a partition that loses the streams instead).
    Blackhole,
    /// Close every existing connection with an RST (`SO_LINGER` 0) on both sides, and reset
    /// each new connection right after accept.
    Reset,
    /// Forward with added latency: each chunk the proxy reads is held for this long before it is
    /// written. A pump does not read while it holds a chunk, so bytes that arrive meanwhile are
    /// delayed by up to twice this (one request and one response take at least 2 × delay).
    Delay(Duration),
    /// Impersonate the agent: answer every new HTTP request with this response without
    /// contacting the upstream. New connections never connect upstream. On an existing
    /// connection, an exchange in flight (a blocking query) still gets its real answer; the
    /// next bytes the client sends are taken as the start of a new request (true for HTTP/1.1
    /// clients that do not pipeline, such as hyper and Go's net/http), so the proxy closes that
    /// connection's upstream side and answers from then on. Requests are parsed minimally (head
    /// plus `Content-Length` body) and answered one by one on the keep-alive connection; a
    /// request with `Connection: close`, HTTP/1.0, a chunked body or `Expect` is answered with
    /// `Connection: close` and the connection is then closed. When the mode changes to `Pass`
    /// or `Delay`, such a connection connects upstream and forwards again from the next request.
    FailHttp(Canned),
}

impl Mode {
    /// [`Mode::FailHttp`] with `status` and a `text/plain` `body`.
    pub fn fail_http(status: u16, body: impl Into<Bytes>) -> Mode {
        Mode::FailHttp(Canned::new(status, body))
    }
}

/// A canned HTTP response for [`Mode::FailHttp`]. It always carries `Content-Length` and
/// `X-Fault-Proxy: canned`, and `Content-Type: text/plain; charset=utf-8` (Consul's error
/// type) unless a `Content-Type` header is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Canned {
    pub fn new(status: u16, body: impl Into<Bytes>) -> Canned {
        Canned {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header (e.g. `Retry-After` on a 429).
    pub fn header(mut self, name: &str, value: &str) -> Canned {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The response bytes; no body for a HEAD request.
    fn encode(&self, head_only: bool, close: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if !self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            head.push_str("Content-Type: text/plain; charset=utf-8\r\n");
        }
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        head.push_str("X-Fault-Proxy: canned\r\n");
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Identifies one accepted connection for [`FaultProxy::set_mode_for`]; ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, not connected upstream: waiting for the mode to allow it (`Blackhole`).
    Waiting,
    /// Answering requests itself ([`Mode::FailHttp`]); no upstream connection.
    Canned,
    /// Connected upstream; bytes flow as the mode allows.
    Forwarding,
}

/// A live connection, as [`FaultProxy::connections`] reports it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub id: ConnId,
    /// The client's address.
    pub peer: SocketAddr,
    pub phase: Phase,
    /// The mode in force for this connection.
    pub mode: Mode,
    /// True when the mode was set for this connection and ignores the global one.
    pub pinned: bool,
    /// Bytes forwarded client -> upstream.
    pub bytes_up: u64,
    /// Bytes forwarded upstream -> client (canned responses are not counted).
    pub bytes_down: u64,
}

/// A TCP proxy with switchable faults; see the module docs. Drop stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread_name: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards each connection to `upstream`, in [`Mode::Pass`].
    /// The port is listening when this returns. Panics if `upstream` is not a loopback address.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy only forwards to loopback addresses, not {upstream}"
        );
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        listener
            .set_nonblocking(true)
            .expect("make the fault proxy's listener non-blocking");
        let addr = listener.local_addr().expect("fault proxy address");
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                mode: Mode::Pass,
                next_id: 1,
                conns: BTreeMap::new(),
            }),
            counters: Counters::default(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the fault proxy's runtime");
        let (stop, stopped) = oneshot::channel();
        // Thread names show in /proc/self/task/*/comm, which keeps 15 bytes: port fits.
        let thread_name = format!("fproxy-{}", addr.port());
        let serve_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)
                        .expect("register the fault proxy's listener");
                    serve(listener, serve_shared, stopped).await;
                });
                // Dropping the runtime drops every connection task, and with it every socket.
                drop(runtime);
            })
            .expect("spawn the fault proxy thread");
        FaultProxy {
            addr,
            shared,
            thread_name,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The listening address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for [`Http::new`](super::Http::new) or a wrapper's
    /// `--consul-addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The upstream address.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The name of the proxy's thread, to check that it is gone after drop.
    pub fn thread_name(&self) -> &str {
        &self.thread_name
    }

    /// The global mode.
    pub fn mode(&self) -> Mode {
        self.shared.lock().mode.clone()
    }

    /// Sets the global mode, for new connections and every existing one that is not pinned.
    pub fn set_mode(&self, mode: Mode) {
        let mut st = self.shared.lock();
        st.mode = mode.clone();
        for c in st.conns.values().filter(|c| c.pinned.is_none()) {
            c.tx.send_replace(mode.clone());
        }
    }

    /// `set_mode(Mode::fail_http(status, body))`.
    pub fn fail_http(&self, status: u16, body: impl Into<Bytes>) {
        self.set_mode(Mode::fail_http(status, body));
    }

    /// Pins `mode` on one connection: it ignores the global mode until [`FaultProxy::unpin`].
    /// Returns false if the connection is gone.
    pub fn set_mode_for(&self, id: ConnId, mode: Mode) -> bool {
        let mut st = self.shared.lock();
        let Some(c) = st.conns.get_mut(&id.0) else {
            return false;
        };
        c.pinned = Some(mode.clone());
        c.tx.send_replace(mode);
        true
    }

    /// Makes a connection follow the global mode again. Returns false if it is gone.
    pub fn unpin(&self, id: ConnId) -> bool {
        let mut st = self.shared.lock();
        let global = st.mode.clone();
        let Some(c) = st.conns.get_mut(&id.0) else {
            return false;
        };
        c.pinned = None;
        c.tx.send_replace(global);
        true
    }

    /// Pins `mode` on every live connection (connections accepted later follow the global
    /// mode). Returns their ids.
    pub fn pin_all(&self, mode: Mode) -> Vec<ConnId> {
        let mut st = self.shared.lock();
        let mut ids = Vec::new();
        for (id, c) in st.conns.iter_mut() {
            c.pinned = Some(mode.clone());
            c.tx.send_replace(mode.clone());
            ids.push(ConnId(*id));
        }
        ids
    }

    /// The live connections, oldest first.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let st = self.shared.lock();
        st.conns
            .iter()
            .map(|(id, c)| ConnInfo {
                id: ConnId(*id),
                peer: c.peer,
                phase: c.phase,
                mode: c.tx.borrow().clone(),
                pinned: c.pinned.is_some(),
                bytes_up: c.stats.up.load(Ordering::SeqCst),
                bytes_down: c.stats.down.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// Connections accepted so far (including those reset or black-holed).
    pub fn accepted(&self) -> u64 {
        self.shared.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections made to the upstream so far.
    pub fn upstream_connects(&self) -> u64 {
        self.shared
            .counters
            .upstream_connects
            .load(Ordering::SeqCst)
    }

    /// Bytes forwarded client -> upstream so far, over all connections (counted as each chunk is
    /// handed to the socket, so a chunk cut short by a reset still counts).
    pub fn bytes_up(&self) -> u64 {
        self.shared.counters.bytes_up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded upstream -> client so far, over all connections.
    pub fn bytes_down(&self) -> u64 {
        self.shared.counters.bytes_down.load(Ordering::SeqCst)
    }

    /// Canned responses sent so far ([`Mode::FailHttp`]).
    pub fn canned_responses(&self) -> u64 {
        self.shared.counters.canned.load(Ordering::SeqCst)
    }

    /// Connections the proxy closed with an RST so far: [`Mode::Reset`], over the connection
    /// limit, a side that failed mid-stream, or an upstream that refused the connection.
    pub fn resets(&self) -> u64 {
        self.shared.counters.resets.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the sender wakes the accept loop, which returns; the thread then drops the
        // runtime (and every connection) and exits.
        drop(self.stop.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
            && !thread::panicking()
        {
            panic!("the fault proxy thread {} panicked", self.thread_name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    counters: Counters,
}

impl Shared {
    /// The state; a panic elsewhere while it was held does not make it unusable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    upstream_connects: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    canned: AtomicU64,
    resets: AtomicU64,
}

struct State {
    mode: Mode,
    next_id: u64,
    conns: BTreeMap<u64, ConnEntry>,
}

struct ConnEntry {
    peer: SocketAddr,
    phase: Phase,
    pinned: Option<Mode>,
    /// The connection's effective mode; its task watches it.
    tx: watch::Sender<Mode>,
    stats: Arc<ConnStats>,
}

#[derive(Default)]
struct ConnStats {
    up: AtomicU64,
    down: AtomicU64,
}

// ---------------------------------------------------------------------------------------------
// Accepting
// ---------------------------------------------------------------------------------------------

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => r,
        };
        let (client, peer) = match accepted {
            Ok(x) => x,
            // A connection aborted before accept, or out of file descriptors: try again shortly.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.counters.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        match Conn::register(&shared, peer) {
            Some(conn) => {
                tokio::spawn(conn.run(client));
            }
            None => reset(&shared, [client]),
        }
    }
}

/// Closes sockets with an RST: `SO_LINGER` 0, then close. Counted first, so a test that saw
/// the RST also sees the count (the same goes for every counter).
fn reset<const N: usize>(shared: &Shared, sockets: [TcpStream; N]) {
    shared.counters.resets.fetch_add(1, Ordering::SeqCst);
    for s in sockets {
        let _ = s.set_zero_linger();
    }
}

// ---------------------------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------------------------

/// A connection's task state; dropping it (task end or runtime shutdown) unregisters it.
struct Conn {
    id: u64,
    shared: Arc<Shared>,
    rx: watch::Receiver<Mode>,
    stats: Arc<ConnStats>,
}

/// How the phase without an upstream ended.
enum Detached {
    Connect,
    Reset,
    Close,
}

/// How forwarding ended.
enum Forwarded {
    /// Both directions reached EOF.
    Done,
    /// Reset both sides: the mode says so, or one side failed (propagated as an RST, the way a
    /// broken path looks to the other peer).
    Reset,
    /// [`Mode::FailHttp`]: the client started a new request with these bytes.
    Detach(Vec<u8>),
}

/// How one direction's pump ended.
enum Pumped {
    Eof,
    Reset,
    Broken,
    Detach(Vec<u8>),
}

/// Why a write stopped before the end.
enum WriteStop {
    Reset,
    Broken,
}

impl Conn {
    /// Registers a new connection under the current global mode; `None` over the limit.
    fn register(shared: &Arc<Shared>, peer: SocketAddr) -> Option<Conn> {
        let mut st = shared.lock();
        if st.conns.len() >= MAX_CONNECTIONS {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = watch::channel(st.mode.clone());
        let stats = Arc::new(ConnStats::default());
        st.conns.insert(
            id,
            ConnEntry {
                peer,
                phase: Phase::Waiting,
                pinned: None,
                tx,
                stats: Arc::clone(&stats),
            },
        );
        Some(Conn {
            id,
            shared: Arc::clone(shared),
            rx,
            stats,
        })
    }

    fn set_phase(&self, phase: Phase) {
        if let Some(c) = self.shared.lock().conns.get_mut(&self.id) {
            c.phase = phase;
        }
    }

    async fn run(mut self, mut client: TcpStream) {
        // Client bytes not yet answered or forwarded: the start of the next request.
        let mut pending = Vec::new();
        loop {
            match self.detached(&mut client, &mut pending).await {
                Detached::Connect => {}
                Detached::Reset => return reset(&self.shared, [client]),
                Detached::Close => return,
            }
            let Ok(mut upstream) = TcpStream::connect(self.shared.upstream).await else {
                // The agent is down: the client sees what it would see connecting directly.
                return reset(&self.shared, [client]);
            };
            self.shared
                .counters
                .upstream_connects
                .fetch_add(1, Ordering::SeqCst);
            let _ = upstream.set_nodelay(true);
            self.set_phase(Phase::Forwarding);
            let first = std::mem::take(&mut pending);
            match self.forward(&mut client, &mut upstream, first).await {
                Forwarded::Done => return,
                Forwarded::Reset => return reset(&self.shared, [client, upstream]),
                // The upstream side is closed (FIN) when `upstream` drops here.
                Forwarded::Detach(bytes) => pending = bytes,
            }
        }
    }

    /// No upstream connection: wait (`Blackhole`), answer requests (`FailHttp`), or say what to
    /// do next.
    async fn detached(&mut self, client: &mut TcpStream, pending: &mut Vec<u8>) -> Detached {
        let mut buf = vec![0; CHUNK];
        loop {
            let mode = self.rx.borrow_and_update().clone();
            let canned = match mode {
                Mode::Pass | Mode::Delay(_) => return Detached::Connect,
                Mode::Reset => return Detached::Reset,
                Mode::Blackhole => {
                    self.set_phase(Phase::Waiting);
                    if self.rx.changed().await.is_err() {
                        return Detached::Close;
                    }
                    continue;
                }
                Mode::FailHttp(canned) => canned,
            };
            self.set_phase(Phase::Canned);
            let (len, head_only, close) = match parse_request(pending) {
                Request::Complete {
                    len,
                    head_only,
                    close,
                } => (len, head_only, close),
                Request::Unframable { head_only } => (pending.len(), head_only, true),
                Request::Incomplete => {
                    tokio::select! {
                        r = client.read(&mut buf) => match r {
                            Ok(0) | Err(_) => return Detached::Close,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        },
                        c = self.rx.changed() => if c.is_err() {
                            return Detached::Close;
                        },
                    }
                    continue;
                }
            };
            pending.drain(..len);
            let response = canned.encode(head_only, close);
            self.shared.counters.canned.fetch_add(1, Ordering::SeqCst);
            match write_watching(client, &response, &mut self.rx).await {
                Ok(()) => {}
                Err(WriteStop::Reset) => return Detached::Reset,
                Err(WriteStop::Broken) => return Detached::Close,
            }
            if close {
                // Half-close, then discard until the client closes: closing with unread data
                // would send an RST that could destroy the response in flight.
                let _ = client.shutdown().await;
                while let Ok(n) = client.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                return Detached::Close;
            }
        }
    }

    /// Connected upstream: pump both directions until both end, one fails, or the mode resets
    /// the connection or takes it over.
    async fn forward(
        &mut self,
        client: &mut TcpStream,
        upstream: &mut TcpStream,
        first: Vec<u8>,
    ) -> Forwarded {
        let counters = &self.shared.counters;
        // Borrowed halves: unlike owned ones they do not shut down (FIN) on drop, so a reset
        // sends an RST and nothing before it.
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let up = pump(
            Direction::Up,
            &mut cr,
            &mut uw,
            self.rx.clone(),
            first,
            [&self.stats.up, &counters.bytes_up],
        );
        let down = pump(
            Direction::Down,
            &mut ur,
            &mut cw,
            self.rx.clone(),
            Vec::new(),
            [&self.stats.down, &counters.bytes_down],
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let r = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r }
                r = &mut down, if !down_done => { down_done = true; r }
            };
            match r {
                Pumped::Eof if up_done && down_done => return Forwarded::Done,
                Pumped::Eof => {}
                Pumped::Reset | Pumped::Broken => return Forwarded::Reset,
                Pumped::Detach(bytes) => return Forwarded::Detach(bytes),
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.lock().conns.remove(&self.id);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client -> upstream.
    Up,
    /// Upstream -> client.
    Down,
}

/// Forwards one direction as the mode allows. `first` is a chunk already read from the client
/// (the start of a request that arrived while the connection had no upstream).
async fn pump<R, W>(
    dir: Direction,
    r: &mut R,
    w: &mut W,
    mut rx: watch::Receiver<Mode>,
    first: Vec<u8>,
    counters: [&AtomicU64; 2],
) -> Pumped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0; CHUNK];
    let mut held = (!first.is_empty()).then(|| (first, Instant::now()));
    loop {
        let mode = rx.borrow_and_update().clone();
        if mode == Mode::Reset {
            return Pumped::Reset;
        }
        if mode == Mode::Blackhole {
            // Neither read nor write: the peers see a silent path.
            if rx.changed().await.is_err() {
                return Pumped::Broken;
            }
            continue;
        }
        let Some((chunk, read_at)) = held.take() else {
            let n = tokio::select! {
                r = r.read(&mut buf) => match r {
                    Ok(n) => n,
                    Err(_) => return Pumped::Broken,
                },
                c = rx.changed() => {
                    if c.is_err() {
                        return Pumped::Broken;
                    }
                    continue;
                }
            };
            if n == 0 {
                // Propagate the half-close; the other direction goes on.
                let _ = w.shutdown().await;
                return Pumped::Eof;
            }
            let chunk = buf[..n].to_vec();
            if dir == Direction::Up && matches!(*rx.borrow(), Mode::FailHttp(_)) {
                return Pumped::Detach(chunk);
            }
            held = Some((chunk, Instant::now()));
            continue;
        };
        if let Mode::Delay(d) = mode {
            let due = read_at + d;
            if Instant::now() < due {
                held = Some((chunk, read_at));
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    c = rx.changed() => if c.is_err() {
                        return Pumped::Broken;
                    },
                }
                // Re-evaluate: the mode may have changed while the chunk was held.
                continue;
            }
        }
        for c in counters {
            c.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        match write_watching(w, &chunk, &mut rx).await {
            Ok(()) => {}
            Err(WriteStop::Reset) => return Pumped::Reset,
            Err(WriteStop::Broken) => return Pumped::Broken,
        }
    }
}

/// Writes all of `data`, unless the mode turns to `Reset` meanwhile (a peer that does not read
/// must not keep a connection from being reset).
async fn write_watching<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut data: &[u8],
    rx: &mut watch::Receiver<Mode>,
) -> Result<(), WriteStop> {
    while !data.is_empty() {
        tokio::select! {
            r = w.write(data) => match r {
                Ok(0) | Err(_) => return Err(WriteStop::Broken),
                Ok(n) => data = &data[n..],
            },
            c = rx.changed() => {
                if c.is_err() {
                    return Err(WriteStop::Broken);
                }
                if *rx.borrow() == Mode::Reset {
                    return Err(WriteStop::Reset);
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 request framing, for canned responses
// ---------------------------------------------------------------------------------------------

enum Request {
    /// More bytes are needed.
    Incomplete,
    /// A whole request of `len` bytes is at the start of the buffer.
    Complete {
        len: usize,
        head_only: bool,
        close: bool,
    },
    /// The request's end cannot be found without more HTTP than this proxy speaks (chunked
    /// body, `Expect`, a bad or huge length): answer it and close the connection.
    Unframable { head_only: bool },
}

fn parse_request(buf: &[u8]) -> Request {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_REQUEST_HEAD {
            Request::Unframable { head_only: false }
        } else {
            Request::Incomplete
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    // Clients may send empty lines before a request line.
    let mut lines = head.split("\r\n").skip_while(|l| l.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let head_only = request_line.starts_with("HEAD ");
    let mut close = request_line.ends_with("HTTP/1.0");
    let mut length = 0;
    let mut unframable = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if n <= MAX_REQUEST_BODY => length = n,
                _ => unframable = true,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
        {
            unframable = true;
        } else if name.eq_ignore_ascii_case("connection")
            && value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
        {
            close = true;
        }
    }
    if unframable {
        return Request::Unframable { head_only };
    }
    let len = end + 4 + length;
    if buf.len() < len {
        Request::Incomplete
    } else {
        Request::Complete {
            len,
            head_only,
            close,
        }
    }
}
