//! The checked-in man pages and shell completions, used the way an operator meets them: each page
//! through `man -l` at 80 columns, and each completion script inside a real bash, zsh and fish.
//! A test whose tool is missing says so and skips; CI (`.ci/run`) installs them all.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `tool` can be run; prints why a test skips when not.
fn have(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        common::skip(
            test,
            &format!("`{tool}` is not installed (CI installs it; apt-get install {tool})"),
        );
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Man pages
// ---------------------------------------------------------------------------------------------

fn pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("man"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    pages.sort();
    pages
}

/// The page as `MANWIDTH=80 man -l` prints it, and groff's warnings.
fn render(page: &Path) -> (String, String) {
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("run man");
    assert!(out.status.success(), "man -l {}: {out:?}", page.display());
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of one section of a rendered page (up to the next heading).
fn section<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .collect()
}

#[test]
fn man_pages_read_well_at_80_columns() {
    const TEST: &str = "man_pages_read_well_at_80_columns";
    if !have("man", TEST) || !have("groff", TEST) {
        return;
    }
    let pages = pages();
    assert_eq!(pages.len(), 5, "{pages:?}");
    for page in &pages {
        let name = page.file_stem().unwrap().to_str().unwrap();
        let (text, warnings) = render(page);
        let what = format!("{name}(1):\n{text}");
        assert_eq!(warnings.trim(), "", "groff warnings for {what}");
        for line in text.lines() {
            assert!(
                line.chars().count() <= 80,
                "wider than 80 columns in {name}: {line}"
            );
        }
        for heading in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "EXIT STATUS",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            assert!(text.lines().any(|l| l == heading), "no {heading} in {what}");
        }
        assert!(!text.contains("EXTRA"), "{what}");
        assert!(!text.contains("<--"), "a <--flag> form in {what}");
        // NAME names the page; SYNOPSIS shows the command line as it is typed.
        let sub = name.strip_prefix("consul-leader-");
        let synopsis = section(&text, "SYNOPSIS").join("\n");
        match sub {
            Some(sub) => assert!(
                synopsis.contains(&format!("consul-leader {sub}")),
                "{synopsis}"
            ),
            None => assert!(
                synopsis.contains("consul-leader run [OPTIONS]"),
                "{synopsis}"
            ),
        }
        assert!(!synopsis.contains(name) || sub.is_none(), "{synopsis}");
        // SEE ALSO names only pages that exist, and consul(1).
        let see_also = section(&text, "SEE ALSO").join(" ");
        for word in see_also.split([' ', ',']) {
            let Some(page_name) = word.strip_suffix("(1)") else {
                continue;
            };
            assert!(
                page_name == "consul" || repo().join(format!("man/{page_name}.1")).exists(),
                "{name} refers to {page_name}(1), which does not exist"
            );
        }
        assert!(see_also.contains("consul(1)"), "{see_also}");
    }
}

