//! The control plane as clients see it: the `ferry` command line's refusals, fifty QMP
//! clients during a migration, and the real Python `qemu.qmp` client (against a `ferry`
//! migration and against vmm's `qmp_demo` example). Needs KVM and the `.venv` Python of
//! `scripts/test.sh`; nothing skips.

mod cli;
mod load;
mod python_client;
mod python_ferry;
mod sched;
