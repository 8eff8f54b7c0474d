//! Hostile migration streams against a real `ferry --incoming tcp:` process, over a real TCP
//! connection: the test speaks the protocol itself (hello, header, the configuration record of
//! a real source) and then sends what no honest source would — pages beyond guest RAM, in the
//! PCI hole, straddling the end of RAM or of a hot-plugged memory block, record counts above
//! the format's bounds, an over-long section, a connector index the destination does not
//! have, a device id that does not match. Each time the destination refuses with an error
//! naming what was wrong, writes nothing, stays `inmigrate`, keeps listening, and finally
//! accepts an honest stream whose guest memory verifies.
//!
//! Also the access rules: the incoming listener binds only the address it was given.

use devstate::{Item, RawSection, StreamReader, StreamWriter, Tag};
use ferry_tests::*;
use machine_types::MachineType;
use migration::ConfigRecord;
use migration::protocol::{FEATURE_SPARSE_PAGES, Hello, Kind, Msg, PROTOCOL_VERSION};
use serde_json::{Value, json};
use std::io::Write;
use std::net::TcpStream;
use vmm::hotplug::{ConnectorKind, ConnectorState};

const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-2.0",
    "--memory",
    "64M",
    "--guest",
    "dirty:4",
];
const RAM: u64 = 64 << 20;
const PCI_HOLE: u64 = 0xC000_0000;
const PAGE: usize = 4096;

fn mem_block() -> Value {
    json!({"driver": "ferry-mem-block", "id": "mem0", "slot": 0})
}

fn wait_configured(f: &mut Ferry, dev: &str) -> Value {
    f.wait_connector(
        dev,
        |c| {
            c["state"]
                .as_str()
                .is_some_and(|s| s.ends_with("configured"))
        },
        "configured",
    )
}

/// A real stream, split into its records.
struct Captured {
    machine: &'static MachineType,
    config: RawSection,
    ram: Vec<(u64, u32, Option<Vec<u8>>)>,
    sections: Vec<RawSection>,
}

fn capture(path: &std::path::Path) -> Captured {
    let bytes = std::fs::read(path).unwrap();
    let mut r = StreamReader::new(bytes.as_slice(), None).unwrap();
    let machine = MachineType::lookup(&r.header().machine).unwrap();
    let mut config = None;
    let mut ram = Vec::new();
    let mut sections = Vec::new();
    loop {
        match r.next_item().unwrap() {
            Item::Config(c) => config = Some(c),
            Item::Ram(x) => ram.push((x.gpa, x.pages, x.data.map(<[u8]>::to_vec))),
            Item::Section(s) => sections.push(s),
            Item::End => break,
        }
    }
    Captured {
        machine,
        config: config.unwrap(),
        ram,
        sections,
    }
}

/// What a hostile source sends after the header.
enum Body {
    /// The configuration record of the real source, then these raw bytes.
    Raw(Vec<u8>),
    /// A replacement configuration record (expect a Refuse).
    Config(ConfigRecord),
    /// The real stream with extra sections inserted before the switchover record.
    ExtraSections(Vec<Vec<u8>>),
    /// The real stream, unchanged.
    Honest,
}

/// A RAM record, framed by hand (so bounds the writer enforces can be broken), CRC included.
fn ram_record(gpa: u64, pages: u32, kind: u8, data: &[u8]) -> Vec<u8> {
    let mut r = vec![Tag::Ram as u8];
    r.extend_from_slice(&gpa.to_le_bytes());
    r.extend_from_slice(&pages.to_le_bytes());
    r.push(kind);
    r.extend_from_slice(data);
    let crc = crc32(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

/// CRC-32 (IEEE), bitwise: the test frames records itself.
fn crc32(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn stream(cap: &Captured, body: Body) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), cap.machine, "hostile").unwrap();
    match body {
        Body::Config(mut c) => {
            w.config(&mut c).unwrap();
            return w.finish().unwrap();
        }
        Body::Raw(extra) => {
            w.raw(&cap.config.encode(Tag::Config)).unwrap();
            let mut v = w.finish().unwrap();
            v.truncate(v.len() - 13); // no end marker
            v.extend_from_slice(&extra);
            return v;
        }
        Body::ExtraSections(_) | Body::Honest => {}
    }
    w.raw(&cap.config.encode(Tag::Config)).unwrap();
    for (gpa, pages, data) in &cap.ram {
        match data {
            Some(d) => w.ram_data(*gpa, d).unwrap(),
            None => w.ram_zero(*gpa, *pages).unwrap(),
        }
    }
    let extra = match body {
        Body::ExtraSections(e) => e,
        _ => vec![],
    };
    for s in &cap.sections {
        if s.name == "migration" {
            for e in &extra {
                w.raw(e).unwrap();
            }
        }
        w.raw(&s.encode(Tag::Section)).unwrap();
    }
    w.finish().unwrap()
}

