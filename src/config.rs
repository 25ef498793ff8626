//! Turns raw command-line options into a validated `RunConfig` and the [`Engine`] to talk to
//! (`ConsulConfig` or `EtcdConfig`).
//!
//! Everything that can be wrong with the user's input is found here, before any session exists, and
//! reported as one line that says what to change (exit code 2). Nothing after this point fails on
//! bad input.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::{ConsulArgs, EtcdArgs, LogFormat, OnLost, RestartPolicy, RunArgs};
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

/// Reads a token file. Consul's CLI quietly falls back to the anonymous token when the file is
/// empty; a file that was named but holds nothing is almost always a token that was never written,
/// so it is refused here instead of turning into confusing ACL denials (or, with ACLs off, into a
/// setup that breaks the day ACLs are enabled).
fn read_token(path: &Path, setting: &str) -> Result<String, ConfigError> {
    let bytes = read_file(path, "token file", setting)?;
    let token = String::from_utf8_lossy(&bytes).trim().to_string();
    if token.is_empty() {
        return Err(bad(format!(
            "the token file {} ({setting}) is empty; write the ACL token into it, or unset \
             {setting} to use the agent's default token",
            path.display()
        )));
    }
    Ok(token)
}

/// Consul's default HTTP address, used when neither `--http-addr` nor `CONSUL_HTTP_ADDR` is set.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8500";

/// A flag's value, or else its environment variable's when that is set and not empty.
fn flag_or_env(flag: Option<&str>, var: &str) -> Option<String> {
    flag.map(str::to_string).or_else(|| env_nonempty(var))
}

fn path_flag_or_env(flag: Option<&PathBuf>, var: &str) -> Option<PathBuf> {
    flag.cloned()
        .or_else(|| env_nonempty(var).map(PathBuf::from))
}

/// The connection settings with each flag or, failing it, its environment variable resolved.
struct Resolved {
    http_addr: String,
    ca_file: Option<PathBuf>,
    ca_path: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    tls_server_name: Option<String>,
}

impl Resolved {
    fn from_args(args: &ConsulArgs) -> Self {
        Self {
            http_addr: flag_or_env(args.http_addr.as_deref(), "CONSUL_HTTP_ADDR")
                .unwrap_or_else(|| DEFAULT_HTTP_ADDR.to_string()),
            ca_file: path_flag_or_env(args.ca_file.as_ref(), "CONSUL_CACERT"),
            ca_path: path_flag_or_env(args.ca_path.as_ref(), "CONSUL_CAPATH"),
            client_cert: path_flag_or_env(args.client_cert.as_ref(), "CONSUL_CLIENT_CERT"),
            client_key: path_flag_or_env(args.client_key.as_ref(), "CONSUL_CLIENT_KEY"),
            tls_server_name: flag_or_env(args.tls_server_name.as_deref(), "CONSUL_TLS_SERVER_NAME"),
        }
    }
}

impl ConsulConfig {
    pub fn from_args(args: &ConsulArgs) -> Result<Self, ConfigError> {
        let resolved = Resolved::from_args(args);
        let ssl = env_bool("CONSUL_HTTP_SSL")?.unwrap_or(false);
        let insecure = !env_bool("CONSUL_HTTP_SSL_VERIFY")?.unwrap_or(true);
        let (base_url, unix_socket) = parse_address(&resolved.http_addr, ssl)?;
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
        if let Some(t) = &token {
            // It travels in the X-Consul-Token header; the token itself is never printed.
            if t.chars().any(|c| c != '\t' && !(' '..='~').contains(&c)) {
                return Err(bad(
                    "the ACL token contains characters that cannot be sent in an HTTP header \
                     (a stray control or non-ASCII character?); check --token-file, --token, \
                     CONSUL_HTTP_TOKEN_FILE or CONSUL_HTTP_TOKEN",
                ));
            }
        }
        let basic_auth = env_nonempty("CONSUL_HTTP_AUTH").map(|v| match v.split_once(':') {
            Some((user, pass)) => (user.to_string(), pass.to_string()),
            None => (v, String::new()),
        });
        Ok(Self {
            addr_display: describe_address(&resolved.http_addr, &base_url),
            base_url,
            unix_socket,
            token,
            datacenter: args.datacenter.clone().filter(|d| !d.is_empty()),
            namespace: flag_or_env(args.namespace.as_deref(), "CONSUL_NAMESPACE")
                .filter(|n| !n.is_empty()),
            partition: flag_or_env(args.partition.as_deref(), "CONSUL_PARTITION")
                .filter(|p| !p.is_empty()),
            basic_auth,
            tls: TlsConfig::from_resolved(&resolved, insecure)?,
        })
    }
}

