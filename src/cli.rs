//! Command-line definitions, and nothing else: clap structs for every subcommand.
//!
//! Values stay raw here (strings, humantime durations); `config` turns them into a validated
//! `Config` before anything runs, so that no later step can fail on bad input.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{
    ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, ValueHint,
};

/// Run a command only while this host holds leadership through a Consul session lock.
#[derive(Debug, Parser)]
#[command(name = "consul-leader", version, propagate_version = true)]
#[command(after_help = crate::docs::after_help(&crate::docs::ROOT))]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Parses the command line like `Cli::parse`, and also notes which options of `run` and `status`
/// were given on the command line itself (not taken from a variable or a default): the rule that
/// picks the engine (`config::Engine`) lets an explicit flag win over the environment.
pub fn parse() -> Cli {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse`] from the given arguments.
pub fn try_parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    match (&mut cli.command, matches.subcommand()) {
        (Command::Run(args), Some((_, m))) => args.given = given(m),
        (Command::Status(args), Some((_, m))) => args.given = given(m),
        _ => {}
    }
    Ok(cli)
}

/// The ids of the options given on the command line.
fn given(m: &ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Win the lock on a key, run a command while it is held, stop it when leadership ends.
    Run(Box<RunArgs>),
    /// Show who holds a key, since when, and its fencing token.
    Status(Box<StatusArgs>),
    /// Start a single-node, in-memory Consul-compatible server for trying the tool and for tests.
    DevAgent(DevAgentArgs),
    /// Show a leader, a standby and a handover in a few seconds, against a throwaway dev agent.
    #[command(
        long_about = "Show a leader, a standby and a handover in a few seconds, against a \
        throwaway dev agent.\n\nStarts `consul-leader dev-agent` on a free port, then two \
        wrappers, alice and bob, that run the same command under the same key: alice leads, bob \
        waits as a standby, alice is stopped, and bob takes over at once because alice released \
        cleanly. Every line they print is shown, prefixed with who printed it. Needs nothing but \
        this program and /bin/sh; stops everything it started before it exits. Also a quick way \
        to check an installation."
    )]
    #[command(after_help = crate::docs::after_help(&crate::docs::DEMO))]
    Demo,
    /// Write the man pages and shell completions (for packagers and for this repository).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory to write `man/` and `completions/` into.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out_dir: PathBuf,
    },
}

/// What to do when leadership is lost while the command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnLost {
    /// Stop the command and exit with the lost exit code.
    Exit,
    /// Stop the command and contend for the lock again.
    Recontend,
}

/// When to restart the command while the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestartPolicy {
    /// The command's exit ends the term: release the lock, exit with its code.
    No,
    /// Restart after a non-zero exit or a death by signal.
    OnFailure,
    /// Restart after any exit.
    Always,
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How to reach the Consul agent. Each flag overrides the environment variable Consul's own CLI
/// reads; `config` resolves them (an empty variable counts as unset, as in Consul's CLI, which clap's
/// own `env` support would treat as an empty value).
#[derive(Debug, Clone, Args)]
pub struct ConsulArgs {
    /// Consul agent address: host:port, http://host:port, https://host:port or unix:///path
    /// [env: CONSUL_HTTP_ADDR] [default: 127.0.0.1:8500].
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<String>,

    /// ACL token (prefer --token-file: a token on the command line is visible in ps).
    /// Precedence, as in Consul's CLI: --token-file, --token, CONSUL_HTTP_TOKEN_FILE,
    /// CONSUL_HTTP_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,

    /// File holding the ACL token [env: CONSUL_HTTP_TOKEN_FILE].
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub token_file: Option<PathBuf>,

    /// Datacenter to use instead of the agent's own (sent as ?dc=).
    #[arg(long, value_name = "NAME")]
    pub datacenter: Option<String>,

    /// CA certificate file (PEM) to verify the agent's TLS certificate with [env: CONSUL_CACERT].
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub ca_file: Option<PathBuf>,

    /// Directory of CA certificates (PEM) to verify the agent's TLS certificate with
    /// [env: CONSUL_CAPATH].
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub ca_path: Option<PathBuf>,

    /// Client certificate (PEM) for agents that require TLS client authentication
    /// [env: CONSUL_CLIENT_CERT].
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub client_cert: Option<PathBuf>,

    /// Private key (PEM) of the client certificate [env: CONSUL_CLIENT_KEY].
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub client_key: Option<PathBuf>,

    /// Name to verify the agent's certificate against (and send as SNI), if not the address's host
    /// [env: CONSUL_TLS_SERVER_NAME].
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Enterprise namespace (sent as ?ns=); Consul CE refuses it [env: CONSUL_NAMESPACE].
    #[arg(long, value_name = "NAME")]
    pub namespace: Option<String>,

    /// Enterprise admin partition (sent as ?partition=); Consul CE refuses it
    /// [env: CONSUL_PARTITION].
    #[arg(long, value_name = "NAME")]
    pub partition: Option<String>,
}

/// How to reach etcd instead of Consul. Flags win over the variables `etcdctl` reads; an empty
/// variable counts as unset. `--etcd-endpoints` (or `ETCDCTL_ENDPOINTS`) selects etcd: see the
/// README's "etcd" section for the rule that picks the engine.
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdArgs {
    /// Use etcd at these endpoints instead of Consul: comma-separated URLs (http://host:2379,
    /// https://..., or host:port) [env: ETCDCTL_ENDPOINTS]. Engine: a flag of one engine wins
    /// over the other's variables; flags of both, or ETCDCTL_ENDPOINTS and CONSUL_HTTP_ADDR
    /// both set without a flag, are refused (exit 2); nothing set means Consul.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        help_heading = "etcd (instead of Consul)"
    )]
    pub etcd_endpoints: Option<String>,

    /// CA certificate (PEM) to verify etcd's TLS certificates with [env: ETCDCTL_CACERT]
    #[arg(long, value_name = "PATH", help_heading = "etcd (instead of Consul)")]
    pub etcd_cacert: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's TLS client authentication [env: ETCDCTL_CERT]
    #[arg(long, value_name = "PATH", help_heading = "etcd (instead of Consul)")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert [env: ETCDCTL_KEY]
    #[arg(long, value_name = "PATH", help_heading = "etcd (instead of Consul)")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user, NAME or NAME:PASSWORD [env: ETCDCTL_USER]
    #[arg(
        long,
        value_name = "NAME[:PASSWORD]",
        help_heading = "etcd (instead of Consul)"
    )]
    pub etcd_user: Option<String>,

    /// Password of --etcd-user (prefer ETCDCTL_PASSWORD: a password on the command line is
    /// visible in ps) [env: ETCDCTL_PASSWORD]
    #[arg(
        long,
        value_name = "PASSWORD",
        help_heading = "etcd (instead of Consul)"
    )]
    pub etcd_password: Option<String>,
}

/// Options of `consul-leader run`.
#[derive(Debug, Args)]
#[command(after_help = crate::docs::after_help(&crate::docs::RUN))]
pub struct RunArgs {
    /// The Consul KV key to lock, for example `jobs/report`; on etcd, the lock's name, as in
    /// `etcdctl lock NAME` (its keys are NAME/<lease id>).
    #[arg(long, value_name = "KEY")]
    pub key: String,

    /// Let at most N holders run at once (a semaphore, the layout of `consul lock -n N`): KEY is
    /// then a prefix, holding KEY/.lock and one key per contender. 1 is the lock on KEY itself.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub limit: u32,

    /// Session TTL: how long Consul keeps the session without a renew (it really waits 2x).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub ttl: Duration,

    /// Lock-delay: after this session is invalidated, Consul refuses the key to others this long.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub lock_delay: Duration,

    /// Minimum gap between the previous leader's end and our command's start (skipped after a clean
    /// release).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub silence: Duration,

    /// Time between the stop signal and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub grace: Duration,

    /// Signal that asks the command to stop, by name (TERM, INT, HUP, QUIT, USR1, ...) or number.
    #[arg(
        long,
        value_name = "SIGNAL",
        default_value = "TERM",
        value_parser = SignalNameParser,
        hide_possible_values = true,
        allow_hyphen_values = true
    )]
    pub stop_signal: String,

    /// How long to try for the lock before giving up with the busy exit code; 0 tries once.
    /// Default: wait for ever.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub wait: Option<Duration>,

    /// Run the command through `sh -c` (one string) instead of executing it directly.
    #[arg(long)]
    pub shell: bool,

    /// Bind this Consul check to the session (repeatable); when it goes critical, leadership ends.
    #[arg(long = "check", value_name = "CHECK_ID")]
    pub checks: Vec<String>,

    /// Do not bind the node's serfHealth check to the session.
    #[arg(long)]
    pub no_node_check: bool,

    /// What to do when leadership is lost while the command runs.
    #[arg(long, value_enum, value_name = "ACTION", default_value = "exit")]
    pub on_lost: OnLost,

    /// Exit code when the lock was not won within --wait (change it when the command's own
    /// codes include 75).
    #[arg(long, value_name = "CODE", default_value = "75", value_parser = parse_exit_code, allow_hyphen_values = true)]
    pub busy_exit_code: u8,

    /// Exit code when leadership was lost while the command ran (change it when the command's
    /// own codes include 76).
    #[arg(long, value_name = "CODE", default_value = "76", value_parser = parse_exit_code, allow_hyphen_values = true)]
    pub lost_exit_code: u8,

    /// This contender's stable identity, written into the key's value; it survives a restart of
    /// the wrapper (default: the host name).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,

    /// After the last holder lost the lock to a fault (no clean release), other contenders wait
    /// this long, from when they first see the key free, before they try for it, so that the
    /// previous holder (same --id) gets it back first. 0 turns priority off.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_duration)]
    pub priority_window: Duration,

    /// Restart the command while holding the lock: no (its exit ends the term), on-failure
    /// (after a non-zero exit or a death by signal), always.
    #[arg(long, value_enum, default_value = "no")]
    pub restart: RestartPolicy,

    /// First pause before a restart; it doubles with each restart in a row, up to 1 minute (or
    /// this value, if larger).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub restart_delay: Duration,

    /// At most N starts of the command within PERIOD (e.g. 5/10m); past it, step down: stop,
    /// release the lock clean so another host can take over, and exit with the command's last
    /// exit code.
    #[arg(long, value_name = "N/PERIOD", default_value = "5/10m")]
    pub restart_limit: String,

    /// Signals forwarded to the command's process group instead of being acted on, comma
    /// separated: any of HUP, QUIT, USR1, USR2, WINCH, ALRM. TERM and INT always stop the
    /// command; HUP and QUIT do unless forwarded. Default: USR1,USR2,WINCH, less the
    /// --stop-signal.
    #[arg(long, value_name = "SIGNALS")]
    pub forward_signals: Option<String>,

    /// Session name shown in Consul (default: consul-leader <key> on <host> pid <pid>).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Only print errors.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Also print debug lines (each renew, session IDs, forwarded signals).
    #[arg(short, long)]
    pub verbose: bool,

    /// Log line format on stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub consul: ConsulArgs,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// The ids of the options given on the command line (filled in by [`parse`]).
    #[arg(skip)]
    pub given: Vec<String>,

    /// The command to run, and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        value_name = "COMMAND",
        value_hint = ValueHint::CommandWithArguments
    )]
    pub command: Vec<String>,
}

/// Options of `consul-leader status`.
#[derive(Debug, Args)]
#[command(after_help = crate::docs::after_help(&crate::docs::STATUS))]
pub struct StatusArgs {
    /// The Consul KV key to inspect, or the prefix of a semaphore (`run --limit N`,
    /// `consul lock -n N`): then its limit, holders and free slots. On etcd, the lock's name
    /// (as in `etcdctl lock NAME`).
    #[arg(long, value_name = "KEY")]
    pub key: String,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub consul: ConsulArgs,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// The ids of the options given on the command line (filled in by [`parse`]).
    #[arg(skip)]
    pub given: Vec<String>,
}

/// Options of `consul-leader dev-agent`.
#[derive(Debug, Args)]
#[command(
    long_about = "Start a single-node, in-memory Consul-compatible server for trying the tool and \
                  for tests.\n\nThe dev agent keeps everything in memory and is for development \
                  and tests only, like `consul agent -dev`. It prints `dev-agent listening on \
                  ADDR` once it accepts connections.",
    after_help = crate::docs::after_help(&crate::docs::DEV_AGENT)
)]
pub struct DevAgentArgs {
    /// Address to listen on: ip:port (port 0 picks a free port) or unix:///path/to.sock.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8500",
        value_parser = parse_listen
    )]
    pub listen: Listen,

    /// Serve HTTPS with this certificate chain (PEM, leaf first) instead of plain HTTP.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require a client certificate signed by this CA (PEM) on every connection (mutual TLS).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Node name (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Datacenter name.
    #[arg(long, value_name = "NAME", default_value = "dc1")]
    pub datacenter: String,

    /// Smallest session TTL accepted (Consul's session_ttl_min); tests lower it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub session_ttl_min: Duration,

    /// Delay every write that Consul commits through Raft (KV writes, session create and
    /// destroy) by this long before it is applied, so that a read sent at the same time answers
    /// first, as it can with a real cluster. Zero (the default) applies writes at once.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub commit_latency: Duration,

    /// Require this ACL token on every request; others get 403 Permission denied.
    #[arg(long, value_name = "TOKEN")]
    pub acl_token: Option<String>,
}

/// Where the dev agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    /// A unix socket path (absolute), given as `unix:///path`.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    /// The form `--listen` takes, so the listening line can be fed back as an address.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// Parses `ip:port` or `unix:///absolute/path` (the unix form of `CONSUL_HTTP_ADDR`).
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(
                "a unix socket needs an absolute path, e.g. unix:///tmp/consul.sock".into(),
            );
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    s.parse().map(Listen::Tcp).map_err(|_| {
        "use ip:port (e.g. 127.0.0.1:8500, port 0 for a free one) or unix:///path/to.sock".into()
    })
}

