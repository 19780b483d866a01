//! The operator's `labbook` command.

mod cancel;
mod dlq;
mod image;
mod publish;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::broker::{Topology, connect};
use crate::config::Settings;
use crate::startup::{Application, Worker, shutdown_signal};
use crate::store::Store;

/// labbook: books lab machines on AWS EC2 for training events.
///
/// Configuration comes from the environment (AMQP_URL, DATABASE_URL, SMTP_URL, MAIL_FROM,
/// LABBOOK_* and the AWS SDK's variables); LABBOOK_CONFIG may name a KEY=VALUE file that fills
/// in what the environment does not set. See the README for the full table.
#[derive(Parser, Debug)]
#[command(name = "labbook", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the database if needed and apply the schema migrations.
    Migrate,
    /// Declare the broker topology (exchange, stage queues, retry tiers, dead-letter queues).
    Topology,
    /// Validate a booking file (JSON: a booking, an update with a higher revision, or a
    /// cancellation) and publish it to `booking-created`, with a confirm.
    Publish {
        /// The booking JSON file; `-` reads standard input.
        file: PathBuf,
    },
    /// Publish the cancellation of a stored booking, as an upstream would (its revision plus
    /// one, "cancelled": true), and say what will happen: nothing launches, running machines
    /// are terminated within a minute, the booker gets a Booking Cancelled email.
    Cancel { booking_id: String },
    /// Show what is stored about a booking: state, revision, schedule, instances, emails and its
    /// history of events. Never a password.
    Status {
        booking_id: String,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, replay or purge a stage's dead letters.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Make, list and remove this installation's baked machine images (AMIs).
    ///
    /// A baked image holds what every lab machine's bootstrap would otherwise install at boot
    /// (The Littlest JupyterHub, the pinned certbot): `labbook image build` makes one from
    /// LABBOOK_BASE_AMI_ID and prints the LABBOOK_AMI_ID to set; `list` shows them; `prune`
    /// removes old ones with their snapshots. Images are found by their labbook:installation
    /// tag: each installation sees only its own.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Serve the operator console (web pages and an HTTP API) until SIGTERM/SIGINT.
    ///
    /// Bookings with their timelines, dead letters (filter, dry-run replay, replay, purge) and
    /// the pipeline's health, at http://ADDR/; the API under /api, described by
    /// /api/openapi.json. Every request needs LABBOOK_CONSOLE_TOKEN (at least 16 characters):
    /// pages after logging in with it, the API as `Authorization: Bearer <token>`. Needs
    /// AMQP_URL and DATABASE_URL, never LABBOOK_SECRET_KEY: no page shows a password.
    Console {
        /// Where to listen (default 127.0.0.1:8080, or LABBOOK_CONSOLE_LISTEN). Keep it on
        /// loopback unless an ingress with TLS stands in front (see the README).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Run workers in this process until SIGTERM/SIGINT.
    Run {
        /// `all`, or the workers to run.
        #[arg(required = true, value_name = "all|WORKER")]
        workers: Vec<RunTarget>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RunTarget {
    /// Every stage.
    All,
    /// `booking-created`.
    Credentials,
    /// `credentials-ready` and the durable timer.
    Scheduler,
    /// `provision-due` and `teardown-due`.
    Provisioner,
    /// `notify`.
    Notifier,
}

/// Runs the command line; the exit code follows docs/contract.md §4 (2: configuration error).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only the workers' own logs are wanted on a terminal; other commands print their answer.
    let filter = match cli.command {
        Command::Run { .. } | Command::Console { .. } => crate::telemetry::DEFAULT_FILTER,
        _ => "warn",
    };
    crate::startup::run_process(filter, |settings| async move {
        match run(cli.command, settings).await {
            Ok(code) => code,
            Err(err) => {
                if let Some(cfg) = err.downcast_ref::<crate::config::ConfigError>() {
                    eprintln!("{cfg}");
                    return ExitCode::from(2);
                }
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// A connection and a confirmed channel on which the whole topology is declared.
async fn open_broker(
    settings: &Settings,
    name: &str,
) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let conn = connect(settings.broker.amqp_url.expose_secret(), name)
        .await
        .context("cannot reach the broker")?;
    // The operator's commands declare the topology whatever LABBOOK_DECLARE_TOPOLOGY says:
    // `labbook topology` is how an admin user declares it for workers that may not.
    let topology = Topology::new(settings.broker.retry_delays.clone());
    let channel = crate::broker::confirmed_channel(&conn, &topology)
        .await
        .context("declaring the broker topology")?;
    Ok((conn, channel))
}

/// Closes the channel, then the connection (closing a connection under an open channel makes
/// the AMQP client log an error).
async fn close_broker(conn: lapin::Connection, channel: lapin::Channel) {
    let _ = channel.close(200, "labbook: done".into()).await;
    let _ = conn.close(200, "labbook: done".into()).await;
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate => {
            let url = settings.database_url.expose_secret();
            let store = Store::connect_lazy(url, 2)?;
            store.ensure_schema(url).await?;
            println!("database schema is up to date");
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology => {
            let (conn, channel) = open_broker(&settings, "labbook topology").await?;
            println!("declared exchange {} and queues:", crate::broker::EXCHANGE);
            for name in Topology::new(settings.broker.retry_delays.clone()).queue_names() {
                println!("  {name}");
            }
            close_broker(conn, channel).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish { file } => publish::run(&settings, &file).await,
        Command::Status { booking_id, json } => status::run(&settings, &booking_id, json).await,
        Command::Cancel { booking_id } => cancel::run(&settings, &booking_id).await,
        Command::Dlq { command } => dlq::run(&settings, command).await,
        Command::Image { command } => image::run(&settings, command).await,
        Command::Console { listen } => {
            let console = crate::console::Console::build(&settings, listen).await?;
            console.run_until_stopped(shutdown_signal()).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { workers } => {
            let workers: Vec<Worker> = if workers.contains(&RunTarget::All) {
                Worker::ALL.to_vec()
            } else {
                workers
                    .iter()
                    .map(|w| match w {
                        RunTarget::Credentials | RunTarget::All => Worker::Credentials,
                        RunTarget::Scheduler => Worker::Scheduler,
                        RunTarget::Provisioner => Worker::Provisioner,
                        RunTarget::Notifier => Worker::Notifier,
                    })
                    .collect()
            };
            let app = Application::build(&settings, &workers).await?;
            app.run_until_stopped(shutdown_signal()).await;
            Ok(ExitCode::SUCCESS)
        }
    }
}
