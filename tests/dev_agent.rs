//! Conformance checklist for `consul-leader dev-agent`: one test per item 1–60 of §10 of
//! `../shared/consul-api.md`, named `cNN_<what>`, as raw HTTP requests against the real binary.
//!
//! Every expectation comes from the spec, not from the server's code. JSON is compared after
//! parsing, never as bytes (the dev agent, like `consul agent -dev`, may pretty-print). Keys live
//! under a per-test prefix so that the suite can also run against a real Consul agent
//! (`CONSUL_LEADER_TEST_ADDR=127.0.0.1:8500 cargo test --test dev_agent`); items that need an
//! empty store or dev-agent-only options are skipped there, with a note.
//!
//! Error bodies are compared with any trailing newline removed: the spec says handler errors have
//! none, but does not say so for the 400s that query parsing writes directly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// "At once": a woken or immediate request must answer well within this, even on a busy machine.
const PROMPT: Duration = Duration::from_secs(5);

/// Asserts the body, ignoring a trailing newline.
#[track_caller]
fn assert_body(r: &Resp, expected: &str) {
    assert_eq!(
        r.text().trim_end_matches(['\n', '\r']),
        expected,
        "{}: body",
        r.what
    );
}

/// Creates two default sessions, `S` and `S2`, as the checklist's scenario assumes.
async fn two_sessions(a: &DevAgent) -> (String, String) {
    (
        a.create_session(json!({})).await,
        a.create_session(json!({})).await,
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP basics (1–11)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn c01_get_kv_root_is_missing_key_name() {
    let a = DevAgent::start();
    let r = a.get("/v1/kv/").await.expect_status(400);
    assert_body(&r, "Missing key name");
}

#[tokio::test]
async fn c02_post_kv_is_405_with_allow_header() {
    let a = DevAgent::start();
    let r = a
        .http()
        .post(&a.kv_path("foo"), Vec::new())
        .await
        .expect_status(405);
    assert_eq!(r.header("Allow").as_deref(), Some("OPTIONS,GET,PUT,DELETE"));
    assert_body(&r, "method POST not allowed");
}

#[tokio::test]
async fn c03_get_session_create_is_405() {
    let a = DevAgent::start();
    let r = a.get("/v1/session/create").await.expect_status(405);
    assert_eq!(r.header("Allow").as_deref(), Some("OPTIONS,PUT"));
    assert_body(&r, "method GET not allowed");
}

#[tokio::test]
async fn c04_options_kv_is_200_with_allow_header() {
    let a = DevAgent::start();
    let r = a.http().options(&a.kv_path("foo")).await.expect_status(200);
    assert!(
        r.body.is_empty(),
        "OPTIONS body should be empty: {:?}",
        r.text()
    );
    assert_eq!(r.header("Allow").as_deref(), Some("OPTIONS,GET,PUT,DELETE"));
}

#[tokio::test]
async fn c05_unknown_v1_path_is_404() {
    let a = DevAgent::start();
    let r = a.get("/v1/does-not-exist").await.expect_status(404);
    // Modern agents explain (§1.1); older ones answer an empty 404 [ver].
    assert_body_starts(&r, "Invalid URL path: not a recognized HTTP API endpoint");
}

#[tokio::test]
async fn c06_non_numeric_index_is_400() {
    let a = DevAgent::start();
    let r = a
        .get(&format!("{}?index=abc", a.kv_path("foo")))
        .await
        .expect_status(400);
    assert_body(&r, "Invalid index");
}

#[tokio::test]
async fn c07_wait_without_unit_is_400() {
    let a = DevAgent::start();
    let r = a
        .get(&format!("{}?wait=10", a.kv_path("foo")))
        .await
        .expect_status(400);
    assert_body(&r, "Invalid wait time");
}

#[tokio::test]
async fn c08_stale_with_consistent_is_400() {
    let a = DevAgent::start();
    let r = a
        .get(&format!("{}?stale&consistent", a.kv_path("foo")))
        .await
        .expect_status(400);
    assert_body_starts(&r, "Cannot specify ?stale with ?consistent");
}

#[tokio::test]
async fn c09_namespace_parameter_is_400_in_ce() {
    let a = DevAgent::start();
    let r = a
        .get(&format!("{}?ns=default", a.kv_path("foo")))
        .await
        .expect_status(400);
    assert_body_contains(&r, "Namespaces are a Consul Enterprise feature");
}

#[tokio::test]
async fn c10_status_leader_is_a_json_host_port_string() {
    let a = DevAgent::start();
    let r = a.get("/v1/status/leader").await.expect_status(200);
    let v = r.json();
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("leader is not a JSON string: {v}"));
    // ^"[^"]+:\d+"$ on the wire, i.e. a non-empty host, a colon, and digits.
    let (host, port) = s
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("leader {s:?} has no port"));
    assert!(!host.is_empty() && !host.contains('"'), "leader {s:?}");
    assert!(
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()),
        "leader {s:?}"
    );
}

#[tokio::test]
async fn c11_agent_self_names_node_and_datacenter() {
    let a = DevAgent::start();
    let r = a.get("/v1/agent/self").await.expect_status(200);
    let v = r.json();
    let node = v["Config"]["NodeName"]
        .as_str()
        .unwrap_or_else(|| panic!("Config.NodeName must be a string: {v}"));
    assert_eq!(v["Member"]["Name"].as_str(), Some(node), "{v}");
    if DevAgent::is_real() {
        assert!(v["Config"]["Datacenter"].is_string(), "{v}");
    } else {
        assert_eq!(v["Config"]["Datacenter"], json!("dc1"), "{v}");
        assert_eq!(node, "n1", "the dev agent was started with --node n1");
    }
}

