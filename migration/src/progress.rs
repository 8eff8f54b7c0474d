//! Migration status, statistics and events, shared between the engine and whoever watches it
//! (the QMP server answers `query-migrate` from a [`Snapshot`]).

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Migration status, named as QEMU's `MigrationStatus`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Status {
    /// No migration yet.
    #[default]
    None,
    /// Connecting and handshaking.
    Setup,
    /// RAM pre-copy.
    Active,
    /// Stop-and-copy: vCPUs paused, last pages and device state.
    Device,
    /// Done; the guest runs on the destination.
    Completed,
    /// Failed; see the error.
    Failed,
    /// `migrate_cancel` received.
    Cancelling,
    /// Cancelled; the source runs on.
    Cancelled,
    /// Post-copy: the guest runs on the destination while the rest of its RAM follows.
    PostcopyActive,
    /// Post-copy lost its link: the destination's guest waits for its missing pages, the
    /// source keeps them; neither side can run the guest alone.
    PostcopyPaused,
}

impl Status {
    /// QEMU's name for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Device => "device",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
            Status::PostcopyActive => "postcopy-active",
            Status::PostcopyPaused => "postcopy-paused",
        }
    }

    /// Whether a migration is in flight (hotplug is refused in these states).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Status::Setup
                | Status::Active
                | Status::Device
                | Status::Cancelling
                | Status::PostcopyActive
                | Status::PostcopyPaused
        )
    }

    /// Whether the migration has ended one way or the other.
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// Figures for `query-migrate`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Current status.
    pub status: Status,
    /// Why it failed.
    pub error: Option<String>,
    /// Milliseconds from start to completion (or until now).
    pub total_time_ms: u64,
    /// Milliseconds spent connecting and handshaking.
    pub setup_time_ms: u64,
    /// Source-side downtime: from pausing the vCPUs to the destination's COMMIT ack.
    pub downtime_ms: u64,
    /// Downtime the last iteration predicted.
    pub expected_downtime_ms: u64,
    /// Stream bytes written.
    pub transferred: u64,
    /// Pages sent with data.
    pub normal_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Dirty bytes left after the last sync.
    pub remaining: u64,
    /// Total guest RAM in bytes.
    pub total: u64,
    /// Completed dirty-sync iterations.
    pub iterations: u64,
    /// Pages dirtied per second in the last iteration.
    pub dirty_pages_rate: u64,
    /// Throughput of the last iteration in Mbit/s.
    pub mbps: f64,
    /// Page channels in use besides the main stream (0: pages travel in the main stream).
    pub page_channels: u16,
    /// vCPU throttle of auto-converge in percent (0: not throttled).
    pub cpu_throttle_percentage: u8,
    /// Highest throttle this migration applied (stays after it ends).
    pub cpu_throttle_peak: u8,
    /// Downtime the last pass was measured against (the limit, raised by the ramp).
    pub downtime_allowed_ms: u64,
    /// Post-copy: pages the destination asked for (source: served).
    pub postcopy_requests: u64,
    /// Post-copy: pages that moved after the switchover.
    pub postcopy_pages: u64,
    /// Post-copy, destination: microseconds from a page request to the page in place,
    /// summed and at most.
    pub postcopy_latency_sum_us: u64,
    /// See `postcopy_latency_sum_us`.
    pub postcopy_latency_max_us: u64,
}

/// Something that wants to hear about status changes and passes (QMP events).
pub type Listener = Box<dyn Fn(Notice) + Send + Sync>;

/// A notice for listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The status is about to change: react (e.g. allow hotplug again) before anyone can read
    /// the new status.
    Changing(Status),
    /// The status changed and is visible (QMP `MIGRATION`).
    Status(Status),
    /// A RAM pass started (QMP `MIGRATION_PASS`, `pass` = dirty-sync count).
    Pass(u64),
}

/// Shared progress of one migration: status, counters, cancellation.
pub struct Progress {
    snap: Mutex<Snapshot>,
    changed: Condvar,
    cancel: AtomicBool,
    /// `migrate-start-postcopy` was issued.
    postcopy: AtomicBool,
    /// The post-copy session a resume presents (0: none).
    session: std::sync::atomic::AtomicU64,
    /// Live-tunable limits: `migrate-set-parameters` during a migration takes effect at once.
    max_bandwidth: std::sync::atomic::AtomicU64,
    downtime_limit_ms: std::sync::atomic::AtomicU64,
    sockets: Mutex<Vec<TcpStream>>,
    started: Mutex<Option<Instant>>,
    listener: Option<Listener>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("snap", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new(None)
    }
}

