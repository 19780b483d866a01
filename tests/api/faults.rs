//! Faults that follow each other (docs/contract.md §2, version 2): each test forces the
//! sequence against the real broker, database, SMTP server and EC2 emulator.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use labbook::broker::{StageQueue, dlq};
use labbook::domain::{EmailKind, NotifyMessage};
use labbook::startup::Worker;
use labbook::store::{bookings, emails};
use lapin::BasicProperties;

use crate::helpers::{
    METRICS_ON, TestEnv, booking_for, booking_json, eventually, header, instances_for, publish_ref,
    state_of, unique_id, wait_waiting,
};

const WAIT: Duration = Duration::from_secs(30);

/// Takes `notify` messages until one of `kind` for `booking_id` arrives.
async fn wait_notify(env: &TestEnv, booking_id: &str, kind: EmailKind) {
    eventually(WAIT, "a notify message", || async {
        env.take("notify", 10, Duration::from_millis(300))
            .await
            .into_iter()
            .map(|d| serde_json::from_slice::<NotifyMessage>(&d.data).unwrap())
            .find(|n| n.kind == kind && n.booking_id == booking_id)
    })
    .await;
}

/// A relay that greylists: the first `RCPT` gets `451`, the later ones `250`.
fn greylisting(n: usize) -> &'static [u8] {
    if n == 0 {
        b"451 4.7.1 greylisted, try again later\r\n"
    } else {
        b"250 OK\r\n"
    }
}

#[tokio::test]
async fn a_relay_outage_then_greylisting_still_delivers_the_email() {
    // Two attempts in all: an outage that spent attempts would leave none for the 451.
    let port = crate::helpers::free_port();
    let smtp = format!("smtp://127.0.0.1:{port}");
    let mut env = TestEnv::with(&[
        ("SMTP_URL", smtp.as_str()),
        ("LABBOOK_RETRY_DELAYS_MS", "100,200"),
        ("LABBOOK_MAX_ATTEMPTS", "2"),
    ])
    .await;
    let metrics = env
        .spawn_with(&[Worker::Credentials, Worker::Notifier], &[METRICS_ON])
        .await;
    let id = unique_id("outage-451");
    let to = format!("{id}@example.org");
    let at = Utc::now() + chrono::Duration::days(1);
    env.publish_booking(&booking_for(&id, &to, 1, at, 60)).await;

    // The relay is down for a while: the confirmation waits, many times more than its
    // attempts (the delays are 100 and 200 ms).
    env.wait_state(&id, "received").await;
    wait_waiting(metrics, "notify", 5).await;
    let store = env.store().await;
    assert_eq!(
        env.depth("notify.dlq").await,
        0,
        "an outage dead-letters nothing"
    );

    let (relay, accepted) = crate::helpers::scripted_smtp(port, greylisting).await;
    eventually(WAIT, "the email delivered after the 451", || async {
        let log = emails::for_booking(&store.pool, &id).await.unwrap();
        log.iter().any(|e| e.sent_at.is_some()).then_some(())
    })
    .await;
    assert_eq!(accepted.lock().unwrap().len(), 1, "delivered once");
    assert!(accepted.lock().unwrap()[0].contains(&to));
    assert_eq!(env.depth("notify.dlq").await, 0);
    relay.abort();
    env.stop().await;
}

/// A booking stored as failed, as `give_up` leaves it.
async fn failed_booking(env: &TestEnv, id: &str) {
    env.publish_booking(&booking_json(id, 2, -1)).await;
    env.wait_state(id, "scheduled").await;
    let store = env.store().await;
    sqlx::query(
        "UPDATE bookings SET state = 'failed', failure_reason = 'test' WHERE booking_id = $1",
    )
    .bind(id)
    .execute(&store.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_failed_bookings_provision_message_asks_for_the_failure_email_again() {
    // give_up committed `failed`, then publishing the failure notify failed: the message comes
    // again and must not be acked with nothing sent.
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler]).await;
    let id = unique_id("lost-failure");
    failed_booking(&env, &id).await;
    env.stop().await;
    env.take("notify", 10, Duration::from_millis(300)).await;
    env.spawn(&[Worker::Provisioner]).await;
    publish_ref(&env, "provision-due", &id).await;
    wait_notify(&env, &id, EmailKind::Failure).await;
    assert!(instances_for(&id).await.is_empty(), "nothing launched");
    env.stop().await;
}

