//! Real etcd for the tests: [`Cluster`] starts one or three `etcd` processes (Debian's
//! `etcd-server`) on free loopback ports with data directories of their own, waits until they
//! serve, and stops them and removes the directories on drop, so that no process outlives its
//! test. [`etcd_wrapper`] starts `consul-leader run --etcd-endpoints ...` around the child fixture,
//! like `leader::WrapperBuilder` does for Consul.
//!
//! * A three-node cluster puts a [`FaultProxy`] in front of every member's client port (the
//!   wrapper connects through them: [`Cluster::endpoints`]) and in front of every member's peer
//!   port (the members talk to each other through them), so that a test can cut the wrapper off
//!   from one member ([`Cluster::client_proxy`]) or cut one member off from the others
//!   ([`Cluster::partition`]).
//! * The test itself talks to etcd with `etcdctl` on the direct ports ([`Cluster::etcdctl`]),
//!   never through a proxy, so a fault never blinds the test.
//! * Tests call [`skip_without_etcd`] first: without `etcd` and `etcdctl` on the machine they
//!   print one `SKIPPED <test>: ...` line and pass. `.ci/run` installs both, so CI runs them.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use super::leader::{Fixture, WrapperBuilder};
use super::proxy::{FaultProxy, Mode};
use super::{Proc, bin_path, unique, wait_until_sync};

/// How long a cluster gets to serve, and any etcdctl call to answer.
pub const ETCD_DEADLINE: Duration = Duration::from_secs(60);

/// True when `etcd` and `etcdctl` can be run.
pub fn etcd_installed() -> bool {
    let runs = |bin: &str, arg: &str| {
        Command::new(bin)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    runs("etcd", "--version") && runs("etcdctl", "version")
}

/// Prints why `test` is skipped and returns true when etcd is not installed.
pub fn skip_without_etcd(test: &str) -> bool {
    if etcd_installed() {
        return false;
    }
    eprintln!("SKIPPED {test}: etcd not installed (apt-get install etcd-server etcd-client)");
    true
}

/// A free loopback port (bound and released: another process may take it first, which makes
/// etcd fail to start, and [`Cluster::start`] then tries other ports).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One etcd member.
pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    proc: Option<Proc>,
    client_proxy: Option<FaultProxy>,
    peer_proxy: Option<FaultProxy>,
}

impl Member {
    /// The member's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

/// PEM files for a member that serves TLS and asks clients for certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// Running etcd members; see the module docs.
pub struct Cluster {
    dir: PathBuf,
    pub members: Vec<Member>,
    /// `https` when the members serve TLS.
    scheme: &'static str,
    /// Global flags for every etcdctl call (TLS files, a user).
    etcdctl_flags: Vec<String>,
}

impl Cluster {
    /// One member, no proxies.
    pub fn single() -> Cluster {
        Cluster::start(1, false)
    }

    /// One member behind a client proxy, for faults between the wrapper and etcd.
    pub fn single_behind_proxy() -> Cluster {
        Cluster::start(1, true)
    }

    /// Three members, each behind a client proxy and a peer proxy.
    pub fn three() -> Cluster {
        Cluster::start(3, true)
    }

    /// One member serving TLS that requires a client certificate, with authentication enabled
    /// for user `root` and `password`.
    pub fn single_secure(tls: &TlsFiles, password: &str) -> Cluster {
        let mut c = Cluster::start_with(1, false, Some(tls));
        c.etcdctl(&["user", "add", &format!("root:{password}")]);
        c.etcdctl(&["auth", "enable"]);
        c.etcdctl_flags
            .extend(["--user".to_string(), format!("root:{password}")]);
        c
    }

    fn start(n: usize, proxies: bool) -> Cluster {
        Cluster::start_with(n, proxies, None)
    }

    fn start_with(n: usize, proxies: bool, tls: Option<&TlsFiles>) -> Cluster {
        for attempt in 0..3 {
            match Cluster::try_start(n, proxies, tls) {
                Ok(c) => return c,
                Err(why) if attempt < 2 => eprintln!("etcd did not start ({why}); trying again"),
                Err(why) => panic!("etcd did not start: {why}"),
            }
        }
        unreachable!()
    }

