//! Changes and cancellation of bookings (docs/contract.md §3a) and the events an upstream
//! follows (§7), against the real broker, database, EC2 emulator and an in-memory outbox.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use labbook::startup::Worker;
use labbook::store::schedule::{self, Action};
use labbook::store::{BookingRecord, bookings, slots};
use serde_json::{Value, json};

use crate::helpers::{TestEnv, all_terminated, eventually, header, instances_for, unique_id};

const WAIT: Duration = Duration::from_secs(40);

/// A test environment whose emails go to an in-memory outbox, with a queue of its own bound to
/// every event of `labbook.events`.
struct Changes {
    env: TestEnv,
    outbox: String,
}

impl Changes {
    async fn new(extra: &[(&str, &str)]) -> Self {
        let outbox = unique_id("outbox");
        let smtp = format!("memory://{outbox}");
        let mut vars = vec![("SMTP_URL", smtp.as_str())];
        vars.extend_from_slice(extra);
        let env = TestEnv::with(&vars).await;
        crate::trace_context::bind_events(&env, "test-events").await;
        Self { env, outbox }
    }

    /// All workers running, and a booking of `users` trainees that started five minutes ago
    /// for an hour, provisioned.
    async fn running(prefix: &str, users: u32) -> (Self, String, DateTime<Utc>) {
        let mut c = Self::new(&[]).await;
        c.env.spawn(&Worker::ALL).await;
        let id = unique_id(prefix);
        let started = Utc::now() - chrono::Duration::minutes(5);
        c.publish(booking(&id, 0, started, users, 60)).await;
        c.env.wait_state(&id, "provisioned").await;
        (c, id, started)
    }

    async fn publish(&self, body: Value) {
        self.env.publish_booking(&body.to_string()).await;
    }

    /// The emails sent so far: (subject, raw message).
    async fn emails(&self) -> Vec<(String, String)> {
        labbook::mail::memory_outbox(&self.outbox)
            .messages()
            .await
            .into_iter()
            .map(|(_, raw)| {
                let subject = raw
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: "))
                    .unwrap_or_default()
                    .to_owned();
                (subject, raw)
            })
            .collect()
    }

    async fn subjects(&self) -> Vec<String> {
        self.emails().await.into_iter().map(|(s, _)| s).collect()
    }

    async fn booking(&self, id: &str) -> BookingRecord {
        let store = self.env.store().await;
        bookings::find(&store.pool, id).await.unwrap().unwrap()
    }

    /// Events published so far (taken from the test's queue), in order: (routing key,
    /// message id, body).
    async fn events(&self) -> Vec<(String, String, Value)> {
        self.env
            .take("test-events", 1000, Duration::from_millis(500))
            .await
            .into_iter()
            .map(|d| {
                let id = d.properties.message_id().as_ref().unwrap().to_string();
                let body: Value = serde_json::from_slice(&d.data).unwrap();
                (d.routing_key.to_string(), id, body)
            })
            .collect()
    }

    async fn timer(&self, id: &str, action: Action) -> Option<schedule::Entry> {
        let store = self.env.store().await;
        schedule::find(&store.pool, id, action).await.unwrap()
    }
}

fn booking(id: &str, revision: u32, at: DateTime<Utc>, users: u32, minutes: u32) -> Value {
    json!({
        "booking_id": id,
        "email": format!("{id}@example.org"),
        "booking_time": at.to_rfc3339(),
        "number_of_users": users,
        "duration_minutes": minutes,
        "revision": revision,
    })
}

fn cancellation(id: &str, revision: u32) -> Value {
    json!({"booking_id": id, "revision": revision, "cancelled": true})
}

fn line<'a>(raw: &'a str, prefix: &str) -> Option<&'a str> {
    raw.lines().find_map(|l| l.trim_end().strip_prefix(prefix))
}

fn logins(raw: &str) -> Vec<String> {
    raw.lines()
        .filter(|l| l.starts_with("Username: ") && l.contains(", Password: "))
        .map(|l| l.trim_end().to_owned())
        .collect()
}

