//! The consumer runtime every stage runs on.
//!
//! For each delivery: decode, call the stage's step function inside a span, then
//! - success: publish the follow-up messages (confirmed), then ack;
//! - transient error: publish a copy to the next delay tier with the attempt count, then ack;
//! - permanent error, or attempts used up: let the stage clean up ([`Stage::give_up`]), publish
//!   the message to `<queue>.dlq` with the `x-labbook-*` headers, then ack.
//!
//! Nothing is acked before what replaces it is confirmed by the broker, so a crash at any point
//! leaves the message in its queue to be delivered again; stages are idempotent for that reason.
//! The connection is re-made with capped backoff when it drops; SIGTERM stops consuming and
//! drains what is in flight.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field};

use super::headers;
use super::publisher::{json_properties, publish_confirmed};
use super::topology::{EXCHANGE, StageQueue, Topology};
use crate::config::BrokerSettings;
use crate::health::ReadyFlag;
use crate::stages::StageError;

/// A delivery redelivered this many times without an outcome (the worker died on it each
/// time) is dead-lettered instead of being tried again.
const MAX_REDELIVERIES: i64 = 10;

/// A message as a stage sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// 1 for the first delivery, 2 for the first retry, ...
    pub attempt: u32,
}

impl Incoming {
    pub fn new(body: Vec<u8>, properties: BasicProperties) -> Self {
        let attempt = headers::attempts_done(&properties) + 1;
        Self {
            body,
            properties,
            attempt,
        }
    }

    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(|s| s.as_str())
    }

    /// Decodes one of labbook's own JSON messages; a body that does not decode is permanent.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| StageError::Permanent(format!("the message body does not decode: {e}")))
    }
}

/// A message a stage asks to publish once its work is done.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub queue: StageQueue,
    pub message_id: String,
    pub body: Vec<u8>,
}

impl Outgoing {
    pub fn json<T: Serialize>(queue: StageQueue, message_id: impl Into<String>, body: &T) -> Self {
        Self {
            queue,
            message_id: message_id.into(),
            body: serde_json::to_vec(body).expect("labbook's messages serialize"),
        }
    }

    /// Publishes to the `labbook` exchange with the stage queue's name as the routing key.
    pub async fn publish(&self, channel: &Channel) -> Result<(), super::PublishError> {
        publish_confirmed(
            channel,
            EXCHANGE,
            self.queue.name(),
            &self.body,
            json_properties(&self.message_id),
        )
        .await
    }
}

/// One stage of the pipeline: a step function over the messages of one queue.
pub trait Stage: Send + Sync + 'static {
    /// The queue this stage consumes.
    fn queue(&self) -> StageQueue;

    /// Does the stage's work for one message and returns what to publish next.
    /// Must be idempotent: the same message may come again.
    fn handle(
        &self,
        msg: &Incoming,
    ) -> impl Future<Output = Result<Vec<Outgoing>, StageError>> + Send;

    /// Whether transient failures retry without limit (at the last tier) instead of ending in
    /// the dead-letter queue: for work that must happen eventually, like terminating machines.
    fn retries_forever(&self) -> bool {
        false
    }

    /// Called once when a message is about to be dead-lettered: the stage may record the
    /// failure and return messages to publish (e.g. a failure notification).
    fn give_up(
        &self,
        _msg: &Incoming,
        _reason: &str,
    ) -> impl Future<Output = Result<Vec<Outgoing>, StageError>> + Send {
        async { Ok(Vec::new()) }
    }
}

