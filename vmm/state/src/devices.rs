//! Plain state of the devices (no runtime handles, no foreign types), and their sections
//! (`uart`, `guest-progress`, `ferry-pci-fn`).

use devstate::Section;

devstate::record! {
    /// Registers of the 16550 UART (vm-superio's `SerialState`, copied field by field by `vmm`).
    pub struct UartState {
        /// Divisor latch, low byte.
        pub baud_divisor_low: u8,
        /// Divisor latch, high byte.
        pub baud_divisor_high: u8,
        /// IER.
        pub interrupt_enable: u8,
        /// IIR.
        pub interrupt_identification: u8,
        /// LCR.
        pub line_control: u8,
        /// LSR.
        pub line_status: u8,
        /// MCR.
        pub modem_control: u8,
        /// MSR.
        pub modem_status: u8,
        /// Scratch register.
        pub scratch: u8,
        /// Bytes received and not yet read by the guest.
        pub in_buffer: Vec<u8> [max = 64],
    }
}

devstate::record! {
    /// State of the guest-progress device.
    pub struct ProgressState {
        /// Number of progress reports received.
        pub reports: u64,
        /// Last pass count reported.
        pub last_pass: u32,
        /// The guest reported an exception.
        pub panicked: bool,
        /// Its vector.
        pub panic_vector: u32,
    }
}

impl Section for UartState {
    const NAME: &'static str = "uart";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;
}

impl Section for ProgressState {
    const NAME: &'static str = "guest-progress";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;
}

devstate::record! {
    /// State of one hot-plugged PCI function (present functions only).
    pub struct PciFnState {
        /// `slot << 3 | function`.
        pub devfn: u8,
        /// Added with `multifunction=on`.
        pub multifunction: bool,
        /// Command register.
        pub command: u16,
        /// Scratch register.
        pub scratch: u32,
        /// Writes to SCRATCH since the function was enabled.
        pub counter: u32,
    }
}

impl Section for PciFnState {
    const NAME: &'static str = "ferry-pci-fn";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
}
