//! Versioned device state for Ferry.
//!
//! - [`record!`] turns one declarative description into a plain state struct, its encoder,
//!   its bounded decoder and its schema.
//! - [`Section`] adds a name, a version range, machine-type-gated [`Subsection`]s and the
//!   `pre_save` / `pre_load` / `post_load` hooks.
//! - [`StreamWriter`] / [`StreamReader`] write and validate the checksummed stream (layout in
//!   [`stream`]); every decoding failure is a typed [`DecodeError`] with a byte offset.
//! - [`scan`] frames a whole stream leniently, reporting every problem with its offset;
//!   it shares [`wire`]'s framing with the strict [`StreamReader`].
//! - [`diff`] compares two sets of sections field by field, volatile fields apart.
//! - [`Catalog`] lists the section types a build knows and exports a [`MachineSchema`] per
//!   machine type, from which [`decode_fields`] decodes any section without its Rust type.

pub mod diff;
mod error;
mod field;
pub mod scan;
pub mod schema;
mod section;
pub mod sparse;
pub mod stream;
pub mod wire;

pub use error::DecodeError;
pub use field::{Field, FieldKind, FieldOpts, FieldSchema, Reader, Record, WireEnum, put_len};
pub use schema::{
    Catalog, MachineSchema, SectionSchema, SubsectionSchema, Value, decode_fields, encode_fields,
};
pub use section::{Section, SectionInfo, Sub, Subsection, fields_at};
pub use stream::{
    FORMAT_VERSION, Header, Item, MAGIC, PAGE_SIZE, RamKind, RamRecord, RawSection, RawSubsection,
    StreamReader, StreamWriter, Tag, encode_header, encode_section,
};
