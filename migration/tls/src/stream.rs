//! Handshakes and the shared blocking TLS stream.

use crate::{TlsError, X509Creds};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, ClientConnection, ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of a non-TLS answer kept for [`TlsError::NotTls`].
const MAX_SEEN: usize = 4096;
/// TLS record content type of a handshake record (what a ClientHello starts with).
const HANDSHAKE_RECORD: u8 = 0x16;

/// Whether `first` (the first bytes a peer sent) starts like a TLS handshake record.
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.first() == Some(&HANDSHAKE_RECORD) && first.get(1).is_none_or(|&b| b == 0x03)
}

enum Conn {
    Client(StreamOwned<ClientConnection, TcpStream>),
    Server(StreamOwned<ServerConnection, TcpStream>),
}

impl Conn {
    /// The session as a byte stream, whichever side it is.
    fn io(&mut self) -> &mut (dyn ReadWrite + Send) {
        match self {
            Conn::Client(s) => s,
            Conn::Server(s) => s,
        }
    }

    /// What both sides share: certificates, cipher suite, close_notify.
    fn common(&mut self) -> &mut rustls::CommonState {
        match self {
            Conn::Client(s) => &mut s.conn,
            Conn::Server(s) => &mut s.conn,
        }
    }

    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Client(s) => &s.sock,
            Conn::Server(s) => &s.sock,
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// An established TLS session over a TCP socket. Clones share the session (one thread at a
/// time uses it, as the migration engine does); [`TlsStream::socket`] stays reachable
/// without the lock so another thread can shut the socket down to cancel.
#[derive(Clone)]
pub struct TlsStream {
    conn: Arc<Mutex<Conn>>,
    socket: Arc<TcpStream>,
    peer: &'static str,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// A socket that remembers the first bytes it read, to recognise a peer answering in
/// plain text.
struct Recording<'a> {
    sock: &'a TcpStream,
    seen: Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&mut &*self.sock).read(buf)?;
        let keep = n.min(MAX_SEEN.saturating_sub(self.seen.len()));
        self.seen.extend_from_slice(&buf[..keep]);
        Ok(n)
    }
}

impl Write for Recording<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self.sock).write(buf)
    }
    // rustls queues a record per buffer and writes an alert with one last call: all of
    // them must go out at once, as the socket's own vectored write does.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&mut &*self.sock).write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Run the client side of the handshake on `sock` (its timeouts bound every step) and
/// verify the destination's certificate against `hostname` (a DNS name or an IP address).
pub fn connect(sock: TcpStream, creds: &X509Creds, hostname: &str) -> Result<TlsStream, TlsError> {
    const PEER: &str = "destination";
    let config = creds.client_config().ok_or_else(|| TlsError::Unsupported {
        id: creds.id().to_owned(),
        why: "it is for endpoint=server; a migration source needs endpoint=client".into(),
    })?;
    let name = ServerName::try_from(hostname.to_owned()).map_err(|_| TlsError::Unsupported {
        id: creds.id().to_owned(),
        why: format!("tls-hostname '{hostname}' is not a valid host name or IP address"),
    })?;
    let mut conn = ClientConnection::new(config, name).map_err(|e| TlsError::Handshake {
        peer: PEER,
        cause: describe(&e, PEER),
    })?;
    let mut rec = Recording {
        sock: &sock,
        seen: Vec::new(),
    };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut rec) {
            return Err(handshake_error(e, PEER, rec.seen));
        }
    }
    finish(Conn::Client(StreamOwned::new(conn, sock)), PEER)
}

/// Run the server side of the handshake on an accepted `sock`. A peer whose first bytes are
/// not a TLS handshake record is refused before rustls reads anything: its bytes stay in the
/// socket ([`TlsError::NotTls`] carries a copy) so the caller can answer in plain text.
pub fn accept(sock: TcpStream, creds: &X509Creds) -> Result<TlsStream, TlsError> {
    const PEER: &str = "source";
    let config = creds.server_config().ok_or_else(|| TlsError::Unsupported {
        id: creds.id().to_owned(),
        why: "it is for endpoint=client; a migration destination needs endpoint=server".into(),
    })?;
    let mut first = [0u8; 16];
    let n = sock
        .peek(&mut first)
        .map_err(|e| handshake_error(e, PEER, Vec::new()))?;
    if n == 0 {
        return Err(TlsError::Handshake {
            peer: PEER,
            cause: "the source closed the connection before the handshake".into(),
        });
    }
    if !looks_like_tls(&first[..n]) {
        return Err(TlsError::NotTls {
            peer: PEER,
            first_bytes: first[..n].to_vec(),
        });
    }
    let mut conn = ServerConnection::new(config).map_err(|e| TlsError::Handshake {
        peer: PEER,
        cause: describe(&e, PEER),
    })?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut &sock) {
            return Err(handshake_error(e, PEER, Vec::new()));
        }
    }
    finish(Conn::Server(StreamOwned::new(conn, sock)), PEER)
}

fn finish(conn: Conn, peer: &'static str) -> Result<TlsStream, TlsError> {
    let socket = conn
        .socket()
        .try_clone()
        .map_err(|source| TlsError::Io { peer, source })?;
    Ok(TlsStream {
        conn: Arc::new(Mutex::new(conn)),
        socket: Arc::new(socket),
        peer,
    })
}

