//! `consul-leader status`: who holds a lock key, since when, with which fencing token, and whether
//! the last holder released cleanly. Reads keys held by `consul lock` and Go's `api.Lock` too, and
//! says what it can about them. Exit 0 when held, 1 when free, 3 when the key is not a lock (a
//! `consul lock -n` semaphore, or plain data), 125 on error.
//!
//! For a semaphore's prefix (`run --limit N`, `consul lock -n N`: the key itself does not exist,
//! `KEY/.lock` is the coordination key): the limit, each holder and the free slots; exit 0 while
//! any slot is held, 1 when none is.
//!
//! On etcd (`--etcd-endpoints`), the lock's queue: its holder (the lowest create revision under
//! `NAME/`), the waiters, and the marker's record of the last consul-leader holder; keys of
//! `etcdctl lock` are listed too. Exit 0 when held, 1 when free.

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::cli::StatusArgs;
use crate::config::{ConsulConfig, Engine, EtcdConfig, validate_etcd_name, validate_key};
use crate::consul::{Client, ReadOpts};
use crate::election::HolderValue;
use crate::exit;
use crate::wire::{KvEntry, LOCK_FLAG_VALUE, SEMAPHORE_FLAG_VALUE};

/// What `status --json` prints.
#[derive(Debug, Serialize, PartialEq)]
struct Report {
    key: String,
    /// `held`, `free`, `absent` (no such key), `semaphore` or `data` (not a lock).
    state: &'static str,
    held: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    holder: Option<String>,
    /// The holder's `--id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    /// When the holder acquired the lock (RFC 3339), when it says so in the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    /// The key's ModifyIndex: while held by consul-leader, the index of the holder's acquire,
    /// which its child got as `CONSUL_LEADER_FENCING_TOKEN`.
    fencing_token: u64,
    /// For a free key: whether the last holder released cleanly (`None`: unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    released_clean: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    released_at: Option<String>,
    /// For a key freed by a fault: the id of the holder that lost it, which contenders with a
    /// `--priority-window` leave the key to for that window after they see it free.
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<String>,
    /// The latest moment at which contenders that wait now can still be leaving the key to
    /// `priority`: now plus the holder's recorded `--priority-window` (RFC 3339, UTC). Each
    /// counts its window from when it saw the key free, which was no later than now.
    #[serde(skip_serializing_if = "Option::is_none")]
    priority_until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority_window_ms: Option<u64>,
    /// Who wrote the key: `consul-leader`, `consul lock / api.Lock`, or `other`.
    written_by: &'static str,
    flags: u64,
    /// A semaphore's coordination key (`consul lock -n N`): its limit and the sessions holding it.
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    holders: Option<Vec<String>>,
}

/// Exit code when the key is not a lock.
const NOT_A_LOCK: u8 = 3;

