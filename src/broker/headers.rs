//! The `x-labbook-*` headers: the attempt count a retried message carries, and the reasons a
//! dead letter carries (docs/contract.md §2).

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

pub const ERROR: &str = "x-labbook-error";
pub const STAGE: &str = "x-labbook-stage";
pub const ATTEMPTS: &str = "x-labbook-attempts";
pub const FAILED_AT: &str = "x-labbook-failed-at";
/// How many times a message waited for a dependency that was down: kept apart from the
/// attempts, so an outage never spends them.
pub const WAITS: &str = "x-labbook-waits";
/// Set on a message `labbook dlq replay` put back: the operator fixed the cause and asks for
/// the work again.
pub const REPLAYED_AT: &str = "x-labbook-replayed-at";
/// On a dead letter: the `traceparent` of the handling that gave up on it, which its replay's
/// handling links to.
pub const FAILED_IN: &str = "x-labbook-failed-in";

/// Longest `x-labbook-error` value.
pub const MAX_ERROR_CHARS: usize = 500;

/// Headers the broker adds when it dead-letters or redelivers; not part of the original message.
const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-delivery-count",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// Reads an integer header, whatever integer type the publisher used.
pub fn int_header(props: &BasicProperties, name: &str) -> Option<i64> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().parse().ok(),
        _ => None,
    }
}

