//! The stream codec: header, config record, RAM records, sections, end marker.
//!
//! Byte layout (all integers little-endian; `FORMAT.md` at the repository root has the table):
//!
//! ```text
//! header  := "FERRYSTM" | u16 format=1 | u8 n | machine[n] | u8 n | producer[n] | u32 crc
//! record  := config | ram | section | end          (tag byte first; tag 0 is invalid)
//! config  := 0x01 | same framing as a section      (exactly one, first)
//! ram     := 0x02 | u64 gpa | u32 pages | u8 kind | body | u32 crc
//!            kind 1 ZERO: no body; 2 DATA: pages*4096 bytes; 3 SPARSE: u32 len | len bytes
//!            (see [`crate::sparse`]; only on connections whose destination offered it)
//! section := 0x03 | u8 n | name[n] | u32 instance | u32 version | u32 len | payload[len] | u32 crc
//! payload := u32 body_len | body | u8 nsub | (u8 n | name[n] | u32 version | u32 len | body)*
//! end     := 0x04 | u64 records | u32 crc
//! abort   := 0x05 | u32 n (<= 4096) | reason[n] | u32 crc   (the source gave up; last record)
//! ```
//!
//! Every CRC is CRC-32 (IEEE) over the record from its tag byte up to the CRC. Order is fixed:
//! header, config, RAM records, sections, end. For a page sent twice the last copy wins.

use crate::schema::Catalog;
use crate::section::SectionInfo;
use crate::wire::{
    self, Crc, HEADER_PREFIX, RAM_HEAD, RamHead, SECTION_FIXED, SectionFixed, frame_section,
};
use crate::{DecodeError, Reader, Section};
use machine_types::MachineType;
use std::collections::BTreeSet;
use std::io::{self, Read, Write};

pub use crate::wire::{
    FORMAT_VERSION, MAGIC, MAX_ABORT_REASON, MAX_DATA_PAGES, MAX_UNKNOWN_SECTION, MAX_ZERO_PAGES,
    PAGE_SIZE, RamKind, Tag, encode_header,
};

/// The stream header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub format_version: u16,
    /// Canonical machine type name.
    pub machine: String,
    /// Producer, e.g. `ferry 0.1.0`.
    pub producer: String,
}

/// A framed subsection, body still encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSubsection {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Absolute offset of its body.
    pub body_offset: u64,
    /// Encoded body.
    pub body: Vec<u8>,
}

/// A framed, CRC-checked section (or config record), body still encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSection {
    /// Name.
    pub name: String,
    /// Instance id.
    pub instance: u32,
    /// Version.
    pub version: u32,
    /// Absolute offset of the record's tag byte.
    pub offset: u64,
    /// Absolute offset of the body.
    pub body_offset: u64,
    /// Encoded body.
    pub body: Vec<u8>,
    /// Subsections in stream order.
    pub subsections: Vec<RawSubsection>,
    /// CRC stored with the record.
    pub crc: u32,
}

impl RawSection {
    /// Decode into the typed state `S`, running its hooks.
    pub fn load<S: Section>(&self) -> Result<S, DecodeError> {
        let mut s = S::default();
        s.pre_load();
        let mut r = Reader::new(&self.body, self.body_offset, S::NAME);
        s.decode_into(self.version, &mut r)?;
        r.finish()?;
        for raw in &self.subsections {
            let sub = S::subsections()
                .iter()
                .find(|d| d.name() == raw.name)
                .ok_or_else(|| DecodeError::UnknownSubsection {
                    section: S::NAME.to_owned(),
                    name: raw.name.clone(),
                    offset: raw.body_offset,
                })?;
            let mut r = Reader::new(&raw.body, raw.body_offset, S::NAME);
            sub.decode(&mut s, raw.version, &mut r)?;
            r.finish()?;
        }
        s.post_load(self.version)
            .map_err(|why| DecodeError::PostLoad {
                section: S::NAME.to_owned(),
                offset: self.offset,
                why,
            })?;
        Ok(s)
    }

    /// Re-encode this record exactly as framed (tag given by the caller).
    pub fn encode(&self, tag: Tag) -> Vec<u8> {
        let subs: Vec<(&str, u32, &[u8])> = self
            .subsections
            .iter()
            .map(|s| (s.name.as_str(), s.version, s.body.as_slice()))
            .collect();
        frame_section(
            tag,
            &self.name,
            self.instance,
            self.version,
            &self.body,
            &subs,
        )
    }
}

