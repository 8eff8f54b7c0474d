//! Guest RAM as the migration's page-channel threads see it ([`migration::SharedRam`]): the
//! base RAM regions and the hot-plugged memory blocks, shared by reference count so the
//! mappings outlive every thread that holds the view.

use super::Vm;
use super::memory::GuestMem;
use crate::guest::PAGE_SIZE;
use migration::{HostRange, SharedRam};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Every RAM mapping of a VM.
#[derive(Debug)]
pub struct RamView {
    mems: Vec<GuestMem>,
    /// The destination's RAM was never written by a vCPU: a page whose VMM-bitmap bit is
    /// clear reads as zero.
    pristine: bool,
}

impl RamView {
    /// The view of `vm`'s RAM and blocks now.
    pub fn new(vm: &Vm) -> RamView {
        let mut mems = vec![vm.ram().mem().clone()];
        for (slot, ..) in vm.hotplug_blocks() {
            if let Some(m) = vm.hotplug_block_memory(slot) {
                mems.push(m.clone());
            }
        }
        RamView {
            mems,
            pristine: vm.ram().is_pristine(),
        }
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

    fn maybe_data(&self, m: &GuestMem, gpa: u64) -> bool {
        let Some(r) = m.find_region(GuestAddress(gpa)) else {
            return true;
        };
        let off = (gpa - r.start_addr().0) as usize;
        !self.pristine || r.bitmap().dirty_at(off)
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
        let (m, _) = self.find(gpa, len)?;
        let zero = [0u8; PAGE_SIZE as usize];
        let mut page = [0u8; PAGE_SIZE as usize];
        for p in 0..u64::from(pages) {
            let at = GuestAddress(gpa + p * PAGE_SIZE);
            // A page never written stays untouched (unallocated); others are cleared if they
            // hold data.
            if !self.maybe_data(m, at.0) {
                continue;
            }
            m.read_slice(&mut page, at).map_err(|e| e.to_string())?;
            if page.iter().fold(0u8, |a, &b| a | b) != 0 {
                m.write_slice(&zero, at).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    fn write_sparse(&self, gpa: u64, pages: u32, body: &[u8]) -> Result<(), String> {
        let len = pages as usize * PAGE_SIZE as usize;
        let (m, _) = self.find(gpa, len)?;
        let data = devstate::sparse::expand(body, pages)?;
        m.write_slice(&data, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }
}
