//! TCP relays on loopback between a migration source and its destination, each misbehaving
//! in one way on the first connection (the main channel): cut the link, stall it, reset it,
//! delay it, or lose replies. Later connections (page channels) pass through untouched.

use crate::TIMEOUT;
use migration::protocol::Kind;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A relay's listening address (`127.0.0.1:PORT`, what the source migrates to) and its thread.
pub type Relay = (String, thread::JoinHandle<()>);

/// A relay whose first connection (the main channel) runs `forward(source, destination)` and
/// `back(destination, source)` on their own threads, which decide what passes.
pub fn relay_with(
    to: String,
    forward: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
    back: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
) -> Relay {
    relay_on(to, 0, forward, back)
}

/// Like [`relay_with`], for connection `nth` (0 = main channel, 1 = the first page channel);
/// every other connection passes through untouched.
pub fn relay_on(
    to: String,
    nth: usize,
    forward: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
    back: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
) -> Relay {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let addr = l.local_addr().expect("relay address").to_string();
    let h = thread::spawn(move || {
        for _ in 0..nth {
            let (a, _) = l.accept().expect("the source never connected to the relay");
            let b = TcpStream::connect(&to)
                .unwrap_or_else(|e| panic!("the relay cannot reach the destination {to}: {e}"));
            splice(a, b);
        }
        let (a, _) = l.accept().expect("the source never opened that connection");
        pass_through(l, to.clone());
        let b = TcpStream::connect(&to)
            .unwrap_or_else(|e| panic!("the relay cannot reach the destination {to}: {e}"));
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back = thread::spawn(move || back(b2, a2));
        forward(a, b);
        let _ = back.join();
    });
    (addr, h)
}

/// Forward every further connection on `l` to `to`, both ways, untouched (page channels).
fn pass_through(l: TcpListener, to: String) {
    thread::spawn(move || {
        for a in l.incoming() {
            let (Ok(a), Ok(b)) = (a, TcpStream::connect(&to)) else {
                return;
            };
            splice(a, b);
        }
    });
}

/// Copy `a` <-> `b` on two threads until each direction ends.
fn splice(a: TcpStream, b: TcpStream) {
    for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut into);
            let _ = into.shutdown(Shutdown::Write);
        });
    }
}

/// Where [`cutting`] cuts the source -> destination direction.
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    /// After this many bytes.
    After(usize),
    /// Just before the first device-state section (the `cpu` section record).
    AtDeviceState,
}

/// Forwards both directions and cuts the link (both ways) as `cut` says.
pub fn cutting(to: String, cut: Cut) -> Relay {
    cutting_on(to, 0, cut)
}

/// Like [`cutting`], on connection `nth` (0 = main channel, 1 = the first page channel).
pub fn cutting_on(to: String, nth: usize, cut: Cut) -> Relay {
    let forward = move |mut a: TcpStream, mut b: TcpStream| {
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = 0usize;
        let mut tail: Vec<u8> = Vec::new();
        let marker = b"\x03\x03cpu";
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut keep = n;
            match cut {
                Cut::After(limit) if seen + n >= limit => keep = limit - seen,
                Cut::AtDeviceState => {
                    tail.extend_from_slice(&buf[..n]);
                    if let Some(p) = tail.windows(marker.len()).position(|w| w == marker) {
                        keep = n.saturating_sub(tail.len() - p);
                    }
                    let drop_to = tail.len().saturating_sub(marker.len());
                    tail.drain(..drop_to);
                }
                _ => {}
            }
            if b.write_all(&buf[..keep]).is_err() {
                break;
            }
            seen += keep;
            if keep < n {
                break;
            }
        }
        // Cut both directions.
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    relay_on(to, nth, forward, |mut b, mut a| {
        let _ = std::io::copy(&mut b, &mut a);
    })
}

/// Forwards the source's stream (COMMIT included) but passes only the first `keep` replies
/// of the destination (progress reports pass too and do not count), then hangs up on the
/// source.
pub fn losing_replies(to: String, keep: usize) -> Relay {
    let forward = |mut a: TcpStream, mut b: TcpStream| {
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(Shutdown::Write);
    };
    let back = move |mut b: TcpStream, mut a: TcpStream| {
        let mut left = keep;
        while left > 0 {
            // A control message: 16 bytes (u16 kind, u16, u32 text length, u64) + text.
            let mut head = [0u8; 16];
            if b.read_exact(&mut head).is_err() {
                break;
            }
            let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
            let mut text = vec![0u8; len];
            if b.read_exact(&mut text).is_err()
                || a.write_all(&head).is_err()
                || a.write_all(&text).is_err()
            {
                break;
            }
            if u16::from_le_bytes([head[0], head[1]]) != Kind::Received as u16 {
                left -= 1;
            }
        }
        // The destination's later replies (Committed) are lost: the source hears EOF.
        let _ = a.shutdown(Shutdown::Write);
        let _ = std::io::copy(&mut b, &mut std::io::sink());
    };
    relay_with(to, forward, back)
}

