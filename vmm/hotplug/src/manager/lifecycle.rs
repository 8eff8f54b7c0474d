//! Reset and the end of a migration: releasing what is pending, clearing the queue.

use super::HotplugManager;
use crate::connector::AttachedDevice;
use crate::controller::Controller;

impl HotplugManager {
    /// Release every release-pending device (TearDown + DEVICE_DELETED). Call it on the side
    /// that runs the guest after a migration: the destination after it resumed, or the
    /// source when the migration failed or was cancelled. Returns how many were released.
    pub fn complete_pending_releases(&mut self) -> usize {
        let pending: Vec<(u32, AttachedDevice)> = self
            .connectors
            .values_mut()
            .filter_map(|c| {
                let i = c.index();
                c.complete_release().map(|d| (i, d))
            })
            .collect();
        let n = pending.len();
        for (i, d) in pending {
            self.released(i, d);
        }
        n
    }

    /// Reset every connector (Precise rule 5) and clear the event queue and the controller.
    /// Runs on the destination after the pre-start `device_add`s and before the stream is
    /// loaded, and before the first `cont` of a prelaunch VM (also on guest reset). Pending
    /// unplugs complete: their devices are released (TearDown + DEVICE_DELETED).
    pub fn reset_all(&mut self) {
        let released: Vec<(u32, AttachedDevice)> = self
            .connectors
            .values_mut()
            .filter_map(|c| {
                let i = c.index();
                c.reset().map(|d| (i, d))
            })
            .collect();
        for (i, d) in released {
            self.released(i, d);
        }
        self.events.clear();
        self.controller = Controller::new();
        self.irq_request = false;
        self.reset_before_start = false;
    }

    /// Drop every pending guest event.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }
}
