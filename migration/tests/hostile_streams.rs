//! The incoming side against hostile streams, without KVM: hand-made records that break each
//! rule of the format (pages outside guest RAM or straddling a region's end, counts above the
//! bounds, overflow, misalignment, bad kinds, over-long sections, broken CRCs, missing or
//! duplicate records), then 300 seeded randomised streams from the same generator the
//! cargo-fuzz target (`migration/fuzz`) uses. The destination must refuse each bad stream
//! with an error, write nothing outside its layout, never commit, always abort, and never
//! panic or hang; honest streams must load.

mod strict_vm;

use migration::MigrationError;
use strict_vm::*;

const R1: u64 = REGIONS[1].0;
const R0_END: u64 = (REGIONS[0].1 * PAGE) as u64;
const R1_END: u64 = R1 + (REGIONS[1].1 * PAGE) as u64;

fn with(records: &[Vec<u8>]) -> Vec<u8> {
    let mut v = valid_prefix();
    for r in records {
        v.extend_from_slice(r);
    }
    v
}

fn refused(label: &str, bytes: &[u8], want: &str) {
    for (how, (vm, res)) in [("file", receive_file(bytes)), ("tcp", receive_tcp(bytes))] {
        let e = res.expect_err(label);
        let text = migration::chain(&e);
        assert!(
            text.contains(want),
            "{label} ({how}): expected '{want}' in: {text}"
        );
        assert!(
            vm.mem.iter().all(|m| m.iter().all(|&b| b == 0)),
            "{label} ({how}): memory was written"
        );
        assert_eq!(vm.writes, 0, "{label} ({how})");
    }
}

#[test]
fn honest_stream_loads_over_file_and_tcp() {
    for (vm, res) in [
        receive_file(&honest_stream()),
        receive_tcp(&honest_stream()),
    ] {
        res.unwrap();
        assert_eq!(vm.committed, Some(true));
        assert_eq!(vm.loaded, Some(1));
        assert!(vm.mem[0][..2 * PAGE].iter().all(|&b| b == 0x11));
        assert!(vm.mem[1][PAGE..2 * PAGE].iter().all(|&b| b == 0x22));
    }
}

#[test]
fn sparse_records_load_only_from_files_and_where_the_handshake_negotiated_them() {
    // One page whose first 64-byte block is 0x33: mask 1, then that block.
    let mut body = 1u64.to_le_bytes().to_vec();
    body.extend_from_slice(&[0x33; 64]);
    let mut data = (body.len() as u32).to_le_bytes().to_vec();
    data.extend_from_slice(&body);
    let at = valid_prefix().len();
    let bytes = with(&[ram(0, 1, 3, &data), counter(0, 7), switchover(true), end(4)]);
    let sparse = migration::protocol::FEATURE_SPARSE_PAGES;
    for (how, (vm, res)) in [
        ("file", receive_file(&bytes)),
        ("tcp, negotiated", receive_tcp_offering(&bytes, sparse)),
    ] {
        res.unwrap_or_else(|e| panic!("{how}: {}", migration::chain(&e)));
        assert!(vm.mem[0][..64].iter().all(|&b| b == 0x33), "{how}");
        assert!(vm.mem[0][64..PAGE].iter().all(|&b| b == 0), "{how}");
    }
    let (vm, res) = receive_tcp(&bytes);
    let text = migration::chain(&res.expect_err("SPARSE without negotiation"));
    assert!(
        text.contains(&format!(
            "Invalid RAM record at offset {at}: SPARSE record, but the handshake did not negotiate sparse pages"
        )),
        "{text}"
    );
    assert_eq!(vm.writes, 0);
    assert!(vm.mem.iter().all(|m| m.iter().all(|&b| b == 0)));
}

#[test]
fn pages_outside_the_layout_are_refused_and_nothing_is_written() {
    let p = vec![0xA5u8; PAGE];
    let p2 = vec![0xA5u8; 2 * PAGE];
    let cases: [(&str, Vec<u8>, String); 8] = [
        (
            "just beyond RAM",
            ram(R0_END, 1, 2, &p),
            format!("{R0_END:#x}"),
        ),
        ("PCI hole", ram(0xC000_0000, 1, 2, &p), "0xc0000000".into()),
        (
            "straddling the end of RAM",
            ram(R0_END - PAGE as u64, 2, 2, &p2),
            format!("{:#x}", R0_END - PAGE as u64),
        ),
        (
            "straddling the start of the block",
            ram(R1 - PAGE as u64, 2, 2, &p2),
            format!("{:#x}", R1 - PAGE as u64),
        ),
        (
            "straddling the end of the block",
            ram(R1_END - PAGE as u64, 2, 2, &p2),
            format!("{:#x}", R1_END - PAGE as u64),
        ),
        ("ZERO run past RAM", ram(0, 65, 1, &[]), "0x41000".into()),
        (
            "ZERO run of 4 GiB",
            ram(0, devstate::stream::MAX_ZERO_PAGES, 1, &[]),
            "not guest RAM".into(),
        ),
        (
            "address overflow",
            ram(u64::MAX - PAGE as u64 + 1, 1, 2, &p),
            "overflows".into(),
        ),
    ];
    for (label, rec, want) in cases {
        refused(label, &with(&[rec, switchover(true), end(3)]), &want);
    }
}

