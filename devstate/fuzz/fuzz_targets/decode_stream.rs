//! Feed arbitrary bytes to the stream decoder, with and without a valid header in front, and
//! decode every section it accepts by schema alone. Any panic is a bug.
#![no_main]

use devstate::{Item, Reader, StreamReader, decode_fields};
use libfuzzer_sys::fuzz_target;

fn run(bytes: &[u8], schema: &devstate::MachineSchema, cat: &devstate::Catalog) {
    let Ok(mut r) = StreamReader::new(bytes, Some(cat)) else { return };
    while let Ok(item) = r.next_item() {
        match item {
            Item::Config(s) | Item::Section(s) => {
                if let Some(sec) = schema.section(&s.name) {
                    let mut rd = Reader::new(&s.body, s.body_offset, &s.name);
                    let _ = decode_fields(&sec.fields, &mut rd);
                }
            }
            Item::Ram(_) => {}
            Item::End => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // A small self-contained schema: a bounded string and list, like real sections.
    let schema: devstate::MachineSchema = serde_json::from_str(SCHEMA).expect("valid schema");
    let cat = schema.catalog();
    run(data, &schema, &cat);
    let mut framed = devstate::encode_header("ferry-2.0", "fuzz");
    framed.extend_from_slice(data);
    run(&framed, &schema, &cat);
});

const SCHEMA: &str = r#"{"machine":"ferry-2.0","format_version":1,"sections":[
 {"name":"config","version":1,"min_version":1,"required":false,"fields":[{"name":"vcpus","type":"u32"}],"subsections":[]},
 {"name":"conn","version":2,"min_version":1,"required":false,
  "fields":[{"name":"index","type":"u32"},{"name":"device","type":"str","max":32},
            {"name":"regs","type":"list","max":16,"of":{"type":"u64"}}],
  "subsections":[{"name":"unplug-timer","version":1,"fields":[{"name":"remaining_ms","type":"u64"}]}]}]}"#;
