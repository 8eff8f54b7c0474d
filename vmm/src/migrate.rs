//! The VM as the migration engine sees it: [`VmMigration`] implements
//! [`migration::SourceVm`] and [`migration::DestinationVm`] over a [`Vm`], plus the device
//! registry ([`catalog`], [`full_catalog`]) and helpers to read, decode and compare device
//! sections (volatile fields reported apart, as Precise rule 2 asks).
//!
//! ```no_run
//! # use vmm::{Vm, config::VmConfig, migrate::VmMigration};
//! # fn f(vm: &mut Vm) -> Result<(), migration::MigrationError> {
//! let progress = migration::Progress::default();
//! migration::send(
//!     &mut VmMigration::new(vm),
//!     "file:/tmp/guest.ferry",
//!     &migration::Params::default(),
//!     &progress,
//! )?;
//! # Ok(()) }
//! ```
//!
//! Run states: the source goes `running` -> `finish-migrate` (stop-and-copy) -> `postmigrate`
//! once handed over, or back to `running` when the migration fails before COMMIT. The
//! destination goes to `inmigrate` when the stream starts and to `running` (or `paused`, when
//! the source was not running) on COMMIT; a failed incoming migration leaves it `inmigrate`
//! with its vCPUs parked.

use std::io::Read;

use devstate::{DecodeError, Item, MachineSchema, RawSection, StreamReader};
use machine_types::{CpuModel, MachineType};
use migration::{ConfigRecord, DestinationVm, DeviceDesc, DirtyRegion, RegionDesc, SourceVm};
use vm_memory::Bytes;

use crate::guest::PAGE_SIZE;
use crate::runstate::RunState;
use crate::vm::persist::HotVcpuState;
pub use crate::vm::persist::{catalog, full_catalog};
use crate::vm::{Vm, VmError};

/// Called by [`DestinationVm::begin_incoming`] after the VM entered `inmigrate` and before
/// any RAM or state is written: the place to reset hotplug connectors and clear the pending
/// guest-event queue (Precise rule 5).
pub type IncomingHook = Box<dyn FnMut(&mut Vm) -> Result<(), String> + Send>;

/// What the destination did with the RAM records it received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamStats {
    /// Pages written from DATA records.
    pub data_pages: u64,
    /// Pages covered by ZERO records.
    pub zero_pages: u64,
    /// ZERO pages that held data and had to be cleared (the others were left untouched).
    pub zero_pages_cleared: u64,
}

/// A [`Vm`] seen by the migration engine, on either side.
pub struct VmMigration<'a> {
    vm: &'a mut Vm,
    incoming: bool,
    capture: bool,
    reserialised: Option<Vec<Vec<u8>>>,
    hook: Option<IncomingHook>,
    stats: RamStats,
    failure: Option<String>,
}

impl std::fmt::Debug for VmMigration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMigration")
            .field("incoming", &self.incoming)
            .field("stats", &self.stats)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

fn words(e: VmError) -> String {
    migration::chain(&e)
}

impl<'a> VmMigration<'a> {
    /// Migrate `vm` out, or into it.
    pub fn new(vm: &'a mut Vm) -> Self {
        VmMigration {
            vm,
            incoming: false,
            capture: false,
            reserialised: None,
            hook: None,
            stats: RamStats::default(),
            failure: None,
        }
    }

    /// Destination: right after the device state is loaded, and before any vCPU runs,
    /// re-serialise it (see [`VmMigration::reserialised`]).
    pub fn capture_after_load(mut self) -> Self {
        self.capture = true;
        self
    }

    /// Destination: run `hook` when the stream starts (connector reset goes here).
    pub fn on_begin_incoming(mut self, hook: IncomingHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The destination's own sections, encoded after load and before its first `KVM_RUN`
    /// (with [`VmMigration::capture_after_load`]).
    pub fn reserialised(&self) -> Option<&[Vec<u8>]> {
        self.reserialised.as_deref()
    }

    /// What the destination did with RAM records.
    pub fn ram_stats(&self) -> RamStats {
        self.stats
    }

    /// Why the last incoming migration was aborted, if it was.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        self.vm
    }

