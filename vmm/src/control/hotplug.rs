//! Hotplug commands (`device_add`, `device_del`, connector queries, guest hotplug mode) and
//! the service thread that applies hotplug effects and turns them into QMP events.

use super::{Controller, lock};
use crate::RunState;
use crate::guest::GuestHotplugMode;
use crate::hotplug::{DeviceProps, Event as HpEvent, HotplugError, RunPhase};
use crate::qmp::{Args, QmpError};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{error, info};

impl Controller {
    pub(super) fn wake_hotplug(&self) {
        let (m, cv) = &*self.waker;
        *lock(m) = true;
        cv.notify_all();
    }

    /// Start the thread that applies hotplug effects, runs unplug timers and turns hotplug
    /// events into QMP events.
    pub fn start_hotplug_service(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hotplug".into())
            .spawn(move || me.hotplug_service());
        if let Err(e) = spawned {
            error!(error = %e, "cannot start the hotplug service thread");
        }
    }

    pub(super) fn hotplug_service(&self) {
        loop {
            if *lock(&self.quit.0) {
                return;
            }
            // Sleep until the guest or management queued work, or the next unplug deadline
            // (guest-running time advances at most as fast as wall time).
            let wait = if self.run_state() == RunState::PostMigrate {
                Duration::from_secs(1)
            } else if self.migrating.load(Ordering::SeqCst) {
                Duration::from_millis(20)
            } else {
                match lock(&self.hp).next_deadline() {
                    Some(d) => {
                        Duration::from_millis(d.saturating_sub(self.clock.now_ms()).clamp(1, 1000))
                    }
                    None => Duration::from_secs(1),
                }
            };
            {
                let (m, cv) = &*self.waker;
                let mut pending = lock(m);
                if !*pending {
                    pending = cv
                        .wait_timeout(pending, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                *pending = false;
            }
            // A migration holds the VM: effects and events wait until it ends.
            let Ok(mut vm) = self.vm.try_lock() else {
                let (m, _) = &*self.waker;
                *lock(m) = true;
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            // During a migration, and for good once the guest was handed over, this side
            // does nothing: the destination owns the guest's timers and events.
            if self.migrating.load(Ordering::SeqCst) || self.run_state() == RunState::PostMigrate {
                continue;
            }
            let now = vm.hotplug_clock_ms();
            let events = vm.process_hotplug(now);
            drop(vm);
            self.emit_hotplug_events(events);
        }
    }

    pub(super) fn emit_hotplug_events(&self, events: Vec<HpEvent>) {
        {
            for e in events {
                match e {
                    HpEvent::DeviceDeleted { device, path } => {
                        info!(device, "device deleted");
                        self.events.emit(
                            "DEVICE_DELETED",
                            Some(json!({"device": device, "path": path})),
                        );
                    }
                    HpEvent::UnplugGuestError { device, path } => {
                        error!(
                            device,
                            "hot-unplug failed: the guest refused or did not answer"
                        );
                        self.events.emit(
                            "DEVICE_UNPLUG_GUEST_ERROR",
                            Some(json!({"device": device, "path": path})),
                        );
                    }
                }
            }
        }
    }

    pub(super) fn hp_error(e: HotplugError) -> QmpError {
        match e {
            HotplugError::DeviceNotFound(id) => QmpError::device_not_found(&id),
            other => QmpError::generic(other.to_string()),
        }
    }

    pub(super) fn device_add(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let driver = a.required_str("driver")?;
        let id = a.optional_str("id")?;
        let core_id = a.optional_u64("core-id")?;
        let slot = a.optional_u64("slot")?;
        let addr = a.optional_str("addr")?;
        let multifunction = a.optional_qdev_bool("multifunction")?;
        let _bus = a.optional_str("bus")?;
        if let Some(extra) = a.into_rest().keys().next() {
            return Err(QmpError::generic(format!(
                "Property '{driver}.{extra}' not found"
            )));
        }
        let Some(id) = id else {
            return Err(QmpError::missing_parameter("id"));
        };
        let props = DeviceProps {
            core_id: core_id.map(|v| v as u32),
            slot: slot.map(|v| v as u32),
            addr,
            multifunction,
        };
        self.refuse_if_migrating("device_add")?;
        let phase = match self.run_state() {
            RunState::Prelaunch => RunPhase::Prelaunch,
            RunState::InMigrate => RunPhase::InMigrate,
            _ => RunPhase::Started,
        };
        let mut vm = self.lock_vm_unless_migrating("device_add")?;
        vm.hotplug_add(&driver, &id, &props, phase).map_err(|e| {
            if !e.is_transient() {
                error!(id, error = %e, "device_add failed");
            }
            Self::hp_error(e)
        })?;
        drop(vm);
        self.wake_hotplug();
        Ok(json!({}))
    }

    pub(super) fn device_del(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let id = a.required_str("id")?;
        a.finish()?;
        let id = id
            .strip_prefix("/machine/peripheral/")
            .unwrap_or(&id)
            .to_owned();
        self.refuse_if_migrating("device_del")?;
        let mut vm = self.lock_vm_unless_migrating("device_del")?;
        let now = vm.hotplug_clock_ms();
        vm.hotplug_del(&id, now).map_err(Self::hp_error)?;
        drop(vm);
        self.wake_hotplug();
        Ok(json!({}))
    }

    pub(super) fn query_connectors(&self) -> Value {
        let now = self.clock.now_ms();
        let m = lock(&self.hp);
        let list: Vec<Value> = m
            .query_connectors(now)
            .into_iter()
            .map(|c| {
                json!({
                    "index": c.index,
                    "kind": c.kind,
                    "id": c.id,
                    "state": c.state,
                    "isolation": c.isolation,
                    "allocation": c.allocation,
                    "indicator": c.indicator,
                    "device": c.device,
                    "unplug-pending": c.unplug_pending,
                    "remaining-ms": c.remaining_ms,
                    "release-pending": c.release_pending,
                    "unplug-timed-out": c.unplug_timed_out,
                    "busy": c.busy,
                })
            })
            .collect();
        Value::Array(list)
    }

    pub(super) fn guest_hotplug(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let mode = a.optional_enum("mode", &["cooperative", "refuse", "ignore", "slow"])?;
        let answer = a.optional_bool("answer")?;
        a.finish()?;
        self.refuse_if_migrating("__org.ferry_guest-hotplug")?;
        let vm = lock(&self.vm);
        if let Some(m) = mode {
            let mode = match m.as_str() {
                "refuse" => GuestHotplugMode::Refuse,
                "ignore" => GuestHotplugMode::Ignore,
                "slow" => GuestHotplugMode::Slow,
                _ => GuestHotplugMode::Cooperative,
            };
            vm.set_guest_hotplug_mode(mode)
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
        if answer == Some(true) {
            vm.guest_answer_unplugs()
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
        Ok(json!({}))
    }
}
