//! Man pages and shell completions, generated from the clap definitions so they can never
//! disagree with `--help`. `consul-leader generate-docs` (hidden) writes them into `man/` and
//! `completions/`; a unit test fails when the checked-in files drift from the code.
//!
//! The prose that `--help` shows after the options (exit codes, examples) lives here too, once,
//! and feeds both `--help` and the man pages. Man pages are written with `roff` directly rather
//! than `clap_mangen`, whose pages name a subcommand `consul-leader-run` in the synopsis, print
//! `<--key>` forms, re-fill the examples under an "EXTRA" heading, point at a `help` page that does
//! not exist, and have no ENVIRONMENT or EXIT STATUS section.

use std::io;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, CommandFactory};
use clap_complete::Shell;
use roff::{Inline, Roff, bold, italic, roman};

use crate::cli::Cli;

/// The program's name, as installed and as written in every page.
const NAME: &str = "consul-leader";

/// One subcommand's documentation beyond its options.
pub struct Page {
    /// The subcommand (`run`), or `""` for the program itself.
    pub command: &'static str,
    /// Usage lines, without the program name.
    pub synopsis: &'static [&'static str],
    /// Paragraphs of the man page's DESCRIPTION, after the command's own `about`.
    pub description: &'static [&'static str],
    /// (code, meaning).
    pub exit_codes: &'static [(&'static str, &'static str)],
    /// (what it does, the command line).
    pub examples: &'static [(&'static str, &'static str)],
    /// The variables the command reads, and those its command receives.
    pub env: &'static [(&'static str, &'static str)],
    pub child_env: &'static [(&'static str, &'static str)],
}

/// How to reach Consul: read by `run` and `status`, as by Consul's own CLI. An empty value counts
/// as unset.
const CONNECTION_ENV: &[(&str, &str)] = &[
    (
        "CONSUL_HTTP_ADDR",
        "The Consul agent's HTTP address: host:port, http://host:port, https://host:port or \
         unix:///path/to.sock (--http-addr wins). Default 127.0.0.1:8500. A host without a port \
         goes to port 80 (443 for https), as with Consul's CLI.",
    ),
    (
        "CONSUL_HTTP_TOKEN",
        "The ACL token. Never logged, never passed to the command.",
    ),
    (
        "CONSUL_HTTP_TOKEN_FILE",
        "A file holding the ACL token; wins over CONSUL_HTTP_TOKEN, while --token-file and \
         --token win over both. An empty file is refused.",
    ),
    (
        "CONSUL_HTTP_AUTH",
        "HTTP basic authentication for the agent, as user:password.",
    ),
    (
        "CONSUL_HTTP_SSL",
        "true: use https for an address without a scheme.",
    ),
    (
        "CONSUL_HTTP_SSL_VERIFY",
        "false: accept any server certificate (for testing only).",
    ),
    (
        "CONSUL_CACERT",
        "A CA certificate file (PEM) to verify the agent with (--ca-file wins).",
    ),
    (
        "CONSUL_CAPATH",
        "A directory of CA certificates (PEM); not read when a CA file is given (--ca-path wins).",
    ),
    (
        "CONSUL_CLIENT_CERT",
        "A client certificate (PEM) for agents that verify clients; needs CONSUL_CLIENT_KEY \
         (--client-cert wins).",
    ),
    (
        "CONSUL_CLIENT_KEY",
        "The client certificate's private key (PEM) (--client-key wins).",
    ),
    (
        "CONSUL_TLS_SERVER_NAME",
        "The name to verify the agent's certificate against, if not the address's host \
         (--tls-server-name wins).",
    ),
    (
        "CONSUL_NAMESPACE",
        "Consul Enterprise namespace (--namespace wins); Consul CE refuses it.",
    ),
    (
        "CONSUL_PARTITION",
        "Consul Enterprise admin partition (--partition wins); Consul CE refuses it.",
    ),
    (
        "ETCDCTL_ENDPOINTS",
        "Use etcd at these comma-separated endpoints instead of Consul (--etcd-endpoints wins).",
    ),
    (
        "ETCDCTL_CACERT",
        "A CA certificate (PEM) to verify etcd with (--etcd-cacert wins).",
    ),
    (
        "ETCDCTL_CERT",
        "A client certificate (PEM) for etcd; needs ETCDCTL_KEY (--etcd-cert wins).",
    ),
    (
        "ETCDCTL_KEY",
        "The etcd client certificate's private key (PEM) (--etcd-key wins).",
    ),
    (
        "ETCDCTL_USER",
        "The etcd user, NAME or NAME:PASSWORD (--etcd-user wins). Never passed to the command.",
    ),
    (
        "ETCDCTL_PASSWORD",
        "The etcd user's password (--etcd-password wins). Never passed to the command.",
    ),
];

