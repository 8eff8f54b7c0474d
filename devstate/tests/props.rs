//! Property tests: corruption is always detected, and no input makes the decoder panic.

mod common;

use common::*;
use devstate::{Item, StreamReader};
use machine_types::MachineType;
use proptest::prelude::*;

/// Decode to the end, loading every section with its type; `Ok` only for a fully valid stream.
fn full_decode(bytes: &[u8]) -> Result<(), String> {
    let cat = catalog();
    let mut r = StreamReader::new(bytes, Some(&cat)).map_err(|e| e.to_string())?;
    loop {
        match r.next_item().map_err(|e| e.to_string())? {
            Item::Config(c) => {
                c.load::<Config>().map_err(|e| e.to_string())?;
            }
            Item::Ram(_) => {}
            Item::Section(s) if s.name == "conn" => {
                s.load::<Conn>().map_err(|e| e.to_string())?;
            }
            Item::Section(s) => {
                s.load::<Cpu>().map_err(|e| e.to_string())?;
            }
            Item::End => return Ok(()),
        }
    }
}

fn valid() -> Vec<u8> {
    stream(MachineType::lookup("ferry-1.1").unwrap(), 3)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_single_bit_flip_is_detected(bit in 0usize..(valid().len() * 8)) {
        let mut bytes = valid();
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(full_decode(&bytes).is_err(), "flip of bit {} accepted", bit);
    }

    #[test]
    fn any_truncation_is_detected(cut in 0usize..valid().len()) {
        prop_assert!(full_decode(&valid()[..cut]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = full_decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = devstate::encode_header("ferry-2.0", "fuzz");
        bytes.extend_from_slice(&tail);
        let _ = full_decode(&bytes);
    }

    #[test]
    fn spliced_valid_records_never_panic(cut_a in 0usize..400, cut_b in 0usize..400) {
        let v = valid();
        let (a, b) = (cut_a.min(v.len()), cut_b.min(v.len()));
        let mut bytes = v[..a].to_vec();
        bytes.extend_from_slice(&v[b..]);
        let res = full_decode(&bytes);
        prop_assert!(a == b || res.is_err());
    }
}

#[test]
fn the_valid_stream_decodes() {
    full_decode(&valid()).unwrap();
}
