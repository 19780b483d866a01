//! Operators' tools: dead-letter list/show/replay/purge, the CLI, metrics and health.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::process::{Command, Stdio};
use std::time::Duration;

use labbook::broker::StageQueue;
use labbook::broker::dlq;
use labbook::startup::Worker;
use labbook::store::bookings;

use crate::helpers::{TestEnv, booking_json, eventually, lock_bookings};

const WAIT: Duration = Duration::from_secs(20);

/// `n` bookings whose email is invalid, dead-lettered by the credentials stage.
async fn dead_letters(env: &mut TestEnv, n: usize) -> Vec<String> {
    // One message at a time, so the dead letters are in the order they were published.
    env.spawn_with(&[Worker::Credentials], &[("LABBOOK_PREFETCH", "1")])
        .await;
    let ids: Vec<String> = (0..n).map(|i| format!("dead-{i}")).collect();
    for id in &ids {
        env.publish_booking(
            &booking_json(id, 1, 24).replace("trainer@example.org", "not-an-address"),
        )
        .await;
    }
    eventually(WAIT, "the dead letters", || async {
        (env.depth("booking-created.dlq").await == n as u32).then_some(())
    })
    .await;
    env.stop().await;
    ids
}

/// The dead letters of `booking-created`, and their booking ids in order.
async fn listing(conn: &lapin::Connection) -> (Vec<dlq::DeadLetter>, Vec<String>) {
    let letters = dlq::read_all(conn, StageQueue::BookingCreated)
        .await
        .unwrap();
    let ids = letters
        .iter()
        .map(|l| l.booking_id.clone().unwrap())
        .collect();
    (letters, ids)
}

async fn conn(env: &TestEnv) -> lapin::Connection {
    labbook::broker::connect(&env.amqp_url(), "labbook test")
        .await
        .unwrap()
}

#[tokio::test]
async fn listing_and_filtering_thirty_times_loses_and_reorders_nothing() {
    // On RabbitMQ 4.0–4.2 a quorum queue drops a message returned more than 20 times: run this
    // with TEST_AMQP_BASE and TEST_RABBITMQCTL pointing at a 4.x node (scripts/rabbitmq4.sh).
    let mut env = TestEnv::new().await;
    let ids = dead_letters(&mut env, 3).await;
    let conn = conn(&env).await;
    let before = dlq::read_all(&conn, StageQueue::BookingCreated)
        .await
        .unwrap();
    for round in 0..30 {
        // A listing, and a replay and a purge that match nothing: each returns every letter.
        let (_, seen) = listing(&conn).await;
        assert_eq!(seen, ids, "listing {round}");
        let nobody = Some("nobody");
        let report = dlq::replay(&conn, StageQueue::BookingCreated, nobody, None, |_| {
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
        assert_eq!((report.replayed, report.skipped), (0, 3));
        assert_eq!(
            dlq::purge(&conn, StageQueue::BookingCreated, nobody)
                .await
                .unwrap(),
            0
        );
    }
    let after = dlq::read_all(&conn, StageQueue::BookingCreated)
        .await
        .unwrap();
    assert_eq!(after.len(), 3);
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.body, b.body, "bodies kept byte for byte");
        assert_eq!(
            (&a.error, &a.stage, a.attempts, a.failed_at),
            (&b.error, &b.stage, b.attempts, b.failed_at)
        );
        assert_eq!(a.properties.message_id(), b.properties.message_id());
    }
    assert_eq!(env.depth("booking-created.dlq").await, 3);
}

#[tokio::test]
async fn listing_leaves_the_dead_letters_in_place_and_in_order() {
    let mut env = TestEnv::new().await;
    let ids = dead_letters(&mut env, 4).await;
    let conn = conn(&env).await;
    for _ in 0..2 {
        let (letters, seen) = listing(&conn).await;
        assert_eq!(seen, ids);
        assert!(
            letters
                .iter()
                .all(|l| l.error.as_deref().unwrap().contains("email"))
        );
        assert!(
            letters
                .iter()
                .all(|l| l.stage.as_deref() == Some("booking-created") && l.failed_at.is_some())
        );
    }
    assert_eq!(env.depth("booking-created.dlq").await, 4);
}