    /// The configuration a peer must match: machine type, CPU model, vCPUs, RAM regions.
    pub fn config_record(&self) -> ConfigRecord {
        config_record(self.vm)
    }
}

/// The configuration record of `vm`: machine type, CPU model, boot vCPU count, the RAM
/// regions (split around the PCI hole, then the hot-plugged memory blocks) and every device
/// on a hotplug connector.
pub fn config_record(vm: &Vm) -> ConfigRecord {
    let mut memory: Vec<RegionDesc> = vm
        .ram()
        .slots()
        .iter()
        .map(|s| RegionDesc {
            gpa: s.gpa,
            size: s.size,
        })
        .collect();
    let mut blocks = vm.hotplug_blocks();
    blocks.sort_by_key(|b| b.2);
    memory.extend(
        blocks
            .iter()
            .map(|&(_, _, gpa, size)| RegionDesc { gpa, size }),
    );
    let mut devices: Vec<DeviceDesc> = lock_mgr(vm)
        .attached_devices()
        .into_iter()
        .map(|(id, spec)| DeviceDesc {
            connector: spec.index(),
            driver: spec.driver().to_owned(),
            id,
        })
        .collect();
    devices.sort_by_key(|d| d.connector);
    ConfigRecord {
        machine: vm.machine().name().to_owned(),
        cpu_model: vm.cpu_model().name().to_owned(),
        vcpus: vm.vcpus().len() as u32,
        memory,
        devices,
    }
}

fn lock_mgr(vm: &Vm) -> std::sync::MutexGuard<'_, crate::hotplug::HotplugManager> {
    vm.hotplug().lock().unwrap_or_else(|p| p.into_inner())
}

/// The hot-plugged memory block holding `[gpa, gpa + len)`, as (block memory).
fn block_for(vm: &Vm, gpa: u64, len: u64) -> Option<&crate::vm::memory::GuestMem> {
    vm.hotplug_blocks()
        .into_iter()
        .find(|&(_, _, start, size)| gpa >= start && gpa + len <= start + size)
        .and_then(|(slot, ..)| vm.hotplug_block_memory(slot))
}

/// Hotplug state (connectors, guest event queue, controller registers, PCI functions) as
/// encoded sections for machine type `m`.
fn hotplug_sections(vm: &Vm, m: &MachineType) -> Vec<Vec<u8>> {
    let now = vm.hotplug_clock_ms();
    let mut out = lock_mgr(vm).encode_sections(m, now);
    out.extend(vm.hotplug_device_sections(m));
    out
}

fn hot_vcpu_sections(vm: &Vm, m: &MachineType) -> Result<Vec<Vec<u8>>, VmError> {
    Ok(vm
        .save_hot_vcpus()?
        .into_iter()
        .filter_map(|(core, run, cpu)| {
            devstate::encode_section(
                &mut HotVcpuState { core, run, cpu },
                core,
                m,
                devstate::Tag::Section,
            )
        })
        .collect())
}

/// Every section of a paused VM: VM and boot vCPUs, hot-added vCPUs, hotplug state.
fn all_sections(vm: &Vm, m: &MachineType) -> Result<Vec<Vec<u8>>, VmError> {
    let mut out = vm.save_sections(m)?;
    out.extend(hot_vcpu_sections(vm, m)?);
    out.extend(hotplug_sections(vm, m));
    Ok(out)
}

