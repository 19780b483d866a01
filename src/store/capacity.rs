//! The account's vCPU quota as last read ([`crate::ec2::quota`]) and the check of a booking
//! against it (docs/contract.md §1 item 11): the vCPUs that will run at the booking's time are
//! its own machines, the machines of this installation's other bookings that overlap it, and
//! the instances of the account that are not labbook's. A booking that would not fit is
//! still accepted (a quota can be raised before the day); the operator is told.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::ec2::quota::Capacity;

/// How old a reading may be and still be compared with (the provisioner reads at every sweep).
const FRESH: chrono::Duration = chrono::Duration::hours(6);

/// A booking that would not fit under the account's quota at its time.
#[derive(Debug, Clone, PartialEq)]
pub struct OverQuota {
    pub needed_vcpus: i64,
    pub quota_vcpus: f64,
}

impl std::fmt::Display for OverQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "capacity: {} vCPUs would run at the booking's time, over the account's quota of {} \
             (ask AWS for more before the day)",
            self.needed_vcpus, self.quota_vcpus
        )
    }
}

/// Keeps what the provisioner read.
pub async fn save<'e>(db: impl sqlx::PgExecutor<'e>, c: &Capacity) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO account_capacity (id, quota_vcpus, other_vcpus, vcpus_per_machine, read_at)
         VALUES (true, $1, $2, $3, now())
         ON CONFLICT (id) DO UPDATE SET quota_vcpus = $1, other_vcpus = $2,
             vcpus_per_machine = $3, read_at = now()",
    )
    .bind(c.quota_vcpus)
    .bind(c.other_vcpus)
    .bind(c.vcpus_per_machine)
    .execute(db)
    .await?;
    Ok(())
}

/// Whether the booking `id` (its window and machines as given) would go over the quota, by
/// the last reading; `None` when it fits or nothing recent was read.
///
/// Called in the transaction that stores the booking (after it is written), it first takes a
/// lock that every such check takes, held until that transaction ends: two bookings stored at
/// once by two replicas are counted one after the other, so the second counts the first and a
/// burst that fits only one at a time is flagged, rather than each missing the other.
pub async fn check(
    db: &mut PgConnection,
    id: &str,
    (starts, ends): (DateTime<Utc>, DateTime<Utc>),
    machines: i64,
    users_per_machine: i32,
) -> Result<Option<OverQuota>, sqlx::Error> {
    let reading: Option<(f64, i64, i32)> = sqlx::query_as(
        "SELECT quota_vcpus, other_vcpus, vcpus_per_machine FROM account_capacity
         WHERE read_at > now() - make_interval(secs => $1)",
    )
    .bind(FRESH.num_seconds() as f64)
    .fetch_optional(&mut *db)
    .await?;
    let Some((quota_vcpus, other_vcpus, per_machine)) = reading else {
        return Ok(None);
    };
    // The two-key form: a key space apart from the bookings' own locks (store::intake::lock),
    // which every intake takes before this one.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('labbook'), hashtext('account capacity'))")
        .execute(&mut *db)
        .await?;
    let overlapping: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(ceil(number_of_users::float8 / $4)), 0)::bigint FROM bookings
         WHERE booking_id <> $1 AND NOT cancelled AND state NOT IN ('failed', 'ended')
           AND booking_time < $3
           AND booking_time + make_interval(mins => duration_minutes) > $2",
    )
    .bind(id)
    .bind(starts)
    .bind(ends)
    .bind(f64::from(users_per_machine.max(1)))
    .fetch_one(&mut *db)
    .await?;
    let needed_vcpus = (overlapping + machines) * i64::from(per_machine) + other_vcpus;
    Ok((needed_vcpus as f64 > quota_vcpus).then_some(OverQuota {
        needed_vcpus,
        quota_vcpus,
    }))
}
