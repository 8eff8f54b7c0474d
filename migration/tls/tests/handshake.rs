//! Handshakes over real loopback sockets with certificates made here: the happy path and
//! every refusal, each naming its cause on both sides.

use ferry_tls::testing::{Leaf, TestCa, Validity};
use ferry_tls::{Endpoint, TlsError, TlsStream, X509Creds, accept, connect};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

fn creds(dir: &Path, endpoint: Endpoint) -> X509Creds {
    X509Creds::load("tls0", dir, endpoint, true).expect("credentials load")
}

struct Pki {
    _tmp: tempfile::TempDir,
    server: X509Creds,
    client: X509Creds,
}

/// Server and client credentials from one CA (or the client's `client_ca`).
fn pki(server: Leaf, client: Leaf, client_ca: Option<&TestCa>) -> Pki {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Ferry test CA");
    ca.write(&tmp.path().join("server"), &server, true);
    client_ca
        .unwrap_or(&ca)
        .write(&tmp.path().join("client"), &client, false);
    if let Some(other) = client_ca {
        // The client trusts only its own CA.
        std::fs::write(tmp.path().join("client/ca-cert.pem"), other.cert_pem()).unwrap();
    }
    Pki {
        server: creds(&tmp.path().join("server"), Endpoint::Server),
        client: creds(&tmp.path().join("client"), Endpoint::Client),
        _tmp: tmp,
    }
}

fn timed(s: &TcpStream) {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
}

/// Run a server handshake (and `then` on success) beside a client handshake.
fn pair<T: Send + 'static>(
    server: &X509Creds,
    client: &X509Creds,
    hostname: &str,
    then: impl FnOnce(TlsStream) -> T + Send + 'static,
) -> (
    thread::JoinHandle<Result<T, TlsError>>,
    Result<TlsStream, TlsError>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = server.clone();
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        timed(&s);
        accept(s, &server).map(then)
    });
    let s = TcpStream::connect(addr).unwrap();
    timed(&s);
    (srv, connect(s, client, hostname))
}

#[test]
fn mutual_tls_carries_data_both_ways_and_names_the_client() {
    let mut client = Leaf::new("src.example.com");
    client.organisation = Some("Ferry".into());
    let p = pki(Leaf::new("dst"), client, None);
    let (srv, cli) = pair(&p.server, &p.client, "127.0.0.1", |mut s| {
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"world").unwrap();
        s.flush().unwrap();
        (s.peer_identity(), s.cipher_suite(), b)
    });
    let mut cli = cli.expect("client handshake");
    cli.write_all(b"hello").unwrap();
    cli.flush().unwrap();
    let mut b = [0u8; 5];
    cli.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"world");
    let (id, suite, got) = srv.join().unwrap().expect("server handshake");
    assert_eq!(&got, b"hello");
    assert_eq!(id.as_deref(), Some("O=Ferry,CN=src.example.com"));
    assert!(suite.unwrap().starts_with("TLS13_"));
    assert_eq!(cli.peer_identity().as_deref(), Some("CN=dst"));
}

/// The client's view of a refusal: at the handshake, or (TLS 1.3 finishes the client first)
/// at its first read.
fn client_error(cli: Result<TlsStream, TlsError>) -> String {
    match cli {
        Err(e) => e.to_string(),
        Ok(mut s) => {
            let mut b = [0u8; 1];
            s.read(&mut b).expect_err("the server refused").to_string()
        }
    }
}

#[test]
fn a_server_from_an_unknown_ca_is_refused_by_the_client() {
    let other = TestCa::new("Other CA");
    let p = pki(Leaf::new("dst"), Leaf::new("src"), Some(&other));
    let (srv, cli) = pair(&p.server, &p.client, "localhost", |_| ());
    let c = cli.unwrap_err().to_string();
    assert!(
        c.contains("destination's certificate was rejected") && c.contains("UnknownIssuer"),
        "{c}"
    );
    let s = srv.join().unwrap().unwrap_err().to_string();
    assert!(
        s.contains("does not trust the CA") || s.contains("UnknownCA"),
        "{s}"
    );
}

#[test]
fn an_expired_or_future_client_certificate_is_refused_by_the_server() {
    for validity in [Validity::Expired, Validity::NotYetValid] {
        let mut client = Leaf::new("src");
        client.validity = validity;
        let p = pki(Leaf::new("dst"), client, None);
        let (srv, cli) = pair(&p.server, &p.client, "localhost", |_| ());
        let s = srv.join().unwrap().unwrap_err().to_string();
        let want = if validity == Validity::Expired {
            "expired"
        } else {
            "not valid yet"
        };
        assert!(
            s.contains("source's certificate was rejected") && s.contains(want),
            "{s}"
        );
        let c = client_error(cli);
        assert!(c.contains("has expired or is not valid yet"), "{c}");
    }
}

