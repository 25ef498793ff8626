//! The client's connection settings, end to end: the real `consul-leader status` binary against a
//! dev agent serving HTTPS (with and without client-certificate checks), a unix socket, and ACL
//! tokens, configured the way an operator would, through `CONSUL_*` variables and flags.
//!
//! `status` on a key that does not exist is the probe: exit 1 with "free" on stdout means the
//! request went through; exit 125 with one line on stderr means the connection was refused, and
//! that line must say why. Certificates are made at test time with rcgen: a CA, server
//! certificates it signs (for 127.0.0.1/localhost, and for `consul.test` only), a client
//! certificate it signs, and an unrelated self-signed server certificate.

mod common;

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Proc, START_DEADLINE, bin_path, unique};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// How long one `status` run may take. It makes one or two requests with short timeouts of its
/// own; this only keeps a hung binary from hanging the suite.
const STATUS_DEADLINE: Duration = Duration::from_secs(60);

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        // Short: a unix socket path must fit in 108 bytes.
        let dir = std::env::temp_dir().join(format!("cl-tls-{}", unique(10)));
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, contents).unwrap();
        p.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The certificates of one test, written as PEM files; each field is a path.
struct Pki {
    dir: TempDir,
    ca: String,
    /// Holds only a copy of the CA, for `CONSUL_CAPATH`.
    ca_dir: String,
    /// Signed by the CA for 127.0.0.1 and localhost.
    server: (String, String),
    /// Signed by the CA for `consul.test` only.
    named: (String, String),
    /// Signed by the CA for client authentication.
    client: (String, String),
    /// Self-signed for 127.0.0.1 and localhost; no CA vouches for it.
    rogue: (String, String),
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "consul-leader test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf = |names: &[&str], usage: ExtendedKeyUsagePurpose, file: &str| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(names.clone()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, &names[0]);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            (
                dir.write(&format!("{file}.pem"), &cert.pem()),
                dir.write(&format!("{file}-key.pem"), &key.serialize_pem()),
            )
        };
        let server = leaf(
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        let named = leaf(
            &["consul.test"],
            ExtendedKeyUsagePurpose::ServerAuth,
            "named",
        );
        let client = leaf(
            &["client.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        let rogue = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .unwrap();
        let rogue = (
            dir.write("rogue.pem", &rogue.cert.pem()),
            dir.write("rogue-key.pem", &rogue.signing_key.serialize_pem()),
        );
        let ca_pem = ca.pem();
        Pki {
            ca: dir.write("ca.pem", &ca_pem),
            ca_dir: {
                dir.write("cadir/ca.pem", &ca_pem);
                dir.path("cadir").to_string_lossy().into_owned()
            },
            server,
            named,
            client,
            rogue,
            dir,
        }
    }
}

/// A dev agent and the address it printed (`ip:port` or `unix:///path`).
struct Agent {
    proc: Proc,
    addr: String,
}

impl Agent {
    /// `consul-leader dev-agent --listen <listen> <extra...>`; panics with its output if it does
    /// not print its listening line in time.
    fn start(listen: &str, extra: &[&str]) -> Agent {
        let mut cmd = Command::new(bin_path());
        cmd.args(["dev-agent", "--listen", listen, "--node", "n1"])
            .args(extra);
        let mut proc = Proc::spawn(cmd);
        let addr = proc.wait_stdout_line(START_DEADLINE, |l| {
            l.strip_prefix("dev-agent listening on ")
                .map(|a| a.trim().to_string())
        });
        let Some(addr) = addr else {
            // `proc`'s drop prints its output while this panic unwinds.
            panic!("dev agent did not print its listening line within {START_DEADLINE:?}");
        };
        Agent { proc, addr }
    }

    /// An HTTPS agent on a free loopback port serving `cert`.
    fn https(cert: &(String, String), extra: &[&str]) -> Agent {
        let mut args = vec!["--tls-cert", &cert.0, "--tls-key", &cert.1];
        args.extend_from_slice(extra);
        Agent::start("127.0.0.1:0", &args)
    }

    fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Environment variables for one `status` run.
type Env<'a> = Vec<(&'a str, &'a str)>;

/// What one `status` run did.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The probe key does not exist, so a request that went through says "free" and exits 1.
    #[track_caller]
    fn assert_worked(&self) {
        assert_eq!(self.code, Some(1), "expected exit 1 (free): {self:#?}");
        assert!(self.stdout.contains("free"), "expected `free`: {self:#?}");
    }

    /// Exit `code` and exactly one stderr line that contains every one of `needles`
    /// (case-insensitive).
    #[track_caller]
    fn assert_failed(&self, code: i32, needles: &[&str]) {
        assert_eq!(self.code, Some(code), "expected exit {code}: {self:#?}");
        let err = self.stderr.trim();
        assert_eq!(
            err.lines().count(),
            1,
            "expected one stderr line: {self:#?}"
        );
        let lower = err.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "stderr should mention {n:?}: {self:#?}"
            );
        }
    }
}

