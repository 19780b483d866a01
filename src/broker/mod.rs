//! RabbitMQ: the topology (docs/contract.md §2), confirmed publishing, and the consumer
//! runtime that every stage runs on. The runtime knows queues, messages and how a stage
//! failed ([`StageError`]); it knows nothing of bookings.
//!
//! What other code needs is re-exported here; the modules are the crate's own, except the
//! operator's dead-letter tooling ([`dlq`]) and the `x-labbook-*` headers ([`headers`]).

pub(crate) mod connection;
pub mod dlq;
mod error;
pub mod headers;
pub(crate) mod publisher;
pub(crate) mod runtime;
pub(crate) mod ticker;
pub(crate) mod topology;
pub mod trace;

pub use connection::{
    CONNECT_TIMEOUT as BROKER_CONNECT_TIMEOUT, broker_urls, confirmed_channel, connect,
    connect_with_retry, reconnect_delays, retry_until_cancelled,
};
pub use error::StageError;
pub use publisher::{DEFAULT_CONFIRM_TIMEOUT, PublishError, json_properties, publish_confirmed};
pub use runtime::{
    Incoming, MAX_BODY_BYTES, Outgoing, Route, Stage, Subject, Undecodable, run_stage,
    run_until_empty,
};
pub use ticker::{Tick, TickError, run_ticking, tick_until_idle};
pub use topology::{EVENTS_EXCHANGE, EXCHANGE, StageQueue, Topology, delay_queue_name};
