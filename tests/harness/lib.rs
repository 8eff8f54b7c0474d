//! The harness the end-to-end suites share: real `ferry` processes driven over QMP.
//!
//! - [`bins`]: where `ferry`, `ferry-dump` and the `qmp_demo` example are (built on demand);
//! - [`ferry`]: a `ferry run` process with its QMP client and bounded waits;
//! - [`relay`]: one-connection TCP relays that cut, stall, reset, delay or drop traffic;
//! - [`python`]: the Python with `qemu.qmp`, and bounded waits on child processes.
//!
//! Every wait is bounded by [`TIMEOUT`] (or a stated multiple) and fails saying what did not
//! happen, with the process's log. Nothing skips: a missing `/dev/kvm` fails the test.

pub mod bins;
pub mod ferry;
pub mod python;
pub mod relay;

pub use ferry::{Ferry, completes_under_load, read, require_kvm, strings, tempdir};
pub use vmm::qmp::client::{ClientError, QmpClient};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bound on every wait in the suites.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The repository root (the workspace holding `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `tests/` folder of this crate (the Python scripts are in `tests/py/`).
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What one run of `ferry-dump` produced.
#[derive(Debug)]
pub struct DumpOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ferry-dump ARGS` in `dir` (so file names in its output are relative and stable).
pub fn ferry_dump(dir: &Path, args: &[&str]) -> DumpOutput {
    let o = std::process::Command::new(bins::ferry_dump())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run ferry-dump");
    DumpOutput {
        code: o.status.code().expect("ferry-dump exited by a signal"),
        stdout: String::from_utf8(o.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(o.stderr).expect("stderr is UTF-8"),
    }
}
