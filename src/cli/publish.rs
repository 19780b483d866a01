//! `labbook publish FILE`: validate a booking as the credentials stage would, then publish it.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::broker::json_properties;
use crate::broker::{EXCHANGE, StageQueue, publish_confirmed};
use crate::config::Settings;
use crate::domain::parse_booking;

pub async fn run(settings: &Settings, file: &Path) -> anyhow::Result<ExitCode> {
    let body = if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let booking = match parse_booking(&body, None, &settings.rules, chrono::Utc::now()) {
        Ok(b) => b,
        Err(invalid) => {
            eprintln!("not published: {invalid}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let (conn, channel) = super::open_broker(settings, "labbook publish").await?;
    let queue = StageQueue::BookingCreated.name();
    let message_id = format!("booking/{}", booking.id);
    let props = json_properties(&message_id);
    let timeout = settings.broker.publish_timeout;
    publish_confirmed(&channel, (EXCHANGE, queue), &body, props, timeout).await?;
    super::close_broker(conn, channel).await;
    println!(
        "published booking {} ({} users at {}) to exchange {EXCHANGE}, routing key {queue}: confirmed by the broker",
        booking.id,
        booking.number_of_users.get(),
        crate::format_time(booking.booking_time)
    );
    Ok(ExitCode::SUCCESS)
}
