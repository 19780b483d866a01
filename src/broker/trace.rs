//! W3C trace context on every message labbook publishes (docs/contract.md §2, version 3): a
//! `traceparent` header (and `tracestate` when there is one). A booking message that arrives
//! with one continues its trace; one that arrives without starts a trace of its own. The
//! context of the message being handled is the current one while its stage works and its
//! outcome is published, so every follow-up, retry copy and dead letter carries the same trace
//! id; what is published outside a delivery (the timer, the boot watch) continues the trace the
//! booking was stored with.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rand::RngCore;

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

    /// Runs `work` with this context current.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }
}

/// The context current in this task, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// `properties` of a message published now: a child of the current context (or of the
/// delivery's own, which retry copies and dead letters keep), else a new trace.
pub fn stamp_outgoing(properties: BasicProperties) -> BasicProperties {
    let ctx = current()
        .or_else(|| TraceContext::of(&properties))
        .map_or_else(TraceContext::new_root, |c| c.child());
    ctx.stamp(properties)
}

/// `properties` of a copy of a delivery (a retry, a dead letter): the delivery's own context
/// where it has one, else the current one.
pub fn keep(properties: BasicProperties) -> BasicProperties {
    match (TraceContext::of(&properties), current()) {
        (None, Some(ctx)) => ctx.stamp(properties),
        _ => properties,
    }
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
