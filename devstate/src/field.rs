//! Field-level encoding: the wire types a state description may use, and the `record!` macro
//! that turns one declarative description into a struct, its encoder, its bounded decoder and
//! its schema.
//!
//! Encoding is little-endian and untagged: integers are fixed width, `bool` is one byte (0 or 1),
//! a `String` or `Vec<T>` is a `u32` count followed by its elements. Every count is checked
//! against the field's declared `max` before anything is allocated.

use crate::DecodeError;
use serde::{Deserialize, Serialize};

/// Per-field options of a description: when the field appeared, its bound, whether it is volatile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldOpts {
    /// First record version that carries the field.
    pub since: u32,
    /// Largest element count for strings and lists (0 for scalars).
    pub max: u32,
    /// Whether the value legitimately differs between source and destination (clocks, timers).
    pub volatile: bool,
    /// Not part of the body: the field travels in a subsection (or not at all).
    pub skip: bool,
}

impl FieldOpts {
    /// A field present since version 1, unbounded scalar, not volatile.
    pub const DEFAULT: FieldOpts = FieldOpts {
        since: 1,
        max: 0,
        volatile: false,
        skip: false,
    };

    /// Field first present in version `v`.
    pub const fn since(self, v: u32) -> Self {
        FieldOpts { since: v, ..self }
    }

    /// Largest element count accepted for this field.
    pub const fn max(self, v: u32) -> Self {
        FieldOpts { max: v, ..self }
    }

    /// Leave the field out of the body; a subsection carries it.
    pub const fn skip(self) -> Self {
        FieldOpts { skip: true, ..self }
    }

    /// Mark the field as volatile (reported apart by diffs).
    pub const fn volatile(self) -> Self {
        FieldOpts {
            volatile: true,
            ..self
        }
    }
}

/// The wire type of a field, as written in schemas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FieldKind {
    /// Unsigned 8-bit.
    U8,
    /// Unsigned 16-bit little-endian.
    U16,
    /// Unsigned 32-bit little-endian.
    U32,
    /// Unsigned 64-bit little-endian.
    U64,
    /// Signed 32-bit little-endian.
    I32,
    /// Signed 64-bit little-endian.
    I64,
    /// One byte, 0 or 1.
    Bool,
    /// `u32` byte count (at most `max`) then UTF-8 bytes.
    Str {
        /// Largest byte count.
        max: u32,
    },
    /// `u32` element count (at most `max`) then the elements.
    List {
        /// Largest element count.
        max: u32,
        /// Element type.
        of: Box<FieldKind>,
    },
    /// A nested record: its fields in order, all present.
    Record {
        /// Record type name.
        #[serde(rename = "record")]
        name: String,
        /// Its fields.
        fields: Vec<FieldSchema>,
    },
}

impl FieldKind {
    /// Largest number of bytes a value of this kind can occupy.
    pub fn max_len(&self) -> u64 {
        match self {
            FieldKind::U8 | FieldKind::Bool => 1,
            FieldKind::U16 => 2,
            FieldKind::U32 | FieldKind::I32 => 4,
            FieldKind::U64 | FieldKind::I64 => 8,
            FieldKind::Str { max } => 4 + u64::from(*max),
            FieldKind::List { max, of } => 4 + u64::from(*max).saturating_mul(of.max_len()),
            FieldKind::Record { fields, .. } => fields.iter().map(|f| f.kind.max_len()).sum(),
        }
    }

    /// Whether a string or list kind (at any depth) lacks a positive bound.
    pub fn unbounded(&self) -> bool {
        match self {
            FieldKind::Str { max } => *max == 0,
            FieldKind::List { max, of } => *max == 0 || of.unbounded(),
            FieldKind::Record { fields, .. } => fields.iter().any(|f| f.kind.unbounded()),
            _ => false,
        }
    }
}

/// One field of a description, as written in schemas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSchema {
    /// Field name.
    pub name: String,
    /// Wire type.
    #[serde(flatten)]
    pub kind: FieldKind,
    /// First version that carries it.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub since: u32,
    /// Whether it is volatile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub volatile: bool,
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