#[tokio::test]
async fn replaying_a_failed_bookings_provisioning_provisions_it() {
    let mut env = TestEnv::new().await;
    // The cause: a subnet that does not exist.
    env.spawn_with(
        &[Worker::Credentials, Worker::Scheduler, Worker::Provisioner],
        &[("LABBOOK_SUBNET_ID", "subnet-doesnotexist")],
    )
    .await;
    let id = unique_id("replay-failed");
    env.publish_booking(&booking_json(&id, 3, -1)).await;
    env.wait_state(&id, "failed").await;
    eventually(WAIT, "the dead letter", || async {
        (env.depth("provision-due.dlq").await == 1).then_some(())
    })
    .await;
    env.stop().await;

    // The operator fixes the cause and replays.
    env.spawn(&[Worker::Provisioner]).await;
    let conn = labbook::broker::connect(&env.amqp_url(), "test")
        .await
        .unwrap();
    let report = dlq::replay(&conn, StageQueue::ProvisionDue, Some(&id), None, |_| {
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(report.replayed, 1);
    env.wait_state(&id, "provisioned").await;
    wait_notify(&env, &id, EmailKind::InstanceDetails).await;
    let running = instances_for(&id)
        .await
        .iter()
        .filter(|i| state_of(i) == "running")
        .count();
    assert_eq!(running, 2, "both machines launched anew");
    env.stop().await;
}

#[tokio::test]
async fn a_stray_teardown_is_dead_lettered_and_the_class_keeps_its_machines() {
    let mut env = TestEnv::new().await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("stray");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    env.wait_state(&id, "provisioned").await;
    publish_ref(&env, "teardown-due", &id).await;
    let dead = env.take("teardown-due.dlq", 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    let error = header(&dead[0], "x-labbook-error").unwrap();
    assert!(error.contains("has not ended"), "{error}");
    let store = env.store().await;
    let booking = bookings::find(&store.pool, &id).await.unwrap().unwrap();
    assert_eq!(booking.state.as_str(), "provisioned");
    let instances = instances_for(&id).await;
    assert!(instances.iter().all(|i| state_of(i) == "running"));
    env.stop().await;
}

#[tokio::test]
async fn a_broker_user_without_configure_permission_consumes_with_passive_checks() {
    let mut env = TestEnv::new().await;
    // The operator declares the topology as an admin user.
    drop(env.channel().await);
    let user = format!("lb-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    crate::helpers::rabbitmqctl(&["add_user", &user, "secret-pw"]);
    crate::helpers::rabbitmqctl(&["set_permissions", "-p", &env.vhost, &user, "^$", ".*", ".*"]);
    let url = format!("amqp://{user}:secret-pw@127.0.0.1:5672/{}", env.vhost);
    let url = std::env::var("TEST_AMQP_BASE")
        .map(|base| {
            format!(
                "{}/{}",
                base.replacen("guest:guest", &format!("{user}:secret-pw"), 1),
                env.vhost
            )
        })
        .unwrap_or(url);
    env.spawn_with(
        &[Worker::Credentials],
        &[
            ("AMQP_URL", url.as_str()),
            ("LABBOOK_DECLARE_TOPOLOGY", "false"),
        ],
    )
    .await;
    let id = unique_id("no-configure");
    env.publish_booking(&booking_json(&id, 1, 24)).await;
    let ready = env.take("credentials-ready", 1, WAIT).await;
    crate::helpers::rabbitmqctl(&["delete_user", &user]);
    assert_eq!(ready.len(), 1, "the worker consumed without declaring");
    env.stop().await;
}

/// The process's peak resident memory, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_huge_message_is_dead_lettered_without_reading_it() {
    // 50 MiB; RabbitMQ 4.x refuses messages over 16 MiB unless told otherwise, so its run sets
    // TEST_HUGE_MESSAGE_MIB lower.
    let mib: usize = std::env::var("TEST_HUGE_MESSAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let body_len = mib * 1024 * 1024;
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials]).await;
    let before = peak_rss();
    let mut body = br#"{"booking_id": "huge", "padding": ""#.to_vec();
    body.resize(body_len, b'a');
    body.extend_from_slice(br#""}"#);
    let props = BasicProperties::default().with_content_type("application/json".into());
    env.publish_raw("booking-created", &body, props).await;
    drop(body);
    let dead = env
        .take("booking-created.dlq", 1, Duration::from_secs(60))
        .await;
    assert_eq!(dead.len(), 1);
    let error = header(&dead[0], "x-labbook-error").unwrap();
    assert!(error.contains("at most 65536"), "{error}");
    assert_eq!(
        dead[0].data.len(),
        body_len + 2,
        "the body is kept byte for byte"
    );
    let grown = peak_rss().saturating_sub(before);
    // The test itself holds the body while publishing and taking it back; the worker adds
    // its delivery and the dead letter's copy.
    assert!(
        grown < 8 * body_len as u64,
        "peak memory grew by {} MiB for a {mib} MiB message",
        grown >> 20,
    );
    env.stop().await;
}

#[tokio::test]
async fn giving_up_on_a_provisioned_bookings_message_keeps_its_machines() {
    // E.g. a provision-due redelivered too often while the broker refused its outcome.
    use labbook::broker::Stage;
    let mut env = TestEnv::new().await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("kept");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    env.wait_state(&id, "provisioned").await;
    env.stop().await;

    let settings = env.settings();
    let provisioner = labbook::stages::provisioner::Provisioner::new(
        env.store().await,
        env.ec2().await,
        env.key.clone(),
        settings.ec2.clone(),
        "ami-03cf127a".into(),
    );
    let stage = labbook::stages::provisioner::ProvisionStage(provisioner);
    let msg = labbook::domain::BookingRef {
        booking_id: id.clone(),
        revision: None,
    };
    let follow_up = stage.give_up(&msg, "test: gave up").await.unwrap();
    assert!(follow_up.is_empty(), "no failure email");
    let store = env.store().await;
    let booking = bookings::find(&store.pool, &id).await.unwrap().unwrap();
    assert_eq!(booking.state.as_str(), "provisioned");
    assert!(
        instances_for(&id)
            .await
            .iter()
            .all(|i| state_of(i) == "running")
    );
}

#[tokio::test]
async fn an_ec2_outage_then_recovery_provisions_without_spending_attempts() {
    // Two attempts in all; the EC2 endpoint does not answer for a while, then comes back.
    let port = crate::helpers::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("LABBOOK_RETRY_DELAYS_MS", "100,200"),
        ("LABBOOK_MAX_ATTEMPTS", "2"),
    ])
    .await;
    let metrics = env
        .spawn_with(
            &[Worker::Credentials, Worker::Scheduler, Worker::Provisioner],
            &[METRICS_ON],
        )
        .await;
    let id = unique_id("ec2-away");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    env.wait_state(&id, "provisioning").await;
    // Waiting, more times than its two attempts.
    wait_waiting(metrics, "provision-due", 4).await;
    assert_eq!(env.depth("provision-due.dlq").await, 0);
    let moto = crate::helpers::moto_url();
    let _ec2 = crate::helpers::Relay::start(port, moto.trim_start_matches("http://")).await;
    env.wait_state(&id, "provisioned").await;
    assert_eq!(env.depth("provision-due.dlq").await, 0);
    assert!(
        instances_for(&id)
            .await
            .iter()
            .all(|i| state_of(i) == "running")
    );
    env.stop().await;
}

/// A relay to RabbitMQ that can stop passing on what the broker says (a broker that takes
/// messages but never confirms them: a memory alarm, a lost quorum).
async fn stalling_relay(target: String) -> (u16, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let flag = flag.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // What the broker says while stalled is held back.
                    while flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, stalled)
}

