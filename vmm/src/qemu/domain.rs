//! A domain: `ferry qemu-compat` with a Ferry machine type runs a real VM, as `ferry run`
//! does, with the shape, monitor and serial port libvirt's command line gives it.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};
use vmm::Vm;
use vmm::config::{GuestSpec, VmConfig};
use vmm::control::{Chardev, Controller, DomainInfo, IncomingMode};
use vmm::qemu_argv::{Domain, Monitor, QemuArgs, SerialBackend};
use vmm::qmp::{EventBus, QmpConfig, QmpServer};

use super::{PidFile, daemonize, detach_stdio, dialect, on_term_signal};

pub fn run(args: QemuArgs) -> Result<()> {
    let QemuArgs {
        paused,
        monitor,
        pidfile,
        daemonize: detach,
        domain: Some(d),
    } = args
    else {
        bail!("Not a domain command line");
    };
    // Fork before any thread exists (the VM starts its vCPU threads); the parent exits once
    // the child serves QMP.
    let ready = if detach { Some(daemonize()?) } else { None };
    // Claimed before this process opens anything: the descriptors the caller passed beyond
    // stdio, the monitor and those `fd:N` names (libvirt's restore: `migrate-incoming fd:N`).
    let mut inherited = inherited_fds()?;
    let listener = match &monitor {
        Monitor::Fd(fd) => {
            let i = inherited
                .iter()
                .position(|(n, _)| n == fd)
                .with_context(|| format!("Option '-chardev': fd={fd} is not open"))?;
            Some(passed_listener(inherited.remove(i).1)?)
        }
        Monitor::Path(_) => None,
    };
    let incoming = match d.incoming.as_deref() {
        None => IncomingMode::None,
        Some("defer") => IncomingMode::Defer,
        Some(uri) => IncomingMode::Started(uri.to_owned()),
    };
    let prepared = check_secrets(&d)
        .and_then(|()| open_serial(&d, &mut inherited))
        .and_then(|(serial, chardevs)| {
            Ok((
                build_vm(&d, serial, incoming == IncomingMode::None)?,
                chardevs,
            ))
        });
    let (vm, chardevs) = match prepared {
        Ok(v) => v,
        Err(e) => super::fail_to_monitor(listener.as_ref().map(std::os::fd::AsRawFd::as_raw_fd), e),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    let events = EventBus::default();
    let ctl = Controller::new(vm, events.clone(), incoming.clone(), None);
    ctl.set_domain_info(DomainInfo {
        name: d.name.clone(),
        uuid: d.uuid.clone(),
        chardevs,
        devices: d
            .serial
            .iter()
            .filter_map(|s| Some((s.id.clone()?, "isa-serial")))
            .collect(),
    });
    for (n, fd) in inherited {
        ctl.add_passed_fd(n.to_string(), fd);
    }
    ctl.set_autostart(!paused);
    ctl.start_hotplug_service();
    let cfg = QmpConfig::new(dialect()).with_event_bus(events);
    let task = {
        let _guard = runtime.enter();
        let server = match (listener, &monitor) {
            (Some(l), _) => QmpServer::from_listener(l, ctl.clone(), cfg),
            (None, Monitor::Path(p)) => QmpServer::bind(p, ctl.clone(), cfg),
            (None, Monitor::Fd(_)) => bail!("The monitor descriptor was not claimed"),
        }
        .context("Cannot serve QMP")?;
        ctl.set_server(server.shutdown_handle());
        runtime.spawn(server.run())
    };
    let _pidfile = pidfile.map(PidFile::write).transpose()?;
    if let IncomingMode::Started(uri) = &incoming {
        ctl.start_incoming(uri)
            .map_err(anyhow::Error::msg)
            .context("Cannot start the incoming migration")?;
    } else if incoming == IncomingMode::None && !paused {
        ctl.start()
            .map_err(anyhow::Error::msg)
            .context("Cannot start the guest")?;
    }
    let on_signal = ctl.clone();
    on_term_signal(&runtime, move || on_signal.request_quit());
    tracing::info!(name = d.name.as_deref().unwrap_or(""), "domain serving QMP");
    if let Some(mut parent) = ready {
        detach_stdio()?;
        parent
            .write_all(&[1])
            .context("Cannot tell the parent process")?;
    }
    ctl.wait_quit();
    let _ = runtime
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), task).await });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}

/// libvirt's master key: Ferry keeps no encrypted data, but a file it cannot read is an
/// error, as for QEMU.
fn check_secrets(d: &Domain) -> Result<()> {
    for f in &d.secret_files {
        std::fs::metadata(f).with_context(|| format!("Cannot read the secret file {f}"))?;
    }
    Ok(())
}

