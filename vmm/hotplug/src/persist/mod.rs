//! Migrated state of the hotplug subsystem: plain `*State` structs, each with its one
//! `devstate` description beside it.
//!
//! | section | instance | versions | sent when |
//! |---|---|---|---|
//! | `connector` | PAPR index | v1 (ferry-1.x), v2 (ferry-2.0) | a device is attached and the connector is not at its reset state (Precise rule 4) |
//! | `connector/unplug-timer` | | v1 | machine has `drc_unplug_timer` (ferry-1.1+) and an unplug is pending |
//! | `hotplug-events` | 0 | v1 | the pending guest-event queue is not empty |
//! | `hotplug-controller` | 0 | v1 | a controller register differs from its reset value |
//!
//! `connector` v1 body: `index u32, state u8, device str(<=64), unplug_requested bool,
//! release_pending bool, unplug_timed_out bool`. v2 appends `isolation u8, allocation u8,
//! dr_indicator u8, cc_cursor u8`. The enum-valued fields (`state`, `isolation`,
//! `allocation`, `dr_indicator`, and `kind` of `hotplug-events`) are typed
//! ([`devstate::WireEnum`]): the codec refuses values they do not have, with the field name
//! and byte offset. A v1 stream leaves the v2 fields at their defaults with
//! [`ConnectorState::v2_known`] false, and the destination uses their reset values (indicator ACTIVE for an attached PCI function, cursor
//! 0: a guest mid-configure-connector restarts its walk). Isolation and allocation are
//! projections of `state`; v2 carries them so the stream is self-explanatory in `ferry-dump`
//! and the destination cross-checks them against `state`.

mod connector;
mod controller;
mod events;
#[cfg(test)]
mod tests;

pub use connector::ConnectorState;
pub use controller::ControllerState;
pub use events::{EventQueueState, GuestEventState};

use devstate::Catalog;

/// Register the hotplug sections in a catalog.
pub fn register_sections(c: &mut Catalog) -> &mut Catalog {
    c.register::<ConnectorState>()
        .register::<EventQueueState>()
        .register::<ControllerState>()
}
