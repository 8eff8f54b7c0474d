//! `tls-creds-x509`: certificates and keys from a directory, turned into rustls configs once.

use crate::TlsError;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::warn;

/// Largest credentials file read (a PEM chain is a few KiB; this leaves room for odd ones).
const MAX_PEM_BYTES: u64 = 4 << 20;

/// Which side of a migration the credentials are for (QEMU's `endpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The destination: accepts connections, presents `server-cert.pem`.
    Server,
    /// The source: connects, presents `client-cert.pem`.
    Client,
}

impl Endpoint {
    /// Parse QEMU's `server` / `client`.
    pub fn parse(s: &str) -> Option<Endpoint> {
        match s {
            "server" => Some(Endpoint::Server),
            "client" => Some(Endpoint::Client),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }
}

#[derive(Clone)]
enum Config {
    Server(Arc<ServerConfig>),
    Client(Arc<ClientConfig>),
}

/// Loaded X.509 credentials, ready for [`crate::connect`] or [`crate::accept`].
#[derive(Clone)]
pub struct X509Creds {
    id: String,
    dir: PathBuf,
    endpoint: Endpoint,
    verify_peer: bool,
    config: Config,
}

impl std::fmt::Debug for X509Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Creds")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

/// The crypto provider: aws-lc-rs (AES-GCM with AES-NI/VAES and AVX-512 code paths).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl X509Creds {
    /// Load `dir`'s files for `endpoint`. `ca-cert.pem` is always needed (it verifies the
    /// peer); a server needs `server-cert.pem` and `server-key.pem`, a client
    /// `client-cert.pem` and `client-key.pem` (mutual TLS). With `verify_peer` off a server
    /// does not ask for client certificates; a client always verifies its server.
    pub fn load(
        id: &str,
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
    ) -> Result<X509Creds, TlsError> {
        let config_err = |what: &str| {
            let id = id.to_owned();
            let what = what.to_owned();
            move |source| TlsError::Config { id, what, source }
        };
        let roots = {
            let path = dir.join("ca-cert.pem");
            let mut roots = RootCertStore::empty();
            for c in certs(id, &path)? {
                roots.add(c).map_err(config_err(&format!(
                    "unusable CA certificate in {}",
                    path.display()
                )))?;
            }
            Arc::new(roots)
        };
        let versions = &[&rustls::version::TLS13];
        let config = match endpoint {
            Endpoint::Server => {
                let (chain, key) = pair(id, dir, "server")?;
                let verifier = if verify_peer {
                    WebPkiClientVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| TlsError::Unsupported {
                            id: id.to_owned(),
                            why: format!("cannot verify clients with ca-cert.pem: {e}"),
                        })?
                } else {
                    WebPkiClientVerifier::no_client_auth()
                };
                let mut c = ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(versions)
                    .map_err(config_err("TLS 1.3 is not available"))?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain, key)
                    .map_err(config_err(&format!(
                        "server-cert.pem and server-key.pem in {} do not make a usable pair",
                        dir.display()
                    )))?;
                c.send_tls13_tickets = 0;
                Config::Server(Arc::new(c))
            }
            Endpoint::Client => {
                if !verify_peer {
                    return Err(TlsError::Unsupported {
                        id: id.to_owned(),
                        why: "verify-peer=off is not supported for a client endpoint: \
                              the source always verifies the destination's certificate"
                            .into(),
                    });
                }
                let (chain, key) = pair(id, dir, "client")?;
                let mut c = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(versions)
                    .map_err(config_err("TLS 1.3 is not available"))?
                    .with_root_certificates(roots)
                    .with_client_auth_cert(chain, key)
                    .map_err(config_err(&format!(
                        "client-cert.pem and client-key.pem in {} do not make a usable pair",
                        dir.display()
                    )))?;
                c.resumption = rustls::client::Resumption::disabled();
                Config::Client(Arc::new(c))
            }
        };
        Ok(X509Creds {
            id: id.to_owned(),
            dir: dir.to_owned(),
            endpoint,
            verify_peer,
            config,
        })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The directory the files came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Server or client.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Whether the peer's certificate is required and verified.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    pub(crate) fn server_config(&self) -> Option<Arc<ServerConfig>> {
        match &self.config {
            Config::Server(c) => Some(c.clone()),
            Config::Client(_) => None,
        }
    }

    pub(crate) fn client_config(&self) -> Option<Arc<ClientConfig>> {
        match &self.config {
            Config::Client(c) => Some(c.clone()),
            Config::Server(_) => None,
        }
    }
}

/// Read a credentials file, bounded.
fn read(id: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let err = |source| TlsError::Read {
        id: id.to_owned(),
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut buf = Vec::new();
    f.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            id: id.to_owned(),
            path: path.to_owned(),
            max: MAX_PEM_BYTES,
        });
    }
    Ok(buf)
}

/// Every certificate in a PEM file (at least one); warns about expired ones.
fn certs(id: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(id, path)?;
    let none = || TlsError::Pem {
        id: id.to_owned(),
        path: path.to_owned(),
        what: "PEM certificate",
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| none())?;
    if certs.is_empty() {
        return Err(none());
    }
    for c in &certs {
        if let Ok((_, x)) = x509_parser::parse_x509_certificate(c)
            && !x.validity().is_valid()
        {
            warn!(
                creds = id,
                file = %path.display(),
                not_before = %x.validity().not_before,
                not_after = %x.validity().not_after,
                "certificate is outside its validity period; peers will refuse it"
            );
        }
    }
    Ok(certs)
}

/// `{who}-cert.pem` and `{who}-key.pem`.
fn pair(
    id: &str,
    dir: &Path,
    who: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs(id, &dir.join(format!("{who}-cert.pem")))?;
    let key_path = dir.join(format!("{who}-key.pem"));
    let key = PrivateKeyDer::from_pem_slice(&read(id, &key_path)?).map_err(|_| TlsError::Pem {
        id: id.to_owned(),
        path: key_path.clone(),
        what: "PEM private key",
    })?;
    Ok((chain, key))
}
