//! A lenient framing pass over a whole stream held in memory.
//!
//! [`crate::StreamReader`] is what a destination runs: it stops at the first problem. An
//! inspection tool has to keep going, so this pass frames every record it can, checks every
//! CRC and ordering rule, and records each problem with its byte offset; both share
//! [`crate::wire`]'s framing. It stops only where framing itself is lost (truncation, an
//! unknown tag, a RAM record whose length cannot be known, an intact header of another format
//! version). The header CRC is reported before what the header says. Nothing is allocated from lengths read: bodies are borrowed from the input. A
//! SPARSE RAM body is checked by expanding it into one reused scratch buffer (at most 1 MiB)
//! and kept encoded; [`RamRec::expand`] expands it again for whoever needs the pages, one
//! record at a time, so a small stream cannot make a scan hold far more than its own size.

use crate::DecodeError;
use crate::wire::{
    self, HEADER_PREFIX, MAX_DATA_PAGES, PAGE_SIZE, RAM_HEAD, RamHead, RamKind, SECTION_FIXED,
    SectionFixed, SubFrame, Tag,
};
use std::borrow::Cow;
use std::collections::BTreeSet;

pub use crate::wire::Crc;

/// The stream header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Format version.
    pub format_version: u16,
    /// Machine type.
    pub machine: String,
    /// Producer.
    pub producer: String,
    /// Header length, CRC included.
    pub len: u64,
    /// Header CRC.
    pub crc: Crc,
}

/// A framed subsection.
pub type SubRec<'a> = SubFrame<'a>;

/// A framed config record or section.
#[derive(Clone, Debug)]
pub struct SecRec<'a> {
    /// Whether this is the configuration record (tag 1) rather than a section (tag 3).
    pub config: bool,
    /// Name.
    pub name: String,
    /// Instance id.
    pub instance: u32,
    /// Version.
    pub version: u32,
    /// Offset of the tag byte.
    pub offset: u64,
    /// Whole record length, tag to CRC.
    pub len: u64,
    /// Payload length as stated.
    pub payload_len: u64,
    /// Offset of the payload.
    pub payload_offset: u64,
    /// The payload (body and subsections).
    pub payload: &'a [u8],
    /// Offset of the body, when the payload could be split.
    pub body_offset: u64,
    /// Body, when the payload could be split.
    pub body: Option<&'a [u8]>,
    /// Subsections.
    pub subs: Vec<SubRec<'a>>,
    /// Why the payload could not be split into body and subsections.
    pub payload_error: Option<String>,
    /// Record CRC.
    pub crc: Crc,
}

/// How a RAM record that is not ZERO carries its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamData<'a> {
    /// DATA: the pages themselves, `pages * 4096` bytes.
    Pages(&'a [u8]),
    /// SPARSE: the encoded body after its `u32` length (see [`crate::sparse`]).
    Sparse(&'a [u8]),
}

/// A framed RAM record.
#[derive(Clone, Debug)]
pub struct RamRec<'a> {
    /// Offset of the tag byte.
    pub offset: u64,
    /// First page address.
    pub gpa: u64,
    /// Pages.
    pub pages: u32,
    /// Page contents, `None` for a ZERO record; [`RamRec::expand`] gives them as pages.
    pub data: Option<RamData<'a>>,
    /// Whole record length in the stream, tag to CRC.
    pub len: u64,
    /// Record CRC.
    pub crc: Crc,
}

impl<'a> RamRec<'a> {
    /// `zero`, `data` or `sparse`.
    pub fn kind(&self) -> &'static str {
        match self.data {
            None => RamKind::Zero,
            Some(RamData::Pages(_)) => RamKind::Data,
            Some(RamData::Sparse(_)) => RamKind::Sparse,
        }
        .name()
    }

    /// The page contents (`pages * 4096` bytes), `None` for a ZERO record: a DATA record's
    /// are borrowed, a SPARSE record's expanded (at most 1 MiB). An error says why a SPARSE
    /// body does not expand; the scan has reported it as a problem already.
    pub fn expand(&self) -> Option<Result<Cow<'a, [u8]>, String>> {
        match self.data? {
            RamData::Pages(d) => Some(Ok(Cow::Borrowed(d))),
            RamData::Sparse(body) => {
                let mut out = Vec::new();
                Some(expand_sparse(body, self.pages, &mut out).map(|()| Cow::Owned(out)))
            }
        }
    }
}

