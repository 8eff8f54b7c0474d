//! Plain state of the devices (no runtime handles, no foreign types), and their sections
//! (`uart`, `guest-progress`).

use devstate::Section;

devstate::record! {
    /// Registers of the 16550 UART (vm-superio's `SerialState`, copied field by field).
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

impl UartState {
    /// From vm-superio's state.
    pub fn from_superio(s: &vm_superio::serial::SerialState) -> UartState {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }

    /// To vm-superio's state.
    pub fn to_superio(&self) -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
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
