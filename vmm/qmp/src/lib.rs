//! QMP (QEMU Machine Protocol) control-plane server.
//!
//! Speaks QMP as QEMU 7.2 does (see `shared/reference/qmp.md`) on a Unix
//! socket, so that unmodified clients (`qemu.qmp`, `socat`, `qapi-rs`) work:
//!
//! * greeting `{"QMP": {"version": {"qemu": ..., "package": ...}, "capabilities": []}}`;
//! * `qmp_capabilities` negotiation, then command mode; before it every
//!   command gets `CommandNotFound` and no events are sent;
//! * replies `{"return": ...}` / `{"error": {"class", "desc"}}` echoing `id`;
//! * events `{"event", "data", "timestamp"}` from an [`EventBus`];
//! * output one compact ASCII line per message ending in `\r\n`; input a
//!   streaming JSON splitter with size and nesting limits (`framing`).
//!
//! The server itself answers `qmp_capabilities`, `query-version` and
//! `query-commands`; everything else goes to the VMM's [`QmpBackend`], which
//! takes its arguments through [`Args`] (QEMU's error texts, [`QmpError`]).
//! [`client::QmpClient`] is a small blocking client for tests and tools.
//!
//! Descriptors a client sends with a command (SCM_RIGHTS, as libvirt's
//! `getfd` does) reach the backend through
//! [`QmpBackend::execute_with_fds`].
//!
//! Nothing here knows about a VM: the crate depends on tokio, serde, tracing
//! and libc (`recvmsg`) only, so the protocol is tested without KVM.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use ferry_qmp::*;
//! # use serde_json::{Map, Value};
//! struct Vm;
//! impl QmpBackend for Vm {
//!     fn commands(&self) -> Vec<&'static str> { vec!["query-status"] }
//!     fn execute(&self, _cmd: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
//!         Args::new(args).finish()?;
//!         Ok(serde_json::json!({"running": true, "status": "running"}))
//!     }
//! }
//! # async fn demo() -> Result<(), QmpServerError> {
//! let config = QmpConfig::new(VersionInfo::new(0, 1, 0, "ferry 0.1.0"));
//! let server = QmpServer::bind("/run/ferry/qmp.sock", Arc::new(Vm), config)?;
//! let events = server.event_bus();
//! let stop = server.shutdown_handle();
//! tokio::spawn(server.run());
//! events.emit("STOP", None);
//! stop.shutdown();
//! # Ok(()) }
//! ```

mod args;
pub mod client;
mod error;
mod events;
mod framing;
mod protocol;
mod session;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

pub use args::Args;
pub use client::{ClientError, QmpClient};
pub use error::{ErrorClass, QmpError, QmpServerError};
pub use events::{DEFAULT_EVENT_CAPACITY, EventBus, QmpEvent, Timestamp};
pub use protocol::{VersionInfo, VersionTriple};

/// Commands the server answers itself, in `query-commands` order.
pub const SERVER_COMMANDS: [&str; 3] = ["qmp_capabilities", "query-commands", "query-version"];

/// What the VMM implements.
///
/// `execute` is called on tokio's blocking thread pool (`spawn_blocking`), one
/// command at a time per session but concurrently across sessions, so it may
/// block (take locks, wait for a vCPU to pause) without stalling other
/// clients. It should validate all arguments (see [`Args`]) before any side
/// effect. Events a command causes should be emitted on the [`EventBus`]
/// before it returns; the session then sends them ahead of the reply, as
/// QEMU does. If `execute` panics, the client gets a `GenericError` and the
/// server carries on.
pub trait QmpBackend: Send + Sync + 'static {
    /// Names of the commands `execute` handles. Read once, by
    /// [`QmpServer::bind`]. Names in [`SERVER_COMMANDS`] are ignored.
    fn commands(&self) -> Vec<&'static str>;

    /// Run `command` (always one of [`commands`](Self::commands)) with its
    /// `arguments` object (empty when the request had none).
    fn execute(&self, command: &str, arguments: Map<String, Value>) -> Result<Value, QmpError>;

    /// Like [`execute`](Self::execute), with the file descriptors the client
    /// passed (SCM_RIGHTS) since its previous command, as QEMU's `getfd`
    /// takes them. By default they are closed.
    fn execute_with_fds(
        &self,
        command: &str,
        arguments: Map<String, Value>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Value, QmpError> {
        drop(fds);
        self.execute(command, arguments)
    }
}

