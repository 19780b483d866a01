//! The boot watch's rows: slots whose machine is launched and not yet ready, claimed by any
//! number of provisioner replicas with `FOR UPDATE SKIP LOCKED` (as the scheduler's timer
//! claims its rows), and what each look at a machine leaves behind: when to look next, what EC2
//! said, how many console reads it cost, and when it became ready.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::slots::Slot;

/// Which of the watched machines a claim takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not yet running with a public address: one `DescribeInstances` for all of them.
    Starting,
    /// Running with an address, its bootstrap not yet reported: a console read each.
    Booting,
}

/// Locks up to `limit` watched slots of `phase` that are due a look, earliest first, for this
/// transaction; other replicas skip them. Only slots of bookings being provisioned are taken:
/// a cancelled or moved booking's machines are no longer watched.
pub async fn claim(
    tx: &mut PgConnection,
    phase: Phase,
    limit: i64,
) -> Result<Vec<Slot>, sqlx::Error> {
    let running =
        "s.instance_state = 'running' AND (s.public_dns IS NOT NULL OR s.public_ip IS NOT NULL)";
    let phase = match phase {
        Phase::Starting => format!("NOT ({running})"),
        Phase::Booting => running.to_owned(),
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT s.* FROM slots s JOIN bookings b ON b.booking_id = s.booking_id
         WHERE s.instance_id IS NOT NULL AND s.ready_at IS NULL AND s.next_check_at <= now()
           AND {phase} AND b.state = 'provisioning' AND NOT b.cancelled
         ORDER BY s.next_check_at LIMIT $1 FOR UPDATE OF s SKIP LOCKED"
    )))
    .bind(limit)
    .fetch_all(tx)
    .await
}

/// What one look at a machine cost and found.
#[derive(Debug, Clone, Default)]
pub struct Look {
    /// EC2's state and addresses (from `DescribeInstances`), when it was asked.
    pub described: Option<Described>,
    /// Console reads made.
    pub console_reads: i32,
    /// EC2 refused the live console for the machine.
    pub console_buffered: bool,
    /// When EC2 says the console was last written.
    pub reported_at: Option<DateTime<Utc>>,
}

/// An instance's state and public addresses as EC2 described them.
#[derive(Debug, Clone, Default)]
pub struct Described {
    pub state: String,
    pub public_dns: Option<String>,
    pub public_ip: Option<String>,
}

/// Records a look at the slot's machine and when to look again.
pub async fn looked(
    tx: &mut PgConnection,
    slot: &Slot,
    look: &Look,
    next_check_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let described = look.described.as_ref();
    sqlx::query(
        "UPDATE slots SET next_check_at = $4, console_reads = console_reads + $5,
                console_buffered = console_buffered OR $6,
                instance_state = COALESCE($7, instance_state),
                public_dns = COALESCE($8, public_dns), public_ip = COALESCE($9, public_ip),
                updated_at = now()
         WHERE booking_id = $1 AND slot = $2 AND instance_id = $3",
    )
    .bind(&slot.booking_id)
    .bind(slot.slot)
    .bind(&slot.instance_id)
    .bind(next_check_at)
    .bind(look.console_reads)
    .bind(look.console_buffered)
    .bind(described.map(|d| d.state.as_str()))
    .bind(described.and_then(|d| d.public_dns.as_deref()))
    .bind(described.and_then(|d| d.public_ip.as_deref()))
    .execute(tx)
    .await?;
    Ok(())
}

/// Marks the slot's machine ready: never looked at again while its booking runs. `boot` is its
/// time from launch to ready; `http_only` why it serves its lab over plain HTTP, if it does.
pub async fn ready(
    tx: &mut PgConnection,
    slot: &Slot,
    look: &Look,
    boot: std::time::Duration,
    http_only: Option<&str>,
) -> Result<(), sqlx::Error> {
    looked(tx, slot, look, Utc::now()).await?;
    sqlx::query(
        "UPDATE slots SET ready_at = now(), next_check_at = NULL, http_only = $4
         WHERE booking_id = $1 AND slot = $2 AND instance_id = $3",
    )
    .bind(&slot.booking_id)
    .bind(slot.slot)
    .bind(&slot.instance_id)
    .bind(http_only)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE machines SET ready_at = now(), boot_seconds = $2 WHERE instance_id = $1")
        .bind(&slot.instance_id)
        .bind(boot.as_secs_f64())
        .execute(tx)
        .await?;
    Ok(())
}

/// Marks the booking provisioned once every slot it plans has a ready machine and the slots
/// cover its trainees; returns the revision whose instance details email is due, or `None`
/// while a machine is missing or booting (or the booking is no longer being provisioned).
pub async fn finish_if_ready<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE bookings b SET state = 'provisioned', provisioned_revision = b.revision,
                updated_at = now()
         WHERE b.booking_id = $1 AND b.state = 'provisioning' AND NOT b.cancelled
           AND NOT EXISTS (SELECT 1 FROM slots s WHERE s.booking_id = b.booking_id
                           AND (s.instance_id IS NULL OR s.ready_at IS NULL))
           AND (SELECT COALESCE(SUM(s.user_count), 0) FROM slots s
                WHERE s.booking_id = b.booking_id) >= b.number_of_users
         RETURNING b.revision",
    )
    .bind(booking_id)
    .fetch_optional(db)
    .await
}

/// What the boot watch sees across the installation, for its gauges and the operators'
/// autoscaling: machines booting (launched, not ready, of bookings being provisioned), ready
/// (of bookings being provisioned or provisioned), and due a look now.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct Census {
    pub booting: i64,
    pub ready: i64,
    pub due: i64,
}

pub async fn census<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<Census, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ready_at IS NULL AND b.state = 'provisioning') AS booting,
                count(*) FILTER (WHERE s.ready_at IS NOT NULL) AS ready,
                count(*) FILTER (WHERE s.ready_at IS NULL AND b.state = 'provisioning'
                                 AND s.next_check_at <= now()) AS due
         FROM slots s JOIN bookings b ON b.booking_id = s.booking_id
         WHERE s.instance_id IS NOT NULL AND NOT b.cancelled
           AND b.state IN ('provisioning', 'provisioned')",
    )
    .fetch_one(db)
    .await
}
