//! Client-side rate limits on EC2 API calls, one token bucket per action, shared by every
//! provisioner replica through PostgreSQL.
//!
//! EC2 meters each account and Region with a token bucket per API action (RunInstances: 5 at
//! once, refilled at 2 per second) and answers an empty bucket with `RequestLimitExceeded`. The
//! SDK's adaptive retry mode has a client-side rate limiter, but it lives in one process and only
//! learns of the limit by being throttled; nothing off the shelf shares a bucket between
//! processes. So every replica takes its tokens from one row per action in the `ec2_rate` table,
//! with one atomic `UPDATE`, and a caller that finds the bucket empty sleeps until its next
//! token is due and tries again: a burst of bookings waits here instead of being throttled.
//!
//! Calls that compete for a bucket can be ranked ([`RateLimiter::acquire_ranked`]): a launch for
//! a booking due at 08:45 gets the account's next `RunInstances` token before the launches of a
//! booking due at 09:00, whichever replica holds them. Waiters are rows in `ec2_rate_waiters`;
//! a token goes only to the waiter no live one of an earlier rank is ahead of.
//!
//! Without a database ([`RateLimiter::local`]) the same buckets are kept in the process, unranked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::Ec2Error;
use crate::broker::StageError;

/// One bucket: `burst` calls at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
}

impl RateLimit {
    pub const fn new(burst: u32, per_second: f64) -> Self {
        Self { burst, per_second }
    }

    /// `BURST/PER_SECOND` (e.g. `5/2`, `10/0.5`), or `off` (no limit: `None`).
    pub fn parse(raw: &str) -> Result<Option<Self>, String> {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let bad = || {
            format!(
                "must be BURST/PER_SECOND, e.g. 5/2 (5 calls at once, then 2 per second; BURST a whole number from 1 to 100000, PER_SECOND above 0 and at most 100000), or off (got {raw:?})"
            )
        };
        let (burst, rate) = raw.split_once('/').ok_or_else(bad)?;
        let burst: u32 = burst.trim().parse().map_err(|_| bad())?;
        let per_second: f64 = rate.trim().parse().map_err(|_| bad())?;
        let valid = (1..=100_000).contains(&burst)
            && per_second.is_finite()
            && per_second > 0.0
            && per_second <= 100_000.0;
        if !valid {
            return Err(bad());
        }
        Ok(Some(Self::new(burst, per_second)))
    }
}

/// The client-side limits, per EC2 action labbook calls often. Other actions (the security
/// group's, called once per process) are not limited.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    /// `LABBOOK_EC2_RATE_RUN_INSTANCES`: default `5/2`, EC2's own bucket.
    pub run_instances: Option<RateLimit>,
    /// `LABBOOK_EC2_RATE_DESCRIBE_INSTANCES`: default `100/20`.
    pub describe_instances: Option<RateLimit>,
    /// `LABBOOK_EC2_RATE_TERMINATE_INSTANCES`: default `100/5`.
    pub terminate_instances: Option<RateLimit>,
    /// `LABBOOK_EC2_RATE_GET_CONSOLE_OUTPUT`: default `100/20`, a non-mutating action's bucket.
    /// The boot watch reads each booting machine's console about once per expected boot.
    pub get_console_output: Option<RateLimit>,
}

impl Default for RateLimits {
    /// EC2's default buckets for an account and Region.
    fn default() -> Self {
        Self {
            run_instances: Some(RateLimit::new(5, 2.0)),
            describe_instances: Some(RateLimit::new(100, 20.0)),
            terminate_instances: Some(RateLimit::new(100, 5.0)),
            get_console_output: Some(RateLimit::new(100, 20.0)),
        }
    }
}

impl RateLimits {
    /// No limits at all.
    pub fn off() -> Self {
        Self {
            run_instances: None,
            describe_instances: None,
            terminate_instances: None,
            get_console_output: None,
        }
    }

