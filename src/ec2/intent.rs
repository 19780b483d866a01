//! Launch intents: a slot's `RunInstances` call is recorded (per launch generation) just
//! before it is made. A slot with an intent but no recorded instance had a launch whose outcome
//! is unknown (the process died, or EC2's answer was lost), so its booking's instances are
//! looked up by tag before launching; every other slot is launched with one call.

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
