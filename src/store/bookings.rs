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
        }
    }

    /// Whether the booking is over for good: nothing more is launched for it.
    pub fn is_over(self) -> bool {
        matches!(self, BookingState::Failed | BookingState::Ended)
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

/// What storing a booking did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    Created,
    /// Stored before with the same content.
    Duplicate,
    /// Stored before with other content: these fields differ.
    Conflict(Vec<&'static str>),
}

pub async fn find(pool: &PgPool, booking_id: &str) -> Result<Option<BookingRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM bookings WHERE booking_id = $1")
        .bind(booking_id)
        .fetch_optional(pool)
        .await
}

/// Compares `booking` with what is stored under its id, if anything.
pub async fn check_existing(
    pool: &PgPool,
    booking: &Booking,
) -> Result<Option<Intake>, sqlx::Error> {
    Ok(find(pool, booking.id.as_str()).await?.map(|stored| {
        let diff = stored.differences(booking);
        if diff.is_empty() {
            Intake::Duplicate
        } else {
            Intake::Conflict(diff)
        }
    }))
}

/// Stores the booking and its credentials in one transaction, once: a booking already stored
/// (by another replica a moment ago) is compared instead.
pub async fn insert(
    pool: &PgPool,
    booking: &Booking,
    credentials: &[StoredCredential],
) -> Result<Intake, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO bookings (booking_id, email, booking_time, number_of_users, duration_minutes)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (booking_id) DO NOTHING",
    )
    .bind(booking.id.as_str())
    .bind(booking.email.as_str())
    .bind(booking.booking_time)
    .bind(booking.number_of_users.get() as i32)
    .bind(booking.duration_minutes as i32)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Ok(check_existing(pool, booking)
            .await?
            .unwrap_or(Intake::Duplicate));
    }
    let positions: Vec<i32> = credentials.iter().map(|c| c.position).collect();
    let usernames: Vec<&str> = credentials.iter().map(|c| c.username.as_str()).collect();
    let encrypted: Vec<&[u8]> = credentials
        .iter()
        .map(|c| c.password_encrypted.as_slice())
        .collect();
    let hashes: Vec<&str> = credentials
        .iter()
        .map(|c| c.password_hash.as_str())
        .collect();
    sqlx::query(
        "INSERT INTO credentials (booking_id, position, username, password_encrypted, password_hash)
         SELECT $1, * FROM UNNEST($2::int4[], $3::text[], $4::bytea[], $5::text[])",
    )
    .bind(booking.id.as_str())
    .bind(&positions)
    .bind(&usernames)
    .bind(&encrypted)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Intake::Created)
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
pub async fn transition(
    pool: &PgPool,
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
    .execute(pool)
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
