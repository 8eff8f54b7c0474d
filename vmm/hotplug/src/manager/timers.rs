//! Unplug deadlines on the guest-running clock.

use super::HotplugManager;
use crate::connector::Connector;

impl HotplugManager {
    /// Earliest pending unplug deadline (guest-running ms), to schedule [`tick`](Self::tick).
    pub fn next_deadline(&self) -> Option<u64> {
        self.connectors
            .values()
            .filter_map(Connector::unplug_deadline_ms)
            .min()
    }

    /// Advance the guest-running clock: every pending unplug whose deadline passed is dropped
    /// with DEVICE_UNPLUG_GUEST_ERROR; `device_del` may be retried.
    pub fn tick(&mut self, now_ms: u64) {
        let expired: Vec<u32> = self
            .connectors
            .values_mut()
            .filter_map(|c| c.expire(now_ms).then(|| c.index()))
            .collect();
        for index in expired {
            tracing::warn!(
                id = self.connectors[&index].device_id(),
                timeout_ms = self.config.unplug_timeout_ms,
                "device hot-unplug timed out: the guest did not release the device"
            );
            self.guest_error(index);
        }
    }
}
