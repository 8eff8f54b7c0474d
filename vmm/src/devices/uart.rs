//! 16550A UART at COM1 (`0x3f8`, IRQ 4), emulated by vm-superio.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use super::persist::UartState;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports of a 16550.
pub const COM1_LEN: u16 = 8;
/// GSI of COM1.
pub const COM1_GSI: u32 = 4;

/// An eventfd that raises the UART's interrupt (registered as an irqfd).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The COM1 UART.
pub struct Uart {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOut>,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart").finish_non_exhaustive()
    }
}

impl Uart {
    /// A UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Uart {
        Uart {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// The interrupt eventfd.
    pub fn irq(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// Captures the register state.
    pub fn save(&self) -> UartState {
        super::persist::uart_from_superio(&self.serial.state())
    }

    /// Replaces the register state, keeping the irq and the output.
    pub fn restore(&mut self, state: &UartState) -> io::Result<()> {
        let irq = self.serial.interrupt_evt().0.try_clone()?;
        let out = std::mem::replace(self.serial.writer_mut(), Box::new(io::sink()));
        self.serial = Serial::from_state(
            &super::persist::uart_to_superio(state),
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first()
            && let Err(e) = self.serial.write(offset as u8, b)
        {
            tracing::warn!(error = ?e, "UART write failed");
        }
    }
}
