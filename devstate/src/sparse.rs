//! SPARSE page encoding: a page travels as a mask of its non-zero 64-byte blocks followed by
//! just those blocks, so a page that is mostly zero (a freshly touched page, a counter per
//! page, a sparse table) costs a few dozen bytes instead of 4 KiB.
//!
//! ```text
//! sparse body := page*            one entry per page of the record, in address order
//! page        := u64 mask         bit i set: block i (bytes 64*i .. 64*i+63) follows
//!                block[popcount(mask)]   64 bytes each, lowest bit first
//! ```
//!
//! A block whose bit is clear is zero. The decoder refuses a body that ends inside a page or
//! has bytes left over, so every byte is accounted for.

use crate::wire::PAGE_SIZE;

/// Bytes per block.
pub const BLOCK: usize = 64;
/// Blocks per page (one mask bit each).
pub const BLOCKS_PER_PAGE: usize = PAGE_SIZE / BLOCK;
/// Most non-zero blocks a page may have for the sender to encode it as SPARSE: above this the
/// saving (a quarter of the page at most) is not worth the mask.
pub const MAX_SPARSE_BLOCKS: u32 = 48;
/// Largest encoded size of one page.
pub const MAX_PAGE_ENCODED: usize = 8 + PAGE_SIZE;

/// Refuse a SPARSE body of `len` bytes longer than `pages` pages can encode to.
pub fn check_len(len: u64, pages: u32) -> Result<(), String> {
    let max = u64::from(pages) * MAX_PAGE_ENCODED as u64;
    if len > max {
        return Err(format!(
            "sparse body of {len} bytes exceeds {max} for {pages} pages"
        ));
    }
    Ok(())
}

/// Mask of the non-zero 64-byte blocks of `page` (4096 bytes).
pub fn block_mask(page: &[u8]) -> u64 {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    let mut mask = 0u64;
    for (i, block) in page.chunks_exact(BLOCK).enumerate() {
        // OR the block's eight words; the compiler turns this into a few vector ops.
        let or = block.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        });
        mask |= u64::from(or != 0) << i;
    }
    mask
}

/// Append the encoding of `pages` (whole pages) to `out`, given each page's mask.
pub fn encode(pages: &[u8], masks: &[u64], out: &mut Vec<u8>) {
    debug_assert_eq!(pages.len(), masks.len() * PAGE_SIZE);
    for (page, &mask) in pages.chunks_exact(PAGE_SIZE).zip(masks) {
        out.extend_from_slice(&mask.to_le_bytes());
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            out.extend_from_slice(&page[i * BLOCK..(i + 1) * BLOCK]);
            m &= m - 1;
        }
    }
}

/// Expand `body` into `out` (exactly `out.len() / 4096` pages). On error, says what is wrong
/// and at which byte of the body.
pub fn decode(body: &[u8], out: &mut [u8]) -> Result<(), String> {
    validate(body, (out.len() / PAGE_SIZE) as u32)?;
    for ((mask, blocks), page) in pages(body).zip(out.chunks_exact_mut(PAGE_SIZE)) {
        expand_page(mask, blocks, page);
    }
    Ok(())
}

/// Expand a validated body of `pages` pages into a new buffer.
pub fn expand(body: &[u8], pages: u32) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; pages as usize * PAGE_SIZE];
    decode(body, &mut out)?;
    Ok(out)
}

/// Write one page (4096 bytes) from its mask and blocks: zero where the mask bit is clear.
pub fn expand_page(mask: u64, blocks: &[u8], page: &mut [u8]) {
    page.fill(0);
    let mut at = 0;
    for (first, count) in runs(mask) {
        let (f, len) = (first as usize * BLOCK, count as usize * BLOCK);
        page[f..f + len].copy_from_slice(&blocks[at..at + len]);
        at += len;
    }
}

