//! HTTPS for the dev agent: turns `--tls-cert`, `--tls-key` and `--tls-client-ca` into a rustls
//! server configuration, so that the client's TLS settings (CA files, server names, client
//! certificates) can be tried against a local agent the way they would be against a real one.
//!
//! Everything is read and checked once at start-up; a bad file is one line naming the file and
//! the flag to fix, never a failure on the first connection.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// Builds the acceptor. The error is one line that starts with what failed.
pub fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor, String> {
    let certs = read_certs(cert, "TLS certificate", "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| pem_error(e, key, "TLS private key", "--tls-key"))?;
    // The ring provider explicitly: the process may not have installed a default one, and the
    // dev agent must not depend on which provider some other part of the binary picked.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(path, "TLS client CA", "--tls-client-ca")? {
                roots.add(c).map_err(|e| {
                    format!(
                        "cannot use the TLS client CA {}: {e}; check --tls-client-ca",
                        path.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    format!(
                        "cannot use the TLS client CA {}: {e}; check --tls-client-ca",
                        path.display()
                    )
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "cannot use the TLS certificate {} with its key: {e}; check that --tls-key belongs \
             to --tls-cert",
            cert.display()
        )
    })?;
    // The agent speaks HTTP/1.1 only; saying so lets clients that offer h2 settle at once.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path, what: &str, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(e, path, what, flag))?;
    if certs.is_empty() {
        return Err(pem_error(pem::Error::NoItemsFound, path, what, flag));
    }
    Ok(certs)
}

fn pem_error(e: pem::Error, path: &Path, what: &str, flag: &str) -> String {
    let why = match e {
        pem::Error::Io(io) => io.to_string(),
        pem::Error::NoItemsFound if what.ends_with("key") => "it holds no PEM private key".into(),
        pem::Error::NoItemsFound => "it holds no PEM certificate".into(),
        other => format!("not valid PEM ({other})"),
    };
    format!(
        "cannot load the {what} {}: {why}; check {flag}",
        path.display()
    )
}
