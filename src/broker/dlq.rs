//! Dead-letter queues for operators: read without disturbing, replay, purge.
//!
//! Reading takes every message with `basic.get` and acknowledges none: closing the channel
//! returns them all to the queue in their order. Replaying publishes a message (confirmed) to
//! its stage queue before it acknowledges it in the dead-letter queue, so a replay interrupted
//! at any point loses nothing (at worst a message is in both queues; stages are idempotent).

use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

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

/// Every message of `stage`'s dead-letter queue, in order, left in place.
pub async fn read_all(conn: &Connection, stage: StageQueue) -> lapin::Result<Vec<DeadLetter>> {
    let channel = conn.create_channel().await?;
    let mut out = Vec::new();
    while let Some(msg) = channel
        .basic_get(stage.dlq().into(), BasicGetOptions { no_ack: false })
        .await?
    {
        out.push(DeadLetter::from_delivery(
            msg.delivery.properties,
            msg.delivery.data,
        ));
    }
    // Nothing was acknowledged: closing the channel puts every message back.
    channel.close(200, "labbook dlq: read only".into()).await?;
    Ok(out)
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
    mut on_each: impl FnMut(&DeadLetter) -> ControlFlow<()>,
) -> Result<ReplayReport, DlqError> {
    // Only what is there now: a replayed message that fails again lands in the DLQ behind
    // them and waits for the next replay, instead of going round this one forever.
    let present = depth(conn, &stage.dlq()).await? as usize;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let mut report = ReplayReport::default();
    while report.replayed + report.skipped < present && limit.is_none_or(|n| report.replayed < n) {
        let Some(msg) = channel
            .basic_get(stage.dlq().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let acker = msg.delivery.acker.clone();
        let letter = DeadLetter::from_delivery(msg.delivery.properties, msg.delivery.data);
        if !letter.matches(booking_id) {
            // Left unacknowledged: it goes back when the channel closes.
            report.skipped += 1;
            continue;
        }
        let props = headers::for_replay(&letter.properties, chrono::Utc::now());
        let route = (EXCHANGE, stage.name());
        publish_confirmed(&channel, route, &letter.body, props, DEFAULT_CONFIRM_TIMEOUT).await?;
        if on_each(&letter).is_break() {
            return Ok(report);
        }
        acker.ack(BasicAckOptions::default()).await?;
        report.replayed += 1;
    }
    channel
        .close(200, "labbook dlq: replay done".into())
        .await?;
    Ok(report)
}

/// Removes the dead letters of `stage` that match `booking_id` (all of them when `None`).
pub async fn purge(
    conn: &Connection,
    stage: StageQueue,
    booking_id: Option<&str>,
) -> lapin::Result<usize> {
    let channel = conn.create_channel().await?;
    if booking_id.is_none() {
        let n = channel
            .queue_purge(stage.dlq().into(), Default::default())
            .await?;
        let _ = channel.close(200, "done".into()).await;
        return Ok(n as usize);
    }
    let mut removed = 0;
    while let Some(msg) = channel
        .basic_get(stage.dlq().into(), BasicGetOptions { no_ack: false })
        .await?
    {
        if booking_id_of(&msg.delivery.data).as_deref() == booking_id {
            msg.delivery.acker.ack(BasicAckOptions::default()).await?;
            removed += 1;
        }
    }
    channel.close(200, "labbook dlq: purge done".into()).await?;
    Ok(removed)
}