const RUN_ENV: &[(&str, &str)] = &[
    (
        "CONSUL_LEADER_TTL_MIN",
        "The agent's session_ttl_min, when it is lowered below Consul's 10s (a test agent, \
         consul-leader dev-agent --session-ttl-min): --ttl is refused below this value.",
    ),
    (
        "CONSUL_LEADER_LOG",
        "A tracing filter directive that overrides -q and -v, for troubleshooting, for example \
         consul_leader=trace.",
    ),
    (
        "NOTIFY_SOCKET",
        "Set by systemd for Type=notify units: consul-leader sends READY=1 once it contends, \
         STATUS= lines that say who leads, STOPPING=1 when it stops, and, when WATCHDOG_USEC is \
         set, WATCHDOG=1 only while its session renews. Removed from the command's environment, \
         with WATCHDOG_USEC and WATCHDOG_PID.",
    ),
];

const RUN_CHILD_ENV: &[(&str, &str)] = &[
    ("CONSUL_LEADER_KEY", "The key."),
    (
        "CONSUL_LEADER_SESSION",
        "The Consul session that holds it (on etcd, the lease id).",
    ),
    (
        "CONSUL_LEADER_FENCING_TOKEN",
        "A number that grows with every new holder of the key: store it with every write \
         downstream and refuse writes that carry a smaller one than the last seen, so an old \
         leader can never overwrite a new one.",
    ),
    (
        "CONSUL_LOCK_HELD",
        "true, for scripts written for consul lock. CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, \
         ETCDCTL_USER, ETCDCTL_PASSWORD, NOTIFY_SOCKET and WATCHDOG_* are removed; everything \
         else is passed on.",
    ),
    (
        "ETCD_LOCK_KEY",
        "On etcd only: the holder's key, NAME/<lease id>, as etcdctl lock sets it.",
    ),
    (
        "ETCD_LOCK_REV",
        "On etcd only: the revision of the transaction that gave the lock, as etcdctl lock sets \
         it (the fencing token is the key's create revision).",
    ),
];

const RUN_EXIT: &[(&str, &str)] = &[
    ("N", "The command exited with code N."),
    ("128+N", "The command was killed by signal N."),
    ("75", "Not leader within --wait (--busy-exit-code)."),
    (
        "76",
        "Leadership was lost while the command ran (--lost-exit-code).",
    ),
    (
        "125",
        "Consul (or etcd) unreachable, access denied, a bad answer, or an internal error; the \
         command did not start, or was stopped.",
    ),
    ("126", "The command cannot be executed."),
    ("127", "The command was not found."),
    (
        "2",
        "Usage error: a bad option or combination; nothing ran.",
    ),
    (
        "signal",
        "Stopped by TERM, INT, HUP or QUIT: after stopping the command and releasing the lock, \
         consul-leader dies by that same signal.",
    ),
];

const STATUS_EXIT: &[(&str, &str)] = &[
    (
        "0",
        "The key is held (for a semaphore's prefix: at least one slot is).",
    ),
    (
        "1",
        "The key is free, or does not exist (for a semaphore's prefix: no slot is held).",
    ),
    (
        "3",
        "The key is not a lock: a semaphore's own key (PREFIX/.lock, PREFIX/<session>), or \
         plain data.",
    ),
    (
        "125",
        "Consul (or etcd) could not be asked (unreachable, access denied, a bad answer).",
    ),
    ("2", "Usage error."),
];

