//! `labbook publish FILE`: validate a booking (or an update, or a cancellation) as the
//! credentials stage would, then publish it.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use tracing::Instrument;

use crate::broker::json_properties;
use crate::broker::trace;
use crate::broker::{EXCHANGE, StageQueue, publish_confirmed};
use crate::config::Settings;
use crate::domain::{BookingMessage, parse_message};

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
    let checked = parse_message(&body, None, &settings.rules).and_then(|m| match m {
        // An update (revision above 0) may shorten a running booking to an end already past:
        // the pipeline decides against what is stored.
        BookingMessage::Book(b) => (if b.revision == 0 {
            b.check_not_over(chrono::Utc::now())
        } else {
            Ok(())
        })
        .map(|_| {
            format!(
                "booking {} revision {} ({} users at {})",
                b.id,
                b.revision,
                b.number_of_users.get(),
                crate::format_time(b.booking_time)
            )
        }),
        BookingMessage::Cancel(c) => Ok(format!(
            "the cancellation of booking {} at revision {}",
            c.id, c.revision
        )),
    });
    let what = match checked {
        Ok(what) => what,
        Err(invalid) => {
            eprintln!("not published: {invalid}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let id = crate::domain::peek_booking_id(&body)
        .map(|id| id.to_string())
        .unwrap_or_default();
    let (conn, channel) = super::open_broker(settings, "labbook publish").await?;
    let queue = StageQueue::BookingCreated.name();
    let message_id = format!("booking/{id}");
    let timeout = settings.broker.publish_timeout;
    // A booking from the command line starts its trace here.
    let span = trace::producer_span(EXCHANGE, queue, &message_id, None);
    async {
        let props = json_properties(&message_id);
        publish_confirmed(&channel, (EXCHANGE, queue), &body, props, timeout).await
    }
    .instrument(span)
    .await?;
    super::close_broker(conn, channel).await;
    println!(
        "published {what} to exchange {EXCHANGE}, routing key {queue}: confirmed by the broker"
    );
    Ok(ExitCode::SUCCESS)
}
