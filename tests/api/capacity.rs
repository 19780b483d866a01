//! The account's capacity and the booking's cost: a machine EC2 has no capacity for is tried
//! on the next subnet, then the next instance type (a proxy in front of the emulator answers
//! `RunInstances` for a chosen type and subnet with EC2's capacity error); a booking no
//! offering serves fails once, saying what was tried; the `ended` event gives the machines'
//! running time and, with prices, their cost.

use std::time::Duration;

use labbook::startup::Worker;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::helpers::{
    TestEnv, booking_json, emails_to, eventually, instances_for, raw_ec2, unique_id, wait_emails,
};
use crate::throttling::ThrottlingProxy;

const WAIT: Duration = Duration::from_secs(60);

/// Two of the emulator's default subnets, in two zones.
async fn two_subnets() -> (String, String) {
    let ec2 = raw_ec2().await;
    let out = ec2.describe_subnets().send().await.unwrap();
    let mut subnets: Vec<(String, String)> = out
        .subnets()
        .iter()
        .filter(|s| s.default_for_az() == Some(true))
        .filter_map(|s| Some((s.availability_zone()?.to_owned(), s.subnet_id()?.to_owned())))
        .collect();
    subnets.sort();
    subnets.dedup_by(|a, b| a.0 == b.0);
    assert!(
        subnets.len() >= 2,
        "the emulator's default VPC has a subnet per zone"
    );
    (subnets[0].1.clone(), subnets[1].1.clone())
}

#[tokio::test]
async fn a_type_without_capacity_in_the_first_zone_launches_on_the_next_offering() {
    let proxy = ThrottlingProxy::start().await;
    let (first, second) = two_subnets().await;
    proxy.refuse_run_instances(
        "t3.micro",
        Some(&first),
        500,
        "InsufficientInstanceCapacity",
    );
    let subnets = format!("{first},{second}");
    let mut env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_INSTANCE_TYPES", "t3.micro,t3.small"),
        ("LABBOOK_SUBNET_IDS", subnets.as_str()),
    ])
    .await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("capacity");
    env.publish_booking(&booking_json(&id, 4, -1)).await;
    env.wait_state(&id, "provisioned").await;
    let machines = instances_for(&id).await;
    assert_eq!(machines.len(), 2, "one machine per slot");
    for m in &machines {
        assert_eq!(m.instance_type().map(|t| t.as_str()), Some("t3.micro"));
        assert_eq!(m.subnet_id(), Some(second.as_str()), "the next subnet");
    }
    let store = env.store().await;
    let types: Vec<(String, String)> =
        sqlx::query_as("SELECT instance_type, subnet_id FROM machines WHERE booking_id = $1")
            .bind(&id)
            .fetch_all(&store.pool)
            .await
            .unwrap();
    assert!(
        types.iter().all(|(t, s)| t == "t3.micro" && *s == second),
        "{types:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_booking_no_offering_serves_fails_once_saying_what_was_tried() {
    let proxy = ThrottlingProxy::start().await;
    proxy.refuse_run_instances("t3.micro", None, 500, "InsufficientInstanceCapacity");
    proxy.refuse_run_instances("t3.small", None, 400, "Unsupported");
    let mut env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_INSTANCE_TYPES", "t3.micro,t3.small"),
    ])
    .await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("no-capacity");
    let to = format!("{id}@example.org");
    let mut booking: serde_json::Value = serde_json::from_str(&booking_json(&id, 2, -1)).unwrap();
    booking["email"] = to.clone().into();
    env.publish_booking(&booking.to_string()).await;
    env.wait_state(&id, "failed").await;
    let sent = wait_emails(&to, 2).await;
    let failure = sent
        .iter()
        .find(|e| e["subject"] == "Booking Failed")
        .expect("the failure email");
    let text = failure["text"].as_str().unwrap();
    assert!(text.contains("no capacity"), "{text}");
    assert!(
        text.contains("t3.micro") && text.contains("t3.small"),
        "what was tried: {text}"
    );
    assert!(instances_for(&id).await.is_empty(), "nothing launched");
    env.stop().await;
    env.drain().await;
    let failures = emails_to(&to)
        .await
        .iter()
        .filter(|e| e["subject"] == "Booking Failed")
        .count();
    assert_eq!(failures, 1, "failed once");
}

