//! Benchmarks for `consul-leader dev-agent`, written as ignored tests so they need no extra crates
//! and never run with the ordinary suite. Run them with:
//!
//! ```sh
//! cargo test --release --test bench_dev_agent -- --ignored --nocapture --test-threads 1
//! ```
//!
//! * `bench_request_throughput`: requests/second and latency percentiles for KV PUT, KV GET,
//!   acquire+release pairs and session create+destroy pairs, each with a few concurrent clients
//!   over keep-alive connections and a bounded number of requests.
//! * `bench_blocking_wakeup`: holds 1,000 concurrent blocking GETs, first on 1,000 distinct keys
//!   (then writes every key) and then on one key (then writes it once), and measures the time
//!   until every reader has been woken; also prints the dev agent's peak RSS (VmHWM).
//!
//! Everything is on loopback and bounded in count. The blocking benchmark opens about 1,000
//! sockets on each side: it needs `ulimit -n` well above 2,048. With `CONSUL_LEADER_TEST_ADDR` set
//! the same benchmarks run against that real agent (RSS is then not shown).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::task::JoinSet;

/// Concurrent clients for the throughput benchmark.
const CLIENTS: usize = 8;
/// Requests per operation (pairs count as two requests).
const REQUESTS: usize = 20_000;
/// Concurrent blocking readers.
const BLOCKERS: usize = 1_000;

/// One row of results.
struct Row {
    what: String,
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Row {
    fn print_header() {
        println!(
            "{:<34} {:>9} {:>8} {:>10} {:>12} {:>9} {:>9} {:>9}",
            "operation",
            "requests",
            "clients",
            "seconds",
            "requests/s",
            "p50 ms",
            "p99 ms",
            "max ms"
        );
        println!("{}", "-".repeat(106));
    }

    fn print(&mut self) {
        self.latencies.sort();
        let pct = |p: f64| -> f64 {
            if self.latencies.is_empty() {
                return f64::NAN;
            }
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i].as_secs_f64() * 1000.0
        };
        println!(
            "{:<34} {:>9} {:>8} {:>10.3} {:>12.0} {:>9.3} {:>9.3} {:>9.3}",
            self.what,
            self.requests,
            CLIENTS,
            self.elapsed.as_secs_f64(),
            self.requests as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(1.0),
        );
    }
}