fn handshake_error(e: io::Error, peer: &'static str, seen: Vec<u8>) -> TlsError {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        return TlsError::Timeout { peer };
    }
    if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        // A record type TLS does not have: the peer answered in some other protocol.
        if matches!(r, rustls::Error::InvalidMessage(_))
            && seen.first().is_some_and(|b| !(0x14..=0x17).contains(b))
        {
            return TlsError::NotTls {
                peer,
                first_bytes: seen,
            };
        }
        return TlsError::Handshake {
            peer,
            cause: describe(r, peer),
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => TlsError::Handshake {
            peer,
            cause: format!("the {peer} closed the connection during the handshake"),
        },
        io::ErrorKind::ConnectionReset => TlsError::Handshake {
            peer,
            cause: format!(
                "the {peer} reset the connection during the handshake (is it set up for TLS?)"
            ),
        },
        _ => TlsError::Io { peer, source: e },
    }
}

/// A rustls error in words an operator can act on. `peer` is who we talk to.
pub(crate) fn describe(e: &rustls::Error, peer: &str) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => format!(
            "the {peer}'s certificate was rejected: it is not signed by a CA in our ca-cert.pem \
             (UnknownIssuer)"
        ),
        E::InvalidCertificate(c) => format!("the {peer}'s certificate was rejected: {c}"),
        E::NoCertificatesPresented => format!(
            "the {peer} presented no certificate (a source needs client-cert.pem and \
             client-key.pem in its tls-creds directory)"
        ),
        E::AlertReceived(a) => {
            let what = match a {
                AlertDescription::UnknownCA => {
                    "it does not trust the CA that signed our certificate"
                }
                AlertDescription::CertificateExpired => {
                    "it says our certificate has expired or is not valid yet"
                }
                AlertDescription::BadCertificate => {
                    "it rejected our certificate (for example, its name does not match)"
                }
                AlertDescription::CertificateRequired => "it requires a client certificate",
                AlertDescription::HandshakeFailure => "no TLS parameters in common",
                AlertDescription::ProtocolVersion => "it does not accept TLS 1.3",
                AlertDescription::BadRecordMac => {
                    "a record it received failed authentication (tampered or corrupted in transit)"
                }
                AlertDescription::DecodeError => "it could not decode a TLS message of ours",
                AlertDescription::AccessDenied => "access denied",
                _ => "",
            };
            if what.is_empty() {
                format!("the {peer} ended the session with TLS alert {a:?}")
            } else {
                format!("the {peer} ended the session: {what} (TLS alert {a:?})")
            }
        }
        E::DecryptError => format!(
            "a record from the {peer} failed authentication (tampered or corrupted in transit)"
        ),
        E::InvalidMessage(m) => format!("the {peer} sent a malformed TLS message ({m:?})"),
        E::PeerMisbehaved(m) => format!("the {peer} broke the TLS protocol ({m:?})"),
        E::InappropriateMessage { got_type, .. } => {
            format!("the {peer} sent an unexpected TLS message ({got_type:?})")
        }
        E::InappropriateHandshakeMessage { got_type, .. } => {
            format!("the {peer} sent an unexpected handshake message ({got_type:?})")
        }
        E::PeerIncompatible(m) => format!("the {peer} is incompatible ({m:?})"),
        other => format!("{other} (with the {peer})"),
    }
}

/// The subject of a certificate as an RFC 4514 distinguished name, most specific first.
fn distinguished_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = cert
        .subject()
        .iter_rdn()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|a| {
                    let ty = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                        .map(str::to_owned)
                        .unwrap_or_else(|_| a.attr_type().to_id_string());
                    format!("{ty}={}", escape(a.as_str().unwrap_or("#")))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Some(rdns.join(","))
}

/// RFC 4514 escaping of an attribute value.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl TlsStream {
    fn lock(&self) -> io::Result<MutexGuard<'_, Conn>> {
        self.conn
            .lock()
            .map_err(|_| io::Error::other("a thread using this TLS session panicked"))
    }

    /// The peer certificate's subject (RFC 4514), for `tls-authz`.
    pub fn peer_identity(&self) -> Option<String> {
        let mut g = self.conn.lock().ok()?;
        distinguished_name(g.common().peer_certificates()?.first()?)
    }

    /// The negotiated cipher suite, for logs.
    pub fn cipher_suite(&self) -> Option<String> {
        let mut g = self.conn.lock().ok()?;
        Some(format!(
            "{:?}",
            g.common().negotiated_cipher_suite()?.suite()
        ))
    }

    /// The TCP socket underneath (shut it down to cancel a blocked read or write).
    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Send close_notify, then shut down our sending direction.
    pub fn close(&self) -> io::Result<()> {
        {
            let mut g = self.lock()?;
            g.common().send_close_notify();
            g.io().flush()?;
        }
        self.socket.shutdown(Shutdown::Write)
    }

    /// Put a rustls error (wrapped in `e`) into words, keeping the error kind.
    fn explain(&self, e: io::Error) -> io::Error {
        if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return io::Error::new(e.kind(), describe(r, self.peer));
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return io::Error::new(
                e.kind(),
                format!(
                    "the {} closed the connection without a TLS close_notify (the stream may be truncated)",
                    self.peer
                ),
            );
        }
        e
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.lock()?.io().read(buf);
        r.map_err(|e| self.explain(e))
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.lock()?.io().write(buf);
        r.map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = self.lock()?.io().flush();
        r.map_err(|e| self.explain(e))
    }
}
