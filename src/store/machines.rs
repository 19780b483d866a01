//! Every machine labbook launched, one row per instance, kept after its slot moves on: when it
//! was launched, became ready and was terminated, and from which image. The expected boot time
//! (the boot watch's first look, the scheduler's head start) comes from here.

use std::time::Duration;

/// How many of the image's latest boots the expected boot time is taken from.
const RECENT_BOOTS: i64 = 50;
/// Fewer recorded boots than this say too little: the configured expectation is used instead.
const ENOUGH_BOOTS: i64 = 5;

/// What a machine was launched as.
#[derive(Debug, Clone, Copy, Default)]
pub struct Launch<'a> {
    pub image_id: Option<&'a str>,
    pub instance_type: Option<&'a str>,
    pub subnet_id: Option<&'a str>,
}

/// Records a machine launched (or adopted) for a slot's launch generation; once.
pub async fn launched<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
    (slot, generation): (i32, i32),
    instance_id: &str,
    launch: Launch<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO machines (instance_id, booking_id, slot, generation, image_id,
                               instance_type, subnet_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(instance_id)
    .bind(booking_id)
    .bind(slot)
    .bind(generation)
    .bind(launch.image_id)
    .bind(launch.instance_type)
    .bind(launch.subnet_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Records machines as terminated (the first time counts); returns the running time, in
/// seconds, of those terminated now.
pub async fn terminated<'e>(
    db: impl sqlx::PgExecutor<'e>,
    instance_ids: &[String],
) -> Result<f64, sqlx::Error> {
    let seconds: Option<f64> = sqlx::query_scalar(
        "WITH ended AS (
             UPDATE machines SET terminated_at = now()
             WHERE instance_id = ANY($1) AND terminated_at IS NULL
             RETURNING extract(epoch FROM terminated_at - launched_at)::float8 AS seconds)
         SELECT sum(seconds) FROM ended",
    )
    .bind(instance_ids)
    .fetch_one(db)
    .await?;
    Ok(seconds.unwrap_or(0.0).max(0.0))
}

/// The running time of the booking's machines per instance type: launch to termination, or to
/// now for a machine still running.
pub async fn usage<'e>(
    db: impl sqlx::PgExecutor<'e>,
    booking_id: &str,
) -> Result<crate::domain::Usage, sqlx::Error> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT COALESCE(instance_type, ''),
                sum(extract(epoch FROM COALESCE(terminated_at, now()) - launched_at))::float8
         FROM machines WHERE booking_id = $1 GROUP BY 1",
    )
    .bind(booking_id)
    .fetch_all(db)
    .await?;
    Ok(crate::domain::Usage {
        seconds: rows.into_iter().map(|(t, s)| (t, s.max(0.0))).collect(),
    })
}

/// How long machines of `image_id` took from launch to ready, from its latest boots: the
/// median and the 90th percentile. `None` while too few are recorded.
pub async fn boot_times<'e>(
    db: impl sqlx::PgExecutor<'e>,
    image_id: &str,
) -> Result<Option<BootTimes>, sqlx::Error> {
    let row: (i64, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY boot_seconds),
                percentile_cont(0.9) WITHIN GROUP (ORDER BY boot_seconds)
         FROM (SELECT boot_seconds FROM machines
               WHERE image_id = $1 AND boot_seconds IS NOT NULL
               ORDER BY ready_at DESC LIMIT $2) recent",
    )
    .bind(image_id)
    .bind(RECENT_BOOTS)
    .fetch_one(db)
    .await?;
    Ok(match row {
        (n, Some(p50), Some(p90)) if n >= ENOUGH_BOOTS => Some(BootTimes {
            median: Duration::from_secs_f64(p50.max(0.0)),
            p90: Duration::from_secs_f64(p90.max(0.0)),
        }),
        _ => None,
    })
}

/// Recorded boot times of an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootTimes {
    pub median: Duration,
    pub p90: Duration,
}
