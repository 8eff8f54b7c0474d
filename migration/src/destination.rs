//! The destination side: accept or refuse, receive pages and state, load, wait for COMMIT.

use crate::config::{ConfigRecord, SwitchoverRecord};
use crate::pages::{Book, Grant, MAX_CHANNELS, Receivers, Torn};
use crate::progress::{Patient, Progress, Status};
use crate::protocol::{
    ACCEPTED_PROTOCOLS, FEATURE_GUEST_FIRST, FEATURE_PAGE_CHANNELS, FEATURE_POSTCOPY,
    FEATURE_PROGRESS, FEATURE_SPARSE_PAGES, Hello, Kind, Msg, PROGRESS_PAGES, PROTOCOL_VERSION,
    SUPPORTED_FEATURES,
};
use crate::transport::{Channel, TeeReader, close_gracefully};
use crate::vm::DestinationVm;
use crate::{MigrationError, Params};
use devstate::{Item, RawSection, Section, StreamReader};
use std::fs::File;
use std::io::{BufReader, Read};
use std::sync::Arc;
use tracing::{error, info, info_span};

/// Where the incoming stream comes from.
#[derive(Debug)]
pub enum Incoming {
    /// A TCP connection, plain or TLS (with a return path), without page channels.
    Tcp(Channel),
    /// A connection from an [`Acceptor`](crate::Acceptor), which can grant page channels.
    Accepted(Accepted),
    /// A stream file (no return path; loading it is the commit).
    File(File),
}

/// A connection the [`Acceptor`](crate::Acceptor) established, its first 16 bytes read.
#[derive(Debug)]
pub struct Accepted {
    pub(crate) channel: Channel,
    pub(crate) first: [u8; 16],
    pub(crate) book: Arc<Book>,
}

impl Accepted {
    /// The connection.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

fn io_err(phase: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io { phase, source }
}

/// Receive a migration into `vm`.
///
/// On success the guest runs here if it ran on the source. On failure everything loaded is
/// discarded through [`DestinationVm::abort_incoming`] and the source is told why when it
/// can still hear it.
pub fn receive<V: DestinationVm>(
    vm: &mut V,
    incoming: Incoming,
    params: &Params,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let span = info_span!("migration", side = "destination");
    let _g = span.enter();
    progress.start();
    progress.set_status(Status::Setup);
    let mut ret = match &incoming {
        Incoming::Tcp(ch) | Incoming::Accepted(Accepted { channel: ch, .. }) => {
            // Control messages are small and latency-bound (Nagle would hold each one until
            // the previous is acknowledged: tens of milliseconds of downtime).
            let s = ch.socket();
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(params.io_timeout)).ok();
            s.set_write_timeout(Some(params.io_timeout)).ok();
            progress.set_socket(s.try_clone().ok());
            Some(ch.try_clone().map_err(io_err("handshake"))?)
        }
        Incoming::File(_) => None,
    };
    let mut started = false;
    let mut paused = None;
    let res = run(
        vm,
        incoming,
        params,
        progress,
        &mut ret,
        &mut started,
        &mut paused,
    );
    progress.set_socket(None);
    match &res {
        Ok(()) => {
            info!("incoming migration completed");
            progress.set_status(Status::Completed);
        }
        Err(e) => {
            error!(error = %e, "incoming migration failed");
            if let Some(r) = ret.as_mut() {
                if !matches!(e, MigrationError::Refused(_)) {
                    let _ = Msg::with_text(Kind::Failed, &crate::chain(e)).write(r);
                }
                if !started {
                    // The source waits for our answer: let it read it before we close.
                    close_gracefully(r);
                }
            }
            if let Some(state) = paused {
                // The guest has part of its RAM; it must never read a missing page.
                vm.postcopy_paused(&crate::chain(e), state);
                progress.fail(Status::PostcopyPaused, crate::chain(e));
                return res;
            }
            vm.abort_incoming(&crate::chain(e));
            progress.fail(Status::Failed, crate::chain(e));
        }
    }
    res
}

