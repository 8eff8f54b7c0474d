//! Post-copy: the guest runs on the destination before all of its RAM has arrived.
//!
//! Negotiated with [`FEATURE_POSTCOPY`](crate::protocol::FEATURE_POSTCOPY) (capability
//! `postcopy-ram` on both sides, plain TCP). After `migrate-start-postcopy` the source ends
//! pre-copy at the next pass, stops the guest and sends the device state without the pages
//! still dirty (set P). Its COMMIT carries value 1, and frames follow on the forward path:
//!
//! ```text
//! source                                   destination
//!   | Commit(1), Discard*, DiscardEnd  --->  |  drop the stale copies of P, register guest
//!   |                                  <---  | Committed          RAM with userfaultfd, run
//!   | Page | Zero (requested first)    --->  |  place each page of P exactly once
//!   |                                  <---  | PageRequest(gpa)   (a vCPU touched it)
//!   | Done(pages sent)                 --->  |
//!   |                                  <---  | PostcopyDone(pages placed)
//! ```
//!
//! A frame is `u16 kind | u16 reserved (0) | u32 length | u64 value | payload[length]`:
//! Discard (value = gpa of the bitmap's first page, payload = a bitmap of at most
//! [`MAX_BITMAP`] bytes, bit i = page `gpa + i * 4096`), DiscardEnd (value = pages), Page
//! (value = gpa, payload = 4096 bytes and their CRC-32), Zero (value = gpa), Done (value =
//! pages). Kind 0 is invalid. A page outside P, sent twice, or outside guest RAM is refused
//! by name. A broken link leaves both sides `postcopy-paused`: the destination keeps what
//! it has (a vCPU touching a missing page waits), the source keeps its RAM.

use crate::config::RegionDesc;
use crate::protocol::{Kind, Msg};
use crate::transport::Channel;
use crate::vm::{DirtyRegion, VmError};
use crate::{MigrationError, Progress};
use devstate::PAGE_SIZE;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Longest Discard bitmap: 32768 pages (128 MiB) per frame.
pub const MAX_BITMAP: u32 = 4096;
const PAGE: u64 = PAGE_SIZE as u64;

