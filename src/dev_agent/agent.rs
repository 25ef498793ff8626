//! `/v1/agent/*` and `/v1/status/*` handlers (consul-api.md §5): the agent's self-description, the
//! single serf member, the raft leader address, and TTL checks (register, deregister, pass, warn,
//! fail, update). Check state and its effect on sessions live in `state`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::gofmt::{self, GoDuration, quote};
use super::http::{ApiError, Ctx, Resp, empty_ok};
use super::state::{CRITICAL, Check, NewCheck, PASSING, WARNING};

/// The Consul version the agent claims to be; clients gate features on it.
pub const CONSUL_VERSION: &str = "1.21.0";
const BUILD_DATE: &str = "2025-05-06T00:00:00Z";
const SERF_LAN_PORT: u16 = 8301;
const SERF_WAN_PORT: u16 = 8302;
const SERVER_RPC_PORT: u16 = 8300;
/// `consul agent -dev` serves gRPC (and so xDS) in plain text on 8502, and no gRPC TLS port.
const GRPC_PORT: i32 = 8502;
/// Envoy versions Consul 1.21 supports (`xdscommon.EnvoyVersions`), newest first.
const ENVOY_VERSIONS: [&str; 4] = ["1.34.1", "1.33.2", "1.32.5", "1.31.8"];

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SelfConfig<'a> {
    datacenter: &'a str,
    primary_datacenter: &'a str,
    node_name: &'a str,
    #[serde(rename = "NodeID")]
    node_id: &'a str,
    revision: &'a str,
    server: bool,
    version: &'a str,
    build_date: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Member {
    name: String,
    addr: String,
    port: u16,
    tags: BTreeMap<&'static str, String>,
    status: u8,
    protocol_min: u8,
    protocol_max: u8,
    protocol_cur: u8,
    delegate_min: u8,
    delegate_max: u8,
    delegate_cur: u8,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SelfResponse<'a> {
    config: SelfConfig<'a>,
    debug_config: BTreeMap<String, Value>,
    coord: Option<()>,
    member: Member,
    stats: BTreeMap<&'static str, BTreeMap<&'static str, String>>,
    meta: BTreeMap<String, String>,
    /// Present when the agent serves xDS, which `-dev` does (its gRPC port is set).
    #[serde(rename = "xDS")]
    xds: Xds,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Xds {
    supported_proxies: BTreeMap<&'static str, [&'static str; 4]>,
    /// The TLS port when there is one, else the plain-text one (deprecated by Consul for `Ports`).
    port: i32,
    ports: GrpcPorts,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct GrpcPorts {
    plaintext: i32,
    #[serde(rename = "TLS")]
    tls: i32,
}

/// `Stats` of `/v1/agent/self`, section by section as a Consul server in `-dev` mode fills it:
/// `consul`, `raft`, `serf_lan`, `serf_wan` and `runtime` from the server (agent/consul/server.go
/// `Stats`), `agent` and `build` from the agent. Every value is a string, as in Consul.
fn stats(ctx: &Ctx) -> BTreeMap<&'static str, BTreeMap<&'static str, String>> {
    let c = &ctx.agent.config;
    let (index, checks) = {
        let store = ctx.agent.store();
        (
            store.raft_index(),
            store.checks().filter(|c| c.ttl.is_some()).count(),
        )
    };
    let section = |pairs: &[(&'static str, String)]| pairs.iter().cloned().collect();
    let leader = leader_addr(ctx);
    let serf = |members: usize| {
        section(&[
            ("coordinate_resets", "0".into()),
            ("encrypted", "false".into()),
            ("event_queue", "0".into()),
            ("event_time", "1".into()),
            ("failed", "0".into()),
            ("health_score", "0".into()),
            ("intent_queue", "0".into()),
            ("left", "0".into()),
            ("member_time", "1".into()),
            ("members", members.to_string()),
            ("query_queue", "0".into()),
            ("query_time", "1".into()),
        ])
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut stats = BTreeMap::new();
    stats.insert(
        "agent",
        section(&[
            ("check_monitors", "0".into()),
            ("check_ttls", checks.to_string()),
            ("checks", checks.to_string()),
            ("services", "0".into()),
        ]),
    );
    stats.insert(
        "build",
        section(&[
            ("prerelease", String::new()),
            ("revision", "dev-agent".into()),
            ("version", CONSUL_VERSION.into()),
            ("version_metadata", String::new()),
        ]),
    );
    stats.insert(
        "consul",
        section(&[
            (
                "acl",
                if c.acl_token.is_some() {
                    "enabled"
                } else {
                    "disabled"
                }
                .into(),
            ),
            ("bootstrap", "true".into()),
            ("known_datacenters", "1".into()),
            ("leader", "true".into()),
            ("leader_addr", leader.clone()),
            ("server", "true".into()),
        ]),
    );
    stats.insert(
        "raft",
        section(&[
            ("applied_index", index.to_string()),
            ("commit_index", index.to_string()),
            ("fsm_pending", "0".into()),
            ("last_contact", "0".into()),
            ("last_log_index", index.to_string()),
            ("last_log_term", "2".into()),
            ("last_snapshot_index", "0".into()),
            ("last_snapshot_term", "0".into()),
            (
                "latest_configuration",
                format!("[{{Suffrage:Voter ID:{} Address:{leader}}}]", c.node_id),
            ),
            ("latest_configuration_index", "0".into()),
            ("num_peers", "0".into()),
            ("protocol_version", "3".into()),
            ("protocol_version_max", "3".into()),
            ("protocol_version_min", "0".into()),
            ("snapshot_version_max", "1".into()),
            ("snapshot_version_min", "0".into()),
            ("state", "Leader".into()),
            ("term", "2".into()),
        ]),
    );
    stats.insert(
        "runtime",
        section(&[
            ("arch", arch.into()),
            ("cpu_count", cpus.to_string()),
            ("goroutines", "0".into()),
            ("max_procs", cpus.to_string()),
            ("os", std::env::consts::OS.into()),
            ("version", "consul-leader dev-agent (Rust)".into()),
        ]),
    );
    stats.insert("serf_lan", serf(1));
    stats.insert("serf_wan", serf(1));
    stats
}

/// The agent's address as peers would see it: the listen IP, or loopback when bound to all or
/// to a unix socket.
fn advertise_ip(ctx: &Ctx) -> String {
    let crate::cli::Listen::Tcp(addr) = &ctx.agent.config.listen else {
        return "127.0.0.1".into();
    };
    let ip = addr.ip();
    if ip.is_unspecified() {
        "127.0.0.1".into()
    } else {
        ip.to_string()
    }
}

/// The raft leader's address: this agent's, as `/v1/status/leader` and `Stats.consul` say.
fn leader_addr(ctx: &Ctx) -> String {
    format!("{}:{SERVER_RPC_PORT}", advertise_ip(ctx))
}

/// This agent as a member of the WAN pool, where Consul names servers `<node>.<datacenter>`
/// and gossips on the WAN serf port.
fn wan_member(ctx: &Ctx) -> Member {
    let c = &ctx.agent.config;
    let mut m = member(ctx);
    m.name = format!("{}.{}", c.node, c.datacenter);
    m.port = SERF_WAN_PORT;
    m.tags.remove("segment");
    m
}

fn member(ctx: &Ctx) -> Member {
    let c = &ctx.agent.config;
    let mut tags = BTreeMap::new();
    tags.insert("acls", if c.acl_token.is_some() { "1" } else { "0" }.into());
    tags.insert("bootstrap", "1".into());
    tags.insert("build", format!("{CONSUL_VERSION}:dev-agent"));
    tags.insert("dc", c.datacenter.clone());
    tags.insert("id", c.node_id.clone());
    tags.insert("port", SERVER_RPC_PORT.to_string());
    tags.insert("raft_vsn", "3".into());
    tags.insert("role", "consul".into());
    tags.insert("segment", String::new());
    tags.insert("vsn", "2".into());
    tags.insert("vsn_max", "3".into());
    tags.insert("vsn_min", "2".into());
    Member {
        name: c.node.clone(),
        addr: advertise_ip(ctx),
        port: SERF_LAN_PORT,
        tags,
        status: 1,
        protocol_min: 1,
        protocol_max: 5,
        protocol_cur: 2,
        delegate_min: 2,
        delegate_max: 5,
        delegate_cur: 4,
    }
}

pub fn agent_self(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    let c = &ctx.agent.config;
    ctx.authorize("agent", "read", &c.node)?;
    let body = SelfResponse {
        config: SelfConfig {
            datacenter: &c.datacenter,
            primary_datacenter: &c.datacenter,
            node_name: &c.node,
            node_id: &c.node_id,
            revision: "dev-agent",
            server: true,
            version: CONSUL_VERSION,
            build_date: BUILD_DATE,
        },
        debug_config: BTreeMap::new(),
        coord: None,
        member: member(ctx),
        stats: stats(ctx),
        meta: BTreeMap::new(),
        xds: Xds {
            supported_proxies: BTreeMap::from([("envoy", ENVOY_VERSIONS)]),
            port: GRPC_PORT,
            ports: GrpcPorts {
                plaintext: GRPC_PORT,
                tls: -1,
            },
        },
    };
    Ok(ctx.json(&body))
}

/// `?wan=<anything non-empty>` lists the WAN pool (a bare `?wan` is the LAN, as in Consul, which
/// reads the parameter's value here, not its presence). Members the token may not `node:read`
/// are left out rather than refused; an unknown token is refused.
pub fn members(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    let wan = !ctx.query.get("wan").is_empty();
    let segment = ctx.query.get("segment");
    if wan && !segment.is_empty() && segment != "_all" {
        return Err(ApiError::bad_request(
            "Cannot provide a segment with wan=true",
        ));
    }
    ctx.resolve_token()?;
    if !ctx.is_privileged() {
        return Ok(ctx.json::<[Member]>(&[]));
    }
    let me = if wan { wan_member(ctx) } else { member(ctx) };
    Ok(ctx.json(&[me]))
}

/// Status endpoints carry no ACL check in Consul; only `?dc=` matters.
pub fn status_leader(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.check_dc()?;
    Ok(ctx.json(&leader_addr(ctx)))
}

pub fn status_peers(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.check_dc()?;
    Ok(ctx.json(&[leader_addr(ctx)]))
}

/// A check as `/v1/agent/checks` shows it (`structs.HealthCheck`, CE field order).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthCheck<'a> {
    node: &'a str,
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'a str,
    status: &'a str,
    notes: &'a str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: [&'a str; 0],
    #[serde(rename = "Type")]
    kind: &'a str,
    interval: &'a str,
    timeout: &'a str,
    exposed_port: u16,
    definition: BTreeMap<String, Value>,
    create_index: u64,
    modify_index: u64,
}

fn health_check<'a>(node: &'a str, c: &'a Check) -> HealthCheck<'a> {
    HealthCheck {
        node,
        check_id: &c.id,
        name: &c.name,
        status: &c.status,
        notes: &c.notes,
        output: &c.output,
        service_id: &c.service_id,
        service_name: "",
        service_tags: [],
        kind: if c.ttl.is_some() { "ttl" } else { "" },
        interval: "",
        timeout: "",
        exposed_port: 0,
        definition: BTreeMap::new(),
        create_index: c.create_index,
        modify_index: c.modify_index,
    }
}

/// The agent's own checks. `serfHealth` is maintained by the servers in the catalog, not by the
/// agent, so (as in Consul) it is not listed here.
pub fn checks(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.reject_enterprise_meta()?;
    ctx.authorize("node", "read", &ctx.agent.config.node)?;
    let node = ctx.agent.config.node.clone();
    let store = ctx.agent.store();
    let map: BTreeMap<&str, HealthCheck<'_>> = store
        .checks()
        .filter(|c| c.ttl.is_some())
        .map(|c| (c.id.as_str(), health_check(&node, c)))
        .collect();
    Ok(ctx.json(&map))
}

/// Reads the JSON object of a request body; Go's decoder reads only the first value.
async fn body_object(ctx: &mut Ctx) -> Result<serde_json::Map<String, Value>, ApiError> {
    let raw = ctx.read_body(usize::MAX).await?;
    let decoded = serde_json::Deserializer::from_slice(&raw)
        .into_iter::<Value>()
        .next();
    match decoded {
        None => Err(ApiError::bad_request("Request decode failed: EOF")),
        Some(Err(e)) => Err(ApiError::bad_request(format!("Request decode failed: {e}"))),
        Some(Ok(Value::Object(o))) => Ok(o),
        Some(Ok(Value::Null)) => Ok(serde_json::Map::new()),
        Some(Ok(_)) => Err(ApiError::bad_request(
            "Request decode failed: json: cannot unmarshal into a check definition",
        )),
    }
}

/// Field lookup the way Go matches JSON names: exact, then case-insensitive; snake_case aliases
/// are accepted because Consul translates them for check definitions.
fn field<'a>(o: &'a serde_json::Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    for n in names {
        if let Some(v) = o.get(*n) {
            return Some(v);
        }
    }
    o.iter()
        .find(|(k, _)| names.iter().any(|n| n.eq_ignore_ascii_case(k)))
        .map(|(_, v)| v)
}

fn str_field(o: &serde_json::Map<String, Value>, names: &[&str]) -> Result<String, ApiError> {
    match field(o, names) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::bad_request(format!(
            "Request decode failed: json: cannot unmarshal into field {} of type string",
            names[0]
        ))),
    }
}