#[test]
fn counts_kinds_and_lengths_over_their_bounds_are_refused() {
    let mut long_section = vec![devstate::Tag::Section as u8, 7];
    long_section.extend_from_slice(b"counter");
    long_section.extend_from_slice(&0u32.to_le_bytes());
    long_section.extend_from_slice(&1u32.to_le_bytes());
    long_section.extend_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "DATA count above the bound (no data follows, nothing allocated)",
            ram(0, devstate::stream::MAX_DATA_PAGES + 1, 2, &[]),
            "page count 257 out of range",
        ),
        (
            "ZERO count above the bound",
            ram(0, devstate::stream::MAX_ZERO_PAGES + 1, 1, &[]),
            "page count 1048577 out of range",
        ),
        (
            "ZERO count 0",
            ram(0, 0, 1, &[]),
            "page count 0 out of range",
        ),
        ("unknown kind", ram(0, 1, 7, &[]), "unknown kind 7"),
        ("unaligned", ram(0x123, 1, 1, &[]), "not page aligned"),
        ("section over its bound", long_section, "section payload"),
        (
            "broken RAM CRC",
            {
                let mut r = ram(0, 1, 2, &[1; PAGE]);
                let n = r.len();
                r[n - 1] ^= 0xff;
                r
            },
            "CRC",
        ),
        (
            "unknown section",
            {
                let raw = devstate::RawSection {
                    name: "bogus".into(),
                    instance: 0,
                    version: 1,
                    offset: 0,
                    body_offset: 0,
                    body: vec![],
                    subsections: vec![],
                    crc: 0,
                };
                raw.encode(devstate::Tag::Section)
            },
            "Unknown section 'bogus'",
        ),
        (
            "second config record",
            valid_prefix()[valid_prefix().len() - {
                // the config record is everything after the header
                let h = devstate::encode_header(MACHINE, "strict-vm").len();
                valid_prefix().len() - h
            }..]
                .to_vec(),
            "second configuration record",
        ),
        (
            "RAM after device state",
            [counter(0, 1), ram(0, 1, 1, &[])].concat(),
            "RAM record after device state",
        ),
        (
            "duplicate section",
            [counter(0, 1), counter(0, 2)].concat(),
            "Duplicate section 'counter'",
        ),
        (
            "post_load refusal",
            [counter(0, 0xdead), switchover(true), end(3)].concat(),
            "0xdead is refused",
        ),
        (
            "missing switchover",
            [counter(0, 1), end(2)].concat(),
            "Missing section 'migration'",
        ),
        (
            "end count",
            [switchover(true), end(9)].concat(),
            "counts 9 records but 2",
        ),
        (
            "truncated",
            ram(0, 4, 2, &[1; 4 * PAGE])[..100].to_vec(),
            "Truncated",
        ),
    ];
    for (label, rec, want) in cases {
        refused(label, &with(&[rec]), want);
    }
}

/// xorshift64*: deterministic, so a failing case is reproducible from its index.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// 300 randomised hostile streams (the fuzz target's generator, seeded): every one ends in
/// a clean result, never a panic or a hang, and the strict VM's invariants hold. Set
/// `FERRY_HOSTILE_CASES` for a longer run.
#[test]
fn randomised_hostile_streams_never_panic_or_hang() {
    let cases: u64 = std::env::var("FERRY_HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let start = std::time::Instant::now();
    let (mut ok, mut failed) = (0, 0);
    let mut kinds = std::collections::BTreeMap::<String, u32>::new();
    for case in 0..cases {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (case + 1));
        let len = (rng.next() % 200) as usize;
        let input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let bytes = hostile_stream(&input);
        let (_, res) = if case % 10 == 0 {
            receive_tcp(&bytes)
        } else {
            receive_file(&bytes)
        };
        match res {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                let k = match &e {
                    MigrationError::Stream(d) => format!("stream: {:?}", std::mem::discriminant(d)),
                    other => format!("{:?}", std::mem::discriminant(other)),
                };
                *kinds.entry(k).or_default() += 1;
            }
        }
    }
    eprintln!(
        "{cases} cases in {:?}: {ok} loaded, {failed} refused ({} kinds of error)",
        start.elapsed(),
        kinds.len()
    );
    assert!(
        failed > 0 && kinds.len() >= 5,
        "the generator must reach many errors: {kinds:?}"
    );
}