impl FieldSchema {
    /// Describe field `name` of Rust type `T` with options `o`.
    pub fn new<T: Field>(name: &str, o: FieldOpts) -> Self {
        FieldSchema {
            name: name.to_owned(),
            kind: T::kind(o.max),
            since: o.since,
            volatile: o.volatile,
        }
    }
}

/// A cursor over a byte slice that knows its absolute stream offset and which section it reads.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
    section: &'a str,
}

impl<'a> Reader<'a> {
    /// Read `buf`, which starts at absolute offset `base`, on behalf of `section`.
    pub fn new(buf: &'a [u8], base: u64, section: &'a str) -> Self {
        Reader {
            buf,
            pos: 0,
            base,
            section,
        }
    }

    /// Absolute offset of the next byte.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Section this reader decodes for.
    pub fn section(&self) -> &str {
        self.section
    }

    /// Take the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                context: format!("section '{}'", self.section),
                offset: self.base + self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Take a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// Read a little-endian `u32` count and check it against `bound`.
    pub fn count(&mut self, bound: u32, what: &str) -> Result<usize, DecodeError> {
        let offset = self.offset();
        let n = u32::from_le_bytes(self.array()?);
        if n > bound {
            return Err(DecodeError::LengthOverBound {
                section: self.section.to_owned(),
                what: what.to_owned(),
                len: u64::from(n),
                bound: u64::from(bound),
                offset,
            });
        }
        Ok(n as usize)
    }

    /// Fail unless every byte has been consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::TrailingBytes {
                section: self.section.to_owned(),
                extra: self.remaining() as u64,
                offset: self.offset(),
            });
        }
        Ok(())
    }

    fn invalid(&self, field: &str, value: u64, offset: u64) -> DecodeError {
        DecodeError::InvalidValue {
            section: self.section.to_owned(),
            field: field.to_owned(),
            value,
            offset,
        }
    }
}

/// A Rust type that can be a field of a description.
pub trait Field: Sized {
    /// Its wire type, given the field's `max` option.
    fn kind(max: u32) -> FieldKind;
    /// Append the encoding of `self`.
    fn put(&self, w: &mut Vec<u8>);
    /// Decode one value; `max` bounds strings and lists, `name` is used in errors.
    fn get(r: &mut Reader<'_>, max: u32, name: &str) -> Result<Self, DecodeError>;
}

macro_rules! int_field {
    ($($t:ty => $k:ident),*) => {$(
        impl Field for $t {
            fn kind(_max: u32) -> FieldKind {
                FieldKind::$k
            }
            fn put(&self, w: &mut Vec<u8>) {
                w.extend_from_slice(&self.to_le_bytes());
            }
            fn get(r: &mut Reader<'_>, _max: u32, _name: &str) -> Result<Self, DecodeError> {
                Ok(<$t>::from_le_bytes(r.array()?))
            }
        }
    )*};
}

int_field!(u8 => U8, u16 => U16, u32 => U32, u64 => U64, i32 => I32, i64 => I64);

impl Field for bool {
    fn kind(_max: u32) -> FieldKind {
        FieldKind::Bool
    }
    fn put(&self, w: &mut Vec<u8>) {
        w.push(u8::from(*self));
    }
    fn get(r: &mut Reader<'_>, _max: u32, name: &str) -> Result<Self, DecodeError> {
        let offset = r.offset();
        match r.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(r.invalid(name, u64::from(v), offset)),
        }
    }
}

impl Field for String {
    fn kind(max: u32) -> FieldKind {
        FieldKind::Str { max }
    }
    fn put(&self, w: &mut Vec<u8>) {
        put_len(w, self.len());
        w.extend_from_slice(self.as_bytes());
    }
    fn get(r: &mut Reader<'_>, max: u32, name: &str) -> Result<Self, DecodeError> {
        let n = r.count(max, name)?;
        let offset = r.offset();
        let bytes = r.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| r.invalid(name, e.utf8_error().valid_up_to() as u64, offset))
    }
}

