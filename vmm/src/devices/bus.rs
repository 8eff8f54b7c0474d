//! An address-range bus: port I/O or MMIO accesses go to the device whose range holds them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// A device on a [`Bus`]. `offset` is relative to the base of the device's range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering a device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// Empty range.
    #[error("Bus range at {0:#x} is empty")]
    EmptyRange(u64),
    /// Range overlaps a registered one.
    #[error("Bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
    },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// Address ranges mapped to devices.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(map.iter().map(|(b, (l, _))| (*b, *l)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Maps `[base, base + len)` to `dev`.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let end = base + len;
        let overlaps = map
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (base, (len, dev)) = map.range(..=addr).next_back()?;
        (addr < base + len).then(|| (addr - base, Arc::clone(dev)))
    }

    /// Dispatches a read; returns `false` (and leaves `data` alone) when nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns `false` when nothing is mapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x510, 8, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x50c, 8, dev.clone()),
            Err(BusError::Overlap {
                base: 0x50c,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(0x517, 1, dev.clone()),
            Err(BusError::Overlap {
                base: 0x517,
                len: 1
            })
        );
        bus.insert(0x518, 1, dev.clone()).unwrap();
        assert!(bus.write(0x514, &[1, 2]));
        assert!(!bus.write(0x519, &[1]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x513, &mut b));
        assert_eq!(b, [3, 3]);
        assert!(!bus.read(0x50f, &mut b));
        assert_eq!(dev.lock().unwrap().0, vec![(4, vec![1, 2])]);
    }
}
