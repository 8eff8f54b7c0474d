//! Migration commands and threads: `migrate`, `migrate-incoming`, cancel, queries,
//! capabilities and parameters, and the wrapper that mirrors the engine's run-state changes.

use super::{Controller, IncomingMode, lock};
use crate::RunState;
use crate::migrate::VmMigration;
use crate::qmp::{Args, QmpError};
use ferry_tls::Endpoint;
use machine_types::MachineType;
use migration::{
    Acceptor, ConfigRecord, DestinationVm, DirtyRegion, Incoming, Notice, Params, Progress,
    SourceVm, Status, SwitchoverPolicy, Uri,
};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Migration capabilities Ferry has (`migrate-set-capabilities` refuses the rest by name).
const CAPABILITIES: &[&str] = &["events", "auto-converge", "postcopy-ram", "return-path"];
use std::time::Duration;
use tracing::{error, info};

impl Controller {
    pub(super) fn progress_listener(&self) -> migration::Listener {
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

    pub(super) fn migrate(self: &Arc<Self>, args: Map<String, Value>) -> Result<Value, QmpError> {
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
            return self.migrate_resume(uri);
        }
        let parsed = Uri::parse(&uri).map_err(|e| QmpError::generic(e.to_string()))?;
        self.check_return_path(&parsed).map_err(QmpError::generic)?;
        // TLS protects a TCP channel; a file has no peer to authenticate.
        let tls = match parsed {
            Uri::Tcp(_) => self
                .tls_params(Endpoint::Client)
                .map_err(QmpError::generic)?,
            Uri::File(_) | Uri::Fd(_) => None,
        };
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
        // `fd:NAME` is used up by this migration, as QEMU's.
        let stream_fd = match &parsed {
            Uri::Fd(name) => {
                let f = self.take_passed_fd(name).map_err(QmpError::generic)?;
                let socket = f
                    .metadata()
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                // A socket has a peer TLS would authenticate: never send in the clear what
                // tls-creds asks to encrypt.
                if socket
                    && self
                        .tls_params(Endpoint::Client)
                        .map_err(QmpError::generic)?
                        .is_some()
                {
                    return Err(QmpError::generic(format!(
                        "tls-creds is set, but Ferry runs no TLS over a passed socket (fd:{name})"
                    )));
                }
                Some(migration::transport::PassedFd::new(f))
            }
            _ => None,
        };
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
        let params = Params {
            tls,
            stream_fd,
            ..lock(&self.params).clone()
        };
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || me.run_outgoing(&uri, &params, &progress))
            .map_err(|e| QmpError::generic(format!("Cannot start the migration thread: {e}")))?;
        Ok(json!({}))
    }

    pub(super) fn run_outgoing(&self, uri: &str, params: &Params, progress: &Progress) {
        let mut vm = lock(&self.vm);
        let mut side = Side {
            inner: VmMigration::new(&mut vm),
            ctl: self,
        };
        let res = migration::send(&mut side, uri, params, progress);
        drop(vm);
        if progress.status() == Status::PostcopyPaused {
            // Half the guest's RAM is still here: no hotplug until a recovery.
            error!("post-copy paused: this side keeps the guest's remaining RAM");
            return;
        }
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
        self.check_return_path(&parsed)?;
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
            Uri::Fd(_) => None,
        };
        let fd_file = match &parsed {
            Uri::Fd(name) => Some(self.take_passed_fd(name)?),
            _ => None,
        };
        *lock(&self.incoming) = IncomingMode::Started(uri.to_owned());
        // A file is read at once: its progress replaces the last attempt's before this
        // command returns, so `query-migrate` never shows a stale result for it.
        let first = matches!(parsed, Uri::File(_) | Uri::Fd(_)).then(|| {
            let p = Arc::new(Progress::new(Some(self.progress_listener())));
            p.set_status(Status::Setup);
            *lock(&self.progress) = Some(p.clone());
            p
        });
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || me.run_incoming(parsed, listener, fd_file, first))
            .map_err(|e| format!("Cannot start the incoming migration thread: {e}"))?;
        Ok(())
    }

    /// The listener's view of the parameters: those of the moment a connection arrives, with
    /// the TLS setup resolved for a destination.
    fn acceptor(&self, listener: std::net::TcpListener) -> std::io::Result<Acceptor> {
        let (me, me2) = (self.me.clone(), self.me.clone());
        Acceptor::spawn(
            listener,
            Arc::new(move || {
                let c = me.upgrade().ok_or("the VM is shutting down")?;
                let tls = c.tls_params(Endpoint::Server)?;
                Ok(Params {
                    tls,
                    ..lock(&c.params).clone()
                })
            }),
            Arc::new(move |why: &str| {
                if let Some(c) = me2.upgrade() {
                    c.incoming_refused(why);
                }
            }),
        )
    }

    /// A connection was turned away before its stream started (TLS, `tls-authz`, a plain
    /// source): while no migration runs, `query-migrate` shows it as a failed attempt; the
    /// listener keeps listening either way.
    fn incoming_refused(&self, why: &str) {
        // During a migration, or after one completed here, the attempt only goes to the log.
        if self.migrating.load(Ordering::SeqCst) || self.run_state() != RunState::InMigrate {
            return;
        }
        error!(
            reason = why,
            "incoming migration connection refused; still listening"
        );
        let p = Arc::new(Progress::new(Some(self.progress_listener())));
        p.refused(why.to_owned());
        *lock(&self.progress) = Some(p);
    }

    pub(super) fn run_incoming(
        &self,
        uri: Uri,
        listener: Option<std::net::TcpListener>,
        mut fd_file: Option<std::fs::File>,
        mut first: Option<Arc<Progress>>,
    ) {
        let acceptor = match listener.map(|l| self.acceptor(l)).transpose() {
            Ok(a) => a,
            Err(e) => {
                error!(error = %e, "cannot start accepting incoming migrations");
                return;
            }
        };
        loop {
            let incoming = match (&uri, &acceptor) {
                (Uri::Tcp(_), Some(a)) => match a.next() {
                    Some(a) => {
                        let peer = a.channel().socket().peer_addr().ok();
                        info!(
                            ?peer,
                            tls = matches!(a.channel(), migration::Channel::Tls(_)),
                            "incoming migration connection"
                        );
                        // The stream starts: no hotplug until it completed or failed.
                        self.migrating.store(true, Ordering::SeqCst);
                        Incoming::Accepted(a)
                    }
                    None => {
                        error!("the incoming migration listener stopped");
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
                // A passed descriptor is read once.
                (Uri::Fd(_), _) => match fd_file.take() {
                    Some(f) => {
                        self.migrating.store(true, Ordering::SeqCst);
                        Incoming::File(f)
                    }
                    None => return,
                },
                _ => return,
            };
            if let Some(p) = lock(&self.prefault).as_ref() {
                p.yield_to_migration(true);
            }
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
            if progress.status() == Status::PostcopyPaused {
                // The guest has part of its RAM: no hotplug and no other incoming stream.
                error!("post-copy paused: the guest waits for pages that cannot arrive");
                return;
            }
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
                Ok(()) => {
                    // The guest runs now; what is left unpopulated it touches itself.
                    lock(&self.prefault).take();
                    return;
                }
                Err(e) => {
                    error!(error = %migration::chain(&e), "incoming migration failed; waiting for another attempt");
                    if let Some(p) = lock(&self.prefault).as_ref() {
                        p.yield_to_migration(false);
                    }
                    if acceptor.is_none() {
                        return;
                    }
                }
            }
        }
    }

    pub(super) fn migrate_incoming(
        self: &Arc<Self>,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
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

    pub(super) fn migrate_cancel(&self) -> Result<Value, QmpError> {
        if let Some(p) = lock(&self.progress).as_ref() {
            match p.status() {
                Status::PostcopyActive | Status::PostcopyPaused => {
                    return Err(QmpError::generic(
                        "Post-copy cannot be cancelled: the guest runs on the destination",
                    ));
                }
                s if s.is_active() => p.cancel(),
                _ => {}
            }
        }
        Ok(json!({}))
    }

    pub(super) fn query_migrate(&self) -> Value {
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
                "__org.ferry_page-channels": s.page_channels,
            },
        });
        if s.status == Status::Completed {
            v["downtime"] = json!(s.downtime_ms);
        }
        if lock(&self.params).converge.auto_converge || s.cpu_throttle_percentage > 0 {
            v["cpu-throttle-percentage"] = json!(s.cpu_throttle_percentage);
            v["__org.ferry_cpu-throttle-peak"] = json!(s.cpu_throttle_peak);
        }
        if s.postcopy_pages > 0 || s.postcopy_requests > 0 {
            v["ram"]["postcopy-requests"] = json!(s.postcopy_requests);
            v["ram"]["__org.ferry_postcopy-pages"] = json!(s.postcopy_pages);
            if s.postcopy_requests > 0 && s.postcopy_latency_sum_us > 0 {
                v["__org.ferry_postcopy-latency-avg-us"] =
                    json!(s.postcopy_latency_sum_us / s.postcopy_requests);
                v["__org.ferry_postcopy-latency-max-us"] = json!(s.postcopy_latency_max_us);
            }
        }
        if s.downtime_allowed_ms > 0 {
            v["__org.ferry_downtime-allowed"] = json!(s.downtime_allowed_ms);
        }
        if let Some(e) = s.error {
            v["error-desc"] = json!(e);
        }
        if let Some(sa) = socket {
            v["socket-address"] = sa;
        }
        v
    }

    /// Ferry's TCP migration cannot run without its return path (LOADED, COMMIT).
    fn check_return_path(&self, uri: &Uri) -> Result<(), String> {
        if matches!(uri, Uri::Tcp(_)) && !self.probe.return_path.load(Ordering::SeqCst) {
            return Err(
                "Ferry's migration over TCP needs its return path: capability 'return-path' is off"
                    .into(),
            );
        }
        Ok(())
    }

    pub(super) fn set_capabilities(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
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
            if !CAPABILITIES.contains(&name.as_str()) {
                return Err(QmpError::generic(format!(
                    "Capability '{name}' is not supported by Ferry"
                )));
            }
            parsed.push((name, state));
        }
        if let Some(p) = lock(&self.progress).as_ref()
            && p.status().is_active()
        {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        for (name, on) in parsed {
            match name.as_str() {
                "events" => self.events_cap.store(on, Ordering::SeqCst),
                "postcopy-ram" => lock(&self.params).postcopy = on,
                "return-path" => self.probe.return_path.store(on, Ordering::SeqCst),
                _ => lock(&self.params).converge.auto_converge = on,
            }
        }
        Ok(json!({}))
    }

    /// `migrate` with `resume: true`: finish a paused post-copy through a new connection to
    /// the destination (after its `migrate-recover`).
    fn migrate_resume(self: &Arc<Self>, uri: String) -> Result<Value, QmpError> {
        let progress = lock(&self.progress).clone();
        let Some(progress) = progress.filter(|p| {
            p.status() == Status::PostcopyPaused && self.run_state() == RunState::PostMigrate
        }) else {
            return Err(QmpError::generic(
                "Cannot resume if there is no paused migration",
            ));
        };
        let params = lock(&self.params).clone();
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration-resume".into())
            .spawn(move || {
                let mut vm = lock(&me.vm);
                let side = VmMigration::new(&mut vm);
                let regions = SourceVm::config(&side).memory;
                let mut read = |gpa: u64, buf: &mut [u8]| side.read_ram(gpa, buf);
                let res = migration::postcopy::resume(
                    &mut read,
                    &regions,
                    &uri,
                    progress.session(),
                    &params,
                    &progress,
                );
                drop(vm);
                match res {
                    Ok(()) => {
                        info!("post-copy resumed and completed");
                        me.migrating.store(false, Ordering::SeqCst);
                        me.wake_hotplug();
                    }
                    Err(e) => {
                        error!(error = %migration::chain(&e), "post-copy resume failed; still paused");
                    }
                }
            })
            .map_err(|e| QmpError::generic(format!("Cannot start the migration thread: {e}")))?;
        Ok(json!({}))
    }

    /// `migrate-recover`: listen on `uri` for the source of the paused post-copy.
    pub(super) fn migrate_recover(
        self: &Arc<Self>,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let uri = a.required_str("uri")?;
        a.finish()?;
        let progress = lock(&self.progress).clone();
        let Some(progress) = progress.filter(|p| {
            p.status() == Status::PostcopyPaused && lock(&self.vm).postcopy_paused().is_some()
        }) else {
            return Err(QmpError::generic(
                "Migrate recover can only be run when postcopy is paused.",
            ));
        };
        let parsed = Uri::parse(&uri).map_err(|e| QmpError::generic(e.to_string()))?;
        if !matches!(parsed, Uri::Tcp(_)) {
            return Err(QmpError::generic("Post-copy recovers over tcp: only"));
        }
        let listener = migration::transport::listen(&parsed)
            .map_err(|e| QmpError::generic(migration::chain(&e)))?;
        *lock(&self.listen_addr) = listener.local_addr().ok();
        let io_timeout = lock(&self.params).io_timeout;
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration-recover".into())
            .spawn(move || me.run_recover(&listener, &progress, io_timeout))
            .map_err(|e| QmpError::generic(format!("Cannot start the recovery thread: {e}")))?;
        Ok(json!({}))
    }

    fn run_recover(
        &self,
        listener: &std::net::TcpListener,
        progress: &Progress,
        io_timeout: Duration,
    ) {
        for conn in listener.incoming() {
            let s = match conn {
                Ok(s) => s,
                Err(e) => {
                    error!(error = %e, "post-copy recovery listener failed");
                    return;
                }
            };
            info!(peer = ?s.peer_addr().ok(), "post-copy recovery connection");
            let vm = lock(&self.vm);
            let mut paused = vm.postcopy_paused();
            let mut resume = || -> Result<(), migration::MigrationError> {
                vm.resume()
                    .map_err(|e| migration::MigrationError::Vm(e.to_string()))?;
                self.set_state(RunState::Running);
                self.events.emit("RESUME", None);
                Ok(())
            };
            let res = migration::postcopy::recover(
                migration::Channel::Plain(s),
                &mut paused,
                progress,
                io_timeout,
                &mut resume,
            );
            match res {
                Ok(()) => {
                    drop(paused);
                    drop(vm);
                    info!("post-copy recovered and completed");
                    {
                        let mut m = lock(&self.hp);
                        m.set_migration_in_progress(false);
                        m.complete_pending_releases();
                    }
                    self.migrating.store(false, Ordering::SeqCst);
                    self.wake_hotplug();
                    return;
                }
                Err(e) => {
                    error!(error = %migration::chain(&e), "post-copy recovery failed; still paused");
                    if self.run_state() == RunState::Running {
                        vm.pause_postcopy();
                        vm.set_run_state(RunState::Paused);
                        self.set_state(RunState::Paused);
                        self.events.emit("STOP", None);
                    }
                    if paused.is_none() {
                        // Nothing left to resume from: the state went with the error.
                        error!("the paused post-copy state is gone; no recovery is possible");
                    }
                }
            }
        }
    }

    /// `migrate-start-postcopy`: switch the running outgoing migration to post-copy after its
    /// current pass.
    pub(super) fn start_postcopy(&self) -> Result<Value, QmpError> {
        if !lock(&self.params).postcopy {
            return Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        let progress = lock(&self.progress).clone();
        match progress {
            Some(p)
                if matches!(p.status(), Status::Setup | Status::Active)
                    && self.run_state() != RunState::InMigrate =>
            {
                p.start_postcopy();
                Ok(json!({}))
            }
            _ => Err(QmpError::generic(
                "Postcopy must be started after migration has been started",
            )),
        }
    }

    pub(super) fn set_parameters(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let downtime = a.optional_u64("downtime-limit")?;
        let bandwidth = a.optional_u64("max-bandwidth")?;
        let iterations = a.optional_u64("__org.ferry_max-iterations")?;
        let policy = a.optional_enum("__org.ferry_switchover-policy", &["cancel", "force"])?;
        let timeout = a.optional_u64("__org.ferry_io-timeout")?;
        let sparse = a.optional_bool("__org.ferry_sparse-pages")?;
        let channels = a.optional_u64("multifd-channels")?;
        let tls_creds = str_or_null(&mut a, "tls-creds")?;
        let tls_hostname = str_or_null(&mut a, "tls-hostname")?;
        let tls_authz = str_or_null(&mut a, "tls-authz")?;
        let mut conv = lock(&self.params).converge;
        let pct = |a: &mut Args, name: &str, min: u64, max: u64| -> Result<Option<u8>, QmpError> {
            match a.optional_u64(name)? {
                Some(v) if !(min..=max).contains(&v) => Err(QmpError::generic(format!(
                    "Parameter '{name}' expects {min} to {max}"
                ))),
                v => Ok(v.map(|v| v as u8)),
            }
        };
        if let Some(v) = pct(&mut a, "cpu-throttle-initial", 1, 99)? {
            conv.throttle_initial = v;
        }
        if let Some(v) = pct(&mut a, "cpu-throttle-increment", 1, 99)? {
            conv.throttle_increment = v;
        }
        if let Some(v) = pct(&mut a, "max-cpu-throttle", 1, 99)? {
            conv.max_throttle = v;
        }
        if let Some(v) = pct(&mut a, "throttle-trigger-threshold", 1, 100)? {
            conv.trigger_threshold = v;
        }
        if let Some(v) = a.optional_bool("cpu-throttle-tailslow")? {
            conv.throttle_tailslow = v;
        }
        if let Some(v) = a.optional_u64("__org.ferry_downtime-step")? {
            conv.downtime_step_ms = v.min(2_000_000);
        }
        if let Some(v) = a.optional_u64("__org.ferry_downtime-ceiling")? {
            conv.downtime_ceiling_ms = v.min(2_000_000);
        }
        if let Some(v) = a.optional_u64("__org.ferry_stall-passes")? {
            conv.stall_passes = u32::try_from(v).unwrap_or(u32::MAX);
        }
        if let Some(v) = a.optional_u64("__org.ferry_stall-timeout")? {
            conv.stall_timeout = Duration::from_millis(v);
        }
        let postcopy_bw = a.optional_u64("max-postcopy-bandwidth")?;
        let nice = a.optional_u64("__org.ferry_page-thread-nice")?;
        a.finish()?;
        if nice.is_some_and(|n| n > u64::from(migration::pages::MAX_NICE)) {
            return Err(QmpError::generic(format!(
                "Parameter '__org.ferry_page-thread-nice' expects 0 (the process's priority) to {}",
                migration::pages::MAX_NICE
            )));
        }
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
        if channels.is_some_and(|c| c > u64::from(migration::pages::MAX_CHANNELS)) {
            return Err(QmpError::generic(format!(
                "Parameter 'multifd-channels' expects 0 (pages in the main stream) to {}",
                migration::pages::MAX_CHANNELS
            )));
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
        p.converge = conv;
        if let Some(b) = postcopy_bw {
            p.max_postcopy_bandwidth = b;
        }
        if let Some(n) = nice {
            p.page_thread_nice = Some(n as u8);
        }
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
        if let Some(c) = channels {
            p.page_channels = c as u16;
        }
        let mut t = lock(&self.tls);
        if let Some(v) = tls_creds {
            t.creds = v;
        }
        if let Some(v) = tls_hostname {
            t.hostname = v;
        }
        if let Some(v) = tls_authz {
            t.authz = v;
        }
        Ok(json!({}))
    }

    /// `--global migration.KEY=VALUE`: set one migration parameter as
    /// `migrate-set-parameters` would (numbers and on/off become JSON numbers and booleans).
    pub fn set_global(&self, spec: &str) -> Result<(), String> {
        let bad = |why: &str| format!("Invalid --global '{spec}': {why}");
        let (key, value) = spec
            .strip_prefix("migration.")
            .and_then(|kv| kv.split_once('='))
            .ok_or_else(|| bad("expected migration.KEY=VALUE"))?;
        let v = if let Ok(n) = value.parse::<u64>() {
            json!(n)
        } else {
            match value {
                "on" | "true" | "yes" => json!(true),
                "off" | "false" | "no" => json!(false),
                s => json!(s),
            }
        };
        let mut m = Map::new();
        m.insert(key.to_owned(), v);
        self.set_parameters(m).map(|_| ()).map_err(|e| bad(&e.desc))
    }

    pub(super) fn query_parameters(&self) -> Value {
        let p = lock(&self.params);
        let t = lock(&self.tls);
        json!({
            "tls-creds": t.creds,
            "tls-hostname": t.hostname,
            "tls-authz": t.authz,
            "downtime-limit": p.downtime_limit_ms,
            "max-bandwidth": p.max_bandwidth,
            "__org.ferry_max-iterations": p.max_iterations,
            "__org.ferry_switchover-policy": match p.switchover_policy {
                SwitchoverPolicy::Cancel => "cancel",
                SwitchoverPolicy::Force => "force",
            },
            "__org.ferry_io-timeout": p.io_timeout.as_millis() as u64,
            "__org.ferry_sparse-pages": p.sparse_pages,
            "multifd-channels": p.page_channels,
            "cpu-throttle-initial": p.converge.throttle_initial,
            "cpu-throttle-increment": p.converge.throttle_increment,
            "cpu-throttle-tailslow": p.converge.throttle_tailslow,
            "max-cpu-throttle": p.converge.max_throttle,
            "throttle-trigger-threshold": p.converge.trigger_threshold,
            "__org.ferry_downtime-step": p.converge.downtime_step_ms,
            "__org.ferry_downtime-ceiling": p.converge.downtime_ceiling_ms,
            "__org.ferry_stall-passes": p.converge.stall_passes,
            "__org.ferry_stall-timeout": p.converge.stall_timeout.as_millis() as u64,
            "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
            "__org.ferry_page-thread-nice": p.page_nice(),
        })
    }
}

/// A QAPI `StrOrNull` parameter: a string, or null for "" (not set).
fn str_or_null(a: &mut Args, name: &str) -> Result<Option<String>, QmpError> {
    match a.optional_value(name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(String::new())),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(QmpError::invalid_parameter_type(name, "string")),
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
    fn set_throttle(&mut self, percent: u8) -> Result<(), String> {
        self.inner.set_throttle(percent)
    }
    fn handed_over(&mut self) {
        self.inner.handed_over();
        self.ctl.set_state(RunState::PostMigrate);
    }

    fn shared_ram(&self) -> Option<Arc<dyn migration::SharedRam>> {
        self.inner.shared_ram()
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

    fn shared_ram(&self) -> Option<Arc<dyn migration::SharedRam>> {
        self.inner.shared_ram()
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
    fn postcopy_ram(&mut self) -> Option<Arc<dyn migration::postcopy::PostcopyRam>> {
        // Prefault would map the pages post-copy is about to drop: stop it first.
        lock(&self.ctl.prefault).take();
        self.inner.postcopy_ram()
    }
    fn postcopy_paused(&mut self, why: &str, state: migration::postcopy::Paused) -> bool {
        let paused = self.inner.postcopy_paused(why, state);
        if paused {
            self.ctl.set_state(RunState::Paused);
            self.ctl.events.emit("STOP", None);
        }
        paused
    }
    fn abort_incoming(&mut self, why: &str) {
        self.inner.abort_incoming(why);
        self.ctl.set_state(RunState::InMigrate);
    }
}
