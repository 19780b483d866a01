//! The whole pipeline through the real broker, database, SMTP server and EC2 emulator.

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use labbook::crypto::admin_context;
use labbook::crypto::password_context;
use labbook::domain::{BookingRef, EmailKind, NotifyMessage, Password};
use labbook::mail::render::message_id;
use labbook::startup::Worker;
use labbook::store::{bookings, emails, slots};
use lapin::BasicProperties;

use crate::helpers::{
    METRICS_ON, TestEnv, booking_for, emails_to, unique_id, user_data_of, wait_emails, wait_waiting,
};

fn text_lines(email: &serde_json::Value) -> Vec<String> {
    email["text"]
        .as_str()
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn by_subject<'a>(all: &'a [serde_json::Value], subject: &str) -> &'a serde_json::Value {
    all.iter()
        .find(|e| e["subject"] == subject)
        .unwrap_or_else(|| panic!("no {subject:?} email in {all:#?}"))
}

async fn publish_json(env: &TestEnv, queue: &str, body: &impl serde::Serialize) {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    env.publish_raw(queue, &serde_json::to_vec(body).unwrap(), props)
        .await;
}

#[tokio::test]
async fn a_booking_goes_through_and_both_emails_carry_the_stored_secrets_once() {
    let mut env = TestEnv::new().await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("e2e");
    let to = format!("{id}@example.org");
    let at = Utc::now() - chrono::Duration::minutes(5);
    env.publish_booking(&booking_for(&id, &to, 5, at, 120))
        .await;

    let all = wait_emails(&to, 2).await;
    let store = env.store().await;
    let creds = bookings::credentials(&store.pool, &id).await.unwrap();

    // Confirmation: exactly the stored credentials.
    let confirmation = by_subject(&all, "Booking Confirmation");
    let lines = text_lines(confirmation);
    assert!(lines.contains(&format!("Booking ID: {id}")));
    let at_utc = chrono::DateTime::parse_from_rfc3339(&at.to_rfc3339())
        .unwrap()
        .with_timezone(&Utc);
    assert!(lines.contains(&format!(
        "Booking Time: {}",
        at_utc.format("%Y-%m-%dT%H:%M:%SZ")
    )));
    let user_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("Username: "))
        .collect();
    assert_eq!(user_lines.len(), 5);
    for c in &creds {
        let pw = env
            .key
            .decrypt(&c.password_encrypted, &password_context(&id, &c.username))
            .unwrap();
        assert!(lines.contains(&format!(
            "Username: {}, Password: {}",
            c.username,
            pw.expose()
        )));
    }
    assert_eq!(
        confirmation["headers"]["message-id"].as_str().unwrap(),
        message_id(&id, EmailKind::Confirmation, 0, "labbook.test")
    );
    let source = reqwest::get(format!(
        "{}/{}/source",
        crate::helpers::maildev_api().await,
        confirmation["id"].as_str().unwrap()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(source.contains("Content-Type: multipart/alternative"));
    assert!(source.contains("Content-Type: text/html"));
    assert!(
        confirmation["html"]
            .as_str()
            .unwrap()
            .contains(&creds[0].username)
    );

    // Instance details: every slot's address, its users in order, its admin credentials.
    let details = by_subject(&all, "JupyterHub Access Information");
    let lines = text_lines(details);
    let slots = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(slots.len(), 3);
    for slot in &slots {
        // JupyterHub mode with HTTPS (the default): the certificate is for the public IP.
        let url_line = format!(
            "Instance URL: https://{}",
            slot.public_ip.as_deref().unwrap()
        );
        let start = lines
            .iter()
            .position(|l| *l == url_line)
            .unwrap_or_else(|| panic!("{url_line} in {lines:#?}"));
        let block = &lines[start..];
        let mut cursor = 0;
        for c in creds
            .iter()
            .filter(|c| slot.user_positions().contains(&c.position))
        {
            let at = block[cursor..]
                .iter()
                .position(|l| *l == format!("- {}", c.username))
                .expect("user listed")
                + cursor;
            cursor = at + 1;
        }
        let admin_at = block[cursor..]
            .iter()
            .position(|l| *l == "Username: labadmin")
            .expect("admin")
            + cursor;
        let password = block[admin_at + 1..]
            .iter()
            .find(|l| l.starts_with("Password: "))
            .unwrap();
        let admin_pw =
            Password::from_plaintext(password.trim_start_matches("Password: ").to_owned());
        let stored = env
            .key
            .decrypt(
                &slot.admin_password_encrypted,
                &admin_context(&id, slot.slot),
            )
            .unwrap();
        assert_eq!(admin_pw.expose(), stored.expose());
        let user_data = user_data_of(slot.instance_id.as_deref().unwrap()).await;
        let hash = user_data
            .lines()
            .skip_while(|l| !l.contains("name: labadmin"))
            .find_map(|l| l.trim().strip_prefix("passwd: "))
            .unwrap()
            .trim_matches(|c| c == '\'' || c == '"');
        assert!(
            admin_pw.verify(hash),
            "the emailed admin password matches the instance's hash"
        );
    }

    // Redelivering every kind of message sends nothing again: with the workers stopped, the
    // copies are handled by draining every queue, then nothing is left to happen.
    env.stop().await;
    publish_json(
        &env,
        "booking-created",
        &serde_json::from_str::<serde_json::Value>(&booking_for(&id, &to, 5, at, 120)).unwrap(),
    )
    .await;
    for kind in [EmailKind::Confirmation, EmailKind::InstanceDetails] {
        publish_json(
            &env,
            "notify",
            &NotifyMessage {
                booking_id: id.clone(),
                kind,
                revision: 0,
                copy: 0,
            },
        )
        .await;
    }
    publish_json(
        &env,
        "provision-due",
        &BookingRef {
            booking_id: id.clone(),
            revision: None,
        },
    )
    .await;
    assert!(env.drain().await >= 4, "every copy was handled");
    assert_eq!(env.retries_waiting().await, 0);
    assert_eq!(emails_to(&to).await.len(), 2, "no email was sent twice");
    let log = emails::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(log.iter().filter(|e| e.sent_at.is_some()).count(), 2);
}

#[tokio::test]
async fn a_future_booking_gets_its_confirmation_now_and_no_machines_yet() {
    // Emails into an in-memory outbox; the stages run by draining their queues.
    let outbox = unique_id("outbox");
    let smtp = format!("memory://{outbox}");
    let env = TestEnv::with(&[
        ("LABBOOK_PROVISION_LEAD_SECONDS", "900"),
        ("SMTP_URL", smtp.as_str()),
    ])
    .await;
    let id = unique_id("future");
    let to = format!("{id}@example.org");
    let at = Utc::now() + chrono::Duration::days(2);
    env.publish_booking(&booking_for(&id, &to, 2, at, 60)).await;
    // Intake, scheduling and the confirmation; then nothing is left to do.
    assert_eq!(env.drain().await, 3);
    assert_eq!(env.retries_waiting().await, 0);
    let sent = labbook::mail::memory_outbox(&outbox).messages().await;
    assert_eq!(sent.len(), 1, "one email: the confirmation");
    let (envelope, raw) = &sent[0];
    assert_eq!(envelope.to()[0].to_string(), to);
    assert!(raw.contains("Subject: Booking Confirmation"), "{raw}");
    assert!(raw.contains(&format!("Booking ID: {id}")));
    // Provisioning waits for its time: 15 minutes before the booking.
    let store = env.store().await;
    let due = labbook::store::schedule::for_booking(&store.pool, &id)
        .await
        .unwrap();
    let provision = due
        .iter()
        .find(|e| e.action == labbook::store::schedule::Action::Provision)
        .unwrap();
    assert_eq!(
        provision.due_at,
        at.trunc_subsecs(6) - chrono::Duration::minutes(15)
    );
    assert!(provision.published_at.is_none());
    assert!(crate::helpers::instances_for(&id).await.is_empty());
}

#[tokio::test]
async fn a_booking_that_cannot_be_provisioned_gets_the_failure_email() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Notifier])
        .await;
    env.spawn_with(
        &[Worker::Provisioner],
        &[("LABBOOK_SUBNET_ID", "subnet-doesnotexist")],
    )
    .await;
    let id = unique_id("fails");
    let to = format!("{id}@example.org");
    env.publish_booking(&booking_for(&id, &to, 2, Utc::now(), 60))
        .await;
    let all = wait_emails(&to, 2).await;
    let failure = by_subject(&all, "Booking Failed");
    let lines = text_lines(failure);
    assert!(lines.contains(&format!("Booking ID: {id}")));
    let text = failure["text"].as_str().unwrap();
    assert!(text.contains("could not be started"));
    assert!(
        !text.contains("InvalidSubnetID") && !text.contains("EC2"),
        "no internals: {text}"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_notifier_keeps_running_while_smtp_is_down_and_delivers_once_it_is_back() {
    let port = crate::helpers::free_port();
    let smtp = format!("smtp://127.0.0.1:{port}");
    let mut env = TestEnv::with(&[
        ("SMTP_URL", smtp.as_str()),
        ("LABBOOK_RETRY_DELAYS_MS", "500,1000"),
        ("LABBOOK_MAX_ATTEMPTS", "30"),
    ])
    .await;
    let metrics = env
        .spawn_with(&[Worker::Credentials, Worker::Notifier], &[METRICS_ON])
        .await;
    let id = unique_id("smtp-down");
    let to = format!("{id}@example.org");
    env.publish_booking(&booking_for(
        &id,
        &to,
        1,
        Utc::now() + chrono::Duration::days(1),
        60,
    ))
    .await;
    // The confirmation waits for the relay, again and again, and nothing goes out.
    wait_waiting(metrics, "notify", 3).await;
    assert!(emails_to(&to).await.is_empty());
    let store = env.store().await;
    let log = emails::for_booking(&store.pool, &id).await.unwrap();
    assert!(log.iter().all(|e| e.sent_at.is_none()));

    let smtp_target = crate::helpers::smtp_url()
        .trim_start_matches("smtp://")
        .to_owned();
    let _relay = crate::helpers::Relay::start(port, &smtp_target).await;
    let all = wait_emails(&to, 1).await;
    assert_eq!(all[0]["subject"], "Booking Confirmation");
    // Nothing else goes out: the workers stopped, what waits in the queues handled.
    env.stop().await;
    env.drain().await;
    assert_eq!(emails_to(&to).await.len(), 1, "delivered once");
    assert_eq!(env.depth("notify.dlq").await, 0);
}

/// A relay that will never take the email: every `RCPT` gets `550`.
fn refusing(_: usize) -> &'static [u8] {
    b"550 5.1.1 no such mailbox here\r\n"
}

