//! The broker side: the AMQP connection kept up over `amqp.urls` ([`link`]), the
//! exchanges and queues declared on it ([`topology`]), how an envelope becomes an
//! AMQP message and how a confirm is judged ([`message`]), and the publisher of
//! `confirmed` mode ([`confirmed`]).

pub(crate) mod confirmed;
pub(crate) mod link;
pub(crate) mod message;
pub(crate) mod topology;
