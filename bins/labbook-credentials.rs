//! `labbook-credentials`: the intake stage on `booking-created`.
use clap::Parser;

/// Consumes `booking-created`: validates each booking, stores it once with one generated
/// credential per user, then publishes `credentials-ready` and the confirmation `notify`.
///
/// Configured by the environment (AMQP_URL, DATABASE_URL, LABBOOK_SECRET_KEY, ...; see the
/// README). Stops on SIGTERM/SIGINT after finishing the messages in flight.
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() -> std::process::ExitCode {
    Args::parse();
    labbook::startup::worker_main(&[labbook::startup::Worker::Credentials])
}