/// Server settings. Build with [`QmpConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct QmpConfig {
    /// Sent in the greeting and by `query-version`.
    pub version: VersionInfo,
    /// The bus events are read from; share a clone with the backend.
    pub event_bus: EventBus,
    /// Bound on one input message, in bytes (excluding whitespace).
    pub max_message_size: usize,
    /// Bound on `{`/`[` nesting of one input message.
    pub max_nesting: usize,
    /// Connections beyond this many are closed at once.
    pub max_sessions: usize,
    /// A client that does not take a reply or event within this is dropped.
    pub write_timeout: Duration,
    /// On shutdown, how long sessions get to finish a running command.
    pub shutdown_grace: Duration,
}

impl QmpConfig {
    pub fn new(version: VersionInfo) -> Self {
        Self {
            version,
            event_bus: EventBus::default(),
            max_message_size: framing::DEFAULT_MAX_MESSAGE_SIZE,
            max_nesting: framing::DEFAULT_MAX_NESTING,
            max_sessions: 64,
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }

    /// Use `bus` (typically one the backend already holds a clone of).
    pub fn with_event_bus(mut self, bus: EventBus) -> Self {
        self.event_bus = bus;
        self
    }
}

/// State shared by the accept loop and all sessions.
pub(crate) struct Shared {
    backend: Arc<dyn QmpBackend>,
    backend_commands: HashSet<&'static str>,
    all_commands: Vec<&'static str>,
    config: QmpConfig,
    shutdown: watch::Sender<bool>,
}

/// Asks a running [`QmpServer`] to stop. Cloneable, usable from any thread
/// (for instance from the backend's `quit`). Sessions finish the command in
/// progress (its reply is sent), then close.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.shutdown.send_replace(true);
    }
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").finish_non_exhaustive()
    }
}

