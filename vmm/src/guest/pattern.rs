//! The memory-pattern verifier of the `dirty` workload (QEMU's `check_guests_ram`, made
//! exact with the mailbox's `progress` counter; see the invariant in [`super`]).
//!
//! The guest writes exactly one byte of each working-set page and of each page of an active
//! hot-plugged memory block: byte 0 (`inc byte [page]`, see [`super::asm`]). Nothing else
//! ever writes those pages (the mailbox, code, stacks and page tables all lie below
//! [`layout::WORKING_SET_GPA`]; blocks are fresh anonymous memory), and RAM starts zeroed.
//! So the verifier checks every byte: byte 0 against the invariant, bytes 1..4096 against
//! zero. Pages are read [`CHUNK_PAGES`] at a time, and the zero check is a slice comparison,
//! so a 64 MiB working set verifies in milliseconds.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::PAGE_SIZE;
use super::layout;
use super::mailbox::{BlockArea, MAGIC, MODE_DIRTY, Mailbox};
use crate::vm::memory::GuestMem;

/// Pages read from guest RAM at once (256 KiB).
pub const CHUNK_PAGES: u64 = 64;

/// What every byte of a page but the first holds.
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Why guest RAM does not hold the pattern the mailbox promises.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    /// The mailbox was not written by the VMM (or was corrupted).
    #[error("Mailbox magic is {0:#x}, not the Ferry mailbox")]
    BadMagic(u64),
    /// The guest is not running the dirty workload.
    #[error("Guest is not in dirty mode (mode {0})")]
    NotDirty(u64),
    /// The working set is empty.
    #[error("Mailbox working set is empty")]
    EmptyWorkingSet,
    /// The working set is not page-aligned, or starts in the ABI-reserved area (mailbox,
    /// code, stacks, page tables) whose bytes the pattern does not describe.
    #[error(
        "Working set starts at GPA {0:#x}, not a page at or above GPA {min:#x}",
        min = layout::WORKING_SET_GPA
    )]
    BadWorkingSet(u64),
    /// The pass counter disagrees with `progress`.
    #[error(
        "Mailbox pass count {pass_count} does not match progress {progress} over {pages} pages"
    )]
    PassCount {
        /// `pass_count` field.
        pass_count: u64,
        /// `progress` field.
        progress: u64,
        /// Working-set pages.
        pages: u64,
    },
    /// QEMU's rule broken at byte 0 of a page: a step other than 0 or −1 between
    /// neighbours, or a second edge.
    #[error(
        "Page {page} (GPA {gpa:#x}) offset 0 holds {found:#04x} after {previous:#04x}: {reason}"
    )]
    Edge {
        /// Page index in the working set (or block).
        page: u64,
        /// Its guest-physical address.
        gpa: u64,
        /// Byte found.
        found: u8,
        /// Byte 0 of the previous page.
        previous: u8,
        /// Which rule broke.
        reason: &'static str,
    },
    /// Byte 0 of a page holds a value other than the one the mailbox implies.
    #[error("Page {page} (GPA {gpa:#x}) offset 0 holds {found:#04x}, expected {expected}")]
    Mismatch {
        /// Page index in the working set (or block).
        page: u64,
        /// Its guest-physical address.
        gpa: u64,
        /// Byte found.
        found: u8,
        /// Expected value(s), e.g. `0x05` or `0x05 or 0x06`.
        expected: String,
    },
    /// A byte the guest never writes (any but byte 0 of a page) is not zero.
    #[error("Page {page} (GPA {gpa:#x}) offset {offset} holds {found:#04x}, expected 0x00")]
    Stray {
        /// Page index in the working set (or block).
        page: u64,
        /// The page's guest-physical address.
        gpa: u64,
        /// Offset of the first non-zero byte in the page (1..4096).
        offset: u64,
        /// Byte found.
        found: u8,
    },
    /// Guest RAM could not be read.
    #[error("Cannot read guest RAM at GPA {gpa:#x}")]
    Memory {
        /// Address that failed.
        gpa: u64,
        /// Cause.
        #[source]
        source: GuestMemoryErrorEq,
    },
}

