//! A small client for the Consul HTTP API subset that leader election needs: sessions, KV reads
//! (plain, recursive and blocking), acquire and release, check-and-set and delete.
//!
//! Each call has a timeout that fits its purpose (a blocking read waits longer than its `wait` plus
//! Consul's jitter; a renew is short), so a hung connection can never hold up the leader's own
//! deadline. Errors are classified once here: `is_transient` says whether retrying can help.

use std::fmt;
use std::time::Duration;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::StatusCode;
use serde::Serialize;

use crate::config::ConsulConfig;
use crate::wire::{KvEntry, SessionEntry};

/// A Consul session ID. A newtype so that it is never mixed up with a key or a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(pub String);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Consul index (`X-Consul-Index`), as used for blocking queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ConsulIndex(pub u64);

/// Characters escaped in a key path; `/` stays as it is, so the key maps onto Consul's URL path.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'+')
    .add(b'&')
    .add(b';')
    .add(b'=');

/// What went wrong talking to Consul.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("cannot reach the Consul agent at {addr} ({detail}); {hint}")]
    Unreachable {
        addr: String,
        detail: String,
        hint: &'static str,
    },
    /// The connection was made but TLS failed: a certificate problem, not a dead agent, so the
    /// message points at the TLS settings instead of at the address.
    #[error("TLS with the Consul agent at {addr} failed ({detail}); {hint}")]
    Tls {
        addr: String,
        detail: String,
        hint: &'static str,
    },
    #[error("the Consul agent at {addr} did not answer {op} within {timeout:?}")]
    Timeout {
        addr: String,
        op: &'static str,
        timeout: Duration,
    },
    #[error(
        "Consul refused {op}: {body}; the token needs `{permission}` (set it with --token-file or CONSUL_HTTP_TOKEN)"
    )]
    Denied {
        op: &'static str,
        permission: String,
        body: String,
    },
    #[error("Consul answered {op} with {status}: {body}")]
    Status {
        op: &'static str,
        status: u16,
        body: String,
    },
    #[error(
        "the answer to {op} is not what a Consul agent sends ({detail}); is this a Consul agent? check CONSUL_HTTP_ADDR / --http-addr"
    )]
    Decode { op: &'static str, detail: String },
}

impl ConsulError {
    /// Worth retrying: the agent may answer differently in a moment.
    pub fn is_transient(&self) -> bool {
        match self {
            // A TLS failure stays retryable, as in Consul's Go client: an agent whose certificate
            // is being rotated recovers, and a wrong setting fails the first request anyway.
            ConsulError::Unreachable { .. }
            | ConsulError::Tls { .. }
            | ConsulError::Timeout { .. } => true,
            ConsulError::Status { status, body, .. } => {
                (*status >= 500 || *status == 429) && !is_permanent_500(body)
            }
            ConsulError::Denied { .. } | ConsulError::Decode { .. } => false,
        }
    }
}

/// Some 500 answers are caused by what we sent and will not change on retry.
fn is_permanent_500(body: &str) -> bool {
    [
        "Invalid Session TTL",
        "Session TTL",
        "Invalid Behavior",
        "Missing check",
        "Missing node registration",
        "No path to datacenter",
        "invalid session",
        "missing session",
    ]
    .iter()
    .any(|needle| body.contains(needle))
}

/// Options of a KV read.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOpts {
    /// Block until the key's index passes this one (0: answer at once).
    pub index: ConsulIndex,
    /// How long the server may block.
    pub wait: Option<Duration>,
    /// `?consistent`: the leader confirms it still leads before answering.
    pub consistent: bool,
    /// Give up after this long instead of the default (5s; a blocking read: its wait, Consul's
    /// jitter of up to wait/16, and 5s).
    pub timeout: Option<Duration>,
    /// On a connection of its own instead of a pooled one, which may be dead (after a read that
    /// failed).
    pub fresh: bool,
}