/// Frame kinds on the forward path after a post-copy COMMIT. 0 is reserved as invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// Pages whose destination copy is stale (a bitmap).
    Discard = 1,
    /// Every Discard has been sent.
    DiscardEnd = 2,
    /// One page with its CRC-32.
    Page = 3,
    /// One zero page.
    Zero = 4,
    /// Every page of P has been sent.
    Done = 5,
    /// The post-copy session's id (first frame after COMMIT), which a resume must present.
    Session = 6,
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: FrameKind,
    /// Guest-physical address or page count.
    pub value: u64,
    /// Bitmap or page.
    pub payload: Vec<u8>,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Frame {
    /// Writes the frame.
    pub fn write(&self, w: &mut (impl Write + ?Sized)) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[..2].copy_from_slice(&(self.kind as u16).to_le_bytes());
        h[4..8].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h[8..].copy_from_slice(&self.value.to_le_bytes());
        w.write_all(&h)?;
        w.write_all(&self.payload)
    }

    /// A frame without payload (Session, DiscardEnd, Zero, Done).
    pub fn new(kind: FrameKind, value: u64) -> Frame {
        Frame {
            kind,
            value,
            payload: Vec::new(),
        }
    }

    /// A page frame (a Zero frame when the page is all zero).
    pub fn page(gpa: u64, data: &[u8]) -> Frame {
        if data.iter().all(|&b| b == 0) {
            return Frame::new(FrameKind::Zero, gpa);
        }
        let mut payload = Vec::with_capacity(PAGE_SIZE + 4);
        payload.extend_from_slice(data);
        payload.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        Frame {
            kind: FrameKind::Page,
            value: gpa,
            payload,
        }
    }

    /// Reads one frame, refusing unknown kinds and lengths a kind cannot have.
    pub fn read(r: &mut (impl Read + ?Sized)) -> io::Result<Frame> {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        let raw = u16::from_le_bytes([h[0], h[1]]);
        let kind = match raw {
            1 => FrameKind::Discard,
            2 => FrameKind::DiscardEnd,
            3 => FrameKind::Page,
            4 => FrameKind::Zero,
            5 => FrameKind::Done,
            6 => FrameKind::Session,
            k => return Err(bad(format!("unknown post-copy frame kind {k}"))),
        };
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let value = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
        let ok = match kind {
            FrameKind::Discard => len > 0 && len <= MAX_BITMAP && len % 8 == 0,
            FrameKind::Page => len == PAGE_SIZE as u32 + 4,
            _ => len == 0,
        };
        if !ok || h[2..4] != [0, 0] {
            return Err(bad(format!(
                "post-copy {kind:?} frame with a length of {len} bytes"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        if kind == FrameKind::Page {
            let (data, crc) = payload.split_at(PAGE_SIZE);
            let want = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
            if crc32fast::hash(data) != want {
                return Err(bad(format!("post-copy page at {value:#x} fails its CRC")));
            }
            payload.truncate(PAGE_SIZE);
        }
        Ok(Frame {
            kind,
            value,
            payload,
        })
    }
}

/// Guest RAM on the destination during post-copy (the VMM implements it with userfaultfd).
pub trait PostcopyRam: Send + Sync {
    /// Drops the pages `[gpa, gpa + pages * 4096)`: their next access is a missing-page
    /// fault (before [`start`](Self::start) only).
    fn discard(&self, gpa: u64, pages: u64) -> Result<(), VmError>;
    /// Registers all guest RAM: a missing page blocks whoever touches it until placed.
    fn start(&self) -> Result<(), VmError>;
    /// The guest-physical page of the next fault, waiting at most `timeout`.
    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, VmError>;
    /// Places one page (`None`: zeros) and wakes its waiters; false when it was present.
    fn place(&self, gpa: u64, data: Option<&[u8]>) -> Result<bool, VmError>;
    /// Every page is in place: faults are ordinary faults again.
    fn finish(&self) -> Result<(), VmError>;
}

/// A set of guest pages over the guest's RAM regions, one bit each.
#[derive(Debug, Clone)]
pub struct PageSet {
    regions: Vec<(u64, u64, Vec<u64>)>,
    count: u64,
}

impl PageSet {
    /// An empty set over `regions`.
    pub fn new(regions: &[RegionDesc]) -> PageSet {
        PageSet {
            regions: regions
                .iter()
                .map(|r| {
                    (
                        r.gpa,
                        r.size / PAGE,
                        vec![0; (r.size / PAGE).div_ceil(64) as usize],
                    )
                })
                .collect(),
            count: 0,
        }
    }

    fn slot(&self, gpa: u64) -> Option<(usize, usize, u64)> {
        if !gpa.is_multiple_of(PAGE) {
            return None;
        }
        self.regions
            .iter()
            .position(|(start, pages, _)| gpa >= *start && gpa < start + pages * PAGE)
            .map(|i| {
                let p = (gpa - self.regions[i].0) / PAGE;
                (i, (p / 64) as usize, 1u64 << (p % 64))
            })
    }

    /// Whether `gpa` is a page of guest RAM.
    pub fn in_ram(&self, gpa: u64) -> bool {
        self.slot(gpa).is_some()
    }

    /// Whether the page at `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.slot(gpa)
            .is_some_and(|(i, w, b)| self.regions[i].2[w] & b != 0)
    }

    /// Adds the page; false when it is not guest RAM.
    pub fn insert(&mut self, gpa: u64) -> bool {
        let Some((i, w, b)) = self.slot(gpa) else {
            return false;
        };
        let word = &mut self.regions[i].2[w];
        if *word & b == 0 {
            *word |= b;
            self.count += 1;
        }
        true
    }

    /// Removes the page; true when it was in the set.
    pub fn remove(&mut self, gpa: u64) -> bool {
        let Some((i, w, b)) = self.slot(gpa) else {
            return false;
        };
        let word = &mut self.regions[i].2[w];
        let was = *word & b != 0;
        *word &= !b;
        self.count -= u64::from(was);
        was
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every page, lowest address first.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(start, _, bits)| {
            bits.iter().enumerate().flat_map(move |(w, &word)| {
                (0..64)
                    .filter(move |b| word >> b & 1 == 1)
                    .map(move |b| start + (w as u64 * 64 + b) * PAGE)
            })
        })
    }

    /// The set as Discard frames of at most [`MAX_BITMAP`] bytes, empty words skipped.
    pub fn discard_frames(&self) -> Vec<Frame> {
        let per = (MAX_BITMAP / 8) as usize;
        let mut out = Vec::new();
        for (start, _, bits) in &self.regions {
            for (c, chunk) in bits.chunks(per).enumerate() {
                if chunk.iter().all(|&w| w == 0) {
                    continue;
                }
                let last = chunk.iter().rposition(|&w| w != 0).expect("not all zero");
                out.push(Frame {
                    kind: FrameKind::Discard,
                    value: start + (c * per * 64) as u64 * PAGE,
                    payload: chunk[..=last]
                        .iter()
                        .flat_map(|w| w.to_le_bytes())
                        .collect(),
                });
            }
        }
        out
    }
}

/// P from the source's dirty bitmaps.
pub fn from_dirty(regions: &[RegionDesc], dirty: &[DirtyRegion]) -> PageSet {
    let mut set = PageSet::new(regions);
    for r in dirty {
        for (w, &word) in r.bitmap.iter().enumerate() {
            for b in (0..64).filter(|b| word >> b & 1 == 1) {
                let p = w as u64 * 64 + b;
                if p < r.pages {
                    set.insert(r.gpa + p * PAGE);
                }
            }
        }
    }
    set
}

/// What the source's return-path reader hears.
enum Heard {
    Request(u64),
    Done(u64),
    Failed(String),
    Broken(io::Error),
}

/// Copies one page of guest RAM at a guest-physical address.
pub type ReadRam<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), VmError> + 'a;

