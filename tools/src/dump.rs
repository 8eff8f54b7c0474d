//! Decoding a stream by schema alone into a printable tree, verifying it, and diffing two
//! streams.

use devstate::diff::{self, Body, Decoded, DecodedSub, Diff, entries, hex, scalar, uint};
use devstate::scan::{self, Problem, RamRec, Scan, SecRec};
use devstate::{
    DecodeError, FieldKind, FieldSchema, MAGIC, MachineSchema, PAGE_SIZE, Reader, SectionSchema,
    Value, decode_fields,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// The section written once per vCPU (instances 0..vcpus).
pub const PER_VCPU_SECTION: &str = "cpu";
/// The configuration record's field holding the vCPU count.
const CONFIG_VCPUS: &str = "vcpus";

/// One subsection as shown.
#[derive(Clone, Debug, Serialize)]
pub struct SubView {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Offset of its framing.
    pub offset: u64,
    /// Body size in bytes.
    pub size: usize,
    /// Why it is in the stream.
    pub why: String,
    /// Decoded fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Value>,
    /// Hex of a body that could not be decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Why the body is shown raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    schema: Vec<FieldSchema>,
}

/// One section (or the config record) as shown.
#[derive(Clone, Debug, Serialize)]
pub struct SectionView {
    /// `config` for the configuration record, `section` otherwise.
    pub record: &'static str,
    /// Name.
    pub name: String,
    /// Instance id.
    pub instance: u32,
    /// Version.
    pub version: u32,
    /// Offset of the record's tag byte.
    pub offset: u64,
    /// Record size in bytes, framing and CRC included.
    pub size: u64,
    /// Body size in bytes.
    pub body_size: usize,
    /// `ok`, or `MISMATCH (stored .., computed ..)`.
    pub crc: String,
    /// Decoded fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Value>,
    /// Hex of a body (or payload) that could not be decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Why the body is shown raw, or how it was decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Subsections present.
    pub subsections: Vec<SubView>,
    /// Subsections the machine type may emit with this section.
    #[serde(skip)]
    pub possible_subsections: Vec<String>,
    #[serde(skip)]
    schema: Vec<FieldSchema>,
}

/// One RAM record, listed with `--ram`.
#[derive(Debug, Serialize)]
pub struct RamRun {
    /// Offset of the record.
    pub offset: u64,
    /// First page address.
    pub gpa: u64,
    /// Pages.
    pub pages: u32,
    /// `zero`, `data` or `sparse`.
    pub kind: &'static str,
    /// CRC-32 of the page data (data and sparse records only; for a sparse record, of its
    /// pages as expanded, so it equals the CRC of the same pages sent as data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_crc32: Option<u32>,
    /// Record CRC status.
    pub crc: String,
}

/// A range of guest-physical addresses, `[start, end)`.
#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// RAM summary.
#[derive(Debug, Default, Serialize)]
pub struct RamSummary {
    /// RAM records.
    pub records: u64,
    /// Records carrying data (sparse ones included).
    pub data_records: u64,
    /// Of the data records, those sent SPARSE (only non-zero blocks). Left out of JSON when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub sparse_records: u64,
    /// Records that are zero markers.
    pub zero_records: u64,
    /// Pages sent with data (sparse ones included).
    pub data_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Distinct pages covered (a page sent twice counts once).
    pub distinct_pages: u64,
    /// Pages sent more than once (re-dirtied during pre-copy; the last copy wins).
    pub resent_pages: u64,
    /// Bytes the RAM records take in the stream.
    pub bytes: u64,
    /// Merged address ranges covered.
    pub ranges: Vec<Range>,
    /// Every record, only with `--ram`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RamRun>,
    /// Final content digest per page (last copy wins; 0 for zero), for diffs.
    #[serde(skip)]
    pub pages: BTreeMap<u64, u32>,
}

/// The end marker as shown.
#[derive(Debug, Serialize)]
pub struct EndView {
    /// Offset.
    pub offset: u64,
    /// Records it counts.
    pub records: u64,
    /// CRC status.
    pub crc: String,
}

/// A whole decoded stream.
#[derive(Debug, Serialize)]
pub struct StreamView {
    /// Format version.
    pub format_version: u16,
    /// Machine type.
    pub machine: String,
    /// Producer.
    pub producer: String,
    /// Stream size in bytes.
    pub size: u64,
    /// Header CRC status.
    pub header_crc: String,
    /// Which schema decoded the bodies.
    pub schema: String,
    /// Notes about the stream as a whole (unknown machine type, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// RAM summary.
    pub ram: RamSummary,
    /// The config record and every section, in stream order.
    pub sections: Vec<SectionView>,
    /// The end marker, if the stream has one.
    pub end: Option<EndView>,
    /// Framing, CRC and ordering problems found while reading.
    pub problems: Vec<String>,
}

/// Why a stream cannot be shown at all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// This build's own schema for `machine`, when it knows the machine type.
fn build_schema(machine: &str) -> Option<MachineSchema> {
    machine_types::MachineType::lookup(machine)
        .ok()
        .map(crate::current_schema)
}

/// The schema to decode with: the one given, else the committed one of the stream's machine.
fn pick_schema(machine: &str, given: Option<MachineSchema>) -> (Option<MachineSchema>, String) {
    match given {
        Some(s) => {
            let d = format!("{} (given with --schema)", s.machine);
            (Some(s), d)
        }
        None => match crate::committed_schema(machine) {
            Some(s) => (Some(s), format!("committed schema of {machine}")),
            None => (None, "none".to_owned()),
        },
    }
}

fn unknown_machine_note(machine: &str) -> String {
    format!(
        "Machine type '{machine}' is unknown to this build (known: {}): framing and CRCs are checked, bodies are shown as raw hex; give its schema with --schema FILE to decode them",
        crate::known_machines().join(", ")
    )
}

/// Fields present in a record at `version`.
fn fields_at(fields: &[FieldSchema], version: u32) -> Vec<FieldSchema> {
    fields
        .iter()
        .filter(|f| f.since <= version)
        .cloned()
        .collect()
}

fn decode_body(
    fields: &[FieldSchema],
    body: &[u8],
    offset: u64,
    section: &str,
) -> Result<Value, DecodeError> {
    let mut r = Reader::new(body, offset, section);
    let v = decode_fields(fields, &mut r)?;
    r.finish()?;
    Ok(Value::Record(v))
}

/// How the schema treats a section version.
enum VersionFit {
    /// Decode with these fields; note when older than the version written.
    Decode(Vec<FieldSchema>, Option<String>),
    /// Show raw: why.
    Raw(String),
}

fn version_fit(sec: &SectionSchema, version: u32, machine: &str) -> VersionFit {
    let min = sec.min_version.min(sec.version);
    if version > sec.version {
        VersionFit::Raw(format!(
            "Version {version} is newer than version {}, the newest the {machine} schema describes: a destination of this build refuses it; body shown as raw hex",
            sec.version
        ))
    } else if version < min {
        VersionFit::Raw(format!(
            "Version {version} is older than the minimum version {min}: a destination of this build refuses it; body shown as raw hex"
        ))
    } else if version < sec.version {
        VersionFit::Decode(
            fields_at(&sec.fields, version),
            Some(format!(
                "Version {version} is older than the version {} {machine} writes; decoded with the fields present at v{version}",
                sec.version
            )),
        )
    } else {
        VersionFit::Decode(sec.fields.clone(), None)
    }
}

fn sub_view(
    rec: &SecRec<'_>,
    s: &scan::SubRec<'_>,
    sec: Option<&SectionSchema>,
    machine: &str,
    has_schema: bool,
) -> SubView {
    let known = sec.and_then(|sec| sec.subsections.iter().find(|x| x.name == s.name));
    let mut view = SubView {
        name: s.name.clone(),
        version: s.version,
        offset: s.offset,
        size: s.body.len(),
        why: String::new(),
        fields: None,
        raw: None,
        note: None,
        schema: Vec::new(),
    };
    match known {
        Some(ss) => {
            view.why = format!(
                "{machine} emits '{}' with '{}', and its needed() held for this state on the source",
                s.name, rec.name
            );
            if s.version == 0 || s.version > ss.version {
                view.note = Some(format!(
                    "Version {} is outside 1..={}, the versions the {machine} schema describes: a destination of this build refuses it; body shown as raw hex",
                    s.version, ss.version
                ));
            } else {
                let fields = fields_at(&ss.fields, s.version);
                match decode_body(&fields, s.body, s.body_offset, &rec.name) {
                    Ok(v) => {
                        view.fields = Some(v);
                        view.schema = fields;
                    }
                    Err(e) => view.note = Some(format!("Body does not match the schema: {e}")),
                }
            }
        }
        None if has_schema && sec.is_some() => {
            view.why = format!("{machine} never emits '{}' with '{}'", s.name, rec.name);
            view.note = Some(format!(
                "Subsection unknown to the {machine} schema: a destination of this build refuses it; body shown as raw hex"
            ));
        }
        None => view.why = "unknown: no schema describes this section".to_owned(),
    }
    if view.fields.is_none() {
        view.raw = Some(hex(s.body));
    }
    view
}

/// A section the committed schema lacks but this build describes for the machine type.
fn build_only<'s>(
    name: &str,
    schema: Option<&MachineSchema>,
    build: Option<&'s MachineSchema>,
) -> Option<&'s SectionSchema> {
    if schema.is_some_and(|s| s.section(name).is_some()) {
        return None;
    }
    build.and_then(|b| b.section(name))
}

