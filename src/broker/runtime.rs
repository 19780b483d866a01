//! The consumer runtime every stage runs on.
//!
//! For each delivery: check its size, decode it into the stage's message type (a body that
//! does not decode is permanent), call the stage's step function inside a span that names the
//! booking, then
//! - success: publish the follow-up messages (confirmed), then ack;
//! - transient error: publish a copy to the next delay tier with the attempt count, then ack;
//! - a dependency down ([`StageError::Unavailable`]): the same, counting a wait instead of an
//!   attempt, so an outage never uses up the attempts a message has for real failures;
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
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::connection::{reconnect_delays, retry_until_cancelled};
use super::error::StageError;
use super::headers;
use super::publisher::{publish_confirmed, publish_event_confirmed};
use super::topology::{EVENTS_EXCHANGE, EXCHANGE, StageQueue, Topology};
use super::trace::{self, TraceContext};
use crate::config::BrokerSettings;
use crate::health::ReadyFlag;

/// A delivery redelivered this many times without an outcome (the worker died on it each
/// time) is dead-lettered instead of being tried again.
const MAX_REDELIVERIES: i64 = 10;

/// The largest body any stage accepts (docs/contract.md §3: a booking is at most 64 KiB).
/// Checked before anything reads the body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A delivery as the runtime received it: what a stage may want besides the decoded message.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// 1 for the first delivery, 2 for the first retry, ...; waits for a dependency that was
    /// down do not count.
    pub attempt: u32,
    /// Times this message already waited for a dependency that was down.
    pub waits: u32,
}

impl Incoming {
    pub fn new(body: Vec<u8>, properties: BasicProperties) -> Self {
        Self {
            attempt: headers::attempts_done(&properties).saturating_add(1),
            waits: headers::waits_done(&properties),
            body,
            properties,
        }
    }

    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(|s| s.as_str())
    }

    /// Whether `labbook dlq replay` put this message back (the operator asks for the work
    /// again, even where it had failed for good).
    pub fn is_replay(&self) -> bool {
        headers::is_replay(&self.properties)
    }

    /// When `labbook dlq replay` put this message back, if it did.
    pub fn replayed_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        headers::replayed_at(&self.properties)
    }

    /// Decodes one of labbook's own JSON messages; a body that does not decode is permanent.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Undecodable> {
        serde_json::from_slice(&self.body).map_err(|e| Undecodable {
            reason: format!("the message body does not decode: {e}"),
            subject: None,
        })
    }
}

/// A body a stage cannot take: dead-lettered at once with `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    pub reason: String,
    /// The booking the body names, when it could be read despite the rest.
    pub subject: Option<String>,
}

/// What a decoded message is about: the span of its handling records it as `booking_id`.
pub trait Subject {
    fn subject(&self) -> &str;
}

/// Where an [`Outgoing`] message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A stage queue, through the `labbook` exchange.
    Stage(StageQueue),
    /// The `labbook.events` topic exchange, with this routing key (`booking.<event>`).
    Event(String),
}

/// A message a stage asks to publish once its work is done.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub route: Route,
    pub message_id: String,
    pub body: Vec<u8>,
    /// The trace it continues when published outside a delivery (the timer, the boot watch):
    /// its booking's. `None`: the trace of the delivery being handled.
    pub trace: Option<TraceContext>,
}

impl Outgoing {
    pub fn json<T: Serialize>(queue: StageQueue, message_id: impl Into<String>, body: &T) -> Self {
        Self {
            route: Route::Stage(queue),
            message_id: message_id.into(),
            body: serde_json::to_vec(body).expect("labbook's messages serialize"),
            trace: None,
        }
    }

    /// The same message, continuing the trace `traceparent` names (a booking's stored one).
    pub fn traced(mut self, traceparent: Option<&str>) -> Self {
        self.trace = traceparent.and_then(|tp| TraceContext::parse(tp, None));
        self
    }

    /// An event for the upstream (docs/contract.md §7).
    pub fn event(routing_key: String, message_id: String, body: Vec<u8>) -> Self {
        Self {
            route: Route::Event(routing_key),
            message_id,
            body,
            trace: None,
        }
    }

