//! The memory-pattern verifier of the `dirty` workload (QEMU's `check_guests_ram`, made
//! exact with the mailbox's `progress` counter; see the invariant in [`super`]).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::PAGE_SIZE;
use super::mailbox::{BlockArea, MAGIC, MODE_DIRTY, Mailbox};
use crate::vm::memory::GuestMem;

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
    /// QEMU's rule broken: a step other than 0 or −1 between neighbours, or a second edge.
    #[error("Page {page} (GPA {gpa:#x}) holds {found:#04x} after {previous:#04x}: {reason}")]
    Edge {
        /// Page index in the working set.
        page: u64,
        /// Its guest-physical address.
        gpa: u64,
        /// Byte found.
        found: u8,
        /// Byte of the previous page.
        previous: u8,
        /// Which rule broke.
        reason: &'static str,
    },
    /// A page holds a value other than the one the mailbox implies.
    #[error("Page {page} (GPA {gpa:#x}) holds {found:#04x}, expected {expected}")]
    Mismatch {
        /// Page index in the working set.
        page: u64,
        /// Its guest-physical address.
        gpa: u64,
        /// Byte found.
        found: u8,
        /// Expected value(s), e.g. `0x05` or `0x05 or 0x06`.
        expected: String,
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

/// Checks the first byte of every working-set page against `mailbox` (read while the
/// vCPUs are paused). Returns the first bad page.
pub fn verify_pattern(mem: &GuestMem, mailbox: &Mailbox) -> Result<(), PatternError> {
    if mailbox.magic != MAGIC {
        return Err(PatternError::BadMagic(mailbox.magic));
    }
    if mailbox.mode != MODE_DIRTY {
        return Err(PatternError::NotDirty(mailbox.mode));
    }
    let mut bytes = Vec::with_capacity(mailbox.ws_pages as usize);
    for i in 0..mailbox.ws_pages {
        let gpa = mailbox.ws_start + i * PAGE_SIZE;
        let b = mem
            .read_obj::<u8>(GuestAddress(gpa))
            .map_err(|e| PatternError::Memory {
                gpa,
                source: GuestMemoryErrorEq(e),
            })?;
        bytes.push(b);
    }
    verify_bytes(&bytes, mailbox)
}

/// Checks a hot-plugged memory block (`pages` pages from `gpa`) against its mailbox area
/// (the same invariant as the main working set, over the block's own `progress`). Read
/// while the vCPUs are paused; `mem` must hold the block.
pub fn verify_block(
    mem: &GuestMem,
    gpa: u64,
    pages: u64,
    area: &BlockArea,
) -> Result<(), PatternError> {
    let mut bytes = Vec::with_capacity(pages as usize);
    for i in 0..pages {
        let at = gpa + i * PAGE_SIZE;
        let b = mem
            .read_obj::<u8>(GuestAddress(at))
            .map_err(|e| PatternError::Memory {
                gpa: at,
                source: GuestMemoryErrorEq(e),
            })?;
        bytes.push(b);
    }
    let mut mb = Mailbox::dirty(gpa, pages, 0);
    mb.progress = area.progress;
    mb.pass_count = area.passes;
    verify_bytes(&bytes, &mb)
}

/// [`verify_pattern`] on the first bytes of the pages, already read.
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

    #[test]
    fn rejects_foreign_mailbox() {
        let mb = Mailbox::default();
        assert_eq!(verify_bytes(&[0], &mb), Err(PatternError::EmptyWorkingSet));
        let mem = crate::vm::memory::GuestMem::from_ranges(&[(GuestAddress(0), 0x20_0000)])
            .expect("anonymous memory");
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