// ---------------------------------------------------------------------------------------------
// KV reads and writes (12–28)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn c12_missing_key_on_empty_store_is_404_with_meta() {
    let a = DevAgent::start();
    let path = if DevAgent::is_real() {
        a.kv_path("missing")
    } else {
        "/v1/kv/missing".to_string()
    };
    let r = a.get(&path).await.expect_status(404);
    assert!(
        r.body.is_empty(),
        "404 body should be empty: {:?}",
        r.text()
    );
    assert!(
        r.header("Content-Type").is_none(),
        "a KV 404 has no Content-Type"
    );
    if DevAgent::is_real() {
        assert!(r.index() >= 1);
    } else {
        assert_eq!(r.index(), 1, "an empty store reports index 1, never 0");
    }
    assert_eq!(r.header("X-Consul-Knownleader").as_deref(), Some("true"));
    assert_eq!(r.header("X-Consul-Lastcontact").as_deref(), Some("0"));
}

#[tokio::test]
async fn c13_keys_at_root_of_empty_store_is_empty_array() {
    if DevAgent::is_real() {
        return skip("c13", "needs an empty store");
    }
    let a = DevAgent::start();
    let r = a.get("/v1/kv/?keys").await.expect_status(200);
    assert_eq!(r.json(), json!([]));
    assert!(r.index() >= 1);
}

#[tokio::test]
async fn c14_recurse_at_root_of_empty_store_is_404() {
    if DevAgent::is_real() {
        return skip("c14", "needs an empty store");
    }
    let a = DevAgent::start();
    let r = a.get("/v1/kv/?recurse").await.expect_status(404);
    assert!(r.index() >= 1);
}

#[tokio::test]
async fn c15_put_then_get_round_trips() {
    let a = DevAgent::start();
    let r = a.put(&a.kv_path("a"), "hello").await.expect_status(200);
    assert_eq!(r.json(), json!(true));
    assert_eq!(
        r.header("Content-Type").as_deref(),
        Some("application/json")
    );

    let r = a.get(&a.kv_path("a")).await.expect_status(200);
    let v = r.json();
    let arr = v.as_array().expect("KV GET answers an array");
    assert_eq!(arr.len(), 1, "{v}");
    let e = &arr[0];
    assert_eq!(e["Key"], json!(a.key("a")));
    assert_eq!(e["Value"], json!("aGVsbG8="));
    assert_eq!(e["Flags"], json!(0));
    assert_eq!(e["LockIndex"], json!(0));
    assert!(
        absent(e, "Session"),
        "an unlocked entry has no Session field: {e}"
    );
    let idx = r.index();
    assert_eq!(u64_field(e, "CreateIndex"), idx, "{e}");
    assert_eq!(u64_field(e, "ModifyIndex"), idx, "{e}");
}

#[tokio::test]
async fn c16_put_without_body_reads_back_null_value() {
    let a = DevAgent::start();
    let r = a
        .request("PUT", &a.kv_path("empty"))
        .await
        .expect_status(200);
    assert_eq!(r.json(), json!(true));
    let e = a.kv_entry("empty").await.expect("key exists");
    assert!(
        e.as_object().unwrap().contains_key("Value") && e["Value"].is_null(),
        "an empty value reads back as \"Value\": null: {e}"
    );
}

#[tokio::test]
async fn c17_raw_returns_bytes_as_text_plain() {
    let a = DevAgent::start();
    a.kv_put("a", b"hello").await;
    let r = a
        .get(&format!("{}?raw", a.kv_path("a")))
        .await
        .expect_status(200);
    assert_eq!(r.body, b"hello");
    assert_eq!(r.header("Content-Type").as_deref(), Some("text/plain"));
    assert_eq!(
        r.header("X-Content-Type-Options").as_deref(),
        Some("nosniff")
    );
}

#[tokio::test]
async fn c18_flags_are_not_carried_over() {
    let a = DevAgent::start();
    let r = a
        .put(&format!("{}?flags=42", a.kv_path("a")), "x")
        .await
        .expect_status(200);
    assert_eq!(r.json(), json!(true));
    assert_eq!(a.kv_entry("a").await.unwrap()["Flags"], json!(42));
    a.kv_put("a", b"y").await;
    let e = a.kv_entry("a").await.unwrap();
    assert_eq!(e["Flags"], json!(0), "{e}");
    assert_eq!(e["Value"], json!(b64(b"y")), "{e}");
}

#[tokio::test]
async fn c19_identical_put_keeps_modify_index() {
    let a = DevAgent::start();
    a.kv_put("a", b"same").await;
    let before = a.kv_entry("a").await.unwrap();
    a.kv_put("a", b"same").await;
    let after = a.kv_entry("a").await.unwrap();
    assert_eq!(
        u64_field(&after, "ModifyIndex"),
        u64_field(&before, "ModifyIndex"),
        "an identical set changes nothing (since 1.6): before {before}, after {after}"
    );
}

#[tokio::test]
async fn c20_cas_zero_only_creates() {
    let a = DevAgent::start();
    a.kv_put("a", b"orig").await;
    let r = a.put(&format!("{}?cas=0", a.kv_path("a")), "new").await;
    assert!(!r.expect_bool(), "cas=0 on an existing key");
    assert_eq!(a.kv_entry("a").await.unwrap()["Value"], json!(b64(b"orig")));
    let r = a.put(&format!("{}?cas=0", a.kv_path("new")), "v").await;
    assert!(r.expect_bool(), "cas=0 on a missing key");
    assert_eq!(a.kv_entry("new").await.unwrap()["Value"], json!(b64(b"v")));
}

#[tokio::test]
async fn c21_cas_with_current_modify_index() {
    let a = DevAgent::start();
    a.kv_put("a", b"v1").await;
    let mi = u64_field(&a.kv_entry("a").await.unwrap(), "ModifyIndex");
    let r = a.put(&format!("{}?cas={mi}", a.kv_path("a")), "v2").await;
    assert!(r.expect_bool(), "cas with the current ModifyIndex");
    let e = a.kv_entry("a").await.unwrap();
    assert_eq!(e["Value"], json!(b64(b"v2")));
    assert!(u64_field(&e, "ModifyIndex") > mi);
    let r = a.put(&format!("{}?cas={mi}", a.kv_path("a")), "v3").await;
    assert!(!r.expect_bool(), "cas with the old ModifyIndex");
    assert_eq!(a.kv_entry("a").await.unwrap()["Value"], json!(b64(b"v2")));
}

