//! `/v1/session/*` handlers (consul-api.md §2): decoding a create body with Go's quirks (the
//! `LockDelay` number/string rules, case-insensitive field names, the legacy `Checks` fix-up) and
//! validating it in `Session.Apply`'s order. Committing, renewing and invalidating live in
//! `state`.

use std::time::Instant;

use serde_json::{Map, Value};

use super::gofmt::{self, GoDuration, HOUR, SECOND, format_duration};
use super::http::{ApiError, Ctx, Resp, with_meta};
use super::state::{Behavior, NewSession, SERF_CHECK_ID, Session, SessionJson, Store};
use super::watch::{Answer, WatchSpec, blocking_query};
use crate::wire::ServiceCheck;

/// Consul's `SessionTTLMax`.
const SESSION_TTL_MAX: GoDuration = 24 * HOUR;
/// LockDelay values below this many nanoseconds are taken as seconds (`lockDelayMinThreshold`).
const LOCK_DELAY_MIN_THRESHOLD: i64 = 1000;

/// The create body as decoded, before defaults are resolved and validation runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateBody {
    pub name: String,
    pub node: String,
    pub lock_delay: GoDuration,
    pub behavior: String,
    pub ttl: String,
    pub node_checks: Option<Vec<String>>,
    pub service_checks: Option<Vec<ServiceCheck>>,
    pub checks: Option<Vec<String>>,
}

impl CreateBody {
    /// The starting request of §2.1, before the body is read.
    pub fn defaults(node: &str) -> Self {
        Self {
            name: String::new(),
            node: node.to_string(),
            lock_delay: 15 * SECOND,
            behavior: "release".into(),
            ttl: String::new(),
            node_checks: Some(vec![SERF_CHECK_ID.into()]),
            service_checks: None,
            checks: Some(vec![SERF_CHECK_ID.into()]),
        }
    }

    /// Decodes a JSON body over the defaults the way Go's `encoding/json` fills a struct: field
    /// names match case-insensitively, `null` leaves a string alone but empties a list, unknown
    /// fields are ignored, and only the first JSON value of the body is read.
    pub fn decode(mut self, body: &[u8]) -> Result<Self, String> {
        let value = serde_json::Deserializer::from_slice(body)
            .into_iter::<Value>()
            .next()
            .unwrap_or(Ok(Value::Null))
            .map_err(|e| e.to_string())?;
        let obj = match value {
            Value::Null => return Ok(self),
            Value::Object(o) => o,
            other => {
                return Err(format!(
                    "json: cannot unmarshal {} into Go value of type structs.Session",
                    json_kind(&other)
                ));
            }
        };
        for (k, v) in &obj {
            match field_name(k) {
                Some("Name") => set_string(&mut self.name, v, "Name")?,
                Some("Node") => set_string(&mut self.node, v, "Node")?,
                Some("Behavior") => set_string(&mut self.behavior, v, "Behavior")?,
                Some("TTL") => set_string(&mut self.ttl, v, "TTL")?,
                Some("ID") => set_string(&mut String::new(), v, "ID")?,
                Some("LockDelay") => {
                    if let Some(d) = decode_lock_delay(v)? {
                        self.lock_delay = d;
                    }
                }
                Some("NodeChecks") => self.node_checks = string_list(v, "NodeChecks")?,
                Some("Checks") => self.checks = string_list(v, "Checks")?,
                Some("ServiceChecks") => self.service_checks = service_checks(v)?,
                Some(f @ ("CreateIndex" | "ModifyIndex"))
                    if !(v.is_null() || v.as_u64().is_some()) =>
                {
                    return Err(type_error(v, f, "uint64"));
                }
                _ => {}
            }
        }
        Ok(self)
    }

    /// The compatibility rules for the legacy `Checks` field (§2.1, "Resolving the checks").
    pub fn fix_up_checks(&mut self) {
        let checks = self.checks.as_deref().unwrap_or_default();
        if checks.is_empty() {
            // 1. An empty or null `Checks` asks for no node checks at all.
            self.node_checks = Some(Vec::new());
        } else if (checks.len() == 1 && checks[0] == SERF_CHECK_ID)
            || self.node_checks.as_deref().unwrap_or_default().is_empty()
        {
            // 2. The untouched default defers to `NodeChecks`; 3. so does an explicitly empty
            // `NodeChecks`, which then wins over a filled `Checks`.
            self.checks = None;
        }
    }