    fn try_start(n: usize, proxies: bool, tls: Option<&TlsFiles>) -> Result<Cluster, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = std::env::temp_dir().join(format!("cl-etcd-{}", unique(10)));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut members: Vec<Member> = (0..n)
            .map(|i| {
                let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                Member {
                    name: format!("m{i}"),
                    client,
                    peer,
                    proc: None,
                    client_proxy: proxies.then(|| FaultProxy::start(client)),
                    peer_proxy: (proxies && n > 1).then(|| FaultProxy::start(peer)),
                }
            })
            .collect();
        let advertised_peer = |m: &Member| {
            m.peer_proxy
                .as_ref()
                .map_or(m.peer, |p| p.addr())
                .to_string()
        };
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, advertised_peer(m)))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("cl-{}", unique(8));
        for m in &mut members {
            let mut cmd = Command::new("etcd");
            cmd.arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(dir.join(&m.name))
                .arg("--listen-client-urls")
                .arg(format!("{scheme}://{}", m.client))
                .arg("--advertise-client-urls")
                .arg(format!("{scheme}://{}", m.client))
                .arg("--listen-peer-urls")
                .arg(format!("http://{}", m.peer))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{}", advertised_peer(m)))
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--logger")
                .arg("zap")
                .arg("--log-level")
                .arg("error")
                // etcd's variables of the machine running the tests must not change the cluster.
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default());
            if let Some(t) = tls {
                cmd.args(["--cert-file", &t.server_cert, "--key-file", &t.server_key])
                    .args(["--trusted-ca-file", &t.ca, "--client-cert-auth"]);
            }
            m.proc = Some(Proc::spawn(cmd));
        }
        let etcdctl_flags = match tls {
            Some(t) => vec![
                format!("--cacert={}", t.ca),
                format!("--cert={}", t.client_cert),
                format!("--key={}", t.client_key),
            ],
            None => Vec::new(),
        };
        let cluster = Cluster {
            dir,
            members,
            scheme,
            etcdctl_flags,
        };
        // Every member serves (a linearizable read through each answers), or one exited.
        let started = std::time::Instant::now();
        loop {
            if let Some(m) = cluster.members.iter().find(|m| {
                m.proc
                    .as_ref()
                    .is_some_and(|p| p.stderr_text().contains("address already in use"))
            }) {
                return Err(format!("{}: a port was taken", m.name));
            }
            let healthy = cluster.members.iter().all(|m| {
                cluster
                    .etcdctl_at(&m.client.to_string(), &["get", "cl-health-probe"])
                    .status
                    .success()
            });
            if healthy {
                return Ok(cluster);
            }
            if started.elapsed() > ETCD_DEADLINE {
                let logs: Vec<String> = cluster
                    .members
                    .iter()
                    .filter_map(|m| m.proc.as_ref().map(Proc::output_report))
                    .collect();
                return Err(format!(
                    "not serving after {ETCD_DEADLINE:?}:\n{}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client URLs the wrapper uses (through the client proxies when there are).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let a = m.client_proxy.as_ref().map_or(m.client, |p| p.addr());
                format!("{}://{a}", self.scheme)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The members' own client addresses, for etcdctl.
    pub fn direct_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| m.client.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The proxy in front of member `i`'s client port.
    pub fn client_proxy(&self, i: usize) -> &FaultProxy {
        self.members[i]
            .client_proxy
            .as_ref()
            .expect("this cluster has client proxies")
    }

    fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints)
            .arg("--command-timeout=5s")
            .args(&self.etcdctl_flags)
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// Runs `etcdctl ARGS` against the live members; panics with its output if it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_at(&self.direct_endpoints(), args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `Command` for `etcdctl ARGS` against the live members (for `etcdctl lock`, which the
    /// test runs as a process of its own).
    pub fn etcdctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .env_remove("ETCDCTL_ENDPOINTS")
            .arg("--endpoints")
            .arg(self.direct_endpoints())
            .args(&self.etcdctl_flags)
            .args(args);
        cmd
    }

    /// The index of the member that is etcd's leader now (the live members must agree).
    pub fn leader(&self) -> usize {
        self.leader_among(&self.direct_endpoints())
    }

    /// The leader as the members at `endpoints` (comma-separated client addresses) see it,
    /// once they agree.
    pub fn leader_among(&self, endpoints: &str) -> usize {
        let mut found = None;
        wait_until_sync("the members agree on a leader", ETCD_DEADLINE, || {
            let out = self.etcdctl_at(endpoints, &["endpoint", "status", "-w", "json"]);
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                return false;
            };
            let leaders: BTreeSet<u64> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["Status"]["leader"].as_u64())
                .collect();
            let Some(&leader) = leaders.iter().next().filter(|_| leaders.len() == 1) else {
                return false;
            };
            found = v.as_array().into_iter().flatten().find_map(|s| {
                (s["Status"]["header"]["member_id"].as_u64() == Some(leader))
                    .then(|| s["Endpoint"].as_str().map(String::from))
                    .flatten()
            });
            found.is_some()
        });
        let endpoint = found.unwrap();
        self.members
            .iter()
            .position(|m| m.client.to_string() == endpoint)
            .unwrap_or_else(|| panic!("no member serves {endpoint}"))
    }

    /// SIGKILLs member `i` (it stays down).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = p.wait_exit(ETCD_DEADLINE);
        }
    }

    /// Cuts member `i` off from the other members, both ways, until the returned guard drops:
    /// its peer proxy stops everything coming in, and the connections it opens to the others'
    /// peer proxies (found by their source ports in `/proc`) are black-holed as they appear
    /// ([`Partition::hold`]). Its clients still reach it.
    pub fn partition(&self, i: usize) -> Partition<'_> {
        let pid = self.members[i].pid().expect("the member runs");
        let inbound = self.members[i].peer_proxy.as_ref().expect("peer proxies");
        inbound.set_mode(Mode::Blackhole);
        inbound.pin_all(Mode::Blackhole);
        let p = Partition {
            cluster: self,
            member: i,
            pid,
        };
        p.cut();
        p
    }
}

