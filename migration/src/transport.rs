//! Migration URIs, channels (plain TCP or TLS) and the `--dump-stream` tee.

use crate::protocol::{Kind, Msg};
use crate::{MigrationError, TlsParams};
use ferry_tls::{TlsError, TlsStream};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where a migration goes to or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `file:PATH`.
    File(PathBuf),
    /// `fd:NAME`: a descriptor the VMM was handed (QMP `getfd`), carried in
    /// [`Params::stream_fd`](crate::Params::stream_fd).
    Fd(String),
}

/// The descriptor an `fd:` migration writes its stream to (at its current offset, as QEMU).
#[derive(Clone, Debug)]
pub struct PassedFd(std::sync::Arc<File>);

impl PassedFd {
    pub fn new(f: File) -> PassedFd {
        PassedFd(std::sync::Arc::new(f))
    }

    /// A handle writing to the descriptor.
    pub fn writer(&self, name: &str) -> Result<File, MigrationError> {
        self.0.try_clone().map_err(|source| MigrationError::Open {
            target: format!("fd:{name}"),
            source,
        })
    }

    /// The descriptor as a connected TCP socket (libvirt connects to the destination itself
    /// and passes the socket), or `None` if it is not a socket. A socket of another family
    /// is refused: the migration protocol's return path needs TCP.
    pub fn tcp_stream(&self, name: &str) -> Result<Option<TcpStream>, MigrationError> {
        use std::os::unix::fs::FileTypeExt;
        let open_err = |source| MigrationError::Open {
            target: format!("fd:{name}"),
            source,
        };
        if !self.0.metadata().map_err(open_err)?.file_type().is_socket() {
            return Ok(None);
        }
        let s = TcpStream::from(std::os::fd::OwnedFd::from(self.writer(name)?));
        match s.peer_addr() {
            Ok(_) => Ok(Some(s)),
            Err(e) => Err(MigrationError::BadUri(format!(
                "fd:{name} (a socket that is not a connected TCP socket: {e})"
            ))),
        }
    }
}

impl PartialEq for PassedFd {
    fn eq(&self, other: &PassedFd) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PassedFd {}

impl Uri {
    /// Parse `tcp:HOST:PORT` (IPv6 hosts in brackets), `file:PATH` or `fd:NAME`.
    pub fn parse(s: &str) -> Result<Uri, MigrationError> {
        let bad = || MigrationError::BadUri(s.to_owned());
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            Ok(Uri::Tcp(rest.to_owned()))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(bad());
            }
            Ok(Uri::File(PathBuf::from(path)))
        } else if let Some(name) = s.strip_prefix("fd:").filter(|n| !n.is_empty()) {
            Ok(Uri::Fd(name.to_owned()))
        } else {
            Err(bad())
        }
    }

    /// The host part of a TCP URI (brackets of an IPv6 address removed): what the
    /// destination's certificate must name when `tls-hostname` is not set.
    pub fn host(&self) -> Option<&str> {
        let Uri::Tcp(a) = self else { return None };
        let (host, _) = a.rsplit_once(':')?;
        Some(host.trim_start_matches('[').trim_end_matches(']'))
    }

    /// Resolve a TCP address.
    pub fn socket_addr(&self) -> Result<SocketAddr, MigrationError> {
        let Uri::Tcp(a) = self else {
            return Err(MigrationError::BadUri(format!("{self:?}")));
        };
        a.to_socket_addrs()
            .map_err(|source| MigrationError::Open {
                target: a.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| MigrationError::BadUri(a.clone()))
    }
}

/// Bind the incoming listener to exactly the address given (never a wildcard it was not
/// asked for).
pub fn listen(uri: &Uri) -> Result<TcpListener, MigrationError> {
    let addr = uri.socket_addr()?;
    TcpListener::bind(addr).map_err(|source| MigrationError::Open {
        target: addr.to_string(),
        source,
    })
}

/// Connect to a destination.
pub fn connect(uri: &Uri, timeout: std::time::Duration) -> Result<TcpStream, MigrationError> {
    let addr = uri.socket_addr()?;
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|source| MigrationError::Open {
        target: addr.to_string(),
        source,
    })?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// A connected migration channel: plain TCP, or one TLS session over it. Clones share the
/// connection (the forward stream and the return path).
#[derive(Debug)]
pub enum Channel {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutual TLS 1.3.
    Tls(TlsStream),
}

impl From<TcpStream> for Channel {
    fn from(s: TcpStream) -> Channel {
        Channel::Plain(s)
    }
}