impl ReadOpts {
    /// The query parameters these options add, and how long the read may take.
    fn query(&self, query: &mut Vec<(&'static str, String)>) -> Duration {
        if self.consistent {
            query.push(("consistent", String::new()));
        }
        let mut timeout = SHORT_TIMEOUT;
        if self.index.0 > 0 {
            query.push(("index", self.index.0.to_string()));
            let wait = self.wait.unwrap_or(Duration::from_secs(300));
            query.push(("wait", format!("{}ms", wait.as_millis().max(1))));
            // Consul adds up to wait/16 of jitter; allow for it and for the round trip.
            timeout = wait + wait / 16 + SHORT_TIMEOUT;
        }
        self.timeout.unwrap_or(timeout)
    }
}

/// The body of `PUT /v1/session/create`.
#[derive(Debug, Serialize)]
pub struct SessionRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "TTL")]
    pub ttl: String,
    #[serde(rename = "LockDelay")]
    pub lock_delay: String,
    #[serde(rename = "Behavior")]
    pub behavior: &'static str,
    /// The node checks to bind. Sent explicitly, also when empty: an absent list would mean
    /// Consul's default (`serfHealth`).
    #[serde(rename = "NodeChecks")]
    pub node_checks: Vec<String>,
    /// The legacy field. Consul resolves the two (consul-api.md §2.1): `"Checks": []` clears every
    /// node check, while leaving it out lets `NodeChecks` decide. So it is sent, empty, only when
    /// no check at all is wanted.
    #[serde(rename = "Checks", skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<String>>,
}

impl SessionRequest {
    /// A release-behaviour session bound to exactly `checks`.
    pub fn new(name: String, ttl: Duration, lock_delay: Duration, checks: Vec<String>) -> Self {
        let legacy = checks.is_empty().then(Vec::new);
        Self {
            name,
            ttl: format!("{}ms", ttl.as_millis()),
            lock_delay: format!("{}ms", lock_delay.as_millis()),
            behavior: "release",
            node_checks: checks,
            checks: legacy,
        }
    }
}

/// Parses a JSON answer, naming the call that got it when it cannot.
fn decode<T: serde::de::DeserializeOwned>(op: &'static str, body: &[u8]) -> Result<T, ConsulError> {
    serde_json::from_slice(body).map_err(|e| ConsulError::Decode {
        op,
        detail: e.to_string(),
    })
}

/// Short timeout for non-blocking calls; a renew must not hang past the leader's deadline.
const SHORT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Client {
    http: reqwest::Client,
    /// For hedged renews and a leader's reads after a failed one: keeps no idle connection, so
    /// every request goes out on a fresh one. A pooled connection may be silently dead (a
    /// partition that outlived the TCP stream, state lost in a NAT), and a request that waited on
    /// it would waste the time the fence leaves. Built at first use: most runs never need it, and
    /// with https every client reads the system's CA store (about 150 files) and keeps it.
    fresh_http: std::sync::OnceLock<reqwest::Client>,
    /// The TLS server name pinned to the configured address (`pin_server_name`), for
    /// `fresh_http`.
    pin: Option<(String, Vec<std::net::SocketAddr>)>,
    cfg: ConsulConfig,
}

impl Client {
    pub fn new(mut cfg: ConsulConfig) -> anyhow::Result<Self> {
        // reqwest is built without a default TLS provider; pick ring once for the process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pin = Self::pin_server_name(&mut cfg)?;
        let http = Self::builder(&cfg, pin.as_ref())?.build()?;
        Ok(Self {
            http,
            fresh_http: std::sync::OnceLock::new(),
            pin,
            cfg,
        })
    }

    /// The pooled client, or with `fresh` the one that opens a connection per request, built on
    /// first use with the settings `http` was built with (which cannot fail then, since they
    /// did once; if it did, the pooled client stands in).
    fn http_for(&self, fresh: bool) -> &reqwest::Client {
        if !fresh {
            return &self.http;
        }
        self.fresh_http.get_or_init(|| {
            Self::builder(&self.cfg, self.pin.as_ref())
                .and_then(|b| Ok(b.pool_max_idle_per_host(0).build()?))
                .unwrap_or_else(|e| {
                    tracing::warn!("fresh connections unavailable, using pooled ones: {e:#}");
                    self.http.clone()
                })
        })
    }

