//! Page channels: extra TCP connections (plain or TLS, like the main one) that carry guest
//! pages beside the main stream, one sender thread per channel on the source and one writer
//! thread per channel on the destination. Negotiated in the [`Hello`](crate::protocol::Hello)
//! (`FEATURE_PAGE_CHANNELS`); with them the main stream carries no RAM records.
//!
//! ```text
//! channel hello := "FERRYCHN" | u16 index (1..=MAX_CHANNELS) | u16 0 | u32 0 | u64 token   (24 bytes)
//! record := ram | sync | end                                         (tag first; 0 invalid)
//! ram    := 0x02 | u64 gpa | u32 pages | u8 kind | u32 body_len | u32 head_crc
//!           | body[body_len] | u32 body_crc                          (no body CRC if body_len 0)
//!           kind 1 ZERO: body_len 0; 2 DATA: pages * 4096; 3 SPARSE: `devstate::sparse` body
//! sync   := 0x06 | u64 pass | u32 crc     (answered by Msg `Synced(pass)` on the same channel
//!                                          once every record before it is in guest memory)
//! end    := 0x04 | u64 records | u32 crc  (last record of the channel)
//! ```
//!
//! `head_crc` covers the record from its tag to `body_len`, so no byte lands in guest memory
//! at an address that was not checked. A DATA body goes straight from guest memory to the
//! socket on the source, so a page the guest rewrites meanwhile can fail its `body_crc`: such
//! a page is dirty again and always sent again, so the destination notes it as torn and
//! requires a later good copy; a page still torn when the stream ends fails the migration,
//! naming the record. The source sends pass `n + 1` only after every channel answered SYNC
//! `n`, so a page's copies are written in the order they were sent.

mod receive;
mod send;

pub(crate) use receive::{Book, Grant, Receivers};
pub(crate) use send::Senders;

use devstate::PAGE_SIZE;
use devstate::wire::{RamKind, Tag};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::Mutex;

/// Sets the calling thread's nice value (page-channel threads, the destination's RAM
/// prefault); lowering it again may be refused without root (`RLIMIT_NICE`).
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority changes the scheduling priority of the calling thread only (Linux
    // applies PRIO_PROCESS with a thread id to that thread alone); no memory is passed.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Highest `__org.ferry_page-thread-nice`.
pub const MAX_NICE: u8 = 19;

/// Magic of a page channel's hello.
pub const CHANNEL_MAGIC: [u8; 8] = *b"FERRYCHN";
/// Most page channels a migration may use.
pub const MAX_CHANNELS: u16 = 8;
/// Tag of the SYNC record (beyond the devstate tags).
const TAG_SYNC: u8 = 6;
/// Bytes of a RAM record's head, tag to `head_crc` included.
const HEAD: usize = 1 + 8 + 4 + 1 + 4 + 4;

/// The 24 bytes that open a page channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelHello {
    /// Which channel this is (1-based).
    pub index: u16,
    /// The migration's token, from the destination's HelloAck.
    pub token: u64,
}

impl ChannelHello {
    /// Encode.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&CHANNEL_MAGIC);
        b[8..10].copy_from_slice(&self.index.to_le_bytes());
        b[16..24].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    /// Parse the 8 bytes that follow the first 16 (whose magic the caller checked).
    pub fn parse(first: &[u8; 16], rest: &[u8; 8]) -> Result<ChannelHello, String> {
        let index = u16::from_le_bytes([first[8], first[9]]);
        if !(1..=MAX_CHANNELS).contains(&index) || first[10..16] != [0; 6] {
            return Err(format!(
                "page channel hello names channel {index} (1..={MAX_CHANNELS} allowed)"
            ));
        }
        Ok(ChannelHello {
            index,
            token: u64::from_le_bytes(*rest),
        })
    }
}

/// Encode a RAM record's head.
fn encode_head(gpa: u64, pages: u32, kind: RamKind, body_len: u32) -> [u8; HEAD] {
    let mut b = [0u8; HEAD];
    b[0] = Tag::Ram as u8;
    b[1..9].copy_from_slice(&gpa.to_le_bytes());
    b[9..13].copy_from_slice(&pages.to_le_bytes());
    b[13] = kind as u8;
    b[14..18].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32fast::hash(&b[..18]);
    b[18..22].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Encode a SYNC or END record.
fn encode_marker(tag: u8, value: u64) -> [u8; 13] {
    let mut b = [0u8; 13];
    b[0] = tag;
    b[1..9].copy_from_slice(&value.to_le_bytes());
    let crc = crc32fast::hash(&b[..9]);
    b[9..13].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A RAM record's validated head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    gpa: u64,
    pages: u32,
    kind: RamKind,
    body_len: usize,
}

/// What a channel's next record is, read up to its body.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Ram(Head),
    Sync(u64),
    End(u64),
}