/// Speak the protocol: hello, the stream; returns the destination's last message.
fn send(port: &str, bytes: &[u8]) -> Msg {
    let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    Hello {
        protocol: PROTOCOL_VERSION,
        // SPARSE offered, so that hostile SPARSE bodies reach the checks of their contents.
        features: FEATURE_SPARSE_PAGES,
        channels: 0,
    }
    .write(&mut s)
    .unwrap();
    assert_eq!(Msg::read(&mut s).unwrap().kind, Kind::HelloAck);
    // The destination may stop reading at the first bad record: a failed write is fine.
    let _ = s.write_all(bytes);
    let _ = s.flush();
    let mut last = Msg::read(&mut s).unwrap();
    if last.kind == Kind::Accept {
        last = Msg::read(&mut s).unwrap();
    }
    if last.kind == Kind::Loaded {
        Msg::new(Kind::Commit, 0).write(&mut s).unwrap();
        last = Msg::read(&mut s).unwrap();
    }
    last
}

/// Send `bytes`; the destination must answer Failed/Refuse with `want` in the reason, report
/// the same in query-migrate, stay `inmigrate` and keep listening.
fn refused(d: &mut Ferry, port: &str, label: &str, bytes: &[u8], want: &str) -> String {
    let m = send(port, bytes);
    assert!(
        matches!(m.kind, Kind::Failed | Kind::Refuse),
        "{label}: the destination accepted it: {m:?}"
    );
    assert!(
        m.text.contains(want),
        "{label}: reason should name '{want}': {}",
        m.text
    );
    let info = d.wait_migration(&["failed"]);
    let desc = info["error-desc"].as_str().unwrap_or_default().to_owned();
    assert!(desc.contains(want), "{label}: query-migrate: {info}");
    assert_eq!(desc.matches(want).count(), 1, "{label}: said twice: {desc}");
    assert_eq!(d.status(), "inmigrate", "{label}");
    eprintln!("{label}: {desc}");
    desc
}

