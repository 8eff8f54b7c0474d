//! The destination's listener: connections are accepted, and their TLS handshakes and
//! `tls-authz` checks run, on threads of their own, so a peer that stalls or fails never holds
//! up the legitimate source; only established channels reach the migration thread. A page
//! channel ([`crate::pages`]) goes to the migration that granted it instead.

use crate::destination::Accepted;
use crate::pages::{Book, CHANNEL_MAGIC, ChannelHello};
use crate::protocol::{HELLO_MAGIC, Hello, Kind, Msg};
use crate::transport::{Channel, close_gracefully};
use crate::{Params, TlsParams};
use ferry_tls::TlsError;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;
use tracing::{info, warn};

/// Most connections in their handshake (or waiting for the migration thread) at once; more
/// are closed as they arrive.
pub const MAX_PENDING: usize = 16;

/// The parameters that apply to a connection arriving now (the TLS setup among them), or why
/// none can be accepted.
pub type ParamsFn = dyn Fn() -> Result<Params, String> + Send + Sync;
/// Told why a connection was turned away before it reached the migration thread.
pub type RefusedFn = dyn Fn(&str) + Send + Sync;

/// Accepts incoming migration connections on a listener until dropped.
#[derive(Debug)]
pub struct Acceptor {
    ready: Receiver<Accepted>,
    closed: Arc<AtomicBool>,
    wake: SocketAddr,
}

impl Acceptor {
    /// Start accepting on `listener`. `params` is asked once per connection; `refused` hears
    /// every connection turned away, with the reason.
    pub fn spawn(
        listener: TcpListener,
        params: Arc<ParamsFn>,
        refused: Arc<RefusedFn>,
    ) -> io::Result<Acceptor> {
        let mut wake = listener.local_addr()?;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let (tx, ready) = sync_channel(0);
        let closed = Arc::new(AtomicBool::new(false));
        let stop = closed.clone();
        let book = Arc::new(Book::default());
        std::thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || accept_loop(listener, &stop, &tx, &params, &refused, &book))?;
        Ok(Acceptor {
            ready,
            closed,
            wake,
        })
    }

    /// The next connection ready for a migration; `None` once the listener has failed.
    pub fn next(&self) -> Option<Accepted> {
        self.ready.recv().ok()
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        // Wake the blocked accept() so the listener closes now.
        self.closed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.wake, Duration::from_secs(1));
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: &AtomicBool,
    tx: &SyncSender<Accepted>,
    params: &Arc<ParamsFn>,
    refused: &Arc<RefusedFn>,
    book: &Arc<Book>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let s = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accepting a migration connection failed");
                continue;
            }
        };
        let peer = s
            .peer_addr()
            .map_or_else(|_| "unknown".into(), |a| a.to_string());
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            pending.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, "closed a migration connection: {MAX_PENDING} others are pending");
            continue;
        }
        let (tx, params, refused, done, book) = (
            tx.clone(),
            params.clone(),
            refused.clone(),
            pending.clone(),
            book.clone(),
        );
        let who = peer.clone();
        let spawned = std::thread::Builder::new()
            .name("migration-handshake".into())
            .spawn(move || {
                match establish(s, &*params).and_then(|ch| route(ch, &book)) {
                    Ok(Some(a)) => {
                        // Blocks while a migration runs; fails once the listener is closed.
                        let _ = tx.send(a);
                    }
                    Ok(None) => {}
                    Err(why) => {
                        warn!(peer = %who, reason = %why, "refused a migration connection");
                        refused(&why);
                    }
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            pending.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, error = %e, "cannot start a handshake thread");
        }
    }
}

/// Read a connection's first bytes: a page channel goes to its migration (`None`), anything
/// else to the migration thread, which parses the hello.
fn route(mut ch: Channel, book: &Arc<Book>) -> Result<Option<Accepted>, String> {
    let mut first = [0u8; 16];
    if let Err(e) = ch.read_exact(&mut first) {
        close_gracefully(&mut ch);
        return Err(format!("handshake failed: no hello arrived: {e}"));
    }
    if first[..8] != CHANNEL_MAGIC {
        return Ok(Some(Accepted {
            channel: ch,
            first,
            book: book.clone(),
        }));
    }
    let mut rest = [0u8; 8];
    let hello = ch
        .read_exact(&mut rest)
        .map_err(|e| format!("page channel hello cut short: {e}"))
        .and_then(|()| ChannelHello::parse(&first, &rest));
    match hello {
        Ok(h) => {
            // Refused (unknown token, or too late): the channel is dropped, i.e. closed.
            book.deliver(h, ch)?;
            info!(channel = h.index, "page channel connected");
            Ok(None)
        }
        Err(why) => {
            close_gracefully(&mut ch);
            Err(why)
        }
    }
}

/// Set up one connection: plain, or TLS with the client's name checked.
fn establish(s: TcpStream, params: &ParamsFn) -> Result<Channel, String> {
    let p = match params() {
        Ok(p) => p,
        Err(why) => {
            refuse_plain(s, &why);
            return Err(why);
        }
    };
    s.set_read_timeout(Some(p.io_timeout)).ok();
    s.set_write_timeout(Some(p.io_timeout)).ok();
    s.set_nodelay(true).ok();
    let Some(tls) = &p.tls else {
        return Ok(Channel::Plain(s));
    };
    establish_tls(s, tls)
}

fn establish_tls(s: TcpStream, tls: &TlsParams) -> Result<Channel, String> {
    let raw = s
        .try_clone()
        .map_err(|e| format!("cannot use the connection: {e}"))?;
    match ferry_tls::accept(s, &tls.creds) {
        Ok(t) => {
            let who = t.peer_identity();
            let mut ch = Channel::Tls(t.clone());
            if let Some((id, authz)) = &tls.authz {
                let name = who.as_deref().unwrap_or("(none)");
                if !authz.is_allowed(name) {
                    let why =
                        format!("client certificate '{name}' is not allowed by tls-authz '{id}'");
                    refuse_on(&mut ch, &why);
                    return Err(why);
                }
            }
            info!(
                source = who.unwrap_or_default(),
                suite = t.cipher_suite().unwrap_or_default(),
                "TLS session established"
            );
            Ok(ch)
        }
        Err(TlsError::NotTls { first_bytes, .. })
            if first_bytes.len() >= 8 && first_bytes[..8] == HELLO_MAGIC =>
        {
            // A plain Ferry source: answer in its own protocol.
            let why = format!(
                "this destination requires TLS (tls-creds '{}'); the source connected without it",
                tls.creds.id()
            );
            refuse_on(&mut Channel::Plain(raw), &why);
            Err(why)
        }
        Err(e) => Err(crate::chain(&e)),
    }
}

/// Read the source's Hello, answer Refuse with `why`, and close.
fn refuse_on(ch: &mut Channel, why: &str) {
    if Hello::read(ch).is_ok() {
        let _ = Msg::with_text(Kind::Refuse, why).write(ch);
    }
    close_gracefully(ch);
}

/// Refuse before any TLS: only a plain source can read it; a TLS one sees a non-TLS answer
/// and reports its text.
fn refuse_plain(s: TcpStream, why: &str) {
    s.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let mut first = [0u8; 8];
    let plain = matches!(s.peek(&mut first), Ok(8) if first == HELLO_MAGIC);
    let mut ch = Channel::Plain(s);
    if plain {
        refuse_on(&mut ch, why);
    } else {
        let _ = Msg::with_text(Kind::Refuse, why).write(&mut ch);
        close_gracefully(&mut ch);
    }
}