impl SourceVm for VmMigration<'_> {
    fn machine(&self) -> &'static MachineType {
        self.vm.machine()
    }

    fn config(&self) -> ConfigRecord {
        self.config_record()
    }

    fn is_running(&self) -> bool {
        self.vm.run_state() == RunState::Running
    }

    fn pause(&mut self) -> Result<(), String> {
        self.vm.pause().map_err(words)?;
        self.vm.set_run_state(RunState::FinishMigrate);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), String> {
        self.vm.resume().map_err(words)
    }

    fn start_dirty_log(&mut self) -> Result<(), String> {
        self.vm.set_dirty_log(true).map_err(words)?;
        self.vm.hotplug_set_dirty_log(true).map_err(words)
    }

    fn stop_dirty_log(&mut self) -> Result<(), String> {
        self.vm.set_dirty_log(false).map_err(words)?;
        self.vm.hotplug_set_dirty_log(false).map_err(words)
    }

    fn take_dirty(&mut self) -> Result<Vec<DirtyRegion>, String> {
        let mut all = self.vm.dirty_pages().map_err(words)?;
        all.extend(self.vm.hotplug_dirty_pages().map_err(words)?);
        Ok(all
            .into_iter()
            .map(|d| DirtyRegion {
                gpa: d.gpa,
                pages: d.size / PAGE_SIZE,
                bitmap: d.bitmap,
            })
            .collect())
    }

    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        if let Some(mem) = block_for(self.vm, gpa, buf.len() as u64) {
            return mem
                .read_slice(buf, vm_memory::GuestAddress(gpa))
                .map_err(|e| format!("Cannot read memory block at {gpa:#x}: {e}"));
        }
        self.vm
            .ram()
            .read_range(gpa, buf)
            .map_err(|e| words(e.into()))
    }

    fn save_devices(&mut self, m: &MachineType) -> Result<Vec<Vec<u8>>, String> {
        // A core the guest finished configuring while RAM was copied starts here (paused),
        // so the destination runs it too.
        self.vm.apply_pending_hotplug();
        all_sections(self.vm, m).map_err(words)
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), String> {
        self.vm.set_throttle(percent).map_err(words)
    }

    fn handed_over(&mut self) {
        self.vm.set_run_state(RunState::PostMigrate);
        tracing::info!("guest handed over; this VM stays stopped (postmigrate)");
    }

    fn shared_ram(&self) -> Option<std::sync::Arc<dyn migration::SharedRam>> {
        Some(std::sync::Arc::new(crate::vm::ram_view::RamView::new(
            self.vm,
        )))
    }
}

