//! The plain, KVM-free state of a Ferry VM and its versioned section descriptions: vCPUs
//! ([`vcpu`]), interrupt controllers, PIT, clock and hot-added vCPUs ([`vm`]), devices
//! ([`devices`]), and the device registry ([`catalog`], [`full_catalog`]) of every section a
//! stream may hold.
//!
//! Capture and restore through KVM ioctls live in `vmm`; everything here is data, load checks
//! (`post_load`) and conversions to and from kvm-bindings' plain structs, so tools such as
//! `ferry-dump` decode, verify and diff streams with the real descriptions without linking KVM.
//!
//! ```
//! let c = ferry_state::full_catalog();
//! assert!(c.info("cpu").unwrap().required);
//! ```

pub mod devices;
mod host;
pub mod vcpu;
pub mod vm;

use devstate::Catalog;

pub use devices::{PciFnState, ProgressState, UartState};
pub use host::{host_fields, normalise_host_fields};
pub use vcpu::VcpuState;
pub use vm::{
    ClockState, HotCoreState, HotVcpuState, IoapicState, IrqchipState, PicState, PitState, VmState,
};

/// The device registry: every section type a VM writes and reads. Registration panics on a
/// duplicate name or an unbounded field, so building it is a test.
pub fn catalog() -> Catalog {
    let mut c = Catalog::new();
    c.register::<VcpuState>()
        .register::<IrqchipState>()
        .register::<PitState>()
        .register::<ClockState>()
        .register::<UartState>()
        .register::<ProgressState>()
        .register::<PciFnState>()
        .register::<HotVcpuState>();
    ferry_hotplug::register_sections(&mut c);
    c
}

/// [`catalog`] plus the sections the migration engine writes itself (`config`,
/// `migration`): everything a stream file may hold, for `ferry-dump` and schemas.
pub fn full_catalog() -> Catalog {
    let mut c = catalog();
    migration::register(&mut c);
    c
}
