//! Control messages of the TCP migration protocol.
//!
//! The forward direction carries a 16-byte [`Hello`] and then the devstate stream (see
//! `FORMAT.md`), exactly what a `file:` migration writes. Everything else is a 16-byte
//! [`Msg`] (plus an optional UTF-8 text of at most [`MAX_TEXT`] bytes) on the return path,
//! except COMMIT, which the source sends after the stream's end marker:
//!
//! ```text
//! source                                   destination
//!   | Hello(proto, features)          --->   |  refuse an unknown protocol version
//!   |                                 <---   | HelloAck(proto, accepted features) | Refuse
//!   | header, config record           --->   |  compare machine type and configuration,
//!   |                                 <---   | Accept | Refuse(list of differences)
//!   | RAM records (pre-copy passes)   --->   |  reset connectors, write pages
//!   |                                 <---   | Received(pages written) every 4096 pages
//!   | [pause] last RAM, sections, end --->   |  validate and load everything
//!   |                                 <---   | Loaded | Failed(text)
//!   | Commit                          --->   |  from here the source never resumes
//!   |                                 <---   | Committed   (destination resumes)
//! ```
//!
//! With [`FEATURE_POSTCOPY`], COMMIT's value 1 means the pages still dirty follow it (see
//! [`crate::postcopy`]).
//!
//! Any failure before COMMIT resumes the source. After COMMIT the source stays stopped
//! (`postmigrate`); if `Committed` never arrives its status is failed with "destination state
//! unknown" and it still does not resume, so the guest never runs twice.

use std::io::{self, Read, Write};

/// Magic of the [`Hello`] message.
pub const HELLO_MAGIC: [u8; 8] = *b"FERRYMIG";
/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Protocol versions this build accepts (the current one and the previous one).
pub const ACCEPTED_PROTOCOLS: [u16; 1] = [PROTOCOL_VERSION];
/// Feature bit: the destination reads SPARSE RAM records (`devstate::sparse`).
pub const FEATURE_SPARSE_PAGES: u32 = 1;
/// Feature bit: the destination reports its progress with [`Kind::Received`] messages, so the
/// source can wait for it to catch up before it decides to stop the guest.
pub const FEATURE_PROGRESS: u32 = 2;
/// Feature bit: pages travel on extra page channels ([`crate::pages`]); the [`Hello`] asks
/// for a number of them, the [`Kind::HelloAck`] grants at most that many (bits 16..32 of its
/// value) and carries the token the channels present (its text, in decimal).
pub const FEATURE_PAGE_CHANNELS: u32 = 4;
/// Feature bit: post-copy may follow COMMIT ([`crate::postcopy`]); offered and accepted only
/// with capability `postcopy-ram` on each side.
pub const FEATURE_POSTCOPY: u32 = 8;
/// Feature bit: the source has `auto-converge` on, so the destination runs its page-channel
/// threads at [`crate::AUTO_CONVERGE_PAGE_NICE`] too unless its own
/// `__org.ferry_page-thread-nice` is set (an older destination ignores it).
pub const FEATURE_GUEST_FIRST: u32 = 16;
/// Features this build can receive.
pub const SUPPORTED_FEATURES: u32 = FEATURE_SPARSE_PAGES
    | FEATURE_PROGRESS
    | FEATURE_PAGE_CHANNELS
    | FEATURE_POSTCOPY
    | FEATURE_GUEST_FIRST;
/// The destination sends [`Kind::Received`] each time it has written this many more pages.
pub const PROGRESS_PAGES: u64 = 4096;
/// Longest text a control message may carry.
pub const MAX_TEXT: u32 = 64 << 10;

/// Message kinds. 0 is reserved as invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Destination: the protocol version is accepted (`value` = version in bits 0..16, the
    /// [`Hello`] features it accepts in bits 32..64).
    HelloAck = 1,
    /// Destination: the configuration matches; pages may follow.
    Accept = 2,
    /// Destination: refused before any RAM moved (text = reasons).
    Refuse = 3,
    /// Destination: everything loaded and validated.
    Loaded = 4,
    /// Destination: loading failed (text = reason).
    Failed = 5,
    /// Source: switch over; the source will not run the guest again.
    Commit = 6,
    /// Destination: COMMIT received; the guest runs here now.
    Committed = 7,
    /// Destination: pages written so far (`value`); only with [`FEATURE_PROGRESS`].
    Received = 8,
    /// Destination, on a page channel: every record before SYNC `value` is written.
    Synced = 9,
    /// Destination, during post-copy: a vCPU waits for the page at `value`.
    PageRequest = 10,
    /// Destination: every post-copy page (`value` of them) is in place.
    PostcopyDone = 11,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::HelloAck,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Loaded,
            5 => Kind::Failed,
            6 => Kind::Commit,
            7 => Kind::Committed,
            8 => Kind::Received,
            9 => Kind::Synced,
            10 => Kind::PageRequest,
            11 => Kind::PostcopyDone,
            _ => return None,
        })
    }
}

/// The first 16 bytes on the forward path: magic, protocol version, offered features, page
/// channels asked for (with [`FEATURE_PAGE_CHANNELS`]; reserved before). A peer that predates a feature bit reads it as reserved and accepts nothing, so
/// features never need a new protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub protocol: u16,
    /// `FEATURE_*` bits the source would like to use.
    pub features: u32,
    /// Page channels the source would like (with [`FEATURE_PAGE_CHANNELS`]).
    pub channels: u16,
}

