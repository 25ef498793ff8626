//! `/v1/kv/<key>` handlers (consul-api.md §3): request parsing and Consul's checks in Consul's
//! order; the semantics of each operation live in `state`.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response};

use super::gofmt::{encode_query, parse_uint};
use super::http::{ApiError, Ctx, Query, QueryOpts, Resp, not_found_with_meta, with_meta};
use super::state::KvOp;
use super::watch::{Answer, WatchSpec, blocking_query};

/// Consul's `kv_max_value_size` default (`raft.SuggestedMaxDataSize`).
pub const MAX_VALUE_SIZE: u64 = 524_288;

pub async fn handle(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.reject_enterprise_meta()?;
    let opts = ctx.query_opts()?;
    let key = ctx.rest.clone();
    match ctx.method {
        Method::GET if ctx.query.has("keys") => keys(ctx, key, opts).await,
        Method::GET => get(ctx, key, opts).await,
        Method::PUT => put(ctx, key).await,
        _ => delete(ctx, key),
    }
}

/// The `Conflicting flags` check: more than one of `flags` present is a 400 that echoes the
/// whole query, re-encoded the way Go's `url.Values.Encode` does.
fn conflicting(ctx: &Ctx, flags: &[&str]) -> Result<(), ApiError> {
    match conflicting_flags(&ctx.query, flags) {
        Some(text) => Err(ApiError::bad_request(text)),
        None => Ok(()),
    }
}

fn conflicting_flags(query: &Query, flags: &[&str]) -> Option<String> {
    (flags.iter().filter(|f| query.has(f)).count() > 1)
        .then(|| format!("Conflicting flags: {}", encode_query(&query.pairs)))
}

fn missing_key() -> ApiError {
    ApiError::bad_request("Missing key name")
}

async fn keys(ctx: &Ctx, prefix: String, opts: QueryOpts) -> Result<Resp, ApiError> {
    // The misspelt `seperator` is still read; `separator` wins when both are present.
    let q = &ctx.query;
    let sep = if q.has("separator") {
        q.get("separator")
    } else {
        q.get("seperator")
    }
    .to_string();
    ctx.rpc_gate("key", "list", &prefix)?;
    let spec = WatchSpec::Prefix(prefix.clone());
    let (keys, index) = blocking_query(&ctx.agent, opts, spec, |s| {
        let (value, index) = s.kv_keys(&prefix, &sep);
        Answer {
            value,
            index,
            not_found: false,
        }
    })
    .await;
    if keys.is_empty() && !prefix.is_empty() {
        return Ok(not_found_with_meta(index));
    }
    Ok(with_meta(ctx.json(&keys), index))
}

async fn get(ctx: &Ctx, key: String, opts: QueryOpts) -> Result<Resp, ApiError> {
    if ctx.query.has("recurse") {
        ctx.rpc_gate("key", "read", &key)?;
        let spec = WatchSpec::Prefix(key.clone());
        let (entries, index) = blocking_query(&ctx.agent, opts, spec, |s| {
            let (value, index) = s.kv_list(&key);
            Answer {
                value,
                index,
                not_found: false,
            }
        })
        .await;
        if entries.is_empty() {
            return Ok(not_found_with_meta(index));
        }
        return Ok(with_meta(ctx.json(&entries), index));
    }
    if key.is_empty() {
        return Err(missing_key());
    }
    ctx.rpc_gate("key", "read", &key)?;
    let spec = WatchSpec::Key(key.clone());
    let (entry, index) = blocking_query(&ctx.agent, opts, spec, |s| match s.kv_get(&key) {
        Some(e) => Answer {
            index: e.modify_index,
            value: Some((e.to_wire(&key), e.value.clone())),
            not_found: false,
        },
        None => Answer {
            value: None,
            index: s.kv_table_index(),
            not_found: true,
        },
    })
    .await;
    let Some((entry, raw)) = entry else {
        return Ok(not_found_with_meta(index));
    };
    if ctx.query.has("raw") {
        let mut r = Response::new(Full::new(raw));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(
            "X-Content-Type-Options",
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            "Content-Security-Policy",
            HeaderValue::from_static("sandbox"),
        );
        return Ok(with_meta(r, index));
    }
    Ok(with_meta(ctx.json(&[entry]), index))
}

async fn put(ctx: &mut Ctx, key: String) -> Result<Resp, ApiError> {
    if key.is_empty() {
        return Err(missing_key());
    }
    conflicting(ctx, &["cas", "acquire", "release"])?;
    let q = &ctx.query;
    let mut flags = 0;
    if q.has("flags") {
        flags = parse_uint(q.get("flags")).map_err(ApiError::from_error)?;
    }
    let mut op = KvOp::Set;
    if q.has("cas") {
        op = KvOp::Cas(parse_uint(q.get("cas")).map_err(ApiError::from_error)?);
    }
    if q.has("acquire") {
        op = KvOp::Lock(q.get("acquire").to_string());
    }
    if q.has("release") {
        op = KvOp::Unlock(q.get("release").to_string());
    }
    let too_large = |n: u64| {
        ApiError::new(
            hyper::StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({n} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. See \
                 https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            ),
        )
    };
    if let Some(n) = ctx.content_length()
        && n > MAX_VALUE_SIZE
    {
        return Err(too_large(n));
    }
    // A chunked body has no length to check up front; cap what we read the same way.
    let value: Bytes = ctx.read_body(MAX_VALUE_SIZE as usize).await.map_err(|e| {
        if e.status == hyper::StatusCode::PAYLOAD_TOO_LARGE {
            too_large(MAX_VALUE_SIZE + 1)
        } else {
            e
        }
    })?;
    ctx.rpc_gate("key", "write", &key)?;
    let result = ctx
        .agent
        .store()
        .kv_apply(&key, op, flags, value, Instant::now());
    match result {
        Ok(b) => Ok(ctx.json(&b)),
        Err(e) => Err(ApiError::from_error(e)),
    }
}

fn delete(ctx: &Ctx, key: String) -> Result<Resp, ApiError> {
    conflicting(ctx, &["recurse", "cas"])?;
    if ctx.query.has("recurse") {
        ctx.rpc_gate("key", "write", &key)?;
        ctx.agent.store().kv_delete_tree(&key);
        return Ok(ctx.json(&true));
    }
    if key.is_empty() {
        return Err(missing_key());
    }
    let mut cas = None;
    if ctx.query.has("cas") {
        cas = Some(parse_uint(ctx.query.get("cas")).map_err(ApiError::from_error)?);
    }
    ctx.rpc_gate("key", "write", &key)?;
    let ok = ctx.agent.store().kv_delete(&key, cas);
    // Only a CAS delete reports its outcome; a plain delete always answers true.
    Ok(ctx.json(&(ok || cas.is_none())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicting_flags_echo_the_sorted_query() {
        let q = Query::parse("release=x%20y&cas=1&flags=3");
        assert_eq!(
            conflicting_flags(&q, &["cas", "acquire", "release"]).as_deref(),
            Some("Conflicting flags: cas=1&flags=3&release=x+y")
        );
        let q = Query::parse("recurse&cas=0");
        assert_eq!(
            conflicting_flags(&q, &["recurse", "cas"]).as_deref(),
            Some("Conflicting flags: cas=0&recurse=")
        );
        assert_eq!(
            conflicting_flags(&Query::parse("cas=1&flags=2"), &["cas", "acquire"]),
            None
        );
    }
}