/// Read the next record's head (RAM) or the whole record (SYNC, END), checking its CRC,
/// kind, page count, address and body length. `at` is the record's offset in the channel.
fn read_next(r: &mut impl Read, at: u64) -> Result<Next, String> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).map_err(|e| read_failed(&e, at))?;
    match tag[0] {
        t if t == Tag::Ram as u8 => {
            let mut b = [0u8; HEAD];
            b[0] = t;
            r.read_exact(&mut b[1..]).map_err(|e| read_failed(&e, at))?;
            let stored = u32::from_le_bytes(b[18..22].try_into().expect("4 bytes"));
            if crc32fast::hash(&b[..18]) != stored {
                return Err(format!("RAM record head at offset {at} fails its CRC"));
            }
            let gpa = u64::from_le_bytes(b[1..9].try_into().expect("8 bytes"));
            let pages = u32::from_le_bytes(b[9..13].try_into().expect("4 bytes"));
            let body_len = u32::from_le_bytes(b[14..18].try_into().expect("4 bytes")) as usize;
            let bad = |why: String| format!("RAM record at offset {at}: {why}");
            let kind =
                RamKind::from_u8(b[13]).ok_or_else(|| bad(format!("unknown kind {}", b[13])))?;
            if !(1..=kind.max_pages()).contains(&pages) {
                return Err(bad(devstate::wire::pages_out_of_range(pages)));
            }
            let head = devstate::wire::RamHead {
                gpa,
                pages,
                kind: kind as u8,
            };
            head.check_range().map_err(bad)?;
            let want = match kind {
                RamKind::Zero => body_len == 0,
                RamKind::Data => body_len == pages as usize * PAGE_SIZE,
                RamKind::Sparse => {
                    devstate::sparse::check_len(body_len as u64, pages).map_err(bad)?;
                    true
                }
            };
            if !want {
                return Err(bad(format!(
                    "{} body of {body_len} bytes for {pages} pages",
                    kind.name()
                )));
            }
            Ok(Next::Ram(Head {
                gpa,
                pages,
                kind,
                body_len,
            }))
        }
        t if t == TAG_SYNC || t == Tag::End as u8 => {
            let mut b = [0u8; 13];
            b[0] = t;
            r.read_exact(&mut b[1..]).map_err(|e| read_failed(&e, at))?;
            let stored = u32::from_le_bytes(b[9..13].try_into().expect("4 bytes"));
            if crc32fast::hash(&b[..9]) != stored {
                return Err(format!("marker record at offset {at} fails its CRC"));
            }
            let v = u64::from_le_bytes(b[1..9].try_into().expect("8 bytes"));
            Ok(if t == TAG_SYNC {
                Next::Sync(v)
            } else {
                Next::End(v)
            })
        }
        t => Err(format!("unknown record tag {t} at offset {at}")),
    }
}

/// Most torn records one SYNC answer may list.
const MAX_TORN: usize = 2048;

/// The text of a `Synced` answer: the torn records since the last SYNC, as `GPA+PAGES` in
/// hexadecimal, comma-separated (empty: none).
fn encode_torn(torn: &[(u64, u32)]) -> Result<String, crate::MigrationError> {
    if torn.len() > MAX_TORN {
        return Err(crate::MigrationError::Protocol(format!(
            "{} RAM records failed their CRC in one pass (at most {MAX_TORN} are resent)",
            torn.len()
        )));
    }
    Ok(torn
        .iter()
        .map(|(gpa, pages)| format!("{gpa:x}+{pages:x}"))
        .collect::<Vec<_>>()
        .join(","))
}

/// Parse a `Synced` answer's text; every range must be page aligned and at most one record.
fn decode_torn(text: &str) -> Result<Vec<(u64, u32)>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .take(MAX_TORN + 1)
        .enumerate()
        .map(|(i, e)| {
            if i == MAX_TORN {
                return Err(format!("more than {MAX_TORN} torn records listed"));
            }
            let (g, p) = e
                .split_once('+')
                .ok_or_else(|| format!("bad torn range '{e}'"))?;
            let gpa = u64::from_str_radix(g, 16).map_err(|_| format!("bad torn range '{e}'"))?;
            let pages = u32::from_str_radix(p, 16).map_err(|_| format!("bad torn range '{e}'"))?;
            if !gpa.is_multiple_of(PAGE_SIZE as u64)
                || !(1..=devstate::stream::MAX_DATA_PAGES).contains(&pages)
            {
                return Err(format!("bad torn range '{e}'"));
            }
            Ok((gpa, pages))
        })
        .collect()
}

/// Why reading the record at `at` failed, in the main stream's words.
fn read_failed(e: &io::Error, at: u64) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        format!("Truncated stream in the record at offset {at}")
    } else {
        format!("I/O error while reading the record at offset {at}: {e}")
    }
}

