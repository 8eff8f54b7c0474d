//! Guest RAM as the migration's page-channel threads see it ([`migration::SharedRam`]): the
//! base RAM regions and the hot-plugged memory blocks, shared by reference count so the
//! mappings outlive every thread that holds the view.

use super::Vm;
use super::memory::{GuestMem, GuestRam};
use crate::guest::PAGE_SIZE;
use migration::{HostRange, SharedRam};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, Ordering};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileMemory,
};

/// Every RAM mapping of a VM.
#[derive(Debug)]
pub struct RamView {
    mems: Vec<GuestMem>,
    /// The destination's RAM was never written by a vCPU: a page whose VMM-bitmap bit is
    /// clear reads as zero.
    pristine: bool,
    /// `/proc/self/pagemap`: a page of an anonymous mapping that is neither present nor
    /// swapped was never touched, so it is zero without being read.
    pagemap: Option<File>,
}

/// Pagemap entry bits: page present in RAM, page swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

impl RamView {
    /// The view of `vm`'s RAM and blocks now.
    pub fn new(vm: &Vm) -> RamView {
        let mut view = RamView::of(vm.ram());
        for (slot, ..) in vm.hotplug_blocks() {
            if let Some(m) = vm.hotplug_block_memory(slot) {
                view.mems.push(m.clone());
            }
        }
        view
    }

    /// The view of one guest RAM without hot-plugged blocks.
    pub fn of(ram: &GuestRam) -> RamView {
        RamView {
            mems: vec![ram.mem().clone()],
            pristine: ram.is_pristine(),
            pagemap: File::open("/proc/self/pagemap")
                .inspect_err(|e| tracing::debug!(error = %e, "no pagemap: every page is read"))
                .ok(),
        }
    }

    /// Maps every page writable without changing a byte, lowest guest address first: an
    /// atomic compare-exchange of 0 with 0 on each page's first byte, which a concurrent
    /// writer cannot lose. The fault runs under the mapping's own lock, not the process-wide
    /// one `MADV_POPULATE_WRITE` holds (a starved holder of that stalls every thread that maps
    /// memory). `go` gets the
    /// bytes done after each 2 MiB and returns false to stop there.
    pub fn populate(&self, mut go: impl FnMut(u64) -> bool) {
        const STEP: usize = 2 << 20;
        let mut done = 0u64;
        for r in self.mems.iter().flat_map(|m| m.iter()) {
            let Ok(slice) = r.as_volatile_slice() else {
                continue;
            };
            let mut off = 0;
            while off < slice.len() {
                let end = (off + STEP).min(slice.len());
                for page in (off..end).step_by(PAGE_SIZE as usize) {
                    if let Ok(b) = slice.get_atomic_ref::<AtomicU8>(page) {
                        // A write whatever the outcome (x86 `lock cmpxchg` writes back what it
                        // read on failure), so the fault maps the page writable; an idempotent
                        // `fetch_or(0)` is compiled into a load and faults nothing in.
                        let _ = b.compare_exchange(0, 0, Ordering::Relaxed, Ordering::Relaxed);
                    }
                }
                done += (end - off) as u64;
                off = end;
                if !go(done) {
                    return;
                }
            }
        }
    }

    /// Every region as `(gpa, host address, length)`, and the mappings that keep them.
    pub(super) fn regions(&self) -> (Vec<(u64, u64, u64)>, Vec<GuestMem>) {
        let mut out = Vec::new();
        for r in self.mems.iter().flat_map(|m| m.iter()) {
            if let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) {
                out.push((r.start_addr().0, host as u64, r.len()));
            }
        }
        (out, self.mems.clone())
    }

    /// The mapping and region holding all of `[gpa, gpa + len)`, with the offset in it.
    fn find(&self, gpa: u64, len: usize) -> Result<(&GuestMem, MemoryRegionAddress), String> {
        for m in &self.mems {
            if let Some(r) = m.find_region(GuestAddress(gpa)) {
                let off = gpa - r.start_addr().0;
                if off + len as u64 <= r.len() {
                    return Ok((m, MemoryRegionAddress(off)));
                }
                return Err(format!(
                    "{len} bytes at {gpa:#x} cross the end of a RAM region"
                ));
            }
        }
        Err(format!("{len} bytes at {gpa:#x} are not guest RAM"))
    }
}