pub const ROOT: Page = Page {
    command: "",
    synopsis: &[
        "run [OPTIONS] --key KEY -- COMMAND [ARGS]...",
        "status [OPTIONS] --key KEY [--json]",
        "dev-agent [OPTIONS]",
        "demo",
        "--help | --version",
    ],
    description: &[
        "consul-leader creates a Consul session, wins the lock on a key, starts a command, and \
         keeps it running only while the session holds the lock. When leadership ends, the \
         command's whole process group gets the stop signal, then SIGKILL after a grace period, \
         and only once every process of it is gone is the lock released. A new leader waits out \
         a silence period before its command starts, unless the previous leader released \
         cleanly, so an old command that is still shutting down never overlaps a new one.",
        "Use it for anything that must run as a singleton across hosts: a cron job installed on \
         several hosts that must run on one, a service active on one node only, a script that \
         must never run twice at once. It locks keys the way consul lock and Go's api.Lock do, \
         so their users are excluded too.",
    ],
    exit_codes: RUN_EXIT,
    examples: &[
        (
            "See the main job done in a few seconds, against a throwaway dev agent:",
            "consul-leader demo",
        ),
        (
            "Run the daily report on whichever host holds jobs/report:",
            "consul-leader run --key jobs/report -- /usr/local/bin/report --daily",
        ),
        (
            "From cron on every host: the host that wins runs the job, the others exit 75 at once:",
            "consul-leader run -q --key cron/report --wait 0 -- report",
        ),
        (
            "Who holds the key, since when:",
            "consul-leader status --key jobs/report",
        ),
    ],
    env: &[],
    child_env: RUN_CHILD_ENV,
};

pub const RUN: Page = Page {
    command: "run",
    synopsis: &["run [OPTIONS] --key KEY -- COMMAND [ARGS]..."],
    description: &[
        "The command runs directly (no shell unless --shell) in its own process group, with the \
         wrapper's standard input, output and error. The wrapper renews its session every TTL/3; \
         if no renew succeeds, it stops the command early enough that the command's group is \
         gone by the time the session could expire, even when it can reach no Consul at all.",
        "Signals: TERM, INT, HUP and QUIT stop the command (with that same signal first), \
         release the lock, and then the wrapper exits by that signal; a second TERM or INT skips \
         the grace period. USR1, USR2 and WINCH are forwarded to the command's process group. If \
         the wrapper itself is killed, its command dies with it.",
        "With --limit N (2 or more) KEY is a prefix and up to N holders run at once, each its \
         own command, on the keys of consul lock -n N and Go's api.Semaphore (KEY/.lock and one \
         KEY/<session> per contender); every guarantee above holds per slot. A contender that \
         finds another limit on the prefix refuses with exit 125.",
        "With --etcd-endpoints (or ETCDCTL_ENDPOINTS) the lock is etcd's, in the layout of \
         etcdctl lock NAME (a lease with TTL --ttl, the key NAME/<lease id>, first come, first \
         served), so each excludes the other; the command also gets ETCD_LOCK_KEY and \
         ETCD_LOCK_REV. etcd has no lock-delay: --silence must be at least --ttl. A flag of one \
         engine wins over the other's variables; flags of both, or ETCDCTL_ENDPOINTS and \
         CONSUL_HTTP_ADDR both set without a flag, are refused.",
        "Durations are written like 500ms, 15s or 2m. Combinations that cannot be safe are \
         refused with a usage error that says why.",
    ],
    exit_codes: RUN_EXIT,
    examples: &[
        (
            "Run the daily report on whichever host holds jobs/report:",
            "consul-leader run --key jobs/report -- /usr/local/bin/report --daily",
        ),
        (
            "From cron: give up at once (exit 75) when another host holds the key:",
            "consul-leader run -q --key cron/report --wait 0 -- report",
        ),
        (
            "A service that stays in the race after losing leadership:",
            "consul-leader run --key svc/worker --on-lost recontend -- worker",
        ),
        (
            "At most two backups at once across every host (a semaphore, as consul lock -n 2):",
            "consul-leader run --key jobs/backup --limit 2 -- backup.sh",
        ),
        (
            "On etcd, excluding etcdctl lock jobs/report too:",
            "consul-leader run --etcd-endpoints http://10.0.0.1:2379 \\\n    --key jobs/report -- report",
        ),
        (
            "A shell pipeline, as one string:",
            "consul-leader run --key dump --shell -- 'pg_dump db | gzip >db.gz'",
        ),
        (
            "A command whose own exit codes include 75 and 76:",
            "consul-leader run --key jobs/sync \\\n    --busy-exit-code 90 --lost-exit-code 91 -- sync.sh",
        ),
    ],
    env: &[],
    child_env: RUN_CHILD_ENV,
};