fn refuse(ret: &mut Option<Channel>, why: String) -> MigrationError {
    if let Some(r) = ret.as_mut() {
        let _ = Msg::with_text(Kind::Refuse, &why).write(r);
    }
    MigrationError::Refused(why)
}

fn run<V: DestinationVm>(
    vm: &mut V,
    incoming: Incoming,
    params: &Params,
    progress: &Progress,
    ret: &mut Option<Channel>,
    started: &mut bool,
    paused: &mut Option<crate::postcopy::Paused>,
) -> Result<(), MigrationError> {
    let dump = match &params.dump_stream {
        Some(p) => Some(crate::transport::create_capture(p)?),
        None => None,
    };
    let mut report_progress = false;
    // The source has auto-converge on: its guest comes first here too.
    let mut guest_first = false;
    // Post-copy may follow COMMIT.
    let mut postcopy_ok = false;
    // SPARSE records only where the handshake negotiated them; a file has no handshake (a
    // `--dump-stream` capture of a connection that negotiated them holds them legitimately).
    let mut sparse_ok = true;
    // Page channels granted: how many, their token, and where they arrive.
    let mut granted: Option<Grant> = None;
    let reader: Box<dyn Read + Send> = match incoming {
        Incoming::Tcp(_) | Incoming::Accepted(_) => {
            let (s, hello, book) = match incoming {
                Incoming::Tcp(mut s) => {
                    let h = Hello::read(&mut s);
                    (s, h, None)
                }
                Incoming::Accepted(a) => (a.channel, Hello::parse(&a.first), Some(a.book)),
                Incoming::File(_) => unreachable!("matched above"),
            };
            let hello = hello.map_err(io_err("handshake"))?;
            if !ACCEPTED_PROTOCOLS.contains(&hello.protocol) {
                return Err(refuse(
                    ret,
                    format!(
                        "migration protocol version {} is not supported (accepted: {ACCEPTED_PROTOCOLS:?})",
                        hello.protocol
                    ),
                ));
            }
            if let Some(r) = ret.as_mut() {
                let mut accepted = hello.features & SUPPORTED_FEATURES;
                if !params.postcopy || matches!(r, Channel::Tls(_)) || params.dump_stream.is_some()
                {
                    accepted &= !FEATURE_POSTCOPY;
                }
                postcopy_ok = accepted & FEATURE_POSTCOPY != 0;
                report_progress = accepted & FEATURE_PROGRESS != 0;
                guest_first = accepted & FEATURE_GUEST_FIRST != 0;
                sparse_ok = accepted & FEATURE_SPARSE_PAGES != 0;
                let count = hello.channels.min(params.page_channels).min(MAX_CHANNELS);
                let mut ack = Msg::new(Kind::HelloAck, 0);
                match book {
                    Some(book)
                        if accepted & FEATURE_PAGE_CHANNELS != 0
                            && count > 0
                            && params.dump_stream.is_none()
                            && vm.shared_ram().is_some() =>
                    {
                        let grant = book.grant(count);
                        ack.text = grant.token.to_string();
                        ack.value = u64::from(count) << 16;
                        granted = Some(grant);
                        progress.update(|s| s.page_channels = count);
                    }
                    _ => accepted &= !FEATURE_PAGE_CHANNELS,
                }
                ack.value |= u64::from(PROTOCOL_VERSION) | u64::from(accepted) << 32;
                ack.write(r).map_err(io_err("handshake"))?;
            }
            Box::new(s)
        }
        Incoming::File(f) => Box::new(f),
    };
    let mut catalog = vm.catalog();
    crate::config::register(&mut catalog);
    // With page channels the main stream is silent for the whole RAM transfer.
    let reader = Patient::new(reader, progress, granted.is_some());
    let mut stream = StreamReader::new(
        TeeReader::new(BufReader::with_capacity(256 << 10, reader), dump),
        Some(&catalog),
    )?;
    let machine = vm.machine();
    if stream.header().machine != machine.name() {
        return Err(refuse(
            ret,
            format!(
                "machine type: source {}, destination {}",
                stream.header().machine,
                machine.name()
            ),
        ));
    }
    stream.keep_sparse(true);
    stream.refuse_sparse(!sparse_ok);
    for (name, instance) in vm.expected_sections() {
        stream.expect(&name, instance);
    }
    let Item::Config(raw) = stream.next_item()? else {
        return Err(MigrationError::Protocol(
            "configuration record missing".into(),
        ));
    };
    let src_config: ConfigRecord = raw.load()?;
    let mut diffs = src_config.differences(&vm.config());
    diffs.extend(
        vm.host_refusals(&src_config)
            .into_iter()
            .map(|r| format!("{r} (configuration record at offset {})", raw.offset)),
    );
    if !diffs.is_empty() {
        return Err(refuse(ret, diffs.join("; ")));
    }
    vm.begin_incoming().map_err(MigrationError::Vm)?;
    *started = true;
    if let Some(r) = ret.as_mut() {
        Msg::new(Kind::Accept, 0)
            .write(r)
            .map_err(io_err("handshake"))?;
    }
    progress.set_status(Status::Active);
    let channels = match &granted {
        Some(g) => {
            let chs = g.collect(params.io_timeout)?;
            for (_, ch) in &chs {
                let sock = ch.socket();
                sock.set_read_timeout(Some(params.io_timeout)).ok();
                sock.set_write_timeout(Some(params.io_timeout)).ok();
                sock.set_nodelay(true).ok();
                if let Ok(c) = sock.try_clone() {
                    progress.add_socket(c);
                }
            }
            info!(channels = chs.len(), "page channels connected");
            chs
        }
        None => Vec::new(),
    };
    drop(granted);
    let torn = Torn::default();
    let ram = if channels.is_empty() {
        None
    } else {
        Some(vm.shared_ram().ok_or_else(|| {
            MigrationError::Vm("guest RAM cannot be shared with page channels".into())
        })?)
    };
    let paged = ram.is_some();
    let mut sections = std::thread::scope(|sc| {
        let receivers = ram.as_deref().map(|ram| {
            Receivers::start(
                sc,
                channels,
                ram,
                &torn,
                progress,
                params.page_nice_for(guest_first),
            )
        });
        let res = read_main(&mut stream, vm, ret, progress, report_progress, paged);
        let Some(receivers) = receivers else {
            return res;
        };
        if res.is_err() {
            // Unblock the channel threads; a channel's own failure is the better report.
            progress.stop_reading();
        }
        match (res, receivers.join()) {
            (Ok(s), Ok(())) => Ok(s),
            (_, Err(e)) | (Err(e), Ok(())) => Err(e),
        }
    })?;
    if paged {
        torn.check().map_err(MigrationError::Protocol)?;
    }
    let end_at = std::time::Instant::now();
    progress.update(|s| s.transferred = stream.offset());
    let switch_at = sections
        .iter()
        .position(|s| s.name == SwitchoverRecord::NAME)
        .expect("required by the catalog");
    let switchover: SwitchoverRecord = sections.remove(switch_at).load()?;
    vm.load_devices(&sections).map_err(MigrationError::Vm)?;
    let Some(r) = ret.as_mut() else {
        // A file: loading it is the commit.
        vm.commit(switchover.source_running)
            .map_err(MigrationError::Vm)?;
        return Ok(());
    };
    Msg::new(Kind::Loaded, sections.len() as u64)
        .write(r)
        .map_err(io_err("switchover"))?;
    info!(
        sections = sections.len(),
        ms = end_at.elapsed().as_secs_f64() * 1e3,
        "device state loaded"
    );
    // COMMIT comes on the forward path, after the end marker.
    let mut rest = stream.into_inner().into_inner();
    let m = Msg::read(&mut rest).map_err(io_err("waiting for COMMIT"))?;
    if m.kind != Kind::Commit {
        return Err(MigrationError::Protocol(format!(
            "expected Commit, got {:?}",
            m.kind
        )));
    }
    match m.value {
        0 => {}
        1 if postcopy_ok => {
            let pc = vm.postcopy_ram().ok_or_else(|| {
                MigrationError::Vm("this VMM cannot receive pages after the switchover".into())
            })?;
            let mut requests = r.try_clone().map_err(io_err("post-copy"))?;
            let run = switchover.source_running;
            let mut start = || -> Result<(), MigrationError> {
                vm.commit(run).map_err(MigrationError::Vm)?;
                info!(
                    ms = end_at.elapsed().as_secs_f64() * 1e3,
                    "committed; post-copy"
                );
                Msg::new(Kind::Committed, 0)
                    .write(r)
                    .map_err(io_err("post-copy"))
            };
            return crate::postcopy::receive_pages(
                pc,
                &src_config.memory,
                &mut rest,
                &mut requests,
                progress,
                &mut start,
                paused,
            );
        }
        v => {
            return Err(MigrationError::Protocol(format!(
                "COMMIT with value {v}, but post-copy was not negotiated"
            )));
        }
    }
    vm.commit(switchover.source_running)
        .map_err(MigrationError::Vm)?;
    info!(ms = end_at.elapsed().as_secs_f64() * 1e3, "committed");
    // The guest is ours now; an unheard ack only leaves the source in "state unknown".
    if let Err(e) = Msg::new(Kind::Committed, 0).write(r) {
        error!(error = %e, "could not acknowledge COMMIT; the guest runs here regardless");
    }
    Ok(())
}

