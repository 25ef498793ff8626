//! `consul-leader demo`: the main job, shown end to end in a few seconds on any machine. It starts
//! a throwaway dev agent on a free port, then two wrappers ("alice" and "bob") that contend for the
//! same key with the same command, and walks through what an operator cares about: one leads, the
//! other waits as a standby, and when the leader stops, the standby takes over at once because the
//! leader released cleanly. Every line the wrappers and their commands print is shown, prefixed
//! with who printed it. Everything it started is stopped before it returns.
//!
//! It drives the real binary (`std::env::current_exe`) exactly as an operator would, so it also
//! checks an installation.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::exit;

/// How long any one step may take before the demo gives up.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// How long the demo lets a state be seen before it moves on (pacing for a human reader).
const PAUSE: Duration = Duration::from_secs(2);
const KEY: &str = "demo/report";
/// The job both hosts run: it says who it is and its fencing token, then works until stopped.
const JOB: &str = r#"echo "report job: started, fencing token $CONSUL_LEADER_FENCING_TOKEN"
trap 'echo "report job: stopping"; exit 0' TERM
while :; do sleep 0.2 & wait $! 2>/dev/null; done"#;

/// A line from one of the demo's processes.
struct Line {
    who: &'static str,
    text: String,
}

/// One process of the demo; stopped (TERM, then KILL) and reaped on drop.
struct Proc {
    who: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(
        who: &'static str,
        mut cmd: Command,
        lines: &mpsc::Sender<Line>,
    ) -> Result<Proc, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to send SIGTERM to this
        // process should the demo die first (even by SIGKILL), so nothing is left running.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {who}: {e}"))?;
        forward(who, child.stdout.take(), lines);
        forward(who, child.stderr.take(), lines);
        Ok(Proc { who, child })
    }

    fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits for the process to exit; false after `deadline`.
    fn wait(&mut self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn stop(&mut self) -> Result<(), String> {
        self.signal(Signal::SIGTERM);
        if self.wait(STEP_DEADLINE) {
            Ok(())
        } else {
            Err(format!(
                "{} did not stop within {STEP_DEADLINE:?}",
                self.who
            ))
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(Signal::SIGTERM);
            if !self.wait(Duration::from_secs(5)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn forward(
    who: &'static str,
    stream: Option<impl Read + Send + 'static>,
    lines: &mpsc::Sender<Line>,
) {
    let Some(stream) = stream else { return };
    let tx = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(Line { who, text: line }).is_err() {
                break;
            }
        }
    });
}

/// Shows the lines as they come, until one satisfies `done`.
fn until(
    lines: &mpsc::Receiver<Line>,
    what: &str,
    done: impl Fn(&Line) -> bool,
) -> Result<String, String> {
    let end = Instant::now() + STEP_DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                show(&line);
                if done(&line) {
                    return Ok(line.text);
                }
            }
            Err(_) => return Err(format!("{what} did not happen within {STEP_DEADLINE:?}")),
        }
    }
}

/// Shows whatever arrives during `pause`.
fn pause(lines: &mpsc::Receiver<Line>, pause: Duration) {
    let end = Instant::now() + pause;
    while let Ok(line) = lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
        show(&line);
    }
}

fn show(line: &Line) {
    println!("{:<9} {}", format!("[{}]", line.who), line.text);
}

fn say(text: &str) {
    println!();
    println!("==> {text}");
}

pub fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consul-leader demo: {e}");
            ExitCode::from(exit::INTERNAL)
        }
    }
}

fn demo() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let (tx, lines) = mpsc::channel();

    say("starting a throwaway dev agent (an in-memory stand-in for Consul) on a free port");
    let mut agent_cmd = Command::new(&exe);
    agent_cmd.args([
        "dev-agent",
        "--listen",
        "127.0.0.1:0",
        "--session-ttl-min",
        "1s",
        "--node",
        "demo",
    ]);
    let mut agent = Proc::spawn("agent", agent_cmd, &tx)?;
    let listening = until(&lines, "the dev agent's start", |l| {
        l.who == "agent" && l.text.starts_with("dev-agent listening on ")
    })?;
    let addr = listening
        .trim_start_matches("dev-agent listening on ")
        .trim()
        .to_string();

    let wrapper = |who: &'static str| -> Result<Proc, String> {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "run",
            "--key",
            KEY,
            "--ttl",
            "3s",
            // Lock-delay and silence must cover the TTL (a cut-off leader keeps its command up
            // to a TTL); a clean release skips both, so the handover is still immediate.
            "--lock-delay",
            "3s",
            "--silence",
            "3s",
            "--grace",
            "1s",
            "--shell",
            "--",
            JOB,
        ])
        .env("CONSUL_HTTP_ADDR", &addr)
        // The dev agent above accepts TTLs down to 1s; Consul's own minimum is 10s.
        .env("CONSUL_LEADER_TTL_MIN", "1s")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_HTTP_TOKEN_FILE")
        .env_remove("CONSUL_LEADER_LOG")
        .env_remove("NOTIFY_SOCKET");
        Proc::spawn(who, cmd, &tx)
    };

    say(&format!(
        "alice runs: consul-leader run --key {KEY} -- <report job>   (the key is free: alice leads)"
    ));
    let mut alice = wrapper("alice")?;
    until(&lines, "alice's job start", |l| {
        l.who == "alice" && l.text.starts_with("report job: started")
    })?;

    say("bob runs the same command on another host: the key is held, so bob waits as a standby");
    let mut bob = wrapper("bob")?;
    until(&lines, "bob's wait", |l| {
        l.who == "bob" && l.text.contains("waiting for the lock")
    })?;
    pause(&lines, PAUSE);

    say(
        "alice is told to stop (SIGTERM, as on a shutdown): it stops its job, releases the lock cleanly, and bob takes over at once",
    );
    alice.signal(Signal::SIGTERM);
    until(&lines, "bob's job start", |l| {
        l.who == "bob" && l.text.starts_with("report job: started")
    })?;
    if !alice.wait(STEP_DEADLINE) {
        return Err("alice did not exit after SIGTERM".into());
    }
    pause(&lines, PAUSE);

    say("bob is stopped too, and the dev agent with it");
    bob.stop()?;
    agent.stop()?;
    drop(tx);
    // The reader threads end with their pipes; show what they still had.
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
        show(&line);
    }

    say("done. One leader at a time, a standby that waited, a clean handover. Next:");
    println!(
        "      consul-leader run --help      (every option; `man consul-leader-run` once installed)"
    );
    println!("      consul-leader status --help   (who holds a key)");
    Ok(())
}
