//! W3C trace context on every message labbook publishes (docs/contract.md §2, version 3): a
//! `traceparent` header (and `tracestate` when there is one). A booking message that arrives
//! with one continues its trace; one that arrives without starts a trace of its own. The
//! context of the message being handled is the current one while its stage works and its
//! outcome is published, so every follow-up, retry copy and dead letter carries the same trace
//! id; what is published outside a delivery (the timer, the boot watch) continues the trace the
//! booking was stored with.
//!
//! With trace export on (`OTEL_EXPORTER_OTLP_ENDPOINT`, [`crate::telemetry`]) each handling is
//! an OpenTelemetry span whose parent is the context the message carried, and what it publishes
//! names that span (or the producer span that publishes it) as its parent, so the spans of a
//! booking join into one trace. Without it the same headers are written by hand, at no cost.

use std::str::FromStr;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rand::RngCore;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A W3C trace context: the trace, the span that published the message, the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: String,
    parent_id: String,
    flags: String,
    tracestate: Option<String>,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    loop {
        rand::rng().fill_bytes(&mut buf);
        if buf.iter().any(|b| *b != 0) {
            return buf.iter().map(|b| format!("{b:02x}")).collect();
        }
    }
}

impl TraceContext {
    /// Parses a `traceparent` (version 00; an all-zero trace or parent id is invalid).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let valid = version == "00"
            && parts.next().is_none()
            && is_hex(trace_id, 32)
            && is_hex(parent_id, 16)
            && is_hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        valid.then(|| Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_owned(),
            tracestate: tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 512)
                .map(str::to_owned),
        })
    }

    /// A new trace (sampled).
    pub fn new_root() -> Self {
        Self {
            trace_id: random_hex(16),
            parent_id: random_hex(8),
            flags: "01".to_owned(),
            tracestate: None,
        }
    }

    /// The same trace, from a new span: what a message published while handling this one says.
    pub fn child(&self) -> Self {
        Self {
            parent_id: random_hex(8),
            ..self.clone()
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }

    /// The context a delivery carries, if it carries a valid one.
    pub fn of(properties: &BasicProperties) -> Option<Self> {
        let headers = properties.headers().as_ref()?;
        let text = |key: &str| match headers.inner().get(key)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        };
        Self::parse(&text(TRACEPARENT)?, text(TRACESTATE).as_deref())
    }

    /// `properties` with this context's headers, replacing any it had.
    pub fn stamp(&self, properties: BasicProperties) -> BasicProperties {
        let mut headers: FieldTable = properties.headers().clone().unwrap_or_default();
        let value = |s: String| AMQPValue::LongString(LongString::from(s));
        headers.insert(ShortString::from(TRACEPARENT), value(self.traceparent()));
        if let Some(state) = &self.tracestate {
            headers.insert(ShortString::from(TRACESTATE), value(state.clone()));
        }
        properties.with_headers(headers)
    }

    /// This context as OpenTelemetry's, a remote parent for the span that handles it.
    pub fn to_otel(&self) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(self.span_context())
    }

    /// The span this context names (the one that published the message).
    pub fn span_context(&self) -> SpanContext {
        // `parse` and `new_root` made the ids valid hex of the right length.
        let trace_id = TraceId::from_hex(&self.trace_id).unwrap_or(TraceId::INVALID);
        let span_id = SpanId::from_hex(&self.parent_id).unwrap_or(SpanId::INVALID);
        let flags = u8::from_str_radix(&self.flags, 16).unwrap_or(1);
        let state = self
            .tracestate
            .as_deref()
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state)
    }

    /// The context of `span` when it is exported (the trace export is on and its filter keeps
    /// the span); `None` otherwise.
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        Some(Self {
            trace_id: sc.trace_id().to_string(),
            parent_id: sc.span_id().to_string(),
            flags: format!("{:02x}", sc.trace_flags().to_u8()),
            tracestate: (!state.is_empty()).then_some(state),
        })
    }

    /// Runs `work` with this context current.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }
}

/// The context current in this task, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The context a message published now names: the exported span publishing it, else a child
/// of the current context.
pub fn outgoing() -> Option<TraceContext> {
    TraceContext::of_span(&tracing::Span::current()).or_else(|| current().map(|c| c.child()))
}

/// `properties` of a message published now: [`outgoing`], else a child of the delivery's own
/// context (which retry copies and dead letters keep), else a new trace.
pub fn stamp_outgoing(properties: BasicProperties) -> BasicProperties {
    let ctx = outgoing()
        .or_else(|| TraceContext::of(&properties).map(|c| c.child()))
        .unwrap_or_else(TraceContext::new_root);
    ctx.stamp(properties)
}

