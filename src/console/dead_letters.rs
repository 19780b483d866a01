//! Dead letters as the console shows them, read and moved with the same code as
//! `labbook dlq` ([`crate::ops::dlq`]).

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use lapin::types::AMQPValue;
use serde::{Deserialize, Serialize};

use super::broker::BrokerLink;
use crate::broker::StageQueue;
use crate::broker::dlq::{self, DeadLetter};
use crate::ops::dlq::{Selection, age, fingerprint, would_replay};

/// The most of a body a page or answer shows.
const MAX_BODY_SHOWN: usize = 16 * 1024;

/// One dead letter, as a table row.
#[derive(Debug, Clone, Serialize)]
pub struct LetterRow {
    /// Its [`fingerprint`]: the same in every listing while it stays.
    pub id: String,
    /// The dead-letter queue it is in, e.g. `provision-due.dlq`.
    pub queue: String,
    /// The stage queue a replay sends it to.
    pub stage: String,
    pub booking_id: Option<String>,
    pub error: String,
    pub attempts: Option<i64>,
    pub failed_at: Option<String>,
    pub age: Option<String>,
    #[serde(skip)]
    pub failed_at_time: Option<DateTime<Utc>>,
}

impl LetterRow {
    fn new(stage: StageQueue, l: &DeadLetter) -> Self {
        Self {
            id: fingerprint(l),
            queue: stage.dlq(),
            stage: stage.name().to_owned(),
            booking_id: l.booking_id.clone(),
            error: l
                .error
                .clone()
                .unwrap_or_else(|| "(no reason recorded)".into()),
            attempts: l.attempts,
            failed_at: l.failed_at.map(crate::format_time),
            age: l.failed_at.map(age),
            failed_at_time: l.failed_at,
        }
    }

    pub fn attempts_text(&self) -> String {
        self.attempts.map_or("unknown".into(), |a| a.to_string())
    }
}

/// One header of a dead letter: its value as a value (`4`, not `LongLongInt(4)`) and, for the
/// headers labbook or the broker set, what it means.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub name: String,
    pub value: String,
    pub meaning: Option<&'static str>,
}

/// What the headers a dead letter carries mean. `x-labbook-attempts` and `x-delivery-count`
/// count different things and are told apart here.
fn meaning(name: &str) -> Option<&'static str> {
    Some(match name {
        "x-labbook-attempts" => {
            "labbook's own count: how many times a stage tried the work (each retry goes through a delay queue and counts one)"
        }
        "x-delivery-count" => {
            "the broker's count: how many times it handed this copy to a worker that did not acknowledge it (a worker stopped or lost its connection); labbook's retries do not raise it"
        }
        "x-labbook-error" => "why labbook gave up on it",
        "x-labbook-stage" => "the stage that gave up",
        "x-labbook-failed-at" => "when it was dead-lettered (UTC)",
        "x-labbook-waits" => {
            "times it waited for a dependency that was down (these never spend attempts)"
        }
        "x-labbook-replayed-at" => "when an operator last replayed it",
        "x-labbook-failed-in" => {
            "the span of the handling that gave up (W3C Trace Context): its replay links to it"
        }
        "traceparent" => "the booking's trace (W3C Trace Context)",
        "x-death" => "the broker's record of each time the message was dead-lettered or expired",
        "x-first-death-queue" | "x-last-death-queue" => "the queue it was dead-lettered from",
        "x-first-death-reason" | "x-last-death-reason" => {
            "the broker's reason (rejected: labbook sent it here; expired: a delay ended)"
        }
        "x-first-death-exchange" | "x-last-death-exchange" => {
            "the exchange it had been published to"
        }
        _ => return None,
    })
}

