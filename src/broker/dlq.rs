//! Dead-letter queues for operators: read without disturbing, replay, purge.
//!
//! Reading takes every message with `basic.get` and acknowledges none: closing the channel
//! returns them all to the queue in their order. On RabbitMQ 4.0–4.2 every such return counts
//! towards a quorum queue's delivery limit (20 by default), past which a message without a
//! dead-letter target is dropped; so when a message a reader holds has gone back
//! [`REFRESH_AT`] times, the reader puts every message it holds back as a fresh copy instead,
//! in the same order, each copy confirmed before its original is acknowledged (see
//! [`put_back`]). Listing any number of times loses nothing on any version, and the queues keep
//! the plain arguments an outside declaration expects.
//!
//! Replaying publishes a message (confirmed) to its stage queue before it acknowledges it in
//! the dead-letter queue, so a replay interrupted at any point loses nothing (at worst a
//! message is in both queues; stages are idempotent).

use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use super::headers;
use super::publisher::{DEFAULT_CONFIRM_TIMEOUT, publish_confirmed};
use super::topology::{EXCHANGE, StageQueue};

/// A dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Publish(#[from] super::PublishError),
}

/// One dead letter as an operator sees it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub booking_id: Option<String>,
    pub error: Option<String>,
    pub stage: Option<String>,
    pub attempts: Option<i64>,
    pub failed_at: Option<DateTime<Utc>>,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl DeadLetter {
    fn from_delivery(properties: BasicProperties, body: Vec<u8>) -> Self {
        Self {
            booking_id: booking_id_of(&body),
            error: headers::str_header(&properties, headers::ERROR),
            stage: headers::str_header(&properties, headers::STAGE),
            attempts: headers::int_header(&properties, headers::ATTEMPTS),
            failed_at: headers::str_header(&properties, headers::FAILED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
            properties,
            body,
        }
    }

    pub fn matches(&self, booking_id: Option<&str>) -> bool {
        booking_id.is_none_or(|id| self.booking_id.as_deref() == Some(id))
    }
}

fn booking_id_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        booking_id: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Peek>(body).ok()?.booking_id? {
        serde_json::Value::String(s) => Some(s.chars().take(64).collect()),
        _ => None,
    }
}

/// How many messages `queue` holds now.
pub async fn depth(conn: &Connection, queue: &str) -> lapin::Result<u32> {
    let channel = conn.create_channel().await?;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(q.message_count())
}

/// How many times a dead letter may have gone back to its queue before a reader replaces it
/// with a fresh copy: well under RabbitMQ 4.x's default delivery limit of 20.
pub const REFRESH_AT: i64 = 10;

/// A dead letter a reader holds unacknowledged.
struct Held {
    acker: Acker,
    letter: DeadLetter,
}

impl Held {
    /// Publishes the letter's body with `props` to `route`, confirmed.
    async fn publish_copy(
        &self,
        channel: &Channel,
        route: (&str, &str),
        props: BasicProperties,
    ) -> Result<(), super::PublishError> {
        let body = &self.letter.body;
        publish_confirmed(channel, route, body, props, DEFAULT_CONFIRM_TIMEOUT).await
    }

    /// How many times the broker says the message went back to its queue.
    fn returns(&self) -> i64 {
        let p = &self.letter.properties;
        let count = |name| headers::int_header(p, name).unwrap_or(0);
        count("x-delivery-count").max(count("x-acquired-count"))
    }
}

