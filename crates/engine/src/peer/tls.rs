//! TLS between peers: every node has a certificate signed by the group's
//! own CA. Clients trust only that CA; a server given the CA also requires
//! clients to show a certificate it signed (mTLS). The group token still
//! goes with every request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
pub use tokio_rustls::TlsAcceptor;

use crate::{Error, Result};

/// `--peer-tls-cert`, `--peer-tls-key` and `--peer-tls-ca`, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

fn read(flag: &str, p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| Error::Config(format!("{flag} {}: {e}", p.display())))
}

fn certs(flag: &str, p: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(flag, p)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| {
            Error::Config(format!(
                "{flag} {}: {e}; give PEM certificates",
                p.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{flag} {}: no PEM certificate in it",
            p.display()
        )));
    }
    Ok(certs)
}

fn roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs("--peer-tls-ca", ca)? {
        roots
            .add(c)
            .map_err(|e| Error::Config(format!("--peer-tls-ca {}: {e}", ca.display())))?;
    }
    Ok(roots)
}

impl TlsFiles {
    /// The server side: this node's certificate, and client certificates
    /// required when the CA is given.
    pub fn acceptor(&self) -> Result<TlsAcceptor> {
        let chain = certs("--peer-tls-cert", &self.cert)?;
        let key_pem = read("--peer-tls-key", &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            Error::Config(format!(
                "--peer-tls-key {}: {e}; give a PEM private key",
                self.key.display()
            ))
        })?;
        let builder = ServerConfig::builder();
        let builder = match &self.ca {
            Some(ca) => {
                let v = WebPkiClientVerifier::builder(Arc::new(roots(ca)?))
                    .build()
                    .map_err(|e| Error::Config(format!("--peer-tls-ca {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let cfg = builder.with_single_cert(chain, key).map_err(|e| {
            Error::Config(format!(
                "--peer-tls-cert/--peer-tls-key: {e}; the key must be the certificate's"
            ))
        })?;
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }

    /// The client side: trust the group's CA only, and show this node's
    /// certificate to servers that ask for one.
    pub fn client(&self, b: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder> {
        let Some(ca) = &self.ca else {
            return Err(Error::Config(
                "--peer-tls-cert needs --peer-tls-ca on a node that asks peers: it is what their certificates are checked against".into(),
            ));
        };
        let ca_pem = read("--peer-tls-ca", ca)?;
        let roots = reqwest::Certificate::from_pem_bundle(&ca_pem)
            .map_err(|e| Error::Config(format!("--peer-tls-ca {}: {e}", ca.display())))?;
        let mut id = read("--peer-tls-key", &self.key)?;
        id.extend(read("--peer-tls-cert", &self.cert)?);
        let identity = reqwest::Identity::from_pem(&id).map_err(|e| {
            Error::Config(format!(
                "--peer-tls-cert/--peer-tls-key: {e}; give PEM files"
            ))
        })?;
        Ok(b.tls_certs_only(roots)
            .identity(identity)
            // Peers are dialled by address, and the CA is the group's own:
            // any certificate it signed is a member, whatever name it bears.
            .tls_danger_accept_invalid_hostnames(true))
    }
}