#[tokio::test]
async fn a_publish_the_broker_never_confirms_fails_within_its_bound() {
    use labbook::broker::{PublishError, Topology, confirmed_channel, json_properties};
    let env = TestEnv::new().await;
    let base = crate::helpers::amqp_base();
    let target = base.rsplit('@').next().unwrap().to_owned();
    let (port, stalled) = stalling_relay(target).await;
    let url = format!(
        "{}@127.0.0.1:{port}/{}",
        base.rsplit_once('@').unwrap().0,
        env.vhost
    );
    let conn = labbook::broker::connect(&url, "labbook test")
        .await
        .unwrap();
    let topology = Topology::new(env.settings().broker.retry_delays);
    let channel = confirmed_channel(&conn, &topology).await.unwrap();
    stalled.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let bound = Duration::from_millis(800);
    let route = ("labbook", "booking-created");
    let result =
        labbook::broker::publish_confirmed(&channel, route, b"{}", json_properties("x"), bound)
            .await;
    assert!(
        matches!(result, Err(PublishError::Unconfirmed(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "bounded");
}

/// A relay to PostgreSQL that, like a pooler exposing one database, refuses a connection to
/// any other database (SQLSTATE 3D000), the `postgres` maintenance database included.
async fn one_database_relay(allowed: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = crate::helpers::pg_host_port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (allowed, target) = (allowed.clone(), target.clone());
            tokio::spawn(async move {
                // SSL and GSS requests are answered "no"; then comes the startup message.
                let startup = loop {
                    let len = client.read_u32().await.unwrap() as usize;
                    let mut rest = vec![0u8; len - 4];
                    client.read_exact(&mut rest).await.unwrap();
                    if rest[..4] == [0x04, 0xd2, 0x16, 0x2f]
                        || rest[..4] == [0x04, 0xd2, 0x16, 0x30]
                    {
                        client.write_all(b"N").await.unwrap();
                        continue;
                    }
                    break [(len as u32).to_be_bytes().to_vec(), rest].concat();
                };
                let fields: Vec<&[u8]> = startup[8..].split(|b| *b == 0).collect();
                let database = fields
                    .chunks(2)
                    .find(|kv| kv[0] == b"database")
                    .map(|kv| String::from_utf8_lossy(kv[1]).into_owned());
                if database.as_deref() != Some(allowed.as_str()) {
                    let mut body = Vec::new();
                    for (tag, value) in
                        [(b'S', "FATAL"), (b'C', "3D000"), (b'M', "no such database")]
                    {
                        body.push(tag);
                        body.extend_from_slice(value.as_bytes());
                        body.push(0);
                    }
                    body.push(0);
                    let mut error = vec![b'E'];
                    error.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                    error.extend_from_slice(&body);
                    let _ = client.write_all(&error).await;
                    return;
                }
                let mut server = tokio::net::TcpStream::connect(&target).await.unwrap();
                server.write_all(&startup).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn migrations_reach_the_target_database_without_the_maintenance_database() {
    use sqlx::{Connection, Executor};
    let env = TestEnv::unprepared(&[]);
    let base = crate::helpers::pg_base();
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    let create = format!(r#"CREATE DATABASE "{}""#, env.db_name);
    admin.execute(sqlx::AssertSqlSafe(create)).await.unwrap();
    let port = one_database_relay(env.db_name.clone()).await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", env.db_name);

    let refused =
        sqlx::PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .await;
    assert!(refused.is_err(), "the relay exposes one database only");
    let store = labbook::store::Store::connect_lazy(&url, 2).unwrap();
    store
        .ensure_schema(&url)
        .await
        .expect("migrated through the relay");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('bookings', 'slots', 'emails')",
    )
    .fetch_one(&env.store().await.pool)
    .await
    .unwrap();
    assert_eq!(tables, 3);
}
