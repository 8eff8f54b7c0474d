//! The lenient scanner: every problem with its offset, header problems in the right order,
//! and no corruption of a valid stream makes it panic; the section diff over real sections.

mod common;

use common::*;
use devstate::diff::{self, Decoded};
use devstate::scan::scan;
use devstate::{Item, StreamReader};
use machine_types::MachineType;
use proptest::prelude::*;

/// A valid stream with every record kind: config, ZERO, DATA, SPARSE, sections, end.
fn valid() -> Vec<u8> {
    let m = MachineType::lookup("ferry-1.1").unwrap();
    let mut w = devstate::StreamWriter::new(Vec::new(), m, "scan-test").unwrap();
    w.config(&mut Config {
        vcpus: 1,
        memory_mib: 64,
    })
    .unwrap();
    w.ram_zero(0, 4).unwrap();
    let mut page = vec![0u8; 4096];
    page[70] = 9;
    w.ram_sparse(0x4000, &page, &[devstate::sparse::block_mask(&page)])
        .unwrap();
    w.ram_data(0x5000, &page).unwrap();
    for i in 0..2 {
        w.section(&mut conn(i), i).unwrap();
    }
    w.finish().unwrap()
}

/// The header's CRC recomputed after an edit, so that only the edit is wrong.
fn reseal_header(b: &mut [u8]) {
    let len = 10 + 1 + usize::from(b[10]);
    let len = len + 1 + usize::from(b[len]);
    let crc = crc32fast::hash(&b[..len]);
    b[len..len + 4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_valid_stream_has_no_problems() {
    let b = valid();
    let s = scan(&b);
    assert_eq!(s.problems, []);
    assert_eq!((s.ram.len(), s.sections.len()), (3, 3));
    assert_eq!(s.ram[1].kind(), "sparse");
    assert!(s.end.is_some());
}

#[test]
fn a_damaged_format_version_is_reported_at_its_offset_after_the_header_crc() {
    let mut b = valid();
    b[8] = 7;
    let s = scan(&b);
    let msgs: Vec<_> = s.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(
        msgs[0].starts_with("Header CRC mismatch at offset "),
        "{msgs:?}"
    );
    assert_eq!(
        msgs[1],
        "Unsupported stream format version 7 at offset 8 (this build reads 1)"
    );
    assert_eq!(s.problems[1].offset, 8);
    // The rest is framed as this version's: nothing else is wrong.
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(s.sections.len(), 3);
    assert_eq!(s.lost_at, None);

    // An intact header of another version: its records cannot be framed.
    reseal_header(&mut b);
    let s = scan(&b);
    assert_eq!(s.problems.len(), 1, "{:?}", s.problems);
    assert_eq!(s.problems[0].offset, 8);
    assert_eq!(s.lost_at, Some(8));
    assert!(s.header.is_none());

    // The strict reader says where, too.
    let e = StreamReader::new(b.as_slice(), None).unwrap_err();
    assert_eq!(e.offset(), Some(8));
    assert_eq!(
        e.to_string(),
        "Unsupported stream format version 7 at offset 8 (this build reads 1)"
    );
}

#[test]
fn a_damaged_machine_name_is_a_header_crc_problem_first() {
    let mut b = valid();
    b[12] ^= 0x20;
    let s = scan(&b);
    assert_eq!(s.problems.len(), 1, "{:?}", s.problems);
    assert!(
        s.problems[0]
            .message
            .starts_with("Header CRC mismatch at offset ")
    );
    assert_ne!(s.header.unwrap().machine, "ferry-1.1");
}

#[test]
fn the_diff_reports_a_subsection_s_volatile_field_apart() {
    let m = MachineType::lookup("ferry-1.1").unwrap();
    let sections = |remaining_ms: u64, state: u8| {
        let mut w = devstate::StreamWriter::new(Vec::new(), m, "diff-test").unwrap();
        w.config(&mut Config {
            vcpus: 1,
            memory_mib: 64,
        })
        .unwrap();
        let mut c = conn(1);
        c.remaining_ms = remaining_ms;
        c.state = state;
        w.section(&mut c, 1).unwrap();
        let b = w.finish().unwrap();
        let mut r = StreamReader::new(b.as_slice(), None).unwrap();
        let mut out = Vec::new();
        loop {
            match r.next_item().unwrap() {
                Item::Section(s) => out.push(s),
                Item::End => break,
                _ => {}
            }
        }
        out
    };
    let schema = catalog().schema(m);
    let decode = |s: &[devstate::RawSection]| -> Vec<Decoded> {
        s.iter()
            .map(|r| Decoded::from_raw(&schema, r).unwrap())
            .collect()
    };
    let (a, b) = (decode(&sections(900, 8)), decode(&sections(400, 8)));
    assert_eq!(a[0].subsections.len(), 1, "ferry-1.1 sends the timer");
    let d = diff::sections(&a, &b, &diff::no_normalise);
    assert!(d.is_equal(), "{d:?}");
    assert_eq!(
        d.volatile,
        ["conn instance 1 unplug-timer/remaining_ms: 900 vs 400"]
    );
    let d = diff::sections(&a, &decode(&sections(900, 5)), &diff::no_normalise);
    assert_eq!(d.differences, ["conn instance 1 state: 8 vs 5"]);
    assert_eq!(d.volatile, Vec::<String>::new());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Overwritten bytes, a cut and an inserted run anywhere: the scan never panics and
    /// every problem it reports points inside the input (or at its very end, for a cut).
    #[test]
    fn corruption_never_panics_and_problems_point_into_the_input(
        writes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        insert in proptest::option::of((any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 1..64))),
    ) {
        let mut b = valid();
        for (at, v) in writes {
            let i = at.index(b.len());
            b[i] = v;
        }
        if let Some((at, bytes)) = insert {
            let i = at.index(b.len());
            b.splice(i..i, bytes);
        }
        if let Some(at) = cut {
            b.truncate(at.index(b.len()));
        }
        let s = scan(&b);
        for p in &s.problems {
            prop_assert!(p.offset <= b.len() as u64, "{:?} beyond {} bytes", p, b.len());
        }
        if let Some(at) = s.lost_at {
            prop_assert!(at <= b.len() as u64);
        }
    }

    /// Any single flipped bit is reported.
    #[test]
    fn any_single_bit_flip_is_reported(bit in 0usize..(valid().len() * 8)) {
        let mut b = valid();
        b[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(!scan(&b).problems.is_empty(), "flip of bit {} unreported", bit);
    }
}