/// The VM of `d`: created, its guest loaded (unless it comes from a migration), one
/// hot-pluggable core per vCPU above the boot ones.
fn build_vm(d: &Domain, serial: vmm::devices::uart::SerialOut, load: bool) -> Result<Vm> {
    let machine = machine_types::MachineType::lookup(&d.machine)?;
    let cpu_model = match d.cpu.as_deref() {
        None => None,
        Some(name) => Some(machine_types::CpuModel::by_name(name).ok_or_else(|| {
            vmm::config::ConfigError::CpuModel {
                model: name.to_owned(),
                machine: machine.name().to_owned(),
                valid: machine
                    .compat()
                    .cpu_models
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?),
    };
    let config = VmConfig {
        memory_size: d.memory,
        vcpus: d.vcpus,
        machine,
        cpu_model,
        hidden_host_features: Vec::new(),
    };
    let guest: GuestSpec = match &d.kernel {
        Some(k) => format!("bootsector:{k}").parse()?,
        None => GuestSpec::dirty_mib(vmm::config::DEFAULT_WORKING_SET_MIB),
    };
    config
        .validate_for(&guest)
        .context("Invalid VM configuration")?;
    let mut vm = Vm::with_serial(&config, serial).context("Cannot create the VM")?;
    dont_dump(&vm)?;
    let mut hp = vm
        .hotplug()
        .lock()
        .map_err(|_| anyhow::anyhow!("hotplug state poisoned"))?
        .config()
        .clone();
    hp.cpu_cores = u32::from(d.max_vcpus - d.vcpus);
    vm.configure_hotplug(hp)
        .context("Cannot make the hot-pluggable cores (-smp maxcpus)")?;
    if load {
        vm.check_host_runs(vm.cpu_model(), "this host")?;
        vm.load_guest(&guest).context("Cannot load the guest")?;
    }
    Ok(vm)
}

/// `dump-guest-core=off`: guest RAM stays out of this process's core dumps.
fn dont_dump(vm: &Vm) -> Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for r in vm.memory().iter() {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .context("Guest RAM has no host mapping")?;
        let len = usize::try_from(r.len()).context("Guest RAM region too large")?;
        // SAFETY: `[host, host + len)` is one mapping of guest RAM that `vm` keeps mapped;
        // MADV_DONTDUMP only changes what a core dump holds.
        if unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTDUMP) } != 0 {
            bail!(
                "Cannot leave guest RAM out of core dumps: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// `fd`, which must be a listening Unix socket (libvirt's monitor).
fn passed_listener(fd: OwnedFd) -> Result<std::os::unix::net::UnixListener> {
    use std::os::fd::AsRawFd;
    if !super::is_listening(fd.as_raw_fd()) {
        bail!(
            "Option '-chardev': fd={} is not a listening socket",
            fd.as_raw_fd()
        );
    }
    Ok(std::os::unix::net::UnixListener::from(fd))
}

/// Every descriptor above stdio this process inherited (call before opening any).
fn inherited_fds() -> Result<Vec<(i32, OwnedFd)>> {
    let numbers: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .context("Cannot list /proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&n| n > 2)
        .collect();
    // The listing's own descriptor is closed by now: only open ones are kept.
    let mut out = Vec::new();
    for n in numbers {
        // SAFETY: F_SETFD only sets the close-on-exec flag; a closed descriptor makes it fail.
        if unsafe { libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
            continue;
        }
        // SAFETY: `n` is open (F_SETFD succeeded) and was inherited: nothing in this process
        // owns it yet.
        out.push((n, unsafe { OwnedFd::from_raw_fd(n) }));
    }
    Ok(out)
}

/// The serial port's output and the chardevs `query-chardev` lists.
fn open_serial(
    d: &Domain,
    inherited: &mut Vec<(i32, OwnedFd)>,
) -> Result<(vmm::devices::uart::SerialOut, Vec<Chardev>)> {
    let Some(s) = &d.serial else {
        return Ok((Box::new(std::io::sink()), Vec::new()));
    };
    let (out, filename): (vmm::devices::uart::SerialOut, String) = match &s.backend {
        SerialBackend::Pty => {
            let (master, path) = open_pty()?;
            // As QEMU prints it (and older libvirt read it from the log).
            eprintln!("char device redirected to {path} (label {})", s.chardev);
            (Box::new(PtyOut(master)), format!("pty:{path}"))
        }
        // `-add-fd`: libvirt opened the file and passed it.
        SerialBackend::File { path, .. } if path.starts_with("/dev/fdset/") => {
            let fd = path
                .strip_prefix("/dev/fdset/")
                .and_then(|n| n.parse().ok())
                .and_then(|n: u32| d.fdsets.get(&n))
                .with_context(|| format!("Option '-chardev': path={path}: no such fdset"))?;
            let i = inherited
                .iter()
                .position(|(n, _)| n == fd)
                .with_context(|| format!("Option '-add-fd': fd={fd} is not open"))?;
            let f = std::fs::File::from(inherited.remove(i).1);
            (Box::new(f), format!("file:{path}"))
        }
        SerialBackend::File { path, append } => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(*append)
                .truncate(!*append)
                .open(path)
                .with_context(|| format!("Cannot open the serial output {path}"))?;
            (Box::new(f), format!("file:{path}"))
        }
    };
    Ok((
        out,
        vec![Chardev {
            label: s.chardev.clone(),
            filename,
        }],
    ))
}

/// A new pseudo-terminal in raw mode: its master (non-blocking) and the slave's path.
fn open_pty() -> Result<(std::fs::File, String)> {
    // SAFETY: posix_openpt takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("Cannot open a pty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by posix_openpt and nothing else owns it.
    let master = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `fd` is a pty master; ptsname_r writes a NUL-terminated name of at most
    // `name.len()` bytes.
    let ok = unsafe {
        libc::grantpt(fd) == 0
            && libc::unlockpt(fd) == 0
            && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
    };
    if !ok {
        bail!("Cannot set up the pty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: termios is plain data; tcgetattr fills it and tcsetattr reads it, on the
    // master this function owns.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
        libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
    }
    Ok((master, path))
}

/// The serial port's output on a pty master: what nobody reads is dropped when the pty's
/// buffer is full (as QEMU does), so the guest never blocks on its UART.
struct PtyOut(std::fs::File);

impl Write for PtyOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Ok(n) => Ok(n),
            // Full (nobody reading) or hung up (the reader left): the bytes are dropped.
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::EIO) =>
            {
                Ok(buf.len())
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
