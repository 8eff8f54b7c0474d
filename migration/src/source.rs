//! The source side: handshake, RAM pre-copy, stop-and-copy, switchover.

use crate::config::SwitchoverRecord;
use crate::converge::Converge;
use crate::pages::Senders;
use crate::postcopy::PageSet;
use crate::progress::{Progress, Status};
use crate::protocol::{
    FEATURE_GUEST_FIRST, FEATURE_PAGE_CHANNELS, FEATURE_POSTCOPY, FEATURE_PROGRESS,
    FEATURE_SPARSE_PAGES, Hello, Kind, Msg, PROGRESS_PAGES, PROTOCOL_VERSION,
};
use crate::ram::SharedRam;
use crate::transport::{self, Channel, TeeWriter, Uri, close_gracefully};
use crate::vm::{DirtyRegion, SourceVm};
use crate::{MigrationError, Params, SwitchoverPolicy};
use devstate::sparse::{MAX_SPARSE_BLOCKS, block_mask};
use devstate::{PAGE_SIZE, StreamWriter};
use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{error, info, info_span, warn};

const CHUNK_PAGES: usize = devstate::stream::MAX_DATA_PAGES as usize;
/// Longest time sent records may sit in the stream buffer during a pass.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

type Out = StreamWriter<BufWriter<TeeWriter<Box<dyn Write + Send>>>>;

struct Sender<'a, V: SourceVm> {
    vm: &'a mut V,
    progress: &'a Progress,
    buf: Vec<u8>,
    /// Whether the destination takes SPARSE records, and each page's block mask.
    sparse: bool,
    masks: Vec<u64>,
    /// How each page of the chunk travels.
    classes: Vec<Class>,
    /// Bytes written and pages sent at the start of the current iteration, and when it
    /// started (also the throttle's window).
    iter_bytes: u64,
    iter_pages: u64,
    iter_start: Instant,
    /// Page bytes sent with data this iteration and the time spent on chunks that had data:
    /// the link's real rate (zero-page scans cost time but no wire bytes).
    data_bytes: u64,
    data_time: Duration,
    /// Pages put in RAM records so far, and the destination's last report of pages written.
    pages_sent: u64,
    dest_written: u64,
    /// When the stream was last flushed to the socket.
    last_flush: Instant,
    /// Bytes the page channels carried (none without them).
    channel_bytes: u64,
    /// The page channels' data bytes when the window started.
    data_base: u64,
}

/// Read the next return-path message that is not a progress report.
fn read_reply(ret: &mut Channel) -> std::io::Result<Msg> {
    loop {
        let m = Msg::read(ret)?;
        if m.kind != Kind::Received {
            return Ok(m);
        }
    }
}

/// Whether `e` is a connection failing (the main stream or a page channel).
fn broken_link(e: &MigrationError) -> bool {
    match e {
        MigrationError::Io { .. } => true,
        MigrationError::PageChannel { source, .. } => matches!(**source, MigrationError::Io { .. }),
        _ => false,
    }
}

