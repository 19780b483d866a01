//! Heartbeats of labbook's periodic loops: a row per loop in `heartbeats`, written once per
//! tick, so the console's health page can say when the scheduler's timer last ran (and who
//! ran it) without a broker message, and the scheduler's `/metrics` carries the gauges its
//! alerts need: the last tick, bookings by state, and bookings late for their time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The heartbeat row of the scheduler's durable timer.
pub const SCHEDULER_TIMER: &str = "scheduler-timer";

/// How often the booking gauges are counted again (a tick may come every second; a count of
/// the bookings table every time would be wasted work).
const GAUGES_EVERY: Duration = Duration::from_secs(15);

/// Records one tick of the scheduler's timer: the heartbeat row and
/// `labbook_scheduler_last_tick_timestamp_seconds`, and every [`GAUGES_EVERY`]
/// `labbook_bookings{state}` and `labbook_bookings_late`. Called by the timer once per tick,
/// after its publishing; never fails the tick (a database outage is the timer's to report).
pub async fn scheduler_tick(pool: &PgPool) {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(describe_metrics);
    metrics::gauge!("labbook_scheduler_last_tick_timestamp_seconds")
        .set(Utc::now().timestamp_millis() as f64 / 1000.0);
    if let Err(err) = beat(pool, SCHEDULER_TIMER).await {
        tracing::debug!(error = %err, "heartbeat not recorded");
    }
    if gauges_due()
        && let Err(err) = refresh_booking_gauges(pool).await
    {
        tracing::debug!(error = %err, "booking gauges not refreshed");
    }
}

/// Upserts the loop's heartbeat row.
pub async fn beat(pool: &PgPool, loop_name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO heartbeats (loop_name, beat_at, beater) VALUES ($1, now(), $2)
         ON CONFLICT (loop_name) DO UPDATE
            SET beat_at = now(), beater = EXCLUDED.beater, beats = heartbeats.beats + 1",
    )
    .bind(loop_name)
    .bind(beater())
    .execute(pool)
    .await?;
    Ok(())
}

/// A loop's last heartbeat.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Heartbeat {
    pub beat_at: DateTime<Utc>,
    pub beater: String,
    pub beats: i64,
    /// The database's clock at the read, so the age does not depend on the reader's clock.
    pub now: DateTime<Utc>,
}

/// The last heartbeat of `loop_name`; `None` if it never beat.
pub async fn last(pool: &PgPool, loop_name: &str) -> Result<Option<Heartbeat>, sqlx::Error> {
    sqlx::query_as(
        "SELECT beat_at, beater, beats, now() AS now FROM heartbeats WHERE loop_name = $1",
    )
    .bind(loop_name)
    .fetch_optional(pool)
    .await
}

/// This process, as a heartbeat row names it: host and pid.
fn beater() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown-host".into());
    format!("{host} pid {}", std::process::id())
}

fn gauges_due() -> bool {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let due = last.is_none_or(|at| at.elapsed() >= GAUGES_EVERY);
    if due {
        *last = Some(Instant::now());
    }
    due
}

/// The states `labbook_bookings` always names (0 when none), so a dashboard shows each.
const STATES: &[&str] = &[
    "received",
    "scheduled",
    "provisioning",
    "provisioned",
    "failed",
    "ended",
    "cancelled",
];

async fn refresh_booking_gauges(pool: &PgPool) -> Result<(), sqlx::Error> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM bookings GROUP BY state")
            .fetch_all(pool)
            .await?;
    for state in STATES {
        let n = counts
            .iter()
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("labbook_bookings", "state" => *state).set(n as f64);
    }
    // Late: its time has come and its machines are not running (nor has it failed or ended).
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bookings
          WHERE state IN ('received', 'scheduled', 'provisioning') AND NOT cancelled
            AND booking_time < now()
            AND booking_time + make_interval(mins => duration_minutes) > now()",
    )
    .fetch_one(pool)
    .await?;
    metrics::gauge!("labbook_bookings_late").set(late as f64);
    Ok(())
}

fn describe_metrics() {
    metrics::describe_gauge!(
        "labbook_scheduler_last_tick_timestamp_seconds",
        "When the scheduler's timer last ticked (Unix time)"
    );
    metrics::describe_gauge!("labbook_bookings", "Bookings stored, by state");
    metrics::describe_gauge!(
        "labbook_bookings_late",
        "Bookings whose time has come without their machines running"
    );
}