/// The source's sending side of post-copy.
struct PageSender<'a> {
    read: &'a mut ReadRam<'a>,
    fwd: &'a mut dyn Write,
    unsent: PageSet,
    buf: Vec<u8>,
    progress: &'a Progress,
}

impl PageSender<'_> {
    fn send(&mut self, gpa: u64) -> Result<(), MigrationError> {
        self.unsent.remove(gpa);
        (self.read)(gpa, &mut self.buf).map_err(MigrationError::Vm)?;
        Frame::page(gpa, &self.buf)
            .write(self.fwd)
            .map_err(io_err("post-copy pages"))?;
        self.progress.update(|s| s.postcopy_pages += 1);
        Ok(())
    }

    /// Serves a request; returns PostcopyDone's count when that is what came.
    fn heard(&mut self, h: Heard) -> Result<Option<u64>, MigrationError> {
        match h {
            Heard::Request(gpa) => {
                self.progress.update(|s| s.postcopy_requests += 1);
                if !self.unsent.in_ram(gpa) {
                    return Err(MigrationError::Protocol(format!(
                        "the destination asked for page {gpa:#x}, which is not guest RAM"
                    )));
                }
                if self.unsent.contains(gpa) {
                    self.send(gpa)?;
                    self.fwd.flush().map_err(io_err("post-copy pages"))?;
                }
                Ok(None)
            }
            Heard::Done(n) => Ok(Some(n)),
            Heard::Failed(why) => Err(MigrationError::DestinationFailed(why)),
            Heard::Broken(source) => Err(MigrationError::Io {
                phase: "post-copy",
                source,
            }),
        }
    }
}

fn io_err(phase: &'static str) -> impl FnOnce(io::Error) -> MigrationError {
    move |source| MigrationError::Io { phase, source }
}

/// Source: send every page of `set`, those the destination asks for first, then wait for
/// its PostcopyDone. `read` copies guest RAM; `ret` is the return path (read on its own
/// thread), `fwd` the forward path; background pages keep under `max_bandwidth` bytes/s
/// (0: no cap), requested ones do not wait.
pub fn send_pages<'a>(
    set: PageSet,
    read: &'a mut ReadRam<'a>,
    fwd: &'a mut dyn Write,
    mut ret: impl Read + Send,
    progress: &'a Progress,
    io_timeout: Duration,
    max_bandwidth: u64,
) -> Result<(), MigrationError> {
    let total = set.len();
    let background: Vec<u64> = set.pages().collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|sc| {
        sc.spawn(move || {
            loop {
                let heard = match Msg::read(&mut ret) {
                    Ok(m) if m.kind == Kind::PageRequest => Heard::Request(m.value),
                    Ok(m) if m.kind == Kind::PostcopyDone => Heard::Done(m.value),
                    Ok(m) if m.kind == Kind::Failed => Heard::Failed(m.text),
                    Ok(m) => Heard::Failed(format!("unexpected {:?} during post-copy", m.kind)),
                    Err(e) => Heard::Broken(e),
                };
                let last = !matches!(heard, Heard::Request(_));
                if tx.send(heard).is_err() || last {
                    return;
                }
            }
        });
        let mut out = PageSender {
            read,
            fwd,
            unsent: set,
            buf: vec![0u8; PAGE_SIZE],
            progress,
        };
        let start = Instant::now();
        for (n, gpa) in background.into_iter().enumerate() {
            if max_bandwidth > 0 {
                let due = Duration::from_secs_f64((n * PAGE_SIZE) as f64 / max_bandwidth as f64);
                let spent = start.elapsed();
                if due > spent {
                    out.fwd.flush().map_err(io_err("post-copy pages"))?;
                    // Requests are served while waiting: they are what the guest waits for.
                    if let Ok(h) = rx.recv_timeout(due - spent)
                        && let Some(n) = out.heard(h)?
                    {
                        return Err(MigrationError::Protocol(format!(
                            "PostcopyDone({n}) before every page was sent"
                        )));
                    }
                }
            }
            while let Ok(h) = rx.try_recv() {
                if let Some(n) = out.heard(h)? {
                    return Err(MigrationError::Protocol(format!(
                        "PostcopyDone({n}) before every page was sent"
                    )));
                }
            }
            if out.unsent.contains(gpa) {
                out.send(gpa)?;
            }
        }
        Frame::new(FrameKind::Done, total)
            .write(out.fwd)
            .and_then(|()| out.fwd.flush())
            .map_err(io_err("post-copy pages"))?;
        loop {
            let h = rx
                .recv_timeout(io_timeout * 2)
                .map_err(|_| MigrationError::Io {
                    phase: "waiting for the destination to place every page",
                    source: io::ErrorKind::TimedOut.into(),
                })?;
            if let Some(n) = out.heard(h)? {
                if n != total {
                    return Err(MigrationError::Protocol(format!(
                        "the destination placed {n} of {total} post-copy pages"
                    )));
                }
                return Ok(());
            }
        }
    })
}

