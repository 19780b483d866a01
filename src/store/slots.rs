//! Slots: the lab machines of a booking, each with its users, its admin account and the
//! instance launched for it.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// The `SET` list that forgets a slot's machine and raises its launch generation, so the slot
/// is launched anew with a new `ClientToken`.
pub(crate) const FORGET_MACHINE: &str = "generation = generation + 1, instance_id = NULL,
    instance_state = NULL, public_dns = NULL, public_ip = NULL, launched_at = NULL,
    next_check_at = NULL, ready_at = NULL, console_reads = 0, console_buffered = false,
    http_only = NULL, image_id = NULL, updated_at = now()";

/// A slot as stored.
#[derive(Debug, Clone, FromRow)]
pub struct Slot {
    pub booking_id: String,
    pub slot: i32,
    pub first_user: i32,
    pub user_count: i32,
    pub admin_username: String,
    pub admin_password_encrypted: Vec<u8>,
    pub admin_password_hash: String,
    pub instance_id: Option<String>,
    pub instance_state: Option<String>,
    pub public_dns: Option<String>,
    pub public_ip: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
    /// Raised each time the slot's machine is launched anew; part of its `ClientToken`.
    pub generation: i32,
    /// Times the slot's machine started but did not become ready.
    pub ready_failures: i32,
    /// When the readiness loop looks at the machine next (`None`: nothing to watch).
    pub next_check_at: Option<DateTime<Utc>>,
    /// When the machine was seen ready; a ready machine is never polled again.
    pub ready_at: Option<DateTime<Utc>>,
    /// `GetConsoleOutput` calls spent on the machine.
    pub console_reads: i32,
    /// EC2 refused the live console for the machine's type: the buffered copy is read.
    pub console_buffered: bool,
    /// Why the machine could not set up HTTPS (its bootstrap said so): its lab is served over
    /// plain HTTP, and its instance block says so. `None`: HTTPS as configured.
    pub http_only: Option<String>,
    /// The AMI the machine booted from.
    pub image_id: Option<String>,
}

impl Slot {
    /// The address trainees use: the public DNS name, else the public IP.
    pub fn address(&self) -> Option<&str> {
        self.public_dns
            .as_deref()
            .filter(|s| !s.is_empty())
            .or(self.public_ip.as_deref().filter(|s| !s.is_empty()))
    }

    /// Positions of the booking's credentials that live on this slot.
    pub fn user_positions(&self) -> std::ops::Range<i32> {
        self.first_user..self.first_user + self.user_count
    }
}

/// A slot to create when a booking is first planned.
#[derive(Debug, Clone)]
pub struct NewSlot {
    pub slot: i32,
    pub first_user: i32,
    pub user_count: i32,
    pub admin_username: String,
    pub admin_password_encrypted: Vec<u8>,
    pub admin_password_hash: String,
}

