//! The stream format's constants and framing primitives, shared by the strict reader
//! ([`crate::stream::StreamReader`], the migration path) and the lenient scanner
//! ([`crate::scan`], what `ferry-dump` shows). Layout: [`crate::stream`] and `FORMAT.md`.

use crate::{DecodeError, Reader, put_len};

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"FERRYSTM";
/// Stream format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Offset of the format version in the header.
pub const FORMAT_VERSION_OFFSET: u64 = MAGIC.len() as u64;
/// Bytes before the header's names: magic and format version.
pub const HEADER_PREFIX: usize = MAGIC.len() + 2;
/// Guest page size assumed by RAM records.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one DATA or SPARSE record carries (1 MiB).
pub const MAX_DATA_PAGES: u32 = 256;
/// Most pages one ZERO record covers (4 GiB).
pub const MAX_ZERO_PAGES: u32 = 1 << 20;
/// Largest section accepted when the catalog does not bound it (lenient readers only).
pub const MAX_UNKNOWN_SECTION: u64 = 16 << 20;
/// Longest reason an abort record carries.
pub const MAX_ABORT_REASON: u32 = 4096;
/// A RAM record's fixed head: tag, `u64` gpa, `u32` pages, `u8` kind.
pub const RAM_HEAD: usize = 14;
/// A section's fixed fields after its name: instance, version, payload length.
pub const SECTION_FIXED: usize = 12;

/// Record tags. 0 is reserved as invalid so a zeroed buffer never parses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// The configuration record.
    Config = 1,
    /// A run of guest pages.
    Ram = 2,
    /// A device-state section.
    Section = 3,
    /// The end marker.
    End = 4,
    /// The source abandoned the stream (reason follows); only ever the last record.
    Abort = 5,
}

impl Tag {
    /// The tag a byte names, if any.
    pub fn from_u8(b: u8) -> Option<Tag> {
        [Tag::Config, Tag::Ram, Tag::Section, Tag::End, Tag::Abort]
            .into_iter()
            .find(|t| *t as u8 == b)
    }
}

/// Kind of a RAM record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RamKind {
    /// Pages that are all zero; no data follows.
    Zero = 1,
    /// Page contents follow.
    Data = 2,
    /// Pages encoded as non-zero 64-byte blocks ([`crate::sparse`]).
    Sparse = 3,
}

impl RamKind {
    /// The kind a byte names, if any.
    pub fn from_u8(b: u8) -> Option<RamKind> {
        [RamKind::Zero, RamKind::Data, RamKind::Sparse]
            .into_iter()
            .find(|k| *k as u8 == b)
    }

    /// Most pages one record of this kind may carry.
    pub fn max_pages(self) -> u32 {
        match self {
            RamKind::Zero => MAX_ZERO_PAGES,
            RamKind::Data | RamKind::Sparse => MAX_DATA_PAGES,
        }
    }

    /// `zero`, `data` or `sparse`.
    pub fn name(self) -> &'static str {
        match self {
            RamKind::Zero => "zero",
            RamKind::Data => "data",
            RamKind::Sparse => "sparse",
        }
    }
}

/// A stored CRC and the CRC of the bytes it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crc {
    /// CRC stored in the stream.
    pub stored: u32,
    /// CRC computed over the bytes it covers.
    pub computed: u32,
}

impl Crc {
    /// Pair the CRC stored in `stored` (4 bytes, little-endian) with the CRC of `covered`.
    pub fn of(covered: &[u8], stored: [u8; 4]) -> Crc {
        Crc {
            stored: u32::from_le_bytes(stored),
            computed: crc32fast::hash(covered),
        }
    }

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

    /// `Ok`, or the mismatch as an error naming `record` and its `offset`.
    pub fn check(&self, record: &str, offset: u64) -> Result<(), DecodeError> {
        if self.ok() {
            return Ok(());
        }
        Err(DecodeError::CrcMismatch {
            section: record.to_owned(),
            offset,
            stored: self.stored,
            computed: self.computed,
        })
    }
}