pub const STATUS: Page = Page {
    command: "status",
    synopsis: &["status [OPTIONS] --key KEY [--json]"],
    description: &[
        "Prints who holds the key: holder, host and pid when the holder is consul-leader, \
         session, node, since when, and the fencing token; or that it is free, and whether the \
         last holder released cleanly. Keys held by consul lock or Go's api.Lock are understood \
         too (their values say less). A consul lock -n semaphore or a plain data key is named \
         for what it is.",
        "For the prefix of a semaphore (run --limit N, consul lock -n N: the key itself does not \
         exist, KEY/.lock does), it prints the limit, each holder (holder and pid, session, since \
         when, fencing token, node, whether its session still lives) and the free slots.",
        "On etcd (--etcd-endpoints or ETCDCTL_ENDPOINTS), the lock's queue: the holder (its key, \
         lease, lease TTL left, create revision as the fencing token, and who it is when it is \
         consul-leader), the waiters (keys of etcdctl lock too), and the record of the last \
         consul-leader holder (NAME.consul-leader): whether it released cleanly.",
    ],
    exit_codes: STATUS_EXIT,
    examples: &[
        (
            "Who holds the key:",
            "consul-leader status --key jobs/report",
        ),
        (
            "The holder, for a script:",
            "consul-leader status --key jobs/report --json | jq -r .holder",
        ),
        (
            "An etcd lock: its holder, its waiters, and the last record:",
            "consul-leader status --etcd-endpoints http://10.0.0.1:2379 \\\n    --key jobs/report",
        ),
    ],
    env: CONNECTION_ENV,
    child_env: &[],
};

pub const DEV_AGENT: Page = Page {
    command: "dev-agent",
    synopsis: &["dev-agent [OPTIONS]"],
    description: &[
        "A single-node, in-memory server that speaks the part of Consul's HTTP API that leader \
         election uses (sessions, KV with locks and blocking queries, TTL checks, the agent and \
         status endpoints) with Consul's status codes, error texts, headers and index rules. \
         Like consul agent -dev it keeps nothing on disk: it is for development and tests only, \
         never for production.",
        "It prints \"dev-agent listening on ADDR\" on standard output once it accepts \
         connections; with --listen 127.0.0.1:0 that names the free port it picked. It stops on \
         TERM or INT.",
    ],
    exit_codes: &[
        ("0", "Stopped by TERM or INT."),
        ("125", "Cannot listen on the address, or a TLS file is bad."),
        ("2", "Usage error."),
    ],
    examples: &[
        ("On Consul's default address:", "consul-leader dev-agent"),
        (
            "On a free port, accepting short session TTLs (for tests):",
            "consul-leader dev-agent --listen 127.0.0.1:0 --session-ttl-min 1s",
        ),
        (
            "On a unix socket:",
            "consul-leader dev-agent --listen unix:///tmp/consul.sock",
        ),
        (
            "Over HTTPS:",
            "consul-leader dev-agent --tls-cert agent.pem --tls-key agent-key.pem",
        ),
    ],
    env: &[],
    child_env: &[],
};

pub const DEMO: Page = Page {
    command: "demo",
    synopsis: &["demo"],
    description: &[],
    exit_codes: &[
        ("0", "The demo ran to its end."),
        (
            "125",
            "A step did not happen in time, or a process could not be started; the message says \
             which.",
        ),
    ],
    examples: &[("Watch it:", "consul-leader demo")],
    env: &[],
    child_env: &[],
};

/// Every page, the program's first.
const PAGES: [&Page; 5] = [&ROOT, &RUN, &STATUS, &DEV_AGENT, &DEMO];