    /// The limits from `LABBOOK_EC2_RATE_RUN_INSTANCES`, `LABBOOK_EC2_RATE_DESCRIBE_INSTANCES`,
    /// `LABBOOK_EC2_RATE_TERMINATE_INSTANCES` and `LABBOOK_EC2_RATE_GET_CONSOLE_OUTPUT`, each `BURST/PER_SECOND` or `off`, EC2's
    /// defaults where unset. An error names the variable.
    ///
    /// The buckets are per installation's database: installations that share an AWS account
    /// should divide EC2's rate between them.
    pub fn from_vars<'a>(
        get: impl Fn(&'static str) -> Option<&'a str>,
    ) -> Result<Self, (&'static str, String)> {
        let defaults = Self::default();
        let one = |var: &'static str, default: Option<RateLimit>| match get(var) {
            None => Ok(default),
            Some(raw) => RateLimit::parse(raw).map_err(|e| (var, e)),
        };
        Ok(Self {
            run_instances: one("LABBOOK_EC2_RATE_RUN_INSTANCES", defaults.run_instances)?,
            describe_instances: one(
                "LABBOOK_EC2_RATE_DESCRIBE_INSTANCES",
                defaults.describe_instances,
            )?,
            terminate_instances: one(
                "LABBOOK_EC2_RATE_TERMINATE_INSTANCES",
                defaults.terminate_instances,
            )?,
            get_console_output: one(
                "LABBOOK_EC2_RATE_GET_CONSOLE_OUTPUT",
                defaults.get_console_output,
            )?,
        })
    }

    /// The limit of `action`.
    pub fn for_action(&self, action: &str) -> Option<RateLimit> {
        match action {
            "RunInstances" => self.run_instances,
            "DescribeInstances" => self.describe_instances,
            "GetConsoleOutput" => self.get_console_output,
            "TerminateInstances" => self.terminate_instances,
            _ => None,
        }
    }
}

/// Hands out tokens, waiting for them when a bucket is empty.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    limits: RateLimits,
    buckets: Buckets,
}

#[derive(Debug, Clone)]
enum Buckets {
    /// In this process only: the tokens left and when they were counted, per action.
    Local(Arc<Mutex<HashMap<&'static str, (f64, Instant)>>>),
    /// In the `ec2_rate` table, shared by every process on the database.
    Shared(PgPool),
}

impl RateLimiter {
    /// Buckets kept in this process: right only while one process calls EC2.
    pub fn local(limits: RateLimits) -> Self {
        Self {
            limits,
            buckets: Buckets::Local(Default::default()),
        }
    }

    /// Buckets in the database, shared by every process that uses it.
    pub fn shared(limits: RateLimits, pool: PgPool) -> Self {
        Self {
            limits,
            buckets: Buckets::Shared(pool),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.buckets, Buckets::Shared(_))
    }

    /// Takes a token for one call of `action`, waiting as long as it takes; never fails for
    /// lack of tokens. A database that cannot be reached is [`Ec2Error::Unavailable`] (the
    /// message waits it out), another database error [`Ec2Error::Transient`].
    pub async fn acquire(&self, action: &'static str) -> Result<(), Ec2Error> {
        self.acquire_ranked(action, None).await
    }

    /// Like [`RateLimiter::acquire`], but with shared buckets a token goes to the waiter of the
    /// earliest `rank` first (a booking's time): an unranked call takes what is there.
    pub async fn acquire_ranked(
        &self,
        action: &'static str,
        rank: Option<DateTime<Utc>>,
    ) -> Result<(), Ec2Error> {
        let Some(limit) = self.limits.for_action(action) else {
            return Ok(());
        };
        let queued = match (&self.buckets, rank) {
            (Buckets::Shared(pool), Some(rank)) => Some(
                Waiter::join(pool, action, rank)
                    .await
                    .map_err(|e| database_error(action, e))?,
            ),
            _ => None,
        };
        let taken = self.take_when_due(action, limit, queued.as_ref()).await;
        if let (Some(waiter), Buckets::Shared(pool)) = (&queued, &self.buckets) {
            // A waiter left behind (the database away now) is ignored once it is not seen.
            let _ = waiter.leave(pool).await;
        }
        taken
    }

