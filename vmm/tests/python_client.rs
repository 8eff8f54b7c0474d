//! The real `qemu.qmp` Python client against `examples/qmp_demo.rs`.
//!
//! Needs a Python with `qemu.qmp` installed: `$FERRY_PYTHON`, by default
//! `.venv/bin/python` in this crate (`python3 -m venv .venv &&
//! .venv/bin/pip install qemu.qmp`). Fails, rather than skips, without it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(90);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let python = match std::env::var_os("FERRY_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => manifest_dir().join("../.venv/bin/python"),
    };
    let hint = "create it with `python3 -m venv .venv && .venv/bin/pip install qemu.qmp` \
                in the workspace root (scripts/test.sh does), or point FERRY_PYTHON at a python that has qemu.qmp";
    assert!(
        python.exists(),
        "Python for the qemu.qmp test not found at {}: {hint}",
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

/// `target/<profile>/examples/qmp_demo`, built by `cargo test` with the
/// tests; built here if this test target was selected alone.
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let demo = profile_dir.join("examples").join("qmp_demo");
    if !demo.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = profile_dir.parent().unwrap();
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", "qmp_demo", "--manifest-path"])
            .arg(manifest_dir().join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir.file_name() == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build --example qmp_demo");
        assert!(status.success(), "building examples/qmp_demo failed");
    }
    assert!(demo.exists(), "{} missing after build", demo.display());
    demo
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Wait for `child` to exit, at most `timeout`; kill it past that.
fn wait_output(child: Child, timeout: Duration, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // Only the process we started, by its pid.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{what} (pid {pid}) did not finish within {timeout:?}");
        }
    }
}

#[test]
fn qemu_qmp_python_client() {
    let python = python();
    let demo = demo_binary();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qmp.sock");

    let mut server = Command::new(&demo)
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qmp_demo");
    let stdout = server.stdout.take().unwrap();
    let mut server = Reaper(Some(server));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx
        .recv_timeout(TIMEOUT)
        .expect("qmp_demo did not report READY");
    assert_eq!(ready.trim(), "READY");

    let script = manifest_dir().join("tests/py/test_qmp_client.py");
    let client = Command::new(&python)
        .arg(&script)
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let out = wait_output(client, TIMEOUT, "test_qmp_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "qemu.qmp client failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );

    // The script ended with `quit`: the server exits by itself.
    let child = server.0.take().unwrap();
    let status = wait_output(child, TIMEOUT, "qmp_demo").status;
    assert!(status.success(), "qmp_demo exited with {status}");
    assert!(!socket.exists(), "socket file left behind");
}