impl TlsConfig {
    fn from_resolved(args: &Resolved, insecure: bool) -> Result<Self, ConfigError> {
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

/// The lock engine a run or a status talks to, and how to reach it.
#[derive(Debug, Clone)]
pub enum Engine {
    Consul(ConsulConfig),
    Etcd(EtcdConfig),
}

/// The ids of Consul's connection flags (`ConsulArgs`), as clap names them.
const CONSUL_FLAGS: [(&str, &str); 11] = [
    ("http_addr", "--http-addr"),
    ("token", "--token"),
    ("token_file", "--token-file"),
    ("datacenter", "--datacenter"),
    ("ca_file", "--ca-file"),
    ("ca_path", "--ca-path"),
    ("client_cert", "--client-cert"),
    ("client_key", "--client-key"),
    ("tls_server_name", "--tls-server-name"),
    ("namespace", "--namespace"),
    ("partition", "--partition"),
];

/// The ids of etcd's connection flags (`EtcdArgs`).
const ETCD_FLAGS: [(&str, &str); 6] = [
    ("etcd_endpoints", "--etcd-endpoints"),
    ("etcd_cacert", "--etcd-cacert"),
    ("etcd_cert", "--etcd-cert"),
    ("etcd_key", "--etcd-key"),
    ("etcd_user", "--etcd-user"),
    ("etcd_password", "--etcd-password"),
];

/// Which engine the settings name. The rule, in order (README, "Choosing the engine"):
///
/// 1. flags of both engines on one command line: a usage error;
/// 2. any `--etcd-*` flag: etcd; any Consul connection flag (`--http-addr`, `--token`, ...):
///    Consul; an explicit flag wins over every variable;
/// 3. no engine flag: `ETCDCTL_ENDPOINTS` selects etcd and `CONSUL_HTTP_ADDR` Consul; both set
///    is a usage error (pass a flag to choose);
/// 4. nothing: Consul at 127.0.0.1:8500, as before etcd existed.
///
/// `given` holds the ids of the flags given on the command line; `etcd_env` and `consul_env`
/// whether `ETCDCTL_ENDPOINTS` and `CONSUL_HTTP_ADDR` are set (empty counts as unset).
pub fn pick_engine(
    given: &[String],
    etcd_env: bool,
    consul_env: bool,
) -> Result<EngineKind, ConfigError> {
    let named = |flags: &[(&'static str, &'static str)]| -> Vec<&'static str> {
        flags
            .iter()
            .filter(|(id, _)| given.iter().any(|g| g == id))
            .map(|(_, flag)| *flag)
            .collect()
    };
    let etcd = named(&ETCD_FLAGS);
    let consul = named(&CONSUL_FLAGS);
    match (etcd.first(), consul.first()) {
        (Some(e), Some(c)) => Err(bad(format!(
            "{e} and {c} name two engines (etcd and Consul); give the flags of one only"
        ))),
        (Some(_), None) => Ok(EngineKind::Etcd),
        (None, Some(_)) => Ok(EngineKind::Consul),
        (None, None) if etcd_env && consul_env => Err(bad(
            "both ETCDCTL_ENDPOINTS and CONSUL_HTTP_ADDR are set, so the engine is ambiguous; \
             choose with --etcd-endpoints (etcd) or --http-addr (Consul), or unset one",
        )),
        (None, None) if etcd_env => Ok(EngineKind::Etcd),
        (None, None) => Ok(EngineKind::Consul),
    }
}

/// The engine [`pick_engine`] chose, before its settings are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Consul,
    Etcd,
}

impl Engine {
    /// Picks the engine ([`pick_engine`]) and reads its settings.
    pub fn from_args(
        consul: &ConsulArgs,
        etcd: &EtcdArgs,
        given: &[String],
    ) -> Result<Engine, ConfigError> {
        let etcd_env = env_nonempty("ETCDCTL_ENDPOINTS").is_some();
        let consul_env = env_nonempty("CONSUL_HTTP_ADDR").is_some();
        Ok(match pick_engine(given, etcd_env, consul_env)? {
            EngineKind::Consul => Engine::Consul(ConsulConfig::from_args(consul)?),
            EngineKind::Etcd => Engine::Etcd(EtcdConfig::from_args(etcd)?),
        })
    }
}