/// The producer span of a message published to `exchange` with `routing_key`: a child of the
/// current span, or of `stored` (a booking's trace) when it is published outside a handling (the
/// timer, the boot watch, the console, the CLI); a new trace when neither. Publish inside it
/// with properties from [`stamp_published`].
pub fn producer_span(
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    stored: Option<&TraceContext>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "publish",
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
    );
    if crate::telemetry::exporting() {
        span.record("otel.name", format!("publish {routing_key}"));
        span.record("otel.kind", "producer");
    }
    let destination = format!("{exchange}:{routing_key}");
    messaging(&span, "send", destination, routing_key, message_id);
    if let Some(stored) = stored {
        let _ = span.set_parent(stored.to_otel());
    }
    span
}

/// `properties` of a message published inside its [`producer_span`]: that span when it is
/// exported, else a child of `stored` or of the current context, else a new trace.
pub fn stamp_published(
    properties: BasicProperties,
    stored: Option<&TraceContext>,
) -> BasicProperties {
    match (stored, TraceContext::of_span(&tracing::Span::current())) {
        (Some(stored), None) => stored.child().stamp(properties),
        _ => stamp_outgoing(properties),
    }
}

/// The messaging attributes of OpenTelemetry's semantic conventions for RabbitMQ on `span`
/// (a no-op when the trace export is off).
pub fn messaging(
    span: &tracing::Span,
    operation: &'static str,
    destination: String,
    routing_key: &str,
    message_id: &str,
) {
    span.set_attribute("messaging.system", "rabbitmq");
    span.set_attribute("messaging.operation.type", operation);
    span.set_attribute("messaging.destination.name", destination);
    span.set_attribute(
        "messaging.rabbitmq.destination.routing_key",
        routing_key.to_owned(),
    );
    if !message_id.is_empty() {
        span.set_attribute("messaging.message.id", message_id.to_owned());
    }
}

/// Records the booking a span is about: as the `booking_id` field of its log lines and the
/// `labbook.booking_id` attribute of the exported span.
pub fn record_booking(span: &tracing::Span, booking_id: &str) {
    span.record("booking_id", booking_id);
    span.set_attribute("labbook.booking_id", booking_id.to_owned());
}

/// `properties` of a copy of a delivery (a retry, a dead letter): the delivery's own context
/// where it has one, else the current one.
pub fn keep(properties: BasicProperties) -> BasicProperties {
    match (TraceContext::of(&properties), current()) {
        (None, Some(ctx)) => ctx.stamp(properties),
        _ => properties,
    }
}

/// A span that has already happened, from `start` to now, under `parent` (a booking's stored
/// trace): what a loop saw over many ticks, like a machine's boot. A no-op when the trace export
/// is off.
pub fn record_span(
    name: &'static str,
    parent: Option<&TraceContext>,
    start: std::time::SystemTime,
    attributes: Vec<opentelemetry::KeyValue>,
    error: Option<String>,
) {
    use opentelemetry::trace::{Span, Status, Tracer};
    let tracer = opentelemetry::global::tracer("labbook");
    let parent = parent.map(TraceContext::to_otel).unwrap_or_default();
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    if let Some(why) = error {
        span.set_status(Status::error(why));
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_the_w3c_says() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(tp, Some("rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(ctx.traceparent(), tp);
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = ctx.child();
        assert_eq!(child.trace_id(), ctx.trace_id());
        assert_ne!(child.traceparent(), tp);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad}");
        }
        let root = TraceContext::new_root();
        assert!(TraceContext::parse(&root.traceparent(), None).is_some());
    }

    #[tokio::test]
    async fn a_message_published_while_handling_one_continues_its_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(tp, Some("k=v")).unwrap();
        let props = ctx
            .clone()
            .scope(async { stamp_outgoing(BasicProperties::default()) })
            .await;
        let sent = TraceContext::of(&props).unwrap();
        assert_eq!(sent.trace_id(), ctx.trace_id());
        assert_eq!(sent.tracestate.as_deref(), Some("k=v"));
        let alone = TraceContext::of(&stamp_outgoing(BasicProperties::default())).unwrap();
        assert_ne!(
            alone.trace_id(),
            ctx.trace_id(),
            "outside a delivery: a new trace"
        );
    }
}
