//! Migration errors.

use devstate::DecodeError;
use std::io;

/// Why a migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The URI is not `tcp:HOST:PORT`, `file:PATH` or `fd:NAME`.
    #[error("Invalid migration URI '{0}': expected tcp:HOST:PORT, file:PATH or fd:NAME")]
    BadUri(String),
    /// Connecting, listening or opening the file failed.
    #[error("Cannot open {target}")]
    Open {
        /// Address or path.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the migration channel failed.
    #[error("Migration channel failed during {phase}")]
    Io {
        /// What was going on.
        phase: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The destination refused before any RAM moved.
    #[error("Destination refused the migration: {0}")]
    Refused(String),
    /// The destination could not load what it received.
    #[error("Destination failed to load the state: {0}")]
    DestinationFailed(String),
    /// The dirty rate stayed above what the bandwidth can clear within the downtime limit.
    #[error(
        "Migration did not converge after {iterations} iterations: expected downtime {expected_ms} ms exceeds the limit of {limit_ms} ms"
    )]
    NotConverged {
        /// Iterations run.
        iterations: u64,
        /// Downtime the last iteration predicted.
        expected_ms: u64,
        /// The limit.
        limit_ms: u64,
    },
    /// The stall rule ended pre-copy: nothing brought the switchover closer.
    #[error(
        "Migration stalled: the expected downtime of {expected_ms} ms came no closer to the allowed {allowed_ms} ms for {passes} passes ({seconds:.1} s); enable auto-converge, raise downtime-limit or max-bandwidth, or slow the guest's writes"
    )]
    Stalled {
        /// Passes without progress.
        passes: u64,
        /// Seconds without progress.
        seconds: f64,
        /// Downtime the last pass predicted.
        expected_ms: u64,
        /// Downtime allowed at that pass.
        allowed_ms: u64,
    },
    /// `migrate_cancel` arrived before COMMIT.
    #[error("Migration cancelled")]
    Cancelled,
    /// COMMIT was sent but not acknowledged: the source must not resume.
    #[error("Destination state unknown: COMMIT was sent but not acknowledged")]
    StateUnknown(#[source] io::Error),
    /// The incoming stream is invalid.
    #[error("Invalid incoming stream")]
    Stream(#[from] DecodeError),
    /// The VMM could not do what the engine asked.
    #[error("VM operation failed: {0}")]
    Vm(String),
    /// TLS could not be set up on the channel (credentials, handshake, peer refused).
    #[error("TLS on the migration channel failed")]
    Tls(#[from] ferry_tls::TlsError),
    /// A page channel broke or carried an invalid record; the whole migration fails.
    #[error("Page channel {index} failed")]
    PageChannel {
        /// Which channel (1-based).
        index: u16,
        /// What happened on it.
        #[source]
        source: Box<MigrationError>,
    },
    /// The peer broke the protocol.
    #[error("Protocol error: {0}")]
    Protocol(String),
}

/// An error and all its sources, joined with ": " (for wire messages and `query-migrate`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
