//! One trace per booking, exported (docs/contract.md §2 and §4, version 3): with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, every stage's handling is a span under the trace the
//! booking was published with, sent over OTLP/HTTP to a receiver this test runs, which decodes
//! what arrives as a collector would.
//!
//! The export is global to a process: each test here installs it first thing (cargo-nextest
//! runs every test in a process of its own).

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use chrono::Utc;
use labbook::broker::StageQueue;
use labbook::config::TraceExport;
use labbook::crypto::{admin_context, password_context};
use labbook::domain::Password;
use labbook::startup::Worker;
use labbook::store::{bookings, slots};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

use crate::helpers::{TestEnv, booking_at, booking_for, eventually, unique_id, wait_emails};
use crate::trace_context::{bind_events, with_traceparent};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const UPSTREAM_SPAN: &str = "b7ad6b7169203331";

/// A span as the receiver decoded it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    /// OTLP's `SpanKind`: 4 producer, 5 consumer.
    kind: i32,
    attributes: HashMap<String, String>,
    /// Every string the span holds besides its attributes: its events and their attributes.
    events: Vec<String>,
    links: Vec<(String, String)>,
    error: bool,
}

type Received = Arc<Mutex<Vec<Span>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn pairs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// What a collector does with `POST /v1/traces`: decodes the protobuf request and keeps it.
async fn collect(
    State(received): State<Received>,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
    let mut kept = received.lock().unwrap();
    for resource in request.resource_spans {
        let attrs = resource
            .resource
            .map(|r| pairs(&r.attributes))
            .unwrap_or_default();
        let service = attrs.get("service.name").cloned().unwrap_or_default();
        for scope in resource.scope_spans {
            for s in scope.spans {
                kept.push(Span {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: pairs(&s.attributes),
                    events: s
                        .events
                        .iter()
                        .map(|e| format!("{} {:?}", e.name, pairs(&e.attributes)))
                        .collect(),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    error: s.status.is_some_and(|st| st.code == 2),
                });
            }
        }
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        Vec::<u8>::new(),
    )
}

/// Runs an OTLP receiver on loopback and exports this process's spans to it.
async fn export() -> (labbook::telemetry::Telemetry, Received) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let settings = TraceExport {
        endpoint,
        json: false,
        headers: vec![],
        timeout: Duration::from_secs(5),
        service_name: None,
    };
    let telemetry = labbook::telemetry::init(
        false,
        "off",
        std::io::stderr,
        Some((&settings, "labbook-test")),
    )
    .expect("the export starts");
    assert!(
        labbook::telemetry::exporting(),
        "the only subscriber of this process"
    );
    (telemetry, received)
}

