//! Offerings EC2 just had no capacity for (an instance type in a subnet's zone): skipped for a
//! few minutes by every provisioner replica, so a morning's launches do not all ask first where
//! EC2 has just said no (as Karpenter caches insufficient-capacity errors).

use sqlx::PgPool;

use crate::ec2::Offering;

/// The offerings skipped now.
pub async fn blocked(pool: &PgPool) -> Result<Vec<Offering>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT instance_type, subnet_id FROM offering_blocks WHERE blocked_until > now()",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(instance_type, subnet)| Offering {
            instance_type,
            subnet_id: Some(subnet).filter(|s| !s.is_empty()),
        })
        .collect())
}

/// Skips `offering` for `seconds`.
pub async fn block(
    pool: &PgPool,
    offering: &Offering,
    seconds: f64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO offering_blocks (instance_type, subnet_id, blocked_until, reason)
         VALUES ($1, $2, now() + make_interval(secs => $3), $4)
         ON CONFLICT (instance_type, subnet_id)
         DO UPDATE SET blocked_until = EXCLUDED.blocked_until, reason = EXCLUDED.reason",
    )
    .bind(&offering.instance_type)
    .bind(offering.subnet_id.as_deref().unwrap_or(""))
    .bind(seconds)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}