#[tokio::test]
async fn a_reschedule_before_provisioning_moves_the_timer_and_a_stale_revision_does_nothing() {
    let c = Changes::new(&[]).await;
    let id = unique_id("moved");
    let at = Utc::now() + chrono::Duration::hours(2);
    c.publish(booking(&id, 0, at, 2, 60)).await;
    c.env.drain().await;
    let later = at + chrono::Duration::hours(1);
    c.publish(booking(&id, 1, later, 2, 90)).await;
    c.env.drain().await;

    let timer = c.timer(&id, Action::Provision).await.unwrap();
    assert_eq!(
        timer.due_at,
        later.trunc_subsecs(6),
        "provisioning at the new time"
    );
    assert!(timer.published_at.is_none());
    assert_eq!(timer.revision, 1);
    let teardown = c.timer(&id, Action::Teardown).await.unwrap();
    assert_eq!(
        teardown.due_at,
        (later + chrono::Duration::minutes(90)).trunc_subsecs(6)
    );
    let b = c.booking(&id).await;
    assert_eq!((b.revision, b.state.as_str()), (1, "scheduled"));

    let emails = c.emails().await;
    assert_eq!(
        c.subjects().await,
        ["Booking Confirmation", "Booking Updated"]
    );
    let updated = &emails[1].1;
    assert_eq!(line(updated, "Booking ID: "), Some(id.as_str()));
    assert_eq!(
        line(updated, "Booking Time: "),
        Some(labbook::format_time(later).as_str())
    );
    let ends = labbook::format_time(later + chrono::Duration::minutes(90));
    assert_eq!(line(updated, "Booking Ends: "), Some(ends.as_str()));
    assert_eq!(logins(updated), logins(&emails[0].1), "the same logins");

    // The old revision arriving late is acknowledged and changes nothing.
    c.publish(booking(&id, 0, at, 2, 60)).await;
    c.env.drain().await;
    assert_eq!(
        c.env.depth("booking-created.dlq").await,
        0,
        "stale is not a dead letter"
    );
    assert_eq!(c.booking(&id).await.booking_time, later.trunc_subsecs(6));
    assert_eq!(
        c.emails().await.len(),
        2,
        "nothing sent for a stale revision"
    );
    // The same revision again sends nothing more.
    c.publish(booking(&id, 1, later, 2, 90)).await;
    c.env.drain().await;
    assert_eq!(
        c.emails().await.len(),
        2,
        "Booking Updated once per revision"
    );

    let events: Vec<(String, String)> = c
        .events()
        .await
        .into_iter()
        .map(|(key, mid, _)| (key, mid))
        .collect();
    let first = |mid: &str| events.iter().position(|(_, m)| m == mid);
    for (key, mid) in [
        ("booking.accepted", format!("{id}.accepted.0")),
        ("booking.confirmed", format!("{id}.confirmed.0")),
        ("booking.accepted", format!("{id}.accepted.1")),
        ("booking.confirmed", format!("{id}.confirmed.1")),
    ] {
        assert!(
            events.contains(&(key.to_owned(), mid.clone())),
            "{mid} in {events:?}"
        );
    }
    assert!(first(&format!("{id}.accepted.0")) < first(&format!("{id}.accepted.1")));
    assert!(first(&format!("{id}.accepted.1")) < first(&format!("{id}.confirmed.1")));
    assert!(instances_for(&id).await.is_empty(), "nothing launched");
}

#[tokio::test]
async fn fewer_trainees_before_provisioning_remove_the_last_logins() {
    let c = Changes::new(&[]).await;
    let id = unique_id("shrink");
    let at = Utc::now() + chrono::Duration::hours(2);
    c.publish(booking(&id, 0, at, 4, 60)).await;
    c.env.drain().await;
    c.publish(booking(&id, 1, at, 2, 60)).await;
    c.env.drain().await;
    let store = c.env.store().await;
    let creds = bookings::credentials(&store.pool, &id).await.unwrap();
    assert_eq!(creds.iter().map(|c| c.position).collect::<Vec<_>>(), [0, 1]);
    let emails = c.emails().await;
    let before = logins(&emails[0].1);
    assert_eq!(
        logins(&emails[1].1),
        before[..2],
        "the first two keep their logins"
    );
}

