//! The guest-progress device: the test guest reports each completed pass on
//! [`PROGRESS_PORT`] and unexpected exceptions on
//! [`PANIC_PORT`]. Tests and the VMM wait on it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::bus::BusDevice;
use super::persist::ProgressState;
use crate::guest::{PANIC_PORT, PROGRESS_PORT};

/// First port of the device.
pub const PROGRESS_BASE: u16 = PROGRESS_PORT;
/// Ports covered (progress at +0, panic at +4).
pub const PROGRESS_LEN: u16 = 8;
const PANIC_OFFSET: u64 = (PANIC_PORT - PROGRESS_PORT) as u64;

/// Counters shared by the device and whoever waits for the guest.
#[derive(Debug, Default)]
pub struct ProgressMonitor {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

/// Why a wait for guest progress ended without success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// The deadline passed.
    #[error("Guest reported pass {last_pass} after {waited_ms} ms, wanted pass {wanted}")]
    Timeout {
        /// Pass the guest last reported.
        last_pass: u32,
        /// Pass waited for.
        wanted: u32,
        /// Time waited.
        waited_ms: u64,
    },
    /// The guest reported an exception.
    #[error("Guest stopped on exception vector {0}")]
    GuestPanic(u32),
}

impl ProgressMonitor {
    fn lock(&self) -> MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current counters.
    pub fn snapshot(&self) -> ProgressState {
        self.lock().clone()
    }

    /// Replaces the counters (state restore).
    pub fn restore(&self, state: &ProgressState) {
        *self.lock() = state.clone();
        self.changed.notify_all();
    }

    /// Last pass count the guest reported.
    pub fn last_pass(&self) -> u32 {
        self.lock().last_pass
    }

    /// Blocks until the guest reports a pass count of at least `pass`, or `timeout` passes.
    pub fn wait_for_pass(&self, pass: u32, timeout: Duration) -> Result<u32, WaitError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut st = self.lock();
        loop {
            if st.panicked {
                return Err(WaitError::GuestPanic(st.panic_vector));
            }
            if st.last_pass >= pass {
                return Ok(st.last_pass);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout {
                    last_pass: st.last_pass,
                    wanted: pass,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn report(&self, pass: u32) {
        let mut st = self.lock();
        st.reports += 1;
        st.last_pass = pass;
        drop(st);
        self.changed.notify_all();
    }

    fn panic(&self, vector: u32) {
        let mut st = self.lock();
        st.panicked = true;
        st.panic_vector = vector;
        drop(st);
        tracing::error!(vector, "test guest stopped on an exception");
        self.changed.notify_all();
    }
}

/// The port-I/O face of the monitor.
#[derive(Debug, Default)]
pub struct ProgressDevice {
    monitor: Arc<ProgressMonitor>,
}

impl ProgressDevice {
    /// A device reporting into `monitor`.
    pub fn new(monitor: Arc<ProgressMonitor>) -> ProgressDevice {
        ProgressDevice { monitor }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl BusDevice for ProgressDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 0 {
            self.monitor.last_pass()
        } else {
            0
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                let pass = le_u32(data);
                tracing::trace!(pass, "guest pass");
                self.monitor.report(pass);
            }
            PANIC_OFFSET => self.monitor.panic(le_u32(data)),
            _ => tracing::debug!(offset, "write to unused guest-progress port"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_and_waits() {
        let m = Arc::new(ProgressMonitor::default());
        let mut d = ProgressDevice::new(m.clone());
        assert!(matches!(
            m.wait_for_pass(1, Duration::from_millis(1)),
            Err(WaitError::Timeout {
                last_pass: 0,
                wanted: 1,
                ..
            })
        ));
        d.write(0, &5u32.to_le_bytes());
        assert_eq!(m.wait_for_pass(3, Duration::ZERO), Ok(5));
        let mut b = [0u8; 4];
        d.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 5);
        d.write(PANIC_OFFSET, &[13, 0, 0, 0]);
        assert_eq!(
            m.wait_for_pass(9, Duration::ZERO),
            Err(WaitError::GuestPanic(13))
        );
        assert_eq!(
            m.snapshot(),
            ProgressState {
                reports: 1,
                last_pass: 5,
                panicked: true,
                panic_vector: 13
            }
        );
    }
}
