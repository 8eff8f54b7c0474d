//! Replays libvirt's probe without libvirt: `ferry qemu-compat` started with libvirt's argv,
//! every recorded command sent over its Unix socket as libvirt sent it, every reply checked
//! against the recorded one (error class, or the shape of the return value), plus what
//! libvirt needs of the values themselves.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use ferry_tests::{TIMEOUT, require_kvm, tempdir};
use serde_json::{Value, json};

use crate::support::{Daemon, probe_argv};

/// The fixture `record-probe.sh` wrote.
fn fixture() -> Value {
    let path = ferry_tests::tests_dir().join("libvirt/probe.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("probe.json is JSON")
}

/// Whether `live` has the shape of `recorded`: the same JSON types, the same object keys,
/// and every array element shaped like one of the recorded elements (a recorded empty
/// array says only "an array": host-dependent lists such as unavailable features).
fn same_shape(live: &Value, recorded: &Value, path: &str) -> Result<(), String> {
    match (live, recorded) {
        (Value::Object(l), Value::Object(r)) => {
            let lk: BTreeSet<_> = l.keys().collect();
            let rk: BTreeSet<_> = r.keys().collect();
            if lk != rk {
                return Err(format!(
                    "{path}: keys differ: only now {:?}, only recorded {:?}",
                    lk.difference(&rk).collect::<Vec<_>>(),
                    rk.difference(&lk).collect::<Vec<_>>()
                ));
            }
            l.iter()
                .try_for_each(|(k, v)| same_shape(v, &r[k], &format!("{path}.{k}")))
        }
        (Value::Array(l), Value::Array(r)) => {
            if r.is_empty() {
                return Ok(());
            }
            if l.is_empty() {
                return Err(format!("{path}: empty, recorded {} elements", r.len()));
            }
            for (i, e) in l.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if !r.iter().any(|x| same_shape(e, x, &p).is_ok()) {
                    return Err(format!("{p}: shaped like no recorded element: {e}"));
                }
            }
            Ok(())
        }
        (Value::Null, Value::Null)
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_)) => Ok(()),
        _ => Err(format!("{path}: {live} where {recorded} was recorded")),
    }
}