impl Channel {
    /// The TCP socket underneath (timeouts, shutdown to cancel).
    pub fn socket(&self) -> &TcpStream {
        match self {
            Channel::Plain(s) => s,
            Channel::Tls(t) => t.socket(),
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(match self {
            Channel::Plain(s) => Channel::Plain(s.try_clone()?),
            Channel::Tls(t) => Channel::Tls(t.clone()),
        })
    }

    /// End our sending direction (TLS: close_notify first).
    pub fn close_write(&self) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.shutdown(Shutdown::Write),
            Channel::Tls(t) => t.close(),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.read(buf),
            Channel::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.write(buf),
            Channel::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.flush(),
            Channel::Tls(t) => t.flush(),
        }
    }
}

/// Run the source's TLS handshake on a connected socket. A destination that answers in
/// Ferry's plain protocol (it has no TLS set up) is reported with its own words.
pub fn tls_connect(sock: TcpStream, tls: &TlsParams, uri: &Uri) -> Result<Channel, MigrationError> {
    let host = tls.hostname.as_deref().or(uri.host()).unwrap_or_default();
    match ferry_tls::connect(sock, &tls.creds, host) {
        Ok(t) => Ok(Channel::Tls(t)),
        Err(TlsError::NotTls { peer, first_bytes }) => match Msg::read(&mut &first_bytes[..]) {
            Ok(m) if matches!(m.kind, Kind::Refuse | Kind::Failed) => {
                Err(MigrationError::Refused(format!(
                    "it is not set up for TLS and answered in plain text: {}",
                    m.text
                )))
            }
            _ => Err(TlsError::NotTls { peer, first_bytes }.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// Half-close and read what the peer still sends until it closes, for at most a second:
/// closing a socket with unread data sends a reset, which can discard our last message
/// before the peer reads it.
pub(crate) fn close_gracefully(ch: &mut Channel) {
    let _ = ch.close_write();
    let _ = ch
        .socket()
        .set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match ch.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Open a stream file for writing.
pub fn create_file(path: &PathBuf) -> Result<File, MigrationError> {
    File::create(path).map_err(|source| MigrationError::Open {
        target: path.display().to_string(),
        source,
    })
}

/// Open a capture file for `--dump-stream PATH`: PATH itself for the first stream, then
/// `PATH.1`, `PATH.2`, ... so that a later stream never overwrites an earlier capture.
pub fn create_capture(path: &std::path::Path) -> Result<File, MigrationError> {
    let mut candidate = path.to_path_buf();
    for n in 1..=10_000u32 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                candidate = PathBuf::from(format!("{}.{n}", path.display()));
            }
            Err(source) => {
                return Err(MigrationError::Open {
                    target: candidate.display().to_string(),
                    source,
                });
            }
        }
    }
    Err(MigrationError::Open {
        target: path.display().to_string(),
        source: io::Error::new(io::ErrorKind::AlreadyExists, "too many captures"),
    })
}

/// A writer that also copies everything into an optional capture file.
#[derive(Debug)]
pub struct TeeWriter<W: Write> {
    inner: W,
    copy: Option<File>,
}

impl<W: Write> TeeWriter<W> {
    /// Write to `inner`, and to `copy` when given.
    pub fn new(inner: W, copy: Option<File>) -> Self {
        TeeWriter { inner, copy }
    }
}

impl<W: Write> Write for TeeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(c) = &mut self.copy {
            c.write_all(&buf[..n])?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if let Some(c) = &mut self.copy {
            c.flush()?;
        }
        self.inner.flush()
    }
}

/// A reader that copies everything it hands out into an optional capture file.
#[derive(Debug)]
pub struct TeeReader<R: Read> {
    inner: R,
    copy: Option<File>,
}

impl<R: Read> TeeReader<R> {
    /// Read from `inner`, copying into `copy` when given.
    pub fn new(inner: R, copy: Option<File>) -> Self {
        TeeReader { inner, copy }
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = &mut self.copy {
            c.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_never_overwrite() {
        let dir = std::env::temp_dir().join(format!("ferry-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.stream");
        for _ in 0..3 {
            create_capture(&p).unwrap();
        }
        assert!(p.exists() && dir.join("s.stream.1").exists() && dir.join("s.stream.2").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uris() {
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:4444").unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Uri::parse("tcp:[::1]:4444").unwrap(),
            Uri::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            Uri::parse("file:/tmp/x").unwrap(),
            Uri::File("/tmp/x".into())
        );
        assert_eq!(Uri::parse("fd:migrate").unwrap(), Uri::Fd("migrate".into()));
        assert_eq!(Uri::parse("tcp:[::1]:1").unwrap().host(), Some("::1"));
        assert_eq!(
            Uri::parse("tcp:dst.example.com:1").unwrap().host(),
            Some("dst.example.com")
        );
        for bad in [
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "exec:cat",
            "file:",
            "fd:",
            "unix:/x",
        ] {
            let e = Uri::parse(bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "Invalid migration URI '{bad}': expected tcp:HOST:PORT, file:PATH or fd:NAME"
                )
            );
        }
    }
}