/// Check that `body` encodes exactly `pages` pages, without expanding it.
pub fn validate(body: &[u8], pages: u32) -> Result<(), String> {
    let mut at = 0usize;
    for n in 0..pages {
        let Some(m) = body.get(at..at + 8) else {
            return Err(format!(
                "sparse body ends inside page {n} (byte {at} of {})",
                body.len()
            ));
        };
        let need = u64::from_le_bytes(m.try_into().expect("8 bytes")).count_ones() as usize * BLOCK;
        at += 8;
        if body.len() - at < need {
            return Err(format!(
                "sparse body ends inside page {n} (byte {at} of {}, {need} bytes of blocks due)",
                body.len()
            ));
        }
        at += need;
    }
    if at != body.len() {
        return Err(format!(
            "sparse body has {} bytes after its last page",
            body.len() - at
        ));
    }
    Ok(())
}

/// The pages of a [validated](validate) body: `(mask, blocks)` per page, in order.
pub fn pages(body: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (m, tail) = rest.split_first_chunk::<8>()?;
        let mask = u64::from_le_bytes(*m);
        let n = (mask.count_ones() as usize * BLOCK).min(tail.len());
        let (blocks, tail) = tail.split_at(n);
        rest = tail;
        Some((mask, blocks))
    })
}

/// Runs of set bits of `mask` as `(first block, blocks)`, lowest first. Consecutive present
/// blocks are consecutive in the body too, so each run is one copy.
pub fn runs(mask: u64) -> impl Iterator<Item = (u32, u32)> {
    let mut m = mask;
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let first = m.trailing_zeros();
        let len = (!(m >> first)).trailing_zeros();
        let end = first + len;
        m = if end >= 64 { 0 } else { m & (u64::MAX << end) };
        Some((first, len))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn masks_name_the_non_zero_blocks() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert_eq!(block_mask(&p), 0);
        p[0] = 1;
        p[PAGE_SIZE - 1] = 7;
        p[64 * 5 + 3] = 9;
        assert_eq!(block_mask(&p), 1 | 1 << 5 | 1 << 63);
    }

    #[test]
    fn bad_bodies_are_refused() {
        let mut out = vec![0u8; 2 * PAGE_SIZE];
        let mut body = Vec::new();
        encode(&vec![1u8; 2 * PAGE_SIZE], &[1, 1], &mut body);
        assert!(decode(&body, &mut out).is_ok());
        assert!(
            decode(&body[..body.len() - 1], &mut out)
                .unwrap_err()
                .contains("page 1")
        );
        body.push(0);
        assert!(
            decode(&body, &mut out)
                .unwrap_err()
                .contains("1 bytes after")
        );
        assert!(
            decode(&[0xff; 8], &mut out[..PAGE_SIZE])
                .unwrap_err()
                .contains("page 0")
        );
    }

    #[test]
    fn runs_cover_the_set_bits() {
        assert_eq!(runs(0).count(), 0);
        assert_eq!(runs(u64::MAX).collect::<Vec<_>>(), vec![(0, 64)]);
        assert_eq!(
            runs(0b1011 | 1 << 63).collect::<Vec<_>>(),
            vec![(0, 2), (3, 1), (63, 1)]
        );
    }

    proptest! {
        #[test]
        fn round_trip(blocks in proptest::collection::vec((0usize..128, any::<u8>()), 0..40)) {
            let mut pages = vec![0u8; 2 * PAGE_SIZE];
            for (b, v) in blocks {
                pages[b * BLOCK + usize::from(v) % BLOCK] = v;
            }
            let masks: Vec<u64> = pages.chunks_exact(PAGE_SIZE).map(block_mask).collect();
            let mut body = Vec::new();
            encode(&pages, &masks, &mut body);
            let mut out = vec![0xaau8; 2 * PAGE_SIZE];
            decode(&body, &mut out).unwrap();
            prop_assert_eq!(&out, &pages);
            prop_assert_eq!(expand(&body, 2).unwrap(), pages);
        }
    }
}
