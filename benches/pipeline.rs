//! Throughput and latency figures for labbook's stages, against the real services of this
//! machine (RabbitMQ, PostgreSQL, the moto EC2 emulator, the maildev SMTP sink; start them with
//! `scripts/services.sh`). It prints figures; it asserts nothing about speed.
//!
//!     cargo bench --bench pipeline
//!
//! Each scenario runs in its own vhost and database, like the tests.

#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;

use std::time::{Duration, Instant};

use chrono::Utc;
use helpers::{TestEnv, booking_for, booking_json, eventually, unique_id, wait_emails};
use labbook::domain::{EmailKind, NotifyMessage};
use labbook::startup::Worker;

const WAIT: Duration = Duration::from_secs(600);

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Sum of `labbook_ec2_calls_total` per operation, from the process's recorder.
fn ec2_calls() -> Vec<(String, u64)> {
    let text = labbook::health::prometheus().render();
    let mut out: Vec<(String, u64)> = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("labbook_ec2_calls_total{"))
    {
        let op = line
            .split("operation=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_owned();
        let n: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        match out.iter_mut().find(|(o, _)| *o == op) {
            Some((_, total)) => *total += n,
            None => out.push((op, n)),
        }
    }
    out.sort();
    out
}

async fn credentials_throughput(n: usize, users: u32) {
    let mut env = TestEnv::with(&[("LABBOOK_PREFETCH", "16")]).await;
    for i in 0..n {
        env.publish_booking(&booking_json(&format!("bench-{i}"), users, 24))
            .await;
    }
    let started = Instant::now();
    env.spawn(&[Worker::Credentials]).await;
    eventually(WAIT, "every booking handled", || async {
        (env.depth("credentials-ready").await as usize >= n).then_some(())
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    env.stop().await;
    println!(
        "credentials stage: {n} bookings of {users} users in {secs:.2} s = {:.1} bookings/s ({:.0} credentials/s)",
        n as f64 / secs,
        (n as f64 * f64::from(users)) / secs
    );
}

async fn provisioning(users: u32) {
    let mut env = TestEnv::new().await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Provisioner])
        .await;
    let before = ec2_calls();
    let id = unique_id("bench50");
    let started = Instant::now();
    env.publish_booking(&booking_json(&id, users, -1)).await;
    eventually(WAIT, "the instance-details notify", || async {
        env.take("notify", 10, Duration::from_millis(200))
            .await
            .iter()
            .filter_map(|d| serde_json::from_slice::<NotifyMessage>(&d.data).ok())
            .find(|n| n.kind == EmailKind::InstanceDetails)
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    env.stop().await;
    let after = ec2_calls();
    let calls: Vec<String> = after
        .iter()
        .map(|(op, n)| {
            (
                op,
                n - before.iter().find(|(o, _)| o == op).map_or(0, |(_, b)| *b),
            )
        })
        .filter(|(_, n)| *n > 0)
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    let total: u64 =
        after.iter().map(|(_, n)| n).sum::<u64>() - before.iter().map(|(_, n)| n).sum::<u64>();
    println!(
        "provisioning: {users} users ({} instances) from publish to instance-details notify in {secs:.2} s; {total} EC2 calls ({})",
        users.div_ceil(2),
        calls.join(", ")
    );
}

async fn end_to_end(users: u32) {
    let mut env = TestEnv::new().await;
    env.spawn(&Worker::ALL).await;
    let id = unique_id("bench-e2e");
    let to = format!("{id}@example.org");
    let started = Instant::now();
    env.publish_booking(&booking_for(&id, &to, users, Utc::now(), 60))
        .await;
    let first = wait_emails(&to, 1).await;
    let confirmation = started.elapsed().as_secs_f64();
    assert_eq!(first[0]["subject"], "Booking Confirmation");
    wait_emails(&to, 2).await;
    let secs = started.elapsed().as_secs_f64();
    env.stop().await;
    println!(
        "end to end: {users}-user booking, publish to confirmation email {confirmation:.2} s, to instance-details email {secs:.2} s"
    );
}

async fn notifier_throughput(n: usize) {
    let mut env = TestEnv::with(&[("LABBOOK_PREFETCH", "16")]).await;
    let tag = unique_id("bench-mail");
    env.spawn(&[Worker::Credentials]).await;
    for i in 0..n {
        let id = format!("{tag}-{i}");
        env.publish_booking(&booking_for(
            &id,
            &format!("{tag}@example.org"),
            2,
            Utc::now() + chrono::Duration::days(1),
            60,
        ))
        .await;
    }
    eventually(WAIT, "the notify queue filled", || async {
        (env.depth("notify").await as usize >= n).then_some(())
    })
    .await;
    let started = Instant::now();
    env.spawn(&[Worker::Notifier]).await;
    eventually(WAIT, "every email sent", || async {
        let store = env.store().await;
        let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM emails WHERE sent_at IS NOT NULL")
            .fetch_one(&store.pool)
            .await
            .ok()?;
        (sent as usize >= n).then_some(())
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    env.stop().await;
    println!(
        "notifier: {n} confirmation emails to the local SMTP server in {secs:.2} s = {:.1} emails/s",
        n as f64 / secs
    );
}

#[tokio::main]
async fn main() {
    println!(
        "labbook pipeline benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    labbook::health::prometheus();
    credentials_throughput(200, 5).await;
    credentials_throughput(50, 50).await;
    provisioning(50).await;
    end_to_end(10).await;
    notifier_throughput(200).await;
    println!(
        "peak resident memory of the benchmark process: {:.1} MiB",
        peak_rss_mib()
    );
}