/// Encode `s` as a full section record for machine type `m`, or `None` when not needed.
pub fn encode_section<S: Section>(
    s: &mut S,
    instance: u32,
    m: &MachineType,
    tag: Tag,
) -> Option<Vec<u8>> {
    if !s.needed(m) {
        return None;
    }
    s.pre_save();
    let version = S::save_version(m);
    let mut body = Vec::new();
    s.encode(version, &mut body);
    let bodies: Vec<(&str, u32, Vec<u8>)> = S::subsections()
        .iter()
        .filter(|d| d.for_machine(m) && d.needed(s))
        .map(|d| {
            let mut b = Vec::new();
            d.encode(s, &mut b);
            (d.name(), d.version(), b)
        })
        .collect();
    let subs: Vec<(&str, u32, &[u8])> = bodies
        .iter()
        .map(|(n, v, b)| (*n, *v, b.as_slice()))
        .collect();
    Some(frame_section(tag, S::NAME, instance, version, &body, &subs))
}

/// Encode a RAM record header and CRC around `data` (empty for ZERO).
fn ram_record(
    gpa: u64,
    pages: u32,
    kind: RamKind,
    data: &[u8],
    w: &mut impl Write,
) -> io::Result<u64> {
    let head = RamHead {
        gpa,
        pages,
        kind: kind as u8,
    }
    .encode();
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(data);
    w.write_all(&head)?;
    w.write_all(data)?;
    w.write_all(&h.finalize().to_le_bytes())?;
    Ok((RAM_HEAD + data.len() + 4) as u64)
}

/// Refuse a RAM record the reader would refuse.
fn check_ram(gpa: u64, pages: u32, max: u32) -> io::Result<()> {
    if !(1..=max).contains(&pages) || !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("RAM record at {gpa:#x} with {pages} pages is out of range"),
        ));
    }
    Ok(())
}

/// Writes a stream record by record, enforcing nothing but counting what it wrote.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    w: W,
    machine: &'static MachineType,
    records: u64,
    bytes: u64,
    /// Encoding buffer for SPARSE bodies.
    scratch: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    /// Start a stream for machine type `machine` by writing its header.
    pub fn new(mut w: W, machine: &'static MachineType, producer: &str) -> io::Result<Self> {
        let h = encode_header(machine.name(), producer);
        w.write_all(&h)?;
        Ok(StreamWriter {
            w,
            machine,
            records: 0,
            bytes: h.len() as u64,
            scratch: Vec::new(),
        })
    }

    /// The machine type this stream is written for.
    pub fn machine(&self) -> &'static MachineType {
        self.machine
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Write the configuration record (first, exactly once).
    pub fn config<S: Section>(&mut self, s: &mut S) -> io::Result<()> {
        let rec = encode_section(s, 0, self.machine, Tag::Config)
            .ok_or_else(|| io::Error::other("configuration record not needed"))?;
        self.raw(&rec)
    }

    /// Write section `s` for `instance` if it is needed under this machine type.
    pub fn section<S: Section>(&mut self, s: &mut S, instance: u32) -> io::Result<bool> {
        match encode_section(s, instance, self.machine, Tag::Section) {
            Some(rec) => self.raw(&rec).map(|_| true),
            None => Ok(false),
        }
    }

    /// Write one already-framed record (from [`encode_section`] or [`RawSection::encode`]).
    pub fn raw(&mut self, rec: &[u8]) -> io::Result<()> {
        self.w.write_all(rec)?;
        self.records += 1;
        self.bytes += rec.len() as u64;
        Ok(())
    }

    /// Write a ZERO record covering `pages` pages from `gpa`.
    pub fn ram_zero(&mut self, gpa: u64, pages: u32) -> io::Result<()> {
        check_ram(gpa, pages, MAX_ZERO_PAGES)?;
        self.bytes += ram_record(gpa, pages, RamKind::Zero, &[], &mut self.w)?;
        self.records += 1;
        Ok(())
    }

    /// Write a DATA record with whole pages starting at `gpa`.
    pub fn ram_data(&mut self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let pages = u32::try_from(data.len() / PAGE_SIZE).unwrap_or(u32::MAX);
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RAM data is not whole pages",
            ));
        }
        check_ram(gpa, pages, MAX_DATA_PAGES)?;
        self.bytes += ram_record(gpa, pages, RamKind::Data, data, &mut self.w)?;
        self.records += 1;
        Ok(())
    }

    /// Write a SPARSE record for whole pages starting at `gpa`; `masks` holds each page's
    /// [`sparse::block_mask`](crate::sparse::block_mask). Only for readers that accept it.
    pub fn ram_sparse(&mut self, gpa: u64, data: &[u8], masks: &[u64]) -> io::Result<()> {
        let pages = u32::try_from(masks.len()).unwrap_or(u32::MAX);
        if data.len() != masks.len() * PAGE_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sparse RAM data does not match its masks",
            ));
        }
        check_ram(gpa, pages, MAX_DATA_PAGES)?;
        let mut body = std::mem::take(&mut self.scratch);
        body.clear();
        body.extend_from_slice(&[0; 4]);
        crate::sparse::encode(data, masks, &mut body);
        let len = (body.len() - 4) as u32;
        body[..4].copy_from_slice(&len.to_le_bytes());
        let res = ram_record(gpa, pages, RamKind::Sparse, &body, &mut self.w);
        self.scratch = body;
        self.bytes += res?;
        self.records += 1;
        Ok(())
    }

    /// Flush buffered records to the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// Abandon the stream: write an abort record carrying `reason` (truncated to
    /// [`MAX_ABORT_REASON`] bytes) and flush, so the reader learns why instead of seeing a
    /// truncated stream.
    pub fn abort(&mut self, reason: &str) -> io::Result<()> {
        self.w.write_all(&wire::encode_abort(reason))?;
        self.w.flush()
    }

    /// Write the end marker and hand back the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&wire::encode_end(self.records))?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// A RAM record as read: `data` is `None` for a ZERO record.