    /// `Session.Apply`'s checks (Behavior, then TTL) producing what the store commits.
    pub fn validate(self, ttl_min: GoDuration) -> Result<NewSession, String> {
        let behavior = match self.behavior.as_str() {
            "" | "release" => Behavior::Release,
            "delete" => Behavior::Delete,
            other => return Err(format!("Invalid Behavior setting '{other}'")),
        };
        let mut ttl_ns = 0;
        if !self.ttl.is_empty() {
            ttl_ns = gofmt::parse_duration(&self.ttl)
                .map_err(|e| format!("Session TTL '{}' invalid: {e}", self.ttl))?;
            if ttl_ns != 0 && (ttl_ns < ttl_min || ttl_ns > SESSION_TTL_MAX) {
                return Err(format!(
                    "Invalid Session TTL '{ttl_ns}', must be between [{}={}]",
                    format_duration(ttl_min),
                    format_duration(SESSION_TTL_MAX)
                ));
            }
        }
        Ok(NewSession {
            name: self.name,
            node: self.node,
            lock_delay: self.lock_delay,
            behavior,
            ttl: self.ttl,
            ttl_ns,
            node_checks: self.node_checks,
            service_checks: self.service_checks,
            checks: self.checks.unwrap_or_default(),
        })
    }
}

const FIELDS: &[&str] = &[
    "ID",
    "Name",
    "Node",
    "LockDelay",
    "Behavior",
    "TTL",
    "NodeChecks",
    "ServiceChecks",
    "Checks",
    "CreateIndex",
    "ModifyIndex",
];

fn field_name(k: &str) -> Option<&'static str> {
    FIELDS.iter().copied().find(|f| f.eq_ignore_ascii_case(k))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(v: &Value, field: &str, go_type: &str) -> String {
    format!(
        "json: cannot unmarshal {} into Go struct field .{field} of type {go_type}",
        json_kind(v)
    )
}

fn set_string(dst: &mut String, v: &Value, field: &str) -> Result<(), String> {
    match v {
        Value::Null => Ok(()),
        Value::String(s) => {
            *dst = s.clone();
            Ok(())
        }
        other => Err(type_error(other, field, "string")),
    }
}

fn string_list(v: &Value, field: &str) -> Result<Option<Vec<String>>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                Value::Null => Ok(String::new()),
                other => Err(type_error(other, field, "string")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(type_error(other, field, "[]string")),
    }
}

fn service_checks(v: &Value) -> Result<Option<Vec<ServiceCheck>>, String> {
    let items = match v {
        Value::Null => return Ok(None),
        Value::Array(items) => items,
        other => return Err(type_error(other, "ServiceChecks", "[]structs.ServiceCheck")),
    };
    let mut out = Vec::new();
    for item in items {
        let mut sc = ServiceCheck {
            id: String::new(),
            namespace: String::new(),
        };
        match item {
            Value::Null => {}
            Value::Object(o) => {
                for (k, v) in o {
                    if k.eq_ignore_ascii_case("ID") {
                        set_string(&mut sc.id, v, "ServiceChecks.ID")?;
                    } else if k.eq_ignore_ascii_case("Namespace") {
                        set_string(&mut sc.namespace, v, "ServiceChecks.Namespace")?;
                    }
                }
            }
            other => return Err(type_error(other, "ServiceChecks", "structs.ServiceCheck")),
        }
        out.push(sc);
    }
    Ok(Some(out))
}

/// `Session.UnmarshalJSON`'s LockDelay rule: a string is a Go duration, a number is nanoseconds,
/// any other JSON type counts as 0, and a result under 1000 ns is taken as seconds. `None` for
/// `null`, which keeps the default.
pub fn decode_lock_delay(v: &Value) -> Result<Option<GoDuration>, String> {
    let d = match v {
        Value::Null => return Ok(None),
        Value::String(s) => gofmt::parse_duration(s)?,
        // Go converts the float64 by truncation.
        Value::Number(n) => n.as_f64().map_or(0, |f| f as i64),
        _ => 0,
    };
    Ok(Some(if d < LOCK_DELAY_MIN_THRESHOLD {
        d.wrapping_mul(SECOND)
    } else {
        d
    }))
}

