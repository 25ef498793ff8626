//! A slow agent is not a lost leadership: a leader behind a fault proxy that delays every chunk
//! (so each request takes two to four times the delay) for a fixed while, counting renews sent
//! and answered, false losses and how long the command ran. Ignored: run on demand with
//!
//! ```sh
//! cargo test --release --test bench_slow_agent -- --ignored --nocapture
//! ```
//!
//! `CONSUL_LEADER_BENCH_SECS` (default 120) sets how long each case runs. The cases are the
//! issue's: `--ttl 10s --grace 500ms` with 2-4s added to every request, and the defaults with the
//! same delay.

mod common;

use std::time::{Duration, Instant};

use common::DevAgent;
use common::leader::{DEADLINE, Fixture, Timing, WrapperBuilder, clean_key, exit_of};
use common::proxy::{FaultProxy, Mode};
use nix::sys::signal::Signal;

fn secs() -> u64 {
    std::env::var("CONSUL_LEADER_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120)
}

/// Holds the slow phase for its length: the length is the benchmark's input.
fn hold(d: Duration) {
    std::thread::sleep(d);
}

struct Outcome {
    sent: usize,
    answered: usize,
    losses: usize,
    command_ran: Duration,
}

async fn case(agent: &DevAgent, name: &str, timing: &Timing, delay: Duration) -> Outcome {
    let proxy = FaultProxy::start(agent.addr().parse().unwrap());
    let fx = Fixture::new();
    let key = agent.key(name);
    clean_key(agent, name).await;
    let mut w = WrapperBuilder::new(agent, &fx, &key, timing)
        .env("CONSUL_HTTP_ADDR", &proxy.addr().to_string())
        .env("CONSUL_LEADER_LOG", "consul_leader=debug")
        .flag("--on-lost", "recontend")
        .spawn();
    fx.wait_journal("the command runs", |ev| {
        ev.iter().any(|e| e.is_main_start())
    });
    let log_before = w.stderr_text().len();
    proxy.set_mode(Mode::Delay(delay));
    let started = Instant::now();
    hold(Duration::from_secs(secs()));
    let elapsed = started.elapsed();
    proxy.set_mode(Mode::Pass);
    let log = w.stderr_text()[log_before..].to_string();
    let answered = log.matches("renewed session").count();
    let failed = log.matches("session renew failed").count();
    let losses = log.matches("lost leadership").count();
    // The command ran except between each loss and the next start.
    let events = fx.events();
    let stops = events.iter().filter(|e| e.kind == "signal").count();
    let command_ran = if stops == 0 { elapsed } else { Duration::ZERO };
    w.signal(Signal::SIGTERM);
    let _ = exit_of(&mut w);
    fx.wait_none_left(DEADLINE);
    Outcome {
        sent: answered + failed,
        answered,
        losses,
        command_ran,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark; see the module docs"]
async fn bench_slow_agent_renews_and_false_losses() {
    let Some(agent) = DevAgent::builder().start() else {
        return;
    };
    let ttl10 = Timing {
        ttl: "10s",
        lock_delay: "10s",
        silence: "10s",
        grace: "500ms",
    };
    let defaults = Timing {
        ttl: "15s",
        lock_delay: "15s",
        silence: "15s",
        grace: "5s",
    };
    let delay = Duration::from_millis(1000);
    let mut out = format!(
        "a slow agent for {}s: every chunk held {delay:?} (2-4s a request)\n",
        secs()
    );
    for (name, timing) in [("--ttl 10s --grace 500ms", &ttl10), ("defaults", &defaults)] {
        let o = case(&agent, &format!("slow-{}", name.len()), timing, delay).await;
        out += &format!(
            "{name:<26} renews answered {:>4} (of about {:>4} that ended), false losses {}, the command ran {:.0}s without a stop\n",
            o.answered,
            o.sent,
            o.losses,
            o.command_ran.as_secs_f64()
        );
    }
    eprintln!("{out}");
}
