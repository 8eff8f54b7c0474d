//! Frozen schemas (issue 8): the schema this build emits for every machine type must equal
//! the committed `compat/schemas/<machine>.json`, which is what every earlier build of that
//! machine type accepts. Strict equality (Precise rule 10: until v0.1.0 a deliberate change
//! re-blesses the schema in the same commit; after it, a wire change needs a new machine
//! type). `compat/ci-step.sh` runs `ferry-dump check-compat` on the same pair, which names
//! each break by kind. No KVM needed.

use crate::streams::*;
use devstate::{MachineSchema, SectionSchema};
use ferry_tests::*;

fn describe(old: &MachineSchema, new: &MachineSchema) -> Vec<String> {
    let mut out = Vec::new();
    if old.format_version != new.format_version {
        out.push(format!(
            "stream format version {} -> {}",
            old.format_version, new.format_version
        ));
    }
    let names = |s: &MachineSchema| {
        s.sections
            .iter()
            .map(|x| x.name.clone())
            .collect::<Vec<_>>()
    };
    for n in names(old) {
        if new.section(&n).is_none() {
            out.push(format!("section '{n}' is no longer written or read"));
        }
    }
    for n in names(new) {
        if old.section(&n).is_none() {
            out.push(format!(
                "new section '{n}': builds with the committed schema refuse it"
            ));
        }
    }
    for o in &old.sections {
        let Some(n) = new.section(&o.name) else {
            continue;
        };
        section(o, n, &mut out);
    }
    out
}

fn section(o: &SectionSchema, n: &SectionSchema, out: &mut Vec<String>) {
    let name = &o.name;
    if o.version != n.version {
        out.push(format!(
            "section '{name}': written version {} -> {} (older builds read at most v{})",
            o.version, n.version, o.version
        ));
    }
    if o.min_version != n.min_version {
        out.push(format!(
            "section '{name}': minimum version {} -> {}",
            o.min_version, n.min_version
        ));
    }
    if o.required != n.required {
        out.push(format!(
            "section '{name}': required {} -> {}",
            o.required, n.required
        ));
    }
    if o.fields != n.fields {
        let f = |s: &SectionSchema| {
            s.fields
                .iter()
                .map(|f| f.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(format!(
            "section '{name}': fields changed: [{}] -> [{}]",
            f(o),
            f(n)
        ));
    }
    for s in &n.subsections {
        match o.subsections.iter().find(|x| x.name == s.name) {
            None => out.push(format!(
                "section '{name}': new subsection '{}' emitted for {}: older builds refuse it",
                s.name, "this machine type"
            )),
            Some(x) if x != s => out.push(format!(
                "section '{name}': subsection '{}' changed (version {} -> {})",
                s.name, x.version, s.version
            )),
            Some(_) => {}
        }
    }
    for s in &o.subsections {
        if !n.subsections.iter().any(|x| x.name == s.name) {
            out.push(format!(
                "section '{name}': subsection '{}' no longer emitted",
                s.name
            ));
        }
    }
}

pub fn every_machine_type_emits_exactly_its_committed_schema() {
    let catalog = vmm::migrate::full_catalog();
    let mut breaks = Vec::new();
    for m in machine_types::all() {
        let committed = committed_schema(m.name());
        assert_eq!(
            committed.machine,
            m.name(),
            "compat/schemas/{}.json",
            m.name()
        );
        let current = catalog.schema(m);
        if current != committed {
            let mut d = describe(&committed, &current);
            if d.is_empty() {
                d.push("schemas differ (see `ferry-dump check-compat`)".into());
            }
            breaks.push(format!(
                "{} (compat/schemas/{}.json vs this build):\n  {}",
                m.name(),
                m.name(),
                d.join("\n  ")
            ));
        }
    }
    assert!(
        breaks.is_empty(),
        "this build breaks the frozen stream layout of existing machine types:\n{}\n\n\
         A released machine type's stream never changes: put the change behind a compat \
         property of a new machine type. (Before v0.1.0 only, a deliberate change re-blesses \
         the schema in the same commit.)",
        breaks.join("\n")
    );
}

pub fn committed_schemas_are_exactly_the_machine_types() {
    let dir = repo_root().join("compat/schemas");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .map(|n| n.trim_end_matches(".json").to_owned())
        .collect();
    files.sort();
    let mut types: Vec<String> = machine_types::all()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    types.sort();
    assert_eq!(
        files, types,
        "a machine type may never be removed once its schema is committed, and a new one \
         commits its schema (`ferry-dump schema --machine M > compat/schemas/M.json`)"
    );
}