fn json_sessions<'a>(sessions: impl Iterator<Item = &'a Session>) -> Vec<SessionJson<'a>> {
    sessions.map(Session::to_json).collect()
}

fn missing_session() -> ApiError {
    ApiError::bad_request("Missing session")
}

pub async fn create(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.reject_enterprise_meta()?;
    let mut body = CreateBody::defaults(&ctx.agent.config.node);
    // Only a body announced with a positive Content-Length is read (a chunked body is ignored).
    if ctx.content_length().is_some_and(|n| n > 0) {
        let raw = ctx.read_body(usize::MAX).await?;
        body = body
            .decode(&raw)
            .map_err(|e| ApiError::bad_request(format!("Request decode failed: {e}")))?;
    }
    body.fix_up_checks();
    ctx.rpc_gate("session", "write", &body.node)?;
    let spec = body
        .validate(ctx.agent.config.session_ttl_min)
        .map_err(ApiError::from_error)?;
    let id = ctx
        .agent
        .store()
        .session_create(spec, Instant::now())
        .map_err(ApiError::from_error)?;
    let mut out = Map::new();
    out.insert("ID".into(), Value::String(id));
    Ok(ctx.json(&out))
}

pub fn destroy(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.reject_enterprise_meta()?;
    if ctx.rest.is_empty() {
        return Err(missing_session());
    }
    let node = session_node(ctx, &ctx.rest);
    ctx.rpc_gate("session", "write", &node)?;
    ctx.agent.store().session_destroy(&ctx.rest, Instant::now());
    Ok(ctx.json(&true))
}

/// The node a session belongs to, for the ACL message (the agent's node when unknown).
fn session_node(ctx: &Ctx, id: &str) -> String {
    ctx.agent
        .store()
        .session_get(id)
        .map_or_else(|| ctx.agent.config.node.clone(), |s| s.spec.node.clone())
}

pub fn renew(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.query_opts()?;
    ctx.reject_enterprise_meta()?;
    let id = ctx.rest.clone();
    if id.is_empty() {
        return Err(missing_session());
    }
    let node = session_node(ctx, &id);
    ctx.rpc_gate("session", "write", &node)?;
    let mut store = ctx.agent.store();
    match store.session_renew(&id, Instant::now()) {
        Some(s) => Ok(ctx.json(&[s.to_json()])),
        None => Err(ApiError::not_found(format!("Session id '{id}' not found"))),
    }
}

pub async fn info(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    let opts = ctx.query_opts()?;
    ctx.reject_enterprise_meta()?;
    let id = ctx.rest.clone();
    if id.is_empty() {
        return Err(missing_session());
    }
    ctx.rpc_gate("session", "read", &id)?;
    let (body, index) = blocking_query(&ctx.agent, opts, WatchSpec::Sessions, |s: &Store| {
        let found = s.session_get(&id);
        Answer {
            value: found.cloned().into_iter().collect::<Vec<_>>(),
            index: s.sessions_index(),
            not_found: found.is_none(),
        }
    })
    .await;
    Ok(with_meta(ctx.json(&json_sessions(body.iter())), index))
}

pub async fn list(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    let opts = ctx.query_opts()?;
    ctx.reject_enterprise_meta()?;
    ctx.rpc_gate("session", "read", "")?;
    let (body, index) = blocking_query(&ctx.agent, opts, WatchSpec::Sessions, |s: &Store| Answer {
        value: s.sessions().cloned().collect::<Vec<_>>(),
        index: s.sessions_index(),
        not_found: false,
    })
    .await;
    Ok(with_meta(ctx.json(&json_sessions(body.iter())), index))
}

