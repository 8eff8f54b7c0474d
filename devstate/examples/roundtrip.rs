//! Write a connector-state stream for every machine type to a file, read it back through the
//! validating decoder, and show what each machine type put on the wire.

#[path = "../tests/common/mod.rs"]
mod common;

use devstate::{Item, StreamReader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join("ferry-roundtrip");
    std::fs::create_dir_all(&dir)?;
    for m in machine_types::all() {
        let path = dir.join(format!("{}.state", m.name()));
        std::fs::write(&path, common::stream(m, 4))?;
        let bytes = std::fs::read(&path)?;
        let cat = common::catalog();
        let mut r = StreamReader::new(bytes.as_slice(), Some(&cat))?;
        println!("{} -> {} ({} bytes)", m.name(), path.display(), bytes.len());
        loop {
            match r.next_item()? {
                Item::Config(s) | Item::Section(s) => {
                    let subs: Vec<_> = s.subsections.iter().map(|x| x.name.as_str()).collect();
                    println!(
                        "  {:<7} instance {:<2} v{} body {:>3} B subsections {:?}",
                        s.name,
                        s.instance,
                        s.version,
                        s.body.len(),
                        subs
                    );
                }
                Item::Ram(rec) => println!(
                    "  ram     gpa {:#x} pages {} {}",
                    rec.gpa,
                    rec.pages,
                    if rec.data.is_some() { "data" } else { "zero" }
                ),
                Item::End => break,
            }
        }
    }
    Ok(())
}
