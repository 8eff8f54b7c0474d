//! Decoding a stream into a printable tree, verifying it, and diffing two streams.

use devstate::{DecodeError, Item, MachineSchema, Reader, StreamReader, Value, decode_fields};
use serde::Serialize;
use std::collections::BTreeMap;

/// One subsection as shown.
#[derive(Debug, Serialize)]
pub struct SubView {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Decoded fields, or `None` with `raw` when the schema does not know it.
    pub fields: Option<Value>,
    /// Hex of an undecodable body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// One section (or the config record) as shown.
#[derive(Debug, Serialize)]
pub struct SectionView {
    /// Name.
    pub name: String,
    /// Instance id.
    pub instance: u32,
    /// Version.
    pub version: u32,
    /// Offset of the record.
    pub offset: u64,
    /// Body size in bytes.
    pub size: usize,
    /// "ok" (CRCs are checked while reading; a bad one stops the read).
    pub crc: String,
    /// Decoded fields.
    pub fields: Option<Value>,
    /// Hex of an undecodable body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Why the body is shown raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Subsections present.
    pub subsections: Vec<SubView>,
}

/// A RAM run as shown with `--ram`.
#[derive(Debug, Serialize)]
pub struct RamRun {
    /// First page address.
    pub gpa: u64,
    /// Pages.
    pub pages: u32,
    /// Zero marker or data.
    pub zero: bool,
}

/// RAM summary.
#[derive(Debug, Default, Serialize)]
pub struct RamSummary {
    /// RAM records.
    pub records: u64,
    /// Pages with data.
    pub data_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Distinct pages covered (a page sent twice counts once).
    pub distinct_pages: u64,
    /// Merged address ranges covered, `[start, end)`.
    pub ranges: Vec<(u64, u64)>,
    /// Every record, only with `--ram`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RamRun>,
    /// Final content hash per page (last copy wins), for diffs; not printed.
    #[serde(skip)]
    pub pages: BTreeMap<u64, u32>,
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
    /// Which schema decoded the bodies.
    pub schema: String,
    /// The config record and every section, in stream order.
    pub sections: Vec<SectionView>,
    /// RAM summary.
    pub ram: RamSummary,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn view(raw: &devstate::RawSection, schema: Option<&MachineSchema>) -> SectionView {
    let sec = schema.and_then(|s| s.section(&raw.name));
    let mut note = None;
    let fields = match sec {
        Some(sec) if sec.version == raw.version => {
            let mut r = Reader::new(&raw.body, raw.body_offset, &raw.name);
            match decode_fields(&sec.fields, &mut r).and_then(|v| r.finish().map(|()| v)) {
                Ok(v) => Some(Value::Record(v)),
                Err(e) => {
                    note = Some(format!("body does not match the schema: {e}"));
                    None
                }
            }
        }
        Some(sec) => {
            note = Some(format!(
                "section version {} is not the version {} the schema describes; body shown raw",
                raw.version, sec.version
            ));
            None
        }
        None => {
            note = Some("section unknown to the schema; body shown raw".to_owned());
            None
        }
    };
    let subsections = raw
        .subsections
        .iter()
        .map(|s| {
            let ss = sec.and_then(|sec| {
                sec.subsections
                    .iter()
                    .find(|x| x.name == s.name && x.version == s.version)
            });
            let fields = ss.and_then(|ss| {
                let mut r = Reader::new(&s.body, s.body_offset, &raw.name);
                decode_fields(&ss.fields, &mut r)
                    .ok()
                    .filter(|_| r.remaining() == 0)
                    .map(Value::Record)
            });
            SubView {
                name: s.name.clone(),
                version: s.version,
                raw: fields.is_none().then(|| hex(&s.body)),
                fields,
            }
        })
        .collect();
    SectionView {
        name: raw.name.clone(),
        instance: raw.instance,
        version: raw.version,
        offset: raw.offset,
        size: raw.body.len(),
        crc: "ok".to_owned(),
        raw: fields.is_none().then(|| hex(&raw.body)),
        fields,
        note,
        subsections,
    }
}

/// Decode `bytes` completely. `schema` overrides the committed schema of the stream's machine.
pub fn decode(
    bytes: &[u8],
    schema: Option<MachineSchema>,
    keep_runs: bool,
) -> Result<StreamView, DecodeError> {
    let mut r = StreamReader::new(bytes, None)?;
    let h = r.header().clone();
    let (schema, schema_name) = match schema {
        Some(s) => (Some(s), "given on the command line".to_owned()),
        None => match crate::committed_schema(&h.machine) {
            Some(s) => (Some(s), format!("committed schema of {}", h.machine)),
            None => (
                None,
                format!(
                    "none: machine type '{}' is unknown to this build",
                    h.machine
                ),
            ),
        },
    };
    let mut sections = Vec::new();
    let mut ram = RamSummary::default();
    loop {
        match r.next_item()? {
            Item::Config(s) | Item::Section(s) => sections.push(view(&s, schema.as_ref())),
            Item::Ram(rec) => {
                ram.records += 1;
                let zero = rec.data.is_none();
                if zero {
                    ram.zero_pages += u64::from(rec.pages);
                } else {
                    ram.data_pages += u64::from(rec.pages);
                }
                for i in 0..u64::from(rec.pages) {
                    let crc = match rec.data {
                        Some(d) => page_digest(&d[i as usize * 4096..(i as usize + 1) * 4096]),
                        None => 0,
                    };
                    ram.pages.insert(rec.gpa + i * 4096, crc);
                }
                if keep_runs {
                    ram.runs.push(RamRun {
                        gpa: rec.gpa,
                        pages: rec.pages,
                        zero,
                    });
                }
            }
            Item::End => break,
        }
    }
    ram.distinct_pages = ram.pages.len() as u64;
    for &gpa in ram.pages.keys() {
        match ram.ranges.last_mut() {
            Some(last) if last.1 == gpa => last.1 = gpa + 4096,
            _ => ram.ranges.push((gpa, gpa + 4096)),
        }
    }
    Ok(StreamView {
        format_version: h.format_version,
        machine: h.machine,
        producer: h.producer,
        size: bytes.len() as u64,
        schema: schema_name,
        sections,
        ram,
    })
}

/// A page's content digest (0 for a zero page) used to compare RAM.
fn page_digest(p: &[u8]) -> u32 {
    if p.iter().all(|&b| b == 0) {
        0
    } else {
        devstate_crc(p) | 1
    }
}

fn devstate_crc(p: &[u8]) -> u32 {
    crc32fast::hash(p)
}

fn render_value(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Record(fields) => {
            for (k, v) in fields {
                match v {
                    Value::Record(_) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        render_value(v, indent + 2, out);
                    }
                    Value::List(items) if items.iter().any(|i| matches!(i, Value::Record(_))) => {
                        out.push_str(&format!("{pad}{k}: [{} entries]\n", items.len()));
                        for (i, it) in items.iter().enumerate() {
                            out.push_str(&format!("{pad}  [{i}]\n"));
                            render_value(it, indent + 4, out);
                        }
                    }
                    _ => out.push_str(&format!("{pad}{k}: {}\n", scalar(v))),
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Uint(x) if *x > 0xffff => format!("{x:#x}"),
        Value::Uint(x) => x.to_string(),
        Value::Int(x) => x.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Str(s) => format!("{s:?}"),
        Value::List(items)
            if items
                .iter()
                .all(|i| matches!(i, Value::Uint(x) if *x <= 0xff))
                && items.len() > 16 =>
        {
            format!("[{} bytes, crc32 {:#010x}]", items.len(), {
                let b: Vec<u8> = items
                    .iter()
                    .map(|i| if let Value::Uint(x) = i { *x as u8 } else { 0 })
                    .collect();
                devstate_crc(&b)
            })
        }
        Value::List(items) => format!(
            "[{}]",
            items.iter().map(scalar).collect::<Vec<_>>().join(", ")
        ),
        Value::Record(_) => "{..}".to_owned(),
    }
}

/// The human-readable tree `ferry-dump show` prints.
pub fn render(v: &StreamView, filter: Option<&str>) -> String {
    let mut out = format!(
        "stream: format {} machine {} producer {:?} ({} bytes)\nschema: {}\n",
        v.format_version, v.machine, v.producer, v.size, v.schema
    );
    out.push_str(&format!(
        "ram: {} records, {} data pages, {} zero pages, {} distinct pages in {} ranges\n",
        v.ram.records,
        v.ram.data_pages,
        v.ram.zero_pages,
        v.ram.distinct_pages,
        v.ram.ranges.len()
    ));
    for (a, b) in &v.ram.ranges {
        out.push_str(&format!("  [{a:#x}, {b:#x}) {} MiB\n", (b - a) >> 20));
    }
    for r in &v.ram.runs {
        out.push_str(&format!(
            "  run {:#x} x{} {}\n",
            r.gpa,
            r.pages,
            if r.zero { "zero" } else { "data" }
        ));
    }
    for s in v
        .sections
        .iter()
        .filter(|s| filter.is_none_or(|f| s.name == f))
    {
        out.push_str(&format!(
            "section {} instance {:#x} v{} at {} ({} bytes, crc {})\n",
            s.name, s.instance, s.version, s.offset, s.size, s.crc
        ));
        if let Some(n) = &s.note {
            out.push_str(&format!("  note: {n}\n"));
        }
        match (&s.fields, &s.raw) {
            (Some(f), _) => render_value(f, 2, &mut out),
            (None, Some(raw)) => out.push_str(&format!("  raw: {raw}\n")),
            _ => {}
        }
        for ss in &s.subsections {
            out.push_str(&format!(
                "  subsection {} v{} (present: its needed() held on the source)\n",
                ss.name, ss.version
            ));
            match (&ss.fields, &ss.raw) {
                (Some(f), _) => render_value(f, 4, &mut out),
                (None, Some(raw)) => out.push_str(&format!("    raw: {raw}\n")),
                _ => {}
            }
        }
    }
    out
}

/// Every problem in a stream: with `all` false, only the first.
pub fn verify(bytes: &[u8], schema: Option<MachineSchema>, all: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut r = match StreamReader::new(bytes, None) {
        Ok(r) => r,
        Err(e) => return vec![e.to_string()],
    };
    let schema = schema.or_else(|| crate::committed_schema(&r.header().machine));
    let Some(schema) = schema else {
        return vec![format!(
            "Machine type '{}' has no committed schema",
            r.header().machine
        )];
    };
    let catalog = schema.catalog();
    // Re-read strictly: the lenient pass above only got the header.
    let mut r2 = match StreamReader::new(bytes, Some(&catalog)) {
        Ok(r) => r,
        Err(e) => return vec![e.to_string()],
    };
    drop(r.next_item());
    loop {
        match r2.next_item() {
            Ok(Item::Config(s)) | Ok(Item::Section(s)) => {
                let v = view(&s, Some(&schema));
                if let Some(n) = v.note {
                    problems.push(format!("Section '{}' at offset {}: {n}", s.name, s.offset));
                }
            }
            Ok(Item::Ram(_)) => {}
            Ok(Item::End) => break,
            Err(e) => {
                let recoverable = matches!(
                    e,
                    DecodeError::CrcMismatch { .. }
                        | DecodeError::UnknownSection { .. }
                        | DecodeError::UnknownSubsection { .. }
                        | DecodeError::VersionTooNew { .. }
                        | DecodeError::VersionTooOld { .. }
                        | DecodeError::DuplicateSection { .. }
                );
                problems.push(e.to_string());
                if !recoverable || !all {
                    break;
                }
            }
        }
        if !all && !problems.is_empty() {
            break;
        }
    }
    problems
}

/// Field-by-field differences between two streams; volatile fields are reported apart.
#[derive(Debug, Default, Serialize)]
pub struct Diff {
    /// Differences that matter.
    pub differences: Vec<String>,
    /// Differences in fields the schema marks volatile (clocks, timers).
    pub volatile: Vec<String>,
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Record(fs) => {
            for (k, v) in fs {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        Value::List(items) if items.iter().any(|i| matches!(i, Value::Record(_))) => {
            for (i, it) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), it, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

fn volatile_paths(schema: &MachineSchema) -> Vec<(String, String)> {
    fn walk(prefix: &str, fields: &[devstate::FieldSchema], out: &mut Vec<String>) {
        for f in fields {
            let p = format!("{prefix}.{}", f.name);
            if f.volatile {
                out.push(p.clone());
            }
            match &f.kind {
                devstate::FieldKind::Record { fields, .. } => walk(&p, fields, out),
                devstate::FieldKind::List { of, .. } => {
                    if let devstate::FieldKind::Record { fields, .. } = of.as_ref() {
                        walk(&format!("{p}[]"), fields, out);
                    }
                }
                _ => {}
            }
        }
    }
    let mut v = Vec::new();
    for s in &schema.sections {
        let mut paths = Vec::new();
        walk("", &s.fields, &mut paths);
        for ss in &s.subsections {
            walk(&format!("/{}", ss.name), &ss.fields, &mut paths);
        }
        v.extend(paths.into_iter().map(|p| (s.name.clone(), p)));
    }
    v
}

fn is_volatile(vol: &[(String, String)], section: &str, path: &str) -> bool {
    // Normalise list indices: ".msrs[3].data" matches ".msrs[].data".
    let mut norm = String::new();
    let mut skip = false;
    for c in path.chars() {
        match c {
            '[' => {
                norm.push('[');
                skip = true;
            }
            ']' => {
                norm.push(']');
                skip = false;
            }
            _ if skip => {}
            _ => norm.push(c),
        }
    }
    vol.iter()
        .any(|(s, p)| s == section && (*p == norm || norm.starts_with(&format!("{p}["))))
}

/// Compare two decoded streams.
pub fn diff(a: &StreamView, b: &StreamView, schema: Option<&MachineSchema>) -> Diff {
    let mut d = Diff::default();
    let vol = schema.map(volatile_paths).unwrap_or_default();
    if a.machine != b.machine {
        d.differences
            .push(format!("machine type: {} vs {}", a.machine, b.machine));
    }
    let key = |s: &SectionView| (s.name.clone(), s.instance);
    let am: BTreeMap<_, _> = a.sections.iter().map(|s| (key(s), s)).collect();
    let bm: BTreeMap<_, _> = b.sections.iter().map(|s| (key(s), s)).collect();
    for k in am
        .keys()
        .chain(bm.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let name = format!("{} instance {:#x}", k.0, k.1);
        match (am.get(k), bm.get(k)) {
            (Some(_), None) => d.differences.push(format!("{name}: only in A")),
            (None, Some(_)) => d.differences.push(format!("{name}: only in B")),
            (Some(x), Some(y)) => {
                if x.version != y.version {
                    d.differences
                        .push(format!("{name}: version {} vs {}", x.version, y.version));
                }
                let mut fa = BTreeMap::new();
                let mut fb = BTreeMap::new();
                if let Some(v) = &x.fields {
                    flatten("", v, &mut fa);
                }
                if let Some(v) = &y.fields {
                    flatten("", v, &mut fb);
                }
                for ss in &x.subsections {
                    if let Some(v) = &ss.fields {
                        flatten(&format!("/{}", ss.name), v, &mut fa);
                    }
                }
                for ss in &y.subsections {
                    if let Some(v) = &ss.fields {
                        flatten(&format!("/{}", ss.name), v, &mut fb);
                    }
                }
                let xs: Vec<_> = x.subsections.iter().map(|s| &s.name).collect();
                let ys: Vec<_> = y.subsections.iter().map(|s| &s.name).collect();
                if xs != ys {
                    d.differences
                        .push(format!("{name}: subsections {xs:?} vs {ys:?}"));
                }
                if x.raw.is_some() && x.raw != y.raw {
                    d.differences.push(format!("{name}: raw bodies differ"));
                }
                for f in fa
                    .keys()
                    .chain(fb.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    let (va, vb) = (fa.get(f), fb.get(f));
                    if va != vb {
                        let show =
                            |v: Option<&Value>| v.map(scalar).unwrap_or_else(|| "absent".into());
                        let line = format!(
                            "{name} {}: {} vs {}",
                            f.trim_start_matches('.'),
                            show(va),
                            show(vb)
                        );
                        if is_volatile(&vol, &k.0, f) {
                            d.volatile.push(line);
                        } else {
                            d.differences.push(line);
                        }
                    }
                }
            }
            (None, None) => {}
        }
    }
    if !a.ram.pages.is_empty() && !b.ram.pages.is_empty() {
        let differing = a
            .ram
            .pages
            .iter()
            .filter(|(gpa, crc)| b.ram.pages.get(gpa).unwrap_or(&0) != *crc)
            .count()
            + b.ram
                .pages
                .keys()
                .filter(|g| !a.ram.pages.contains_key(g))
                .filter(|g| b.ram.pages[g] != 0)
                .count();
        if differing > 0 {
            d.differences.push(format!("ram: {differing} pages differ"));
        }
    }
    d
}