impl SharedRam for RamView {
    fn host_range(&self, gpa: u64, len: usize) -> Result<HostRange<'_>, String> {
        let (m, off) = self.find(gpa, len)?;
        let r = m.find_region(GuestAddress(gpa)).expect("found just above");
        let ptr = r
            .get_host_address(off)
            .map_err(|e| format!("RAM at {gpa:#x}: {e}"))?;
        // SAFETY: `find` checked that the range lies inside one region of a mapping this view
        // holds a reference to, so it stays mapped (readable and writable) while `self` lives.
        Ok(unsafe { HostRange::new(ptr, len) })
    }

    fn mark_written(&self, gpa: u64, len: usize) {
        if let Ok((m, off)) = self.find(gpa, len)
            && let Some(r) = m.find_region(GuestAddress(gpa))
        {
            r.bitmap().mark_dirty(off.0 as usize, len);
        }
    }

    fn zero(&self, gpa: u64, pages: u32) -> Result<(), String> {
        let len = pages as usize * PAGE_SIZE as usize;
        let (m, off) = self.find(gpa, len)?;
        let r = m.find_region(GuestAddress(gpa)).expect("found just above");
        let zero = [0u8; PAGE_SIZE as usize];
        let mut page = [0u8; PAGE_SIZE as usize];
        for p in 0..u64::from(pages) {
            // A page never written stays untouched (unallocated); others are cleared if they
            // hold data.
            if self.pristine && !r.bitmap().dirty_at((off.0 + p * PAGE_SIZE) as usize) {
                continue;
            }
            let at = GuestAddress(gpa + p * PAGE_SIZE);
            m.read_slice(&mut page, at).map_err(|e| e.to_string())?;
            if page.iter().fold(0u8, |a, &b| a | b) != 0 {
                m.write_slice(&zero, at).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    fn known_zero(&self, gpa: u64, pages: usize, out: &mut [u64]) -> bool {
        let Some(pagemap) = &self.pagemap else {
            return false;
        };
        let Ok(range) = self.host_range(gpa, pages * PAGE_SIZE as usize) else {
            return false;
        };
        let first = range.bytes().as_ptr() as u64 / PAGE_SIZE;
        let mut raw = vec![0u8; pages * 8];
        if pagemap.read_exact_at(&mut raw, first * 8).is_err() {
            return false;
        }
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(e);
            if u64::from_ne_bytes(word) & (PM_PRESENT | PM_SWAPPED) == 0 {
                out[i / 64] |= 1 << (i % 64);
            }
        }
        true
    }

    fn write_sparse(&self, gpa: u64, pages: u32, body: &[u8]) -> Result<(), String> {
        let len = pages as usize * PAGE_SIZE as usize;
        let (m, _) = self.find(gpa, len)?;
        let data = devstate::sparse::expand(body, pages)?;
        m.write_slice(&data, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_zero_reports_only_pages_never_touched() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let (written, read, untouched) = (8u64 << 20, 24u64 << 20, 16u64 << 20);
        ram.mem()
            .write_slice(&[7u8; 16], GuestAddress(written))
            .unwrap();
        let mut seen = [0u8; 16];
        ram.mem().read_slice(&mut seen, GuestAddress(read)).unwrap();
        let view = RamView::of(&ram);
        let known = |gpa| {
            let mut out = [0u64; 1];
            assert!(view.known_zero(gpa, 16, &mut out));
            out[0]
        };
        // A touched page is never taken for zero (with huge pages its neighbours are mapped
        // too, so they are read like any other page).
        assert_eq!(known(written) & 1, 0);
        assert_eq!(known(read) & 1, 0);
        assert_eq!(known(untouched), 0xffff);
        let mut out = [0u64; 1];
        assert!(
            !view.known_zero(1 << 40, 16, &mut out),
            "outside RAM nothing is known"
        );
    }
}