#[tokio::test]
async fn c22_cas_with_acquire_is_conflicting_flags() {
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    let r = a
        .put(&format!("{}?cas=1&acquire={s}", a.kv_path("a")), "x")
        .await
        .expect_status(400);
    assert_body_starts(&r, "Conflicting flags:");
    // The query string follows, re-encoded with sorted keys (§3.3).
    assert_body_contains(&r, &format!("acquire={s}&cas=1"));
    assert!(a.kv_entry("a").await.is_none(), "nothing was written");
}

#[tokio::test]
async fn c23_non_numeric_flags_is_500() {
    let a = DevAgent::start();
    a.put(&format!("{}?flags=notanumber", a.kv_path("a")), "x")
        .await
        .expect_status(500);
    assert!(a.kv_entry("a").await.is_none(), "nothing was written");
}

#[tokio::test]
async fn c24_value_over_512_kib_is_413() {
    let a = DevAgent::start();
    let r = a
        .put(&a.kv_path("big"), vec![b'x'; 524_289])
        .await
        .expect_status(413);
    assert_body_contains(&r, "too large");
    assert!(a.kv_entry("big").await.is_none(), "nothing was written");
    // The limit itself is allowed: only a body *larger* than 524288 bytes is refused.
    let r = a.put(&a.kv_path("big"), vec![b'x'; 524_288]).await;
    assert!(r.expect_bool());
}

#[tokio::test]
async fn c25_cas_delete_of_missing_key_is_true() {
    let a = DevAgent::start();
    let r = a.delete(&format!("{}?cas=5", a.kv_path("nope"))).await;
    assert!(r.expect_bool());
}

#[tokio::test]
async fn c26_cas_delete_needs_current_index() {
    let a = DevAgent::start();
    a.kv_put("a", b"v1").await;
    let old = u64_field(&a.kv_entry("a").await.unwrap(), "ModifyIndex");
    a.kv_put("a", b"v2").await;
    let cur = u64_field(&a.kv_entry("a").await.unwrap(), "ModifyIndex");
    assert!(cur > old);
    let r = a.delete(&format!("{}?cas={old}", a.kv_path("a"))).await;
    assert!(!r.expect_bool(), "stale index");
    assert!(a.kv_entry("a").await.is_some());
    let r = a.delete(&format!("{}?cas={cur}", a.kv_path("a"))).await;
    assert!(r.expect_bool(), "current index");
    assert!(a.kv_entry("a").await.is_none());
}

#[tokio::test]
async fn c27_keys_with_separator_and_missing_prefix() {
    let a = DevAgent::start();
    a.kv_put("p/x", b"1").await;
    a.kv_put("p/y/z", b"2").await;
    let r = a
        .get(&format!("{}?keys&separator=/", a.kv_path("p/")))
        .await
        .expect_status(200);
    assert_eq!(r.json(), json!([a.key("p/x"), a.key("p/y/")]));
    assert!(r.index() >= 1);
    let r = a
        .get(&format!("{}?keys", a.kv_path("q/")))
        .await
        .expect_status(404);
    assert!(r.body.is_empty(), "{:?}", r.text());
    assert!(r.index() >= 1);
}

#[tokio::test]
async fn c28_deleted_key_reports_tombstone_index() {
    let a = DevAgent::start();
    a.kv_put("k", b"v").await;
    let n = u64_field(&a.kv_entry("k").await.unwrap(), "ModifyIndex");
    assert!(a.delete(&a.kv_path("k")).await.expect_bool());
    let r = a.get(&a.kv_path("k")).await.expect_status(404);
    assert!(
        r.index() > n,
        "after the delete, the missing key's index ({}) must be past its old ModifyIndex {n}",
        r.index()
    );
    // The tombstone also keeps the prefix's index from going backwards.
    let r = a
        .get(&format!("{}?recurse", a.kv_path("k")))
        .await
        .expect_status(404);
    assert!(r.index() > n, "recurse index {} vs old {n}", r.index());
}

// ---------------------------------------------------------------------------------------------
// Sessions (29–40)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn c29_create_without_body_uses_defaults() {
    let a = DevAgent::start();
    let r = a
        .request("PUT", "/v1/session/create")
        .await
        .expect_status(200);
    assert!(
        r.header("X-Consul-Index").is_none(),
        "session create sets no index header"
    );
    let v = r.json();
    let id = v["ID"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    assert!(is_lower_uuid(&id), "ID {id:?} is not a lower-case UUID");

    let info = a.session_info(&id).await.expect("the session exists");
    assert_eq!(info["ID"], json!(id));
    assert_eq!(info["Behavior"], json!("release"));
    assert_eq!(info["LockDelay"], json!(15_000_000_000u64));
    assert_eq!(info["TTL"], json!(""));
    assert_eq!(info["NodeChecks"], json!(["serfHealth"]));
    assert_eq!(info["Node"], json!(a.node_name().await));
    assert_eq!(info["Name"], json!(""));
    assert!(
        absent(&info, "Checks"),
        "Checks is cleared by rule 2 and omitted when empty: {info}"
    );
    assert_eq!(
        u64_field(&info, "CreateIndex"),
        u64_field(&info, "ModifyIndex")
    );
}

