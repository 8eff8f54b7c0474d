//! The real `qemu.qmp` Python client drives a live migration between two real `ferry`
//! processes (tests/py/test_ferry_migration.py).

#[path = "ferry_common/mod.rs"]
mod ferry_common;

use ferry_common::*;
use std::process::{Command, Stdio};
use std::sync::mpsc;

fn python() -> std::path::PathBuf {
    let p = std::env::var_os("FERRY_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
        });
    assert!(
        p.exists(),
        "Python with qemu.qmp not found at {}: run scripts/test.sh (it creates .venv) or set FERRY_PYTHON",
        p.display()
    );
    p
}

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
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/test_ferry_migration.py");
    let child = Command::new(python())
        .arg(script)
        .arg(&src.socket)
        .arg(&dst.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run python");
    // The script bounds each of its waits by 30 s; the whole run gets a bound too, so a hang
    // fails with the logs instead of waiting for the harness to kill the test.
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(TIMEOUT * 5) {
        Ok(out) => out.expect("python output"),
        Err(_) => {
            // Only the process this test started, by its pid.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!(
                "test_ferry_migration.py (pid {pid}) did not finish within {:?}\nsrc log:\n{}\ndst log:\n{}",
                TIMEOUT * 5,
                read(&src.log),
                read(&dst.log)
            );
        }
    };
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "python client failed:\nstdout:\n{}\nstderr:\n{}\nsrc log:\n{}\ndst log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        read(&src.log),
        read(&dst.log)
    );
}
