//! TLS with rustls: the server side clients connect to, and the client side towards upstream.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

/// ALPN protocol name PostgreSQL 17 clients send with direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// TLS material that could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("reading {path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("{path} holds no {what}")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA verifier: {0}")]
    Verifier(String),
    #[error("invalid upstream server name {0:?}")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

fn root_store(ca_file: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Server config for client connections: certificate, optional client-certificate CA.
///
/// With a CA, clients may present a certificate (verified against it); whether one is required
/// is the authentication layer's decision, so a missing certificate gets a clear 28000 message
/// instead of a bare handshake failure.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca_file {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let resolver = Arc::new(FileCertificate::load(cert_file, key_file)?);
    register_reloadable(&resolver);
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// The listen certificate and key, re-read from their files on SIGHUP
/// ([`reload_server_certificates`]): new handshakes get the new pair, established sessions
/// keep theirs, nothing is rebound.
#[derive(Debug)]
struct FileCertificate {
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
    current: parking_lot::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl FileCertificate {
    fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: parking_lot::RwLock::new(Arc::new(read_pair(cert_file, key_file)?)),
        })
    }
}

/// A certificate chain and its private key, refused if they do not belong together.
fn read_pair(cert_file: &Path, key_file: &Path) -> Result<rustls::sign::CertifiedKey, TlsError> {
    Ok(rustls::sign::CertifiedKey::from_der(
        load_certs(cert_file)?,
        load_key(key_file)?,
        &provider(),
    )?)
}

impl rustls::server::ResolvesServerCert for FileCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Every listen certificate of this process that SIGHUP reloads (weak: a proxy that stopped
/// drops its own).
static RELOADABLE: parking_lot::Mutex<Vec<std::sync::Weak<FileCertificate>>> =
    parking_lot::Mutex::new(Vec::new());

fn register_reloadable(resolver: &Arc<FileCertificate>) {
    let mut all = RELOADABLE.lock();
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(resolver));
}

/// Re-read every listen certificate and key from its files. All or nothing: if any pair fails
/// to load (unreadable, not PEM, key not matching the certificate) none is replaced and the
/// error is returned. Returns how many were reloaded.
pub fn reload_server_certificates() -> Result<usize, TlsError> {
    let live: Vec<Arc<FileCertificate>> = RELOADABLE
        .lock()
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    let fresh = live
        .iter()
        .map(|r| read_pair(&r.cert_file, &r.key_file))
        .collect::<Result<Vec<_>, _>>()?;
    for (resolver, pair) in live.iter().zip(fresh) {
        *resolver.current.write() = Arc::new(pair);
    }
    Ok(live.len())
}

/// Client config towards upstream: verified (`verify-full`) or encrypted only (`require`).
pub fn upstream_client_config(
    verify: bool,
    ca_file: Option<&Path>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = if verify {
        let roots = match ca_file {
            Some(ca) => root_store(ca)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Client config towards a verified TLS peer other than upstream (the audit log's syslog
/// collector): roots from `ca_file` only, and a client certificate when `client` names one
/// (mutual TLS, as RFC 5425 collectors often require).
pub fn verified_client_config(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_file)?);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The server name to verify the upstream certificate against.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// `sslmode=require` semantics: encrypt, but accept any certificate (documented as such).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A self-signed certificate and key for `pgward dev` and tests, written as PEM files.
pub fn write_self_signed(
    cert_file: &Path,
    key_file: &Path,
    names: &[&str],
) -> Result<(), TlsError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Pem {
        path: cert_file.display().to_string(),
        detail: e.to_string(),
    })?;
    let write = |path: &Path, data: String, mode: u32| -> Result<(), TlsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(data.as_bytes()).map(|_| f))
            .map_err(|e| TlsError::Pem {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
        file.flush().map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    };
    write(cert_file, certified.cert.pem(), 0o644)?;
    write(key_file, certified.key_pair.serialize_pem(), 0o600)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_loads_into_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        write_self_signed(&cert, &key, &["localhost"]).unwrap();
        let config = server_config(&cert, &key, Some(&cert)).unwrap();
        assert_eq!(config.alpn_protocols, vec![ALPN_POSTGRESQL.to_vec()]);
    }

    #[test]
    fn missing_files_are_clear_errors() {
        let err = server_config(
            Path::new("/nonexistent.pem"),
            Path::new("/nonexistent.key"),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent.pem"));
    }
}