/// Expand a SPARSE `body` of `pages` pages into `out`, refusing a page count a SPARSE record
/// cannot have rather than allocating for it.
fn expand_sparse(body: &[u8], pages: u32, out: &mut Vec<u8>) -> Result<(), String> {
    if !(1..=MAX_DATA_PAGES).contains(&pages) {
        return Err(format!("page count {pages} out of range"));
    }
    out.clear();
    out.resize(pages as usize * PAGE_SIZE, 0);
    crate::sparse::decode(body, out)
}

/// The end marker.
#[derive(Clone, Debug)]
pub struct EndRec {
    /// Offset of the tag byte.
    pub offset: u64,
    /// Records it counts.
    pub records: u64,
    /// Records actually framed before it.
    pub seen: u64,
    /// Its CRC.
    pub crc: Crc,
}

/// One problem, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Byte offset it refers to (for sorting; the message names it too).
    pub offset: u64,
    /// One line, sentence case.
    pub message: String,
}

impl Problem {
    /// From a decoder error (which names its own offset).
    pub fn decode(e: &DecodeError, fallback: u64) -> Problem {
        Problem {
            offset: e.offset().unwrap_or(fallback),
            message: e.to_string(),
        }
    }
}

/// Everything framed from a stream.
#[derive(Debug)]
pub struct Scan<'a> {
    /// Stream size.
    pub size: u64,
    /// Header, unless the stream does not even have one.
    pub header: Option<Header>,
    /// Config record and sections, in stream order.
    pub sections: Vec<SecRec<'a>>,
    /// RAM records, in stream order.
    pub ram: Vec<RamRec<'a>>,
    /// End marker, if reached.
    pub end: Option<EndRec>,
    /// Framing, CRC and ordering problems, in stream order.
    pub problems: Vec<Problem>,
    /// Offset where framing was lost, if it was (its problem is the last one).
    pub lost_at: Option<u64>,
}

struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, ctx: &str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.pos < n {
            return Err(DecodeError::Truncated {
                context: ctx.to_owned(),
                offset: self.pos as u64,
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, ctx: &str) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N, ctx)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self, ctx: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, ctx)?[0])
    }
    fn u32(&mut self, ctx: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(ctx)?))
    }
    fn name(&mut self, ctx: &str) -> Result<String, DecodeError> {
        let n = self.u8(ctx)?;
        Ok(String::from_utf8_lossy(self.take(usize::from(n), ctx)?).into_owned())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Config,
    Ram,
    Sections,
}

/// Frame `bytes` as far as possible.
pub fn scan(bytes: &[u8]) -> Scan<'_> {
    let mut s = Scan {
        size: bytes.len() as u64,
        header: None,
        sections: Vec::new(),
        ram: Vec::new(),
        end: None,
        problems: Vec::new(),
        lost_at: None,
    };
    let mut c = Cur { b: bytes, pos: 0 };
    match header(&mut c) {
        Ok(h) => {
            // The CRC first: when it fails, whatever else the header says is suspect.
            if !h.crc.ok() {
                s.problems.push(Problem::decode(
                    &DecodeError::HeaderCrc { offset: h.len - 4 },
                    0,
                ));
            }
            if let Err(e) = wire::check_format_version(h.format_version) {
                s.problems.push(Problem::decode(&e, 0));
                // An intact header of another version: its records' layout is unknown. A
                // damaged one is most likely this version's, so framing goes on.
                if h.crc.ok() {
                    s.lost_at = e.offset();
                    return s;
                }
            }
            s.header = Some(h);
        }
        Err(e) => {
            s.problems.push(Problem::decode(&e, 0));
            s.lost_at = Some(0);
            return s;
        }
    }
    if let Err(e) = records(&mut c, &mut s) {
        let p = Problem::decode(&e, c.pos as u64);
        s.lost_at = Some(p.offset);
        s.problems.push(p);
    }
    s
}

/// Frame the header (this format version's layout); the caller checks CRC and version.
fn header(c: &mut Cur<'_>) -> Result<Header, DecodeError> {
    let fixed: &[u8; HEADER_PREFIX] = c
        .take(HEADER_PREFIX, "header")?
        .try_into()
        .expect("prefix length");
    wire::check_magic(fixed)?;
    let format_version = wire::format_version(fixed);
    let machine = c.name("header")?;
    let producer = c.name("header")?;
    let covered = &c.b[..c.pos];
    let stored = c.array("header")?;
    Ok(Header {
        format_version,
        machine,
        producer,
        len: c.pos as u64,
        crc: Crc::of(covered, stored),
    })
}

