//! Hot-plugged memory blocks: one KVM memory slot each, mapped before the guest hears of
//! them, dirty-logged with guest RAM during a migration, checked by the test guest pattern.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::{HOTPLUG_KVM_SLOT_BASE, HotBlock, device_err};
use crate::guest::{self, PAGE_SIZE, mailbox::hp};
use crate::vm::{DirtyBitmap, GuestMem, MemoryError, Vm, VmError};

pub(super) fn set_block_region(
    fd: &VmFd,
    b: &HotBlock,
    size: u64,
    log: bool,
) -> Result<(), MemoryError> {
    let region = kvm_userspace_memory_region {
        slot: b.kvm_slot,
        flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: b.gpa,
        memory_size: size,
        userspace_addr: b.host_addr,
    };
    // SAFETY: `host_addr..+size` is the live mapping owned by `b.mem`; the slot is removed
    // (size 0) before that mapping is dropped, and hotplug blocks lie above guest RAM and
    // never overlap each other (the manager places block `s` at `mem_base + s * 16 MiB`).
    unsafe { fd.set_user_memory_region(region) }.map_err(|source| MemoryError::SetRegion {
        slot: b.kvm_slot,
        gpa: b.gpa,
        size: b.size,
        source,
    })?;
    b.dirty_log.store(log && size != 0, Ordering::Release);
    Ok(())
}

pub(super) fn unregister_block(fd: &VmFd, b: &HotBlock) -> Result<(), MemoryError> {
    set_block_region(fd, b, 0, false)
}

impl Vm {
    /// Mapped memory blocks: `(slot, KVM slot, gpa, size)`.
    pub fn hotplug_blocks(&self) -> Vec<(u32, u32, u64, u64)> {
        self.hp
            .blocks
            .iter()
            .map(|(&s, b)| (s, b.kvm_slot, b.gpa, b.size))
            .collect()
    }

    /// The memory of mapped block `slot` (for migration and checks).
    pub fn hotplug_block_memory(&self, slot: u32) -> Option<&GuestMem> {
        self.hp.blocks.get(&slot).map(|b| &b.mem)
    }

    /// Checks every memory block the guest dirties (mailbox `hp_blocks`) against its
    /// mailbox area. The vCPUs must be paused. Returns how many blocks were checked.
    pub fn verify_hotplug_blocks(&self) -> Result<usize, VmError> {
        if !self.all_parked() {
            return Err(VmError::NotPaused);
        }
        let m = self.hotplug_mailbox()?;
        let mut n = 0;
        for slot in 0..hp::MAX_BLOCKS {
            if m.blocks & (1 << slot) == 0 {
                continue;
            }
            let b = self.hp.blocks.get(&slot).ok_or_else(|| {
                device_err(format!(
                    "the guest dirties memory block {slot}, which is not mapped"
                ))
            })?;
            guest::verify_block(&b.mem, b.gpa, b.size / PAGE_SIZE, &m.block[slot as usize])?;
            n += 1;
        }
        Ok(n)
    }

    /// Dirty logging on or off for every hot-plugged block (enabling clears the logs).
    /// Blocks mapped later follow guest RAM's setting.
    pub fn hotplug_set_dirty_log(&self, enable: bool) -> Result<(), VmError> {
        for b in self.hp.blocks.values() {
            set_block_region(&self.fd, b, b.size, enable)?;
            if enable {
                self.fd
                    .get_dirty_log(b.kvm_slot, b.size as usize)
                    .map_err(|source| MemoryError::DirtyLog {
                        slot: b.kvm_slot,
                        source,
                    })?;
                if let Some(bm) = b.bitmap() {
                    bm.reset();
                }
            }
        }
        Ok(())
    }

    /// Pages of the hot-plugged blocks written since the last call: KVM's log OR the VMM
    /// bitmap, as for guest RAM (`slot` is the KVM slot).
    pub fn hotplug_dirty_pages(&self) -> Result<Vec<DirtyBitmap>, VmError> {
        let mut out = Vec::with_capacity(self.hp.blocks.len());
        for b in self.hp.blocks.values() {
            let words = (b.size / PAGE_SIZE).div_ceil(64) as usize;
            let mut bitmap = if b.dirty_log.load(Ordering::Acquire) {
                self.fd
                    .get_dirty_log(b.kvm_slot, b.size as usize)
                    .map_err(|source| MemoryError::DirtyLog {
                        slot: b.kvm_slot,
                        source,
                    })?
            } else {
                vec![0; words]
            };
            bitmap.resize(words, 0);
            if let Some(vmm) = b.bitmap() {
                for (w, v) in bitmap.iter_mut().zip(vmm.get_and_reset()) {
                    *w |= v;
                }
            }
            out.push(DirtyBitmap {
                slot: b.kvm_slot,
                gpa: b.gpa,
                size: b.size,
                bitmap,
            });
        }
        Ok(out)
    }

    pub(super) fn ensure_block(&mut self, slot: u32, gpa: u64, size: u64) -> Result<(), VmError> {
        if self.hp.blocks.contains_key(&slot) {
            return Ok(());
        }
        let mem = GuestMem::from_ranges(&[(GuestAddress(gpa), size as usize)])
            .map_err(|source| MemoryError::Map { size, source })?;
        let host_addr = {
            let region = mem.iter().next().expect("one region");
            let mmap: &MmapRegion<AtomicBitmap> = region;
            debug_assert_eq!(region.len(), size);
            mmap.as_ptr() as u64
        };
        let block = HotBlock {
            kvm_slot: HOTPLUG_KVM_SLOT_BASE + slot,
            gpa,
            size,
            host_addr,
            dirty_log: AtomicBool::new(false),
            mem,
        };
        let log = self.ram.slots().iter().any(|s| s.dirty_log_enabled());
        set_block_region(&self.fd, &block, size, log)?;
        tracing::info!(
            slot,
            kvm_slot = block.kvm_slot,
            gpa = format_args!("{gpa:#x}"),
            size,
            log,
            "memory block mapped"
        );
        self.hp.blocks.insert(slot, block);
        Ok(())
    }

    pub(super) fn unmap_block(&mut self, slot: u32) -> Result<(), VmError> {
        if let Some(b) = self.hp.blocks.remove(&slot) {
            unregister_block(&self.fd, &b)?;
            tracing::info!(slot, "memory block unmapped");
        }
        Ok(())
    }
}
