//! Golden-output tests of the real `ferry-dump` binary.
//!
//! Inputs are deterministic: the two streams in `tests/data/` were captured once from real
//! `ferry` processes (a 64 MiB ferry-1.1 guest running the idle test guest, saved with QMP
//! `migrate file:`, then loaded with `-S --incoming file:` and saved again before its first
//! KVM_RUN); everything else is built here with devstate's `StreamWriter` and the real state
//! types. Expected outputs live in `tests/golden/`; `FERRY_BLESS=1 cargo test -p tools`
//! rewrites them.

mod common;

use common::{data_dir, ferry_dump, golden, scratch};
use devstate::{
    Catalog, MachineSchema, RawSection, Reader, Section, StreamWriter, Sub, Subsection, Tag,
    decode_fields, encode_fields, encode_header,
};
use machine_types::MachineType;
use std::path::Path;

const SOURCE: &str = "idle-ferry-1.1-source.stream";
const DESTINATION: &str = "idle-ferry-1.1-destination.stream";

fn read_data(name: &str) -> Vec<u8> {
    std::fs::read(data_dir().join(name)).unwrap()
}

/// stdout, then the exit code, so a golden file also pins the exit status.
fn with_code(o: &common::Out) -> String {
    assert!(
        o.stderr.is_empty(),
        "ferry-dump wrote to stderr: {}",
        o.stderr
    );
    format!("{}[exit {}]\n", o.stdout, o.code)
}

// ---------------------------------------------------------------------------------------
// A section type with a machine-gated subsection, to show subsections and older versions.

devstate::record! {
    /// A made-up device with a pending-unplug timer in a subsection.
    pub struct Widget {
        pub id: u32,
        pub label: String [max = 16, since = 2],
        pub counter: u64 [volatile],
        pub regs: Vec<u16> [max = 32],
        pub attached: bool,
        pub pending_ms: u64 [skip],
    }
}

devstate::record! {
    /// Body of the `unplug-timer` subsection.
    pub struct WidgetTimer {
        pub remaining_ms: u64 [volatile],
    }
}

fn not_1_0(m: &MachineType) -> bool {
    m.name() != "ferry-1.0"
}
fn pending(w: &Widget) -> bool {
    w.pending_ms > 0
}
fn get_timer(w: &Widget) -> WidgetTimer {
    WidgetTimer {
        remaining_ms: w.pending_ms,
    }
}
fn set_timer(w: &mut Widget, t: WidgetTimer) {
    w.pending_ms = t.remaining_ms;
}

static TIMER: Sub<Widget, WidgetTimer> = Sub {
    name: "unplug-timer",
    version: 1,
    for_machine: not_1_0,
    needed: pending,
    get: get_timer,
    set: set_timer,
};
static WIDGET_SUBS: [&dyn Subsection<Widget>; 1] = [&TIMER];

impl Section for Widget {
    const NAME: &'static str = "widget";
    const VERSION: u32 = 2;
    const MIN_VERSION: u32 = 1;
    fn subsections() -> &'static [&'static dyn Subsection<Self>] {
        &WIDGET_SUBS
    }
}

fn machine(name: &str) -> &'static MachineType {
    MachineType::lookup(name).unwrap()
}

fn widget_schema(m: &str) -> MachineSchema {
    let mut c: Catalog = ferry_state::full_catalog();
    c.register::<Widget>();
    c.schema(machine(m))
}

fn config(m: &str) -> migration::ConfigRecord {
    migration::ConfigRecord {
        machine: m.to_owned(),
        cpu_model: "ferry-cpu-v1".to_owned(),
        vcpus: 1,
        memory: vec![migration::RegionDesc {
            gpa: 0,
            size: 1 << 20,
        }],
        devices: vec![],
    }
}