    /// The stage queue this message goes to, if it goes to one.
    pub fn queue(&self) -> Option<StageQueue> {
        match self.route {
            Route::Stage(q) => Some(q),
            Route::Event(_) => None,
        }
    }

    /// Publishes to the `labbook` exchange with the stage queue's name as the routing key (or
    /// to `labbook.events`), waiting at most `timeout` for the confirm.
    pub async fn publish(
        &self,
        channel: &Channel,
        timeout: Duration,
    ) -> Result<(), super::PublishError> {
        let route = match &self.route {
            Route::Stage(queue) => (EXCHANGE, queue.name()),
            Route::Event(key) => (EVENTS_EXCHANGE, key.as_str()),
        };
        let span = trace::producer_span(route.0, route.1, &self.message_id, self.trace.as_ref());
        let publishing = async {
            let props = trace::stamp_published(
                super::publisher::unstamped_properties(&self.message_id),
                self.trace.as_ref(),
            );
            match &self.route {
                Route::Stage(_) => {
                    publish_confirmed(channel, route, &self.body, props, timeout).await
                }
                Route::Event(_) => {
                    publish_event_confirmed(channel, route, &self.body, props, timeout).await
                }
            }
        };
        publishing.instrument(span).await
    }
}

/// One stage of the pipeline: a step function over the typed messages of one queue.
pub trait Stage: Send + Sync + 'static {
    /// The queue this stage consumes.
    const QUEUE: StageQueue;

    /// What a body of [`Stage::QUEUE`] decodes into.
    type Message: Subject + Send + Sync + 'static;

    /// Decodes a delivery; the runtime calls it once, and dead-letters what does not decode.
    fn decode(&self, delivery: &Incoming) -> Result<Self::Message, Undecodable>;

    /// Does the stage's work for one message and returns what to publish next.
    /// Must be idempotent: the same message may come again.
    fn handle(
        &self,
        msg: &Self::Message,
        delivery: &Incoming,
    ) -> impl Future<Output = Result<Vec<Outgoing>, StageError>> + Send;

    /// Whether transient failures retry without limit (at the last tier) instead of ending in
    /// the dead-letter queue: for work that must happen eventually, like terminating machines.
    fn retries_forever(&self) -> bool {
        false
    }

    /// Called for every message about to be dead-lettered, decoded or not (`subject` is the
    /// booking it names, when that could be read): the stage may return messages to publish
    /// first (e.g. a `rejected` event).
    fn dead_lettered(
        &self,
        _delivery: &Incoming,
        _subject: Option<&str>,
        _reason: &str,
    ) -> impl Future<Output = Result<Vec<Outgoing>, StageError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Called once when a decoded message is about to be dead-lettered: the stage may record
    /// the failure and return messages to publish (e.g. a failure notification).
    fn give_up(
        &self,
        _msg: &Self::Message,
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
    let topology = Topology::from_settings(&settings);
    let queue = S::QUEUE;
    register_metrics(queue);
    let name = format!("labbook {queue}");
    // Backoff between sessions whose outcome could not be published: the cause may persist.
    let mut after_reset = reconnect_delays();
    let unpublished = Unpublished::default();
    loop {
        let setup = retry_until_cancelled("cannot start consuming", &shutdown, || {
            open_consumer::<S>(&settings, &topology, &name)
        });
        let Some((conn, channel, consumer)) = setup.await else {
            return;
        };
        tracing::info!(%queue, prefetch = settings.prefetch, "consuming");
        ready.set(true);
        let ctx = Arc::new(Ctx {
            stage: stage.clone(),
            channel,
            topology: topology.clone(),
            max_attempts: settings.max_attempts,
            publish_timeout: settings.publish_timeout,
            reset: CancellationToken::new(),
            unpublished: unpublished.clone(),
        });
        let end = consume(&ctx, consumer, &settings, &shutdown).await;
        ready.set(false);
        let _ = ctx.channel.close(200, "labbook: closing".into()).await;
        let _ = conn.close(200, "labbook: closing".into()).await;
        match end {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost => {
                after_reset = reconnect_delays();
                tracing::warn!(%queue, "lost the broker connection; reconnecting");
            }
            SessionEnd::Reset => {
                let delay = after_reset.next().unwrap_or(Duration::from_secs(30));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Handles the messages in the stage's queue one at a time, exactly as [`run_stage`] would,
/// until the queue is empty; returns how many were handled. For tests that show "nothing
/// else happened" by draining a queue instead of waiting, and for one-off runs.
pub async fn run_until_empty<S: Stage>(
    stage: Arc<S>,
    settings: &BrokerSettings,
) -> lapin::Result<usize> {
    let topology = Topology::from_settings(settings);
    let name = format!("labbook {} (until empty)", S::QUEUE);
    let conn = super::connect(settings.amqp_url.expose_secret(), &name).await?;
    let channel = super::confirmed_channel(&conn, &topology).await?;
    let ctx = Ctx {
        stage,
        channel: channel.clone(),
        topology,
        max_attempts: settings.max_attempts,
        publish_timeout: settings.publish_timeout,
        reset: CancellationToken::new(),
        unpublished: Unpublished::default(),
    };
    let mut handled = 0;
    let get = BasicGetOptions { no_ack: false };
    while let Some(msg) = channel.basic_get(S::QUEUE.name().into(), get).await? {
        process(&ctx, msg.delivery).await;
        handled += 1;
        if ctx.reset.is_cancelled() {
            break;
        }
    }
    let _ = channel.close(200, "labbook: queue empty".into()).await;
    let _ = conn.close(200, "labbook: queue empty".into()).await;
    Ok(handled)
}

/// Names the stage's series at 0 before any message, so dashboards and `absent()` alerts see
/// them from start-up.
fn register_metrics(queue: StageQueue) {
    metrics::describe_counter!(
        "labbook_messages_total",
        "Messages handled, by stage and outcome"
    );
    metrics::describe_histogram!("labbook_handler_seconds", "Time to handle one message");
    for outcome in Outcome::LABELS {
        metrics::counter!("labbook_messages_total", "stage" => queue.name(), "outcome" => outcome)
            .increment(0);
    }
    let _ = metrics::histogram!("labbook_handler_seconds", "stage" => queue.name());
}

/// A connection, a confirmed channel with the topology in place, and a consumer on the
/// stage's queue.
async fn open_consumer<S: Stage>(
    settings: &BrokerSettings,
    topology: &Topology,
    name: &str,
) -> lapin::Result<(Connection, Channel, lapin::Consumer)> {
    let conn = super::connect(settings.amqp_url.expose_secret(), name).await?;
    let channel = super::confirmed_channel(&conn, topology).await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            S::QUEUE.name().into(),
            consumer_tag(S::QUEUE).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((conn, channel, consumer))
}

fn consumer_tag(queue: StageQueue) -> String {
    format!("labbook-{queue}-{}", std::process::id())
}

enum SessionEnd {
    Shutdown,
    /// The connection or the consumer went away.
    Lost,
    /// An outcome could not be published; the session starts over on a new connection.
    Reset,
}

struct Ctx<S> {
    stage: Arc<S>,
    channel: Channel,
    topology: Topology,
    max_attempts: u32,
    publish_timeout: Duration,
    /// Fired when an outcome could not be published: the session starts over on a new
    /// connection, which returns the unacknowledged message to its queue and declares the
    /// topology again.
    reset: CancellationToken,
    /// Deliveries this process handled but could not publish the outcome of (kept across
    /// sessions): their redeliveries are the broker's doing, not a worker crashing on them, so
    /// they do not count towards [`MAX_REDELIVERIES`].
    unpublished: Unpublished,
}

/// Keys of deliveries whose outcome this process could not publish.
#[derive(Clone, Default)]
struct Unpublished(Arc<std::sync::Mutex<std::collections::HashSet<u64>>>);

impl Unpublished {
    fn key(msg: &Incoming) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        msg.properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
            .hash(&mut h);
        msg.body.hash(&mut h);
        h.finish()
    }

    fn mark(&self, msg: &Incoming, unpublished: bool) {
        let mut set = self.0.lock().expect("unpublished set");
        if unpublished {
            set.insert(Self::key(msg));
        } else {
            set.remove(&Self::key(msg));
        }
    }

    fn contains(&self, msg: &Incoming) -> bool {
        self.0
            .lock()
            .expect("unpublished set")
            .contains(&Self::key(msg))
    }
}

/// Handles deliveries until shutdown or a lost connection, then lets those in flight finish.
async fn consume<S: Stage>(
    ctx: &Arc<Ctx<S>>,
    mut consumer: lapin::Consumer,
    settings: &BrokerSettings,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let queue = S::QUEUE;
    let mut inflight = JoinSet::new();
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break SessionEnd::Shutdown,
            _ = ctx.reset.cancelled() => break SessionEnd::Reset,
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    inflight.spawn(async move { process(&ctx, delivery).await });
                }
                Some(Err(err)) => {
                    tracing::warn!(%queue, error = %err, "consumer stream failed");
                    break SessionEnd::Lost;
                }
                None => break SessionEnd::Lost,
            },
        }
    };
    if let SessionEnd::Shutdown = end {
        tracing::info!(%queue, in_flight = inflight.len(), "shutting down: no new messages; finishing those in flight");
        let _ = ctx
            .channel
            .basic_cancel(
                consumer_tag(queue).as_str().into(),
                BasicCancelOptions::default(),
            )
            .await;
    } else {
        tracing::warn!(%queue, in_flight = inflight.len(), "connection lost or reset; letting the messages in flight finish");
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
    end
}