pub fn main(args: StatusArgs) -> ExitCode {
    let consul = match Engine::from_args(&args.consul, &args.etcd, &args.given) {
        Ok(Engine::Consul(c)) => validate_key(&args.key).map(|_| c),
        Ok(Engine::Etcd(e)) => {
            return match validate_etcd_name(&args.key) {
                Ok(name) => etcd_main(e, &name, args.json),
                Err(e) => {
                    eprintln!("consul-leader: {e}");
                    ExitCode::from(exit::USAGE)
                }
            };
        }
        Err(e) => Err(e),
    };
    let consul = match consul {
        Ok(c) => c,
        Err(e) => {
            eprintln!("consul-leader: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("consul-leader: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let r = match runtime.block_on(report(consul.clone(), &args.key)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("consul-leader: {e:#}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    // A key that does not exist may be a semaphore's prefix (`run --limit N`,
    // `consul lock -n N`), which has a view of its own.
    if r.state == "absent" {
        match runtime.block_on(semaphore_report(consul, &args.key)) {
            Ok(Some(s)) => {
                if args.json {
                    println!("{}", serde_json::to_string(&s).unwrap_or_default());
                } else {
                    print!("{}", render_semaphore(&s));
                }
                return ExitCode::from(if s.held { 0 } else { 1 });
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("consul-leader: {e:#}");
                return ExitCode::from(exit::INTERNAL);
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        print!("{}", render(&r));
    }
    ExitCode::from(match r.state {
        "held" => 0,
        "semaphore" | "data" => NOT_A_LOCK,
        _ => 1,
    })
}

async fn report(consul: ConsulConfig, key: &str) -> anyhow::Result<Report> {
    let client = Client::new(consul)?;
    let (entry, _) = client.kv_get(key, ReadOpts::default()).await?;
    let mut r = describe(key, entry.as_ref());
    if let Some(session) = r.session.clone() {
        if let Some(info) = client.session_info(&session).await? {
            r.node = Some(info.node);
            r.session_name = Some(info.name).filter(|n| !n.is_empty());
        }
    }
    Ok(r)
}

/// Everything the key itself tells.
fn describe(key: &str, entry: Option<&KvEntry>) -> Report {
    let mut r = Report {
        key: key.to_string(),
        state: "absent",
        held: false,
        holder: None,
        id: None,
        host: None,
        pid: None,
        session: None,
        session_name: None,
        node: None,
        since: None,
        fencing_token: 0,
        released_clean: None,
        released_at: None,
        priority: None,
        priority_until: None,
        priority_window_ms: None,
        written_by: "other",
        flags: 0,
        limit: None,
        holders: None,
    };
    let Some(e) = entry else { return r };
    r.flags = e.flags;
    r.fencing_token = e.modify_index;
    if e.flags == SEMAPHORE_FLAG_VALUE {
        r.state = "semaphore";
        r.written_by = "consul lock -n / api.Semaphore";
        r.session = e.session.clone();
        // The coordination key (`<prefix>/.lock`) lists the limit and the holders' sessions; a
        // contender's own key (`<prefix>/<session>`) only carries its session.
        #[derive(serde::Deserialize)]
        struct Coordination {
            #[serde(rename = "Limit")]
            limit: u64,
            #[serde(rename = "Holders", default)]
            holders: std::collections::BTreeMap<String, bool>,
        }
        if let Ok(c) = serde_json::from_slice::<Coordination>(&e.value_bytes()) {
            r.limit = Some(c.limit);
            r.holders = Some(
                c.holders
                    .into_iter()
                    .filter(|(_, v)| *v)
                    .map(|(k, _)| k)
                    .collect(),
            );
        }
        return r;
    }
    if e.flags != LOCK_FLAG_VALUE {
        r.state = "data";
        return r;
    }
    let value = HolderValue::parse(&e.value_bytes());
    r.written_by = if value.is_some() {
        "consul-leader"
    } else {
        "consul lock / api.Lock"
    };
    r.session = e.session.clone();
    r.held = e.session.is_some();
    r.state = if r.held { "held" } else { "free" };
    match value {
        // The value describes the holder only while its session is the one holding the key.
        Some(v) if r.held && e.session.as_deref() == Some(v.session.as_str()) => {
            r.holder = Some(v.holder);
            r.id = v.id;
            r.host = Some(v.host);
            r.pid = Some(v.pid);
            r.since = Some(v.acquired_at);
        }
        Some(v) if !r.held => {
            let clean = v.is_clean();
            r.holder = Some(v.holder);
            r.host = Some(v.host);
            r.pid = Some(v.pid);
            r.since = Some(v.acquired_at);
            r.released_clean = Some(clean);
            r.released_at = v.released_at;
            if !clean {
                r.priority = v.id.clone();
                if r.priority.is_some() {
                    r.priority_window_ms = v.priority_window_ms;
                    r.priority_until = v.priority_window_ms.map(|ms| {
                        let until = std::time::SystemTime::now() + Duration::from_millis(ms);
                        humantime::format_rfc3339_seconds(until).to_string()
                    });
                }
            }
            r.id = v.id;
        }
        _ => {}
    }
    r
}

fn render(r: &Report) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &str| out.push_str(&format!("{label:<15} {value}\n"));
    match r.state {
        "absent" => {
            line("key", &r.key);
            line("state", "free (the key does not exist)");
            return out;
        }
        "semaphore" => {
            line("key", &r.key);
            line(
                "state",
                "not a lock: a Consul semaphore (consul lock -n, api.Semaphore)",
            );
            if let Some(limit) = r.limit {
                line("limit", &limit.to_string());
            }
            match (&r.holders, &r.session) {
                (Some(h), _) if h.is_empty() => line("holders", "none"),
                (Some(h), _) => line("holders", &h.join(", ")),
                (None, Some(s)) => line("contender", &format!("session {s}")),
                (None, None) => {}
            }
            if r.limit.is_none() {
                line(
                    "hint",
                    "the semaphore's limit and holders are in the key <prefix>/.lock",
                );
            }
            if let Some(prefix) = r.key.strip_suffix("/.lock") {
                line(
                    "hint",
                    &format!(
                        "consul-leader status --key {prefix} shows each holder and the free slots"
                    ),
                );
            }
            return out;
        }
        "data" => {
            line("key", &r.key);
            line(
                "state",
                &format!(
                    "not a lock: the key holds data (flags {}), not a lock of consul-leader, consul lock or api.Lock",
                    r.flags
                ),
            );
            return out;
        }
        _ => {}
    }
    line("key", &r.key);
    line("state", if r.held { "held" } else { "free" });
    if r.held {
        if let Some(h) = &r.holder {
            line("holder", h);
        }
        if let Some(id) = &r.id {
            line("id", id);
        }
        if let Some(s) = &r.session {
            line("session", s);
        }
        if let Some(n) = &r.session_name {
            line("session name", n);
        }
        if let Some(n) = &r.node {
            line("node", n);
        }
        line(
            "since",
            r.since
                .as_deref()
                .unwrap_or("unknown (not written by consul-leader)"),
        );
    } else {
        if let Some(h) = &r.holder {
            line("last holder", h);
        }
        if let Some(id) = &r.id {
            line("id", id);
        }
        let released = match (r.released_clean, &r.released_at) {
            (Some(true), Some(at)) => format!("cleanly, at {at}"),
            (Some(true), None) => "cleanly".to_string(),
            (Some(false), _) => {
                "not cleanly (session ended; the next leader waits its silence)".into()
            }
            (None, _) => "unknown (not written by consul-leader)".into(),
        };
        line("released", &released);
        if let Some(id) = &r.priority {
            let text = match (&r.priority_until, r.priority_window_ms) {
                (Some(until), Some(ms)) => format!(
                    "{id} until {until} at the latest (it lost the lock to a fault; contenders \
                     with --priority-window, {} on {id}, leave it the key that long after each \
                     saw it free)",
                    humantime::format_duration(Duration::from_millis(ms))
                ),
                _ => format!(
                    "{id} (it lost the lock to a fault; contenders with --priority-window leave it \
                     the key that long after they see it free)"
                ),
            };
            line("priority", &text);
        }
    }
    line("fencing token", &r.fencing_token.to_string());
    line("written by", r.written_by);
    out
}

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

/// One key of an etcd lock's queue, for `status`.
#[derive(Debug, Serialize, PartialEq)]
struct QueueEntry {
    key: String,
    /// The lease, in hex as etcd's tools print it.
    lease: String,
    /// The key's create revision: for the holder, its fencing token.
    create_revision: i64,
    /// `consul-leader`, or `etcdctl lock / other` for a key with a value that is not ours.
    written_by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    holder: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    /// When a consul-leader contender queued, or (the holder) won.
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
}

/// The marker's record of the last consul-leader holder.
#[derive(Debug, Serialize, PartialEq)]
struct LastRecord {
    key: String,
    create_revision: i64,
    holder: String,
    /// False while that holder holds the lock, or after it ended without the clean mark.
    released_clean: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    released_at: Option<String>,
}

/// What `status --json` prints for an etcd lock.
#[derive(Debug, Serialize, PartialEq)]
struct EtcdReport {
    engine: &'static str,
    key: String,
    /// `held` or `free`.
    state: &'static str,
    held: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<QueueEntry>,
    /// The holder's key's create revision (its command's CONSUL_LEADER_FENCING_TOKEN).
    #[serde(skip_serializing_if = "Option::is_none")]
    fencing_token: Option<i64>,
    /// Seconds left on the holder's lease, as etcd counts them.
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_ttl_left: Option<i64>,
    waiters: Vec<QueueEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_record: Option<LastRecord>,
}

fn etcd_main(etcd: EtcdConfig, name: &str, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("consul-leader: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    match runtime.block_on(etcd_report(&etcd, name)) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print!("{}", render_etcd(&r));
            }
            ExitCode::from(if r.held { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!(
                "consul-leader: cannot read the lock {name} from etcd at {}: {e}",
                etcd.endpoints.join(",")
            );
            ExitCode::from(exit::INTERNAL)
        }
    }
}

async fn etcd_report(etcd: &EtcdConfig, name: &str) -> Result<EtcdReport, crate::etcd::EtcdError> {
    let client = crate::etcd::connect(etcd, &etcd.endpoints).await?;
    crate::etcd::on_any_endpoint(etcd, &client, |c| read_etcd(c, name)).await
}

/// The queue and the marker, read through `client`.
async fn read_etcd(
    client: etcd_client::Client,
    name: &str,
) -> Result<EtcdReport, crate::etcd::EtcdError> {
    use crate::etcd::{REQUEST_TIMEOUT, bounded, marker_key, prefix};
    use etcd_client::{GetOptions, SortOrder, SortTarget};
    let queue = bounded(
        REQUEST_TIMEOUT,
        client.clone().get(
            prefix(name),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend),
            ),
        ),
    )
    .await?;
    let marker = bounded(REQUEST_TIMEOUT, client.clone().get(marker_key(name), None)).await?;
    let entries: Vec<crate::etcd::Entry> =
        queue.kvs().iter().map(crate::etcd::Entry::from).collect();
    let record = marker
        .kvs()
        .first()
        .and_then(|kv| crate::etcd::Marker::parse(kv.value()).ok());
    let mut r = describe_etcd(name, &entries, record.as_ref());
    if let Some(owner) = entries.first() {
        if let Ok(ttl) = bounded(
            REQUEST_TIMEOUT,
            client.clone().lease_time_to_live(owner.lease, None),
        )
        .await
        {
            r.lease_ttl_left = Some(ttl.ttl());
        }
    }
    Ok(r)
}

fn queue_entry(e: &crate::etcd::Entry) -> QueueEntry {
    let v = e.holder();
    QueueEntry {
        key: e.key.clone(),
        lease: crate::etcd::lease_hex(e.lease),
        create_revision: e.create_revision,
        written_by: if v.is_some() {
            "consul-leader"
        } else {
            "etcdctl lock / other"
        },
        holder: v.as_ref().map(|v| v.holder.clone()),
        id: v.as_ref().and_then(|v| v.id.clone()),
        host: v.as_ref().map(|v| v.host.clone()),
        pid: v.as_ref().map(|v| v.pid),
        since: v.as_ref().map(|v| v.acquired_at.clone()),
    }
}

/// Everything the queue and the marker tell.
fn describe_etcd(
    name: &str,
    entries: &[crate::etcd::Entry],
    record: Option<&crate::etcd::Marker>,
) -> EtcdReport {
    let owner = entries.first().map(queue_entry);
    EtcdReport {
        engine: "etcd",
        key: name.to_string(),
        state: if owner.is_some() { "held" } else { "free" },
        held: owner.is_some(),
        fencing_token: owner.as_ref().map(|o| o.create_revision),
        owner,
        lease_ttl_left: None,
        waiters: entries.iter().skip(1).map(queue_entry).collect(),
        last_record: record.map(|m| LastRecord {
            key: m.lock_key.clone(),
            create_revision: m.create_revision,
            holder: m.holder.holder.clone(),
            released_clean: m.holder.is_clean(),
            released_at: m.holder.released_at.clone(),
        }),
    }
}

fn render_etcd(r: &EtcdReport) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &str| out.push_str(&format!("{label:<15} {value}\n"));
    line("lock", &r.key);
    line("engine", "etcd");
    line("state", r.state);
    if let Some(o) = &r.owner {
        line("holder", o.holder.as_deref().unwrap_or(&o.key));
        if let Some(id) = &o.id {
            line("id", id);
        }
        line("key", &o.key);
        line("lease", &o.lease);
        if let Some(ttl) = r.lease_ttl_left {
            line("lease ttl left", &format!("{ttl}s"));
        }
        line(
            "since",
            o.since
                .as_deref()
                .unwrap_or("unknown (not written by consul-leader)"),
        );
        line("fencing token", &o.create_revision.to_string());
        line("written by", o.written_by);
    }
    line("waiters", &r.waiters.len().to_string());
    for w in &r.waiters {
        line(
            "  waiting",
            &format!(
                "{} (lease {}, create revision {}, {})",
                w.holder.as_deref().unwrap_or(&w.key),
                w.lease,
                w.create_revision,
                w.written_by
            ),
        );
    }
    if let Some(l) = &r.last_record {
        let how = match (
            r.owner.as_ref().map(|o| &o.key) == Some(&l.key),
            l.released_clean,
        ) {
            (true, _) => "holds the lock now".to_string(),
            (false, true) => format!(
                "released cleanly{}",
                l.released_at
                    .as_deref()
                    .map(|t| format!(", at {t}"))
                    .unwrap_or_default()
            ),
            (false, false) => {
                "ended without a clean release (the next leader waits its silence)".into()
            }
        };
        line("last record", &format!("{} ({}): {how}", l.holder, l.key));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Semaphores
// ---------------------------------------------------------------------------------------------

/// What `status --json` prints for a semaphore prefix.
#[derive(Debug, Serialize, PartialEq)]
struct SemaphoreReport {
    key: String,
    /// Always `semaphore`.
    kind: &'static str,
    /// `full` (no free slot), `held` (some holders, free slots left) or `free` (no holder).
    state: &'static str,
    held: bool,
    /// The limit `.lock` says (`None` for an empty `.lock`, which a contender fills in).
    limit: Option<i64>,
    holders: Vec<SlotHolder>,
    free: u64,
    /// Of the free slots, how many have an unknown past (a contender that takes one waits
    /// max(silence, TTL) first).
    free_unknown: u64,
    /// Contenders with a key under the prefix that are not holders.
    waiting: usize,
    /// `.lock`'s ModifyIndex.
    modify_index: u64,
}

/// One holder of a semaphore slot.
#[derive(Debug, Serialize, PartialEq)]
struct SlotHolder {
    session: String,
    /// False once its contender key is gone: its session ended, and the next contender takes its
    /// slot after the wait it owes.
    alive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    holder: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    /// The ModifyIndex of the check-and-set that admitted it, which its child got as
    /// `CONSUL_LEADER_FENCING_TOKEN` (unknown for holders not admitted by consul-leader).
    #[serde(skip_serializing_if = "Option::is_none")]
    fencing_token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    /// `consul-leader`, or `consul lock -n / api.Semaphore`.
    written_by: &'static str,
}

/// The view of `key` as a semaphore prefix, when `key/.lock` is a semaphore's coordination key;
/// `None` otherwise.
async fn semaphore_report(
    consul: ConsulConfig,
    key: &str,
) -> anyhow::Result<Option<SemaphoreReport>> {
    use crate::lock::semaphore;
    let prefix = key;
    let client = Client::new(consul)?;
    let lock = semaphore::lock_key(prefix);
    let entry = match client.kv_get(&lock, ReadOpts::default()).await {
        Ok((entry, _)) => entry,
        // A token that may read the key but not below it: the key is what it asks about.
        Err(crate::consul::ConsulError::Denied { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if entry
        .as_ref()
        .is_none_or(|e| e.flags != SEMAPHORE_FLAG_VALUE)
    {
        return Ok(None);
    }
    let (entries, index) = client
        .kv_list(&format!("{prefix}/"), ReadOpts::default())
        .await?;
    let obs = semaphore::observe(prefix, &entries, index.0);
    let mut r = describe_semaphore(prefix, &obs);
    for h in r.holders.iter_mut().filter(|h| h.alive) {
        if let Some(info) = client.session_info(&h.session).await? {
            h.node = Some(info.node);
        }
    }
    Ok(Some(r))
}

/// Everything a listing of the prefix tells.
fn describe_semaphore(prefix: &str, obs: &crate::lock::semaphore::Observed) -> SemaphoreReport {
    use crate::lock::semaphore::{LockKey, read_slots};
    let mut r = SemaphoreReport {
        key: prefix.to_string(),
        kind: "semaphore",
        state: "free",
        held: false,
        limit: None,
        holders: Vec::new(),
        free: 0,
        free_unknown: 0,
        waiting: 0,
        modify_index: 0,
    };
    let slots = match &obs.lock {
        LockKey::Semaphore {
            modify_index,
            value,
        } => {
            r.modify_index = *modify_index;
            r.limit = Some(value.limit);
            read_slots(obs, u64::try_from(value.limit).unwrap_or(0)).ok()
        }
        LockKey::Fresh { modify_index } => {
            r.modify_index = *modify_index;
            None
        }
        LockKey::Foreign { .. } | LockKey::Garbled { .. } => None,
    };
    let Some(slots) = slots else {
        r.waiting = obs.alive.len();
        return r;
    };
    let admitted = slots.value.ext.as_ref().and_then(|e| e.admitted.as_deref());
    for session in slots.value.holders.keys() {
        let record = slots.record(session);
        let fencing_token = match record {
            _ if admitted == Some(session.as_str()) => Some(slots.cas),
            Some(rec) => rec.token,
            None => None,
        };
        let who = record.map(|rec| &rec.holder);
        r.holders.push(SlotHolder {
            session: session.clone(),
            alive: obs.alive.contains(session),
            holder: who.map(|h| h.holder.clone()),
            host: who.map(|h| h.host.clone()),
            pid: who.map(|h| h.pid),
            since: who.map(|h| h.acquired_at.clone()),
            fencing_token,
            node: None,
            written_by: if record.is_some() {
                "consul-leader"
            } else {
                "consul lock -n / api.Semaphore"
            },
        });
    }
    r.free = slots.free();
    r.free_unknown = slots.unknown;
    r.held = !r.holders.is_empty();
    r.state = match (r.held, r.free) {
        (false, _) => "free",
        (true, 0) => "full",
        (true, _) => "held",
    };
    r.waiting = obs
        .alive
        .iter()
        .filter(|s| !slots.value.holders.contains_key(*s))
        .count();
    r
}

fn render_semaphore(r: &SemaphoreReport) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &str| out.push_str(&format!("{label:<15} {value}\n"));
    line("key", &r.key);
    let Some(limit) = r.limit else {
        line(
            "kind",
            "semaphore (its .lock is empty: the first contender sets the limit)",
        );
        line("state", "free");
        return out;
    };
    line(
        "kind",
        &format!("semaphore, limit {limit} (the layout of consul lock -n)"),
    );
    let state = match r.state {
        "full" => format!("full: {} of {limit} slots held", r.holders.len()),
        "held" => format!("held: {} of {limit} slots held", r.holders.len()),
        _ => "free: no holder".to_string(),
    };
    line("state", &state);
    for h in &r.holders {
        let mut desc = match &h.holder {
            Some(who) => format!("{who} (session {})", h.session),
            None => format!("session {} ({})", h.session, h.written_by),
        };
        if let Some(since) = &h.since {
            desc.push_str(&format!(", since {since}"));
        }
        if let Some(t) = h.fencing_token {
            desc.push_str(&format!(", fencing token {t}"));
        }
        if let Some(n) = &h.node {
            desc.push_str(&format!(", node {n}"));
        }
        if !h.alive {
            desc.push_str(
                ", ended without releasing (its slot goes to the next contender after its wait)",
            );
        }
        line("holder", &desc);
    }
    let unknown = if r.free_unknown > 0 {
        format!(
            " ({} of them of unknown past: the next holder waits max(silence, TTL) first)",
            r.free_unknown
        )
    } else {
        String::new()
    };
    line("free slots", &format!("{}{unknown}", r.free));
    line("waiting", &r.waiting.to_string());
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::consul::SessionId;
    use crate::election::Timing;

    const TIMING: Timing = Timing {
        ttl: Duration::from_secs(15),
        lock_delay: Duration::from_secs(15),
        silence: Duration::from_secs(15),
    };

    fn entry(session: Option<&str>, lock_index: u64, flags: u64, value: &[u8]) -> KvEntry {
        KvEntry {
            lock_index,
            key: "k".into(),
            flags,
            value: KvEntry::encode_value(value),
            session: session.map(Into::into),
            create_index: 1,
            modify_index: 2,
        }
    }

    #[test]
    fn held_by_consul_leader() {
        let v = HolderValue::new(
            "web1",
            "web1",
            &SessionId("s1".into()),
            &TIMING,
            Duration::ZERO,
        );
        let r = describe(
            "k",
            Some(&entry(Some("s1"), 4, LOCK_FLAG_VALUE, &v.to_bytes())),
        );
        assert_eq!(r.state, "held");
        assert!(r.held);
        assert_eq!(r.host.as_deref(), Some("web1"));
        // The ModifyIndex of the acquire, not the LockIndex.
        assert_eq!(r.fencing_token, 2);
        assert_eq!(r.written_by, "consul-leader");
        assert!(render(&r).contains("holder"));
    }

    #[test]
    fn free_after_clean_release() {
        let v = HolderValue::new(
            "web1",
            "web1",
            &SessionId("s1".into()),
            &TIMING,
            Duration::ZERO,
        )
        .released_clean();
        let r = describe("k", Some(&entry(None, 4, LOCK_FLAG_VALUE, &v.to_bytes())));
        assert_eq!(r.state, "free");
        assert_eq!(r.released_clean, Some(true));
        assert!(render(&r).contains("cleanly, at"));
    }

    #[test]
    fn consul_lock_keys_are_understood() {
        let r = describe("k", Some(&entry(Some("s9"), 2, LOCK_FLAG_VALUE, b"")));
        assert!(r.held);
        assert_eq!(r.written_by, "consul lock / api.Lock");
        assert_eq!(r.holder, None);
        assert!(render(&r).contains("unknown (not written by consul-leader)"));
    }

    #[test]
    fn other_keys_are_named_for_what_they_are() {
        let r = describe("k", Some(&entry(None, 0, 0, b"data")));
        assert_eq!(r.state, "data");
        assert!(!r.held);
        assert!(render(&r).contains("not a lock: the key holds data"));
        let r = describe("k", Some(&entry(None, 0, SEMAPHORE_FLAG_VALUE, b"")));
        assert!(render(&r).contains("semaphore"));
        assert_eq!(describe("k", None).state, "absent");
    }

    fn semaphore_listing(lock: &crate::lock::semaphore::LockValue, live: &[&str]) -> Vec<KvEntry> {
        let mut entries = vec![entry(None, 0, SEMAPHORE_FLAG_VALUE, &lock.to_bytes())];
        entries[0].key = "p/.lock".into();
        entries[0].modify_index = 20;
        for s in live {
            let mut e = entry(Some(s), 1, SEMAPHORE_FLAG_VALUE, b"");
            e.key = format!("p/{s}");
            entries.push(e);
        }
        entries
    }

    #[test]
    fn a_semaphore_shows_its_limit_holders_and_free_slots() {
        use crate::lock::semaphore::{self, Choice, SlotRecord};
        let obs = semaphore::observe("p", &[], 3);
        let slots = semaphore::read_slots(&obs, 3).unwrap();
        let rec = |s: &str| SlotRecord {
            holder: HolderValue::new(
                "web1",
                "web1",
                &SessionId(s.into()),
                &TIMING,
                Duration::ZERO,
            ),
            token: None,
        };
        let v =
            semaphore::admitted_value(&slots, &SessionId("s1".into()), &Choice::Unknown, rec("s1"));
        // A Go contender joins too (it keeps no record of itself).
        let mut v2 = v.clone();
        v2.holders.insert("g1".into(), true);
        let r = describe_semaphore(
            "p",
            &semaphore::observe("p", &semaphore_listing(&v2, &["s1", "g1", "w1"]), 21),
        );
        assert_eq!(
            (r.kind, r.state, r.held, r.limit),
            ("semaphore", "held", true, Some(3))
        );
        assert_eq!((r.free, r.waiting), (1, 1));
        let s1 = r.holders.iter().find(|h| h.session == "s1").unwrap();
        assert_eq!(s1.host.as_deref(), Some("web1"));
        // .lock is still the version that admitted s1: its ModifyIndex is s1's token.
        assert_eq!(s1.fencing_token, Some(20));
        assert_eq!(s1.written_by, "consul-leader");
        let g1 = r.holders.iter().find(|h| h.session == "g1").unwrap();
        assert_eq!(
            (g1.fencing_token, g1.written_by),
            (None, "consul lock -n / api.Semaphore")
        );
        let t = render_semaphore(&r);
        assert!(
            t.contains("limit 3") && t.contains("fencing token 20"),
            "{t}"
        );
        // A holder whose key is gone is shown as ended.
        let r = describe_semaphore(
            "p",
            &semaphore::observe("p", &semaphore_listing(&v2, &["g1"]), 22),
        );
        assert!(!r.holders.iter().find(|h| h.session == "s1").unwrap().alive);
        assert!(render_semaphore(&r).contains("ended without releasing"));
    }

    #[test]
    fn a_semaphores_limit_and_holders_are_shown() {
        let value = br#"{"Limit":3,"Holders":{"s1":true,"s2":true}}"#;
        let r = describe(
            "p/.lock",
            Some(&entry(None, 0, SEMAPHORE_FLAG_VALUE, value)),
        );
        assert_eq!(r.state, "semaphore");
        assert_eq!(r.limit, Some(3));
        assert_eq!(
            r.holders.as_deref(),
            Some(&["s1".to_string(), "s2".to_string()][..])
        );
        let text = render(&r);
        assert!(
            text.contains("limit           3") && text.contains("s1, s2"),
            "{text}"
        );
    }

    fn etcd_entry(key: &str, rev: i64, value: &[u8]) -> crate::etcd::Entry {
        crate::etcd::Entry {
            key: key.into(),
            create_revision: rev,
            mod_revision: rev,
            lease: 0x1f,
            value: value.to_vec(),
        }
    }

    #[test]
    fn an_etcd_queue_names_its_holder_and_waiters() {
        let v = HolderValue::new(
            "web1",
            "web1",
            &SessionId("1f".into()),
            &TIMING,
            Duration::ZERO,
        );
        let entries = [
            etcd_entry("jobs/a/1f", 7, &v.to_bytes()),
            etcd_entry("jobs/a/2e", 9, b""),
        ];
        let record = crate::etcd::Marker::new("jobs/a/1f", 7, v.clone());
        let r = describe_etcd("jobs/a", &entries, Some(&record));
        assert!(r.held);
        assert_eq!(r.fencing_token, Some(7));
        assert_eq!(r.owner.as_ref().unwrap().holder, v.holder.clone().into());
        assert_eq!(r.waiters.len(), 1);
        assert_eq!(r.waiters[0].written_by, "etcdctl lock / other");
        let text = render_etcd(&r);
        assert!(text.contains("holds the lock now"), "{text}");
        // Free, after a clean release.
        let r = describe_etcd(
            "jobs/a",
            &[],
            Some(&crate::etcd::Marker::new(
                "jobs/a/1f",
                7,
                v.released_clean(),
            )),
        );
        assert!(!r.held);
        assert!(
            render_etcd(&r).contains("released cleanly"),
            "{}",
            render_etcd(&r)
        );
    }
}
