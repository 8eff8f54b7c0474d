//! The destination's page channels: the listener hands each one to the migration waiting for
//! its token ([`Book`]), and one thread per channel writes its pages into guest memory.

use super::{ChannelHello, Next, Torn, read_next};
use crate::MigrationError;
use crate::levers::Lever;
use crate::progress::{Patient, Progress};
use crate::protocol::{Kind, Msg};
use crate::ram::SharedRam;
use crate::transport::Channel;
use devstate::PAGE_SIZE;
use devstate::wire::RamKind;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};
use tracing::{error, info_span};

/// Migrations waiting for their page channels, by token.
#[derive(Debug, Default)]
pub struct Book {
    waiting: Mutex<HashMap<u64, SyncSender<(u16, Channel)>>>,
}

impl Book {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SyncSender<(u16, Channel)>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grant `count` channels under a new token; they are expected until the grant drops.
    pub(crate) fn grant(self: &Arc<Self>, count: u16) -> Grant {
        let (tx, rx) = sync_channel(super::MAX_CHANNELS as usize);
        let mut w = self.lock();
        let token = loop {
            let t = random_token();
            if t != 0 && !w.contains_key(&t) {
                break t;
            }
        };
        w.insert(token, tx);
        Grant {
            count,
            token,
            book: self.clone(),
            rx,
        }
    }

    /// Hand a page channel to the migration it names; refused when no migration waits for it.
    pub(crate) fn deliver(&self, hello: ChannelHello, ch: Channel) -> Result<(), String> {
        match self.lock().get(&hello.token) {
            Some(tx) => tx
                .try_send((hello.index, ch))
                .map_err(|_| "page channel arrived after its migration stopped waiting".into()),
            None => Err("page channel names no migration waiting here (unknown token)".into()),
        }
    }
}

fn random_token() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        // Channels are authenticated by TLS where it matters; the token only pairs them.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(b)
}

/// Page channels granted to one migration.
#[derive(Debug)]
pub(crate) struct Grant {
    /// How many.
    pub count: u16,
    /// The token they present.
    pub token: u64,
    book: Arc<Book>,
    rx: Receiver<(u16, Channel)>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.book.lock().remove(&self.token);
    }
}

impl Grant {
    /// Wait for channels `1..=count`, each within `timeout` of the previous one.
    pub fn collect(&self, timeout: Duration) -> Result<Vec<(u16, Channel)>, MigrationError> {
        collect(&self.rx, self.count, timeout)
    }
}

fn collect(
    rx: &Receiver<(u16, Channel)>,
    count: u16,
    timeout: Duration,
) -> Result<Vec<(u16, Channel)>, MigrationError> {
    let mut got: Vec<(u16, Channel)> = Vec::with_capacity(count as usize);
    while got.len() < count as usize {
        match rx.recv_timeout(timeout) {
            Ok((i, ch)) if i <= count && !got.iter().any(|(j, _)| *j == i) => got.push((i, ch)),
            Ok((i, _)) => {
                return Err(MigrationError::Protocol(format!(
                    "page channel {i} arrived twice or is beyond the {count} granted"
                )));
            }
            Err(_) => {
                return Err(MigrationError::Protocol(format!(
                    "only {} of {count} page channels connected within {} s",
                    got.len(),
                    timeout.as_secs()
                )));
            }
        }
    }
    got.sort_by_key(|(i, _)| *i);
    Ok(got)
}

/// The destination's page-channel threads of one migration.
pub(crate) struct Receivers<'scope> {
    handles: Vec<(u16, ScopedJoinHandle<'scope, Result<(), MigrationError>>)>,
    /// The channel that failed first (0: none). The others fail after it, as a consequence
    /// of the sockets being shut.
    first_failed: Arc<AtomicU16>,
}