/// Reads a string header.
pub fn str_header(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// Attempts already made, as carried by a retried message (0 for a first delivery).
pub fn attempts_done(props: &BasicProperties) -> u32 {
    count_header(props, ATTEMPTS)
}

/// Waits for a dependency already made (0 for a first delivery).
pub fn waits_done(props: &BasicProperties) -> u32 {
    count_header(props, WAITS)
}

/// Whether the message was put back by `labbook dlq replay`.
pub fn is_replay(props: &BasicProperties) -> bool {
    str_header(props, REPLAYED_AT).is_some()
}

/// When `labbook dlq replay` put the message back, if it did.
pub fn replayed_at(props: &BasicProperties) -> Option<DateTime<Utc>> {
    let at = str_header(props, REPLAYED_AT)?;
    DateTime::parse_from_rfc3339(&at)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn count_header(props: &BasicProperties, name: &str) -> u32 {
    int_header(props, name).map_or(0, |n| n.clamp(0, i64::from(u32::MAX)) as u32)
}

/// The original message's headers, without what the broker or labbook added.
pub fn original_headers(props: &BasicProperties) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(headers) = props.headers() {
        for (k, v) in headers {
            let key = k.as_str();
            if !BROKER_HEADERS.contains(&key) && !key.starts_with("x-labbook-") {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// The original message's properties as labbook re-publishes them: everything but the
/// per-message TTL (`expiration`, which would let a dead letter or a retry copy vanish) and
/// `user_id` (which the broker checks against the publishing connection's user), with the
/// original headers only, and persistent.
fn carried_over(props: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut out = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// Properties for the retry copy: the original ones, persistent, with the attempts and the
/// waits made so far (and the replay mark, which lasts until the work is done).
pub fn for_retry(props: &BasicProperties, attempts: u32, waits: u32) -> BasicProperties {
    let mut headers = original_headers(props);
    headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(attempts)));
    headers.insert(WAITS.into(), AMQPValue::LongLongInt(i64::from(waits)));
    if let Some(at) = str_header(props, REPLAYED_AT) {
        headers.insert(REPLAYED_AT.into(), long_string(&at));
    }
    carried_over(props, headers)
}

/// Properties for the dead letter: the original ones, persistent, with why it failed.
pub fn for_dead_letter(
    props: &BasicProperties,
    stage: &str,
    attempts: u32,
    error: &str,
    at: DateTime<Utc>,
) -> BasicProperties {
    let mut headers = original_headers(props);
    headers.insert(ERROR.into(), long_string(&one_line(error, MAX_ERROR_CHARS)));
    headers.insert(STAGE.into(), long_string(stage));
    headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(attempts)));
    headers.insert(
        FAILED_AT.into(),
        long_string(&at.to_rfc3339_opts(SecondsFormat::Secs, true)),
    );
    carried_over(props, headers)
}

/// Properties for a fresh copy of a dead letter put back in its queue: everything labbook and
/// the original publisher set, without what the broker added (its delivery counts).
pub fn for_refresh(props: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(all) = props.headers() {
        for (k, v) in all {
            if !BROKER_HEADERS.contains(&k.as_str()) && k.as_str() != "x-acquired-count" {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    carried_over(props, headers)
}

/// Properties for a replayed dead letter: the original ones, attempt count reset, marked as
/// replayed at `at`.
pub fn for_replay(props: &BasicProperties, at: DateTime<Utc>) -> BasicProperties {
    let mut headers = original_headers(props);
    if let Some(failed_in) = str_header(props, FAILED_IN) {
        headers.insert(FAILED_IN.into(), long_string(&failed_in));
    }
    // Milliseconds: the provisioner compares it with when the booking failed.
    headers.insert(
        REPLAYED_AT.into(),
        long_string(&at.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    carried_over(props, headers)
}

/// `props` with [`FAILED_IN`] set to `traceparent`.
pub fn with_failed_in(props: BasicProperties, traceparent: &str) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(FAILED_IN.into(), long_string(traceparent));
    props.with_headers(headers)
}

/// `text` on one line, control characters replaced, at most `max` characters.
pub fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props_with(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default()
            .with_headers(t)
            .with_message_id("m1".into())
            .with_correlation_id("c1".into())
            .with_content_type("application/json".into())
    }

    #[test]
    fn dead_letter_keeps_the_original_and_adds_the_reason() {
        let original = props_with(&[
            ("trace", long_string("abc")),
            ("x-death", AMQPValue::LongString("x".into())),
            (ATTEMPTS, AMQPValue::LongInt(3)),
        ]);
        let at = "2026-11-26T10:00:00Z".parse().unwrap();
        let dl = for_dead_letter(&original, "notify", 4, "line one\nline two", at);
        assert_eq!(dl.message_id().as_ref().unwrap().as_str(), "m1");
        assert_eq!(dl.correlation_id().as_ref().unwrap().as_str(), "c1");
        assert_eq!(str_header(&dl, "trace").as_deref(), Some("abc"));
        assert_eq!(str_header(&dl, ERROR).as_deref(), Some("line one line two"));
        assert_eq!(str_header(&dl, STAGE).as_deref(), Some("notify"));
        assert_eq!(
            str_header(&dl, FAILED_AT).as_deref(),
            Some("2026-11-26T10:00:00Z")
        );
        assert_eq!(int_header(&dl, ATTEMPTS), Some(4));
        assert!(str_header(&dl, "x-death").is_none());
    }

    #[test]
    fn a_per_message_ttl_and_user_id_are_not_carried_over() {
        let original = BasicProperties::default()
            .with_expiration("5000".into())
            .with_user_id("alice".into())
            .with_app_id("upstream".into())
            .with_priority(3);
        let at = "2026-11-26T10:00:00Z".parse().unwrap();
        for p in [
            for_retry(&original, 1, 0),
            for_dead_letter(&original, "notify", 1, "x", at),
            for_replay(&original, at),
        ] {
            assert!(p.expiration().is_none() && p.user_id().is_none());
            assert_eq!(p.app_id().as_ref().unwrap().as_str(), "upstream");
            assert_eq!(p.priority(), &Some(3));
            assert_eq!(p.delivery_mode(), &Some(2));
        }
    }

    #[test]
    fn errors_are_capped() {
        let long = "é".repeat(2000);
        assert_eq!(
            one_line(&long, MAX_ERROR_CHARS).chars().count(),
            MAX_ERROR_CHARS
        );
    }

    #[test]
    fn retry_counts_attempts_and_waits_apart_and_replay_resets_them() {
        let at = "2026-11-26T10:00:00Z".parse().unwrap();
        let p = for_retry(&BasicProperties::default(), 2, 7);
        assert_eq!(attempts_done(&p), 2);
        assert_eq!(waits_done(&p), 7);
        assert!(!is_replay(&p));
        let replayed = for_replay(&p, at);
        assert_eq!(attempts_done(&replayed), 0);
        assert_eq!(waits_done(&replayed), 0);
        assert!(is_replay(&replayed));
        // The replay mark lasts through the retries of the replayed message.
        assert!(is_replay(&for_retry(&replayed, 1, 0)));
        assert_eq!(attempts_done(&BasicProperties::default()), 0);
    }
}