#[tokio::test]
async fn c30_ttl_bounds() {
    let a = DevAgent::start();
    let r = a
        .put("/v1/session/create", json!({"TTL": "5s"}).to_string())
        .await
        .expect_status(500);
    assert_body_contains(&r, "Invalid Session TTL");
    // The duration is printed as integer nanoseconds (§2.1).
    assert_body_contains(&r, "'5000000000'");

    // Both bounds are inclusive.
    let id = a.create_session(json!({"TTL": "10s"})).await;
    assert_eq!(a.session_info(&id).await.unwrap()["TTL"], json!("10s"));
    a.create_session(json!({"TTL": "24h"})).await;

    let r = a
        .put("/v1/session/create", json!({"TTL": "24h1m"}).to_string())
        .await
        .expect_status(500);
    assert_body_contains(&r, "Invalid Session TTL");

    // Zero means "no TTL" and passes; the TTL string is kept as sent.
    let id = a.create_session(json!({"TTL": "0s"})).await;
    assert_eq!(a.session_info(&id).await.unwrap()["TTL"], json!("0s"));
}

#[tokio::test]
async fn c31_unparsable_ttl_is_500_and_numeric_ttl_is_400() {
    let a = DevAgent::start();
    let r = a
        .put("/v1/session/create", json!({"TTL": "abc"}).to_string())
        .await
        .expect_status(500);
    assert_body_contains(&r, "invalid");
    // TTL must be a JSON string; a number fails decoding (§2.1).
    let r = a
        .put("/v1/session/create", json!({"TTL": 10}).to_string())
        .await
        .expect_status(400);
    assert_body_starts(&r, "Request decode failed");
}

#[tokio::test]
async fn c32_unknown_behavior_is_500() {
    let a = DevAgent::start();
    let r = a
        .put(
            "/v1/session/create",
            json!({"Behavior": "bogus"}).to_string(),
        )
        .await
        .expect_status(500);
    assert_body_contains(&r, "Invalid Behavior");
    // The comparison is case-sensitive.
    let r = a
        .put(
            "/v1/session/create",
            json!({"Behavior": "Release"}).to_string(),
        )
        .await
        .expect_status(500);
    assert_body_contains(&r, "Invalid Behavior");
}

#[tokio::test]
async fn c33_lock_delay_parsing() {
    let a = DevAgent::start();
    let r = a
        .put("/v1/session/create", json!({"LockDelay": "20"}).to_string())
        .await
        .expect_status(400);
    assert_body_starts(&r, "Request decode failed");

    let id = a.create_session(json!({"LockDelay": 20})).await;
    assert_eq!(
        a.session_info(&id).await.unwrap()["LockDelay"],
        json!(20_000_000_000u64),
        "a number below 1000 ns is taken as seconds"
    );
    let id = a.create_session(json!({"LockDelay": "0s"})).await;
    assert_eq!(a.session_info(&id).await.unwrap()["LockDelay"], json!(0));
    let id = a.create_session(json!({"LockDelay": "1500ms"})).await;
    assert_eq!(
        a.session_info(&id).await.unwrap()["LockDelay"],
        json!(1_500_000_000u64)
    );
}

#[tokio::test]
async fn c34_unknown_node_is_500() {
    let a = DevAgent::start();
    let r = a
        .put(
            "/v1/session/create",
            json!({"Node": a.name("ghost")}).to_string(),
        )
        .await
        .expect_status(500);
    assert_body_contains(&r, "Missing node registration");
}

#[tokio::test]
async fn c35_empty_checks_binds_nothing() {
    let a = DevAgent::start();
    let id = a.create_session(json!({"Checks": []})).await;
    let info = a.session_info(&id).await.unwrap();
    assert!(empty_list(&info, "NodeChecks"), "{info}");
    assert!(empty_list(&info, "Checks"), "{info}");
    assert!(empty_list(&info, "ServiceChecks"), "{info}");
}

#[tokio::test]
async fn c36_info_of_unknown_session_is_empty_array() {
    let a = DevAgent::start();
    let r = a
        .get("/v1/session/info/00000000-0000-0000-0000-000000000000")
        .await
        .expect_status(200);
    assert_eq!(r.json(), json!([]));
    assert!(r.index() >= 1);
}

#[tokio::test]
async fn c37_renew_of_unknown_session_is_404() {
    let a = DevAgent::start();
    let unknown = uuid::Uuid::new_v4().to_string();
    let r = a
        .put(&format!("/v1/session/renew/{unknown}"), Vec::new())
        .await
        .expect_status(404);
    assert_body(&r, &format!("Session id '{unknown}' not found"));
}

#[tokio::test]
async fn c38_renew_returns_session_and_keeps_modify_index() {
    let a = DevAgent::start();
    let s = a.create_session(json!({"TTL": "10s"})).await;
    let before = a.session_info(&s).await.unwrap();
    let r = a
        .put(&format!("/v1/session/renew/{s}"), Vec::new())
        .await
        .expect_status(200);
    let v = r.json();
    let arr = v
        .as_array()
        .unwrap_or_else(|| panic!("renew answers an array: {v}"));
    assert_eq!(arr.len(), 1, "{v}");
    assert_eq!(arr[0]["ID"], json!(s));
    assert_eq!(
        arr[0]["TTL"],
        json!("10s"),
        "the client reads TTL from the reply"
    );
    let after = a.session_info(&s).await.unwrap();
    assert_eq!(
        u64_field(&after, "ModifyIndex"),
        u64_field(&before, "ModifyIndex"),
        "renew commits nothing"
    );
    assert_eq!(
        u64_field(&arr[0], "ModifyIndex"),
        u64_field(&before, "ModifyIndex")
    );
}

#[tokio::test]
async fn c39_destroy_unknown_is_true_and_empty_id_is_400() {
    let a = DevAgent::start();
    let unknown = uuid::Uuid::new_v4().to_string();
    let r = a
        .put(&format!("/v1/session/destroy/{unknown}"), Vec::new())
        .await;
    assert!(r.expect_bool());
    let r = a
        .put("/v1/session/destroy/", Vec::new())
        .await
        .expect_status(400);
    assert_body(&r, "Missing session");
}