async fn process<S: Stage>(ctx: &Ctx<S>, delivery: lapin::message::Delivery) {
    let queue = S::QUEUE;
    let (exchange, routing_key) = (
        delivery.exchange.to_string(),
        delivery.routing_key.to_string(),
    );
    let msg = Incoming::new(delivery.data, delivery.properties);
    let message_id = msg
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str())
        .unwrap_or("");
    let carried = TraceContext::of(&msg.properties);
    let span = tracing::info_span!(
        "message",
        otel.name = field::Empty,
        otel.kind = field::Empty,
        stage = %queue,
        booking_id = field::Empty,
        attempt = msg.attempt,
        message_id,
        trace_id = field::Empty,
    );
    if crate::telemetry::exporting() {
        // Only for the trace: the log lines keep their own fields.
        span.record("otel.name", format!("process {queue}"));
        span.record("otel.kind", "consumer");
    }
    // semconv: a consumer's destination is `{exchange}:{routing key}:{queue}`.
    let destination = format!("{exchange}:{routing_key}:{queue}");
    trace::messaging(&span, "process", destination, &routing_key, message_id);
    span.set_attribute("labbook.attempt", i64::from(msg.attempt));
    if let Some(carried) = &carried {
        let _ = span.set_parent(carried.to_otel());
        if headers::is_replay(&msg.properties) {
            // A replay continues the trace and points at the handling that dead-lettered it.
            let failed_in = headers::str_header(&msg.properties, headers::FAILED_IN)
                .and_then(|tp| TraceContext::parse(&tp, None));
            span.add_link(failed_in.as_ref().unwrap_or(carried).span_context());
            span.set_attribute("labbook.replayed", true);
        }
    }
    // The exported span, else the trace the message carries (an upstream's, or labbook's
    // own), else a new one.
    let trace = TraceContext::of_span(&span)
        .or(carried)
        .unwrap_or_else(TraceContext::new_root);
    span.record("trace_id", trace.trace_id());
    let acker = delivery.acker;
    let handling = async move {
        let started = Instant::now();
        let outcome = decide(ctx, &msg).await;
        let label = outcome.label();
        let span = tracing::Span::current();
        span.set_attribute("labbook.outcome", label);
        if let Outcome::DeadLetter { reason, .. } = &outcome {
            span.set_status(opentelemetry::trace::Status::error(reason.clone()));
        }
        let result = outcome.publish(ctx, &msg).await;
        metrics::histogram!("labbook_handler_seconds", "stage" => queue.name())
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                ctx.unpublished.mark(&msg, false);
                metrics::counter!("labbook_messages_total", "stage" => queue.name(), "outcome" => label).increment(1);
                if let Err(err) = acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %err, "ack failed; the message will come again");
                } else {
                    tracing::info!(
                        outcome = label,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "handled"
                    );
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "could not publish the outcome; the message goes back to its queue");
                ctx.unpublished.mark(&msg, true);
                ctx.reset.cancel();
            }
        }
    };
    trace.scope(handling.instrument(span)).await
}

