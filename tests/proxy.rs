//! The fault-injection proxy of the test harness (`tests/common/proxy.rs`), checked against a
//! local dev agent: each mode does to a real HTTP client what the tests of `run` rely on, on new
//! and on already-open keep-alive connections.
//!
//! Short client timeouts here are assertions that something hangs, never a wait for a change.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::proxy::{FaultProxy, Mode, Phase};
use common::*;
use tokio::task::JoinHandle;

/// Generous deadline for anything these tests wait on.
const DEADLINE: Duration = Duration::from_secs(30);

/// How long a request must stay unanswered to count as hung.
const HANG: Duration = Duration::from_secs(1);

/// A local dev agent (the proxy is what is under test, so never a real agent) and a proxy to it.
fn setup() -> (DevAgent, FaultProxy) {
    let agent = DevAgent::builder().spawn_local();
    let upstream: SocketAddr = agent.addr().parse().expect("dev agent address");
    let proxy = FaultProxy::start(upstream);
    (agent, proxy)
}

/// Puts `value` under `name` straight on the agent (not through the proxy); returns the index.
async fn put_direct(agent: &DevAgent, name: &str, value: &[u8]) -> u64 {
    agent.kv_put(name, value).await;
    agent
        .get(&agent.kv_path(name))
        .await
        .expect_status(200)
        .index()
}

/// Starts a blocking query on `name` after `index` through `http`, and waits until the proxy
/// has forwarded it upstream (its `bytes_up` grew), so it is in flight at the agent.
async fn blocking_query(
    http: &Http,
    proxy: &FaultProxy,
    agent: &DevAgent,
    name: &str,
    index: u64,
) -> JoinHandle<anyhow::Result<Resp>> {
    let before = proxy.bytes_up();
    let path = format!("{}?index={index}&wait=60s", agent.kv_path(name));
    let req = http.request("GET", &path);
    let task = tokio::spawn(req.try_send());
    wait_until("the blocking query reached the agent", DEADLINE, || async {
        proxy.bytes_up() > before
    })
    .await;
    task
}

