//! A lenient framing pass over a whole stream held in memory.
//!
//! `devstate::StreamReader` is what a destination runs: it stops at the first problem. An
//! inspection tool has to keep going, so this pass frames every record it can, checks every
//! CRC and ordering rule, and records each problem with its byte offset. It stops only where
//! framing itself is lost (truncation, an unknown tag, a RAM record whose length cannot be
//! known). Nothing is allocated from lengths read: bodies are borrowed from the input. A
//! SPARSE RAM body is checked by expanding it into one reused scratch buffer (at most 1 MiB)
//! and kept encoded; [`RamRec::expand`] expands it again for whoever needs the pages, one
//! record at a time, so a small stream cannot make a scan hold far more than its own size.

use devstate::{DecodeError, FORMAT_VERSION, MAGIC, PAGE_SIZE};
use std::borrow::Cow;
use std::collections::BTreeSet;

/// Largest page count of a DATA or SPARSE record.
const MAX_DATA_PAGES: u32 = 256;
/// Largest page count of a ZERO record.
const MAX_ZERO_PAGES: u32 = 1 << 20;

/// A stored CRC and the CRC of the bytes read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crc {
    /// CRC stored in the stream.
    pub stored: u32,
    /// CRC computed over the bytes it covers.
    pub computed: u32,
}

impl Crc {
    /// Whether they agree.
    pub fn ok(&self) -> bool {
        self.stored == self.computed
    }

