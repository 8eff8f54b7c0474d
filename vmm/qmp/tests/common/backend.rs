//! A small QMP backend for tests and `examples/qmp_demo.rs`: run state with
//! stop/cont events, a device that can be deleted, and a few `x-` helpers.

use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use ferry_qmp::{Args, EventBus, QmpBackend, QmpError, ShutdownHandle};
use serde_json::{Map, Value, json};

/// How long `x-block` waits for `x-release` before giving up.
const BLOCK_LIMIT: Duration = Duration::from_secs(10);

pub struct DemoVm {
    events: EventBus,
    running: Mutex<bool>,
    devices: Mutex<Vec<String>>,
    released: Mutex<bool>,
    release_cv: Condvar,
    shutdown: OnceLock<ShutdownHandle>,
}

impl DemoVm {
    pub fn new(events: EventBus) -> Self {
        Self {
            events,
            running: Mutex::new(true),
            devices: Mutex::new(vec!["dev0".to_owned()]),
            released: Mutex::new(false),
            release_cv: Condvar::new(),
            shutdown: OnceLock::new(),
        }
    }

    /// Lets `quit` stop the server.
    pub fn set_shutdown(&self, handle: ShutdownHandle) {
        let _ = self.shutdown.set(handle);
    }

    fn set_running(&self, running: bool, event: &str) {
        let mut state = self.running.lock().unwrap();
        if *state != running {
            *state = running;
            self.events.emit(event, None);
        }
    }
}

impl QmpBackend for DemoVm {
    fn commands(&self) -> Vec<&'static str> {
        vec![
            "query-status",
            "stop",
            "cont",
            "device_del",
            "quit",
            "x-echo",
            "x-typed",
            "x-block",
            "x-release",
            "x-panic",
        ]
    }

    fn execute(&self, command: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        let mut args = Args::new(arguments);
        match command {
            "query-status" => {
                args.finish()?;
                let running = *self.running.lock().unwrap();
                let status = if running { "running" } else { "paused" };
                Ok(json!({"running": running, "singlestep": false, "status": status}))
            }
            "stop" => {
                args.finish()?;
                self.set_running(false, "STOP");
                Ok(json!({}))
            }
            "cont" => {
                args.finish()?;
                self.set_running(true, "RESUME");
                Ok(json!({}))
            }
            "device_del" => {
                let id = args.required_str("id")?;
                args.finish()?;
                let mut devices = self.devices.lock().unwrap();
                let Some(pos) = devices.iter().position(|d| *d == id) else {
                    return Err(QmpError::device_not_found(&id));
                };
                devices.remove(pos);
                let path = format!("/machine/peripheral/{id}");
                self.events
                    .emit("DEVICE_DELETED", Some(json!({"device": id, "path": path})));
                Ok(json!({}))
            }
            "quit" => {
                args.finish()?;
                self.events.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                );
                if let Some(handle) = self.shutdown.get() {
                    handle.shutdown();
                }
                Ok(json!({}))
            }
            // Returns its arguments unchanged.
            "x-echo" => Ok(Value::Object(args.into_rest())),
            // `name: str, *count: int, *flag: bool`.
            "x-typed" => {
                let name = args.required_str("name")?;
                let count = args.optional_i64("count")?;
                let flag = args.optional_bool("flag")?;
                args.finish()?;
                Ok(json!({"name": name, "count": count, "flag": flag}))
            }
            // Emits X_BLOCK_STARTED, blocks until some client runs x-release, then emits
            // X_BLOCK_DONE.
            "x-block" => {
                args.finish()?;
                let released = self.released.lock().unwrap();
                // Under the lock: an x-release that follows the event is not missed.
                self.events.emit("X_BLOCK_STARTED", None);
                let (released, timeout) = self
                    .release_cv
                    .wait_timeout_while(released, BLOCK_LIMIT, |r| !*r)
                    .unwrap();
                drop(released);
                if timeout.timed_out() {
                    return Err(QmpError::generic("x-block was never released"));
                }
                self.events.emit("X_BLOCK_DONE", None);
                Ok(json!({}))
            }
            "x-release" => {
                args.finish()?;
                *self.released.lock().unwrap() = true;
                self.release_cv.notify_all();
                Ok(json!({}))
            }
            "x-panic" => panic!("x-panic was called"),
            other => Err(QmpError::unknown_command(other)),
        }
    }
}
