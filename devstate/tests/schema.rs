//! Schema export per machine type, and decoding/re-encoding a stream from the schema alone.

mod common;

use common::*;
use devstate::{
    Item, MachineSchema, Reader, StreamReader, StreamWriter, Tag, decode_fields, encode_fields,
};
use machine_types::MachineType;

#[test]
fn schema_follows_the_machine_type() {
    let cat = catalog();
    let s10 = cat.schema(MachineType::lookup("ferry-1.0").unwrap());
    let s11 = cat.schema(MachineType::lookup("ferry-1.1").unwrap());
    let s20 = cat.schema(MachineType::lookup("ferry-2.0").unwrap());
    let conn = |s: &MachineSchema| s.section("conn").unwrap().clone();
    assert_eq!(conn(&s10).version, 1);
    assert!(
        conn(&s10).subsections.is_empty(),
        "ferry-1.0 emits no unplug-timer"
    );
    assert_eq!(conn(&s11).subsections[0].name, "unplug-timer");
    assert!(conn(&s11).subsections[0].fields[0].volatile);
    assert!(!conn(&s11).fields.iter().any(|f| f.name == "indicator"));
    assert!(
        conn(&s20)
            .fields
            .iter()
            .any(|f| f.name == "indicator" && f.since == 2)
    );
    assert!(
        !conn(&s20).fields.iter().any(|f| f.name == "remaining_ms"),
        "skip fields stay out of the body"
    );
    assert_eq!(s20.machine, "ferry-2.0");
    // Sorted, stable JSON that round-trips.
    let names: Vec<_> = s20.sections.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["config", "conn", "cpu"]);
    let json = s20.to_json();
    assert_eq!(serde_json::from_str::<MachineSchema>(&json).unwrap(), s20);
    assert!(json.contains(r#""type": "str""#) && json.contains(r#""max": 32"#));
}

#[test]
fn schema_alone_decodes_and_reencodes_byte_identically() {
    for mt in machine_types::all() {
        let bytes = stream(mt, 5);
        let schema = catalog().schema(mt);
        let json = schema.to_json();
        let schema: MachineSchema = serde_json::from_str(&json).unwrap();
        let cat = schema.catalog();
        let mut r = StreamReader::new(bytes.as_slice(), Some(&cat)).unwrap();
        let h = r.header().clone();
        let mut out = StreamWriter::new(
            Vec::new(),
            MachineType::lookup(&h.machine).unwrap(),
            &h.producer,
        )
        .unwrap();
        loop {
            match r.next_item().unwrap() {
                Item::Config(raw) | Item::Section(raw) => {
                    let tag = if raw.name == "config" {
                        Tag::Config
                    } else {
                        Tag::Section
                    };
                    let sec = schema.section(&raw.name).unwrap();
                    let mut rd = Reader::new(&raw.body, raw.body_offset, &raw.name);
                    let values = decode_fields(&sec.fields, &mut rd).unwrap();
                    rd.finish().unwrap();
                    let mut body = Vec::new();
                    encode_fields(&sec.fields, &values, &mut body).unwrap();
                    assert_eq!(body, raw.body, "{mt} {}", raw.name);
                    if raw.name == "conn" {
                        let j = serde_json::to_value(devstate::Value::Record(values)).unwrap();
                        assert!(j["device"].as_str().unwrap().starts_with("pci"));
                    }
                    let mut copy = raw.clone();
                    copy.body = body;
                    out.raw(&copy.encode(tag)).unwrap();
                }
                Item::Ram(rec) => match rec.data {
                    Some(d) => out.ram_data(rec.gpa, d).unwrap(),
                    None => out.ram_zero(rec.gpa, rec.pages).unwrap(),
                },
                Item::End => break,
            }
        }
        assert_eq!(out.finish().unwrap(), bytes, "{mt}");
    }
}

#[test]
#[should_panic(expected = "without a max bound")]
fn unbounded_fields_are_refused_at_registration() {
    devstate::record! {
        pub struct Bad { pub name: String }
    }
    impl devstate::Section for Bad {
        const NAME: &'static str = "bad";
        const VERSION: u32 = 1;
        const MIN_VERSION: u32 = 1;
    }
    devstate::Catalog::new().register::<Bad>();
}
