//! The `amqp.routing_key` template: parsed once at config load, rendered for
//! every accepted event.

use std::fmt;
use std::str::FromStr;

use super::MAX_ROUTING_KEY_BYTES;
use super::fields::Fields;
use super::rejection::{Invalid, Problem};

/// Routing key template used when the operator configures none.
pub const DEFAULT_ROUTING_KEY: &str = "{session.reference}";

/// The field path of the rendered key in a rejection reason: it names no body
/// field, since the key is built from several.
const ROUTING_KEY: &str = "routing key";

/// A field of the body that a routing key template may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placeholder {
    /// `{event.type}`.
    EventType,
    /// `{session.reference}`, the default key.
    SessionReference,
    /// `{session.id}`.
    SessionId,
    /// `{session.process_id}`; optional in the body, so it may be missing.
    SessionProcessId,
    /// `{session.recipient.name}`; optional in the body, so it may be missing.
    SessionRecipientName,
}

impl Placeholder {
    /// Every placeholder, to look one up by name.
    const ALL: [Placeholder; 5] = [
        Placeholder::EventType,
        Placeholder::SessionReference,
        Placeholder::SessionId,
        Placeholder::SessionProcessId,
        Placeholder::SessionRecipientName,
    ];

    /// The field path, which is also the placeholder's name.
    fn path(self) -> &'static str {
        match self {
            Placeholder::EventType => "event.type",
            Placeholder::SessionReference => "session.reference",
            Placeholder::SessionId => "session.id",
            Placeholder::SessionProcessId => "session.process_id",
            Placeholder::SessionRecipientName => "session.recipient.name",
        }
    }

    /// The placeholder written `{name}`, if there is one: the template parser's lookup.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.path() == name)
    }
}

/// One piece of a parsed template, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Text copied into the key as it is.
    Literal(String),
    /// A `{field}`, replaced by that field's value.
    Field(Placeholder),
}

/// A parsed `amqp.routing_key` template: literal text and `{field}`
/// placeholders. Parsed once at config load so that a typo fails the config,
/// not every event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKeyTemplate {
    /// The template as configured, given back by `Display`.
    source: String,
    /// The template as parsed, used to render.
    parts: Vec<Part>,
}

/// Why a routing key template was refused at config load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template is empty, so every routing key would be empty.
    #[error("routing key template: empty")]
    Empty,
    /// A `{...}` names a field that is not a known placeholder.
    #[error(
        "routing key template: unknown placeholder {{{0}}} (known: {{event.type}}, \
         {{session.reference}}, {{session.id}}, {{session.process_id}}, {{session.recipient.name}})"
    )]
    UnknownPlaceholder(String),
    /// A `{` without its `}`, a `}` without its `{`, or a `{` inside a placeholder.
    #[error("routing key template: unbalanced brace at byte {0}")]
    UnbalancedBrace(usize),
    /// The literal text alone exceeds the AMQP limit, so no key could ever fit.
    #[error("routing key template: literal text is longer than 255 bytes")]
    LiteralTooLong,
}

impl FromStr for RoutingKeyTemplate {
    type Err = TemplateError;

    /// Parses `literal{field}literal...`; refuses what could never render a key.
    fn from_str(source: &str) -> Result<Self, Self::Err> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut literal_bytes = 0usize;
        let mut pos = 0usize;
        let mut rest = source;
        while let Some(i) = rest.find(['{', '}']) {
            let (before, tail) = rest.split_at(i);
            literal.push_str(before);
            if tail.starts_with('}') {
                return Err(TemplateError::UnbalancedBrace(pos + i));
            }
            let inner = &tail[1..];
            let close = match inner.find(['{', '}']) {
                Some(j) if inner[j..].starts_with('}') => j,
                _ => return Err(TemplateError::UnbalancedBrace(pos + i)),
            };
            let name = &inner[..close];
            let field = Placeholder::from_name(name)
                .ok_or_else(|| TemplateError::UnknownPlaceholder(name.to_owned()))?;
            if !literal.is_empty() {
                literal_bytes += literal.len();
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Field(field));
            let consumed = i + 1 + close + 1;
            pos += consumed;
            rest = &rest[consumed..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            literal_bytes += literal.len();
            parts.push(Part::Literal(literal));
        }
        if literal_bytes > MAX_ROUTING_KEY_BYTES {
            return Err(TemplateError::LiteralTooLong);
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }
}

impl fmt::Display for RoutingKeyTemplate {
    /// Gives back the template as configured.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Settings hold the parsed template: it is read from its text form once, at load.
impl<'de> serde::Deserialize<'de> for RoutingKeyTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        source.parse().map_err(serde::de::Error::custom)
    }
}

/// Written back as the text it was read from (`check-config`).
impl serde::Serialize for RoutingKeyTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl Default for RoutingKeyTemplate {
    /// `{session.reference}`, the spec's default.
    fn default() -> Self {
        Self {
            source: DEFAULT_ROUTING_KEY.to_owned(),
            parts: vec![Part::Field(Placeholder::SessionReference)],
        }
    }
}

impl RoutingKeyTemplate {
    /// Whether the template names `p`: an archive reads such a field only then.
    pub(super) fn uses(&self, p: Placeholder) -> bool {
        self.parts.contains(&Part::Field(p))
    }

    /// Fills the template from validated fields; rejects a missing field, an
    /// empty key or one over 255 bytes.
    pub(super) fn render(&self, f: &Fields<'_>) -> Result<String, Invalid> {
        let mut key = String::new();
        for part in &self.parts {
            let value = match part {
                Part::Literal(text) => text.as_str(),
                Part::Field(p) => match f.get(*p) {
                    Some(v) => v,
                    None => {
                        return Err(Invalid::new(p.path(), Problem::MissingForRoutingKey));
                    }
                },
            };
            if key.len() + value.len() > MAX_ROUTING_KEY_BYTES {
                return Err(Invalid::new(ROUTING_KEY, Problem::RoutingKeyTooLong));
            }
            key.push_str(value);
        }
        if key.is_empty() {
            return Err(Invalid::new(ROUTING_KEY, Problem::RoutingKeyEmpty));
        }
        Ok(key)
    }
}