/// The destination's `Failed` message, if it sends one within a second.
fn destination_verdict(ret: &mut Channel) -> Option<String> {
    ret.socket()
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match Msg::read(ret) {
            Ok(m) if m.kind == Kind::Failed => return Some(m.text),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

fn io_err(phase: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io { phase, source }
}

/// How a page travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Zero,
    Sparse,
    Data,
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { page.align_to::<u64>() }
    };
    // OR whole 64-byte blocks (this vectorises) and stop at the first non-zero block.
    pre.iter().chain(post).all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

/// Classify `page`; with `sparse`, also store its block mask.
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

impl<V: SourceVm> Sender<'_, V> {
    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.progress.cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Send `pages` pages from `gpa`, split into ZERO and DATA runs.
    fn send_run(
        &mut self,
        out: &mut Out,
        mut gpa: u64,
        mut pages: usize,
    ) -> Result<(), MigrationError> {
        while pages > 0 {
            self.check_cancel()?;
            let n = pages.min(CHUNK_PAGES);
            let len = n * PAGE_SIZE;
            let chunk_start = Instant::now();
            let mut chunk_data = 0u64;
            self.vm
                .read_ram(gpa, &mut self.buf[..len])
                .map_err(MigrationError::Vm)?;
            let sparse = self.sparse;
            for ((page, mask), class) in self.buf[..len]
                .chunks_exact(PAGE_SIZE)
                .zip(self.masks.iter_mut())
                .zip(self.classes.iter_mut())
            {
                *class = classify(page, sparse, mask);
            }
            let classes = &self.classes[..n];
            let mut i = 0;
            while i < n {
                let class = classes[i];
                let j = i + classes[i..].iter().take_while(|&&c| c == class).count();
                let at = gpa + (i * PAGE_SIZE) as u64;
                let count = (j - i) as u32;
                let pages = &self.buf[i * PAGE_SIZE..j * PAGE_SIZE];
                match class {
                    Class::Zero => out.ram_zero(at, count),
                    Class::Data => out.ram_data(at, pages),
                    Class::Sparse => out.ram_sparse(at, pages, &self.masks[i..j]),
                }
                .map_err(io_err("RAM transfer"))?;
                if class != Class::Zero {
                    chunk_data += u64::from(count) * PAGE_SIZE as u64;
                }
                self.pages_sent += u64::from(count);
                self.progress.update(|s| {
                    if class == Class::Zero {
                        s.zero_pages += u64::from(count);
                    } else {
                        s.normal_pages += u64::from(count);
                    }
                    s.transferred = out.bytes_written();
                });
                i = j;
            }
            if chunk_data > 0 {
                self.data_bytes += chunk_data;
                self.data_time += chunk_start.elapsed();
            }
            gpa += len as u64;
            pages -= n;
            // A pass of mostly zero pages can take longer than the peer's I/O timeout
            // without filling the stream buffer: flush now and then so the peer hears us.
            if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                out.flush().map_err(io_err("RAM transfer"))?;
                self.last_flush = Instant::now();
            }
            self.throttle(out.bytes_written());
        }
        Ok(())
    }

    /// Flush and wait until the destination has written all but the last
    /// [`PROGRESS_PAGES`] pages sent; returns how long that took.
    fn catch_up(&mut self, out: &mut Out, ret: &mut Channel) -> Result<Duration, MigrationError> {
        let start = Instant::now();
        out.flush().map_err(io_err("RAM transfer"))?;
        while self.dest_written + PROGRESS_PAGES <= self.pages_sent {
            self.check_cancel()?;
            let m = Msg::read(ret).map_err(io_err("waiting for the destination to catch up"))?;
            match m.kind {
                Kind::Received => self.dest_written = m.value,
                Kind::Failed => return Err(MigrationError::DestinationFailed(m.text)),
                k => {
                    return Err(MigrationError::Protocol(format!(
                        "expected Received, got {k:?}"
                    )));
                }
            }
        }
        let waited = start.elapsed();
        if waited > Duration::from_millis(1) {
            info!(
                ms = waited.as_secs_f64() * 1e3,
                behind = self.pages_sent - self.dest_written,
                "waited for the destination to catch up"
            );
        }
        Ok(waited)
    }

    /// Start a new measuring and throttling window: an iteration, or stop-and-copy.
    fn start_window(&mut self, out: &Out, channels: Option<&Senders<'_>>) {
        self.iter_bytes = out.bytes_written();
        self.iter_pages = self.pages_sent;
        self.iter_start = Instant::now();
        self.data_bytes = 0;
        self.data_time = Duration::ZERO;
        if let Some(c) = channels {
            c.meter.start_window();
            self.data_base = c.meter.data_bytes.load(Ordering::SeqCst);
        }
    }

    /// After the page channels confirmed a pass: take their figures as this window's (the
    /// wait for the destination counts as sending time).
    fn channel_sync(&mut self, c: &Senders<'_>, out: &Out) {
        self.pages_sent = c.meter.pages.load(Ordering::SeqCst);
        self.dest_written = self.pages_sent;
        self.data_bytes = c.meter.data_bytes.load(Ordering::SeqCst) - self.data_base;
        self.data_time = self.iter_start.elapsed();
        let wire = c.meter.wire_bytes.load(Ordering::SeqCst);
        self.progress
            .update(|s| s.transferred = out.bytes_written() + wire);
    }

    /// Sleep just enough to keep under `max_bandwidth` (bytes/s) for this iteration.
    fn throttle(&self, written: u64) {
        let cap = self.progress.max_bandwidth();
        if cap == 0 {
            return;
        }
        let sent = written.saturating_sub(self.iter_bytes) as f64;
        let due = Duration::from_secs_f64(sent / cap as f64);
        let spent = self.iter_start.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }

    fn send_dirty(
        &mut self,
        out: &mut Out,
        dirty: &[DirtyRegion],
        mut channels: Option<&mut Senders<'_>>,
    ) -> Result<(), MigrationError> {
        for r in dirty {
            let mut page = 0u64;
            while page < r.pages {
                let word = r.bitmap.get((page / 64) as usize).copied().unwrap_or(0);
                if word == 0 && page.is_multiple_of(64) {
                    page += 64;
                    continue;
                }
                if word >> (page % 64) & 1 == 0 {
                    page += 1;
                    continue;
                }
                let start = page;
                while page < r.pages
                    && r.bitmap.get((page / 64) as usize).copied().unwrap_or(0) >> (page % 64) & 1
                        == 1
                {
                    page += 1;
                }
                let (gpa, n) = (r.gpa + start * PAGE_SIZE as u64, (page - start) as usize);
                match channels.as_deref_mut() {
                    Some(c) => c.send_run(gpa, n)?,
                    None => self.send_run(out, gpa, n)?,
                }
            }
        }
        Ok(())
    }
}

/// OR `more` into `into`, region by region (matched by start address).
fn merge(into: &mut Vec<DirtyRegion>, more: &[DirtyRegion]) {
    for m in more {
        match into.iter_mut().find(|r| r.gpa == m.gpa) {
            Some(r) => {
                if r.bitmap.len() < m.bitmap.len() {
                    r.bitmap.resize(m.bitmap.len(), 0);
                }
                for (a, b) in r.bitmap.iter_mut().zip(&m.bitmap) {
                    *a |= b;
                }
            }
            None => into.push(m.clone()),
        }
    }
}

