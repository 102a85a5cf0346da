//! Who may post: client networks and webhook tokens (SPEC 5), static or signed
//! (SPEC 9). Decided from the request head alone, before the body is read.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;
use subtle::ConstantTimeEq;
use tracing::debug;

use crate::config::AuthSettings;
use crate::http::net::{Cidr, any_contains, client_addr};
use crate::http::token::TokenKeys;

/// Header carrying the token for callers that cannot set `Authorization`.
pub const TOKEN_HEADER: &str = "x-webhook-token";

/// Auth rules built from settings.
pub struct Auth {
    tokens: Vec<Vec<u8>>,
    allow_query_token: bool,
    allow_from: Vec<Cidr>,
    trusted_proxies: Vec<Cidr>,
    /// Verifies signed tokens, when `[[auth.clients]]` can fetch them.
    signed: Option<Arc<TokenKeys>>,
}

impl Auth {
    /// From `auth.*` and `http.trusted_proxies`; `signed` verifies fetched tokens.
    pub(crate) fn new(
        settings: &AuthSettings,
        trusted_proxies: &[Cidr],
        signed: Option<Arc<TokenKeys>>,
    ) -> Self {
        Auth {
            tokens: settings
                .tokens
                .iter()
                .map(|t| t.expose().as_bytes().to_vec())
                .collect(),
            allow_query_token: settings.allow_query_token,
            allow_from: settings.allow_from.clone(),
            trusted_proxies: trusted_proxies.to_vec(),
            signed,
        }
    }

    /// Whether no token is required (the bridge warns about it at start).
    pub(crate) fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.signed.is_none()
    }

    /// The client address: the peer, or the one behind trusted proxies.
    pub(crate) fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        client_addr(peer, forwarded, &self.trusted_proxies)
    }

    /// Whether the client (behind trusted proxies) may post at all.
    pub(crate) fn client_allowed(&self, peer: IpAddr, headers: &HeaderMap) -> bool {
        if self.allow_from.is_empty() {
            return true;
        }
        any_contains(&self.allow_from, self.client(peer, headers))
    }

    /// Whether the request carries a configured token, or a signed one as `Bearer`
    /// (always true when neither is configured). Static tokens are tried first, at
    /// the same cost as without signed ones.
    pub(crate) fn token_valid(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let header = headers
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let from_query = query
            .filter(|_| self.allow_query_token)
            .and_then(query_token);
        if [bearer, header, from_query.as_deref()]
            .into_iter()
            .flatten()
            .any(|candidate| self.matches(candidate.as_bytes()))
        {
            return true;
        }
        // Signed tokens only as Bearer, where Cellosign sends them: never in a URL.
        let (Some(keys), Some(bearer)) = (&self.signed, bearer) else {
            return false;
        };
        match keys.verify(bearer, SystemTime::now()) {
            Ok(()) => true,
            Err(why) => {
                debug!(%why, "bearer token refused");
                false
            }
        }
    }

    /// Compares against every token in constant time, without stopping at a match.
    fn matches(&self, candidate: &[u8]) -> bool {
        self.tokens
            .iter()
            .fold(subtle::Choice::from(0), |found, t| {
                found | t.as_slice().ct_eq(candidate)
            })
            .into()
    }
}

/// The `token` query parameter, percent-decoded.
fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn auth(tokens: &[&str], allow_query: bool) -> Auth {
        let settings = AuthSettings {
            tokens: tokens.iter().map(|&s| s.into()).collect(),
            allow_query_token: allow_query,
            ..AuthSettings::default()
        };
        Auth::new(&settings, &[], None)
    }

    #[test]
    fn open_without_tokens() {
        assert!(auth(&[], true).token_valid(&HeaderMap::new(), None));
    }

    #[test]
    fn accepts_each_token_source() {
        let a = auth(&["s3cret", "other"], true);
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer other"));
        assert!(a.token_valid(&h, None));
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static("s3cret"));
        assert!(a.token_valid(&h, None));
        assert!(a.token_valid(&HeaderMap::new(), Some("a=1&token=s3cret")));
        assert!(a.token_valid(&HeaderMap::new(), Some("token=s%33cret")));
    }

    /// The same token listed twice (in `tokens` and in `tokens_file`) still matches.
    #[test]
    fn a_token_listed_twice_is_accepted() {
        let a = auth(&["s3cret", "other", "s3cret"], false);
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static("s3cret"));
        assert!(a.token_valid(&h, None));
    }

    #[test]
    fn rejects_wrong_missing_and_disabled_query_tokens() {
        let a = auth(&["s3cret"], false);
        assert!(!a.token_valid(&HeaderMap::new(), None));
        assert!(!a.token_valid(&HeaderMap::new(), Some("token=s3cret")));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cre"));
        assert!(!a.token_valid(&h, None));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic s3cret"));
        assert!(!a.token_valid(&h, None));
    }

    /// Without `allow_from` anyone may post; with it, only the client's networks, the
    /// client being the peer unless a trusted proxy vouches for another address.
    #[test]
    fn client_networks_decide_who_may_post() {
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let none = HeaderMap::new();
        assert!(auth(&[], true).client_allowed(peer, &none));

        let proxy: Cidr = "192.0.2.0/24".parse().unwrap();
        let settings = AuthSettings {
            allow_from: vec!["10.1.0.0/16".parse().unwrap()],
            ..AuthSettings::default()
        };
        let behind_proxy = Auth::new(&settings, &[proxy], None);
        let direct = Auth::new(&settings, &[], None);
        assert!(
            !direct.client_allowed(peer, &none),
            "a peer outside allow_from"
        );
        assert!(direct.client_allowed("10.1.2.3".parse().unwrap(), &none));
        let mut forwarded = HeaderMap::new();
        forwarded.insert("x-forwarded-for", HeaderValue::from_static("10.1.9.9"));
        assert!(behind_proxy.client_allowed(peer, &forwarded));
        assert!(
            !direct.client_allowed(peer, &forwarded),
            "X-Forwarded-For from an untrusted peer"
        );
    }

    #[test]
    fn percent_decoding_survives_bad_escapes() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%"), "%");
    }
}