/// A channel in confirm mode for reading a dead-letter queue.
async fn reader(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The next message of `queue`, held.
async fn next(channel: &Channel, queue: &str) -> lapin::Result<Option<Held>> {
    let got = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?;
    Ok(got.map(|msg| Held {
        acker: msg.delivery.acker,
        letter: DeadLetter::from_delivery(msg.delivery.properties, msg.delivery.data),
    }))
}

/// Leaves the held messages in `queue` and closes the channel. They go back as they are when
/// the channel closes; but when one of them has gone back [`REFRESH_AT`] times, every one is
/// published again to the tail as a fresh copy (body, properties and labbook's headers kept;
/// the broker's counts reset), in order, each confirmed before its original is acknowledged:
/// a crash part-way leaves a message twice, never none. A dead letter that arrives during a
/// refresh is the only one that can end up ahead of older ones.
///
/// A quorum queue takes returned messages back asynchronously; this waits (a little) until
/// they are visible again, so the next command sees the queue as it was.
async fn put_back(
    conn: &Connection,
    channel: Channel,
    queue: &str,
    held: Vec<Held>,
) -> Result<(), DlqError> {
    if held.iter().any(|h| h.returns() >= REFRESH_AT) {
        for h in &held {
            let props = headers::for_refresh(&h.letter.properties);
            h.publish_copy(&channel, ("", queue), props).await?;
            h.acker.ack(BasicAckOptions::default()).await?;
        }
        tracing::info!(
            queue,
            refreshed = held.len(),
            "dead letters put back as fresh copies"
        );
    }
    // What is still unacknowledged goes back when the channel closes.
    channel.close(200, "labbook dlq: done".into()).await?;
    let back = held.len() as u32;
    for _ in 0..100 {
        if back == 0 || depth(conn, queue).await? >= back {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Every message of `stage`'s dead-letter queue, in order, left in place.
pub async fn read_all(conn: &Connection, stage: StageQueue) -> Result<Vec<DeadLetter>, DlqError> {
    let channel = reader(conn).await?;
    let queue = stage.dlq();
    let mut held = Vec::new();
    while let Some(h) = next(&channel, &queue).await? {
        held.push(h);
    }
    let letters = held.iter().map(|h| h.letter.clone()).collect();
    put_back(conn, channel, &queue, held).await?;
    Ok(letters)
}

/// What [`replay`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub replayed: usize,
    pub skipped: usize,
}

/// Moves the dead letters of `stage` that match `booking_id` back to the stage queue, with the
/// attempt count reset, at most `limit` of them. `on_each` is called after each publish and
/// before its acknowledgement; `Break` stops there (the message is then in both queues).
pub async fn replay(
    conn: &Connection,
    stage: StageQueue,
    booking_id: Option<&str>,
    limit: Option<usize>,
    on_each: impl FnMut(&DeadLetter) -> ControlFlow<()>,
) -> Result<ReplayReport, DlqError> {
    replay_where(conn, stage, |l| l.matches(booking_id), limit, on_each).await
}

/// [`replay`] of the dead letters `selected` accepts (the console's filters and selections).
pub async fn replay_where(
    conn: &Connection,
    stage: StageQueue,
    selected: impl Fn(&DeadLetter) -> bool,
    limit: Option<usize>,
    mut on_each: impl FnMut(&DeadLetter) -> ControlFlow<()>,
) -> Result<ReplayReport, DlqError> {
    // Only what is there now: a replayed message that fails again lands in the DLQ behind
    // them and waits for the next replay, instead of going round this one forever.
    let queue = stage.dlq();
    let present = depth(conn, &queue).await? as usize;
    let channel = reader(conn).await?;
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let mut report = ReplayReport::default();
    let mut skipped = Vec::new();
    while report.replayed + skipped.len() < present && limit.is_none_or(|n| report.replayed < n) {
        let Some(h) = next(&channel, &queue).await? else {
            break;
        };
        if !selected(&h.letter) {
            skipped.push(h);
            continue;
        }
        let props = headers::for_replay(&h.letter.properties, Utc::now());
        h.publish_copy(&channel, (EXCHANGE, stage.name()), props)
            .await?;
        if on_each(&h.letter).is_break() {
            report.skipped = skipped.len();
            return Ok(report);
        }
        h.acker.ack(BasicAckOptions::default()).await?;
        report.replayed += 1;
    }
    report.skipped = skipped.len();
    put_back(conn, channel, &queue, skipped).await?;
    Ok(report)
}

/// Removes the dead letters of `stage` that match `booking_id` (all of them when `None`).
pub async fn purge(
    conn: &Connection,
    stage: StageQueue,
    booking_id: Option<&str>,
) -> Result<usize, DlqError> {
    let queue = stage.dlq();
    let channel = reader(conn).await?;
    if booking_id.is_none() {
        let n = channel
            .queue_purge(queue.as_str().into(), Default::default())
            .await?;
        let _ = channel.close(200, "done".into()).await;
        return Ok(n as usize);
    }
    drop_where(conn, channel, &queue, |l| l.matches(booking_id)).await
}

/// Removes the dead letters of `stage` that `selected` accepts; the others stay, in order.
pub async fn purge_where(
    conn: &Connection,
    stage: StageQueue,
    selected: impl Fn(&DeadLetter) -> bool,
) -> Result<usize, DlqError> {
    let queue = stage.dlq();
    let channel = reader(conn).await?;
    drop_where(conn, channel, &queue, selected).await
}

async fn drop_where(
    conn: &Connection,
    channel: Channel,
    queue: &str,
    selected: impl Fn(&DeadLetter) -> bool,
) -> Result<usize, DlqError> {
    let (mut removed, mut kept) = (0, Vec::new());
    while let Some(h) = next(&channel, queue).await? {
        if selected(&h.letter) {
            h.acker.ack(BasicAckOptions::default()).await?;
            removed += 1;
        } else {
            kept.push(h);
        }
    }
    put_back(conn, channel, queue, kept).await?;
    Ok(removed)
}
