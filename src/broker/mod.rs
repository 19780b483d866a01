//! RabbitMQ: the topology (CONTRACT.md §2), confirmed publishing, and the consumer runtime that
//! every stage runs on.

pub mod connection;
pub mod dlq;
pub mod headers;
pub mod publisher;
pub mod runtime;
pub mod topology;

pub use connection::{connect, connect_with_retry, reconnect_delays};
pub use publisher::{PublishError, publish_confirmed};
pub use runtime::{Incoming, Outgoing, Stage, run_stage};
pub use topology::{EXCHANGE, StageQueue, Topology};
