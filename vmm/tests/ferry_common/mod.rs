//! Spawning real `ferry` processes for end-to-end tests, each with its own QMP socket.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm::qmp::client::QmpClient;

/// Bound on every wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Fail loudly, never skip, when KVM is missing.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the end-to-end tests need KVM (they do not skip)"
    );
}

/// `migrate-set-parameters` for tests whose subject is not convergence. A dirtying guest in
/// a debug build on a loaded 2-core host measures a low bandwidth: its migration can stay
/// above the default 300 ms downtime limit for all of the default 30 passes (and fail, not
/// converged) or run past [`TIMEOUT`]. With these it switches over as soon as 3 s of
/// downtime fits, and after 10 passes at the latest.
pub fn completes_under_load() -> Value {
    json!({
        "downtime-limit": 3000,
        "__org.ferry_max-iterations": 10,
        "__org.ferry_switchover-policy": "force",
    })
}

/// A running `ferry run` process.
pub struct Ferry {
    pub child: Child,
    pub qmp: QmpClient,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Ferry {
    /// Start `ferry run ARGS --qmp unix:DIR/NAME.qmp` and connect to it.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Ferry {
        require_kvm();
        let socket = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("run")
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start ferry");
        let qmp = QmpClient::connect(&socket, TIMEOUT)
            .unwrap_or_else(|e| panic!("{name} did not open its QMP socket: {e}\n{}", read(&log)));
        Ferry {
            child,
            qmp,
            socket,
            log,
        }
    }

    /// Run a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.qmp
            .execute(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd} failed: {e}\nlog:\n{}", read(&self.log)))
    }

    /// Run a command that must fail; returns its description.
    pub fn err(&mut self, cmd: &str, args: Value) -> String {
        match self.qmp.execute(cmd, args) {
            Ok(v) => panic!("{cmd} unexpectedly succeeded: {v}"),
            Err(e) => e.to_string(),
        }
    }

    pub fn status(&mut self) -> String {
        self.ok("query-status", json!({}))["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn pass(&mut self) -> u64 {
        self.ok("__org.ferry_query-guest", json!({}))["pass"]
            .as_u64()
            .unwrap()
    }

    /// Wait until the guest's pass counter reaches `target`.
    pub fn wait_pass(&mut self, target: u64) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let p = self.pass();
            if p >= target {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "guest stuck at pass {p}, wanted {target}"
            );
            // Poll, do not spin: a QMP round trip per iteration would keep the test and the
            // ferry process busy on the cores the guest's vCPU needs.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for query-migrate to reach one of `statuses`.
    pub fn wait_migration(&mut self, statuses: &[&str]) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = self.ok("query-migrate", json!({}));
            if statuses.iter().any(|s| info["status"] == *s) {
                return info;
            }
            assert!(Instant::now() < deadline, "migration stuck: {info}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The destination's listening port.
    pub fn incoming_port(&mut self) -> String {
        let info = self.ok("query-migrate", json!({}));
        info["socket-address"][0]["port"]
            .as_str()
            .expect("no listening port")
            .to_owned()
    }

    /// The connector holding `device` (from `__org.ferry_query-connectors`).
    pub fn connector(&mut self, device: &str) -> Value {
        let l = self.ok("__org.ferry_query-connectors", json!({}));
        l.as_array()
            .unwrap()
            .iter()
            .find(|c| c["device"] == device)
            .cloned()
            .unwrap_or_else(|| panic!("no connector holds {device}: {l}"))
    }

    /// Wait until the connector holding `device` satisfies `pred`; `what` names the wait.
    pub fn wait_connector(
        &mut self,
        device: &str,
        pred: impl Fn(&Value) -> bool,
        what: &str,
    ) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let c = self.connector(device);
            if pred(&c) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{device}: {what} never happened: {c}\n{}",
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "ferry did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A fresh directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
