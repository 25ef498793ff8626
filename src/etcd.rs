//! The etcd side of the wire, shared by the lock protocol (`lock::etcd`) and `status`: how to
//! connect (the `etcd-client` crate: endpoints, TLS, user), how an error is classified (retry,
//! give up, or "that lease or revision is gone"), and the lock's layout in the key space.
//!
//! # Layout
//!
//! The layout is that of etcd's own `concurrency.Mutex`, which `etcdctl lock NAME` uses, so that
//! each excludes the other:
//!
//! * every contender grants a lease and puts the key `NAME/<lease id in lower-case hex>`, bound
//!   to that lease; the contender whose key has the lowest create revision under the prefix
//!   `NAME/` holds the lock, and the others wait in create-revision order;
//! * `etcdctl lock` writes an empty value; consul-leader writes a [`HolderValue`] (JSON) into
//!   its own key, which `etcdctl` ignores;
//! * one key outside the prefix, [`marker_key`] (`NAME.consul-leader`), keeps the record of the
//!   last consul-leader holder after its own key is gone: whether it released clean, and the
//!   timing its successors owe it ([`Marker`], `lock::etcd`'s module docs). It must stay outside
//!   `NAME/`: a key under the prefix with a lower create revision would hold the lock for ever
//!   in the eyes of every `etcdctl lock`.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::config::EtcdConfig;
use crate::election::HolderValue;

/// The longest a single request may take before it counts as a transient failure. A balanced
/// gRPC channel whose endpoints all refuse connections waits instead of failing, so every call
/// is bounded.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings on a connection with open streams (a watch, a keep-alive) find a black-holed
/// connection, so that the channel reconnects. etcd refuses pings more often than every 5s
/// (`--grpc-keepalive-min-time`) and pings without a stream, so neither is done.
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// An error from etcd, classified by what a caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// Worth retrying: a request timed out, etcd has no leader right now.
    #[error("{0}")]
    Transient(String),
    /// Worth retrying, but no endpoint could be connected to at all (refused, unresolvable,
    /// TLS failed, or no answer): on a first attempt, most likely a wrong address.
    #[error("{0}")]
    Unreachable(String),
    /// The lease (or the thing asked about) does not exist any more.
    #[error("{0}")]
    NotFound(String),
    /// The revision asked for was compacted away.
    #[error("{0}")]
    Compacted(String),
    /// A definitive answer that no retry can change: permission denied, bad credentials, a
    /// request etcd refuses.
    #[error("{0}")]
    Fatal(String),
}

impl EtcdError {
    pub fn is_transient(&self) -> bool {
        matches!(self, EtcdError::Transient(_) | EtcdError::Unreachable(_))
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, EtcdError::Unreachable(_))
    }
}

impl From<etcd_client::Error> for EtcdError {
    fn from(e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        use tonic::Code;
        match &e {
            E::GRpcStatus(status) => {
                let text = format!("etcd answered: {}", status.message());
                match status.code() {
                    Code::NotFound => EtcdError::NotFound(text),
                    Code::OutOfRange => EtcdError::Compacted(text),
                    Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::Unimplemented
                    | Code::AlreadyExists => EtcdError::Fatal(text),
                    // tonic reports a failed connection as Unavailable, with the cause in the
                    // message ("tcp connect error", "dns error", a TLS handshake).
                    Code::Unavailable | Code::Unknown
                        if [
                            "connect",
                            "dns",
                            "tls",
                            "certificate",
                            "handshake",
                            "transport",
                        ]
                        .iter()
                        .any(|w| status.message().to_lowercase().contains(w)) =>
                    {
                        EtcdError::Unreachable(format!("cannot connect: {}", status.message()))
                    }
                    _ => EtcdError::Transient(format!("{text} ({:?})", status.code())),
                }
            }
            E::LeaseKeepAliveError(msg) if msg.contains("not found") => {
                EtcdError::NotFound("etcd answered: the lease was not found".into())
            }
            E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) => {
                EtcdError::Fatal(e.to_string())
            }
            E::TransportError(_) | E::IoError(_) => EtcdError::Unreachable(e.to_string()),
            _ => EtcdError::Transient(e.to_string()),
        }
    }
}

/// Runs one request, bounded by `limit`: past it the request counts as a transient failure.
pub async fn bounded<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(limit, request).await {
        Ok(r) => r.map_err(EtcdError::from),
        Err(_) => Err(EtcdError::Unreachable(format!(
            "etcd did not answer within {}",
            humantime::format_duration(limit)
        ))),
    }
}