/// Destination bookkeeping shared by the fault thread and the page reader.
struct Pending {
    missing: PageSet,
    asked: Vec<(u64, Instant)>,
}

/// What a destination keeps when post-copy loses its link: the registered RAM, the pages
/// still missing and the session a resume must present.
pub struct Paused {
    ram: Arc<dyn PostcopyRam>,
    missing: PageSet,
    session: u64,
}

impl std::fmt::Debug for Paused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paused")
            .field("missing", &self.missing.len())
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Paused {
    /// Pages the guest still waits for.
    pub fn missing(&self) -> u64 {
        self.missing.len()
    }
}

/// A fresh session id for a post-copy (not secret: it tells a resume from a stranger).
pub fn new_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// Destination, after COMMIT(1): read the session and the Discard frames, drop those pages,
/// register RAM, then `run` (which starts the guest and acknowledges COMMIT); place every
/// page as it arrives, asking for the ones the guest touches first. `ret` writes the return
/// path. On a failure after `run`, `paused` gets what a resume needs.
pub fn receive_pages(
    ram: Arc<dyn PostcopyRam>,
    regions: &[RegionDesc],
    fwd: &mut dyn Read,
    ret: &mut (dyn Write + Send),
    progress: &Progress,
    run: &mut dyn FnMut() -> Result<(), MigrationError>,
    paused: &mut Option<Paused>,
) -> Result<(), MigrationError> {
    let first = Frame::read(fwd).map_err(io_err("post-copy discard"))?;
    if first.kind != FrameKind::Session || first.value == 0 {
        return Err(MigrationError::Protocol(format!(
            "post-copy {:?} frame where the session was due",
            first.kind
        )));
    }
    let missing = read_page_set(fwd, regions, Some(&*ram))?;
    info!(
        pages = missing.len(),
        "post-copy: pages to follow discarded"
    );
    ram.start().map_err(MigrationError::Vm)?;
    run()?;
    progress.set_status(crate::Status::PostcopyActive);
    serve(ram, missing, first.value, fwd, ret, progress, paused)
}

/// Reads Discard frames up to DiscardEnd into a set over `regions`, dropping each page from
/// `ram` when given.
fn read_page_set(
    r: &mut dyn Read,
    regions: &[RegionDesc],
    ram: Option<&dyn PostcopyRam>,
) -> Result<PageSet, MigrationError> {
    let mut set = PageSet::new(regions);
    loop {
        let f = Frame::read(r).map_err(io_err("post-copy discard"))?;
        match f.kind {
            FrameKind::Discard => {
                // Pages are dropped a run of neighbours at a time (one madvise each).
                let mut run: Option<(u64, u64)> = None;
                let drop_run = |run: Option<(u64, u64)>| match (ram, run) {
                    (Some(ram), Some((gpa, pages))) => {
                        ram.discard(gpa, pages).map_err(MigrationError::Vm)
                    }
                    _ => Ok(()),
                };
                for (w, chunk) in f.payload.chunks_exact(8).enumerate() {
                    let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                    for b in (0..64).filter(|b| word >> b & 1 == 1) {
                        let gpa = f.value + (w as u64 * 64 + b) * PAGE;
                        if !set.insert(gpa) {
                            return Err(MigrationError::Protocol(format!(
                                "post-copy discard of page {gpa:#x}, which is not guest RAM"
                            )));
                        }
                        run = match run {
                            Some((start, n)) if start + n * PAGE == gpa => Some((start, n + 1)),
                            other => {
                                drop_run(other)?;
                                Some((gpa, 1))
                            }
                        };
                    }
                }
                drop_run(run)?;
            }
            FrameKind::DiscardEnd if f.value == set.len() => return Ok(set),
            FrameKind::DiscardEnd => {
                return Err(MigrationError::Protocol(format!(
                    "post-copy DiscardEnd says {} pages, the discards named {}",
                    f.value,
                    set.len()
                )));
            }
            k => {
                return Err(MigrationError::Protocol(format!(
                    "post-copy {k:?} frame before DiscardEnd"
                )));
            }
        }
    }
}

