//! SPARSE RAM records: framed, checked and expanded by `ferry-dump` like DATA ones.

mod common;

use common::{Out, ferry_dump, scratch};
use devstate::scan::{RamData, scan};
use devstate::sparse::block_mask;
use devstate::{PAGE_SIZE, StreamWriter};
use machine_types::MachineType;

const GPA: u64 = 0x2000;
const PAGES: usize = 3;

fn no_panic(o: &Out) {
    assert!(o.stderr.is_empty(), "ferry-dump wrote to stderr: {o:?}");
    assert!(o.code == 0 || o.code == 1, "{o:?}");
}

/// Three pages: a few non-zero blocks, all zero, and every block non-zero.
fn pages() -> Vec<u8> {
    let mut p = vec![0u8; PAGES * PAGE_SIZE];
    p[7] = 0x11;
    p[64 * 9 + 63] = 0x22;
    p[PAGE_SIZE - 1] = 0x33;
    for (i, b) in p[2 * PAGE_SIZE..].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    p
}

/// A stream whose only RAM record carries `pages()` at `GPA`, as SPARSE or as DATA.
fn stream(sparse: bool) -> Vec<u8> {
    let m = MachineType::lookup("ferry-1.1").unwrap();
    let mut w = StreamWriter::new(Vec::new(), m, "sparse test").unwrap();
    w.config(&mut migration::ConfigRecord {
        machine: m.name().to_owned(),
        cpu_model: "ferry-cpu-v1".to_owned(),
        vcpus: 1,
        memory: vec![migration::RegionDesc {
            gpa: 0,
            size: 1 << 20,
        }],
        devices: vec![],
    })
    .unwrap();
    let data = pages();
    if sparse {
        let masks: Vec<u64> = data.chunks_exact(PAGE_SIZE).map(block_mask).collect();
        w.ram_sparse(GPA, &data, &masks).unwrap();
    } else {
        w.ram_data(GPA, &data).unwrap();
    }
    w.section(
        &mut migration::SwitchoverRecord {
            source_running: false,
        },
        0,
    )
    .unwrap();
    w.finish().unwrap()
}

fn json(dir: &std::path::Path, file: &str) -> serde_json::Value {
    let o = ferry_dump(dir, &["show", "--json", "--ram", file]);
    assert_eq!(o.code, 0, "{o:?}");
    serde_json::from_str(&o.stdout).unwrap()
}