/// A member cut off from the others; see [`Cluster::partition`]. Dropping it heals the
/// partition: the connections held during it are reset, so the members reconnect.
pub struct Partition<'a> {
    cluster: &'a Cluster,
    member: usize,
    pid: u32,
}

impl Partition<'_> {
    /// Black-holes the connections the member has opened to the others' peer proxies.
    fn cut(&self) {
        let ports = source_ports(self.pid);
        for (j, m) in self.cluster.members.iter().enumerate() {
            let Some(p) = m.peer_proxy.as_ref().filter(|_| j != self.member) else {
                continue;
            };
            for c in p.connections() {
                if !c.pinned && ports.contains(&c.peer.port()) {
                    p.set_mode_for(c.id, Mode::Blackhole);
                }
            }
        }
    }

    /// Keeps the member cut off for `d` (the partition's length is the test's input, not a
    /// stand-in for waiting on a condition), black-holing every new connection it opens.
    pub fn hold(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end {
            self.cut();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Keeps the member cut off until `cond` holds; panics after `deadline`.
    pub fn hold_until(&self, what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
        wait_until_sync(what, deadline, || {
            self.cut();
            cond()
        });
    }
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        for (j, m) in self.cluster.members.iter().enumerate() {
            let Some(p) = &m.peer_proxy else { continue };
            if j == self.member {
                p.pin_all(Mode::Reset);
                p.set_mode(Mode::Pass);
            } else {
                for c in p.connections() {
                    if c.pinned {
                        p.set_mode_for(c.id, Mode::Reset);
                    }
                }
            }
        }
    }
}

/// The local ports of `pid`'s TCP sockets (from `/proc/<pid>/fd` and `/proc/<pid>/net/tcp`).
fn source_ports(pid: u32) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local = cols.get(1)?;
            let inode = cols.get(9)?;
            if !inodes.contains(*inode) {
                return None;
            }
            u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()
        })
        .collect()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            // Proc's drop stops (TERM, then KILL) and reaps it.
            drop(m.proc.take());
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Timing for wrappers on etcd: TTLs are whole seconds, and the silence covers the TTL.
#[derive(Debug, Clone)]
pub struct EtcdTiming {
    pub ttl: &'static str,
    pub silence: &'static str,
    pub grace: &'static str,
}

/// Short timings for a single local member (etcd's smallest lease is 2s with its default
/// election timeout).
pub const QUICK: EtcdTiming = EtcdTiming {
    ttl: "3s",
    silence: "3s",
    grace: "1s",
};

/// Timings for a three-member cluster: room for an etcd election (about 1 to 2s with the
/// default election timeout of 1s) inside the fence.
pub const CLUSTER: EtcdTiming = EtcdTiming {
    ttl: "8s",
    silence: "8s",
    grace: "1s",
};

/// `consul-leader run --etcd-endpoints ENDPOINTS --key NAME` with `timing`, around the child
/// fixture; the rest as for a Consul wrapper ([`WrapperBuilder`]).
pub fn etcd_wrapper<'a>(
    fixture: &'a Fixture,
    endpoints: &str,
    name: &str,
    timing: &EtcdTiming,
) -> WrapperBuilder<'a> {
    WrapperBuilder::etcd(
        fixture,
        endpoints,
        name,
        &[
            "--ttl",
            timing.ttl,
            "--silence",
            timing.silence,
            "--grace",
            timing.grace,
        ],
    )
}

/// A lock name no other test uses.
pub fn lock_name(what: &str) -> String {
    format!("cl-test/{what}-{}", unique(8))
}

/// `consul-leader status --json` on lock `name`: the parsed report.
pub fn status(endpoints: &str, name: &str) -> serde_json::Value {
    let out = Command::new(bin_path())
        .args([
            "status",
            "--json",
            "--etcd-endpoints",
            endpoints,
            "--key",
            name,
        ])
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("ETCDCTL_ENDPOINTS")
        .output()
        .expect("run consul-leader status");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
