//! Destination: guest RAM populated in the background from the moment the VMM waits for a
//! migration, so the first touch of each page (costly where the host is itself virtualised)
//! leaves the receive path. [`RamView::populate`] maps every page writable (huge pages where
//! `MADV_HUGEPAGE` got them) without changing a byte, so it may race with the page channels
//! writing received pages.

use super::ram_view::RamView;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A background thread populating guest RAM; it stops when this handle is dropped.
#[derive(Debug)]
pub struct Prefault {
    stop: Arc<AtomicBool>,
    populated: Arc<AtomicU64>,
    yielding: Arc<AtomicBool>,
}

impl Prefault {
    /// Starts populating every RAM range of `view`, lowest address first, at normal CPU
    /// priority: before a migration arrives the destination has nothing else to do (as
    /// QEMU's `-mem-prealloc`, but in the background).
    pub fn start(view: RamView) -> std::io::Result<Prefault> {
        let stop = Arc::new(AtomicBool::new(false));
        let populated = Arc::new(AtomicU64::new(0));
        let yielding = Arc::new(AtomicBool::new(false));
        let (flag, count, low) = (stop.clone(), populated.clone(), yielding.clone());
        std::thread::Builder::new()
            .name("ram-prefault".into())
            .spawn(move || populate(&view, &flag, &count, &low))?;
        Ok(Prefault {
            stop,
            populated,
            yielding,
        })
    }

    /// While a migration streams in, the thread runs at the lowest priority (nice 19) so the
    /// page channels come first; `false` when the migration failed and the next is awaited.
    pub fn yield_to_migration(&self, yes: bool) {
        self.yielding.store(yes, Ordering::Relaxed);
    }

    /// Bytes populated so far.
    pub fn populated(&self) -> u64 {
        self.populated.load(Ordering::Acquire)
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        // The thread ends after its current chunk; it holds its own view of the mappings.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn populate(view: &RamView, stop: &AtomicBool, populated: &AtomicU64, yielding: &AtomicBool) {
    let started = Instant::now();
    let mut nice = 0;
    let mut stopped = false;
    view.populate(|done| {
        populated.store(done, Ordering::Release);
        let want = if yielding.load(Ordering::Relaxed) {
            19
        } else {
            0
        };
        if want != nice && set_nice(want) {
            nice = want;
        }
        stopped = stop.load(Ordering::Relaxed);
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