#[derive(Debug)]
pub struct RamRecord<'a> {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// Page contents, or `None` when the pages are zero or arrive as `sparse`.
    pub data: Option<&'a [u8]>,
    /// A SPARSE record's body (validated, not expanded), for readers that asked for it with
    /// [`StreamReader::keep_sparse`].
    pub sparse: Option<&'a [u8]>,
    /// Absolute offset of the record.
    pub offset: u64,
}

/// One decoded record.
#[derive(Debug)]
pub enum Item<'a> {
    /// The configuration record.
    Config(RawSection),
    /// A run of pages.
    Ram(RamRecord<'a>),
    /// A device-state section.
    Section(RawSection),
    /// The end marker; the stream is complete and every expected section arrived.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Config,
    Ram,
    Sections,
    Done,
}

/// Reads and validates a stream record by record from any `Read` (file, socket, slice).
///
/// With a catalog it refuses unknown sections and subsections, out-of-range versions, lengths
/// over the schema's bounds and, at the end marker, missing sections. Without one (lenient
/// mode, for inspection tools) it checks framing and CRCs only.
#[derive(Debug)]
pub struct StreamReader<'c, R: Read> {
    r: R,
    catalog: Option<&'c Catalog>,
    offset: u64,
    header: Header,
    phase: Phase,
    seen: BTreeSet<(String, u32)>,
    expected: BTreeSet<(String, u32)>,
    records: u64,
    buf: Vec<u8>,
    sparse: Vec<u8>,
    keep_sparse: bool,
    refuse_sparse: bool,
}

