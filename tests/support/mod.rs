//! Private brokers and network cuts for tests that must never touch the shared RabbitMQ.
#![allow(dead_code)]

pub mod bridge_process;
pub mod otlp_receiver;
pub mod rabbit_node;
pub mod tcp_proxy;