impl Hello {
    /// Write the 16-byte message.
    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&HELLO_MAGIC);
        b[8..10].copy_from_slice(&self.protocol.to_le_bytes());
        b[10..14].copy_from_slice(&self.features.to_le_bytes());
        b[14..16].copy_from_slice(&self.channels.to_le_bytes());
        w.write_all(&b)?;
        w.flush()
    }

    /// Read and check the magic.
    pub fn read(r: &mut impl Read) -> io::Result<Hello> {
        let mut b = [0u8; 16];
        r.read_exact(&mut b)?;
        Hello::parse(&b)
    }

    /// Parse the 16 bytes and check the magic.
    pub fn parse(b: &[u8; 16]) -> io::Result<Hello> {
        if ferry_tls::looks_like_tls(b) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the source started a TLS handshake, but this destination has no tls-creds set \
                 (set the same TLS parameters on both sides)",
            ));
        }
        if b[..8] != HELLO_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a Ferry migration connection (bad hello magic)",
            ));
        }
        Ok(Hello {
            protocol: u16::from_le_bytes([b[8], b[9]]),
            features: u32::from_le_bytes(b[10..14].try_into().expect("4 bytes")),
            channels: u16::from_le_bytes([b[14], b[15]]),
        })
    }
}

/// A control message: kind, a numeric value and an optional text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// What it says.
    pub kind: Kind,
    /// Kind-specific number (protocol version, record count, ...).
    pub value: u64,
    /// Kind-specific text (reasons), at most [`MAX_TEXT`] bytes.
    pub text: String,
}

impl Msg {
    /// A message without text.
    pub fn new(kind: Kind, value: u64) -> Msg {
        Msg {
            kind,
            value,
            text: String::new(),
        }
    }

    /// A message with a text, truncated to [`MAX_TEXT`] bytes at a character boundary.
    pub fn with_text(kind: Kind, text: &str) -> Msg {
        let mut end = text.len().min(MAX_TEXT as usize);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Msg {
            kind,
            value: 0,
            text: text[..end].to_owned(),
        }
    }

    /// Layout: u16 kind | u16 reserved | u32 text length | u64 value | text.
    pub fn write(&self, w: &mut (impl Write + ?Sized)) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + self.text.len());
        b.extend_from_slice(&(self.kind as u16).to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(
            &u32::try_from(self.text.len())
                .unwrap_or(MAX_TEXT)
                .to_le_bytes(),
        );
        b.extend_from_slice(&self.value.to_le_bytes());
        b.extend_from_slice(self.text.as_bytes());
        w.write_all(&b)?;
        w.flush()
    }

    /// Read one message, refusing unknown kinds and over-long texts.
    pub fn read(r: &mut impl Read) -> io::Result<Msg> {
        let mut b = [0u8; 16];
        r.read_exact(&mut b)?;
        let raw_kind = u16::from_le_bytes([b[0], b[1]]);
        let kind = Kind::from_u16(raw_kind).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown control message kind {raw_kind}"),
            )
        })?;
        let len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if len > MAX_TEXT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("control message text of {len} bytes is too long"),
            ));
        }
        let value = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let mut text = vec![0u8; len as usize];
        r.read_exact(&mut text)?;
        Ok(Msg {
            kind,
            value,
            text: String::from_utf8_lossy(&text).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_client_hello_is_named_as_such() {
        let mut b: &[u8] = &[
            0x16, 0x03, 0x01, 0x05, 0xa0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let e = Hello::read(&mut b).unwrap_err().to_string();
        assert!(e.starts_with("the source started a TLS handshake"), "{e}");
        let mut b: &[u8] = &[0x17; 16];
        let e = Hello::read(&mut b).unwrap_err().to_string();
        assert!(e.contains("bad hello magic"), "{e}");
    }

    #[test]
    fn messages_round_trip() {
        let mut buf = Vec::new();
        let hello = Hello {
            protocol: 1,
            features: FEATURE_SPARSE_PAGES,
            channels: 0,
        };
        hello.write(&mut buf).unwrap();
        Msg::with_text(Kind::Refuse, "vCPUs: source 2, destination 1")
            .write(&mut buf)
            .unwrap();
        Msg::new(Kind::Loaded, 42).write(&mut buf).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(Hello::read(&mut r).unwrap(), hello);
        let m = Msg::read(&mut r).unwrap();
        assert_eq!(
            (m.kind, m.text.as_str()),
            (Kind::Refuse, "vCPUs: source 2, destination 1")
        );
        assert_eq!(Msg::read(&mut r).unwrap(), Msg::new(Kind::Loaded, 42));
        assert!(r.is_empty());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(Hello::read(&mut &b"QEVM\0\0\0\x03abcdefgh"[..]).is_err());
        let mut b = [0u8; 16];
        assert!(Msg::read(&mut &b[..]).is_err(), "kind 0 is invalid");
        b[0] = 4;
        b[4..8].copy_from_slice(&(MAX_TEXT + 1).to_le_bytes());
        assert!(Msg::read(&mut &b[..]).is_err(), "text length is bounded");
        let long = "é".repeat(MAX_TEXT as usize);
        assert!(Msg::with_text(Kind::Failed, &long).text.len() <= MAX_TEXT as usize);
    }
}
