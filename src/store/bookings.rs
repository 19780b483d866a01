//! Bookings and their credentials.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

use crate::domain::Booking;

/// A booking's life cycle, stored as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BookingState {
    Received,
    Scheduled,
    Provisioning,
    Provisioned,
    Failed,
    Ended,
    /// Cancelled by the upstream before its end (docs/contract.md §3a); stays cancelled.
    Cancelled,
}

impl BookingState {
    pub fn as_str(self) -> &'static str {
        match self {
            BookingState::Received => "received",
            BookingState::Scheduled => "scheduled",
            BookingState::Provisioning => "provisioning",
            BookingState::Provisioned => "provisioned",
            BookingState::Failed => "failed",
            BookingState::Ended => "ended",
            BookingState::Cancelled => "cancelled",
        }
    }

    /// Whether the booking is over for good: nothing more is launched for it.
    pub fn is_over(self) -> bool {
        matches!(
            self,
            BookingState::Failed | BookingState::Ended | BookingState::Cancelled
        )
    }

    /// Whether provisioning started (`provision-due` was published and taken): machines may
    /// have been launched.
    pub fn provisioning_started(self) -> bool {
        matches!(self, BookingState::Provisioning | BookingState::Provisioned)
    }
}

impl std::fmt::Display for BookingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A booking as stored.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct BookingRecord {
    pub booking_id: String,
    pub email: String,
    pub booking_time: DateTime<Utc>,
    pub number_of_users: i32,
    pub duration_minutes: i32,
    pub state: BookingState,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The upstream's revision of the stored content (§3a).
    pub revision: i32,
    /// The revision the booking was first stored with.
    pub first_revision: i32,
    /// Set by a cancellation; stays set.
    pub cancelled: bool,
    /// The revision that last set the booking's time (its schedule).
    pub schedule_revision: i32,
    /// The revision whose machines the last instance-details email lists.
    pub provisioned_revision: Option<i32>,
    /// The W3C trace the booking was stored under.
    #[serde(skip)]
    pub traceparent: Option<String>,
}

impl BookingRecord {
    pub fn ends_at(&self) -> DateTime<Utc> {
        self.booking_time + chrono::Duration::minutes(i64::from(self.duration_minutes))
    }

    /// The fields that differ from `booking`, compared after parsing and defaults.
    pub fn differences(&self, booking: &Booking) -> Vec<&'static str> {
        let mut diff = Vec::new();
        if self.email != booking.email.as_str() {
            diff.push("email");
        }
        if self.booking_time != booking.booking_time {
            diff.push("booking_time");
        }
        if self.number_of_users != booking.number_of_users.get() as i32 {
            diff.push("number_of_users");
        }
        if self.duration_minutes != booking.duration_minutes as i32 {
            diff.push("duration_minutes");
        }
        diff
    }
}

/// A credential ready to store: the password only encrypted and hashed.
#[derive(Debug, Clone, FromRow)]
pub struct StoredCredential {
    pub position: i32,
    pub username: String,
    pub password_encrypted: Vec<u8>,
    pub password_hash: String,
}

pub async fn find<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
) -> Result<Option<BookingRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM bookings WHERE booking_id = $1")
        .bind(booking_id)
        .fetch_optional(db)
        .await
}

pub async fn credentials(
    pool: &PgPool,
    booking_id: &str,
) -> Result<Vec<StoredCredential>, sqlx::Error> {
    sqlx::query_as(
        "SELECT position, username, password_encrypted, password_hash FROM credentials
         WHERE booking_id = $1 ORDER BY position",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await
}

/// Moves a booking to `state` if it is in one of the states that may lead there; returns
/// whether it moved. Failed and ended bookings do not come back.
pub async fn transition<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
    state: BookingState,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    use BookingState::*;
    let from: &[BookingState] = match state {
        Received => &[],
        Scheduled => &[Received],
        Provisioning => &[Received, Scheduled],
        Provisioned => &[Received, Scheduled, Provisioning],
        Failed => &[Received, Scheduled, Provisioning, Provisioned],
        Cancelled => &[Received, Scheduled, Provisioning, Provisioned, Failed],
        Ended => &[Received, Scheduled, Provisioning, Provisioned, Failed],
    };
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let moved = sqlx::query(
        "UPDATE bookings SET state = $2, failure_reason = COALESCE($3, failure_reason), updated_at = now()
         WHERE booking_id = $1 AND state = ANY($4)",
    )
    .bind(booking_id)
    .bind(state)
    .bind(reason)
    .bind(&from)
    .execute(db)
    .await?
    .rows_affected();
    Ok(moved > 0)
}

/// Takes a failed booking back to `provisioning` (an operator replayed its provisioning after
/// fixing the cause); returns whether it was failed.
pub async fn reopen(pool: &PgPool, booking_id: &str) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE bookings SET state = $2, failure_reason = NULL, updated_at = now()
         WHERE booking_id = $1 AND state = $3",
    )
    .bind(booking_id)
    .bind(BookingState::Provisioning)
    .bind(BookingState::Failed)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(moved > 0)
}

/// Moves the booking to `provisioning` for an attempt asked by the timer of `revision` (`None`:
/// a message without one), unless it was cancelled, or moved by a later revision than that.
/// A booking already `provisioning` stays so (a retry, or trainees added). Returns the booking
/// as the attempt is to provision it, or `None` when it is not to be provisioned now.
pub async fn start_provisioning(
    pool: &PgPool,
    booking_id: &str,
    revision: Option<u32>,
) -> Result<Option<BookingRecord>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE bookings SET state = 'provisioning',
                updated_at = CASE WHEN state = 'provisioning' THEN updated_at ELSE now() END
         WHERE booking_id = $1 AND NOT cancelled
           AND (state = 'provisioning'
                OR (state IN ('received', 'scheduled')
                    AND ($2::int IS NULL OR schedule_revision <= $2)))
         RETURNING *",
    )
    .bind(booking_id)
    .bind(revision.map(|r| r as i32))
    .fetch_optional(pool)
    .await
}

/// Marks the booking provisioned with the machines of `revision`, if it is still being
/// provisioned at that revision; returns whether it was.
pub async fn finish_provisioning(
    pool: &PgPool,
    booking_id: &str,
    revision: i32,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE bookings SET state = 'provisioned', provisioned_revision = $2, updated_at = now()
         WHERE booking_id = $1 AND state = 'provisioning' AND revision = $2 AND NOT cancelled",
    )
    .bind(booking_id)
    .bind(revision)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(moved > 0)
}

/// Whether the booking is being provisioned (checked before each launch).
pub async fn is_provisioning(pool: &PgPool, booking_id: &str) -> Result<bool, sqlx::Error> {
    let yes: Option<bool> = sqlx::query_scalar(
        "SELECT state = 'provisioning' AND NOT cancelled FROM bookings WHERE booking_id = $1",
    )
    .bind(booking_id)
    .fetch_optional(pool)
    .await?;
    Ok(yes.unwrap_or(false))
}

/// Remembers the trace the booking was stored under (its first message's): what is published
/// for it outside a delivery continues it.
pub async fn remember_trace<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
    traceparent: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE bookings SET traceparent = COALESCE(traceparent, $2) WHERE booking_id = $1",
    )
    .bind(booking_id)
    .bind(traceparent)
    .execute(db)
    .await?;
    Ok(())
}

/// The trace the booking was stored under.
pub async fn trace<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    let trace: Option<Option<String>> =
        sqlx::query_scalar("SELECT traceparent FROM bookings WHERE booking_id = $1")
            .bind(booking_id)
            .fetch_optional(db)
            .await?;
    Ok(trace.flatten())
}