/// Pages whose last copy failed its body CRC, with where that copy was (channel, offset).
#[derive(Debug, Default)]
pub(crate) struct Torn {
    pages: Mutex<BTreeMap<u64, (u16, u64)>>,
}

impl Torn {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (u16, u64)>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The copy of `pages` pages at `gpa` in channel `index` at `offset` failed its CRC.
    fn mark(&self, gpa: u64, pages: u32, index: u16, offset: u64) {
        let first = gpa / PAGE_SIZE as u64;
        let mut t = self.lock();
        for p in first..first + u64::from(pages) {
            t.insert(p, (index, offset));
        }
    }

    /// A good copy of these pages arrived.
    fn clear(&self, gpa: u64, pages: u32) {
        let mut t = self.lock();
        if t.is_empty() {
            return;
        }
        let first = gpa / PAGE_SIZE as u64;
        let gone: Vec<u64> = t
            .range(first..first + u64::from(pages))
            .map(|(&p, _)| p)
            .collect();
        for p in gone {
            t.remove(&p);
        }
    }

    /// Why the stream cannot be loaded, if a page never arrived intact.
    pub(crate) fn check(&self) -> Result<(), String> {
        let t = self.lock();
        match t.iter().next() {
            None => Ok(()),
            Some((&page, &(index, offset))) => Err(format!(
                "{} page(s) failed their CRC and were never sent again, first at {:#x} \
                 (page channel {index}, RAM record at offset {offset})",
                t.len(),
                page * PAGE_SIZE as u64
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let mut b = Vec::new();
        b.extend_from_slice(&encode_head(0x2000, 2, RamKind::Data, 8192));
        b.extend_from_slice(&encode_marker(TAG_SYNC, 7));
        b.extend_from_slice(&encode_marker(Tag::End as u8, 3));
        let mut r = b.as_slice();
        assert_eq!(
            read_next(&mut r, 0).unwrap(),
            Next::Ram(Head {
                gpa: 0x2000,
                pages: 2,
                kind: RamKind::Data,
                body_len: 8192
            })
        );
        assert_eq!(read_next(&mut r, 22).unwrap(), Next::Sync(7));
        assert_eq!(read_next(&mut r, 35).unwrap(), Next::End(3));
        let mut bad = b.clone();
        bad[3] ^= 1;
        let e = read_next(&mut bad.as_slice(), 100).unwrap_err();
        assert!(e.contains("offset 100") && e.contains("CRC"), "{e}");
        // A DATA body whose length does not match its pages, an unaligned address, tag 0.
        let e = read_next(&mut &encode_head(0, 2, RamKind::Data, 4096)[..], 0).unwrap_err();
        assert!(e.contains("body of 4096 bytes"), "{e}");
        let e = read_next(&mut &encode_head(5, 1, RamKind::Zero, 0)[..], 0).unwrap_err();
        assert!(e.contains("not page aligned"), "{e}");
        assert!(
            read_next(&mut &[0u8; 22][..], 0)
                .unwrap_err()
                .contains("tag 0")
        );
    }

    #[test]
    fn channel_hello_is_bounded() {
        let h = ChannelHello {
            index: 2,
            token: 99,
        };
        let b = h.encode();
        let (first, rest) = b.split_at(16);
        let parse = |f: &[u8]| ChannelHello::parse(f.try_into().unwrap(), rest.try_into().unwrap());
        assert_eq!(parse(first).unwrap(), h);
        let mut f = first.to_vec();
        f[8] = 0;
        assert!(parse(&f).is_err());
        f[8] = MAX_CHANNELS as u8 + 1;
        assert!(parse(&f).is_err());
    }

    #[test]
    fn torn_lists_round_trip_and_are_bounded() {
        let t = vec![(0x1000, 2), (0x7f000, 256)];
        assert_eq!(decode_torn(&encode_torn(&t).unwrap()).unwrap(), t);
        assert_eq!(decode_torn("").unwrap(), vec![]);
        for bad in ["1001+1", "1000+0", "1000+101", "zz+1", "1000"] {
            assert!(decode_torn(bad).is_err(), "{bad}");
        }
        assert!(encode_torn(&vec![(0, 1); MAX_TORN + 1]).is_err());
    }

    #[test]
    fn torn_pages_need_a_later_good_copy() {
        let t = Torn::default();
        t.mark(0x10000, 4, 1, 500);
        t.clear(0x11000, 2);
        let e = t.check().unwrap_err();
        assert!(
            e.starts_with("2 page(s)") && e.contains("0x10000") && e.contains("offset 500"),
            "{e}"
        );
        t.clear(0x10000, 4);
        assert!(t.check().is_ok());
    }
}
