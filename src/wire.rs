//! JSON shapes that Consul's HTTP API puts on the wire, shared by the dev agent (which writes them)
//! and the client (which reads them). Field order follows Consul's Go structs, because `dev-agent`
//! output is compared with real Consul's by people reading it.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The flags value that marks a key as a lock of the Go `api.Lock` kind (and `consul lock`).
pub const LOCK_FLAG_VALUE: u64 = 0x2ddc_cbc0_58a5_0c18;
/// The flags value the Go `api.Semaphore` puts on its keys.
pub const SEMAPHORE_FLAG_VALUE: u64 = 0xe0f6_9a2b_aa41_4de0;

/// One KV entry (`DirEntry` in Consul).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvEntry {
    pub lock_index: u64,
    pub key: String,
    pub flags: u64,
    /// Standard base64 with padding; `null` when the stored value is empty.
    pub value: Option<String>,
    /// The holder's session ID; absent when the key is not locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl KvEntry {
    /// The stored bytes, decoded from base64 (empty when the value is null or not valid base64).
    pub fn value_bytes(&self) -> Vec<u8> {
        self.value
            .as_deref()
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .unwrap_or_default()
    }

    /// Encodes bytes the way Consul does: empty becomes `None` (JSON null).
    pub fn encode_value(bytes: &[u8]) -> Option<String> {
        (!bytes.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

/// A service check bound to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCheck {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Namespace", default)]
    pub namespace: String,
}

/// A session as `info`, `list`, `node` and `renew` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Node", default)]
    pub node: String,
    /// Nanoseconds.
    #[serde(rename = "LockDelay", default)]
    pub lock_delay: u64,
    #[serde(rename = "Behavior", default)]
    pub behavior: String,
    /// The TTL string exactly as the creator sent it; empty for none.
    #[serde(rename = "TTL", default)]
    pub ttl: String,
    #[serde(rename = "NodeChecks", default)]
    pub node_checks: Option<Vec<String>>,
    #[serde(rename = "ServiceChecks", default)]
    pub service_checks: Option<Vec<ServiceCheck>>,
    #[serde(rename = "Checks", default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
    #[serde(rename = "CreateIndex", default)]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex", default)]
    pub modify_index: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_entry_round_trips_in_consul_field_order() {
        let e = KvEntry {
            lock_index: 1,
            key: "a".into(),
            flags: LOCK_FLAG_VALUE,
            value: KvEntry::encode_value(b"hello"),
            session: None,
            create_index: 5,
            modify_index: 6,
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"LockIndex":1,"Key":"a","Flags":3304740253564472344,"Value":"aGVsbG8=","CreateIndex":5,"ModifyIndex":6}"#
        );
        let back: KvEntry = serde_json::from_str(&s).unwrap();
        assert_eq!(back.value_bytes(), b"hello");
        assert_eq!(KvEntry::encode_value(b""), None);
    }

    #[test]
    fn lock_flag_matches_go_api() {
        assert_eq!(LOCK_FLAG_VALUE, 3304740253564472344);
        assert_eq!(SEMAPHORE_FLAG_VALUE, 16210313421097356768);
    }
}