#[tokio::test]
async fn a_relay_that_refuses_the_email_dead_letters_it_and_marks_the_booking() {
    let port = crate::helpers::free_port();
    let (relay, _) = crate::helpers::scripted_smtp(port, refusing).await;
    let smtp = format!("smtp://127.0.0.1:{port}");
    let mut env = TestEnv::with(&[("SMTP_URL", smtp.as_str())]).await;
    env.spawn(&[Worker::Credentials, Worker::Notifier]).await;
    let id = unique_id("refused");
    env.publish_booking(&booking_for(
        &id,
        &format!("{id}@example.org"),
        1,
        Utc::now() + chrono::Duration::days(1),
        60,
    ))
    .await;
    let dead = env.take("notify.dlq", 1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        crate::helpers::attempts(&dead[0]),
        Some(1),
        "5xx is permanent: no retries"
    );
    let error = crate::helpers::header(&dead[0], "x-labbook-error").unwrap();
    assert!(
        error.contains("refused") && error.contains("550"),
        "{error}"
    );
    let store = env.store().await;
    let log = emails::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(log.len(), 1);
    assert!(log[0].sent_at.is_none());
    assert!(log[0].last_error.as_deref().unwrap().contains("550"));
    relay.abort();
    env.stop().await;
}

/// The instance URLs of an instance details email, in order.
fn instance_urls(email: &serde_json::Value) -> Vec<String> {
    text_lines(email)
        .into_iter()
        .filter_map(|l| l.strip_prefix("Instance URL: ").map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn with_https_off_the_email_gives_plain_http_urls() {
    let mut env = TestEnv::with(&[("LABBOOK_HTTPS", "off")]).await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("http");
    let to = format!("{id}@example.org");
    env.publish_booking(&booking_for(&id, &to, 2, Utc::now(), 60))
        .await;
    let all = wait_emails(&to, 2).await;
    let details = by_subject(&all, "JupyterHub Access Information");
    let slots = slots::for_booking(&env.store().await.pool, &id)
        .await
        .unwrap();
    let want: Vec<String> = slots
        .iter()
        .map(|s| format!("http://{}", s.address().unwrap()))
        .collect();
    assert_eq!(instance_urls(details), want);
    let user_data = user_data_of(slots[0].instance_id.as_deref().unwrap()).await;
    assert!(
        !user_data.contains("certbot"),
        "no certificate is asked for"
    );
}

#[tokio::test]
async fn a_machine_that_got_no_certificate_is_given_over_http_with_a_line_saying_so() {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Provisioner])
        .await;
    let id = unique_id("httponly");
    let to = format!("{id}@example.org");
    env.publish_booking(&booking_for(&id, &to, 4, Utc::now(), 60))
        .await;
    env.wait_state(&id, "provisioned").await;
    // What the readiness loop stores for a machine whose bootstrap reported
    // "labbook-bootstrap: ok (http only: ...)"; the email is rendered after it.
    let store = env.store().await;
    sqlx::query("UPDATE slots SET http_only = $2 WHERE booking_id = $1 AND slot = 1")
        .bind(&id)
        .bind("rate limited by the ACME server")
        .execute(&store.pool)
        .await
        .unwrap();
    env.spawn(&[Worker::Notifier]).await;
    let all = wait_emails(&to, 2).await;
    let details = by_subject(&all, "JupyterHub Access Information");
    let slots = slots::for_booking(&store.pool, &id).await.unwrap();
    assert_eq!(
        instance_urls(details),
        [
            format!("https://{}", slots[0].public_ip.as_deref().unwrap()),
            format!("http://{}", slots[1].address().unwrap()),
        ]
    );
    let lines = text_lines(details);
    let http = lines
        .iter()
        .position(|l| l.starts_with("Instance URL: http://"))
        .unwrap();
    assert_eq!(lines[http + 1], labbook::mail::render::HTTP_ONLY_LINE);
    assert_eq!(
        lines
            .iter()
            .filter(|l| *l == labbook::mail::render::HTTP_ONLY_LINE)
            .count(),
        1
    );
}
