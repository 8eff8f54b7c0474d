//! Ferry for libvirt: `ferry qemu-compat` takes QEMU's command line (the capability probe,
//! `-machine none`, a process without a VM that serves QMP; or a domain, see `domain`), and
//! `ferry libvirt-cpu-map` adds Ferry's CPU models to libvirt's CPU map.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vmm::control::{Probe, ProbeBackend};
use vmm::qemu_argv::Monitor;
use vmm::qmp::{QmpConfig, QmpServer, VersionInfo};

mod domain;

/// The QEMU release whose QMP dialect Ferry speaks (README "libvirt": libvirt refuses
/// anything older than 4.2.0 and picks its probes by version).
const QMP_DIALECT: (u32, u32, u32) = (7, 2, 0);

pub fn run(argv: &[String]) -> Result<()> {
    let args = match vmm::qemu_argv::parse(argv) {
        Ok(a) => a,
        Err(e) => fail_to_monitor(passed_monitor(argv), e.into()),
    };
    match args.domain {
        None => run_probe(args.monitor, args.pidfile, args.daemonize),
        Some(_) => domain::run(args),
    }
}

/// The descriptor of a `-chardev socket,...,fd=N` in `argv` (looked for in a command line
/// that may not parse).
fn passed_monitor(argv: &[String]) -> Option<i32> {
    argv.windows(2)
        .filter(|w| w[0] == "-chardev" && w[1].starts_with("socket,"))
        .flat_map(|w| w[1].split(','))
        .find_map(|kv| kv.strip_prefix("fd=")?.parse().ok())
}

/// Ends the process with `e` on stderr (libvirt keeps it in the domain's log). With a
/// passed monitor socket, first waits (at most 5 s) for the caller to connect and closes
/// the connection: libvirt then reports the log, Ferry's error, where a process gone before
/// it connected only gets "failed to connect to monitor socket: Connection refused".
pub(crate) fn fail_to_monitor(monitor: Option<i32>, e: anyhow::Error) -> ! {
    eprintln!("ferry: {e:#}");
    if let Some(fd) = monitor.filter(|fd| is_listening(*fd)) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the call; `fd` is a listening socket (checked),
        // open until this process exits.
        if unsafe { libc::poll(&mut p, 1, 5000) } == 1 {
            // SAFETY: accept4 on that socket, without an address buffer; the connection it
            // returns is closed at once.
            let c = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c >= 0 {
                // SAFETY: `c` was just returned by accept4 and nothing else holds it.
                unsafe { libc::close(c) };
            }
        }
    }
    std::process::exit(1);
}