/// The value of the single KV entry in a `GET /v1/kv/<key>` answer.
fn kv_value(r: &Resp) -> String {
    r.json()[0]["Value"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A raw HTTP/1.1 `GET /v1/status/leader` on `s` (keep-alive); returns the status code.
fn raw_leader(s: &mut TcpStream) -> u16 {
    s.write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .expect("write request");
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    loop {
        let n = s.read(&mut buf).expect("read response");
        assert!(n > 0, "connection closed mid-response: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .expect("response with Content-Length");
        if body.len() >= len {
            return head[9..12].parse().expect("status code");
        }
    }
}

/// A raw connection to the proxy whose reads give up after [`DEADLINE`].
fn raw_connect(proxy: &FaultProxy) -> TcpStream {
    let s = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Asserts that the proxy closed `s` with an RST (not a FIN, not silence), whether or not the
/// client manages to write `probe` first.
#[track_caller]
fn assert_reset(s: &mut TcpStream, probe: &[u8]) {
    let started = Instant::now();
    let outcome = s.write_all(probe).and_then(|()| {
        let mut buf = [0; 1024];
        s.read(&mut buf)
    });
    match outcome {
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        other => panic!(
            "expected a connection reset, got {other:?} after {:?}",
            started.elapsed()
        ),
    }
}

/// True when a thread of this process is named `name`.
fn thread_alive(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .filter_map(Result::ok)
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
}

#[tokio::test]
async fn pass_forwards_requests_both_ways() {
    let (agent, proxy) = setup();
    let http = Http::new(&proxy.url());
    let via_proxy = http.get("/v1/status/leader").await.expect_status(200);
    let direct = agent.get("/v1/status/leader").await.expect_status(200);
    assert_eq!(via_proxy.body, direct.body);

    // A body goes up, a body comes back.
    http.put(&agent.kv_path("k"), b"through the proxy".to_vec())
        .await
        .expect_status(200);
    let r = http.get(&agent.kv_path("k")).await.expect_status(200);
    assert_eq!(kv_value(&r), b64(b"through the proxy"));

    // One keep-alive connection carried all three requests.
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.upstream_connects(), 1);
    let conns = proxy.connections();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert_eq!(
        (c.phase, c.mode.clone(), c.pinned),
        (Phase::Forwarding, Mode::Pass, false)
    );
    assert_eq!(
        (c.bytes_up, c.bytes_down),
        (proxy.bytes_up(), proxy.bytes_down())
    );
    assert!(c.bytes_up > 0 && c.bytes_down > 0, "{c:?}");
}

#[tokio::test]
async fn blackhole_hangs_new_requests_and_in_flight_blocking_queries() {
    let (agent, proxy) = setup();
    let index = put_direct(&agent, "k", b"v1").await;
    let http = Http::new(&proxy.url());
    http.get(&agent.kv_path("k")).await.expect_status(200);
    let mut query = blocking_query(&http, &proxy, &agent, "k", index).await;
    assert_eq!(
        proxy.accepted(),
        1,
        "the blocking query reuses the keep-alive connection"
    );

    proxy.set_mode(Mode::Blackhole);
    // The agent answers the blocking query now; the answer must not get through.
    put_direct(&agent, "k", b"v2").await;
    assert_pending("a blocking query across the partition", &mut query, HANG).await;

    // A new connection is accepted (connect succeeds) and then nothing happens: no answer, no
    // close, no reset, and the upstream never hears of it.
    let fresh = Http::new(&proxy.url());
    let hung = tokio::time::timeout(HANG, fresh.get("/v1/status/leader")).await;
    assert!(
        hung.is_err(),
        "a request answered through a black hole: {hung:?}"
    );
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(proxy.upstream_connects(), 1);
    assert_eq!(proxy.resets(), 0);
    assert_pending("the blocking query, still", &mut query, HANG).await;
    query.abort();
}

#[tokio::test]
async fn healing_a_blackhole_resumes_hung_connections() {
    let (agent, proxy) = setup();
    let index = put_direct(&agent, "k", b"v1").await;
    let http = Http::new(&proxy.url());
    http.get(&agent.kv_path("k")).await.expect_status(200);
    let mut query = blocking_query(&http, &proxy, &agent, "k", index).await;

    proxy.set_mode(Mode::Blackhole);
    let changed = put_direct(&agent, "k", b"v2").await;
    assert_pending("a blocking query across the partition", &mut query, HANG).await;
    // A request on a new connection during the partition waits as well.
    let waiting = tokio::spawn(
        Http::new(&proxy.url())
            .request("GET", "/v1/status/leader")
            .send(),
    );
    wait_until(
        "the proxy accepted the new connection",
        DEADLINE,
        || async { proxy.accepted() == 2 },
    )
    .await;

    // Like TCP after a partition that heals in time: the late answer is delivered, in order.
    proxy.set_mode(Mode::Pass);
    let r = join_within("the blocking query after the heal", query, DEADLINE)
        .await
        .expect("the blocking query's connection survived the partition")
        .expect_status(200);
    assert_eq!(kv_value(&r), b64(b"v2"));
    assert_eq!(r.index(), changed);
    join_within("the request made during the partition", waiting, DEADLINE)
        .await
        .expect_status(200);
    assert_eq!(proxy.upstream_connects(), 2);
    http.get("/v1/status/leader").await.expect_status(200);
}

#[tokio::test]
async fn pinned_connections_stay_hung_while_others_pass() {
    let (agent, proxy) = setup();
    let index = put_direct(&agent, "k", b"v1").await;
    let http = Http::new(&proxy.url());
    http.get(&agent.kv_path("k")).await.expect_status(200);
    let mut query = blocking_query(&http, &proxy, &agent, "k", index).await;

    // A partition that outlives the TCP stream: old connections stay dead, new ones work.
    proxy.set_mode(Mode::Blackhole);
    let pinned = proxy.pin_all(Mode::Blackhole);
    proxy.set_mode(Mode::Pass);
    assert_eq!(pinned.len(), 1);
    put_direct(&agent, "k", b"v2").await;
    assert_pending("the pinned blocking query", &mut query, HANG).await;
    let other = Http::new(&proxy.url());
    let r = other.get(&agent.kv_path("k")).await.expect_status(200);
    assert_eq!(kv_value(&r), b64(b"v2"));
    let conns = proxy.connections();
    let old = conns
        .iter()
        .find(|c| c.id == pinned[0])
        .expect("the old connection is live");
    assert!(old.pinned && old.mode == Mode::Blackhole, "{old:?}");
    assert!(
        conns
            .iter()
            .any(|c| c.id != old.id && c.mode == Mode::Pass && !c.pinned),
        "{conns:?}"
    );

    // Resetting just that connection ends the hung query with a connection error, quickly.
    assert!(proxy.set_mode_for(pinned[0], Mode::Reset));
    let r = join_within("the reset blocking query", query, DEADLINE).await;
    assert!(r.is_err(), "a reset connection answered: {r:?}");
    wait_until("the reset connection is gone", DEADLINE, || async {
        proxy.connections().iter().all(|c| c.id != pinned[0])
    })
    .await;
    assert!(!proxy.set_mode_for(pinned[0], Mode::Pass));
    other.get("/v1/status/leader").await.expect_status(200);
}

#[test]
fn reset_sends_rst_to_existing_and_new_connections() {
    let (_agent, proxy) = setup();
    let mut idle = raw_connect(&proxy);
    assert_eq!(raw_leader(&mut idle), 200);

    proxy.set_mode(Mode::Reset);
    // The idle keep-alive connection is reset without any traffic on it: the read sees the RST.
    let mut buf = [0; 16];
    match idle.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the idle connection to be reset, got {other:?}"),
    }
    let mut fresh = raw_connect(&proxy);
    assert_reset(
        &mut fresh,
        b"GET /v1/status/leader HTTP/1.1\r\nHost: proxy\r\n\r\n",
    );
    assert_eq!(proxy.resets(), 2);
    assert_eq!(proxy.upstream_connects(), 1);
}

#[tokio::test]
async fn reset_fails_requests_fast_and_pass_heals() {
    let (_agent, proxy) = setup();
    let http = Http::new(&proxy.url());
    http.get("/v1/status/leader").await.expect_status(200);

    proxy.set_mode(Mode::Reset);
    // Well below the client's own timeout: a connection error, not a hang.
    for _ in 0..2 {
        let r = tokio::time::timeout(
            DEADLINE,
            http.request("GET", "/v1/status/leader").try_send(),
        )
        .await
        .expect("a request under Reset fails fast instead of hanging");
        let e = r.expect_err("a request under Reset was answered");
        assert!(!format!("{e:?}").contains("TimedOut"), "{e:?}");
    }

    proxy.set_mode(Mode::Pass);
    let before = proxy.accepted();
    http.get("/v1/status/leader").await.expect_status(200);
    assert!(proxy.accepted() > before, "the client reconnected");
}

#[tokio::test]
async fn delay_adds_latency_to_new_and_existing_connections() {
    let (_agent, proxy) = setup();
    let http = Http::new(&proxy.url());
    http.get("/v1/status/leader").await.expect_status(200);

    let delay = Duration::from_millis(300);
    proxy.set_mode(Mode::Delay(delay));
    // The request and the response are each held: at least twice the delay.
    let r = http.get("/v1/status/leader").await.expect_status(200);
    assert!(r.elapsed >= 2 * delay, "took {:?}", r.elapsed);
    assert_eq!(proxy.accepted(), 1, "the existing connection was used");
    let r = Http::new(&proxy.url())
        .get("/v1/status/leader")
        .await
        .expect_status(200);
    assert!(
        r.elapsed >= 2 * delay,
        "took {:?} on a new connection",
        r.elapsed
    );

    proxy.set_mode(Mode::Pass);
    http.get("/v1/status/leader").await.expect_status(200);
}

#[tokio::test]
async fn fail_http_answers_without_the_upstream() {
    let (agent, proxy) = setup();
    proxy.fail_http(500, "rpc error: No cluster leader");
    let http = Http::new(&proxy.url());
    for _ in 0..2 {
        let r = http.get(&agent.kv_path("k")).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (500, "rpc error: No cluster leader")
        );
    }
    // A request with a body is framed by its Content-Length and answered too.
    let r = http.put(&agent.kv_path("k"), b"value".to_vec()).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("X-Fault-Proxy").as_deref(), Some("canned"));

    proxy.fail_http(429, "");
    let r = http.put("/v1/session/renew/x", Vec::new()).await;
    assert_eq!((r.status, r.body.len()), (429, 0));

    // All on one keep-alive connection, none of it upstream.
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.canned_responses(), 4);
    assert_eq!(
        (
            proxy.upstream_connects(),
            proxy.bytes_up(),
            proxy.bytes_down()
        ),
        (0, 0, 0)
    );
    assert_eq!(proxy.connections()[0].phase, Phase::Canned);

    // Back to Pass: the same connection reaches the agent from the next request on.
    proxy.set_mode(Mode::Pass);
    http.get("/v1/status/leader").await.expect_status(200);
    assert_eq!((proxy.accepted(), proxy.upstream_connects()), (1, 1));
}