/// The switchover estimate after a pass.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Estimate {
    /// Bytes per second the rest can count on: the measured rate, never more than the cap.
    bandwidth: f64,
    /// Milliseconds to send what remains, rounded up; at least 1 while anything remains.
    expected_ms: u64,
}

impl Estimate {
    /// Estimate sending `remaining` bytes when `measured` bytes/s went out in the last pass
    /// and `cap` (bytes/s, 0 unlimited) throttles from now on. The measured rate can be a
    /// burst that the throttle only paid for afterwards, and the cap can have been lowered
    /// meanwhile: the cap bounds it either way.
    fn new(remaining: u64, measured: f64, cap: u64) -> Self {
        let mut bandwidth = if measured.is_finite() { measured } else { 0.0 };
        if cap > 0 {
            bandwidth = bandwidth.min(cap as f64);
        }
        let bandwidth = bandwidth.max(1.0);
        let expected_ms = if remaining == 0 {
            0
        } else {
            // Rounded up: a fraction of a millisecond is not zero downtime.
            ((remaining as f64 / bandwidth * 1000.0).ceil() as u64).max(1)
        };
        Estimate {
            bandwidth,
            expected_ms,
        }
    }

    /// Whether what remains fits in `limit_ms` (nothing left always fits; anything left never
    /// fits in 0 ms).
    fn fits(&self, limit_ms: u64) -> bool {
        self.expected_ms <= limit_ms
    }
}

/// Add page ranges `(gpa, pages)` to the dirty set: into the region holding them, or as a
/// region of their own.
fn add_ranges(into: &mut Vec<DirtyRegion>, ranges: &[(u64, u32)]) {
    let page = PAGE_SIZE as u64;
    for &(gpa, pages) in ranges {
        for p in gpa / page..gpa / page + u64::from(pages) {
            let at = p * page;
            let r = match into
                .iter_mut()
                .position(|r| r.gpa <= at && at < r.gpa + r.pages * page)
            {
                Some(i) => &mut into[i],
                None => {
                    into.push(DirtyRegion {
                        gpa: at,
                        pages: 1,
                        bitmap: vec![0],
                    });
                    into.last_mut().expect("just pushed")
                }
            };
            let i = (at - r.gpa) / page;
            let w = (i / 64) as usize;
            if r.bitmap.len() <= w {
                r.bitmap.resize(w + 1, 0);
            }
            r.bitmap[w] |= 1 << (i % 64);
        }
    }
}

fn dirty_pages(d: &[DirtyRegion]) -> u64 {
    d.iter()
        .map(|r| {
            r.bitmap
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
        })
        .sum()
}

/// Migrate `vm` to `uri` (`tcp:HOST:PORT` or `file:PATH`).
///
/// On success the source is stopped for good (`postmigrate`). On any failure before COMMIT
/// the source is resumed exactly where it was, dirty logging is off and nothing changed.
pub fn send<V: SourceVm>(
    vm: &mut V,
    uri: &str,
    params: &Params,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let span = info_span!("migration", side = "source", uri);
    let _g = span.enter();
    progress.start();
    progress.set_max_bandwidth(params.max_bandwidth);
    progress.set_downtime_limit(params.downtime_limit_ms);
    progress.set_status(Status::Setup);
    let was_running = vm.is_running();
    let mut paused = false;
    let mut logging = false;
    let mut committed = false;
    let res = run(
        vm,
        uri,
        params,
        progress,
        was_running,
        &mut paused,
        &mut logging,
        &mut committed,
    );
    progress.set_socket(None);
    // A cancel shuts the socket down, so the engine usually notices it as an I/O error:
    // report what happened, not its symptom.
    let res = match res {
        Err(e) if progress.cancelled() && !committed && !matches!(e, MigrationError::Cancelled) => {
            Err(MigrationError::Cancelled)
        }
        other => other,
    };
    match &res {
        Ok(()) => {
            info!(?was_running, "migration completed");
            progress.set_status(Status::Completed);
        }
        Err(e) => {
            error!(error = %e, "migration failed");
            end_throttle(vm, progress);
            if logging {
                let _ = vm.stop_dirty_log();
            }
            if paused
                && was_running
                && !committed
                && let Err(r) = vm.resume()
            {
                error!(error = %r, "could not resume the source after a failed migration");
            }
            let status = if matches!(e, MigrationError::Cancelled) {
                Status::Cancelled
            } else if progress.status() == Status::PostcopyActive {
                // The guest runs on the destination on what it has; the rest stays here.
                Status::PostcopyPaused
            } else {
                Status::Failed
            };
            progress.fail(status, crate::chain(e));
        }
    }
    res
}

/// Let the vCPUs run at full speed again if auto-converge throttled them.
fn end_throttle<V: SourceVm>(vm: &mut V, progress: &Progress) {
    if progress.snapshot().cpu_throttle_percentage == 0 {
        return;
    }
    progress.update(|s| s.cpu_throttle_percentage = 0);
    match vm.set_throttle(0) {
        Ok(()) => info!("auto-converge: throttling ended"),
        Err(e) => error!(error = %e, "could not end vCPU throttling"),
    }
}

