//! Ingress: a webhook comes in, is checked and validated ([`webhook`]) by the
//! rules of its path ([`route`]: notifications or archives), copies of
//! one message id are stored once ([`dedup`]), and the event is made durable the
//! way the ack mode says before Cellosign hears "0" ([`delivery`]).

pub(crate) mod dedup;
pub(crate) mod delivery;
pub(crate) mod live;
mod route;
mod webhook;

pub(crate) use route::PathLimits;
pub(crate) use webhook::{Ingress, IngressLimits};
