//! `check-compat`: what in a new schema would break migration for a machine type whose old
//! schema is frozen (in the spirit of QEMU's vmstate static checker, but aware of
//! machine-type-gated subsections).
//!
//! Both schemas describe one machine type: `version` is the version that type writes,
//! `min_version` the oldest a destination reads, `subsections` what that type may emit. A
//! change breaks migration when a stream from one build is refused or misread by the other:
//! a removed, retyped, re-bounded or reordered field at an unchanged version, a different
//! written version (old destinations refuse a newer one; new destinations refuse an older
//! one they no longer read), a minimum raised above the frozen version, a removed or changed
//! subsection, or a new subsection or section an old destination does not know.

use devstate::{FieldKind, FieldSchema, MachineSchema, SectionSchema, SubsectionSchema};

/// A change between two schemas of the same machine type.
#[derive(Debug, PartialEq, Eq)]
pub struct Finding {
    /// Whether it breaks migration between the two builds.
    pub breaks: bool,
    /// What changed, in words.
    pub what: String,
}

/// A short name for a wire type: `u32`, `str(max 64)`, `list(max 24) of u64`, `record Foo`.
pub fn kind_name(k: &FieldKind) -> String {
    match k {
        FieldKind::U8 => "u8".into(),
        FieldKind::U16 => "u16".into(),
        FieldKind::U32 => "u32".into(),
        FieldKind::U64 => "u64".into(),
        FieldKind::I32 => "i32".into(),
        FieldKind::I64 => "i64".into(),
        FieldKind::Bool => "bool".into(),
        FieldKind::Str { max } => format!("str(max {max})"),
        FieldKind::List { max, of } => format!("list(max {max}) of {}", kind_name(of)),
        FieldKind::Record { name, .. } => format!("record {name}"),
    }
}

/// Compare field lists that must be wire-identical; `what` names their owner.
fn compare_fields(what: &str, old: &[FieldSchema], new: &[FieldSchema], out: &mut Vec<Finding>) {
    let mut push = |breaks, what: String| out.push(Finding { breaks, what });
    let mut nested = Vec::new();
    for o in old {
        let Some(j) = new.iter().position(|n| n.name == o.name) else {
            push(
                true,
                format!(
                    "{what}: field '{}' ({}) removed: the body no longer matches",
                    o.name,
                    kind_name(&o.kind)
                ),
            );
            continue;
        };
        let n = &new[j];
        match (&o.kind, &n.kind) {
            (FieldKind::Record { fields: of, .. }, FieldKind::Record { fields: nf, .. }) => {
                nested.push((format!("{what}: record '{}'", o.name), of, nf));
            }
            (a, b) if a != b => push(
                true,
                format!(
                    "{what}: field '{}' retyped: {} -> {}",
                    o.name,
                    kind_name(a),
                    kind_name(b)
                ),
            ),
            _ => {}
        }
        if o.volatile != n.volatile {
            push(
                false,
                format!(
                    "{what}: field '{}' is {} volatile (affects diffs only)",
                    o.name,
                    if n.volatile { "now" } else { "no longer" }
                ),
            );
        }
    }
    let common_old: Vec<&str> = old
        .iter()
        .filter(|o| new.iter().any(|n| n.name == o.name))
        .map(|f| f.name.as_str())
        .collect();
    let common_new: Vec<&str> = new
        .iter()
        .filter(|n| old.iter().any(|o| o.name == n.name))
        .map(|f| f.name.as_str())
        .collect();
    if common_old != common_new {
        push(
            true,
            format!(
                "{what}: fields reordered: [{}] -> [{}]: fields are untagged, their order is the wire layout",
                common_old.join(", "),
                common_new.join(", ")
            ),
        );
    }
    for n in new {
        if !old.iter().any(|o| o.name == n.name) {
            push(
                true,
                format!(
                    "{what}: field '{}' ({}) added without a version bump: old destinations find unexpected bytes",
                    n.name,
                    kind_name(&n.kind)
                ),
            );
        }
    }
    for (w, of, nf) in nested {
        compare_fields(&w, of, nf, out);
    }
}

