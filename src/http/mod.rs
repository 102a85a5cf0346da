//! HTTP serving shared by the public and admin listeners: accept, TLS, connection
//! limits and timers ([`server`], [`conn_guard`]), bounded body reads ([`body`]),
//! and who is calling: tokens and allowed networks ([`auth`]) from the client
//! address ([`net`]); signed tokens ([`token`]) and the token URL that issues
//! them ([`token_endpoint`]), slowed down for guessers ([`throttle`]).

pub(crate) mod auth;
pub(crate) mod body;
pub(crate) mod conn_guard;
pub(crate) mod net;
pub(crate) mod server;
mod throttle;
pub(crate) mod token;
pub(crate) mod token_endpoint;
