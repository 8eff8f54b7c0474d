//! The source's page channels: one thread per channel reads pages straight from guest memory,
//! detects zero and sparse pages, encodes and sends them.

use super::{ChannelHello, TAG_SYNC, encode_head, encode_marker};
use crate::levers::Lever;
use crate::progress::Progress;
use crate::protocol::{Kind, Msg};
use crate::ram::SharedRam;
use crate::transport::Channel;
use crate::{MigrationError, chain};
use devstate::PAGE_SIZE;
use devstate::sparse::{MAX_SPARSE_BLOCKS, block_mask};
use devstate::wire::{RamKind, Tag};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};
use tracing::info_span;

/// Most pages in one job (one RAM record at most per run of same-class pages).
pub(crate) const CHUNK_PAGES: usize = devstate::stream::MAX_DATA_PAGES as usize;
/// Jobs queued per channel before the dispatcher waits.
const QUEUE: usize = 4;

enum Job {
    Run { gpa: u64, pages: usize },
    Sync(u64),
    End,
}

/// Figures every channel adds to, read by the migration thread.
#[derive(Debug)]
pub(crate) struct Meter {
    /// Bytes written to all channels.
    pub wire_bytes: AtomicU64,
    /// Page bytes sent with data (DATA and SPARSE), the unit of the bandwidth estimate.
    pub data_bytes: AtomicU64,
    /// Pages put in records.
    pub pages: AtomicU64,
    /// Throttle window: when it started and the wire bytes then.
    window: Mutex<(Instant, u64)>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            wire_bytes: AtomicU64::new(0),
            data_bytes: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            window: Mutex::new((Instant::now(), 0)),
        }
    }
}

impl Meter {
    /// Start a new throttling window (an iteration, or stop-and-copy).
    pub fn start_window(&self) {
        *self.window.lock().unwrap_or_else(|p| p.into_inner()) =
            (Instant::now(), self.wire_bytes.load(Ordering::SeqCst));
    }

    /// Sleep just enough to keep all channels together under `cap` bytes/s.
    fn throttle(&self, cap: u64) {
        if cap == 0 {
            return;
        }
        let (start, base) = *self.window.lock().unwrap_or_else(|p| p.into_inner());
        let sent = self.wire_bytes.load(Ordering::SeqCst).saturating_sub(base) as f64;
        let due = Duration::from_secs_f64(sent / cap as f64);
        let spent = start.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }
}

/// The source's page channels of one migration.
pub(crate) struct Senders<'scope> {
    jobs: Vec<SyncSender<Job>>,
    /// The channels' sockets, shut down if the migration fails (so no thread stays blocked).
    sockets: Vec<std::net::TcpStream>,
    finished: bool,
    acks: Receiver<Result<Vec<(u64, u32)>, MigrationError>>,
    handles: Vec<ScopedJoinHandle<'scope, ()>>,
    next: usize,
    timeout: Duration,
    /// Shared counters.
    pub meter: Arc<Meter>,
}

fn channel_err(index: u16) -> impl FnOnce(MigrationError) -> MigrationError {
    move |e| MigrationError::PageChannel {
        index,
        source: Box::new(e),
    }
}