#[allow(clippy::too_many_arguments)]
fn run<V: SourceVm>(
    vm: &mut V,
    uri: &str,
    params: &Params,
    progress: &Progress,
    was_running: bool,
    paused: &mut bool,
    logging: &mut bool,
    committed: &mut bool,
) -> Result<(), MigrationError> {
    let uri = Uri::parse(uri)?;
    let dump = match &params.dump_stream {
        Some(p) => Some(transport::create_capture(p)?),
        None => None,
    };
    // Features the destination accepted (none for a file).
    let mut features = 0u32;
    // Guest RAM for page channels, when this side would use them.
    let ram: Option<Arc<dyn SharedRam>> = match &uri {
        Uri::Tcp(_) if params.page_channels > 0 && params.dump_stream.is_none() => vm.shared_ram(),
        _ => None,
    };
    // Page channels granted and their token.
    let mut granted = (0u16, 0u64);
    // Forward channel, and the return path for TCP.
    // A passed TCP socket (`fd:NAME`, connected by libvirt) runs the TCP protocol.
    let passed_socket = match (&uri, &params.stream_fd) {
        (Uri::Fd(name), Some(fd)) => fd.tcp_stream(name)?,
        _ => None,
    };
    let (fwd, mut ret): (Box<dyn Write + Send>, Option<Channel>) = match (&uri, passed_socket) {
        (Uri::File(p), _) => (Box::new(transport::create_file(p)?), None),
        (Uri::Fd(name), None) => match &params.stream_fd {
            Some(fd) => (Box::new(fd.writer(name)?), None),
            None => return Err(MigrationError::BadUri(format!("fd:{name}"))),
        },
        (Uri::Tcp(_) | Uri::Fd(_), socket) => {
            let s = match socket {
                Some(s) => s,
                None => transport::connect(&uri, params.io_timeout)?,
            };
            s.set_write_timeout(Some(params.io_timeout)).ok();
            s.set_read_timeout(Some(params.io_timeout)).ok();
            progress.set_socket(s.try_clone().ok());
            if progress.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let mut s = match &params.tls {
                Some(tls) => {
                    let ch = transport::tls_connect(s, tls, &uri)?;
                    if let Channel::Tls(t) = &ch {
                        info!(
                            suite = t.cipher_suite().unwrap_or_default(),
                            destination = t.peer_identity().unwrap_or_default(),
                            "TLS session established"
                        );
                    }
                    ch
                }
                None => Channel::Plain(s),
            };
            Hello {
                protocol: PROTOCOL_VERSION,
                features: FEATURE_PROGRESS
                    | if params.sparse_pages {
                        FEATURE_SPARSE_PAGES
                    } else {
                        0
                    }
                    | if ram.is_some() {
                        FEATURE_PAGE_CHANNELS
                    } else {
                        0
                    }
                    | if params.postcopy && params.tls.is_none() && params.dump_stream.is_none() {
                        FEATURE_POSTCOPY
                    } else {
                        0
                    }
                    | if params.converge.auto_converge {
                        FEATURE_GUEST_FIRST
                    } else {
                        0
                    },
                channels: if ram.is_some() {
                    params.page_channels.min(crate::pages::MAX_CHANNELS)
                } else {
                    0
                },
            }
            .write(&mut s)
            .map_err(io_err("handshake"))?;
            let ack = Msg::read(&mut s).map_err(io_err("handshake"))?;
            match ack.kind {
                Kind::HelloAck => {
                    features = (ack.value >> 32) as u32;
                    if features & FEATURE_PAGE_CHANNELS != 0 {
                        let count = (ack.value >> 16) as u16;
                        let token = ack.text.parse::<u64>().map_err(|_| {
                            MigrationError::Protocol(format!(
                                "page channels granted with token '{}'",
                                ack.text
                            ))
                        })?;
                        if count == 0 || count > crate::pages::MAX_CHANNELS {
                            return Err(MigrationError::Protocol(format!(
                                "{count} page channels granted"
                            )));
                        }
                        granted = (count, token);
                        progress.update(|s| s.page_channels = count);
                    }
                    info!(
                        features,
                        page_channels = granted.0,
                        "destination accepted features"
                    );
                }
                Kind::Refuse => return Err(MigrationError::Refused(ack.text)),
                k => {
                    return Err(MigrationError::Protocol(format!(
                        "expected HelloAck, got {k:?}"
                    )));
                }
            }
            let ret = s.try_clone().map_err(io_err("handshake"))?;
            (Box::new(s), Some(ret))
        }
    };
    let machine = vm.machine();
    let producer = concat!("ferry ", env!("CARGO_PKG_VERSION"));
    let mut out: Out = StreamWriter::new(
        BufWriter::with_capacity(256 << 10, TeeWriter::new(fwd, dump)),
        machine,
        producer,
    )
    .map_err(io_err("handshake"))?;
    let mut config = vm.config();
    let total: u64 = config.memory.iter().map(|r| r.size).sum();
    progress.update(|s| s.total = total);
    out.config(&mut config).map_err(io_err("handshake"))?;
    if let Some(ret) = ret.as_mut() {
        out_flush(&mut out)?;
        accepted(Msg::read(ret).map_err(io_err("handshake"))?)?;
    }
    let sparse = features & FEATURE_SPARSE_PAGES != 0;
    let mut chans = Vec::new();
    for index in 1..=granted.0 {
        chans.push(open_channel(&uri, params, progress).map_err(|e| {
            MigrationError::PageChannel {
                index,
                source: Box::new(e),
            }
        })?);
    }
    let reports = ret.as_mut().filter(|_| features & FEATURE_PROGRESS != 0);
    let res = std::thread::scope(|sc| {
        let mut senders = match ram {
            Some(ram) if !chans.is_empty() => Some(Senders::start(
                sc, chans, granted.1, ram, sparse, progress, params,
            )?),
            _ => None,
        };
        transfer(
            vm,
            &mut out,
            &config,
            machine,
            params,
            progress,
            was_running,
            paused,
            logging,
            sparse,
            reports,
            senders.as_mut(),
            features & FEATURE_POSTCOPY != 0,
        )
    });
    let (tx, pause_at, postcopy) = match res {
        Ok(x) => x,
        Err(mut e) => {
            // A broken link seen here may be the consequence of another channel breaking:
            // the destination's account names the one that broke first.
            if granted.0 > 0
                && broken_link(&e)
                && let Some(why) = ret.as_mut().and_then(destination_verdict)
            {
                e = MigrationError::DestinationFailed(why);
            }
            // Tell a live destination why the stream stops, unless the channel itself broke
            // or the destination already knows.
            let silent = matches!(
                e,
                MigrationError::Io { .. }
                    | MigrationError::Refused(_)
                    | MigrationError::DestinationFailed(_)
            );
            if !silent && let Some(r) = ret.as_mut() {
                let _ = out.abort(&crate::chain(&e));
                close_gracefully(r);
            }
            return Err(e);
        }
    };
    let written = out.bytes_written() + tx.channel_bytes;
    let mut w = out.finish().map_err(io_err("device state"))?;
    w.flush().map_err(io_err("device state"))?;
    progress.update(|s| s.transferred = written);
    let Some(mut ret) = ret else {
        // A file: complete once written; the guest stays stopped (postmigrate).
        tx.vm.stop_dirty_log().map_err(MigrationError::Vm)?;
        *logging = false;
        progress.update(|s| s.downtime_ms = pause_at.elapsed().as_millis() as u64);
        tx.vm.handed_over();
        *committed = true;
        return Ok(());
    };
    drop(w);
    info!(
        ms = pause_at.elapsed().as_secs_f64() * 1e3,
        "stop-and-copy: stream sent"
    );
    let m = read_reply(&mut ret).map_err(io_err("waiting for the destination to load"))?;
    match m.kind {
        Kind::Loaded => {}
        Kind::Failed => return Err(MigrationError::DestinationFailed(m.text)),
        k => {
            return Err(MigrationError::Protocol(format!(
                "expected Loaded, got {k:?}"
            )));
        }
    }
    info!(
        ms = pause_at.elapsed().as_secs_f64() * 1e3,
        "stop-and-copy: destination loaded"
    );
    tx.check_cancel()?;
    // Point of no return: from here the source never resumes by itself. Dirty logging stops
    // once the destination runs (a memslot update per region: milliseconds of downtime).
    *committed = true;
    tx.vm.handed_over();
    Msg::new(Kind::Commit, u64::from(postcopy.is_some()))
        .write(&mut ret)
        .map_err(MigrationError::StateUnknown)?;
    if let Some(set) = &postcopy {
        // The destination drops its stale copies of these pages before it runs the guest.
        use crate::postcopy::{Frame, FrameKind};
        let session = crate::postcopy::new_session();
        progress.set_session(session);
        Frame::new(FrameKind::Session, session)
            .write(&mut ret)
            .and_then(|()| crate::postcopy::write_page_set(set, &mut ret))
            .map_err(MigrationError::StateUnknown)?;
    }
    match read_reply(&mut ret) {
        Ok(m) if m.kind == Kind::Committed => {}
        Ok(m) => {
            return Err(MigrationError::StateUnknown(std::io::Error::other(
                format!("expected Committed, got {:?}", m.kind),
            )));
        }
        Err(e) => return Err(MigrationError::StateUnknown(e)),
    }
    let downtime = pause_at.elapsed();
    info!(
        ms = downtime.as_secs_f64() * 1e3,
        "stop-and-copy: destination committed"
    );
    progress.update(|s| s.downtime_ms = downtime.as_millis() as u64);
    tx.vm.stop_dirty_log().map_err(MigrationError::Vm)?;
    *logging = false;
    let Some(set) = postcopy else {
        return Ok(());
    };
    // The guest runs on the destination; what it has not got yet follows.
    progress.set_status(Status::PostcopyActive);
    let pages = set.len();
    info!(pages, "post-copy: sending the rest");
    let reader = ret.try_clone().map_err(io_err("post-copy"))?;
    ret.socket().set_read_timeout(None).ok();
    let vm = tx.vm;
    let mut read = |gpa: u64, buf: &mut [u8]| vm.read_ram(gpa, buf);
    let mut w = std::io::BufWriter::with_capacity(256 << 10, &mut ret);
    crate::postcopy::send_pages(
        set,
        &mut read,
        &mut w,
        reader,
        progress,
        params.io_timeout,
        params.max_postcopy_bandwidth,
    )?;
    info!(pages, "post-copy: every page placed at the destination");
    Ok(())
}