fn build_only_note(name: &str, machine: &str) -> String {
    format!(
        "Section '{name}' is not in the committed schema of {machine} but this build writes it: decoded with this build's description; compat/schemas/{machine}.json needs re-blessing, and builds with the committed schema refuse it"
    )
}

fn section_view(
    rec: &SecRec<'_>,
    schema: Option<&MachineSchema>,
    build: Option<&MachineSchema>,
) -> SectionView {
    let machine = schema.map(|s| s.machine.as_str()).unwrap_or("?");
    let fallback = build_only(&rec.name, schema, build);
    let sec = schema.and_then(|s| s.section(&rec.name)).or(fallback);
    let mut v = SectionView {
        record: if rec.config { "config" } else { "section" },
        name: rec.name.clone(),
        instance: rec.instance,
        version: rec.version,
        offset: rec.offset,
        size: rec.len,
        body_size: rec.body.map_or(rec.payload.len(), <[u8]>::len),
        crc: rec.crc.describe(),
        fields: None,
        raw: None,
        note: None,
        subsections: Vec::new(),
        possible_subsections: sec
            .map(|s| s.subsections.iter().map(|x| x.name.clone()).collect())
            .unwrap_or_default(),
        schema: Vec::new(),
    };
    let Some(body) = rec.body else {
        v.note = Some(format!(
            "{}; payload shown as raw hex",
            rec.payload_error.as_deref().unwrap_or("Malformed payload")
        ));
        v.raw = Some(hex(rec.payload));
        return v;
    };
    match (schema, sec) {
        (None, _) => {}
        (Some(_), None) => {
            v.note = Some(format!(
                "Section unknown to the {machine} schema: a destination of this build refuses it; body shown as raw hex"
            ));
        }
        (Some(_), Some(sec)) => match version_fit(sec, rec.version, machine) {
            VersionFit::Raw(why) => v.note = Some(why),
            VersionFit::Decode(fields, note) => {
                match decode_body(&fields, body, rec.body_offset, &rec.name) {
                    Ok(val) => {
                        v.fields = Some(val);
                        v.schema = fields;
                        v.note = match (fallback.is_some(), note) {
                            (true, _) => Some(build_only_note(&rec.name, machine)),
                            (false, n) => n,
                        };
                    }
                    Err(e) => {
                        v.note = Some(format!(
                            "Body does not match the schema: {e}; body shown as raw hex"
                        ));
                    }
                }
            }
        },
    }
    if v.fields.is_none() {
        v.raw = Some(hex(body));
    }
    v.subsections = rec
        .subs
        .iter()
        .map(|s| sub_view(rec, s, sec, machine, schema.is_some()))
        .collect();
    v
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Pages whose digest `summarise_ram` tracks (64 GiB of guest RAM): a hostile stream of tiny
/// ZERO records naming billions of pages must not make the inspector allocate for each.
const MAX_TRACKED_PAGES: usize = 1 << 24;

fn summarise_ram(ram: &[RamRec<'_>], keep_runs: bool) -> RamSummary {
    let mut s = RamSummary::default();
    for rec in ram {
        s.records += 1;
        s.bytes += rec.len;
        let pages = u64::from(rec.pages);
        // SPARSE pages are data pages: expanded one record at a time, digested like DATA.
        // A body that does not expand (a problem reported by the scan) leaves its pages
        // unknown, like a DATA record too short for its page count.
        let data = rec.expand().map(Result::ok);
        match &data {
            Some(_) => {
                s.data_records += 1;
                s.data_pages += pages;
                if matches!(rec.data, Some(scan::RamData::Sparse(_))) {
                    s.sparse_records += 1;
                }
            }
            None => {
                s.zero_records += 1;
                s.zero_pages += pages;
            }
        }
        // A count over the format's bound was reported by the scan; walk no further than it.
        let walk = pages.min(u64::from(devstate::stream::MAX_ZERO_PAGES));
        for i in 0..walk {
            if s.pages.len() >= MAX_TRACKED_PAGES {
                break;
            }
            let digest = match &data {
                Some(Some(d)) => d
                    .get(i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE)
                    .map_or(1, page_digest),
                Some(None) => 1,
                None => 0,
            };
            if s.pages
                .insert(rec.gpa.wrapping_add(i * PAGE_SIZE as u64), digest)
                .is_some()
            {
                s.resent_pages += 1;
            }
        }
        if keep_runs {
            s.runs.push(RamRun {
                offset: rec.offset,
                gpa: rec.gpa,
                pages: rec.pages,
                kind: rec.kind(),
                data_crc32: data.flatten().map(|d| crc32fast::hash(&d)),
                crc: rec.crc.describe(),
            });
        }
    }
    s.distinct_pages = s.pages.len() as u64;
    for &gpa in s.pages.keys() {
        match s.ranges.last_mut() {
            Some(last) if last.end == gpa => last.end = gpa + PAGE_SIZE as u64,
            _ => s.ranges.push(Range {
                start: gpa,
                end: gpa + PAGE_SIZE as u64,
            }),
        }
    }
    s
}

/// A page's content digest (0 for a zero page) used to compare RAM.
fn page_digest(p: &[u8]) -> u32 {
    if p.iter().all(|&b| b == 0) {
        0
    } else {
        crc32fast::hash(p) | 1
    }
}

/// Decode `bytes` as far as framing allows. `schema` overrides the committed schema of the
/// stream's machine type. Fails only when there is no readable header.
pub fn decode(
    bytes: &[u8],
    schema: Option<MachineSchema>,
    keep_runs: bool,
) -> Result<StreamView, Unreadable> {
    let sc = scan::scan(bytes);
    decode_scan(&sc, schema, keep_runs)
}

fn decode_scan(
    sc: &Scan<'_>,
    schema: Option<MachineSchema>,
    keep_runs: bool,
) -> Result<StreamView, Unreadable> {
    let Some(h) = &sc.header else {
        let why = sc
            .problems
            .first()
            .map_or_else(|| "no header".to_owned(), |p| p.message.clone());
        return Err(Unreadable(why));
    };
    let given = schema.is_some();
    let (schema, schema_name) = pick_schema(&h.machine, schema);
    let build = if given || schema.is_none() {
        None
    } else {
        build_schema(&h.machine)
    };
    let mut notes = Vec::new();
    match &schema {
        None => notes.push(unknown_machine_note(&h.machine)),
        Some(s) if s.machine != h.machine => notes.push(format!(
            "The stream is for {} but is decoded with the schema of {}",
            h.machine, s.machine
        )),
        Some(_) => {}
    }
    Ok(StreamView {
        format_version: h.format_version,
        machine: h.machine.clone(),
        producer: h.producer.clone(),
        size: sc.size,
        header_crc: h.crc.describe(),
        schema: schema_name,
        notes,
        ram: summarise_ram(&sc.ram, keep_runs),
        sections: sc
            .sections
            .iter()
            .map(|r| section_view(r, schema.as_ref(), build.as_ref()))
            .collect(),
        end: sc.end.as_ref().map(|e| EndView {
            offset: e.offset,
            records: e.records,
            crc: e.crc.describe(),
        }),
        problems: sc.problems.iter().map(|p| p.message.clone()).collect(),
    })
}

// ---------------------------------------------------------------------------------------
// Text rendering.

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn is_scalar_kind(k: &FieldKind) -> bool {
    !matches!(k, FieldKind::List { .. } | FieldKind::Record { .. })
}

const VOLATILE: &str = "  (volatile)";

/// Rows of a long list: `per` items a row, runs of all-zero rows collapsed.
fn rows(out: &mut String, pad: &str, items: &[String], zero: &[bool], per: usize, bytes: bool) {
    let n = items.len();
    let mut i = 0;
    while i < n {
        let end = (i + per).min(n);
        if zero[i..end].iter().all(|z| *z) {
            let mut j = end;
            while j < n && zero[j..(j + per).min(n)].iter().all(|z| *z) {
                j = (j + per).min(n);
            }
            if j - i > per {
                let _ = writeln!(
                    out,
                    "{pad}{}..{}: all zero",
                    idx(i, bytes),
                    idx(j - 1, bytes)
                );
                i = j;
                continue;
            }
        }
        let _ = writeln!(out, "{pad}{}: {}", idx(i, bytes), items[i..end].join(" "));
        i = end;
    }
}

fn idx(i: usize, bytes: bool) -> String {
    if bytes {
        format!("{i:04x}")
    } else {
        format!("[{i}]")
    }
}

fn render_list(
    out: &mut String,
    pad: &str,
    name: &str,
    of: &FieldKind,
    items: &[Value],
    vol: &str,
) {
    match of {
        FieldKind::U8 => {
            let b: Vec<u8> = items
                .iter()
                .map(|v| if let Value::Uint(x) = v { *x as u8 } else { 0 })
                .collect();
            if b.len() <= 16 {
                let _ = writeln!(
                    out,
                    "{pad}{name}: [{}]{vol}",
                    b.iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            } else {
                let _ = writeln!(out, "{pad}{name}: {} bytes{vol}", b.len());
                let cells: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
                let zero: Vec<bool> = b.iter().map(|x| *x == 0).collect();
                rows(out, &format!("{pad}  "), &cells, &zero, 16, true);
            }
        }
        k if is_scalar_kind(k) => {
            if items.len() <= 16 {
                let _ = writeln!(
                    out,
                    "{pad}{name}: {}{vol}",
                    scalar(&Value::List(items.to_vec()))
                );
            } else {
                let _ = writeln!(out, "{pad}{name}: {}{vol}", entries(items.len()));
                let cells: Vec<String> = items.iter().map(scalar).collect();
                let zero: Vec<bool> = items
                    .iter()
                    .map(|v| matches!(v, Value::Uint(0) | Value::Int(0)))
                    .collect();
                rows(out, &format!("{pad}  "), &cells, &zero, 8, false);
            }
        }
        FieldKind::Record { fields, .. } => {
            if items.is_empty() {
                let _ = writeln!(out, "{pad}{name}: []{vol}");
                return;
            }
            let _ = writeln!(out, "{pad}{name}: {}{vol}", entries(items.len()));
            let flat = fields.iter().all(|f| is_scalar_kind(&f.kind));
            for (i, it) in items.iter().enumerate() {
                let Value::Record(vals) = it else { continue };
                if flat {
                    let line: Vec<String> = fields
                        .iter()
                        .zip(vals)
                        .map(|(f, (k, v))| {
                            format!(
                                "{k}={}{}",
                                scalar(v),
                                if f.volatile { " (volatile)" } else { "" }
                            )
                        })
                        .collect();
                    let _ = writeln!(out, "{pad}  [{i}] {}", line.join(" "));
                } else {
                    let _ = writeln!(out, "{pad}  [{i}]");
                    render_fields(out, &format!("{pad}    "), fields, vals);
                }
            }
        }
        FieldKind::List { .. } => {
            let _ = writeln!(
                out,
                "{pad}{name}: {}{vol}",
                scalar(&Value::List(items.to_vec()))
            );
        }
        _ => {}
    }
}

fn render_fields(out: &mut String, pad: &str, fields: &[FieldSchema], vals: &[(String, Value)]) {
    for (f, (name, v)) in fields.iter().zip(vals) {
        let vol = if f.volatile { VOLATILE } else { "" };
        match (&f.kind, v) {
            (FieldKind::Record { fields, .. }, Value::Record(inner)) => {
                let _ = writeln!(out, "{pad}{name}:{vol}");
                render_fields(out, &format!("{pad}  "), fields, inner);
            }
            (FieldKind::List { of, .. }, Value::List(items)) => {
                render_list(out, pad, name, of, items, vol);
            }
            _ => {
                let _ = writeln!(out, "{pad}{name}: {}{vol}", scalar(v));
            }
        }
    }
}

fn render_raw(out: &mut String, pad: &str, raw: &str) {
    let bytes: Vec<String> = raw
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let _ = writeln!(out, "{pad}raw: {} bytes", bytes.len());
    let zero: Vec<bool> = bytes.iter().map(|b| b == "00").collect();
    rows(out, &format!("{pad}  "), &bytes, &zero, 16, true);
}

fn size(b: u64) -> String {
    if b == 1 {
        "1 byte".to_owned()
    } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} bytes")
    }
}

/// The human-readable tree `ferry-dump show` prints (`filter`: only sections of that name).
pub fn render(v: &StreamView, filter: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stream: format {}, machine {}, producer {:?}, {} bytes, header crc {}",
        v.format_version, v.machine, v.producer, v.size, v.header_crc
    );
    let _ = writeln!(out, "schema: {}", v.schema);
    for n in &v.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let r = &v.ram;
    let _ = writeln!(
        out,
        "ram: {} ({} data{}, {} zero), {} data pages, {} zero pages, {} distinct pages, {} sent more than once, {} in the stream",
        plural(r.records, "record"),
        r.data_records,
        if r.sparse_records > 0 {
            format!(" of which {} sparse", r.sparse_records)
        } else {
            String::new()
        },
        r.zero_records,
        r.data_pages,
        r.zero_pages,
        r.distinct_pages,
        r.resent_pages,
        size(r.bytes)
    );
    for g in &r.ranges {
        let _ = writeln!(
            out,
            "  covers [{:#x}, {:#x}) {}",
            g.start,
            g.end,
            size(g.end - g.start)
        );
    }
    for run in &r.runs {
        let _ = writeln!(
            out,
            "  record at offset {}: {:#x} + {} {}{}, crc {}",
            run.offset,
            run.gpa,
            plural(u64::from(run.pages), "page"),
            run.kind,
            run.data_crc32
                .map(|c| format!(" (data crc32 {c:#010x})"))
                .unwrap_or_default(),
            run.crc
        );
    }
    for s in v
        .sections
        .iter()
        .filter(|s| filter.is_none_or(|f| s.name == f))
    {
        let what = if s.record == "config" {
            format!("config record v{}", s.version)
        } else {
            format!(
                "section {} instance {} v{}",
                s.name,
                uint(u64::from(s.instance)),
                s.version
            )
        };
        let _ = writeln!(
            out,
            "{what} at offset {}: {} bytes, body {}, crc {}",
            s.offset,
            s.size,
            size(s.body_size as u64),
            s.crc
        );
        if let Some(n) = &s.note {
            let _ = writeln!(out, "  note: {n}");
        }
        if let Some(Value::Record(vals)) = &s.fields {
            render_fields(&mut out, "  ", &s.schema, vals);
        }
        if let Some(raw) = &s.raw {
            render_raw(&mut out, "  ", raw);
        }
        if s.subsections.is_empty() && !s.possible_subsections.is_empty() {
            let _ = writeln!(
                out,
                "  subsections: none ({} may emit {}; not needed for this state)",
                v.machine,
                s.possible_subsections.join(", ")
            );
        }
        for ss in &s.subsections {
            let _ = writeln!(
                out,
                "  subsection {} v{} at offset {}: body {}",
                ss.name,
                ss.version,
                ss.offset,
                size(ss.size as u64)
            );
            let _ = writeln!(out, "    why: {}", ss.why);
            if let Some(n) = &ss.note {
                let _ = writeln!(out, "    note: {n}");
            }
            if let Some(Value::Record(vals)) = &ss.fields {
                render_fields(&mut out, "    ", &ss.schema, vals);
            }
            if let Some(raw) = &ss.raw {
                render_raw(&mut out, "    ", raw);
            }
        }
    }
    match &v.end {
        Some(e) => {
            let _ = writeln!(
                out,
                "end marker at offset {}: {}, crc {}",
                e.offset,
                plural(e.records, "record"),
                e.crc
            );
        }
        None => {
            let _ = writeln!(out, "end marker: missing");
        }
    }
    for p in &v.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    out
}

