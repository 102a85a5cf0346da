//! `[auth]`: who may post webhooks (static tokens, client networks) and who may
//! fetch a signed token (`[[auth.clients]]`, SPEC 9). Secrets are read from their
//! files here, at load, so a missing or unreadable file stops the start naming
//! its key, and nothing later touches the disk for them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, invalid, secret_lines};
use crate::http::net::Cidr;

/// Shortest accepted signing key: 256 bits, the size of HMAC-SHA256's output.
const MIN_TOKEN_KEY_BYTES: usize = 32;

/// Longest accepted client name (`username` or `client_id`); keeps tokens short.
const MAX_CLIENT_NAME_BYTES: usize = 128;

/// Who may post.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub tokens: Vec<Secret>,
    pub tokens_file: String,
    pub allow_query_token: bool,
    pub allow_from: Vec<Cidr>,
    /// Where Cellosign fetches a signed token (served only when clients are configured).
    pub token_path: String,
    /// Lifetime of a signed token, in seconds.
    pub token_ttl_s: u64,
    /// Signing keys, one per line: the first signs, all verify.
    pub token_keys_file: String,
    /// Who may fetch a signed token. Last: TOML writes tables after plain values.
    pub clients: Vec<ClientSettings>,
    /// The keys read from `token_keys_file`, in file order; never shown.
    #[serde(skip)]
    pub token_keys: Vec<Secret>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            tokens: Vec::new(),
            tokens_file: String::new(),
            allow_query_token: true,
            allow_from: Vec::new(),
            token_path: "/webhooks/cellosign/token".into(),
            token_ttl_s: 3600,
            token_keys_file: String::new(),
            clients: Vec::new(),
            token_keys: Vec::new(),
        }
    }
}

/// One `[[auth.clients]]` entry: `username` + `password_file` (Cellosign's password
/// grant) or `client_id` + `client_secret_file` (its client credentials).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    /// The name of a password-grant client (its tokens name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The file holding that client's password: a path, so `check-config` can show it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The name of a client-credentials client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The file holding that client's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// The password or client secret read from its file; never shown.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

/// Which credential pair a client presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKind {
    /// `username` + `password`.
    User,
    /// `client_id` + `client_secret`.
    Client,
}

impl ClientSettings {
    /// The entry's kind and name, once it was checked at load.
    pub(crate) fn identity(&self) -> Option<(ClientKind, &str)> {
        match (&self.username, &self.client_id) {
            (Some(user), None) => Some((ClientKind::User, user)),
            (None, Some(id)) => Some((ClientKind::Client, id)),
            _ => None,
        }
    }

    /// The file holding this entry's secret, and the key that names it.
    fn secret_file(&self, index: usize) -> Result<(&Path, String), ConfigError> {
        let key = |field: &str| format!("auth.clients[{index}].{field}");
        match (
            &self.username,
            &self.password_file,
            &self.client_id,
            &self.client_secret_file,
        ) {
            (Some(_), Some(file), None, None) => Ok((file, key("password_file"))),
            (None, None, Some(_), Some(file)) => Ok((file, key("client_secret_file"))),
            (Some(_), None, None, None) => Err(entry(key("password_file"), "missing")),
            (None, None, Some(_), None) => Err(entry(key("client_secret_file"), "missing")),
            _ => Err(entry(
                format!("auth.clients[{index}]"),
                "set either username + password_file or client_id + client_secret_file",
            )),
        }
    }
}

/// A bad value in a list entry, named by its index.
fn entry(key: String, problem: impl Into<String>) -> ConfigError {
    ConfigError::Entry {
        key,
        problem: problem.into(),
    }
}

impl AuthSettings {
    /// Reads every secrets file: `tokens_file`, each client's secret, the token keys.
    pub(super) fn load_files(&mut self) -> Result<(), ConfigError> {
        if !self.tokens_file.is_empty() {
            let path = Path::new(&self.tokens_file);
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokensFile {
                path: path.to_path_buf(),
                source,
            })?;
            self.tokens.extend(secret_lines(&text).map(Secret::from));
        }
        for (index, client) in self.clients.iter_mut().enumerate() {
            let (file, key) = client.secret_file(index)?;
            let text = read(file, &key)?;
            // The whole file is the secret, less the line end an editor adds.
            let secret = text.trim_end_matches(['\r', '\n']);
            if secret.is_empty() {
                return Err(entry(key, format!("{} is empty", file.display())));
            }
            client.secret = Some(Secret::from(secret));
        }
        if !self.token_keys_file.is_empty() {
            let key = "auth.token_keys_file".to_string();
            let text = read(Path::new(&self.token_keys_file), &key)?;
            self.token_keys = secret_lines(&text).map(Secret::from).collect();
        }
        Ok(())
    }

    /// Rejects auth values that load but cannot work.
    pub(super) fn check(&self, webhook_path: &str) -> Result<(), ConfigError> {
        if self
            .tokens
            .iter()
            .any(|t| t.expose().is_empty() || t.expose().chars().any(char::is_whitespace))
        {
            return Err(invalid(
                "auth.tokens",
                "tokens must be non-empty and contain no whitespace",
            ));
        }
        if !self.token_path.starts_with('/') {
            return Err(invalid("auth.token_path", "must start with '/'"));
        }
        if self.token_path == webhook_path {
            return Err(invalid("auth.token_path", "must differ from http.path"));
        }
        if self.token_ttl_s == 0 {
            return Err(invalid("auth.token_ttl_s", "must be > 0"));
        }
        let mut names = std::collections::HashSet::new();
        for (index, client) in self.clients.iter().enumerate() {
            let Some((kind, name)) = client.identity() else {
                return Err(entry(format!("auth.clients[{index}]"), "no name"));
            };
            let field = match kind {
                ClientKind::User => "username",
                ClientKind::Client => "client_id",
            };
            if name.is_empty()
                || name.len() > MAX_CLIENT_NAME_BYTES
                || name.chars().any(char::is_control)
            {
                return Err(entry(
                    format!("auth.clients[{index}].{field}"),
                    format!("1..={MAX_CLIENT_NAME_BYTES} bytes, no control characters"),
                ));
            }
            if !names.insert((kind, name)) {
                return Err(entry(
                    format!("auth.clients[{index}].{field}"),
                    "listed twice",
                ));
            }
        }
        self.check_keys()
    }

    /// Keys are required with clients, long enough, and distinct.
    fn check_keys(&self) -> Result<(), ConfigError> {
        let key = "auth.token_keys_file";
        match (self.clients.is_empty(), self.token_keys.is_empty()) {
            (false, true) => {
                return Err(invalid(
                    key,
                    "required (one key or more) when [[auth.clients]] are configured",
                ));
            }
            (true, false) => {
                return Err(invalid(
                    key,
                    "set, but no [[auth.clients]] can fetch a token",
                ));
            }
            _ => {}
        }
        for (line, k) in self.token_keys.iter().enumerate() {
            if k.expose().len() < MIN_TOKEN_KEY_BYTES {
                return Err(invalid(
                    key,
                    format!(
                        "key {} is shorter than {MIN_TOKEN_KEY_BYTES} bytes (e.g. `openssl rand -base64 48`)",
                        line + 1
                    ),
                ));
            }
            if self.token_keys[..line].contains(k) {
                return Err(invalid(key, format!("key {} is listed twice", line + 1)));
            }
        }
        Ok(())
    }
}

/// A secrets file's text; the error names the key that points at it.
fn read(path: &Path, key: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        entry(
            key.to_string(),
            format!("cannot read {}: {e}", path.display()),
        )
    })
}
