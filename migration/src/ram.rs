//! Guest RAM shared with page-channel threads: the source reads pages straight from guest
//! memory, the destination writes them straight into it. The only `unsafe` of the data path
//! lives here.

use crate::vm::VmError;
use std::marker::PhantomData;

/// Guest RAM that page-channel threads may access while the migration thread owns the VM.
pub trait SharedRam: Send + Sync {
    /// The host mapping of `[gpa, gpa + len)`, which must lie in one RAM region (else why not).
    fn host_range(&self, gpa: u64, len: usize) -> Result<HostRange<'_>, VmError>;
    /// Destination: `[gpa, gpa + len)` was written through [`HostRange`] (so the VMM no
    /// longer takes those pages for never-written zero pages).
    fn mark_written(&self, gpa: u64, len: usize);
    /// Destination: make `pages` pages at `gpa` read as zero.
    fn zero(&self, gpa: u64, pages: u32) -> Result<(), VmError>;
    /// Destination: write a validated SPARSE body (`devstate::sparse`) for `pages` pages.
    fn write_sparse(&self, gpa: u64, pages: u32, body: &[u8]) -> Result<(), VmError>;
    /// Source: set bit `i` of `out` for each page `gpa + i * 4096` (of `pages`) known to be
    /// zero without reading it; `false` when nothing is known.
    fn known_zero(&self, _gpa: u64, _pages: usize, _out: &mut [u64]) -> bool {
        false
    }
}

/// A range of mapped guest memory, valid while the [`SharedRam`] it came from lives.
#[derive(Clone, Copy, Debug)]
pub struct HostRange<'a> {
    ptr: *mut u8,
    len: usize,
    _ram: PhantomData<&'a ()>,
}

// SAFETY: a HostRange is an address range of guest memory, which every thread of the process
// may access; it carries no thread-affine state.
unsafe impl Send for HostRange<'_> {}
// SAFETY: as above; concurrent access is governed by the rules on `bytes` and `bytes_mut`.
unsafe impl Sync for HostRange<'_> {}

impl<'a> HostRange<'a> {
    /// # Safety
    /// `ptr..ptr + len` must be mapped, readable and writable guest memory that stays mapped
    /// for `'a` (the borrow of the `SharedRam` that hands it out).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> HostRange<'a> {
        HostRange {
            ptr,
            len,
            _ram: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The guest memory as bytes, for reading on the source while the guest may run.
    pub fn bytes(&self) -> &'a [u8] {
        // SAFETY: the range is mapped for 'a (constructor contract). A running guest may write
        // it meanwhile, so values read can be torn; the source never relies on them being
        // stable: every page written after its dirty bit was taken is dirty again and sent
        // again, and a copy torn between its CRC and the socket is replaced by that later copy
        // (see `pages`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The guest memory as writable bytes, for the destination.
    ///
    /// # Safety
    /// No other reference to these bytes may be live meanwhile: on the destination no vCPU
    /// runs during an incoming migration, and each page is written by one page-channel thread
    /// at a time (a page is in at most one record per pass, and passes are separated by SYNC).
    pub unsafe fn into_mut(self) -> &'a mut [u8] {
        // SAFETY: mapped for 'a (constructor contract); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}