#[tokio::test]
async fn a_cancellation_before_provisioning_launches_nothing_and_stays_cancelled() {
    let c = Changes::new(&[]).await;
    let id = unique_id("cancel-early");
    let at = Utc::now() + chrono::Duration::hours(2);
    c.publish(booking(&id, 3, at, 2, 60)).await;
    c.env.drain().await;
    // A cancellation at the stored revision is a conflict; one above cancels.
    c.publish(cancellation(&id, 3)).await;
    c.publish(cancellation(&id, 4)).await;
    c.env.drain().await;
    let b = c.booking(&id).await;
    assert_eq!(
        (b.state.as_str(), b.cancelled, b.revision),
        ("cancelled", true, 4)
    );
    assert!(
        c.timer(&id, Action::Provision).await.is_none(),
        "no provisioning timer"
    );
    // Even a provision-due that was on its way launches nothing.
    crate::helpers::publish_ref(&c.env, "provision-due", &id).await;
    c.env.drain().await;
    assert!(instances_for(&id).await.is_empty());
    let emails = c.emails().await;
    assert_eq!(
        c.subjects().await,
        ["Booking Confirmation", "Booking Cancelled"]
    );
    assert_eq!(line(&emails[1].1, "Booking ID: "), Some(id.as_str()));
    assert!(emails[1].1.contains("No lab machines will be started"));

    // Booking it again with a higher revision is refused: a cancelled booking stays cancelled.
    c.publish(booking(&id, 5, at, 2, 60)).await;
    c.env.drain().await;
    let dead = c
        .env
        .take("booking-created.dlq", 10, Duration::from_secs(2))
        .await;
    assert_eq!(
        dead.len(),
        2,
        "the conflicting cancellation and the uncancel"
    );
    assert!(
        header(&dead[0], "x-labbook-error")
            .unwrap()
            .starts_with("conflict")
    );
    let refused = header(&dead[1], "x-labbook-error").unwrap();
    assert!(refused.contains("stays cancelled"), "{refused}");
    assert_eq!(c.booking(&id).await.state.as_str(), "cancelled");

    let events = c.events().await;
    let rejected: Vec<&Value> = events
        .iter()
        .filter(|(k, _, _)| k == "booking.rejected")
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[1]["revision"], 5);
    assert_eq!(
        rejected[1]["detail"].as_str().unwrap(),
        refused,
        "the dead letter's reason"
    );
    assert_eq!(rejected[1]["state"], "cancelled");
    let cancelled = events
        .iter()
        .find(|(k, _, _)| k == "booking.cancelled")
        .expect("a cancelled event");
    assert_eq!(cancelled.1, format!("{id}.cancelled.4"));
    assert_eq!(cancelled.2["state"], "cancelled");
}

#[tokio::test]
async fn a_cancellation_of_an_unknown_booking_is_kept_against_late_revisions() {
    let c = Changes::new(&[]).await;
    let id = unique_id("cancel-first");
    c.publish(cancellation(&id, 5)).await;
    let at = Utc::now() + chrono::Duration::hours(2);
    c.publish(booking(&id, 3, at, 2, 60)).await;
    c.env.drain().await;
    assert!(
        bookings::find(&c.env.store().await.pool, &id)
            .await
            .unwrap()
            .is_none(),
        "the late, lower revision is not stored"
    );
    assert_eq!(
        c.env.depth("booking-created.dlq").await,
        0,
        "it is stale, not refused"
    );
    c.publish(booking(&id, 6, at, 2, 60)).await;
    c.env.drain().await;
    assert_eq!(
        c.env.depth("booking-created.dlq").await,
        1,
        "a cancelled id stays cancelled"
    );
    assert!(
        c.emails().await.is_empty(),
        "no email for a booking never stored"
    );
}

