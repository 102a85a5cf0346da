//! Signed webhook tokens (SPEC 9): stateless, URL-safe, HMAC-SHA256.
//!
//! A token is `{key id}.{payload}.{tag}`, each part base64url without padding:
//! the key id names the key that signed (so rotation needs no trial of every
//! key), the payload holds a format version, the expiry (Unix seconds) and the
//! subject (the client that fetched it), and the tag is HMAC-SHA256 over
//! `{key id}.{payload}` under that key. The tag is checked with the MAC's
//! constant-time verify before the payload is even decoded. Every replica with
//! the same keys file accepts every token; nothing is stored.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{AuthSettings, ClientKind};

/// HMAC-SHA256, the only MAC tokens use.
type HmacSha256 = Hmac<Sha256>;

/// First payload byte; a new layout gets a new number, and old tokens fail cleanly.
const FORMAT: u8 = 1;
/// Bytes of a key id (before base64): 64 bits tell keys apart, they are not a secret.
const KEY_ID_BYTES: usize = 8;
/// Longer candidates are refused before any decoding or hashing.
const MAX_TOKEN_LEN: usize = 512;
/// Domain separation of key ids from any other hash of the same key.
const KEY_ID_CONTEXT: &[u8] = b"cellosign-bridge token key id\0";

/// One signing key: its public id and the HMAC state keyed with it (cloned per use,
/// so the key is not hashed again for every token).
struct Key {
    id: String,
    mac: HmacSha256,
}

/// Why a token was refused; only ever logged by name, never with the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    /// Not three base64url parts, too long, or a payload of another layout.
    #[error("not a signed token")]
    Malformed,
    /// A key id none of the keys has: from elsewhere, or a key since removed.
    #[error("signed by an unknown key")]
    UnknownKey,
    /// The tag does not match: changed, or made without the key.
    #[error("bad signature")]
    Forged,
    /// Past its expiry.
    #[error("expired")]
    Expired,
    /// Its client was removed from `[[auth.clients]]`.
    #[error("its client is no longer configured")]
    Revoked,
}

/// Issues and verifies tokens with the keys of `auth.token_keys_file`.
pub(crate) struct TokenKeys {
    /// In file order: the first signs, all verify.
    keys: Vec<Key>,
    /// Token lifetime, seconds.
    ttl_s: u64,
    /// Subjects of the configured clients: a token of a removed client is refused.
    subjects: HashSet<String>,
}

impl TokenKeys {
    /// From `auth.*`; `None` when no clients (and so no keys) are configured.
    pub(crate) fn new(auth: &AuthSettings) -> Option<Self> {
        if auth.token_keys.is_empty() {
            return None;
        }
        let keys = auth
            .token_keys
            .iter()
            .filter_map(|key| {
                let bytes = key.expose().as_bytes();
                // HMAC takes keys of any length: this never fails.
                let mac = HmacSha256::new_from_slice(bytes).ok()?;
                Some(Key {
                    id: key_id(bytes),
                    mac,
                })
            })
            .collect();
        let subjects = auth
            .clients
            .iter()
            .filter_map(|c| c.identity())
            .map(|(kind, name)| subject(kind, name))
            .collect();
        Some(TokenKeys {
            keys,
            ttl_s: auth.token_ttl_s,
            subjects,
        })
    }

    /// Token lifetime in seconds, as answered in `expires_in`.
    pub(crate) fn ttl_s(&self) -> u64 {
        self.ttl_s
    }

    /// A token for `subject`, valid for the TTL from `now`, signed by the first key.
    pub(crate) fn issue(&self, subject: &str, now: SystemTime) -> Option<String> {
        let key = self.keys.first()?;
        let expires = unix_s(now).saturating_add(self.ttl_s);
        let mut payload = Vec::with_capacity(1 + 8 + subject.len());
        payload.push(FORMAT);
        payload.extend_from_slice(&expires.to_be_bytes());
        payload.extend_from_slice(subject.as_bytes());
        let mut token = format!("{}.{}", key.id, URL_SAFE_NO_PAD.encode(&payload));
        let mut mac = key.mac.clone();
        mac.update(token.as_bytes());
        let tag = mac.finalize().into_bytes();
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        Some(token)
    }

    /// Ok when `token` was signed by one of the keys, has not expired at `now`, and
    /// its client is still configured.
    pub(crate) fn verify(&self, token: &str, now: SystemTime) -> Result<(), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (id, payload) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(TokenError::UnknownKey)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = key.mac.clone();
        mac.update(signed.as_bytes());
        mac.verify_slice(&tag).map_err(|_| TokenError::Forged)?;
        // Authentic from here on: the payload was written by `issue`.
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let (&format, rest) = payload.split_first().ok_or(TokenError::Malformed)?;
        if format != FORMAT || rest.len() < 8 {
            return Err(TokenError::Malformed);
        }
        let (expires, subject) = rest.split_at(8);
        let expires = u64::from_be_bytes(expires.try_into().map_err(|_| TokenError::Malformed)?);
        if unix_s(now) >= expires {
            return Err(TokenError::Expired);
        }
        let subject = std::str::from_utf8(subject).map_err(|_| TokenError::Malformed)?;
        if !self.subjects.contains(subject) {
            return Err(TokenError::Revoked);
        }
        Ok(())
    }
}