// ---------------------------------------------------------------------------------------
// Verify.

/// Every problem in a stream, in stream order: framing, CRCs, order, and everything a
/// destination of this build checks against the schema (unknown sections and subsections,
/// versions, bounds, bodies, duplicates, missing sections, one `cpu` per configured vCPU).
///
/// Problems in the header come first, the header CRC before what the header says. Fails only
/// when `bytes` does not start with the magic (not a Ferry stream at all).
pub fn verify(bytes: &[u8], schema: Option<MachineSchema>) -> Result<Vec<Problem>, Unreadable> {
    let sc = scan::scan(bytes);
    let mut problems = sc.problems.clone();
    let Some(h) = &sc.header else {
        if bytes.starts_with(&MAGIC) {
            return Ok(problems);
        }
        return Err(Unreadable(
            problems
                .first()
                .map_or_else(|| "no header".to_owned(), |p| p.message.clone()),
        ));
    };
    let in_header = |p: &Problem| p.offset < h.len;
    let build = if schema.is_some() {
        None
    } else {
        build_schema(&h.machine)
    };
    let (schema, _) = pick_schema(&h.machine, schema);
    let Some(schema) = schema else {
        problems.insert(
            problems.iter().take_while(|p| in_header(p)).count(),
            Problem {
                offset: 0,
                message: unknown_machine_note(&h.machine),
            },
        );
        return Ok(problems);
    };
    if schema.machine != h.machine {
        problems.push(Problem {
            offset: 0,
            message: format!(
                "The stream is for {} but the schema given is for {}",
                h.machine, schema.machine
            ),
        });
    }
    let catalog = schema.catalog();
    let mut seen = BTreeSet::new();
    let mut vcpus = None;
    for rec in &sc.sections {
        if !rec.config {
            seen.insert((rec.name.clone(), rec.instance));
        }
        let at = rec.offset;
        // A section this build writes but the committed schema lacks is checked against this
        // build's description (a destination of this build accepts it); `show` notes that the
        // committed schema needs re-blessing.
        let fallback = build_only(&rec.name, Some(&schema), build.as_ref());
        let Some(sec) = schema.section(&rec.name).or(fallback) else {
            problems.push(Problem::decode(
                &DecodeError::UnknownSection {
                    name: rec.name.clone(),
                    instance: rec.instance,
                    offset: at,
                },
                at,
            ));
            continue;
        };
        if let Some(info) = catalog.info(&rec.name)
            && rec.payload_len > info.max_len
        {
            problems.push(Problem::decode(
                &DecodeError::LengthOverBound {
                    section: rec.name.clone(),
                    what: "section payload".to_owned(),
                    len: rec.payload_len,
                    bound: info.max_len,
                    offset: rec.payload_offset - 4,
                },
                at,
            ));
        }
        let min = sec.min_version.min(sec.version);
        if rec.version > sec.version {
            problems.push(Problem::decode(
                &DecodeError::VersionTooNew {
                    section: rec.name.clone(),
                    version: rec.version,
                    max: sec.version,
                    offset: at,
                },
                at,
            ));
            continue;
        }
        if rec.version < min {
            problems.push(Problem::decode(
                &DecodeError::VersionTooOld {
                    section: rec.name.clone(),
                    version: rec.version,
                    min,
                    offset: at,
                },
                at,
            ));
            continue;
        }
        // A record whose CRC failed is already reported; decoding it would only add noise.
        let (true, Some(body)) = (rec.crc.ok(), rec.body) else {
            continue;
        };
        match decode_body(
            &fields_at(&sec.fields, rec.version),
            body,
            rec.body_offset,
            &rec.name,
        ) {
            Ok(Value::Record(v)) => {
                if rec.config {
                    vcpus = v
                        .iter()
                        .find(|(k, _)| k == CONFIG_VCPUS)
                        .and_then(|(_, v)| match v {
                            Value::Uint(n) => Some(*n),
                            _ => None,
                        });
                }
            }
            Ok(_) => {}
            Err(e) => problems.push(Problem::decode(&e, rec.body_offset)),
        }
        for s in &rec.subs {
            let Some(ss) = sec.subsections.iter().find(|x| x.name == s.name) else {
                problems.push(Problem::decode(
                    &DecodeError::UnknownSubsection {
                        section: rec.name.clone(),
                        name: s.name.clone(),
                        offset: s.offset,
                    },
                    s.offset,
                ));
                continue;
            };
            if s.version == 0 || s.version > ss.version {
                problems.push(Problem::decode(
                    &DecodeError::VersionTooNew {
                        section: format!("{}/{}", rec.name, s.name),
                        version: s.version,
                        max: ss.version,
                        offset: s.offset,
                    },
                    s.offset,
                ));
                continue;
            }
            if let Err(e) = decode_body(
                &fields_at(&ss.fields, s.version),
                s.body,
                s.body_offset,
                &rec.name,
            ) {
                problems.push(Problem::decode(&e, s.body_offset));
            }
        }
        if rec.name == PER_VCPU_SECTION
            && let Some(n) = vcpus
            && u64::from(rec.instance) >= n
        {
            problems.push(Problem {
                offset: at,
                message: format!(
                    "Section '{}' instance {} at offset {at} has no vCPU: the configuration record has {n}",
                    rec.name, rec.instance
                ),
            });
        }
    }
    // Missing sections can only be told once the end marker was reached.
    if let Some(end) = &sc.end {
        let mut expected: BTreeSet<(String, u32)> = schema
            .sections
            .iter()
            .filter(|s| s.required)
            .map(|s| (s.name.clone(), 0))
            .collect();
        if let Some(n) = vcpus {
            for i in 0..u32::try_from(n).unwrap_or(u32::MAX).min(4096) {
                expected.insert((PER_VCPU_SECTION.to_owned(), i));
            }
        }
        for (name, instance) in expected.difference(&seen) {
            problems.push(Problem {
                offset: end.offset,
                message: format!(
                    "Missing section '{name}' instance {instance}: the end marker at offset {} came without it",
                    end.offset
                ),
            });
        }
    }
    problems.sort_by_key(|p| if in_header(p) { 0 } else { p.offset });
    Ok(problems)
}

