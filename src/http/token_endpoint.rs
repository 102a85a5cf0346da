//! The token URL Cellosign fetches webhook tokens from (SPEC 9), on the public
//! listener: `POST {auth.token_path}` with credentials as JSON or a form, answered
//! `{"access_token", "token_type": "Bearer", "expires_in"}` or an OAuth-style
//! `{"error": ...}`. Wrong credentials are counted per client address and slowed
//! down ([`Throttle`]). No credential and no token is ever logged: log lines carry
//! the address, the code and a fixed reason only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, PRAGMA,
    RETRY_AFTER,
};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::{AuthSettings, ClientKind};
use crate::http::auth::Auth;
use crate::http::body::{BodyError, read_body};
use crate::http::throttle::Throttle;
use crate::http::token::{TokenKeys, subject};
use crate::ops::metrics::Metrics;

/// Largest token request: credentials fit in far less.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Token requests handled at once, apart from the webhook's `http.max_in_flight`,
/// so a flood of token requests cannot take the webhook's places.
const MAX_IN_FLIGHT: usize = 64;

/// A configured client, kept as digests: candidates are hashed too, so the
/// constant-time comparison does not even depend on the secret's length.
struct Credential {
    /// Which pair of fields it is presented with.
    kind: ClientKind,
    /// SHA-256 of `username` or `client_id`.
    name: [u8; 32],
    /// SHA-256 of the password or client secret.
    secret: [u8; 32],
    /// What its tokens name as holder.
    subject: String,
}

/// The token URL and what it needs.
pub(crate) struct TokenEndpoint {
    path: String,
    clients: Vec<Credential>,
    /// Signs the tokens it issues (shared with the webhook's [`Auth`], which verifies).
    keys: Arc<TokenKeys>,
    /// Wrong credentials per client address.
    throttle: Throttle,
    /// At most [`MAX_IN_FLIGHT`] requests at once.
    in_flight: Semaphore,
    metrics: Arc<Metrics>,
    body_read_timeout: Duration,
}

/// The credential fields of a request, JSON or form; anything else (`scope`) is ignored.
/// Not `Debug`, so that no log line can print it by mistake.
#[derive(Default, Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// A refused token request: HTTP code, OAuth error code, a fixed description, a metric label.
struct Refusal {
    status: StatusCode,
    /// RFC 6749 error code, the `error` field.
    error: &'static str,
    /// Fixed text, never built from the request (it could echo a secret).
    description: &'static str,
    /// Reason label of `events_rejected_total`.
    metric: &'static str,
    retry_after_s: Option<u64>,
}

/// A 400 `invalid_request` with its description and metric.
fn invalid_request(description: &'static str, metric: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        error: "invalid_request",
        description,
        metric,
        retry_after_s: None,
    }
}

/// The 401 for credentials that match no client (the same whatever was wrong).
const INVALID_CLIENT: Refusal = Refusal {
    status: StatusCode::UNAUTHORIZED,
    error: "invalid_client",
    description: "",
    metric: "invalid_client",
    retry_after_s: None,
};

/// A 429 asking to come back after `seconds`.
fn slow_down(seconds: u64, error: &'static str, metric: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::TOO_MANY_REQUESTS,
        error,
        description: "",
        metric,
        retry_after_s: Some(seconds.max(1)),
    }
}