#[tokio::test]
async fn replay_after_the_cause_is_fixed_processes_the_booking() {
    // The cause: every query times out while the bookings table is held.
    let mut env = TestEnv::new().await;
    let lock = lock_bookings(&env).await;
    env.spawn_with_queries_timing_out(&[Worker::Credentials])
        .await;
    env.publish_booking(&booking_json("replayed", 2, 24)).await;
    eventually(WAIT, "the dead letter", || async {
        (env.depth("booking-created.dlq").await == 1).then_some(())
    })
    .await;

    lock.rollback().await.unwrap();
    let conn = conn(&env).await;
    let report = dlq::replay(
        &conn,
        StageQueue::BookingCreated,
        Some("replayed"),
        None,
        |_| ControlFlow::Continue(()),
    )
    .await
    .unwrap();
    assert_eq!(report.replayed, 1);
    assert_eq!(env.take("credentials-ready", 1, WAIT).await.len(), 1);
    let store = env.store().await;
    assert_eq!(
        bookings::credentials(&store.pool, "replayed")
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(env.depth("booking-created.dlq").await, 0);
    env.stop().await;
}

#[tokio::test]
async fn a_replay_interrupted_half_way_loses_nothing() {
    let mut env = TestEnv::new().await;
    let ids = dead_letters(&mut env, 6).await;
    let conn = conn(&env).await;
    let mut seen = 0;
    let report = dlq::replay(&conn, StageQueue::BookingCreated, None, None, |_| {
        seen += 1;
        // The process dies after publishing the third, before acknowledging it.
        if seen == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await
    .unwrap();
    assert_eq!(report.replayed, 2);
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let back = env
        .take("booking-created", 10, Duration::from_secs(2))
        .await;
    let left = env
        .take("booking-created.dlq", 10, Duration::from_secs(2))
        .await;
    assert_eq!(back.len(), 3, "three were published to the stage queue");
    assert_eq!(
        left.len(),
        4,
        "the third is still in the DLQ too: nothing lost"
    );
    let all: HashSet<String> = back
        .iter()
        .chain(&left)
        .map(|d| {
            serde_json::from_slice::<serde_json::Value>(&d.data).unwrap()["booking_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(all, ids.into_iter().collect::<HashSet<_>>());
    for d in &back {
        assert_eq!(crate::helpers::attempts(d), None, "attempts reset");
        assert!(crate::helpers::header(d, "x-labbook-error").is_none());
    }
}

#[tokio::test]
async fn purge_removes_one_booking_or_everything() {
    let mut env = TestEnv::new().await;
    dead_letters(&mut env, 3).await;
    let conn = conn(&env).await;
    assert_eq!(
        dlq::purge(&conn, StageQueue::BookingCreated, Some("dead-1"))
            .await
            .unwrap(),
        1
    );
    let left: Vec<String> = dlq::read_all(&conn, StageQueue::BookingCreated)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.booking_id.unwrap())
        .collect();
    assert_eq!(left, ["dead-0", "dead-2"]);
    assert_eq!(
        dlq::purge(&conn, StageQueue::BookingCreated, None)
            .await
            .unwrap(),
        2
    );
    assert_eq!(env.depth("booking-created.dlq").await, 0);
}

pub fn cli(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_labbook"))
        .args(args)
        .env_clear()
        .envs(&env.vars)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_lists_replays_purges_and_reports_status() {
    let mut env = TestEnv::new().await;
    dead_letters(&mut env, 2).await;
    let (code, out, _) = cli(&env, &["dlq", "list", "booking-created.dlq"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("dead-0") && out.contains("email"), "{out}");
    assert!(
        out.contains("2 dead letter(s) in booking-created.dlq"),
        "{out}"
    );

    let (code, out, _) = cli(
        &env,
        &["dlq", "show", "booking-created", "--booking-id", "dead-1"],
    );
    assert_eq!(code, Some(0));
    assert!(
        out.contains("x-labbook-error:") && out.contains("\"booking_id\":\"dead-1\""),
        "{out}"
    );

    let (code, out, _) = cli(&env, &["dlq", "replay", "booking-created", "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("2 dead letter(s) would go back"), "{out}");
    assert_eq!(env.depth("booking-created.dlq").await, 2);

    let (code, _, err) = cli(&env, &["dlq", "purge", "booking-created"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(env.depth("booking-created.dlq").await, 2);

    let (code, out, _) = cli(&env, &["dlq", "replay", "booking-created", "--limit", "1"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("replayed 1 dead letter(s) to booking-created"),
        "{out}"
    );
    assert_eq!(env.depth("booking-created").await, 1);

    let (code, out, _) = cli(&env, &["dlq", "purge", "booking-created", "--yes"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("deleted 1"), "{out}");

    let (code, _, err) = cli(&env, &["dlq", "list", "no-such-queue"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown queue"), "{err}");

    let (code, _, err) = cli(&env, &["status", "nobody"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test]
async fn publish_validates_first_and_status_shows_the_booking() {
    let mut env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(format!("labbook-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, booking_json("cli", 99, 24)).unwrap();
    let (code, _, err) = cli(&env, &["publish", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("number_of_users"), "{err}");
    assert_eq!(env.depth("booking-created").await, 0);

    let good = dir.join("good.json");
    std::fs::write(&good, booking_json("cli", 3, 24)).unwrap();
    let (code, out, _) = cli(&env, &["publish", good.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(out.contains("routing key booking-created"), "{out}");

    env.spawn(&[Worker::Credentials, Worker::Scheduler]).await;
    env.wait_state("cli", "scheduled").await;
    let (code, out, _) = cli(&env, &["status", "cli"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("state      scheduled") && out.contains("provision"),
        "{out}"
    );
    let (code, json, _) = cli(&env, &["status", "cli", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    // The trace the booking was stored under (labbook publish gave it one), by its id.
    let trace_id = v["trace_id"].as_str().unwrap();
    assert_eq!(trace_id.len(), 32);
    assert!(out.contains(&format!("trace      {trace_id}")), "{out}");
    assert_eq!(v["booking"]["number_of_users"], 3);
    assert_eq!(v["usernames"].as_array().unwrap().len(), 3);
    for shown in [&out, &json] {
        assert!(
            !shown.to_lowercase().contains("password"),
            "status never shows a password"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    env.stop().await;
}

#[tokio::test]
async fn health_and_metrics_endpoints_answer() {
    let mut env = TestEnv::new().await;
    let addr = env
        .spawn_with(
            &[Worker::Credentials],
            &[("LABBOOK_METRICS_ADDR", "127.0.0.1:0")],
        )
        .await
        .unwrap();
    let base = format!("http://{addr}");
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    eventually(WAIT, "ready", || async {
        (reqwest::get(format!("{base}/readyz")).await.ok()?.status() == 200).then_some(())
    })
    .await;
    // Every series is there from start-up, at 0, before any message.
    let fresh = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for outcome in ["done", "retried", "waiting", "dead_lettered"] {
        let series =
            format!("labbook_messages_total{{stage=\"booking-created\",outcome=\"{outcome}\"}} 0");
        assert!(fresh.contains(&series), "{series} missing from:\n{fresh}");
    }
    env.publish_booking(&booking_json("metered", 1, 24)).await;
    env.take("credentials-ready", 1, WAIT).await;
    let metrics = eventually(WAIT, "the message counted", || async {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("labbook_messages_total{stage=\"booking-created\",outcome=\"done\"}")
            .then_some(text)
    })
    .await;
    assert!(
        metrics.contains("labbook_handler_seconds_bucket"),
        "{metrics}"
    );
    env.stop().await;

    // Without its database the worker is alive but not ready.
    let (mut env, _) = TestEnv::with_database_away(&[]).await;
    let addr = env
        .spawn_with(
            &[Worker::Credentials],
            &[("LABBOOK_METRICS_ADDR", "127.0.0.1:0")],
        )
        .await
        .unwrap();
    // Once connected to the broker, it says what it waits for.
    let why = eventually(WAIT, "readyz naming the database", || async {
        let ready = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        assert_eq!(ready.status(), 503);
        let text = ready.text().await.ok()?;
        text.contains("database").then_some(text)
    })
    .await;
    assert!(!why.is_empty());
    env.stop().await;
}

#[tokio::test]
async fn labbook_cancel_publishes_the_next_revision_and_status_shows_the_history() {
    let env = TestEnv::new().await;
    let id = crate::helpers::unique_id("cli-cancel");
    env.publish_booking(&booking_json(&id, 2, 24)).await;
    env.drain().await;
    let (code, out, err) = cli(&env, &["cancel", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("revision 1") && out.contains("will not be provisioned"),
        "{out}"
    );
    env.drain().await;
    let (code, out, _) = cli(&env, &["status", &id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("state      cancelled"), "{out}");
    assert!(out.contains("revision   1 (cancelled)"), "{out}");
    let history: Vec<&str> = out.lines().filter(|l| l.starts_with("history")).collect();
    assert!(
        history[0].contains("accepted") && history[0].contains("r0"),
        "{out}"
    );
    assert!(
        history
            .iter()
            .any(|l| l.contains("cancelled") && l.contains("r1")),
        "{out}"
    );
    // Again: nothing more to cancel, nothing published.
    let (code, out, _) = cli(&env, &["cancel", &id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("already cancelled"), "{out}");
    assert_eq!(env.depth("booking-created").await, 0);
    let (code, _, err) = cli(&env, &["cancel", "no-such-booking"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not found"), "{err}");
}
