//! The machine controller: the one place where QMP commands, the VM, migrations and (later)
//! hotplug meet. It implements [`QmpBackend`]; `main.rs` only wires sockets and signals.
//!
//! Locking: the VM sits behind one mutex. A migration thread holds it for the whole
//! migration, so every command first consults state that lives outside it (the run-state
//! mirror, the migration progress) and never blocks on the VM while a migration runs.
//!
//! Layout: this file holds the controller and its run-state lifecycle; `commands` the one
//! table of QMP commands and `schema` its QAPI types (`query-qmp-schema`); `probe` the
//! queries that need no VM (and the backend of a `-machine none` process); `migration`,
//! `hotplug` and `query` the handlers by concern.

mod commands;
mod compat;
mod hotplug;
mod migration;
mod objects;
mod probe;
mod query;
mod schema;

pub use compat::{Chardev, DomainInfo};
pub use objects::{parse_object_arg, split_opts};
pub use probe::{Probe, ProbeBackend, ProbeError};

use crate::hotplug::HotplugManager;
use crate::qmp::{EventBus, QmpBackend, QmpError, ShutdownHandle};
use crate::vm::hotplug::HotplugWaker;
use crate::{RunState, Vm};
use ::migration::{Params, Progress, Status};
use machine_types::MachineType;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How the process was started with respect to incoming migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncomingMode {
    /// A normal VM.
    None,
    /// `--incoming defer`: wait for `migrate-incoming`.
    Defer,
    /// `--incoming URI` (or `migrate-incoming` already issued).
    Started(String),
}

