//! One client connection: greeting, negotiation, dispatch, event delivery.
//!
//! A session is a single task that owns both halves of the socket, so replies
//! and events can never interleave mid-line. It waits on three things: input
//! from the client, events from the bus (only once negotiated) and server
//! shutdown. Commands run one at a time, in arrival order.

use std::io;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value, json};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use super::Shared;
use super::args::Args;
use super::error::QmpError;
use super::events::QmpEvent;
use super::framing::{Frame, JsonStreamer, encode_line};
use super::protocol::{ErrorReply, Greeting, Request, ReturnReply, parse_request};

const READ_CHUNK: usize = 16 * 1024;

/// Descriptors a client may pass ahead of one command; more are closed.
const MAX_PASSED_FDS: usize = 16;

type EventRx = broadcast::Receiver<Arc<QmpEvent>>;

/// Serve one client until it disconnects or the server shuts down.
/// Run it inside a `qmp_session` tracing span.
pub(crate) async fn serve(stream: UnixStream, shared: Arc<Shared>) {
    tracing::debug!("client connected");
    let (reader, writer) = stream.into_split();
    let session = Session {
        shared,
        writer,
        events: None,
        fds: Vec::new(),
    };
    match session.run(reader).await {
        Ok(()) => tracing::debug!("session closed"),
        Err(e) => tracing::debug!(error = %e, "session ended"),
    }
}

struct Session {
    shared: Arc<Shared>,
    writer: OwnedWriteHalf,
    /// `Some` once capabilities negotiation completed.
    events: Option<EventRx>,
    /// Descriptors received (SCM_RIGHTS) since the last command.
    fds: Vec<OwnedFd>,
}

impl Session {
    async fn run(mut self, reader: tokio::net::unix::OwnedReadHalf) -> io::Result<()> {
        let shared = Arc::clone(&self.shared);
        let mut shutdown = shared.shutdown.subscribe();
        self.write(&Greeting::new(&shared.config.version)).await?;

        let config = &shared.config;
        let mut streamer = JsonStreamer::new(config.max_message_size, config.max_nesting);
        let mut buf = vec![0u8; READ_CHUNK];
        let mut frames = Vec::new();
        loop {
            tokio::select! {
                // (Wrapped so the select output does not borrow `shutdown`.)
                () = async { _ = shutdown.wait_for(|stop| *stop).await } => {
                    // Deliver what was emitted before the shutdown (e.g. the
                    // SHUTDOWN event of `quit`), then close.
                    return self.flush_events().await;
                }
                read = read_with_fds(&reader, &mut buf, &mut self.fds) => {
                    let n = read?;
                    if n == 0 {
                        return Ok(());
                    }
                    streamer.feed(&buf[..n], &mut frames);
                    for frame in frames.drain(..) {
                        self.handle_frame(frame).await?;
                        if *shutdown.borrow() {
                            return self.flush_events().await;
                        }
                    }
                }
                event = next_event(&mut self.events) => match event {
                    Ok(event) => self.write(&*event).await?,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "slow QMP client lost events");
                    }
                    Err(RecvError::Closed) => self.events = None,
                },
            }
        }
    }

    async fn handle_frame(&mut self, frame: Frame) -> io::Result<()> {
        let request = match frame {
            Frame::Error(desc) => return self.reply(None, Err(QmpError::generic(desc))).await,
            Frame::Value(value) => match parse_request(value) {
                Ok(request) => request,
                Err(e) => return self.reply(e.id.as_ref(), Err(e.error)).await,
            },
        };
        let id = request.id.clone();
        let result = self.dispatch(request).await;
        // Events the command caused are already on the bus: send them first,
        // as QEMU does (`stop` -> STOP, then the return).
        self.flush_events().await?;
        self.reply(id.as_ref(), result).await
    }

    async fn dispatch(&mut self, request: Request) -> Result<Value, QmpError> {
        let Request {
            command, arguments, ..
        } = request;
        tracing::debug!(%command, "qmp command");
        if self.events.is_none() {
            if command != "qmp_capabilities" {
                return Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            check_capabilities_args(arguments)?;
            self.events = Some(self.shared.config.event_bus.subscribe());
            return Ok(json!({}));
        }
        match command.as_str() {
            "qmp_capabilities" => {
                check_capabilities_args(arguments)?;
                Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ))
            }
            "query-version" => {
                Args::new(arguments).finish()?;
                Ok(serde_json::to_value(&self.shared.config.version).unwrap_or_default())
            }
            "query-commands" => {
                Args::new(arguments).finish()?;
                Ok(Value::Array(
                    self.shared
                        .all_commands
                        .iter()
                        .map(|name| json!({ "name": name }))
                        .collect(),
                ))
            }
            name if self.shared.backend_commands.contains(name) => {
                let backend = Arc::clone(&self.shared.backend);
                let cmd = command.clone();
                let fds = std::mem::take(&mut self.fds);
                match tokio::task::spawn_blocking(move || {
                    backend.execute_with_fds(&cmd, arguments, fds)
                })
                .await
                {
                    Ok(result) => result,
                    Err(e) => {
                        tracing::error!(%command, error = %e, "QMP backend command panicked");
                        Err(QmpError::generic(format!(
                            "Internal error while executing {command}"
                        )))
                    }
                }
            }
            _ => Err(QmpError::unknown_command(&command)),
        }
    }

    async fn flush_events(&mut self) -> io::Result<()> {
        while let Some(rx) = self.events.as_mut() {
            match rx.try_recv() {
                Ok(event) => self.write(&*event).await?,
                Err(TryRecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "slow QMP client lost events");
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => self.events = None,
            }
        }
        Ok(())
    }

    async fn reply(
        &mut self,
        id: Option<&Value>,
        result: Result<Value, QmpError>,
    ) -> io::Result<()> {
        match &result {
            Ok(ret) => self.write(&ReturnReply { ret, id }).await,
            Err(error) => self.write(&ErrorReply { error, id }).await,
        }
    }

    /// Write one line; a client that does not read for `write_timeout` is
    /// disconnected.
    async fn write<T: Serialize + ?Sized>(&mut self, msg: &T) -> io::Result<()> {
        let line = encode_line(msg);
        let timeout = self.shared.config.write_timeout;
        match tokio::time::timeout(timeout, self.writer.write_all(&line)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "QMP client stopped reading",
            )),
        }
    }
}

