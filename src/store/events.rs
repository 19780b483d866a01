//! A booking's history and the outbox of its events (docs/contract.md §7). An event is written
//! in the transaction of the step it reports, under the booking's lock, numbered in the
//! booking's own sequence; [`claim_next`] and [`published`] are the relay's: it publishes each
//! booking's rows in that order with confirms. Recording the same event and revision again
//! keeps the body recorded first and marks it to be published again, so a step done again (a
//! redelivery) publishes the same message.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgPool};

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

/// Records `event` in `tx` (once per booking, event and revision; every time for `rejected`),
/// for the relay to publish once `tx` commits. Takes the booking's lock (the one intake holds
/// while it decides, [`super::intake::lock`]) until `tx` ends, so the booking's events are
/// numbered in the order their transactions commit.
pub async fn record_in(tx: &mut PgConnection, event: &Event) -> Result<(), sqlx::Error> {
    super::intake::lock(tx, &event.booking_id).await?;
    let body = serde_json::to_string(event).expect("events serialize");
    let traceparent = crate::broker::trace::current().map(|c| c.traceparent());
    sqlx::query(
        "INSERT INTO booking_events
             (booking_id, event, revision, state, detail, body, traceparent, booking_seq)
         VALUES ($1, $2, $3, $4, $5, $6, $7,
                 (SELECT coalesce(max(booking_seq), 0) + 1 FROM booking_events
                   WHERE booking_id = $1))
         ON CONFLICT (booking_id, event, revision) WHERE event <> 'rejected'
         DO UPDATE SET published_at = NULL",
    )
    .bind(&event.booking_id)
    .bind(event.event.as_str())
    .bind(event.revision as i32)
    .bind(event.state.as_deref())
    .bind(&event.detail)
    .bind(&body)
    .bind(traceparent)
    .execute(tx)
    .await?;
    Ok(())
}

/// [`record_in`] a transaction of its own, for a step whose other effects are already stored.
pub async fn record(pool: &PgPool, event: &Event) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    record_in(&mut tx, event).await?;
    tx.commit().await
}

/// A row as the relay reads it: seq, booking id, event, revision, body, traceparent.
type Unpublished = (i64, String, String, i32, String, Option<String>);

/// Locks, for this transaction, up to `limit` events to publish: of each booking, the first
/// unpublished one, and only when no earlier event of it waits (one another relay holds, say).
pub async fn claim_next(
    tx: &mut PgConnection,
    limit: i64,
) -> Result<Vec<(i64, Outgoing)>, sqlx::Error> {
    let rows: Vec<Unpublished> = sqlx::query_as(
        "SELECT e.seq, e.booking_id, e.event, e.revision, e.body, e.traceparent
           FROM booking_events e
          WHERE e.published_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM booking_events p
                             WHERE p.booking_id = e.booking_id AND p.published_at IS NULL
                               AND p.booking_seq < e.booking_seq)
          ORDER BY e.seq LIMIT $1 FOR UPDATE OF e SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(seq, booking_id, event, revision, body, traceparent)| {
            let Some(kind) = crate::domain::EventKind::parse(&event) else {
                // Written by a newer labbook: left for it, and the booking's later events wait.
                tracing::warn!(
                    seq,
                    booking_id,
                    event,
                    "an event of a kind this labbook does not know is left unpublished"
                );
                return None;
            };
            let out = events::outgoing(&booking_id, kind, revision.max(0) as u32, body);
            Some((seq, out.traced(traceparent.as_deref())))
        })
        .collect())
}

/// Marks the events published (their confirms came).
pub async fn published(tx: &mut PgConnection, seqs: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE booking_events SET published_at = now() WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(tx)
        .await?;
    Ok(())
}

/// Events recorded and not yet published (for the health page, and tests that drain).
pub async fn unpublished(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM booking_events WHERE published_at IS NULL")
        .fetch_one(pool)
        .await
}

/// The booking's events, oldest first.
pub async fn history(pool: &PgPool, booking_id: &str) -> Result<Vec<HistoryEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event, revision, at, state, detail FROM booking_events
         WHERE booking_id = $1 ORDER BY booking_seq",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await
}
