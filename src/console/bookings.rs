//! What the console reads about bookings, in its own queries: only the columns it shows (no
//! password column is ever selected, encrypted or hashed), states and kinds as plain text so
//! new ones show as they are.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};

use crate::domain::{Cost, Prices, Usage};
use crate::format_time;

/// The states a booking can be in (`docs/contract.md`), for the state filter.
pub const STATES: &[&str] = &[
    "received",
    "scheduled",
    "provisioning",
    "provisioned",
    "failed",
    "ended",
    "cancelled",
];

/// The most bookings one list answer holds.
pub const MAX_LIMIT: i64 = 500;

/// The bookings list's filter; every part is optional.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<String>,
    /// Booking time at or after.
    pub from: Option<DateTime<Utc>>,
    /// Booking time before.
    pub to: Option<DateTime<Utc>>,
    /// Part of the booking id, the trainer's email, a machine's address or instance id.
    pub search: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

impl Filter {
    /// Builds a filter from the raw query values; the error says which value is wrong.
    pub fn parse(raw: &RawFilter) -> Result<Self, String> {
        let text = trimmed;
        // Empty is "any state" (the page's select sends it); anything else must be a state.
        let state = raw.state.clone().filter(|s| !s.is_empty());
        if let Some(s) = &state
            && !STATES.contains(&s.as_str())
        {
            return Err(format!(
                "state must be one of {} (got {s:?})",
                STATES.join(", ")
            ));
        }
        let from = text(&raw.from).map(|t| parse_time(t, false)).transpose()?;
        let to = text(&raw.to).map(|t| parse_time(t, true)).transpose()?;
        let limit = raw.limit.unwrap_or(100);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(format!("limit must be from 1 to {MAX_LIMIT} (got {limit})"));
        }
        let offset = raw.offset.unwrap_or(0);
        if !(0..=1_000_000).contains(&offset) {
            return Err(format!("offset must be from 0 to 1000000 (got {offset})"));
        }
        let search = text(&raw.q).map(str::to_owned);
        if search.as_ref().is_some_and(|q| q.chars().count() > 200) {
            return Err("q is at most 200 characters".into());
        }
        // PostgreSQL text cannot hold a NUL; no id, address or email holds a control character.
        if search
            .as_ref()
            .is_some_and(|q| q.chars().any(char::is_control))
        {
            return Err("q must not contain control characters".into());
        }
        Ok(Self {
            state,
            from,
            to,
            search,
            limit,
            offset,
        })
    }
}

/// The bookings list's query string, as sent.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
pub struct RawFilter {
    pub state: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub q: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// The value, trimmed, unless it is absent or blank.
pub fn trimmed(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `2026-12-01` (the day's start; with `end`, the next day's start) or an RFC 3339 time.
fn parse_time(raw: &str, end: bool) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| {
        format!("{raw:?} is not a date (2026-12-01) or an RFC 3339 time (2026-12-01T09:00:00Z)")
    })?;
    let day = if end {
        day.succ_opt().unwrap_or(day)
    } else {
        day
    };
    Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
}

/// One row of the bookings list.
#[derive(Debug, Clone, FromRow)]
struct SummaryRow {
    booking_id: String,
    email: String,
    booking_time: DateTime<Utc>,
    duration_minutes: i32,
    number_of_users: i32,
    state: String,
    failure_reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    machines: i64,
    email_failures: i64,
    usage: sqlx::types::Json<std::collections::BTreeMap<String, f64>>,
}

/// A booking as the list shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub booking_id: String,
    pub state: String,
    pub email: String,
    pub booking_time: String,
    pub ends_at: String,
    pub number_of_users: i32,
    pub machines: i64,
    pub failure_reason: Option<String>,
    pub email_failures: i64,
    pub created_at: String,
    pub updated_at: String,
    /// Its machines' running time and estimated cost.
    #[serde(flatten)]
    pub cost: Cost,
}

impl Summary {
    fn from_row(r: SummaryRow, prices: &Prices) -> Self {
        let ends = r.booking_time + chrono::Duration::minutes(i64::from(r.duration_minutes));
        let usage = Usage { seconds: r.usage.0 };
        Self {
            cost: Cost::of(&usage, prices),
            booking_id: r.booking_id,
            state: r.state,
            email: r.email,
            booking_time: format_time(r.booking_time),
            ends_at: format_time(ends),
            number_of_users: r.number_of_users,
            machines: r.machines,
            failure_reason: r.failure_reason,
            email_failures: r.email_failures,
            created_at: format_time(r.created_at),
            updated_at: format_time(r.updated_at),
        }
    }
}