fn of_trace(received: &Received, trace: &str) -> Vec<Span> {
    let spans = received.lock().unwrap();
    spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

// Multi-threaded: the flush blocks its thread while the receiver answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_published_with_a_traceparent_is_one_trace_of_every_stage() {
    let (telemetry, received) = export().await;
    let mut env = TestEnv::new().await;
    bind_events(&env, "span-events").await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("spans");
    let to = format!("{id}@example.org");
    // 15 minutes long, ending 8 seconds from now: provisioned at once, then torn down.
    let at = Utc::now() - chrono::Duration::minutes(15) + chrono::Duration::seconds(8);
    let upstream = format!("00-{TRACE}-{UPSTREAM_SPAN}-01");
    env.publish_raw(
        "booking-created",
        booking_for(&id, &to, 2, at, 15).as_bytes(),
        with_traceparent(&upstream).with_message_id(format!("upstream-{id}").into()),
    )
    .await;
    let emails = wait_emails(&to, 2).await;
    env.wait_state(&id, "ended").await;
    // The `ended` event is published by the events relay after the state changed: it is out
    // once it reaches the upstream's queue.
    eventually(Duration::from_secs(30), "the ended event", || async {
        let events = env
            .take("span-events", 10, Duration::from_millis(300))
            .await;
        events
            .iter()
            .any(|d| d.routing_key.as_str() == "booking.ended")
            .then_some(())
    })
    .await;
    env.stop().await;
    telemetry.flush();

    let spans = of_trace(&received, TRACE);
    let names: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for stage in [
        "process booking-created",
        "process credentials-ready",
        "publish provision-due",
        "process provision-due",
        "EC2.RunInstances",
        "machine boot",
        "publish notify",
        "process notify",
        "smtp send",
        "publish teardown-due",
        "process teardown-due",
        "EC2.TerminateInstances",
        "publish booking.provisioned",
        "publish booking.ended",
    ] {
        assert!(
            names.contains(stage),
            "no span {stage:?} in the trace: {names:?}"
        );
    }
    // The upstream's span is the parent of intake's; every other span's parent is in the trace.
    let intake = named(&spans, "process booking-created");
    assert_eq!(intake[0].parent_id, UPSTREAM_SPAN);
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in &spans {
        assert!(
            s.parent_id == UPSTREAM_SPAN || ids.contains(s.parent_id.as_str()),
            "{} hangs from a span the trace does not hold",
            s.name
        );
    }
    // Handlings are consumer spans with RabbitMQ's messaging attributes; publishes producers.
    for s in spans.iter().filter(|s| s.name.starts_with("process ")) {
        assert_eq!(s.kind, 5, "{} is a consumer span", s.name);
        assert_eq!(s.attributes["messaging.system"], "rabbitmq");
        assert_eq!(s.attributes["messaging.operation.type"], "process");
        let queue = s.name.trim_start_matches("process ");
        assert!(s.attributes["messaging.destination.name"].ends_with(&format!(":{queue}")));
        assert_eq!(
            s.attributes["messaging.rabbitmq.destination.routing_key"],
            queue
        );
        assert!(!s.attributes["messaging.message.id"].is_empty(), "{s:?}");
        assert_eq!(s.attributes["labbook.booking_id"], id);
        assert_eq!(s.service, "labbook-test");
    }
    for s in spans.iter().filter(|s| s.name.starts_with("publish ")) {
        assert_eq!(s.kind, 4, "{} is a producer span", s.name);
    }
    let run = named(&spans, "EC2.RunInstances");
    let launch = named(&spans, "process provision-due");
    assert!(
        run.iter()
            .all(|r| launch.iter().any(|l| l.span_id == r.parent_id)),
        "EC2's calls are children of the launch"
    );
    // The database's statements are events of the handling that ran them.
    assert!(
        intake[0]
            .events
            .iter()
            .any(|e| e.contains("INSERT INTO bookings")),
        "intake's statements: {:?}",
        intake[0].events
    );
    let boot = named(&spans, "machine boot");
    assert_eq!(boot[0].attributes["labbook.boot.outcome"], "ready");
    assert!(boot[0].attributes["cloud.resource_id"].starts_with("i-"));

    // Nothing secret in any span: no password, no email body.
    let store = env.store().await;
    let mut secrets: Vec<String> = Vec::new();
    for c in bookings::credentials(&store.pool, &id).await.unwrap() {
        let pw: Password = env
            .key
            .decrypt(&c.password_encrypted, &password_context(&id, &c.username))
            .unwrap();
        secrets.push(pw.expose().to_owned());
    }
    for slot in slots::for_booking(&store.pool, &id).await.unwrap() {
        let pw: Password = env
            .key
            .decrypt(
                &slot.admin_password_encrypted,
                &admin_context(&id, slot.slot),
            )
            .unwrap();
        secrets.push(pw.expose().to_owned());
    }
    assert!(!secrets.is_empty());
    let everything: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|s| {
            let attrs = s.attributes.iter().map(|(k, v)| format!("{k}={v}"));
            attrs.chain(s.events.iter().cloned()).collect::<Vec<_>>()
        })
        .collect();
    for secret in &secrets {
        assert!(
            !everything.iter().any(|t| t.contains(secret.as_str())),
            "a password is in a span"
        );
    }
    for email in &emails {
        let body = email["text"].as_str().unwrap_or_default();
        let line = body.lines().map(str::trim).find(|l| l.len() > 20).unwrap();
        assert!(
            !everything.iter().any(|t| t.contains(line)),
            "an email's text is in a span: {line:?}"
        );
        assert!(
            !everything.iter().any(|t| t.contains(&to)),
            "a trainer's address is in a span"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_and_a_replayed_message_keep_their_trace() {
    let (telemetry, received) = export().await;
    // The SMTP relay defers the first recipient (451), then accepts: the email is retried.
    fn greylisting(n: usize) -> &'static [u8] {
        if n == 0 {
            b"451 4.7.1 greylisted, try again\r\n"
        } else {
            b"250 OK\r\n"
        }
    }
    let port = crate::helpers::free_port();
    let (relay, accepted) = crate::helpers::scripted_smtp(port, greylisting).await;
    let smtp = format!("smtp://127.0.0.1:{port}");
    let mut env = TestEnv::with(&[("SMTP_URL", smtp.as_str())]).await;
    env.spawn(&[Worker::Credentials, Worker::Notifier]).await;
    let id = unique_id("retried");
    let to = format!("{id}@example.org");
    let at = Utc::now() + chrono::Duration::days(1);
    let upstream = format!("00-{TRACE}-{UPSTREAM_SPAN}-01");
    env.publish_raw(
        "booking-created",
        booking_for(&id, &to, 1, at, 60).as_bytes(),
        with_traceparent(&upstream),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the email delivered after the 451",
        || async { (!accepted.lock().unwrap().is_empty()).then_some(()) },
    )
    .await;

    // A booking refused at intake, dead-lettered, then replayed by an operator.
    let refused_trace = "5b8efff798038103d269b633813fc60c";
    let refused = format!("00-{refused_trace}-eee19b7ec3c1b174-01");
    let bad = format!(r#"{{"booking_id": "{id}-bad", "email": "not an address"}}"#);
    env.publish_raw(
        "booking-created",
        bad.as_bytes(),
        with_traceparent(&refused),
    )
    .await;
    let (conn, _channel) = env.channel().await;
    one_dead_letter(&env, "the refused booking's dead letter").await;
    let replay =
        labbook::broker::dlq::replay(&conn, StageQueue::BookingCreated, None, None, |_| {
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(replay.replayed, 1);
    one_dead_letter(&env, "dead-lettered again after the replay").await;
    env.stop().await;
    relay.abort();
    telemetry.flush();

    let spans = of_trace(&received, TRACE);
    let sends: Vec<&Span> = named(&spans, "process notify");
    let attempts: HashSet<&str> = sends
        .iter()
        .map(|s| s.attributes["labbook.attempt"].as_str())
        .collect();
    assert!(
        attempts.contains("1") && attempts.contains("2"),
        "the deferred email's two handlings are both in the booking's trace: {attempts:?}"
    );
    assert!(
        sends
            .iter()
            .any(|s| s.attributes["labbook.outcome"] == "retried")
    );

    let refusals = named(
        &of_trace(&received, refused_trace),
        "process booking-created",
    )
    .into_iter()
    .cloned()
    .collect::<Vec<_>>();
    assert_eq!(
        refusals.len(),
        2,
        "the refusal and its replay, in the trace it came with"
    );
    assert!(
        refusals.iter().all(|s| s.error),
        "a dead letter is an error"
    );
    assert!(refusals.iter().all(|s| s.parent_id == "eee19b7ec3c1b174"));
    let replayed: Vec<&Span> = refusals
        .iter()
        .filter(|s| {
            s.attributes
                .get("labbook.replayed")
                .is_some_and(|r| r == "true")
        })
        .collect();
    assert_eq!(replayed.len(), 1);
    let first = refusals
        .iter()
        .find(|s| !s.attributes.contains_key("labbook.replayed"))
        .unwrap();
    assert_eq!(
        replayed[0].links,
        vec![(refused_trace.to_owned(), first.span_id.clone())],
        "the replay links to the handling that dead-lettered it"
    );
}

/// Waits until `booking-created.dlq` holds one message.
async fn one_dead_letter(env: &TestEnv, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        (env.depth("booking-created.dlq").await == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_booking_page_links_to_its_trace() {
    let mut env = TestEnv::with(&[(
        "LABBOOK_TRACE_URL",
        "http://127.0.0.1:16686/trace/{trace_id}",
    )])
    .await;
    env.spawn(&[Worker::Credentials]).await;
    let id = unique_id("trace-link");
    let at = Utc::now() + chrono::Duration::days(1);
    env.publish_raw(
        "booking-created",
        booking_at(&id, 1, at, 60).as_bytes(),
        with_traceparent(&format!("00-{TRACE}-{UPSTREAM_SPAN}-01")),
    )
    .await;
    env.wait_state(&id, "received").await;
    env.stop().await;
    let served = crate::console::Served::start(&env).await;
    let (status, detail) = served.api(&format!("/api/bookings/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(detail["trace"]["trace_id"], TRACE);
    assert_eq!(
        detail["trace"]["url"],
        format!("http://127.0.0.1:16686/trace/{TRACE}")
    );
    // The page escapes `/` in attributes as `&#x2f;`, which a browser reads as `/`.
    let page = served
        .page(&format!("/bookings/{id}"))
        .await
        .replace("&#x2f;", "/");
    assert!(
        page.contains(&format!(r#"href="http://127.0.0.1:16686/trace/{TRACE}""#)),
        "the booking page links to its trace"
    );
}