/// What `--help` shows after the options: exit codes and examples.
pub fn after_help(page: &Page) -> String {
    let mut out = String::from(if page.command.is_empty() {
        "Exit codes of run:\n"
    } else {
        "Exit codes:\n"
    });
    for (code, meaning) in page.exit_codes {
        // Wrapped here, with a hanging indent, so that clap never re-wraps it flush left.
        let mut line = format!("  {code:<8}");
        for word in meaning.split_whitespace() {
            if line.len() + 1 + word.len() > 78 {
                out.push_str(&line);
                out.push('\n');
                line = " ".repeat(10);
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("\nExamples:\n");
    for (i, (what, cmd)) in page.examples.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("  # {what}\n  {}\n", cmd.replace('\n', "\n  ")));
    }
    if page.command.is_empty() {
        out.push_str(&format!(
            "\nEach command has its own --help, and a man page once installed: man {NAME}-run."
        ));
    }
    out.trim_end().to_string()
}

/// The command a page documents, with hidden arguments and subcommands still in.
fn command_of(page: &Page) -> clap::Command {
    let mut root = Cli::command();
    root.build();
    if page.command.is_empty() {
        return root;
    }
    root.find_subcommand(page.command)
        .unwrap_or_else(|| panic!("no subcommand {}", page.command))
        .clone()
}

fn page_name(page: &Page) -> String {
    if page.command.is_empty() {
        NAME.to_string()
    } else {
        format!("{NAME}-{}", page.command)
    }
}

/// A synopsis line: the program in bold, each literal word bold, each placeholder (upper case)
/// in italics, brackets and ellipses as they are.
fn synopsis_line(line: &str) -> Vec<Inline> {
    let mut out = vec![bold(NAME)];
    for word in line.split(' ') {
        out.push(roman(" "));
        let core = word
            .trim_start_matches('[')
            .trim_end_matches("...")
            .trim_end_matches(']');
        let start = word.find(core).unwrap_or(0);
        let (head, tail) = (&word[..start], &word[start + core.len()..]);
        out.push(roman(head));
        if core.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            out.push(italic(core));
        } else {
            out.push(bold(core));
        }
        out.push(roman(tail));
    }
    out
}

fn paragraph(roff: &mut Roff, text: &str) {
    roff.control("PP", []).text([roman(text)]);
}

fn labelled(roff: &mut Roff, label: Vec<Inline>, text: &str) {
    roff.control("TP", []).text(label).text([roman(text)]);
}

fn option_label(arg: &Arg) -> Vec<Inline> {
    let mut label = Vec::new();
    if let Some(short) = arg.get_short() {
        label.push(bold(format!("-{short}")));
        if arg.get_long().is_some() {
            label.push(roman(", "));
        }
    }
    if let Some(long) = arg.get_long() {
        label.push(bold(format!("--{long}")));
    }
    let takes_value = matches!(arg.get_action(), ArgAction::Set | ArgAction::Append);
    if takes_value {
        for name in arg.get_value_names().unwrap_or_default() {
            label.push(roman(" "));
            label.push(italic(name.as_str()));
        }
    }
    label
}

fn option_text(arg: &Arg) -> String {
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    let mut text = sentence(&help);
    if !arg.is_hide_possible_values_set() {
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| match v.get_help() {
                Some(h) => format!("{} ({})", v.get_name(), lowercase_first(&h.to_string())),
                None => v.get_name().to_string(),
            })
            .collect();
        let flag_like = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        if !values.is_empty() && !flag_like {
            text.push_str(&format!(" One of: {}.", values.join("; ")));
        }
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    let flag_like = !matches!(arg.get_action(), ArgAction::Set | ArgAction::Append);
    if !defaults.is_empty() && !flag_like && !arg.is_hide_default_value_set() {
        text.push_str(&format!(" Default: {}.", defaults.join(", ")));
    }
    text
}

/// Help text as one man-page sentence: whitespace joined, backticks dropped (clap's help shows
/// them as they are, a man page has fonts), a final period added where clap removed it.
fn sentence(help: &str) -> String {
    let mut text = help
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('`', "");
    if !text.is_empty() && !text.ends_with(['.', ')', ']']) {
        text.push('.');
    }
    if text.ends_with(')') || text.ends_with(']') {
        text.push('.');
    }
    text
}