impl<'c, R: Read> StreamReader<'c, R> {
    /// Read and check the header.
    pub fn new(mut r: R, catalog: Option<&'c Catalog>) -> Result<Self, DecodeError> {
        let mut head = Vec::with_capacity(64);
        let mut fixed = [0u8; HEADER_PREFIX];
        read_exact(&mut r, &mut fixed, 0, "header")?;
        wire::check_magic(&fixed)?;
        let format_version = wire::format_version(&fixed);
        wire::check_format_version(format_version)?;
        head.extend_from_slice(&fixed);
        let machine = read_name(&mut r, &mut head, "header")?;
        let producer = read_name(&mut r, &mut head, "header")?;
        let crc_at = head.len() as u64;
        let mut crc = [0u8; 4];
        read_exact(&mut r, &mut crc, crc_at, "header")?;
        if !Crc::of(&head, crc).ok() {
            return Err(DecodeError::HeaderCrc { offset: crc_at });
        }
        let expected = catalog
            .map(|c| {
                c.infos()
                    .filter(|i| i.required)
                    .map(|i| (i.name.clone(), 0))
                    .collect()
            })
            .unwrap_or_default();
        Ok(StreamReader {
            r,
            catalog,
            offset: crc_at + 4,
            header: Header {
                format_version,
                machine,
                producer,
            },
            phase: Phase::Config,
            seen: BTreeSet::new(),
            expected,
            records: 0,
            buf: Vec::new(),
            sparse: Vec::new(),
            keep_sparse: false,
            refuse_sparse: false,
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Absolute offset of the next unread byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader (bytes after the end marker, such as COMMIT, are still there).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// Hand SPARSE bodies out as [`RamRecord::sparse`] instead of expanding them into `data`
    /// (a destination that writes them into guest memory directly).
    pub fn keep_sparse(&mut self, on: bool) {
        self.keep_sparse = on;
    }

    /// Refuse SPARSE records: a connection whose handshake did not negotiate them. Files
    /// carry no handshake and accept them (a `--dump-stream` capture may hold them).
    pub fn refuse_sparse(&mut self, on: bool) {
        self.refuse_sparse = on;
    }

    /// Require section `name` instance `instance` before the end marker.
    pub fn expect(&mut self, name: &str, instance: u32) {
        self.expected.insert((name.to_owned(), instance));
    }

    fn read(&mut self, buf: &mut [u8], context: &str) -> Result<(), DecodeError> {
        read_exact(&mut self.r, buf, self.offset, context)?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Read the next record. After [`Item::End`] every further call is an error.
    pub fn next_item(&mut self) -> Result<Item<'_>, DecodeError> {
        let at = self.offset;
        let mut tag = [0u8; 1];
        self.read(&mut tag, "record tag")?;
        let unexpected = |why| DecodeError::UnexpectedRecord {
            tag: tag[0],
            why,
            offset: at,
        };
        let Some(t) = wire::Tag::from_u8(tag[0]) else {
            return Err(unexpected("unknown tag"));
        };
        match (t, self.phase) {
            (_, Phase::Done) => Err(unexpected("record after the end marker")),
            (Tag::Config, Phase::Config) => {
                let s = self.section(Tag::Config, at)?;
                self.phase = Phase::Ram;
                Ok(Item::Config(s))
            }
            (_, Phase::Config) => Err(unexpected("the configuration record must come first")),
            (Tag::Config, _) => Err(unexpected("second configuration record")),
            (Tag::Ram, Phase::Ram) => self.ram(at),
            (Tag::Ram, _) => Err(unexpected("RAM record after device state")),
            (Tag::Section, _) => {
                self.phase = Phase::Sections;
                Ok(Item::Section(self.section(Tag::Section, at)?))
            }
            (Tag::End, _) => {
                self.end(at)?;
                self.phase = Phase::Done;
                Ok(Item::End)
            }
            (Tag::Abort, _) => Err(self.aborted(at)),
        }
    }

    fn ram(&mut self, at: u64) -> Result<Item<'_>, DecodeError> {
        let mut raw = [0u8; RAM_HEAD];
        raw[0] = Tag::Ram as u8;
        self.read(&mut raw[1..], "RAM record")?;
        let head = RamHead::parse(&raw);
        let bad = |why: String| DecodeError::BadRam { offset: at, why };
        let kind = head.kind().map_err(bad)?;
        if kind == RamKind::Sparse && self.refuse_sparse {
            return Err(bad(
                "SPARSE record, but the handshake did not negotiate sparse pages".to_owned(),
            ));
        }
        if !head.pages_in_range(kind) {
            return Err(bad(wire::pages_out_of_range(head.pages)));
        }
        let pages = head.pages;
        let data_len = match kind {
            RamKind::Zero => 0,
            RamKind::Data => pages as usize * PAGE_SIZE,
            RamKind::Sparse => {
                let mut len = [0u8; 4];
                self.read(&mut len, "RAM record")?;
                let len = u32::from_le_bytes(len);
                crate::sparse::check_len(u64::from(len), pages).map_err(bad)?;
                4 + len as usize
            }
        };
        let sparse = kind == RamKind::Sparse;
        // DATA lands in `buf`; a SPARSE body (with its length) in `sparse`, expanded below.
        let mut data = std::mem::take(if sparse {
            &mut self.sparse
        } else {
            &mut self.buf
        });
        data.resize(data_len, 0);
        if sparse {
            data[..4].copy_from_slice(&((data_len - 4) as u32).to_le_bytes());
            let res = self.read(&mut data[4..], "RAM record");
            self.sparse = data;
            res?;
        } else {
            let res = self.read(&mut data, "RAM record");
            self.buf = data;
            res?;
        }
        let mut stored = [0u8; 4];
        self.read(&mut stored, "RAM record")?;
        let mut h = crc32fast::Hasher::new();
        h.update(&raw);
        h.update(if sparse { &self.sparse } else { &self.buf });
        let crc = Crc {
            stored: u32::from_le_bytes(stored),
            computed: h.finalize(),
        };
        crc.check("RAM record", at)?;
        head.check_range().map_err(bad)?;
        let keep = sparse && self.keep_sparse;
        if keep {
            crate::sparse::validate(&self.sparse[4..], pages).map_err(bad)?;
        } else if sparse {
            self.buf.resize(pages as usize * PAGE_SIZE, 0);
            crate::sparse::decode(&self.sparse[4..], &mut self.buf).map_err(bad)?;
        }
        self.records += 1;
        Ok(Item::Ram(RamRecord {
            gpa: head.gpa,
            pages,
            data: (kind != RamKind::Zero && !keep).then_some(self.buf.as_slice()),
            sparse: keep.then(|| &self.sparse[4..]),
            offset: at,
        }))
    }

    fn section(&mut self, tag: Tag, at: u64) -> Result<RawSection, DecodeError> {
        let mut rec = vec![tag as u8];
        let name = read_name(&mut self.r, &mut rec, "section header")
            .map_err(|e| shift(e, self.offset))?;
        self.offset = at + rec.len() as u64;
        let ctx = format!("section '{name}'");
        let mut fixed = [0u8; SECTION_FIXED];
        self.read(&mut fixed, &ctx)?;
        rec.extend_from_slice(&fixed);
        let SectionFixed {
            instance,
            version,
            payload_len,
        } = SectionFixed::parse(&fixed);
        let len = u64::from(payload_len);
        let info: Option<&'c SectionInfo> = self.catalog.and_then(|c| c.info(&name));
        let bound = info.as_ref().map_or(MAX_UNKNOWN_SECTION, |i| i.max_len);
        if len > bound {
            if info.is_none() && self.catalog.is_some() {
                return Err(DecodeError::UnknownSection {
                    name,
                    instance,
                    offset: at,
                });
            }
            return Err(DecodeError::LengthOverBound {
                section: name,
                what: "section payload".to_owned(),
                len,
                bound,
                offset: at + rec.len() as u64 - 4,
            });
        }
        let payload_at = self.offset;
        let start = rec.len();
        rec.resize(start + len as usize, 0);
        read_exact(&mut self.r, &mut rec[start..], payload_at, &ctx)?;
        self.offset += len;
        let mut stored = [0u8; 4];
        self.read(&mut stored, &ctx)?;
        let crc = Crc::of(&rec, stored);
        crc.check(&name, at)?;
        if self.catalog.is_some() && info.is_none() {
            return Err(DecodeError::UnknownSection {
                name,
                instance,
                offset: at,
            });
        }
        if let Some(i) = info {
            check_version(i, &name, version, at)?;
        }
        let payload = wire::split_payload(&rec[start..], payload_at, &name)?;
        if let Some(i) = info {
            for sub in &payload.subs {
                check_subsection(i, &name, sub)?;
            }
        }
        let raw = RawSection {
            instance,
            version,
            offset: at,
            body_offset: payload.body_offset,
            body: payload.body.to_vec(),
            subsections: payload
                .subs
                .into_iter()
                .map(|s| RawSubsection {
                    name: s.name,
                    version: s.version,
                    body_offset: s.body_offset,
                    body: s.body.to_vec(),
                })
                .collect(),
            crc: crc.stored,
            name,
        };
        if tag == Tag::Section {
            let key = (raw.name.clone(), instance);
            if !self.seen.insert(key) {
                return Err(DecodeError::DuplicateSection {
                    name: raw.name,
                    instance,
                    offset: at,
                });
            }
        }
        self.records += 1;
        Ok(raw)
    }

    /// Read an abort record: the error that explains why the stream stops here.
    fn aborted(&mut self, at: u64) -> DecodeError {
        let mut len = [0u8; 4];
        if let Err(e) = self.read(&mut len, "abort record") {
            return e;
        }
        let n = u32::from_le_bytes(len);
        if let Err(e) = wire::check_abort_len(n, at + 1) {
            return e;
        }
        let mut rec = vec![Tag::Abort as u8];
        rec.extend_from_slice(&len);
        rec.resize(5 + n as usize, 0);
        let mut stored = [0u8; 4];
        if let Err(e) = self
            .read(&mut rec[5..], "abort record")
            .and_then(|()| self.read(&mut stored, "abort record"))
        {
            return e;
        }
        if let Err(e) = Crc::of(&rec, stored).check("abort record", at) {
            return e;
        }
        self.phase = Phase::Done;
        DecodeError::SourceAborted {
            reason: String::from_utf8_lossy(&rec[5..]).into_owned(),
            offset: at,
        }
    }

    fn end(&mut self, at: u64) -> Result<(), DecodeError> {
        let mut rec = [0u8; 9];
        rec[0] = Tag::End as u8;
        self.read(&mut rec[1..], "end marker")?;
        let mut stored = [0u8; 4];
        self.read(&mut stored, "end marker")?;
        Crc::of(&rec, stored).check("end marker", at)?;
        let stated = u64::from_le_bytes(rec[1..].try_into().expect("8 bytes"));
        if stated != self.records {
            return Err(DecodeError::CountMismatch {
                offset: at,
                stated,
                seen: self.records,
            });
        }
        if let Some((name, instance)) = self.expected.iter().find(|k| !self.seen.contains(*k)) {
            return Err(DecodeError::MissingSection {
                name: name.clone(),
                instance: *instance,
            });
        }
        Ok(())
    }
}

/// Refuse a section version outside what the catalog describes.
fn check_version(i: &SectionInfo, name: &str, version: u32, at: u64) -> Result<(), DecodeError> {
    if version > i.version {
        return Err(DecodeError::VersionTooNew {
            section: name.to_owned(),
            version,
            max: i.version,
            offset: at,
        });
    }
    if version < i.min_version {
        return Err(DecodeError::VersionTooOld {
            section: name.to_owned(),
            version,
            min: i.min_version,
            offset: at,
        });
    }
    Ok(())
}

/// Refuse a subsection the catalog does not describe, or at a version it does not read.
fn check_subsection(
    i: &SectionInfo,
    name: &str,
    sub: &wire::SubFrame<'_>,
) -> Result<(), DecodeError> {
    let max = *i
        .subsections
        .get(&sub.name)
        .ok_or_else(|| DecodeError::UnknownSubsection {
            section: name.to_owned(),
            name: sub.name.clone(),
            offset: sub.offset,
        })?;
    if sub.version > max || sub.version == 0 {
        return Err(DecodeError::VersionTooNew {
            section: format!("{name}/{}", sub.name),
            version: sub.version,
            max,
            offset: sub.offset,
        });
    }
    Ok(())
}

/// Re-base an error from a sub-read whose offsets started at 0.
fn shift(e: DecodeError, base: u64) -> DecodeError {
    match e {
        DecodeError::Truncated { context, offset } => DecodeError::Truncated {
            context,
            offset: offset + base,
        },
        DecodeError::Io { offset, source } => DecodeError::Io {
            offset: offset + base,
            source,
        },
        e => e,
    }
}

fn read_exact(
    r: &mut impl Read,
    buf: &mut [u8],
    offset: u64,
    context: &str,
) -> Result<(), DecodeError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => DecodeError::Truncated {
            context: context.to_owned(),
            offset,
        },
        _ => DecodeError::Io { offset, source: e },
    })
}

/// Read a `u8`-length-prefixed name, appending its raw bytes to `rec`.
fn read_name(r: &mut impl Read, rec: &mut Vec<u8>, context: &str) -> Result<String, DecodeError> {
    let at = rec.len() as u64;
    let mut n = [0u8; 1];
    read_exact(r, &mut n, at, context)?;
    let mut name = vec![0u8; usize::from(n[0])];
    read_exact(r, &mut name, at + 1, context)?;
    rec.push(n[0]);
    rec.extend_from_slice(&name);
    Ok(String::from_utf8_lossy(&name).into_owned())
}
