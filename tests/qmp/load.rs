//! The control plane under load: 50 concurrent QMP clients on the source's socket — 40 with
//! the Rust `QmpClient`, 10 raw sockets writing malformed requests — keep issuing queries and
//! invalid commands while a live migration runs. The migration completes, and every client
//! gets exactly one answer to every request it sent.

use ferry_tests::*;
use ferry_tests::{ClientError, QmpClient};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-2.0",
    "--memory",
    "64M",
    "--guest",
    "dirty:8",
];
const CLIENTS: usize = 40;
const RAW_CLIENTS: usize = 10;

/// (requests, answers, slowest answer)
type Tally = (u64, u64, Duration);

fn rust_client(socket: PathBuf, start: Arc<Barrier>, done: Arc<AtomicBool>) -> Tally {
    let mut c = QmpClient::connect(&socket, TIMEOUT).expect("connect");
    start.wait();
    let (mut sent, mut answered, mut slowest) = (0, 0, Duration::ZERO);
    let mut round = 0u64;
    while !done.load(Ordering::SeqCst) || round < 3 {
        round += 1;
        for (cmd, args, ok) in [
            ("query-status", json!({}), true),
            ("query-migrate", json!({}), true),
            ("no-such-command", json!({}), false),
            ("query-migrate", json!({"bogus": 1}), false),
            ("__org.ferry_query-connectors", json!({}), true),
            (
                "migrate-set-parameters",
                json!({"downtime-limit": "x"}),
                false,
            ),
            ("query-migrate-parameters", json!({}), true),
        ] {
            sent += 1;
            let t = Instant::now();
            match c.execute(cmd, args) {
                Ok(_) if ok => answered += 1,
                Err(ClientError::Qmp { .. }) if !ok => answered += 1,
                other => panic!("{cmd}: unexpected answer {other:?}"),
            }
            slowest = slowest.max(t.elapsed());
        }
    }
    (sent, answered, slowest)
}

fn raw_client(socket: PathBuf, start: Arc<Barrier>, done: Arc<AtomicBool>) -> Tally {
    let s = UnixStream::connect(&socket).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    // A reply to each request, skipping the events every session receives (STOP, ...).
    let mut reply = |r: &mut BufReader<UnixStream>| -> Value {
        loop {
            line.clear();
            let n = r.read_line(&mut line).expect("no answer");
            assert!(n > 0, "the server closed the connection");
            let v: Value = serde_json::from_str(&line).expect("not JSON");
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    assert!(reply(&mut r).get("QMP").is_some(), "greeting");
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\r\n")
        .unwrap();
    assert!(reply(&mut r).get("return").is_some());
    start.wait();
    let (mut sent, mut answered, mut slowest) = (0, 0, Duration::ZERO);
    let mut round = 0u64;
    while !done.load(Ordering::SeqCst) || round < 3 {
        round += 1;
        for (msg, want) in [
            (&b"{\"execute\": 42, \"id\": 1}"[..], "error"),
            (b"[1, 2, 3]", "error"),
            (b"{\"exec\": \"query-status\"}", "error"),
            (
                b"{\"execute\": \"quit\", \"arguments\": {\"now\": true}}",
                "error",
            ),
            (b"{\"execute\": \"query-status\", \"id\": \"x\"}", "return"),
            (
                b"{\"execute\": \"migrate\", \"arguments\": {\"uri\": 7}}",
                "error",
            ),
        ] {
            sent += 1;
            let t = Instant::now();
            w.write_all(msg).unwrap();
            w.write_all(b"\r\n").unwrap();
            let v = reply(&mut r);
            assert!(
                v.get(want).is_some(),
                "{}: expected {want}, got {v}",
                String::from_utf8_lossy(msg)
            );
            answered += 1;
            slowest = slowest.max(t.elapsed());
        }
    }
    (sent, answered, slowest)
}

#[test]
fn fifty_qmp_clients_during_a_migration_all_get_answers() {
    let dir = tempdir();
    let mut dargs = SHAPE.to_vec();
    dargs.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut d = Ferry::spawn(dir.path(), "dst", &dargs);
    let port = d.incoming_port();
    let mut s = Ferry::spawn(dir.path(), "src", &SHAPE);
    s.wait_pass(2);
    // Long enough for the clients to overlap every phase (8 MiB of data at 16 MiB/s), with a
    // downtime limit that pass 1 can meet, and a forced switchover after 10 passes should a
    // loaded host measure too low a bandwidth for it (the subject here is the control plane).
    s.ok(
        "migrate-set-parameters",
        json!({
            "max-bandwidth": 16 << 20,
            "downtime-limit": 2000,
            "__org.ferry_max-iterations": 10,
            "__org.ferry_switchover-policy": "force",
        }),
    );

    let start = Arc::new(Barrier::new(CLIENTS + RAW_CLIENTS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..CLIENTS + RAW_CLIENTS {
        let (sock, st, dn) = (s.socket.clone(), start.clone(), done.clone());
        handles.push(thread::spawn(move || {
            if i < CLIENTS {
                rust_client(sock, st, dn)
            } else {
                raw_client(sock, st, dn)
            }
        }));
    }
    start.wait();
    let t = Instant::now();
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    let took = t.elapsed();
    done.store(true, Ordering::SeqCst);
    let mut total = (0u64, 0u64, Duration::ZERO);
    for h in handles {
        let (sent, answered, slowest) = h.join().expect("a client failed");
        assert_eq!(sent, answered, "a request went unanswered");
        total = (total.0 + sent, total.1 + answered, total.2.max(slowest));
    }
    eprintln!(
        "{} clients: {} requests, {} answers during a {took:?} migration; slowest answer {:?}",
        CLIENTS + RAW_CLIENTS,
        total.0,
        total.1,
        total.2
    );
    assert_eq!(info["status"], "completed", "{info}");
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    assert_eq!(s.status(), "postmigrate");
}