/// Whether `fd` is a listening socket.
pub(crate) fn is_listening(fd: i32) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`; a descriptor that is
    // not a socket only makes it fail.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut accepting).cast(),
            &mut len,
        )
    };
    r == 0 && accepting != 0
}

/// The QMP greeting's version: QEMU's dialect, Ferry's own in `package`.
pub(crate) fn dialect() -> VersionInfo {
    let (major, minor, micro) = QMP_DIALECT;
    VersionInfo::new(
        major,
        minor,
        micro,
        concat!("ferry ", env!("CARGO_PKG_VERSION")),
    )
}

/// A `-machine none` process: QMP only, no VM.
fn run_probe(monitor: Monitor, pidfile: Option<String>, daemonize: bool) -> Result<()> {
    let Monitor::Path(path) = monitor else {
        bail!("A probe process (-machine none) takes -qmp unix:PATH");
    };
    let probe = Probe::for_host()?;
    // Fork before any thread exists; the parent exits once the child is serving.
    let ready = if daemonize {
        Some(self::daemonize()?)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    let backend = ProbeBackend::new(probe);
    let task = {
        let _guard = runtime.enter();
        let server = QmpServer::bind(&path, backend.clone(), QmpConfig::new(dialect()))
            .context("Cannot open the QMP socket")?;
        backend.set_server(server.shutdown_handle());
        runtime.spawn(server.run())
    };
    let _pidfile = pidfile.map(PidFile::write).transpose()?;
    let on_signal = backend.clone();
    on_term_signal(&runtime, move || on_signal.request_quit());
    tracing::info!(path, "probe process (-machine none) serving QMP");
    if let Some(mut parent) = ready {
        detach_stdio()?;
        parent
            .write_all(&[1])
            .context("Cannot tell the parent process")?;
    }
    backend.wait_quit();
    let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// Runs `then` on the first SIGTERM or SIGINT (what libvirt sends when it is done).
pub(crate) fn on_term_signal(
    runtime: &tokio::runtime::Runtime,
    then: impl FnOnce() + Send + 'static,
) {
    runtime.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        then();
    });
}

/// `ferry libvirt-cpu-map`: copies libvirt's map from `from` to `to` (unless the same) and
/// adds a file per Ferry CPU model, included from `index.xml`.
pub fn write_cpu_map(from: &Path, to: &Path) -> Result<()> {
    use vmm::libvirt_cpu_map as map;
    let read = |name: &str| {
        let p = from.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("Cannot read {}", p.display()))
    };
    let features = map::parse_features(&read("x86_features.xml")?)?;
    let index = read("index.xml")?;
    std::fs::create_dir_all(to).with_context(|| format!("Cannot create {}", to.display()))?;
    if from.canonicalize()? != to.canonicalize()? {
        for e in std::fs::read_dir(from)? {
            let e = e?;
            std::fs::copy(e.path(), to.join(e.file_name()))
                .with_context(|| format!("Cannot copy {}", e.path().display()))?;
        }
    }
    let probe = Probe::for_host()?;
    let mut files = Vec::new();
    for m in machine_types::cpu::ALL_MODELS {
        let table = probe.model_cpuid(m).map_err(anyhow::Error::msg)?;
        let name = map::file_name(m);
        std::fs::write(to.join(&name), map::model_xml(m, &table, &features))
            .with_context(|| format!("Cannot write {name}"))?;
        files.push(name);
    }
    std::fs::write(to.join("index.xml"), map::add_to_index(&index, &files)?)
        .context("Cannot write index.xml")?;
    println!("{}: {}", to.display(), files.join(", "));
    Ok(())
}

/// QEMU's `-daemonize`: the parent exits 0 once the child reports ready (a byte on a pipe),
/// 1 if the child fails first (its error already on the shared stderr).
pub(crate) fn daemonize() -> Result<std::io::PipeWriter> {
    let (mut from_child, to_parent) = std::io::pipe().context("Cannot create a pipe")?;
    // SAFETY: called before the runtime or any other thread starts, so the child is a full
    // copy of a single-threaded process and may run any code.
    match unsafe { libc::fork() } {
        -1 => bail!("Cannot fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(from_child);
            // SAFETY: setsid has no memory-safety preconditions.
            if unsafe { libc::setsid() } == -1 {
                bail!("Cannot setsid: {}", std::io::Error::last_os_error());
            }
            Ok(to_parent)
        }
        _ => {
            drop(to_parent);
            let mut b = [0u8; 1];
            let code = match from_child.read(&mut b) {
                Ok(1) => 0,
                _ => 1,
            };
            std::process::exit(code);
        }
    }
}

/// Points stdin, stdout and stderr at /dev/null, as QEMU does once daemonized (libvirt reads
/// the starting process's output until it is closed).
pub(crate) fn detach_stdio() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("Cannot open /dev/null")?;
    for fd in 0..=2 {
        // SAFETY: both descriptors are open; dup2 only replaces the standard ones, which
        // nothing else holds as owned Rust handles.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } == -1 {
            bail!(
                "Cannot redirect fd {fd}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// `-pidfile`: holds this process's id, removed on exit.
pub(crate) struct PidFile(PathBuf);

impl PidFile {
    pub(crate) fn write(path: String) -> Result<PidFile> {
        let path = PathBuf::from(path);
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("Cannot write the pid file {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