fn section(machine: &str, o: &SectionSchema, n: &SectionSchema, out: &mut Vec<Finding>) {
    let name = &o.name;
    let push = |out: &mut Vec<Finding>, breaks, what: String| out.push(Finding { breaks, what });
    if n.version > o.version {
        push(
            out,
            true,
            format!(
                "section '{name}' is now written at v{} for {machine} instead of v{}: old destinations refuse it (keep writing v{} for {machine})",
                n.version, o.version, o.version
            ),
        );
    } else if n.version < o.version {
        push(
            out,
            true,
            format!(
                "section '{name}' is now written at v{} for {machine} instead of v{}: new destinations refuse v{} streams from old sources",
                n.version, o.version, o.version
            ),
        );
    }
    if n.min_version > o.version {
        push(
            out,
            true,
            format!(
                "section '{name}' minimum version raised to v{} above the frozen v{}: new destinations refuse streams from old sources",
                n.min_version, o.version
            ),
        );
    } else if n.min_version != o.min_version {
        push(
            out,
            false,
            format!(
                "section '{name}' minimum version v{} -> v{}",
                o.min_version, n.min_version
            ),
        );
    }
    // The fields the frozen version carries must be wire-identical in the new description.
    let at_old: Vec<FieldSchema> = n
        .fields
        .iter()
        .filter(|f| f.since <= o.version)
        .cloned()
        .collect();
    compare_fields(
        &format!("section '{name}' v{}", o.version),
        &o.fields,
        &at_old,
        out,
    );
    if n.required && !o.required {
        push(
            out,
            true,
            format!("section '{name}' became required: streams from old sources may lack it"),
        );
    } else if o.required && !n.required {
        push(
            out,
            false,
            format!("section '{name}' is no longer required"),
        );
    }
    for os in &o.subsections {
        match n.subsections.iter().find(|s| s.name == os.name) {
            None => push(
                out,
                true,
                format!(
                    "subsection '{name}/{}' removed: new destinations refuse it when old sources send it",
                    os.name
                ),
            ),
            Some(ns) => subsection(machine, name, os, ns, out),
        }
    }
    for ns in &n.subsections {
        if !o.subsections.iter().any(|s| s.name == ns.name) {
            push(
                out,
                true,
                format!(
                    "new subsection '{name}/{}' emitted for {machine}: old destinations refuse it as unknown (gate it off for {machine})",
                    ns.name
                ),
            );
        }
    }
}

fn subsection(
    machine: &str,
    sec: &str,
    o: &SubsectionSchema,
    n: &SubsectionSchema,
    out: &mut Vec<Finding>,
) {
    if n.version > o.version {
        out.push(Finding {
            breaks: true,
            what: format!(
                "subsection '{sec}/{}' is now written at v{} for {machine} instead of v{}: old destinations refuse it",
                o.name, n.version, o.version
            ),
        });
    } else if n.version < o.version {
        out.push(Finding {
            breaks: true,
            what: format!(
                "subsection '{sec}/{}' is now read up to v{} instead of v{}: new destinations refuse it from old sources",
                o.name, n.version, o.version
            ),
        });
    }
    let at_old: Vec<FieldSchema> = n
        .fields
        .iter()
        .filter(|f| f.since <= o.version)
        .cloned()
        .collect();
    compare_fields(
        &format!("subsection '{sec}/{}' v{}", o.name, o.version),
        &o.fields,
        &at_old,
        out,
    );
}

/// Compare the frozen `old` schema of a machine type with the `new` one.
pub fn check(old: &MachineSchema, new: &MachineSchema) -> Vec<Finding> {
    let mut out = Vec::new();
    if old.machine != new.machine {
        out.push(Finding {
            breaks: true,
            what: format!(
                "machine type changed: {} -> {} (compare schemas of the same machine type)",
                old.machine, new.machine
            ),
        });
    }
    if old.format_version != new.format_version {
        out.push(Finding {
            breaks: true,
            what: format!(
                "stream format version changed: {} -> {}",
                old.format_version, new.format_version
            ),
        });
    }
    for o in &old.sections {
        match new.section(&o.name) {
            None => out.push(Finding {
                breaks: true,
                what: format!(
                    "section '{}' removed: new destinations refuse old streams that carry it",
                    o.name
                ),
            }),
            Some(n) => section(&old.machine, o, n, &mut out),
        }
    }
    for n in &new.sections {
        if old.section(&n.name).is_none() {
            out.push(Finding {
                breaks: n.required,
                what: if n.required {
                    format!(
                        "new section '{}' is required: streams from old sources lack it",
                        n.name
                    )
                } else {
                    format!(
                        "new section '{}': old destinations refuse it whenever it is sent for {}",
                        n.name, old.machine
                    )
                },
            });
        }
    }
    out
}
