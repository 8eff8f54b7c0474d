//! A strict in-memory destination and a byte-driven generator of hostile streams, shared by
//! `tests/hostile_streams.rs` (seeded randomised cases in CI) and the cargo-fuzz target
//! `fuzz/fuzz_targets/receive.rs` (which includes this file by path).
//!
//! The VM has two RAM regions (boot RAM at 0 and a "hot-plugged block" above 4 GiB) and
//! refuses any page range that is not entirely inside one of them; it panics on anything the
//! engine must never do (write before the stream was accepted, a DATA slice whose length
//! disagrees with its page count, load twice, commit before load), so a panic is a finding.
#![allow(dead_code)]

use devstate::{Catalog, RawSection, RawSubsection, Section, Tag, record};
use machine_types::MachineType;
use migration::{
    ConfigRecord, DestinationVm, Incoming, MigrationError, Params, Progress, RegionDesc,
    SwitchoverRecord,
};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

pub const PAGE: usize = 4096;
pub const MACHINE: &str = "ferry-2.0";
/// (gpa, pages) of the two RAM regions.
pub const REGIONS: [(u64, usize); 2] = [(0, 64), (1 << 32, 16)];

record! {
    /// The fake device.
    pub struct Counter {
        pub value: u64,
        pub label: String [max = 16],
    }
}

impl Section for Counter {
    const NAME: &'static str = "counter";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;

    fn post_load(&mut self, _v: u32) -> Result<(), String> {
        if self.value == 0xdead {
            return Err("value 0xdead is refused".into());
        }
        Ok(())
    }
}

/// What the engine did to the VM.
#[derive(Debug, Default)]
pub struct StrictVm {
    pub mem: Vec<Vec<u8>>,
    pub begun: bool,
    pub loaded: Option<usize>,
    pub committed: Option<bool>,
    pub aborted: Option<String>,
    pub writes: u64,
}

pub fn machine() -> &'static MachineType {
    MachineType::lookup(MACHINE).unwrap()
}

pub fn config() -> ConfigRecord {
    let m = machine();
    ConfigRecord {
        machine: m.name().into(),
        cpu_model: m.compat().cpu_model.name().into(),
        vcpus: 1,
        memory: REGIONS
            .iter()
            .map(|&(gpa, pages)| RegionDesc {
                gpa,
                size: (pages * PAGE) as u64,
            })
            .collect(),
        devices: vec![],
    }
}

impl StrictVm {
    pub fn new() -> StrictVm {
        StrictVm {
            mem: REGIONS.iter().map(|&(_, p)| vec![0u8; p * PAGE]).collect(),
            ..StrictVm::default()
        }
    }

    /// The region holding all of `[gpa, gpa + len)`, and the offset in it.
    fn locate(&self, gpa: u64, len: u64) -> Option<(usize, usize)> {
        let end = gpa.checked_add(len)?;
        REGIONS.iter().enumerate().find_map(|(i, &(start, pages))| {
            (gpa >= start && end <= start + (pages * PAGE) as u64)
                .then(|| (i, (gpa - start) as usize))
        })
    }
}