    async fn take_when_due(
        &self,
        action: &'static str,
        limit: RateLimit,
        waiter: Option<&Waiter>,
    ) -> Result<(), Ec2Error> {
        let started = Instant::now();
        loop {
            let due = match &self.buckets {
                Buckets::Local(buckets) => take_local(buckets, action, limit),
                Buckets::Shared(pool) => take_shared(pool, action, limit, waiter)
                    .await
                    .map_err(|e| database_error(action, e))?,
            };
            let Some(wait) = due else {
                let waited = started.elapsed();
                if waited >= Duration::from_millis(1) {
                    metrics::counter!("labbook_ec2_rate_limited_total", "operation" => action)
                        .increment(1);
                    metrics::counter!("labbook_ec2_rate_wait_milliseconds_total", "operation" => action)
                        .increment(waited.as_millis() as u64);
                    tracing::debug!(
                        operation = action,
                        waited_ms = waited.as_millis() as u64,
                        "waited for a token"
                    );
                }
                return Ok(());
            };
            // Callers that wait together wake a little apart; the first takes the token.
            tokio::time::sleep(wait + jitter()).await;
        }
    }
}

impl RateLimiter {
    /// Empties the action's bucket: EC2 said the account's is empty (other clients of the
    /// account, or a clock apart), so every replica waits for its refill.
    pub async fn drain(&self, action: &'static str) -> Result<(), Ec2Error> {
        if self.limits.for_action(action).is_none() {
            return Ok(());
        }
        match &self.buckets {
            Buckets::Local(buckets) => {
                let mut buckets = buckets.lock().expect("rate limiter lock");
                let (tokens, at) = buckets.entry(action).or_insert((0.0, Instant::now()));
                *tokens = tokens.min(0.0);
                *at = Instant::now();
            }
            Buckets::Shared(pool) => {
                sqlx::query(
                    "UPDATE ec2_rate SET tokens = LEAST(tokens, 0), updated_at = clock_timestamp()
                     WHERE action = $1",
                )
                .bind(action)
                .execute(pool)
                .await
                .map_err(|e| database_error(action, e))?;
            }
        }
        Ok(())
    }
}

/// Up to 20 ms, from the clock's nanoseconds (no RNG needed for this).
fn jitter() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Duration::from_micros(u64::from(nanos % 20_000))
}

/// How long until one token is due, from what is in the bucket now.
fn until_one(tokens: f64, limit: RateLimit) -> Duration {
    Duration::from_secs_f64(((1.0 - tokens).max(0.0) / limit.per_second).max(0.001))
}

/// `None`: a token was taken; `Some(wait)`: none for `wait`.
fn take_local(
    buckets: &Mutex<HashMap<&'static str, (f64, Instant)>>,
    action: &'static str,
    limit: RateLimit,
) -> Option<Duration> {
    let now = Instant::now();
    let mut buckets = buckets.lock().expect("rate limiter lock");
    let (tokens, at) = buckets
        .entry(action)
        .or_insert((f64::from(limit.burst), now));
    let refilled = (*tokens + now.duration_since(*at).as_secs_f64() * limit.per_second)
        .min(limit.burst.into());
    *at = now;
    if refilled >= 1.0 {
        *tokens = refilled - 1.0;
        None
    } else {
        *tokens = refilled;
        Some(until_one(refilled, limit))
    }
}

/// The bucket refilled for the time since it was last counted (never above its burst), by the
/// database's clock so that every replica counts alike.
const REFILLED: &str = "LEAST($2::float8, tokens + $3::float8 * GREATEST(0::float8,
                        EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8))";

/// How long a waiter may go unseen before the others stop letting it go first.
const WAITER_TTL_SECONDS: f64 = 10.0;

/// A ranked call waiting for a token, as a row of `ec2_rate_waiters`.
struct Waiter {
    action: &'static str,
    id: String,
    rank: DateTime<Utc>,
}

impl Waiter {
    async fn join(
        pool: &PgPool,
        action: &'static str,
        rank: DateTime<Utc>,
    ) -> Result<Self, sqlx::Error> {
        let id = {
            use rand::{RngCore, TryRngCore};
            format!("{:016x}", rand::rngs::OsRng.unwrap_err().next_u64())
        };
        sqlx::query(
            "WITH gone AS (DELETE FROM ec2_rate_waiters
                           WHERE action = $1 AND seen_at < clock_timestamp() - make_interval(secs => $4))
             INSERT INTO ec2_rate_waiters (action, waiter, rank) VALUES ($1, $2, $3)",
        )
        .bind(action)
        .bind(&id)
        .bind(rank)
        .bind(WAITER_TTL_SECONDS * 3.0)
        .execute(pool)
        .await?;
        Ok(Self { action, id, rank })
    }

    async fn leave(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM ec2_rate_waiters WHERE action = $1 AND waiter = $2")
            .bind(self.action)
            .bind(&self.id)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// Takes a token from the action's row if one is there (and, for a ranked `waiter`, no live
/// waiter of an earlier rank is ahead of it): one `UPDATE`, which PostgreSQL runs on the row's
/// latest version under its row lock, so concurrent takers never share a token. Else reads when
/// the next one is due (a waiter also says it is still there).
async fn take_shared(
    pool: &PgPool,
    action: &'static str,
    limit: RateLimit,
    waiter: Option<&Waiter>,
) -> Result<Option<Duration>, sqlx::Error> {
    let (burst, rate) = (f64::from(limit.burst), limit.per_second);
    let taken: Option<f64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE ec2_rate SET tokens = {REFILLED} - 1, updated_at = clock_timestamp()
         WHERE action = $1 AND {REFILLED} >= 1
           AND ($4::text IS NULL OR NOT EXISTS (
                SELECT 1 FROM ec2_rate_waiters w
                WHERE w.action = $1 AND (w.rank, w.waiter) < ($5, $4)
                  AND w.seen_at > clock_timestamp() - make_interval(secs => $6)))
         RETURNING tokens"
    )))
    .bind(action)
    .bind(burst)
    .bind(rate)
    .bind(waiter.map(|w| w.id.as_str()))
    .bind(waiter.map(|w| w.rank))
    .bind(WAITER_TTL_SECONDS)
    .fetch_optional(pool)
    .await?;
    if taken.is_some() {
        return Ok(None);
    }
    if let Some(w) = waiter {
        sqlx::query(
            "UPDATE ec2_rate_waiters SET seen_at = clock_timestamp() WHERE action = $1 AND waiter = $2",
        )
        .bind(w.action)
        .bind(&w.id)
        .execute(pool)
        .await?;
    }
    let now: Option<f64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {REFILLED} FROM ec2_rate WHERE action = $1"
    )))
    .bind(action)
    .bind(burst)
    .bind(rate)
    .fetch_optional(pool)
    .await?;
    match now {
        Some(tokens) => Ok(Some(until_one(tokens, limit))),
        None => {
            // The action's first call on this database: a full bucket, then take from it.
            sqlx::query(
                "INSERT INTO ec2_rate (action, tokens, updated_at)
                 VALUES ($1, $2, clock_timestamp()) ON CONFLICT (action) DO NOTHING",
            )
            .bind(action)
            .bind(burst)
            .execute(pool)
            .await?;
            Ok(Some(Duration::ZERO))
        }
    }
}