impl<'scope> Receivers<'scope> {
    /// Start one writer thread per channel.
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        channels: Vec<(u16, Channel)>,
        ram: &'env dyn SharedRam,
        torn: &'env Torn,
        progress: &'env Progress,
        nice: u8,
    ) -> Receivers<'scope> {
        let first_failed = Arc::new(AtomicU16::new(0));
        let handles = channels
            .into_iter()
            .map(|(index, ch)| {
                let first = first_failed.clone();
                let h = scope.spawn(move || {
                    if nice > 0
                    && let Err(e) = super::set_thread_nice(i32::from(nice))
                {
                        tracing::warn!(channel = index, nice, error = %e, "page channel keeps its priority");
                    }
                    let res = serve(index, ch, ram, torn, progress);
                    if let Err(e) = &res {
                        let _ =
                            first.compare_exchange(0, index, Ordering::SeqCst, Ordering::SeqCst);
                        error!(channel = index, error = %crate::chain(e), "page channel failed");
                        // Wake the migration thread (and the other channels) at once.
                        progress.stop_reading();
                    }
                    res
                });
                (index, h)
            })
            .collect();
        Receivers {
            handles,
            first_failed,
        }
    }

    /// Wait for every thread; the error of the channel that failed first, named by channel.
    pub fn join(self) -> Result<(), MigrationError> {
        let failed_first = self.first_failed.load(Ordering::SeqCst);
        let mut first = None;
        for (index, h) in self.handles {
            let res = h.join().unwrap_or_else(|_| {
                Err(MigrationError::Protocol(
                    "page channel thread panicked".into(),
                ))
            });
            if let Err(e) = res
                && (first.is_none() || index == failed_first)
            {
                first = Some(MigrationError::PageChannel {
                    index,
                    source: Box::new(e),
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Write one channel's pages until its END record.
fn serve(
    index: u16,
    ch: Channel,
    ram: &dyn SharedRam,
    torn: &Torn,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let _s = info_span!("page-channel", index).entered();
    let io = |phase| move |source| MigrationError::Io { phase, source };
    let mut ret = ch.try_clone().map_err(io("RAM transfer"))?;
    // A small buffer: heads come through it, page bodies mostly straight from the socket.
    let mut r = BufReader::with_capacity(RECV_BUFFER, Patient::new(ch, progress, true));
    let direct = Lever::DirectReceive.on();
    let mut buf = Vec::new();
    let mut offset = 24u64;
    let mut records = 0u64;
    let mut write_time = Duration::ZERO;
    // Records that failed their body CRC since the last SYNC: reported with its answer, so the
    // source sends them again.
    let mut torn_here: Vec<(u64, u32)> = Vec::new();
    loop {
        let at = offset;
        let next = read_next(&mut r, at).map_err(MigrationError::Protocol)?;
        match next {
            Next::Ram(h) => {
                offset += super::HEAD as u64;
                let t = Instant::now();
                let bad = |why: String| {
                    MigrationError::Protocol(format!("RAM record at offset {at}: {why}"))
                };
                let len = h.pages as usize * PAGE_SIZE;
                let good = match h.kind {
                    RamKind::Zero => {
                        ram.zero(h.gpa, h.pages).map_err(bad)?;
                        true
                    }
                    RamKind::Data => {
                        let range = ram.host_range(h.gpa, len).map_err(bad)?;
                        let mut hasher = crc32fast::Hasher::new();
                        if direct {
                            // SAFETY: no vCPU runs during an incoming migration, and this
                            // thread is the only one writing these pages now (a page is in one
                            // record per pass; passes are separated by SYNC).
                            let dst = unsafe { range.into_mut() };
                            for piece in dst.chunks_mut(64 << 10) {
                                read_direct(&mut r, piece).map_err(|e| stopped(&e, at))?;
                                hasher.update(piece);
                            }
                        } else {
                            buf.resize(len, 0);
                            r.read_exact(&mut buf).map_err(|e| stopped(&e, at))?;
                            hasher.update(&buf);
                            // SAFETY: as above.
                            unsafe { range.into_mut() }.copy_from_slice(&buf);
                        }
                        ram.mark_written(h.gpa, len);
                        read_crc(&mut r, hasher.finalize(), at)?
                    }
                    RamKind::Sparse => {
                        buf.resize(h.body_len, 0);
                        r.read_exact(&mut buf).map_err(|e| stopped(&e, at))?;
                        let ok = read_crc(&mut r, crc32fast::hash(&buf), at)?;
                        if ok {
                            devstate::sparse::validate(&buf, h.pages).map_err(bad)?;
                            ram.write_sparse(h.gpa, h.pages, &buf).map_err(bad)?;
                        }
                        ok
                    }
                };
                if h.body_len > 0 {
                    offset += h.body_len as u64 + 4;
                }
                if good {
                    torn.clear(h.gpa, h.pages);
                } else {
                    torn_here.push((h.gpa, h.pages));
                    tracing::debug!(
                        gpa = h.gpa,
                        pages = h.pages,
                        at,
                        "torn RAM record; a later copy must replace it"
                    );
                    torn.mark(h.gpa, h.pages, index, at);
                }
                write_time += t.elapsed();
                records += 1;
                let zero = h.kind == RamKind::Zero;
                progress.update(|s| {
                    if zero {
                        s.zero_pages += u64::from(h.pages);
                    } else {
                        s.normal_pages += u64::from(h.pages);
                    }
                });
            }
            Next::Sync(pass) => {
                offset += 13;
                let mut m = Msg::new(Kind::Synced, pass);
                m.text = super::encode_torn(&torn_here)?;
                torn_here.clear();
                m.write(&mut ret).map_err(io("RAM transfer"))?;
            }
            Next::End(n) => {
                if n != records {
                    return Err(MigrationError::Protocol(format!(
                        "END record at offset {at} counts {n} records, {records} arrived"
                    )));
                }
                tracing::info!(
                    records,
                    write_ms = write_time.as_secs_f64() * 1e3,
                    "page channel complete"
                );
                return Ok(());
            }
        }
    }
}

/// Bytes a page channel reads ahead of the record it parses.
const RECV_BUFFER: usize = 16 << 10;

/// Fill `out` with what `r` holds already, then straight from its socket, so page bodies are
/// not copied through the buffer (`BufReader` reads directly only into requests at least as
/// large as its capacity, and only when empty).
fn read_direct<R: Read>(r: &mut BufReader<R>, out: &mut [u8]) -> std::io::Result<()> {
    let have = r.buffer().len().min(out.len());
    out[..have].copy_from_slice(&r.buffer()[..have]);
    r.consume(have);
    r.get_mut().read_exact(&mut out[have..])
}

/// Read a body CRC and compare it with `computed`.
fn read_crc(r: &mut impl Read, computed: u32, at: u64) -> Result<bool, MigrationError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|e| stopped(&e, at))?;
    Ok(u32::from_le_bytes(b) == computed)
}

fn stopped(e: &std::io::Error, at: u64) -> MigrationError {
    MigrationError::Protocol(super::read_failed(e, at))
}
