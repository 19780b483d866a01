//! The credentials stage end to end through the broker and the database.

use std::time::Duration;

use labbook::crypto::password_context;
use labbook::domain::{BookingRef, EmailKind, NotifyMessage};
use labbook::startup::Worker;
use labbook::store::bookings;

use crate::helpers::{
    METRICS_ON, Relay, TestEnv, attempts, booking_json, eventually, header, pg_host_port,
    wait_waiting,
};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_valid_booking_is_stored_with_its_credentials_and_follow_ups() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    env.publish_booking(&booking_json("course-1", 5, 48)).await;

    let ready = env.take("credentials-ready", 1, WAIT).await;
    let notify = env.take("notify", 1, WAIT).await;
    assert_eq!(
        serde_json::from_slice::<BookingRef>(&ready[0].data)
            .unwrap()
            .booking_id,
        "course-1"
    );
    let n: NotifyMessage = serde_json::from_slice(&notify[0].data).unwrap();
    assert_eq!(
        (n.booking_id.as_str(), n.kind),
        ("course-1", EmailKind::Confirmation)
    );
    assert_eq!(ready[0].properties.delivery_mode(), &Some(2));

    let store = env.store().await;
    let booking = bookings::find(&store.pool, "course-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(booking.state.as_str(), "received");
    let creds = bookings::credentials(&store.pool, "course-1")
        .await
        .unwrap();
    assert_eq!(creds.len(), 5);
    for c in &creds {
        let password = env
            .key
            .decrypt(
                &c.password_encrypted,
                &password_context("course-1", &c.username),
            )
            .unwrap();
        assert!(password.expose().len() >= 22);
        assert!(password.verify(&c.password_hash));
        for msg in ready.iter().chain(&notify) {
            let body = String::from_utf8_lossy(&msg.data);
            assert!(
                !body.contains(password.expose()),
                "a password leaked into a message"
            );
        }
        assert!(!String::from_utf8_lossy(&c.password_encrypted).contains(password.expose()));
    }
    env.stop().await;
}

#[tokio::test]
async fn the_same_booking_twice_stores_one_set_of_credentials() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    let body = booking_json("twice", 3, 24);
    env.publish_booking(&body).await;
    env.take("credentials-ready", 1, WAIT).await;
    let store = env.store().await;
    let first: Vec<String> = bookings::credentials(&store.pool, "twice")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.username)
        .collect();

    // Same content with another offset and key order, plus an unknown field.
    let mut v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let t: chrono::DateTime<chrono::Utc> = v["booking_time"].as_str().unwrap().parse().unwrap();
    let shifted = t
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .to_rfc3339();
    v["booking_time"] = shifted.into();
    v["extra"] = "ignored".into();
    env.publish_booking(&v.to_string()).await;
    env.take("credentials-ready", 1, WAIT).await;

    let second: Vec<String> = bookings::credentials(&store.pool, "twice")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.username)
        .collect();
    assert_eq!(first, second);
    assert_eq!(env.depth("booking-created.dlq").await, 0);
    env.stop().await;
}

#[tokio::test]
async fn a_conflicting_booking_is_dead_lettered_and_the_stored_one_kept() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    env.publish_booking(&booking_json("clash", 3, 24)).await;
    env.take("credentials-ready", 1, WAIT).await;
    env.publish_booking(&booking_json("clash", 4, 24)).await;

    let dead = env.take("booking-created.dlq", 1, WAIT).await;
    let error = header(&dead[0], "x-labbook-error").unwrap();
    assert!(
        error.contains("conflict") && error.contains("number_of_users"),
        "{error}"
    );
    assert_eq!(
        header(&dead[0], "x-labbook-stage").as_deref(),
        Some("booking-created")
    );
    let store = env.store().await;
    assert_eq!(
        bookings::find(&store.pool, "clash")
            .await
            .unwrap()
            .unwrap()
            .number_of_users,
        3
    );
    assert_eq!(
        bookings::credentials(&store.pool, "clash")
            .await
            .unwrap()
            .len(),
        3
    );
    env.stop().await;
}

#[tokio::test]
async fn every_broken_rule_lands_in_the_dlq_with_its_reason_and_the_worker_goes_on() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    let good = booking_json("rules", 2, 24);
    let cases: Vec<(String, &str)> = vec![
        (good.replace("\"rules\"", "\"\""), "booking_id"),
        (good.replace("\"rules\"", "\"has space\""), "booking_id"),
        (good.replace("trainer@example.org", "nobody"), "email"),
        (
            good.replace("\"number_of_users\":2", "\"number_of_users\":51"),
            "number_of_users",
        ),
        (
            good.replace("\"number_of_users\":2", "\"number_of_users\":2.0"),
            "number_of_users",
        ),
        (
            good.replace("\"number_of_users\":2", "\"number_of_users\":\"2\""),
            "number_of_users",
        ),
        (
            good.replace("\"duration_minutes\":180", "\"duration_minutes\":5"),
            "duration_minutes",
        ),
        (booking_json("rules", 2, -10), "past"),
        ("{\"booking_id\":\"x\"".to_string(), "JSON"),
        ("\"just a string\"".to_string(), "object"),
    ];
    for (body, _) in &cases {
        env.publish_booking(body).await;
    }
    let dead = env.take("booking-created.dlq", cases.len(), WAIT).await;
    assert_eq!(dead.len(), cases.len());
    // Handled concurrently (prefetch): matched by body, which is kept byte for byte.
    for (body, needle) in &cases {
        let d = dead
            .iter()
            .find(|d| d.data == body.as_bytes())
            .unwrap_or_else(|| panic!("the dead letter of {body} is kept byte for byte"));
        let error = header(d, "x-labbook-error").unwrap();
        assert!(error.contains(needle), "{error:?} should mention {needle}");
        assert_eq!(attempts(d), Some(1));
        assert!(header(d, "x-labbook-failed-at").unwrap().ends_with('Z'));
        assert!(d.properties.message_id().is_some());
    }
    let store = env.store().await;
    assert!(
        bookings::find(&store.pool, "rules")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(env.depth("notify").await, 0);

    env.publish_booking(&good).await;
    assert_eq!(env.take("credentials-ready", 1, WAIT).await.len(), 1);
    env.stop().await;
}