impl<T: Field> Field for Vec<T> {
    fn kind(max: u32) -> FieldKind {
        FieldKind::List {
            max,
            of: Box::new(T::kind(0)),
        }
    }
    fn put(&self, w: &mut Vec<u8>) {
        put_len(w, self.len());
        for v in self {
            v.put(w);
        }
    }
    fn get(r: &mut Reader<'_>, max: u32, name: &str) -> Result<Self, DecodeError> {
        let n = r.count(max, name)?;
        // The count is bounded by the schema, and every element takes at least one byte, so
        // the allocation is bounded by both the schema and the bytes actually present.
        let mut v = Vec::with_capacity(n.min(r.remaining()));
        for _ in 0..n {
            v.push(T::get(r, 0, name)?);
        }
        Ok(v)
    }
}

/// A fieldless enum carried as its explicit discriminant: a field of this type is validated by
/// the codec, not by hand in `post_load`.
///
/// The schema shows the plain integer type of [`Repr`](Self::Repr), so turning an integer field
/// into an enum changes neither the wire nor the schema. The decoder refuses a value that is not
/// in [`VALUES`](Self::VALUES) with [`DecodeError::InvalidValue`] (field name and byte offset);
/// a reserved discriminant (such as 0 for "invalid") is simply left out of `VALUES`.
///
/// ```
/// #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
/// #[repr(u8)]
/// enum Light {
///     #[default]
///     Off = 1,
///     On = 2,
/// }
/// impl devstate::WireEnum for Light {
///     type Repr = u8;
///     const VALUES: &'static [Self] = &[Light::Off, Light::On];
///     fn to_wire(self) -> u8 {
///         self as u8
///     }
/// }
/// devstate::record! {
///     pub struct Lamp {
///         pub light: Light,
///     }
/// }
/// assert_eq!(<Lamp as devstate::Record>::fields()[0].kind, devstate::FieldKind::U8);
/// ```
pub trait WireEnum: Copy + PartialEq + 'static {
    /// The integer type on the wire.
    type Repr: Field + Copy + PartialEq + Into<u64>;
    /// Every value the wire may carry.
    const VALUES: &'static [Self];
    /// The discriminant written on the wire.
    fn to_wire(self) -> Self::Repr;
    /// The value with discriminant `v`, if the wire may carry it.
    fn from_wire(v: Self::Repr) -> Option<Self> {
        Self::VALUES.iter().copied().find(|e| e.to_wire() == v)
    }
}

impl<T: WireEnum> Field for T {
    fn kind(_max: u32) -> FieldKind {
        T::Repr::kind(0)
    }
    fn put(&self, w: &mut Vec<u8>) {
        self.to_wire().put(w);
    }
    fn get(r: &mut Reader<'_>, _max: u32, name: &str) -> Result<Self, DecodeError> {
        let offset = r.offset();
        let v = T::Repr::get(r, 0, name)?;
        T::from_wire(v).ok_or_else(|| r.invalid(name, v.into(), offset))
    }
}

/// Append a length as the little-endian `u32` every string and list starts with.
///
/// Descriptions bound every length far below `u32::MAX`; a larger value is a programming error.
pub fn put_len(w: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("lengths are bounded by the schema");
    w.extend_from_slice(&n.to_le_bytes());
}