#[tokio::test]
async fn the_ended_event_and_the_console_give_the_machines_running_time_and_cost() {
    let mut env = TestEnv::with(&[("LABBOOK_PRICES", "t3.small=3.6")]).await;
    let (conn, channel) = env.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare("cost-events".into(), durable, FieldTable::default())
        .await
        .unwrap();
    let bind = QueueBindOptions::default();
    let (events, key) = ("labbook.events".into(), "booking.ended".into());
    channel
        .queue_bind(
            "cost-events".into(),
            events,
            key,
            bind,
            FieldTable::default(),
        )
        .await
        .unwrap();
    conn.close(200, "done".into()).await.ok();
    env.spawn(&Worker::ALL).await;
    let id = unique_id("cost");
    env.publish_booking(&booking_json(&id, 4, -1)).await;
    env.wait_state(&id, "provisioned").await;
    // The machines ran two hours; the booking is over now.
    let store = env.store().await;
    sqlx::query(
        "UPDATE machines SET launched_at = launched_at - interval '2 hours' WHERE booking_id = $1",
    )
    .bind(&id)
    .execute(&store.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE bookings SET booking_time = now() - interval '4 hours' WHERE booking_id = $1",
    )
    .bind(&id)
    .execute(&store.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE schedule SET due_at = now(), published_at = NULL WHERE booking_id = $1 AND action = 'teardown'")
        .bind(&id)
        .execute(&store.pool)
        .await
        .unwrap();
    env.wait_state(&id, "ended").await;
    let ended = eventually(WAIT, "the ended event", || async {
        env.take("cost-events", 1, Duration::from_secs(1))
            .await
            .pop()
    })
    .await;
    let body: serde_json::Value = serde_json::from_slice(&ended.data).unwrap();
    let lifetimes: f64 = sqlx::query_scalar(
        "SELECT sum(extract(epoch FROM terminated_at - launched_at))::float8 FROM machines WHERE booking_id = $1",
    )
    .bind(&id)
    .fetch_one(&store.pool)
    .await
    .unwrap();
    let seconds = body["machine_seconds"].as_u64().expect("machine_seconds");
    assert!(
        (seconds as f64 - lifetimes).abs() <= 1.0,
        "{seconds} vs {lifetimes}"
    );
    assert!(
        seconds >= 2 * 7200,
        "two machines, two hours each: {seconds}"
    );
    let cost = body["estimated_cost"].as_f64().expect("estimated_cost");
    let expected = lifetimes * 3.6 / 3600.0;
    assert!((cost - expected).abs() < 0.01, "{cost} vs {expected}");
    let remaining: Vec<_> = instances_for(&id)
        .await
        .into_iter()
        .filter(|i| crate::helpers::state_of(i) == "running")
        .collect();
    assert!(remaining.is_empty());
    env.stop().await;
    // The console gives the same figures for the booking, and totals the bookings of a range.
    let console = crate::console::Served::start(&env).await;
    let (status, detail) = console.api(&format!("/api/bookings/{id}")).await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["cost"]["machine_seconds"].as_u64(), Some(seconds));
    let shown = detail["cost"]["estimated_cost"]
        .as_f64()
        .expect("the booking's cost");
    assert!((shown - cost).abs() < 0.001, "{shown} vs {cost}");
    let today = chrono::Utc::now().date_naive();
    let range = format!(
        "/api/bookings?from={}&to={}&q={id}",
        today - chrono::Duration::days(1),
        today
    );
    let (status, list) = console.api(&range).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(
        list["bookings"][0]["machine_seconds"].as_u64(),
        Some(seconds)
    );
    assert_eq!(list["totals"]["machine_seconds"].as_u64(), Some(seconds));
    let total = list["totals"]["estimated_cost"]
        .as_f64()
        .expect("the range's cost");
    assert!((total - cost).abs() < 0.001, "{total} vs {cost}");
    // A range before the booking holds nothing, and costs nothing.
    let before = format!("/api/bookings?to={}", today - chrono::Duration::days(2));
    let (_, empty) = console.api(&before).await;
    assert_eq!(empty["totals"]["machine_seconds"], 0, "{empty}");
    assert_eq!(empty["totals"]["estimated_cost"], serde_json::Value::Null);
}

/// The account's capacity as the provisioner last read it: (quota, other vCPUs, per machine).
async fn reading(env: &TestEnv) -> Option<(f64, i64, i32)> {
    let store = env.store().await;
    sqlx::query_as("SELECT quota_vcpus, other_vcpus, vcpus_per_machine FROM account_capacity")
        .fetch_optional(&store.pool)
        .await
        .unwrap()
}

