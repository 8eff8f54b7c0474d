//! What the engine needs from a VMM. `vmm` implements these traits for its KVM VM; the engine
//! never sees KVM.

use crate::config::ConfigRecord;
use crate::ram::SharedRam;
use devstate::{Catalog, RawSection};
use machine_types::MachineType;
use std::sync::Arc;

/// Dirty pages of one RAM region: bit `i` of `bitmap` is the page at `gpa + i * 4096`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Start of the region.
    pub gpa: u64,
    /// Pages in the region.
    pub pages: u64,
    /// One bit per page, least significant bit first.
    pub bitmap: Vec<u64>,
}

/// A VMM error, already in words.
pub type VmError = String;

/// The source side of a migration.
pub trait SourceVm {
    /// The machine type the guest runs.
    fn machine(&self) -> &'static MachineType;
    /// The configuration the destination must match.
    fn config(&self) -> ConfigRecord;
    /// Whether the guest runs now.
    fn is_running(&self) -> bool;
    /// Stop every vCPU outside KVM_RUN.
    fn pause(&mut self) -> Result<(), VmError>;
    /// Restart the vCPUs.
    fn resume(&mut self) -> Result<(), VmError>;
    /// Start dirty tracking (KVM log and the VMM's own bitmap), clearing both.
    fn start_dirty_log(&mut self) -> Result<(), VmError>;
    /// Stop dirty tracking.
    fn stop_dirty_log(&mut self) -> Result<(), VmError>;
    /// Pages written since the last call (or since tracking started), per region.
    fn take_dirty(&mut self) -> Result<Vec<DirtyRegion>, VmError>;
    /// Copy guest RAM at `gpa` into `buf` (whole pages).
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError>;
    /// Every device section, encoded for machine type `m` with `devstate::encode_section`
    /// (vCPUs paused).
    fn save_devices(&mut self, m: &MachineType) -> Result<Vec<Vec<u8>>, VmError>;
    /// Throttle every vCPU to `100 - percent` percent of its run time; 0 ends throttling
    /// (auto-converge).
    fn set_throttle(&mut self, _percent: u8) -> Result<(), VmError> {
        Err("This VMM cannot throttle vCPUs".to_owned())
    }
    /// The guest is now the destination's: tear down nothing, but never run again.
    fn handed_over(&mut self) {}
    /// Guest RAM for page-channel threads to read (none: pages stay in the main stream).
    fn shared_ram(&self) -> Option<Arc<dyn SharedRam>> {
        None
    }
}

/// The destination side of a migration.
pub trait DestinationVm {
    /// The machine type this process was started with.
    fn machine(&self) -> &'static MachineType;
    /// The configuration after pre-start `device_add`s.
    fn config(&self) -> ConfigRecord;
    /// What this host cannot run of the source's configuration (CPU features, XSAVE
    /// components or MSRs its CPU model needs), one line each; refused at the handshake.
    fn host_refusals(&self, _src: &ConfigRecord) -> Vec<String> {
        Vec::new()
    }
    /// Every section type this build reads (the engine adds its own).
    fn catalog(&self) -> Catalog;
    /// Sections that must arrive (e.g. one per vCPU), beyond the catalog's required ones.
    fn expected_sections(&self) -> Vec<(String, u32)>;
    /// The stream has started: refuse hotplug from now on, reset every connector and clear
    /// the pending guest-event queue (after the pre-start adds, before anything is loaded).
    fn begin_incoming(&mut self) -> Result<(), VmError>;
    /// Write pages at `gpa`; `None` means `pages` zero pages. Must refuse any range outside
    /// guest RAM.
    fn write_ram(&mut self, gpa: u64, pages: u32, data: Option<&[u8]>) -> Result<(), VmError>;
    /// Write `pages` pages at `gpa` from a validated SPARSE body (`devstate::sparse`). The
    /// default expands it and calls [`write_ram`](Self::write_ram); a VMM that knows which
    /// pages are still zero can write just the blocks. Wrappers must forward it.
    fn write_ram_sparse(&mut self, gpa: u64, pages: u32, body: &[u8]) -> Result<(), VmError> {
        let data = devstate::sparse::expand(body, pages)?;
        self.write_ram(gpa, pages, Some(&data))
    }
    /// Load every device section (vCPUs not yet running).
    fn load_devices(&mut self, sections: &[RawSection]) -> Result<(), VmError>;
    /// COMMIT arrived: run the guest if the source was running.
    fn commit(&mut self, run: bool) -> Result<(), VmError>;
    /// Guest RAM for page-channel threads to write, once [`begin_incoming`]
    /// (Self::begin_incoming) succeeded (none: no page channels are granted).
    fn shared_ram(&self) -> Option<Arc<dyn SharedRam>> {
        None
    }
    /// Guest RAM for post-copy (none: post-copy is refused at the handshake). Stops
    /// anything that populates guest RAM in the background.
    fn postcopy_ram(&mut self) -> Option<Arc<dyn crate::postcopy::PostcopyRam>> {
        None
    }
    /// Post-copy lost its link: pause the guest (a vCPU waiting for a missing page waits on)
    /// and keep `state` for `migrate-recover` (its registration keeps a missing page from
    /// ever reading as zero); true if paused.
    fn postcopy_paused(&mut self, _why: &str, _state: crate::postcopy::Paused) -> bool {
        false
    }
    /// The incoming migration failed: discard what was loaded, allow hotplug again.
    fn abort_incoming(&mut self, why: &str);
}