/// How to reach etcd: the settings `etcdctl` takes, flags first, then its variables.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, at least one.
    pub endpoints: Vec<String>,
    /// CA certificates (PEM) to trust instead of the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM).
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// User name and password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdConfig {
    // Hand-written so that the password can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.identity_pem.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "<redacted>")))
            .finish()
    }
}

/// A flag's value, else its variable's (empty counts as unset).
fn etcd_flag_or_env<T: Clone>(
    flag: &Option<T>,
    var: &str,
    from: impl Fn(String) -> T,
) -> Option<(T, String)> {
    match flag {
        Some(v) => Some((v.clone(), String::new())),
        None => env_nonempty(var).map(|v| (from(v), var.to_string())),
    }
}

impl EtcdConfig {
    pub fn uses_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
    }

    pub fn from_args(args: &EtcdArgs) -> Result<Self, ConfigError> {
        let setting = |flag: &str, var: &str, from: &str| {
            if from.is_empty() {
                flag.to_string()
            } else {
                var.to_string()
            }
        };
        let ca = etcd_flag_or_env(&args.etcd_cacert, "ETCDCTL_CACERT", PathBuf::from);
        let cert = etcd_flag_or_env(&args.etcd_cert, "ETCDCTL_CERT", PathBuf::from);
        let key = etcd_flag_or_env(&args.etcd_key, "ETCDCTL_KEY", PathBuf::from);
        let ca_pem = match &ca {
            Some((path, from)) => {
                let what = setting("--etcd-cacert", "ETCDCTL_CACERT", from);
                let pem = read_file(path, "CA certificate", &what)?;
                match reqwest::Certificate::from_pem_bundle(&pem) {
                    Ok(certs) if !certs.is_empty() => Some(pem),
                    _ => {
                        return Err(bad(format!(
                            "the CA file {} holds no PEM certificate; check {what}",
                            path.display()
                        )));
                    }
                }
            }
            None => None,
        };
        let identity_pem = match (&cert, &key) {
            (Some((cert, cf)), Some((key, kf))) => {
                let cert_pem = read_file(
                    cert,
                    "client certificate",
                    &setting("--etcd-cert", "ETCDCTL_CERT", cf),
                )?;
                let key_pem =
                    read_file(key, "client key", &setting("--etcd-key", "ETCDCTL_KEY", kf))?;
                let mut both = cert_pem.clone();
                both.push(b'\n');
                both.extend_from_slice(&key_pem);
                reqwest::Identity::from_pem(&both).map_err(|e| {
                    bad(format!(
                        "the etcd client certificate or key is not valid PEM ({e}); check --etcd-cert and --etcd-key"
                    ))
                })?;
                Some((cert_pem, key_pem))
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "both an etcd client certificate and its key must be given (--etcd-cert and \
                     --etcd-key, or ETCDCTL_CERT and ETCDCTL_KEY)",
                ));
            }
        };
        let tls = ca_pem.is_some() || identity_pem.is_some();
        let (list, from) = etcd_flag_or_env(&args.etcd_endpoints, "ETCDCTL_ENDPOINTS", |v| v)
            .unwrap_or_else(|| ("127.0.0.1:2379".to_string(), String::new()));
        let what = setting("--etcd-endpoints", "ETCDCTL_ENDPOINTS", &from);
        let endpoints = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| normalize_endpoint(e, tls, &what))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(bad(format!(
                "{what} names no endpoint; give URLs such as http://127.0.0.1:2379"
            )));
        }
        if tls && endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(bad(format!(
                "{what} has an http:// endpoint, but TLS settings are given (--etcd-cacert, \
                 --etcd-cert); use https:// endpoints"
            )));
        }
        let user = match etcd_flag_or_env(&args.etcd_user, "ETCDCTL_USER", |v| v) {
            None => None,
            Some((user, from)) => {
                let what = setting("--etcd-user", "ETCDCTL_USER", &from);
                let (name, inline) = match user.split_once(':') {
                    Some((n, p)) => (n.to_string(), Some(p.to_string())),
                    None => (user.clone(), None),
                };
                if name.is_empty() {
                    return Err(bad(format!(
                        "{what} has an empty user name; use NAME or NAME:PASSWORD"
                    )));
                }
                let password = inline
                    .or_else(|| {
                        etcd_flag_or_env(&args.etcd_password, "ETCDCTL_PASSWORD", |v| v)
                            .map(|(p, _)| p)
                    })
                    .ok_or_else(|| {
                        bad(format!(
                            "{what} names user {name} but no password; give it in ETCDCTL_PASSWORD \
                             (or --etcd-password, or {name}:PASSWORD)"
                        ))
                    })?;
                Some((name, password))
            }
        };
        Ok(Self {
            endpoints,
            ca_pem,
            identity_pem,
            user,
        })
    }
}