    /// `ok`, or the two values.
    pub fn describe(&self) -> String {
        if self.ok() {
            "ok".to_owned()
        } else {
            format!(
                "MISMATCH (stored {:#010x}, computed {:#010x})",
                self.stored, self.computed
            )
        }
    }
}

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
#[derive(Clone, Debug)]
pub struct SubRec<'a> {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Offset of the subsection's framing (its name length byte).
    pub offset: u64,
    /// Offset of its body.
    pub body_offset: u64,
    /// Body.
    pub body: &'a [u8],
}

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
    /// SPARSE: the encoded body after its `u32` length (see `devstate::sparse`).
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
            None => "zero",
            Some(RamData::Pages(_)) => "data",
            Some(RamData::Sparse(_)) => "sparse",
        }
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
    devstate::sparse::decode(body, out)
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
    fn u8(&mut self, ctx: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, ctx)?[0])
    }
    fn u32(&mut self, ctx: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4, ctx)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, ctx: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8, ctx)?.try_into().expect("8 bytes"),
        ))
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
            if !h.crc.ok() {
                s.problems.push(Problem::decode(
                    &DecodeError::HeaderCrc { offset: h.len - 4 },
                    0,
                ));
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

fn header(c: &mut Cur<'_>) -> Result<Header, DecodeError> {
    let fixed = c.take(10, "header")?;
    if fixed[..8] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let format_version = u16::from_le_bytes([fixed[8], fixed[9]]);
    if format_version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedFormat {
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    let machine = c.name("header")?;
    let producer = c.name("header")?;
    let computed = crc32fast::hash(&c.b[..c.pos]);
    let stored = c.u32("header")?;
    Ok(Header {
        format_version,
        machine,
        producer,
        len: c.pos as u64,
        crc: Crc { stored, computed },
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
        match tag {
            1 | 3 => {
                let config = tag == 1;
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
                if !rec.crc.ok() {
                    s.problems.push(Problem::decode(
                        &DecodeError::CrcMismatch {
                            section: rec.name.clone(),
                            offset: at,
                            stored: rec.crc.stored,
                            computed: rec.crc.computed,
                        },
                        at,
                    ));
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
            2 => {
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
            4 => {
                let records = c.u64("end marker")?;
                let computed = crc32fast::hash(&c.b[at as usize..c.pos]);
                let stored = c.u32("end marker")?;
                let crc = Crc { stored, computed };
                if !crc.ok() {
                    s.problems.push(Problem::decode(
                        &DecodeError::CrcMismatch {
                            section: "end marker".to_owned(),
                            offset: at,
                            stored,
                            computed,
                        },
                        at,
                    ));
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
            5 => {
                // The source abandoned the stream: report its reason as the problem.
                let n = c.u32("abort record")? as usize;
                if n > devstate::stream::MAX_ABORT_REASON as usize || c.b.len() - c.pos < n + 4 {
                    return Err(DecodeError::Truncated {
                        context: "abort record".to_owned(),
                        offset: c.pos as u64,
                    });
                }
                let reason = String::from_utf8_lossy(&c.b[c.pos..c.pos + n]).into_owned();
                c.pos += n;
                let computed = crc32fast::hash(&c.b[at as usize..c.pos]);
                let stored = c.u32("abort record")?;
                let e = if stored == computed {
                    DecodeError::SourceAborted { reason, offset: at }
                } else {
                    DecodeError::CrcMismatch {
                        section: "abort record".to_owned(),
                        offset: at,
                        stored,
                        computed,
                    }
                };
                s.problems.push(Problem::decode(&e, at));
                return Ok(());
            }
            _ => {
                return Err(DecodeError::UnexpectedRecord {
                    tag,
                    why: "unknown tag",
                    offset: at,
                });
            }
        }
        count += 1;
    }
}

fn section<'a>(c: &mut Cur<'a>, config: bool, at: u64) -> Result<SecRec<'a>, DecodeError> {
    let name = c.name("section header")?;
    let ctx = format!("section '{name}'");
    let instance = c.u32(&ctx)?;
    let version = c.u32(&ctx)?;
    let payload_len = c.u32(&ctx)?;
    let payload_offset = c.pos as u64;
    let payload = c.take(payload_len as usize, &ctx)?;
    let computed = crc32fast::hash(&c.b[at as usize..c.pos]);
    let stored = c.u32(&ctx)?;
    let mut rec = SecRec {
        config,
        name,
        instance,
        version,
        offset: at,
        len: c.pos as u64 - at,
        payload_len: u64::from(payload_len),
        payload_offset,
        payload,
        body_offset: payload_offset + 4,
        body: None,
        subs: Vec::new(),
        payload_error: None,
        crc: Crc { stored, computed },
    };
    if let Err(e) = split_payload(&mut rec) {
        rec.payload_error = Some(format!(
            "Section '{}' at offset {at}: payload does not split into body and subsections ({e})",
            rec.name
        ));
        rec.subs.clear();
    }
    Ok(rec)
}

fn split_payload<'a>(rec: &mut SecRec<'a>) -> Result<(), DecodeError> {
    let base = rec.payload_offset;
    let ctx = format!("section '{}'", rec.name);
    let shift = |e: DecodeError| match e {
        DecodeError::Truncated { context, offset } => DecodeError::Truncated {
            context,
            offset: offset + base,
        },
        e => e,
    };
    let mut c = Cur {
        b: rec.payload,
        pos: 0,
    };
    let body_len = c.u32(&ctx).map_err(shift)?;
    rec.body = Some(c.take(body_len as usize, &ctx).map_err(shift)?);
    let nsub = c.u8(&ctx).map_err(shift)?;
    for _ in 0..nsub {
        let offset = base + c.pos as u64;
        let name = c.name(&ctx).map_err(shift)?;
        let version = c.u32(&ctx).map_err(shift)?;
        let len = c.u32(&ctx).map_err(shift)?;
        let body_offset = base + c.pos as u64;
        let body = c.take(len as usize, &ctx).map_err(shift)?;
        rec.subs.push(SubRec {
            name,
            version,
            offset,
            body_offset,
            body,
        });
    }
    if c.pos != rec.payload.len() {
        return Err(DecodeError::TrailingBytes {
            section: rec.name.clone(),
            extra: (rec.payload.len() - c.pos) as u64,
            offset: base + c.pos as u64,
        });
    }
    Ok(())
}

fn ram<'a>(
    c: &mut Cur<'a>,
    at: u64,
    problems: &mut Vec<Problem>,
    scratch: &mut Vec<u8>,
) -> Result<RamRec<'a>, DecodeError> {
    let gpa = c.u64("RAM record")?;
    let pages = c.u32("RAM record")?;
    let kind = c.u8("RAM record")?;
    let bad = |why: String| DecodeError::BadRam { offset: at, why };
    // Body length (for SPARSE, after its own u32 length).
    let body_len = match kind {
        1 => 0,
        2 => u64::from(pages) * PAGE_SIZE as u64,
        3 => u64::from(c.u32("RAM record")?),
        k => return Err(bad(format!("unknown kind {k}"))),
    };
    let max = if kind == 1 {
        MAX_ZERO_PAGES
    } else {
        MAX_DATA_PAGES
    };
    // A length the rest of the stream cannot hold is garbage framing; one it can hold is a
    // problem with this record only, and the next record is framed after it. A SPARSE page
    // takes at least its 8-byte mask, so a page count is believed only as far as the rest
    // of the stream could carry it (as for DATA), which bounds the pages a summary walks.
    let rest = u64::try_from(c.b.len() - c.pos).unwrap_or(u64::MAX);
    let in_range = (1..=max).contains(&pages);
    if !in_range {
        let least = if kind == 3 {
            body_len.max(u64::from(pages) * 8)
        } else {
            body_len
        };
        if rest < least {
            return Err(bad(format!("page count {pages} out of range")));
        }
        problems.push(Problem::decode(
            &bad(format!("page count {pages} out of range")),
            at,
        ));
    } else if kind == 3 {
        let bound = u64::from(pages) * devstate::sparse::MAX_PAGE_ENCODED as u64;
        if body_len > bound {
            let e = bad(format!(
                "sparse body of {body_len} bytes exceeds {bound} for {pages} pages"
            ));
            if rest < body_len {
                return Err(e);
            }
            problems.push(Problem::decode(&e, at));
        }
    }
    let body = c.take(body_len as usize, "RAM record")?;
    let computed = crc32fast::hash(&c.b[at as usize..c.pos]);
    let stored = c.u32("RAM record")?;
    let crc = Crc { stored, computed };
    let data = match kind {
        2 => Some(RamData::Pages(body)),
        3 => Some(RamData::Sparse(body)),
        _ => None,
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
                "CRC mismatch in RAM record at offset {at} ({gpa:#x} + {pages} page(s) {}) (stored {stored:#010x}, computed {computed:#010x})",
                rec.kind()
            ),
        });
    } else if kind == 3
        && in_range
        && let Err(why) = expand_sparse(body, pages, scratch)
    {
        // With a bad CRC a body that does not expand is a consequence, not a second problem.
        problems.push(Problem::decode(&bad(why), at));
    }
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        problems.push(Problem::decode(
            &bad(format!("address {gpa:#x} is not page aligned")),
            at,
        ));
    } else if gpa
        .checked_add(u64::from(pages) * PAGE_SIZE as u64)
        .is_none()
    {
        problems.push(Problem::decode(
            &bad(format!("range at {gpa:#x} overflows")),
            at,
        ));
    }
    Ok(rec)
}