/// Everything between the handshake and the end marker: dirty logging on, pass 0, dirty
/// passes until convergence, pause, last pages, device sections. Returns the sender (which
/// holds the VM) and when the guest was paused.
#[allow(clippy::too_many_arguments)]
fn transfer<'v, V: SourceVm>(
    vm: &'v mut V,
    out: &mut Out,
    config: &crate::ConfigRecord,
    machine: &'static machine_types::MachineType,
    params: &Params,
    progress: &'v Progress,
    was_running: bool,
    paused: &mut bool,
    logging: &mut bool,
    sparse: bool,
    mut reports: Option<&mut Channel>,
    mut channels: Option<&mut Senders<'_>>,
    postcopy_ok: bool,
) -> Result<(Sender<'v, V>, Instant, Option<PageSet>), MigrationError> {
    vm.start_dirty_log().map_err(MigrationError::Vm)?;
    *logging = true;
    progress.update(|s| s.setup_time_ms = progress.elapsed_ms());
    progress.set_status(Status::Active);

    let mut tx = Sender {
        vm,
        progress,
        buf: vec![0u8; CHUNK_PAGES * PAGE_SIZE],
        sparse,
        masks: vec![0; CHUNK_PAGES],
        classes: vec![Class::Zero; CHUNK_PAGES],
        iter_bytes: out.bytes_written(),
        iter_pages: 0,
        iter_start: Instant::now(),
        data_bytes: 0,
        data_time: Duration::ZERO,
        pages_sent: 0,
        dest_written: 0,
        last_flush: Instant::now(),
        channel_bytes: 0,
        data_base: 0,
    };
    let mut converge = Converge::new(params.converge, Instant::now());
    // Pass 0: all of RAM.
    let mut iteration = 0u64;
    {
        let _s = info_span!("iteration", n = iteration).entered();
        progress.pass(iteration);
        for r in &config.memory {
            let pages = (r.size / PAGE_SIZE as u64) as usize;
            match channels.as_deref_mut() {
                Some(c) => c.send_region(r.gpa, pages)?,
                None => tx.send_run(out, r.gpa, pages)?,
            }
        }
    }
    // Switch to post-copy instead of copying the last pages while the guest is stopped.
    let mut postcopy = false;
    // Pages the last pass delivered torn: resent whole in stop-and-copy even for post-copy
    // (the destination refuses to load with torn pages left).
    let mut last_torn;
    // Dirty passes until the rest fits in the downtime limit.
    let pending = loop {
        // A destination that reports progress is waited for: what it has not written yet
        // would otherwise land in the downtime. The wait counts as sending time.
        let mut torn = Vec::new();
        if let Some(c) = channels.as_deref_mut() {
            // Every channel's pages written at the destination: the pass is over.
            torn = c.sync(iteration)?;
            tx.channel_sync(c, out);
        } else if let Some(ret) = reports.as_deref_mut() {
            let waited = tx.catch_up(out, ret)?;
            tx.data_time += waited;
        }
        let elapsed = tx.iter_start.elapsed().as_secs_f64().max(1e-6);
        // Page bytes per second, the unit of what remains: the rate at which data pages went
        // out when there were enough of them to measure, else every page over the whole pass
        // (not wire bytes: a SPARSE page is a few dozen). The former leaves out the
        // throttle's sleeps, so only the estimate below makes it respect the cap.
        let measured = if tx.data_bytes >= 1 << 20 && !tx.data_time.is_zero() {
            tx.data_bytes as f64 / tx.data_time.as_secs_f64()
        } else {
            ((tx.pages_sent - tx.iter_pages) * PAGE_SIZE as u64) as f64 / elapsed
        };
        let mut dirty = tx.vm.take_dirty().map_err(MigrationError::Vm)?;
        add_ranges(&mut dirty, &torn);
        last_torn = torn;
        let dirty_n = dirty_pages(&dirty);
        iteration += 1;
        let remaining = dirty_n * PAGE_SIZE as u64;
        let est = Estimate::new(remaining, measured, progress.max_bandwidth());
        let expected_ms = est.expected_ms;
        progress.update(|s| {
            s.iterations = iteration;
            s.remaining = remaining;
            s.expected_downtime_ms = expected_ms;
            s.dirty_pages_rate = (dirty_n as f64 / elapsed) as u64;
            s.mbps = est.bandwidth * 8.0 / 1e6;
        });
        info!(
            iteration,
            dirty_pages = dirty_n,
            expected_ms,
            mbps = est.bandwidth * 8.0 / 1e6,
            measured_mbps = measured * 8.0 / 1e6,
            "pre-copy pass done"
        );
        if progress.postcopy_requested() {
            if !postcopy_ok {
                return Err(MigrationError::Refused(
                    "post-copy was requested, but the destination did not enable postcopy-ram"
                        .into(),
                ));
            }
            info!(iteration, dirty_pages = dirty_n, "switching to post-copy");
            postcopy = true;
            break dirty;
        }
        let allowed_ms = converge.allowed_ms(progress.downtime_limit_ms(), iteration);
        progress.update(|s| s.downtime_allowed_ms = allowed_ms);
        let sent = (tx.pages_sent - tx.iter_pages) * PAGE_SIZE as u64;
        let fits = est.fits(allowed_ms);
        if fits
            && (iteration >= u64::from(params.max_iterations)
                || !crate::Lever::ShrinkPasses.on()
                || !converge.shrink_further(sent, remaining, expected_ms))
        {
            // Converged: these pages go in stop-and-copy, with whatever dirties meanwhile.
            break dirty;
        }
        if fits {
            // The set is shrinking fast: one more pass takes most of it out of the downtime.
            info!(iteration, expected_ms, "fits; one more pass to shrink it");
        } else {
            if iteration >= u64::from(params.max_iterations) {
                match params.switchover_policy {
                    SwitchoverPolicy::Force => {
                        warn!(iteration, expected_ms, "not converged; forcing switchover");
                        break dirty;
                    }
                    SwitchoverPolicy::Cancel => {
                        return Err(MigrationError::NotConverged {
                            iterations: iteration,
                            expected_ms,
                            limit_ms: allowed_ms,
                        });
                    }
                }
            }
            let step = converge.after_pass(
                iteration,
                sent,
                remaining,
                expected_ms,
                allowed_ms,
                Instant::now(),
            );
            if let Some(stall) = step.stall {
                if postcopy_ok {
                    info!(
                        iteration,
                        expected_ms, "pre-copy stalled; switching to post-copy"
                    );
                    postcopy = true;
                    break dirty;
                }
                match params.switchover_policy {
                    SwitchoverPolicy::Force => {
                        warn!(
                            iteration,
                            expected_ms, "pre-copy stalled; forcing switchover"
                        );
                        break dirty;
                    }
                    SwitchoverPolicy::Cancel => {
                        return Err(MigrationError::Stalled {
                            passes: stall.passes,
                            seconds: stall.since.as_secs_f64(),
                            expected_ms: stall.expected_ms,
                            allowed_ms: stall.allowed_ms,
                        });
                    }
                }
            }
            if let Some(pct) = step.throttle {
                info!(percent = pct, "auto-converge: throttling vCPUs");
                // Recorded first, so a failure here still ends the throttle.
                progress.update(|s| {
                    s.cpu_throttle_percentage = pct;
                    s.cpu_throttle_peak = s.cpu_throttle_peak.max(pct);
                });
                tx.vm.set_throttle(pct).map_err(MigrationError::Vm)?;
            }
        }
        let _s = info_span!("iteration", n = iteration).entered();
        progress.pass(iteration);
        tx.start_window(out, channels.as_deref());
        tx.send_dirty(out, &dirty, channels.as_deref_mut())?;
    };

    // Stop-and-copy.
    tx.check_cancel()?;
    let pause_at = Instant::now();
    if was_running {
        tx.vm.pause().map_err(MigrationError::Vm)?;
    }
    *paused = true;
    // The guest is stopped: throttling has done its job, whatever happens next.
    end_throttle(tx.vm, progress);
    progress.set_status(Status::Device);
    // The throttle's window starts afresh: the pause pays for its own bytes at the cap, as
    // estimated, not for a pre-copy burst (or a cap lowered during the last pass).
    tx.start_window(out, channels.as_deref());
    let mut dirty = tx.vm.take_dirty().map_err(MigrationError::Vm)?;
    merge(&mut dirty, &pending);
    let last_pages = dirty_pages(&dirty);
    // Post-copy: these pages follow COMMIT instead.
    let postcopy = postcopy.then(|| crate::postcopy::from_dirty(&config.memory, &dirty));
    if postcopy.is_none() {
        tx.send_dirty(out, &dirty, channels.as_deref_mut())?;
    } else if !last_torn.is_empty() {
        let mut again = Vec::new();
        add_ranges(&mut again, &last_torn);
        tx.send_dirty(out, &again, channels.as_deref_mut())?;
    }
    if let Some(c) = channels {
        // Every page is in guest memory at the destination before the device state follows;
        // pages that arrived torn go again (the guest is stopped: they arrive whole).
        let mut pass = iteration + 1;
        let mut torn = c.sync(pass)?;
        while !torn.is_empty() {
            if pass > iteration + 3 {
                return Err(MigrationError::Protocol(format!(
                    "{} RAM records still fail their CRC with the guest stopped",
                    torn.len()
                )));
            }
            info!(
                records = torn.len(),
                "stop-and-copy: sending torn pages again"
            );
            let mut again = Vec::new();
            add_ranges(&mut again, &torn);
            tx.send_dirty(out, &again, Some(&mut *c))?;
            pass += 1;
            torn = c.sync(pass)?;
        }
        c.finish()?;
        tx.channel_sync(c, out);
        tx.channel_bytes = c.meter.wire_bytes.load(Ordering::SeqCst);
    }
    info!(
        pages = last_pages,
        ms = pause_at.elapsed().as_secs_f64() * 1e3,
        "stop-and-copy: last dirty pages sent"
    );
    let sections = tx.vm.save_devices(machine).map_err(MigrationError::Vm)?;
    for s in &sections {
        out.raw(s).map_err(io_err("device state"))?;
    }
    out.section(
        &mut SwitchoverRecord {
            source_running: was_running,
        },
        0,
    )
    .map_err(io_err("device state"))?;
    Ok((tx, pause_at, postcopy))
}

