//! Errors of loading credentials and of handshakes.

use std::path::PathBuf;

/// What went wrong loading credentials or setting up a TLS channel.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file cannot be read.
    #[error("tls-creds-x509 '{id}': cannot read {}", path.display())]
    Read {
        /// The object.
        id: String,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A credentials file is larger than any sane PEM file.
    #[error("tls-creds-x509 '{id}': {} is larger than {max} bytes", path.display())]
    TooLarge {
        /// The object.
        id: String,
        /// The file.
        path: PathBuf,
        /// The bound.
        max: u64,
    },
    /// A credentials file does not hold what it must.
    #[error("tls-creds-x509 '{id}': {} holds no {what}", path.display())]
    Pem {
        /// The object.
        id: String,
        /// The file.
        path: PathBuf,
        /// What was looked for ("certificate", "private key").
        what: &'static str,
    },
    /// rustls refused the credentials (a key that does not match its certificate, an
    /// unsupported key type, a CA certificate it cannot use).
    #[error("tls-creds-x509 '{id}': {what}")]
    Config {
        /// The object.
        id: String,
        /// What was being set up.
        what: String,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// A property of the object is not usable.
    #[error("tls-creds-x509 '{id}': {why}")]
    Unsupported {
        /// The object.
        id: String,
        /// Why.
        why: String,
    },
    /// The peer sent nothing (or not enough) within the I/O timeout.
    #[error(
        "TLS handshake with the {peer} timed out: it sent nothing in time (is it set up for TLS?)"
    )]
    Timeout {
        /// "source" or "destination".
        peer: &'static str,
    },
    /// The peer does not speak TLS; `first_bytes` is what it sent (at most 4 KiB), for the
    /// caller to recognise its own plain protocol.
    #[error(
        "the {peer} is not speaking TLS (it is not set up for TLS, or something else answered)"
    )]
    NotTls {
        /// "source" or "destination".
        peer: &'static str,
        /// The start of what arrived instead of a TLS record.
        first_bytes: Vec<u8>,
    },
    /// The handshake failed; `cause` says why in words (certificate, alert, malformed message).
    #[error("TLS handshake with the {peer} failed: {cause}")]
    Handshake {
        /// "source" or "destination".
        peer: &'static str,
        /// Why.
        cause: String,
    },
    /// The socket failed during the handshake.
    #[error("TLS handshake with the {peer} failed")]
    Io {
        /// "source" or "destination".
        peer: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}
