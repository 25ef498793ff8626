//! Turns raw command-line options into a validated `RunConfig`/`ConsulConfig`.
//!
//! Everything that can be wrong with the user's input is found here, before any session exists, and
//! reported as one line that says what to change (exit code 2). Nothing after this point fails on
//! bad input.

use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::{ConsulArgs, LogFormat, OnLost, RunArgs};

/// A usage or configuration error: one line that says what to fix. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// How to reach Consul.
#[derive(Clone)]
pub struct ConsulConfig {
    /// `scheme://host:port` plus any path prefix, without a trailing slash.
    pub base_url: String,
    /// What the user gave, for error messages ("cannot reach the Consul agent at ...").
    pub addr_display: String,
    pub token: Option<String>,
    pub datacenter: Option<String>,
}

impl std::fmt::Debug for ConsulConfig {
    // Hand-written so that the token can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("base_url", &self.base_url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .finish()
    }
}

impl ConsulConfig {
    pub fn from_args(args: &ConsulArgs) -> Result<Self, ConfigError> {
        let ssl = std::env::var("CONSUL_HTTP_SSL")
            .ok()
            .and_then(|v| parse_go_bool(&v))
            .unwrap_or(false);
        let base_url = parse_address(&args.http_addr, ssl)?;
        // Consul's precedence: a token file wins over a token (design §2, consul-api.md §7.3).
        let token = match &args.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    bad(format!(
                        "cannot read the token file {}: {e}; check --token-file / CONSUL_HTTP_TOKEN_FILE",
                        path.display()
                    ))
                })?;
                Some(text.trim().to_string())
            }
            None => args.token.clone(),
        }
        .filter(|t| !t.is_empty());
        let datacenter = args.datacenter.clone().filter(|d| !d.is_empty());
        Ok(Self {
            base_url,
            addr_display: args.http_addr.clone(),
            token,
            datacenter,
        })
    }
}

/// Go's `strconv.ParseBool`, which Consul uses for its boolean environment variables.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Address forms of Consul's own client: `host:port`, `http://…`, `https://…` (consul-api.md §7.2).
fn parse_address(addr: &str, ssl: bool) -> Result<String, ConfigError> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(bad(
            "the Consul address is empty; set --http-addr or CONSUL_HTTP_ADDR",
        ));
    }
    let (scheme, rest) = match addr.split_once("://") {
        None => (if ssl { "https" } else { "http" }, addr),
        // An http:// address never downgrades a CONSUL_HTTP_SSL=true setting, as in Consul's client.
        Some(("http", rest)) => (if ssl { "https" } else { "http" }, rest),
        Some(("https", rest)) => ("https", rest),
        Some(("unix", _)) => {
            return Err(bad(format!(
                "unix socket addresses are not supported yet ({addr}); use host:port"
            )));
        }
        Some((other, _)) => {
            return Err(bad(format!(
                "unknown protocol scheme `{other}` in Consul address {addr}; use host:port, http:// or https://"
            )));
        }
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad(format!(
            "the Consul address {addr} has no host; use host:port"
        )));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub key: String,
    pub ttl: Duration,
    pub lock_delay: Duration,
    pub silence: Duration,
    pub grace: Duration,
    pub stop_signal: Signal,
    /// `None`: wait for ever. `Some(ZERO)`: try once.
    pub wait: Option<Duration>,
    pub shell: bool,
    pub checks: Vec<String>,
    pub node_check: bool,
    pub on_lost: OnLost,
    pub busy_exit_code: u8,
    pub lost_exit_code: u8,
    pub session_name: String,
    pub quiet: bool,
    pub log_format: LogFormat,
    pub consul: ConsulConfig,
    pub command: Vec<String>,
    pub host: String,
}

/// Consul refuses a session TTL above this.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Consul caps lock-delay here when it applies it; a larger value would silently mean less.
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

impl RunConfig {
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let key = validate_key(&args.key)?;
        let consul = ConsulConfig::from_args(&args.consul)?;
        let stop_signal = parse_signal(&args.stop_signal)?;
        if args.ttl.is_zero() || args.ttl > MAX_TTL {
            return Err(bad(format!(
                "--ttl {} is out of range; Consul accepts 10s to 24h (its session_ttl_min may be lower)",
                humantime::format_duration(args.ttl)
            )));
        }
        if args.lock_delay > MAX_LOCK_DELAY {
            return Err(bad(format!(
                "--lock-delay {} is above 60s, and Consul caps lock-delay at 60s; use 60s or less",
                humantime::format_duration(args.lock_delay)
            )));
        }
        // Self-fencing starts the stop sequence at (last renew + TTL - grace - margin). Renewing
        // happens every TTL/3; the stop must leave room for at least one renew retry after a
        // missed renew, so grace has to stay below TTL/2.
        if args.grace * 2 >= args.ttl {
            return Err(bad(format!(
                "--grace {} does not fit inside --ttl {}: grace must be less than half the TTL, so that \
                 the command can be stopped before the session may expire; raise --ttl or lower --grace",
                humantime::format_duration(args.grace),
                humantime::format_duration(args.ttl)
            )));
        }
        // After a session is invalidated (operator destroy, failed check) the old leader's command
        // may need up to `grace` to stop; the next leader is held back by lock-delay and silence,
        // so at least one of them must cover the grace period.
        if args.lock_delay.max(args.silence) < args.grace {
            return Err(bad(format!(
                "--grace {} is longer than both --lock-delay and --silence; a new leader could start \
                 while this one's command is still stopping; raise --silence or --lock-delay",
                humantime::format_duration(args.grace)
            )));
        }
        if args.command.is_empty() || args.command[0].is_empty() {
            return Err(bad(
                "no command given; put it after `--`, e.g. `run --key K -- mycmd arg`",
            ));
        }
        if args.shell && args.command.len() > 1 {
            return Err(bad(
                "--shell takes the command as one string; quote it, e.g. --shell -- 'a | b'",
            ));
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown-host".to_string());
        let session_name = args
            .name
            .clone()
            .unwrap_or_else(|| format!("consul-leader {key} on {host} pid {}", std::process::id()));
        Ok(Self {
            key,
            ttl: args.ttl,
            lock_delay: args.lock_delay,
            silence: args.silence,
            grace: args.grace,
            stop_signal,
            wait: args.wait,
            shell: args.shell,
            checks: args.checks.clone(),
            node_check: !args.no_node_check,
            on_lost: args.on_lost,
            busy_exit_code: args.busy_exit_code,
            lost_exit_code: args.lost_exit_code,
            session_name,
            quiet: args.quiet,
            log_format: args.log_format,
            consul,
            command: args.command.clone(),
            host,
        })
    }
}