/// Check the magic at the start of `prefix` (at least 8 bytes).
pub fn check_magic(prefix: &[u8]) -> Result<(), DecodeError> {
    if prefix.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(DecodeError::BadMagic);
    }
    Ok(())
}

/// The format version in a header prefix (magic already checked).
pub fn format_version(prefix: &[u8; HEADER_PREFIX]) -> u16 {
    u16::from_le_bytes([prefix[8], prefix[9]])
}

/// Refuse a format version this build does not read, naming the version's offset.
pub fn check_format_version(found: u16) -> Result<(), DecodeError> {
    if found != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedFormat {
            found,
            supported: FORMAT_VERSION,
            offset: FORMAT_VERSION_OFFSET,
        });
    }
    Ok(())
}

/// Append a `u8`-length-prefixed name.
pub fn put_name(w: &mut Vec<u8>, name: &str) {
    let n = u8::try_from(name.len()).expect("section names are at most 255 bytes");
    w.push(n);
    w.extend_from_slice(name.as_bytes());
}

/// Encode the header for machine type `machine`.
pub fn encode_header(machine: &str, producer: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(64);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    put_name(&mut h, machine);
    put_name(&mut h, producer);
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Frame a section (or config record): tag, name, instance, version, payload, CRC.
pub fn frame_section(
    tag: Tag,
    name: &str,
    instance: u32,
    version: u32,
    body: &[u8],
    subs: &[(&str, u32, &[u8])],
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(body.len() + 8);
    put_len(&mut payload, body.len());
    payload.extend_from_slice(body);
    payload.push(u8::try_from(subs.len()).expect("at most 255 subsections"));
    for (n, v, b) in subs {
        put_name(&mut payload, n);
        payload.extend_from_slice(&v.to_le_bytes());
        put_len(&mut payload, b.len());
        payload.extend_from_slice(b);
    }
    let mut out = Vec::with_capacity(payload.len() + name.len() + 18);
    out.push(tag as u8);
    put_name(&mut out, name);
    out.extend_from_slice(&instance.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    put_len(&mut out, payload.len());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A section's fixed fields after its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionFixed {
    /// Instance id.
    pub instance: u32,
    /// Version.
    pub version: u32,
    /// Payload length as stated.
    pub payload_len: u32,
}

impl SectionFixed {
    /// Parse the 12 bytes after a section's name.
    pub fn parse(b: &[u8; SECTION_FIXED]) -> SectionFixed {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        SectionFixed {
            instance: u32_at(0),
            version: u32_at(4),
            payload_len: u32_at(8),
        }
    }
}

/// A framed subsection, body borrowed from its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubFrame<'a> {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Offset of its framing (its name length byte).
    pub offset: u64,
    /// Offset of its body.
    pub body_offset: u64,
    /// Body.
    pub body: &'a [u8],
}

/// A section payload split into body and subsections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload<'a> {
    /// Offset of the body.
    pub body_offset: u64,
    /// Body.
    pub body: &'a [u8],
    /// Subsections in stream order.
    pub subs: Vec<SubFrame<'a>>,
}

/// Split `payload` (at absolute offset `base`) of section `name` into body and subsections;
/// every byte must be accounted for.
pub fn split_payload<'a>(
    payload: &'a [u8],
    base: u64,
    name: &str,
) -> Result<Payload<'a>, DecodeError> {
    let mut r = Reader::new(payload, base, name);
    // `r` borrows `name` too; bodies are cut from `payload` so they outlive it.
    let take = |r: &mut Reader<'_>, n: usize| -> Result<&'a [u8], DecodeError> {
        let at = (r.offset() - base) as usize;
        r.take(n)?;
        Ok(&payload[at..at + n])
    };
    let body_len = r.count(u32::try_from(payload.len()).unwrap_or(u32::MAX), "body")?;
    let body_offset = r.offset();
    let body = take(&mut r, body_len)?;
    let nsub = r.array::<1>()?[0];
    let mut subs = Vec::with_capacity(usize::from(nsub));
    for _ in 0..nsub {
        let offset = r.offset();
        let n = r.array::<1>()?[0];
        let sname = String::from_utf8_lossy(r.take(usize::from(n))?).into_owned();
        let version = u32::from_le_bytes(r.array()?);
        let remaining = u32::try_from(r.remaining()).unwrap_or(u32::MAX);
        let len = r.count(remaining, &sname)?;
        let body_offset = r.offset();
        subs.push(SubFrame {
            name: sname,
            version,
            offset,
            body_offset,
            body: take(&mut r, len)?,
        });
    }
    r.finish()?;
    Ok(Payload {
        body_offset,
        body,
        subs,
    })
}

