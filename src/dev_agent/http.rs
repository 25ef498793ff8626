//! The HTTP layer of consul-api.md §1 and §4.1–4.2: Go `ServeMux` routing from the raw path
//! (percent-decoding, clean-path and subtree redirects, 404 texts), the per-endpoint method lists
//! with their 405/OPTIONS answers, query-string parsing with Go's rules, token extraction and the
//! single-token ACL, the CE rejection of namespaces and partitions, and the response conventions
//! (global headers, JSON encoding, error bodies, query-meta headers).
//!
//! Handlers receive a [`Ctx`] and return `Result<Resp, ApiError>`; everything Consul does to every
//! response is applied here, once.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::Serialize;

use super::Agent;
use super::gofmt::{self, GoDuration, quote};

pub type Resp = Response<Full<Bytes>>;

/// An error answer: status and plain-text body (no trailing newline, as Consul writes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: String,
}

impl ApiError {
    pub fn new(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
        }
    }

    pub fn bad_request(body: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, body)
    }

    pub fn not_found(body: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, body)
    }

    /// A plain Go `error` returned by a handler: 403 when it reads as an ACL failure (Consul
    /// matches on the text, §1.3), otherwise 500.
    pub fn from_error(text: impl Into<String>) -> Self {
        let text = text.into();
        let status = if text.contains("Permission denied") || text.contains("ACL not found") {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self::new(status, text)
    }
}

/// The endpoints of the subset, as Consul registers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Kv,
    SessionCreate,
    SessionDestroy,
    SessionRenew,
    SessionInfo,
    SessionNode,
    SessionList,
    StatusLeader,
    StatusPeers,
    AgentSelf,
    AgentChecks,
    AgentMembers,
    CheckRegister,
    CheckDeregister,
    CheckPass,
    CheckWarn,
    CheckFail,
    CheckUpdate,
}

const GET: &[Method] = &[Method::GET];
const PUT: &[Method] = &[Method::PUT];
const KV_METHODS: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];

/// (pattern, matches its subtree, allowed methods, endpoint). A pattern ending in `/` matches its
/// subtree, like a Go `ServeMux` pattern.
const ROUTES: &[(&str, &[Method], Endpoint)] = &[
    ("/v1/kv/", KV_METHODS, Endpoint::Kv),
    ("/v1/session/create", PUT, Endpoint::SessionCreate),
    ("/v1/session/destroy/", PUT, Endpoint::SessionDestroy),
    ("/v1/session/renew/", PUT, Endpoint::SessionRenew),
    ("/v1/session/info/", GET, Endpoint::SessionInfo),
    ("/v1/session/node/", GET, Endpoint::SessionNode),
    ("/v1/session/list", GET, Endpoint::SessionList),
    ("/v1/status/leader", GET, Endpoint::StatusLeader),
    ("/v1/status/peers", GET, Endpoint::StatusPeers),
    ("/v1/agent/self", GET, Endpoint::AgentSelf),
    ("/v1/agent/checks", GET, Endpoint::AgentChecks),
    ("/v1/agent/members", GET, Endpoint::AgentMembers),
    ("/v1/agent/check/register", PUT, Endpoint::CheckRegister),
    (
        "/v1/agent/check/deregister/",
        PUT,
        Endpoint::CheckDeregister,
    ),
    ("/v1/agent/check/pass/", PUT, Endpoint::CheckPass),
    ("/v1/agent/check/warn/", PUT, Endpoint::CheckWarn),
    ("/v1/agent/check/fail/", PUT, Endpoint::CheckFail),
    ("/v1/agent/check/update/", PUT, Endpoint::CheckUpdate),
];

#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The endpoint, its methods, and the path after the pattern.
    Found(Endpoint, &'static [Method], String),
    /// A subtree root asked for without its slash.
    AddSlash(String),
    NotFound,
}