/// A described record: a plain state struct with a field list, each field carrying the version
/// it first appeared in. Generated by [`record!`](crate::record).
pub trait Record: Default {
    /// Type name, used for nested records in schemas.
    const TYPE_NAME: &'static str;
    /// All fields in wire order (every version).
    fn fields() -> Vec<FieldSchema>;
    /// Encode the fields present in `version`.
    fn encode(&self, version: u32, w: &mut Vec<u8>);
    /// Decode the fields present in `version` into `self`; absent fields keep their value.
    fn decode_into(&mut self, version: u32, r: &mut Reader<'_>) -> Result<(), DecodeError>;
}

/// Define a plain state struct from one description, with its encoder, bounded decoder and
/// schema. Field options go in brackets after the type: `since = N` (first version carrying
/// the field), `max = N` (bound of a string or list), `volatile` (differs legitimately between
/// source and destination), `skip` (not in the body; a subsection carries it).
///
/// ```
/// devstate::record! {
///     /// A pending hot-unplug timer.
///     pub struct Timer {
///         /// Milliseconds left.
///         pub remaining_ms: u64 [volatile],
///         pub owner: String [max = 64, since = 2],
///     }
/// }
/// ```
#[macro_export]
macro_rules! record {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $field:ident : $ty:ty $([ $($opt:ident $(= $val:literal)?),* $(,)? ])?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $crate::Record for $name {
            const TYPE_NAME: &'static str = stringify!($name);

            fn fields() -> ::std::vec::Vec<$crate::FieldSchema> {
                let mut v = ::std::vec::Vec::new();
                $({
                    const O: $crate::FieldOpts = $crate::FieldOpts::DEFAULT $($(.$opt($($val)?))*)?;
                    if !O.skip {
                        v.push($crate::FieldSchema::new::<$ty>(stringify!($field), O));
                    }
                })*
                v
            }

            #[allow(unused_variables)]
            fn encode(&self, version: u32, w: &mut ::std::vec::Vec<u8>) {
                $({
                    const O: $crate::FieldOpts = $crate::FieldOpts::DEFAULT $($(.$opt($($val)?))*)?;
                    if !O.skip && O.since <= version {
                        <$ty as $crate::Field>::put(&self.$field, w);
                    }
                })*
            }

            #[allow(unused_variables)]
            fn decode_into(
                &mut self,
                version: u32,
                r: &mut $crate::Reader<'_>,
            ) -> ::std::result::Result<(), $crate::DecodeError> {
                $({
                    const O: $crate::FieldOpts = $crate::FieldOpts::DEFAULT $($(.$opt($($val)?))*)?;
                    if !O.skip && O.since <= version {
                        self.$field = <$ty as $crate::Field>::get(r, O.max, stringify!($field))?;
                    }
                })*
                Ok(())
            }
        }

        impl $crate::Field for $name {
            fn kind(_max: u32) -> $crate::FieldKind {
                $crate::FieldKind::Record {
                    name: stringify!($name).to_owned(),
                    fields: <$name as $crate::Record>::fields(),
                }
            }
            fn put(&self, w: &mut ::std::vec::Vec<u8>) {
                <$name as $crate::Record>::encode(self, u32::MAX, w);
            }
            fn get(
                r: &mut $crate::Reader<'_>,
                _max: u32,
                _name: &str,
            ) -> ::std::result::Result<Self, $crate::DecodeError> {
                let mut s = Self::default();
                <$name as $crate::Record>::decode_into(&mut s, u32::MAX, r)?;
                Ok(s)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0 is reserved, 1 and 7 are the only values, carried as a `u32`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    #[repr(u32)]
    enum Mode {
        #[default]
        Slow = 1,
        Fast = 7,
    }

    impl WireEnum for Mode {
        type Repr = u32;
        const VALUES: &'static [Self] = &[Mode::Slow, Mode::Fast];
        fn to_wire(self) -> u32 {
            self as u32
        }
    }

    crate::record! {
        struct Dev {
            id: u8,
            mode: Mode,
            modes: Vec<Mode> [max = 4],
        }
    }

    #[test]
    fn wire_enum_is_its_integer_on_the_wire_and_in_the_schema() {
        let d = Dev {
            id: 3,
            mode: Mode::Fast,
            modes: vec![Mode::Slow, Mode::Fast],
        };
        let mut w = Vec::new();
        d.encode(1, &mut w);
        assert_eq!(w, [3, 7, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0]);
        let f = Dev::fields();
        assert_eq!(f[1].kind, FieldKind::U32);
        assert_eq!(
            f[2].kind,
            FieldKind::List {
                max: 4,
                of: Box::new(FieldKind::U32)
            }
        );
        let mut back = Dev::default();
        back.decode_into(1, &mut Reader::new(&w, 0, "dev")).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn wire_enum_refuses_unknown_values_with_field_and_offset() {
        for (at, v) in [(1usize, 0u8), (1, 2), (13, 0)] {
            let mut w = Vec::new();
            Dev {
                id: 3,
                mode: Mode::Fast,
                modes: vec![Mode::Slow, Mode::Fast],
            }
            .encode(1, &mut w);
            w[at] = v;
            let err = Dev::default()
                .decode_into(1, &mut Reader::new(&w, 100, "dev"))
                .unwrap_err();
            let field = if at == 1 { "mode" } else { "modes" };
            assert_eq!(
                err.to_string(),
                format!(
                    "Invalid value {v} for field '{field}' in section 'dev' at offset {}",
                    100 + at
                )
            );
        }
    }
}