#[tokio::test]
async fn a_cancellation_after_provisioning_terminates_every_machine() {
    let (mut c, id, _) = Changes::running("cancel-late", 3).await;
    assert_eq!(instances_for(&id).await.len(), 2);
    c.publish(cancellation(&id, 1)).await;
    eventually(WAIT, "every machine terminated", || async {
        all_terminated(&instances_for(&id).await).then_some(())
    })
    .await;
    c.env.wait_state(&id, "cancelled").await;
    let emails = eventually(WAIT, "the cancellation email", || async {
        let subjects = c.subjects().await;
        subjects
            .contains(&"Booking Cancelled".to_owned())
            .then_some(c.emails().await)
    })
    .await;
    let cancelled: Vec<_> = emails
        .iter()
        .filter(|(s, _)| s == "Booking Cancelled")
        .collect();
    assert_eq!(cancelled.len(), 1);
    assert!(cancelled[0].1.contains("have been stopped"));
    c.env.stop().await;
}

#[tokio::test]
async fn a_running_booking_is_extended_then_shortened_to_an_end_already_past() {
    let mut c = Changes::new(&[]).await;
    c.env.spawn(&Worker::ALL).await;
    let id = unique_id("extend");
    let at = Utc::now() - chrono::Duration::minutes(30);
    c.publish(booking(&id, 0, at, 2, 60)).await;
    c.env.wait_state(&id, "provisioned").await;
    c.publish(booking(&id, 1, at, 2, 240)).await;
    eventually(WAIT, "the teardown moved", || async {
        let t = c.timer(&id, Action::Teardown).await?;
        (t.revision == 1).then_some(())
    })
    .await;
    let teardown = c.timer(&id, Action::Teardown).await.unwrap();
    assert_eq!(
        teardown.due_at,
        (at + chrono::Duration::minutes(240)).trunc_subsecs(6)
    );
    assert!(
        !all_terminated(&instances_for(&id).await),
        "machines keep running"
    );
    assert_eq!(c.booking(&id).await.state.as_str(), "provisioned");

    // Shortened to an end already past: it ends now.
    c.publish(booking(&id, 2, at, 2, 15)).await;
    c.env.wait_state(&id, "ended").await;
    assert!(all_terminated(&instances_for(&id).await));
    let events = c.events().await;
    let ended = events
        .iter()
        .find(|(k, _, _)| k == "booking.ended")
        .expect("ended");
    assert_eq!(ended.1, format!("{id}.ended.2"));
    assert_eq!(ended.2["state"], "ended");
    let updated = c
        .subjects()
        .await
        .iter()
        .filter(|s| *s == "Booking Updated")
        .count();
    assert_eq!(updated, 2, "one Booking Updated per revision");
    c.env.stop().await;
}

#[tokio::test]
async fn more_trainees_after_provisioning_get_new_machines_and_fewer_are_refused() {
    let (mut c, id, at) = Changes::running("grow", 2).await;
    let store = c.env.store().await;
    let first = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(first.len(), 1);

    c.publish(booking(&id, 1, at, 5, 60)).await;
    eventually(WAIT, "the second instance email", || async {
        let n = c
            .subjects()
            .await
            .iter()
            .filter(|s| s.contains("Access Information"))
            .count();
        (n == 2).then_some(())
    })
    .await;
    let now = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(now.len(), 3, "5 trainees, 2 per machine");
    assert_eq!(
        now[0].instance_id, first[0].instance_id,
        "the first machine is untouched"
    );
    assert_eq!(instances_for(&id).await.len(), 3);
    let emails = c.emails().await;
    let details: Vec<&String> = emails
        .iter()
        .filter(|(s, _)| s.contains("Access Information"))
        .map(|(_, r)| r)
        .collect();
    let machines = details[1]
        .lines()
        .filter(|l| l.starts_with("Instance URL: "))
        .count();
    assert_eq!(machines, 3, "the new email lists every machine");
    let confirmation = &emails
        .iter()
        .find(|(s, _)| s == "Booking Confirmation")
        .unwrap()
        .1;
    let updated = &emails
        .iter()
        .find(|(s, _)| s == "Booking Updated")
        .unwrap()
        .1;
    let (old, new) = (logins(confirmation), logins(updated));
    assert_eq!(new.len(), 5);
    assert_eq!(new[..2], old[..], "existing trainees keep their logins");

    // Fewer trainees once machines run: refused, nothing changes.
    c.publish(booking(&id, 2, at, 3, 60)).await;
    let dead = c.env.take("booking-created.dlq", 1, WAIT).await;
    assert!(
        header(&dead[0], "x-labbook-error")
            .unwrap()
            .contains("cannot go down")
    );
    let b = c.booking(&id).await;
    assert_eq!((b.number_of_users, b.revision), (5, 1));
    c.env.stop().await;
}