/// Runs `per_client` iterations of `op` on each of `CLIENTS` clients (each its own keep-alive
/// connection pool) at once. `op(http, client, i)` returns how many requests it made.
async fn run_clients<F, Fut>(a: &DevAgent, what: &str, per_client: usize, op: F) -> Row
where
    F: Fn(Http, usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = usize> + Send,
{
    let op = Arc::new(op);
    let mut set = JoinSet::new();
    let started = Instant::now();
    for c in 0..CLIENTS {
        let http = Http::new(a.base_url());
        let op = Arc::clone(&op);
        set.spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            let mut n = 0;
            for i in 0..per_client {
                let t = Instant::now();
                n += op(http.clone(), c, i).await;
                lat.push(t.elapsed());
            }
            (n, lat)
        });
    }
    let mut requests = 0;
    let mut latencies = Vec::new();
    while let Some(r) = set.join_next().await {
        let (n, lat) = r.expect("client task");
        requests += n;
        latencies.extend(lat);
    }
    Row {
        what: what.to_string(),
        requests,
        elapsed: started.elapsed(),
        latencies,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: cargo test --release --test bench_dev_agent -- --ignored --nocapture"]
async fn bench_request_throughput() {
    let a = DevAgent::start();
    let prefix = a.prefix().to_string();
    let per_client = REQUESTS / CLIENTS;
    let mut rows = Vec::new();

    let p = prefix.clone();
    rows.push(
        run_clients(
            &a,
            "KV PUT (64 B, 100 keys/client)",
            per_client,
            move |h, c, i| {
                let path = format!("/v1/kv/{p}put/{c}/{}", i % 100);
                async move {
                    let body = format!("{i:064}");
                    assert!(h.put(&path, body).await.expect_bool());
                    1
                }
            },
        )
        .await,
    );

    for c in 0..CLIENTS {
        a.kv_put(&format!("get/{c}"), &[b'v'; 64]).await;
    }
    let p = prefix.clone();
    rows.push(
        run_clients(&a, "KV GET (64 B)", per_client, move |h, c, _| {
            let path = format!("/v1/kv/{p}get/{c}");
            async move {
                h.get(&path).await.expect_status(200);
                1
            }
        })
        .await,
    );

    let mut sessions = Vec::new();
    for _ in 0..CLIENTS {
        sessions.push(a.create_session(json!({"LockDelay": "0s"})).await);
    }
    let sessions = Arc::new(sessions);
    let p = prefix.clone();
    rows.push(
        run_clients(
            &a,
            "acquire+release pairs",
            per_client / 2,
            move |h, c, i| {
                let key = format!("/v1/kv/{p}lock/{c}");
                let s = sessions[c].clone();
                async move {
                    let r = h.put(&format!("{key}?acquire={s}"), format!("{i}")).await;
                    assert!(r.expect_bool());
                    let r = h.put(&format!("{key}?release={s}"), format!("{i}")).await;
                    assert!(r.expect_bool());
                    2
                }
            },
        )
        .await,
    );

    rows.push(
        run_clients(
            &a,
            "session create+destroy pairs",
            per_client / 2,
            move |h, _, _| async move {
                let id = create_session_with(&h, json!({"LockDelay": "0s"})).await;
                let r = h
                    .put(&format!("/v1/session/destroy/{id}"), Vec::new())
                    .await;
                assert!(r.expect_bool());
                2
            },
        )
        .await,
    );

    println!();
    println!(
        "dev agent throughput ({} build of the agent under test)",
        build_kind()
    );
    Row::print_header();
    for r in &mut rows {
        r.print();
    }
    print_rss(&a);
}

/// Starts `BLOCKERS` blocking GETs, one per path, and confirms they are all still pending.
async fn start_blockers(a: &DevAgent, paths: Vec<String>) -> JoinSet<(usize, Resp, Instant)> {
    // One client: its pool opens one connection per concurrent request.
    let http = Http::new(a.base_url());
    let mut set = JoinSet::new();
    for (n, path) in paths.into_iter().enumerate() {
        let http = http.clone();
        set.spawn(async move {
            let r = http.get(&path).await;
            (n, r, Instant::now())
        });
    }
    // Only confirms that they are all blocked (connections open, requests parked).
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(Ok((n, r, _))) = set.try_join_next() {
        panic!(
            "blocker {n} returned before any write: {} {}",
            r.status,
            r.text()
        );
    }
    set
}

/// Awaits every blocker; returns the instant the last one was woken.
async fn await_blockers(set: &mut JoinSet<(usize, Resp, Instant)>, after: Instant) -> Instant {
    let mut last = after;
    let deadline = Duration::from_secs(120);
    let mut woken = 0;
    while let Some(r) = tokio::time::timeout(deadline, set.join_next())
        .await
        .unwrap_or_else(|_| panic!("only {woken} of {BLOCKERS} blockers woke within {deadline:?}"))
    {
        let (n, r, at) = r.expect("blocker task");
        assert_eq!(r.status, 200, "blocker {n}: {}", r.text());
        last = last.max(at);
        woken += 1;
    }
    assert_eq!(woken, BLOCKERS);
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: cargo test --release --test bench_dev_agent -- --ignored --nocapture"]
async fn bench_blocking_wakeup() {
    let a = DevAgent::start();

    // 1,000 readers on 1,000 distinct keys; then every key is written (8 writers).
    let writer = Http::new(a.base_url());
    let mut paths = Vec::new();
    for k in 0..BLOCKERS {
        let key = a.kv_path(&format!("many/{k}"));
        let r = writer.put(&key, "v0").await;
        assert!(r.expect_bool());
        let i = writer.get(&key).await.index();
        paths.push(format!("{key}?index={i}&wait=5m"));
    }
    let mut set = start_blockers(&a, paths).await;
    let rss_blocked_many = a.pid().and_then(peak_rss_kib);
    let wrote = Instant::now();
    let mut writers = JoinSet::new();
    for w in 0..CLIENTS {
        let http = writer.clone();
        let keys: Vec<String> = (w..BLOCKERS)
            .step_by(CLIENTS)
            .map(|k| a.kv_path(&format!("many/{k}")))
            .collect();
        writers.spawn(async move {
            for key in keys {
                assert!(http.put(&key, "v1").await.expect_bool());
            }
        });
    }
    while let Some(r) = writers.join_next().await {
        r.expect("writer");
    }
    let writes_done = wrote.elapsed();
    let many_last = await_blockers(&mut set, wrote).await;

    // 1,000 readers on one key; then one write.
    let hot = a.kv_path("hot");
    assert!(writer.put(&hot, "v0").await.expect_bool());
    let i = writer.get(&hot).await.index();
    let mut set = start_blockers(&a, vec![format!("{hot}?index={i}&wait=5m"); BLOCKERS]).await;
    let rss_blocked_one = a.pid().and_then(peak_rss_kib);
    let wrote_one = Instant::now();
    assert!(writer.put(&hot, "v1").await.expect_bool());
    let one_last = await_blockers(&mut set, wrote_one).await;

    println!();
    println!(
        "dev agent blocking wake-up, {BLOCKERS} concurrent readers ({} build of the agent)",
        build_kind()
    );
    println!("{:<52} {:>14}", "measure", "value");
    println!("{}", "-".repeat(67));
    println!(
        "{:<52} {:>11.1} ms",
        "distinct keys: writing all keys (8 writers)",
        ms(writes_done)
    );
    println!(
        "{:<52} {:>11.1} ms",
        "distinct keys: first write -> last reader woken",
        ms(many_last - wrote)
    );
    println!(
        "{:<52} {:>11.1} ms",
        "one key: the write -> last reader woken",
        ms(one_last - wrote_one)
    );
    println!(
        "{:<52} {:>14}",
        "peak RSS with readers blocked (distinct keys)",
        kib(rss_blocked_many)
    );
    println!(
        "{:<52} {:>14}",
        "peak RSS with readers blocked (one key)",
        kib(rss_blocked_one)
    );
    print_rss(&a);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn kib(v: Option<u64>) -> String {
    v.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".to_string())
}

fn print_rss(a: &DevAgent) {
    println!(
        "{:<52} {:>14}",
        "dev agent peak RSS (VmHWM) at the end",
        kib(a.pid().and_then(peak_rss_kib))
    );
}

fn build_kind() -> &'static str {
    if DevAgent::is_real() {
        "real agent"
    } else if cfg!(debug_assertions) {
        "DEBUG (use --release for real numbers)"
    } else {
        "release"
    }
}
