//! The README's Quick start, as a newcomer runs it: its first command is `consul-leader demo`
//! (through cargo), which must show a leader, a standby and a handover, end by itself with exit 0,
//! and leave no process behind.

mod common;

use std::process::Command;

use common::bin_path;
use common::leader::{DEADLINE, MARKER_ENV, marked_processes};

/// The shell commands of the README's Quick start block, in order.
fn quick_start_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## Quick start")
        .nth(1)
        .expect("README.md has a Quick start section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Quick start has a sh block");
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_quick_start_runs_the_demo_then_the_tests() {
    let cmds = quick_start_commands();
    assert_eq!(
        cmds,
        ["cargo run -- demo", "cargo test"],
        "the Quick start's commands changed; this test runs the first as `consul-leader demo`"
    );
}

#[test]
fn the_demo_shows_a_leader_a_standby_and_a_handover_and_cleans_up() {
    let marker = format!("demo-{}", common::unique(10));
    let start = std::time::Instant::now();
    let out = Command::new(bin_path())
        .arg("demo")
        .env(MARKER_ENV, &marker)
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_LEADER_LOG")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "status {:?}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(start.elapsed() < DEADLINE, "{report}");

    // In this order: alice leads, bob waits, alice releases, bob leads, with a higher token.
    let steps = [
        "[alice]   report job: started, fencing token ",
        "[bob]     ",
        "waiting for the lock on demo/report",
        "[alice]   report job: stopping",
        "released the lock on demo/report",
        "[bob]     report job: started, fencing token ",
        "[bob]     report job: stopping",
        "==> done.",
    ];
    let token = |who: &str| -> u64 {
        let prefix = format!("[{who}]");
        stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .find_map(|l| l.split("report job: started, fencing token ").nth(1))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no fencing token for {who}\n{report}"))
    };
    assert!(token("bob") > token("alice"), "{report}");
    assert!(!stdout.contains("Terminated"), "{report}");
    let mut rest: &str = &stdout;
    for step in steps {
        let at = rest
            .find(step)
            .unwrap_or_else(|| panic!("`{step}` missing or out of order\n{report}"));
        rest = &rest[at + step.len()..];
    }

    let left = marked_processes(&marker);
    assert!(left.is_empty(), "the demo left processes: {left:?}");
}
