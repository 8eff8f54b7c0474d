//! Feed arbitrary SPARSE bodies to the codec: `validate`, `decode` and the page/run views must
//! agree (accept the same bodies, rebuild the same pages) and never panic or over-allocate.
#![no_main]

use devstate::sparse::{decode, expand, pages, validate};
use devstate::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, body)) = data.split_first() else { return };
    // At most 8 pages: the bound a record's page count gives, kept small for speed.
    let n = u32::from(n % 9);
    let ok = validate(body, n).is_ok();
    let mut out = vec![0xa5u8; n as usize * PAGE_SIZE];
    assert_eq!(decode(body, &mut out).is_ok(), ok, "decode and validate disagree");
    if ok {
        assert_eq!(pages(body).count(), n as usize, "page view count");
        assert_eq!(expand(body, n).unwrap(), out, "expand and decode disagree");
        // Re-encoding the expanded pages with their masks gives the same body back, unless
        // a mask named an all-zero block (legal, and dropped by the encoder).
        let masks: Vec<u64> = out.chunks_exact(PAGE_SIZE).map(devstate::sparse::block_mask).collect();
        let body_masks: Vec<u64> = pages(body).map(|(m, _)| m).collect();
        if masks == body_masks {
            let mut again = Vec::new();
            devstate::sparse::encode(&out, &masks, &mut again);
            assert_eq!(again, body, "re-encoding changed the body");
        }
    }
});