/// What becomes of a delivery.
enum Outcome {
    Done(Vec<Outgoing>),
    /// Try again after the tier's delay, with these counts on the copy.
    Retry {
        delay: Duration,
        queue_name: String,
        attempts: u32,
        waits: u32,
        /// Waiting for a dependency, not retrying a failure.
        waiting: bool,
        reason: String,
    },
    DeadLetter {
        reason: String,
        follow_up: Vec<Outgoing>,
    },
}

impl Outcome {
    /// The label of `labbook_messages_total{outcome}`.
    pub const LABELS: [&'static str; 4] = ["done", "retried", "waiting", "dead_lettered"];

    fn label(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::Retry { waiting: true, .. } => "waiting",
            Outcome::Retry { .. } => "retried",
            Outcome::DeadLetter { .. } => "dead_lettered",
        }
    }

    /// Publishes what replaces the delivery; it may be acked once this returns `Ok`.
    async fn publish<S: Stage>(
        self,
        ctx: &Ctx<S>,
        msg: &Incoming,
    ) -> Result<(), super::PublishError> {
        match self {
            Outcome::Done(outs) => publish_all(ctx, &outs).await,
            Outcome::Retry {
                delay,
                queue_name,
                attempts,
                waits,
                reason,
                ..
            } => {
                tracing::warn!(error = %reason, retry_in_ms = delay.as_millis() as u64, attempts, waits, "not done yet; will try again");
                let props = trace::keep(headers::for_retry(&msg.properties, attempts, waits));
                let route = ("", queue_name.as_str());
                publish_confirmed(&ctx.channel, route, &msg.body, props, ctx.publish_timeout).await
            }
            Outcome::DeadLetter { reason, follow_up } => {
                tracing::error!(error = %reason, "giving up; dead-lettering the message");
                publish_all(ctx, &follow_up).await?;
                let mut props = trace::keep(headers::for_dead_letter(
                    &msg.properties,
                    S::QUEUE.name(),
                    msg.attempt,
                    &reason,
                    chrono::Utc::now(),
                ));
                if let Some(handling) = TraceContext::of_span(&tracing::Span::current()) {
                    props = headers::with_failed_in(props, &handling.traceparent());
                }
                let dlq = S::QUEUE.dlq();
                let route = ("", dlq.as_str());
                publish_confirmed(&ctx.channel, route, &msg.body, props, ctx.publish_timeout).await
            }
        }
    }
}

