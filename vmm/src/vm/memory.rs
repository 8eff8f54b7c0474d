//! Guest RAM: anonymous mappings with a VMM-side dirty bitmap, registered as KVM memory
//! slots, with per-slot dirty logging.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::guest::{PAGE_SIZE, layout};

/// Guest memory as the VMM sees it: writes through `Bytes` mark the VMM dirty bitmap.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Errors setting up or tracking guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
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
        Ok(GuestRam { mem, slots, size })
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

    fn vmm_bitmap_reset(&self, slot: u32) {
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