/// Go `ServeMux` matching: the longest pattern wins; exact patterns match only themselves.
fn route(path: &str) -> Route {
    let mut best: Option<(&str, &'static [Method], Endpoint)> = None;
    for &(pat, methods, ep) in ROUTES {
        let hit = if pat.ends_with('/') {
            path.starts_with(pat)
        } else {
            path == pat
        };
        if hit && best.is_none_or(|(b, _, _)| pat.len() > b.len()) {
            best = Some((pat, methods, ep));
        }
    }
    if let Some((pat, methods, ep)) = best {
        return Route::Found(ep, methods, path[pat.len()..].to_string());
    }
    let with_slash = format!("{path}/");
    if ROUTES.iter().any(|(p, _, _)| *p == with_slash) {
        return Route::AddSlash(with_slash);
    }
    Route::NotFound
}

/// Go's `path.Clean`, plus `ServeMux`'s rule of keeping a trailing slash.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".into();
    }
    let rooted = format!("/{}", p.trim_start_matches('/'));
    let mut parts: Vec<&str> = Vec::new();
    for seg in rooted.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    if p.ends_with('/') && out != "/" {
        out.push('/');
    }
    out
}

/// Characters that must be escaped in a path for a `Location` header (Go's `EscapedPath`, close
/// enough: anything that is not a path character).
const PATH_ESCAPE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The query string as Go's `url.ParseQuery` reads it: `&`-separated, `+` is a space, pairs with
/// a `;` or a bad escape are dropped (Go ≥ 1.17), a key without `=` has an empty value.
#[derive(Debug, Default, Clone)]
pub struct Query {
    pub pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(raw: &str) -> Self {
        let unescape = |s: &str| -> Option<String> {
            let s = s.replace('+', " ");
            if !valid_escapes(&s) {
                return None;
            }
            percent_decode_str(&s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        };
        let mut pairs = Vec::new();
        for part in raw.split('&') {
            if part.is_empty() || part.contains(';') {
                continue;
            }
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if let (Some(k), Some(v)) = (unescape(k), unescape(v)) {
                pairs.push((k, v));
            }
        }
        Self { pairs }
    }

    /// Presence, whatever the value (`?recurse=false` still means recurse).
    pub fn has(&self, key: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == key)
    }

