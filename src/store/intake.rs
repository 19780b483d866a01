//! Storing what arrives on `booking-created` (docs/contract.md §3, §3a): a new booking with its
//! credentials, an update, a cancellation, or the cancellation of a booking never stored.
//!
//! Every change to a booking id happens in one transaction that first takes a lock on the id
//! ([`lock`]), so two replicas handling two revisions of one booking at once apply them one
//! after the other, each against what the other committed.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::bookings::{BookingRecord, BookingState, StoredCredential};
use crate::domain::Booking;

/// Serialises every intake transaction of `booking_id` (until the transaction ends).
pub async fn lock(conn: &mut PgConnection, booking_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(booking_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The stored booking, its row locked for this transaction.
pub async fn find_for_update(
    conn: &mut PgConnection,
    booking_id: &str,
) -> Result<Option<BookingRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM bookings WHERE booking_id = $1 FOR UPDATE")
        .bind(booking_id)
        .fetch_optional(conn)
        .await
}

/// The revision of the cancellation kept for a booking never stored, if any.
pub async fn tombstone(
    conn: &mut PgConnection,
    booking_id: &str,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar("SELECT revision FROM cancellations WHERE booking_id = $1")
        .bind(booking_id)
        .fetch_optional(conn)
        .await
}

/// Keeps the cancellation of a booking never stored (raising the kept revision).
pub async fn put_tombstone(
    conn: &mut PgConnection,
    booking_id: &str,
    revision: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO cancellations (booking_id, revision) VALUES ($1, $2)
         ON CONFLICT (booking_id) DO UPDATE SET revision = GREATEST(cancellations.revision, EXCLUDED.revision)",
    )
    .bind(booking_id)
    .bind(revision as i32)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores a new booking and its credentials.
pub async fn insert(
    conn: &mut PgConnection,
    booking: &Booking,
    credentials: &[StoredCredential],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bookings (booking_id, email, booking_time, number_of_users, duration_minutes,
                               revision, first_revision, schedule_revision)
         VALUES ($1, $2, $3, $4, $5, $6, $6, $6)",
    )
    .bind(booking.id.as_str())
    .bind(booking.email.as_str())
    .bind(booking.booking_time)
    .bind(booking.number_of_users.get() as i32)
    .bind(booking.duration_minutes as i32)
    .bind(booking.revision as i32)
    .execute(&mut *conn)
    .await?;
    add_credentials(conn, booking.id.as_str(), credentials).await
}

/// Adds credentials to a booking (all of a new booking's, or the added trainees').
pub async fn add_credentials(
    conn: &mut PgConnection,
    booking_id: &str,
    credentials: &[StoredCredential],
) -> Result<(), sqlx::Error> {
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
    .bind(booking_id)
    .bind(&positions)
    .bind(&usernames)
    .bind(&encrypted)
    .bind(&hashes)
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes the logins from position `keep` on (fewer trainees, before provisioning), and the
/// planned machines' places for them (a booking moved after an earlier provisioning keeps its
/// plan): machines left without trainees are dropped, the last one keeps its remaining ones.
pub async fn remove_credentials_from(
    conn: &mut PgConnection,
    booking_id: &str,
    keep: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM credentials WHERE booking_id = $1 AND position >= $2")
        .bind(booking_id)
        .bind(keep)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM slots WHERE booking_id = $1 AND first_user >= $2")
        .bind(booking_id)
        .bind(keep)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE slots SET user_count = $2 - first_user WHERE booking_id = $1 AND first_user + user_count > $2",
    )
    .bind(booking_id)
    .bind(keep)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores the update's content and revision, and the state it leaves the booking in.
pub async fn store_update(
    conn: &mut PgConnection,
    booking: &Booking,
    state: BookingState,
    time_moved: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE bookings SET email = $2, booking_time = $3, number_of_users = $4,
                duration_minutes = $5, revision = $6, state = $7, updated_at = now(),
                failure_reason = CASE WHEN $7 = 'failed' THEN failure_reason END,
                schedule_revision = CASE WHEN $8 THEN $6 ELSE schedule_revision END
         WHERE booking_id = $1",
    )
    .bind(booking.id.as_str())
    .bind(booking.email.as_str())
    .bind(booking.booking_time)
    .bind(booking.number_of_users.get() as i32)
    .bind(booking.duration_minutes as i32)
    .bind(booking.revision as i32)
    .bind(state)
    .bind(time_moved)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks the booking cancelled at `revision`; its state becomes `state`.
pub async fn store_cancel(
    conn: &mut PgConnection,
    booking_id: &str,
    revision: u32,
    state: BookingState,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE bookings SET cancelled = true, revision = $2, state = $3, updated_at = now()
         WHERE booking_id = $1",
    )
    .bind(booking_id)
    .bind(revision as i32)
    .bind(state)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets (or moves) the timer of `action` to `due_at` for `revision`, to be published again.
pub async fn arm(
    conn: &mut PgConnection,
    booking_id: &str,
    action: super::schedule::Action,
    due_at: DateTime<Utc>,
    revision: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO schedule (booking_id, action, due_at, revision) VALUES ($1, $2, $3, $4)
         ON CONFLICT (booking_id, action)
         DO UPDATE SET due_at = EXCLUDED.due_at, revision = EXCLUDED.revision, published_at = NULL",
    )
    .bind(booking_id)
    .bind(action)
    .bind(due_at)
    .bind(revision as i32)
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes the provisioning timer if it has not fired (a cancelled booking is never provisioned).
pub async fn disarm_provisioning(
    conn: &mut PgConnection,
    booking_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM schedule WHERE booking_id = $1 AND action = 'provision' AND published_at IS NULL",
    )
    .bind(booking_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The booking moved after its machines were launched: its recorded machines are retired (to
/// be terminated by the provisioner and the sweep), and every slot gets a new launch generation,
/// so a launch still in flight for an old one is not recorded as the slot's machine. The slots
/// start their counts of machines that did not become ready afresh.
pub async fn retire_machines(
    conn: &mut PgConnection,
    booking_id: &str,
) -> Result<u64, sqlx::Error> {
    super::slots::retire_all(&mut *conn, booking_id).await?;
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE slots SET {}, ready_failures = 0 WHERE booking_id = $1",
        super::slots::FORGET_MACHINE
    )))
    .bind(booking_id)
    .execute(conn)
    .await?
    .rows_affected())
}