    /// With a TLS server name, verify the agent's certificate against that name: address the
    /// agent by the name (rewriting `cfg.base_url`) and return the name with the configured
    /// address's sockets, to pin it there, so TLS (SNI and verification) sees the name while the
    /// connection goes where the user pointed it.
    fn pin_server_name(
        cfg: &mut ConsulConfig,
    ) -> anyhow::Result<Option<(String, Vec<std::net::SocketAddr>)>> {
        let Some(name) = cfg.tls.server_name.clone() else {
            return Ok(None);
        };
        let Some((scheme, rest)) = cfg.base_url.split_once("://") else {
            return Ok(None);
        };
        let (host_port, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let addrs = std::net::ToSocketAddrs::to_socket_addrs(host_port)
            .map_err(|e| anyhow::anyhow!("cannot resolve the Consul address {host_port}: {e}"))?
            .collect::<Vec<_>>();
        let port = addrs.first().map(|a| a.port()).unwrap_or(443);
        let sep = if path.is_empty() { "" } else { "/" };
        cfg.base_url = format!("{scheme}://{name}:{port}{sep}{path}");
        Ok(Some((name, addrs)))
    }

    /// A client builder with every connection setting of `cfg`.
    fn builder(
        cfg: &ConsulConfig,
        pin: Option<&(String, Vec<std::net::SocketAddr>)>,
    ) -> anyhow::Result<reqwest::ClientBuilder> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(30))
            .no_proxy()
            .user_agent(concat!("consul-leader/", env!("CARGO_PKG_VERSION")));
        if let Some(socket) = &cfg.unix_socket {
            builder = builder.unix_socket(socket.clone());
        }
        if !cfg.base_url.starts_with("https://") {
            // Plain HTTP (or a unix socket) never verifies a certificate: trust no roots, so that
            // the system's CA store (a hundred files or more) is neither read nor kept in memory.
            return Ok(builder.tls_certs_only(Vec::new()));
        }
        if !cfg.tls.ca_pems.is_empty() {
            // Like Consul's client: a configured CA replaces the system's roots.
            let mut certs = Vec::new();
            for pem in &cfg.tls.ca_pems {
                certs.extend(reqwest::Certificate::from_pem_bundle(pem)?);
            }
            builder = builder.tls_certs_only(certs);
        }
        if let Some(pem) = &cfg.tls.identity_pem {
            builder = builder.identity(reqwest::Identity::from_pem(pem)?);
        }
        if cfg.tls.insecure {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        if let Some((name, addrs)) = pin {
            builder = builder.resolve_to_addrs(name, addrs);
        }
        Ok(builder)
    }