#[test]
fn hostile_streams_are_refused_and_nothing_is_written() {
    let dir = tempdir();
    // A real source with a hot-plugged memory block: its snapshot gives a valid header,
    // configuration record, RAM image and device state to build on.
    let mut s = Ferry::spawn(dir.path(), "src", &SHAPE);
    s.wait_pass(1);
    s.ok("device_add", mem_block());
    let conn = wait_configured(&mut s, "mem0");
    let mem0_index = conn["index"].as_u64().unwrap() as u32;
    let snap = dir.path().join("src.ferry");
    // A live save of a dirtying guest: let it finish on a loaded host too.
    s.ok("migrate-set-parameters", completes_under_load());
    s.ok(
        "migrate",
        json!({"uri": format!("file:{}", snap.display())}),
    );
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "source snapshot: {info}");
    drop(s);
    let cap = capture(&snap);
    let config: ConfigRecord = cap.config.load().unwrap();
    let block = config.memory.last().unwrap().clone();
    assert!(
        block.gpa >= 1 << 32,
        "the block sits above the PCI hole: {config:?}"
    );

    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut d = Ferry::spawn(dir.path(), "dst", &args);
    d.ok("device_add", mem_block());
    let port = d.incoming_port();

    let page = vec![0xA5u8; PAGE];
    let two = vec![0xA5u8; 2 * PAGE];
    let data = |gpa: u64, d: &[u8]| ram_record(gpa, (d.len() / PAGE) as u32, 2, d);
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "page just beyond RAM",
            data(RAM, &page),
            format!("{RAM:#x}"),
        ),
        (
            "page in the PCI hole",
            data(PCI_HOLE, &page),
            format!("{PCI_HOLE:#x}"),
        ),
        (
            "range straddling the end of RAM",
            data(RAM - PAGE as u64, &two),
            format!("{:#x}", RAM - PAGE as u64),
        ),
        (
            "range straddling the end of the memory block",
            data(block.gpa + block.size - PAGE as u64, &two),
            format!("{:#x}", block.gpa + block.size - PAGE as u64),
        ),
        (
            "page past the memory block",
            data(block.gpa + block.size, &page),
            format!("{:#x}", block.gpa + block.size),
        ),
        (
            "ZERO run of 4 GiB from 0",
            ram_record(0, devstate::stream::MAX_ZERO_PAGES, 1, &[]),
            "is not guest RAM".into(),
        ),
        (
            "address near 2^64 (overflow)",
            data(u64::MAX - PAGE as u64 + 1, &page),
            "overflows".into(),
        ),
        (
            "unaligned address",
            data(0x1234, &page),
            "not page aligned".into(),
        ),
        (
            // Only the header: the data would be 257 pages but is never read or allocated.
            "DATA count above the bound",
            ram_record(0, devstate::stream::MAX_DATA_PAGES + 1, 2, &[]),
            "page count 257 out of range".into(),
        ),
        (
            "ZERO count of 0",
            ram_record(0, 0, 1, &[]),
            "page count 0 out of range".into(),
        ),
        (
            "unknown RAM kind",
            ram_record(0, 1, 4, &[]),
            "unknown kind 4".into(),
        ),
        (
            // Only the length: the body is never read or allocated.
            "SPARSE length above its bound",
            ram_record(0, 1, 3, &u32::MAX.to_le_bytes()),
            "sparse body of 4294967295 bytes exceeds 4104 for 1 pages".into(),
        ),
        (
            "SPARSE masks claiming more blocks than the body holds",
            {
                let mut body = 72u32.to_le_bytes().to_vec();
                body.extend_from_slice(&0b11u64.to_le_bytes());
                body.extend_from_slice(&[7u8; 64]);
                ram_record(0, 1, 3, &body)
            },
            "sparse body ends inside page 0".into(),
        ),
        (
            "SPARSE page just beyond RAM",
            {
                let mut body = 72u32.to_le_bytes().to_vec();
                body.extend_from_slice(&1u64.to_le_bytes());
                body.extend_from_slice(&[7u8; 64]);
                ram_record(RAM, 1, 3, &body)
            },
            "is not guest RAM".into(),
        ),
        (
            "section length far above its schema bound",
            {
                let mut r = vec![Tag::Section as u8, 9];
                r.extend_from_slice(b"connector");
                r.extend_from_slice(&mem0_index.to_le_bytes());
                r.extend_from_slice(&2u32.to_le_bytes());
                r.extend_from_slice(&u32::MAX.to_le_bytes());
                r
            },
            "section payload".into(),
        ),
    ];
    for (label, rec, want) in &cases {
        refused(
            &mut d,
            &port,
            label,
            &stream(&cap, Body::Raw(rec.clone())),
            want,
        );
    }

    // The configuration handshake: a different device id on the same connector.
    let mut other = config.clone();
    other.devices[0].id = "evil".into();
    refused(
        &mut d,
        &port,
        "configuration with another device id",
        &stream(&cap, Body::Config(other)),
        "source has ferry-mem-block 'evil', destination has ferry-mem-block 'mem0'",
    );

    // Device state: connector sections the configuration did not announce.
    let conn_section = |index: u32, device: &str| {
        let mut c = ConnectorState {
            index,
            state: ConnectorKind::MemBlock.ready_state(),
            device: device.into(),
            unplug_requested: true,
            ..ConnectorState::default()
        };
        devstate::encode_section(&mut c, index, cap.machine, Tag::Section).unwrap()
    };
    let unknown = (mem0_index & 0xF000_0000) | 0x0FFF;
    refused(
        &mut d,
        &port,
        "connector index the destination does not have",
        &stream(
            &cap,
            Body::ExtraSections(vec![conn_section(unknown, "mem0")]),
        ),
        &format!("Unknown connector {unknown:#010x}"),
    );
    refused(
        &mut d,
        &port,
        "connector section with another device id",
        &stream(
            &cap,
            Body::ExtraSections(vec![conn_section(mem0_index, "evil")]),
        ),
        "source has device 'evil' attached, this side has 'mem0'",
    );

    // After all that, an honest stream loads and the guest's memory verifies.
    let m = send(&port, &stream(&cap, Body::Honest));
    assert_eq!(m.kind, Kind::Committed, "{m:?}\n{}", read(&d.log));
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    d.ok("stop", json!({}));
    let v = d.ok("__org.ferry_verify-guest", json!({}));
    assert_eq!(v["ok"], true);
    assert_eq!(v["blocks"], 1, "the hot-plugged block verifies too: {v}");
}

#[test]
fn incoming_listener_binds_only_the_given_address() {
    let dir = tempdir();
    let mut args = SHAPE.to_vec();
    args.extend(["--incoming", "tcp:127.0.0.2:0"]);
    let mut d = Ferry::spawn(dir.path(), "dst", &args);
    let info = d.ok("query-migrate", json!({}));
    assert_eq!(info["socket-address"][0]["host"], "127.0.0.2", "{info}");
    let port = d.incoming_port();
    let e = TcpStream::connect(format!("127.0.0.1:{port}"))
        .expect_err("the listener must not be reachable on 127.0.0.1");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // It is reachable where it was asked to listen (a peer that hangs up at once only fails
    // that attempt).
    drop(TcpStream::connect(format!("127.0.0.2:{port}")).unwrap());
    let st = d.wait_migration(&["failed"]);
    assert!(
        st["error-desc"].as_str().unwrap().contains("handshake"),
        "{st}"
    );
    assert_eq!(d.status(), "inmigrate");
    // And /proc/net/tcp shows no wildcard listener on that port.
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let hex_port = format!(":{:04X}", port.parse::<u16>().unwrap());
    let listeners: Vec<&str> = tcp
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&hex_port) && f[3] == "0A"
        })
        .collect();
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    assert!(
        listeners[0].split_whitespace().nth(1) == Some(&format!("0200007F{hex_port}")),
        "bound to 127.0.0.2 only: {listeners:?}"
    );
}
