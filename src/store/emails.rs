//! The email log: each kind of email is sent once per booking and revision, and each copy an
//! operator asked for (a resend from the console) once more: a log row is one email, keyed by
//! [`EmailKey`].
//!
//! [`claim`] opens a transaction holding the log row's lock while the email is sent, so two
//! copies of a `notify` message handled at once send one email: the second waits, then sees
//! it sent. The row is committed as sent only after the relay accepted the email.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool, Postgres, Transaction};

use crate::domain::EmailKind;

/// One email of a booking: its kind, the booking revision it is for, and its copy (0: the
/// email the pipeline sends; n: an operator's n-th resend of it).
pub type EmailKey = (EmailKind, i32, i32);

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct EmailRecord {
    pub kind: EmailKind,
    pub revision: i32,
    pub copy: i32,
    pub message_id: String,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// Whether the email was sent (a quick look, without the lock).
pub async fn is_sent(
    pool: &PgPool,
    booking_id: &str,
    (kind, revision, copy): EmailKey,
) -> Result<bool, sqlx::Error> {
    let sent: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "SELECT sent_at FROM emails
          WHERE booking_id = $1 AND kind = $2 AND revision = $3 AND copy = $4",
    )
    .bind(booking_id)
    .bind(kind)
    .bind(revision)
    .bind(copy)
    .fetch_optional(pool)
    .await?;
    Ok(sent.flatten().is_some())
}

/// What [`claim`] found in the log.
pub enum Claim {
    /// The email went out already (another worker sent it a moment ago): send nothing.
    AlreadySent,
    /// The row is locked for this sender until [`Claimed::sent`] or drop.
    Claimed(Claimed),
}

/// The locked log row of one email, which the sender marks sent once the relay accepted it.
pub struct Claimed {
    tx: Transaction<'static, Postgres>,
    booking_id: String,
    key: EmailKey,
    message_id: String,
}

/// Locks the log row of the booking's email of `kind` (creating it with `message_id`).
pub async fn claim(
    pool: &PgPool,
    booking_id: &str,
    (kind, revision, copy): EmailKey,
    message_id: &str,
) -> Result<Claim, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO emails (booking_id, kind, revision, copy, message_id) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
        .bind(booking_id)
        .bind(kind)
        .bind(revision)
        .bind(copy)
        .bind(message_id)
        .execute(&mut *tx)
        .await?;
    let sent: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT sent_at FROM emails
          WHERE booking_id = $1 AND kind = $2 AND revision = $3 AND copy = $4 FOR UPDATE",
    )
    .bind(booking_id)
    .bind(kind)
    .bind(revision)
    .bind(copy)
    .fetch_one(&mut *tx)
    .await?;
    if sent.is_some() {
        return Ok(Claim::AlreadySent);
    }
    Ok(Claim::Claimed(Claimed {
        tx,
        booking_id: booking_id.to_owned(),
        key: (kind, revision, copy),
        message_id: message_id.to_owned(),
    }))
}

impl Claimed {
    /// The claiming transaction: what is written on it commits with [`Claimed::sent`].
    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// Records the email as sent and releases the lock.
    pub async fn sent(mut self) -> Result<(), sqlx::Error> {
        let (kind, revision, copy) = self.key;
        // The Message-ID the email went out with (a row booked by the console has its guess).
        sqlx::query("UPDATE emails SET sent_at = now(), last_error = NULL, message_id = $5 WHERE booking_id = $1 AND kind = $2 AND revision = $3 AND copy = $4")
            .bind(&self.booking_id)
            .bind(kind)
            .bind(revision)
            .bind(copy)
            .bind(&self.message_id)
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await
    }
}

/// Records why an email could not be sent (the booking's mark for operators).
pub async fn record_failure(
    pool: &PgPool,
    booking_id: &str,
    (kind, revision, copy): EmailKey,
    message_id: &str,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO emails (booking_id, kind, revision, copy, message_id, last_error)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (booking_id, kind, revision, copy) DO UPDATE SET last_error = EXCLUDED.last_error",
    )
    .bind(booking_id)
    .bind(kind)
    .bind(revision)
    .bind(copy)
    .bind(message_id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn for_booking(pool: &PgPool, booking_id: &str) -> Result<Vec<EmailRecord>, sqlx::Error> {
    sqlx::query_as("SELECT kind, revision, copy, message_id, sent_at, last_error FROM emails WHERE booking_id = $1 ORDER BY revision, kind, copy")
        .bind(booking_id)
        .fetch_all(pool)
        .await
}

/// Books the next copy of the booking's email `(kind, revision)` for an operator's resend, in
/// the caller's transaction (which holds the booking's row lock, so two resends at once get
/// two copies): the log row is made now, unsent, with `message_id(copy)`; the notifier sends
/// it when the resend's `notify` message comes, once.
pub async fn book_copy(
    tx: &mut Transaction<'_, Postgres>,
    booking_id: &str,
    (kind, revision): (EmailKind, i32),
    message_id: impl Fn(i32) -> String,
) -> Result<i32, sqlx::Error> {
    let last: Option<i32> = sqlx::query_scalar(
        "SELECT max(copy) FROM emails WHERE booking_id = $1 AND kind = $2 AND revision = $3",
    )
    .bind(booking_id)
    .bind(kind)
    .bind(revision)
    .fetch_one(&mut **tx)
    .await?;
    let copy = last.map_or(1, |c| c + 1);
    sqlx::query(
        "INSERT INTO emails (booking_id, kind, revision, copy, message_id) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(booking_id)
    .bind(kind)
    .bind(revision)
    .bind(copy)
    .bind(message_id(copy))
    .execute(&mut **tx)
    .await?;
    Ok(copy)
}
