//! Section `hotplug-controller`: the controller's registers.

use devstate::{Section, record};
use machine_types::MachineType;

record! {
    /// The controller's registers (section `hotplug-controller`, instance 0).
    pub struct ControllerState {
        /// SELECTOR.
        pub selector: u32,
        /// ARG.
        pub arg: u32,
        /// OP (last op code).
        pub last_op: u32,
        /// STATUS.
        pub status: i32,
        /// VALUE.
        pub value: u32,
        /// Latched event index.
        pub event_index: u32,
        /// Latched event kind.
        pub event_kind: u32,
    }
}

impl Section for ControllerState {
    const NAME: &'static str = "hotplug-controller";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;

    fn needed(&self, _m: &MachineType) -> bool {
        *self != ControllerState::default()
    }
}
