//! `check-compat`: what in a new schema would break migration for a machine type whose old
//! schema is frozen (in the spirit of QEMU's vmstate static checker, but aware of
//! machine-type-gated subsections).

use devstate::{FieldSchema, MachineSchema};

/// A change between two schemas of the same machine type.
#[derive(Debug, PartialEq, Eq)]
pub struct Finding {
    /// Whether it breaks migration between the two builds.
    pub breaks: bool,
    /// What changed, in words.
    pub what: String,
}

fn field_list(f: &[FieldSchema]) -> String {
    f.iter()
        .map(|f| format!("{}:{}", f.name, kind_name(&f.kind)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn kind_name(k: &devstate::FieldKind) -> String {
    serde_json::to_string(k).unwrap_or_default()
}

/// Compare the frozen `old` schema of a machine type with the `new` one.
pub fn check(old: &MachineSchema, new: &MachineSchema) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |breaks: bool, what: String| out.push(Finding { breaks, what });
    if old.machine != new.machine {
        push(
            true,
            format!("machine type changed: {} -> {}", old.machine, new.machine),
        );
    }
    if old.format_version != new.format_version {
        push(
            true,
            format!(
                "stream format version changed: {} -> {}",
                old.format_version, new.format_version
            ),
        );
    }
    for o in &old.sections {
        let Some(n) = new.section(&o.name) else {
            push(
                true,
                format!(
                    "section '{}' removed: new destinations refuse old streams",
                    o.name
                ),
            );
            continue;
        };
        if n.version != o.version {
            push(
                true,
                format!(
                    "section '{}' is now written at version {} instead of {}: old destinations cannot read it",
                    o.name, n.version, o.version
                ),
            );
        }
        if n.min_version > o.version {
            push(
                true,
                format!(
                    "section '{}' minimum version {} is above the frozen version {}: new destinations refuse old streams",
                    o.name, n.min_version, o.version
                ),
            );
        }
        if n.version == o.version && n.fields != o.fields {
            for (i, (a, b)) in o.fields.iter().zip(&n.fields).enumerate() {
                if a.name != b.name {
                    push(
                        true,
                        format!(
                            "section '{}' field {i} renamed or moved: '{}' -> '{}'",
                            o.name, a.name, b.name
                        ),
                    );
                } else if a.kind != b.kind {
                    push(
                        true,
                        format!("section '{}' field '{}' retyped", o.name, a.name),
                    );
                } else if a.volatile != b.volatile {
                    push(
                        false,
                        format!(
                            "section '{}' field '{}' volatile flag changed",
                            o.name, a.name
                        ),
                    );
                }
            }
            if o.fields.len() != n.fields.len() {
                push(
                    true,
                    format!(
                        "section '{}' v{} fields changed without a version bump: [{}] -> [{}]",
                        o.name,
                        o.version,
                        field_list(&o.fields),
                        field_list(&n.fields)
                    ),
                );
            }
        }
        for os in &o.subsections {
            match n.subsections.iter().find(|s| s.name == os.name) {
                None => push(
                    true,
                    format!(
                        "subsection '{}/{}' no longer emitted or understood",
                        o.name, os.name
                    ),
                ),
                Some(ns) if ns.version != os.version || ns.fields != os.fields => push(
                    true,
                    format!(
                        "subsection '{}/{}' changed (v{} -> v{})",
                        o.name, os.name, os.version, ns.version
                    ),
                ),
                Some(_) => {}
            }
        }
        for ns in &n.subsections {
            if !o.subsections.iter().any(|s| s.name == ns.name) {
                push(
                    true,
                    format!(
                        "new subsection '{}/{}' emitted for {}: old destinations refuse it as unknown",
                        o.name, ns.name, old.machine
                    ),
                );
            }
        }
        if n.required && !o.required {
            push(
                true,
                format!(
                    "section '{}' became required: old sources may not send it",
                    o.name
                ),
            );
        }
    }
    for n in &new.sections {
        if old.section(&n.name).is_none() {
            push(
                n.required,
                format!(
                    "new section '{}'{}",
                    n.name,
                    if n.required {
                        " is required: streams from old sources lack it"
                    } else {
                        " (old destinations refuse it if it is ever sent)"
                    }
                ),
            );
        }
    }
    out
}
