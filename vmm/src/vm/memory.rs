//! Guest RAM: anonymous mappings with a VMM-side dirty bitmap, registered as KVM memory
//! slots, with per-slot dirty logging.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, MmapRegion,
};

use crate::guest::{PAGE_SIZE, layout};

/// Guest memory as the VMM sees it: writes through `Bytes` mark the VMM dirty bitmap.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Errors setting up or tracking guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// A SPARSE page body does not encode the pages it claims.
    #[error("Invalid sparse page data: {0}")]
    BadSparse(String),
    /// Mapping guest RAM failed.
    #[error("Cannot map {size} bytes of guest RAM")]
    Map {
        /// Bytes requested.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("Cannot register memory slot {slot} (GPA {gpa:#x}, {size} bytes) with KVM")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// First GPA.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("Cannot read the KVM dirty log of slot {slot}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No such slot.
    #[error("Memory slot {0} does not exist")]
    NoSuchSlot(u32),
    /// Two guests' RAM differ in layout.
    #[error("Guest RAM layouts differ: {0}")]
    LayoutMismatch(String),
    /// A copy between guest RAMs failed.
    #[error("Cannot copy guest RAM")]
    Copy(#[source] vm_memory::GuestMemoryError),
    /// A range that is not entirely guest RAM (nothing was accessed).
    #[error(
        "Range {gpa:#x}..{end:#x} is not guest RAM (RAM is {layout}); nothing was written",
        end = gpa.saturating_add(*len)
    )]
    OutsideRam {
        /// First byte asked for.
        gpa: u64,
        /// Length asked for.
        len: u64,
        /// The RAM regions, for the message.
        layout: String,
    },
}

/// One KVM memory slot.
#[derive(Debug)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    host_addr: u64,
    dirty_log: AtomicBool,
}

impl MemorySlot {
    /// Whether `KVM_MEM_LOG_DIRTY_PAGES` is set.
    pub fn dirty_log_enabled(&self) -> bool {
        self.dirty_log.load(Ordering::Acquire)
    }
}

/// Dirty pages of one slot: bit `i` of the bitmap is the 4 KiB page at `gpa + i * 4096`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Slot number.
    pub slot: u32,
    /// First GPA of the slot.
    pub gpa: u64,
    /// Slot size in bytes.
    pub size: u64,
    /// One bit per page, little-endian words.
    pub bitmap: Vec<u64>,
}

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// GPAs of the dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(move |(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| self.gpa + (w as u64 * 64 + b) * PAGE_SIZE)
        })
    }
}

/// Splits `size` bytes of RAM around the PCI hole: `[(gpa, len)]`.
pub fn ram_layout(size: u64) -> Vec<(u64, u64)> {
    if size <= layout::PCI_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, layout::PCI_HOLE_START),
            (layout::PCI_HOLE_END, size - layout::PCI_HOLE_START),
        ]
    }
}

/// Guest RAM and its KVM slots.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMem,
    slots: Vec<MemorySlot>,
    size: u64,
    /// No vCPU has run and the VMM bitmap was never reset: a page whose VMM-bitmap bit is
    /// clear has never been written and reads as zero.
    pristine: AtomicBool,
}