/// What credentials are compared as: fixed-size digests, so the comparison's time
/// depends on neither the candidate's nor the secret's length.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl TokenEndpoint {
    /// From `auth.*` (clients with their secrets already read), signing with `keys`.
    pub(crate) fn new(
        settings: &AuthSettings,
        keys: Arc<TokenKeys>,
        metrics: Arc<Metrics>,
        body_read_timeout: Duration,
    ) -> Self {
        let clients = settings
            .clients
            .iter()
            .filter_map(|c| {
                let (kind, name) = c.identity()?;
                let secret = c.secret.as_ref()?;
                Some(Credential {
                    kind,
                    name: sha256(name.as_bytes()),
                    secret: sha256(secret.expose().as_bytes()),
                    subject: subject(kind, name),
                })
            })
            .collect();
        TokenEndpoint {
            path: settings.token_path.clone(),
            clients,
            keys,
            throttle: Throttle::default(),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            metrics,
            body_read_timeout,
        }
    }

    /// The path it is served on.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// Answers one request to the token URL, with its metrics and log line. `auth`
    /// holds the webhook's rules for client addresses (`allow_from`, trusted
    /// proxies), the ones in force when the request arrived.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        auth: &Auth,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let (head, body) = req.into_parts();
        let result = self.issue(auth, &head, body, peer).await;
        let (response, reason) = match result {
            Ok(token) => (self.granted(&token), ""),
            Err(refusal) => {
                self.metrics.count_rejection(refusal.metric);
                (refused(&refusal), refusal.error)
            }
        };
        let code = response.status().as_u16();
        self.metrics.count_request(code);
        info!(
            target: "cellosign_bridge::request",
            method = %head.method,
            path = %head.uri.path(),
            peer = %peer.ip(),
            code,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            reason,
            "token"
        );
        response
    }

    /// The checks in order (405, 403, 429, 400/413, 401), then a fresh token.
    async fn issue(
        &self,
        auth: &Auth,
        head: &Parts,
        body: Incoming,
        peer: SocketAddr,
    ) -> Result<String, Refusal> {
        if head.method != Method::POST {
            return Err(Refusal {
                status: StatusCode::METHOD_NOT_ALLOWED,
                ..invalid_request("use POST", "method")
            });
        }
        if !auth.client_allowed(peer.ip(), &head.headers) {
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                error: "access_denied",
                description: "",
                metric: "forbidden",
                retry_after_s: None,
            });
        }
        let client = auth.client(peer.ip(), &head.headers);
        // Refused before the body is read: a blocked address cannot even try.
        if let Some(wait) = self.throttle.blocked(client, Instant::now()) {
            return Err(slow_down(
                wait.as_secs_f64().ceil() as u64,
                "slow_down",
                "throttled",
            ));
        }
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| slow_down(1, "temporarily_unavailable", "overloaded"))?;
        let request = self.read(head, body).await?;
        let (kind, name, secret) = credentials(&request)?;
        let Some(subject) = self.find(kind, name, secret) else {
            if let Some(block) = self.throttle.failed(client, Instant::now()) {
                warn!(
                    peer = %client,
                    block_s = block.as_secs(),
                    "token URL: repeated wrong credentials, address slowed down"
                );
            }
            return Err(INVALID_CLIENT);
        };
        self.throttle.succeeded(client);
        self.keys
            .issue(subject, SystemTime::now())
            .ok_or(INVALID_CLIENT)
    }

    /// The body, parsed by its content type (JSON when none is given and it looks like JSON).
    async fn read(&self, head: &Parts, body: Incoming) -> Result<TokenRequest, Refusal> {
        let too_large = Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..invalid_request("body too large", "too_large")
        };
        let essence = head.headers.get(CONTENT_TYPE).map(|v| {
            v.to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
        });
        let declared = head
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
            return Err(too_large);
        }
        let bytes = read_body(body, MAX_REQUEST_BYTES, declared, self.body_read_timeout)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge => too_large,
                BodyError::Unreadable => invalid_request("body could not be read", "body_error"),
                BodyError::Timeout => Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    ..invalid_request("body not received in time", "body_timeout")
                },
            })?;
        let json = match essence {
            Some(e) if e.eq_ignore_ascii_case("application/json") => true,
            Some(e) if e.eq_ignore_ascii_case("application/x-www-form-urlencoded") => false,
            Some(_) => {
                return Err(invalid_request(
                    "content type must be application/json or application/x-www-form-urlencoded",
                    "content_type",
                ));
            }
            None => bytes.trim_ascii_start().starts_with(b"{"),
        };
        // Parser errors are not shown: they may quote a secret. An array would
        // deserialize by position: only an object is a request.
        if json {
            let not_json =
                || invalid_request("body is not a JSON object of strings", "malformed_json");
            if !bytes.trim_ascii_start().starts_with(b"{") {
                return Err(not_json());
            }
            serde_json::from_slice(&bytes).map_err(|_| not_json())
        } else {
            parse_form(&bytes)
        }
    }

    /// The subject of the client these credentials belong to. Every configured
    /// client is compared, in constant time, whatever matches.
    fn find(&self, kind: ClientKind, name: &str, secret: &str) -> Option<&str> {
        let (name, secret) = (sha256(name.as_bytes()), sha256(secret.as_bytes()));
        let mut found = u32::MAX;
        for (index, client) in self.clients.iter().enumerate() {
            let hit = client.name.as_slice().ct_eq(&name)
                & client.secret.as_slice().ct_eq(&secret)
                & u8::from(client.kind == kind).ct_eq(&1);
            found.conditional_assign(&(index as u32), hit);
        }
        self.clients.get(found as usize).map(|c| c.subject.as_str())
    }

    /// The 200 with a token.
    fn granted(&self, token: &str) -> Response<Full<Bytes>> {
        /// RFC 6749 5.1.
        #[derive(Serialize)]
        struct Granted<'a> {
            access_token: &'a str,
            token_type: &'static str,
            expires_in: u64,
        }
        json(
            StatusCode::OK,
            &Granted {
                access_token: token,
                token_type: "Bearer",
                expires_in: self.keys.ttl_s(),
            },
        )
    }
}

