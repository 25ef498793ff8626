//! Turns raw command-line options into a validated `RunConfig`/`ConsulConfig`.
//!
//! Everything that can be wrong with the user's input is found here, before any session exists, and
//! reported as one line that says what to change (exit code 2). Nothing after this point fails on
//! bad input.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::{ConsulArgs, LogFormat, OnLost, RunArgs};
use crate::election::Timing;

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
    /// `scheme://host:port` plus any path prefix, without a trailing slash. For a unix socket,
    /// `http://localhost` (the Host header Consul's client sends).
    pub base_url: String,
    /// What the user gave, for error messages ("cannot reach the Consul agent at ...").
    pub addr_display: String,
    pub unix_socket: Option<PathBuf>,
    pub token: Option<String>,
    pub datacenter: Option<String>,
    pub namespace: Option<String>,
    pub partition: Option<String>,
    /// HTTP basic auth from `CONSUL_HTTP_AUTH` (`user:pass`).
    pub basic_auth: Option<(String, String)>,
    pub tls: TlsConfig,
}

/// TLS settings, with the certificate files already read and checked.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// CA certificates (PEM) to trust instead of the system's roots.
    pub ca_pems: Vec<Vec<u8>>,
    /// Client certificate followed by its key (PEM), for mutual TLS.
    pub identity_pem: Option<Vec<u8>>,
    /// Verify the agent's certificate against this name instead of the address's host.
    pub server_name: Option<String>,
    /// `CONSUL_HTTP_SSL_VERIFY=false`: accept any certificate.
    pub insecure: bool,
}

impl std::fmt::Debug for ConsulConfig {
    // Hand-written so that the token can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("base_url", &self.base_url)
            .field("unix_socket", &self.unix_socket)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field(
                "basic_auth",
                &self.basic_auth.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_bool(name: &str) -> Result<Option<bool>, ConfigError> {
    match env_nonempty(name) {
        None => Ok(None),
        Some(v) => parse_go_bool(&v)
            .map(Some)
            .ok_or_else(|| bad(format!("{name}={v} is not a boolean; use true or false"))),
    }
}

fn read_file(path: &Path, what: &str, setting: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        bad(format!(
            "cannot read the {what} {}: {e}; check {setting}",
            path.display()
        ))
    })
}

fn read_token(path: &Path, setting: &str) -> Result<String, ConfigError> {
    let bytes = read_file(path, "token file", setting)?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_string())
}

impl ConsulConfig {
    pub fn from_args(args: &ConsulArgs) -> Result<Self, ConfigError> {
        let ssl = env_bool("CONSUL_HTTP_SSL")?.unwrap_or(false);
        let insecure = !env_bool("CONSUL_HTTP_SSL_VERIFY")?.unwrap_or(true);
        let (base_url, unix_socket) = parse_address(&args.http_addr, ssl)?;
        // Consul's precedence (consul-api.md §7.3): flags before the environment, and a token
        // file before a token at each level.
        let token = if let Some(path) = &args.token_file {
            Some(read_token(path, "--token-file")?)
        } else if let Some(token) = &args.token {
            Some(token.clone())
        } else if let Some(path) = env_nonempty("CONSUL_HTTP_TOKEN_FILE") {
            Some(read_token(Path::new(&path), "CONSUL_HTTP_TOKEN_FILE")?)
        } else {
            env_nonempty("CONSUL_HTTP_TOKEN")
        }
        .filter(|t| !t.is_empty());
        let basic_auth = env_nonempty("CONSUL_HTTP_AUTH").map(|v| match v.split_once(':') {
            Some((user, pass)) => (user.to_string(), pass.to_string()),
            None => (v, String::new()),
        });
        Ok(Self {
            base_url,
            addr_display: args.http_addr.clone(),
            unix_socket,
            token,
            datacenter: args.datacenter.clone().filter(|d| !d.is_empty()),
            namespace: args.namespace.clone().filter(|n| !n.is_empty()),
            partition: args.partition.clone().filter(|p| !p.is_empty()),
            basic_auth,
            tls: TlsConfig::from_args(args, insecure)?,
        })
    }
}

