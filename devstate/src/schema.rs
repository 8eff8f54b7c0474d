//! Schema export and schema-driven decoding.
//!
//! A [`Catalog`] lists the section types a build knows. For a machine type it produces a
//! [`MachineSchema`]: every section with the version written for that type, the fields present
//! at that version, and the subsections that type may emit. The JSON of a schema is stable
//! (ordered, no timestamps) so it can be committed and diffed; `ferry-dump` decodes streams
//! from it alone through [`decode_fields`] and re-encodes them with [`encode_fields`].

use crate::section::{SectionInfo, fields_at};
use crate::{DecodeError, FieldKind, FieldSchema, Reader, Section, put_len};
use machine_types::MachineType;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One subsection as a machine type emits it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsectionSchema {
    /// Subsection name.
    pub name: String,
    /// Version written.
    pub version: u32,
    /// Fields of its body.
    pub fields: Vec<FieldSchema>,
}

/// One section as a machine type emits it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionSchema {
    /// Section name.
    pub name: String,
    /// Version written for this machine type.
    pub version: u32,
    /// Oldest version a destination of this build reads.
    pub min_version: u32,
    /// Whether a destination requires it.
    pub required: bool,
    /// Body fields at `version`.
    pub fields: Vec<FieldSchema>,
    /// Subsections this machine type may emit.
    pub subsections: Vec<SubsectionSchema>,
}

/// Everything a machine type may put in a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSchema {
    /// Canonical machine type name.
    pub machine: String,
    /// Stream format version.
    pub format_version: u16,
    /// Sections, sorted by name.
    pub sections: Vec<SectionSchema>,
}

impl MachineSchema {
    /// Find a section by name.
    pub fn section(&self, name: &str) -> Option<&SectionSchema> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Stable, pretty JSON for committing.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("schema serializes");
        s.push('\n');
        s
    }

    /// A catalog that accepts exactly what this schema describes (for tools without Rust types).
    pub fn catalog(&self) -> Catalog {
        let mut c = Catalog::new();
        for s in &self.sections {
            let body: u64 = s.fields.iter().map(|f| f.kind.max_len()).sum();
            let subs: u64 = s
                .subsections
                .iter()
                .map(|ss| 264 + ss.fields.iter().map(|f| f.kind.max_len()).sum::<u64>())
                .sum();
            c.infos.insert(
                s.name.clone(),
                SectionInfo {
                    name: s.name.clone(),
                    version: s.version,
                    min_version: s.min_version.min(s.version),
                    required: s.required,
                    subsections: s
                        .subsections
                        .iter()
                        .map(|ss| (ss.name.clone(), ss.version))
                        .collect(),
                    max_len: body + subs + 5,
                },
            );
        }
        c
    }
}

type SchemaFn = fn(&MachineType) -> SectionSchema;

/// The section types a build knows: what the decoder checks against and what schemas list.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    infos: BTreeMap<String, SectionInfo>,
    schemas: Vec<SchemaFn>,
}

fn schema_of<S: Section>(m: &MachineType) -> SectionSchema {
    let version = S::save_version(m);
    SectionSchema {
        name: S::NAME.to_owned(),
        version,
        min_version: S::MIN_VERSION,
        required: S::REQUIRED,
        fields: fields_at(S::fields(), version),
        subsections: S::subsections()
            .iter()
            .filter(|s| s.for_machine(m))
            .map(|s| SubsectionSchema {
                name: s.name().to_owned(),
                version: s.version(),
                fields: s.fields(),
            })
            .collect(),
    }
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add section type `S`. Panics on a duplicate name or an unbounded string/list field,
    /// both programming errors caught by any test that builds the catalog.
    pub fn register<S: Section>(&mut self) -> &mut Self {
        let info = SectionInfo::of::<S>();
        assert!(
            !S::fields().iter().any(|f| f.kind.unbounded()),
            "section '{}' has a string or list field without a max bound",
            S::NAME
        );
        assert!(
            S::MIN_VERSION >= 1 && S::MIN_VERSION <= S::VERSION,
            "section '{}' has an invalid version range",
            S::NAME
        );
        let dup = self.infos.insert(S::NAME.to_owned(), info);
        assert!(dup.is_none(), "section '{}' registered twice", S::NAME);
        self.schemas.push(schema_of::<S>);
        self
    }

    /// What the decoder knows about section `name`.
    pub fn info(&self, name: &str) -> Option<&SectionInfo> {
        self.infos.get(name)
    }

    /// All known sections, sorted by name.
    pub fn infos(&self) -> impl Iterator<Item = &SectionInfo> {
        self.infos.values()
    }

    /// The schema machine type `m` emits with this build.
    pub fn schema(&self, m: &MachineType) -> MachineSchema {
        let mut sections: Vec<_> = self.schemas.iter().map(|f| f(m)).collect();
        sections.sort_by(|a, b| a.name.cmp(&b.name));
        MachineSchema {
            machine: m.name().to_owned(),
            format_version: crate::FORMAT_VERSION,
            sections,
        }
    }
}