/// Keys are sent as a URL path: Consul redirects unclean paths and rejects a leading `/` (its Go
/// client refuses those for PUT), so catch them here with a clear message.
pub fn validate_key(key: &str) -> Result<String, ConfigError> {
    if key.is_empty() {
        return Err(bad(
            "--key is empty; give a Consul KV key such as jobs/report",
        ));
    }
    if key.starts_with('/') {
        return Err(bad(format!(
            "--key {key} starts with `/`; drop the leading slash"
        )));
    }
    if key.ends_with('/') {
        return Err(bad(format!(
            "--key {key} ends with `/`, which names a folder; use a key such as {key}lock"
        )));
    }
    if key.contains("//") || key.split('/').any(|p| p == "." || p == "..") {
        return Err(bad(format!(
            "--key {key} contains an empty, `.` or `..` segment, which Consul rewrites; use a plain key"
        )));
    }
    Ok(key.to_string())
}

/// Accepts `TERM`, `SIGTERM`, `term` or a number.
pub fn parse_signal(s: &str) -> Result<Signal, ConfigError> {
    let upper = s.trim().to_ascii_uppercase();
    let parsed = if let Ok(n) = upper.parse::<i32>() {
        Signal::try_from(n).ok()
    } else {
        let name = if upper.starts_with("SIG") {
            upper.clone()
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&name).ok()
    };
    match parsed {
        Some(Signal::SIGKILL) | Some(Signal::SIGSTOP) => Err(bad(format!(
            "--stop-signal {s} cannot be caught, so the command could not stop cleanly; use TERM, INT, HUP or QUIT"
        ))),
        Some(sig) => Ok(sig),
        None => Err(bad(format!(
            "--stop-signal {s} is not a signal name; use TERM, INT, HUP, QUIT, ..."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(extra: &[&str]) -> Result<RunConfig, ConfigError> {
        let mut argv = vec!["consul-leader", "run", "--key", "jobs/a"];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["--", "true"]);
        let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
        match cli.command {
            crate::cli::Command::Run(args) => RunConfig::from_args(&args),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_safe() {
        let c = run_args(&[]).unwrap();
        assert_eq!(c.ttl, Duration::from_secs(15));
        assert_eq!(c.grace, Duration::from_secs(5));
        assert_eq!(c.stop_signal, Signal::SIGTERM);
        assert!(c.node_check);
    }

    #[test]
    fn grace_must_fit_in_half_the_ttl() {
        let e = run_args(&["--ttl", "10s", "--grace", "5s"]).unwrap_err();
        assert!(e.0.contains("less than half the TTL"), "{e}");
        assert!(run_args(&["--ttl", "10s", "--grace", "4s"]).is_ok());
    }

    #[test]
    fn grace_must_be_covered_by_silence_or_lock_delay() {
        let e = run_args(&["--lock-delay", "1s", "--silence", "2s", "--grace", "3s"]).unwrap_err();
        assert!(e.0.contains("raise --silence"), "{e}");
    }

    #[test]
    fn lock_delay_above_consul_cap_is_refused() {
        assert!(run_args(&["--lock-delay", "61s"]).is_err());
    }

    #[test]
    fn keys_are_checked() {
        for k in ["", "/a", "a/", "a//b", "a/../b"] {
            assert!(validate_key(k).is_err(), "{k:?}");
        }
        assert!(validate_key("jobs/report").is_ok());
    }

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGINT").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("1").unwrap(), Signal::SIGHUP);
        assert!(parse_signal("KILL").is_err());
        assert!(parse_signal("nope").is_err());
    }

    #[test]
    fn addresses_follow_consuls_client() {
        assert_eq!(
            parse_address("127.0.0.1:8500", false).unwrap(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            parse_address("127.0.0.1:8500", true).unwrap(),
            "https://127.0.0.1:8500"
        );
        assert_eq!(parse_address("http://h:1/", true).unwrap(), "https://h:1");
        assert_eq!(
            parse_address("https://h:1/prefix", false).unwrap(),
            "https://h:1/prefix"
        );
        assert!(parse_address("ftp://h", false).is_err());
        assert!(parse_address("", false).is_err());
    }

    #[test]
    fn token_never_shows_in_debug() {
        let c = ConsulConfig {
            base_url: "http://x".into(),
            addr_display: "x".into(),
            token: Some("s3cret".into()),
            datacenter: None,
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