fn lowercase_first(s: &str) -> String {
    let s = s.trim_end_matches('.');
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn env_section(roff: &mut Roff, title: &str, vars: &[(&str, &str)]) {
    if vars.is_empty() {
        return;
    }
    roff.control("SS", [title]);
    for (name, text) in vars {
        labelled(roff, vec![bold(*name)], text);
    }
}

/// Renders one man page.
pub fn man_page(page: &Page) -> String {
    let cmd = command_of(page);
    let name = page_name(page);
    let version = Cli::command().get_version().unwrap_or_default().to_string();
    let mut roff = Roff::new();
    roff.control(
        "TH",
        [
            name.to_uppercase().as_str(),
            "1",
            "",
            &format!("{NAME} {version}"),
            "User Commands",
        ],
    );
    // No hyphenation and a ragged right margin: option names, variables and addresses must stay
    // whole, so they can be searched for and copied.
    roff.control("nh", []).control("ad", ["l"]);

    roff.control("SH", ["NAME"]);
    let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
    roff.text([roman(format!("{name} - {}", lowercase_first(&about)))]);

    roff.control("SH", ["SYNOPSIS"]);
    for (i, line) in page.synopsis.iter().enumerate() {
        if i > 0 {
            roff.control("br", []);
        }
        let line = if page.command.is_empty() || line.starts_with(page.command) {
            line.to_string()
        } else {
            format!("{} {line}", page.command)
        };
        roff.text(synopsis_line(&line));
    }

    roff.control("SH", ["DESCRIPTION"]);
    let long_about = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|a| a.to_string())
        .unwrap_or_default();
    // The first paragraph is the `about` that NAME already shows.
    for para in long_about.split("\n\n").skip(1) {
        paragraph(&mut roff, &sentence(para));
    }
    for para in page.description {
        paragraph(&mut roff, para);
    }

    if page.command.is_empty() {
        roff.control("SH", ["COMMANDS"]);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            labelled(
                &mut roff,
                vec![bold(sub.get_name())],
                &format!("{} See {NAME}-{}(1).", sentence(&about), sub.get_name()),
            );
        }
    }

    let options: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_positional())
        .collect();
    roff.control("SH", ["OPTIONS"]);
    for arg in options {
        labelled(&mut roff, option_label(arg), &option_text(arg));
    }
    for arg in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
        let names = arg.get_value_names().unwrap_or_default();
        let name = names.first().map(|n| n.to_string()).unwrap_or_default();
        let label = if arg.get_num_args().is_some_and(|r| r.max_values() > 1) {
            vec![italic(name), roman(" ["), italic("ARGS"), roman("]...")]
        } else {
            vec![italic(name)]
        };
        labelled(&mut roff, label, &option_text(arg));
    }

    let all_env: Vec<(&str, &str)> = if page.command.is_empty() || page.command == "run" {
        CONNECTION_ENV.iter().chain(RUN_ENV).copied().collect()
    } else {
        page.env.to_vec()
    };
    if !all_env.is_empty() || !page.child_env.is_empty() {
        roff.control("SH", ["ENVIRONMENT"]);
        if !all_env.is_empty() {
            paragraph(
                &mut roff,
                "Connection settings follow Consul's own CLI, and a flag wins over its variable. \
                 A variable set to the empty string counts as unset.",
            );
        }
        env_section(&mut roff, "Read by consul-leader", &all_env);
        env_section(&mut roff, "Given to the command (run)", page.child_env);
    }

    roff.control("SH", ["EXIT STATUS"]);
    if page.command.is_empty() {
        paragraph(&mut roff, "For run:");
    }
    for (code, meaning) in page.exit_codes {
        labelled(&mut roff, vec![bold(*code)], meaning);
    }
    if page.command.is_empty() {
        paragraph(
            &mut roff,
            "status exits 0 when the key is held, 1 when it is free, 3 when it is not a lock, 125 \
             when Consul could not be asked, and 2 on a usage error.",
        );
    }

    roff.control("SH", ["EXAMPLES"]);
    for (what, example) in page.examples {
        paragraph(&mut roff, what);
        // Verbatim: no filling, no hyphenation.
        roff.control("RS", ["4"]).control("nf", []);
        roff.text([roman(*example)]);
        roff.control("fi", []).control("RE", []);
    }

    roff.control("SH", ["SEE ALSO"]);
    let mut see: Vec<String> = PAGES
        .iter()
        .map(|p| page_name(p))
        .filter(|n| *n != name)
        .map(|n| format!("{n}(1)"))
        .collect();
    see.push("consul(1)".into());
    roff.text([roman(see.join(", "))]);
    paragraph(
        &mut roff,
        "Consul's documentation of sessions and the KV store: \
         https://developer.hashicorp.com/consul/docs",
    );
    roff.render()
}

