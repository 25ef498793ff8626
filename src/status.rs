//! `consul-leader status`: who holds a lock key, since when, with which fencing token, and whether
//! the last holder released cleanly. Reads keys held by `consul lock` and Go's `api.Lock` too, and
//! says what it can about them. Exit 0 when held, 1 when free, 3 when the key is not a lock (a
//! `consul lock -n` semaphore, or plain data), 125 on error.

use std::process::ExitCode;

use serde::Serialize;

use crate::cli::StatusArgs;
use crate::config::{ConsulConfig, validate_key};
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
    let consul = match validate_key(&args.key).and_then(|_| ConsulConfig::from_args(&args.consul)) {
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
    match runtime.block_on(report(consul, &args.key)) {
        Ok(r) => {
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
        Err(e) => {
            eprintln!("consul-leader: {e:#}");
            ExitCode::from(exit::INTERNAL)
        }
    }
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
            line(
                "priority",
                &format!(
                    "{id} (it lost the lock to a fault; contenders with --priority-window leave it the \
                     key that long after they see it free)"
                ),
            );
        }
    }
    line("fencing token", &r.fencing_token.to_string());
    line("written by", r.written_by);
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
}
