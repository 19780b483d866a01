//! The worker binaries: SIGTERM with a message in flight, and configuration errors.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use labbook::store::bookings;

use crate::helpers::{TestEnv, booking_json, eventually, lock_bookings, wait_blocked_on_lock};

fn spawn_worker(env: &TestEnv, extra: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_labbook-credentials"))
        .env_clear()
        .envs(&env.vars)
        .envs(extra.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub(crate) fn wait_exit(child: &mut Child, wait: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the worker did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn sigterm_finishes_the_message_in_flight_then_exits_0() {
    let env = TestEnv::new().await;
    let mut child = spawn_worker(&env, &[]);
    let lock = lock_bookings(&env).await;
    env.publish_booking(&booking_json("in-flight", 2, 24)).await;
    // Wait until the worker holds the message (it is unacked, so not ready).
    eventually(
        Duration::from_secs(20),
        "the worker to take the message",
        || async { (env.depth("booking-created").await == 0).then_some(()) },
    )
    .await;
    // It is at work on it: its query waits for the table the test holds.
    wait_blocked_on_lock(&env).await;
    sigterm(&child);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "it waits for the message in flight"
    );
    lock.rollback().await.unwrap();

    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    let mut logs = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(
        !logs.lines().any(|l| l.contains("ERROR")),
        "a normal SIGTERM logs no ERROR line:\n{logs}"
    );
    let store = env.store().await;
    assert!(
        bookings::find(&store.pool, "in-flight")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        env.take("credentials-ready", 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    assert_eq!(env.depth("booking-created").await, 0);
}

#[tokio::test]
async fn a_message_still_in_flight_at_the_shutdown_timeout_goes_back_to_its_queue() {
    let env = TestEnv::new().await;
    let mut child = spawn_worker(&env, &[("LABBOOK_SHUTDOWN_TIMEOUT_SECONDS", "1")]);
    let lock = lock_bookings(&env).await;
    env.publish_booking(&booking_json("held", 2, 24)).await;
    eventually(
        Duration::from_secs(20),
        "the worker to take the message",
        || async { (env.depth("booking-created").await == 0).then_some(()) },
    )
    .await;
    // It is at work on it: its query waits for the table the test holds.
    wait_blocked_on_lock(&env).await;
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    lock.rollback().await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the message back in booking-created",
        || async { (env.depth("booking-created").await == 1).then_some(()) },
    )
    .await;
    let store = env.store().await;
    assert!(bookings::find(&store.pool, "held").await.unwrap().is_none());
}

#[tokio::test]
async fn a_configuration_error_names_the_variable_and_exits_2() {
    let env = TestEnv::unprepared(&[]);
    for (var, value) in [("LABBOOK_SECRET_KEY", ""), ("LABBOOK_PREFETCH", "lots")] {
        let mut child = spawn_worker(&env, &[(var, value)]);
        let status = wait_exit(&mut child, Duration::from_secs(10));
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(var), "{stderr}");
    }
}

#[tokio::test]
async fn no_password_reaches_the_logs_even_at_trace_level() {
    let env = TestEnv::new().await;
    let id = crate::helpers::unique_id("logs");
    let to = format!("{id}@example.org");
    let mut child = Command::new(env!("CARGO_BIN_EXE_labbook"))
        .args(["run", "all"])
        .env_clear()
        .envs(&env.vars)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LABBOOK_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the logs as they come, so a full pipe never blocks the worker.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
        logs
    });
    env.publish_booking(&crate::helpers::booking_for(
        &id,
        &to,
        3,
        chrono::Utc::now(),
        60,
    ))
    .await;
    crate::helpers::wait_emails(&to, 2).await;
    sigterm(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(30)).code(),
        Some(0)
    );
    let logs = reader.join().unwrap();
    assert!(logs.contains(&id), "the logs talk about the booking");

    let store = env.store().await;
    let mut secrets = Vec::new();
    for c in bookings::credentials(&store.pool, &id).await.unwrap() {
        let context = labbook::crypto::password_context(&id, &c.username);
        secrets.push(env.key.decrypt(&c.password_encrypted, &context).unwrap());
    }
    for s in labbook::store::slots::for_booking(&store.pool, &id)
        .await
        .unwrap()
    {
        let context = labbook::crypto::admin_context(&id, s.slot);
        secrets.push(
            env.key
                .decrypt(&s.admin_password_encrypted, &context)
                .unwrap(),
        );
    }
    assert_eq!(secrets.len(), 3 + 2);
    for s in &secrets {
        assert!(!logs.contains(s.expose()), "a password is in the logs");
    }
}