    /// The first value, like Go's `Values.Get`; `""` when absent.
    pub fn get(&self, key: &str) -> &str {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

fn valid_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() {
                return false;
            }
            if !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// Blocking and consistency options of a read (§4.2).
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryOpts {
    /// 0 means a non-blocking read.
    pub index: u64,
    /// As sent; 0 when absent. Clamping and jitter happen in `watch`.
    pub wait: GoDuration,
}

/// Everything a handler needs about its request.
pub struct Ctx {
    pub agent: Arc<Agent>,
    pub method: Method,
    /// The path after the endpoint's pattern (the KV key, the session ID, ...), decoded.
    pub rest: String,
    pub query: Query,
    pub headers: HeaderMap,
    body: Option<Incoming>,
    /// Set when reading stopped part-way through the body (over the size limit).
    body_cut: bool,
    pretty: bool,
}

impl Ctx {
    /// Rejects `ns` and `partition` as a CE build does (§1.5): headers first, then the query.
    pub fn reject_enterprise_meta(&self) -> Result<(), ApiError> {
        let header = |name: &str| {
            self.headers
                .get(name)
                .is_some_and(|v| !v.as_bytes().is_empty())
        };
        if header("X-Consul-Namespace") {
            return Err(ApiError::bad_request(
                "Invalid header: \"X-Consul-Namespace\" - Namespaces are a Consul Enterprise feature",
            ));
        }
        if !self.query.get("ns").is_empty() {
            return Err(ApiError::bad_request(
                "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature",
            ));
        }
        if header("X-Consul-Partition") {
            return Err(ApiError::bad_request(
                "Invalid header: \"X-Consul-Partition\" - Partitions are a Consul Enterprise feature",
            ));
        }
        if !self.query.get("partition").is_empty() {
            return Err(ApiError::bad_request(
                "Invalid query parameter: \"partition\" - Partitions are a Consul Enterprise feature",
            ));
        }
        Ok(())
    }

    /// Consul's `parse`: consistency flags, then `wait`, then `index` (§4.2).
    pub fn query_opts(&self) -> Result<QueryOpts, ApiError> {
        let q = &self.query;
        let mut stale = q.has("stale");
        let consistent = q.has("consistent");
        let cached = q.has("cached");
        let max_stale = q.get("max_stale");
        if !max_stale.is_empty() {
            let d = gofmt::parse_duration(max_stale).map_err(|_| {
                ApiError::bad_request(format!("Invalid max_stale value {}", quote(max_stale)))
            })?;
            stale |= d > 0;
        }
        if stale && consistent {
            return Err(ApiError::bad_request(
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        if cached && consistent {
            return Err(ApiError::bad_request(
                "Cannot specify ?cached with ?consistent, conflicting semantics.",
            ));
        }
        let mut opts = QueryOpts::default();
        let wait = q.get("wait");
        if !wait.is_empty() {
            opts.wait = gofmt::parse_duration(wait)
                .map_err(|_| ApiError::bad_request("Invalid wait time"))?;
        }
        let index = q.get("index");
        if !index.is_empty() {
            opts.index =
                gofmt::parse_uint(index).map_err(|_| ApiError::bad_request("Invalid index"))?;
        }
        Ok(opts)
    }

    /// The request's ACL token (§1.4); `None` means anonymous.
    fn token(&self) -> Option<String> {
        let t = self.query.get("token");
        if !t.is_empty() {
            return Some(t.to_string());
        }
        if let Some(t) = self.headers.get("X-Consul-Token")
            && !t.as_bytes().is_empty()
        {
            return Some(String::from_utf8_lossy(t.as_bytes()).into_owned());
        }
        let auth = self.headers.get(header::AUTHORIZATION)?;
        let auth = String::from_utf8_lossy(auth.as_bytes()).into_owned();
        let (scheme, value) = auth.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let tok = value.trim().split(' ').next().unwrap_or("").trim();
        (!tok.is_empty()).then(|| tok.to_string())
    }

    /// What an RPC does before it runs: forward to `?dc=` (only our own is reachable), then
    /// resolve the token. With `--acl-token T` the agent behaves as default-deny with one
    /// all-powerful secret T: any other secret is unknown, and no secret is anonymous.
    pub fn rpc_gate(&self, resource: &str, level: &str, name: &str) -> Result<(), ApiError> {
        self.check_dc()?;
        self.authorize(resource, level, name)
    }

    /// RPC forwarding to `?dc=`: only the agent's own datacenter is reachable.
    pub fn check_dc(&self) -> Result<(), ApiError> {
        let dc = self.query.get("dc");
        if !dc.is_empty() && dc != self.agent.config.datacenter {
            return Err(ApiError::from_error("No path to datacenter"));
        }
        Ok(())
    }

    /// Resolves the request's token the way Consul does before it checks any permission: an
    /// unknown secret is `ACL not found` (403), while no token at all is the anonymous token,
    /// which resolves fine and is refused later, by `authorize`, for what it may not do.
    pub fn resolve_token(&self) -> Result<(), ApiError> {
        let Some(required) = &self.agent.config.acl_token else {
            return Ok(());
        };
        match self.token() {
            Some(t) if t != *required => Err(ApiError::from_error("ACL not found")),
            _ => Ok(()),
        }
    }

    /// Whether the request's token may do anything (the dev agent's one token, or ACLs off).
    pub fn is_privileged(&self) -> bool {
        match &self.agent.config.acl_token {
            None => true,
            Some(required) => self.token().as_deref() == Some(required.as_str()),
        }
    }

    pub fn authorize(&self, resource: &str, level: &str, name: &str) -> Result<(), ApiError> {
        let Some(required) = &self.agent.config.acl_token else {
            return Ok(());
        };
        match self.token() {
            Some(t) if t == *required => Ok(()),
            Some(_) => Err(ApiError::from_error("ACL not found")),
            None => Err(ApiError::from_error(format!(
                "Permission denied: anonymous token lacks permission '{resource}:{level}' on {}",
                quote(name)
            ))),
        }
    }

    /// `Content-Length`, when the client sent one.
    pub fn content_length(&self) -> Option<u64> {
        self.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// Reads the body, refusing more than `limit` bytes with `Err(n)` (n = bytes seen so far).
    pub async fn read_body(&mut self, limit: usize) -> Result<Bytes, ApiError> {
        let Some(body) = self.body.take() else {
            return Ok(Bytes::new());
        };
        match Limited::new(body, limit).collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                self.body_cut = true;
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Request body too large, max size: {limit} bytes"),
                ))
            }
            Err(e) => {
                self.body_cut = true;
                Err(ApiError::bad_request(format!("error reading body: {e}")))
            }
        }
    }

    /// A 200 JSON answer: compact, or indented by four spaces with a newline under `?pretty`.
    pub fn json<T: Serialize + ?Sized>(&self, value: &T) -> Resp {
        let mut body = if self.pretty {
            let mut buf = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            value
                .serialize(&mut ser)
                .expect("JSON encoding of plain data");
            buf.push(b'\n');
            buf
        } else {
            serde_json::to_vec(value).expect("JSON encoding of plain data")
        };
        go_html_escape(&mut body);
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// Go's `json.Marshal` escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings. They can only
/// occur inside strings in JSON text, so replacing them in the output is exact.
fn go_html_escape(body: &mut Vec<u8>) {
    let needs = body
        .iter()
        .any(|&b| b == b'<' || b == b'>' || b == b'&' || b == 0xE2);
    if !needs {
        return;
    }
    let text = String::from_utf8_lossy(body)
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029");
    *body = text.into_bytes();
}

/// A 200 with no body and no Content-Type (handlers that return nothing).
pub fn empty_ok() -> Resp {
    Response::new(Full::new(Bytes::new()))
}

/// Adds the query-meta headers every KV and session read carries (§4.1). The index is never 0.
pub fn with_meta(mut r: Resp, index: u64) -> Resp {
    let h = r.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    h.insert("X-Consul-Knownleader", HeaderValue::from_static("true"));
    h.insert("X-Consul-Lastcontact", HeaderValue::from_static("0"));
    h.insert(
        "X-Consul-Query-Backend",
        HeaderValue::from_static("blocking-query"),
    );
    r
}

/// A 404 with an empty body and the meta headers (missing KV key, empty listing).
pub fn not_found_with_meta(index: u64) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NOT_FOUND;
    with_meta(r, index)
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let body: String = body.into();
    let mut r = Response::new(Full::new(Bytes::from(body.clone())));
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    r
}

fn allow_header(methods: &[Method]) -> HeaderValue {
    let mut v = String::from("OPTIONS");
    for m in methods {
        v.push(',');
        v.push_str(m.as_str());
    }
    HeaderValue::from_str(&v).expect("method names are header-safe")
}

/// Entry point for every request.
pub async fn handle(agent: Arc<Agent>, req: Request<Incoming>) -> Resp {
    let acl_policy = if agent.config.acl_token.is_some() {
        "deny"
    } else {
        "allow"
    };
    let gzip_ok = accepts_gzip(req.headers());
    let raw_path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let path = if valid_escapes(&raw_path) {
        percent_decode_str(&raw_path).decode_utf8().ok()
    } else {
        None
    };
    let Some(path) = path.map(|p| p.into_owned()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: invalid URL escape",
        );
    };

    let clean = clean_path(&path);
    if clean != path {
        return redirect(&clean, &raw_query, req.method());
    }
    let (endpoint, methods, rest) = match route(&path) {
        Route::Found(e, m, rest) => (e, m, rest),
        Route::AddSlash(to) => return redirect(&to, &raw_query, req.method()),
        Route::NotFound => return index_page(&path),
    };

    let mut resp = if req.method() == Method::OPTIONS {
        let mut r = empty_ok();
        r.headers_mut().insert(header::ALLOW, allow_header(methods));
        r
    } else if !methods.contains(req.method()) {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} not allowed", req.method()),
        );
        r.headers_mut().insert(header::ALLOW, allow_header(methods));
        r
    } else {
        let (parts, body) = req.into_parts();
        let query = Query::parse(&raw_query);
        let pretty = query.has("pretty");
        let mut ctx = Ctx {
            agent,
            method: parts.method,
            rest,
            query,
            headers: parts.headers,
            body: Some(body),
            body_cut: false,
            pretty,
        };
        let mut r = match dispatch(endpoint, &mut ctx).await {
            Ok(r) => r,
            Err(e) => text(e.status, e.body),
        };
        let unread = ctx.body_cut
            || ctx
                .body
                .as_ref()
                .is_some_and(|b| !hyper::body::Body::is_end_stream(b));
        if unread {
            // The rest of the request body is still on the wire, so the connection cannot carry
            // another request; say so, as Go's server does, or the client would reuse it and
            // lose its next request to the close (a 413 followed by a GET did).
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    };
    let h = resp.headers_mut();
    h.insert(
        "X-Consul-Default-Acl-Policy",
        HeaderValue::from_static(acl_policy),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzip_ok {
        gzip_if_large(resp).await
    } else {
        resp
    }
}

/// Consul wraps its handlers in a gzip handler that compresses only bodies of at least this
/// many bytes (§1.2); smaller ones are not worth the CPU.
const GZIP_MIN_SIZE: u64 = 1400;

/// Whether the request's (first) `Accept-Encoding` header takes gzip with a non-zero q-value,
/// as Consul's gzip handler decides it.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let Some(v) = headers.get(header::ACCEPT_ENCODING) else {
        return false;
    };
    String::from_utf8_lossy(v.as_bytes())
        .split(',')
        .any(|part| {
            let mut params = part.split(';');
            let coding = params.next().unwrap_or("").trim();
            if !coding.eq_ignore_ascii_case("gzip") {
                return false;
            }
            // `gzip;q=0` explicitly refuses gzip; a q-value that does not parse counts as absent.
            let q = params
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            q > 0.0
        })
}