/// Read the main stream after the handshake up to its end marker, writing any RAM records
/// (refused when page channels carry the pages); returns the device sections.
fn read_main<V: DestinationVm, R: Read>(
    stream: &mut StreamReader<'_, R>,
    vm: &mut V,
    ret: &mut Option<Channel>,
    progress: &Progress,
    mut report_progress: bool,
    paged: bool,
) -> Result<Vec<RawSection>, MigrationError> {
    let mut sections: Vec<RawSection> = Vec::new();
    // Pages written, and the count last reported to the source.
    let (mut written, mut reported) = (0u64, 0u64);
    // Time spent writing pages, and reading (waiting for) the stream, for the log.
    let (mut write_time, mut read_time) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    loop {
        let t = std::time::Instant::now();
        let item = stream.next_item()?;
        read_time += t.elapsed();
        match item {
            Item::Ram(rec) if paged => {
                return Err(MigrationError::Protocol(format!(
                    "RAM record at offset {} in the main stream, but page channels carry the pages",
                    rec.offset
                )));
            }
            Item::Ram(rec) => {
                let t = std::time::Instant::now();
                let (gpa, pages) = (rec.gpa, rec.pages);
                let zero = rec.data.is_none() && rec.sparse.is_none();
                match rec.sparse {
                    Some(body) => vm.write_ram_sparse(gpa, pages, body),
                    None => vm.write_ram(gpa, pages, rec.data),
                }
                .map_err(MigrationError::Vm)?;
                write_time += t.elapsed();
                written += u64::from(pages);
                if report_progress
                    && written - reported >= PROGRESS_PAGES
                    && let Some(r) = ret.as_mut()
                {
                    // A report that cannot be written means the source is gone: the next
                    // read says where the stream stopped, which is the better error.
                    report_progress = Msg::new(Kind::Received, written).write(r).is_ok();
                    reported = written;
                }
                progress.update(|s| {
                    if zero {
                        s.zero_pages += u64::from(pages);
                    } else {
                        s.normal_pages += u64::from(pages);
                    }
                });
            }
            Item::Section(s) => {
                if sections.is_empty() {
                    progress.set_status(Status::Device);
                }
                sections.push(s);
            }
            Item::Config(_) => {
                return Err(MigrationError::Protocol(
                    "second configuration record".into(),
                ));
            }
            Item::End => break,
        }
    }
    info!(
        pages = written,
        write_ms = write_time.as_secs_f64() * 1e3,
        read_ms = read_time.as_secs_f64() * 1e3,
        "stream received"
    );
    Ok(sections)
}
