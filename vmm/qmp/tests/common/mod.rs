//! Test harness: a real server on a temporary Unix socket and a raw client.
#![allow(dead_code)]

pub mod backend;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_qmp::{EventBus, QmpConfig, QmpServer, QmpServerError, ShutdownHandle, VersionInfo};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

use backend::DemoVm;

/// Bound on every wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub events: EventBus,
    pub vm: Arc<DemoVm>,
    pub handle: ShutdownHandle,
    pub task: JoinHandle<Result<(), QmpServerError>>,
}

pub fn version() -> VersionInfo {
    VersionInfo::new(0, 1, 0, "ferry 0.1.0")
}

/// Start a server with the demo backend (inside a Tokio runtime).
pub fn start() -> TestServer {
    start_with(|_| {})
}

pub fn start_with(adjust: impl FnOnce(&mut QmpConfig)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let events = EventBus::default();
    let vm = Arc::new(DemoVm::new(events.clone()));
    let mut config = QmpConfig::new(version()).with_event_bus(events.clone());
    adjust(&mut config);
    let server = QmpServer::bind(&path, vm.clone(), config).unwrap();
    let handle = server.shutdown_handle();
    vm.set_shutdown(handle.clone());
    let task = tokio::spawn(server.run());
    TestServer {
        dir,
        path,
        events,
        vm,
        handle,
        task,
    }
}

impl TestServer {
    /// Shut down and wait (bounded) for `run` to return.
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("server did not stop in time")
            .unwrap()
            .unwrap();
        assert!(!self.path.exists(), "socket file left behind");
    }
}

pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Events read while waiting for replies.
    pub events: VecDeque<Value>,
}

impl Client {
    /// Connect without reading the greeting.
    pub async fn connect_raw(path: &Path) -> Self {
        let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(path))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        let (r, w) = stream.into_split();
        Self {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
        }
    }

    /// Connect and check the greeting.
    pub async fn connect(path: &Path) -> Self {
        let mut c = Self::connect_raw(path).await;
        let greeting = c.recv().await;
        assert!(greeting["QMP"]["version"].is_object(), "{greeting}");
        c
    }

    /// Connect and negotiate.
    pub async fn negotiated(path: &Path) -> Self {
        let mut c = Self::connect(path).await;
        assert_eq!(
            c.execute(json!({"execute": "qmp_capabilities"})).await,
            json!({"return": {}})
        );
        c
    }

    /// One raw line, checked for the wire rules: ASCII, ends in CRLF, no
    /// other CR/LF.
    pub async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_until(b'\n', &mut buf))
            .await
            .expect("timed out waiting for a line")
            .expect("read failed");
        assert!(n > 0, "unexpected EOF");
        assert!(buf.is_ascii(), "non-ASCII output: {buf:?}");
        let line = String::from_utf8(buf).unwrap();
        assert!(line.ends_with("\r\n"), "line not CRLF-terminated: {line:?}");
        let body = &line[..line.len() - 2];
        assert!(
            !body.contains(['\r', '\n']),
            "newline inside message: {line:?}"
        );
        line
    }

    /// The next message of any kind.
    pub async fn recv(&mut self) -> Value {
        let line = self.line().await;
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v.is_object(), "{v}");
        v
    }

    /// The next non-event message; events are queued in `self.events`.
    pub async fn reply(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else {
                return v;
            }
        }
    }

    /// The next event (queued or read).
    pub async fn event(&mut self) -> Value {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        let v = self.recv().await;
        assert!(v.get("event").is_some(), "expected an event, got {v}");
        v
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
        self.writer.flush().await.unwrap();
    }

    pub async fn execute(&mut self, request: Value) -> Value {
        self.send(request.to_string().as_bytes()).await;
        self.reply().await
    }

    /// Assert the server closes the connection.
    pub async fn expect_eof(&mut self) {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_until(b'\n', &mut buf))
            .await
            .expect("timed out waiting for EOF")
            .unwrap_or(0);
        assert_eq!(
            n,
            0,
            "expected EOF, got {:?}",
            String::from_utf8_lossy(&buf)
        );
    }

    pub fn into_writer(self) -> OwnedWriteHalf {
        self.writer
    }
}

/// `{"error": {"class": CLASS, "desc": DESC}}` plus `id` if given.
pub fn error(class: &str, desc: &str, id: Option<Value>) -> Value {
    let mut v = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}

pub fn generic(desc: &str) -> Value {
    error("GenericError", desc, None)
}