#[test]
fn a_hostname_mismatch_is_refused_by_the_client() {
    let mut server = Leaf::new("dst");
    server.names = vec!["dst.example.com".into()];
    let p = pki(server, Leaf::new("src"), None);
    let (srv, cli) = pair(&p.server, &p.client, "other.example.com", |_| ());
    let c = cli.unwrap_err().to_string();
    assert!(
        c.contains("rejected") && c.contains("other.example.com"),
        "{c}"
    );
    let s = srv.join().unwrap().unwrap_err().to_string();
    assert!(s.contains("rejected our certificate"), "{s}");
}

#[test]
fn a_plain_peer_is_told_apart_from_a_tls_one_on_both_sides() {
    let p = pki(Leaf::new("dst"), Leaf::new("src"), None);
    // A plain client: the server leaves its bytes in the socket.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut plain = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    plain
        .write_all(b"FERRYMIG\x01\x00\x00\x00\x00\x00\x00\x00")
        .unwrap();
    let (s, _) = l.accept().unwrap();
    timed(&s);
    let keep = s.try_clone().unwrap();
    match accept(s, &p.server) {
        Err(TlsError::NotTls { peer, first_bytes }) => {
            assert_eq!(peer, "source");
            assert!(first_bytes.starts_with(b"FERRYMIG"));
        }
        other => panic!("expected NotTls, got {other:?}"),
    }
    let mut b = [0u8; 16];
    (&keep).read_exact(&mut b).unwrap();
    assert!(b.starts_with(b"FERRYMIG"), "bytes stay for a plain answer");
    // A plain server answering a TLS client.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let srv = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"\x05\x00\x00\x00plain refusal").unwrap();
        hello
    });
    let c = TcpStream::connect(addr).unwrap();
    timed(&c);
    match connect(c, &p.client, "localhost") {
        Err(TlsError::NotTls { peer, first_bytes }) => {
            assert_eq!(peer, "destination");
            assert!(first_bytes.starts_with(b"\x05\x00\x00\x00plain"));
        }
        other => panic!("expected NotTls, got {other:?}"),
    }
    assert_eq!(srv.join().unwrap()[0], 0x16, "the client spoke TLS");
}

#[test]
fn a_stalled_or_truncated_handshake_ends_within_the_timeout() {
    let p = pki(Leaf::new("dst"), Leaf::new("src"), None);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // Stalls: connects and says nothing.
    let silent = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(matches!(
        accept(s, &p.server),
        Err(TlsError::Timeout { peer: "source" })
    ));
    drop(silent);
    // Truncated: the start of a ClientHello record, then the connection closes.
    let mut half = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let (s, _) = l.accept().unwrap();
    timed(&s);
    let e = accept(s, &p.server).unwrap_err().to_string();
    assert!(
        e.contains("closed the connection during the handshake"),
        "{e}"
    );
    // Garbage that starts like a handshake record but is not one.
    let mut junk = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    junk.write_all(&[0x16, 0x03, 0x03, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7])
        .unwrap();
    let (s, _) = l.accept().unwrap();
    timed(&s);
    let e = accept(s, &p.server).unwrap_err().to_string();
    assert!(e.contains("TLS handshake with the source failed"), "{e}");
}

#[test]
fn an_oversized_client_certificate_is_refused_without_a_panic() {
    // rustls will not load such a certificate into client credentials (webpki's DER lengths
    // stop at 64 KiB), so a bare rustls client presents it.
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let p = pki(Leaf::new("dst"), Leaf::new("src"), None);
    let ca = TestCa::new("Ferry test CA");
    let mut big = Leaf::new("src");
    big.padding = 1 << 20;
    let (cert, key) = ca.leaf(&big, false);
    let cert = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    assert!(cert.len() > 1 << 20);
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
        .unwrap();
    let certified = rustls::sign::CertifiedKey::new(vec![cert], key);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnyServer))
        .with_client_cert_resolver(std::sync::Arc::new(rustls::sign::SingleCertAndKey::from(
            certified,
        )));
    let (e, _) = against_bare_client(&p.server, config);
    assert!(
        e.contains("TLS handshake with the source failed") && e.contains("TooLarge"),
        "{e}"
    );
}

#[test]
fn a_flipped_ciphertext_byte_is_rejected() {
    let p = pki(Leaf::new("dst"), Leaf::new("src"), None);
    let (srv, cli) = pair(&p.server, &p.client, "localhost", |s| s);
    let mut srv = srv.join().unwrap().unwrap();
    let cli = cli.unwrap();
    // Write a record's worth of bytes through the client's socket by hand: encrypt with the
    // session, then corrupt on the wire by sending through a second socket handle.
    let mut w = cli.clone();
    w.write_all(&[7u8; 1000]).unwrap();
    w.flush().unwrap();
    let mut b = vec![0u8; 1000];
    srv.read_exact(&mut b).unwrap();
    assert_eq!(b, vec![7u8; 1000]);
    // A record of random bytes with a valid header: authentication must fail.
    let mut raw = cli.socket().try_clone().unwrap();
    let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    rec.extend_from_slice(&[0x5a; 0x40]);
    raw.write_all(&rec).unwrap();
    let e = srv.read(&mut b).unwrap_err().to_string();
    assert!(e.contains("failed authentication"), "{e}");
}