/// A client over `endpoints` (normally all of `cfg.endpoints`; a hedged renew uses one).
/// Connecting does no I/O unless a user is set (then it authenticates).
pub async fn connect(cfg: &EtcdConfig, endpoints: &[String]) -> Result<Client, EtcdError> {
    let mut opts = ConnectOptions::new()
        .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
        .with_keep_alive_while_idle(false)
        .with_connect_timeout(REQUEST_TIMEOUT)
        // A member cut off from the others has no leader: fail its requests and end its
        // watches rather than answer from a stale view or stay silent.
        .with_require_leader(true)
        .with_auto_token_refresh(true);
    if let Some((user, password)) = &cfg.user {
        opts = opts.with_user(user.clone(), password.clone());
    }
    if cfg.uses_tls() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        } else {
            tls = tls.with_native_roots();
        }
        if let Some((cert, key)) = &cfg.identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        opts = opts.with_tls(tls);
    }
    bounded(REQUEST_TIMEOUT, Client::connect(endpoints, Some(opts))).await
}

/// Runs `op` on `client` (balanced over every endpoint); when that fails for a reason a retry
/// may cure, on each endpoint in turn with a client of its own, until one answers. A balanced channel sends a request to an
/// endpoint it has not connected to yet and fails it if that member is down, so one member
/// down must not pass for etcd being unreachable.
pub async fn on_any_endpoint<T, F, Fut>(
    cfg: &EtcdConfig,
    client: &Client,
    op: F,
) -> Result<T, EtcdError>
where
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<T, EtcdError>>,
{
    match op(client.clone()).await {
        Err(e) if e.is_transient() && cfg.endpoints.len() > 1 => {
            let mut last = e;
            for endpoint in &cfg.endpoints {
                let one = match connect(cfg, std::slice::from_ref(endpoint)).await {
                    Ok(c) => c,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                };
                match op(one).await {
                    Err(e) if e.is_transient() => last = e,
                    other => return other,
                }
            }
            Err(last)
        }
        other => other,
    }
}

/// One key of the lock's prefix, as read: what the rules need of an etcd `KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
    pub value: Vec<u8>,
}

impl From<&etcd_client::KeyValue> for Entry {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Entry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
            value: kv.value().to_vec(),
        }
    }
}

impl Entry {
    /// The consul-leader value of this key, if it holds one (`etcdctl lock` writes none).
    pub fn holder(&self) -> Option<HolderValue> {
        HolderValue::parse(&self.value)
    }
}

/// The prefix all contenders of lock `name` put their keys under: `name/`.
pub fn prefix(name: &str) -> String {
    format!("{name}/")
}

/// Our key in the lock's queue: `name/<lease id in hex>`, as etcd's `concurrency.Mutex` names it.
pub fn lock_key(name: &str, lease: i64) -> String {
    format!("{name}/{lease:x}")
}

/// A lease id as etcd's tools print it (lower-case hex).
pub fn lease_hex(lease: i64) -> String {
    format!("{lease:x}")
}

/// The key that keeps the record of the last consul-leader holder: outside the prefix, so that
/// `etcdctl lock` never sees it.
pub fn marker_key(name: &str) -> String {
    format!("{name}.consul-leader")
}

/// What the marker key holds: the last consul-leader holder's value (its timing, what it still
/// owed, whether it released clean) and which key of the queue it describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Always [`Marker::KIND`]: tells our record from anything else stored at that key.
    pub kind: String,
    /// The holder's key in the queue (`NAME/<lease>`), and its create revision (the fencing
    /// token its command got).
    pub lock_key: String,
    pub create_revision: i64,
    #[serde(flatten)]
    pub holder: HolderValue,
}

impl Marker {
    pub const KIND: &'static str = "consul-leader etcd marker";

    pub fn new(lock_key: &str, create_revision: i64, holder: HolderValue) -> Self {
        Marker {
            kind: Self::KIND.to_string(),
            lock_key: lock_key.to_string(),
            create_revision,
            holder,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `Ok(None)` for an empty key, `Err` for data that is not our marker.
    pub fn parse(bytes: &[u8]) -> Result<Self, ()> {
        serde_json::from_slice::<Self>(bytes)
            .ok()
            .filter(|m| m.kind == Self::KIND)
            .ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::SessionId;
    use crate::election::Timing;

    #[test]
    fn keys_follow_etcds_mutex() {
        assert_eq!(
            lock_key("jobs/a", 0x694d_8d3a_0c1b_f20b),
            "jobs/a/694d8d3a0c1bf20b"
        );
        assert_eq!(prefix("/locks/x"), "/locks/x/");
        // The marker is outside the prefix, where `etcdctl lock` never looks.
        assert!(!marker_key("jobs/a").starts_with(&prefix("jobs/a")));
    }

    #[test]
    fn the_marker_reads_back_and_refuses_other_data() {
        let t = Timing {
            ttl: Duration::from_secs(5),
            lock_delay: Duration::ZERO,
            silence: Duration::from_secs(5),
        };
        let v = HolderValue::new("h", "h", &SessionId("1f".into()), &t, Duration::ZERO);
        let m = Marker::new("k/1f", 42, v.released_clean());
        let back = Marker::parse(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        assert!(back.holder.is_clean());
        assert!(Marker::parse(b"some user data").is_err());
        assert!(
            Marker::parse(&v.to_bytes()).is_err(),
            "a holder value is not a marker"
        );
    }
}
