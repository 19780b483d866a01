//! Slots: the lab machines of a booking, each with its users, its admin account and the
//! instance launched for it.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

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

/// Stores the plan once: if another attempt planned this booking already, its slots stay.
pub async fn insert_plan(
    pool: &PgPool,
    booking_id: &str,
    plan: &[NewSlot],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // One plan per booking: the row lock on the booking serialises concurrent planners.
    sqlx::query("SELECT 1 FROM bookings WHERE booking_id = $1 FOR UPDATE")
        .bind(booking_id)
        .execute(&mut *tx)
        .await?;
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM slots WHERE booking_id = $1")
        .bind(booking_id)
        .fetch_one(&mut *tx)
        .await?;
    if existing == 0 {
        for s in plan {
            sqlx::query(
                "INSERT INTO slots (booking_id, slot, first_user, user_count, admin_username,
                                    admin_password_encrypted, admin_password_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
    }
    tx.commit().await
}

pub async fn for_booking(pool: &PgPool, booking_id: &str) -> Result<Vec<Slot>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM slots WHERE booking_id = $1 ORDER BY slot")
        .bind(booking_id)
        .fetch_all(pool)
        .await
}

/// Records the instance launched (or found) for a slot. Never replaces one already recorded.
pub async fn record_instance(
    pool: &PgPool,
    booking_id: &str,
    slot: i32,
    instance_id: &str,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE slots SET instance_id = COALESCE(instance_id, $3), launched_at = COALESCE(launched_at, now()),
                          updated_at = now()
         WHERE booking_id = $1 AND slot = $2 RETURNING instance_id",
    )
    .bind(booking_id)
    .bind(slot)
    .bind(instance_id)
    .fetch_one(pool)
    .await
}

/// Records what EC2 last said about an instance.
pub async fn record_state(
    pool: &PgPool,
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
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets the gone machines of a booking's slots and raises their generation, so they are
/// launched anew (with new `ClientToken`s); returns how many slots were reset. A slot with no
/// instance recorded is reset too: a launch of it may have happened, unrecorded, and been
/// terminated since, and its old token would return that terminated machine.
pub async fn reset_gone(pool: &PgPool, booking_id: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE slots SET generation = generation + 1, instance_id = NULL, instance_state = NULL,
                          public_dns = NULL, public_ip = NULL, launched_at = NULL, updated_at = now()
         WHERE booking_id = $1
           AND (instance_id IS NULL OR instance_state IN ('terminated', 'shutting-down'))",
    )
    .bind(booking_id)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Forgets the instance `instance_id` of its slot and raises the slot's generation, so the
/// slot is launched anew with a new `ClientToken` (the old one would return the same machine).
pub async fn replace_instance(pool: &PgPool, instance_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE slots SET generation = generation + 1, instance_id = NULL, instance_state = NULL,
                          public_dns = NULL, public_ip = NULL, launched_at = NULL, updated_at = now()
         WHERE instance_id = $1",
    )
    .bind(instance_id)
    .execute(pool)
    .await?;
    Ok(())
}