#[tokio::test]
async fn c40_session_list_and_node() {
    let a = DevAgent::start();
    if !DevAgent::is_real() {
        let r = a.get("/v1/session/list").await.expect_status(200);
        assert_eq!(r.json(), json!([]));
        assert!(r.index() >= 1);
    }
    let (s, s2) = two_sessions(&a).await;
    let node = a.node_name().await;
    let r = a
        .get(&format!("/v1/session/node/{node}"))
        .await
        .expect_status(200);
    assert!(r.index() >= 1);
    let v = r.json();
    let arr = v.as_array().unwrap_or_else(|| panic!("{v}"));
    let ids: Vec<&str> = arr.iter().filter_map(|e| e["ID"].as_str()).collect();
    assert!(
        ids.contains(&s.as_str()) && ids.contains(&s2.as_str()),
        "{v}"
    );
    assert!(arr.iter().all(|e| e["Node"] == json!(node)), "{v}");

    let r = a.get("/v1/session/list").await.expect_status(200);
    let v = r.json();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["ID"].as_str())
        .collect();
    assert!(
        ids.contains(&s.as_str()) && ids.contains(&s2.as_str()),
        "{v}"
    );
    if !DevAgent::is_real() {
        assert_eq!(ids.len(), 2, "{v}");
        // The list is in ID order.
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    // Node names compare case-insensitively; an unknown node has no sessions.
    let r = a
        .get(&format!("/v1/session/node/{}", node.to_uppercase()))
        .await
        .expect_status(200);
    let n = r.json().as_array().map(Vec::len).unwrap_or(0);
    assert!(n >= 2, "case-insensitive node match: {}", r.text());
    let r = a
        .get(&format!("/v1/session/node/{}", a.name("ghost")))
        .await
        .expect_status(200);
    assert_eq!(r.json(), json!([]));
}

// ---------------------------------------------------------------------------------------------
// Locks (41–51)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn c41_acquire_sets_lock_index_and_session() {
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    assert!(a.acquire("L", &s, b"v1").await);
    let e = a.kv_entry("L").await.unwrap();
    assert_eq!(e["LockIndex"], json!(1), "{e}");
    assert_eq!(e["Session"], json!(s), "{e}");
    assert_eq!(e["Value"], json!("djE="), "{e}");
    assert_eq!(
        u64_field(&e, "CreateIndex"),
        u64_field(&e, "ModifyIndex"),
        "a new key"
    );
}

#[tokio::test]
async fn c42_reacquire_by_holder_keeps_lock_index() {
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    assert!(a.acquire("L", &s, b"v1").await);
    assert!(a.acquire("L", &s, b"v2").await);
    let e = a.kv_entry("L").await.unwrap();
    assert_eq!(e["LockIndex"], json!(1), "{e}");
    assert_eq!(e["Session"], json!(s), "{e}");
    assert_eq!(e["Value"], json!(b64(b"v2")), "{e}");
}

#[tokio::test]
async fn c43_acquire_by_other_session_is_false() {
    let a = DevAgent::start();
    let (s, s2) = two_sessions(&a).await;
    assert!(a.acquire("L", &s, b"v1").await);
    let before = a.kv_entry("L").await.unwrap();
    assert!(!a.acquire("L", &s2, b"other").await);
    let after = a.kv_entry("L").await.unwrap();
    assert_eq!(after, before, "a refused acquire changes nothing");
}

#[tokio::test]
async fn c44_release_by_non_holder_is_false() {
    let a = DevAgent::start();
    let (s, s2) = two_sessions(&a).await;
    assert!(a.acquire("L", &s, b"v1").await);
    let before = a.kv_entry("L").await.unwrap();
    assert!(!a.release("L", &s2, b"other").await);
    assert_eq!(a.kv_entry("L").await.unwrap(), before);
}

#[tokio::test]
async fn c45_acquire_with_unknown_session_is_500() {
    let a = DevAgent::start();
    let unknown = uuid::Uuid::new_v4().to_string();
    let r = a
        .put(&format!("{}?acquire={unknown}", a.kv_path("L")), "v")
        .await
        .expect_status(500);
    assert_body_contains(&r, "invalid session");
    assert!(a.kv_entry("L").await.is_none());
}

#[tokio::test]
async fn c46_acquire_without_session_is_500() {
    let a = DevAgent::start();
    let r = a
        .put(&format!("{}?acquire", a.kv_path("L")), "v")
        .await
        .expect_status(500);
    assert_body_contains(&r, "missing session");
    assert!(a.kv_entry("L").await.is_none());
}

#[tokio::test]
async fn c47_release_then_new_holder_bumps_lock_index() {
    let a = DevAgent::start();
    // Both sessions have the default 15 s lock-delay: a plain release must not apply it, so S2's
    // acquire right after the release succeeds.
    let (s, s2) = two_sessions(&a).await;
    assert!(a.acquire("L", &s, b"v1").await);
    assert!(a.release("L", &s, b"v2").await);
    let e = a.kv_entry("L").await.unwrap();
    assert!(absent(&e, "Session"), "{e}");
    assert_eq!(e["LockIndex"], json!(1), "{e}");
    assert_eq!(e["Value"], json!(b64(b"v2")), "{e}");
    assert!(a.acquire("L", &s2, b"v3").await);
    let e = a.kv_entry("L").await.unwrap();
    assert_eq!(e["LockIndex"], json!(2), "{e}");
    assert_eq!(e["Session"], json!(s2), "{e}");
}

#[tokio::test]
async fn c48_plain_put_keeps_lock_holder() {
    let a = DevAgent::start();
    let s2 = a.create_session(json!({})).await;
    assert!(a.acquire("L", &s2, b"v1").await);
    a.kv_put("L", b"overwritten").await;
    let e = a.kv_entry("L").await.unwrap();
    assert_eq!(e["Session"], json!(s2), "{e}");
    assert_eq!(e["Value"], json!(b64(b"overwritten")), "{e}");
    // LockIndex after a plain PUT is only inferred in the spec (reset to 0); not asserted.
}

