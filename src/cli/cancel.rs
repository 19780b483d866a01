//! `labbook cancel BOOKING_ID`: publishes the booking's cancellation to `booking-created`,
//! exactly as an upstream would (docs/contract.md §3a: the stored revision plus one,
//! `"cancelled": true`; built by [`crate::ops::change`], which the console shares), and says
//! what will happen.

use std::process::ExitCode;

use anyhow::Context;

use crate::broker::{EXCHANGE, StageQueue};
use crate::config::Settings;
use crate::domain::BookingId;
use crate::ops::change::{self, Change, Refused};
use crate::store::Store;

pub async fn run(settings: &Settings, booking_id: &str) -> anyhow::Result<ExitCode> {
    let id = match BookingId::parse(booking_id) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("not published: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let store = Store::connect(settings.database_url.expose_secret())
        .await
        .context("cannot connect to the database")?;
    let planned = match change::plan(&store.pool, &id, Change::Cancel, &settings.rules).await? {
        Ok(planned) => planned,
        Err(Refused::NotFound) => {
            eprintln!("booking {id}: not found; nothing published");
            return Ok(ExitCode::FAILURE);
        }
        Err(Refused::AlreadyCancelled { revision }) => {
            println!("booking {id} is already cancelled (revision {revision}); nothing published");
            return Ok(ExitCode::SUCCESS);
        }
        Err(refused) => {
            eprintln!("booking {id}: {refused}; nothing published");
            return Ok(ExitCode::FAILURE);
        }
    };
    let (conn, channel) = super::open_broker(settings, "labbook cancel").await?;
    let queue = StageQueue::BookingCreated.name();
    planned
        .publish(&channel, settings.broker.publish_timeout)
        .await?;
    super::close_broker(conn, channel).await;
    let revision = planned.revision;
    println!(
        "published the cancellation of booking {id} (revision {revision}, state {}) to exchange {EXCHANGE}, routing key {queue}: confirmed by the broker",
        planned.booking.state
    );
    println!("{}", planned.what_happens());
    println!(
        "(if the upstream publishes its own revision {revision} first, this cancellation is a conflict: see labbook dlq list booking-created)"
    );
    Ok(ExitCode::SUCCESS)
}