/// Reads into `buf`, keeping the descriptors sent with the bytes (at most
/// [`MAX_PASSED_FDS`] pending; more are closed).
async fn read_with_fds(
    reader: &tokio::net::unix::OwnedReadHalf,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let stream: &UnixStream = reader.as_ref();
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            recv_with_fds(stream.as_raw_fd(), buf, fds)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// One `recvmsg`: bytes into `buf`, SCM_RIGHTS descriptors onto `fds`.
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    // Room for MAX_PASSED_FDS descriptors, aligned for cmsghdr.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both live and writable for
    // the call; the kernel writes at most their lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay inside `control`, and
    // each SCM_RIGHTS payload holds `(cmsg_len - CMSG_LEN(0)) / 4` descriptors this process
    // now owns (received, so nothing else holds them).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let owned = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if fds.len() < MAX_PASSED_FDS {
                        fds.push(owned);
                    } else {
                        tracing::warn!("QMP client passed too many descriptors; closing one");
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        tracing::warn!("QMP client passed more descriptors than fit; the rest were closed");
    }
    // Non-negative: checked above.
    Ok(n as usize)
}

/// The next event, or never if the session is not negotiated.
async fn next_event(events: &mut Option<EventRx>) -> Result<Arc<QmpEvent>, RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `qmp_capabilities {'*enable': ['QMPCapability']}`; no capability is
/// offered, so enabling `oob` (the only defined one) fails as in QEMU.
fn check_capabilities_args(arguments: Map<String, Value>) -> Result<(), QmpError> {
    let mut args = Args::new(arguments);
    let enable = args.optional_array("enable")?;
    args.finish()?;
    let mut unavailable = Vec::new();
    for (i, cap) in enable.unwrap_or_default().iter().enumerate() {
        match cap {
            Value::String(s) if s == "oob" => unavailable.push("oob"),
            // QEMU 7.2 names list elements 'null' in this message.
            Value::String(s) => return Err(QmpError::invalid_enum_value("null", s)),
            _ => {
                return Err(QmpError::invalid_parameter_type(
                    &format!("enable[{i}]"),
                    "string",
                ));
            }
        }
    }
    if unavailable.is_empty() {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Capability {} not available",
            unavailable.join(", ")
        )))
    }
}