/// A RAM record's fixed head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamHead {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// Kind byte as read.
    pub kind: u8,
}

impl RamHead {
    /// Parse a head (tag byte included).
    pub fn parse(b: &[u8; RAM_HEAD]) -> RamHead {
        RamHead {
            gpa: u64::from_le_bytes(b[1..9].try_into().expect("8 bytes")),
            pages: u32::from_le_bytes(b[9..13].try_into().expect("4 bytes")),
            kind: b[13],
        }
    }

    /// Encode the head, tag byte included.
    pub fn encode(&self) -> [u8; RAM_HEAD] {
        let mut b = [0u8; RAM_HEAD];
        b[0] = Tag::Ram as u8;
        b[1..9].copy_from_slice(&self.gpa.to_le_bytes());
        b[9..13].copy_from_slice(&self.pages.to_le_bytes());
        b[13] = self.kind;
        b
    }

    /// The record's kind, or why the kind byte names none.
    pub fn kind(&self) -> Result<RamKind, String> {
        RamKind::from_u8(self.kind).ok_or_else(|| format!("unknown kind {}", self.kind))
    }

    /// Whether the page count lies within its kind's bound.
    pub fn pages_in_range(&self, kind: RamKind) -> bool {
        (1..=kind.max_pages()).contains(&self.pages)
    }

    /// Refuse a misaligned or overflowing address range.
    pub fn check_range(&self) -> Result<(), String> {
        if !self.gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(format!("address {:#x} is not page aligned", self.gpa));
        }
        if self
            .gpa
            .checked_add(u64::from(self.pages) * PAGE_SIZE as u64)
            .is_none()
        {
            return Err(format!("range at {:#x} overflows", self.gpa));
        }
        Ok(())
    }
}

/// Why a page count is refused.
pub fn pages_out_of_range(pages: u32) -> String {
    format!("page count {pages} out of range")
}

/// Encode the end marker counting `records` records.
pub fn encode_end(records: u64) -> Vec<u8> {
    let mut end = Vec::with_capacity(13);
    end.push(Tag::End as u8);
    end.extend_from_slice(&records.to_le_bytes());
    let crc = crc32fast::hash(&end);
    end.extend_from_slice(&crc.to_le_bytes());
    end
}

/// Encode an abort record carrying `reason`, cut to [`MAX_ABORT_REASON`] bytes at a char
/// boundary.
pub fn encode_abort(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_ABORT_REASON as usize);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut rec = vec![Tag::Abort as u8];
    put_len(&mut rec, end);
    rec.extend_from_slice(&reason.as_bytes()[..end]);
    let crc = crc32fast::hash(&rec);
    rec.extend_from_slice(&crc.to_le_bytes());
    rec
}

/// Refuse an abort reason longer than [`MAX_ABORT_REASON`]; `offset` is its length field's.
pub fn check_abort_len(n: u32, offset: u64) -> Result<(), DecodeError> {
    if n > MAX_ABORT_REASON {
        return Err(DecodeError::LengthOverBound {
            section: "abort record".to_owned(),
            what: "reason".to_owned(),
            len: u64::from(n),
            bound: u64::from(MAX_ABORT_REASON),
            offset,
        });
    }
    Ok(())
}
