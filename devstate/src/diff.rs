//! Field-by-field comparison of two sets of sections decoded by their schema: subsections
//! are compared field by field too, and fields the schema marks volatile (clocks, a pending
//! unplug's remaining time) are reported apart from real differences.

use crate::stream::RawSection;
use crate::{DecodeError, FieldKind, FieldSchema, MachineSchema, Reader, Value, decode_fields};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// A section body as compared: decoded fields, or raw hex when no schema describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// Decoded by `schema` (the fields present at the record's version).
    Fields {
        /// Field descriptions, in order.
        schema: Vec<FieldSchema>,
        /// Values, one per description.
        values: Vec<(String, Value)>,
    },
    /// Hex of a body no schema decodes.
    Raw(String),
}

/// A subsection as compared.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedSub {
    /// Name.
    pub name: String,
    /// Body.
    pub body: Body,
}

/// A section (or the configuration record) as compared.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// Whether this is the configuration record.
    pub config: bool,
    /// Name.
    pub name: String,
    /// Instance id.
    pub instance: u32,
    /// Version.
    pub version: u32,
    /// Body.
    pub body: Body,
    /// Subsections in stream order.
    pub subsections: Vec<DecodedSub>,
}

/// Hex of `b`, as a body no schema decodes is shown.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_body(
    fields: Vec<FieldSchema>,
    body: &[u8],
    offset: u64,
    section: &str,
) -> Result<Body, DecodeError> {
    let mut r = Reader::new(body, offset, section);
    let values = decode_fields(&fields, &mut r)?;
    r.finish()?;
    Ok(Body::Fields {
        schema: fields,
        values,
    })
}

