//! The README's recipes, run as written against a dev agent: the crontab lines (through `sh -c`
//! with the crontab's own PATH, as cron runs them), the shell script's `case` on each exit code it
//! handles, and the `consul lock` migration key that makes both tools exclude each other.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::leader::{Fixture, LOCK_FLAGS, acquire_as_lock, agent};
use common::{DevAgent, bin_path};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The first fenced block of `lang` after `heading`.
fn block(readme: &str, heading: &str, lang: &str) -> String {
    let section = readme
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README.md has no `{heading}`"));
    section
        .split(&format!("```{lang}\n"))
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("no ```{lang} block after `{heading}`"))
        .to_string()
}

/// A directory holding `consul-leader` (the binary under test) and `report`, a job that writes
/// its arguments to a file: the stand-ins for what the recipes name under /usr/local/bin.
fn bin_dir(fx: &Fixture) -> PathBuf {
    let dir = fx.dir.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(bin_path(), dir.join("consul-leader")).unwrap();
    let job = dir.join("report");
    std::fs::write(
        &job,
        format!("#!/bin/sh\necho ran >> {}\n", fx.dir.join("ran").display()),
    )
    .unwrap();
    std::fs::set_permissions(&job, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn sh(script: &str, dir: &Path, agent: &DevAgent) -> Output {
    Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .env("CONSUL_HTTP_ADDR", agent.addr())
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_LEADER_LOG")
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_crontab_lines_run_the_job_once_and_stay_quiet() {
    let (agent, _) = agent();
    let fx = Fixture::new();
    let bin = bin_dir(&fx);
    let crontab = block(&readme(), "### cron: run on one host of many", "cron");
    let mut lines = crontab.lines();
    let path_line = lines.next().unwrap();
    assert!(path_line.starts_with("PATH=") && path_line.contains("/usr/local/bin"));
    let entry = lines.next().unwrap();
    // Five time fields, then the command, which cron runs with `sh -c`.
    let command = entry
        .split_whitespace()
        .skip(5)
        .collect::<Vec<_>>()
        .join(" ");
    let key = agent.key("cron");
    let command = command
        .replace("cron/report", &key)
        .replace("/usr/local/bin/", &format!("{}/", bin.display()));
    let script = format!("PATH={}:/usr/bin:/bin; {command}", bin.display());
    let o = sh(&script, &fx.dir, &agent);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "cron would mail: {o:?}"
    );
    assert_eq!(
        std::fs::read_to_string(fx.dir.join("ran")).unwrap(),
        "ran\n"
    );

    // While another host holds the key, the line exits 75 at once, silently.
    let other = agent
        .create_session(serde_json::json!({"Name": "other host"}))
        .await;
    assert!(acquire_as_lock(&agent, "cron", &other, b"").await);
    let o = sh(&script, &fx.dir, &agent);
    assert_eq!(o.status.code(), Some(75), "{o:?}");
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "cron would mail: {o:?}"
    );
    agent.destroy_session(&other).await;
}

#[tokio::test]
async fn the_shell_recipe_tells_each_outcome_apart() {
    let (agent, timing) = agent();
    let fx = Fixture::new();
    let bin = bin_dir(&fx);
    let recipe = block(
        &readme(),
        "### shell scripts: a critical section across hosts",
        "sh",
    );
    assert!(recipe.contains("125)") && recipe.contains("126|127)") && recipe.contains("2)"));
    let key = agent.key("migrate");
    let migrate = fx.dir.join("migrate.sh");
    let run = |body: &str, addr: &str| {
        std::fs::write(&migrate, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&migrate, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = format!(
            "PATH={}:$PATH\nexport CONSUL_LEADER_TTL_MIN=1s\n{}",
            bin.display(),
            recipe.replace("deploy/db-migrate", &key).replace(
                "--wait 2m",
                &format!("--wait 2m --ttl {} --grace {}", timing.ttl, timing.grace)
            )
        );
        let o = Command::new("bash")
            .args(["-c", &script])
            .current_dir(&fx.dir)
            .env("CONSUL_HTTP_ADDR", addr)
            .env_remove("CONSUL_HTTP_TOKEN")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, err) = run("exit 0", agent.addr());
    assert_eq!((code, out.as_str()), (Some(0), "migrated\n"), "{err}");
    let (code, _, err) = run("exit 3", agent.addr());
    assert_eq!(code, Some(1));
    assert!(err.contains("migration failed (exit 3)"), "{err}");
    let (code, _, err) = run("exit 0", "127.0.0.1:1");
    assert_eq!(code, Some(1));
    assert!(err.contains("Consul could not be asked"), "{err}");
    std::fs::remove_file(&migrate).unwrap();
    let (code, _, err) = run_missing(&recipe, &bin, &fx, agent.addr(), &key);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot be run"), "{err}");
}

/// The recipe with no `./migrate.sh` at all: consul-leader exits 127.
fn run_missing(
    recipe: &str,
    bin: &Path,
    fx: &Fixture,
    addr: &str,
    key: &str,
) -> (Option<i32>, String, String) {
    let script = format!(
        "PATH={}:$PATH\n{}",
        bin.display(),
        recipe.replace("deploy/db-migrate", key)
    );
    let o = Command::new("bash")
        .args(["-c", &script])
        .current_dir(&fx.dir)
        .env("CONSUL_HTTP_ADDR", addr)
        .env_remove("CONSUL_HTTP_TOKEN")
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `consul lock PREFIX` holds `PREFIX/.lock` with the api.Lock flag value; consul-leader given
/// that key as the migration table says waits for it (and exits 75 with `--wait 0`).
#[tokio::test]
async fn the_migration_key_excludes_consul_lock_holders() {
    let (agent, _) = agent();
    let readme = readme();
    let table = readme
        .split("### Migrating from `consul lock`")
        .nth(1)
        .unwrap();
    assert!(table.contains("| `PREFIX` | `--key PREFIX/.lock` |"));
    // What `consul lock jobs/report ...` holds.
    let session = agent
        .create_session(serde_json::json!({"Name": "Consul lock for 'report' at 'jobs/report'"}))
        .await;
    assert!(acquire_as_lock(&agent, "jobs/report/.lock", &session, b"").await);
    let entry = agent.kv_entry("jobs/report/.lock").await.unwrap();
    assert_eq!(entry["Flags"].as_u64(), Some(LOCK_FLAGS));
    let o = Command::new(bin_path())
        .args([
            "run",
            "--key",
            &agent.key("jobs/report/.lock"),
            "--wait",
            "0",
            "--",
            "true",
        ])
        .env("CONSUL_HTTP_ADDR", agent.addr())
        .env_remove("CONSUL_HTTP_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(75), "{o:?}");
    agent.destroy_session(&session).await;
}