impl Progress {
    /// Fresh progress; `listener` hears every status change and pass.
    pub fn new(listener: Option<Listener>) -> Self {
        Progress {
            snap: Mutex::new(Snapshot::default()),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
            postcopy: AtomicBool::new(false),
            session: std::sync::atomic::AtomicU64::new(0),
            max_bandwidth: std::sync::atomic::AtomicU64::new(0),
            downtime_limit_ms: std::sync::atomic::AtomicU64::new(300),
            sockets: Mutex::new(Vec::new()),
            started: Mutex::new(None),
            listener,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current figures, `total_time_ms` brought up to date while running.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.lock().clone();
        if !s.status.is_finished()
            && let Some(t) = *self.started.lock().unwrap_or_else(|p| p.into_inner())
        {
            s.total_time_ms = t.elapsed().as_millis() as u64;
        }
        s
    }

    /// Current status.
    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub(crate) fn start(&self) {
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.cancel.store(false, Ordering::SeqCst);
        let mut s = self.lock();
        *s = Snapshot {
            status: s.status,
            ..Snapshot::default()
        };
    }

    /// `migrate-start-postcopy`: switch to post-copy after the current pass.
    pub fn start_postcopy(&self) {
        self.postcopy.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_session(&self, s: u64) {
        self.session.store(s, Ordering::SeqCst);
    }

    /// The post-copy session of this migration (0: it did not reach post-copy).
    pub fn session(&self) -> u64 {
        self.session.load(Ordering::SeqCst)
    }

    pub(crate) fn postcopy_requested(&self) -> bool {
        self.postcopy.load(Ordering::SeqCst)
    }

    pub(crate) fn elapsed_ms(&self) -> u64 {
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    /// Set the status, notify listeners and wake waiters. Listeners hear
    /// [`Notice::Changing`] before anyone can read the new status (so a client that sees
    /// `completed` also sees the VMM's reaction to it, e.g. hotplug allowed again) and
    /// [`Notice::Status`] after it is readable (so a client that hears the event and asks
    /// `query-migrate` gets the same status).
    pub fn set_status(&self, status: Status) {
        if self.lock().status == status {
            return;
        }
        if let Some(l) = &self.listener {
            l(Notice::Changing(status));
        }
        {
            let mut s = self.lock();
            s.status = status;
            if status.is_finished() {
                s.total_time_ms = self.elapsed_ms();
            }
        }
        self.changed.notify_all();
        if let Some(l) = &self.listener {
            l(Notice::Status(status));
        }
    }

    pub(crate) fn fail(&self, status: Status, why: String) {
        self.lock().error = Some(why);
        self.set_status(status);
    }

    /// An incoming attempt turned away before its stream started (a failed TLS handshake, a
    /// client `tls-authz` does not allow): setup, then failed with `why`.
    pub fn refused(&self, why: String) {
        self.start();
        self.set_status(Status::Setup);
        self.fail(Status::Failed, why);
    }

    pub(crate) fn pass(&self, n: u64) {
        if let Some(l) = &self.listener {
            l(Notice::Pass(n));
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.lock());
    }

    /// Wait until `done(status)` holds, at most `timeout`; the error is the status reached.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(Status) -> bool,
    ) -> Result<Status, Status> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !done(s.status) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(s.status);
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(s.status)
    }

    /// Ask the engine to stop; it resumes the source and ends as `cancelled`.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if self.status().is_active() {
            self.set_status(Status::Cancelling);
        }
        self.shutdown_sockets();
    }

    /// Shut down every channel of the migration, so whatever blocks on one returns now.
    pub(crate) fn shutdown_sockets(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Change the bandwidth cap (bytes/s, 0 unlimited) of the running migration.
    pub fn set_max_bandwidth(&self, b: u64) {
        self.max_bandwidth.store(b, Ordering::SeqCst);
    }

    /// Current bandwidth cap.
    pub fn max_bandwidth(&self) -> u64 {
        self.max_bandwidth.load(Ordering::SeqCst)
    }

    /// Change the downtime limit (ms) of the running migration.
    pub fn set_downtime_limit(&self, ms: u64) {
        self.downtime_limit_ms.store(ms, Ordering::SeqCst);
    }

    /// Current downtime limit.
    pub fn downtime_limit_ms(&self) -> u64 {
        self.downtime_limit_ms.load(Ordering::SeqCst)
    }

    /// Whether cancellation was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Destination: stop reading every channel, so each thread blocked on one returns now,
    /// while the main channel can still carry the `Failed` message to the source.
    pub(crate) fn stop_reading(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    /// The main channel's socket (or none: forget every socket).
    pub(crate) fn set_socket(&self, s: Option<TcpStream>) {
        *self.sockets.lock().unwrap_or_else(|p| p.into_inner()) = s.into_iter().collect();
    }

    /// A page channel's socket, shut down with the main one.
    pub(crate) fn add_socket(&self, s: TcpStream) {
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }
}

/// A connection of a migration with page channels, which may rightly stay silent while the
/// others carry the pages: the main stream during the whole RAM transfer, a channel that has
/// done its share of a pass until every other channel has done theirs. A read that times out
/// is retried while pages keep arriving on some channel: it fails once the page count has not
/// moved since the previous timeout (after one to two timeouts of silence everywhere). The
/// count is read only on a timeout, never on the page path.
pub(crate) struct Patient<'a, R> {
    inner: R,
    progress: &'a Progress,
    on: bool,
    /// Pages written when the last timeout was seen.
    seen: u64,
}

impl<'a, R> Patient<'a, R> {
    /// `on`: page channels are in use (otherwise reads time out as they always did).
    pub(crate) fn new(inner: R, progress: &'a Progress, on: bool) -> Self {
        let mut p = Patient {
            inner,
            progress,
            on,
            seen: 0,
        };
        p.seen = p.pages();
        p
    }

    fn pages(&self) -> u64 {
        let s = self.progress.snapshot();
        s.normal_pages + s.zero_pages
    }
}

impl<R: std::io::Read> std::io::Read for Patient<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e)
                    if self.on
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    let now = self.pages();
                    if now == self.seen {
                        return Err(e);
                    }
                    self.seen = now;
                    tracing::trace!("connection quiet while pages arrive elsewhere; waiting on");
                }
                r => return r,
            }
        }
    }
}