/// Stores planned slots; a slot planned already (by another attempt a moment ago) stays as it
/// was planned first. The row lock on the booking serialises concurrent planners.
pub async fn insert_plan(
    pool: &PgPool,
    booking_id: &str,
    plan: &[NewSlot],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM bookings WHERE booking_id = $1 FOR UPDATE")
        .bind(booking_id)
        .execute(&mut *tx)
        .await?;
    for s in plan {
        sqlx::query(
            "INSERT INTO slots (booking_id, slot, first_user, user_count, admin_username,
                                admin_password_encrypted, admin_password_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(booking_id)
        .bind(s.slot)
        .bind(s.first_user)
        .bind(s.user_count)
        .bind(&s.admin_username)
        .bind(&s.admin_password_encrypted)
        .bind(&s.admin_password_hash)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

pub async fn for_booking(pool: &PgPool, booking_id: &str) -> Result<Vec<Slot>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM slots WHERE booking_id = $1 ORDER BY slot")
        .bind(booking_id)
        .fetch_all(pool)
        .await
}

/// Records the instance launched (or found) for a slot's launch `generation`, as `launch` says
/// (its image, type and subnet), and has the boot watch look at it at once. Never replaces one
/// already recorded.
/// Returns the slot's instance, or `None` when the slot has moved on to another generation
/// meanwhile (its booking moved): the instance is then retired instead.
pub async fn record_instance(
    pool: &PgPool,
    booking_id: &str,
    (slot, generation): (i32, i32),
    instance_id: &str,
    launch: super::machines::Launch<'_>,
) -> Result<Option<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    super::machines::launched(
        &mut *tx,
        booking_id,
        (slot, generation),
        instance_id,
        launch,
    )
    .await?;
    let recorded: Option<String> = sqlx::query_scalar(
        "UPDATE slots SET instance_id = COALESCE(instance_id, $4),
                          launched_at = COALESCE(launched_at, now()),
                          image_id = COALESCE(image_id, $5),
                          next_check_at = CASE WHEN instance_id IS NULL THEN now() ELSE next_check_at END,
                          updated_at = now()
         WHERE booking_id = $1 AND slot = $2 AND generation = $3 RETURNING instance_id",
    )
    .bind(booking_id)
    .bind(slot)
    .bind(generation)
    .bind(instance_id)
    .bind(launch.image_id)
    .fetch_optional(&mut *tx)
    .await?;
    if recorded.is_none() {
        retire(&mut *tx, booking_id, instance_id).await?;
    }
    tx.commit().await?;
    Ok(recorded)
}

/// Records a machine that no slot wants any more, to be terminated.
pub async fn retire<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
    instance_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO retired_instances (booking_id, instance_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(booking_id)
    .bind(instance_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Retires every machine recorded for the booking's slots (a booking that failed, or moved):
/// the provisioner and the sweep terminate them. Returns how many were not retired already.
pub async fn retire_all<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO retired_instances (booking_id, instance_id)
         SELECT booking_id, instance_id FROM slots
         WHERE booking_id = $1 AND instance_id IS NOT NULL
           AND instance_state IS DISTINCT FROM 'terminated'
         ON CONFLICT DO NOTHING",
    )
    .bind(booking_id)
    .execute(db)
    .await?
    .rows_affected())
}

/// Retired machines waiting to be terminated: the booking's, or every booking's.
pub async fn retired(
    pool: &PgPool,
    booking_id: Option<&str>,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT booking_id, instance_id FROM retired_instances
         WHERE $1::text IS NULL OR booking_id = $1 ORDER BY retired_at",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await
}

/// Forgets retired machines once they are terminated.
pub async fn forget_retired(pool: &PgPool, instance_ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM retired_instances WHERE instance_id = ANY($1)")
        .bind(instance_ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records what EC2 last said about an instance.
pub async fn record_state<'e>(
    db: impl sqlx::PgExecutor<'e>,
    instance_id: &str,
    state: &str,
    public_dns: Option<&str>,
    public_ip: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE slots SET instance_state = $2, public_dns = COALESCE($3, public_dns),
                          public_ip = COALESCE($4, public_ip), updated_at = now()
         WHERE instance_id = $1",
    )
    .bind(instance_id)
    .bind(state)
    .bind(public_dns)
    .bind(public_ip)
    .execute(db)
    .await?;
    Ok(())
}

/// Forgets the gone machines of a booking's slots and raises their generation, so they are
/// launched anew (with new `ClientToken`s); returns how many slots were reset. A slot with no
/// instance recorded is reset too: a launch of it may have happened, unrecorded, and been
/// terminated since, and its old token would return that terminated machine. The booking's
/// slots start their counts of machines that did not become ready afresh (the operator fixed
/// the cause and replayed it).
pub async fn reset_gone(pool: &PgPool, booking_id: &str) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let reset = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE slots SET {FORGET_MACHINE} WHERE booking_id = $1
           AND (instance_id IS NULL OR instance_state IN ('terminated', 'shutting-down'))"
    )))
    .bind(booking_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("UPDATE slots SET ready_failures = 0 WHERE booking_id = $1")
        .bind(booking_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(reset)
}

/// Forgets the instance `instance_id` of its slot and raises the slot's generation, so the
/// slot is launched anew with a new `ClientToken` (the old one would return the same machine).
/// `not_ready`: the machine started but did not become ready, which the slot counts.
pub async fn replace_instance<'e>(
    db: impl sqlx::PgExecutor<'e>,
    instance_id: &str,
    not_ready: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE slots SET {FORGET_MACHINE},
                ready_failures = ready_failures + CASE WHEN $2 THEN 1 ELSE 0 END
         WHERE instance_id = $1"
    )))
    .bind(instance_id)
    .bind(not_ready)
    .execute(db)
    .await?;
    Ok(())
}
