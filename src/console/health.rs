//! The health page: queue depths and consumers, whether each kind of worker is there, and how
//! the scheduler's timer keeps up.
//!
//! Workers serve their own `/readyz` on their own hosts; what the console can see from the
//! broker is whether each stage queue has a consumer (a worker consumes only while it is
//! connected), and from the database whether the timer has published what is due.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::broker::{BrokerLink, QueueStats};
use crate::broker::{StageQueue, Topology};
use crate::format_time;

/// A stage queue, its dead letters and the messages waiting to be retried.
#[derive(Debug, Clone, Serialize)]
pub struct QueueHealth {
    pub queue: String,
    pub messages: u32,
    pub consumers: u32,
    pub dead_letters: u32,
    pub retrying: u32,
}

/// A kind of worker and whether every queue it consumes has a consumer.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerHealth {
    pub worker: &'static str,
    pub queues: Vec<&'static str>,
    pub consumers: u32,
    pub ready: bool,
}

/// The durable timer, as the schedule table shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SchedulerHealth {
    /// When the timer last published a due item.
    pub last_published_at: Option<String>,
    /// Items due more than a minute ago and not published: the timer is not keeping up.
    pub overdue: i64,
    pub oldest_overdue_due_at: Option<String>,
    pub next_due_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Why the broker could not be read, if it could not.
    pub broker_error: Option<String>,
    /// Why the database could not be read, if it could not.
    pub database_error: Option<String>,
    pub queues: Vec<QueueHealth>,
    pub workers: Vec<WorkerHealth>,
    pub scheduler: Option<SchedulerHealth>,
    pub checked_at: String,
}

/// The workers and the queues each consumes.
const WORKERS: &[(&str, &[StageQueue])] = &[
    ("labbook-credentials", &[StageQueue::BookingCreated]),
    ("labbook-scheduler", &[StageQueue::CredentialsReady]),
    (
        "labbook-provisioner",
        &[StageQueue::ProvisionDue, StageQueue::TeardownDue],
    ),
    ("labbook-notifier", &[StageQueue::Notify]),
];

pub async fn check(link: &BrokerLink, topology: &Topology, pool: &PgPool) -> Health {
    let (queues, broker_error) = match queues(link, topology).await {
        Ok(q) => (q, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let workers = WORKERS
        .iter()
        .map(|(worker, consumes)| {
            let counts: Vec<u32> = consumes
                .iter()
                .map(|q| {
                    let found = queues.iter().find(|h| h.queue == q.name());
                    found.map_or(0, |h| h.consumers)
                })
                .collect();
            WorkerHealth {
                worker,
                queues: consumes.iter().map(|q| q.name()).collect(),
                consumers: counts.iter().copied().min().unwrap_or(0),
                ready: counts.iter().all(|c| *c > 0),
            }
        })
        .collect();
    let (scheduler, database_error) = match scheduler(pool).await {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(format!("the database does not answer: {e}"))),
    };
    Health {
        broker_error,
        database_error,
        queues,
        workers,
        scheduler,
        checked_at: format_time(Utc::now()),
    }
}

async fn queues(link: &BrokerLink, topology: &Topology) -> anyhow::Result<Vec<QueueHealth>> {
    let mut out = Vec::new();
    for stage in StageQueue::ALL {
        let QueueStats {
            messages,
            consumers,
        } = link.stats(stage.name()).await?;
        let mut retrying = 0;
        for delay in &topology.retry_delays {
            let name = crate::broker::delay_queue_name(stage, *delay);
            retrying += link.stats(&name).await.map_or(0, |s| s.messages);
        }
        out.push(QueueHealth {
            queue: stage.name().to_owned(),
            messages,
            consumers,
            dead_letters: link.stats(&stage.dlq()).await?.messages,
            retrying,
        });
    }
    Ok(out)
}

async fn scheduler(pool: &PgPool) -> Result<SchedulerHealth, sqlx::Error> {
    type Row = (
        Option<DateTime<Utc>>,
        i64,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let (last, overdue, oldest, next): Row = sqlx::query_as(
        "SELECT (SELECT max(published_at) FROM schedule),
                (SELECT count(*) FROM schedule
                  WHERE published_at IS NULL AND due_at < now() - interval '1 minute'),
                (SELECT min(due_at) FROM schedule
                  WHERE published_at IS NULL AND due_at < now() - interval '1 minute'),
                (SELECT min(due_at) FROM schedule WHERE published_at IS NULL AND due_at >= now())",
    )
    .fetch_one(pool)
    .await?;
    Ok(SchedulerHealth {
        last_published_at: last.map(format_time),
        overdue,
        oldest_overdue_due_at: oldest.map(format_time),
        next_due_at: next.map(format_time),
    })
}