impl GuestRam {
    /// Maps `size` bytes (laid out by [`ram_layout`]) and asks for transparent huge pages.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = ram_layout(size)
            .into_iter()
            .map(|(gpa, len)| (GuestAddress(gpa), len as usize))
            .collect();
        let mem =
            GuestMem::from_ranges(&ranges).map_err(|source| MemoryError::Map { size, source })?;
        let mut slots = Vec::new();
        for (i, region) in mem.iter().enumerate() {
            let mmap: &MmapRegion<AtomicBitmap> = region;
            advise_huge_pages(mmap.as_ptr(), mmap.size());
            slots.push(MemorySlot {
                slot: i as u32,
                gpa: region.start_addr().0,
                size: region.len(),
                host_addr: mmap.as_ptr() as u64,
                dirty_log: AtomicBool::new(false),
            });
        }
        Ok(GuestRam {
            mem,
            slots,
            size,
            pristine: AtomicBool::new(true),
        })
    }

    /// The memory, for `Bytes` access.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// One past the highest RAM address.
    pub fn top(&self) -> u64 {
        self.slots.iter().map(|s| s.gpa + s.size).max().unwrap_or(0)
    }

    /// The KVM slots.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    fn set_region(&self, vm: &VmFd, slot: &MemorySlot, log: bool) -> Result<(), MemoryError> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: `userspace_addr..+memory_size` is a live mapping owned by `self.mem`, which
        // outlives the VM fd's use of it (the `Vm` drops its vCPUs and VM fd before RAM), and
        // slots never overlap (they come from `ram_layout`).
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::SetRegion {
            slot: slot.slot,
            gpa: slot.gpa,
            size: slot.size,
            source,
        })?;
        slot.dirty_log.store(log, Ordering::Release);
        Ok(())
    }

    /// Registers every slot with KVM (dirty logging off).
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for s in &self.slots {
            self.set_region(vm, s, false)?;
        }
        Ok(())
    }

    fn slot(&self, slot: u32) -> Result<&MemorySlot, MemoryError> {
        self.slots
            .iter()
            .find(|s| s.slot == slot)
            .ok_or(MemoryError::NoSuchSlot(slot))
    }

    /// Turns `KVM_MEM_LOG_DIRTY_PAGES` on or off for one slot. Turning it on clears both the
    /// KVM log and the VMM bitmap of the slot, so the next [`dirty_pages`](Self::dirty_pages)
    /// reports writes made from now on.
    pub fn set_dirty_log(&self, vm: &VmFd, slot: u32, enable: bool) -> Result<(), MemoryError> {
        let s = self.slot(slot)?;
        self.set_region(vm, s, enable)?;
        if enable {
            vm.get_dirty_log(s.slot, s.size as usize)
                .map_err(|source| MemoryError::DirtyLog { slot, source })?;
            self.vmm_bitmap_reset(slot);
        }
        Ok(())
    }

    /// Dirty logging on or off for every slot.
    pub fn set_dirty_log_all(&self, vm: &VmFd, enable: bool) -> Result<(), MemoryError> {
        for s in &self.slots {
            self.set_dirty_log(vm, s.slot, enable)?;
        }
        Ok(())
    }

    fn region_bitmap(&self, slot: u32) -> Option<&AtomicBitmap> {
        let region = self.mem.iter().nth(slot as usize)?;
        let mmap: &MmapRegion<AtomicBitmap> = region;
        Some(mmap.bitmap())
    }

    /// Whether no vCPU has run yet and every VMM write is still in the VMM bitmap (so
    /// untouched pages are known to be zero without reading them).
    pub fn is_pristine(&self) -> bool {
        self.pristine.load(Ordering::Acquire)
    }

    /// Records that guest code may have written RAM (called before vCPUs first run).
    pub fn mark_used(&self) {
        self.pristine.store(false, Ordering::Release);
    }

    fn vmm_bitmap_reset(&self, slot: u32) {
        self.mark_used();
        if let Some(b) = self.region_bitmap(slot) {
            b.reset();
        }
    }

    /// Pages written since the last call (or since logging was enabled): the KVM dirty log of
    /// every logging slot (guest writes) OR the VMM bitmap (VMM writes), both cleared by the
    /// read. Slots without logging report VMM writes only.
    pub fn dirty_pages(&self, vm: &VmFd) -> Result<Vec<DirtyBitmap>, MemoryError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let words = (s.size / PAGE_SIZE).div_ceil(64) as usize;
            let mut bitmap = if s.dirty_log_enabled() {
                vm.get_dirty_log(s.slot, s.size as usize)
                    .map_err(|source| MemoryError::DirtyLog {
                        slot: s.slot,
                        source,
                    })?
            } else {
                vec![0; words]
            };
            bitmap.resize(words, 0);
            if let Some(vmm) = self.region_bitmap(s.slot) {
                self.mark_used();
                for (w, v) in bitmap.iter_mut().zip(vmm.get_and_reset()) {
                    *w |= v;
                }
            }
            out.push(DirtyBitmap {
                slot: s.slot,
                gpa: s.gpa,
                size: s.size,
                bitmap,
            });
        }
        Ok(out)
    }

    /// The RAM regions as `0x0+64 MiB, 0x100000000+1024 MiB`.
    pub fn describe(&self) -> String {
        self.slots
            .iter()
            .map(|s| format!("{:#x}+{} MiB", s.gpa, s.size >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Splits `[gpa, gpa + len)` into `(region index, offset in region, length)` pieces, or
    /// refuses it when any byte is not RAM (overflow included). Nothing is accessed.
    pub fn pieces(&self, gpa: u64, len: u64) -> Result<Vec<(usize, u64, u64)>, MemoryError> {
        let outside = || MemoryError::OutsideRam {
            gpa,
            len,
            layout: self.describe(),
        };
        let end = gpa.checked_add(len).ok_or_else(outside)?;
        let mut out = Vec::with_capacity(1);
        let mut at = gpa;
        while at < end {
            let (i, s) = self
                .slots
                .iter()
                .enumerate()
                .find(|(_, s)| s.gpa <= at && at < s.gpa + s.size)
                .ok_or_else(outside)?;
            let n = (s.gpa + s.size).min(end) - at;
            out.push((i, at - s.gpa, n));
            at += n;
        }
        Ok(out)
    }

    fn region(&self, index: usize) -> &vm_memory::GuestRegionMmap<AtomicBitmap> {
        self.mem
            .iter()
            .nth(index)
            .expect("slots and regions are built together")
    }

    /// Copies guest RAM at `gpa` into `buf` (refused, untouched, unless it is all RAM).
    pub fn read_range(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        for (i, off, n) in self.pieces(gpa, buf.len() as u64)? {
            let n = n as usize;
            let src = self
                .region(i)
                .get_slice(MemoryRegionAddress(off), n)
                .map_err(MemoryError::Copy)?;
            src.copy_to(&mut buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into guest RAM at `gpa`, marking the VMM dirty bitmap. The whole range is
    /// checked first: a range that is not all RAM is refused and nothing is written.
    pub fn write_range(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        for (i, off, n) in self.pieces(gpa, data.len() as u64)? {
            let n = n as usize;
            let dst = self
                .region(i)
                .get_slice(MemoryRegionAddress(off), n)
                .map_err(MemoryError::Copy)?;
            dst.copy_from(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Makes `pages` pages from `gpa` read as zero without materialising the ones that
    /// already are. While the RAM is [pristine](Self::is_pristine), a page the VMM never wrote
    /// is not even read; any other page is read first and written only when it holds data,
    /// so a page never touched stays unallocated (reads map the shared zero page). Refused,
    /// untouched, unless the range is all RAM. Returns the number of pages that had to be
    /// cleared.
    pub fn zero_range(&self, gpa: u64, pages: u64) -> Result<u64, MemoryError> {
        const CHUNK: u64 = 16;
        let len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| MemoryError::OutsideRam {
                gpa,
                len: u64::MAX,
                layout: self.describe(),
            })?;
        let pieces = self.pieces(gpa, len)?;
        let pristine = self.is_pristine();
        let mut buf = vec![0u8; (CHUNK * PAGE_SIZE) as usize];
        let zero = [0u8; PAGE_SIZE as usize];
        let mut cleared = 0;
        for (i, off, n) in pieces {
            let region = self.region(i);
            let bitmap = self.region_bitmap(i as u32);
            // Pages that may hold data: all of them, unless pristine and never VMM-written.
            let maybe_data = |page_off: u64| match (pristine, bitmap) {
                (true, Some(b)) => b.is_addr_set(page_off as usize),
                _ => true,
            };
            let mut at = 0u64;
            while at < n {
                let chunk = (n - at).min(CHUNK * PAGE_SIZE);
                let first = off + at;
                if !(0..chunk / PAGE_SIZE).any(|p| maybe_data(first + p * PAGE_SIZE)) {
                    at += chunk;
                    continue;
                }
                let src = region
                    .get_slice(MemoryRegionAddress(first), chunk as usize)
                    .map_err(MemoryError::Copy)?;
                let bytes = chunk as usize;
                src.copy_to(&mut buf[..bytes]);
                for (p, page) in buf[..bytes].chunks(PAGE_SIZE as usize).enumerate() {
                    // An OR over the page vectorises; an early-exit search does not.
                    if page.iter().fold(0u8, |a, &b| a | b) != 0 {
                        let page_off = first + p as u64 * PAGE_SIZE;
                        region
                            .write_slice(&zero, MemoryRegionAddress(page_off))
                            .map_err(MemoryError::Copy)?;
                        cleared += 1;
                    }
                }
                at += chunk;
            }
        }
        Ok(cleared)
    }

    /// Writes `pages` pages at `gpa` from a SPARSE body (`devstate::sparse`). While the RAM
    /// is [pristine](Self::is_pristine), a page the VMM never wrote is known to be zero, so
    /// only its non-zero blocks are written (one copy per run of blocks); any other page is
    /// built in a page buffer and written whole. Refused, untouched, unless the range is all
    /// RAM and the body holds exactly `pages` pages.
    pub fn write_sparse(&self, gpa: u64, pages: u32, body: &[u8]) -> Result<(), MemoryError> {
        use devstate::sparse::{BLOCK, expand_page, pages as sparse_pages, runs, validate};
        validate(body, pages).map_err(MemoryError::BadSparse)?;
        let pieces = self.pieces(gpa, u64::from(pages) * PAGE_SIZE)?;
        let pristine = self.is_pristine();
        let mut page = [0u8; PAGE_SIZE as usize];
        let mut body_pages = sparse_pages(body);
        for (i, off, n) in pieces {
            let region = self.region(i);
            let bitmap = self.region_bitmap(i as u32);
            for p in 0..n / PAGE_SIZE {
                let (mask, blocks) = body_pages.next().expect("validated page count");
                let page_off = off + p * PAGE_SIZE;
                let known_zero =
                    pristine && bitmap.is_some_and(|b| !b.is_addr_set(page_off as usize));
                if known_zero {
                    let mut at = 0;
                    for (first, count) in runs(mask) {
                        let len = count as usize * BLOCK;
                        region
                            .write_slice(
                                &blocks[at..at + len],
                                MemoryRegionAddress(page_off + u64::from(first) * BLOCK as u64),
                            )
                            .map_err(MemoryError::Copy)?;
                        at += len;
                    }
                } else {
                    expand_page(mask, blocks, &mut page);
                    region
                        .write_slice(&page, MemoryRegionAddress(page_off))
                        .map_err(MemoryError::Copy)?;
                }
            }
        }
        Ok(())
    }

    /// Copies every byte of `src` into this RAM (same layout required). Used by tests and
    /// benchmarks standing in for the migration RAM stream.
    pub fn copy_from(&self, src: &GuestRam) -> Result<(), MemoryError> {
        if ram_layout(self.size) != ram_layout(src.size) {
            return Err(MemoryError::LayoutMismatch(format!(
                "{} bytes here, {} bytes in the source",
                self.size, src.size
            )));
        }
        for (d, s) in self.mem.iter().zip(src.mem.iter()) {
            let len = s.len() as usize;
            let from = s
                .get_slice(vm_memory::MemoryRegionAddress(0), len)
                .map_err(MemoryError::Copy)?;
            let to = d
                .get_slice(vm_memory::MemoryRegionAddress(0), len)
                .map_err(MemoryError::Copy)?;
            from.copy_to_volatile_slice(to);
        }
        Ok(())
    }
}

/// Asks the kernel to back `[ptr, ptr + len)` with transparent huge pages (best effort).
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    // SAFETY: madvise only changes the paging policy of a range we own (a live anonymous
    // mapping of `len` bytes at `ptr`, created by vm-memory); it does not touch its contents.
    let ret = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "madvise(MADV_HUGEPAGE) failed; guest RAM uses 4 KiB pages"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_around_the_pci_hole() {
        assert_eq!(ram_layout(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(ram_layout(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_layout(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn ranges_outside_ram_are_refused_untouched() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let data = vec![0xabu8; 2 * PAGE_SIZE as usize];
        ram.write_range(0x1000, &data).unwrap();
        let e = ram
            .write_range((8 << 20) - PAGE_SIZE, &data)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Range 0x7ff000..0x801000 is not guest RAM (RAM is 0x0+8 MiB); nothing was written"
        );
        let mut last = [1u8; 8];
        ram.read_range((8 << 20) - 8, &mut last).unwrap();
        assert_eq!(last, [0; 8], "nothing was written by the refused call");
        assert!(ram.zero_range(u64::MAX - 4095, 2).is_err());
        assert!(ram.pieces(u64::MAX, 2).is_err());

        // Zeroing clears only the pages holding data.
        let mut back = vec![0u8; data.len()];
        ram.read_range(0x1000, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(ram.zero_range(0, 4).unwrap(), 2);
        ram.read_range(0x1000, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert_eq!(ram.zero_range(0, 4).unwrap(), 0);
    }

    /// Pages of `[ptr, ptr + len)` resident in this process.
    fn resident_pages(ram: &GuestRam, len: usize) -> usize {
        let ptr = ram.mem().get_host_address(GuestAddress(0)).unwrap();
        let mut vec = vec![0u8; len / PAGE_SIZE as usize];
        // SAFETY: `ptr..ptr + len` is a live mapping owned by `ram`, page aligned; `vec` has
        // one byte per page of it. mincore only reads the page tables.
        let r = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn zero_records_never_touch_untouched_pages() {
        let ram = GuestRam::new(8 << 20).unwrap();
        assert!(ram.is_pristine());
        ram.write_range(0x5000, &[1u8; 4096]).unwrap();
        assert_eq!(ram.zero_range(0, 2048).unwrap(), 1);
        assert!(
            resident_pages(&ram, 8 << 20) <= 512,
            "only the written page (or its huge page) is resident"
        );
        let mut b = [9u8; 16];
        ram.read_range(0x5000, &mut b).unwrap();
        assert_eq!(b, [0; 16]);
        // Once guest code may have run, every page is checked by reading it.
        ram.mark_used();
        ram.write_range(0x7000, &[2u8; 4096]).unwrap();
        assert_eq!(ram.zero_range(0, 2048).unwrap(), 1);
    }

    #[test]
    fn ranges_split_around_the_pci_hole() {
        let ram = GuestRam::new((3 << 30) + (16 << 20)).unwrap();
        assert_eq!(
            ram.pieces(layout::PCI_HOLE_END, 8192).unwrap(),
            [(1, 0, 8192)]
        );
        assert!(ram.pieces(layout::PCI_HOLE_START - 4096, 8192).is_err());
        let mut b = [0u8; 16];
        ram.write_range(layout::PCI_HOLE_END + 4096, &[7; 16])
            .unwrap();
        ram.read_range(layout::PCI_HOLE_END + 4096, &mut b).unwrap();
        assert_eq!(b, [7; 16]);
    }

    #[test]
    fn vmm_writes_are_tracked_without_kvm() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.mem().write_obj(7u8, GuestAddress(0x3000)).unwrap();
        let b = ram.region_bitmap(0).unwrap().get_and_reset();
        assert_eq!(b[0], 1 << 3);
        let d = DirtyBitmap {
            slot: 0,
            gpa: 0x1000,
            size: 1 << 20,
            bitmap: vec![0b1010, 1],
        };
        assert_eq!(d.count(), 3);
        assert_eq!(
            d.pages().collect::<Vec<_>>(),
            vec![0x2000, 0x4000, 0x1000 + 64 * 4096]
        );
    }
}