/// `http://h:p` and `https://h:p` as given; a bare `h:p` gets https when TLS settings are given
/// (as `etcdctl` does), http otherwise.
fn normalize_endpoint(e: &str, tls: bool, what: &str) -> Result<String, ConfigError> {
    let (scheme, rest) = match e.split_once("://") {
        None => (if tls { "https" } else { "http" }, e),
        Some(("http", rest)) => ("http", rest),
        Some(("https", rest)) => ("https", rest),
        Some((other, _)) => {
            return Err(bad(format!(
                "{what}: endpoint {e} has the scheme `{other}`; use http://host:port or https://host:port"
            )));
        }
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(bad(format!(
            "{what}: endpoint {e} is not host:port; use e.g. http://127.0.0.1:2379"
        )));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// How an address is named in messages. A host without a port goes to the scheme's default port
/// (80, or 443 for https) exactly as with Consul's CLI, whose client puts the address into the
/// URL as it is; since Consul itself listens on 8500, the messages say so.
fn describe_address(addr: &str, base_url: &str) -> String {
    if addr.trim().starts_with("unix://") {
        return addr.to_string();
    }
    let authority = base_url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
    let has_port = match authority.rsplit_once(':') {
        // `[::1]` has colons but no port; `[::1]:8500` ends in one.
        Some((host, port)) => {
            port.chars().all(|c| c.is_ascii_digit())
                && (!host.starts_with('[') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port || authority.is_empty() {
        return addr.to_string();
    }
    let port = if base_url.starts_with("https://") {
        443
    } else {
        80
    };
    format!(
        "{addr} (no port given, so port {port}, as with Consul's CLI; Consul's HTTP API listens on \
         8500: use {authority}:8500)"
    )
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
    /// The engine: Consul (the default) or etcd.
    pub engine: Engine,
    pub command: Vec<String>,
    pub host: String,
    /// This contender's stable identity (`--id`, default the host name).
    pub id: String,
    /// `--priority-window`; zero when priority is off.
    pub priority_window: Duration,
    pub restart: Restart,
    /// Signals forwarded to the command's group.
    pub forward_signals: Vec<Signal>,
    /// Signals that stop the wrapper: TERM, INT, and HUP and QUIT unless forwarded.
    pub stop_signals: Vec<Signal>,
}

/// The restart policy while the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    pub policy: RestartPolicy,
    /// The first pause; it doubles with each restart in a row, up to `max_delay`.
    pub delay: Duration,
    pub max_delay: Duration,
    /// At most `limit` starts within `period`.
    pub limit: u32,
    pub period: Duration,
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

/// Consul's default `session_ttl_min`: it refuses a session TTL below this.
const CONSUL_SESSION_TTL_MIN: Duration = Duration::from_secs(10);

/// Names a lowered `session_ttl_min` of the agent (a test agent, `dev-agent --session-ttl-min`), so
/// that TTLs below Consul's default minimum are accepted. An empty value counts as unset.
pub const TTL_MIN_ENV: &str = "CONSUL_LEADER_TTL_MIN";

/// Refuses a TTL that Consul would refuse, before any session exists: the agent would only answer
/// with a 500 after the wrapper had already started.
fn check_ttl(ttl: Duration) -> Result<(), ConfigError> {
    let min = match env_nonempty(TTL_MIN_ENV) {
        None => CONSUL_SESSION_TTL_MIN,
        Some(v) => crate::cli::parse_duration(&v)
            .map_err(|e| bad(format!("{TTL_MIN_ENV}={v} is not a duration: {e}")))?,
    };
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if ttl < min || ttl.is_zero() {
        let lowered = if min == CONSUL_SESSION_TTL_MIN {
            format!(
                " (for an agent whose session_ttl_min is lowered, set {TTL_MIN_ENV} to that value)"
            )
        } else {
            format!(
                " ({TTL_MIN_ENV} says the agent's session_ttl_min is {})",
                show(min)
            )
        };
        return Err(bad(format!(
            "--ttl {} is below the agent's minimum session TTL of {}, so Consul would refuse the \
             session; use --ttl {} or more{lowered}",
            show(ttl),
            show(min),
            show(min)
        )));
    }
    if ttl > MAX_TTL {
        return Err(bad(format!(
            "--ttl {} is above Consul's maximum session TTL of 24h; use --ttl 24h or less",
            show(ttl)
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
        let engine = Engine::from_args(&args.consul, &args.etcd, &args.given)?;
        let etcd = matches!(engine, Engine::Etcd(_));
        let key = if etcd {
            validate_etcd_name(&args.key)?
        } else {
            validate_key(&args.key)?
        };
        let limit = validate_limit(args.limit)?;
        if etcd {
            check_etcd_run(args)?;
        }
        let stop_signal = parse_signal(&args.stop_signal)?;
        // Consul's session TTL minimum; etcd's rules are in `check_etcd_run`.
        if !etcd {
            check_ttl(args.ttl)?;
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
        // back (election's module docs, 2 and 3), so one of them must cover the TTL. On etcd
        // only the silence can (`check_etcd_run`).
        if !etcd && args.lock_delay.max(args.silence) < args.ttl {
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
        let id = match &args.id {
            Some(id) => validate_id(id)?,
            None => host.clone(),
        };
        at_most("--priority-window", args.priority_window, MAX_TTL, "")?;
        let restart = parse_restart(args)?;
        let forward_signals = match &args.forward_signals {
            Some(list) => parse_forward_signals(list, stop_signal)?,
            // The default gives way to a --stop-signal among them (httpd stops on WINCH).
            None => [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGWINCH]
                .into_iter()
                .filter(|s| *s != stop_signal)
                .collect(),
        };
        let stop_signals = [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ]
        .into_iter()
        .filter(|s| !forward_signals.contains(s))
        .collect();
        let session_name = args
            .name
            .clone()
            .unwrap_or_else(|| format!("consul-leader {key} on {host} pid {}", std::process::id()));
        Ok(Self {
            key,
            limit,
            ttl: args.ttl,
            // etcd has no lock-delay.
            lock_delay: if etcd {
                Duration::ZERO
            } else {
                args.lock_delay
            },
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
            engine,
            command: args.command.clone(),
            host,
            id,
            priority_window: args.priority_window,
            restart,
            forward_signals,
            stop_signals,
        })
    }
}

/// The rules of `run` that only etcd has: whole-second TTLs, a silence that covers the TTL on
/// its own, and no Consul-only option.
fn check_etcd_run(args: &RunArgs) -> Result<(), ConfigError> {
    let consul_only = [
        ("lock_delay", "--lock-delay"),
        ("checks", "--check"),
        ("no_node_check", "--no-node-check"),
        ("name", "--name"),
    ];
    if let Some((_, flag)) = consul_only
        .iter()
        .find(|(id, _)| args.given.iter().any(|g| g == id))
    {
        return Err(bad(format!(
            "{flag} is a Consul session setting; etcd has no such thing: leave it out with --etcd-endpoints"
        )));
    }
    if args.limit > 1 {
        return Err(bad(format!(
            "--limit {} is a semaphore in the layout of consul lock -n, which runs on Consul only;              on etcd only the lock of etcdctl lock is available (--limit 1)",
            args.limit
        )));
    }
    if args.ttl > MAX_TTL {
        return Err(bad(format!(
            "--ttl {} is too long; the most it takes is 24h",
            humantime::format_duration(args.ttl)
        )));
    }
    if !args.priority_window.is_zero() {
        return Err(bad(
            "--priority-window is not available on etcd: its lock is a first-come, first-served \
             queue shared with etcdctl lock, and letting a previous holder jump it would break that",
        ));
    }
    if args.ttl.subsec_nanos() != 0 || args.ttl.is_zero() {
        return Err(bad(format!(
            "--ttl {} is not a whole number of seconds; etcd leases count whole seconds: use e.g. {}s",
            humantime::format_duration(args.ttl),
            args.ttl.as_secs().max(1)
        )));
    }
    // A leader cut off from etcd keeps its command up to the TTL after its last renew, while
    // its key may go right after that renew (a revoked lease, a deleted key). etcd has no
    // lock-delay, so the silence alone must hold the next leader back that long
    // (lock::etcd's module docs, 3).
    if args.silence < args.ttl {
        return Err(bad(format!(
            "--silence {} is shorter than --ttl {}: on etcd only the silence holds the next leader \
             back (etcd has no lock-delay), and a leader cut off from etcd keeps its command up to \
             the TTL after its last renew while its key may be deleted right after it (a revoked \
             lease); raise --silence to at least {}",
            humantime::format_duration(args.silence),
            humantime::format_duration(args.ttl),
            humantime::format_duration(args.ttl)
        )));
    }
    Ok(())
}

/// An etcd lock name (`etcdctl lock NAME`): its keys are `NAME/<lease>`. etcd takes any bytes,
/// but a name with control characters or stray whitespace is a typo, and a trailing `/` makes a
/// `NAME//` prefix.
pub fn validate_etcd_name(name: &str) -> Result<String, ConfigError> {
    if name.trim().is_empty() {
        return Err(bad(format!(
            "--key {name:?} is blank; give the lock's name, such as jobs/report"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(bad(format!(
            "--key {name:?} contains a control character (a line end from a file with CRLF \
             line ends?); remove it"
        )));
    }
    if name.trim() != name {
        return Err(bad(format!(
            "--key {name:?} starts or ends with whitespace; remove it"
        )));
    }
    if name.ends_with('/') {
        return Err(bad(format!(
            "--key {name} ends with `/`; the lock's keys are NAME/<lease>, so give the name without it"
        )));
    }
    Ok(name.to_string())
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

/// An `--id`: printable, short, so that it reads well in the key's value and in `status`.
fn validate_id(id: &str) -> Result<String, ConfigError> {
    if id.trim().is_empty() || id.trim() != id || id.chars().any(char::is_control) {
        return Err(bad(format!(
            "--id {id:?} must be printable, without leading or trailing whitespace; use a name such as web-2"
        )));
    }
    if id.len() > 128 {
        return Err(bad("--id is longer than 128 bytes; use a shorter name"));
    }
    Ok(id.to_string())
}

/// `--restart`, `--restart-delay` and `--restart-limit N/PERIOD`.
fn parse_restart(args: &RunArgs) -> Result<Restart, ConfigError> {
    at_most("--restart-delay", args.restart_delay, MAX_TTL, "")?;
    let limit_err = || {
        bad(format!(
            "--restart-limit {} is not N/PERIOD; use e.g. 5/10m (at most 5 starts within 10 minutes)",
            args.restart_limit
        ))
    };
    let (n, period) = args.restart_limit.split_once('/').ok_or_else(limit_err)?;
    let limit: u32 = n.trim().parse().map_err(|_| limit_err())?;
    let period = humantime::parse_duration(period.trim()).map_err(|_| limit_err())?;
    if limit == 0 || period.is_zero() {
        return Err(bad(format!(
            "--restart-limit {} allows no start; use at least 1 start in a period above 0, e.g. 5/10m",
            args.restart_limit
        )));
    }
    at_most(
        "--restart-limit's period",
        period,
        Duration::from_secs(7 * 24 * 3600),
        "",
    )?;
    Ok(Restart {
        policy: args.restart,
        delay: args.restart_delay,
        max_delay: args.restart_delay.max(Duration::from_secs(60)),
        limit,
        period,
    })
}

/// `--forward-signals`: names or numbers, comma separated, from the signals a wrapper can pass
/// on without losing its own way to be stopped.
fn parse_forward_signals(list: &str, stop_signal: Signal) -> Result<Vec<Signal>, ConfigError> {
    const FORWARDABLE: [Signal; 6] = [
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGALRM,
    ];
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let sig = signal_by_name(name).ok_or_else(|| {
            bad(format!(
                "--forward-signals: {name} is not a signal name; use HUP, QUIT, USR1, USR2, WINCH or ALRM"
            ))
        })?;
        if sig == Signal::SIGTERM || sig == Signal::SIGINT {
            return Err(bad(format!(
                "--forward-signals cannot take {}: TERM and INT always stop the command and the wrapper",
                sig.as_str()
            )));
        }
        if !FORWARDABLE.contains(&sig) {
            return Err(bad(format!(
                "--forward-signals cannot take {}; use HUP, QUIT, USR1, USR2, WINCH or ALRM",
                sig.as_str()
            )));
        }
        if sig == stop_signal {
            return Err(bad(format!(
                "{} is both the --stop-signal and in --forward-signals; a forwarded signal would stop \
                 the command behind the wrapper's back: remove it from --forward-signals",
                sig.as_str()
            )));
        }
        if !out.contains(&sig) {
            out.push(sig);
        }
    }
    Ok(out)
}

/// A signal by name (`TERM`, `SIGTERM`, `term`) or number.
fn signal_by_name(s: &str) -> Option<Signal> {
    let upper = s.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).ok()
}

/// Accepts `TERM`, `SIGTERM`, `term` or a number.
pub fn parse_signal(s: &str) -> Result<Signal, ConfigError> {
    let parsed = signal_by_name(s);
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

    fn run_args(extra: &[&str]) -> Result<RunConfig, ConfigError> {
        let mut argv = vec!["consul-leader", "run", "--key", "jobs/a"];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["--", "true"]);
        let cli = crate::cli::try_parse_from(argv).unwrap();
        match cli.command {
            crate::cli::Command::Run(args) => RunConfig::from_args(&args),
            _ => unreachable!(),
        }
    }

    fn etcd_args(extra: &[&str]) -> Result<RunConfig, ConfigError> {
        let mut argv = vec!["--etcd-endpoints", "http://127.0.0.1:2379"];
        argv.extend_from_slice(extra);
        run_args(&argv)
    }

    #[test]
    fn an_explicit_flag_picks_the_engine_and_mixes_are_refused() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Flags win over every variable.
        assert_eq!(
            pick_engine(&ids(&["etcd_endpoints"]), false, true).unwrap(),
            EngineKind::Etcd
        );
        assert_eq!(
            pick_engine(&ids(&["http_addr"]), true, false).unwrap(),
            EngineKind::Consul
        );
        assert_eq!(
            pick_engine(&ids(&["etcd_cacert"]), false, false).unwrap(),
            EngineKind::Etcd
        );
        // Flags of both engines, or both variables and no flag: ambiguous, a usage error.
        let e = pick_engine(&ids(&["etcd_endpoints", "token"]), false, false).unwrap_err();
        assert!(
            e.0.contains("--etcd-endpoints") && e.0.contains("--token"),
            "{e}"
        );
        let e = pick_engine(&[], true, true).unwrap_err();
        assert!(
            e.0.contains("ETCDCTL_ENDPOINTS") && e.0.contains("CONSUL_HTTP_ADDR"),
            "{e}"
        );
        // One variable: its engine; nothing: Consul, as always.
        assert_eq!(pick_engine(&[], true, false).unwrap(), EngineKind::Etcd);
        assert_eq!(pick_engine(&[], false, true).unwrap(), EngineKind::Consul);
        assert_eq!(pick_engine(&[], false, false).unwrap(), EngineKind::Consul);
        // Options that are not about connecting choose nothing.
        assert_eq!(
            pick_engine(&ids(&["ttl", "key"]), true, false).unwrap(),
            EngineKind::Etcd
        );
    }

    #[test]
    fn etcd_runs_need_a_silence_that_covers_the_ttl_on_its_own() {
        let c = etcd_args(&["--ttl", "5s", "--silence", "5s", "--grace", "1s"]).unwrap();
        assert!(matches!(c.engine, Engine::Etcd(_)));
        assert_eq!(c.lock_delay, Duration::ZERO, "etcd has no lock-delay");
        // Consul accepts a lock-delay that covers the TTL; etcd has none.
        let e = etcd_args(&["--ttl", "10s", "--silence", "2s", "--grace", "1s"]).unwrap_err();
        assert!(
            e.0.contains("--silence")
                && e.0.contains("no lock-delay")
                && e.0.contains("at least 10s"),
            "{e}"
        );
        assert!(!e.0.contains('\n'), "one line: {e}");
    }

    #[test]
    fn etcd_refuses_what_only_consul_has() {
        let e = etcd_args(&["--ttl", "2500ms", "--silence", "3s", "--grace", "1s"]).unwrap_err();
        assert!(e.0.contains("whole"), "{e}");
        for flag in [["--lock-delay", "15s"], ["--check", "c1"], ["--name", "n"]] {
            let e = etcd_args(&flag).unwrap_err();
            assert!(e.0.contains(flag[0]) && e.0.contains("Consul"), "{e}");
        }
        let e = etcd_args(&["--no-node-check"]).unwrap_err();
        assert!(e.0.contains("--no-node-check"), "{e}");
        let e = etcd_args(&["--priority-window", "10s"]).unwrap_err();
        assert!(e.0.contains("first-come"), "{e}");
        // A Consul flag beside an etcd one: which engine was meant?
        let e = etcd_args(&["--http-addr", "127.0.0.1:8500"]).unwrap_err();
        assert!(e.0.contains("two engines"), "{e}");
    }

    #[test]
    fn etcd_endpoints_and_names_are_checked() {
        let tls = |e: &str| normalize_endpoint(e, true, "--etcd-endpoints");
        let plain = |e: &str| normalize_endpoint(e, false, "--etcd-endpoints");
        assert_eq!(plain("127.0.0.1:2379").unwrap(), "http://127.0.0.1:2379");
        assert_eq!(tls("127.0.0.1:2379").unwrap(), "https://127.0.0.1:2379");
        assert_eq!(plain("https://h:1/").unwrap(), "https://h:1");
        assert!(plain("unix:///run/etcd.sock").is_err());
        assert!(plain("http://h:1/v3").is_err());
        let c = run_args(&["--etcd-endpoints", " http://a:1, b:2 ,"]).unwrap();
        match c.engine {
            Engine::Etcd(e) => assert_eq!(e.endpoints, ["http://a:1", "http://b:2"]),
            other => panic!("{other:?}"),
        }
        // etcd lock names may start with `/`, as etcdctl users write them.
        assert_eq!(validate_etcd_name("/locks/job").unwrap(), "/locks/job");
        for bad in ["", " x", "x/", "a\rb"] {
            assert!(validate_etcd_name(bad).is_err(), "{bad:?}");
        }
        let e = etcd_args(&["--etcd-user", "root"]).unwrap_err();
        assert!(e.0.contains("ETCDCTL_PASSWORD"), "{e}");
        let c = etcd_args(&["--etcd-user", "root:pw-s3cret"]).unwrap();
        assert!(
            !format!("{:?}", c.engine).contains("s3cret"),
            "{:?}",
            c.engine
        );
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
    fn forwarded_signals_stop_nothing_and_stay_forwardable() {
        let c = run_args(&[]).unwrap();
        assert_eq!(
            c.forward_signals,
            [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGWINCH]
        );
        assert_eq!(
            c.stop_signals,
            [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGQUIT
            ]
        );
        let c = run_args(&["--forward-signals", "hup,USR1"]).unwrap();
        assert_eq!(c.forward_signals, [Signal::SIGHUP, Signal::SIGUSR1]);
        assert!(!c.stop_signals.contains(&Signal::SIGHUP));
        for bad in ["TERM", "INT", "KILL", "CHLD", "nope"] {
            assert!(run_args(&["--forward-signals", bad]).is_err(), "{bad}");
        }
        // The default list gives way to the stop signal; an explicit list that names it is refused.
        let c = run_args(&["--stop-signal", "USR1"]).unwrap();
        assert_eq!(c.forward_signals, [Signal::SIGUSR2, Signal::SIGWINCH]);
        let e = run_args(&["--stop-signal", "USR1", "--forward-signals", "USR1,USR2"]).unwrap_err();
        assert!(e.0.contains("--forward-signals"), "{e}");
        assert!(run_args(&["--stop-signal", "USR1", "--forward-signals", "USR2"]).is_ok());
    }

    #[test]
    fn restart_limits_parse() {
        let c = run_args(&["--restart", "on-failure", "--restart-limit", "3/1m"]).unwrap();
        assert_eq!(c.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(
            (c.restart.limit, c.restart.period),
            (3, Duration::from_secs(60))
        );
        assert_eq!(c.restart.max_delay, Duration::from_secs(60));
        for bad in ["5", "0/10m", "x/10m", "5/0s", "5/ten"] {
            assert!(run_args(&["--restart-limit", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_default_to_the_host_and_are_checked() {
        let c = run_args(&[]).unwrap();
        assert_eq!(c.id, c.host);
        assert_eq!(run_args(&["--id", "web-2"]).unwrap().id, "web-2");
        assert!(run_args(&["--id", " web"]).is_err());
        assert!(run_args(&["--id", "a\rb"]).is_err());
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
            let args = Resolved {
                http_addr: DEFAULT_HTTP_ADDR.into(),
                ca_file: file.map(Path::to_path_buf),
                ca_path: Some(dir.clone()),
                client_cert: None,
                client_key: None,
                tls_server_name: None,
            };
            TlsConfig::from_resolved(&args, false)
        };
        let both = tls(Some(&ca));
        let only_dir = tls(None);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(both.unwrap().ca_pems.len(), 1);
        let e = only_dir.err().unwrap();
        assert!(e.0.contains("README") && e.0.contains("--ca-path"), "{e}");
    }

    #[test]
    fn a_host_without_a_port_is_named_with_the_port_it_gets() {
        let named = |a: &str| describe_address(a, &parse_address(a, false).unwrap().0);
        assert_eq!(named("127.0.0.1:8500"), "127.0.0.1:8500");
        assert_eq!(named("http://[::1]:8500/"), "http://[::1]:8500/");
        assert_eq!(named("unix:///run/consul.sock"), "unix:///run/consul.sock");
        assert!(
            named("localhost").contains("port 80"),
            "{}",
            named("localhost")
        );
        assert!(named("https://consul").contains("port 443"));
        assert!(
            named("[::1]").contains("use [::1]:8500"),
            "{}",
            named("[::1]")
        );
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
