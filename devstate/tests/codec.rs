//! Round trips per machine type, typed errors, and the bounded-decoding guarantees.

mod common;

use common::*;
use devstate::{DecodeError, Item, RawSection, StreamReader, StreamWriter};
use machine_types::MachineType;

fn m(name: &str) -> &'static MachineType {
    MachineType::lookup(name).unwrap()
}

/// Decode a whole stream: (config, ram record count, sections).
fn decode(bytes: &[u8]) -> Result<(RawSection, usize, Vec<RawSection>), DecodeError> {
    let cat = catalog();
    let mut r = StreamReader::new(bytes, Some(&cat))?;
    let mut config = None;
    let mut ram = 0;
    let mut sections = Vec::new();
    loop {
        match r.next_item()? {
            Item::Config(c) => config = Some(c),
            Item::Ram(_) => ram += 1,
            Item::Section(s) => sections.push(s),
            Item::End => break,
        }
    }
    Ok((config.unwrap(), ram, sections))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn round_trip_every_machine_type() {
    for mt in machine_types::all() {
        let bytes = stream(mt, 4);
        let (config, ram, sections) = decode(&bytes).unwrap();
        assert_eq!(
            config.load::<Config>().unwrap(),
            Config {
                vcpus: 1,
                memory_mib: 64
            }
        );
        assert_eq!(ram, 2);
        let conns: Vec<Conn> = sections
            .iter()
            .filter(|s| s.name == "conn")
            .map(|s| s.load().unwrap())
            .collect();
        assert_eq!(conns.len(), 4, "{mt}");
        for (i, c) in conns.iter().enumerate() {
            let mut want = conn(i as u32);
            if !mt.compat().drc_unplug_timer || !want.unplug_requested {
                want.remaining_ms = 0;
            }
            assert_eq!(*c, want, "{mt} connector {i}");
        }
    }
}

#[test]
fn old_machine_bytes_lack_new_field_and_subsection() {
    let mut c = conn(1);
    c.indicator = 0xA5;
    let enc = |name| {
        devstate::encode_section(&mut c.clone(), 1, m(name), devstate::Tag::Section).unwrap()
    };
    let v10 = enc("ferry-1.0");
    let v11 = enc("ferry-1.1");
    let v20 = enc("ferry-2.0");
    // Version field right after tag, name and instance.
    let version =
        |b: &[u8]| u32::from_le_bytes(b[1 + 1 + 4 + 4..1 + 1 + 4 + 8].try_into().unwrap());
    assert_eq!((version(&v10), version(&v11), version(&v20)), (1, 1, 2));
    assert!(
        !contains(&v10, b"unplug-timer"),
        "ferry-1.0 must not emit the subsection"
    );
    assert!(contains(&v11, b"unplug-timer") && contains(&v20, b"unplug-timer"));
    assert!(
        !contains(&v10, &[0xA5]) && !contains(&v11, &[0xA5]),
        "v1 must not carry the v2 field"
    );
    assert!(contains(&v20, &[0xA5]));
    // v1 bytes load on the newest code: the missing field takes the pre_load/post_load default.
    let raw = decode_one(&v10);
    let back: Conn = raw.load().unwrap();
    assert_eq!(back.indicator, 1);
    assert_eq!(back.remaining_ms, 0);
}

fn decode_one(rec: &[u8]) -> RawSection {
    let mut w = StreamWriter::new(Vec::new(), m("ferry-1.0"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    w.raw(rec).unwrap();
    w.section(&mut Cpu::default(), 0).unwrap();
    let bytes = w.finish().unwrap();
    decode(&bytes).unwrap().2.remove(0)
}

#[test]
fn writer_reports_written_sections() {
    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    assert!(w.section(&mut conn(0), 0).unwrap());
    assert!(w.bytes_written() > 30);
}

#[test]
fn missing_required_section_is_an_error_at_end() {
    let mut w = StreamWriter::new(Vec::new(), m("ferry-2.0"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    w.section(&mut conn(0), 0).unwrap();
    let bytes = w.finish().unwrap();
    match decode(&bytes) {
        Err(DecodeError::MissingSection { name, instance }) => {
            assert_eq!((name.as_str(), instance), ("cpu", 0))
        }
        other => panic!("expected MissingSection, got {other:?}"),
    }
}

#[test]
fn expected_instance_missing_is_reported() {
    let bytes = stream(m("ferry"), 2);
    let cat = catalog();
    let mut r = StreamReader::new(bytes.as_slice(), Some(&cat)).unwrap();
    r.expect("conn", 7);
    let err = loop {
        match r.next_item() {
            Ok(Item::End) => panic!("stream accepted without conn 7"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(
        err.to_string(),
        "Missing section 'conn' instance 7: the stream ended without it"
    );
}

#[test]
fn crc_error_names_section_and_offset() {
    let mut bytes = stream(m("ferry-2.0"), 3);
    // Corrupt a byte inside the second connector's body.
    let needle = b"pci1";
    let pos = bytes.windows(4).position(|w| w == needle).unwrap();
    bytes[pos] ^= 0x20;
    let err = decode(&bytes).unwrap_err();
    match &err {
        DecodeError::CrcMismatch {
            section, offset, ..
        } => {
            assert_eq!(section, "conn");
            assert!(
                *offset < pos as u64 && pos as u64 - offset < 64,
                "offset {offset} vs corrupted byte {pos}"
            );
        }
        other => panic!("expected CrcMismatch, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("CRC mismatch in section 'conn' at offset")
    );
}

/// Build a section record by hand with a valid CRC.
fn hand_section(name: &str, version: u32, body: &[u8], subs: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let raw = RawSection {
        name: name.into(),
        instance: 0,
        version,
        offset: 0,
        body_offset: 0,
        body: body.to_vec(),
        subsections: subs
            .iter()
            .map(|(n, v, b)| devstate::RawSubsection {
                name: (*n).into(),
                version: *v,
                body_offset: 0,
                body: b.to_vec(),
            })
            .collect(),
        crc: 0,
    };
    raw.encode(devstate::Tag::Section)
}

fn with_record(rec: &[u8]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    w.raw(rec).unwrap();
    w.finish().unwrap()
}

#[test]
fn unknown_section_and_subsection_refused_by_name() {
    let err = decode(&with_record(&hand_section("virtio-gpu", 1, &[], &[]))).unwrap_err();
    assert!(
        matches!(&err, DecodeError::UnknownSection { name, .. } if name == "virtio-gpu"),
        "{err}"
    );

    let mut body = Vec::new();
    devstate::Record::encode(&conn(0), 2, &mut body);
    let err = decode(&with_record(&hand_section(
        "conn",
        2,
        &body,
        &[("x-new-state", 1, &[1])],
    )))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Unknown subsection 'x-new-state' in section 'conn' at offset {}",
            err.offset().unwrap()
        )
    );
}

#[test]
fn versions_outside_range_refused() {
    let err = decode(&with_record(&hand_section("conn", 3, &[], &[]))).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::VersionTooNew {
                version: 3,
                max: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = decode(&with_record(&hand_section("conn", 0, &[], &[]))).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::VersionTooOld {
                version: 0,
                min: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = decode(&with_record(&hand_section(
        "conn",
        1,
        &[],
        &[("unplug-timer", 9, &[])],
    )))
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("'conn/unplug-timer' version 9 is newer"),
        "{err}"
    );
}

#[test]
fn length_over_schema_bound_refused_before_allocating() {
    // A string length far above the field's max of 32.
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(4);
    body.extend_from_slice(&1_000_000u32.to_le_bytes());
    let raw = decode_one(&hand_section("conn", 1, &body, &[]));
    let err = raw.load::<Conn>().unwrap_err();
    assert!(
        matches!(&err, DecodeError::LengthOverBound { what, len: 1_000_000, bound: 32, .. } if what == "device"),
        "{err}"
    );

    // A section payload length above the section's computed bound.
    let mut rec = hand_section("conn", 1, &[], &[]);
    let len_at = 1 + 1 + 4 + 4 + 4;
    rec[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = decode(&with_record(&rec)).unwrap_err();
    assert!(matches!(err, DecodeError::LengthOverBound { .. }), "{err}");
}

#[test]
fn post_load_rejects_bad_state() {
    let mut c = conn(0);
    c.state = 0;
    let rec = devstate::encode_section(&mut c, 0, m("ferry"), devstate::Tag::Section).unwrap();
    let err = decode_one(&rec).load::<Conn>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "Section 'conn' at offset 67 rejected by post_load: state 0 is not a valid connector state"
    );
}

#[test]
fn truncation_everywhere_is_an_error() {
    let bytes = stream(m("ferry-1.1"), 3);
    for cut in 0..bytes.len() {
        assert!(
            decode(&bytes[..cut]).is_err(),
            "truncated at {cut} accepted"
        );
    }
    decode(&bytes).unwrap();
}

#[test]
fn records_out_of_order_refused() {
    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    w.section(&mut conn(0), 0).unwrap();
    let err = decode(&w.finish().unwrap()).unwrap_err();
    assert!(
        err.to_string()
            .contains("configuration record must come first"),
        "{err}"
    );

    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    w.section(&mut conn(0), 0).unwrap();
    w.ram_zero(0, 1).unwrap();
    let err = decode(&w.finish().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("RAM record after device state"),
        "{err}"
    );

    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    w.section(&mut Cpu::default(), 0).unwrap();
    w.section(&mut Cpu::default(), 0).unwrap();
    let err = decode(&w.finish().unwrap()).unwrap_err();
    assert!(matches!(err, DecodeError::DuplicateSection { .. }), "{err}");
}

#[test]
fn header_errors() {
    assert!(matches!(
        decode(b"QEVM\0\0\0\x03xxxxxxxx"),
        Err(DecodeError::BadMagic)
    ));
    let mut bytes = stream(m("ferry"), 0);
    bytes[8] = 9;
    assert!(matches!(
        decode(&bytes),
        Err(DecodeError::UnsupportedFormat {
            found: 9,
            supported: 1,
            offset: 8
        })
    ));
    let mut bytes = stream(m("ferry"), 0);
    bytes[12] ^= 1; // inside the machine name
    assert!(matches!(decode(&bytes), Err(DecodeError::HeaderCrc { .. })));
}

#[test]
fn ram_records_validated() {
    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    assert!(
        w.ram_zero(0x1001, 1).is_err(),
        "the writer refuses what the reader would"
    );
    // Hand-craft a misaligned record with a valid CRC.
    let mut rec = vec![2u8];
    rec.extend_from_slice(&0x1001u64.to_le_bytes());
    rec.extend_from_slice(&1u32.to_le_bytes());
    rec.push(1);
    let crc = crc32fast::hash(&rec);
    rec.extend_from_slice(&crc.to_le_bytes());
    w.raw(&rec).unwrap();
    w.section(&mut Cpu::default(), 0).unwrap();
    let err = decode(&w.finish().unwrap()).unwrap_err();
    assert!(err.to_string().contains("not page aligned"), "{err}");
}

#[test]
fn an_abandoned_stream_says_why() {
    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    w.ram_zero(0, 4).unwrap();
    w.abort("Migration did not converge after 3 iterations")
        .unwrap();
    let mut bytes = w.finish().unwrap();
    let err = decode(&bytes).unwrap_err();
    assert!(
        matches!(&err, DecodeError::SourceAborted { reason, .. } if reason == "Migration did not converge after 3 iterations"),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("The source abandoned the migration at offset ")
    );
    // A damaged abort record is a CRC error, not a reason.
    let at = bytes.windows(9).position(|w| w == b"Migration").unwrap();
    bytes[at] ^= 1;
    assert!(matches!(
        decode(&bytes),
        Err(DecodeError::CrcMismatch { .. })
    ));
}

/// A SPARSE record round-trips to the same pages as DATA, costs a fraction of the bytes, and a
/// body whose masks disagree with its length is refused with the record's offset.
#[test]
fn sparse_records_expand_to_their_pages() {
    let mut pages = vec![0u8; 3 * 4096];
    pages[0] = 1; // one byte in page 0
    pages[4096 + 100] = 2; // page 1
    pages[2 * 4096..2 * 4096 + 64].fill(3); // first block of page 2
    let masks: Vec<u64> = pages
        .chunks_exact(4096)
        .map(devstate::sparse::block_mask)
        .collect();
    let mut w = StreamWriter::new(Vec::new(), m("ferry"), "t").unwrap();
    w.config(&mut Config::default()).unwrap();
    let before = w.bytes_written();
    w.ram_sparse(0x20000, &pages, &masks).unwrap();
    let sparse_len = w.bytes_written() - before;
    assert_eq!(sparse_len, 14 + 4 + 3 * (8 + 64) + 4);
    w.section(&mut Cpu::default(), 0).unwrap();
    let bytes = w.finish().unwrap();
    let cat = catalog();
    let mut r = StreamReader::new(bytes.as_slice(), Some(&cat)).unwrap();
    assert!(matches!(r.next_item().unwrap(), Item::Config(_)));
    match r.next_item().unwrap() {
        Item::Ram(rec) => {
            assert_eq!((rec.gpa, rec.pages), (0x20000, 3));
            assert_eq!(rec.data, Some(pages.as_slice()));
        }
        other => panic!("expected a RAM record, got {other:?}"),
    }
    decode(&bytes).unwrap();

    // The last mask claiming one block more than the body holds, with a valid CRC.
    let at = before as usize;
    let mut bad = bytes.clone();
    bad[at + 18 + 2 * 72] |= 0x02; // page 2's mask: a second block
    let crc_at = at + sparse_len as usize - 4;
    let crc = crc32fast::hash(&bad[at..crc_at]);
    bad[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    let err = decode(&bad).unwrap_err();
    assert!(
        matches!(err, DecodeError::BadRam { offset, .. } if offset == before),
        "{err}"
    );
    assert!(err.to_string().contains("sparse body"), "{err}");
    // A length over the bound is refused before anything is read.
    let mut big = bytes.clone();
    big[at + 14..at + 18].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = decode(&big).unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
}