/// `set` as Discard frames and DiscardEnd, flushed.
pub(crate) fn write_page_set(set: &PageSet, w: &mut dyn Write) -> io::Result<()> {
    let mut w = io::BufWriter::new(w);
    for f in set.discard_frames() {
        f.write(&mut w)?;
    }
    Frame::new(FrameKind::DiscardEnd, set.len()).write(&mut w)?;
    w.flush()
}

/// Places the pages of `missing` as they arrive, asking for faulted ones first, until Done.
fn serve(
    ram: Arc<dyn PostcopyRam>,
    missing: PageSet,
    session: u64,
    fwd: &mut dyn Read,
    ret: &mut (dyn Write + Send),
    progress: &Progress,
    paused: &mut Option<Paused>,
) -> Result<(), MigrationError> {
    let total = missing.len();
    let pending = Mutex::new(Pending {
        missing,
        asked: Vec::new(),
    });
    let lock = || pending.lock().unwrap_or_else(|e| e.into_inner());
    let over = AtomicBool::new(false);
    let (ret_tx, ret_rx) = std::sync::mpsc::channel::<Msg>();
    let res = std::thread::scope(|sc| {
        let (over, lock, ram) = (&over, &lock, &*ram);
        let requests = ret_tx.clone();
        let faults = sc.spawn(move || -> Result<(), MigrationError> {
            while !over.load(Ordering::SeqCst) {
                let Some(gpa) = ram
                    .next_fault(Duration::from_millis(50))
                    .map_err(MigrationError::Vm)?
                else {
                    continue;
                };
                let mut p = lock();
                if p.missing.contains(gpa) {
                    if !p.asked.iter().any(|(g, _)| *g == gpa) {
                        p.asked.push((gpa, Instant::now()));
                        drop(p);
                        progress.update(|s| s.postcopy_requests += 1);
                        if requests.send(Msg::new(Kind::PageRequest, gpa)).is_err() {
                            return Ok(());
                        }
                    }
                } else if p.missing.in_ram(gpa) {
                    // Not stale and not present: a page nobody wrote, zero on both sides.
                    drop(p);
                    ram.place(gpa, None).map_err(MigrationError::Vm)?;
                } else {
                    warn!(gpa, "post-copy fault outside guest RAM");
                }
            }
            Ok(())
        });
        let writer = sc.spawn(move || -> io::Result<()> {
            while let Ok(m) = ret_rx.recv() {
                m.write(&mut *ret)?;
            }
            Ok(())
        });
        let placed = place_pages(ram, fwd, &pending, total, progress);
        over.store(true, Ordering::SeqCst);
        let faults = faults.join().expect("fault thread");
        let done = placed.and_then(|n| {
            faults?;
            ram.finish().map_err(MigrationError::Vm)?;
            info!(pages = n, "post-copy: every page in place");
            Ok(n)
        });
        if let Ok(n) = done {
            let _ = ret_tx.send(Msg::new(Kind::PostcopyDone, n));
        }
        drop(ret_tx);
        let written = writer.join().expect("writer thread");
        done?;
        written.map_err(|source| MigrationError::Io {
            phase: "post-copy page requests",
            source,
        })
    });
    if res.is_err() {
        let missing = pending
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .missing;
        if !missing.is_empty() {
            *paused = Some(Paused {
                ram,
                missing,
                session,
            });
        }
    }
    res
}

/// The 16 bytes a source presents to resume: magic and session.
pub const RESUME_MAGIC: [u8; 8] = *b"FERRYRES";

/// Destination, `migrate-recover`: check that `ch` comes from the source of the paused
/// session, send it the pages still missing, `resume` the guest, place the pages. A stranger
/// is refused by name and the paused state stays for the next attempt.
/// The status ends `completed`, or `postcopy-paused` with the reason.
pub fn recover(
    ch: Channel,
    paused: &mut Option<Paused>,
    progress: &Progress,
    io_timeout: Duration,
    resume: &mut dyn FnMut() -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    let span = tracing::info_span!("migration", side = "destination", recovery = true);
    let _g = span.enter();
    let res = recover_inner(ch, paused, progress, io_timeout, resume);
    finish_status(progress, &res);
    res
}

fn finish_status(progress: &Progress, res: &Result<(), MigrationError>) {
    match res {
        Ok(()) => progress.set_status(crate::Status::Completed),
        Err(e) => progress.fail(crate::Status::PostcopyPaused, crate::chain(e)),
    }
}

