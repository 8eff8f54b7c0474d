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

mod config;
mod destination;
mod error;
mod progress;
pub mod protocol;
mod source;
pub mod transport;
mod vm;

pub use config::{ConfigRecord, DeviceDesc, RegionDesc, SwitchoverRecord, register};
pub use destination::{Incoming, receive};
pub use error::{MigrationError, chain};
pub use progress::{Listener, Notice, Progress, Snapshot, Status};
pub use source::send;
pub use transport::Uri;
pub use vm::{DestinationVm, DirtyRegion, SourceVm, VmError};

use std::path::PathBuf;
use std::time::Duration;

/// What happens when pre-copy does not converge within `max_iterations`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SwitchoverPolicy {
    /// Give up; the source keeps running.
    #[default]
    Cancel,
    /// Stop the guest and copy the rest anyway (longer downtime).
    Force,
}

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
    /// Send mostly-zero pages as SPARSE records when the destination accepts them (TCP
    /// only; default on). `file:` streams always use DATA, so any build reads them.
    pub sparse_pages: bool,
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
            sparse_pages: true,
        }
    }
}