impl DestinationVm for VmMigration<'_> {
    fn machine(&self) -> &'static MachineType {
        self.vm.machine()
    }

    fn config(&self) -> ConfigRecord {
        self.config_record()
    }

    fn catalog(&self) -> devstate::Catalog {
        catalog()
    }

    fn host_refusals(&self, src: &ConfigRecord) -> Vec<String> {
        match CpuModel::by_name(&src.cpu_model) {
            Some(m) => self
                .vm
                .check_host_runs(m, "destination host")
                .err()
                .map(|e| e.to_string())
                .into_iter()
                .collect(),
            None => vec![format!(
                "unknown CPU model '{}': this build knows {}",
                src.cpu_model,
                machine_types::cpu::ALL_MODELS
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        }
    }

    fn expected_sections(&self) -> Vec<(String, u32)> {
        self.vm.expected_sections()
    }

    fn begin_incoming(&mut self) -> Result<(), String> {
        let state = self.vm.run_state();
        if !matches!(
            state,
            RunState::Prelaunch | RunState::InMigrate | RunState::Paused
        ) || !self.vm.all_parked()
        {
            return Err(format!(
                "cannot receive a migration into a VM that is {state}; start it with incoming migration, or stop it"
            ));
        }
        self.vm.set_run_state(RunState::InMigrate);
        self.incoming = true;
        self.failure = None;
        self.stats = RamStats::default();
        self.reserialised = None;
        // Hotplug connectors: reset here (after pre-start adds, before anything is loaded).
        if let Some(hook) = self.hook.as_mut() {
            hook(self.vm)?;
        }
        Ok(())
    }

    fn write_ram(&mut self, gpa: u64, pages: u32, data: Option<&[u8]>) -> Result<(), String> {
        if !self.incoming {
            return Err("RAM record outside an incoming migration".to_owned());
        }
        let len = u64::from(pages) * PAGE_SIZE;
        if let Some(mem) = block_for(self.vm, gpa, len) {
            let addr = vm_memory::GuestAddress(gpa);
            let res = match data {
                Some(d) if d.len() as u64 == len => mem.write_slice(d, addr),
                Some(d) => {
                    return Err(format!(
                        "RAM record at {gpa:#x} carries {} bytes for {pages} pages",
                        d.len()
                    ));
                }
                None => mem.write_slice(&vec![0u8; len as usize], addr),
            };
            return res.map_err(|e| format!("Cannot write memory block at {gpa:#x}: {e}"));
        }
        let ram = self.vm.ram();
        let outside = |e| outside_ram(self.vm, e);
        match data {
            Some(d) => {
                if d.len() as u64 != u64::from(pages) * PAGE_SIZE {
                    return Err(format!(
                        "RAM record at {gpa:#x} carries {} bytes for {pages} pages",
                        d.len()
                    ));
                }
                ram.write_range(gpa, d).map_err(outside)?;
                self.stats.data_pages += u64::from(pages);
            }
            None => {
                let cleared = ram.zero_range(gpa, u64::from(pages)).map_err(outside)?;
                self.stats.zero_pages += u64::from(pages);
                self.stats.zero_pages_cleared += cleared;
            }
        }
        Ok(())
    }

    fn write_ram_sparse(&mut self, gpa: u64, pages: u32, body: &[u8]) -> Result<(), String> {
        if !self.incoming {
            return Err("RAM record outside an incoming migration".to_owned());
        }
        if block_for(self.vm, gpa, u64::from(pages) * PAGE_SIZE).is_some() {
            // Hot-plugged blocks take the plain path.
            let data = devstate::sparse::expand(body, pages)?;
            return self.write_ram(gpa, pages, Some(&data));
        }
        self.vm
            .ram()
            .write_sparse(gpa, pages, body)
            .map_err(|e| outside_ram(self.vm, e))?;
        self.stats.data_pages += u64::from(pages);
        Ok(())
    }

    fn shared_ram(&self) -> Option<std::sync::Arc<dyn migration::SharedRam>> {
        Some(std::sync::Arc::new(crate::vm::ram_view::RamView::new(
            self.vm,
        )))
    }

    fn load_devices(&mut self, sections: &[RawSection]) -> Result<(), String> {
        if !self.incoming {
            return Err("device state outside an incoming migration".to_owned());
        }
        // Hotplug sections go to the hotplug manager and the PCI functions; the rest is VM
        // and vCPU state.
        let now = self.vm.hotplug_clock_ms();
        let mut rest = Vec::with_capacity(sections.len());
        for raw in sections {
            if raw.name == <HotVcpuState as devstate::Section>::NAME {
                let h: HotVcpuState = raw.load().map_err(|e| migration::chain(&e))?;
                self.vm
                    .restore_hot_vcpu(h.core, h.run, &h.cpu)
                    .map_err(words)?;
            } else if self.vm.load_hotplug_device_section(raw).map_err(words)? {
                // A PCI function's registers.
            } else if !lock_mgr(self.vm)
                .load_section(raw, now)
                .map_err(|e| migration::chain(&e))?
            {
                rest.push(raw.clone());
            }
        }
        self.vm.load_sections(&rest).map_err(words)?;
        if self.capture {
            let m = self.vm.machine();
            self.reserialised = Some(all_sections(self.vm, m).map_err(words)?);
        }
        Ok(())
    }

    fn commit(&mut self, run: bool) -> Result<(), String> {
        self.incoming = false;
        if run {
            self.vm.resume().map_err(words)?;
        } else {
            self.vm.set_run_state(RunState::Paused);
        }
        tracing::info!(run, "incoming migration committed");
        Ok(())
    }

    fn postcopy_ram(&mut self) -> Option<std::sync::Arc<dyn migration::postcopy::PostcopyRam>> {
        match self.vm.postcopy_ram() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %words(e), "no post-copy");
                None
            }
        }
    }

    fn postcopy_paused(&mut self, why: &str, state: migration::postcopy::Paused) -> bool {
        tracing::error!(
            reason = why,
            missing = state.missing(),
            "post-copy link lost; pausing the guest"
        );
        self.vm.keep_postcopy_paused(state);
        let waiting = self.vm.pause_postcopy();
        if !waiting.is_empty() {
            tracing::warn!(
                ?waiting,
                "these vCPUs wait for a missing page and park when it arrives"
            );
        }
        self.vm.set_run_state(RunState::Paused);
        true
    }

    fn abort_incoming(&mut self, why: &str) {
        let started = std::mem::replace(&mut self.incoming, false);
        self.failure = Some(why.to_owned());
        // The vCPUs never ran: once the stream had started, the VM stays stopped in
        // `inmigrate` (whatever was loaded is discarded by the next incoming migration).
        if started && self.vm.run_state() != RunState::Shutdown {
            self.vm.set_run_state(RunState::InMigrate);
        }
        tracing::error!(
            reason = why,
            "incoming migration aborted; the VM stays stopped"
        );
    }
}

