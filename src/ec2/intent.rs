//! Launch intents: a slot's `RunInstances` call is recorded (per launch generation) just
//! before it is made. A slot with an intent but no recorded instance had a launch whose outcome
//! is unknown (the process died, or EC2's answer was lost), so its booking's instances are
//! looked up by tag before launching; every other slot is launched with one call. An intent of
//! a generation the slot has moved on from (its booking moved, its machine was replaced) whose
//! machine was never recorded is a launch that may still run: it is searched for by its
//! generation's tag and retired ([`unresolved`], [`resolved`]).

use sqlx::PgPool;

/// Records that the slot's machine of `generation` is about to be launched.
pub async fn record(
    pool: &PgPool,
    booking_id: &str,
    slot: i32,
    generation: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO launch_intents (booking_id, slot, generation) VALUES ($1, $2, $3)
         ON CONFLICT (booking_id, slot, generation) DO UPDATE SET requested_at = now()",
    )
    .bind(booking_id)
    .bind(slot)
    .bind(generation)
    .execute(pool)
    .await?;
    Ok(())
}

/// The (slot, generation) pairs of the booking whose launch was asked for.
pub async fn recorded(pool: &PgPool, booking_id: &str) -> Result<Vec<(i32, i32)>, sqlx::Error> {
    sqlx::query_as("SELECT slot, generation FROM launch_intents WHERE booking_id = $1")
        .bind(booking_id)
        .fetch_all(pool)
        .await
}

/// A launch whose outcome is unknown and whose slot has moved on to a later generation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unresolved {
    pub booking_id: String,
    pub slot: i32,
    pub generation: i32,
    /// Seconds since the launch was asked for.
    pub age_s: f64,
}

/// The unresolved launches of a booking, or of every booking.
pub async fn unresolved(
    pool: &PgPool,
    booking_id: Option<&str>,
) -> Result<Vec<Unresolved>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.booking_id, i.slot, i.generation,
                extract(epoch FROM now() - i.requested_at)::float8 AS age_s
         FROM launch_intents i
         JOIN slots s ON s.booking_id = i.booking_id AND s.slot = i.slot
         WHERE i.generation < s.generation AND ($1::text IS NULL OR i.booking_id = $1)
           AND NOT EXISTS (SELECT 1 FROM machines m WHERE m.booking_id = i.booking_id
                           AND m.slot = i.slot AND m.generation = i.generation)",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await
}

/// Forgets an unresolved launch: its machine was found (and retired), or EC2 has long shown
/// none.
pub async fn resolved(pool: &PgPool, u: &Unresolved) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM launch_intents WHERE booking_id = $1 AND slot = $2 AND generation = $3",
    )
    .bind(&u.booking_id)
    .bind(u.slot)
    .bind(u.generation)
    .execute(pool)
    .await?;
    Ok(())
}