/// Runs `stage` until `shutdown` fires, reconnecting whenever the broker goes away.
pub async fn run_stage<S: Stage>(
    stage: Arc<S>,
    settings: BrokerSettings,
    ready: ReadyFlag,
    shutdown: CancellationToken,
) {
    let topology = Topology::new(settings.retry_delays.clone());
    let queue = stage.queue();
    let mut delays = super::reconnect_delays();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let ended = session(&stage, &settings, &topology, &ready, &shutdown).await;
        ready.set(false);
        match ended {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::Lost { was_consuming }) => {
                if was_consuming {
                    delays = super::reconnect_delays();
                }
                tracing::warn!(%queue, "lost the broker connection; reconnecting");
            }
            Err(err) => tracing::warn!(%queue, error = %err, "broker session failed; reconnecting"),
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

enum SessionEnd {
    Shutdown,
    Lost { was_consuming: bool },
}

struct Ctx<S> {
    stage: Arc<S>,
    channel: Channel,
    topology: Topology,
    max_attempts: u32,
    /// Fired when an outcome could not be published: the session starts over on a new
    /// connection, which returns the unacknowledged message to its queue and declares the
    /// topology again.
    reset: CancellationToken,
}

async fn session<S: Stage>(
    stage: &Arc<S>,
    settings: &BrokerSettings,
    topology: &Topology,
    ready: &ReadyFlag,
    shutdown: &CancellationToken,
) -> lapin::Result<SessionEnd> {
    let queue = stage.queue();
    let name = format!("labbook {queue}");
    let conn = tokio::select! {
        _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        conn = super::connect(&settings.amqp_url, &name) => conn?,
    };
    let channel = conn.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("labbook-{queue}-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            queue.name().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(%queue, prefetch = settings.prefetch, "consuming");
    ready.set(true);

    let ctx = Arc::new(Ctx {
        stage: stage.clone(),
        channel: channel.clone(),
        topology: topology.clone(),
        max_attempts: settings.max_attempts,
        reset: CancellationToken::new(),
    });
    let mut inflight = JoinSet::new();
    let lost = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break false,
            _ = ctx.reset.cancelled() => break true,
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    inflight.spawn(async move { process(&ctx, delivery).await });
                }
                Some(Err(err)) => {
                    tracing::warn!(%queue, error = %err, "consumer stream failed");
                    break true;
                }
                None => break true,
            },
        }
    };

    if lost {
        tracing::warn!(%queue, in_flight = inflight.len(), "connection lost or reset; letting the messages in flight finish");
    } else {
        tracing::info!(%queue, in_flight = inflight.len(), "shutting down: no new messages; finishing those in flight");
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    // Handlers run to the end even when their acknowledgement can no longer reach the broker:
    // an effect recorded (an email logged as sent) is not repeated when the message comes again.
    let drained = tokio::time::timeout(settings.shutdown_timeout, async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(%queue, left = inflight.len(), "timeout: messages still in flight go back to the queue");
        inflight.abort_all();
    }
    let _ = channel.close(200, "labbook: closing".into()).await;
    let _ = conn.close(200, "labbook: closing".into()).await;
    if lost {
        // After a failed publish, keep backing off: the cause may persist.
        Ok(SessionEnd::Lost {
            was_consuming: !ctx.reset.is_cancelled(),
        })
    } else {
        Ok(SessionEnd::Shutdown)
    }
}

async fn process<S: Stage>(ctx: &Ctx<S>, delivery: lapin::message::Delivery) {
    let queue = ctx.stage.queue();
    let msg = Incoming::new(delivery.data, delivery.properties);
    let span = tracing::info_span!(
        "message",
        stage = %queue,
        booking_id = field::Empty,
        attempt = msg.attempt,
        message_id = msg.properties.message_id().as_ref().map(|s| s.as_str()).unwrap_or(""),
    );
    if let Some(id) = peek_booking_id(&msg.body) {
        span.record("booking_id", id.as_str());
    }
    let acker = delivery.acker;
    async move {
        let started = Instant::now();
        let outcome = decide(ctx, &msg).await;
        let label = outcome.label();
        let result = match outcome {
            Outcome::Done(outs) => publish_all(&ctx.channel, &outs).await,
            Outcome::Retry { delay, queue_name, reason } => {
                tracing::warn!(error = %reason, retry_in_ms = delay.as_millis() as u64, "transient failure; will retry");
                let props = headers::for_retry(&msg.properties, msg.attempt);
                publish_confirmed(&ctx.channel, "", &queue_name, &msg.body, props).await
            }
            Outcome::DeadLetter { reason, follow_up } => {
                tracing::error!(error = %reason, "giving up; dead-lettering the message");
                match publish_all(&ctx.channel, &follow_up).await {
                    Ok(()) => {
                        let props = headers::for_dead_letter(&msg.properties, queue.name(), msg.attempt, &reason, chrono::Utc::now());
                        publish_confirmed(&ctx.channel, "", &queue.dlq(), &msg.body, props).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        metrics::histogram!("labbook_handler_seconds", "stage" => queue.name()).record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                metrics::counter!("labbook_messages_total", "stage" => queue.name(), "outcome" => label).increment(1);
                if let Err(err) = acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %err, "ack failed; the message will come again");
                } else {
                    tracing::info!(outcome = label, elapsed_ms = started.elapsed().as_millis() as u64, "handled");
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "could not publish the outcome; the message goes back to its queue");
                ctx.reset.cancel();
            }
        }
    }
    .instrument(span)
    .await
}