/// State shared between QMP sessions and migration threads.
pub struct Controller {
    vm: Mutex<Vm>,
    machine: &'static MachineType,
    state: Mutex<RunState>,
    events: EventBus,
    events_cap: Arc<AtomicBool>,
    params: Arc<Mutex<Params>>,
    progress: Mutex<Option<Arc<Progress>>>,
    /// A migration stream is in flight (source: from `migrate`; destination: from stream
    /// start). Hotplug is refused while set.
    migrating: Arc<AtomicBool>,
    incoming: Mutex<IncomingMode>,
    server: Mutex<Option<ShutdownHandle>>,
    quit: (Mutex<bool>, Condvar),
    boot_vcpus: u32,
    /// Run the guest when an incoming migration completes (false with `-S`).
    autostart: AtomicBool,
    /// Debug property `x-skip-incoming-reset`: skip the connector reset before load (to show
    /// that it matters).
    skip_incoming_reset: AtomicBool,
    /// Guest memory, readable without the VM lock (mailbox queries during migration).
    mem: crate::vm::memory::GuestMem,
    /// The hotplug manager and its waker, usable without the VM lock.
    hp: Arc<Mutex<HotplugManager>>,
    waker: HotplugWaker,
    clock: crate::vm::hotplug::GuestClock,
    /// Where the incoming listener actually bound (port 0 resolved).
    listen_addr: Mutex<Option<std::net::SocketAddr>>,
    /// The queries that need no VM (machine types, CPU models, QOM types).
    probe: Probe,
    /// `object-add`'s objects (TLS credentials, authorization lists).
    objects: Mutex<objects::Objects>,
    /// The migration parameters `tls-creds`, `tls-hostname`, `tls-authz` as set.
    tls: Mutex<objects::TlsNames>,
    me: std::sync::Weak<Controller>,
    /// Destination: guest RAM being populated until the incoming migration completes.
    prefault: Mutex<Option<crate::vm::prefault::Prefault>>,
    /// A domain's name, UUID and chardevs (`ferry qemu-compat`).
    domain: Mutex<DomainInfo>,
    /// Descriptors passed by `getfd` (or on the command line), by name, for `fd:NAME`.
    passed_fds: Mutex<std::collections::BTreeMap<String, std::os::fd::OwnedFd>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("machine", &self.machine.name())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Controller {
    /// Take charge of `vm` (created, guest loaded, not started).
    pub fn new(
        vm: Vm,
        events: EventBus,
        incoming: IncomingMode,
        dump_stream: Option<PathBuf>,
    ) -> Arc<Controller> {
        let machine = vm.config().machine;
        let boot_vcpus = u32::from(vm.config().vcpus);
        let state = if incoming == IncomingMode::None {
            RunState::Prelaunch
        } else {
            RunState::InMigrate
        };
        vm.set_run_state(state);
        let mem = vm.ram().mem().clone();
        let hp = vm.hotplug().clone();
        let waker = vm.hotplug_waker();
        let clock = vm.guest_clock();
        // A destination populates its RAM while it waits, so first touch leaves the
        // migration's critical path.
        let prefault = (incoming != IncomingMode::None && ::migration::Lever::Prefault.on())
            .then(|| crate::vm::prefault::Prefault::start(crate::vm::ram_view::RamView::new(&vm)))
            .and_then(|r| {
                r.inspect_err(|e| tracing::warn!(error = %e, "cannot start populating guest RAM"))
                    .ok()
            });
        let events_cap = Arc::new(AtomicBool::new(false));
        let params = Arc::new(Mutex::new(Params {
            dump_stream,
            ..Params::default()
        }));
        let probe = Probe::for_vm(&vm, events_cap.clone(), params.clone());
        Arc::new_cyclic(|me| Controller {
            probe,
            hp,
            waker,
            clock,
            boot_vcpus,
            autostart: AtomicBool::new(true),
            skip_incoming_reset: AtomicBool::new(false),
            mem,
            prefault: Mutex::new(prefault),
            domain: Mutex::default(),
            passed_fds: Mutex::default(),
            listen_addr: Mutex::new(None),
            me: me.clone(),
            vm: Mutex::new(vm),
            machine,
            state: Mutex::new(state),
            events,
            events_cap,
            params,
            progress: Mutex::new(None),
            objects: Mutex::default(),
            tls: Mutex::default(),
            migrating: Arc::new(AtomicBool::new(false)),
            incoming: Mutex::new(incoming),
            server: Mutex::new(None),
            quit: (Mutex::new(false), Condvar::new()),
        })
    }

    pub(super) fn arc(&self) -> Arc<Controller> {
        self.me
            .upgrade()
            .expect("the controller outlives its QMP server")
    }

    /// Debug: skip the connector reset before an incoming load (`x-skip-incoming-reset`).
    pub fn set_skip_incoming_reset(&self, on: bool) {
        self.skip_incoming_reset.store(on, Ordering::SeqCst);
    }

    /// Keep an incoming guest paused after the load (`-S`) instead of running it.
    pub fn set_autostart(&self, on: bool) {
        self.autostart.store(on, Ordering::SeqCst);
    }

    /// Let `quit` stop the QMP server too.
    pub fn set_server(&self, h: ShutdownHandle) {
        *lock(&self.server) = Some(h);
    }

    /// The current run state.
    pub fn run_state(&self) -> RunState {
        *lock(&self.state)
    }

    pub(super) fn set_state(&self, s: RunState) {
        *lock(&self.state) = s;
    }

    /// Block until `quit` (or [`Controller::request_quit`]).
    pub fn wait_quit(&self) {
        let mut q = lock(&self.quit.0);
        while !*q {
            q = self.quit.1.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ask the process to exit (signal handler, guest failure).
    pub fn request_quit(&self) {
        *lock(&self.quit.0) = true;
        self.quit.1.notify_all();
        if let Some(h) = lock(&self.server).as_ref() {
            h.shutdown();
        }
    }

    /// Start the guest (the first `cont` of a prelaunch VM, or `ferry run` without `-S`).
    pub fn start(&self) -> Result<(), String> {
        self.cont_inner().map(|_| ()).map_err(|e| e.desc)
    }

    /// The VM, unless a migration holds it: a short wait while the hotplug service thread
    /// has it, a refusal as soon as a migration starts.
    pub(super) fn lock_vm_unless_migrating(
        &self,
        what: &str,
    ) -> Result<MutexGuard<'_, Vm>, QmpError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            self.refuse_if_migrating(what)?;
            match self.vm.try_lock() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(QmpError::generic(format!(
                        "{what} failed: the VM is busy; retry later"
                    )));
                }
            }
        }
    }

    pub(super) fn refuse_if_migrating(&self, what: &str) -> Result<(), QmpError> {
        if self.migrating.load(Ordering::SeqCst) {
            return Err(QmpError::generic(format!(
                "{what} not allowed while migrating"
            )));
        }
        Ok(())
    }

    pub(super) fn stop(&self) -> Result<Value, QmpError> {
        self.refuse_if_migrating("stop")?;
        if self.run_state() != RunState::Running {
            return Ok(json!({}));
        }
        let vm = lock(&self.vm);
        vm.pause()
            .map_err(|e| QmpError::generic(format!("Cannot stop the vCPUs: {e}")))?;
        vm.set_run_state(RunState::Paused);
        self.set_state(RunState::Paused);
        self.events.emit("STOP", None);
        Ok(json!({}))
    }

    pub(super) fn cont_inner(&self) -> Result<Value, QmpError> {
        self.refuse_if_migrating("cont")?;
        match self.run_state() {
            RunState::Running => return Ok(json!({})),
            RunState::InMigrate => {
                return Err(QmpError::generic(
                    "Guest is waiting for an incoming migration",
                ));
            }
            RunState::PostMigrate if !self.handover_unknown() => {
                return Err(QmpError::generic(
                    "The guest has migrated to the destination; running it here too would run it twice",
                ));
            }
            RunState::PostMigrate => {
                // COMMIT was sent but never acknowledged. Only the operator can know that the
                // destination did not start the guest; `cont` is that decision.
                tracing::warn!("resuming a source whose destination state is unknown, on request");
            }
            RunState::Shutdown => return Err(QmpError::generic("The guest has shut down")),
            RunState::Prelaunch | RunState::Paused | RunState::FinishMigrate => {}
        }
        let mut vm = lock(&self.vm);
        if self.run_state() == RunState::Prelaunch {
            // The first start: devices added before it become coldplugged (connector reset).
            let events = vm.hotplug_reset().map_err(|e| {
                QmpError::generic(format!("Cannot reset the hotplug connectors: {e}"))
            })?;
            self.emit_hotplug_events(events);
        }
        vm.resume()
            .map_err(|e| QmpError::generic(format!("Cannot start the vCPUs: {e}")))?;
        vm.set_run_state(RunState::Running);
        self.set_state(RunState::Running);
        self.events.emit("RESUME", None);
        Ok(json!({}))
    }

    /// The last outgoing migration ended after COMMIT without the destination's ack.
    pub(super) fn handover_unknown(&self) -> bool {
        lock(&self.progress).as_ref().is_some_and(|p| {
            let s = p.snapshot();
            s.status == Status::Failed
                && s.error
                    .is_some_and(|e| e.starts_with("Destination state unknown"))
        })
    }

    pub(super) fn quit(&self) -> Result<Value, QmpError> {
        self.events.emit(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        );
        if let Some(p) = lock(&self.progress).as_ref() {
            p.cancel();
        }
        *lock(&self.quit.0) = true;
        self.quit.1.notify_all();
        if let Some(h) = lock(&self.server).as_ref() {
            h.shutdown();
        }
        Ok(json!({}))
    }
}

impl QmpBackend for Controller {
    fn commands(&self) -> Vec<&'static str> {
        commands::COMMANDS.iter().map(|c| c.name).collect()
    }

    fn execute(&self, command: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        self.execute_with_fds(command, arguments, Vec::new())
    }

    fn execute_with_fds(
        &self,
        command: &str,
        arguments: Map<String, Value>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Value, QmpError> {
        let Some(c) = commands::find(command) else {
            return Err(QmpError::unknown_command(command));
        };
        c.check_args(&arguments)?;
        match c.run {
            commands::Run::Vm(f) => f(&self.arc(), arguments),
            commands::Run::Host(f) => f(&self.probe, arguments),
            commands::Run::Fds(f) => f(&self.arc(), arguments, fds),
        }
    }
}