/// A bound QMP socket; [`run`](Self::run) serves it.
pub struct QmpServer {
    listener: UnixListener,
    /// The socket file this server created (and its inode), removed on drop; `None` for a
    /// listener it was handed.
    path: Option<(PathBuf, u64)>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path.as_ref().map(|p| &p.0))
            .finish_non_exhaustive()
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl QmpServer {
    /// Bind the socket at `path` with mode 0600. Must be called inside a
    /// Tokio runtime.
    ///
    /// A stale socket at `path` (nobody accepting) is removed; a live one
    /// gives [`QmpServerError::AddrInUse`], and a non-socket file
    /// [`QmpServerError::NotASocket`]. The socket is bound under a temporary
    /// name in the same directory, made 0600, then renamed to `path`, so no
    /// client can connect before the mode is set.
    pub fn bind(
        path: impl AsRef<Path>,
        backend: Arc<dyn QmpBackend>,
        config: QmpConfig,
    ) -> Result<Self, QmpServerError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |context: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| QmpServerError::Io {
                context,
                path,
                source,
            }
        };
        remove_stale_socket(&path)?;

        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let temp = dir.join(format!(
            ".qmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_file(&temp);
        let std_listener =
            std::os::unix::net::UnixListener::bind(&temp).map_err(io_err("bind", &temp))?;
        let placed = fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", &temp))
            .and_then(|()| fs::rename(&temp, &path).map_err(io_err("rename onto", &path)));
        if let Err(e) = placed {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        std_listener
            .set_nonblocking(true)
            .map_err(io_err("set_nonblocking", &path))?;
        let listener = UnixListener::from_std(std_listener).map_err(io_err("register", &path))?;
        let inode = fs::symlink_metadata(&path)
            .map_err(io_err("stat", &path))?
            .ino();
        tracing::info!(path = %path.display(), "QMP server listening");
        Ok(Self::serve_listener(
            listener,
            Some((path, inode)),
            backend,
            config,
        ))
    }

    /// Serve a listening socket someone else bound and handed over (QEMU's
    /// `-chardev socket,fd=N,server=on`, as libvirt passes its monitor). The
    /// socket file, if any, is left alone. Must be called inside a Tokio runtime.
    pub fn from_listener(
        listener: std::os::unix::net::UnixListener,
        backend: Arc<dyn QmpBackend>,
        config: QmpConfig,
    ) -> Result<Self, QmpServerError> {
        let io_err = |context: &'static str| {
            move |source| QmpServerError::Io {
                context,
                path: PathBuf::from("(passed descriptor)"),
                source,
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(io_err("set_nonblocking"))?;
        let listener = UnixListener::from_std(listener).map_err(io_err("register"))?;
        tracing::info!("QMP server listening on a passed descriptor");
        Ok(Self::serve_listener(listener, None, backend, config))
    }

    fn serve_listener(
        listener: UnixListener,
        path: Option<(PathBuf, u64)>,
        backend: Arc<dyn QmpBackend>,
        config: QmpConfig,
    ) -> Self {
        let mut backend_commands = HashSet::new();
        let mut all_commands: Vec<&'static str> = SERVER_COMMANDS.to_vec();
        for name in backend.commands() {
            if SERVER_COMMANDS.contains(&name) {
                tracing::warn!(name, "backend command shadowed by the QMP server");
            } else if backend_commands.insert(name) {
                all_commands.push(name);
            }
        }
        let (shutdown, _) = watch::channel(false);
        Self {
            listener,
            path,
            shared: Arc::new(Shared {
                backend,
                backend_commands,
                all_commands,
                config,
                shutdown,
            }),
        }
    }

    /// The socket path (`None` for a passed listener).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_ref().map(|p| p.0.as_path())
    }

    /// The bus sessions read events from (a clone of `config.event_bus`).
    pub fn event_bus(&self) -> EventBus {
        self.shared.config.event_bus.clone()
    }

    /// A handle that stops [`run`](Self::run).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shared))
    }

    /// Accept clients, one task per session, until shut down; then wait up
    /// to `shutdown_grace` for sessions to close and remove the socket file.
    pub async fn run(self) -> Result<(), QmpServerError> {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut sessions = JoinSet::new();
        let mut next_id = 0u64;
        loop {
            tokio::select! {
                // (Wrapped so the select output holds no watch guard.)
                () = async { _ = shutdown.wait_for(|stop| *stop).await } => break,
                Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "QMP session task failed");
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if sessions.len() >= self.shared.config.max_sessions {
                            tracing::warn!("too many QMP clients, refusing a connection");
                            continue;
                        }
                        next_id += 1;
                        let span = tracing::debug_span!("qmp_session", id = next_id);
                        sessions.spawn(
                            session::serve(stream, Arc::clone(&self.shared)).instrument(span),
                        );
                    }
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "QMP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let grace = self.shared.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("QMP sessions still busy at shutdown; aborting them");
            sessions.shutdown().await;
        }
        tracing::info!("QMP server stopped");
        Ok(())
    }
}

impl Drop for QmpServer {
    /// Remove the socket file, unless someone replaced it since.
    fn drop(&mut self) {
        if let Some((path, inode)) = &self.path
            && fs::symlink_metadata(path).is_ok_and(|m| m.ino() == *inode)
        {
            let _ = fs::remove_file(path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), QmpServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(QmpServerError::Io {
                context: "stat",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(QmpServerError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(QmpServerError::AddrInUse(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale QMP socket");
            fs::remove_file(path).map_err(|source| QmpServerError::Io {
                context: "remove stale socket",
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(QmpServerError::Io {
            context: "probe existing socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}
