//! `labbook-notifier`: see `--help`.
use clap::Parser;

#[derive(Parser)]
#[command(version, about = labbook::startup::about(labbook::startup::Worker::Notifier))]
struct Args {}

fn main() -> std::process::ExitCode {
    Args::parse();
    labbook::startup::worker_main(&[labbook::startup::Worker::Notifier])
}