const LIST_WHERE: &str = "
    WHERE ($1::text IS NULL OR b.state = $1)
      AND ($2::timestamptz IS NULL OR b.booking_time >= $2)
      AND ($3::timestamptz IS NULL OR b.booking_time < $3)
      AND ($4::text IS NULL OR b.booking_id ILIKE $4 OR b.email ILIKE $4 OR EXISTS (
            SELECT 1 FROM slots s WHERE s.booking_id = b.booking_id
               AND (s.public_dns ILIKE $4 OR s.public_ip ILIKE $4 OR s.instance_id ILIKE $4)))";

/// The running time of a booking's machines per instance type (launch to termination, or to
/// now), as a JSON object, for `b`, the booking of the query it is part of.
const USAGE_OF_B: &str = "
    (SELECT COALESCE(json_object_agg(kind, seconds), '{}'::json) FROM (
        SELECT COALESCE(m.instance_type, '') AS kind,
               GREATEST(sum(extract(epoch FROM COALESCE(m.terminated_at, now()) - m.launched_at)), 0)::float8 AS seconds
          FROM machines m WHERE m.booking_id = b.booking_id GROUP BY 1) per_type)";

/// A page of the bookings list, and what the whole selection adds up to.
pub struct Listed {
    pub rows: Vec<Summary>,
    pub total: i64,
    /// The running time and cost of every booking the filter selects (not only this page).
    pub totals: Cost,
}

/// The bookings `filter` selects, latest booking time first, how many there are in all and
/// their machines' running time and cost.
pub async fn list(pool: &PgPool, filter: &Filter, prices: &Prices) -> Result<Listed, sqlx::Error> {
    let pattern = filter.search.as_deref().map(like_pattern);
    let rows: Vec<SummaryRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT b.booking_id, b.email, b.booking_time, b.duration_minutes, b.number_of_users,
                b.state, b.failure_reason, b.created_at, b.updated_at,
                (SELECT count(*) FROM slots s
                  WHERE s.booking_id = b.booking_id AND s.instance_id IS NOT NULL) AS machines,
                (SELECT count(*) FROM emails e WHERE e.booking_id = b.booking_id
                    AND e.sent_at IS NULL AND e.last_error IS NOT NULL) AS email_failures,
                {USAGE_OF_B} AS usage
           FROM bookings b {LIST_WHERE}
          ORDER BY b.booking_time DESC, b.booking_id
          LIMIT $5 OFFSET $6"
    )))
    .bind(&filter.state)
    .bind(filter.from)
    .bind(filter.to)
    .bind(&pattern)
    .bind(filter.limit)
    .bind(filter.offset)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM bookings b {LIST_WHERE}"
    )))
    .bind(&filter.state)
    .bind(filter.from)
    .bind(filter.to)
    .bind(&pattern)
    .fetch_one(pool)
    .await?;
    let per_type: Vec<(String, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COALESCE(m.instance_type, ''),
                GREATEST(sum(extract(epoch FROM COALESCE(m.terminated_at, now()) - m.launched_at)), 0)::float8
           FROM machines m JOIN bookings b ON b.booking_id = m.booking_id {LIST_WHERE}
          GROUP BY 1"
    )))
    .bind(&filter.state)
    .bind(filter.from)
    .bind(filter.to)
    .bind(&pattern)
    .fetch_all(pool)
    .await?;
    let all = Usage {
        seconds: per_type.into_iter().collect(),
    };
    Ok(Listed {
        rows: rows
            .into_iter()
            .map(|r| Summary::from_row(r, prices))
            .collect(),
        total,
        totals: Cost::of(&all, prices),
    })
}

/// `%text%` for ILIKE, with `%`, `_` and `\` in the text taken literally.
fn like_pattern(text: &str) -> String {
    let mut p = String::from("%");
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// A booking as stored, without anything secret.
#[derive(Debug, Clone, FromRow)]
pub struct BookingRow {
    pub booking_id: String,
    pub email: String,
    pub booking_time: DateTime<Utc>,
    pub number_of_users: i32,
    pub duration_minutes: i32,
    pub state: String,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The trace it was stored under (W3C `traceparent`).
    pub traceparent: Option<String>,
}

impl BookingRow {
    pub fn ends_at(&self) -> DateTime<Utc> {
        self.booking_time + chrono::Duration::minutes(i64::from(self.duration_minutes))
    }
}

/// A lab machine of a booking: no password column is read.
#[derive(Debug, Clone, FromRow)]
pub struct MachineRow {
    pub slot: i32,
    pub first_user: i32,
    pub user_count: i32,
    pub admin_username: String,
    pub instance_id: Option<String>,
    pub instance_state: Option<String>,
    pub public_dns: Option<String>,
    pub public_ip: Option<String>,
    pub launched_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The image the slot's machine booted from (its `machines` row, else the slot's).
    pub image_id: Option<String>,
    /// When the boot watch saw it ready; `None` while it boots (or before its launch).
    pub ready_at: Option<DateTime<Utc>>,
    /// Launch to ready, as recorded for the image's boot times.
    pub boot_seconds: Option<f64>,
}

