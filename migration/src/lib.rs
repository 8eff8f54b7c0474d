//! Ferry's live-migration engine.
//!
//! The engine drives the [`SourceVm`] / [`DestinationVm`] traits that `vmm` implements and
//! knows nothing about KVM. One forward stream (the devstate format of `FORMAT.md`) carries
//! configuration, RAM and device state for TCP and `file:` alike; the TCP protocol adds a
//! hello, a return path and COMMIT, described in [`protocol`].
//!
//! Source, in order: handshake (protocol version, then the destination compares machine type
//! and configuration and refuses with the list of differences before any RAM moves); pass 0
//! over all RAM with zero pages as markers; dirty passes until the remaining dirty set fits in
//! the downtime limit at the measured bandwidth (or `max_iterations`, where the
//! [`SwitchoverPolicy`] decides); stop-and-copy of the last pages and every device section;
//! LOADED from the destination; COMMIT. Any failure before COMMIT resumes the source.
//!
//! With [`Params::tls`] the TCP channel (forward stream and return path alike) is one mutual
//! TLS 1.3 session ([`ferry_tls`]); the destination's [`Acceptor`] runs every connection's
//! handshake on its own thread, so a peer that stalls or fails it never holds up the source.

mod accept;
mod config;
pub mod converge;
mod destination;
mod error;
pub mod levers;
pub mod pages;
pub mod postcopy;
mod progress;
pub mod protocol;
mod ram;
mod source;
pub mod transport;
mod vm;

pub use accept::Acceptor;
pub use config::{ConfigRecord, DeviceDesc, RegionDesc, SwitchoverRecord, register};
pub use converge::ConvergeParams;
pub use destination::{Accepted, Incoming, receive};
pub use error::{MigrationError, chain};
pub use levers::Lever;
pub use progress::{Listener, Notice, Progress, Snapshot, Status};
pub use ram::{HostRange, SharedRam};
pub use source::send;
pub use transport::{Channel, Uri};
pub use vm::{DestinationVm, DirtyRegion, SourceVm, VmError};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Page channels when `multifd-channels` is not set.
pub const DEFAULT_PAGE_CHANNELS: u16 = 2;

/// Page-channel threads' nice value while `auto-converge` is on, unless
/// `__org.ferry_page-thread-nice` is set: the throttle is then the one thing that slows the
/// guest, by the amount `query-migrate` reports, not the migration's own threads taking the
/// vCPUs' cores.
pub const AUTO_CONVERGE_PAGE_NICE: u8 = 19;

/// What happens when pre-copy does not converge within `max_iterations`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SwitchoverPolicy {
    /// Give up; the source keeps running.
    #[default]
    Cancel,
    /// Stop the guest and copy the rest anyway (longer downtime).
    Force,
}

/// TLS on a TCP migration channel, resolved from `tls-creds`, `tls-hostname` and `tls-authz`.
#[derive(Clone, Debug)]
pub struct TlsParams {
    /// This side's credentials (endpoint client on the source, server on the destination).
    pub creds: Arc<ferry_tls::X509Creds>,
    /// Source: the name the destination's certificate must carry (default: the URI's host).
    pub hostname: Option<String>,
    /// Destination: the `tls-authz` object's id and the client names it allows (default:
    /// any certificate signed by the CA).
    pub authz: Option<(String, ferry_tls::Authz)>,
}

impl PartialEq for TlsParams {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.creds, &o.creds) && self.hostname == o.hostname && self.authz == o.authz
    }
}

impl Eq for TlsParams {}

/// Migration parameters (`migrate-set-parameters`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Largest acceptable downtime in milliseconds (default 300).
    pub downtime_limit_ms: u64,
    /// Bandwidth cap in bytes per second; 0 is unlimited (the default).
    pub max_bandwidth: u64,
    /// Dirty passes before the switchover policy decides (default 30).
    pub max_iterations: u32,
    /// What to do when pre-copy does not converge.
    pub switchover_policy: SwitchoverPolicy,
    /// Timeout of every blocking read or write on the channel (default 10 s).
    pub io_timeout: Duration,
    /// Keep a copy of the forward stream here (`--dump-stream`).
    pub dump_stream: Option<PathBuf>,
    /// Where an `fd:NAME` migration writes (the descriptor the VMM resolved NAME to).
    pub stream_fd: Option<transport::PassedFd>,
    /// Send mostly-zero pages as SPARSE records when the destination accepts them (TCP
    /// only; default on). `file:` streams always use DATA, so any build reads them.
    pub sparse_pages: bool,
    /// Mutual TLS on a TCP channel (none: plain TCP).
    pub tls: Option<TlsParams>,
    /// Page channels (`multifd-channels`): the source asks for this many, the destination
    /// grants at most this many; 0 keeps pages in the main stream. Never with `dump_stream`
    /// (a capture holds the main stream only).
    pub page_channels: u16,
    /// Auto-converge, the downtime ramp and stall detection.
    pub converge: ConvergeParams,
    /// Capability `postcopy-ram`: offer (source) or accept (destination) post-copy.
    pub postcopy: bool,
    /// `max-postcopy-bandwidth`: cap on background post-copy pages in bytes/s (0: none).
    pub max_postcopy_bandwidth: u64,
    /// `__org.ferry_page-thread-nice`: nice value of this side's page-channel threads
    /// (0..=19; 0 leaves them at the process's priority), so a migration gives the CPU to
    /// running guests first. Not set: see [`Params::page_nice`].
    pub page_thread_nice: Option<u8>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            max_iterations: 30,
            switchover_policy: SwitchoverPolicy::Cancel,
            io_timeout: Duration::from_secs(10),
            dump_stream: None,
            stream_fd: None,
            sparse_pages: true,
            tls: None,
            page_channels: DEFAULT_PAGE_CHANNELS,
            converge: ConvergeParams::default(),
            postcopy: false,
            max_postcopy_bandwidth: 0,
            page_thread_nice: None,
        }
    }
}

impl Params {
    /// The nice value this side's page-channel threads run at: `page_thread_nice` when set,
    /// else [`AUTO_CONVERGE_PAGE_NICE`] while this side has `auto-converge` on, else 0.
    pub fn page_nice(&self) -> u8 {
        self.page_nice_for(false)
    }

    /// [`Params::page_nice`] on a destination whose source has `auto-converge` on
    /// (`peer_auto_converge`), which counts as this side's own.
    pub fn page_nice_for(&self, peer_auto_converge: bool) -> u8 {
        self.page_thread_nice
            .unwrap_or(if self.converge.auto_converge || peer_auto_converge {
                AUTO_CONVERGE_PAGE_NICE
            } else {
                0
            })
    }
}