#[tokio::test]
async fn c49_lock_delay_after_destroy() {
    let a = DevAgent::start();
    let delay = Duration::from_secs(2);
    let s = a.create_session(json!({"LockDelay": "2s"})).await;
    let s3 = a.create_session(json!({})).await;
    assert!(a.acquire("L2", &s, b"v").await);
    let held = a.kv_entry("L2").await.unwrap();

    // The server's invalidation time is after this instant.
    let before_destroy = Instant::now();
    a.destroy_session(&s).await;
    let e = a
        .kv_entry("L2")
        .await
        .expect("release behaviour keeps the key");
    assert!(absent(&e, "Session"), "{e}");
    assert!(
        u64_field(&e, "ModifyIndex") > u64_field(&held, "ModifyIndex"),
        "{held} -> {e}"
    );
    assert_eq!(
        e["LockIndex"], held["LockIndex"],
        "invalidation keeps LockIndex"
    );
    assert_eq!(e["Value"], held["Value"], "invalidation keeps the value");
    assert_lock_delay(&a, "L2", &s3, delay, before_destroy).await;
}

#[tokio::test]
async fn c50_behavior_delete_deletes_held_keys() {
    let a = DevAgent::start();
    let s = a.create_session(json!({"Behavior": "delete"})).await;
    assert_eq!(
        a.session_info(&s).await.unwrap()["Behavior"],
        json!("delete")
    );
    assert!(a.acquire("D", &s, b"v").await);
    a.destroy_session(&s).await;
    a.get(&a.kv_path("D")).await.expect_status(404);
}