fn database_error(operation: &'static str, err: sqlx::Error) -> Ec2Error {
    let detail = format!("rate limit: database: {err}");
    match StageError::from(err) {
        StageError::Unavailable(_) => Ec2Error::Unavailable { operation, detail },
        _ => Ec2Error::Transient { operation, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_or_say_what_they_must_be() {
        assert_eq!(RateLimit::parse("5/2"), Ok(Some(RateLimit::new(5, 2.0))));
        assert_eq!(
            RateLimit::parse(" 10 / 0.5 "),
            Ok(Some(RateLimit::new(10, 0.5)))
        );
        assert_eq!(RateLimit::parse("off"), Ok(None));
        for bad in [
            "5", "0/2", "5/0", "5/-1", "x/2", "5/inf", "5/NaN", "2.5/2", "",
        ] {
            let err = RateLimit::parse(bad).unwrap_err();
            assert!(err.contains("BURST/PER_SECOND"), "{bad}: {err}");
        }
    }

    #[test]
    fn limits_default_to_ec2s_and_errors_name_the_variable() {
        let none = RateLimits::from_vars(|_| None).unwrap();
        assert_eq!(none, RateLimits::default());
        assert_eq!(
            none.for_action("RunInstances"),
            Some(RateLimit::new(5, 2.0))
        );
        assert_eq!(none.for_action("CreateSecurityGroup"), None);
        assert_eq!(
            none.for_action("GetConsoleOutput"),
            none.for_action("DescribeInstances")
        );
        let off = RateLimits::from_vars(|v| {
            (v == "LABBOOK_EC2_RATE_DESCRIBE_INSTANCES").then_some("off")
        })
        .unwrap();
        assert_eq!(off.describe_instances, None);
        assert_eq!(off.run_instances, Some(RateLimit::new(5, 2.0)));
        let (var, _) = RateLimits::from_vars(|v| {
            (v == "LABBOOK_EC2_RATE_TERMINATE_INSTANCES").then_some("fast")
        })
        .unwrap_err();
        assert_eq!(var, "LABBOOK_EC2_RATE_TERMINATE_INSTANCES");
    }

    #[tokio::test]
    async fn a_local_bucket_gives_its_burst_then_its_rate() {
        let limits = RateLimits {
            run_instances: Some(RateLimit::new(3, 20.0)),
            ..RateLimits::off()
        };
        let limiter = RateLimiter::local(limits);
        let started = Instant::now();
        for _ in 0..3 {
            limiter.acquire("RunInstances").await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_millis(20));
        for _ in 0..4 {
            limiter.acquire("RunInstances").await.unwrap();
        }
        // 4 more at 20 per second: at least 200 ms.
        assert!(started.elapsed() >= Duration::from_millis(190));
        // An unlimited action never waits.
        limiter.acquire("DescribeInstances").await.unwrap();
    }
}
