//! Mutual TLS 1.3 for Ferry's migration channels.
//!
//! Credentials are loaded from a directory laid out as QEMU's `tls-creds-x509` object expects
//! (`ca-cert.pem`, `server-cert.pem`/`server-key.pem` or `client-cert.pem`/`client-key.pem`),
//! see [`X509Creds`]. [`connect`] and [`accept`] run the handshake on a blocking
//! [`std::net::TcpStream`] within its I/O timeouts and return a [`TlsStream`] whose clones share
//! one connection, so the migration's forward stream and return path are one TLS session.
//! [`Authz`] is the `tls-authz` allow-list of client certificate names.
//!
//! Only TLS 1.3 is offered, without session tickets or resumption: each migration is one full
//! handshake, and TLS 1.3 has no renegotiation for a peer to abuse.

mod authz;
mod creds;
mod error;
mod stream;
#[cfg(feature = "test-certs")]
pub mod testing;

pub use authz::{Authz, AuthzRule, MatchFormat, Policy};
pub use creds::{Endpoint, X509Creds};
pub use error::TlsError;
pub use stream::{TlsStream, accept, connect, looks_like_tls};