/// One QMP line out, the reply (events skipped) back; reads are bounded by `TIMEOUT`.
struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Monitor {
    fn connect(path: &std::path::Path) -> (Monitor, Value) {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
        s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        let mut m = Monitor {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        };
        let greeting = m.read("the greeting");
        (m, greeting)
    }

    fn read(&mut self, what: &str) -> Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("no {what} within {TIMEOUT:?}: {e}"));
        assert!(n > 0, "the monitor closed before {what}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {line}"))
    }

    fn request(&mut self, msg: &Value) -> Value {
        self.writer
            .write_all(format!("{msg}\r\n").as_bytes())
            .expect("write to the monitor");
        loop {
            let v = self.read(&format!("a reply to {msg}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

#[test]
fn replays_libvirts_probe() {
    require_kvm();
    let fx = fixture();
    let recorded_argv: Vec<String> =
        serde_json::from_value(fx["argv"].clone()).expect("argv is a list of strings");
    let dir = tempdir();
    let (argv, socket, pidfile) = probe_argv(&recorded_argv, dir.path());
    let daemon = Daemon::start(&argv, &pidfile);

    let (mut mon, greeting) = Monitor::connect(&socket);
    let v = &greeting["QMP"]["version"];
    assert_eq!(
        (&v["qemu"]["major"], &v["qemu"]["minor"]),
        (&json!(7), &json!(2)),
        "the QMP dialect version (libvirt needs >= 4.2.0): {greeting}"
    );
    assert!(
        v["package"]
            .as_str()
            .is_some_and(|p| p.starts_with("ferry ")),
        "Ferry's own version goes in `package`: {greeting}"
    );

    let exchanges = fx["exchanges"].as_array().expect("exchanges");
    let mut live = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    for (i, x) in exchanges.iter().enumerate() {
        let mut msg = json!({"execute": x["execute"], "id": format!("replay-{i}")});
        if let Some(a) = x.get("arguments") {
            msg["arguments"] = a.clone();
        }
        let reply = mon.request(&msg);
        assert_eq!(
            reply["id"], msg["id"],
            "reply to {msg} has the wrong id: {reply}"
        );
        let recorded = &x["reply"];
        let outcome = match (reply.get("return"), recorded.get("return")) {
            (Some(l), Some(r)) => same_shape(l, r, "return"),
            (None, None) if reply["error"]["class"] == recorded["error"]["class"] => Ok(()),
            _ => Err(format!("got {reply}, recorded {recorded}")),
        };
        if let Err(e) = outcome {
            failures.push(format!("{msg}: {e}"));
        }
        live.insert(x["execute"].as_str().unwrap_or_default().to_owned(), reply);
    }
    assert!(
        failures.is_empty(),
        "{} of {} replies differ from the recording:\n{}",
        failures.len(),
        exchanges.len(),
        failures.join("\n")
    );

    // What libvirt needs of the values.
    let names = |cmd: &str| -> BTreeSet<String> {
        live[cmd]["return"]
            .as_array()
            .unwrap_or_else(|| panic!("{cmd} answered {}", live[cmd]))
            .iter()
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect()
    };
    let machines: BTreeSet<String> = machine_types::all()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    assert_eq!(names("query-machines"), machines);
    let models: BTreeSet<String> = machine_types::cpu::ALL_MODELS
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    assert_eq!(names("query-cpu-definitions"), models);
    assert_eq!(
        live["query-kvm"]["return"],
        json!({"enabled": true, "present": true})
    );
    // Every command query-commands lists is described by query-qmp-schema.
    let schema = &live["query-qmp-schema"]["return"];
    let described: BTreeSet<String> = schema
        .as_array()
        .expect("schema")
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names("query-commands"), described);
    // The probe process has no VM, and says so.
    let reply = mon.request(&json!({"execute": "query-status"}));
    assert_eq!(
        reply["error"]["desc"],
        "query-status needs a VM; this process was started with -machine none",
        "{reply}"
    );
    // libvirt asks these only when qom-list-types has sev-guest / sgx-epc (Ferry has
    // neither); answered as QEMU does on a host without them.
    for absent in ["query-sev-capabilities", "query-sgx-capabilities"] {
        let reply = mon.request(&json!({"execute": absent}));
        assert_eq!(reply["error"]["class"], "GenericError", "{absent}: {reply}");
    }
    // libvirt stops the probe with SIGTERM; the process cleans up after itself.
    drop(mon);
    daemon.terminate();
    assert!(!pidfile.exists(), "the pid file outlived the process");
    assert!(!socket.exists(), "the QMP socket outlived the process");
}

#[test]
fn refuses_what_it_cannot_honour() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(ferry_tests::bins::ferry())
            .arg("qemu-compat")
            .args(args)
            .output()
            .expect("run ferry qemu-compat");
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let qmp = "unix:/nonexistent/q,server=on,wait=off";
    let err = run(&["-machine", "none,accel=tcg", "-qmp", qmp]);
    assert!(err.contains("accel=tcg: Ferry runs on kvm only"), "{err}");
    let err = run(&["-machine", "none", "-qmp", qmp, "-vnc", ":0"]);
    assert!(err.contains("Unsupported option '-vnc'"), "{err}");
    let err = run(&["-machine", "none", "-qmp", qmp, "-display", "gtk"]);
    assert!(
        err.contains("Option '-display': type=gtk: Ferry has no display"),
        "{err}"
    );
    let err = run(&["-machine", "pc-q35-7.2", "-qmp", qmp]);
    assert!(err.contains("machine type 'pc-q35-7.2'"), "{err}");
}