/// An AMQP header value as an operator reads it.
pub fn header_value(value: &AMQPValue) -> String {
    match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::DecimalValue(d) => format!("{}e-{}", d.value, d.scale),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ByteArray(b) => format!("({} bytes)", b.as_slice().len()),
        AMQPValue::Timestamp(t) => {
            DateTime::from_timestamp(*t as i64, 0).map_or_else(|| t.to_string(), crate::format_time)
        }
        AMQPValue::FieldArray(a) => {
            let items: Vec<String> = a.as_slice().iter().map(header_value).collect();
            format!("[{}]", items.join(", "))
        }
        AMQPValue::FieldTable(t) => {
            let fields: Vec<String> = t
                .inner()
                .iter()
                .map(|(k, v)| format!("{}: {}", k.as_str(), header_value(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        AMQPValue::Void => String::new(),
    }
}

/// One dead letter in full: its row, properties, headers and body.
#[derive(Debug, Clone, Serialize)]
pub struct LetterDetail {
    #[serde(flatten)]
    pub row: LetterRow,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: Vec<Header>,
    /// The body as text (invalid UTF-8 replaced), at most 16 KiB of it.
    pub body: String,
    pub body_truncated: bool,
}

impl LetterDetail {
    fn new(stage: StageQueue, l: &DeadLetter) -> Self {
        let p = &l.properties;
        let text = |s: Option<&lapin::types::ShortString>| s.map(|s| s.as_str().to_owned());
        let headers = p
            .headers()
            .as_ref()
            .map(|h| {
                h.into_iter()
                    .map(|(k, v)| Header {
                        name: k.as_str().to_owned(),
                        value: header_value(v),
                        meaning: meaning(k.as_str()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let body = String::from_utf8_lossy(&l.body);
        Self {
            row: LetterRow::new(stage, l),
            content_type: text(p.content_type().as_ref()),
            message_id: text(p.message_id().as_ref()),
            correlation_id: text(p.correlation_id().as_ref()),
            headers,
            body: body.chars().take(MAX_BODY_SHOWN).collect(),
            body_truncated: body.len() > MAX_BODY_SHOWN,
        }
    }
}

/// A dead-letter queue and how many it holds.
#[derive(Debug, Clone, Serialize)]
pub struct QueueCount {
    pub stage: String,
    pub queue: String,
    pub dead_letters: u32,
}

/// Every stage's dead-letter queue with its count (no message is touched).
pub async fn counts(link: &BrokerLink) -> anyhow::Result<Vec<QueueCount>> {
    let mut out = Vec::new();
    for stage in StageQueue::ALL {
        out.push(QueueCount {
            stage: stage.name().to_owned(),
            queue: stage.dlq(),
            dead_letters: link.stats(&stage.dlq()).await?.messages,
        });
    }
    Ok(out)
}

/// The dead letters of `stage` that `selection` takes, and how many the queue holds in all.
pub async fn list(
    link: &BrokerLink,
    stage: StageQueue,
    selection: &Selection,
) -> anyhow::Result<(Vec<LetterRow>, usize)> {
    let conn = link.connection().await?;
    let letters = dlq::read_all(&conn, stage).await?;
    let rows = letters
        .iter()
        .filter(|l| selection.matches(l))
        .map(|l| LetterRow::new(stage, l))
        .collect();
    Ok((rows, letters.len()))
}

/// One dead letter of `stage` by its id.
pub async fn find(
    link: &BrokerLink,
    stage: StageQueue,
    id: &str,
) -> anyhow::Result<Option<LetterDetail>> {
    let conn = link.connection().await?;
    let letters = dlq::read_all(&conn, stage).await?;
    Ok(letters
        .iter()
        .find(|l| fingerprint(l) == id)
        .map(|l| LetterDetail::new(stage, l)))
}

/// Every dead letter, of every stage, that names `booking_id`.
pub async fn for_booking(link: &BrokerLink, booking_id: &str) -> anyhow::Result<Vec<LetterRow>> {
    let selection = Selection::booking(Some(booking_id));
    let mut rows = Vec::new();
    for stage in StageQueue::ALL {
        rows.extend(list(link, stage, &selection).await?.0);
    }
    Ok(rows)
}

/// The dry run: what a replay of `selection` would move now.
pub async fn preview(
    link: &BrokerLink,
    stage: StageQueue,
    selection: &Selection,
) -> anyhow::Result<Vec<LetterRow>> {
    let conn = link.connection().await?;
    let letters = dlq::read_all(&conn, stage).await?;
    Ok(would_replay(&letters, selection)
        .into_iter()
        .map(|l| LetterRow::new(stage, l))
        .collect())
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub replayed: usize,
    /// Dead letters left in the queue.
    pub left: usize,
    /// The stage queue they went back to.
    pub to: String,
}

/// Replays the selected dead letters, each confirmed in its stage queue before it leaves
/// the dead-letter queue.
pub async fn replay(
    link: &BrokerLink,
    stage: StageQueue,
    selection: &Selection,
) -> anyhow::Result<Replayed> {
    let conn = link.connection().await?;
    let report =
        crate::ops::dlq::replay(&conn, stage, selection, |_| ControlFlow::Continue(())).await?;
    tracing::info!(
        queue = %stage.dlq(),
        replayed = report.replayed,
        left = report.skipped,
        filter = ?selection,
        "console: dead letters replayed"
    );
    Ok(Replayed {
        replayed: report.replayed,
        left: report.skipped,
        to: stage.name().to_owned(),
    })
}

/// Deletes the selected dead letters.
pub async fn purge(
    link: &BrokerLink,
    stage: StageQueue,
    selection: &Selection,
) -> anyhow::Result<usize> {
    let conn = link.connection().await?;
    let removed = crate::ops::dlq::purge(&conn, stage, selection).await?;
    tracing::info!(queue = %stage.dlq(), removed, filter = ?selection, "console: dead letters purged");
    Ok(removed)
}

/// A selection as pages and the API send it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SelectionInput {
    /// Only this booking's dead letters.
    #[serde(default)]
    pub booking_id: Option<String>,
    /// Only those whose error contains this text (ignoring case).
    #[serde(default)]
    pub error: Option<String>,
    /// Only these dead letters (their ids); from pages, one `id` field per ticked row.
    #[serde(default, alias = "id")]
    pub ids: Vec<String>,
    /// At most this many (replay).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl SelectionInput {
    /// Checks the input; the error says what is wrong.
    pub fn selection(&self) -> Result<Selection, String> {
        let text = super::bookings::trimmed;
        let booking_id = text(&self.booking_id).map(str::to_owned);
        if booking_id.as_ref().is_some_and(|b| b.chars().count() > 64) {
            return Err("booking_id is at most 64 characters".into());
        }
        let error_contains = text(&self.error).map(str::to_owned);
        if error_contains
            .as_ref()
            .is_some_and(|e| e.chars().count() > 500)
        {
            return Err("error is at most 500 characters".into());
        }
        let valid_id = |id: &String| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(bad) = self.ids.iter().find(|id| !valid_id(id)) {
            return Err(format!("{bad:?} is not a dead letter id (16 hex digits)"));
        }
        if self.limit == Some(0) {
            return Err("limit must be at least 1".into());
        }
        let ids: BTreeSet<String> = self.ids.iter().map(|s| s.to_ascii_lowercase()).collect();
        Ok(Selection {
            booking_id,
            error_contains,
            ids: (!ids.is_empty()).then_some(ids),
            limit: self.limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, FieldTable, LongString};

    #[test]
    fn header_values_read_as_values() {
        assert_eq!(header_value(&AMQPValue::LongLongInt(4)), "4");
        assert_eq!(
            header_value(&AMQPValue::LongString(LongString::from("x"))),
            "x"
        );
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("queue".into(), AMQPValue::LongString("notify".into()));
        let deaths = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)]));
        assert_eq!(header_value(&deaths), "[{count: 1, queue: notify}]");
        assert_eq!(
            header_value(&AMQPValue::Timestamp(0)),
            "1970-01-01T00:00:00Z"
        );
        assert!(meaning("x-delivery-count").unwrap().contains("broker"));
        assert!(meaning("x-labbook-attempts").unwrap().contains("labbook"));
    }
}