pub async fn node(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    let opts = ctx.query_opts()?;
    ctx.reject_enterprise_meta()?;
    let node = ctx.rest.clone();
    if node.is_empty() {
        return Err(ApiError::bad_request("Missing node name"));
    }
    ctx.rpc_gate("session", "read", &node)?;
    let (body, index) = blocking_query(&ctx.agent, opts, WatchSpec::Sessions, |s: &Store| {
        let mine = s
            .sessions()
            .filter(|x| x.spec.node.eq_ignore_ascii_case(&node));
        Answer {
            value: mine.cloned().collect::<Vec<_>>(),
            index: s.sessions_index(),
            not_found: false,
        }
    })
    .await;
    Ok(with_meta(ctx.json(&json_sessions(body.iter())), index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str) -> Result<CreateBody, String> {
        CreateBody::defaults("n1").decode(body.as_bytes())
    }

    fn bound(body: &str) -> Vec<String> {
        let mut b = decode(body).unwrap();
        b.fix_up_checks();
        let s = b.validate(10 * SECOND).unwrap();
        let mut out = s.checks.clone();
        out.extend(s.node_checks.into_iter().flatten());
        out
    }

    #[test]
    fn check_resolution_rules() {
        assert_eq!(bound("{}"), ["serfHealth"]);
        assert!(bound(r#"{"Checks":[]}"#).is_empty());
        assert!(bound(r#"{"Checks":null}"#).is_empty());
        assert!(bound(r#"{"NodeChecks":[]}"#).is_empty());
        assert_eq!(bound(r#"{"NodeChecks":["c1"]}"#), ["c1"]);
        assert_eq!(bound(r#"{"Checks":["c1"]}"#), ["c1", "serfHealth"]);
        assert!(bound(r#"{"Checks":["c1"],"NodeChecks":[]}"#).is_empty());
        let mut b = decode(r#"{"Checks":[]}"#).unwrap();
        b.fix_up_checks();
        assert_eq!(b.node_checks, Some(vec![]));
    }

    #[test]
    fn lock_delay_rules() {
        let ld = |s: &str| decode_lock_delay(&serde_json::from_str(s).unwrap());
        assert_eq!(ld(r#""15s""#), Ok(Some(15 * SECOND)));
        assert_eq!(ld(r#""1500ms""#), Ok(Some(1_500_000_000)));
        assert_eq!(ld("20"), Ok(Some(20 * SECOND)));
        assert_eq!(ld(r#""20ns""#), Ok(Some(20 * SECOND)));
        assert_eq!(ld("-5"), Ok(Some(-5 * SECOND)));
        assert_eq!(ld("0"), Ok(Some(0)));
        assert_eq!(ld(r#""0s""#), Ok(Some(0)));
        assert_eq!(ld("true"), Ok(Some(0)));
        assert_eq!(ld("null"), Ok(None));
        assert_eq!(ld("2000000000"), Ok(Some(2 * SECOND)));
        assert!(ld(r#""20""#).is_err());
    }

    #[test]
    fn decode_follows_go() {
        let b = decode(r#"{"ttl":"10s","name":"x","Bogus":1} trailing"#).unwrap();
        assert_eq!(b.ttl, "10s");
        assert_eq!(b.name, "x");
        assert!(decode(r#"{"TTL":10}"#).is_err());
        assert!(decode(r#"{"Checks":"c1"}"#).is_err());
        assert!(decode("{").is_err());
        assert!(decode("[]").is_err());
        assert_eq!(decode("null").unwrap(), CreateBody::defaults("n1"));
        assert_eq!(decode(r#"{"Name":null}"#).unwrap().name, "");
    }

    #[test]
    fn ttl_validation_texts() {
        let v = |ttl: &str| {
            let mut b = CreateBody::defaults("n1");
            b.ttl = ttl.into();
            b.validate(10 * SECOND).map(|s| s.ttl_ns)
        };
        assert_eq!(
            v("5s"),
            Err("Invalid Session TTL '5000000000', must be between [10s=24h0m0s]".into())
        );
        assert_eq!(v("10s"), Ok(10 * SECOND));
        assert_eq!(v("24h"), Ok(24 * HOUR));
        assert!(v("24h1m").is_err());
        assert_eq!(v("0"), Ok(0));
        assert_eq!(
            v("abc"),
            Err(r#"Session TTL 'abc' invalid: time: invalid duration "abc""#.into())
        );
        let mut b = CreateBody::defaults("n1");
        b.behavior = "Release".into();
        assert_eq!(
            b.validate(SECOND).map(|_| ()),
            Err("Invalid Behavior setting 'Release'".into())
        );
    }
}
