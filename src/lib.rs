//! labbook books lab machines on AWS EC2 for training events.
//!
//! Upstream systems publish bookings to RabbitMQ; a pipeline of workers, each one stage, takes
//! them through:
//!
//! ```text
//! booking-created ─▶ credentials ─▶ credentials-ready ─▶ scheduler ─▶ provision-due ─▶ provisioner ─▶ notify ─▶ notifier
//!                         └───────────────────────────────── notify (confirmation) ──────────────────────────▶┘
//!                                                             scheduler ─▶ teardown-due ─▶ provisioner
//! ```
//!
//! Layout:
//! - [`domain`]: parsed, valid values (bookings, credentials, the inter-stage messages and
//!   their ids);
//! - [`broker`]: the consumer runtime every stage runs on (a [`broker::Stage`] names its queue
//!   and its message type; the runtime decodes, retries, waits and dead-letters), the
//!   topology, confirmed publishing and the dead-letter tooling;
//! - [`store`]: PostgreSQL (bookings, credentials, schedule, slots, email log);
//! - [`stages`]: one module per stage, each a step function over one queue's messages;
//! - [`ec2`], [`mail`]: the narrow EC2 client and the emails, each sorting its own errors;
//! - [`config`], [`telemetry`], [`crypto`]: settings, logs and the encryption of stored passwords;
//! - [`startup`]: the process bootstrap, wiring the workers and running them until a shutdown
//!   signal; [`health`]: metrics and probes;
//! - [`cli`]: the operator's `labbook` command; [`console`]: its web console and HTTP API;
//!   [`ops`]: what the two share (dead letters).
//!
//! The contract with the upstream systems, operators and trainees is `docs/contract.md`.

pub mod broker;
pub mod cli;
pub mod config;
pub mod console;
pub mod crypto;
pub mod domain;
pub mod ec2;
pub mod health;
pub mod mail;
pub mod ops;
pub mod stages;
pub mod startup;
pub mod store;
pub mod telemetry;

/// Times as the emails and the CLI write them: UTC, `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}