fn unexpected(tag: u8, why: &'static str, offset: u64) -> Problem {
    Problem::decode(&DecodeError::UnexpectedRecord { tag, why, offset }, offset)
}

fn records<'a>(c: &mut Cur<'a>, s: &mut Scan<'a>) -> Result<(), DecodeError> {
    let mut phase = Phase::Config;
    let mut seen = BTreeSet::new();
    let mut count = 0u64;
    // Where SPARSE bodies are expanded to check them.
    let mut scratch = Vec::new();
    loop {
        let at = c.pos as u64;
        let tag = c.u8("record tag")?;
        let Some(t) = Tag::from_u8(tag) else {
            return Err(DecodeError::UnexpectedRecord {
                tag,
                why: "unknown tag",
                offset: at,
            });
        };
        match t {
            Tag::Config | Tag::Section => {
                let config = t == Tag::Config;
                match (config, phase) {
                    (true, Phase::Config) => {}
                    (true, _) => {
                        s.problems
                            .push(unexpected(tag, "second configuration record", at))
                    }
                    (false, Phase::Config) => s.problems.push(unexpected(
                        tag,
                        "the configuration record must come first",
                        at,
                    )),
                    (false, _) => {}
                }
                let rec = section(c, config, at)?;
                if let Err(e) = rec.crc.check(&rec.name, at) {
                    s.problems.push(Problem::decode(&e, at));
                }
                // With a bad CRC a broken payload is a consequence, not a second problem.
                if let (true, Some(e)) = (rec.crc.ok(), &rec.payload_error) {
                    s.problems.push(Problem {
                        offset: rec.payload_offset,
                        message: e.clone(),
                    });
                }
                if !config && !seen.insert((rec.name.clone(), rec.instance)) {
                    s.problems.push(Problem::decode(
                        &DecodeError::DuplicateSection {
                            name: rec.name.clone(),
                            instance: rec.instance,
                            offset: at,
                        },
                        at,
                    ));
                }
                phase = if config && phase == Phase::Config {
                    Phase::Ram
                } else if config {
                    phase
                } else {
                    Phase::Sections
                };
                s.sections.push(rec);
            }
            Tag::Ram => {
                if phase == Phase::Config {
                    s.problems.push(unexpected(
                        tag,
                        "the configuration record must come first",
                        at,
                    ));
                } else if phase == Phase::Sections {
                    s.problems
                        .push(unexpected(tag, "RAM record after device state", at));
                }
                let rec = ram(c, at, &mut s.problems, &mut scratch)?;
                s.ram.push(rec);
            }
            Tag::End => {
                let rec = c.take(8, "end marker")?;
                let records = u64::from_le_bytes(rec.try_into().expect("8 bytes"));
                let covered = &c.b[at as usize..c.pos];
                let crc = Crc::of(covered, c.array("end marker")?);
                if let Err(e) = crc.check("end marker", at) {
                    s.problems.push(Problem::decode(&e, at));
                } else if records != count {
                    s.problems.push(Problem::decode(
                        &DecodeError::CountMismatch {
                            offset: at,
                            stated: records,
                            seen: count,
                        },
                        at,
                    ));
                }
                s.end = Some(EndRec {
                    offset: at,
                    records,
                    seen: count,
                    crc,
                });
                let extra = c.b.len() - c.pos;
                if extra > 0 {
                    s.problems.push(Problem {
                        offset: c.pos as u64,
                        message: format!(
                            "{extra} unexpected bytes after the end marker at offset {}",
                            c.pos
                        ),
                    });
                }
                return Ok(());
            }
            Tag::Abort => {
                // The source abandoned the stream: report its reason as the problem.
                let n = c.u32("abort record")?;
                wire::check_abort_len(n, at + 1)?;
                let reason = String::from_utf8_lossy(c.take(n as usize, "abort record")?);
                let covered = &c.b[at as usize..c.pos];
                let crc = Crc::of(covered, c.array("abort record")?);
                let e = match crc.check("abort record", at) {
                    Ok(()) => DecodeError::SourceAborted {
                        reason: reason.into_owned(),
                        offset: at,
                    },
                    Err(e) => e,
                };
                s.problems.push(Problem::decode(&e, at));
                return Ok(());
            }
        }
        count += 1;
    }
}

