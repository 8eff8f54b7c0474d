//! `ferry`: run a KVM VM with the built-in test guest, controlled over QMP, and migrate it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use vmm::config::{self, GuestSpec, VmConfig};
use vmm::control::{Controller, IncomingMode};
use vmm::qmp::{EventBus, QmpConfig, QmpServer, VersionInfo};
use vmm::{RunState, Vm};

mod demo;
mod qemu;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "A KVM VMM built around live migration of hot-plugged guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM running the built-in test guest (or wait for an incoming migration).
    Run(Box<RunArgs>),
    /// List the machine types.
    Machines,
    /// Ferry's main job: live-migrate a running guest between two ferry processes over
    /// loopback and verify the result.
    Demo(demo::DemoArgs),
    /// Take QEMU's command line, as libvirt runs an emulator (see README "libvirt"): a
    /// capability probe (`-machine none`) or a domain (a Ferry machine type).
    QemuCompat {
        /// QEMU's arguments, e.g. `-machine none,accel=kvm -qmp unix:PATH,server=on,wait=off`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write libvirt's CPU map with Ferry's CPU models added, so `virsh domcapabilities`
    /// lists them (libvirt shows only the models its map describes).
    LibvirtCpuMap {
        /// libvirt's map to start from.
        #[arg(long, default_value = "/usr/share/libvirt/cpu_map")]
        from: PathBuf,
        /// Where to write the extended map (may be `--from` itself).
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Machine type (`help` lists them); `ferry` is the newest.
    #[arg(long, default_value = "ferry")]
    machine: String,
    /// CPU model (`help` lists them); default: the machine type's.
    #[arg(long)]
    cpu: Option<String>,
    /// Guest RAM, e.g. 64M, 512M, 4G.
    #[arg(long, default_value = "512M", value_parser = config::parse_size)]
    memory: u64,
    /// Number of boot vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest workload: `dirty[:MiB[,rate]]` (rate = delay loops per page, 0 = full speed), idle,
    /// or bootsector:FILE (a 512-byte image entered in real mode at 0x7c00).
    #[arg(long, default_value = "dirty")]
    guest: GuestSpec,
    /// QMP control socket, `unix:PATH` (created with mode 0600).
    #[arg(long)]
    qmp: Option<String>,
    /// Wait for an incoming migration: `tcp:HOST:PORT`, `file:PATH` or `defer` (then
    /// `migrate-incoming`).
    #[arg(long)]
    incoming: Option<String>,
    /// Do not start the guest; wait for `cont` (QEMU's -S).
    #[arg(short = 'S', long = "paused")]
    paused: bool,
    /// Write the guest's COM1 output to this file (e.g. /dev/stdout); discarded by default.
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Keep a copy of every migration stream this process sends or receives.
    #[arg(long)]
    dump_stream: Option<PathBuf>,
    /// How the test guest answers unplug requests.
    #[arg(long, default_value = "cooperative", value_parser = ["cooperative", "refuse", "ignore", "slow"])]
    guest_hotplug: String,
    /// Guest-running milliseconds an unplug may stay unanswered before it fails.
    #[arg(long, default_value_t = 15_000)]
    unplug_timeout_ms: u64,
    /// Debug: do not reset the connectors before loading an incoming stream (shows why the
    /// reset is needed).
    #[arg(long = "x-skip-incoming-reset")]
    x_skip_incoming_reset: bool,
    /// Create an object, as QMP `object-add` would: QEMU's `TYPE,id=ID,key=value` form or a
    /// JSON object (e.g. `tls-creds-x509,id=tls0,dir=/etc/ferry/pki,endpoint=server`).
    #[arg(long = "object", value_name = "SPEC")]
    objects: Vec<String>,
    /// Set a migration parameter, as `migrate-set-parameters` would:
    /// `migration.KEY=VALUE` (e.g. `migration.tls-creds=tls0`).
    #[arg(long = "global", value_name = "migration.KEY=VALUE")]
    globals: Vec<String>,
    /// Test only: treat these CPUID features (e.g. `avx2,aes`) as absent from this host, to
    /// exercise the refusal of a CPU model or a stream the host cannot run.
    #[arg(long = "x-hide-host-features")]
    x_hide_host_features: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Machines => {
            print!("{}", machine_types::help_text());
            Ok(())
        }
        Command::Demo(args) => demo::run(args),
        Command::QemuCompat { args } => qemu::run(&args),
        Command::LibvirtCpuMap { from, to } => qemu::write_cpu_map(&from, &to),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--cpu help`: the machine type's CPU models, the default first, and what this host lacks.
fn cpu_help(machine: &'static machine_types::MachineType) -> String {
    let host = vmm::vcpu::cpuid::host_support();
    let mut out = format!("CPU models of machine type {machine}:\n");
    for (i, m) in machine.compat().cpu_models.iter().enumerate() {
        let default = if i == 0 { " (default)" } else { "" };
        let here = match &host {
            Ok((cpuid, msrs)) => {
                let lacks = m.host_lacks(cpuid, msrs);
                if lacks.is_empty() {
                    String::new()
                } else {
                    format!(" [this host lacks {}]", lacks.join(", "))
                }
            }
            Err(e) => format!(" [host support unknown: {e}]"),
        };
        out.push_str(&format!(
            "{:<13} {}{default}{here}\n",
            m.name(),
            m.description()
        ));
    }
    out
}

fn run(args: RunArgs) -> Result<()> {
    if args.machine == "help" {
        print!("{}", machine_types::help_text());
        return Ok(());
    }
    let machine = machine_types::MachineType::lookup(&args.machine)?;
    if args.cpu.as_deref() == Some("help") {
        print!("{}", cpu_help(machine));
        return Ok(());
    }
    let cpu_model = args
        .cpu
        .as_deref()
        .map(config::parse_cpu_model)
        .transpose()?;
    let config = VmConfig {
        memory_size: args.memory,
        vcpus: args.vcpus,
        machine,
        cpu_model,
        hidden_host_features: config::parse_features(
            args.x_hide_host_features.as_deref().unwrap_or_default(),
        )?,
    };
    config
        .validate_for(&args.guest)
        .context("Invalid VM configuration")?;
    let serial: vmm::devices::uart::SerialOut = match &args.serial {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("Cannot open the serial output {}", p.display()))?,
        ),
        None => Box::new(std::io::sink()),
    };
    let mut vm = Vm::with_serial(&config, serial).context("Cannot create the VM")?;
    let incoming = match args.incoming.as_deref() {
        None => IncomingMode::None,
        Some("defer") => IncomingMode::Defer,
        Some(uri) => IncomingMode::Started(uri.to_owned()),
    };
    // A destination gets its guest (memory and vCPU state) from the stream.
    if incoming == IncomingMode::None {
        // A destination checks the stream's model at the handshake instead, so the source
        // hears why.
        vm.check_host_runs(vm.cpu_model(), "this host")?;
        vm.load_guest(&args.guest)
            .context("Cannot load the test guest")?;
        let mode = match args.guest_hotplug.as_str() {
            "refuse" => vmm::guest::GuestHotplugMode::Refuse,
            "ignore" => vmm::guest::GuestHotplugMode::Ignore,
            "slow" => vmm::guest::GuestHotplugMode::Slow,
            _ => vmm::guest::GuestHotplugMode::Cooperative,
        };
        vm.set_guest_hotplug_mode(mode)
            .context("Cannot set the guest's hotplug mode")?;
    }
    if args.unplug_timeout_ms != 15_000 {
        let mut cfg = vm
            .hotplug()
            .lock()
            .map_err(|_| anyhow::anyhow!("hotplug state poisoned"))?
            .config()
            .clone();
        cfg.unplug_timeout_ms = args.unplug_timeout_ms;
        vm.configure_hotplug(cfg)
            .context("Invalid --unplug-timeout-ms")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    let events = EventBus::default();
    let ctl = Controller::new(
        vm,
        events.clone(),
        incoming.clone(),
        args.dump_stream.clone(),
    );
    for spec in &args.objects {
        ctl.add_object_arg(spec).map_err(anyhow::Error::msg)?;
    }
    for spec in &args.globals {
        ctl.set_global(spec).map_err(anyhow::Error::msg)?;
    }
    ctl.set_autostart(!args.paused);
    ctl.set_skip_incoming_reset(args.x_skip_incoming_reset);
    ctl.start_hotplug_service();
    // A TCP listener is bound before the QMP socket opens, so a client that connects finds
    // `socket-address` in `query-migrate` at once.
    let tcp_incoming = matches!(&incoming, IncomingMode::Started(u) if u.starts_with("tcp:"));
    if let IncomingMode::Started(uri) = &incoming
        && tcp_incoming
    {
        start_incoming(&ctl, uri)?;
    }
    let server_task = match &args.qmp {
        Some(spec) => {
            let path = spec
                .strip_prefix("unix:")
                .with_context(|| format!("Invalid --qmp '{spec}': expected unix:PATH"))?;
            let version = VersionInfo::new(0, 1, 0, concat!("ferry ", env!("CARGO_PKG_VERSION")));
            let cfg = QmpConfig::new(version).with_event_bus(events);
            let _guard = runtime.enter();
            let server =
                QmpServer::bind(path, ctl.clone(), cfg).context("Cannot open the QMP socket")?;
            ctl.set_server(server.shutdown_handle());
            let task = runtime.spawn(server.run());
            tracing::info!(path, "QMP listening");
            Some(task)
        }
        None => None,
    };
    if let IncomingMode::Started(uri) = &incoming
        && !tcp_incoming
    {
        start_incoming(&ctl, uri)?;
    } else if incoming == IncomingMode::None && !args.paused {
        ctl.start()
            .map_err(anyhow::Error::msg)
            .context("Cannot start the guest")?;
        tracing::info!(guest = %args.guest, "guest running");
    }
    let on_signal = ctl.clone();
    qemu::on_term_signal(&runtime, move || {
        tracing::info!("signal received");
        on_signal.request_quit();
    });
    ctl.wait_quit();
    tracing::info!(state = ctl.run_state().as_str(), "quitting");
    if ctl.run_state() == RunState::Shutdown {
        bail!("Guest stopped");
    }
    // Let the QMP server finish: `quit`'s reply and the SHUTDOWN event reach the clients
    // before the process exits.
    if let Some(task) = server_task {
        let _ =
            runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

fn start_incoming(ctl: &Arc<Controller>, uri: &str) -> Result<()> {
    ctl.start_incoming(uri)
        .map_err(anyhow::Error::msg)
        .context("Cannot start the incoming migration")?;
    tracing::info!(uri, "waiting for the incoming migration");
    Ok(())
}
