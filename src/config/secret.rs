//! Settings that must never reach a log or `check-config` in clear: webhook tokens
//! and broker URLs with their passwords. `Settings` derives `Debug`, so the types
//! themselves redact.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret setting (a webhook token): `Debug` and serialization (`check-config`)
/// show `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must compare or send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A broker URL of `amqp.urls`. It shows (`Display`, `Debug`, serialization) only
/// with its password redacted; [`BrokerUrl::expose`] gives the URL to connect with.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct BrokerUrl {
    url: String,
    /// Built once: every log line and error that names the broker uses it.
    shown: String,
}

impl BrokerUrl {
    /// The URL with its password, for the connect call only.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// The URL with its password replaced by `<redacted>`.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl From<String> for BrokerUrl {
    fn from(url: String) -> Self {
        let shown = redact_url(&url);
        BrokerUrl { url, shown }
    }
}

impl From<&str> for BrokerUrl {
    fn from(url: &str) -> Self {
        url.to_string().into()
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.shown, f)
    }
}

impl Serialize for BrokerUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown)
    }
}

/// The URL with its password replaced; user, host and path stay, so an operator can
/// tell the brokers apart.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:<redacted>@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Lines of a secrets file (tokens, keys, broker URLs): trimmed, blank lines and `#`
/// comments ignored.
pub(super) fn secret_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_url_never_shows_its_password() {
        let url = BrokerUrl::from("amqp://app:s3cret@rabbit-1:5672/%2f");
        assert_eq!(url.expose(), "amqp://app:s3cret@rabbit-1:5672/%2f");
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            serde_json::to_string(&url).unwrap_or_default(),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(
                shown.contains("app:<redacted>@rabbit-1:5672/%2f"),
                "{shown}"
            );
        }
    }

    #[test]
    fn a_url_without_password_is_shown_as_is() {
        let url = BrokerUrl::from("amqp://rabbit-1:5672");
        assert_eq!(url.shown(), "amqp://rabbit-1:5672");
    }

    #[test]
    fn a_secret_shows_as_redacted() {
        let secret = Secret::from("tok-3n");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(
            serde_json::to_string(&secret).unwrap_or_default(),
            "\"<redacted>\""
        );
        assert_eq!(secret.expose(), "tok-3n");
    }
}