/// Which client the request names, and its secret. The credential fields decide,
/// not `grant_type`, which may be absent, `password` or `client_credentials`.
fn credentials(request: &TokenRequest) -> Result<(ClientKind, &str, &str), Refusal> {
    match request.grant_type.as_deref() {
        None | Some("password" | "client_credentials") => {}
        Some(_) => {
            return Err(Refusal {
                error: "unsupported_grant_type",
                ..invalid_request(
                    "grant_type must be password or client_credentials",
                    "unsupported_grant_type",
                )
            });
        }
    }
    match (
        &request.username,
        &request.password,
        &request.client_id,
        &request.client_secret,
    ) {
        (Some(user), Some(password), None, None) => Ok((ClientKind::User, user, password)),
        (None, None, Some(id), Some(secret)) => Ok((ClientKind::Client, id, secret)),
        _ => Err(invalid_request(
            "send username and password, or client_id and client_secret",
            "missing_field",
        )),
    }
}

/// An `application/x-www-form-urlencoded` body; a repeated field is refused
/// (RFC 6749 3.2), an unknown one ignored.
fn parse_form(bytes: &[u8]) -> Result<TokenRequest, Refusal> {
    let mut request = TokenRequest::default();
    for (key, value) in form_urlencoded::parse(bytes) {
        let field = match key.as_ref() {
            "grant_type" => &mut request.grant_type,
            "username" => &mut request.username,
            "password" => &mut request.password,
            "client_id" => &mut request.client_id,
            "client_secret" => &mut request.client_secret,
            _ => continue,
        };
        if field.replace(value.into_owned()).is_some() {
            return Err(invalid_request("a field is repeated", "duplicate_field"));
        }
    }
    Ok(request)
}

/// An error answer: `{"error", "error_description"?}` and its headers.
fn refused(refusal: &Refusal) -> Response<Full<Bytes>> {
    /// RFC 6749 5.2.
    #[derive(Serialize)]
    struct Error {
        error: &'static str,
        #[serde(skip_serializing_if = "str::is_empty")]
        error_description: &'static str,
    }
    let mut response = json(
        refusal.status,
        &Error {
            error: refusal.error,
            error_description: refusal.description,
        },
    );
    let headers = response.headers_mut();
    if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("POST"));
    }
    if let Some(seconds) = refusal.retry_after_s {
        headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    // The rest of the body was not read: the connection cannot be reused.
    if matches!(
        refusal.status,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A JSON answer that no cache keeps (it may hold a token).
fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(grant: Option<&str>, fields: &[(&str, &str)]) -> TokenRequest {
        let mut r = TokenRequest {
            grant_type: grant.map(String::from),
            ..TokenRequest::default()
        };
        for (k, v) in fields {
            let v = Some(v.to_string());
            match *k {
                "username" => r.username = v,
                "password" => r.password = v,
                "client_id" => r.client_id = v,
                _ => r.client_secret = v,
            }
        }
        r
    }

    #[test]
    fn the_credential_fields_decide_the_kind() {
        let user = request(Some("password"), &[("username", "u"), ("password", "p")]);
        assert!(matches!(
            credentials(&user),
            Ok((ClientKind::User, "u", "p"))
        ));
        let client = request(
            Some("client_credentials"),
            &[("client_id", "c"), ("client_secret", "s")],
        );
        assert!(matches!(
            credentials(&client),
            Ok((ClientKind::Client, "c", "s"))
        ));
        let no_grant = request(None, &[("client_id", "c"), ("client_secret", "s")]);
        assert!(credentials(&no_grant).is_ok());
    }

    #[test]
    fn incomplete_mixed_and_unknown_grants_are_refused() {
        let unknown = request(
            Some("refresh_token"),
            &[("username", "u"), ("password", "p")],
        );
        assert!(matches!(credentials(&unknown), Err(r) if r.error == "unsupported_grant_type"));
        for fields in [
            &[("username", "u")][..],
            &[("client_secret", "s")],
            &[("username", "u"), ("password", "p"), ("client_id", "c")],
            &[],
        ] {
            let r = request(None, fields);
            assert!(matches!(credentials(&r), Err(r) if r.error == "invalid_request"));
        }
    }

    #[test]
    fn forms_decode_and_refuse_repeated_fields() {
        let r = parse_form(b"grant_type=password&username=a%40b&password=p+q&scope=x");
        let r = r.unwrap_or_default();
        assert_eq!(r.username.as_deref(), Some("a@b"));
        assert_eq!(r.password.as_deref(), Some("p q"));
        assert!(parse_form(b"username=a&username=b").is_err());
    }
}