    fn url(&self, path: &str, query: &[(&str, String)]) -> String {
        let mut url = format!("{}{}", self.cfg.base_url, path);
        let mut sep = '?';
        let scoped = [
            ("dc", &self.cfg.datacenter),
            ("ns", &self.cfg.namespace),
            ("partition", &self.cfg.partition),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v.clone())));
        for (k, v) in query.iter().cloned().chain(scoped) {
            url.push(sep);
            sep = '&';
            url.push_str(k);
            if !v.is_empty() {
                url.push('=');
                url.push_str(&utf8_percent_encode(&v, PATH_SEGMENT).to_string());
            }
        }
        url
    }

    fn kv_path(key: &str) -> String {
        format!("/v1/kv/{}", utf8_percent_encode(key, PATH_SEGMENT))
    }

    async fn send(
        &self,
        op: &'static str,
        permission: impl FnOnce() -> String,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, bytes::Bytes), ConsulError> {
        let mut req = req.timeout(timeout);
        if let Some((user, pass)) = &self.cfg.basic_auth {
            req = req.basic_auth(user, Some(pass));
        }
        if let Some(token) = &self.cfg.token {
            let mut value =
                reqwest::header::HeaderValue::from_str(token).map_err(|_| ConsulError::Decode {
                    op,
                    detail: "the ACL token contains invalid characters".into(),
                })?;
            value.set_sensitive(true);
            req = req.header("X-Consul-Token", value);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(op, timeout, e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(op, timeout, e))?;
        if status == StatusCode::FORBIDDEN {
            return Err(ConsulError::Denied {
                op,
                permission: permission(),
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok((status, headers, body))
    }

    fn transport_error(
        &self,
        op: &'static str,
        timeout: Duration,
        e: reqwest::Error,
    ) -> ConsulError {
        if e.is_timeout() {
            return ConsulError::Timeout {
                addr: self.cfg.addr_display.clone(),
                op,
                timeout,
            };
        }
        // The innermost cause is what an operator recognises ("Connection refused").
        let mut detail = e.to_string();
        let mut tls = None;
        let mut garbled = false;
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = s.to_string();
            tls = tls.or_else(|| rustls_error(s).map(tls_hint));
            garbled |= s
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_parse);
            source = s.source();
        }
        let addr = self.cfg.addr_display.clone();
        if let Some(hint) = tls {
            return ConsulError::Tls { addr, detail, hint };
        }
        // An answer that is not HTTP at all, to plain HTTP, is most often a TLS-only agent.
        let hint = if garbled && self.cfg.base_url.starts_with("http://") {
            "does the agent serve HTTPS? use an https:// address or CONSUL_HTTP_SSL=true"
        } else {
            "is CONSUL_HTTP_ADDR / --http-addr right and the agent running?"
        };
        ConsulError::Unreachable { addr, detail, hint }
    }

    fn unexpected(op: &'static str, status: StatusCode, body: &[u8]) -> ConsulError {
        let text = String::from_utf8_lossy(body);
        // Consul's error bodies are one line of plain text; a web page means another server.
        if text.trim_start().starts_with('<') {
            return ConsulError::Decode {
                op,
                detail: format!("HTTP {} with a web page", status.as_u16()),
            };
        }
        ConsulError::Status {
            op,
            status: status.as_u16(),
            body: text.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }

    /// The `X-Consul-Index` of a read's answer.
    fn index_of(
        op: &'static str,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<ConsulIndex, ConsulError> {
        headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(ConsulIndex)
            .ok_or_else(|| ConsulError::Decode {
                op,
                detail: "no X-Consul-Index header in the answer; is this a Consul agent?".into(),
            })
    }

    pub async fn session_create(&self, req: &SessionRequest) -> Result<SessionId, ConsulError> {
        const OP: &str = "session create";
        let (status, _, body) = self
            .send(
                OP,
                || "session:write on this agent's node".into(),
                self.http.put(self.url("/v1/session/create", &[])).json(req),
                SHORT_TIMEOUT,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(Self::unexpected(OP, status, &body));
        }
        #[derive(serde::Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created = decode(OP, &body)?;
        Ok(SessionId(created.id))
    }

    /// Renews the session. `Ok(None)`: Consul no longer knows it (expired or destroyed). A
    /// `fresh` renew goes out on a connection of its own (a hedge, while another is outstanding
    /// and its connection may be dead); the others reuse a pooled one, which costs less.
    pub async fn session_renew(
        &self,
        id: &SessionId,
        timeout: Duration,
        fresh: bool,
    ) -> Result<Option<SessionEntry>, ConsulError> {
        const OP: &str = "session renew";
        let http = self.http_for(fresh);
        let (status, _, body) = self
            .send(
                OP,
                || "session:write on this agent's node".into(),
                http.put(self.url(&format!("/v1/session/renew/{id}"), &[])),
                timeout,
            )
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK => {
                let list: Vec<SessionEntry> = decode(OP, &body)?;
                Ok(list.into_iter().next())
            }
            _ => Err(Self::unexpected(OP, status, &body)),
        }
    }

    pub async fn session_destroy(&self, id: &SessionId) -> Result<(), ConsulError> {
        const OP: &str = "session destroy";
        let (status, _, body) = self
            .send(
                OP,
                || "session:write on this agent's node".into(),
                self.http
                    .put(self.url(&format!("/v1/session/destroy/{id}"), &[])),
                SHORT_TIMEOUT,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(Self::unexpected(OP, status, &body));
        }
        Ok(())
    }

    /// The session, or `None` when Consul does not know it (any more).
    pub async fn session_info(&self, id: &str) -> Result<Option<SessionEntry>, ConsulError> {
        const OP: &str = "session info";
        let (status, _, body) = self
            .send(
                OP,
                || "session:read on the session's node".into(),
                self.http
                    .get(self.url(&format!("/v1/session/info/{id}"), &[])),
                SHORT_TIMEOUT,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(Self::unexpected(OP, status, &body));
        }
        let list: Vec<SessionEntry> = decode(OP, &body)?;
        Ok(list.into_iter().next())
    }

    /// Reads one key. Returns the entry (None when absent) and the index to block on next.
    pub async fn kv_get(
        &self,
        key: &str,
        opts: ReadOpts,
    ) -> Result<(Option<KvEntry>, ConsulIndex), ConsulError> {
        const OP: &str = "KV read";
        let mut query = Vec::new();
        let timeout = opts.query(&mut query);
        let (status, headers, body) = self
            .send(
                OP,
                || format!("key:read on {key}"),
                self.http_for(opts.fresh)
                    .get(self.url(&Self::kv_path(key), &query)),
                timeout,
            )
            .await?;
        // The status first: Consul's error answers (a 500 "No cluster leader" during an election
        // among its servers) carry no index, and their text is what the operator needs.
        if status != StatusCode::OK && status != StatusCode::NOT_FOUND {
            return Err(Self::unexpected(OP, status, &body));
        }
        let index = Self::index_of(OP, &headers)?;
        if status == StatusCode::NOT_FOUND {
            return Ok((None, index));
        }
        let list: Vec<KvEntry> = decode(OP, &body)?;
        Ok((list.into_iter().next(), index))
    }

    async fn kv_lock_op(
        &self,
        op: &'static str,
        verb: &'static str,
        key: &str,
        session: &SessionId,
        flags: u64,
        value: Vec<u8>,
    ) -> Result<bool, ConsulError> {
        let query = [(verb, session.0.clone()), ("flags", flags.to_string())];
        let (status, _, body) = self
            .send(
                op,
                || format!("key:write on {key}"),
                self.http
                    .put(self.url(&Self::kv_path(key), &query))
                    .body(value),
                SHORT_TIMEOUT,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(Self::unexpected(op, status, &body));
        }
        // Consul's own client treats any body containing `true` as success.
        Ok(String::from_utf8_lossy(&body).contains("true"))
    }

    /// `PUT ?acquire`: true when we hold the lock afterwards.
    pub async fn kv_acquire(
        &self,
        key: &str,
        session: &SessionId,
        flags: u64,
        value: Vec<u8>,
    ) -> Result<bool, ConsulError> {
        self.kv_lock_op("lock acquire", "acquire", key, session, flags, value)
            .await
    }

    /// `PUT ?release`: true when we held the lock and it is now free.
    pub async fn kv_release(
        &self,
        key: &str,
        session: &SessionId,
        flags: u64,
        value: Vec<u8>,
    ) -> Result<bool, ConsulError> {
        self.kv_lock_op("lock release", "release", key, session, flags, value)
            .await
    }

    /// Reads every key under `prefix` (`?recurse`, a plain string prefix). Returns the entries in
    /// key order (none when the prefix is empty: Consul answers 404) and the index to block on.
    pub async fn kv_list(
        &self,
        prefix: &str,
        opts: ReadOpts,
    ) -> Result<(Vec<KvEntry>, ConsulIndex), ConsulError> {
        const OP: &str = "KV list";
        let mut query = vec![("recurse", String::new())];
        let timeout = opts.query(&mut query);
        let (status, headers, body) = self
            .send(
                OP,
                || format!("key:read on {prefix}"),
                self.http_for(opts.fresh)
                    .get(self.url(&Self::kv_path(prefix), &query)),
                timeout,
            )
            .await?;
        if status != StatusCode::OK && status != StatusCode::NOT_FOUND {
            return Err(Self::unexpected(OP, status, &body));
        }
        let index = Self::index_of(OP, &headers)?;
        if status == StatusCode::NOT_FOUND {
            return Ok((Vec::new(), index));
        }
        Ok((decode(OP, &body)?, index))
    }

    /// `PUT ?cas=<index>`: writes `value` (with `flags`) only if the key's ModifyIndex is still
    /// `index` (0: only if the key does not exist). True when written.
    pub async fn kv_cas(
        &self,
        key: &str,
        index: u64,
        flags: u64,
        value: Vec<u8>,
    ) -> Result<bool, ConsulError> {
        const OP: &str = "KV check-and-set";
        let query = [("cas", index.to_string()), ("flags", flags.to_string())];
        let (status, _, body) = self
            .send(
                OP,
                || format!("key:write on {key}"),
                self.http
                    .put(self.url(&Self::kv_path(key), &query))
                    .body(value),
                SHORT_TIMEOUT,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(Self::unexpected(OP, status, &body));
        }
        Ok(String::from_utf8_lossy(&body).contains("true"))
    }

    /// `DELETE` of one key (a missing key is not an error).
    pub async fn kv_delete(&self, key: &str) -> Result<(), ConsulError> {
        const OP: &str = "KV delete";
        let (status, _, body) = self
            .send(
                OP,
                || format!("key:write on {key}"),
                self.http.delete(self.url(&Self::kv_path(key), &[])),
                SHORT_TIMEOUT,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(Self::unexpected(OP, status, &body));
        }
        Ok(())
    }
}

/// The rustls error behind a transport error, if any. tokio-rustls hands it up wrapped in an
/// `io::Error` (sometimes twice), whose `source()` skips the wrapped error itself, so look
/// inside each layer.
fn rustls_error<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    loop {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
        e = inner;
    }
}