/// What a token names as its holder: the kind and name of the client entry, so a
/// `username` and a `client_id` spelled alike stay apart.
pub(crate) fn subject(kind: ClientKind, name: &str) -> String {
    match kind {
        ClientKind::User => format!("user:{name}"),
        ClientKind::Client => format!("client:{name}"),
    }
}

/// A key's public id: a truncated hash of it, the same on every replica and
/// unchanged by the key's position in the file.
fn key_id(key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(KEY_ID_CONTEXT)
        .chain_update(key)
        .finalize();
    URL_SAFE_NO_PAD.encode(&digest[..KEY_ID_BYTES])
}

/// Seconds since the Unix epoch (0 for a clock before it).
fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{ClientSettings, Secret};

    const K1: &str = "first-key-0123456789-0123456789-0123456789";
    const K2: &str = "second-key-0123456789-0123456789-0123456789";

    fn keys(list: &[&str], ttl_s: u64) -> TokenKeys {
        let auth = AuthSettings {
            token_keys: list.iter().map(|&k| Secret::from(k)).collect(),
            token_ttl_s: ttl_s,
            clients: vec![ClientSettings {
                username: Some("cellosign".into()),
                ..ClientSettings::default()
            }],
            ..AuthSettings::default()
        };
        TokenKeys::new(&auth).unwrap_or_else(|| panic!("keys are configured"))
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn issue(k: &TokenKeys, subject: &str) -> String {
        k.issue(subject, now()).unwrap_or_default()
    }

    #[test]
    fn a_token_verifies_until_it_expires_and_is_url_safe() {
        let k = keys(&[K1], 60);
        let token = issue(&k, "user:cellosign");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{token}"
        );
        assert_eq!(k.verify(&token, now()), Ok(()));
        assert_eq!(k.verify(&token, now() + Duration::from_secs(59)), Ok(()));
        assert_eq!(
            k.verify(&token, now() + Duration::from_secs(60)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let k = keys(&[K1], 60);
        let token = issue(&k, "user:cellosign");
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let forged = String::from_utf8(bytes).unwrap_or_default();
            assert!(k.verify(&forged, now()).is_err(), "byte {i}: {forged}");
        }
        assert!(k.verify(&format!("{token}A"), now()).is_err());
        assert!(k.verify(&token[..token.len() - 1], now()).is_err());
    }

    #[test]
    fn a_longer_expiry_cannot_be_forged_without_the_key() {
        let k = keys(&[K1], 60);
        let token = issue(&k, "user:cellosign");
        let mut parts = token.split('.');
        let (id, _, tag) = (parts.next(), parts.next(), parts.next());
        let mut payload = vec![FORMAT];
        payload.extend_from_slice(&u64::MAX.to_be_bytes());
        payload.extend_from_slice(b"user:cellosign");
        let forged = format!(
            "{}.{}.{}",
            id.unwrap_or_default(),
            URL_SAFE_NO_PAD.encode(&payload),
            tag.unwrap_or_default()
        );
        assert_eq!(k.verify(&forged, now()), Err(TokenError::Forged));
    }

    #[test]
    fn rotation_the_first_key_signs_every_key_verifies() {
        let old = keys(&[K1], 60);
        let rotated = keys(&[K2, K1], 60);
        let retired = keys(&[K2], 60);
        let from_old = issue(&old, "user:cellosign");
        assert_eq!(rotated.verify(&from_old, now()), Ok(()));
        assert_eq!(
            retired.verify(&from_old, now()),
            Err(TokenError::UnknownKey)
        );
        let from_rotated = issue(&rotated, "user:cellosign");
        assert_eq!(retired.verify(&from_rotated, now()), Ok(()));
        assert_eq!(
            old.verify(&from_rotated, now()),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn a_token_of_a_client_no_longer_configured_is_refused() {
        let k = keys(&[K1], 60);
        assert_eq!(
            k.verify(&issue(&k, "client:cellosign"), now()),
            Err(TokenError::Revoked)
        );
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let k = keys(&[K1], 60);
        for bad in [
            "",
            ".",
            "..",
            "a.b.c",
            "static-token",
            "x.y",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(k.verify(bad, now()).is_err(), "{bad}");
        }
        // A valid MAC over a payload too short to hold an expiry.
        let id = key_id(K1.as_bytes());
        let signed = format!("{id}.{}", URL_SAFE_NO_PAD.encode([FORMAT, 0, 0]));
        let mut mac = HmacSha256::new_from_slice(K1.as_bytes())
            .unwrap_or_else(|_| panic!("HMAC takes any key"));
        mac.update(signed.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(
            k.verify(&format!("{signed}.{tag}"), now()),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn key_ids_do_not_depend_on_position_and_reveal_nothing_obvious() {
        let id = key_id(K1.as_bytes());
        assert_eq!(id.len(), 11);
        assert_eq!(id, key_id(K1.as_bytes()));
        assert_ne!(id, key_id(K2.as_bytes()));
        assert!(!issue(&keys(&[K1], 60), "user:cellosign").contains("first-key"));
    }
}