#[test]
fn credentials_errors_name_the_object_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let e = X509Creds::load("tls0", tmp.path(), Endpoint::Server, true).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "tls-creds-x509 'tls0': cannot read {}/ca-cert.pem",
            tmp.path().display()
        )
    );
    let ca = TestCa::new("ca");
    ca.write(tmp.path(), &Leaf::new("src"), false);
    let e = X509Creds::load("tls0", tmp.path(), Endpoint::Server, true).unwrap_err();
    assert!(e.to_string().contains("server-cert.pem"), "{e}");
    std::fs::write(tmp.path().join("client-key.pem"), "not a key").unwrap();
    let e = X509Creds::load("tls0", tmp.path(), Endpoint::Client, true).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("client-key.pem holds no PEM private key"),
        "{e}"
    );
    // A key of another certificate.
    let (_, other_key) = ca.leaf(&Leaf::new("x"), false);
    std::fs::write(tmp.path().join("client-key.pem"), other_key).unwrap();
    let e = X509Creds::load("tls0", tmp.path(), Endpoint::Client, true).unwrap_err();
    assert!(e.to_string().contains("do not make a usable pair"), "{e}");
    ca.write(tmp.path(), &Leaf::new("src"), false);
    let e = X509Creds::load("tls0", tmp.path(), Endpoint::Client, false).unwrap_err();
    assert!(
        e.to_string().contains("verify-peer=off is not supported"),
        "{e}"
    );
}

/// A verifier that trusts any server: only for presenting a hand-made client certificate.
#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn nothing_is_read_after_close_notify() {
    let p = pki(Leaf::new("dst"), Leaf::new("src"), None);
    // Relay server -> client that appends a forged record after everything the server sent.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = l.local_addr().unwrap();
    let inner = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr = inner.local_addr().unwrap();
    let relay = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(server_addr).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let up = thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut s2);
        });
        let _ = std::io::copy(&mut s, &mut c);
        let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        forged.extend_from_slice(&[0x41; 0x20]);
        let _ = c.write_all(&forged);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
    });
    let server = p.server.clone();
    let srv = thread::spawn(move || {
        let (s, _) = inner.accept().unwrap();
        timed(&s);
        let mut t = accept(s, &server).unwrap();
        t.write_all(b"abc").unwrap();
        t.flush().unwrap();
        t.close().unwrap();
    });
    let s = TcpStream::connect(relay_addr).unwrap();
    timed(&s);
    let mut cli = connect(s, &p.client, "localhost").unwrap();
    let mut got = Vec::new();
    let r = cli.read_to_end(&mut got);
    assert_eq!(got, b"abc", "{r:?}");
    let mut b = [0u8; 64];
    assert!(
        !matches!(cli.read(&mut b), Ok(n) if n > 0),
        "data after close_notify"
    );
    srv.join().unwrap();
    // The relay's client -> server half ends when the client goes.
    drop(cli);
    relay.join().unwrap();
}

#[test]
fn a_silent_destination_times_out_the_source() {
    let p = pki(Leaf::new("dst"), Leaf::new("src"), None);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (_held, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(matches!(
        connect(s, &p.client, "localhost"),
        Err(TlsError::Timeout {
            peer: "destination"
        })
    ));
}

#[test]
fn a_tls_1_2_client_is_refused() {
    // TLS 1.2 is the version with renegotiation; Ferry speaks only TLS 1.3.
    let p = pki(Leaf::new("dst"), Leaf::new("src"), None);
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnyServer))
    .with_no_client_auth();
    let (e, c) = against_bare_client(&p.server, config);
    assert!(e.contains("TLS handshake with the source failed"), "{e}");
    let c = c.expect("the client hears the refusal");
    assert!(
        c.contains("ProtocolVersion") || c.contains("HandshakeFailure"),
        "{c}"
    );
}

/// A server handshake against a bare rustls client built from `config`: the server's error,
/// and the client's (if it got one) when it tried to send a byte and read a reply.
fn against_bare_client(
    server: &X509Creds,
    config: rustls::ClientConfig,
) -> (String, Option<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let cli = thread::spawn(move || {
        let s = TcpStream::connect(addr).unwrap();
        timed(&s);
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, s);
        let mut b = [0u8; 1];
        tls.write_all(b"x")
            .and_then(|_| tls.flush())
            .and_then(|_| tls.read(&mut b).map(|_| ()))
            .err()
            .map(|e| e.to_string())
    });
    let (s, _) = l.accept().unwrap();
    timed(&s);
    let e = accept(s, server).unwrap_err().to_string();
    (e, cli.join().unwrap())
}
