//! Devices: the bus the vCPU run loop dispatches port and MMIO accesses to, the UART and
//! the guest-progress device, and their plain state structs ([`persist`]).

pub mod bus;
pub mod pci_fn;
pub mod persist;
pub mod progress;
pub mod uart;

pub use bus::{Bus, BusDevice, BusError};
pub use pci_fn::{PciFnState, PciFunctions};
pub use progress::{ProgressDevice, ProgressMonitor};
pub use uart::Uart;
