//! The real `qemu.qmp` Python client against ferry-qmp's `examples/qmp_demo.rs` (a QMP server
//! without a VM).
//!
//! Needs a Python with `qemu.qmp` installed: `$FERRY_PYTHON`, by default `.venv/bin/python`
//! in the workspace root (`scripts/test.sh` creates it). Fails, rather than skips, without it.

use ferry_tests::bins;
use ferry_tests::python::{PYTHON_TIMEOUT, Reaper, python, script, wait_output};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

#[test]
fn qemu_qmp_python_client() {
    let python = python();
    let demo = bins::qmp_demo();
    let dir = ferry_tests::tempdir();
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
        .recv_timeout(PYTHON_TIMEOUT)
        .expect("qmp_demo did not report READY");
    assert_eq!(ready.trim(), "READY");

    let script = script("test_qmp_client.py");
    let client = Command::new(&python)
        .arg(&script)
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let out =
        wait_output(client, PYTHON_TIMEOUT, "test_qmp_client.py").unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "qemu.qmp client failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );

    // The script ended with `quit`: the server exits by itself.
    let child = server.0.take().unwrap();
    let status = wait_output(child, PYTHON_TIMEOUT, "qmp_demo")
        .unwrap_or_else(|e| panic!("{e}"))
        .status;
    assert!(status.success(), "qmp_demo exited with {status}");
    assert!(!socket.exists(), "socket file left behind");
}