enum Outcome {
    Done(Vec<Outgoing>),
    Retry {
        delay: Duration,
        queue_name: String,
        reason: String,
    },
    DeadLetter {
        reason: String,
        follow_up: Vec<Outgoing>,
    },
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::Retry { .. } => "retried",
            Outcome::DeadLetter { .. } => "dead_lettered",
        }
    }
}

async fn decide<S: Stage>(ctx: &Ctx<S>, msg: &Incoming) -> Outcome {
    let queue = ctx.stage.queue();
    let redeliveries = headers::int_header(&msg.properties, "x-delivery-count").unwrap_or(0);
    let result = if redeliveries >= MAX_REDELIVERIES {
        Err(StageError::Permanent(format!(
            "delivered {redeliveries} times without an outcome: the worker may be crashing on this message"
        )))
    } else {
        AssertUnwindSafe(ctx.stage.handle(msg))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                Err(StageError::Transient(anyhow::anyhow!(
                    "the {queue} handler panicked"
                )))
            })
    };
    let reason = match result {
        Ok(outs) => return Outcome::Done(outs),
        Err(StageError::Unavailable(err)) => {
            // A dependency is down: wait for it without spending the message's attempts.
            let (delay, queue_name) = ctx.topology.delay_for(queue, msg.attempt);
            return Outcome::Retry {
                delay,
                queue_name,
                reason: format!("{err:#}"),
            };
        }
        Err(StageError::Transient(err))
            if msg.attempt < ctx.max_attempts || ctx.stage.retries_forever() =>
        {
            let (delay, queue_name) = ctx.topology.delay_for(queue, msg.attempt);
            return Outcome::Retry {
                delay,
                queue_name,
                reason: format!("{err:#}"),
            };
        }
        Err(StageError::Transient(err)) => {
            format!("still failing after {} attempts: {err:#}", msg.attempt)
        }
        Err(StageError::Permanent(reason)) => reason,
    };
    match ctx.stage.give_up(msg, &reason).await {
        Ok(follow_up) => Outcome::DeadLetter { reason, follow_up },
        Err(err) => {
            // The clean-up itself failed (e.g. the database is away): try the whole thing again
            // later rather than dead-letter a booking whose failure was not recorded.
            let (delay, queue_name) = ctx.topology.delay_for(queue, u32::MAX);
            Outcome::Retry {
                delay,
                queue_name,
                reason: format!("could not record the failure ({err}); original failure: {reason}"),
            }
        }
    }
}

async fn publish_all(channel: &Channel, outs: &[Outgoing]) -> Result<(), super::PublishError> {
    for out in outs {
        out.publish(channel).await?;
    }
    Ok(())
}

/// The `booking_id` of a JSON body, if it has a plausible one: for the span only.
fn peek_booking_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        booking_id: Option<String>,
    }
    let id = serde_json::from_slice::<Peek>(body).ok()?.booking_id?;
    crate::domain::BookingId::parse(&id)
        .ok()
        .map(|id| id.as_str().to_owned())
}