/// A duration field of a check definition: a Go duration string or a number of nanoseconds.
fn duration_field(
    o: &serde_json::Map<String, Value>,
    names: &[&str],
) -> Result<GoDuration, ApiError> {
    match field(o, names) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) if s.is_empty() => Ok(0),
        Some(Value::String(s)) => gofmt::parse_duration(s)
            .map_err(|e| ApiError::bad_request(format!("Request decode failed: {e}"))),
        Some(Value::Number(n)) => Ok(n.as_f64().map_or(0, |f| f as i64)),
        Some(_) => Err(ApiError::bad_request(format!(
            "Request decode failed: invalid duration for {}",
            names[0]
        ))),
    }
}

fn valid_status(s: &str) -> bool {
    matches!(s, PASSING | WARNING | CRITICAL)
}

/// In Consul's order (agent/agent_endpoint.go `AgentRegisterCheck`): the namespace, the body's
/// decoding (durations included), the name, the status, then the token is resolved (an unknown
/// one is 403 before anything about the check's type), the type, the service, and last the
/// permission to write the node.
pub async fn check_register(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.reject_enterprise_meta()?;
    let o = body_object(ctx).await?;
    let name = str_field(&o, &["Name"])?;
    let status = str_field(&o, &["Status"])?;
    let notes = str_field(&o, &["Notes"])?;
    let id = str_field(&o, &["ID", "CheckID", "check_id"])?;
    let service_id = str_field(&o, &["ServiceID", "service_id"])?;
    let ttl = duration_field(&o, &["TTL"])?;
    let interval = duration_field(&o, &["Interval"])?;
    if name.is_empty() {
        return Err(ApiError::bad_request("Missing check name"));
    }
    if !status.is_empty() && !valid_status(&status) {
        return Err(ApiError::bad_request("Bad check status"));
    }
    ctx.resolve_token()?;
    let interval_kind = ["HTTP", "TCP", "UDP", "GRPC", "H2PING", "OSService"]
        .iter()
        .any(|f| !str_field(&o, &[f]).unwrap_or_default().is_empty())
        || field(&o, &["Args", "ScriptArgs", "script_args"])
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
    let invalid = |why: &str| ApiError::bad_request(format!("Invalid check: {why}"));
    if interval > 0 && ttl > 0 {
        return Err(invalid("Interval and TTL cannot both be specified"));
    }
    if interval_kind && interval <= 0 {
        return Err(invalid(
            "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ));
    }
    if !interval_kind && ttl <= 0 {
        return Err(invalid("TTL must be > 0 for TTL checks"));
    }
    if interval_kind {
        // The dev agent runs no probes; a check it would never update would be a lie.
        return Err(invalid("the dev agent supports only TTL checks"));
    }
    if !service_id.is_empty() {
        return Err(ApiError::not_found(format!(
            "ServiceID {} does not exist",
            quote(&service_id)
        )));
    }
    ctx.authorize("node", "write", &ctx.agent.config.node)?;
    let def = NewCheck {
        id: if id.is_empty() { name.clone() } else { id },
        name,
        status: if status.is_empty() {
            CRITICAL.into()
        } else {
            status
        },
        notes,
        service_id,
        ttl,
    };
    ctx.agent.store().check_register(def, Instant::now());
    Ok(empty_ok())
}

pub fn check_deregister(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    ctx.reject_enterprise_meta()?;
    let id = ctx.rest.clone();
    ctx.authorize("node", "write", &ctx.agent.config.node)?;
    if !ctx.agent.store().check_deregister(&id, Instant::now()) {
        return Err(ApiError::not_found(format!(
            "Unknown check ID {}. Ensure that the check ID is passed, not the check name.",
            quote(&id)
        )));
    }
    Ok(empty_ok())
}

/// pass / warn / fail: `?note=` becomes the output.
pub fn check_ttl_update(ctx: &mut Ctx, status: &str) -> Result<Resp, ApiError> {
    ctx.reject_enterprise_meta()?;
    ctx.authorize("node", "write", &ctx.agent.config.node)?;
    let note = ctx.query.get("note").to_string();
    ctx.agent
        .store()
        .check_update(&ctx.rest, status, &note, Instant::now())
        .map_err(ApiError::from_error)?;
    Ok(empty_ok())
}

pub async fn check_update(ctx: &mut Ctx) -> Result<Resp, ApiError> {
    let o = body_object(ctx).await?;
    let status = str_field(&o, &["Status"])?;
    if !valid_status(&status) {
        return Err(ApiError::bad_request(format!(
            "Invalid check status: '{status}'"
        )));
    }
    let output = str_field(&o, &["Output"])?;
    ctx.reject_enterprise_meta()?;
    ctx.authorize("node", "write", &ctx.agent.config.node)?;
    ctx.agent
        .store()
        .check_update(&ctx.rest, &status, &output, Instant::now())
        .map_err(ApiError::from_error)?;
    Ok(empty_ok())
}