#[tokio::test]
async fn a_booking_moved_after_provisioning_is_terminated_and_provisioned_again() {
    let (mut c, id, _) = Changes::running("resched", 2).await;
    let old: HashSet<String> = instances_for(&id)
        .await
        .iter()
        .filter_map(|i| i.instance_id.clone())
        .collect();
    let later = Utc::now() + chrono::Duration::seconds(15);
    c.publish(booking(&id, 1, later, 2, 60)).await;
    eventually(WAIT, "the old machines terminated", || async {
        let all = instances_for(&id).await;
        let old_ones: Vec<_> = all
            .into_iter()
            .filter(|i| old.contains(i.instance_id.as_deref().unwrap_or_default()))
            .collect();
        all_terminated(&old_ones).then_some(())
    })
    .await;
    assert_ne!(
        c.booking(&id).await.state.as_str(),
        "provisioned",
        "not before its new time"
    );
    c.env.wait_state(&id, "provisioned").await;
    assert!(
        Utc::now() >= later,
        "provisioned again at the new time, not before"
    );
    let running: Vec<String> = instances_for(&id)
        .await
        .iter()
        .filter(|i| crate::helpers::state_of(i) != "terminated")
        .filter_map(|i| i.instance_id.clone())
        .collect();
    assert_eq!(running.len(), 1);
    assert!(!old.contains(&running[0]), "a new machine");
    let emails = eventually(WAIT, "a second instance email", || async {
        let e = c.emails().await;
        let n = e
            .iter()
            .filter(|(s, _)| s.contains("Access Information"))
            .count();
        (n == 2).then_some(e)
    })
    .await;
    let confirmation = &emails
        .iter()
        .find(|(s, _)| s == "Booking Confirmation")
        .unwrap()
        .1;
    let updated = &emails
        .iter()
        .find(|(s, _)| s == "Booking Updated")
        .unwrap()
        .1;
    assert_eq!(logins(updated), logins(confirmation), "same credentials");
    c.env.stop().await;
}

#[tokio::test]
async fn a_cancellation_that_lands_while_machines_launch_leaves_none_running() {
    // One RunInstances every three seconds: the booking's five machines take twelve seconds to
    // launch (the emulator's tag search that sees the first one can itself take seconds).
    let mut c = Changes::new(&[("LABBOOK_EC2_RATE_RUN_INSTANCES", "1/0.33")]).await;
    c.env.spawn(&Worker::ALL).await;
    let id = unique_id("race");
    c.publish(booking(
        &id,
        0,
        Utc::now() - chrono::Duration::minutes(5),
        10,
        60,
    ))
    .await;
    eventually(WAIT, "a first machine launched", || async {
        (!instances_for(&id).await.is_empty()).then_some(())
    })
    .await;
    assert_ne!(
        c.booking(&id).await.state.as_str(),
        "provisioned",
        "still launching"
    );
    c.publish(cancellation(&id, 1)).await;
    c.env.wait_state(&id, "cancelled").await;
    eventually(WAIT, "every machine terminated", || async {
        all_terminated(&instances_for(&id).await).then_some(())
    })
    .await;
    // Whatever the launching attempt still had in flight is terminated as well: the workers
    // stopped, everything waiting in the queues handled.
    c.env.stop().await;
    c.env.drain().await;
    let instances = instances_for(&id).await;
    assert!(
        all_terminated(&instances),
        "no machine outlives the cancellation"
    );
    assert!(
        instances.len() < 5,
        "launches waiting their turn were not made"
    );
    assert!(
        !c.subjects()
            .await
            .iter()
            .any(|s| s.contains("Access Information")),
        "no instance email for a cancelled booking"
    );
    c.env.stop().await;
}