#[tokio::test]
async fn fail_http_takes_over_open_connections_after_their_exchange() {
    let (agent, proxy) = setup();
    let index = put_direct(&agent, "k", b"v1").await;
    let http = Http::new(&proxy.url());
    http.get(&agent.kv_path("k")).await.expect_status(200);
    let query = blocking_query(&http, &proxy, &agent, "k", index).await;

    proxy.fail_http(500, "rpc error: No cluster leader");
    // The exchange in flight gets its real answer...
    put_direct(&agent, "k", b"v2").await;
    let r = join_within("the blocking query", query, DEADLINE)
        .await
        .expect("the blocking query is answered")
        .expect_status(200);
    assert_eq!(kv_value(&r), b64(b"v2"));
    // ...and the next request on that connection is answered by the proxy.
    let (up, down) = (proxy.bytes_up(), proxy.bytes_down());
    let r = http.get(&agent.kv_path("k")).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "rpc error: No cluster leader")
    );
    assert_eq!(proxy.accepted(), 1, "the keep-alive connection was reused");
    assert_eq!((proxy.bytes_up(), proxy.bytes_down()), (up, down));
    assert_eq!(proxy.upstream_connects(), 1);
}

#[test]
fn drop_closes_the_port_every_connection_and_the_thread() {
    let (_agent, proxy) = setup();
    let addr = proxy.addr();
    let mut forwarding = raw_connect(&proxy);
    assert_eq!(raw_leader(&mut forwarding), 200);
    proxy.set_mode(Mode::Blackhole);
    let mut waiting = raw_connect(&proxy);
    waiting
        .write_all(b"GET /v1/status/leader HTTP/1.1\r\n\r\n")
        .unwrap();
    wait_until_sync("the proxy accepted both connections", DEADLINE, || {
        proxy.connections().len() == 2
    });
    let thread = proxy.thread_name().to_string();
    assert!(thread_alive(&thread), "no thread named {thread}");

    drop(proxy);
    assert!(!thread_alive(&thread), "thread {thread} outlived the proxy");
    let refused = TcpStream::connect(addr);
    assert!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "the port still accepts connections: {refused:?}"
    );
    // Both connections are closed (EOF or reset), not left hanging until the read timeout.
    for (what, s) in [
        ("forwarding", &mut forwarding),
        ("black-holed", &mut waiting),
    ] {
        let mut buf = [0; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("the {what} connection was not closed: {other:?}"),
        }
    }
}
