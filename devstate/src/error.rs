//! Typed decoding errors: each names where in the stream it happened.

/// Why a stream, section or field could not be decoded.
///
/// Offsets are absolute byte offsets from the start of the stream.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The first bytes are not a Ferry state stream.
    #[error("Not a Ferry state stream (bad magic at offset 0)")]
    BadMagic,
    /// The stream's format version is not one this build reads.
    #[error(
        "Unsupported stream format version {found} at offset {offset} (this build reads {supported})"
    )]
    UnsupportedFormat {
        /// Version found in the header.
        found: u16,
        /// Version this build reads.
        supported: u16,
        /// Offset of the format version.
        offset: u64,
    },
    /// The header's checksum does not match its bytes.
    #[error("Header CRC mismatch at offset {offset}")]
    HeaderCrc {
        /// Offset of the stored CRC.
        offset: u64,
    },
    /// The stream ended in the middle of something.
    #[error("Truncated stream in {context} at offset {offset}")]
    Truncated {
        /// What was being read (a section name, "header", "RAM record", ...).
        context: String,
        /// Offset where more bytes were expected.
        offset: u64,
    },
    /// A section the destination has no description for.
    #[error(
        "Unknown section '{name}' instance {instance} at offset {offset}; check that source and destination have the same devices"
    )]
    UnknownSection {
        /// Section name as read.
        name: String,
        /// Instance id as read.
        instance: u32,
        /// Offset of the section record.
        offset: u64,
    },
    /// A subsection the destination does not know.
    #[error("Unknown subsection '{name}' in section '{section}' at offset {offset}")]
    UnknownSubsection {
        /// Enclosing section.
        section: String,
        /// Subsection name as read.
        name: String,
        /// Offset of the subsection.
        offset: u64,
    },
    /// A section or subsection version newer than this build supports.
    #[error(
        "Section '{section}' version {version} is newer than supported version {max} at offset {offset}"
    )]
    VersionTooNew {
        /// Section (or `section/subsection`) name.
        section: String,
        /// Version in the stream.
        version: u32,
        /// Newest version this build reads.
        max: u32,
        /// Offset of the record.
        offset: u64,
    },
    /// A section version older than the minimum this build accepts.
    #[error(
        "Section '{section}' version {version} is older than minimum version {min} at offset {offset}"
    )]
    VersionTooOld {
        /// Section name.
        section: String,
        /// Version in the stream.
        version: u32,
        /// Oldest version this build reads.
        min: u32,
        /// Offset of the record.
        offset: u64,
    },
    /// A record's checksum does not match its bytes.
    #[error(
        "CRC mismatch in section '{section}' at offset {offset} (stored {stored:#010x}, computed {computed:#010x})"
    )]
    CrcMismatch {
        /// Section name, or "RAM record".
        section: String,
        /// Offset of the record.
        offset: u64,
        /// CRC stored in the stream.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// A length or count larger than the schema allows.
    #[error(
        "Length {len} of '{what}' in section '{section}' exceeds the schema bound {bound} at offset {offset}"
    )]
    LengthOverBound {
        /// Section name.
        section: String,
        /// Field or record that carried the length.
        what: String,
        /// Length read.
        len: u64,
        /// Largest length allowed.
        bound: u64,
        /// Offset of the length.
        offset: u64,
    },
    /// A field holds a value its type does not allow.
    #[error("Invalid value {value} for field '{field}' in section '{section}' at offset {offset}")]
    InvalidValue {
        /// Section name.
        section: String,
        /// Field name.
        field: String,
        /// The value read.
        value: u64,
        /// Offset of the field.
        offset: u64,
    },
    /// A section body has bytes its description does not account for.
    #[error("Section '{section}' has {extra} unexpected trailing bytes at offset {offset}")]
    TrailingBytes {
        /// Section name.
        section: String,
        /// Number of bytes left over.
        extra: u64,
        /// Offset of the first extra byte.
        offset: u64,
    },
    /// A record that may not appear here (wrong tag or wrong order).
    #[error("Unexpected record tag {tag:#04x} ({why}) at offset {offset}")]
    UnexpectedRecord {
        /// Tag byte read.
        tag: u8,
        /// Why it is not allowed here.
        why: &'static str,
        /// Offset of the tag.
        offset: u64,
    },
    /// The same section instance appeared twice.
    #[error("Duplicate section '{name}' instance {instance} at offset {offset}")]
    DuplicateSection {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Offset of the second copy.
        offset: u64,
    },
    /// A section the destination requires never arrived.
    #[error("Missing section '{name}' instance {instance}: the stream ended without it")]
    MissingSection {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
    },
    /// The end marker's record counts disagree with what was read.
    #[error("End marker at offset {offset} counts {stated} records but {seen} were read")]
    CountMismatch {
        /// Offset of the end marker.
        offset: u64,
        /// Count stated by the end marker.
        stated: u64,
        /// Count actually read.
        seen: u64,
    },
    /// A RAM record is malformed (bad kind, zero or over-large count, misaligned address).
    #[error("Invalid RAM record at offset {offset}: {why}")]
    BadRam {
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The source abandoned the stream and said why.
    #[error("The source abandoned the migration at offset {offset}: {reason}")]
    SourceAborted {
        /// The source's reason.
        reason: String,
        /// Offset of the abort record.
        offset: u64,
    },
    /// A `post_load` hook rejected the decoded state.
    #[error("Section '{section}' at offset {offset} rejected by post_load: {why}")]
    PostLoad {
        /// Section name.
        section: String,
        /// Offset of the section record.
        offset: u64,
        /// The hook's reason.
        why: String,
    },
    /// Reading the underlying transport failed.
    #[error("I/O error while reading the stream at offset {offset}")]
    Io {
        /// Offset reached.
        offset: u64,
        /// The transport error.
        #[source]
        source: std::io::Error,
    },
}

impl DecodeError {
    /// The byte offset the error refers to, when it has one.
    pub fn offset(&self) -> Option<u64> {
        use DecodeError::*;
        match self {
            BadMagic => Some(0),
            HeaderCrc { offset }
            | UnsupportedFormat { offset, .. }
            | Truncated { offset, .. }
            | UnknownSection { offset, .. }
            | UnknownSubsection { offset, .. }
            | VersionTooNew { offset, .. }
            | VersionTooOld { offset, .. }
            | CrcMismatch { offset, .. }
            | LengthOverBound { offset, .. }
            | InvalidValue { offset, .. }
            | TrailingBytes { offset, .. }
            | UnexpectedRecord { offset, .. }
            | DuplicateSection { offset, .. }
            | CountMismatch { offset, .. }
            | BadRam { offset, .. }
            | SourceAborted { offset, .. }
            | PostLoad { offset, .. }
            | Io { offset, .. } => Some(*offset),
            MissingSection { .. } => None,
        }
    }
}
