//! The committed (frozen) schemas of `compat/schemas/` and stream comparisons through
//! `vmm::migrate`, shared by the matrix and the goldens.

use devstate::{Item, MachineSchema, RawSection, Reader, StreamReader};
use ferry_tests::repo_root;
use std::path::Path;

/// The committed, frozen schema of `machine` (`compat/schemas/MACHINE.json`).
pub fn committed_schema(machine: &str) -> MachineSchema {
    let p = repo_root()
        .join("compat/schemas")
        .join(format!("{machine}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: every machine type needs its committed schema",
            p.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not a schema: {e}", p.display()))
}

/// The device sections of a stream file (framing and CRCs checked), with its machine type.
pub fn stream_sections(p: &Path) -> (String, Vec<RawSection>) {
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    vmm::migrate::read_stream_sections(std::io::BufReader::new(f))
        .unwrap_or_else(|e| panic!("{}: not a readable stream: {e}", p.display()))
}

/// Read `p` as a destination holding only the frozen schema would: sections and
/// subsections by name, versions within the committed `[min_version, version]`, every body
/// decoded field by field with the committed description and nothing left over. This is what
/// a build from the day the machine type was frozen accepts.
pub fn frozen_read(p: &Path, schema: &MachineSchema) -> Result<(), String> {
    let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let catalog = schema.catalog();
    let mut r = StreamReader::new(bytes.as_slice(), Some(&catalog))
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if r.header().machine != schema.machine {
        return Err(format!(
            "{}: stream of {} read with the schema of {}",
            p.display(),
            r.header().machine,
            schema.machine
        ));
    }
    let mut sections = Vec::new();
    loop {
        match r.next_item().map_err(|e| {
            format!(
                "{}: refused by the frozen schema of {}: {e}",
                p.display(),
                schema.machine
            )
        })? {
            Item::Section(s) => sections.push(s),
            Item::End => break,
            Item::Config(_) | Item::Ram(_) => {}
        }
    }
    for s in &sections {
        let sch = schema.section(&s.name).expect("the catalog knew it");
        let fields = devstate::fields_at(sch.fields.clone(), s.version);
        let mut rd = Reader::new(&s.body, s.body_offset, &s.name);
        devstate::decode_fields(&fields, &mut rd)
            .and_then(|_| rd.finish())
            .map_err(|e| {
                format!(
                    "{}: section {}[{}] v{} does not decode with the frozen fields: {e}",
                    p.display(),
                    s.name,
                    s.instance,
                    s.version
                )
            })?;
        for sub in &s.subsections {
            let ssch = sch
                .subsections
                .iter()
                .find(|x| x.name == sub.name)
                .expect("the catalog knew it");
            let mut rd = Reader::new(&sub.body, sub.body_offset, &sub.name);
            devstate::decode_fields(&ssch.fields, &mut rd)
                .and_then(|_| rd.finish())
                .map_err(|e| {
                    format!(
                        "{}: subsection {}[{}]/{} does not decode with the frozen fields: {e}",
                        p.display(),
                        s.name,
                        s.instance,
                        sub.name
                    )
                })?;
        }
    }
    Ok(())
}

/// Differences between two streams' device sections, decoded with `schema`; volatile
/// fields are reported apart. `migration instance 0 source_running` (the engine's run-state record,
/// not device state) is dropped when `ignore_run_state`: a live source was running, its
/// paused `-S` destination re-serialises as not running.
pub fn diff_streams(
    schema: &MachineSchema,
    a: &Path,
    b: &Path,
    ignore_run_state: bool,
) -> vmm::migrate::SectionDiff {
    let (ma, sa) = stream_sections(a);
    let (mb, sb) = stream_sections(b);
    assert_eq!(
        ma,
        mb,
        "{} vs {}: machine types differ",
        a.display(),
        b.display()
    );
    let mut d = vmm::migrate::diff_sections(schema, &sa, &sb)
        .unwrap_or_else(|e| panic!("{} vs {}: {e}", a.display(), b.display()));
    if ignore_run_state {
        d.differences
            .retain(|x| !x.starts_with("migration instance 0 source_running"));
    }
    d
}