/// A small ferry-1.1 stream: config, RAM (a page sent twice), two widgets (one with its
/// subsection), an older-version widget, and the migration record.
fn widget_stream() -> Vec<u8> {
    let m = machine("ferry-1.1");
    let mut w = StreamWriter::new(Vec::new(), m, "golden test").unwrap();
    w.config(&mut config(m.name())).unwrap();
    w.ram_zero(0, 255).unwrap();
    let mut page = vec![0u8; 4096];
    for (i, b) in page.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    w.ram_data(0x1000, &page).unwrap();
    page[0] = 0xff;
    w.ram_data(0x1000, &page).unwrap();
    w.ram_data(0xff000, &page).unwrap();
    let mut a = Widget {
        id: 7,
        label: "slot-3".into(),
        counter: 123_456_789,
        regs: (0..20)
            .map(|i| if i % 5 == 0 { 0 } else { i * 3 })
            .collect(),
        attached: true,
        pending_ms: 750,
    };
    w.section(&mut a, 0).unwrap();
    let mut b = Widget {
        id: 8,
        attached: false,
        ..Widget::default()
    };
    w.section(&mut b, 1).unwrap();
    // Version 1 (no label), as an older source writes it.
    let mut body = Vec::new();
    devstate::Record::encode(&b, 1, &mut body);
    let old = RawSection {
        name: "widget".into(),
        instance: 2,
        version: 1,
        offset: 0,
        body_offset: 0,
        body,
        subsections: vec![],
        crc: 0,
    };
    w.raw(&old.encode(Tag::Section)).unwrap();
    w.section(
        &mut migration::SwitchoverRecord {
            source_running: true,
        },
        0,
    )
    .unwrap();
    w.finish().unwrap()
}