impl MachineRow {
    pub fn address(&self) -> Option<&str> {
        trimmed(&self.public_dns).or(trimmed(&self.public_ip))
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct ScheduleRow {
    pub action: String,
    pub due_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, FromRow)]
pub struct EmailRow {
    pub kind: String,
    /// 0: the email the pipeline sends; n: an operator's n-th resend.
    pub copy: i32,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// Everything stored about one booking that the console shows.
#[derive(Debug, Clone)]
pub struct Stored {
    pub booking: BookingRow,
    /// Trainee usernames, in order (never their passwords).
    pub usernames: Vec<String>,
    pub machines: Vec<MachineRow>,
    pub schedule: Vec<ScheduleRow>,
    pub emails: Vec<EmailRow>,
    /// Its events as published to the upstream (changes, cancellation, rejections).
    pub history: Vec<crate::store::events::HistoryEntry>,
    /// What operators did to it from the console.
    pub actions: Vec<super::actions::ActionRow>,
    /// Its machines' running time per instance type.
    pub usage: Usage,
}

/// The booking `booking_id` and what belongs to it; `None` if it was never stored.
pub async fn find(pool: &PgPool, booking_id: &str) -> Result<Option<Stored>, sqlx::Error> {
    let booking: Option<BookingRow> = sqlx::query_as(
        "SELECT booking_id, email, booking_time, number_of_users, duration_minutes, state,
                failure_reason, created_at, updated_at, traceparent
           FROM bookings WHERE booking_id = $1",
    )
    .bind(booking_id)
    .fetch_optional(pool)
    .await?;
    let Some(booking) = booking else {
        return Ok(None);
    };
    let usernames = sqlx::query_scalar(
        "SELECT username FROM credentials WHERE booking_id = $1 ORDER BY position",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await?;
    let machines = sqlx::query_as(
        "SELECT s.slot, s.first_user, s.user_count, s.admin_username, s.instance_id,
                s.instance_state, s.public_dns, s.public_ip, s.launched_at, s.updated_at,
                COALESCE(m.image_id, s.image_id) AS image_id,
                COALESCE(m.ready_at, s.ready_at) AS ready_at, m.boot_seconds
           FROM slots s LEFT JOIN machines m ON m.instance_id = s.instance_id
          WHERE s.booking_id = $1 ORDER BY s.slot",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await?;
    let schedule = sqlx::query_as(
        "SELECT action, due_at, published_at FROM schedule WHERE booking_id = $1 ORDER BY due_at",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await?;
    let emails = sqlx::query_as(
        "SELECT kind, copy, sent_at, last_error FROM emails WHERE booking_id = $1
          ORDER BY sent_at NULLS LAST, kind, copy",
    )
    .bind(booking_id)
    .fetch_all(pool)
    .await?;
    let history = crate::store::events::history(pool, booking_id).await?;
    let actions = super::actions::history(pool, booking_id).await?;
    let usage = crate::store::machines::usage(pool, booking_id).await?;
    Ok(Some(Stored {
        usage,
        booking,
        usernames,
        machines,
        schedule,
        emails,
        history,
        actions,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_dates_times_and_refuse_nonsense() {
        let raw = RawFilter {
            state: Some("failed".into()),
            from: Some("2026-12-01".into()),
            to: Some("2026-12-01".into()),
            q: Some("  ".into()),
            ..Default::default()
        };
        let f = Filter::parse(&raw).unwrap();
        assert_eq!(f.state.as_deref(), Some("failed"));
        assert_eq!(format_time(f.from.unwrap()), "2026-12-01T00:00:00Z");
        assert_eq!(format_time(f.to.unwrap()), "2026-12-02T00:00:00Z");
        assert_eq!((f.search, f.limit), (None, 100));
        for bad in [
            RawFilter {
                state: Some("lost".into()),
                ..Default::default()
            },
            RawFilter {
                from: Some("yesterday".into()),
                ..Default::default()
            },
            RawFilter {
                limit: Some(0),
                ..Default::default()
            },
            RawFilter {
                q: Some("a\0b".into()),
                ..Default::default()
            },
            RawFilter {
                state: Some(" failed".into()),
                ..Default::default()
            },
        ] {
            assert!(Filter::parse(&bad).is_err());
        }
    }

    #[test]
    fn search_text_is_literal() {
        assert_eq!(like_pattern("a_b%c"), r"%a\_b\%c%");
    }
}
