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
use devstate::stream::MAX_ZERO_PAGES;
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
/// Pages whose known-zero state the dispatcher looks up at once (64 MiB; a 128 KiB read of
/// `/proc/self/pagemap`).
const SCAN_PAGES: usize = 64 * CHUNK_PAGES;

enum Job {
    Run {
        gpa: u64,
        pages: usize,
    },
    /// Pages known to be zero without being read: one ZERO record.
    Zero {
        gpa: u64,
        pages: u32,
    },
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
    ram: Arc<dyn SharedRam>,
    /// Known-zero bits of one [`SCAN_PAGES`] window, if lever `known-zero` is on.
    known: Option<Vec<u64>>,
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
            ram: ram.clone(),
            known: Lever::KnownZero.on().then(|| vec![0; SCAN_PAGES / 64]),
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
            self.queue(Job::Run { gpa, pages: n })?;
            gpa += (n * PAGE_SIZE) as u64;
            pages -= n;
        }
        Ok(())
    }

    /// Queue a whole RAM region (the first pass) like [`Self::send_run`], except that runs of
    /// chunks the guest never touched go out as single ZERO records, unread: an idle guest's
    /// RAM costs a few records, not one job and one pagemap lookup per chunk.
    pub fn send_region(&mut self, gpa: u64, pages: usize) -> Result<(), MigrationError> {
        let Some(mut kz) = self.known.take() else {
            return self.send_run(gpa, pages);
        };
        let res = self.send_region_with(gpa, pages, &mut kz);
        self.known = Some(kz);
        res
    }

    fn send_region_with(
        &mut self,
        gpa: u64,
        pages: usize,
        kz: &mut [u64],
    ) -> Result<(), MigrationError> {
        // The ZERO run being gathered: first page's address and its length.
        let mut zero: Option<(u64, usize)> = None;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(SCAN_PAGES);
            let at = gpa + (done * PAGE_SIZE) as u64;
            kz.fill(0);
            let known = self.ram.known_zero(at, n, kz);
            for c in (0..n).step_by(CHUNK_PAGES) {
                let m = (n - c).min(CHUNK_PAGES);
                let chunk = at + (c * PAGE_SIZE) as u64;
                if known && (c..c + m).all(|p| kz[p / 64] >> (p % 64) & 1 == 1) {
                    let (from, len) = zero.get_or_insert((chunk, 0));
                    *len += m;
                    if *len + CHUNK_PAGES > MAX_ZERO_PAGES as usize {
                        let (from, len) = (*from, *len);
                        zero = None;
                        self.queue_zero(from, len)?;
                    }
                    continue;
                }
                if let Some((from, len)) = zero.take() {
                    self.queue_zero(from, len)?;
                }
                self.queue(Job::Run {
                    gpa: chunk,
                    pages: m,
                })?;
            }
            done += n;
        }
        if let Some((from, len)) = zero {
            self.queue_zero(from, len)?;
        }
        Ok(())
    }

    fn queue_zero(&mut self, gpa: u64, pages: usize) -> Result<(), MigrationError> {
        // At most MAX_ZERO_PAGES: the run is cut before it would grow past that.
        self.queue(Job::Zero {
            gpa,
            pages: pages as u32,
        })
    }

    /// Hand `job` to the next channel in turn.
    fn queue(&mut self, job: Job) -> Result<(), MigrationError> {
        let i = self.next % self.jobs.len();
        self.next += 1;
        if self.jobs[i].send(job).is_err() {
            let idx = i as u16 + 1;
            return Err(self.failure(MigrationError::PageChannel {
                index: idx,
                source: Box::new(MigrationError::Protocol("its thread stopped".into())),
            }));
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
                Job::Zero { gpa, pages } => {
                    if self.progress.cancelled() {
                        return Err(MigrationError::Cancelled);
                    }
                    w.write_all(&encode_head(gpa, pages, RamKind::Zero, 0))
                        .map_err(io)?;
                    records += 1;
                    self.meter
                        .wire_bytes
                        .fetch_add(super::HEAD as u64, Ordering::SeqCst);
                    self.meter
                        .pages
                        .fetch_add(u64::from(pages), Ordering::SeqCst);
                    self.progress.update(|s| s.zero_pages += u64::from(pages));
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

#[cfg(test)]
mod tests {
    use super::super::{Next, read_next};
    use super::*;
    use crate::ram::HostRange;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    const MIB_PAGES: usize = (1 << 20) / PAGE_SIZE;

    /// Zeroed memory (untouched by the host until written) whose pages are known zero unless
    /// listed in `touched`.
    struct Ram {
        mem: std::cell::UnsafeCell<Vec<u8>>,
        touched: Vec<usize>,
    }

    // SAFETY: the test writes `mem` before any thread reads it, and nothing writes it after.
    unsafe impl Sync for Ram {}

    impl SharedRam for Ram {
        fn host_range(&self, gpa: u64, len: usize) -> Result<HostRange<'_>, String> {
            // SAFETY: the vector is never resized, and lives as long as `self`.
            let mem = unsafe { &mut *self.mem.get() };
            let at = gpa as usize;
            let range = mem.get_mut(at..at + len).ok_or("outside RAM")?;
            // SAFETY: `range` is mapped and stays so while `self` lives.
            Ok(unsafe { HostRange::new(range.as_mut_ptr(), len) })
        }
        fn mark_written(&self, _: u64, _: usize) {}
        fn zero(&self, _: u64, _: u32) -> Result<(), String> {
            unreachable!("a source never zeroes")
        }
        fn write_sparse(&self, _: u64, _: u32, _: &[u8]) -> Result<(), String> {
            unreachable!("a source never writes")
        }
        fn known_zero(&self, gpa: u64, pages: usize, out: &mut [u64]) -> bool {
            let first = gpa as usize / PAGE_SIZE;
            for i in 0..pages {
                if !self.touched.contains(&(first + i)) {
                    out[i / 64] |= 1 << (i % 64);
                }
            }
            true
        }
    }

    /// Every record of one channel, up to END: (gpa, pages, kind, body).
    fn records(mut s: TcpStream) -> Vec<(u64, u32, RamKind, Vec<u8>)> {
        let mut hello = [0u8; 24];
        s.read_exact(&mut hello).unwrap();
        let mut out = Vec::new();
        loop {
            match read_next(&mut s, 0).unwrap() {
                Next::Ram(h) => {
                    let mut body = vec![0u8; h.body_len];
                    s.read_exact(&mut body).unwrap();
                    if h.body_len > 0 {
                        s.read_exact(&mut [0u8; 4]).unwrap();
                    }
                    out.push((h.gpa, h.pages, h.kind, body));
                }
                Next::End(_) => return out,
                Next::Sync(p) => panic!("unexpected SYNC {p}"),
            }
        }
    }

    #[test]
    fn untouched_chunks_go_out_as_few_zero_records_and_the_rest_is_read() {
        // 160 MiB: one page written at 100 MiB + 3 pages, one page touched but zero at 130 MiB.
        let pages = 160 * MIB_PAGES;
        let data = 100 * MIB_PAGES + 3;
        let zero_touched = 130 * MIB_PAGES + 5;
        let mut mem = vec![0u8; pages * PAGE_SIZE];
        mem[data * PAGE_SIZE..(data + 1) * PAGE_SIZE].fill(0xa5);
        let ram = Arc::new(Ram {
            mem: std::cell::UnsafeCell::new(mem),
            touched: vec![data, zero_touched],
        });
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let clients: Vec<Channel> = (0..2)
            .map(|_| TcpStream::connect(addr).unwrap().into())
            .collect();
        let servers: Vec<TcpStream> = (0..2).map(|_| l.accept().unwrap().0).collect();
        let readers: Vec<_> = servers
            .into_iter()
            .map(|s| std::thread::spawn(move || records(s)))
            .collect();
        let progress = Progress::new(None);
        std::thread::scope(|scope| {
            let mut s = Senders::start(
                scope,
                clients,
                7,
                ram.clone(),
                false,
                &progress,
                &crate::Params::default(),
            )
            .unwrap();
            s.send_region(0, pages).unwrap();
            s.finish().unwrap();
        });
        let mut got: Vec<_> = readers
            .into_iter()
            .flat_map(|r| r.join().unwrap())
            .collect();
        got.sort_by_key(|r| r.0);
        let summary: Vec<(u64, u32, RamKind)> = got.iter().map(|r| (r.0, r.1, r.2)).collect();
        let at = |page: usize| (page * PAGE_SIZE) as u64;
        assert_eq!(
            summary,
            [
                (0, 100 * MIB_PAGES as u32, RamKind::Zero),
                // The chunk with a written page is read and classified page by page.
                (at(100 * MIB_PAGES), 3, RamKind::Zero),
                (at(data), 1, RamKind::Data),
                (at(data + 1), MIB_PAGES as u32 - 4, RamKind::Zero),
                (at(101 * MIB_PAGES), 29 * MIB_PAGES as u32, RamKind::Zero),
                // A touched chunk that reads as zero: one ZERO record, after reading it.
                (at(130 * MIB_PAGES), MIB_PAGES as u32, RamKind::Zero),
                (at(131 * MIB_PAGES), 29 * MIB_PAGES as u32, RamKind::Zero),
            ]
        );
        assert!(got[2].3.iter().all(|&b| b == 0xa5), "the data page's bytes");
        assert_eq!(progress.snapshot().zero_pages as usize, pages - 1);
    }
}