/// Runs `consul-leader status --key <absent key> <args>` with exactly the `CONSUL_*` variables in
/// `env` (the caller's own are removed, so a developer's settings cannot leak in).
fn status(env: &[(&str, &str)], args: &[&str]) -> Outcome {
    let mut cmd = Command::new(bin_path());
    cmd.args(["status", "--key", &format!("t-{}/absent", unique(8))])
        .args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONSUL_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().expect("spawn consul-leader status");
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = String::new();
        let mut stderr = String::new();
        // stderr is small (one line), so reading stdout first cannot block the child on it.
        let _ = out.read_to_string(&mut stdout);
        let _ = err.read_to_string(&mut stderr);
        let status = child.wait().expect("wait for consul-leader status");
        let _ = tx.send(Outcome {
            code: status.code(),
            stdout,
            stderr,
        });
    });
    rx.recv_timeout(STATUS_DEADLINE).unwrap_or_else(|_| {
        // Our own child, by pid; the waiting thread then reaps it.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        panic!("{what} did not finish within {STATUS_DEADLINE:?}")
    })
}

// ---------------------------------------------------------------------------------------------
// Trusting the agent's certificate
// ---------------------------------------------------------------------------------------------

#[test]
fn ca_file_from_consul_cacert_trusts_the_agent() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &[]);
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.https_url()),
            ("CONSUL_CACERT", &pki.ca),
        ],
        &[],
    )
    .assert_worked();
}

#[test]
fn ca_file_flag_trusts_the_agent() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &[]);
    status(
        &[],
        &["--http-addr", &agent.https_url(), "--ca-file", &pki.ca],
    )
    .assert_worked();
}

#[test]
fn ca_directory_from_consul_capath_trusts_the_agent() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &[]);
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.https_url()),
            ("CONSUL_CAPATH", &pki.ca_dir),
        ],
        &[],
    )
    .assert_worked();
}

#[test]
fn a_ca_file_wins_over_a_ca_directory_as_in_consul() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &[]);
    // Not a certificate: reading this directory fails, naming the file.
    pki.dir.write("junk/notes.txt", "not a certificate");
    let junk_dir = pki.dir.path("junk").to_string_lossy().into_owned();
    let url = agent.https_url();
    status(
        &[("CONSUL_HTTP_ADDR", &url), ("CONSUL_CAPATH", &junk_dir)],
        &[],
    )
    .assert_failed(2, &["notes.txt", "CONSUL_CAPATH"]);
    // With a CA file as well, Consul never reads the directory.
    status(
        &[
            ("CONSUL_HTTP_ADDR", &url),
            ("CONSUL_CAPATH", &junk_dir),
            ("CONSUL_CACERT", &pki.ca),
        ],
        &[],
    )
    .assert_worked();
}

#[test]
fn without_a_ca_the_system_roots_do_not_trust_a_private_ca() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &[]);
    status(&[("CONSUL_HTTP_ADDR", &agent.https_url())], &[])
        .assert_failed(125, &["certificate", "--ca-file"]);
}

#[test]
fn a_server_certificate_the_ca_did_not_sign_is_refused() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.rogue, &[]);
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.https_url()),
            ("CONSUL_CACERT", &pki.ca),
        ],
        &[],
    )
    .assert_failed(125, &["certificate", "--ca-file"]);
}

