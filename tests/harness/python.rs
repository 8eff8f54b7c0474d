//! The Python with the real `qemu.qmp` client, and bounded waits on child processes.

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::mpsc;
use std::time::Duration;

/// Bound on one Python script's whole run (each of its own waits is bounded by 30 s).
pub const PYTHON_TIMEOUT: Duration = Duration::from_secs(150);

/// `$FERRY_PYTHON`, else `.venv/bin/python` in the workspace root (what `scripts/test.sh`
/// creates); fails, never skips, when it is missing or cannot import `qemu.qmp`.
pub fn python() -> PathBuf {
    let python = match std::env::var_os("FERRY_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => crate::repo_root().join(".venv/bin/python"),
    };
    let hint = "create it with `python3 -m venv .venv && .venv/bin/pip install qemu.qmp` in the \
                workspace root (scripts/test.sh does), or point FERRY_PYTHON at a python that \
                has qemu.qmp";
    assert!(
        python.exists(),
        "Python with qemu.qmp not found at {}: {hint}",
        python.display()
    );
    let probe = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        probe.status.success(),
        "{} cannot import qemu.qmp ({}): {hint}",
        python.display(),
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    python
}

/// `tests/py/NAME`, a script of these suites.
pub fn script(name: &str) -> PathBuf {
    crate::tests_dir().join("py").join(name)
}

/// Kills the child on drop, so a failing test leaves no process behind.
#[derive(Debug)]
pub struct Reaper(pub Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` to exit, at most `timeout`; past that kills it (by its pid, only the
/// process this test started) and returns `Err` naming `what`.
pub fn wait_output(child: Child, timeout: Duration, what: &str) -> Result<Output, String> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => Ok(output.unwrap_or_else(|e| panic!("{what} (pid {pid}): {e}"))),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            Err(format!(
                "{what} (pid {pid}) did not finish within {timeout:?}"
            ))
        }
    }
}
