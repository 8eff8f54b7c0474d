//! `ferry`: run a KVM VM with the built-in test guest.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use vmm::config::{self, GuestSpec, VmConfig};
use vmm::{RunState, Vm, VmError};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "A KVM VMM built around live migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM running the built-in test guest until interrupted or the guest stops.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Machine type (ferry-1.0, ferry-1.1, ferry-2.0, or ferry for the newest).
    #[arg(long, default_value = "ferry")]
    machine: String,
    /// Guest RAM, e.g. 64M, 512M, 4G.
    #[arg(long, default_value = "512M", value_parser = config::parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest workload: dirty[:MiB[,rate]] (rate = delay loops per page, 0 = full speed) or idle.
    #[arg(long, default_value = "dirty")]
    guest: GuestSpec,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain, e.g.
            // "/dev/kvm is not available: No such file or directory (os error 2)".
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let config = VmConfig {
        memory_size: args.memory,
        vcpus: args.vcpus,
        machine: machine_types::MachineType::lookup(&args.machine)?,
    };
    config
        .validate_for(&args.guest)
        .context("Invalid VM configuration")?;
    let mut vm =
        Vm::with_serial(&config, Box::new(std::io::stdout())).context("Cannot create the VM")?;
    vm.load_guest(&args.guest)
        .context("Cannot load the test guest")?;
    vm.resume().context("Cannot start the vCPUs")?;
    tracing::info!(guest = %args.guest, "guest running");
    let mut last = 0;
    loop {
        match vm.wait_for_pass(last + 1, Duration::from_secs(1)) {
            Ok(pass) => {
                if pass / 100 != last / 100 || last == 0 {
                    tracing::info!(pass, "guest progress");
                }
                last = pass;
            }
            Err(VmError::Wait(vmm::devices::progress::WaitError::Timeout { .. })) => {}
            Err(e) => return Err(e).context("Guest failed"),
        }
        if vm.run_state() == RunState::Shutdown {
            let reasons: Vec<String> = vm.vcpus().iter().filter_map(|v| v.exit_reason()).collect();
            bail!("Guest stopped: {}", reasons.join("; "));
        }
    }
}