fn recover_inner(
    mut ch: Channel,
    paused: &mut Option<Paused>,
    progress: &Progress,
    io_timeout: Duration,
    resume: &mut dyn FnMut() -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    let s = ch.socket();
    s.set_read_timeout(Some(io_timeout)).ok();
    s.set_write_timeout(Some(io_timeout)).ok();
    s.set_nodelay(true).ok();
    let Some(state) = paused.take() else {
        return Err(MigrationError::Protocol(
            "no paused post-copy to resume".into(),
        ));
    };
    let mut h = [0u8; 16];
    let hello = ch.read_exact(&mut h).map_err(io_err("post-copy resume"));
    let session = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
    let refusal = match hello {
        Err(e) => Some(e),
        Ok(()) if h[..8] != RESUME_MAGIC => Some(MigrationError::Protocol(
            "not a post-copy resume (bad magic)".into(),
        )),
        Ok(()) if session != state.session => Some(MigrationError::Refused(format!(
            "resume from a different source: session {session:#018x}, this destination waits for {:#018x}",
            state.session
        ))),
        Ok(()) => None,
    };
    if let Some(e) = refusal {
        if let MigrationError::Refused(why) = &e {
            let _ = Msg::with_text(Kind::Refuse, why).write(&mut ch);
            crate::transport::close_gracefully(&mut ch);
        }
        *paused = Some(state);
        return Err(e);
    }
    let missing = state.missing.len();
    info!(pages = missing, "post-copy: resuming");
    let sent = Msg::new(Kind::Accept, missing)
        .write(&mut ch)
        .and_then(|()| write_page_set(&state.missing, &mut ch));
    if let Err(e) = sent {
        *paused = Some(state);
        return Err(io_err("post-copy resume")(e));
    }
    let mut fwd = match ch.try_clone() {
        Ok(c) => io::BufReader::with_capacity(256 << 10, c),
        Err(e) => {
            *paused = Some(state);
            return Err(io_err("post-copy resume")(e));
        }
    };
    if let Err(e) = resume() {
        *paused = Some(state);
        return Err(e);
    }
    progress.set_status(crate::Status::PostcopyActive);
    serve(
        state.ram,
        state.missing,
        state.session,
        &mut fwd,
        &mut ch,
        progress,
        paused,
    )
}

/// Source, `migrate` with `resume: true`: present `session` to the destination at `uri`,
/// learn which pages it still misses, send them (requested ones first).
/// The status ends `completed`, or `postcopy-paused` with the reason.
pub fn resume(
    read: &mut ReadRam<'_>,
    regions: &[RegionDesc],
    uri: &str,
    session: u64,
    params: &crate::Params,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let span = tracing::info_span!("migration", side = "source", uri, recovery = true);
    let _g = span.enter();
    let res = resume_inner(read, regions, uri, session, params, progress);
    progress.set_socket(None);
    finish_status(progress, &res);
    res
}

fn resume_inner(
    read: &mut ReadRam<'_>,
    regions: &[RegionDesc],
    uri: &str,
    session: u64,
    params: &crate::Params,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let uri = crate::transport::Uri::parse(uri)?;
    if !matches!(uri, crate::transport::Uri::Tcp(_)) {
        return Err(MigrationError::Protocol(
            "post-copy resumes over tcp: only".into(),
        ));
    }
    let s = crate::transport::connect(&uri, params.io_timeout)?;
    s.set_read_timeout(Some(params.io_timeout)).ok();
    s.set_write_timeout(Some(params.io_timeout)).ok();
    s.set_nodelay(true).ok();
    progress.set_socket(s.try_clone().ok());
    let mut ch = Channel::Plain(s);
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&RESUME_MAGIC);
    h[8..].copy_from_slice(&session.to_le_bytes());
    ch.write_all(&h).map_err(io_err("post-copy resume"))?;
    let m = Msg::read(&mut ch).map_err(io_err("post-copy resume"))?;
    crate::source::accepted(m)?;
    let set = read_page_set(&mut ch, regions, None)?;
    info!(
        pages = set.len(),
        "post-copy: resumed; sending what the destination misses"
    );
    progress.set_status(crate::Status::PostcopyActive);
    let reader = ch.try_clone().map_err(io_err("post-copy resume"))?;
    ch.socket().set_read_timeout(None).ok();
    let mut w = io::BufWriter::with_capacity(256 << 10, ch);
    send_pages(
        set,
        read,
        &mut w,
        reader,
        progress,
        params.io_timeout,
        params.max_postcopy_bandwidth,
    )
}