impl TlsConfig {
    fn from_args(args: &ConsulArgs, insecure: bool) -> Result<Self, ConfigError> {
        // As in Consul's client (go-rootcerts), a CA file wins over a CA directory: the
        // directory is not read at all then, so a stray file in it cannot break a working setup.
        let mut ca_files = Vec::new();
        let setting = if let Some(path) = &args.ca_file {
            ca_files.push(path.clone());
            "--ca-file / CONSUL_CACERT"
        } else if let Some(dir) = &args.ca_path {
            let entries = std::fs::read_dir(dir).map_err(|e| {
                bad(format!(
                    "cannot read the CA directory {}: {e}; check --ca-path / CONSUL_CAPATH",
                    dir.display()
                ))
            })?;
            ca_files = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            ca_files.sort();
            "--ca-path / CONSUL_CAPATH"
        } else {
            ""
        };
        let mut ca_pems = Vec::new();
        for file in &ca_files {
            let pem = read_file(file, "CA certificate", setting)?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => ca_pems.push(pem),
                _ => {
                    return Err(bad(format!(
                        "the CA file {} holds no PEM certificate; check {setting}",
                        file.display()
                    )));
                }
            }
        }
        let identity_pem = match (&args.client_cert, &args.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read_file(
                    cert,
                    "client certificate",
                    "--client-cert / CONSUL_CLIENT_CERT",
                )?;
                pem.push(b'\n');
                pem.extend(read_file(
                    key,
                    "client key",
                    "--client-key / CONSUL_CLIENT_KEY",
                )?);
                reqwest::Identity::from_pem(&pem).map_err(|e| {
                    bad(format!(
                        "the client certificate or key is not valid PEM ({e}); check --client-cert and --client-key"
                    ))
                })?;
                Some(pem)
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "both client cert and client key must be provided (--client-cert and --client-key, or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY)",
                ));
            }
        };
        // Consul drops any :port from the server name.
        let server_name = args
            .tls_server_name
            .as_deref()
            .map(|n| n.rsplit_once(':').map_or(n, |(host, _)| host).to_string())
            .filter(|n| !n.is_empty());
        Ok(Self {
            ca_pems,
            identity_pem,
            server_name,
            insecure,
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

/// Address forms of Consul's own client: `host:port`, `http://…`, `https://…`, `unix:///path`
/// (consul-api.md §7.2). Returns the base URL and the unix socket, if any.
fn parse_address(addr: &str, ssl: bool) -> Result<(String, Option<PathBuf>), ConfigError> {
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
        Some(("unix", path)) => {
            if !path.starts_with('/') {
                return Err(bad(format!(
                    "the unix socket address {addr} needs an absolute path, e.g. unix:///run/consul.sock"
                )));
            }
            return Ok(("http://localhost".to_string(), Some(PathBuf::from(path))));
        }
        Some((other, _)) => {
            return Err(bad(format!(
                "unknown protocol scheme `{other}` in Consul address {addr}; use host:port, http://, https:// or unix://"
            )));
        }
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad(format!(
            "the Consul address {addr} has no host; use host:port"
        )));
    }
    Ok((format!("{scheme}://{rest}"), None))
}

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub key: String,
    /// 1: the mutex on `key`; more: a semaphore under the prefix `key` (`lock::semaphore`).
    pub limit: u32,
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
    pub verbose: bool,
    pub log_format: LogFormat,
    pub consul: ConsulConfig,
    pub command: Vec<String>,
    pub host: String,
}

/// Consul refuses a session TTL above this.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Consul caps lock-delay here when it applies it; a larger value would silently mean less.
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// The silence may have to cover the longest TTL; beyond that it only holds the lock idle.
const MAX_SILENCE: Duration = MAX_TTL;
/// The longest `--wait`: omit the flag to wait for ever.
const MAX_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Refuses a duration above `max`, before any arithmetic can overflow on it.
fn at_most(flag: &str, value: Duration, max: Duration, hint: &str) -> Result<(), ConfigError> {
    if value > max {
        return Err(bad(format!(
            "{flag} {} is too long; the most it takes is {}{hint}",
            humantime::format_duration(value),
            humantime::format_duration(max)
        )));
    }
    Ok(())
}

