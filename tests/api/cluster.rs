//! A three-node RabbitMQ cluster (docs/contract.md §2, version 3): `AMQP_URL` lists the nodes,
//! the workers move to another when theirs goes away, and nothing is lost or repeated. These
//! tests need the cluster `scripts/test-cluster.sh` starts (`TEST_CLUSTER` names the script
//! that kills and restarts its nodes), so they are ignored in the main run.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use labbook::startup::Worker;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;

use crate::helpers::{TestEnv, booking_for, eventually, unique_id};

const WAIT: Duration = Duration::from_secs(120);

/// Runs the cluster script (`kill N`, `restart N`, …).
fn cluster(args: &[&str]) {
    let script = std::env::var("TEST_CLUSTER").expect("TEST_CLUSTER names the cluster script");
    let out = Command::new(&script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Cluster {
    env: TestEnv,
    outbox: String,
}

impl Cluster {
    async fn new() -> Self {
        let outbox = unique_id("cluster-outbox");
        let smtp = format!("memory://{outbox}");
        let env = TestEnv::with(&[("SMTP_URL", smtp.as_str())]).await;
        assert!(
            env.amqp_url().matches("amqp://").count() == 3,
            "the workers are given the three nodes"
        );
        let (conn, channel) = env.channel().await;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare("test-events".into(), durable, quorum)
            .await
            .unwrap();
        channel
            .queue_bind(
                "test-events".into(),
                "labbook.events".into(),
                "booking.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        conn.close(200, "done".into()).await.ok();
        Self { env, outbox }
    }

    /// Publishes bookings `from..to`, each for its own trainer two days ahead.
    async fn publish(&self, prefix: &str, from: usize, to: usize) -> Vec<String> {
        let at = Utc::now() + chrono::Duration::days(2);
        let mut ids = Vec::new();
        for i in from..to {
            let id = format!("{prefix}-{i}");
            let body = booking_for(&id, &trainer(&id), 2, at, 60);
            self.env.publish_booking(&body).await;
            ids.push(id);
        }
        ids
    }

    /// Confirmation emails sent so far, per recipient.
    async fn emails(&self) -> HashMap<String, usize> {
        let mut per = HashMap::new();
        for (_, raw) in labbook::mail::memory_outbox(&self.outbox).messages().await {
            let to = raw
                .lines()
                .find_map(|l| l.strip_prefix("To: "))
                .unwrap_or_default()
                .trim()
                .to_owned();
            *per.entry(to).or_default() += 1;
        }
        per
    }

    async fn wait_confirmations(&self, n: usize) {
        eventually(WAIT, &format!("{n} confirmation emails"), || async {
            let sent: usize = self.emails().await.values().sum();
            (sent >= n).then_some(())
        })
        .await;
    }

    /// Stops the workers, handles whatever is left, and checks that every booking got exactly
    /// one confirmation and its events, and that nothing was dead-lettered.
    async fn check_exactly_once(mut self, ids: &[String]) {
        self.env.stop().await;
        self.env.drain().await;
        assert_eq!(self.env.retries_waiting().await, 0, "no retry waiting");
        let emails = self.emails().await;
        for id in ids {
            assert_eq!(
                emails.get(&trainer(id)).copied(),
                Some(1),
                "one confirmation for {id}: {emails:?}"
            );
        }
        assert_eq!(emails.len(), ids.len(), "no other email: {emails:?}");
        let topology = labbook::broker::Topology::new(self.env.settings().broker.retry_delays);
        for queue in topology
            .queue_names()
            .iter()
            .filter(|q| q.ends_with(".dlq"))
        {
            assert_eq!(
                self.env.depth(queue).await,
                0,
                "nothing dead-lettered in {queue}"
            );
        }
        // Events go out at least once: a consumer de-duplicates by message id.
        let mut seen = HashSet::new();
        let mut events: HashMap<String, Vec<String>> = HashMap::new();
        for d in self
            .env
            .take("test-events", 10_000, Duration::from_millis(500))
            .await
        {
            let id = d.properties.message_id().as_ref().unwrap().to_string();
            if seen.insert(id) {
                let body: Value = serde_json::from_slice(&d.data).unwrap();
                events
                    .entry(body["booking_id"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(body["event"].as_str().unwrap().to_owned());
            }
        }
        for id in ids {
            assert_eq!(
                events.get(id).map(Vec::as_slice),
                Some(&["accepted".to_owned(), "confirmed".to_owned()][..]),
                "{id}'s events, in order"
            );
        }
    }
}

fn trainer(id: &str) -> String {
    format!("{id}@example.org")
}

#[tokio::test]
#[ignore = "needs the three-node cluster of scripts/test-cluster.sh"]
async fn the_node_holding_the_connections_killed_mid_flight_loses_and_repeats_nothing() {
    let mut c = Cluster::new().await;
    c.env
        .spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Notifier])
        .await;
    let ids = c.publish(&unique_id("kill9"), 0, 30).await;
    c.wait_confirmations(1).await;
    // Every worker is connected to the first node AMQP_URL lists.
    cluster(&["kill", "1"]);
    c.wait_confirmations(ids.len()).await;
    cluster(&["restart", "1"]);
    c.check_exactly_once(&ids).await;
}

#[tokio::test]
#[ignore = "needs the three-node cluster of scripts/test-cluster.sh"]
async fn a_rolling_restart_of_the_three_nodes_loses_and_repeats_nothing() {
    let mut c = Cluster::new().await;
    c.env
        .spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Notifier])
        .await;
    let prefix = unique_id("rolling");
    let mut ids = Vec::new();
    for node in 1..=3 {
        let from = ids.len();
        ids.extend(c.publish(&prefix, from, from + 10).await);
        cluster(&["restart", &node.to_string()]);
    }
    c.wait_confirmations(ids.len()).await;
    c.check_exactly_once(&ids).await;
}
