//! Management-side operations on one connector (attach, unplug request, timeout, release,
//! reset): separate from the guest transition function so the guest can never trigger them.

use super::{AttachedDevice, Connector, UnplugRequest};

impl Connector {
    /// Attach a device (management side). The state is left alone: a running guest learns
    /// about it through a hotplug event; before start the reset makes it coldplugged.
    ///
    /// # Panics
    /// If a device is already attached (the manager checks first).
    pub fn attach(&mut self, device: AttachedDevice) {
        assert!(self.device.is_none(), "connector already has a device");
        self.device = Some(device);
        self.unplug_timed_out = false;
    }

    /// Ask the guest to release the device (`device_del`). A repeated request keeps the
    /// deadline. A connector still in its empty state is released at once (QEMU
    /// `spapr_drc_unplug_request`).
    ///
    /// # Panics
    /// If no device is visible to the guest (the manager checks first).
    pub fn request_unplug(&mut self, now_ms: u64, timeout_ms: u64) -> UnplugRequest {
        assert!(self.has_device(), "unplug request without a device");
        if self.unplug_requested {
            return UnplugRequest::AlreadyPending;
        }
        self.unplug_timed_out = false;
        if self.state == self.kind.empty_state() {
            self.cc_cursor = 0;
            let dev = self.device.take().expect("checked above");
            return UnplugRequest::Released(dev);
        }
        self.unplug_requested = true;
        self.unplug_deadline_ms = Some(now_ms.saturating_add(timeout_ms));
        UnplugRequest::AwaitingGuest
    }

    /// Time out a pending unplug whose deadline has passed: the request is dropped, a late
    /// guest completion will get an RTAS hardware error. Returns whether it timed out.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        match self.unplug_deadline_ms {
            Some(d) if self.unplug_requested && d <= now_ms => {
                self.unplug_requested = false;
                self.unplug_deadline_ms = None;
                self.unplug_timed_out = true;
                true
            }
            _ => false,
        }
    }

    /// Run a release-pending connector's release: detach and return the device.
    pub fn complete_release(&mut self) -> Option<AttachedDevice> {
        if !self.release_pending {
            return None;
        }
        self.release_pending = false;
        self.device.take()
    }

    /// Reset (Precise rule 5): a pending unplug (or release) releases the device; a device
    /// present is CONFIGURED (physical: indicator ACTIVE), an empty connector UNUSABLE
    /// (physical: POWERON, indicator INACTIVE); the configure-connector cursor is cleared.
    /// Returns the released device, if any.
    pub fn reset(&mut self) -> Option<AttachedDevice> {
        let released = if self.unplug_requested || self.release_pending {
            self.device.take()
        } else {
            None
        };
        self.unplug_requested = false;
        self.unplug_deadline_ms = None;
        self.unplug_timed_out = false;
        self.release_pending = false;
        self.cc_cursor = 0;
        let attached = self.device.is_some();
        self.state = if attached {
            self.kind.ready_state()
        } else {
            self.kind.empty_state()
        };
        self.dr_indicator = Self::reset_indicator(self.kind, attached);
        released
    }
}