impl Decoded {
    /// Decode a section by `schema`: raw hex where the schema lacks the section or subsection,
    /// or does not describe its version; an error where a described body does not decode.
    pub fn from_raw(schema: &MachineSchema, s: &RawSection) -> Result<Decoded, DecodeError> {
        let sec = schema
            .section(&s.name)
            .filter(|sec| (sec.min_version.min(sec.version)..=sec.version).contains(&s.version));
        let body = match sec {
            Some(sec) => decode_body(
                crate::fields_at(sec.fields.clone(), s.version),
                &s.body,
                s.body_offset,
                &s.name,
            )?,
            None => Body::Raw(hex(&s.body)),
        };
        let subsections = s
            .subsections
            .iter()
            .map(|u| {
                let known = sec
                    .and_then(|sec| sec.subsections.iter().find(|x| x.name == u.name))
                    .filter(|ss| (1..=ss.version).contains(&u.version));
                let body = match known {
                    Some(ss) => decode_body(
                        crate::fields_at(ss.fields.clone(), u.version),
                        &u.body,
                        u.body_offset,
                        &s.name,
                    )?,
                    None => Body::Raw(hex(&u.body)),
                };
                Ok(DecodedSub {
                    name: u.name.clone(),
                    body,
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        Ok(Decoded {
            config: false,
            name: s.name.clone(),
            instance: s.instance,
            version: s.version,
            body,
            subsections,
        })
    }
}

/// Differences between two sets of sections (or streams); volatile fields are reported apart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Differences that matter (fields, versions, sections on one side only).
    pub differences: Vec<String>,
    /// Differences in fields the schema marks volatile (clocks, timers), and in fields the
    /// host defines (reported by the normalisation hook).
    pub volatile: Vec<String>,
}

impl Diff {
    /// Whether everything but volatile fields is equal.
    pub fn is_equal(&self) -> bool {
        self.differences.is_empty()
    }
}

/// A host-defined normalisation of the top-level fields of both sides of one section, run
/// before they are compared: it may rewrite fields the host rather than the guest defines,
/// and returns `(path, what differs)` for each such field, reported as volatile.
pub type Normalise<'a> =
    &'a dyn Fn(&mut [(String, Value)], &mut [(String, Value)]) -> Vec<(String, String)>;

/// No host-defined fields.
pub fn no_normalise(_: &mut [(String, Value)], _: &mut [(String, Value)]) -> Vec<(String, String)> {
    Vec::new()
}

/// Flatten a decoded record into `path -> (value, volatile)`.
fn flatten(
    prefix: &str,
    fields: &[FieldSchema],
    vals: &[(String, Value)],
    vol: bool,
    out: &mut BTreeMap<String, (Value, bool)>,
) {
    for (f, (k, v)) in fields.iter().zip(vals) {
        let path = format!("{prefix}{k}");
        let vol = vol || f.volatile;
        match (&f.kind, v) {
            (FieldKind::Record { fields, .. }, Value::Record(inner)) => {
                flatten(&format!("{path}."), fields, inner, vol, out);
            }
            (FieldKind::List { of, .. }, Value::List(items)) => {
                if let FieldKind::Record { fields, .. } = of.as_ref() {
                    out.insert(
                        format!("{path}.len"),
                        (Value::Uint(items.len() as u64), vol),
                    );
                    for (i, it) in items.iter().enumerate() {
                        if let Value::Record(inner) = it {
                            flatten(&format!("{path}[{i}]."), fields, inner, vol, out);
                        }
                    }
                } else {
                    out.insert(path, (v.clone(), vol));
                }
            }
            _ => {
                out.insert(path, (v.clone(), vol));
            }
        }
    }
}

fn flat_body(prefix: &str, body: &Body, out: &mut BTreeMap<String, (Value, bool)>) {
    match body {
        Body::Fields { schema, values } => flatten(prefix, schema, values, false, out),
        Body::Raw(h) => {
            out.insert(
                format!("{prefix}(raw body)"),
                (Value::Str(h.clone()), false),
            );
        }
    }
}

fn flat(s: &Decoded) -> BTreeMap<String, (Value, bool)> {
    let mut out = BTreeMap::new();
    flat_body("", &s.body, &mut out);
    for ss in &s.subsections {
        flat_body(&format!("{}/", ss.name), &ss.body, &mut out);
    }
    out
}

/// A count of list entries in words.
pub fn entries(n: usize) -> String {
    if n == 1 {
        "1 entry".to_owned()
    } else {
        format!("{n} entries")
    }
}

/// An unsigned value: decimal below 4096, hex above.
pub fn uint(x: u64) -> String {
    if x < 4096 {
        x.to_string()
    } else {
        format!("{x:#x}")
    }
}

/// A value on one line.
pub fn scalar(v: &Value) -> String {
    match v {
        Value::Uint(x) => uint(*x),
        Value::Int(x) => x.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Str(s) => format!("{s:?}"),
        Value::List(items) => format!(
            "[{}]",
            items.iter().map(scalar).collect::<Vec<_>>().join(", ")
        ),
        Value::Record(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("{k}: {}", scalar(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A value as a diff line shows it: long lists and long hex as a count and a CRC.
fn shown(v: Option<&Value>) -> String {
    match v {
        None => "absent".to_owned(),
        Some(Value::List(items)) if items.len() > 8 => {
            let b: Vec<u8> = items
                .iter()
                .flat_map(|v| match v {
                    Value::Uint(x) => x.to_le_bytes().to_vec(),
                    Value::Int(x) => x.to_le_bytes().to_vec(),
                    _ => vec![],
                })
                .collect();
            format!(
                "[{} entries, crc32 {:#010x}]",
                items.len(),
                crc32fast::hash(&b)
            )
        }
        Some(Value::Str(s)) if s.len() > 64 => format!(
            "[{} hex digits, crc32 {:#010x}]",
            s.len(),
            crc32fast::hash(s.as_bytes())
        ),
        Some(v) => scalar(v),
    }
}

/// Where two lists of scalars first differ, for a readable diff line.
fn list_detail(a: Option<&Value>, b: Option<&Value>) -> String {
    if let (Some(Value::List(x)), Some(Value::List(y))) = (a, b)
        && (x.len() > 8 || y.len() > 8)
    {
        let n = x.iter().zip(y).filter(|(p, q)| p != q).count() + x.len().abs_diff(y.len());
        if let Some(i) = (0..x.len().max(y.len())).find(|&i| x.get(i) != y.get(i)) {
            return format!(
                " ({} differ, first [{i}]: {} vs {})",
                entries(n),
                x.get(i).map_or("absent".into(), scalar),
                y.get(i).map_or("absent".into(), scalar)
            );
        }
    }
    String::new()
}

/// How a section is named in diff lines: `config`, or `NAME instance N`.
fn label(config: bool, name: &str, instance: u32) -> String {
    if config {
        "config".to_owned()
    } else {
        format!("{name} instance {}", uint(u64::from(instance)))
    }
}

/// Compare two sets of sections by `(record, name, instance)`, field by field and subsection
/// by subsection, after `normalise` has rewritten host-defined fields on both sides.
pub fn sections(a: &[Decoded], b: &[Decoded], normalise: Normalise<'_>) -> Diff {
    let mut d = Diff::default();
    let key = |s: &Decoded| (!s.config, s.name.clone(), s.instance);
    let am: BTreeMap<_, _> = a.iter().map(|s| (key(s), s)).collect();
    let bm: BTreeMap<_, _> = b.iter().map(|s| (key(s), s)).collect();
    let keys: BTreeSet<_> = am.keys().chain(bm.keys()).collect();
    for k in keys {
        let name = label(!k.0, &k.1, k.2);
        let (x, y) = match (am.get(k), bm.get(k)) {
            (Some(x), Some(y)) => (*x, *y),
            (Some(_), None) => {
                d.differences.push(format!("{name}: only in A"));
                continue;
            }
            (None, _) => {
                d.differences.push(format!("{name}: only in B"));
                continue;
            }
        };
        if x.version != y.version {
            d.differences
                .push(format!("{name}: version {} vs {}", x.version, y.version));
        }
        let xs: Vec<_> = x.subsections.iter().map(|s| s.name.as_str()).collect();
        let ys: Vec<_> = y.subsections.iter().map(|s| s.name.as_str()).collect();
        if xs != ys {
            d.differences.push(format!(
                "{name}: subsections [{}] vs [{}]",
                xs.join(", "),
                ys.join(", ")
            ));
        }
        let (mut x, mut y) = (x.clone(), y.clone());
        if let (Body::Fields { values: fx, .. }, Body::Fields { values: fy, .. }) =
            (&mut x.body, &mut y.body)
        {
            for (path, what) in normalise(fx, fy) {
                d.volatile.push(format!("{name} {path}: {what}"));
            }
        }
        let (fa, fb) = (flat(&x), flat(&y));
        let paths: BTreeSet<_> = fa.keys().chain(fb.keys()).collect();
        for p in paths {
            let (va, vb) = (fa.get(p), fb.get(p));
            if va.map(|v| &v.0) == vb.map(|v| &v.0) {
                continue;
            }
            let line = format!(
                "{name} {p}: {} vs {}{}",
                shown(va.map(|v| &v.0)),
                shown(vb.map(|v| &v.0)),
                list_detail(va.map(|v| &v.0), vb.map(|v| &v.0))
            );
            if va.or(vb).is_some_and(|v| v.1) {
                d.volatile.push(line);
            } else {
                d.differences.push(line);
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FieldOpts;

    fn rec(name: &str, fields: &[(&str, bool, u64)], sub: Option<(&str, u64)>) -> Decoded {
        let field = |n: &str, vol: bool| {
            let o = FieldOpts::DEFAULT;
            FieldSchema::new::<u64>(n, if vol { o.volatile() } else { o })
        };
        let remaining = field("remaining_ms", true);
        Decoded {
            config: false,
            name: name.to_owned(),
            instance: 0,
            version: 1,
            body: Body::Fields {
                schema: fields.iter().map(|(n, v, _)| field(n, *v)).collect(),
                values: fields
                    .iter()
                    .map(|(n, _, x)| ((*n).to_owned(), Value::Uint(*x)))
                    .collect(),
            },
            subsections: sub
                .map(|(n, x)| DecodedSub {
                    name: n.to_owned(),
                    body: Body::Fields {
                        schema: vec![remaining.clone()],
                        values: vec![("remaining_ms".to_owned(), Value::Uint(x))],
                    },
                })
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn volatile_subsection_fields_are_reported_apart() {
        let a = [rec(
            "drc",
            &[("state", false, 1)],
            Some(("unplug-timer", 900)),
        )];
        let b = [rec(
            "drc",
            &[("state", false, 1)],
            Some(("unplug-timer", 400)),
        )];
        let d = sections(&a, &b, &no_normalise);
        assert!(d.is_equal(), "{d:?}");
        assert_eq!(
            d.volatile,
            ["drc instance 0 unplug-timer/remaining_ms: 900 vs 400"]
        );
    }

    #[test]
    fn real_differences_and_missing_sections_are_differences() {
        let a = [
            rec("drc", &[("state", false, 1), ("tsc", true, 5)], None),
            rec("uart", &[], None),
        ];
        let b = [rec(
            "drc",
            &[("state", false, 2), ("tsc", true, 6)],
            Some(("unplug-timer", 1)),
        )];
        let d = sections(&a, &b, &no_normalise);
        assert_eq!(
            d.differences,
            [
                "drc instance 0: subsections [] vs [unplug-timer]",
                "drc instance 0 state: 1 vs 2",
                "uart instance 0: only in A",
            ]
        );
        // The subsection's presence is a difference above; its volatile field is apart.
        assert_eq!(
            d.volatile,
            [
                "drc instance 0 tsc: 5 vs 6",
                "drc instance 0 unplug-timer/remaining_ms: absent vs 1"
            ]
        );
    }

    #[test]
    fn the_hook_normalises_before_comparing_and_reports_apart() {
        let a = [rec("cpu", &[("mask", false, 0xffff)], None)];
        let b = [rec("cpu", &[("mask", false, 0xffbf)], None)];
        let hook = |x: &mut [(String, Value)], y: &mut [(String, Value)]| {
            x[0].1 = Value::Uint(0);
            y[0].1 = Value::Uint(0);
            vec![("mask".to_owned(), "host-defined fields differ".to_owned())]
        };
        let d = sections(&a, &b, &hook);
        assert!(d.is_equal(), "{d:?}");
        assert_eq!(
            d.volatile,
            ["cpu instance 0 mask: host-defined fields differ"]
        );
    }
}