/// Checks, decodes and handles the delivery, and sorts the result.
async fn decide<S: Stage>(ctx: &Ctx<S>, msg: &Incoming) -> Outcome {
    let decoded = admit(ctx.stage.as_ref(), msg);
    let message = match decoded {
        Ok(m) => m,
        Err(bad) => {
            if let Some(subject) = &bad.subject {
                trace::record_booking(&tracing::Span::current(), subject);
            }
            return dead_letter(ctx, msg, bad.subject.as_deref(), bad.reason, Vec::new()).await;
        }
    };
    trace::record_booking(&tracing::Span::current(), message.subject());
    let redeliveries = headers::int_header(&msg.properties, "x-delivery-count").unwrap_or(0);
    let result = if redeliveries >= MAX_REDELIVERIES && !ctx.unpublished.contains(msg) {
        Err(StageError::Permanent(format!(
            "delivered {redeliveries} times without an outcome: the worker may be crashing on this message"
        )))
    } else {
        AssertUnwindSafe(ctx.stage.handle(&message, msg))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                Err(StageError::Transient(anyhow::anyhow!(
                    "the {} handler panicked",
                    S::QUEUE
                )))
            })
    };
    sort(ctx, msg, &message, result).await
}

/// The size check, then the stage's decoding: nothing reads a body over the limit.
fn admit<S: Stage>(stage: &S, msg: &Incoming) -> Result<S::Message, Undecodable> {
    if msg.body.len() > MAX_BODY_BYTES {
        return Err(Undecodable {
            reason: format!(
                "the message body is {} bytes; at most {MAX_BODY_BYTES} are accepted",
                msg.body.len()
            ),
            subject: None,
        });
    }
    stage.decode(msg)
}