/// Compresses a body of [`GZIP_MIN_SIZE`] bytes or more; the response is otherwise unchanged.
async fn gzip_if_large(resp: Resp) -> Resp {
    use std::io::Write as _;
    let large = hyper::body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n >= GZIP_MIN_SIZE);
    if !large || resp.headers().contains_key(header::CONTENT_ENCODING) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // A `Full` body is one chunk already in memory; collecting it cannot fail or wait.
    let plain = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let compressed = enc.write_all(&plain).and_then(|()| enc.finish());
    match compressed {
        Ok(gz) => {
            parts
                .headers
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            // hyper sets Content-Length from the new body.
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Full::new(Bytes::from(gz)))
        }
        Err(_) => Response::from_parts(parts, Full::new(plain)),
    }
}

/// Whether a request goes through Raft in Consul: KV writes and session create and destroy. (A
/// renew only resets the leader's timer; check updates are the agent's own state.)
fn is_raft_write(endpoint: Endpoint, method: &Method) -> bool {
    match endpoint {
        Endpoint::Kv => *method == Method::PUT || *method == Method::DELETE,
        Endpoint::SessionCreate | Endpoint::SessionDestroy => true,
        _ => false,
    }
}

async fn dispatch(endpoint: Endpoint, ctx: &mut Ctx) -> Result<Resp, ApiError> {
    // Consul answers a write only after Raft committed and applied it, so a read sent while a
    // write is in flight sees the state before it. In `consul agent -dev` that window is well
    // under a millisecond (one voter, an in-memory log), and our own tests gain nothing from
    // waiting through it on every write, so the dev agent applies writes at once by default.
    // `--commit-latency` opens the window on purpose, for client test suites that expect a read
    // sent together with a write to come back first.
    let latency = ctx.agent.config.commit_latency;
    if !latency.is_zero() && is_raft_write(endpoint, &ctx.method) {
        tokio::time::sleep(latency).await;
    }
    match endpoint {
        Endpoint::Kv => super::kv::handle(ctx).await,
        Endpoint::SessionCreate => super::session::create(ctx).await,
        Endpoint::SessionDestroy => super::session::destroy(ctx),
        Endpoint::SessionRenew => super::session::renew(ctx),
        Endpoint::SessionInfo => super::session::info(ctx).await,
        Endpoint::SessionNode => super::session::node(ctx).await,
        Endpoint::SessionList => super::session::list(ctx).await,
        Endpoint::StatusLeader => super::agent::status_leader(ctx),
        Endpoint::StatusPeers => super::agent::status_peers(ctx),
        Endpoint::AgentSelf => super::agent::agent_self(ctx),
        Endpoint::AgentChecks => super::agent::checks(ctx),
        Endpoint::AgentMembers => super::agent::members(ctx),
        Endpoint::CheckRegister => super::agent::check_register(ctx).await,
        Endpoint::CheckDeregister => super::agent::check_deregister(ctx),
        Endpoint::CheckPass => super::agent::check_ttl_update(ctx, super::state::PASSING),
        Endpoint::CheckWarn => super::agent::check_ttl_update(ctx, super::state::WARNING),
        Endpoint::CheckFail => super::agent::check_ttl_update(ctx, super::state::CRITICAL),
        Endpoint::CheckUpdate => super::agent::check_update(ctx).await,
    }
}