#[test]
fn ssl_verify_false_accepts_any_certificate() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.rogue, &[]);
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.https_url()),
            ("CONSUL_HTTP_SSL_VERIFY", "false"),
        ],
        &[],
    )
    .assert_worked();
}

#[test]
fn consul_http_ssl_makes_a_bare_address_use_https() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &[]);
    // Without it, a bare address means plain HTTP, which a TLS agent does not speak.
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.addr),
            ("CONSUL_CACERT", &pki.ca),
        ],
        &[],
    )
    .assert_failed(125, &["https://", "CONSUL_HTTP_SSL"]);
    for ssl in ["true", "1"] {
        status(
            &[
                ("CONSUL_HTTP_ADDR", &agent.addr),
                ("CONSUL_HTTP_SSL", ssl),
                ("CONSUL_CACERT", &pki.ca),
            ],
            &[],
        )
        .assert_worked();
    }
    // An http:// address never downgrades a CONSUL_HTTP_SSL=true setting.
    status(
        &[
            ("CONSUL_HTTP_ADDR", &format!("http://{}", agent.addr)),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_CACERT", &pki.ca),
        ],
        &[],
    )
    .assert_worked();
}

#[test]
fn tls_server_name_verifies_a_certificate_issued_for_another_name() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.named, &[]);
    let base = [
        ("CONSUL_HTTP_ADDR", agent.https_url()),
        ("CONSUL_CACERT", pki.ca.clone()),
    ];
    let with = |extra: &[(&str, &str)], args: &[&str]| {
        let mut env: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra);
        status(&env, args)
    };
    // The certificate names consul.test, not 127.0.0.1.
    with(&[], &[]).assert_failed(125, &["consul.test", "--tls-server-name"]);
    with(&[("CONSUL_TLS_SERVER_NAME", "consul.test")], &[]).assert_worked();
    // As in Consul, a port in the server name is dropped.
    with(&[("CONSUL_TLS_SERVER_NAME", "consul.test:8501")], &[]).assert_worked();
    with(&[], &["--tls-server-name", "consul.test"]).assert_worked();
    // The flag overrides the variable.
    with(
        &[("CONSUL_TLS_SERVER_NAME", "other.test")],
        &["--tls-server-name", "consul.test"],
    )
    .assert_worked();
    with(&[("CONSUL_TLS_SERVER_NAME", "other.test")], &[])
        .assert_failed(125, &["not valid for name", "--tls-server-name"]);
}

// ---------------------------------------------------------------------------------------------
// Client certificates
// ---------------------------------------------------------------------------------------------

#[test]
fn an_agent_that_requires_client_certificates_gets_them_from_the_environment() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &["--tls-client-ca", &pki.ca]);
    let url = agent.https_url();
    let base = [
        ("CONSUL_HTTP_ADDR", url.as_str()),
        ("CONSUL_CACERT", &pki.ca),
    ];
    let with = |extra: &[(&str, &str)], args: &[&str]| {
        let mut env = base.to_vec();
        env.extend_from_slice(extra);
        status(&env, args)
    };

    with(&[], &[]).assert_failed(125, &["--client-cert", "--client-key"]);

    with(
        &[
            ("CONSUL_CLIENT_CERT", &pki.client.0),
            ("CONSUL_CLIENT_KEY", &pki.client.1),
        ],
        &[],
    )
    .assert_worked();
    with(
        &[],
        &[
            "--client-cert",
            &pki.client.0,
            "--client-key",
            &pki.client.1,
        ],
    )
    .assert_worked();

    // Half a pair is a usage error, before any connection.
    let both = "both client cert and client key must be provided";
    with(&[("CONSUL_CLIENT_CERT", &pki.client.0)], &[]).assert_failed(2, &[both]);
    with(&[("CONSUL_CLIENT_KEY", &pki.client.1)], &[]).assert_failed(2, &[both]);
    with(&[], &["--client-cert", &pki.client.0]).assert_failed(2, &[both]);
}