fn write_widget_files(dir: &Path) {
    std::fs::write(dir.join("widget.stream"), widget_stream()).unwrap();
    std::fs::write(
        dir.join("widget-schema.json"),
        widget_schema("ferry-1.1").to_json(),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// show

#[test]
fn show_real_snapshot() {
    let o = ferry_dump(&data_dir(), &["show", SOURCE]);
    assert_eq!(o.code, 0);
    golden("show-real-snapshot.txt", &with_code(&o));
}

#[test]
fn show_section_filter_with_ram_records() {
    let o = ferry_dump(
        &data_dir(),
        &["show", "--ram", "--section", "kvmclock", SOURCE],
    );
    assert_eq!(o.code, 0);
    assert!(!o.stdout.contains("section cpu"));
    golden("show-ram-kvmclock.txt", &with_code(&o));
}

#[test]
fn show_subsections_and_versions() {
    let dir = scratch("show_subsections");
    write_widget_files(&dir);
    let o = ferry_dump(
        &dir,
        &["show", "--schema", "widget-schema.json", "widget.stream"],
    );
    assert_eq!(o.code, 0, "{o:?}");
    golden("show-widget.txt", &with_code(&o));
}

#[test]
fn show_json() {
    let dir = scratch("show_json");
    write_widget_files(&dir);
    let o = ferry_dump(
        &dir,
        &[
            "show",
            "--json",
            "--ram",
            "--schema",
            "widget-schema.json",
            "widget.stream",
        ],
    );
    assert_eq!(o.code, 0, "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["sections"][1]["subsections"][0]["name"], "unplug-timer");
    assert_eq!(
        v["sections"][1]["subsections"][0]["fields"]["remaining_ms"],
        750
    );
    // 0x1000 is covered by the zero run, then sent with data twice.
    assert_eq!(v["ram"]["resent_pages"], 2);
    golden("show-widget.json", &with_code(&o));

    let o = ferry_dump(
        &dir,
        &[
            "show",
            "--json",
            "--section",
            "migration",
            "--schema",
            "widget-schema.json",
            "widget.stream",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["sections"].as_array().unwrap().len(), 1);
    assert_eq!(v["sections"][0]["fields"]["source_running"], true);
}

#[test]
fn widget_stream_without_its_schema_is_shown_raw_and_fails_verify() {
    let dir = scratch("widget_without_schema");
    write_widget_files(&dir);
    let o = ferry_dump(&dir, &["show", "--section", "widget", "widget.stream"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout
            .contains("note: Section unknown to the ferry-1.1 schema: a destination of this build refuses it; body shown as raw hex"),
        "{}",
        o.stdout
    );
    let o = ferry_dump(&dir, &["verify", "--all", "widget.stream"]);
    assert_eq!(o.code, 1);
    golden("verify-unknown-sections.txt", &with_code(&o));
    let o = ferry_dump(
        &dir,
        &["verify", "--schema", "widget-schema.json", "widget.stream"],
    );
    assert_eq!(o.code, 1, "required sections are missing: {o:?}");
    assert!(
        o.stdout.contains("Missing section 'cpu' instance 0"),
        "{}",
        o.stdout
    );
}

// ---------------------------------------------------------------------------------------
// Unknown machine type and unknown section version: framing, raw hex, a note.

fn end_marker(records: u64) -> Vec<u8> {
    let mut e = vec![Tag::End as u8];
    e.extend_from_slice(&records.to_le_bytes());
    let crc = crc32fast::hash(&e);
    e.extend_from_slice(&crc.to_le_bytes());
    e
}

fn zero_record(gpa: u64, pages: u32) -> Vec<u8> {
    let mut r = vec![Tag::Ram as u8];
    r.extend_from_slice(&gpa.to_le_bytes());
    r.extend_from_slice(&pages.to_le_bytes());
    r.push(1);
    let crc = crc32fast::hash(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

fn raw_section(name: &str, instance: u32, version: u32, body: &[u8], tag: Tag) -> Vec<u8> {
    RawSection {
        name: name.into(),
        instance,
        version,
        offset: 0,
        body_offset: 0,
        body: body.to_vec(),
        subsections: vec![devstate::RawSubsection {
            name: "extra".into(),
            version: 3,
            body_offset: 0,
            body: vec![0xaa, 0xbb],
        }]
        .into_iter()
        .filter(|_| name == "gizmo")
        .collect(),
        crc: 0,
    }
    .encode(tag)
}

#[test]
fn unknown_machine_type_shows_framing_raw_hex_and_a_note() {
    let dir = scratch("unknown_machine");
    let mut s = encode_header("ferry-9.9", "ferry 9.9.0");
    s.extend(raw_section(
        "config",
        0,
        4,
        b"future configuration",
        Tag::Config,
    ));
    s.extend(zero_record(0, 16));
    s.extend(raw_section(
        "gizmo",
        0,
        12,
        &(0u8..40).collect::<Vec<_>>(),
        Tag::Section,
    ));
    s.extend(end_marker(3));
    std::fs::write(dir.join("future.stream"), &s).unwrap();

    let o = ferry_dump(&dir, &["show", "future.stream"]);
    assert_eq!(
        o.code, 0,
        "a readable stream of an unknown type is not damaged: {o:?}"
    );
    assert!(
        o.stdout
            .contains("note: Machine type 'ferry-9.9' is unknown to this build")
    );
    golden("show-unknown-machine.txt", &with_code(&o));

    let o = ferry_dump(&dir, &["show", "--json", "future.stream"]);
    assert_eq!(o.code, 0);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["sections"][1]["raw"], hex(&(0u8..40).collect::<Vec<_>>()));
    assert_eq!(v["sections"][1]["subsections"][0]["raw"], "aabb");

    let o = ferry_dump(&dir, &["verify", "future.stream"]);
    assert_eq!(o.code, 1);
    assert_eq!(o.stdout.lines().count(), 1);
    assert!(
        o.stdout
            .starts_with("future.stream: Machine type 'ferry-9.9' is unknown to this build")
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn unknown_section_version_shows_raw_hex_and_a_note() {
    let dir = scratch("unknown_version");
    let m = machine("ferry-1.1");
    let mut w = StreamWriter::new(Vec::new(), m, "golden test").unwrap();
    w.config(&mut config(m.name())).unwrap();
    w.raw(&raw_section("kvmclock", 0, 7, &[0x11; 28], Tag::Section))
        .unwrap();
    w.section(
        &mut migration::SwitchoverRecord {
            source_running: false,
        },
        0,
    )
    .unwrap();
    std::fs::write(dir.join("v7.stream"), w.finish().unwrap()).unwrap();

    let o = ferry_dump(&dir, &["show", "v7.stream"]);
    assert_eq!(o.code, 0, "{o:?}");
    golden("show-unknown-version.txt", &with_code(&o));
    let o = ferry_dump(&dir, &["verify", "v7.stream"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stdout,
        "v7.stream: Section 'kvmclock' version 7 is newer than supported version 1 at offset 122\n"
    );
}

// ---------------------------------------------------------------------------------------
// verify

/// The real snapshot with five problems: a flipped byte in a RAM data record, in the `cpu`
/// body and in the `pit` body, and the `uart` section cut out (so the end marker's count is
/// off by one and a required section is missing).
fn corrupted() -> Vec<u8> {
    let orig = read_data(SOURCE);
    let sc = devstate::scan::scan(&orig);
    assert!(sc.problems.is_empty());
    let data = sc.ram.iter().find(|r| r.data.is_some()).unwrap().offset;
    let sec = |n: &str| sc.sections.iter().find(|s| s.name == n).unwrap();
    let (cpu, pit, uart) = (sec("cpu"), sec("pit"), sec("uart"));
    let mut b = orig.clone();
    b[data as usize + 100] ^= 0x40;
    b[cpu.body_offset as usize + 300] ^= 0x01;
    b[pit.body_offset as usize + 5] ^= 0x80;
    b.drain(uart.offset as usize..(uart.offset + uart.len) as usize);
    b
}

#[test]
fn verify_corrupted_file_first_problem_and_all() {
    let dir = scratch("verify_corrupted");
    std::fs::write(dir.join("corrupted.stream"), corrupted()).unwrap();
    let o = ferry_dump(&dir, &["verify", "corrupted.stream"]);
    assert_eq!(o.code, 1);
    assert_eq!(o.stdout.lines().count(), 1, "{}", o.stdout);
    golden("verify-corrupted.txt", &with_code(&o));

    let o = ferry_dump(&dir, &["verify", "--all", "corrupted.stream"]);
    assert_eq!(o.code, 1);
    assert!(o.stdout.lines().count() >= 5, "{}", o.stdout);
    golden("verify-all-corrupted.txt", &with_code(&o));

    // show still shows everything, flags the damage, and exits 1.
    let o = ferry_dump(&dir, &["show", "--section", "pit", "corrupted.stream"]);
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains("crc MISMATCH"), "{}", o.stdout);
}

#[test]
fn verify_real_streams_ok() {
    for f in [SOURCE, DESTINATION] {
        let o = ferry_dump(&data_dir(), &["verify", "--all", f]);
        assert_eq!(o.code, 0, "{o:?}");
        assert_eq!(o.stdout, format!("{f}: ok\n"));
    }
}

#[test]
fn verify_truncated_stream() {
    let dir = scratch("verify_truncated");
    let b = read_data(SOURCE);
    std::fs::write(dir.join("cut.stream"), &b[..b.len() - 80]).unwrap();
    let o = ferry_dump(&dir, &["verify", "--all", "cut.stream"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stdout,
        "cut.stream: Truncated stream in section 'guest-progress' at offset 59563\ncut.stream: 1 problem(s)\n"
    );
    // The strict reader stops at the same offset: the section's fixed fields.
    let mut r = devstate::StreamReader::new(&b[..b.len() - 80], None).unwrap();
    let e = loop {
        if let Err(e) = r.next_item() {
            break e;
        }
    };
    assert_eq!(e.offset(), Some(59563), "{e}");
}

/// The header's length up to its CRC, and the CRC recomputed over the (edited) header.
fn reseal_header(b: &mut [u8]) -> usize {
    let n = 11 + usize::from(b[10]);
    let n = n + 1 + usize::from(b[n]);
    let crc = crc32fast::hash(&b[..n]);
    b[n..n + 4].copy_from_slice(&crc.to_le_bytes());
    n
}

#[test]
fn a_damaged_format_version_is_corruption_at_offset_8() {
    let dir = scratch("verify_version");
    let mut b = read_data(SOURCE);
    b[8] = 5;
    std::fs::write(dir.join("damaged.stream"), &b).unwrap();
    let crc_at = reseal_header(&mut b.clone());
    let o = ferry_dump(&dir, &["verify", "--all", "damaged.stream"]);
    assert_eq!(
        o.code, 1,
        "the magic is intact: damage, not a foreign file: {o:?}"
    );
    assert_eq!(
        o.stdout,
        format!(
            "damaged.stream: Header CRC mismatch at offset {crc_at}\n\
             damaged.stream: Unsupported stream format version 5 at offset 8 (this build reads 1)\n\
             damaged.stream: 2 problem(s)\n"
        )
    );
    // An intact header of a version this build does not read: said where, exit 1 too.
    reseal_header(&mut b);
    std::fs::write(dir.join("v5.stream"), &b).unwrap();
    let o = ferry_dump(&dir, &["verify", "v5.stream"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert_eq!(
        o.stdout,
        "v5.stream: Unsupported stream format version 5 at offset 8 (this build reads 1)\n"
    );
}

#[test]
fn a_damaged_machine_name_reports_the_header_crc_first() {
    let dir = scratch("verify_machine_name");
    let mut b = read_data(SOURCE);
    let crc_at = reseal_header(&mut b.clone());
    b[12] ^= 0x20; // "ferry-1.1" -> "fErry-1.1"
    std::fs::write(dir.join("name.stream"), &b).unwrap();
    let o = ferry_dump(&dir, &["verify", "name.stream"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert_eq!(
        o.stdout,
        format!("name.stream: Header CRC mismatch at offset {crc_at}\n")
    );
    let o = ferry_dump(&dir, &["verify", "--all", "name.stream"]);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(
        lines[1].starts_with("name.stream: Machine type 'fErry-1.1' is unknown to this build"),
        "{}",
        o.stdout
    );
}

// ---------------------------------------------------------------------------------------
// diff

#[test]
fn diff_source_snapshot_and_destination_reserialisation() {
    let o = ferry_dump(&data_dir(), &["diff", SOURCE, DESTINATION]);
    assert_eq!(o.code, 0, "only volatile fields may differ: {o:?}");
    golden("diff-real.txt", &with_code(&o));
    let o = ferry_dump(&data_dir(), &["diff", "--json", SOURCE, DESTINATION]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["differences"].as_array().unwrap().len(), 0);
    assert!(!v["volatile"].as_array().unwrap().is_empty());
}

/// Re-encode `stream` by schema alone, changing fields with `edit`.
fn rewrite(stream: &[u8], edit: impl Fn(&str, &mut Vec<(String, devstate::Value)>)) -> Vec<u8> {
    let schema = tools::committed_schema("ferry-1.1").unwrap();
    let mut r = devstate::StreamReader::new(stream, None).unwrap();
    let m = machine(&r.header().machine.clone());
    let producer = r.header().producer.clone();
    let mut w = StreamWriter::new(Vec::new(), m, &producer).unwrap();
    loop {
        match r.next_item().unwrap() {
            devstate::Item::Config(s) | devstate::Item::Section(s) => {
                let tag = if s.name == "config" {
                    Tag::Config
                } else {
                    Tag::Section
                };
                let sec = schema.section(&s.name).unwrap();
                let mut rd = Reader::new(&s.body, s.body_offset, &s.name);
                let mut vals = decode_fields(&sec.fields, &mut rd).unwrap();
                rd.finish().unwrap();
                edit(&s.name, &mut vals);
                let mut body = Vec::new();
                encode_fields(&sec.fields, &vals, &mut body).unwrap();
                w.raw(&RawSection { body, ..s }.encode(tag)).unwrap();
            }
            devstate::Item::Ram(rec) => match rec.data {
                Some(d) => w.ram_data(rec.gpa, d).unwrap(),
                None => w.ram_zero(rec.gpa, rec.pages).unwrap(),
            },
            devstate::Item::End => break,
        }
    }
    w.finish().unwrap()
}

#[test]
fn every_real_section_re_encodes_byte_identically_from_the_committed_schema() {
    for f in [SOURCE, DESTINATION] {
        let orig = read_data(f);
        assert!(rewrite(&orig, |_, _| {}) == orig, "{f} did not round-trip");
    }
}

fn set(vals: &mut [(String, devstate::Value)], path: &[&str], v: devstate::Value) {
    let (k, rest) = path.split_first().unwrap();
    let slot = &mut vals.iter_mut().find(|(n, _)| n == k).unwrap().1;
    match (rest.is_empty(), slot) {
        (true, slot) => *slot = v,
        (false, devstate::Value::Record(inner)) => set(inner, rest, v),
        _ => panic!("no field {path:?}"),
    }
}

#[test]
fn diff_reports_real_differences_apart_from_volatile_ones() {
    let dir = scratch("diff_changed");
    let src = read_data(SOURCE);
    let changed = rewrite(&read_data(DESTINATION), |name, vals| match name {
        "cpu" => set(vals, &["regs", "rip"], devstate::Value::Uint(0x80bd)),
        "uart" => set(vals, &["scratch"], devstate::Value::Uint(0x5a)),
        "migration" => set(vals, &["source_running"], devstate::Value::Bool(true)),
        _ => {}
    });
    std::fs::write(dir.join("source.stream"), src).unwrap();
    std::fs::write(dir.join("changed.stream"), changed).unwrap();
    let o = ferry_dump(&dir, &["diff", "source.stream", "changed.stream"]);
    assert_eq!(o.code, 1);
    golden("diff-changed.txt", &with_code(&o));
}

// ---------------------------------------------------------------------------------------
// schema and check-compat

#[test]
fn schema_prints_this_builds_schema_and_checks_against_itself() {
    let dir = scratch("schema");
    for m in ["ferry-1.0", "ferry-1.1", "ferry-2.0", "ferry"] {
        let o = ferry_dump(&dir, &["schema", "--machine", m]);
        assert_eq!(o.code, 0);
        let s: MachineSchema = serde_json::from_str(&o.stdout).unwrap();
        let canonical = MachineType::lookup(m).unwrap();
        assert_eq!(s, tools::current_schema(canonical));
        std::fs::write(dir.join("s.json"), &o.stdout).unwrap();
        let o = ferry_dump(&dir, &["check-compat", "s.json", "s.json"]);
        assert_eq!(o.code, 0);
        assert_eq!(
            o.stdout,
            format!("{}: 0 breaking change(s), 0 note(s)\n", canonical.name())
        );
    }
    let o = ferry_dump(&dir, &["schema", "--machine", "ferry-9.9"]);
    assert_eq!(o.code, 2);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
}

#[test]
fn check_compat_reports_every_break() {
    let dir = scratch("check_compat");
    let old = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../compat/schemas/ferry-1.0.json"),
    )
    .unwrap();
    std::fs::write(dir.join("ferry-1.0.json"), &old).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&old).unwrap();
    let sections = v["sections"].as_array_mut().unwrap();
    let find =
        |s: &mut Vec<serde_json::Value>, n: &str| s.iter().position(|x| x["name"] == n).unwrap();
    // cpu: a field removed.
    let i = find(sections, "cpu");
    let f = sections[i]["fields"].as_array_mut().unwrap();
    f.retain(|x| x["name"] != "mp_state");
    // uart: a field retyped.
    let i = find(sections, "uart");
    for x in sections[i]["fields"].as_array_mut().unwrap() {
        if x["name"] == "scratch" {
            x["type"] = "u16".into();
        }
    }
    // pit: version bumped, minimum raised with it.
    let i = find(sections, "pit");
    sections[i]["version"] = 2.into();
    sections[i]["min_version"] = 2.into();
    // kvmclock: a new subsection emitted for ferry-1.0.
    let i = find(sections, "kvmclock");
    sections[i]["subsections"] = serde_json::json!([
        {"name": "tsc-scale", "version": 1, "fields": [{"name": "ratio", "type": "u64"}]}
    ]);
    // guest-progress: a field added without a bump; irqchip: a nested field retyped.
    let i = find(sections, "guest-progress");
    sections[i]["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "errors", "type": "u32"}));
    let i = find(sections, "irqchip");
    for x in sections[i]["fields"][2]["fields"].as_array_mut().unwrap() {
        if x["name"] == "irr" {
            x["type"] = "u64".into();
        }
    }
    std::fs::write(
        dir.join("broken.json"),
        serde_json::to_string_pretty(&v).unwrap(),
    )
    .unwrap();
    let o = ferry_dump(&dir, &["check-compat", "ferry-1.0.json", "broken.json"]);
    assert_eq!(o.code, 1, "{o:?}");
    golden("check-compat-broken.txt", &with_code(&o));
}

// ---------------------------------------------------------------------------------------
// Usage and unreadable input: exit 2, one line on stderr.

#[test]
fn usage_and_unreadable_input_exit_2_with_one_line() {
    let dir = scratch("usage");
    std::fs::write(dir.join("junk.stream"), b"not a stream at all").unwrap();
    std::fs::write(dir.join("empty.stream"), b"").unwrap();
    for (args, want) in [
        (
            &["show", "missing.stream"][..],
            "ferry-dump: Cannot read missing.stream: No such file or directory (os error 2)",
        ),
        (
            &["show", "junk.stream"][..],
            "ferry-dump: Cannot read junk.stream as a Ferry state stream: Not a Ferry state stream (bad magic at offset 0)",
        ),
        (
            &["diff", "empty.stream", "junk.stream"][..],
            "ferry-dump: Cannot read empty.stream as a Ferry state stream: Truncated stream in header at offset 0",
        ),
        (
            &["show", "--schema", "junk.stream", "junk.stream"][..],
            "ferry-dump: junk.stream is not a Ferry schema: expected ident at line 1 column 2",
        ),
    ] {
        let o = ferry_dump(&dir, args);
        assert_eq!(o.code, 2, "{args:?}: {o:?}");
        assert_eq!(o.stdout, "");
        assert_eq!(o.stderr, format!("{want}\n"), "{args:?}");
    }
    let o = ferry_dump(&data_dir(), &["show", "--section", "nope", SOURCE]);
    assert_eq!(o.code, 2);
    assert_eq!(o.stderr.lines().count(), 1);
    assert!(o.stderr.starts_with("ferry-dump: No section 'nope'"));
    let o = ferry_dump(&dir, &["frobnicate"]);
    assert_eq!(o.code, 2);
    // Not a stream at all is unreadable input for verify too.
    let o = ferry_dump(&dir, &["verify", "junk.stream"]);
    assert_eq!(o.code, 2);
    assert_eq!(
        o.stderr,
        "ferry-dump: Cannot read junk.stream as a Ferry state stream: Not a Ferry state stream (bad magic at offset 0)\n"
    );
}