#[tokio::test]
async fn c51_ttl_expiry_after_twice_the_ttl() {
    // The checklist uses TTL 10s; with --session-ttl-min 1s the same rule is checked with 2s.
    let Some(a) = DevAgent::builder().ttl_min("1s").start() else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let expiry = ttl * 2;
    let created_before = Instant::now();
    let s = a.create_session(json!({"TTL": "2s"})).await;
    assert!(a.acquire("T", &s, b"v").await);

    // The timer is armed after `created_before`, so the session cannot expire before
    // `created_before + 2×TTL`. Look at TTL and at 1.5×TTL; a look answered too close to 2×TTL
    // (a very slow machine) is inconclusive and only noted.
    for at in [ttl, ttl * 3 / 2] {
        tokio::time::sleep_until((created_before + at).into()).await;
        let info = a.session_info(&s).await;
        let answered = created_before.elapsed();
        if answered + Duration::from_millis(100) < expiry {
            assert!(
                info.is_some(),
                "the session expired {answered:?} after create; TTL×2 is {expiry:?}"
            );
            assert_eq!(a.kv_entry("T").await.unwrap()["Session"], json!(s));
        } else {
            eprintln!("note: look at {at:?} answered at {answered:?}; inconclusive");
        }
    }

    wait_until(
        "the session has expired and T is unlocked",
        expiry + Duration::from_secs(8),
        || async {
            a.session_info(&s).await.is_none()
                && a.kv_entry("T").await.is_some_and(|e| absent(&e, "Session"))
        },
    )
    .await;
    let gone_at = created_before.elapsed();
    assert!(
        gone_at + Duration::from_millis(100) >= expiry,
        "gone at {gone_at:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Blocking (52–56)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn c52_blocking_get_times_out_with_same_index() {
    let a = DevAgent::start();
    a.kv_put("a", b"v").await;
    let i = a.get(&a.kv_path("a")).await.expect_status(200).index();
    let r = a
        .get(&format!("{}?index={i}&wait=2s", a.kv_path("a")))
        .await
        .expect_status(200);
    assert_eq!(r.index(), i);
    assert!(
        r.elapsed >= Duration::from_millis(1950),
        "returned after {:?}, before the 2s wait",
        r.elapsed
    );
    // 2 s plus jitter below wait/16 (0.125 s), plus generous overhead for a busy machine.
    assert!(
        r.elapsed < Duration::from_millis(2125) + PROMPT,
        "returned after {:?}",
        r.elapsed
    );
    assert_eq!(r.json()[0]["Value"], json!(b64(b"v")));
}

#[tokio::test]
async fn c53_blocking_get_ignores_other_keys_and_wakes_on_its_key() {
    let a = DevAgent::start();
    a.kv_put("a", b"v1").await;
    let i = a.get(&a.kv_path("a")).await.expect_status(200).index();
    let http = a.http().clone();
    let path = format!("{}?index={i}&wait=30s", a.kv_path("a"));
    let mut blocked = tokio::spawn(async move { http.get(&path).await });

    assert_pending(
        "blocking GET before any write",
        &mut blocked,
        Duration::from_millis(500),
    )
    .await;
    a.kv_put("b", b"other").await;
    assert_pending(
        "blocking GET after a write to another key",
        &mut blocked,
        Duration::from_secs(1),
    )
    .await;

    let wrote = Instant::now();
    a.kv_put("a", b"v2").await;
    let r = join_within("blocking GET after its key changed", blocked, PROMPT).await;
    let woke = wrote.elapsed();
    let r = r.expect_status(200);
    let e = a.kv_entry("a").await.unwrap();
    assert_eq!(r.index(), u64_field(&e, "ModifyIndex"));
    assert!(r.index() > i);
    assert_eq!(r.json()[0]["Value"], json!(b64(b"v2")));
    assert!(woke < PROMPT, "woke {woke:?} after the write");
}

#[tokio::test]
async fn c54_blocking_get_on_missing_key_waits_for_creation() {
    if DevAgent::is_real() {
        // Parallel tests move the shared KV table index, so the index this test starts from may
        // already be stale when its blocking request arrives, which rightly answers at once.
        return skip("c54", "needs a KV table no other test writes to");
    }
    let a = DevAgent::start();
    a.kv_put("other", b"x").await;
    let k = a.get(&a.kv_path("m")).await.expect_status(404).index();
    let http = a.http().clone();
    let path = format!("{}?index={k}&wait=30s", a.kv_path("m"));
    let mut blocked = tokio::spawn(async move { http.get(&path).await });

    // The first dwell also gives the request time to reach the server before the unrelated
    // write; a request that arrived after it would rightly answer at once (item 55).
    assert_pending(
        "blocking GET on a missing key",
        &mut blocked,
        Duration::from_secs(1),
    )
    .await;
    a.kv_put("other2", b"y").await;
    assert_pending(
        "blocking GET on a missing key after another key was written (modern behaviour)",
        &mut blocked,
        Duration::from_millis(1500),
    )
    .await;

    a.kv_put("m", b"here").await;
    let r = join_within("blocking GET after the key was created", blocked, PROMPT).await;
    let r = r.expect_status(200);
    assert_eq!(r.json()[0]["Key"], json!(a.key("m")));
    assert!(r.index() > k);
}

#[tokio::test]
async fn c55_blocking_get_on_missing_key_with_stale_index_is_immediate() {
    let a = DevAgent::start();
    a.kv_put("x", b"1").await;
    a.kv_put("y", b"2").await;
    let table = a.get(&a.kv_path("m")).await.expect_status(404).index();
    assert!(table > 1);
    let r = a
        .get(&format!("{}?index=1&wait=30s", a.kv_path("m")))
        .await
        .expect_status(404);
    assert!(
        r.elapsed < PROMPT,
        "a stale index answers at once, took {:?}",
        r.elapsed
    );
    if DevAgent::is_real() {
        // Other tests may write to the shared KV table in between.
        assert!(r.index() >= table);
    } else {
        assert_eq!(r.index(), table);
    }
}

#[tokio::test]
async fn c56_consistent_blocking_get_wakes_on_session_destroy() {
    let a = DevAgent::start();
    let s = a.create_session(json!({})).await;
    assert!(a.acquire("L", &s, b"v").await);
    let mi = a.get(&a.kv_path("L")).await.expect_status(200).index();
    let http = a.http().clone();
    let path = format!("{}?consistent&index={mi}&wait=30s", a.kv_path("L"));
    let mut blocked = tokio::spawn(async move { http.get(&path).await });
    assert_pending(
        "consistent blocking GET on a held key",
        &mut blocked,
        Duration::from_millis(500),
    )
    .await;

    a.destroy_session(&s).await;
    let r = join_within(
        "blocking GET after the holder was destroyed",
        blocked,
        PROMPT,
    )
    .await;
    let r = r.expect_status(200);
    let v = r.json();
    assert!(absent(&v[0], "Session"), "{v}");
    assert!(r.index() > mi);
}

// ---------------------------------------------------------------------------------------------
// Checks (57–60)
// ---------------------------------------------------------------------------------------------

// The checklist registers c1 with TTL 5s. Items 57/58 are about the initial status and about
// `fail`, not about the TTL, so a longer TTL keeps a slow machine from letting the check expire
// between `pass` and the session create.
const CHECK_TTL: &str = "60s";

#[tokio::test]
async fn c57_new_ttl_check_starts_critical() {
    let a = DevAgent::start();
    let c1 = a.name("c1");
    a.register_check(json!({"Name": c1, "TTL": CHECK_TTL}))
        .await;
    let r = a
        .put(
            "/v1/session/create",
            json!({"NodeChecks": ["serfHealth", c1]}).to_string(),
        )
        .await
        .expect_status(500);
    assert_body_contains(&r, "critical");
    a.put(&format!("/v1/agent/check/deregister/{c1}"), Vec::new())
        .await;
}

#[tokio::test]
async fn c58_failing_a_bound_check_destroys_the_session() {
    let a = DevAgent::start();
    let c1 = a.name("c1");
    a.register_check(json!({"Name": c1, "TTL": CHECK_TTL}))
        .await;
    a.check_update("pass", &c1).await;
    let s = a
        .create_session(json!({"NodeChecks": ["serfHealth", c1]}))
        .await;
    assert!(a.acquire("L", &s, b"v").await);

    a.check_update("fail", &c1).await;
    // A real agent syncs the check to the catalog asynchronously, hence a wait, not an assert.
    wait_until(
        "the session is gone and L is released",
        Duration::from_secs(15),
        || async {
            a.session_info(&s).await.is_none()
                && a.kv_entry("L").await.is_some_and(|e| absent(&e, "Session"))
        },
    )
    .await;
    a.put(&format!("/v1/agent/check/deregister/{c1}"), Vec::new())
        .await;
}

#[tokio::test]
async fn c59_pass_on_unknown_check_is_500() {
    let a = DevAgent::start();
    let r = a
        .put(
            &format!("/v1/agent/check/pass/{}", a.name("unknown")),
            Vec::new(),
        )
        .await
        .expect_status(500);
    assert_body_contains(&r, "does not have associated TTL");
}

#[tokio::test]
async fn c60_check_register_without_name_is_400() {
    let a = DevAgent::start();
    let r = a
        .put("/v1/agent/check/register", "{}")
        .await
        .expect_status(400);
    assert_body(&r, "Missing check name");
}

// ---------------------------------------------------------------------------------------------
// Beyond the checklist: places where third-party clients' own suites found the dev agent
// different from Consul, each read from Consul's source (issue 14).
// ---------------------------------------------------------------------------------------------

/// `Stats` as a server fills it (agent/consul/server.go `Stats`, plus the agent's `agent` and
/// `build`), and `xDS`, which `consul agent -dev` has because its gRPC port is set.
#[tokio::test]
async fn c61_agent_self_has_the_servers_stats_and_xds() {
    let a = DevAgent::start();
    let leader = a.get("/v1/status/leader").await.expect_status(200).json();
    let me = a.get("/v1/agent/self").await.expect_status(200).json();
    let stats = me["Stats"].as_object().expect("Stats is an object");
    for section in [
        "consul", "raft", "serf_lan", "serf_wan", "runtime", "agent", "build",
    ] {
        let s = stats[section]
            .as_object()
            .unwrap_or_else(|| panic!("no Stats.{section}: {me}"));
        assert!(
            s.values().all(|v| v.is_string()),
            "Stats.{section} values are all strings: {s:?}"
        );
    }
    let consul = &stats["consul"];
    assert_eq!(consul["leader_addr"], leader, "{consul}");
    assert_eq!(consul["leader"], "true");
    assert_eq!(consul["server"], "true");
    for key in ["bootstrap", "known_datacenters"] {
        assert!(consul[key].is_string(), "consul.{key}: {consul}");
    }
    for key in ["state", "commit_index", "applied_index", "last_log_index"] {
        assert!(
            stats["raft"][key].is_string(),
            "raft.{key}: {}",
            stats["raft"]
        );
    }
    assert_eq!(stats["raft"]["state"], "Leader");
    assert!(stats["serf_lan"]["members"].is_string());
    assert!(stats["runtime"]["os"].is_string());
    if !DevAgent::is_real() {
        // A real agent has xDS only in -dev mode or with a gRPC port configured.
        let xds = &me["xDS"];
        assert!(xds["SupportedProxies"]["envoy"].is_array(), "{xds}");
        assert!(
            xds["Port"].is_i64() && xds["Ports"]["Plaintext"].is_i64(),
            "{xds}"
        );
        assert!(xds["Ports"]["TLS"].is_i64(), "{xds}");
    }
}

/// `?wan=<non-empty>` lists the WAN pool, where servers are `<node>.<datacenter>`; a bare `?wan`
/// is the LAN (Consul reads the value); a segment with wan is refused.
#[tokio::test]
async fn c62_members_with_wan_list_the_wan_pool() {
    let a = DevAgent::start();
    let me = a.get("/v1/agent/self").await.expect_status(200).json();
    let (node, dc) = (
        me["Config"]["NodeName"].as_str().unwrap().to_string(),
        me["Config"]["Datacenter"].as_str().unwrap().to_string(),
    );
    let names = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap().to_string())
            .collect()
    };
    let lan = a.get("/v1/agent/members").await.expect_status(200).json();
    assert!(names(lan.clone()).contains(&node), "{lan}");
    let wan = a
        .get("/v1/agent/members?wan=1")
        .await
        .expect_status(200)
        .json();
    assert!(
        names(wan.clone()).contains(&format!("{node}.{dc}")),
        "{wan}"
    );
    assert!(!names(wan.clone()).contains(&node), "{wan}");
    let bare = a
        .get("/v1/agent/members?wan")
        .await
        .expect_status(200)
        .json();
    assert!(names(bare).contains(&node));
    let r = a
        .get("/v1/agent/members?wan=1&segment=alpha")
        .await
        .expect_status(400);
    assert_body(&r, "Cannot provide a segment with wan=true");
}

