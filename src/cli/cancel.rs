//! `labbook cancel BOOKING_ID`: publishes the booking's cancellation to `booking-created`,
//! exactly as an upstream would (docs/contract.md §3a: the stored revision plus one,
//! `"cancelled": true`), and says what will happen.

use std::process::ExitCode;

use anyhow::Context;

use crate::broker::{EXCHANGE, StageQueue, json_properties, publish_confirmed};
use crate::config::Settings;
use crate::domain::BookingId;
use crate::store::{BookingRecord, BookingState, Store, bookings, slots};

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
    let Some(booking) = bookings::find(&store.pool, id.as_str()).await? else {
        eprintln!("booking {id}: not found; nothing published");
        return Ok(ExitCode::FAILURE);
    };
    if booking.cancelled {
        println!(
            "booking {id} is already cancelled (revision {}); nothing published",
            booking.revision
        );
        return Ok(ExitCode::SUCCESS);
    }
    let machines = slots::for_booking(&store.pool, id.as_str())
        .await?
        .iter()
        .filter(|s| s.instance_id.is_some() && s.instance_state.as_deref() != Some("terminated"))
        .count();
    let Some(revision) = booking.revision.checked_add(1) else {
        eprintln!(
            "booking {id} is at the highest revision ({}); it cannot be changed any more",
            booking.revision
        );
        return Ok(ExitCode::FAILURE);
    };
    let body = serde_json::to_vec(&serde_json::json!({
        "booking_id": id.as_str(),
        "revision": revision,
        "cancelled": true,
    }))?;
    let (conn, channel) = super::open_broker(settings, "labbook cancel").await?;
    let queue = StageQueue::BookingCreated.name();
    let props = json_properties(&format!("booking/{id}/r{revision}"));
    let timeout = settings.broker.publish_timeout;
    publish_confirmed(&channel, (EXCHANGE, queue), &body, props, timeout).await?;
    super::close_broker(conn, channel).await;
    println!(
        "published the cancellation of booking {id} (revision {revision}, state {}) to exchange {EXCHANGE}, routing key {queue}: confirmed by the broker",
        booking.state
    );
    println!("{}", what_happens(&booking, machines));
    println!(
        "(if the upstream publishes its own revision {revision} first, this cancellation is a conflict: see labbook dlq list booking-created)"
    );
    Ok(ExitCode::SUCCESS)
}

/// What the cancellation will do to a booking in this state.
fn what_happens(b: &BookingRecord, machines: usize) -> String {
    let over = b.ends_at() <= chrono::Utc::now();
    match b.state {
        BookingState::Ended => "it has ended: it stays ended, and no email is sent".into(),
        _ if over => "its end has passed: it ends as planned, and no email is sent".into(),
        BookingState::Received | BookingState::Scheduled => {
            "it will not be provisioned; the booker gets a Booking Cancelled email".into()
        }
        BookingState::Failed => {
            "it had failed and nothing runs for it; the booker gets a Booking Cancelled email"
                .into()
        }
        _ => format!(
            "its {machines} running machine(s) will be terminated within a minute; the booker gets a Booking Cancelled email"
        ),
    }
}