fn section<'a>(c: &mut Cur<'a>, config: bool, at: u64) -> Result<SecRec<'a>, DecodeError> {
    let name = c.name("section header")?;
    let ctx = format!("section '{name}'");
    let fixed = SectionFixed::parse(&c.array::<SECTION_FIXED>(&ctx)?);
    let payload_offset = c.pos as u64;
    let payload = c.take(fixed.payload_len as usize, &ctx)?;
    let covered = &c.b[at as usize..c.pos];
    let crc = Crc::of(covered, c.array(&ctx)?);
    let mut rec = SecRec {
        config,
        name,
        instance: fixed.instance,
        version: fixed.version,
        offset: at,
        len: c.pos as u64 - at,
        payload_len: u64::from(fixed.payload_len),
        payload_offset,
        payload,
        body_offset: payload_offset + 4,
        body: None,
        subs: Vec::new(),
        payload_error: None,
        crc,
    };
    match wire::split_payload(payload, payload_offset, &rec.name) {
        Ok(p) => {
            rec.body_offset = p.body_offset;
            rec.body = Some(p.body);
            rec.subs = p.subs;
        }
        Err(e) => {
            rec.payload_error = Some(format!(
                "Section '{}' at offset {at}: payload does not split into body and subsections ({e})",
                rec.name
            ));
        }
    }
    Ok(rec)
}

fn ram<'a>(
    c: &mut Cur<'a>,
    at: u64,
    problems: &mut Vec<Problem>,
    scratch: &mut Vec<u8>,
) -> Result<RamRec<'a>, DecodeError> {
    let mut raw = [0u8; RAM_HEAD];
    raw[0] = Tag::Ram as u8;
    raw[1..].copy_from_slice(c.take(RAM_HEAD - 1, "RAM record")?);
    let head = RamHead::parse(&raw);
    let (gpa, pages) = (head.gpa, head.pages);
    let bad = |why: String| DecodeError::BadRam { offset: at, why };
    let kind = head.kind().map_err(bad)?;
    // Body length (for SPARSE, after its own u32 length).
    let body_len = match kind {
        RamKind::Zero => 0,
        RamKind::Data => u64::from(pages) * PAGE_SIZE as u64,
        RamKind::Sparse => u64::from(c.u32("RAM record")?),
    };
    // A length the rest of the stream cannot hold is garbage framing; one it can hold is a
    // problem with this record only, and the next record is framed after it. A SPARSE page
    // takes at least its 8-byte mask, so a page count is believed only as far as the rest
    // of the stream could carry it (as for DATA), which bounds the pages a summary walks.
    let rest = u64::try_from(c.b.len() - c.pos).unwrap_or(u64::MAX);
    let in_range = head.pages_in_range(kind);
    if !in_range {
        let least = if kind == RamKind::Sparse {
            body_len.max(u64::from(pages) * 8)
        } else {
            body_len
        };
        let e = bad(wire::pages_out_of_range(pages));
        if rest < least {
            return Err(e);
        }
        problems.push(Problem::decode(&e, at));
    } else if kind == RamKind::Sparse
        && let Err(why) = crate::sparse::check_len(body_len, pages)
    {
        if rest < body_len {
            return Err(bad(why));
        }
        problems.push(Problem::decode(&bad(why), at));
    }
    let body = c.take(body_len as usize, "RAM record")?;
    let covered = &c.b[at as usize..c.pos];
    let crc = Crc::of(covered, c.array("RAM record")?);
    let data = match kind {
        RamKind::Data => Some(RamData::Pages(body)),
        RamKind::Sparse => Some(RamData::Sparse(body)),
        RamKind::Zero => None,
    };
    let rec = RamRec {
        offset: at,
        gpa,
        pages,
        data,
        len: c.pos as u64 - at,
        crc,
    };
    if !crc.ok() {
        problems.push(Problem {
            offset: at,
            message: format!(
                "CRC mismatch in RAM record at offset {at} ({gpa:#x} + {pages} page(s) {}) (stored {:#010x}, computed {:#010x})",
                rec.kind(),
                crc.stored,
                crc.computed
            ),
        });
    } else if kind == RamKind::Sparse
        && in_range
        && let Err(why) = expand_sparse(body, pages, scratch)
    {
        // With a bad CRC a body that does not expand is a consequence, not a second problem.
        problems.push(Problem::decode(&bad(why), at));
    }
    if let Err(why) = head.check_range() {
        problems.push(Problem::decode(&bad(why), at));
    }
    Ok(rec)
}