impl<'scope> Senders<'scope> {
    /// Open the channels (their hellos written) and start a thread for each.
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        channels: Vec<Channel>,
        token: u64,
        ram: Arc<dyn SharedRam>,
        sparse: bool,
        progress: &'env Progress,
        params: &crate::Params,
    ) -> Result<Senders<'scope>, MigrationError> {
        let (timeout, nice) = (params.io_timeout, params.page_nice());
        let (ack_tx, acks) = std::sync::mpsc::channel();
        let meter = Arc::new(Meter::default());
        meter.start_window();
        let mut s = Senders {
            jobs: Vec::new(),
            sockets: Vec::new(),
            finished: false,
            acks,
            handles: Vec::new(),
            next: 0,
            timeout,
            meter,
        };
        for (i, mut ch) in channels.into_iter().enumerate() {
            let index = i as u16 + 1;
            ch.write_all(&ChannelHello { index, token }.encode())
                .map_err(|source| MigrationError::Io {
                    phase: "opening a page channel",
                    source,
                })
                .map_err(channel_err(index))?;
            if let Ok(sock) = ch.socket().try_clone() {
                s.sockets.push(sock);
            }
            let (tx, rx) = sync_channel(QUEUE);
            let w = Worker {
                index,
                ch,
                ram: ram.clone(),
                sparse,
                progress,
                meter: s.meter.clone(),
                acks: ack_tx.clone(),
            };
            s.jobs.push(tx);
            s.handles.push(scope.spawn(move || {
                if nice > 0
                    && let Err(e) = super::set_thread_nice(i32::from(nice))
                {
                    tracing::warn!(channel = index, nice, error = %e, "page channel keeps its priority");
                }
                w.run(rx)
            }));
        }
        Ok(s)
    }

    /// The first error a channel reported, or `fallback`.
    fn failure(&self, fallback: MigrationError) -> MigrationError {
        match self.acks.try_recv() {
            Ok(Err(e)) => e,
            _ => fallback,
        }
    }

    /// Queue `pages` pages from `gpa`, in chunks spread over the channels.
    pub fn send_run(&mut self, mut gpa: u64, mut pages: usize) -> Result<(), MigrationError> {
        while pages > 0 {
            let n = pages.min(CHUNK_PAGES);
            let i = self.next % self.jobs.len();
            self.next += 1;
            if self.jobs[i].send(Job::Run { gpa, pages: n }).is_err() {
                let idx = i as u16 + 1;
                return Err(self.failure(MigrationError::PageChannel {
                    index: idx,
                    source: Box::new(MigrationError::Protocol("its thread stopped".into())),
                }));
            }
            gpa += (n * PAGE_SIZE) as u64;
            pages -= n;
        }
        Ok(())
    }

    /// Wait until the destination has written everything queued so far (SYNC `pass` on
    /// every channel, each answered); returns the records that arrived torn, to send again.
    pub fn sync(&mut self, pass: u64) -> Result<Vec<(u64, u32)>, MigrationError> {
        for (i, j) in self.jobs.iter().enumerate() {
            if j.send(Job::Sync(pass)).is_err() {
                return Err(self.failure(MigrationError::PageChannel {
                    index: i as u16 + 1,
                    source: Box::new(MigrationError::Protocol("its thread stopped".into())),
                }));
            }
        }
        // A pass may take far longer than the I/O timeout (a capped link, a large guest):
        // give up only when no page went out for a whole timeout.
        let mut sent = self.meter.pages.load(Ordering::SeqCst);
        let mut torn = Vec::new();
        let mut confirmed = 0;
        while confirmed < self.jobs.len() {
            match self.acks.recv_timeout(self.timeout) {
                Ok(Ok(t)) => {
                    torn.extend(t);
                    confirmed += 1;
                }
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout)
                    if self.meter.pages.load(Ordering::SeqCst) != sent =>
                {
                    sent = self.meter.pages.load(Ordering::SeqCst);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::Protocol(format!(
                        "page channels did not confirm pass {pass}: no page went out for {} ms",
                        self.timeout.as_millis()
                    )));
                }
            }
        }
        Ok(torn)
    }

    /// Close every channel with its END record and wait for the threads.
    pub fn finish(&mut self) -> Result<(), MigrationError> {
        self.finished = true;
        for j in self.jobs.drain(..) {
            let _ = j.send(Job::End);
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        match self.acks.try_recv() {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for Senders<'_> {
    fn drop(&mut self) {
        // On failure: the threads see their queues close, or their sockets shut, and stop.
        self.jobs.clear();
        if !self.finished {
            for s in &self.sockets {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// How a page travels.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Zero,
    Sparse,
    Data,
}

struct Worker<'env> {
    index: u16,
    ch: Channel,
    ram: Arc<dyn SharedRam>,
    sparse: bool,
    progress: &'env Progress,
    meter: Arc<Meter>,
    acks: Sender<Result<Vec<(u64, u32)>, MigrationError>>,
}

impl Worker<'_> {
    fn run(self, jobs: Receiver<Job>) {
        let index = self.index;
        let acks = self.acks.clone();
        if let Err(e) = self.serve(jobs) {
            tracing::error!(channel = index, error = %chain(&e), "page channel failed");
            let _ = acks.send(Err(MigrationError::PageChannel {
                index,
                source: Box::new(e),
            }));
        }
    }

    fn serve(self, jobs: Receiver<Job>) -> Result<(), MigrationError> {
        let _s = info_span!("page-channel", index = self.index).entered();
        let io = |source| MigrationError::Io {
            phase: "RAM transfer",
            source,
        };
        let mut ret = self.ch.try_clone().map_err(io)?;
        let mut w = BufWriter::with_capacity(64 << 10, self.ch);
        let direct = Lever::DirectSend.on();
        let known = Lever::KnownZero.on();
        let mut copy = if direct {
            Vec::new()
        } else {
            vec![0u8; CHUNK_PAGES * PAGE_SIZE]
        };
        let mut classes = vec![Class::Zero; CHUNK_PAGES];
        let mut masks = vec![0u64; CHUNK_PAGES];
        let mut kz = vec![0u64; CHUNK_PAGES / 64];
        let mut scratch = Vec::new();
        let mut records = 0u64;
        for job in jobs {
            match job {
                Job::Run { gpa, pages } => {
                    if self.progress.cancelled() {
                        return Err(MigrationError::Cancelled);
                    }
                    let len = pages * PAGE_SIZE;
                    let range = self.ram.host_range(gpa, len).map_err(MigrationError::Vm)?;
                    kz.fill(0);
                    let any_known = known && self.ram.known_zero(gpa, pages, &mut kz);
                    let mem: &[u8] = if direct {
                        range.bytes()
                    } else {
                        copy[..len].copy_from_slice(range.bytes());
                        &copy[..len]
                    };
                    for p in 0..pages {
                        classes[p] = if any_known && kz[p / 64] >> (p % 64) & 1 == 1 {
                            Class::Zero
                        } else {
                            classify(
                                &mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                                self.sparse,
                                &mut masks[p],
                            )
                        };
                    }
                    let (mut wire, mut data, mut zero) = (0u64, 0u64, 0u64);
                    let mut i = 0;
                    while i < pages {
                        let c = classes[i];
                        let j = i + classes[i..pages].iter().take_while(|&&x| x == c).count();
                        let at = gpa + (i * PAGE_SIZE) as u64;
                        let n = (j - i) as u32;
                        let body = &mem[i * PAGE_SIZE..j * PAGE_SIZE];
                        wire += match c {
                            Class::Zero => {
                                zero += u64::from(n);
                                w.write_all(&encode_head(at, n, RamKind::Zero, 0))
                                    .map_err(io)?;
                                super::HEAD as u64
                            }
                            Class::Data => {
                                data += body.len() as u64;
                                // CRC and socket read guest memory at different moments: a
                                // page rewritten in between is torn, and sent again (mod.rs).
                                let crc = crc32fast::hash(body);
                                w.write_all(&encode_head(at, n, RamKind::Data, body.len() as u32))
                                    .map_err(io)?;
                                w.write_all(body).map_err(io)?;
                                w.write_all(&crc.to_le_bytes()).map_err(io)?;
                                (super::HEAD + body.len() + 4) as u64
                            }
                            Class::Sparse => {
                                data += body.len() as u64;
                                scratch.clear();
                                devstate::sparse::encode(body, &masks[i..j], &mut scratch);
                                let crc = crc32fast::hash(&scratch);
                                w.write_all(&encode_head(
                                    at,
                                    n,
                                    RamKind::Sparse,
                                    scratch.len() as u32,
                                ))
                                .map_err(io)?;
                                w.write_all(&scratch).map_err(io)?;
                                w.write_all(&crc.to_le_bytes()).map_err(io)?;
                                (super::HEAD + scratch.len() + 4) as u64
                            }
                        };
                        records += 1;
                        i = j;
                    }
                    self.meter.wire_bytes.fetch_add(wire, Ordering::SeqCst);
                    self.meter.data_bytes.fetch_add(data, Ordering::SeqCst);
                    self.meter.pages.fetch_add(pages as u64, Ordering::SeqCst);
                    self.progress.update(|s| {
                        s.zero_pages += zero;
                        s.normal_pages += pages as u64 - zero;
                    });
                    self.meter.throttle(self.progress.max_bandwidth());
                }
                Job::Sync(pass) => {
                    w.write_all(&encode_marker(TAG_SYNC, pass)).map_err(io)?;
                    w.flush().map_err(io)?;
                    let m = Msg::read(&mut ret).map_err(|source| MigrationError::Io {
                        phase: "waiting for the destination to catch up",
                        source,
                    })?;
                    let torn = match m.kind {
                        Kind::Synced if m.value == pass => {
                            super::decode_torn(&m.text).map_err(MigrationError::Protocol)?
                        }
                        Kind::Failed => return Err(MigrationError::DestinationFailed(m.text)),
                        k => {
                            return Err(MigrationError::Protocol(format!(
                                "expected Synced({pass}), got {k:?}({})",
                                m.value
                            )));
                        }
                    };
                    if !torn.is_empty() {
                        tracing::debug!(records = torn.len(), pass, "torn records to send again");
                    }
                    let _ = self.acks.send(Ok(torn));
                }
                Job::End => {
                    w.write_all(&encode_marker(Tag::End as u8, records))
                        .map_err(io)?;
                    w.flush().map_err(io)?;
                    return Ok(());
                }
            }
        }
        // The queue closed without END: the migration failed elsewhere.
        Ok(())
    }
}

fn is_zero(page: &[u8]) -> bool {
    // OR whole 64-byte blocks (this vectorises) and stop at the first non-zero block.
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

fn classify(page: &[u8], sparse: bool, mask: &mut u64) -> Class {
    if !sparse {
        return if is_zero(page) {
            Class::Zero
        } else {
            Class::Data
        };
    }
    *mask = block_mask(page);
    match mask.count_ones() {
        0 => Class::Zero,
        n if n <= MAX_SPARSE_BLOCKS => Class::Sparse,
        _ => Class::Data,
    }
}