impl PatternError {
    /// The page index a byte error names (`None` for errors about the mailbox or RAM).
    pub fn page(&self) -> Option<u64> {
        match self {
            PatternError::Edge { page, .. }
            | PatternError::Mismatch { page, .. }
            | PatternError::Stray { page, .. } => Some(*page),
            _ => None,
        }
    }
}

/// [`GuestMemoryError`] wrapped so [`PatternError`] can derive `PartialEq` (compares messages).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct GuestMemoryErrorEq(pub GuestMemoryError);

impl PartialEq for GuestMemoryErrorEq {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for GuestMemoryErrorEq {}

/// Checks every byte of every working-set page against `mailbox` (read while the vCPUs are
/// paused): byte 0 against the invariant, the rest against zero. Returns the first bad byte.
pub fn verify_pattern(mem: &GuestMem, mailbox: &Mailbox) -> Result<(), PatternError> {
    if mailbox.magic != MAGIC {
        return Err(PatternError::BadMagic(mailbox.magic));
    }
    if mailbox.mode != MODE_DIRTY {
        return Err(PatternError::NotDirty(mailbox.mode));
    }
    if mailbox.ws_pages == 0 {
        return Err(PatternError::EmptyWorkingSet);
    }
    if mailbox.ws_start < layout::WORKING_SET_GPA || !mailbox.ws_start.is_multiple_of(PAGE_SIZE) {
        return Err(PatternError::BadWorkingSet(mailbox.ws_start));
    }
    let scan = scan_pages(mem, mailbox.ws_start, mailbox.ws_pages)?;
    scan.verify(mailbox)
}

/// Checks a hot-plugged memory block (`pages` pages from `gpa`) against its mailbox area
/// (the same invariant as the main working set, over the block's own `progress`, and zero
/// in every byte but the first of each page). Read while the vCPUs are paused; `mem` must
/// hold the block.
pub fn verify_block(
    mem: &GuestMem,
    gpa: u64,
    pages: u64,
    area: &BlockArea,
) -> Result<(), PatternError> {
    let scan = scan_pages(mem, gpa, pages)?;
    let mut mb = Mailbox::dirty(gpa, pages, 0);
    mb.progress = area.progress;
    mb.pass_count = area.passes;
    scan.verify(&mb)
}

/// Pages read from guest RAM: byte 0 of each, and the first other byte that is not zero.
struct Scan {
    /// Byte 0 of every page.
    first_bytes: Vec<u8>,
    /// The first non-zero byte elsewhere, as a [`PatternError::Stray`].
    stray: Option<PatternError>,
}

impl Scan {
    /// The first bad byte in address order: byte 0 of a page comes before its other bytes,
    /// and errors that name no page (the pass count) come first.
    fn verify(self, mailbox: &Mailbox) -> Result<(), PatternError> {
        match (verify_bytes(&self.first_bytes, mailbox), self.stray) {
            (Err(e), Some(stray)) => match (e.page(), stray.page()) {
                (Some(p), Some(s)) if s < p => Err(stray),
                _ => Err(e),
            },
            (Err(e), None) => Err(e),
            (Ok(()), Some(stray)) => Err(stray),
            (Ok(()), None) => Ok(()),
        }
    }
}

/// Reads `pages` pages from `start` in chunks of [`CHUNK_PAGES`].
fn scan_pages(mem: &GuestMem, start: u64, pages: u64) -> Result<Scan, PatternError> {
    let page_size = PAGE_SIZE as usize;
    let mut buf = vec![0u8; (CHUNK_PAGES.min(pages) as usize) * page_size];
    // Grows as pages are read: a bogus page count fails on the first unmapped page instead
    // of allocating it up front.
    let mut first_bytes = Vec::with_capacity(pages.min(1 << 20) as usize);
    let mut stray = None;
    let mut page = 0;
    while page < pages {
        let n = CHUNK_PAGES.min(pages - page);
        let gpa = page_gpa(start, page)?;
        let chunk = &mut buf[..n as usize * page_size];
        if mem.read_slice(chunk, GuestAddress(gpa)).is_err() {
            // Page by page: the chunk straddles a region boundary, or names the first page
            // that cannot be read.
            for i in 0..n {
                let at = page_gpa(start, page + i)?;
                let from = i as usize * page_size;
                mem.read_slice(&mut chunk[from..from + page_size], GuestAddress(at))
                    .map_err(|e| PatternError::Memory {
                        gpa: at,
                        source: GuestMemoryErrorEq(e),
                    })?;
            }
        }
        for (i, bytes) in chunk.chunks_exact(page_size).enumerate() {
            let index = page + i as u64;
            first_bytes.push(bytes[0]);
            if stray.is_none() {
                stray = stray_byte(bytes).map(|(offset, found)| PatternError::Stray {
                    page: index,
                    gpa: start + index * PAGE_SIZE,
                    offset,
                    found,
                });
            }
        }
        page += n;
    }
    Ok(Scan { first_bytes, stray })
}

/// GPA of page `index` from `start`, or a [`PatternError::Memory`] past the address space.
fn page_gpa(start: u64, index: u64) -> Result<u64, PatternError> {
    index
        .checked_mul(PAGE_SIZE)
        .and_then(|off| start.checked_add(off))
        .and_then(|gpa| gpa.checked_add(PAGE_SIZE - 1).map(|_| gpa))
        .ok_or(PatternError::Memory {
            gpa: start,
            source: GuestMemoryErrorEq(GuestMemoryError::InvalidGuestAddress(GuestAddress(start))),
        })
}

/// The first byte of `page` after byte 0 that is not zero: `(offset, value)`. `page` is at
/// most one page long.
pub fn stray_byte(page: &[u8]) -> Option<(u64, u8)> {
    let rest = page.get(1..)?;
    // A memcmp, fast even in a debug build; the byte-wise search only runs on a bad page.
    if rest == &ZERO_PAGE[..rest.len()] {
        return None;
    }
    rest.iter()
        .position(|&b| b != 0)
        .map(|i| (i as u64 + 1, rest[i]))
}

/// [`verify_pattern`]'s invariant on byte 0 of the pages, already read (the other bytes are
/// not looked at).
pub fn verify_bytes(first_bytes: &[u8], mailbox: &Mailbox) -> Result<(), PatternError> {
    let pages = first_bytes.len() as u64;
    if pages == 0 || mailbox.ws_pages == 0 {
        return Err(PatternError::EmptyWorkingSet);
    }
    let gpa = |i: u64| mailbox.ws_start + i * PAGE_SIZE;
    // QEMU's rule first: it names the classic failure.
    let mut edge_seen = false;
    for i in 1..pages {
        let previous = first_bytes[i as usize - 1];
        let found = first_bytes[i as usize];
        if found == previous {
            continue;
        }
        let reason = if found != previous.wrapping_sub(1) {
            "step is neither 0 nor -1"
        } else if edge_seen {
            "second down edge"
        } else {
            edge_seen = true;
            continue;
        };
        return Err(PatternError::Edge {
            page: i,
            gpa: gpa(i),
            found,
            previous,
            reason,
        });
    }
    // Then the exact values from `progress`.
    let pass = mailbox.progress / pages;
    let cur = mailbox.progress % pages;
    if mailbox.pass_count != pass && mailbox.pass_count + 1 != pass {
        return Err(PatternError::PassCount {
            pass_count: mailbox.pass_count,
            progress: mailbox.progress,
            pages,
        });
    }
    let old = pass as u8; // mod 256
    let new = old.wrapping_add(1);
    for (i, &found) in first_bytes.iter().enumerate() {
        let i = i as u64;
        let ok = match i.cmp(&cur) {
            std::cmp::Ordering::Less => found == new,
            std::cmp::Ordering::Greater => found == old,
            std::cmp::Ordering::Equal => found == old || found == new,
        };
        if !ok {
            let expected = match i.cmp(&cur) {
                std::cmp::Ordering::Less => format!("{new:#04x}"),
                std::cmp::Ordering::Greater => format!("{old:#04x}"),
                std::cmp::Ordering::Equal => format!("{old:#04x} or {new:#04x}"),
            };
            return Err(PatternError::Mismatch {
                page: i,
                gpa: gpa(i),
                found,
                expected,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates the guest: `steps` page increments over `n` pages, the mailbox stored
    /// after each (or, with `in_flight`, one more increment without the store).
    fn simulate(n: usize, steps: u64, in_flight: bool) -> (Vec<u8>, Mailbox) {
        let mut bytes = vec![0u8; n];
        let mut mb = Mailbox::dirty(0x10_0000, n as u64, 0);
        for s in 0..steps {
            bytes[(s % n as u64) as usize] = bytes[(s % n as u64) as usize].wrapping_add(1);
            mb.progress = s + 1;
            if (s + 1) % n as u64 == 0 {
                mb.pass_count = (s + 1) / n as u64;
            }
        }
        if in_flight {
            let i = (steps % n as u64) as usize;
            bytes[i] = bytes[i].wrapping_add(1);
        }
        (bytes, mb)
    }

    #[test]
    fn accepts_every_prefix_including_wrap() {
        for n in [1usize, 2, 7, 64] {
            // Step the simulated guest page by page through more than 256 passes.
            let mut bytes = vec![0u8; n];
            let mut mb = Mailbox::dirty(0x10_0000, n as u64, 0);
            for s in 0..(n as u64 * 300) {
                assert_eq!(verify_bytes(&bytes, &mb), Ok(()), "n={n} step={s}");
                let i = (s % n as u64) as usize;
                bytes[i] = bytes[i].wrapping_add(1);
                // In flight: incremented, progress not stored yet.
                assert_eq!(
                    verify_bytes(&bytes, &mb),
                    Ok(()),
                    "n={n} step={s} in flight"
                );
                mb.progress = s + 1;
                if (s + 1) % n as u64 == 0 {
                    // Between the last progress store and the pass-count store.
                    assert_eq!(verify_bytes(&bytes, &mb), Ok(()), "n={n} step={s} pass lag");
                    mb.pass_count = (s + 1) / n as u64;
                }
            }
        }
    }

    #[test]
    fn accepts_pass_count_lagging_by_one() {
        let (bytes, mut mb) = simulate(8, 16, false);
        mb.pass_count = 1;
        assert_eq!(verify_bytes(&bytes, &mb), Ok(()));
        mb.pass_count = 0;
        assert!(matches!(
            verify_bytes(&bytes, &mb),
            Err(PatternError::PassCount { .. })
        ));
    }

    #[test]
    fn names_first_bad_page() {
        let (mut bytes, mb) = simulate(16, 16 * 3 + 5, false);
        bytes[9] = bytes[9].wrapping_add(7);
        match verify_bytes(&bytes, &mb) {
            Err(PatternError::Edge { page, .. }) => assert_eq!(page, 9),
            other => panic!("{other:?}"),
        }
        // A uniform shift keeps QEMU's rule but breaks the exact check.
        let (bytes, mb) = simulate(16, 16 * 3 + 5, false);
        let shifted: Vec<u8> = bytes.iter().map(|b| b.wrapping_add(1)).collect();
        match verify_bytes(&shifted, &mb) {
            Err(PatternError::Mismatch { page, found, .. }) => {
                assert_eq!((page, found), (0, 5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn second_edge_and_lost_write() {
        let (mut bytes, mb) = simulate(10, 25, false);
        // Pages 0..5 hold 3, 5..10 hold 2: lose the write to page 2.
        bytes[2] = 2;
        let err = verify_bytes(&bytes, &mb).unwrap_err();
        assert!(matches!(err, PatternError::Edge { page: 3, .. }), "{err}");
        assert!(err.to_string().contains("Page 3"), "{err}");
    }

    /// Guest RAM holding `first_bytes` at byte 0 of the pages of `mb`'s working set, with
    /// `mb` in the mailbox page.
    fn guest_ram(first_bytes: &[u8], mb: &Mailbox) -> GuestMem {
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("anonymous memory");
        mb.write(&mem).unwrap();
        for (i, &b) in first_bytes.iter().enumerate() {
            let gpa = mb.ws_start + i as u64 * PAGE_SIZE;
            mem.write_obj(b, GuestAddress(gpa)).unwrap();
        }
        mem
    }

    #[test]
    fn correct_pages_pass() {
        // Several chunks, the last one partial, mid-pass with a page in flight.
        let n = CHUNK_PAGES as usize * 3 + 5;
        let (bytes, mb) = simulate(n, n as u64 * 2 + 70, true);
        let mem = guest_ram(&bytes, &mb);
        assert_eq!(verify_pattern(&mem, &mb), Ok(()));
        // One page.
        let (bytes, mb) = simulate(1, 3, false);
        assert_eq!(verify_pattern(&guest_ram(&bytes, &mb), &mb), Ok(()));
    }

    #[test]
    fn stray_byte_at_end_of_page_is_named_with_its_offset() {
        let (bytes, mb) = simulate(100, 250, false);
        let mem = guest_ram(&bytes, &mb);
        let page_gpa = mb.ws_start + 70 * PAGE_SIZE;
        mem.write_obj(0x5au8, GuestAddress(page_gpa + 4095))
            .unwrap();
        let err = verify_pattern(&mem, &mb).unwrap_err();
        assert_eq!(
            err,
            PatternError::Stray {
                page: 70,
                gpa: page_gpa,
                offset: 4095,
                found: 0x5a,
            }
        );
        assert_eq!(
            err.to_string(),
            "Page 70 (GPA 0x146000) offset 4095 holds 0x5a, expected 0x00"
        );
        // Byte 1 and a later page: the first bad byte in address order wins.
        mem.write_obj(1u8, GuestAddress(mb.ws_start + 90 * PAGE_SIZE + 1))
            .unwrap();
        mem.write_obj(7u8, GuestAddress(page_gpa + 1)).unwrap();
        assert!(matches!(
            verify_pattern(&mem, &mb),
            Err(PatternError::Stray {
                page: 70,
                offset: 1,
                found: 7,
                ..
            })
        ));
    }

    #[test]
    fn first_bad_byte_in_address_order() {
        let (bytes, mb) = simulate(40, 85, false);
        let mem = guest_ram(&bytes, &mb);
        // A lost write at byte 0 of page 20 and a stray byte in page 30: page 20 first.
        mem.write_obj(
            bytes[20].wrapping_sub(1),
            GuestAddress(mb.ws_start + 20 * PAGE_SIZE),
        )
        .unwrap();
        mem.write_obj(1u8, GuestAddress(mb.ws_start + 30 * PAGE_SIZE + 8))
            .unwrap();
        let err = verify_pattern(&mem, &mb).unwrap_err();
        assert_eq!(err.page(), Some(20), "{err}");
        assert!(err.to_string().contains("offset 0"), "{err}");
        // A stray byte in page 10 comes before it.
        mem.write_obj(1u8, GuestAddress(mb.ws_start + 10 * PAGE_SIZE + 8))
            .unwrap();
        assert!(matches!(
            verify_pattern(&mem, &mb),
            Err(PatternError::Stray {
                page: 10,
                offset: 8,
                ..
            })
        ));
    }

    #[test]
    fn block_checks_every_byte() {
        let gpa = 0x40_0000;
        let pages = 300;
        let mem = GuestMem::from_ranges(&[(GuestAddress(gpa), pages as usize * 4096)])
            .expect("anonymous memory");
        let mut area = BlockArea::default();
        for s in 0..(pages + 17) {
            let at = GuestAddress(gpa + (s % pages) * PAGE_SIZE);
            let b: u8 = mem.read_obj(at).unwrap();
            mem.write_obj(b.wrapping_add(1), at).unwrap();
            area.progress = s + 1;
            if (s + 1) % pages == 0 {
                area.passes += 1;
            }
        }
        assert_eq!(verify_block(&mem, gpa, pages, &area), Ok(()));
        mem.write_obj(0xffu8, GuestAddress(gpa + 299 * PAGE_SIZE + 4095))
            .unwrap();
        assert_eq!(
            verify_block(&mem, gpa, pages, &area),
            Err(PatternError::Stray {
                page: 299,
                gpa: gpa + 299 * PAGE_SIZE,
                offset: 4095,
                found: 0xff,
            })
        );
    }

    #[test]
    fn regions_and_holes() {
        // A working set across two adjacent regions reads page by page where it must.
        let mem = GuestMem::from_ranges(&[
            (GuestAddress(0), 0x10_3000),
            (GuestAddress(0x10_3000), 0x20_0000),
        ])
        .expect("anonymous memory");
        let (bytes, mb) = simulate(100, 130, false);
        mb.write(&mem).unwrap();
        for (i, &b) in bytes.iter().enumerate() {
            mem.write_obj(b, GuestAddress(mb.ws_start + i as u64 * PAGE_SIZE))
                .unwrap();
        }
        assert_eq!(verify_pattern(&mem, &mb), Ok(()));
        mem.write_obj(3u8, GuestAddress(0x10_3000 + 2)).unwrap();
        assert!(matches!(
            verify_pattern(&mem, &mb),
            Err(PatternError::Stray {
                page: 3,
                offset: 2,
                ..
            })
        ));
        // A working set running into a hole names the first page that cannot be read.
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_5000)]).expect("anonymous memory");
        let mb = Mailbox::dirty(0x10_0000, 100, 0);
        assert!(matches!(
            verify_pattern(&mem, &mb),
            Err(PatternError::Memory { gpa: 0x10_5000, .. })
        ));
        // An absurd page count fails on the hole too, without allocating it.
        let mb = Mailbox::dirty(0x10_0000, u64::MAX, 0);
        assert!(matches!(
            verify_pattern(&mem, &mb),
            Err(PatternError::Memory { gpa: 0x10_5000, .. })
        ));
    }

    #[test]
    fn working_set_outside_the_abi_area() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x20_0000)]).expect("anonymous memory");
        for start in [0x3000, 0x8000, 0xf_f000, 0x10_0800] {
            let mb = Mailbox::dirty(start, 4, 0);
            let err = verify_pattern(&mem, &mb).unwrap_err();
            assert_eq!(err, PatternError::BadWorkingSet(start));
        }
        assert_eq!(
            PatternError::BadWorkingSet(0x3000).to_string(),
            "Working set starts at GPA 0x3000, not a page at or above GPA 0x100000"
        );
    }

    #[test]
    fn stray_byte_search() {
        let mut page = vec![0u8; 4096];
        assert_eq!(stray_byte(&page), None);
        page[0] = 0xff;
        assert_eq!(stray_byte(&page), None, "byte 0 is the pattern's");
        page[4095] = 2;
        assert_eq!(stray_byte(&page), Some((4095, 2)));
        page[1] = 9;
        assert_eq!(stray_byte(&page), Some((1, 9)));
        assert_eq!(stray_byte(&[]), None);
    }

    #[test]
    fn rejects_foreign_mailbox() {
        let mb = Mailbox::default();
        assert_eq!(verify_bytes(&[0], &mb), Err(PatternError::EmptyWorkingSet));
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x20_0000)]).expect("anonymous memory");
        assert_eq!(verify_pattern(&mem, &mb), Err(PatternError::BadMagic(0)));
        let mb = Mailbox::dirty(0x10_0000, 4, 0);
        mb.write(&mem).unwrap();
        assert_eq!(verify_pattern(&mem, &Mailbox::read(&mem).unwrap()), Ok(()));
        mem.write_obj(1u8, GuestAddress(0x10_2000)).unwrap();
        assert!(matches!(
            verify_pattern(&mem, &mb),
            Err(PatternError::Edge { page: 2, .. })
        ));
    }
}
