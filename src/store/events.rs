//! A booking's history: every event published for it (docs/contract.md §7), recorded with its
//! exact body before it is published. Recording the same event and revision again returns the
//! body recorded first, so a step done again (a redelivery) publishes the same message.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

use crate::broker::Outgoing;
use crate::domain::{Event, events};

/// One line of a booking's history.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct HistoryEntry {
    pub event: String,
    pub revision: i32,
    pub at: DateTime<Utc>,
    pub state: Option<String>,
    pub detail: String,
}

/// Records `event` (once per booking, event and revision; every time for `rejected`) and
/// returns the message that publishes it.
pub async fn record(pool: &PgPool, event: &Event) -> Result<Outgoing, sqlx::Error> {
    let body = serde_json::to_string(event).expect("events serialize");
    let recorded: Option<String> = sqlx::query_scalar(
        "INSERT INTO booking_events (booking_id, event, revision, state, detail, body)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (booking_id, event, revision) WHERE event <> 'rejected' DO NOTHING
         RETURNING body",
    )
    .bind(&event.booking_id)
    .bind(event.event.as_str())
    .bind(event.revision as i32)
    .bind(event.state.as_deref())
    .bind(&event.detail)
    .bind(&body)
    .fetch_optional(pool)
    .await?;
    let body = match recorded {
        Some(body) => body,
        None => {
            sqlx::query_scalar(
                "SELECT body FROM booking_events
                 WHERE booking_id = $1 AND event = $2 AND revision = $3 AND event <> 'rejected'",
            )
            .bind(&event.booking_id)
            .bind(event.event.as_str())
            .bind(event.revision as i32)
            .fetch_one(pool)
            .await?
        }
    };
    Ok(events::outgoing(
        &event.booking_id,
        event.event,
        event.revision,
        body,
    ))
}

/// The booking's events, oldest first.
pub async fn history(pool: &PgPool, booking_id: &str) -> Result<Vec<HistoryEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event, revision, at, state, detail FROM booking_events
         WHERE booking_id = $1 ORDER BY seq",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await
}