#[test]
fn a_client_certificate_the_agents_ca_did_not_sign_is_refused() {
    let pki = Pki::new();
    let agent = Agent::https(&pki.server, &["--tls-client-ca", &pki.ca]);
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.https_url()),
            ("CONSUL_CACERT", &pki.ca),
            // A certificate and its key, but not one the agent's CA issued.
            ("CONSUL_CLIENT_CERT", &pki.rogue.0),
            ("CONSUL_CLIENT_KEY", &pki.rogue.1),
        ],
        &[],
    )
    .assert_failed(125, &["--client-cert"]);
    // The agent survives a failed handshake and serves the next, good, connection.
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.https_url()),
            ("CONSUL_CACERT", &pki.ca),
            ("CONSUL_CLIENT_CERT", &pki.client.0),
            ("CONSUL_CLIENT_KEY", &pki.client.1),
        ],
        &[],
    )
    .assert_worked();
}

// ---------------------------------------------------------------------------------------------
// Unix socket
// ---------------------------------------------------------------------------------------------

#[test]
fn a_unix_socket_address_reaches_the_agent_and_the_socket_is_removed_on_exit() {
    let dir = TempDir::new();
    let sock = dir.path("agent.sock");
    let listen = format!("unix://{}", sock.display());
    let mut agent = Agent::start(&listen, &[]);
    assert_eq!(agent.addr, listen, "the listening line names the socket");
    status(&[("CONSUL_HTTP_ADDR", &agent.addr)], &[]).assert_worked();
    status(&[], &["--http-addr", &agent.addr]).assert_worked();

    let st = agent.proc.stop();
    assert!(st.success(), "a clean stop exits 0: {st}");
    assert!(!sock.exists(), "the agent removes its socket file on exit");
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_live_one_is_not() {
    let dir = TempDir::new();
    let sock = dir.path("agent.sock");
    let listen = format!("unix://{}", sock.display());
    // A socket file nothing listens on, as left by an agent that was SIGKILLed.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let agent = Agent::start(&listen, &[]);
    status(&[("CONSUL_HTTP_ADDR", &agent.addr)], &[]).assert_worked();

    // A second agent on the same, live, socket must refuse rather than steal it.
    let mut second = Proc::spawn({
        let mut c = Command::new(bin_path());
        c.args(["dev-agent", "--listen", &listen]);
        c
    });
    let st = second
        .wait_exit(START_DEADLINE)
        .expect("the second agent exits");
    assert_eq!(st.code(), Some(125), "{}", second.output_report());
    common::wait_until_sync(
        "the second agent's error line is read",
        START_DEADLINE,
        || second.stderr_text().contains("cannot listen on"),
    );
    assert!(
        second.stderr_text().contains("address in use"),
        "{}",
        second.output_report()
    );
    status(&[("CONSUL_HTTP_ADDR", &agent.addr)], &[]).assert_worked();
}

// ---------------------------------------------------------------------------------------------
// ACL tokens
// ---------------------------------------------------------------------------------------------

#[test]
fn the_token_from_consul_http_token_is_sent_and_never_printed() {
    let right = format!("right-{}", unique(12));
    let agent = Agent::start("127.0.0.1:0", &["--acl-token", &right]);
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.addr),
            ("CONSUL_HTTP_TOKEN", &right),
        ],
        &[],
    )
    .assert_worked();

    let wrong = format!("wrong-{}", unique(12));
    let out = status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.addr),
            ("CONSUL_HTTP_TOKEN", &wrong),
        ],
        &[],
    );
    // The 403 is explained with the permission the token lacks.
    out.assert_failed(125, &["refused", "key:read"]);
    assert!(
        !out.stderr.contains(&wrong) && !out.stdout.contains(&wrong),
        "the token leaked: {out:#?}"
    );
    // Anonymous: the same explanation.
    status(&[("CONSUL_HTTP_ADDR", &agent.addr)], &[]).assert_failed(125, &["key:read"]);
}

