//! The QMP server over real Unix sockets, driven by a raw client.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Client, TIMEOUT, error, generic, start, start_with};
use ferry_qmp::{EventBus, QmpConfig, QmpServer, QmpServerError};
use serde_json::{Value, json};

const NEGOTIATE_FIRST: &str = "Expecting capabilities negotiation with 'qmp_capabilities'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_is_exact() {
    let srv = start();
    let mut c = Client::connect_raw(&srv.path).await;
    assert_eq!(
        c.line().await,
        "{\"QMP\":{\"version\":{\"qemu\":{\"micro\":0,\"minor\":1,\"major\":0},\
         \"package\":\"ferry 0.1.0\"},\"capabilities\":[]}}\r\n"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_rules() {
    let srv = start();
    let mut c = Client::connect(&srv.path).await;
    for cmd in ["query-status", "no-such-cmd", "query-version"] {
        assert_eq!(
            c.execute(json!({"execute": cmd, "id": 1})).await,
            error("CommandNotFound", NEGOTIATE_FIRST, Some(json!(1)))
        );
    }
    // Structural errors keep their own text before negotiation.
    assert_eq!(
        c.execute(json!({"execute": "query-status", "arguments": [], "id": 2}))
            .await,
        error(
            "GenericError",
            "QMP input member 'arguments' must be an object",
            Some(json!(2))
        )
    );
    // Failed negotiations leave the session in negotiation mode.
    let bad = [
        (
            json!({"enable": ["bogus"]}),
            "Parameter 'null' does not accept value 'bogus'",
        ),
        (json!({"enable": ["oob"]}), "Capability oob not available"),
        (
            json!({"enable": "oob"}),
            "Invalid parameter type for 'enable', expected: array",
        ),
        (
            json!({"enable": [1]}),
            "Invalid parameter type for 'enable[0]', expected: string",
        ),
        (json!({"x": 1}), "Parameter 'x' is unexpected"),
    ];
    for (arguments, desc) in bad {
        assert_eq!(
            c.execute(json!({"execute": "qmp_capabilities", "arguments": arguments}))
                .await,
            generic(desc)
        );
    }
    assert_eq!(
        c.execute(json!({"execute": "query-status"})).await,
        error("CommandNotFound", NEGOTIATE_FIRST, None)
    );
    assert_eq!(
        c.execute(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}))
            .await,
        json!({"return": {}, "id": "n"})
    );
    assert_eq!(
        c.execute(json!({"execute": "query-status"})).await,
        json!({"return": {"running": true, "singlestep": false, "status": "running"}})
    );
    assert_eq!(
        c.execute(json!({"execute": "qmp_capabilities", "id": 3}))
            .await,
        error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
            Some(json!(3))
        )
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_echoed_verbatim() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    let ids = [
        json!(7),
        json!(-1.5),
        json!("libvirt-42"),
        json!({"nested": [1, 2, {"k": null}]}),
        json!([true, "x"]),
        Value::Null,
    ];
    for id in ids {
        assert_eq!(
            c.execute(json!({"execute": "cont", "id": id})).await,
            json!({"return": {}, "id": id})
        );
        assert_eq!(
            c.execute(json!({"execute": "nope", "id": id})).await,
            error(
                "CommandNotFound",
                "The command nope has not been found",
                Some(id.clone())
            )
        );
        assert_eq!(
            c.execute(json!({"execute": 42, "id": id})).await,
            error(
                "GenericError",
                "QMP input member 'execute' must be a string",
                Some(id.clone())
            )
        );
    }
    // Without an id, replies carry none.
    assert_eq!(
        c.execute(json!({"execute": "cont"})).await,
        json!({"return": {}})
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_concatenated_input() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    // One byte per write.
    for b in br#"{"execute": "x-echo", "arguments": {"s": "a}{b"}, "id": 1}"# {
        c.send(&[*b]).await;
    }
    assert_eq!(c.reply().await, json!({"return": {"s": "a}{b"}, "id": 1}));
    // Two objects in one write, no separator; then one with a CRLF (libvirt).
    c.send(br#"{"execute":"query-status","id":2}{"execute":"x-echo","arguments":{"n":1},"id":3}"#)
        .await;
    assert_eq!(c.reply().await["id"], 2);
    assert_eq!(c.reply().await, json!({"return": {"n": 1}, "id": 3}));
    c.send(b"{'execute': 'x-echo', 'arguments': {'q': 'it\\'s \"x\"'}, 'id': 4}\r\n")
        .await;
    assert_eq!(
        c.reply().await,
        json!({"return": {"q": "it's \"x\""}, "id": 4})
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_recovers() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    c.send(br#"{"execute": }"#).await;
    assert_eq!(
        c.reply().await,
        generic("JSON parse error, expecting value")
    );
    c.send(b"\x01").await;
    assert_eq!(c.reply().await, generic("JSON parse error, stray '\u{1}'"));
    // Stuck inside a string (a quote is missing, so `": 5}` opens one): a
    // control byte gets the parser back.
    c.send(br#"{"execute": "query-status, "id": 5}"#).await;
    c.send(b"\x01").await;
    assert_eq!(
        c.reply().await,
        generic("JSON parse error, stray '\": 5}\u{1}'")
    );
    // 0xFF inside a string: two errors, as QEMU 7.2 gives.
    c.send(b"{\"execute\": \"\xffquery-status\"}").await;
    assert_eq!(
        c.reply().await,
        generic("JSON parse error, stray '\"\u{FFFD}'")
    );
    assert_eq!(
        c.reply().await,
        generic("JSON parse error, expecting value")
    );
    c.send(br#"{"execute": "query-status", "id": 6}"#).await;
    assert_eq!(c.reply().await["id"], 6);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_qemu_errors() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    let must_be_object = generic("QMP input must be a JSON object");
    c.send(b"[1, 2]").await;
    assert_eq!(c.reply().await, must_be_object);
    c.send(b"\"str\"").await;
    assert_eq!(c.reply().await, must_be_object);
    c.send(b"42\n").await;
    assert_eq!(c.reply().await, must_be_object);
    c.send(b"null ").await;
    assert_eq!(c.reply().await, must_be_object);

    let cases = [
        (
            json!({"exec": "x", "id": 7}),
            "QMP input member 'exec' is unexpected",
        ),
        (
            json!({"execute": "cont", "arguments": [], "id": 7}),
            "QMP input member 'arguments' must be an object",
        ),
        (
            json!({"exec-oob": "query-status", "id": 7}),
            "QMP input member 'exec-oob' is unexpected",
        ),
        (json!({"id": 7}), "QMP input lacks member 'execute'"),
        (
            json!({"execute": "device_del", "arguments": {"id": 1}, "id": 7}),
            "Invalid parameter type for 'id', expected: string",
        ),
        (
            json!({"execute": "device_del", "arguments": {}, "id": 7}),
            "Parameter 'id' is missing",
        ),
        (
            json!({"execute": "x-typed", "arguments": {"name": "a", "count": "1"}, "id": 7}),
            "Invalid parameter type for 'count', expected: integer",
        ),
        (
            json!({"execute": "x-typed", "arguments": {"name": "a", "flag": 1}, "id": 7}),
            "Invalid parameter type for 'flag', expected: boolean",
        ),
        (
            json!({"execute": "x-typed", "arguments": {"name": "a", "x": 1}, "id": 7}),
            "Parameter 'x' is unexpected",
        ),
        (
            json!({"execute": "query-version", "arguments": {"x": 1}, "id": 7}),
            "Parameter 'x' is unexpected",
        ),
    ];
    for (request, desc) in cases {
        assert_eq!(
            c.execute(request.clone()).await,
            error("GenericError", desc, Some(json!(7))),
            "{request}"
        );
    }
    assert_eq!(
        c.execute(json!({"execute": "no-such-cmd", "id": 8})).await,
        error(
            "CommandNotFound",
            "The command no-such-cmd has not been found",
            Some(json!(8))
        )
    );
    assert_eq!(
        c.execute(json!({"execute": "device_del", "arguments": {"id": "nope"}, "id": 9}))
            .await,
        error("DeviceNotFound", "Device 'nope' not found", Some(json!(9)))
    );
    assert_eq!(
        c.execute(json!({"execute": "x-typed", "arguments": {"name": "a", "count": 2}}))
            .await,
        json!({"return": {"name": "a", "count": 2, "flag": null}})
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_errors_have_no_side_effect() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    assert_eq!(
        c.execute(json!({"execute": "stop", "arguments": {"bogus": 1}, "id": 1}))
            .await,
        error(
            "GenericError",
            "Parameter 'bogus' is unexpected",
            Some(json!(1))
        )
    );
    // Still running, and no STOP event was sent before this reply.
    assert_eq!(
        c.execute(json!({"execute": "query-status", "id": 2})).await["return"]["running"],
        true
    );
    assert!(c.events.is_empty(), "{:?}", c.events);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_rejected_and_session_continues() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    // Under the 1 MiB default: a big reply line is fine.
    let half = "h".repeat(512 * 1024);
    let reply = c
        .execute(json!({"execute": "x-echo", "arguments": {"s": half}, "id": 1}))
        .await;
    assert_eq!(
        reply["return"]["s"].as_str().map(str::len),
        Some(half.len())
    );
    // Over it: one id-less error, the rest of that message is skipped.
    let big = "b".repeat(1536 * 1024);
    let request =
        json!({"execute": "x-echo", "arguments": {"s": big, "t": [1, {"u": "}"}]}, "id": 2});
    c.send(request.to_string().as_bytes()).await;
    assert_eq!(c.reply().await, generic("JSON token size limit exceeded"));
    assert_eq!(
        c.execute(json!({"execute": "query-status", "id": 3})).await["id"],
        3
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesting_limit() {
    let srv = start_with(|cfg| cfg.max_nesting = 8);
    let mut c = Client::negotiated(&srv.path).await;
    let deep = format!(
        r#"{{"execute": "x-echo", "arguments": {{"a": {}1{}}}, "id": 1}}"#,
        "[".repeat(10),
        "]".repeat(10)
    );
    c.send(deep.as_bytes()).await;
    assert_eq!(
        c.reply().await,
        generic("JSON nesting depth limit exceeded")
    );
    assert_eq!(
        c.execute(json!({"execute": "x-echo", "arguments": {"a": [[1]]}, "id": 2}))
            .await,
        json!({"return": {"a": [[1]]}, "id": 2})
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_is_escaped() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    let s = "caf\u{e9} \u{20ac} \u{1F600}";
    c.send(
        json!({"execute": "x-echo", "arguments": {"s": s}})
            .to_string()
            .as_bytes(),
    )
    .await;
    let line = c.line().await;
    assert_eq!(
        line,
        "{\"return\":{\"s\":\"caf\\u00E9 \\u20AC \\uD83D\\uDE00\"}}\r\n"
    );
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["return"]["s"], s);
    srv.stop().await;
}

fn assert_timestamp(event: &Value) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts = &event["timestamp"];
    let secs = ts["seconds"].as_u64().expect("seconds");
    let micros = ts["microseconds"].as_u64().expect("microseconds");
    assert!(secs <= now && secs + 60 > now, "{event}");
    assert!(micros < 1_000_000, "{event}");
    assert_eq!(ts.as_object().unwrap().len(), 2, "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_only_after_negotiation_and_timestamped() {
    let srv = start();
    let mut waiting = Client::connect(&srv.path).await;
    let mut active = Client::negotiated(&srv.path).await;

    // A synchronous event precedes the reply of the command causing it.
    active
        .send(json!({"execute": "stop", "id": 1}).to_string().as_bytes())
        .await;
    let stop = active.recv().await;
    assert_eq!(stop["event"], "STOP");
    assert!(stop.get("data").is_none(), "{stop}");
    assert_timestamp(&stop);
    assert_eq!(active.recv().await, json!({"return": {}, "id": 1}));
    // A second stop: no event.
    assert_eq!(
        active.execute(json!({"execute": "stop", "id": 2})).await,
        json!({"return": {}, "id": 2})
    );
    assert!(active.events.is_empty());

    // The un-negotiated client got nothing: its next line is its own reply.
    assert_eq!(
        waiting
            .execute(json!({"execute": "qmp_capabilities", "id": "caps"}))
            .await,
        json!({"return": {}, "id": "caps"})
    );
    assert!(waiting.events.is_empty(), "{:?}", waiting.events);

    // Now both receive events, including ones the VMM emits on its own.
    assert_eq!(
        active.execute(json!({"execute": "cont"})).await,
        json!({"return": {}})
    );
    assert_eq!(active.event().await["event"], "RESUME");
    let resume = waiting.event().await;
    assert_eq!(resume["event"], "RESUME");
    assert_timestamp(&resume);

    assert_eq!(
        srv.events.emit(
            "DEVICE_UNPLUG_GUEST_ERROR",
            Some(json!({"device": "d\u{e9}v", "path": "/machine/peripheral/dev"}))
        ),
        2
    );
    for c in [&mut active, &mut waiting] {
        let line = c.line().await;
        assert!(line.starts_with("{\"event\":\"DEVICE_UNPLUG_GUEST_ERROR\",\"data\":{\"device\":\"d\\u00E9v\",\"path\":\"/machine/peripheral/dev\"},\"timestamp\":{\"seconds\":"), "{line}");
        assert_timestamp(&serde_json::from_str(&line).unwrap());
    }

    // device_del: DEVICE_DELETED with data.
    assert_eq!(
        active
            .execute(json!({"execute": "device_del", "arguments": {"id": "dev0"}}))
            .await,
        json!({"return": {}})
    );
    let deleted = active.event().await;
    assert_eq!(deleted["event"], "DEVICE_DELETED");
    assert_eq!(
        deleted["data"],
        json!({"device": "dev0", "path": "/machine/peripheral/dev0"})
    );
    assert_eq!(waiting.event().await["event"], "DEVICE_DELETED");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_commands() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    assert_eq!(
        c.execute(json!({"execute": "query-version"})).await,
        json!({"return": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "ferry 0.1.0"}})
    );
    let reply = c.execute(json!({"execute": "query-commands"})).await;
    let names: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-commands",
            "query-version",
            "query-status",
            "stop",
            "cont",
            "device_del",
            "quit",
            "x-echo",
            "x-typed",
            "x-block",
            "x-release",
            "x-panic"
        ]
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_panic_is_an_error_not_a_crash() {
    let srv = start();
    let mut c = Client::negotiated(&srv.path).await;
    assert_eq!(
        c.execute(json!({"execute": "x-panic", "id": 1})).await,
        error(
            "GenericError",
            "Internal error while executing x-panic",
            Some(json!(1))
        )
    );
    assert_eq!(
        c.execute(json!({"execute": "cont", "id": 2})).await["id"],
        2
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_replies_then_closes() {
    let srv = start();
    let mut other = Client::negotiated(&srv.path).await;
    let mut c = Client::negotiated(&srv.path).await;
    c.send(json!({"execute": "quit", "id": 1}).to_string().as_bytes())
        .await;
    let shutdown = c.recv().await;
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(c.recv().await, json!({"return": {}, "id": 1}));
    c.expect_eof().await;
    // Other sessions close too (after the event).
    assert_eq!(other.event().await["event"], "SHUTDOWN");
    other.expect_eof().await;
    tokio::time::timeout(TIMEOUT, srv.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!srv.path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_file_mode_and_stale_handling() {
    let srv = start();
    let meta = std::fs::metadata(&srv.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No temporary files left in the directory.
    let names: Vec<_> = std::fs::read_dir(srv.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["qmp.sock"]);

    let backend = srv.vm.clone();
    let config = || QmpConfig::new(common::version());
    // A live socket is not taken over.
    match QmpServer::bind(&srv.path, backend.clone(), config()) {
        Err(QmpServerError::AddrInUse(p)) => assert_eq!(p, srv.path),
        other => panic!("expected AddrInUse, got {other:?}"),
    }
    // A regular file is not removed.
    let file = srv.dir.path().join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(matches!(
        QmpServer::bind(&file, backend.clone(), config()),
        Err(QmpServerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // A stale socket (its listener is gone) is replaced.
    let stale = srv.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = QmpServer::bind(&stale, backend, config()).unwrap();
    assert_eq!(
        std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Dropping a server (run or not) removes its socket file.
    drop(server);
    assert!(!stale.exists());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients() {
    let srv = start();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..8 {
        let path = srv.path.clone();
        tasks.spawn(async move {
            let mut c = Client::negotiated(&path).await;
            for i in 0..25 {
                let id = json!({"client": client, "seq": i});
                let reply = c
                    .execute(
                        json!({"execute": "x-echo", "arguments": {"c": client, "i": i}, "id": id}),
                    )
                    .await;
                assert_eq!(reply, json!({"return": {"c": client, "i": i}, "id": id}));
            }
        });
    }
    while let Some(done) = tokio::time::timeout(TIMEOUT, tasks.join_next())
        .await
        .expect("clients timed out")
    {
        done.unwrap();
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_message_and_mid_command() {
    let srv = start();
    let mut watcher = Client::negotiated(&srv.path).await;

    // Half a message, then gone.
    let mut half = Client::negotiated(&srv.path).await;
    half.send(br#"{"execute": "query-st"#).await;
    drop(half);

    // A command still running when its client disconnects: the watcher hears it start
    // before the client goes (a disconnect could otherwise beat the command to the server).
    let mut busy = Client::negotiated(&srv.path).await;
    busy.send(br#"{"execute": "x-block", "id": 1}"#).await;
    assert_eq!(watcher.event().await["event"], "X_BLOCK_STARTED");
    drop(busy);
    assert_eq!(
        watcher
            .execute(json!({"execute": "x-release", "id": 2}))
            .await,
        json!({"return": {}, "id": 2})
    );
    // The blocked command completes (its reply has nowhere to go).
    assert_eq!(watcher.event().await["event"], "X_BLOCK_DONE");

    // Everything else is unaffected.
    assert_eq!(
        watcher
            .execute(json!({"execute": "query-status", "id": 3}))
            .await["id"],
        3
    );
    let mut fresh = Client::negotiated(&srv.path).await;
    assert_eq!(
        fresh.execute(json!({"execute": "cont", "id": 4})).await,
        json!({"return": {}, "id": 4})
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_refuses_extra_clients() {
    let srv = start_with(|cfg| cfg.max_sessions = 1);
    let mut first = Client::negotiated(&srv.path).await;
    let mut second = Client::connect_raw(&srv.path).await;
    second.expect_eof().await;
    assert_eq!(
        first.execute(json!({"execute": "cont"})).await,
        json!({"return": {}})
    );
    drop(first);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_bus_without_sessions() {
    let bus = EventBus::new(4);
    assert_eq!(bus.emit("STOP", None), 0);
    assert_eq!(bus.receiver_count(), 0);
}