#[tokio::test]
async fn a_wrong_content_type_is_dead_lettered() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    let props = lapin::BasicProperties::default().with_content_type("text/plain".into());
    env.publish_raw(
        "booking-created",
        booking_json("ct", 1, 5).as_bytes(),
        props,
    )
    .await;
    let dead = env.take("booking-created.dlq", 1, WAIT).await;
    assert!(
        header(&dead[0], "x-labbook-error")
            .unwrap()
            .contains("content type")
    );
    env.stop().await;
}

#[tokio::test]
async fn a_database_outage_is_waited_out_without_spending_attempts() {
    let (mut env, port) = TestEnv::with_database_away(&[
        ("LABBOOK_RETRY_DELAYS_MS", "300,600"),
        ("LABBOOK_MAX_ATTEMPTS", "2"),
    ])
    .await;
    let metrics = env.spawn_with(&[Worker::Credentials], &[METRICS_ON]).await;
    env.publish_booking(&booking_json("later", 2, 24)).await;
    // Each attempt fails (no database) and the message waits in a retry tier...
    eventually(WAIT, "a message in a retry tier", || async {
        (env.depth("booking-created.retry.600ms").await == 1).then_some(())
    })
    .await;
    // ...more times than its two attempts, and is not dead-lettered.
    wait_waiting(metrics, "booking-created", 4).await;
    assert_eq!(env.depth("booking-created.dlq").await, 0);
    let _db = Relay::start(port, &pg_host_port()).await;
    let ready = env.take("credentials-ready", 1, WAIT).await;
    assert_eq!(ready.len(), 1);
    let store = env.store().await;
    assert_eq!(
        bookings::credentials(&store.pool, "later")
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(env.depth("booking-created.dlq").await, 0);
    env.stop().await;
}

#[tokio::test]
async fn attempts_used_up_end_in_the_dlq_with_the_count() {
    // Every query times out while the test holds the bookings table: a failure that counts.
    let mut env = TestEnv::new().await;
    let lock = crate::helpers::lock_bookings(&env).await;
    env.spawn_with_queries_timing_out(&[Worker::Credentials])
        .await;
    env.publish_booking(&booking_json("never", 2, 24)).await;
    let dead = env.take("booking-created.dlq", 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(attempts(&dead[0]), Some(3));
    let error = header(&dead[0], "x-labbook-error").unwrap();
    assert!(
        error.starts_with("still failing after 3 attempts"),
        "{error}"
    );
    assert!(error.chars().count() <= 500);
    lock.rollback().await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn a_stored_booking_arriving_again_after_it_ended_is_a_duplicate() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    // Stored when it was current; it has ended since.
    let at: chrono::DateTime<chrono::Utc> = "2026-01-05T09:00:00Z".parse().unwrap();
    let store = env.store().await;
    sqlx::query(
        "INSERT INTO bookings (booking_id, email, booking_time, number_of_users, duration_minutes)
         VALUES ('old', 'trainer@example.org', $1, 2, 60)",
    )
    .bind(at)
    .execute(&store.pool)
    .await
    .unwrap();
    env.publish_booking(&crate::helpers::booking_at("old", 2, at, 60))
        .await;
    assert_eq!(env.take("credentials-ready", 1, WAIT).await.len(), 1);
    assert_eq!(env.depth("booking-created.dlq").await, 0);
    // A new booking in the past is still refused.
    env.publish_booking(&crate::helpers::booking_at("new-old", 2, at, 60))
        .await;
    let dead = env.take("booking-created.dlq", 1, WAIT).await;
    assert!(
        header(&dead[0], "x-labbook-error")
            .unwrap()
            .contains("past")
    );
    env.stop().await;
}

#[tokio::test]
async fn a_dead_letter_outlives_the_original_message_ttl() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_expiration("1500".into())
        .with_correlation_id("corr-1".into());
    env.publish_raw("booking-created", b"{\"booking_id\": 7}", props)
        .await;
    eventually(WAIT, "the dead letter", || async {
        (env.depth("booking-created.dlq").await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dead = env
        .take("booking-created.dlq", 1, Duration::from_secs(2))
        .await;
    assert_eq!(dead.len(), 1, "still there after the original TTL");
    assert_eq!(dead[0].data, b"{\"booking_id\": 7}");
    assert_eq!(
        dead[0]
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "corr-1"
    );
    env.stop().await;
}
