//! The command line as an operator meets it, through the real binary: empty environment variables
//! count as unset (as in Consul's CLI), negative numbers get an error that says what is wrong, a
//! TTL below the agent's minimum is refused before anything starts, and a wrong address, a server
//! that is not Consul, or an empty token file each get a one-line error that says what to fix.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};

use common::{DevAgent, bin_path};

/// Every variable the binary reads, so that the caller's environment cannot change a test.
const OUR_VARS: [&str; 16] = [
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_AUTH",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
    "CONSUL_CAPATH",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_TLS_SERVER_NAME",
    "CONSUL_NAMESPACE",
    "CONSUL_PARTITION",
    "CONSUL_LEADER_LOG",
    "CONSUL_LEADER_TTL_MIN",
    "NOTIFY_SOCKET",
];

fn binary(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path());
    cmd.args(args);
    for var in OUR_VARS {
        cmd.env_remove(var);
    }
    cmd
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The first line of a clap error, or the whole of one of ours.
fn first_line(o: &Output) -> String {
    stderr(o).lines().next().unwrap_or_default().to_string()
}

#[test]
fn empty_environment_variables_count_as_unset() {
    let agent = DevAgent::start();
    let key = agent.key("empty-env");
    let with_empty_vars = |args: &[&str]| {
        let mut cmd = binary(args);
        for var in OUR_VARS {
            cmd.env(var, "");
        }
        cmd
    };
    // Every variable empty, the address given by flag: as if none were set.
    let o = with_empty_vars(&["status", "--key", &key, "--http-addr", agent.addr()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "absent key: {}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("does not exist"),
        "{o:?}"
    );

    // `run` too, with Consul's default TTL (the empty CONSUL_LEADER_TTL_MIN is Consul's 10s).
    let o = with_empty_vars(&[
        "run",
        "--key",
        &key,
        "--http-addr",
        agent.addr(),
        "--wait",
        "0",
        "--",
        "true",
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // An empty CONSUL_HTTP_ADDR is the default address, not an error about an empty address.
    let o = with_empty_vars(&["status", "--key", &key])
        .env("CONSUL_HTTP_ADDR", "")
        .output()
        .unwrap();
    let err = stderr(&o);
    if o.status.code() == Some(125) {
        assert!(err.contains("127.0.0.1:8500"), "{err}");
    }
    assert!(!err.contains("empty"), "{err}");
}

#[test]
fn negative_numbers_are_explained() {
    for (flag, value, says) in [
        ("--ttl", "-1s", "cannot be negative"),
        ("--grace", "-5s", "cannot be negative"),
        ("--wait", "-1", "cannot be negative"),
        ("--busy-exit-code", "-1", "cannot be negative"),
        ("--lost-exit-code", "-3", "cannot be negative"),
        ("--stop-signal", "-9", "cannot be negative"),
        ("--ttl", "--grace", "the value is missing"),
        ("--busy-exit-code", "256", "from 0 to 255"),
    ] {
        let o = binary(&["run", "--key", "k", flag, value, "--", "true"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        let line = first_line(&o);
        assert!(
            line.contains(flag) && line.contains(says),
            "{flag} {value}: {line}"
        );
        assert!(
            !stderr(&o).contains("'-- "),
            "clap's `-- -1` tip: {}",
            stderr(&o)
        );
    }
}

#[test]
fn a_ttl_below_consuls_minimum_is_refused_up_front() {
    // No agent is needed: the check comes before any connection.
    let o = binary(&[
        "run", "--key", "k", "--ttl", "5s", "--grace", "1s", "--", "true",
    ])
    .env("CONSUL_HTTP_ADDR", "127.0.0.1:1")
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--ttl 5s") && err.contains("10s") && err.contains("CONSUL_LEADER_TTL_MIN"),
        "{err}"
    );

    // Told the agent's lowered minimum, the wrapper accepts down to it and no further.
    let o = binary(&[
        "run", "--key", "k", "--ttl", "500ms", "--grace", "100ms", "--", "true",
    ])
    .env("CONSUL_LEADER_TTL_MIN", "1s")
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("minimum session TTL of 1s"),
        "{}",
        stderr(&o)
    );
    let o = binary(&["run", "--key", "k", "--ttl", "1s", "--", "true"])
        .env("CONSUL_LEADER_TTL_MIN", "soon")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("CONSUL_LEADER_TTL_MIN=soon"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_host_without_a_port_says_which_port_it_used() {
    // As with Consul's CLI, a bare host goes to port 80; the message says so, and names 8500.
    let o = binary(&["status", "--key", "k"])
        .env("CONSUL_HTTP_ADDR", "127.0.0.1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("port 80") && err.contains("127.0.0.1:8500"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A web server that answers every request with an HTML page.
fn not_consul() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let page = "<!DOCTYPE html>\n<html><body><h1>Welcome</h1></body></html>\n";
            let _ = write!(
                conn,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    addr
}

#[test]
fn a_server_that_is_not_consul_is_named_as_such() {
    let addr = not_consul();
    for args in [
        vec!["status", "--key", "k"],
        vec!["run", "--key", "k", "--", "true"],
    ] {
        let o = binary(&args)
            .env("CONSUL_HTTP_ADDR", &addr)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains("is this a Consul agent?"), "{args:?}: {err}");
        assert!(!err.contains("<html"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn an_empty_token_file_is_refused() {
    let dir = std::env::temp_dir().join(format!("cl-token-{}", common::unique(8)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "\n").unwrap();
    let o = binary(&["status", "--key", "k"])
        .env("CONSUL_HTTP_TOKEN_FILE", &file)
        .output()
        .unwrap();
    let flag = binary(&[
        "status",
        "--key",
        "k",
        "--token-file",
        file.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("is empty") && err.contains("CONSUL_HTTP_TOKEN_FILE"),
        "{err}"
    );
    assert_eq!(flag.status.code(), Some(2));
    assert!(stderr(&flag).contains("--token-file"), "{}", stderr(&flag));
}