#[test]
fn sparse_pages_are_shown_and_diffed_like_the_same_pages_sent_as_data() {
    let dir = scratch("sparse_same_as_data");
    let (d, s) = (stream(false), stream(true));
    std::fs::write(dir.join("data.stream"), &d).unwrap();
    std::fs::write(dir.join("sparse.stream"), &s).unwrap();

    // The scan frames it whole, expands it to the very pages, and StreamReader agrees.
    let sc = scan(&s);
    assert!(sc.problems.is_empty(), "{:?}", sc.problems);
    let rec = &sc.ram[0];
    assert!(matches!(rec.data, Some(RamData::Sparse(_))));
    assert_eq!(rec.kind(), "sparse");
    assert_eq!(rec.expand().unwrap().unwrap().as_ref(), pages().as_slice());
    let mut r = devstate::StreamReader::new(s.as_slice(), None).unwrap();
    r.next_item().unwrap();
    match r.next_item().unwrap() {
        devstate::Item::Ram(x) => assert_eq!(x.data.unwrap(), pages().as_slice()),
        _ => panic!("no RAM record"),
    }

    let (jd, js) = (json(&dir, "data.stream"), json(&dir, "sparse.stream"));
    let (rd, rs) = (&jd["ram"], &js["ram"]);
    // A stream without SPARSE records keeps the JSON it had: no `sparse_records` key.
    assert!(rd.get("sparse_records").is_none(), "{rd}");
    assert_eq!(rs["sparse_records"], 1);
    for k in ["records", "data_records", "data_pages", "distinct_pages"] {
        assert_eq!(rd[k], rs[k], "{k}");
    }
    assert_eq!(rs["data_pages"], PAGES);
    let (run_d, run_s) = (&rd["runs"][0], &rs["runs"][0]);
    assert_eq!(run_d["kind"], "data");
    assert_eq!(run_s["kind"], "sparse");
    assert_eq!(run_s["crc"], "ok");
    assert_eq!(
        run_s["data_crc32"],
        u64::from(crc32fast::hash(&pages())),
        "the CRC of the expanded pages"
    );
    assert_eq!(run_d["data_crc32"], run_s["data_crc32"]);
    // Bytes are what the records take in the stream: header 14 + len 4 + body + CRC 4.
    assert_eq!(rd["bytes"], 14 + (PAGES * PAGE_SIZE) as u64 + 4);
    let mut body = Vec::new();
    let masks: Vec<u64> = pages().chunks_exact(PAGE_SIZE).map(block_mask).collect();
    devstate::sparse::encode(&pages(), &masks, &mut body);
    assert_eq!(rs["bytes"], 14 + 4 + body.len() as u64 + 4);
    assert_eq!(rs["bytes"], rec.len);
    assert!(rs["bytes"].as_u64() < rd["bytes"].as_u64());

    let o = ferry_dump(&dir, &["show", "sparse.stream"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout
            .contains("ram: 1 record (1 data of which 1 sparse, 0 zero), 3 data pages,"),
        "{}",
        o.stdout
    );
    let o = ferry_dump(&dir, &["show", "data.stream"]);
    assert!(
        o.stdout
            .contains("ram: 1 record (1 data, 0 zero), 3 data pages,"),
        "{}",
        o.stdout
    );

    // Same pages, so no page differs.
    let o = ferry_dump(&dir, &["diff", "data.stream", "sparse.stream"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(!o.stdout.contains("ram:"), "{}", o.stdout);
    assert!(
        o.stdout.ends_with(
            "0 difference(s), 0 volatile difference(s) (volatile fields are expected to differ)\n"
        ),
        "{}",
        o.stdout
    );

    // And verify finds nothing wrong with the RAM record (only sections this test left out).
    let o = ferry_dump(&dir, &["verify", "--all", "sparse.stream"]);
    no_panic(&o);
    assert!(!o.stdout.contains("RAM record"), "{}", o.stdout);
}

/// `s` with its first RAM record (CRC left out) changed by `edit`, and the record's CRC
/// recomputed so only the edit is wrong. Also gives the record's offset.
fn patch_ram(s: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> (Vec<u8>, u64) {
    let sc = scan(s);
    let rec = &sc.ram[0];
    let (at, len) = (rec.offset as usize, rec.len as usize);
    let mut r = s[at..at + len - 4].to_vec();
    edit(&mut r);
    let crc = crc32fast::hash(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    let mut out = s[..at].to_vec();
    out.extend_from_slice(&r);
    out.extend_from_slice(&s[at + len..]);
    (out, at as u64)
}

/// Offset of the sparse body's length within a RAM record, and of the body.
const LEN_AT: usize = 14;
const BODY_AT: usize = 18;

#[test]
fn a_sparse_body_that_does_not_expand_is_a_problem_at_its_record() {
    let dir = scratch("sparse_bad_body");
    let s = stream(true);
    // Give page 0 a block it does not carry (bit 48), so its blocks run into the masks that
    // follow and the body no longer adds up. The record's CRC is right; only the body is not.
    let (bad, at) = patch_ram(&s, |r| r[BODY_AT + 6] |= 0x01);
    std::fs::write(dir.join("bad.stream"), &bad).unwrap();
    let want = format!("Invalid RAM record at offset {at}: sparse body ");

    let o = ferry_dump(&dir, &["verify", "--all", "bad.stream"]);
    no_panic(&o);
    assert_eq!(o.code, 1);
    let line = o.stdout.lines().find(|l| l.contains(&want));
    assert!(line.is_some(), "{}", o.stdout);
    assert!(!o.stdout.contains("CRC mismatch"), "{}", o.stdout);

    let o = ferry_dump(&dir, &["show", "--ram", "bad.stream"]);
    no_panic(&o);
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains(&want), "{}", o.stdout);
    assert!(
        o.stdout.contains("1 data of which 1 sparse"),
        "{}",
        o.stdout
    );
    // The rest of the stream is still framed.
    assert!(o.stdout.contains("section migration"), "{}", o.stdout);

    // Its pages are unknown, so they differ from the good stream's.
    std::fs::write(dir.join("good.stream"), &s).unwrap();
    let o = ferry_dump(&dir, &["diff", "good.stream", "bad.stream"]);
    no_panic(&o);
    assert!(o.stdout.contains("ram: "), "{}", o.stdout);

    // Bytes left after the last page are refused too.
    let (extra, at) = patch_ram(&s, |r| {
        let len = u32::from_le_bytes(r[LEN_AT..BODY_AT].try_into().unwrap()) + 1;
        r[LEN_AT..BODY_AT].copy_from_slice(&len.to_le_bytes());
        r.push(0);
    });
    let sc = scan(&extra);
    assert_eq!(sc.problems.len(), 1, "{:?}", sc.problems);
    assert_eq!(
        sc.problems[0].message,
        format!("Invalid RAM record at offset {at}: sparse body has 1 bytes after its last page")
    );
    assert!(sc.end.is_some());

    // And a body one byte short of its last page.
    let (short, at) = patch_ram(&s, |r| {
        let len = u32::from_le_bytes(r[LEN_AT..BODY_AT].try_into().unwrap()) - 1;
        r[LEN_AT..BODY_AT].copy_from_slice(&len.to_le_bytes());
        r.pop();
    });
    let sc = scan(&short);
    assert_eq!(sc.problems.len(), 1, "{:?}", sc.problems);
    assert!(
        sc.problems[0].message.starts_with(&format!(
            "Invalid RAM record at offset {at}: sparse body ends inside page 2 "
        )),
        "{:?}",
        sc.problems
    );
    assert_eq!(sc.problems[0].offset, at);
}

#[test]
fn a_sparse_length_over_its_bound_is_a_problem_or_a_framing_loss() {
    let s = stream(true);
    let sc = scan(&s);
    let (at, len) = (sc.ram[0].offset as usize, sc.ram[0].len as usize);
    let bound = PAGES * devstate::sparse::MAX_PAGE_ENCODED;

    // Over the bound, and more than the rest of the stream: framing is lost there.
    let mut lost = s.clone();
    lost[at + LEN_AT..at + BODY_AT].copy_from_slice(&u32::MAX.to_le_bytes());
    let sc = scan(&lost);
    assert_eq!(sc.lost_at, Some(at as u64));
    assert_eq!(
        sc.problems.last().unwrap().message,
        format!(
            "Invalid RAM record at offset {at}: sparse body of {} bytes exceeds {bound} for {PAGES} pages",
            u32::MAX
        )
    );

    // Over the bound but present (with a right CRC): a problem, and the scan goes on.
    let body_len = len - BODY_AT - 4;
    let pad = bound + 1 - body_len;
    let (over, over_at) = patch_ram(&s, |r| {
        r[LEN_AT..BODY_AT].copy_from_slice(&((bound + 1) as u32).to_le_bytes());
        r.resize(r.len() + pad, 0);
    });
    let sc = scan(&over);
    assert_eq!(over_at, at as u64);
    assert_eq!(sc.lost_at, None);
    assert!(sc.end.is_some());
    let msgs: Vec<_> = sc.problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        msgs,
        [
            format!(
                "Invalid RAM record at offset {at}: sparse body of {} bytes exceeds {bound} for {PAGES} pages",
                bound + 1
            ),
            format!(
                "Invalid RAM record at offset {at}: sparse body has {pad} bytes after its last page"
            ),
        ]
    );

    // A page count out of range that the rest of the stream could not carry even as bare
    // masks is not believed: framing is lost there, nothing is walked page by page.
    let mut huge = s.clone();
    huge[at + 9..at + 13].copy_from_slice(&u32::MAX.to_le_bytes());
    let sc = scan(&huge);
    assert_eq!(sc.lost_at, Some(at as u64));
    assert_eq!(
        sc.problems.last().unwrap().message,
        format!(
            "Invalid RAM record at offset {at}: page count {} out of range",
            u32::MAX
        )
    );
    // One it could carry is a problem with that record (here: its body is too short for
    // 300 pages), and the scan goes on.
    let (more, _) = patch_ram(&s, |r| r[9..13].copy_from_slice(&300u32.to_le_bytes()));
    let sc = scan(&more);
    assert_eq!(sc.lost_at, None);
    assert!(sc.end.is_some());
    assert_eq!(
        sc.problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>(),
        [format!(
            "Invalid RAM record at offset {at}: page count 300 out of range"
        )]
    );
    assert!(sc.ram[0].expand().unwrap().is_err());

    // A damaged body with the CRC left as it was is one CRC problem, named sparse.
    let mut flipped = s.clone();
    flipped[at + BODY_AT + 20] ^= 1;
    let sc = scan(&flipped);
    assert_eq!(sc.problems.len(), 1, "{:?}", sc.problems);
    assert!(
        sc.problems[0].message.starts_with(&format!(
            "CRC mismatch in RAM record at offset {at} ({GPA:#x} + {PAGES} page(s) sparse)"
        )),
        "{:?}",
        sc.problems
    );
}

/// A ZERO record is 18 bytes whatever it claims: one naming 2^32 - 1 pages is reported and
/// shown at once, without walking (or allocating for) billions of pages.
#[test]
fn a_zero_record_naming_billions_of_pages_is_shown_at_once() {
    let s = stream(false);
    let at = scan(&s).ram[0].offset as usize;
    let mut rec = vec![2u8];
    rec.extend_from_slice(&0u64.to_le_bytes());
    rec.extend_from_slice(&u32::MAX.to_le_bytes());
    rec.push(1);
    let crc = crc32fast::hash(&rec);
    rec.extend_from_slice(&crc.to_le_bytes());
    let mut bytes = s[..at].to_vec();
    bytes.extend_from_slice(&rec);
    bytes.extend_from_slice(&s[scan(&s).ram[0].offset as usize + scan(&s).ram[0].len as usize..]);
    let dir = scratch("huge-zero");
    std::fs::write(dir.join("huge.stream"), &bytes).unwrap();
    let o = ferry_dump(&dir, &["show", "huge.stream"]);
    no_panic(&o);
    assert!(
        o.stdout.contains(&format!(
            "Invalid RAM record at offset {at}: page count {} out of range",
            u32::MAX
        )),
        "{o:?}"
    );
}