/// The `accepted` event's detail of the booking's first revision, from its history.
async fn accepted_detail(env: &TestEnv, id: &str) -> String {
    let store = env.store().await;
    labbook::store::events::history(&store.pool, id)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.event == "accepted")
        .map(|e| e.detail)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_booking_over_the_vcpu_quota_is_flagged_at_intake_and_still_provisioned() {
    let proxy = ThrottlingProxy::start().await;
    proxy.set_vcpu_quota(10_000.0);
    let mut env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_SWEEP_INTERVAL_SECONDS", "1"),
    ])
    .await;
    env.spawn(&Worker::ALL).await;
    let first = eventually(WAIT, "the quota read", || async { reading(&env).await }).await;
    assert_eq!(first.0, 10_000.0, "the applied value Service Quotas gives");
    assert_eq!(first.2, 2, "a t3.micro has 2 vCPUs (DescribeInstanceTypes)");
    // Room for four machines beside what else runs in the account (other tests' machines
    // may come and go meanwhile): the one-machine booking fits, six machines do not.
    let quota = (first.1 + 4 * 2) as f64;
    proxy.set_vcpu_quota(quota);
    eventually(WAIT, "the new quota read", || async {
        reading(&env).await.filter(|r| r.0 == quota)
    })
    .await;

    // 2 users: one machine, within the quota.
    let small = unique_id("quota-fits");
    env.publish_booking(&booking_json(&small, 2, 0)).await;
    env.wait_state(&small, "provisioned").await;
    // 10 users: five machines more at the same time, over it.
    let big = unique_id("quota-over");
    env.publish_booking(&booking_json(&big, 10, 0)).await;
    env.wait_state(&big, "provisioned").await;
    assert_eq!(
        instances_for(&big).await.len(),
        5,
        "accepted and provisioned"
    );

    assert!(
        !accepted_detail(&env, &small).await.contains("quota"),
        "a booking that fits is not flagged"
    );
    let detail = accepted_detail(&env, &big).await;
    let needed: i64 = detail
        .split("capacity: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no capacity warning in {detail:?}"));
    assert!(
        needed >= (1 + 5) * 2 + first.1,
        "its six machines and what else runs: {detail}"
    );
    assert!(
        detail.contains(&format!(
            "vCPUs would run at the booking's time, over the account's quota of {quota}"
        )),
        "{detail}"
    );
    env.stop().await;
}

/// A booking stored as the intake stores it, in `tx`: its row, then the capacity check.
async fn store_and_check(
    tx: &mut sqlx::PgConnection,
    id: &str,
    at: chrono::DateTime<chrono::Utc>,
    users: i32,
) -> Option<labbook::store::capacity::OverQuota> {
    sqlx::query(
        "INSERT INTO bookings (booking_id, email, booking_time, number_of_users, duration_minutes,
                               revision, first_revision, schedule_revision)
         VALUES ($1, 'trainer@example.org', $2, $3, 60, 1, 1, 1)",
    )
    .bind(id)
    .bind(at)
    .bind(users)
    .execute(&mut *tx)
    .await
    .unwrap();
    let window = (at, at + chrono::Duration::minutes(60));
    let machines = i64::from(users / 2);
    labbook::store::capacity::check(tx, id, window, machines, 2)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_bookings_stored_at_once_are_counted_one_after_the_other() {
    // Two intakes (two replicas) store a booking each for the same hour, at once. Each fits the
    // quota of 6 vCPUs alone (2 machines of 2 vCPUs each), together they do not.
    let env = TestEnv::new().await;
    let store = env.store().await;
    let capacity = labbook::ec2::quota::Capacity {
        quota_vcpus: 6.0,
        other_vcpus: 0,
        vcpus_per_machine: 2,
    };
    labbook::store::capacity::save(&store.pool, &capacity)
        .await
        .unwrap();
    let at = chrono::Utc::now() + chrono::Duration::days(3);
    let (first, second) = (unique_id("burst-a"), unique_id("burst-b"));
    let mut tx1 = store.pool.begin().await.unwrap();
    assert!(
        store_and_check(&mut tx1, &first, at, 4).await.is_none(),
        "the first fits"
    );
    // The second's check waits for the first's transaction: a check that did not would count
    // without the first (not committed yet) and let it through too.
    let pool = store.pool.clone();
    let second_id = second.clone();
    let checking = tokio::spawn(async move {
        let mut tx2 = pool.begin().await.unwrap();
        let over = store_and_check(&mut tx2, &second_id, at, 4).await;
        tx2.commit().await.unwrap();
        over
    });
    // Proven waiting by PostgreSQL itself: the second's session waits on the advisory lock.
    eventually(Duration::from_secs(10), "the second check waits", || {
        let pool = store.pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting == 1).then_some(())
        }
    })
    .await;
    assert!(!checking.is_finished());
    tx1.commit().await.unwrap();
    let over = checking.await.unwrap().expect("the second goes over");
    assert_eq!((over.needed_vcpus, over.quota_vcpus), (8, 6.0));
}
