//! Auto-converge's CPU throttle, as QEMU's `cpu-throttle`: every period each vCPU runs for
//! [`TIMESLICE`] and then sleeps outside `KVM_RUN` for `TIMESLICE * p / (100 - p)`, so the
//! guest gets `100 - p` percent of the time it would have had.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::VcpuControl;

/// Guest run time per throttle period (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
pub const TIMESLICE: Duration = Duration::from_millis(10);

/// Highest throttle percentage (QEMU's `CPU_THROTTLE_PCT_MAX`).
pub const MAX_PERCENT: u8 = 99;

/// Makes one vCPU sleep outside `KVM_RUN`.
#[derive(Debug, Clone)]
pub struct Sleeper(pub(super) Arc<VcpuControl>);

impl Sleeper {
    /// Kicks the vCPU out of `KVM_RUN` and has it sleep for `d` before entering it again
    /// (a parked or stopped vCPU is left alone).
    fn sleep(&self, d: Duration) {
        let mut c = self.0.lock();
        let Some(thread) = c.thread else { return };
        c.sleep_until = Some(Instant::now() + d);
        // SAFETY: `thread` is set by the vCPU thread itself when its run loop starts and reset
        // under this lock before the loop returns, so it names a thread that has not ended;
        // the kick handler only stores to that thread's own `immediate_exit`.
        unsafe { libc::pthread_kill(thread, super::kick_signal()) };
        drop(c);
    }

    /// Cuts a sleep short: the throttle has ended.
    fn wake(&self) {
        self.0.lock().sleep_until = None;
        self.0.changed.notify_all();
    }
}

#[derive(Debug)]
struct Shared {
    percent: Mutex<u8>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, u8> {
        self.percent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running throttle; dropping it lets every vCPU run at full speed again.
#[derive(Debug)]
pub struct Throttle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Starts throttling `vcpus` at `percent` (clamped to 1..=[`MAX_PERCENT`]).
    pub fn start(vcpus: Vec<Sleeper>, percent: u8) -> std::io::Result<Throttle> {
        let shared = Arc::new(Shared {
            percent: Mutex::new(percent.clamp(1, MAX_PERCENT)),
            changed: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("cpu-throttle".into())
            .spawn(move || run(&s, &vcpus))?;
        Ok(Throttle {
            shared,
            thread: Some(thread),
        })
    }

    /// Changes the percentage from the next period on (clamped to 1..=[`MAX_PERCENT`]).
    pub fn set(&self, percent: u8) {
        *self.shared.lock() = percent.clamp(1, MAX_PERCENT);
        self.shared.changed.notify_all();
    }

    /// The current percentage.
    pub fn percent(&self) -> u8 {
        *self.shared.lock()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        *self.shared.lock() = 0;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a vCPU sleeps per period at `percent`.
pub fn sleep_time(percent: u8) -> Duration {
    let p = u32::from(percent.min(MAX_PERCENT));
    TIMESLICE * p / (100 - p)
}

fn run(shared: &Shared, vcpus: &[Sleeper]) {
    let mut p = shared.lock();
    while *p != 0 {
        let sleep = sleep_time(*p);
        for v in vcpus {
            v.sleep(sleep);
        }
        // The next period starts once this one's sleep and run time are over; a new
        // percentage waits for it, an end does not.
        let next = Instant::now() + sleep + TIMESLICE;
        loop {
            let now = Instant::now();
            if *p == 0 || now >= next {
                break;
            }
            p = shared
                .changed
                .wait_timeout(p, next - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    for v in vcpus {
        v.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_time_follows_qemu() {
        assert_eq!(sleep_time(20), Duration::from_micros(2500));
        assert_eq!(sleep_time(50), TIMESLICE);
        assert_eq!(sleep_time(99), TIMESLICE * 99);
        assert_eq!(sleep_time(100), TIMESLICE * 99);
    }
}