/// Connect one page channel like the main one (TLS included) and register its socket for
/// cancellation.
fn open_channel(
    uri: &Uri,
    params: &Params,
    progress: &Progress,
) -> Result<Channel, MigrationError> {
    let s = transport::connect(uri, params.io_timeout)?;
    s.set_write_timeout(Some(params.io_timeout)).ok();
    s.set_read_timeout(Some(params.io_timeout)).ok();
    s.set_nodelay(true).ok();
    if let Ok(c) = s.try_clone() {
        progress.add_socket(c);
    }
    match &params.tls {
        Some(tls) => transport::tls_connect(s, tls, uri),
        None => Ok(Channel::Plain(s)),
    }
}

/// Accept from the destination, or its refusal as an error.
pub(crate) fn accepted(m: Msg) -> Result<(), MigrationError> {
    match m.kind {
        Kind::Accept => Ok(()),
        Kind::Refuse => Err(MigrationError::Refused(m.text)),
        k => Err(MigrationError::Protocol(format!(
            "expected Accept, got {k:?}"
        ))),
    }
}

fn out_flush(out: &mut Out) -> Result<(), MigrationError> {
    out.flush().map_err(io_err("handshake"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_ors_bitmaps() {
        let r = |gpa, w: u64| DirtyRegion {
            gpa,
            pages: 64,
            bitmap: vec![w],
        };
        let mut a = vec![r(0, 0b0011)];
        merge(&mut a, &[r(0, 0b0110), r(1 << 20, 1)]);
        assert_eq!(a, vec![r(0, 0b0111), r(1 << 20, 1)]);
        assert_eq!(dirty_pages(&a), 4);
    }

    #[test]
    fn torn_ranges_join_the_dirty_set_once() {
        let mut d = vec![DirtyRegion {
            gpa: 0,
            pages: 128,
            bitmap: vec![0b1, 0],
        }];
        add_ranges(&mut d, &[(0, 2), (0x40000, 1), (1 << 30, 2)]);
        assert_eq!(d[0].bitmap, vec![0b11, 1]);
        assert_eq!(dirty_pages(&d), 3 + 2);
        assert_eq!(d[1].gpa, 1 << 30);
    }

    #[test]
    fn capped_link_raises_the_expected_downtime() {
        const MIB: u64 = 1 << 20;
        // 1 MiB left, measured at 1 GiB/s: about 1 ms uncapped.
        let free = Estimate::new(MIB, 1024.0 * MIB as f64, 0);
        assert_eq!(free.expected_ms, 1);
        // The same burst on an 8 MiB/s link: 125 ms, and the cap is the bandwidth.
        let capped = Estimate::new(MIB, 1024.0 * MIB as f64, 8 * MIB);
        assert_eq!(capped.expected_ms, 125);
        assert_eq!(capped.bandwidth, (8 * MIB) as f64);
        assert!(free.fits(100) && !capped.fits(100));
        // A cap above the measured rate changes nothing.
        assert_eq!(
            Estimate::new(MIB, 4.0 * MIB as f64, 8 * MIB).expected_ms,
            250
        );
    }

    #[test]
    fn anything_left_never_fits_in_zero_ms() {
        const MIB: u64 = 1 << 20;
        // A sub-millisecond estimate rounds up, whatever the measured rate.
        for measured in [1e12, f64::INFINITY, f64::NAN, 0.0] {
            let e = Estimate::new(PAGE_SIZE as u64, measured, 0);
            assert!(e.expected_ms >= 1 && !e.fits(0), "{measured}: {e:?}");
        }
        assert!(!Estimate::new(1, 1e12, 8 * MIB).fits(0));
        // Nothing left fits any limit.
        let none = Estimate::new(0, 1e6, 8 * MIB);
        assert!(none.expected_ms == 0 && none.fits(0));
        // 1.5 ms rounds up to 2: it does not fit a 1 ms limit.
        let e = Estimate::new(3 * MIB / 2, 1000.0 * MIB as f64, 0);
        assert_eq!(e.expected_ms, 2);
        assert!(!e.fits(1) && e.fits(2));
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE + 3];
        assert!(is_zero(&p[1..PAGE_SIZE + 1]));
        p[PAGE_SIZE] = 1;
        assert!(!is_zero(&p[1..PAGE_SIZE + 1]));
    }
}
