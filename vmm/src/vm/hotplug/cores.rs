//! Hot-added vCPUs: created at `device_add`, started when the guest configures the core,
//! parked (never destroyed: KVM cannot) when it is removed; saved and restored as `hot-vcpu`.

use std::time::Instant;

use super::{HotCore, HotCoreState, device_err};
use crate::guest::layout;
use crate::runstate::RunState;
use crate::vcpu::persist::VcpuState;
use crate::vcpu::{PAUSE_TIMEOUT, RunContext, Vcpu};
use crate::vm::{Vm, VmError};

impl Vm {
    /// Hot-added vCPUs: `(core id, vCPU index, state)`.
    pub fn hot_cores(&self) -> Vec<(u32, u8, HotCoreState)> {
        self.hp
            .cores
            .iter()
            .map(|(&c, h)| (c, h.vcpu.index(), h.state))
            .collect()
    }

    /// Captures every hot-added vCPU (all vCPUs must be parked): `(core id, run state,
    /// vCPU state)`. The `cpu` sections of hot vCPUs are not yet part of
    /// [`Vm::save_state`].
    pub fn save_hot_vcpus(&self) -> Result<Vec<(u32, HotCoreState, VcpuState)>, VmError> {
        if !self.all_parked() {
            return Err(VmError::NotPaused);
        }
        let mut out = Vec::with_capacity(self.hp.cores.len());
        for (&core, c) in &self.hp.cores {
            let mut s = c.vcpu.save_state(&self.msrs)?;
            s.cpu_model = self.cpu_model().name().to_owned();
            out.push((core, c.state, s));
        }
        Ok(out)
    }

    /// Loads a captured hot-added vCPU (creating it if needed; the VM must not run it yet)
    /// with its run state (a `Running` core runs from the next [`Vm::resume`]).
    pub fn restore_hot_vcpu(
        &mut self,
        core: u32,
        run: HotCoreState,
        state: &VcpuState,
    ) -> Result<(), VmError> {
        self.ensure_core(core)?;
        let c = self.hp.cores.get_mut(&core).expect("ensured");
        c.vcpu.restore_state(state)?;
        c.state = run;
        Ok(())
    }

    pub(super) fn ensure_core(&mut self, core: u32) -> Result<(), VmError> {
        if self.hp.cores.contains_key(&core) {
            return Ok(());
        }
        let index = u8::try_from(u32::from(self.hp.core_vcpu_base) + core)
            .ok()
            .filter(|&i| i < layout::MAX_VCPUS)
            .ok_or_else(|| device_err(format!("core {core} has no vCPU index")))?;
        let c = self.vcpu_cpuid(index);
        let mut vcpu = Vcpu::new(&self.fd, index, &c)?;
        vcpu.spawn(RunContext {
            io_bus: self.io_bus.clone(),
            mmio_bus: self.mmio_bus.clone(),
            run_state: self.run_state.clone(),
        })?;
        tracing::info!(core, vcpu = index, "hot-added vCPU created (parked)");
        self.hp.cores.insert(
            core,
            HotCore {
                vcpu,
                state: HotCoreState::Created,
            },
        );
        Ok(())
    }

    /// Puts the core's vCPU at the core entry in long mode, RUNNABLE (a hot-added vCPU with
    /// the in-kernel irqchip starts UNINITIALIZED), and lets it run if the VM runs.
    pub(super) fn start_core(&mut self, core: u32) -> Result<(), VmError> {
        self.ensure_core(core)?;
        let running = self.run_state() == RunState::Running;
        let entry = self.hp.core_entry;
        let c = self.hp.cores.get_mut(&core).expect("ensured");
        if c.state == HotCoreState::Running {
            return Ok(());
        }
        if !c.vcpu.is_parked() {
            c.vcpu.request_pause()?;
            c.vcpu.wait_parked(Instant::now() + PAUSE_TIMEOUT)?;
        }
        c.vcpu.configure_boot(entry)?;
        c.state = HotCoreState::Running;
        if running {
            c.vcpu.resume()?;
        }
        tracing::info!(
            core,
            vcpu = c.vcpu.index(),
            running,
            "hot-added vCPU started"
        );
        Ok(())
    }

    pub(super) fn park_core(&mut self, core: u32) -> Result<(), VmError> {
        let Some(c) = self.hp.cores.get_mut(&core) else {
            return Ok(());
        };
        if c.state == HotCoreState::Running {
            c.vcpu.request_pause()?;
            c.vcpu.wait_parked(Instant::now() + PAUSE_TIMEOUT)?;
            c.state = HotCoreState::Parked;
            tracing::info!(core, vcpu = c.vcpu.index(), "hot-added vCPU parked");
        }
        Ok(())
    }
}