// ---------------------------------------------------------------------------------------
// Diff.

/// A shown section as the diff compares it.
fn decoded(s: &SectionView) -> Decoded {
    let body = |fields: &Option<Value>, schema: &[FieldSchema], raw: &Option<String>| match fields {
        Some(Value::Record(values)) => Body::Fields {
            schema: schema.to_vec(),
            values: values.clone(),
        },
        _ => Body::Raw(raw.clone().unwrap_or_default()),
    };
    Decoded {
        config: s.record == "config",
        name: s.name.clone(),
        instance: s.instance,
        version: s.version,
        body: body(&s.fields, &s.schema, &s.raw),
        subsections: s
            .subsections
            .iter()
            .map(|ss| DecodedSub {
                name: ss.name.clone(),
                body: body(&ss.fields, &ss.schema, &ss.raw),
            })
            .collect(),
    }
}

/// Compare two decoded streams: machine type, damage, every section field by field (vCPU
/// state as the guest sees it: host-defined XSAVE fields are reported apart), and RAM.
pub fn diff(a: &StreamView, b: &StreamView) -> Diff {
    let mut d = Diff::default();
    if a.machine != b.machine {
        d.differences
            .push(format!("machine type: {} vs {}", a.machine, b.machine));
    }
    for (which, v) in [("A", a), ("B", b)] {
        for p in &v.problems {
            d.differences.push(format!("{which} is damaged: {p}"));
        }
    }
    let (sa, sb): (Vec<_>, Vec<_>) = (
        a.sections.iter().map(decoded).collect(),
        b.sections.iter().map(decoded).collect(),
    );
    let s = diff::sections(&sa, &sb, &ferry_state::host_fields);
    d.differences.extend(s.differences);
    d.volatile.extend(s.volatile);
    let (pa, pb) = (&a.ram.pages, &b.ram.pages);
    if !pa.is_empty() || !pb.is_empty() {
        // A page one side never sent is zero there (fresh destination memory is zero).
        let gpas: BTreeSet<_> = pa.keys().chain(pb.keys()).collect();
        let differing: Vec<u64> = gpas
            .into_iter()
            .filter(|g| pa.get(g).unwrap_or(&0) != pb.get(g).unwrap_or(&0))
            .copied()
            .collect();
        if !differing.is_empty() {
            let first: Vec<String> = differing
                .iter()
                .take(8)
                .map(|g| format!("{g:#x}"))
                .collect();
            d.differences.push(format!(
                "ram: {} pages differ ({}{})",
                differing.len(),
                first.join(", "),
                if differing.len() > 8 { ", ..." } else { "" }
            ));
        }
    }
    d
}
