//! Ferry VMM core: a KVM virtual machine with guest RAM, vCPU threads, a small set of
//! port-I/O devices and a built-in test guest, plus capture and restore of the whole
//! machine state into plain `*State` structs.
//!
//! Where to look:
//! - [`vm`]: the VM (KVM VM fd, guest RAM, memory slots, dirty log, VM-level state).
//! - [`vcpu`]: vCPU threads, long-mode setup, CPUID, the run loop, pause/resume, vCPU state.
//! - [`devices`]: the port-I/O bus, the UART and the guest-progress device.
//! - [`guest`]: the test guest (machine code, mailbox ABI, memory-pattern verifier).
//! - [`runstate`]: the QEMU-style run states.
//! - [`config`]: machine shape and command-line value parsing.
//! - [`qmp`]: the QMP control-plane server (protocol only; commands come from [`control`]).
//! - [`libvirt_cpu_map`]: Ferry's CPU models described for libvirt's CPU map.
//! - [`qemu_argv`]: QEMU's command line, as `ferry qemu-compat` takes it (libvirt's probe and
//!   domains).

pub mod config;
pub mod control;
pub mod devices;
pub mod guest;
pub mod libvirt_cpu_map;
pub mod migrate;
pub mod qemu_argv;
pub mod runstate;
pub mod vcpu;
pub mod vm;

/// Hotplug connectors, re-exported from `ferry-hotplug` so `vmm::hotplug` paths keep working.
pub use ferry_hotplug as hotplug;
/// The QMP server, re-exported from `ferry-qmp` so `vmm::qmp` paths keep working.
pub use ferry_qmp as qmp;

pub use config::{GuestSpec, VmConfig};
pub use runstate::RunState;
pub use vm::{Vm, VmError, VmState};