/// What to change for each kind of TLS failure.
fn tls_hint(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the agent's certificate is for another name; set --tls-server-name \
             (CONSUL_TLS_SERVER_NAME) to a name it holds"
        }
        E::InvalidCertificate(_) => {
            "the agent's certificate is not trusted; give the CA that signed it with --ca-file or \
             --ca-path (CONSUL_CACERT / CONSUL_CAPATH)"
        }
        E::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied,
        ) => {
            "the agent refused our client certificate; set --client-cert and --client-key \
             (CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY) to one its CA signed"
        }
        E::InvalidMessage(_) => {
            "the agent does not seem to speak TLS; for plain HTTP use an http:// address and \
             unset CONSUL_HTTP_SSL"
        }
        _ => {
            "check the TLS settings (--ca-file, --tls-server-name, --client-cert / \
             CONSUL_CACERT, CONSUL_TLS_SERVER_NAME, CONSUL_CLIENT_CERT)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_errors_are_found_inside_io_errors() {
        // As hyper-util reports it: an io::Error around the io::Error from tokio-rustls.
        let io = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let hint = rustls_error(&io).map(tls_hint).unwrap();
        assert!(hint.contains("--ca-file"), "{hint}");
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(tls_hint(&alert).contains("--client-cert"));
        let plain = std::io::Error::other("refused");
        assert!(rustls_error(&plain).is_none());
    }

    #[test]
    fn keys_keep_slashes_and_escape_the_rest() {
        assert_eq!(Client::kv_path("jobs/a b?c"), "/v1/kv/jobs/a%20b%3Fc");
    }

    #[test]
    fn transient_errors_are_told_apart() {
        let s = |status, body: &str| ConsulError::Status {
            op: "x",
            status,
            body: body.into(),
        };
        assert!(s(500, "rpc error: No cluster leader").is_transient());
        assert!(s(429, "").is_transient());
        assert!(!s(500, "invalid session \"x\"").is_transient());
        assert!(!s(400, "bad").is_transient());
        assert!(
            ConsulError::Unreachable {
                addr: "a".into(),
                detail: "refused".into(),
                hint: "",
            }
            .is_transient()
        );
    }

    #[test]
    fn session_request_binds_exactly_the_checks_given() {
        let secs = Duration::from_secs;
        let none = SessionRequest::new("n".into(), secs(15), secs(15), vec![]);
        let v = serde_json::to_value(&none).unwrap();
        assert_eq!(v["NodeChecks"], serde_json::json!([]));
        assert_eq!(v["Checks"], serde_json::json!([]));
        assert_eq!(v["TTL"], "15000ms");
        let some = SessionRequest::new("n".into(), secs(15), secs(15), vec!["serfHealth".into()]);
        let v = serde_json::to_value(&some).unwrap();
        assert_eq!(v["NodeChecks"], serde_json::json!(["serfHealth"]));
        assert!(v.get("Checks").is_none());
    }
}
