//! The real `qemu.qmp` Python client drives a live migration between two real `ferry`
//! processes (tests/py/test_ferry_migration.py).

use ferry_tests::python::{PYTHON_TIMEOUT, python, script, wait_output};
use ferry_tests::*;
use std::process::{Command, Stdio};

#[test]
fn qemu_qmp_client_follows_a_live_migration() {
    let dir = tempdir();
    let args = [
        "--machine",
        "ferry-2.0",
        "--memory",
        "64M",
        "--guest",
        "dirty:4",
    ];
    let mut dst_args = args.to_vec();
    dst_args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let dst = Ferry::spawn(dir.path(), "dst", &dst_args);
    let src = Ferry::spawn(dir.path(), "src", &args);
    let child = Command::new(python())
        .arg(script("test_ferry_migration.py"))
        .arg(&src.socket)
        .arg(&dst.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run python");
    // The script bounds each of its waits by 30 s; the whole run gets a bound too, so a hang
    // fails with the logs instead of waiting for the harness to kill the test.
    let out = wait_output(child, PYTHON_TIMEOUT, "test_ferry_migration.py").unwrap_or_else(|e| {
        panic!(
            "{e}\nsrc log:\n{}\ndst log:\n{}",
            read(&src.log),
            read(&dst.log)
        )
    });
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "python client failed:\nstdout:\n{}\nstderr:\n{}\nsrc log:\n{}\ndst log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        read(&src.log),
        read(&dst.log)
    );
}
