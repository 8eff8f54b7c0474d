//! Sections and subsections: the versioned unit of device state.
//!
//! A section is a described [`Record`] plus a name, a version range and optional subsections.
//! Which version is written and which subsections go with it is decided by the machine type,
//! so a state struct can be written for an older machine type by newer code.

use crate::{DecodeError, FieldSchema, Reader, Record};
use machine_types::MachineType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A subsection of section `S`: extra state sent only when `needed`.
///
/// `machine` is the static gate (does this machine type ever emit it?), `needed` the runtime
/// one (does this state need it now?); both must hold. Schemas list a subsection for a
/// machine type exactly when `machine` holds.
pub trait Subsection<S>: Sync {
    /// Subsection name, unique within the section.
    fn name(&self) -> &'static str;
    /// Version written; the destination accepts 1 up to its own version.
    fn version(&self) -> u32;
    /// Whether machine type `m` ever emits this subsection.
    fn for_machine(&self, m: &MachineType) -> bool;
    /// Whether this state needs the subsection now.
    fn needed(&self, s: &S) -> bool;
    /// Encode the subsection body.
    fn encode(&self, s: &S, w: &mut Vec<u8>);
    /// Decode a body of `version` into the state.
    fn decode(&self, s: &mut S, version: u32, r: &mut Reader<'_>) -> Result<(), DecodeError>;
    /// Fields of the body at `version`.
    fn fields(&self) -> Vec<FieldSchema>;
}

/// A subsection whose body is the described record `R`, projected from and into `S`.
#[derive(Debug)]
pub struct Sub<S, R> {
    /// Subsection name.
    pub name: &'static str,
    /// Version written.
    pub version: u32,
    /// Static machine-type gate.
    pub for_machine: fn(&MachineType) -> bool,
    /// Runtime gate.
    pub needed: fn(&S) -> bool,
    /// Take the subsection's record out of the state.
    pub get: fn(&S) -> R,
    /// Put a decoded record into the state.
    pub set: fn(&mut S, R),
}

impl<S, R: Record> Subsection<S> for Sub<S, R> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn for_machine(&self, m: &MachineType) -> bool {
        (self.for_machine)(m)
    }
    fn needed(&self, s: &S) -> bool {
        (self.needed)(s)
    }
    fn encode(&self, s: &S, w: &mut Vec<u8>) {
        (self.get)(s).encode(self.version, w);
    }
    fn decode(&self, s: &mut S, version: u32, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        let mut rec = R::default();
        rec.decode_into(version, r)?;
        (self.set)(s, rec);
        Ok(())
    }
    fn fields(&self) -> Vec<FieldSchema> {
        fields_at(R::fields(), self.version)
    }
}

/// Keep the fields present in `version`.
pub fn fields_at(fields: Vec<FieldSchema>, version: u32) -> Vec<FieldSchema> {
    fields.into_iter().filter(|f| f.since <= version).collect()
}

/// A described record that travels as a top-level section.
pub trait Section: Record + Sized + 'static {
    /// Section name, unique in a stream.
    const NAME: &'static str;
    /// Newest version this build writes and reads.
    const VERSION: u32;
    /// Oldest version this build reads.
    const MIN_VERSION: u32;
    /// Whether a destination must receive it (instance 0); a stream without it is refused.
    const REQUIRED: bool = false;

    /// The version written for machine type `m`.
    fn save_version(_m: &MachineType) -> u32 {
        Self::VERSION
    }
    /// Whether this state is sent at all under machine type `m`.
    fn needed(&self, _m: &MachineType) -> bool {
        true
    }
    /// The subsections, in the order they are written.
    fn subsections() -> &'static [&'static dyn Subsection<Self>] {
        &[]
    }
    /// Called on the state just before it is encoded.
    fn pre_save(&mut self) {}
    /// Called on a default state before the body is decoded into it (set defaults for
    /// fields and subsections an older stream does not carry).
    fn pre_load(&mut self) {}
    /// Called after the body and all subsections were decoded.
    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        Ok(())
    }
}

/// What the decoder needs to know about one section type, without its Rust type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionInfo {
    /// Section name.
    pub name: String,
    /// Newest version read.
    pub version: u32,
    /// Oldest version read.
    pub min_version: u32,
    /// Whether instance 0 must be present.
    pub required: bool,
    /// Known subsections and the newest version of each.
    pub subsections: BTreeMap<String, u32>,
    /// Largest encoded size of body plus subsections (framing included).
    pub max_len: u64,
}

/// Bytes of subsection framing: name length, name (up to 255), version, length.
const SUB_FRAME_MAX: u64 = 1 + 255 + 4 + 4;
/// Bytes of body framing: body length and subsection count.
const BODY_FRAME: u64 = 4 + 1;

impl SectionInfo {
    /// Describe section type `S`.
    pub fn of<S: Section>() -> Self {
        let body: u64 = S::fields().iter().map(|f| f.kind.max_len()).sum();
        let subs: u64 = S::subsections()
            .iter()
            .map(|s| SUB_FRAME_MAX + s.fields().iter().map(|f| f.kind.max_len()).sum::<u64>())
            .sum();
        SectionInfo {
            name: S::NAME.to_owned(),
            version: S::VERSION,
            min_version: S::MIN_VERSION,
            required: S::REQUIRED,
            subsections: S::subsections()
                .iter()
                .map(|s| (s.name().to_owned(), s.version()))
                .collect(),
            max_len: body + subs + BODY_FRAME,
        }
    }
}