#[tokio::test]
async fn the_events_of_a_booking_from_its_intake_to_its_end() {
    let mut c = Changes::new(&[]).await;
    c.env.spawn(&Worker::ALL).await;
    let id = unique_id("events");
    // Started a quarter of an hour ago, for a quarter of an hour and a few seconds.
    let at = Utc::now() - chrono::Duration::minutes(15) + chrono::Duration::seconds(8);
    c.publish(booking(&id, 0, at, 3, 15)).await;
    c.env.wait_state(&id, "ended").await;
    let events = eventually(WAIT, "the ended event", || async {
        let e = c.events().await;
        e.iter().any(|(k, _, _)| k == "booking.ended").then_some(e)
    })
    .await;
    let kinds: Vec<&str> = events.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "booking.accepted",
            "booking.confirmed",
            "booking.provisioned",
            "booking.ended"
        ]
    );
    for (key, mid, body) in &events {
        let event = key.strip_prefix("booking.").unwrap();
        assert_eq!(mid, &format!("{id}.{event}.0"));
        assert_eq!(body["booking_id"], id.as_str());
        assert_eq!(body["event"], event);
        assert_eq!(body["revision"], 0);
        assert!(body["at"].as_str().unwrap().ends_with('Z'));
        assert!(body["detail"].is_string());
    }
    let provisioned = &events[2].2;
    assert_eq!(provisioned["state"], "provisioned");
    let instances = provisioned["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    // The email's URL: https://<public IP> in JupyterHub mode with HTTPS (the default).
    assert!(
        instances[0]["url"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    assert_eq!(instances[0]["usernames"].as_array().unwrap().len(), 2);
    // No password in any event.
    let emails = c.emails().await;
    let text = serde_json::to_string(&events.iter().map(|e| &e.2).collect::<Vec<_>>()).unwrap();
    for (_, raw) in &emails {
        for l in raw.lines() {
            if let Some(pw) = l
                .split(", Password: ")
                .nth(1)
                .or(l.strip_prefix("Password: "))
            {
                assert!(!text.contains(pw.trim()), "a password in an event");
            }
        }
    }
    c.env.stop().await;
}

#[tokio::test]
async fn a_failure_and_a_rejection_are_published() {
    let mut c = Changes::new(&[]).await;
    c.env
        .spawn_with(
            &Worker::ALL,
            &[("LABBOOK_SUBNET_ID", "subnet-doesnotexist")],
        )
        .await;
    let failing = unique_id("fail-event");
    c.publish(booking(&failing, 2, Utc::now(), 2, 60)).await;
    c.env.wait_state(&failing, "failed").await;
    let invalid = unique_id("invalid");
    c.publish(
        json!({"booking_id": invalid, "revision": 7, "email": "x@example.org",
        "booking_time": Utc::now().to_rfc3339(), "number_of_users": 0}),
    )
    .await;
    let events = eventually(WAIT, "the failed and rejected events", || async {
        let e = c.events().await;
        let has = |k: &str| e.iter().any(|(key, _, _)| key == k);
        (has("booking.failed") && has("booking.rejected")).then_some(e)
    })
    .await;
    let failed = events
        .iter()
        .find(|(k, _, _)| k == "booking.failed")
        .unwrap();
    assert_eq!(failed.1, format!("{failing}.failed.2"));
    assert_eq!(failed.2["state"], "failed");
    assert!(
        failed.2["detail"]
            .as_str()
            .unwrap()
            .contains("could not be started")
    );
    let rejected = events
        .iter()
        .find(|(k, _, _)| k == "booking.rejected")
        .unwrap();
    assert_eq!(rejected.1, format!("{invalid}.rejected.7"));
    assert_eq!(rejected.2["state"], Value::Null, "never stored");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM booking_events WHERE booking_id = $1")
        .bind(&invalid)
        .fetch_one(&c.env.store().await.pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 0,
        "a message refused before anything was stored stores nothing"
    );
    let dead = c.env.take("booking-created.dlq", 1, WAIT).await;
    assert_eq!(
        rejected.2["detail"].as_str(),
        header(&dead[0], "x-labbook-error").as_deref(),
        "the reason the dead letter has"
    );
    c.env.stop().await;
}

/// The booking's history as stored: (event, revision), in the booking's order.
async fn history(c: &Changes, id: &str) -> Vec<(String, i64)> {
    let store = c.env.store().await;
    labbook::store::events::history(&store.pool, id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event, i64::from(e.revision)))
        .collect()
}

/// The events of `id` as an upstream received them: (event, revision).
fn received(events: &[(String, String, Value)], id: &str) -> Vec<(String, i64)> {
    events
        .iter()
        .filter(|(_, _, b)| b["booking_id"] == id)
        .map(|(_, _, b)| {
            (
                b["event"].as_str().unwrap().to_owned(),
                b["revision"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn two_credentials_replicas_publish_a_bookings_events_in_the_order_they_happened() {
    let mut c = Changes::new(&[]).await;
    // Two replicas of the intake race for the revisions of one booking.
    c.env.spawn(&[Worker::Credentials]).await;
    c.env.spawn(&[Worker::Credentials]).await;
    let id = unique_id("racing");
    let at = Utc::now() + chrono::Duration::days(3);
    for revision in 1..=8 {
        c.publish(booking(&id, revision, at, 2, 30 + revision))
            .await;
    }
    let store = c.env.store().await;
    eventually(WAIT, "the last revision stored", || async {
        let b = bookings::find(&store.pool, &id).await.unwrap()?;
        (b.revision == 8).then_some(())
    })
    .await;
    c.env.stop().await;
    c.env.drain().await;
    let stored = history(&c, &id).await;
    let got = received(&c.events().await, &id);
    assert_eq!(
        got, stored,
        "published in the order of the booking's history"
    );
    let accepted: Vec<i64> = got
        .iter()
        .filter(|(e, _)| e == "accepted")
        .map(|(_, r)| *r)
        .collect();
    assert!(
        accepted.windows(2).all(|w| w[0] < w[1]),
        "accepted revisions go up: {accepted:?}"
    );
    assert_eq!(accepted.last(), Some(&8));
}

/// Holds every SMTP connection until opened, then forwards it to the tests' SMTP sink.
struct SmtpGate {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpGate {
    async fn closed() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, rx) = tokio::sync::watch::channel(false);
        let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let target = crate::helpers::smtp_url()
            .trim_start_matches("smtp://")
            .to_owned();
        let counter = waiting.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (mut rx, target, counter) = (rx.clone(), target.clone(), counter.clone());
                tokio::spawn(async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = rx.wait_for(|open| *open).await;
                    counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            port,
            open,
            waiting,
            task,
        }
    }

    fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SmtpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_cancellation_stored_while_an_email_goes_out_is_published_after_its_event() {
    let gate = SmtpGate::closed().await;
    let smtp = format!("smtp://127.0.0.1:{}", gate.port);
    let mut c = Changes::new(&[("SMTP_URL", smtp.as_str())]).await;
    c.env
        .spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Notifier])
        .await;
    let id = unique_id("cancel-during-send");
    let at = Utc::now() + chrono::Duration::days(2);
    c.publish(booking(&id, 1, at, 2, 60)).await;
    // The confirmation is on its way: the notifier holds its SMTP connection at the gate.
    eventually(WAIT, "the confirmation email at the gate", || async {
        (gate.waiting() > 0).then_some(())
    })
    .await;
    let mut cancel = booking(&id, 2, at, 2, 60);
    cancel["cancelled"] = json!(true);
    c.publish(cancel).await;
    // The cancellation is taken and waits for the booking while the email is held.
    eventually(WAIT, "the cancellation taken", || async {
        (c.env.depth("booking-created").await == 0).then_some(())
    })
    .await;
    gate.open.send(true).unwrap();
    c.env.wait_state(&id, "cancelled").await;
    c.env.stop().await;
    c.env.drain().await;
    let got = received(&c.events().await, &id);
    assert_eq!(
        got,
        [
            ("accepted".to_owned(), 1),
            ("confirmed".to_owned(), 1),
            ("cancelled".to_owned(), 2)
        ],
        "the email's event before the cancellation stored during its send"
    );
    assert_eq!(got, history(&c, &id).await);
}