impl RunConfig {
    /// The timing the election rules need.
    pub fn timing(&self) -> Timing {
        Timing {
            ttl: self.ttl,
            lock_delay: self.lock_delay,
            silence: self.silence,
        }
    }

    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let key = validate_key(&args.key)?;
        let limit = validate_limit(args.limit)?;
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
        at_most("--silence", args.silence, MAX_SILENCE, "")?;
        at_most(
            "--grace",
            args.grace,
            MAX_TTL / 2,
            " (and less than half the TTL)",
        )?;
        if let Some(wait) = args.wait {
            at_most(
                "--wait",
                wait,
                MAX_WAIT,
                "; leave --wait out to wait for ever",
            )?;
        }
        // Self-fencing starts the stop sequence at (last renew + TTL - grace - margin). Renewing
        // happens every TTL/3; the stop must leave room for at least one renew retry after a
        // missed renew, so grace has to stay below TTL/2.
        if args.grace.saturating_mul(2) >= args.ttl {
            return Err(bad(format!(
                "--grace {} does not fit inside --ttl {}: grace must be less than half the TTL, so that \
                 the command can be stopped before the session may expire; raise --ttl or lower --grace",
                humantime::format_duration(args.grace),
                humantime::format_duration(args.ttl)
            )));
        }
        // A leader cut off from Consul keeps its command until its fence, up to a TTL after its
        // last renew, while Consul may free the key right after that renew (a bound check that
        // goes critical, a destroyed session). Only lock-delay and silence hold the next leader
        // back (election's module docs, 2 and 3), so one of them must cover the TTL.
        if args.lock_delay.max(args.silence) < args.ttl {
            return Err(bad(format!(
                "--silence {} and --lock-delay {} are both shorter than --ttl {}: a leader cut off \
                 from Consul keeps its command up to the TTL after its last renew, while Consul may \
                 free the key right after that renew (a failed check); raise --silence (or \
                 --lock-delay, at most 60s) to at least {}",
                humantime::format_duration(args.silence),
                humantime::format_duration(args.lock_delay),
                humantime::format_duration(args.ttl),
                humantime::format_duration(args.ttl)
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
            limit,
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
            verbose: args.verbose,
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
    if key.trim().is_empty() {
        return Err(bad(format!(
            "--key {key:?} is blank; give a Consul KV key such as jobs/report"
        )));
    }
    // A `\r` from a file with CRLF line ends names another key than the one meant, and two
    // leaders would run on "jobs/report" and "jobs/report\r" with identical log lines.
    if key.chars().any(char::is_control) {
        return Err(bad(format!(
            "--key {key:?} contains a control character (a line end from a file with CRLF \
             line ends?); remove it"
        )));
    }
    if key.trim() != key {
        return Err(bad(format!(
            "--key {key:?} starts or ends with whitespace; remove it"
        )));
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

/// `--limit`: 1 for the lock on the key itself, up to `semaphore::MAX_LIMIT` holders for a
/// semaphore.
pub fn validate_limit(limit: u32) -> Result<u32, ConfigError> {
    use crate::lock::semaphore::MAX_LIMIT;
    if limit == 0 {
        return Err(bad(
            "--limit 0 would let no holder run; use 1 (a lock) or more (a semaphore)",
        ));
    }
    if limit > MAX_LIMIT {
        return Err(bad(format!(
            "--limit {limit} is above {MAX_LIMIT}: the semaphore's coordination key carries a \
             record of each holder, and Consul refuses values above 512 KiB"
        )));
    }
    Ok(limit)
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
    fn silence_or_lock_delay_must_cover_the_ttl() {
        let e = run_args(&[
            "--ttl",
            "10s",
            "--lock-delay",
            "1s",
            "--silence",
            "1s",
            "--grace",
            "500ms",
        ])
        .unwrap_err();
        assert!(
            e.0.contains("raise --silence") && e.0.contains("--ttl 10s"),
            "{e}"
        );
        assert!(!e.0.contains('\n'), "one line: {e}");
        let ok = |d, s| {
            run_args(&[
                "--ttl",
                "10s",
                "--grace",
                "1s",
                "--lock-delay",
                d,
                "--silence",
                s,
            ])
        };
        assert!(ok("1s", "10s").is_ok());
        assert!(ok("10s", "0").is_ok());
        // Above Consul's 60s lock-delay cap only the silence can cover the TTL.
        let e = run_args(&["--ttl", "2m", "--lock-delay", "60s", "--silence", "1m"]).unwrap_err();
        assert!(e.0.contains("at least 2m"), "{e}");
    }

    #[test]
    fn durations_that_could_overflow_are_refused() {
        for (flag, value) in [
            ("--grace", "18446744073709551615s"),
            ("--silence", "18446744073709551615s"),
            ("--wait", "18446744073709551615s"),
            ("--silence", "100y"),
            ("--ttl", "18446744073709551615s"),
            ("--lock-delay", "18446744073709551615s"),
        ] {
            let e = run_args(&[flag, value]).unwrap_err();
            assert!(e.0.contains(flag), "{flag} {value}: {e}");
        }
        assert!(run_args(&["--wait", "0"]).is_ok());
        assert!(run_args(&["--wait", "30days"]).is_ok());
        assert!(run_args(&["--wait", "31days"]).is_err());
    }

    #[test]
    fn limit_is_one_for_the_lock_and_bounded_for_a_semaphore() {
        assert_eq!(run_args(&[]).unwrap().limit, 1);
        assert_eq!(run_args(&["--limit", "3"]).unwrap().limit, 3);
        assert!(
            run_args(&["--limit", "0"])
                .unwrap_err()
                .0
                .contains("--limit 0")
        );
        assert!(run_args(&["--limit", "513"]).unwrap_err().0.contains("512"));
    }

    #[test]
    fn lock_delay_above_consul_cap_is_refused() {
        assert!(run_args(&["--lock-delay", "61s"]).is_err());
    }

    #[test]
    fn keys_are_checked() {
        for k in [
            "",
            "   ",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "jobs/report\r",
            "jobs/\nreport",
            " jobs/a",
            "jobs/a ",
            "a\tb",
        ] {
            assert!(validate_key(k).is_err(), "{k:?}");
        }
        assert!(validate_key("jobs/report").is_ok());
        assert!(validate_key("jobs/with space").is_ok());
        // The key is shown escaped, so an invisible character can be seen.
        let e = validate_key("jobs/report\r").unwrap_err();
        assert!(e.0.contains(r#""jobs/report\r""#), "{e}");
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
        let base = |a, ssl| parse_address(a, ssl).unwrap().0;
        assert_eq!(base("127.0.0.1:8500", false), "http://127.0.0.1:8500");
        assert_eq!(base("127.0.0.1:8500", true), "https://127.0.0.1:8500");
        assert_eq!(base("http://h:1/", true), "https://h:1");
        assert_eq!(base("https://h:1/prefix", false), "https://h:1/prefix");
        let (url, sock) = parse_address("unix:///run/c.sock", false).unwrap();
        assert_eq!(url, "http://localhost");
        assert_eq!(sock, Some(PathBuf::from("/run/c.sock")));
        assert!(parse_address("unix://rel.sock", false).is_err());
        assert!(parse_address("ftp://h", false).is_err());
        assert!(parse_address("", false).is_err());
    }

    #[test]
    fn a_ca_file_wins_over_a_ca_directory() {
        let dir = std::env::temp_dir().join(format!("cl-ca-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // Not a certificate: reading the directory would fail.
        std::fs::write(dir.join("README"), "not a certificate").unwrap();
        let ca = dir.join("ca.pem");
        // Any well-formed certificate will do for parsing.
        std::fs::write(&ca, TEST_CERT_PEM).unwrap();
        let tls = |file: Option<&Path>| {
            let args = ConsulArgs {
                ca_file: file.map(Path::to_path_buf),
                ca_path: Some(dir.clone()),
                // Whatever the environment running the test says.
                client_cert: None,
                client_key: None,
                ..consul_args()
            };
            TlsConfig::from_args(&args, false)
        };
        let both = tls(Some(&ca));
        let only_dir = tls(None);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(both.unwrap().ca_pems.len(), 1);
        let e = only_dir.err().unwrap();
        assert!(e.0.contains("README") && e.0.contains("--ca-path"), "{e}");
    }

    fn consul_args() -> ConsulArgs {
        let cli =
            crate::cli::Cli::try_parse_from(["consul-leader", "status", "--key", "k"]).unwrap();
        match cli.command {
            crate::cli::Command::Status(args) => args.consul,
            _ => unreachable!(),
        }
    }

    /// A self-signed certificate, only ever parsed.
    const TEST_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBhTCCASqgAwIBAgIULZJTtcHHaTejNwqGsCHXtWgBLxkwCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGdGVzdGNhMB4XDTI2MTEyMjA4MjAxN1oXDTI2MTEyNDA4MjAx
N1owETEPMA0GA1UEAwwGdGVzdGNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
phWXHzhFtgJGROqsSFWw7ZFNKDFzY6MYAFnJ4LEfopEhRDeNgjuzP76/A9esyCtT
ADq2mJQgm9LToMfhATyuf6NgMF4wHQYDVR0OBBYEFDyRLBRq/6g1U+l4k6x91W6t
FEhqMB8GA1UdIwQYMBaAFDyRLBRq/6g1U+l4k6x91W6tFEhqMA8GA1UdEwEB/wQF
MAMBAf8wCwYDVR0PBAQDAgIEMAoGCCqGSM49BAMCA0kAMEYCIQCrIQGMQOzN70Fe
iD7WRIJ7BpzHw6cAgaHF0Q+1+ZCb1AIhAO2HqqfUOKLieks+DCryHLllROwsZpFs
IGMYHiVR7neC
-----END CERTIFICATE-----
";

    #[test]
    fn token_never_shows_in_debug() {
        let c = ConsulConfig {
            base_url: "http://x".into(),
            addr_display: "x".into(),
            unix_socket: None,
            token: Some("s3cret".into()),
            datacenter: None,
            namespace: None,
            partition: None,
            basic_auth: Some(("u".into(), "pw-s3cret".into())),
            tls: TlsConfig::default(),
        };
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
    }
}