/// Reads pages until Done, placing each exactly once; returns how many were placed.
fn place_pages(
    ram: &dyn PostcopyRam,
    fwd: &mut dyn Read,
    pending: &Mutex<Pending>,
    total: u64,
    progress: &Progress,
) -> Result<u64, MigrationError> {
    let mut placed = 0u64;
    loop {
        let f = Frame::read(fwd).map_err(|source| MigrationError::Io {
            phase: "post-copy pages",
            source,
        })?;
        let data = match f.kind {
            FrameKind::Page => Some(&f.payload[..]),
            FrameKind::Zero => None,
            FrameKind::Done if f.value == total && placed == total => return Ok(placed),
            FrameKind::Done => {
                return Err(MigrationError::Protocol(format!(
                    "post-copy Done after {placed} of {total} pages (source says {})",
                    f.value
                )));
            }
            k => {
                return Err(MigrationError::Protocol(format!(
                    "post-copy {k:?} frame among the pages"
                )));
            }
        };
        let gpa = f.value;
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        if !p.missing.contains(gpa) {
            let why = if p.missing.in_ram(gpa) {
                "was not discarded or was sent twice"
            } else {
                "is not guest RAM"
            };
            return Err(MigrationError::Protocol(format!(
                "post-copy page {gpa:#x} {why}"
            )));
        }
        if !ram.place(gpa, data).map_err(MigrationError::Vm)? {
            return Err(MigrationError::Protocol(format!(
                "post-copy page {gpa:#x} was present already"
            )));
        }
        p.missing.remove(gpa);
        placed += 1;
        let waited = p
            .asked
            .iter()
            .position(|(g, _)| *g == gpa)
            .map(|i| p.asked.swap_remove(i).1.elapsed());
        drop(p);
        progress.update(|s| {
            s.postcopy_pages += 1;
            if let Some(w) = waited {
                let us = w.as_micros() as u64;
                s.postcopy_latency_sum_us += us;
                s.postcopy_latency_max_us = s.postcopy_latency_max_us.max(us);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<RegionDesc> {
        vec![
            RegionDesc {
                gpa: 0,
                size: 1 << 20,
            },
            RegionDesc {
                gpa: 1 << 32,
                size: 512 << 20,
            },
        ]
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        let frames = [
            Frame::page(0x5000, &page),
            Frame::page(0x6000, &[0; PAGE_SIZE]),
            Frame::new(FrameKind::Done, 2),
        ];
        assert_eq!(frames[1].kind, FrameKind::Zero);
        let mut buf = Vec::new();
        for f in &frames {
            f.write(&mut buf).unwrap();
        }
        let mut r = &buf[..];
        assert_eq!(Frame::read(&mut r).unwrap().payload, page);
        assert_eq!(Frame::read(&mut r).unwrap(), frames[1]);
        assert_eq!(Frame::read(&mut r).unwrap(), frames[2]);
        // A flipped byte fails the CRC, naming the page.
        let mut bad = buf.clone();
        bad[100] ^= 1;
        let e = Frame::read(&mut &bad[..]).unwrap_err().to_string();
        assert_eq!(e, "post-copy page at 0x5000 fails its CRC");
        // Kind 0 and lengths a kind cannot have.
        let mut h = [0u8; 16];
        assert!(Frame::read(&mut &h[..]).is_err());
        h[0] = FrameKind::Discard as u8;
        h[4..8].copy_from_slice(&(MAX_BITMAP + 8).to_le_bytes());
        let e = Frame::read(&mut &h[..]).unwrap_err().to_string();
        assert!(
            e.contains("Discard frame with a length of 4104 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_dirty_set_travels_as_discard_frames() {
        let dirty = vec![
            DirtyRegion {
                gpa: 0,
                pages: 256,
                bitmap: vec![0b1010, 0, 0, 1 << 63],
            },
            DirtyRegion {
                gpa: 1 << 32,
                pages: 131072,
                bitmap: {
                    let mut b = vec![0u64; 2048];
                    b[0] = 1;
                    b[1500] = 1 << 7;
                    b
                },
            },
        ];
        let set = from_dirty(&regions(), &dirty);
        assert_eq!(set.len(), 5);
        let frames = set.discard_frames();
        // Region 2's bits lie in two different 128 MiB chunks.
        assert_eq!(frames.len(), 3);
        let mut back = PageSet::new(&regions());
        for f in &frames {
            for (w, c) in f.payload.chunks_exact(8).enumerate() {
                let word = u64::from_le_bytes(c.try_into().unwrap());
                for b in (0..64).filter(|b| word >> b & 1 == 1) {
                    assert!(back.insert(f.value + (w as u64 * 64 + b) * PAGE));
                }
            }
        }
        assert_eq!(
            back.pages().collect::<Vec<_>>(),
            set.pages().collect::<Vec<_>>()
        );
        assert_eq!(
            set.pages().last(),
            Some((1u64 << 32) + (1500 * 64 + 7) * PAGE)
        );
    }

    #[test]
    fn a_page_set_refuses_what_is_not_guest_ram() {
        let mut s = PageSet::new(&regions());
        assert!(!s.insert(2 << 20), "a hole between the regions");
        assert!(!s.insert(0x1001), "not page-aligned");
        assert!(s.insert(0x1000));
        assert!(s.insert(0x1000));
        assert_eq!(s.len(), 1);
        assert!(s.remove(0x1000));
        assert!(!s.remove(0x1000));
        assert!(s.is_empty());
    }

    /// Guest RAM in a vector: the engine's checks are what is tested, not userfaultfd.
    struct Ram {
        pages: Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
    }

    impl PostcopyRam for Ram {
        fn discard(&self, gpa: u64, _: u64) -> Result<(), VmError> {
            self.pages.lock().unwrap().remove(&gpa);
            Ok(())
        }
        fn start(&self) -> Result<(), VmError> {
            Ok(())
        }
        fn next_fault(&self, t: Duration) -> Result<Option<u64>, VmError> {
            std::thread::sleep(t);
            Ok(None)
        }
        fn place(&self, gpa: u64, data: Option<&[u8]>) -> Result<bool, VmError> {
            let mut p = self.pages.lock().unwrap();
            if p.contains_key(&gpa) {
                return Ok(false);
            }
            p.insert(gpa, data.map_or(vec![0; PAGE_SIZE], <[u8]>::to_vec));
            Ok(true)
        }
        fn finish(&self) -> Result<(), VmError> {
            Ok(())
        }
    }

    /// The destination's account of a stream discarding pages 0x1000 and 0x2000 and then
    /// sending `pages`.
    fn receive(pages: &[Frame]) -> (Result<(), MigrationError>, Option<Paused>) {
        let mut set = PageSet::new(&regions());
        set.insert(0x1000);
        set.insert(0x2000);
        let mut wire = Vec::new();
        Frame::new(FrameKind::Session, 7).write(&mut wire).unwrap();
        write_page_set(&set, &mut wire).unwrap();
        for f in pages {
            f.write(&mut wire).unwrap();
        }
        let ram = Arc::new(Ram {
            pages: Mutex::new(Default::default()),
        });
        let mut paused = None;
        let res = receive_pages(
            ram,
            &regions(),
            &mut &wire[..],
            &mut Vec::new(),
            &Progress::default(),
            &mut || Ok(()),
            &mut paused,
        );
        (res, paused)
    }

    fn done(n: u64) -> Frame {
        Frame::new(FrameKind::Done, n)
    }

    #[test]
    fn the_destination_places_each_page_once_and_refuses_the_rest_by_name() {
        let page = [5u8; PAGE_SIZE];
        let (res, paused) = receive(&[
            Frame::page(0x1000, &page),
            Frame::page(0x2000, &[0; PAGE_SIZE]),
            done(2),
        ]);
        assert!(res.is_ok(), "{res:?}");
        assert!(paused.is_none());
        let err = |frames: &[Frame]| {
            let (res, paused) = receive(frames);
            (crate::chain(&res.unwrap_err()), paused.map(|p| p.missing()))
        };
        assert_eq!(
            err(&[Frame::page(0x1000, &page), Frame::page(0x1000, &page)]),
            (
                "Protocol error: post-copy page 0x1000 was not discarded or was sent twice".into(),
                Some(1)
            )
        );
        assert_eq!(
            err(&[Frame::page(0x3000, &page)]),
            (
                "Protocol error: post-copy page 0x3000 was not discarded or was sent twice".into(),
                Some(2)
            )
        );
        assert_eq!(
            err(&[Frame::page(1 << 40, &page)]),
            (
                "Protocol error: post-copy page 0x10000000000 is not guest RAM".into(),
                Some(2)
            )
        );
        assert_eq!(
            err(&[Frame::page(0x1000, &page), done(2)]).0,
            "Protocol error: post-copy Done after 1 of 2 pages (source says 2)"
        );
        // A link that ends mid-way leaves what a resume needs: the one page still missing.
        let (res, paused) = receive(&[Frame::page(0x2000, &page)]);
        assert!(crate::chain(&res.unwrap_err()).contains("post-copy pages"));
        assert_eq!(paused.map(|p| (p.missing(), p.session)), Some((1, 7)));
    }

    #[test]
    fn the_source_refuses_a_request_outside_guest_ram_by_name() {
        let mut set = PageSet::new(&regions());
        set.insert(0x1000);
        let mut ret = Vec::new();
        Msg::new(Kind::PageRequest, 1 << 40)
            .write(&mut ret)
            .unwrap();
        let mut read = |_: u64, b: &mut [u8]| {
            b.fill(1);
            Ok(())
        };
        let mut fwd = Vec::new();
        let e = send_pages(
            set,
            &mut read,
            &mut fwd,
            &ret[..],
            &Progress::default(),
            Duration::from_secs(1),
            // Slow enough that the request is heard before the only page goes.
            4096,
        )
        .unwrap_err();
        assert_eq!(
            crate::chain(&e),
            "Protocol error: the destination asked for page 0x10000000000, which is not guest RAM"
        );
    }
}