/// Turns the stage's result into an outcome: retry, wait, or give up.
async fn sort<S: Stage>(
    ctx: &Ctx<S>,
    msg: &Incoming,
    message: &S::Message,
    result: Result<Vec<Outgoing>, StageError>,
) -> Outcome {
    let reason = match result {
        Ok(outs) => return Outcome::Done(outs),
        // A dependency is down: wait for it without spending the message's attempts.
        // The tier grows with the waits but stops at the third, so a message is tried again
        // soon after the dependency is back (teardown within a minute of the end).
        Err(StageError::Unavailable(err)) => return wait(ctx, msg, msg.waits.min(2) + 1, err),
        Err(StageError::Transient(err))
            if msg.attempt < ctx.max_attempts || ctx.stage.retries_forever() =>
        {
            let (delay, queue_name) = ctx.topology.delay_for(S::QUEUE, msg.attempt);
            return Outcome::Retry {
                delay,
                queue_name,
                attempts: msg.attempt,
                waits: msg.waits,
                waiting: false,
                reason: format!("{err:#}"),
            };
        }
        Err(StageError::Transient(err)) => {
            format!("still failing after {} attempts: {err:#}", msg.attempt)
        }
        Err(StageError::Permanent(reason)) => reason,
    };
    match ctx.stage.give_up(message, &reason).await {
        Ok(follow_up) => dead_letter(ctx, msg, Some(message.subject()), reason, follow_up).await,
        Err(err) => {
            // The clean-up itself failed (e.g. the database is away): try the whole thing again
            // later, at the longest delay, rather than dead-letter a booking whose failure was
            // not recorded.
            let err =
                anyhow::anyhow!("could not record the failure ({err}); original failure: {reason}");
            wait(ctx, msg, u32::MAX, err)
        }
    }
}

/// The dead-letter outcome, with what the stage asks to publish first. If the stage cannot say
/// (its database is away), the message waits and comes again.
async fn dead_letter<S: Stage>(
    ctx: &Ctx<S>,
    msg: &Incoming,
    subject: Option<&str>,
    reason: String,
    mut follow_up: Vec<Outgoing>,
) -> Outcome {
    match ctx.stage.dead_lettered(msg, subject, &reason).await {
        Ok(more) => {
            follow_up.extend(more);
            Outcome::DeadLetter { reason, follow_up }
        }
        Err(err) => {
            let err = anyhow::anyhow!(
                "could not record the rejection ({err}); original failure: {reason}"
            );
            wait(ctx, msg, u32::MAX, err)
        }
    }
}

/// A copy that waits in delay tier `tier` (1 = the first delay) with one more wait counted
/// and the attempts unchanged.
fn wait<S: Stage>(ctx: &Ctx<S>, msg: &Incoming, tier: u32, err: anyhow::Error) -> Outcome {
    let (delay, queue_name) = ctx.topology.delay_for(S::QUEUE, tier);
    Outcome::Retry {
        delay,
        queue_name,
        attempts: msg.attempt.saturating_sub(1),
        waits: msg.waits.saturating_add(1),
        waiting: true,
        reason: format!("{err:#}"),
    }
}

async fn publish_all<S: Stage>(ctx: &Ctx<S>, outs: &[Outgoing]) -> Result<(), super::PublishError> {
    for out in outs {
        out.publish(&ctx.channel, ctx.publish_timeout).await?;
    }
    Ok(())
}