impl DestinationVm for StrictVm {
    fn machine(&self) -> &'static MachineType {
        machine()
    }
    fn config(&self) -> ConfigRecord {
        config()
    }
    fn catalog(&self) -> Catalog {
        let mut c = Catalog::new();
        c.register::<Counter>();
        c
    }
    fn expected_sections(&self) -> Vec<(String, u32)> {
        vec![]
    }
    fn begin_incoming(&mut self) -> Result<(), String> {
        assert!(!self.begun, "begin_incoming called twice");
        self.begun = true;
        Ok(())
    }
    fn write_ram(&mut self, gpa: u64, pages: u32, data: Option<&[u8]>) -> Result<(), String> {
        assert!(self.begun, "RAM written before the stream was accepted");
        assert!(self.loaded.is_none(), "RAM written after the device state");
        let len = u64::from(pages) * PAGE as u64;
        if let Some(d) = data {
            assert_eq!(
                d.len() as u64,
                len,
                "DATA slice disagrees with its page count"
            );
        }
        let Some((i, off)) = self.locate(gpa, len) else {
            return Err(format!(
                "Range {gpa:#x}..{:#x} is not guest RAM; nothing was written",
                gpa.saturating_add(len)
            ));
        };
        let dst = &mut self.mem[i][off..off + len as usize];
        match data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
        self.writes += 1;
        Ok(())
    }
    fn load_devices(&mut self, sections: &[RawSection]) -> Result<(), String> {
        assert!(
            self.begun,
            "device state loaded before the stream was accepted"
        );
        assert!(self.loaded.is_none(), "device state loaded twice");
        for s in sections {
            assert_ne!(
                s.name,
                SwitchoverRecord::NAME,
                "engine record passed to the VM"
            );
            let _: Counter = s.load().map_err(|e| migration::chain(&e))?;
        }
        self.loaded = Some(sections.len());
        Ok(())
    }
    fn commit(&mut self, run: bool) -> Result<(), String> {
        assert!(self.loaded.is_some(), "commit before load");
        assert!(self.committed.is_none(), "commit twice");
        self.committed = Some(run);
        Ok(())
    }
    fn abort_incoming(&mut self, why: &str) {
        assert!(self.committed.is_none(), "abort after commit");
        self.aborted = Some(why.to_owned());
    }
}

// ---------------------------------------------------------------------------------------
// Stream building.

fn crc_table() -> &'static [u32; 256] {
    static T: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    })
}