#[test]
fn the_run_page_has_the_exact_command_line_environment_and_verbatim_examples() {
    const TEST: &str = "the_run_page_has_the_exact_command_line_environment_and_verbatim_examples";
    if !have("man", TEST) || !have("groff", TEST) {
        return;
    }
    let (text, _) = render(&repo().join("man/consul-leader-run.1"));
    let synopsis = section(&text, "SYNOPSIS").join("\n");
    assert!(
        synopsis.contains("consul-leader run [OPTIONS] --key KEY -- COMMAND [ARGS]..."),
        "{synopsis}"
    );

    // Every variable the program reads or sets for the command, documented in ENVIRONMENT.
    let env = section(&text, "ENVIRONMENT").join("\n");
    let mut vars = std::collections::BTreeSet::new();
    for file in [
        "src/config.rs",
        "src/logging.rs",
        "src/app.rs",
        "src/notify.rs",
    ] {
        let source = std::fs::read_to_string(repo().join(file)).unwrap();
        for piece in source.split('"').skip(1).step_by(2) {
            if piece.starts_with("CONSUL_")
                && piece.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            {
                vars.insert(piece.to_string());
            }
        }
    }
    vars.insert("NOTIFY_SOCKET".into());
    assert!(vars.len() >= 15, "{vars:?}");
    for var in &vars {
        assert!(
            env.lines().any(|l| l.trim() == var),
            "{var} is not in the ENVIRONMENT section:\n{env}"
        );
    }

    // Examples are shown as typed: the long command line on one line, not re-filled.
    let examples = section(&text, "EXAMPLES").join("\n");
    assert!(
        examples.contains(
            "\n           consul-leader run --key jobs/report -- /usr/local/bin/report --daily\n"
        ),
        "{examples}"
    );
    assert!(
        examples.contains("consul-leader run --key jobs/sync \\\n"),
        "{examples}"
    );
    // The exit status table.
    let exit = section(&text, "EXIT STATUS").join("\n");
    for code in ["75", "76", "125", "126", "127", "128+N"] {
        assert!(
            exit.lines().any(|l| l.trim_start().starts_with(code)),
            "{code}: {exit}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Shell completions
// ---------------------------------------------------------------------------------------------

/// What each shell must offer for a command line: (line, candidates that must be there).
const CASES: &[(&str, &[&str])] = &[
    ("consul-leader ", &["run", "status", "dev-agent", "demo"]),
    ("consul-leader run --k", &["--key"]),
    ("consul-leader run --on-", &["--on-lost"]),
    ("consul-leader run --on-lost ", &["exit", "recontend"]),
    ("consul-leader run --log-format ", &["text", "json"]),
    (
        "consul-leader run --stop-signal ",
        &["TERM", "INT", "HUP", "QUIT", "USR1"],
    ),
    ("consul-leader status --j", &["--json"]),
    ("consul-leader dev-agent --session", &["--session-ttl-min"]),
    ("consul-leader help ", &["run", "status"]),
];

/// Never offered, whatever is typed.
const HIDDEN: &[&str] = &["generate-docs", "--out-dir"];

fn check(shell: &str, line: &str, offered: &[String], want: &[&str]) {
    for w in want {
        assert!(
            offered.iter().any(|o| o == w),
            "{shell} offers {offered:?} for `{line}`, without {w}"
        );
    }
    for h in HIDDEN {
        assert!(
            !offered.iter().any(|o| o == h),
            "{shell} offers the hidden {h} for `{line}`"
        );
    }
}

#[test]
fn bash_completes_subcommands_flags_and_values() {
    if !have("bash", "bash_completes_subcommands_flags_and_values") {
        return;
    }
    let script = repo().join("completions/consul-leader.bash");
    for (line, want) in CASES.iter().chain(&[("consul-leader ge", &[][..])]) {
        // As bash calls a completion function: the words, the index of the current one, and the
        // command, current word and previous word as arguments.
        let program = r#"
            source "$1"
            read -ra COMP_WORDS <<<"$2"
            [[ $2 == *" " ]] && COMP_WORDS+=("")
            COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
            COMP_LINE=$2
            COMP_POINT=${#2}
            _consul__leader consul-leader "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            printf '%s\n' "${COMPREPLY[@]}"
        "#;
        let out = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", program, "bash"])
            .arg(&script)
            .arg(line)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let offered: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        check("bash", line, &offered, want);
    }
}

#[test]
fn zsh_completes_subcommands_flags_and_values() {
    if !have("zsh", "zsh_completes_subcommands_flags_and_values") {
        return;
    }
    for (line, want) in CASES {
        let out = Command::new("zsh")
            .arg(repo().join("tests/fixtures/zsh-complete.zsh"))
            .arg(repo().join("completions"))
            .arg(line)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let offered: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        check("zsh", line, &offered, want);
    }
}

#[test]
fn fish_completes_subcommands_flags_and_values() {
    if !have("fish", "fish_completes_subcommands_flags_and_values") {
        return;
    }
    let script = repo().join("completions/consul-leader.fish");
    for (line, want) in CASES {
        let out = Command::new("fish")
            .args([
                "--no-config",
                "-c",
                "source $argv[1]; complete --do-complete=$argv[2]",
            ])
            .arg(&script)
            .arg(line)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // Each candidate, then a tab and its description.
        let offered: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').next().unwrap_or("").to_string())
            .collect();
        check("fish", line, &offered, want);
    }
}
