//! Serde adapters that read any JSON value without failing on its type: a value
//! of the wrong type is a semantic problem (422) to record, while only a syntax
//! error may stop the parser (400).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Drains the rest of a map so the parser can go on to its closing brace.
fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Drains the rest of an array so the parser can go on to its closing bracket.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Handles one JSON value that is expected to be an object.
pub(super) trait ObjectHandler<'de> {
    /// What handling the value yields (collected fields, or nothing).
    type Out;
    /// Consumes the whole object.
    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error>;
    /// The value is not an object (it has already been consumed).
    fn not_object(self) -> Self::Out;
    /// The value is an array (by default: drained, and not an object).
    fn array<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Out, A::Error>
    where
        Self: Sized,
    {
        drain_seq(seq)?;
        Ok(self.not_object())
    }
    /// The value is `null` (by default: not an object).
    fn null(self) -> Self::Out
    where
        Self: Sized,
    {
        self.not_object()
    }
}

/// Adapts an [`ObjectHandler`] to serde: any non-object value is consumed and
/// reported through `not_object` (an array through `array`), never as an error.
pub(super) struct ObjectVisitor<H>(pub(super) H);

/// An object goes to `object`, an array to `array`, `null` to `null`, and every
/// other value to `not_object` once consumed.
impl<'de, H: ObjectHandler<'de>> Visitor<'de> for ObjectVisitor<H> {
    type Value = H::Out;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.object(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.array(seq)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.0.null())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(self.0.not_object())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(self.0.not_object())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(self.0.not_object())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(self.0.not_object())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(self.0.not_object())
    }
}

/// The shape of a scalar-or-not JSON value; strings only when asked for.
pub(super) enum Scalar<'a> {
    /// A string; `""` when it was not asked for.
    Str(Cow<'a, str>),
    /// An integer >= 0 that fits a `u64`.
    Unsigned,
    /// An integer < 0 that fits an `i64`.
    Negative,
    /// Any other number: a fraction, an exponent, `-0`, or beyond the integer ranges.
    Float,
    /// `true` or `false`.
    Bool,
    /// `null`.
    Null,
    /// An array or an object, already drained.
    Compound,
}

/// Reads any value as a [`Scalar`]; with `keep_str` false, strings are not
/// copied (their content is replaced by `""`).
struct ScalarVisitor {
    /// Whether a string's content is wanted (and copied if escaped).
    keep_str: bool,
}

/// Each JSON type maps to its [`Scalar`]; strings are borrowed from the body
/// when unescaped, copied only when escaped and wanted.
impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(if self.keep_str {
            v
        } else {
            ""
        })))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(if self.keep_str {
            Cow::Owned(v.to_owned())
        } else {
            Cow::Borrowed("")
        }))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Unsigned)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(if v < 0 {
            Scalar::Negative
        } else {
            Scalar::Unsigned
        })
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        drain_seq(seq)?;
        Ok(Scalar::Compound)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        drain_map(map)?;
        Ok(Scalar::Compound)
    }
}

/// Reads the next value of `map` as a [`Scalar`].
pub(super) fn next_scalar<'de, A: MapAccess<'de>>(
    map: &mut A,
    keep_str: bool,
) -> Result<Scalar<'de>, A::Error> {
    map.next_value_seed(Seed(ScalarVisitor { keep_str }))
}

/// A [`DeserializeSeed`] that hands any value to its visitor.
pub(super) struct Seed<V>(pub(super) V);

/// Asks the parser for whatever value comes next: the visitor judges its type.
impl<'de, V: Visitor<'de>> DeserializeSeed<'de> for Seed<V> {
    type Value = V::Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        d.deserialize_any(self.0)
    }
}

/// Reads the next value of `map` through `handler`, which sees any type.
pub(super) fn next_object<'de, A: MapAccess<'de>, H: ObjectHandler<'de>>(
    map: &mut A,
    handler: H,
) -> Result<H::Out, A::Error> {
    map.next_value_seed(Seed(ObjectVisitor(handler)))
}

/// Consumes the next value of `map` unread: an unknown key's, a duplicate's,
/// or any once validation has failed.
pub(super) fn skip_value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>()?;
    Ok(())
}
