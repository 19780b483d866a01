//! The durable timer: one row per booking and action, claimed by any number of scheduler
//! replicas with `FOR UPDATE SKIP LOCKED`.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool, Postgres, Transaction};

/// What the timer publishes when it is due, stored as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Provision,
    Teardown,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Provision => "provision",
            Action::Teardown => "teardown",
        }
    }
}

/// One scheduled item.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct Entry {
    pub booking_id: String,
    pub action: Action,
    pub due_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    /// The booking revision that set this time; carried on the message the timer publishes.
    pub revision: i32,
    /// The trace the booking was stored under (claimed rows only).
    #[sqlx(default)]
    #[serde(skip)]
    pub traceparent: Option<String>,
}

/// Schedules `action` for `booking_id` at `due_at`, once: a second call changes nothing (an
/// update that moves the booking moves the row itself, see `store::intake::arm`).
pub async fn insert(
    pool: &PgPool,
    booking_id: &str,
    action: Action,
    due_at: DateTime<Utc>,
    revision: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO schedule (booking_id, action, due_at, revision) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
        .bind(booking_id)
        .bind(action)
        .bind(due_at)
        .bind(revision)
        .execute(pool)
        .await?;
    Ok(())
}

/// Locks up to `limit` due, unpublished items for this transaction; other replicas skip them.
pub async fn claim_due(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.booking_id, s.action, s.due_at, s.published_at, s.revision, b.traceparent
         FROM schedule s JOIN bookings b ON b.booking_id = s.booking_id
         WHERE s.published_at IS NULL AND s.due_at <= now()
         ORDER BY s.due_at LIMIT $1 FOR UPDATE OF s SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

pub async fn mark_published(
    tx: &mut Transaction<'_, Postgres>,
    entry: &Entry,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE schedule SET published_at = now() WHERE booking_id = $1 AND action = $2")
        .bind(&entry.booking_id)
        .bind(entry.action)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn for_booking(pool: &PgPool, booking_id: &str) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as("SELECT booking_id, action, due_at, published_at, revision FROM schedule WHERE booking_id = $1 ORDER BY due_at")
        .bind(booking_id)
        .fetch_all(pool)
        .await
}

/// The booking's timer of `action`, if it is set.
pub async fn find(
    pool: &PgPool,
    booking_id: &str,
    action: Action,
) -> Result<Option<Entry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT booking_id, action, due_at, published_at, revision FROM schedule
         WHERE booking_id = $1 AND action = $2",
    )
    .bind(booking_id)
    .bind(action)
    .fetch_optional(pool)
    .await
}

/// Whether the booking's timer of `action` is due (on the database's clock, a few seconds'
/// rounding allowed) or not set at all.
pub async fn is_due(pool: &PgPool, booking_id: &str, action: Action) -> Result<bool, sqlx::Error> {
    let due: Option<bool> = sqlx::query_scalar(
        "SELECT due_at <= now() + interval '5 seconds' FROM schedule
         WHERE booking_id = $1 AND action = $2",
    )
    .bind(booking_id)
    .bind(action)
    .fetch_optional(pool)
    .await?;
    Ok(due.unwrap_or(true))
}

/// How many machines the bookings due in `window` (other than `booking_id`) still have to
/// launch before it: those not provisioned yet, `users_per_instance` users each.
pub async fn instances_ahead<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
    window: (DateTime<Utc>, DateTime<Utc>),
    users_per_instance: u32,
) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM((number_of_users + $4 - 1) / $4), 0)::int8 FROM bookings
         WHERE booking_id <> $1 AND booking_time > $2 AND booking_time <= $3 AND NOT cancelled
           AND state IN ('received', 'scheduled', 'provisioning')",
    )
    .bind(booking_id)
    .bind(window.0)
    .bind(window.1)
    .bind(users_per_instance as i32)
    .fetch_one(db)
    .await?;
    Ok(n.max(0) as u64)
}
