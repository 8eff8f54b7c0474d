//! Plain device state and its sections (`ferry-state`'s, re-exported so
//! `vmm::devices::persist` paths keep working), and the UART's copy to and from vm-superio.

pub use ferry_state::devices::*;

/// From vm-superio's state.
pub fn uart_from_superio(s: &vm_superio::serial::SerialState) -> UartState {
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
pub fn uart_to_superio(u: &UartState) -> vm_superio::serial::SerialState {
    vm_superio::serial::SerialState {
        baud_divisor_low: u.baud_divisor_low,
        baud_divisor_high: u.baud_divisor_high,
        interrupt_enable: u.interrupt_enable,
        interrupt_identification: u.interrupt_identification,
        line_control: u.line_control,
        line_status: u.line_status,
        modem_control: u.modem_control,
        modem_status: u.modem_status,
        scratch: u.scratch,
        in_buffer: u.in_buffer.clone(),
    }
}