/// A value that starts with `-`: either a negative number, or the next option taken as this one's
/// value because the value itself was left out. Options that accept such values (to explain them
/// instead of clap's tip to write `-- -1`, which would end option parsing) say which it was.
fn hyphen_value_error(s: &str, what: &str) -> Option<String> {
    let rest = s.strip_prefix('-')?;
    Some(if rest.starts_with(|c: char| c.is_ascii_digit()) {
        format!("it cannot be negative; use {what}")
    } else {
        format!("the value is missing (found the option `{s}` instead); give {what}")
    })
}

/// Parses a humantime duration (`500ms`, `15s`, `2m`); a bare `0` means zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Some(e) = hyphen_value_error(s, "a duration such as 500ms, 15s or 2m") {
        return Err(e);
    }
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 500ms, 15s or 2m)"))
}

/// Parses an exit code, 0 to 255.
pub fn parse_exit_code(s: &str) -> Result<u8, String> {
    if let Some(e) = hyphen_value_error(s, "an exit code from 0 to 255") {
        return Err(e);
    }
    s.trim()
        .parse::<u8>()
        .map_err(|_| "an exit code is a whole number from 0 to 255".to_string())
}

/// Signal names offered by shell completions for `--stop-signal`; any other name or number is
/// accepted too and checked by `config`.
pub const SIGNAL_NAMES: [&str; 10] = [
    "TERM", "INT", "HUP", "QUIT", "USR1", "USR2", "WINCH", "ALRM", "PWR", "CONT",
];

/// Keeps `--stop-signal` a string (names and numbers are checked in `config`), while telling
/// clap the usual names so that shell completions offer them, and explaining a negative number.
#[derive(Clone)]
pub struct SignalNameParser;

impl clap::builder::TypedValueParser for SignalNameParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let s = value.to_string_lossy();
        if let Some(e) = hyphen_value_error(&s, "a signal name such as TERM, or a signal number") {
            let arg = arg.map_or_else(|| "--stop-signal".to_string(), ToString::to_string);
            return Err(clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{s}' for '{arg}': {e}\n"),
            )
            .with_cmd(cmd));
        }
        Ok(s.into_owned())
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            SIGNAL_NAMES
                .iter()
                .map(|n| clap::builder::PossibleValue::new(*n)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("15").is_err());
    }

    #[test]
    fn listen_addresses_parse_and_print_back() {
        for form in ["127.0.0.1:0", "[::1]:8500", "unix:///tmp/a.sock"] {
            assert_eq!(parse_listen(form).unwrap().to_string(), form);
        }
        assert!(parse_listen("unix://rel.sock").is_err());
        assert!(parse_listen("localhost:8500").is_err());
    }
}
