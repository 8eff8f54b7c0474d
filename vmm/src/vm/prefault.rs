//! Destination: guest RAM populated in the background from the moment the VMM waits for a
//! migration, so the first touch of each page (costly where the host is itself virtualised)
//! leaves the receive path. [`RamView::populate`] maps every page writable (huge pages where
//! `MADV_HUGEPAGE` got them) without changing a byte, so it may race with the page channels
//! writing received pages.

use super::ram_view::RamView;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

/// A background thread populating guest RAM; it stops when this handle is dropped.
#[derive(Debug)]
pub struct Prefault {
    mode: Arc<(Mutex<Mode>, Condvar)>,
    populated: Arc<AtomicU64>,
}

/// What the populating thread should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Run,
    /// A migration streams in.
    Yield,
    Stop,
}

impl Prefault {
    /// Starts populating every RAM range of `view`, lowest address first, at normal CPU
    /// priority: before a migration arrives the destination has nothing else to do (as
    /// QEMU's `-mem-prealloc`, but in the background).
    pub fn start(view: RamView) -> std::io::Result<Prefault> {
        let mode = Arc::new((Mutex::new(Mode::Run), Condvar::new()));
        let populated = Arc::new(AtomicU64::new(0));
        let (m, count) = (mode.clone(), populated.clone());
        std::thread::Builder::new()
            .name("ram-prefault".into())
            .spawn(move || populate(&view, &m, &count))?;
        Ok(Prefault { mode, populated })
    }

    /// While a migration streams in, the thread waits (lever `prefault-pause`; with it off,
    /// it runs at the lowest priority, nice 19) so the page channels, the switch-over and the
    /// vCPUs come first; `false` when the migration failed and the next is awaited.
    pub fn yield_to_migration(&self, yes: bool) {
        self.set(if yes { Mode::Yield } else { Mode::Run });
    }

    /// Bytes populated so far.
    pub fn populated(&self) -> u64 {
        self.populated.load(Ordering::Acquire)
    }

    fn set(&self, mode: Mode) {
        let (lock, cv) = &*self.mode;
        let mut m = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if *m != Mode::Stop {
            *m = mode;
        }
        cv.notify_all();
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        // The thread ends after its current chunk; it holds its own view of the mappings.
        self.set(Mode::Stop);
    }
}

fn populate(view: &RamView, mode: &(Mutex<Mode>, Condvar), populated: &AtomicU64) {
    let started = Instant::now();
    let pause = migration::Lever::PrefaultPause.on();
    let mut nice = 0;
    let mut stopped = false;
    view.populate(|done| {
        populated.store(done, Ordering::Release);
        let (lock, cv) = mode;
        let mut m = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if pause {
            m = cv
                .wait_while(m, |m| *m == Mode::Yield)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let want = if *m == Mode::Yield { 19 } else { 0 };
        stopped = *m == Mode::Stop;
        drop(m);
        if want != nice && set_nice(want) {
            nice = want;
        }
        !stopped
    });
    let mib = populated.load(Ordering::Acquire) >> 20;
    let ms = started.elapsed().as_millis() as u64;
    if stopped {
        tracing::debug!(mib, ms, "RAM prefault stopped");
    } else {
        tracing::info!(mib, ms, "guest RAM populated");
    }
}

/// Sets this thread's nice value; raising it back may be refused (`RLIMIT_NICE`).
fn set_nice(nice: i32) -> bool {
    migration::pages::set_thread_nice(nice)
        .inspect_err(|e| tracing::debug!(nice, error = %e, "RAM prefault keeps its priority"))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::GuestRam;
    use migration::SharedRam;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn populating_maps_every_page_and_changes_no_byte() {
        let size = 32u64 << 20;
        let ram = GuestRam::new(size).unwrap();
        let at = GuestAddress(5 << 20);
        ram.mem().write_slice(b"kept", at).unwrap();
        let p = Prefault::start(RamView::of(&ram)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.populated() < size {
            assert!(
                Instant::now() < deadline,
                "only {} of {size} bytes populated after 60 s",
                p.populated()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut out = [0u64; 4];
        assert!(RamView::of(&ram).known_zero(1 << 20, 256, &mut out));
        assert_eq!(out, [0; 4], "every page is present after populating");
        let mut kept = [0u8; 4];
        ram.mem().read_slice(&mut kept, at).unwrap();
        assert_eq!(&kept, b"kept");
        let mut page = [1u8; 4096];
        ram.mem()
            .read_slice(&mut page, GuestAddress(9 << 20))
            .unwrap();
        assert!(page.iter().all(|&b| b == 0));
    }
}
