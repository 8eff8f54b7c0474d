//! Run states of a VM, named as QEMU's `query-status` names them.

use std::fmt;

/// Where a VM is in its life cycle.
///
/// The names returned by [`RunState::as_str`] are QEMU's, so QMP clients see familiar values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RunState {
    /// Created, guest loaded or restored, never run yet.
    #[default]
    Prelaunch,
    /// vCPUs are executing guest code.
    Running,
    /// vCPUs are stopped by the VMM (`stop`).
    Paused,
    /// Destination side: waiting for or loading an incoming migration stream.
    InMigrate,
    /// Source side: migration completed, the guest now runs elsewhere.
    PostMigrate,
    /// Source side: stop-and-copy phase of an outgoing migration.
    FinishMigrate,
    /// The guest shut down (or triple-faulted); vCPUs have exited.
    Shutdown,
}

impl RunState {
    /// Every run state, in declaration order.
    pub const ALL: [RunState; 7] = [
        RunState::Prelaunch,
        RunState::Running,
        RunState::Paused,
        RunState::InMigrate,
        RunState::PostMigrate,
        RunState::FinishMigrate,
        RunState::Shutdown,
    ];

    /// QEMU's name of this state (`query-status` `status` field).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Shutdown => "shutdown",
        }
    }

    /// Parses a QEMU run-state name.
    pub fn from_name(name: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the vCPUs execute guest code in this state.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in RunState::ALL {
            assert_eq!(RunState::from_name(s.as_str()), Some(s));
        }
        assert_eq!(RunState::FinishMigrate.as_str(), "finish-migrate");
        assert_eq!(RunState::from_name("bogus"), None);
    }
}
