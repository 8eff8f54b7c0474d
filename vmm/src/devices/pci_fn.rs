//! Hot-pluggable PCI functions (`ferry-pci-fn`): a tiny config space and two stateful
//! registers per function, on port I/O.
//!
//! Function `devfn` (`slot << 3 | function`) owns the 16 ports at
//! [`PCI_IO_BASE`] `+ devfn * 16`. All registers are 32 bits, little-endian; an access that
//! is not 4 bytes at a 4-byte-aligned offset, or to a function that is not present, reads as
//! all ones and writes nothing (as an empty PCI slot).
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0 | ID | R | `vendor | device << 16` ([`VENDOR_ID`], [`DEVICE_ID`]) |
//! | 0x4 | COMMAND | RW | PCI command register (low 16 bits kept; bit 0 = I/O enable) |
//! | 0x8 | SCRATCH | RW | any value; each write counts in COUNTER |
//! | 0xC | COUNTER | R | writes to SCRATCH since the function was enabled |
//!
//! A function is present from [`PciFunctions::enable`] (the `EnablePciFunction` effect,
//! at `device_add`) until [`PciFunctions::disable`] (the `TearDown` effect). Its migrated
//! state is section `ferry-pci-fn` ([`PciFnState`], instance = devfn).

use std::collections::BTreeMap;

use super::bus::BusDevice;
use crate::guest::{PCI_FN_STRIDE, PCI_IO_BASE};

/// The migrated state of one function (`ferry-state`'s).
pub use ferry_state::PciFnState;

/// Vendor id (Red Hat, Inc., as QEMU's test devices).
pub const VENDOR_ID: u16 = 0x1b36;
/// Device id (QEMU's `pci-testdev`).
pub const DEVICE_ID: u16 = 0x0005;
/// Ports covered by the device: every devfn of 32 slots.
pub const PCI_IO_LEN: u16 = 256 * PCI_FN_STRIDE;

/// Register offsets within a function's window.
pub mod reg {
    /// Vendor and device id.
    pub const ID: u64 = 0x0;
    /// Command register.
    pub const COMMAND: u64 = 0x4;
    /// Scratch register.
    pub const SCRATCH: u64 = 0x8;
    /// Scratch-write counter.
    pub const COUNTER: u64 = 0xc;
}

/// First port of function `devfn`'s window.
pub fn function_port(devfn: u8) -> u16 {
    PCI_IO_BASE + u16::from(devfn) * PCI_FN_STRIDE
}

/// Every hot-pluggable PCI function, present or not (one bus device for the whole window).
#[derive(Debug, Default)]
pub struct PciFunctions {
    present: BTreeMap<u8, PciFnState>,
}

impl PciFunctions {
    /// No function present.
    pub fn new() -> PciFunctions {
        PciFunctions::default()
    }

    /// Makes function `devfn` present with its registers at reset. Enabling a present
    /// function changes nothing (returns `false`).
    pub fn enable(&mut self, devfn: u8, multifunction: bool) -> bool {
        if self.present.contains_key(&devfn) {
            return false;
        }
        self.present.insert(
            devfn,
            PciFnState {
                devfn,
                multifunction,
                ..PciFnState::default()
            },
        );
        true
    }

    /// Removes function `devfn` (returns whether it was present).
    pub fn disable(&mut self, devfn: u8) -> bool {
        self.present.remove(&devfn).is_some()
    }

    /// State of function `devfn`, if present.
    pub fn function(&self, devfn: u8) -> Option<&PciFnState> {
        self.present.get(&devfn)
    }

    /// States of every present function, by devfn.
    pub fn states(&self) -> Vec<PciFnState> {
        self.present.values().cloned().collect()
    }

    /// Loads a migrated function state; the function must be present (added before load).
    pub fn restore(&mut self, s: &PciFnState) -> Result<(), String> {
        match self.present.get_mut(&s.devfn) {
            Some(f) => {
                *f = s.clone();
                Ok(())
            }
            None => Err(format!(
                "PCI function {:02x}.{:x} is not present on this side",
                s.devfn >> 3,
                s.devfn & 7
            )),
        }
    }

    fn locate(&self, offset: u64, len: usize) -> Option<(u8, u64)> {
        if len != 4 || !offset.is_multiple_of(4) {
            return None;
        }
        let devfn = u8::try_from(offset / u64::from(PCI_FN_STRIDE)).ok()?;
        Some((devfn, offset % u64::from(PCI_FN_STRIDE)))
    }
}

impl BusDevice for PciFunctions {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self
            .locate(offset, data.len())
            .and_then(|(devfn, r)| {
                let f = self.present.get(&devfn)?;
                Some(match r {
                    reg::ID => u32::from(VENDOR_ID) | (u32::from(DEVICE_ID) << 16),
                    reg::COMMAND => u32::from(f.command),
                    reg::SCRATCH => f.scratch,
                    _ => f.counter,
                })
            })
            .unwrap_or(u32::MAX);
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((devfn, r)) = self.locate(offset, data.len()) else {
            return;
        };
        let Some(f) = self.present.get_mut(&devfn) else {
            return;
        };
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        match r {
            reg::COMMAND => f.command = v as u16,
            reg::SCRATCH => {
                f.scratch = v;
                f.counter = f.counter.wrapping_add(1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(d: &mut PciFunctions, devfn: u8, r: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(u64::from(devfn) * 16 + r, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(d: &mut PciFunctions, devfn: u8, r: u64, v: u32) {
        d.write(u64::from(devfn) * 16 + r, &v.to_le_bytes());
    }

    #[test]
    fn absent_reads_ones_present_counts_scratch_writes() {
        let mut d = PciFunctions::new();
        assert_eq!(rd(&mut d, 9, reg::ID), u32::MAX);
        wr(&mut d, 9, reg::SCRATCH, 5);
        assert!(d.function(9).is_none());
        assert!(d.enable(9, true));
        assert!(!d.enable(9, true));
        assert_eq!(rd(&mut d, 9, reg::ID), 0x0005_1b36);
        wr(&mut d, 9, reg::COMMAND, 0x1_0001);
        wr(&mut d, 9, reg::SCRATCH, 0xabcd);
        wr(&mut d, 9, reg::SCRATCH, 0x1234);
        assert_eq!(rd(&mut d, 9, reg::COMMAND), 1);
        assert_eq!(rd(&mut d, 9, reg::SCRATCH), 0x1234);
        assert_eq!(rd(&mut d, 9, reg::COUNTER), 2);
        // Other functions and bad widths are untouched.
        assert_eq!(rd(&mut d, 8, reg::ID), u32::MAX);
        let mut b = [0u8; 2];
        d.read(9 * 16, &mut b);
        assert_eq!(b, [0xff; 2]);
        let s = d.function(9).cloned().unwrap();
        assert!(d.disable(9));
        assert_eq!(rd(&mut d, 9, reg::SCRATCH), u32::MAX);
        assert!(d.restore(&s).is_err());
        d.enable(9, true);
        d.restore(&s).unwrap();
        assert_eq!(rd(&mut d, 9, reg::COUNTER), 2);
        assert_eq!(function_port(9), 0x1090);
    }
}
