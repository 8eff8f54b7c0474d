//! A small blocking QMP client, used by `ferry demo` and the end-to-end tests to drive
//! `ferry` processes (the Python `qemu.qmp` client is exercised separately).

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A QMP connection after capability negotiation.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
    next_id: u64,
}

/// A QMP error reply or a transport failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{class}: {desc}")]
    Qmp {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// The socket failed or closed.
    #[error("QMP connection failed")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not QMP.
    #[error("Unexpected QMP message: {0}")]
    Protocol(String),
}

impl QmpClient {
    /// Connect to `path`, retrying until `timeout` while the socket does not exist yet, then
    /// negotiate capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, ClientError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut c = QmpClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
            next_id: 0,
        };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(greeting.to_string()));
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_str(&line).map_err(|_| ClientError::Protocol(line))
    }

    /// Run `command` and return its `return` value; events read meanwhile are kept.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        self.writer.write_all(format!("{msg}\r\n").as_bytes())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if v.get("id") != Some(&json!(id)) {
                return Err(ClientError::Protocol(v.to_string()));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let e = &v["error"];
            return Err(ClientError::Qmp {
                class: e["class"].as_str().unwrap_or_default().to_owned(),
                desc: e["desc"].as_str().unwrap_or_default().to_owned(),
            });
        }
    }

    /// Wait for an event named `name` whose data satisfies `pred`, at most `timeout`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, ClientError> {
        let matches = |e: &Value| e["event"] == name && pred(&e["data"]);
        if let Some(i) = self.events.iter().position(matches) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Protocol(format!(
                    "no {name} event within {timeout:?}"
                )));
            }
            self.writer.set_read_timeout(Some(left))?;
            let v = self.read();
            self.writer
                .set_read_timeout(Some(Duration::from_secs(60)))?;
            let v = v?;
            if matches(&v) {
                return Ok(v);
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Events received so far and not yet consumed.
    pub fn events(&self) -> &[Value] {
        &self.events
    }
}