#[test]
fn token_precedence_follows_consul_token_file_flag_then_token_flag_then_env_file_then_env() {
    let dir = TempDir::new();
    let right = format!("right-{}", unique(12));
    let wrong = format!("wrong-{}", unique(12));
    // Whitespace around a token in a file is trimmed, as Consul does.
    let right_file = dir.write("right.token", &format!("  {right}\n"));
    let wrong_file = dir.write("wrong.token", &format!("{wrong}\n"));
    let agent = Agent::start("127.0.0.1:0", &["--acl-token", &right]);
    let addr = ("CONSUL_HTTP_ADDR", agent.addr.as_str());

    // Each case puts the right token only where it must win over every lower place.
    // 1. --token-file beats everything.
    status(
        &[
            addr,
            ("CONSUL_HTTP_TOKEN_FILE", &wrong_file),
            ("CONSUL_HTTP_TOKEN", &wrong),
        ],
        &["--token-file", &right_file, "--token", &wrong],
    )
    .assert_worked();
    // 2. --token beats both variables.
    status(
        &[
            addr,
            ("CONSUL_HTTP_TOKEN_FILE", &wrong_file),
            ("CONSUL_HTTP_TOKEN", &wrong),
        ],
        &["--token", &right],
    )
    .assert_worked();
    // 3. CONSUL_HTTP_TOKEN_FILE beats CONSUL_HTTP_TOKEN.
    status(
        &[
            addr,
            ("CONSUL_HTTP_TOKEN_FILE", &right_file),
            ("CONSUL_HTTP_TOKEN", &wrong),
        ],
        &[],
    )
    .assert_worked();

    // And the other way round: a wrong token in the higher place loses, however right the lower.
    let cases: [(Env, Vec<&str>); 3] = [
        (vec![], vec!["--token-file", &wrong_file, "--token", &right]),
        (
            vec![("CONSUL_HTTP_TOKEN_FILE", &right_file)],
            vec!["--token", &wrong],
        ),
        (
            vec![
                ("CONSUL_HTTP_TOKEN_FILE", &wrong_file),
                ("CONSUL_HTTP_TOKEN", &right),
            ],
            vec![],
        ),
    ];
    for (mut env, args) in cases {
        env.push(addr);
        let out = status(&env, &args);
        out.assert_failed(125, &["key:read"]);
        assert!(!out.stderr.contains(&wrong), "the token leaked: {out:#?}");
    }
}

#[test]
fn tls_and_a_token_together() {
    let pki = Pki::new();
    let right = format!("right-{}", unique(12));
    let agent = Agent::https(&pki.server, &["--acl-token", &right]);
    status(
        &[
            ("CONSUL_HTTP_ADDR", &agent.https_url()),
            ("CONSUL_CACERT", &pki.ca),
            ("CONSUL_HTTP_TOKEN", &right),
        ],
        &[],
    )
    .assert_worked();
}

// ---------------------------------------------------------------------------------------------
// The dev agent's own TLS checks
// ---------------------------------------------------------------------------------------------

#[test]
fn dev_agent_refuses_unusable_certificate_files_in_one_line() {
    let pki = Pki::new();
    let run = |args: &[&str]| -> (Option<i32>, String) {
        let out = Command::new(bin_path())
            .args(["dev-agent", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run dev-agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    let missing = pki.dir.path("missing.pem").to_string_lossy().into_owned();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--tls-cert", &missing, "--tls-key", &pki.server.1],
            "--tls-cert",
        ),
        // A key where the certificate belongs: no certificate in it.
        (
            vec!["--tls-cert", &pki.server.1, "--tls-key", &pki.server.1],
            "no PEM certificate",
        ),
        (
            vec!["--tls-cert", &pki.server.0, "--tls-key", &pki.server.0],
            "no PEM private key",
        ),
        // Another certificate's key.
        (
            vec!["--tls-cert", &pki.server.0, "--tls-key", &pki.rogue.1],
            "--tls-key belongs to --tls-cert",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = run(&args);
        assert_eq!(code, Some(125), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should mention {needle:?}"
        );
    }
    let (code, _) = run(&["--tls-cert", &pki.server.0]);
    assert_eq!(
        code,
        Some(2),
        "--tls-cert without --tls-key is a usage error"
    );
}
