//! Integration tests against the machine's real RabbitMQ and PostgreSQL (and, for the later
//! stages, an SMTP server and an EC2 API emulator). Each test has its own vhost and database.

// The console tests await the whole pipeline (drain) and the console in one future.
#![recursion_limit = "256"]

mod capacity;
mod changes;
mod cluster;
mod console;
mod emails;
mod faults;
mod helpers;
mod images;
mod intake;
mod monitoring;
mod operations;
mod pacing;
mod provisioning;
mod readiness;
mod runtime;
mod shutdown;
mod throttling;
mod trace_context;
mod traces;
mod userdata;