/// Consul resolves the token before it validates the check's type: an unknown token gets 403
/// even for a check that is also invalid; the anonymous token resolves, so an invalid check is
/// still 400 for it, and only a valid one gets its permission refused.
#[tokio::test]
async fn c63_check_register_resolves_the_token_before_the_type() {
    let token = "c63-secret";
    let Some(a) = DevAgent::builder().acl_token(token).start() else {
        return;
    };
    let no_type = r#"{"Name":"c63"}"#;
    let r = a
        .http()
        .request("PUT", "/v1/agent/check/register")
        .header("X-Consul-Token", "c63-wrong")
        .body(no_type)
        .send()
        .await
        .expect_status(403);
    assert_body_contains(&r, "ACL not found");
    // Name and status come before the token.
    let r = a
        .http()
        .request("PUT", "/v1/agent/check/register")
        .header("X-Consul-Token", "c63-wrong")
        .body("{}")
        .send()
        .await
        .expect_status(400);
    assert_body(&r, "Missing check name");
    // Anonymous: the type is checked before the permission.
    let r = a
        .put("/v1/agent/check/register", no_type)
        .await
        .expect_status(400);
    assert_body_contains(&r, "Invalid check");
    let r = a
        .put("/v1/agent/check/register", r#"{"Name":"c63","TTL":"10s"}"#)
        .await
        .expect_status(403);
    assert_body_contains(&r, "Permission denied");
    a.http()
        .request("PUT", "/v1/agent/check/register")
        .header("X-Consul-Token", token)
        .body(r#"{"Name":"c63","TTL":"10s"}"#)
        .send()
        .await
        .expect_status(200);
}

/// Writes apply at once by default (decided: `consul agent -dev` commits through a one-voter,
/// in-memory Raft in well under a millisecond); `--commit-latency` opens the commit window on
/// purpose: a read sent while a write commits answers with the state before it.
#[tokio::test]
async fn c64_commit_latency_lets_a_concurrent_read_see_the_state_before_a_write() {
    let Some(a) = DevAgent::builder()
        .arg("--commit-latency")
        .arg("400ms")
        .start()
    else {
        return;
    };
    let path = a.kv_path("c64");
    let http = a.http().clone();
    let write_path = path.clone();
    let write = tokio::spawn(async move { http.put(&write_path, "v").await });
    // The read goes out while the write is still committing, and answers before it.
    let r = a.get(&path).await;
    assert!(!write.is_finished(), "the write answered before the read");
    r.expect_status(404);
    assert!(write.await.unwrap().expect_bool());
    a.get(&path).await.expect_status(200);

    // Without the option, a write is visible as soon as it answers, and answers promptly.
    let b = DevAgent::start();
    let started = Instant::now();
    assert!(b.put(&b.kv_path("c64"), "v").await.expect_bool());
    assert!(started.elapsed() < PROMPT);
    b.get(&b.kv_path("c64")).await.expect_status(200);
}