/// The command that shell completions describe: hidden subcommands (generate-docs) left out,
/// since the completion generators offer them anyway.
fn completion_command() -> clap::Command {
    fn visible(cmd: &clap::Command) -> clap::Command {
        let mut out = clap::Command::new(cmd.get_name().to_string())
            .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned());
        if let Some(about) = cmd.get_about() {
            out = out.about(about.clone());
        }
        if let Some(version) = cmd.get_version() {
            out = out.version(version.to_string());
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            out = out.subcommand(
                visible(sub).version(cmd.get_version().unwrap_or_default().to_string()),
            );
        }
        out
    }
    visible(&Cli::command())
}

/// Renders one shell's completion script.
fn completion(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut completion_command(), NAME, &mut out);
    let mut text = String::from_utf8(out).expect("completion scripts are UTF-8");
    if shell == Shell::Bash {
        // clap_complete names the functions of a dashed program's subcommands inconsistently:
        // the dispatch sets `consul__leader__subcmd__run`, while the branch that completes it is
        // named `consul__subcmd__leader__subcmd__run`, so nothing past the first word completed.
        text = text.replace(&NAME.replace('-', "__subcmd__"), &NAME.replace('-', "__"));
    }
    if shell == Shell::Fish {
        // clap_complete lists `help` among the words that end `help`'s own completion, so
        // `consul-leader help <TAB>` offered files instead of the subcommands.
        let marker = "__fish_seen_subcommand_from";
        text = text
            .lines()
            .map(|line| {
                match line.split_once(&format!("using_subcommand help; and not {marker} ")) {
                    Some((head, rest)) => {
                        let (list, tail) = rest.split_once('"').unwrap_or((rest, ""));
                        let list: Vec<&str> = list.split(' ').filter(|w| *w != "help").collect();
                        format!(
                            "{head}using_subcommand help; and not {marker} {}\"{tail}",
                            list.join(" ")
                        )
                    }
                    None => line.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
    }
    text.into_bytes()
}

/// Every generated file: its path relative to the repository root, and its contents.
pub fn render_all() -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    for page in PAGES {
        files.push((
            PathBuf::from(format!("man/{}.1", page_name(page))),
            man_page(page).into_bytes(),
        ));
    }
    for (shell, file) in [
        (Shell::Bash, format!("{NAME}.bash")),
        (Shell::Zsh, format!("_{NAME}")),
        (Shell::Fish, format!("{NAME}.fish")),
    ] {
        files.push((
            PathBuf::from(format!("completions/{file}")),
            completion(shell),
        ));
    }
    Ok(files)
}

/// Writes every generated file under `root`.
pub fn write_all(root: &Path) -> io::Result<()> {
    for (path, contents) in render_all()? {
        let path = root.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, contents)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_man_pages_and_completions_match_the_code() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut stale = Vec::new();
        for (path, contents) in render_all().unwrap() {
            if std::fs::read(root.join(&path)).ok().as_deref() != Some(contents.as_slice()) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "out of date: {}; regenerate with `cargo run -- generate-docs` and commit the result",
            stale.join(", ")
        );
    }

    #[test]
    fn every_visible_subcommand_has_a_page() {
        let documented: Vec<&str> = PAGES.iter().map(|p| p.command).collect();
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            assert!(documented.contains(&sub.get_name()), "{}", sub.get_name());
        }
    }

    #[test]
    fn examples_fit_in_80_columns() {
        for page in PAGES {
            for line in page.examples.iter().flat_map(|(_, e)| e.lines()) {
                // The section's 7 columns of indentation and the example's 4 more.
                assert!(line.len() <= 68, "too wide for 80 columns: {line}");
            }
        }
    }

    #[test]
    fn completions_leave_hidden_commands_out() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(completion(shell)).unwrap();
            assert!(!text.contains("generate-docs"), "{shell:?}");
        }
    }
}