/// Delays every chunk in both directions by `delay` (a slow, long link).
pub fn delaying(to: String, delay: Duration) -> Relay {
    let pump = move |mut from: TcpStream, mut to: TcpStream| {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Simulated propagation delay (this is the network, not test synchronisation).
            thread::sleep(delay);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    };
    relay_with(to, pump, pump)
}

/// How a [`FaultRelay`] misbehaves once its byte budget went from source to destination.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Stop forwarding in both directions, keep both connections open until released.
    Stall,
    /// Reset both connections (RST, SO_LINGER 0).
    Reset,
}

/// A one-connection relay that forwards both ways, then stalls or resets the link.
#[derive(Debug)]
pub struct FaultRelay {
    /// Where the source migrates to (`127.0.0.1:PORT`).
    pub addr: String,
    release: Arc<(Mutex<bool>, Condvar)>,
    /// Set once the relay stopped forwarding.
    pub stalled: Arc<AtomicBool>,
    /// When the relay stopped forwarding.
    pub stalled_at: Arc<Mutex<Option<Instant>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

fn wait_release(release: &(Mutex<bool>, Condvar)) {
    let deadline = Instant::now() + TIMEOUT * 2;
    let mut g = release.0.lock().unwrap();
    while !*g {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the test never released the stalled relay");
        g = release.1.wait_timeout(g, left).unwrap().0;
    }
}

/// Makes the last close of `s` send an RST instead of a FIN.
fn reset(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized `linger` for SO_LINGER.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

impl FaultRelay {
    /// Relays to `to`; after `after` bytes from the source, misbehaves as `fault` says.
    pub fn start(to: String, after: usize, fault: Fault) -> FaultRelay {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = l.local_addr().expect("relay address").to_string();
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let stalled = Arc::new(AtomicBool::new(false));
        let stalled_at = Arc::new(Mutex::new(None));
        let (rel, st, st_at) = (release.clone(), stalled.clone(), stalled_at.clone());
        let main = thread::spawn(move || {
            let (mut a, _) = l.accept().expect("the source never connected to the relay");
            pass_through(l, to.clone());
            let mut b = TcpStream::connect(&to)
                .unwrap_or_else(|e| panic!("the relay cannot reach the destination {to}: {e}"));
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (rel2, st2) = (rel.clone(), st.clone());
            // Destination -> source: forwarded until the fault, then held.
            let back = thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match b2.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if st2.load(Ordering::SeqCst) || a2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                if st2.load(Ordering::SeqCst) {
                    wait_release(&rel2);
                }
            });
            let mut buf = vec![0u8; 64 << 10];
            let mut seen = 0usize;
            loop {
                let n = match a.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let keep = n.min(after - seen);
                if b.write_all(&buf[..keep]).is_err() {
                    break;
                }
                seen += keep;
                if seen == after {
                    match fault {
                        Fault::Stall => {
                            *st_at.lock().unwrap() = Some(Instant::now());
                            st.store(true, Ordering::SeqCst);
                            // Read nothing more, close nothing: a peer that went silent.
                            wait_release(&rel);
                        }
                        Fault::Reset => {
                            reset(&a);
                            reset(&b);
                        }
                    }
                    break;
                }
            }
            // Wake the backward thread (its read returns 0) so that it drops its clones:
            // only the last close of a socket with SO_LINGER 0 sends the RST.
            let _ = b.shutdown(Shutdown::Read);
            let _ = back.join();
            drop(a);
            drop(b);
        });
        FaultRelay {
            addr,
            release,
            stalled,
            stalled_at,
            threads: vec![main],
        }
    }

    /// Lets a stalled relay close its connections, and joins its threads.
    pub fn release(self) {
        *self.release.0.lock().unwrap() = true;
        self.release.1.notify_all();
        for t in self.threads {
            t.join().unwrap();
        }
    }
}
