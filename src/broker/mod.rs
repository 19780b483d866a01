//! RabbitMQ: the topology (docs/contract.md §2), confirmed publishing, and the consumer
//! runtime that every stage runs on. The runtime knows queues, messages and how a stage
//! failed ([`StageError`]); it knows nothing of bookings.

pub mod connection;
pub mod dlq;
mod error;
pub mod headers;
pub mod publisher;
pub mod runtime;
pub mod topology;

pub use connection::{
    confirmed_channel, connect, connect_with_retry, reconnect_delays, retry_until_cancelled,
};
pub use error::StageError;
pub use publisher::{PublishError, publish_confirmed};
pub use runtime::{Incoming, Outgoing, Stage, Subject, Undecodable, run_stage, run_until_empty};
pub use topology::{EXCHANGE, StageQueue, Topology};
