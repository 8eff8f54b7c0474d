//! The machine controller: the one place where QMP commands, the VM, migrations and (later)
//! hotplug meet. It implements [`QmpBackend`]; `main.rs` only wires sockets and signals.
//!
//! Locking: the VM sits behind one mutex. A migration thread holds it for the whole
//! migration, so every command first consults state that lives outside it (the run-state
//! mirror, the migration progress) and never blocks on the VM while a migration runs.

use crate::guest::GuestHotplugMode;
use crate::hotplug::{DeviceProps, Event as HpEvent, HotplugError, HotplugManager, RunPhase};
use crate::migrate::VmMigration;
use crate::qmp::{Args, EventBus, QmpBackend, QmpError, ShutdownHandle};
use crate::vm::hotplug::HotplugWaker;
use crate::{RunState, Vm};
use machine_types::MachineType;
use migration::{
    ConfigRecord, DestinationVm, DirtyRegion, Incoming, Notice, Params, Progress, SourceVm, Status,
    SwitchoverPolicy, Uri,
};
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{error, info};

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
    params: Mutex<Params>,
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
    /// What each CPU model lacks on this host (`query-cpu-definitions`).
    cpu_unavailable: Vec<(machine_types::CpuModel, Vec<String>)>,
    me: std::sync::Weak<Controller>,
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

