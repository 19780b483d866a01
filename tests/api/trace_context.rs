//! W3C trace context on every message labbook publishes (docs/contract.md §2, version 3): a
//! booking published with a `traceparent` keeps its trace id through intake, the timer, the
//! boot watch and the notifier (its events show it), and through its dead letter.

use std::time::Duration;

use labbook::startup::Worker;
use lapin::BasicProperties;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::helpers::{TestEnv, booking_json, header, unique_id};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

pub(crate) async fn bind_events(env: &TestEnv, queue: &str) {
    let (conn, channel) = env.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .unwrap();
    let (exchange, key) = ("labbook.events".into(), "booking.#".into());
    let bind = QueueBindOptions::default();
    channel
        .queue_bind(queue.into(), exchange, key, bind, FieldTable::default())
        .await
        .unwrap();
    conn.close(200, "done".into()).await.ok();
}

pub(crate) fn with_traceparent(traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn trace_id(d: &lapin::message::Delivery) -> Option<String> {
    let tp = header(d, "traceparent")?;
    let parts: Vec<&str> = tp.split('-').collect();
    (parts.len() == 4 && parts[0] == "00").then(|| parts[1].to_owned())
}

#[tokio::test]
async fn a_booking_published_with_a_traceparent_keeps_its_trace_to_the_last_event() {
    let mut env = TestEnv::new().await;
    bind_events(&env, "trace-events").await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("traced");
    let upstream = format!("00-{TRACE}-00f067aa0ba902b7-01");
    env.publish_raw(
        "booking-created",
        booking_json(&id, 2, -1).as_bytes(),
        with_traceparent(&upstream),
    )
    .await;
    env.wait_state(&id, "provisioned").await;
    let events = env.take("trace-events", 4, Duration::from_secs(30)).await;
    let kinds: Vec<String> = events.iter().map(|d| d.routing_key.to_string()).collect();
    assert!(
        kinds.contains(&"booking.provisioned".to_owned()),
        "{kinds:?}"
    );
    for d in &events {
        assert_eq!(
            trace_id(d).as_deref(),
            Some(TRACE),
            "{} continues the upstream's trace",
            d.routing_key
        );
        assert_ne!(
            header(d, "traceparent").as_deref(),
            Some(upstream.as_str()),
            "from a span of its own"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn a_booking_without_one_gets_a_trace_of_its_own_and_a_dead_letter_keeps_it() {
    let mut env = TestEnv::new().await;
    bind_events(&env, "trace-events").await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("untraced");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    env.wait_state(&id, "provisioned").await;
    let events = env.take("trace-events", 4, Duration::from_secs(30)).await;
    let ids: Vec<Option<String>> = events.iter().map(trace_id).collect();
    assert!(
        ids.iter().all(|t| t.is_some()),
        "every event carries a traceparent"
    );
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one trace for the booking: {ids:?}"
    );
    // A refused booking: its dead letter keeps the trace it came with.
    let refused = format!("00-{TRACE}-00f067aa0ba902b8-01");
    let bad = r#"{"booking_id": "x-1", "email": "not an address"}"#;
    env.publish_raw(
        "booking-created",
        bad.as_bytes(),
        with_traceparent(&refused),
    )
    .await;
    let dead = env
        .take("booking-created.dlq", 1, Duration::from_secs(30))
        .await;
    assert_eq!(
        header(&dead[0], "traceparent").as_deref(),
        Some(refused.as_str())
    );
    env.stop().await;
}