/// CRC-32 (IEEE), as the stream uses.
pub fn crc32(b: &[u8]) -> u32 {
    let t = crc_table();
    !b.iter().fold(!0u32, |c, &x| {
        t[((c ^ u32::from(x)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Append a CRC over `rec` (from its tag byte on).
pub fn seal(mut rec: Vec<u8>) -> Vec<u8> {
    let c = crc32(&rec);
    rec.extend_from_slice(&c.to_le_bytes());
    rec
}

/// A RAM record framed by hand, so that every bound can be broken.
pub fn ram(gpa: u64, pages: u32, kind: u8, data: &[u8]) -> Vec<u8> {
    let mut r = vec![Tag::Ram as u8];
    r.extend_from_slice(&gpa.to_le_bytes());
    r.extend_from_slice(&pages.to_le_bytes());
    r.push(kind);
    r.extend_from_slice(data);
    seal(r)
}

pub fn end(records: u64) -> Vec<u8> {
    let mut r = vec![Tag::End as u8];
    r.extend_from_slice(&records.to_le_bytes());
    seal(r)
}

pub fn counter(instance: u32, value: u64) -> Vec<u8> {
    let mut c = Counter {
        value,
        label: "c".into(),
    };
    devstate::encode_section(&mut c, instance, machine(), Tag::Section).unwrap()
}

pub fn switchover(running: bool) -> Vec<u8> {
    let mut s = SwitchoverRecord {
        source_running: running,
    };
    devstate::encode_section(&mut s, 0, machine(), Tag::Section).unwrap()
}

/// Header and configuration record, exactly as a source with [`config`] writes them.
pub fn valid_prefix() -> Vec<u8> {
    let mut w = devstate::StreamWriter::new(Vec::new(), machine(), "strict-vm").unwrap();
    w.config(&mut config()).unwrap();
    let mut v = w.finish().unwrap();
    v.truncate(v.len() - 13); // drop the end marker
    v
}

/// A complete honest stream: a few pages in each region, a counter and the switchover.
pub fn honest_stream() -> Vec<u8> {
    let mut v = valid_prefix();
    v.extend(ram(0, 2, 2, &vec![0x11; 2 * PAGE]));
    v.extend(ram(REGIONS[1].0, 16, 1, &[]));
    v.extend(ram(REGIONS[1].0 + PAGE as u64, 1, 2, &vec![0x22; PAGE]));
    v.extend(counter(0, 7));
    v.extend(switchover(true));
    v.extend(end(6));
    v
}

/// Reads bytes, numbers and choices from fuzz input; zeros once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

/// Turn arbitrary bytes into a stream after a valid header and configuration record: each
/// step is a record (RAM with interesting or random addresses and counts, sections with
/// valid or arbitrary framing, end markers) with a correct CRC unless the input says
/// otherwise, so the fuzzer gets past the CRCs into the engine and the VM.
pub fn hostile_stream(data: &[u8]) -> Vec<u8> {
    let mut inp = Input(data);
    let mut out = valid_prefix();
    let mut records = 1u64; // the config record
    let mut steps = 0;
    while !inp.is_empty() && steps < 64 {
        steps += 1;
        let op = inp.u8() % 10;
        let mut rec = match op {
            0..=3 => {
                let (r0, r1) = (REGIONS[0], REGIONS[1]);
                let gpa = match inp.u8() % 10 {
                    0 => u64::from(inp.u8() % 80) * PAGE as u64,
                    1 => r1.0 + u64::from(inp.u8() % 24) * PAGE as u64,
                    2 => inp.u64(),
                    3 => (u64::MAX - u64::from(inp.u8()) * PAGE as u64).wrapping_add(1),
                    4 => 0xC000_0000,
                    5 => (r0.1 * PAGE) as u64 - PAGE as u64,
                    6 => r1.0 + (r1.1 * PAGE) as u64 - PAGE as u64,
                    7 => u64::from(inp.u32()),
                    8 => r1.0 - PAGE as u64,
                    _ => u64::from(inp.u8() % 8) * PAGE as u64,
                };
                let pages = match inp.u8() % 6 {
                    0 | 1 => 1 + u32::from(inp.u8() % 4),
                    2 => inp.u32(),
                    3 => devstate::stream::MAX_DATA_PAGES + u32::from(inp.u8() % 3) - 1,
                    4 => devstate::stream::MAX_ZERO_PAGES + u32::from(inp.u8() % 3) - 1,
                    _ => 0,
                };
                let kind = match inp.u8() % 6 {
                    0 | 1 => 1,
                    2 | 3 => 2,
                    4 => 3,
                    _ => inp.u8(),
                };
                let data = if kind == 2 && pages <= 300 {
                    vec![inp.u8(); pages as usize * PAGE]
                } else if kind == 3 && pages <= 300 {
                    // A SPARSE body: per page a mask and its blocks, its length sometimes off.
                    let mut body = Vec::new();
                    for _ in 0..pages {
                        let mask = inp.u64() & inp.u64() & inp.u64();
                        body.extend_from_slice(&mask.to_le_bytes());
                        body.extend(std::iter::repeat_n(
                            inp.u8(),
                            mask.count_ones() as usize * 64,
                        ));
                    }
                    let skew = if inp.u8() % 4 == 0 { inp.u8() % 3 } else { 1 };
                    let len = (body.len() as u32 + u32::from(skew)).saturating_sub(1);
                    let mut d = len.to_le_bytes().to_vec();
                    d.extend_from_slice(&body);
                    d
                } else if kind == 1 {
                    vec![]
                } else {
                    let n = usize::from(inp.u8() % 16);
                    inp.bytes(n)
                };
                records += 1;
                ram(gpa, pages, kind, &data)
            }
            4 => {
                records += 1;
                let value = if inp.u8() % 8 == 0 { 0xdead } else { inp.u64() };
                counter(u32::from(inp.u8() % 3), value)
            }
            5 => {
                records += 1;
                switchover(inp.u8() % 2 == 0)
            }
            6 => {
                // A section with arbitrary name, version, body and subsections, framed
                // correctly.
                records += 1;
                let names = ["counter", "migration", "config", "bogus", ""];
                let name = names[usize::from(inp.u8()) % names.len()];
                let nsub = inp.u8() % 3;
                let blen = usize::from(inp.u8() % 40);
                let raw = RawSection {
                    name: name.into(),
                    instance: u32::from(inp.u8() % 4),
                    version: u32::from(inp.u8() % 4),
                    offset: 0,
                    body_offset: 0,
                    body: inp.bytes(blen),
                    subsections: (0..nsub)
                        .map(|_| {
                            let l = usize::from(inp.u8() % 12);
                            RawSubsection {
                                name: ["unplug-timer", "x", ""][usize::from(inp.u8() % 3)].into(),
                                version: u32::from(inp.u8() % 3),
                                body_offset: 0,
                                body: inp.bytes(l),
                            }
                        })
                        .collect(),
                    crc: 0,
                };
                raw.encode(if inp.u8() % 8 == 0 {
                    Tag::Config
                } else {
                    Tag::Section
                })
            }
            7 => {
                // A section header with an arbitrary length field and a short payload.
                let mut r = vec![Tag::Section as u8, 7];
                r.extend_from_slice(b"counter");
                r.extend_from_slice(&u32::from(inp.u8()).to_le_bytes());
                r.extend_from_slice(&1u32.to_le_bytes());
                r.extend_from_slice(&inp.u32().to_le_bytes());
                let n = usize::from(inp.u8() % 32);
                r.extend(inp.bytes(n));
                seal(r)
            }
            8 => {
                let n = if inp.u8() % 4 == 0 {
                    inp.u64()
                } else {
                    records
                };
                end(n)
            }
            _ => {
                let n = usize::from(inp.u8() % 24);
                inp.bytes(n)
            }
        };
        // Now and then a broken CRC or a flipped byte.
        match inp.u8() % 32 {
            0 if !rec.is_empty() => {
                let i = rec.len() - 1;
                rec[i] ^= 0x5a;
            }
            1 if !rec.is_empty() => {
                let i = usize::from(inp.u8()) % rec.len();
                rec[i] ^= 1 << (inp.u8() % 8);
            }
            2 => rec.truncate(rec.len() / 2),
            _ => {}
        }
        out.extend(rec);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Running the engine.

/// Short timeouts: a fuzz case must never wait long.
pub fn params() -> Params {
    Params {
        io_timeout: Duration::from_secs(5),
        ..Params::default()
    }
}

/// Check what a finished `receive` left behind; panics on a broken invariant.
pub fn check(vm: &StrictVm, res: &Result<(), MigrationError>) {
    match res {
        Ok(()) => {
            assert!(vm.loaded.is_some() && vm.committed.is_some(), "{vm:?}");
            assert!(vm.aborted.is_none());
        }
        Err(e) => {
            assert!(vm.committed.is_none(), "committed, yet failed: {e}");
            assert!(vm.aborted.is_some(), "failure without abort_incoming: {e}");
            let _ = migration::chain(e);
        }
    }
}

/// Feed `bytes` as a stream file (no return path).
pub fn receive_file(bytes: &[u8]) -> (StrictVm, Result<(), MigrationError>) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = base.join(format!(
        "ferry-strict-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::write(&path, bytes).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut vm = StrictVm::new();
    let res = migration::receive(&mut vm, Incoming::File(f), &params(), &Progress::default());
    check(&vm, &res);
    (vm, res)
}

/// Feed `bytes` after a hello over a real loopback TCP connection, acting as the source. The
/// COMMIT a source sends after LOADED is queued right behind the stream, then the write side
/// is shut, so an incomplete stream ends in EOF rather than a wait for the I/O timeout.
pub fn receive_tcp(bytes: &[u8]) -> (StrictVm, Result<(), MigrationError>) {
    receive_tcp_offering(bytes, 0) // as a source that predates features
}

/// [`receive_tcp`] from a source whose hello offers `features`.
pub fn receive_tcp_offering(bytes: &[u8], features: u32) -> (StrictVm, Result<(), MigrationError>) {
    use migration::protocol::{Hello, Kind, Msg, PROTOCOL_VERSION};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let bytes = bytes.to_vec();
    let peer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut all = Vec::with_capacity(bytes.len() + 32);
            Hello {
                protocol: PROTOCOL_VERSION,
                features,
                channels: 0,
            }
            .write(&mut all)
            .unwrap();
            all.extend_from_slice(&bytes);
            Msg::new(Kind::Commit, 0).write(&mut all).unwrap();
            let _ = s.write_all(&all);
            let _ = s.shutdown(std::net::Shutdown::Write);
        });
        let mut last = None;
        while let Ok(m) = Msg::read(&mut r) {
            last = Some(m.kind);
        }
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
        writer.join().unwrap();
        last
    });
    let (s, _) = l.accept().unwrap();
    let mut vm = StrictVm::new();
    let res = migration::receive(
        &mut vm,
        Incoming::Tcp(s.into()),
        &params(),
        &Progress::default(),
    );
    check(&vm, &res);
    let last = peer.join().unwrap();
    if res.is_ok() {
        assert_eq!(last, Some(Kind::Committed));
    }
    (vm, res)
}