/// Every section of a stream (RAM skipped), with its header's machine type. The stream is
/// checked for framing and CRCs only (any section name is accepted).
pub fn read_stream_sections(r: impl Read) -> Result<(String, Vec<RawSection>), DecodeError> {
    let mut reader = StreamReader::new(r, None)?;
    let machine = reader.header().machine.clone();
    let mut out = Vec::new();
    loop {
        match reader.next_item()? {
            Item::Section(s) => out.push(s),
            Item::End => break,
            Item::Config(_) | Item::Ram(_) => {}
        }
    }
    Ok((machine, out))
}

/// Parses section records (from [`Vm::save_sections`]) back into [`RawSection`]s, checked
/// against the device registry.
pub fn parse_sections(
    m: &'static MachineType,
    records: &[Vec<u8>],
) -> Result<Vec<RawSection>, DecodeError> {
    let mut w = devstate::StreamWriter::new(Vec::new(), m, "vmm").expect("writes to a Vec");
    w.config(&mut ConfigRecord::default())
        .expect("writes to a Vec");
    for r in records {
        w.raw(r).expect("writes to a Vec");
    }
    let bytes = w.finish().expect("writes to a Vec");
    let mut c = catalog();
    c.register::<ConfigRecord>();
    let mut reader = StreamReader::new(bytes.as_slice(), Some(&c))?;
    let mut out = Vec::new();
    loop {
        match reader.next_item()? {
            Item::Section(s) => out.push(s),
            Item::End => break,
            Item::Config(_) | Item::Ram(_) => {}
        }
    }
    Ok(out)
}

/// Differences between two sets of sections, field by field ([`devstate::diff`]).
pub use devstate::diff::Diff as SectionDiff;

/// Host-defined XSAVE fields, normalised away before a diff (`ferry-state`'s).
pub use ferry_state::{host_fields, normalise_host_fields};

/// Compares two sets of sections by `(name, instance)`, decoding every body and subsection by
/// `schema` alone; volatile fields (at any depth) and host-defined XSAVE fields are reported
/// apart.
pub fn diff_sections(
    schema: &MachineSchema,
    a: &[RawSection],
    b: &[RawSection],
) -> Result<SectionDiff, DecodeError> {
    let decode = |s: &[RawSection]| {
        s.iter()
            .map(|r| devstate::diff::Decoded::from_raw(schema, r))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(devstate::diff::sections(
        &decode(a)?,
        &decode(b)?,
        &host_fields,
    ))
}

/// A RAM error in words; a range outside boot RAM and every block names the blocks too, so the
/// operator sees the whole layout the range was checked against.
fn outside_ram(vm: &Vm, e: crate::vm::memory::MemoryError) -> String {
    let blocks = vm.hotplug_blocks();
    let mut w = words(e.into());
    if !blocks.is_empty() {
        let list: Vec<String> = blocks
            .iter()
            .map(|&(_, _, gpa, size)| format!("{gpa:#x}+{} MiB", size >> 20))
            .collect();
        w.push_str(&format!(
            " (hot-plugged memory blocks: {})",
            list.join(", ")
        ));
    }
    w
}