/// A field value decoded without its Rust type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// Any unsigned integer.
    Uint(u64),
    /// Any signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<Value>),
    /// A nested record: field names and values in wire order.
    Record(Vec<(String, Value)>),
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Uint(v) => s.serialize_u64(*v),
            Value::Int(v) => s.serialize_i64(*v),
            Value::Bool(v) => s.serialize_bool(*v),
            Value::Str(v) => s.serialize_str(v),
            Value::List(v) => v.serialize(s),
            Value::Record(fields) => {
                let mut m = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

fn decode_kind(
    kind: &FieldKind,
    max_ok: bool,
    name: &str,
    r: &mut Reader<'_>,
) -> Result<Value, DecodeError> {
    use crate::Field;
    Ok(match kind {
        FieldKind::U8 => Value::Uint(u8::get(r, 0, name)?.into()),
        FieldKind::U16 => Value::Uint(u16::get(r, 0, name)?.into()),
        FieldKind::U32 => Value::Uint(u32::get(r, 0, name)?.into()),
        FieldKind::U64 => Value::Uint(u64::get(r, 0, name)?),
        FieldKind::I32 => Value::Int(i32::get(r, 0, name)?.into()),
        FieldKind::I64 => Value::Int(i64::get(r, 0, name)?),
        FieldKind::Bool => Value::Bool(bool::get(r, 0, name)?),
        FieldKind::Str { max } => Value::Str(String::get(r, if max_ok { *max } else { 0 }, name)?),
        FieldKind::List { max, of } => {
            let n = r.count(if max_ok { *max } else { 0 }, name)?;
            let mut v = Vec::with_capacity(n.min(r.remaining()));
            for _ in 0..n {
                v.push(decode_kind(of, false, name, r)?);
            }
            Value::List(v)
        }
        FieldKind::Record { fields, .. } => Value::Record(decode_fields(fields, r)?),
    })
}

/// Decode `fields` in order from `r`, by schema alone.
pub fn decode_fields(
    fields: &[FieldSchema],
    r: &mut Reader<'_>,
) -> Result<Vec<(String, Value)>, DecodeError> {
    fields
        .iter()
        .map(|f| Ok((f.name.clone(), decode_kind(&f.kind, true, &f.name, r)?)))
        .collect()
}

/// A value that does not match the schema's type for its field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Value of field '{field}' does not match its schema type")]
pub struct ValueMismatch {
    /// The field.
    pub field: String,
}

fn encode_kind(
    kind: &FieldKind,
    v: &Value,
    name: &str,
    w: &mut Vec<u8>,
) -> Result<(), ValueMismatch> {
    let bad = || ValueMismatch {
        field: name.to_owned(),
    };
    let uint = |max: u64| match v {
        Value::Uint(x) if *x <= max => Ok(*x),
        _ => Err(bad()),
    };
    match kind {
        FieldKind::U8 => w.push(uint(u8::MAX.into())? as u8),
        FieldKind::U16 => w.extend_from_slice(&(uint(u16::MAX.into())? as u16).to_le_bytes()),
        FieldKind::U32 => w.extend_from_slice(&(uint(u32::MAX.into())? as u32).to_le_bytes()),
        FieldKind::U64 => w.extend_from_slice(&uint(u64::MAX)?.to_le_bytes()),
        FieldKind::I32 => match v {
            Value::Int(x) => {
                w.extend_from_slice(&i32::try_from(*x).map_err(|_| bad())?.to_le_bytes())
            }
            _ => return Err(bad()),
        },
        FieldKind::I64 => match v {
            Value::Int(x) => w.extend_from_slice(&x.to_le_bytes()),
            _ => return Err(bad()),
        },
        FieldKind::Bool => match v {
            Value::Bool(b) => w.push(u8::from(*b)),
            _ => return Err(bad()),
        },
        FieldKind::Str { .. } => match v {
            Value::Str(s) => {
                put_len(w, s.len());
                w.extend_from_slice(s.as_bytes());
            }
            _ => return Err(bad()),
        },
        FieldKind::List { of, .. } => match v {
            Value::List(items) => {
                put_len(w, items.len());
                for i in items {
                    encode_kind(of, i, name, w)?;
                }
            }
            _ => return Err(bad()),
        },
        FieldKind::Record { fields, .. } => match v {
            Value::Record(vals) => encode_fields(fields, vals, w)?,
            _ => return Err(bad()),
        },
    }
    Ok(())
}

/// Encode `values` by schema alone; the inverse of [`decode_fields`].
pub fn encode_fields(
    fields: &[FieldSchema],
    values: &[(String, Value)],
    w: &mut Vec<u8>,
) -> Result<(), ValueMismatch> {
    if fields.len() != values.len() {
        return Err(ValueMismatch {
            field: fields.first().map(|f| f.name.clone()).unwrap_or_default(),
        });
    }
    for (f, (name, v)) in fields.iter().zip(values) {
        if *name != f.name {
            return Err(ValueMismatch {
                field: name.clone(),
            });
        }
        encode_kind(&f.kind, v, &f.name, w)?;
    }
    Ok(())
}