/// Go's `http.Redirect` with 301, keeping the query string.
fn redirect(to: &str, raw_query: &str, method: &Method) -> Resp {
    let mut loc = utf8_percent_encode(to, PATH_ESCAPE).to_string();
    if !raw_query.is_empty() {
        loc.push('?');
        loc.push_str(raw_query);
    }
    let body = if *method == Method::GET || *method == Method::HEAD {
        format!(
            "<a href=\"{}\">Moved Permanently</a>.\n\n",
            html_escape(&loc)
        )
    } else {
        String::new()
    };
    let mut r = Response::new(Full::new(Bytes::from(body.clone())));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if !body.is_empty() {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
    }
    r
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&#34;")
        .replace('\'', "&#39;")
}

/// Consul's index handler, which gets every path no endpoint claims.
fn index_page(path: &str) -> Resp {
    if path == "/" {
        return text(
            StatusCode::OK,
            "Consul Agent: UI disabled. To enable, set ui_config.enabled=true in the agent \
             configuration and restart.",
        );
    }
    if path.contains("/v1/") {
        text(
            StatusCode::NOT_FOUND,
            "Invalid URL path: not a recognized HTTP API endpoint\n",
        )
    } else {
        text(
            StatusCode::NOT_FOUND,
            "Invalid URL path: if attempting to use the HTTP API, ensure the path starts with \
             '/v1/'\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_servemux() {
        assert_eq!(
            route("/v1/kv/a/b"),
            Route::Found(Endpoint::Kv, KV_METHODS, "a/b".into())
        );
        assert_eq!(
            route("/v1/kv/"),
            Route::Found(Endpoint::Kv, KV_METHODS, String::new())
        );
        assert_eq!(route("/v1/kv"), Route::AddSlash("/v1/kv/".into()));
        assert_eq!(
            route("/v1/agent/check/pass"),
            Route::AddSlash("/v1/agent/check/pass/".into())
        );
        assert_eq!(route("/v1/session/list/"), Route::NotFound);
        assert_eq!(route("/v1/session/create/x"), Route::NotFound);
        assert_eq!(route("/v1/does-not-exist"), Route::NotFound);
    }

    #[test]
    fn cleans_paths_like_go() {
        assert_eq!(clean_path("/v1/kv/a//b"), "/v1/kv/a/b");
        assert_eq!(clean_path("/v1/kv/./a"), "/v1/kv/a");
        assert_eq!(clean_path("/v1/kv/x/../a/"), "/v1/kv/a/");
        assert_eq!(clean_path("/v1/kv/"), "/v1/kv/");
        assert_eq!(clean_path("/"), "/");
        assert_eq!(clean_path("/.."), "/");
    }

    #[test]
    fn query_presence_and_first_value() {
        let q = Query::parse("recurse=false&keys&a=1&a=2&sp=a+b%2Fc&bad=%zz&x;y=1");
        assert!(q.has("recurse"));
        assert!(q.has("keys"));
        assert_eq!(q.get("a"), "1");
        assert_eq!(q.get("sp"), "a b/c");
        assert!(!q.has("bad"));
        assert!(!q.has("x"));
        assert_eq!(q.get("missing"), "");
    }

    #[test]
    fn allow_lists_options_first() {
        assert_eq!(allow_header(KV_METHODS), "OPTIONS,GET,PUT,DELETE");
        assert_eq!(allow_header(PUT), "OPTIONS,PUT");
    }

    #[test]
    fn gzip_acceptance_follows_q_values() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            accepts_gzip(&m)
        };
        assert!(h("gzip"));
        assert!(h("deflate, GZIP;q=0.5"));
        assert!(!h("gzip;q=0"));
        assert!(!h("identity"));
        assert!(!h("x-gzip2"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn html_characters_escaped_like_go() {
        let mut b = br#"{"Key":"a<b>&c"}"#.to_vec();
        go_html_escape(&mut b);
        assert_eq!(b, br#"{"Key":"a\u003cb\u003e\u0026c"}"#);
    }
}