const COMMANDS: &[&str] = &[
    "query-status",
    "stop",
    "cont",
    "quit",
    "query-machines",
    "query-cpu-definitions",
    "query-hotpluggable-cpus",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "query-migrate",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "__org.ferry_query-guest",
    "__org.ferry_verify-guest",
    "device_add",
    "device_del",
    "__org.ferry_query-connectors",
    "__org.ferry_guest-hotplug",
];

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
        let cpu_unavailable = machine_types::cpu::ALL_MODELS
            .iter()
            .map(|&m| (m, vm.host_lacks(m)))
            .collect();
        Arc::new_cyclic(|me| Controller {
            cpu_unavailable,
            hp,
            waker,
            clock,
            boot_vcpus,
            autostart: AtomicBool::new(true),
            skip_incoming_reset: AtomicBool::new(false),
            mem,
            listen_addr: Mutex::new(None),
            me: me.clone(),
            vm: Mutex::new(vm),
            machine,
            state: Mutex::new(state),
            events,
            events_cap: Arc::new(AtomicBool::new(false)),
            params: Mutex::new(Params {
                dump_stream,
                ..Params::default()
            }),
            progress: Mutex::new(None),
            migrating: Arc::new(AtomicBool::new(false)),
            incoming: Mutex::new(incoming),
            server: Mutex::new(None),
            quit: (Mutex::new(false), Condvar::new()),
        })
    }

    fn arc(&self) -> Arc<Controller> {
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

    fn set_state(&self, s: RunState) {
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
    fn lock_vm_unless_migrating(&self, what: &str) -> Result<MutexGuard<'_, Vm>, QmpError> {
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

    fn refuse_if_migrating(&self, what: &str) -> Result<(), QmpError> {
        if self.migrating.load(Ordering::SeqCst) {
            return Err(QmpError::generic(format!(
                "{what} not allowed while migrating"
            )));
        }
        Ok(())
    }

    fn stop(&self) -> Result<Value, QmpError> {
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

    fn cont_inner(&self) -> Result<Value, QmpError> {
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
    fn handover_unknown(&self) -> bool {
        lock(&self.progress).as_ref().is_some_and(|p| {
            let s = p.snapshot();
            s.status == Status::Failed
                && s.error
                    .is_some_and(|e| e.starts_with("Destination state unknown"))
        })
    }

    fn quit(&self) -> Result<Value, QmpError> {
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

    fn query_machines(&self) -> Value {
        let list: Vec<Value> = machine_types::all()
            .iter()
            .map(|m| {
                let mut v = json!({
                    "name": m.name(),
                    "cpu-max": 255,
                    "hotpluggable-cpus": true,
                    "deprecated": false,
                    "is-default": m.is_newest(),
                });
                if m.is_newest() {
                    v["alias"] = json!(machine_types::ALIAS_NEWEST);
                }
                v
            })
            .collect();
        Value::Array(list)
    }

    /// Every CPU model as QEMU lists them: named models are migration-safe (a fixed table),
    /// the legacy host-masked ones are not; `unavailable-features` is what this host lacks.
    fn query_cpu_definitions(&self) -> Value {
        let list: Vec<Value> = self
            .cpu_unavailable
            .iter()
            .map(|(m, lacks)| {
                json!({
                    "name": m.name(),
                    "typename": format!("{}-x86_64-cpu", m.name()),
                    "unavailable-features": lacks,
                    "static": false,
                    "migration-safe": m.is_fixed(),
                    "deprecated": false,
                })
            })
            .collect();
        Value::Array(list)
    }

    /// Boot vCPUs (always present) and every CPU-core connector (plugged or free), as
    /// QEMU lists its possible CPUs.
    fn query_hotpluggable_cpus(&self) -> Value {
        let cpu = |core: u32, path: Option<String>| {
            let mut v =
                json!({"type": "ferry-cpu-core", "vcpus-count": 1, "props": {"core-id": core}});
            if let Some(p) = path {
                v["qom-path"] = json!(p);
            }
            v
        };
        let mut list: Vec<Value> = (0..self.boot_vcpus)
            .map(|i| cpu(i, Some(format!("/machine/unattached/cpu[{i}]"))))
            .collect();
        let m = lock(&self.hp);
        for c in m
            .query_connectors(0)
            .into_iter()
            .filter(|c| c.kind == "cpu-core")
        {
            list.push(cpu(
                c.id,
                c.device.map(|d| crate::hotplug::manager::device_path(&d)),
            ));
        }
        Value::Array(list)
    }

    fn progress_listener(&self) -> migration::Listener {
        let bus = self.events.clone();
        let cap = self.events_cap.clone();
        let migrating = self.migrating.clone();
        Box::new(move |n| {
            if let Notice::Changing(s) = n
                && s.is_finished()
            {
                // The stream is over: hotplug is allowed again before anyone sees the status.
                migrating.store(false, Ordering::SeqCst);
            }
            if !cap.load(Ordering::SeqCst) {
                return;
            }
            match n {
                Notice::Status(s) => {
                    bus.emit("MIGRATION", Some(json!({"status": s.as_str()})));
                }
                Notice::Pass(p) => {
                    bus.emit("MIGRATION_PASS", Some(json!({"pass": p + 1})));
                }
                Notice::Changing(_) => {}
            }
        })
    }

    fn migrate(self: &Arc<Self>, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let uri = a.optional_str("uri")?;
        let _detach = a.optional_bool("detach")?;
        let blk = a.optional_bool("blk")?;
        let inc = a.optional_bool("inc")?;
        let resume = a.optional_bool("resume")?;
        if a.optional_value("channels").is_some() {
            return Err(QmpError::generic(
                "Ferry takes the migration target as 'uri'; 'channels' is not supported",
            ));
        }
        a.finish()?;
        let Some(uri) = uri else {
            return Err(QmpError::missing_parameter("uri"));
        };
        if blk == Some(true) || inc == Some(true) {
            return Err(QmpError::generic("Block migration is not supported"));
        }
        if resume == Some(true) {
            return Err(QmpError::generic("Postcopy resume is not supported"));
        }
        Uri::parse(&uri).map_err(|e| QmpError::generic(e.to_string()))?;
        if let Some(p) = lock(&self.progress).as_ref()
            && p.status().is_active()
        {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        match self.run_state() {
            RunState::InMigrate => {
                return Err(QmpError::generic(
                    "Guest is waiting for an incoming migration",
                ));
            }
            RunState::PostMigrate => {
                return Err(QmpError::generic("The guest has already migrated away"));
            }
            RunState::Shutdown => return Err(QmpError::generic("The guest has shut down")),
            _ => {}
        }
        // Effects the service thread has not applied yet (a configured core to start, a
        // released device to tear down) must be in place before the configuration is sent.
        lock(&self.vm).apply_pending_hotplug();
        let progress = Arc::new(Progress::new(Some(self.progress_listener())));
        progress.set_status(Status::Setup);
        *lock(&self.progress) = Some(progress.clone());
        self.migrating.store(true, Ordering::SeqCst);
        // A guest that completes an unplug from now on leaves its connector release-pending;
        // whichever side runs the guest afterwards releases it.
        lock(&self.hp).set_migration_in_progress(true);
        let params = lock(&self.params).clone();
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || me.run_outgoing(&uri, &params, &progress))
            .map_err(|e| QmpError::generic(format!("Cannot start the migration thread: {e}")))?;
        Ok(json!({}))
    }

    fn run_outgoing(&self, uri: &str, params: &Params, progress: &Progress) {
        let mut vm = lock(&self.vm);
        let mut side = Side {
            inner: VmMigration::new(&mut vm),
            ctl: self,
        };
        let res = migration::send(&mut side, uri, params, progress);
        drop(vm);
        if let Err(e) = res {
            error!(error = %migration::chain(&e), "outgoing migration failed");
            if self.run_state() != RunState::PostMigrate {
                // The guest runs on here: finish what it completed meanwhile.
                let mut m = lock(&self.hp);
                m.set_migration_in_progress(false);
                m.complete_pending_releases();
            }
        }
        self.migrating.store(false, Ordering::SeqCst);
        self.wake_hotplug();
    }

    /// Begin receiving from `uri` (from `--incoming URI` or `migrate-incoming`).
    pub fn start_incoming(self: &Arc<Self>, uri: &str) -> Result<(), String> {
        let parsed = Uri::parse(uri).map_err(|e| e.to_string())?;
        let listener = match &parsed {
            Uri::Tcp(_) => {
                let l = migration::transport::listen(&parsed).map_err(|e| migration::chain(&e))?;
                *lock(&self.listen_addr) = l.local_addr().ok();
                Some(l)
            }
            Uri::File(p) => {
                std::fs::metadata(p).map_err(|e| format!("Cannot open {}: {e}", p.display()))?;
                None
            }
        };
        *lock(&self.incoming) = IncomingMode::Started(uri.to_owned());
        // A file is read at once: its progress replaces the last attempt's before this
        // command returns, so `query-migrate` never shows a stale result for it.
        let first = matches!(parsed, Uri::File(_)).then(|| {
            let p = Arc::new(Progress::new(Some(self.progress_listener())));
            p.set_status(Status::Setup);
            *lock(&self.progress) = Some(p.clone());
            p
        });
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || me.run_incoming(parsed, listener, first))
            .map_err(|e| format!("Cannot start the incoming migration thread: {e}"))?;
        Ok(())
    }

    fn run_incoming(
        &self,
        uri: Uri,
        listener: Option<std::net::TcpListener>,
        mut first: Option<Arc<Progress>>,
    ) {
        loop {
            let incoming = match (&uri, &listener) {
                (Uri::Tcp(_), Some(l)) => match l.accept() {
                    Ok((s, peer)) => {
                        info!(%peer, "incoming migration connection");
                        // The stream starts: no hotplug until it completed or failed.
                        self.migrating.store(true, Ordering::SeqCst);
                        Incoming::Tcp(s)
                    }
                    Err(e) => {
                        error!(error = %e, "accepting the incoming migration failed");
                        return;
                    }
                },
                (Uri::File(p), _) => match std::fs::File::open(p) {
                    Ok(f) => {
                        self.migrating.store(true, Ordering::SeqCst);
                        Incoming::File(f)
                    }
                    Err(e) => {
                        error!(error = %e, path = %p.display(), "cannot open the incoming stream file");
                        return;
                    }
                },
                _ => return,
            };
            let progress = first
                .take()
                .unwrap_or_else(|| Arc::new(Progress::new(Some(self.progress_listener()))));
            *lock(&self.progress) = Some(progress.clone());
            let params = lock(&self.params).clone();
            let mut vm = lock(&self.vm);
            let mut side = Side {
                inner: VmMigration::new(&mut vm),
                ctl: self,
            };
            let res = migration::receive(&mut side, incoming, &params, &progress);
            drop(vm);
            {
                let mut m = lock(&self.hp);
                m.set_migration_in_progress(false);
                if res.is_ok() {
                    // This side runs the guest now: finish unplugs it completed in flight.
                    m.complete_pending_releases();
                }
            }
            self.migrating.store(false, Ordering::SeqCst);
            self.wake_hotplug();
            match res {
                Ok(()) => return,
                Err(e) => {
                    error!(error = %migration::chain(&e), "incoming migration failed; waiting for another attempt");
                    if listener.is_none() {
                        return;
                    }
                }
            }
        }
    }

    fn migrate_incoming(self: &Arc<Self>, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let uri = a.optional_str("uri")?;
        let _exit = a.optional_bool("exit-on-error")?;
        a.finish()?;
        let Some(uri) = uri else {
            return Err(QmpError::missing_parameter("uri"));
        };
        match &*lock(&self.incoming) {
            IncomingMode::None => {
                return Err(QmpError::generic(
                    "'-incoming' was not specified on the command line",
                ));
            }
            // A finished, failed attempt from a file may be retried (a TCP listener keeps
            // listening by itself).
            IncomingMode::Started(prev)
                if prev.starts_with("file:")
                    && self.run_state() == RunState::InMigrate
                    && lock(&self.progress)
                        .as_ref()
                        .is_some_and(|p| p.status() == Status::Failed) => {}
            IncomingMode::Started(_) => {
                return Err(QmpError::generic(
                    "The incoming migration has already been started",
                ));
            }
            IncomingMode::Defer => {}
        }
        self.start_incoming(&uri).map_err(QmpError::generic)?;
        Ok(json!({}))
    }

    fn migrate_cancel(&self) -> Value {
        if let Some(p) = lock(&self.progress).as_ref()
            && p.status().is_active()
        {
            p.cancel();
        }
        json!({})
    }

    fn query_migrate(&self) -> Value {
        let socket = lock(&self.listen_addr).map(|a| {
            json!([{"type": "inet", "host": a.ip().to_string(), "port": a.port().to_string(), "ipv4": a.is_ipv4()}])
        });
        let Some(p) = lock(&self.progress).clone() else {
            return match socket {
                Some(s) => json!({"socket-address": s}),
                None => json!({}),
            };
        };
        let s = p.snapshot();
        let mut v = json!({
            "status": s.status.as_str(),
            "total-time": s.total_time_ms,
            "setup-time": s.setup_time_ms,
            "expected-downtime": s.expected_downtime_ms,
            "ram": {
                "transferred": s.transferred,
                "remaining": s.remaining,
                "total": s.total,
                "duplicate": s.zero_pages,
                "normal": s.normal_pages,
                "normal-bytes": s.normal_pages * devstate::PAGE_SIZE as u64,
                "dirty-pages-rate": s.dirty_pages_rate,
                "mbps": s.mbps,
                "dirty-sync-count": s.iterations,
                "page-size": devstate::PAGE_SIZE,
            },
        });
        if s.status == Status::Completed {
            v["downtime"] = json!(s.downtime_ms);
        }
        if let Some(e) = s.error {
            v["error-desc"] = json!(e);
        }
        if let Some(sa) = socket {
            v["socket-address"] = sa;
        }
        v
    }

    fn wake_hotplug(&self) {
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

    fn hotplug_service(&self) {
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

    fn emit_hotplug_events(&self, events: Vec<HpEvent>) {
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

    fn hp_error(e: HotplugError) -> QmpError {
        match e {
            HotplugError::DeviceNotFound(id) => QmpError::device_not_found(&id),
            other => QmpError::generic(other.to_string()),
        }
    }

    fn device_add(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
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

    fn device_del(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
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

    fn query_connectors(&self) -> Value {
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

    fn guest_hotplug(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
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

    fn query_guest(&self) -> Result<Value, QmpError> {
        let mb = crate::guest::Mailbox::read(&self.mem)
            .map_err(|e| QmpError::generic(format!("Cannot read the guest mailbox: {e}")))?;
        // A destination that has not received its guest yet, or a boot-sector guest, has no
        // mailbox: say so rather than report zeros.
        if mb.magic != crate::guest::mailbox::MAGIC {
            return Err(QmpError::generic(
                "The guest has no Ferry test-guest mailbox (not loaded yet, or a boot-sector guest)",
            ));
        }
        Ok(
            json!({"pass": mb.current_pass(), "page": mb.current_page(), "working-set-pages": mb.ws_pages}),
        )
    }

    fn verify_guest(&self) -> Result<Value, QmpError> {
        self.refuse_if_migrating("__org.ferry_verify-guest")?;
        if self.run_state() == RunState::Running {
            return Err(QmpError::generic(
                "Stop the guest first: its memory can only be verified while paused",
            ));
        }
        let vm = lock(&self.vm);
        vm.verify_guest_pattern()
            .map_err(|e| QmpError::generic(format!("Memory pattern check failed: {e}")))?;
        let blocks = vm
            .verify_hotplug_blocks()
            .map_err(|e| QmpError::generic(format!("Memory block pattern check failed: {e}")))?;
        let mb = vm.mailbox().map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(json!({"ok": true, "pages": mb.ws_pages, "pass": mb.current_pass(), "blocks": blocks}))
    }

    fn set_capabilities(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let caps = a.required_array("capabilities")?;
        a.finish()?;
        let mut parsed = Vec::new();
        for (i, c) in caps.into_iter().enumerate() {
            let Value::Object(m) = c else {
                return Err(QmpError::invalid_parameter_type(
                    &format!("capabilities[{i}]"),
                    "object",
                ));
            };
            let mut ca = Args::nested(m, format!("capabilities[{i}]"));
            let name = ca.required_str("capability")?;
            let state = ca.required_bool("state")?;
            ca.finish()?;
            if name != "events" {
                return Err(QmpError::generic(format!(
                    "Capability '{name}' is not supported by Ferry"
                )));
            }
            parsed.push(state);
        }
        if let Some(p) = lock(&self.progress).as_ref()
            && p.status().is_active()
        {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        for s in parsed {
            self.events_cap.store(s, Ordering::SeqCst);
        }
        Ok(json!({}))
    }

    fn set_parameters(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let downtime = a.optional_u64("downtime-limit")?;
        let bandwidth = a.optional_u64("max-bandwidth")?;
        let iterations = a.optional_u64("__org.ferry_max-iterations")?;
        let policy = a.optional_enum("__org.ferry_switchover-policy", &["cancel", "force"])?;
        let timeout = a.optional_u64("__org.ferry_io-timeout")?;
        let sparse = a.optional_bool("__org.ferry_sparse-pages")?;
        a.finish()?;
        if downtime.is_some_and(|d| d > 2_000_000) {
            return Err(QmpError::generic(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
            ));
        }
        if iterations.is_some_and(|i| i == 0 || i > 10_000) {
            return Err(QmpError::generic(
                "Parameter '__org.ferry_max-iterations' expects 1 to 10000",
            ));
        }
        if timeout.is_some_and(|t| t == 0) {
            return Err(QmpError::generic(
                "Parameter '__org.ferry_io-timeout' expects a positive number of ms",
            ));
        }
        if let Some(live) = lock(&self.progress).as_ref()
            && live.status().is_active()
        {
            if let Some(b) = bandwidth {
                live.set_max_bandwidth(b);
            }
            if let Some(d) = downtime {
                live.set_downtime_limit(d);
            }
        }
        let mut p = lock(&self.params);
        if let Some(d) = downtime {
            p.downtime_limit_ms = d;
        }
        if let Some(b) = bandwidth {
            p.max_bandwidth = b;
        }
        if let Some(i) = iterations {
            p.max_iterations = i as u32;
        }
        if let Some(pol) = policy {
            p.switchover_policy = if pol == "force" {
                SwitchoverPolicy::Force
            } else {
                SwitchoverPolicy::Cancel
            };
        }
        if let Some(t) = timeout {
            p.io_timeout = Duration::from_millis(t);
        }
        if let Some(s) = sparse {
            p.sparse_pages = s;
        }
        Ok(json!({}))
    }

    fn query_parameters(&self) -> Value {
        let p = lock(&self.params);
        json!({
            "downtime-limit": p.downtime_limit_ms,
            "max-bandwidth": p.max_bandwidth,
            "__org.ferry_max-iterations": p.max_iterations,
            "__org.ferry_switchover-policy": match p.switchover_policy {
                SwitchoverPolicy::Cancel => "cancel",
                SwitchoverPolicy::Force => "force",
            },
            "__org.ferry_io-timeout": p.io_timeout.as_millis() as u64,
            "__org.ferry_sparse-pages": p.sparse_pages,
        })
    }
}

/// Wraps the VM's migration handle so that run-state changes made by the engine reach the
/// controller's mirror and QMP (STOP on the source, RESUME on the destination).
struct Side<'a, H> {
    inner: H,
    ctl: &'a Controller,
}

impl<H: SourceVm> SourceVm for Side<'_, H> {
    fn machine(&self) -> &'static MachineType {
        self.inner.machine()
    }
    fn config(&self) -> ConfigRecord {
        self.inner.config()
    }
    fn is_running(&self) -> bool {
        self.ctl.run_state() == RunState::Running
    }
    fn pause(&mut self) -> Result<(), String> {
        self.inner.pause()?;
        self.ctl.set_state(RunState::FinishMigrate);
        self.ctl.events.emit("STOP", None);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.inner.resume()?;
        self.ctl.set_state(RunState::Running);
        self.ctl.events.emit("RESUME", None);
        Ok(())
    }
    fn start_dirty_log(&mut self) -> Result<(), String> {
        self.inner.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), String> {
        self.inner.stop_dirty_log()
    }
    fn take_dirty(&mut self) -> Result<Vec<DirtyRegion>, String> {
        self.inner.take_dirty()
    }
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.inner.read_ram(gpa, buf)
    }
    fn save_devices(&mut self, m: &MachineType) -> Result<Vec<Vec<u8>>, String> {
        self.inner.save_devices(m)
    }
    fn handed_over(&mut self) {
        self.inner.handed_over();
        self.ctl.set_state(RunState::PostMigrate);
    }
}

impl<H: DestinationVm> DestinationVm for Side<'_, H> {
    fn machine(&self) -> &'static MachineType {
        self.inner.machine()
    }
    fn config(&self) -> ConfigRecord {
        self.inner.config()
    }
    fn catalog(&self) -> devstate::Catalog {
        self.inner.catalog()
    }
    fn host_refusals(&self, src: &ConfigRecord) -> Vec<String> {
        self.inner.host_refusals(src)
    }
    fn expected_sections(&self) -> Vec<(String, u32)> {
        self.inner.expected_sections()
    }
    fn begin_incoming(&mut self) -> Result<(), String> {
        self.ctl.migrating.store(true, Ordering::SeqCst);
        self.inner.begin_incoming()?;
        // After the pre-start device_adds and before anything is loaded: every connector to
        // its reset state and an empty guest-event queue; the stream then overwrites the
        // connectors the source was in the middle of.
        let mut m = lock(&self.ctl.hp);
        m.set_migration_in_progress(true);
        if !self.ctl.skip_incoming_reset.load(Ordering::SeqCst) {
            m.reset_all();
            m.clear_events();
        }
        Ok(())
    }
    fn write_ram(&mut self, gpa: u64, pages: u32, data: Option<&[u8]>) -> Result<(), String> {
        self.inner.write_ram(gpa, pages, data)
    }
    fn write_ram_sparse(&mut self, gpa: u64, pages: u32, body: &[u8]) -> Result<(), String> {
        self.inner.write_ram_sparse(gpa, pages, body)
    }
    fn load_devices(&mut self, sections: &[devstate::RawSection]) -> Result<(), String> {
        self.inner.load_devices(sections)
    }
    fn commit(&mut self, run: bool) -> Result<(), String> {
        let run = run && self.ctl.autostart.load(Ordering::SeqCst);
        self.inner.commit(run)?;
        if run {
            self.ctl.set_state(RunState::Running);
            self.ctl.events.emit("RESUME", None);
        } else {
            self.ctl.set_state(RunState::Paused);
        }
        Ok(())
    }
    fn abort_incoming(&mut self, why: &str) {
        self.inner.abort_incoming(why);
        self.ctl.set_state(RunState::InMigrate);
    }
}

impl QmpBackend for Controller {
    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn execute(&self, command: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        // Commands that start threads need the Arc.
        let me = self.arc();
        let no_args = |a: Map<String, Value>| Args::new(a).finish();
        match command {
            "query-status" => {
                no_args(arguments)?;
                let s = self.run_state();
                Ok(json!({"running": s.is_running(), "singlestep": false, "status": s.as_str()}))
            }
            "stop" => {
                no_args(arguments)?;
                self.stop()
            }
            "cont" => {
                no_args(arguments)?;
                self.cont_inner()
            }
            "quit" => {
                no_args(arguments)?;
                self.quit()
            }
            "query-machines" => {
                let mut a = Args::new(arguments);
                let _ = a.optional_bool("compat-props")?;
                a.finish()?;
                Ok(self.query_machines())
            }
            "query-cpu-definitions" => {
                no_args(arguments)?;
                Ok(self.query_cpu_definitions())
            }
            "query-hotpluggable-cpus" => {
                no_args(arguments)?;
                Ok(self.query_hotpluggable_cpus())
            }
            "migrate" => me.migrate(arguments),
            "migrate-incoming" => me.migrate_incoming(arguments),
            "migrate_cancel" => {
                no_args(arguments)?;
                Ok(self.migrate_cancel())
            }
            "query-migrate" => {
                no_args(arguments)?;
                Ok(self.query_migrate())
            }
            "migrate-set-capabilities" => self.set_capabilities(arguments),
            "query-migrate-capabilities" => {
                no_args(arguments)?;
                Ok(
                    json!([{"capability": "events", "state": self.events_cap.load(Ordering::SeqCst)}]),
                )
            }
            "migrate-set-parameters" => self.set_parameters(arguments),
            "query-migrate-parameters" => {
                no_args(arguments)?;
                Ok(self.query_parameters())
            }
            "__org.ferry_query-guest" => {
                no_args(arguments)?;
                self.query_guest()
            }
            "__org.ferry_verify-guest" => {
                no_args(arguments)?;
                self.verify_guest()
            }
            "device_add" => self.device_add(arguments),
            "device_del" => self.device_del(arguments),
            "__org.ferry_query-connectors" => {
                no_args(arguments)?;
                Ok(self.query_connectors())
            }
            "__org.ferry_guest-hotplug" => self.guest_hotplug(arguments),
            other => Err(QmpError::unknown_command(other)),
        }
    }
}
