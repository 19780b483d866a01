//! The health page: queue depths and consumers, whether each kind of worker is there, and how
//! the scheduler's timer keeps up.
//!
//! From the broker: whether each stage queue has a consumer (a worker consumes only while it
//! is connected). From the database: whether the timer has published what is due, and its
//! heartbeat row (`store::heartbeat`: when it last ticked, in which process). From each worker
//! named in `LABBOOK_CONSOLE_WORKERS`: its own `/readyz` (broker and database as it sees them).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::broker::{BrokerLink, QueueStats};
use crate::broker::{StageQueue, Topology};
use crate::format_time;
use crate::store::heartbeat;

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
    /// When the timer last ticked (its heartbeat row); `None` if it never did.
    pub last_tick_at: Option<String>,
    /// Seconds since, by the database's clock.
    pub last_tick_age_seconds: Option<i64>,
    /// The process that ticked last (host and pid).
    pub last_tick_by: Option<String>,
    /// No tick for more than [`STALE_TICK_SECONDS`]: no scheduler runs, or it is stuck.
    pub stale: bool,
}

/// A timer that has not ticked for this long is stale (it ticks every second or so).
pub const STALE_TICK_SECONDS: i64 = 60;

/// A worker's metrics endpoint, whose `/readyz` the health page asks.
#[derive(Debug, Clone)]
pub struct WorkerEndpoint {
    /// `host:port`, as configured.
    pub address: String,
}

impl WorkerEndpoint {
    /// Parses `LABBOOK_CONSOLE_WORKERS`' items: `http://HOST:PORT` (a path is ignored).
    pub fn parse_all(items: &[String]) -> Result<Vec<Self>, crate::config::ConfigError> {
        let bad = |item: &str, why: &str| {
            crate::config::ConfigError::new(
                "LABBOOK_CONSOLE_WORKERS",
                format!(
                    "{item:?} {why} (give http://HOST:PORT of each worker's LABBOOK_METRICS_ADDR, comma-separated)"
                ),
            )
        };
        items
            .iter()
            .map(|item| {
                let url = url::Url::parse(item).map_err(|_| bad(item, "is not a URL"))?;
                if url.scheme() != "http" {
                    return Err(bad(item, "is not an http:// URL"));
                }
                let host = url.host_str().ok_or_else(|| bad(item, "names no host"))?;
                let port = url.port().unwrap_or(80);
                Ok(Self {
                    address: format!("{host}:{port}"),
                })
            })
            .collect()
    }
}

/// What a worker's `/readyz` answered.
#[derive(Debug, Clone, Serialize)]
pub struct Readyz {
    /// `http://HOST:PORT/readyz`.
    pub url: String,
    pub ready: bool,
    /// The HTTP status, if it answered.
    pub status: Option<u16>,
    /// Its answer's first line, or why there was none.
    pub detail: String,
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
    /// Each configured worker's `/readyz`.
    pub readyz: Vec<Readyz>,
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

pub async fn check(
    link: &BrokerLink,
    topology: &Topology,
    pool: &PgPool,
    endpoints: &[WorkerEndpoint],
) -> Health {
    let (queues, broker_error) = match queues(link, topology).await {
        Ok(q) => (q, None),
        Err(e) => (Vec::new(), Some(super::errors::broker(&e))),
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
        Err(e) => (None, Some(super::errors::database(&e))),
    };
    let readyz = futures_util::future::join_all(endpoints.iter().map(ask_readyz)).await;
    Health {
        broker_error,
        database_error,
        queues,
        workers,
        scheduler,
        readyz,
        checked_at: format_time(Utc::now()),
    }
}

/// How long a worker has to answer its `/readyz`.
const READYZ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /readyz` on the worker, over plain HTTP/1.0 (the workers' endpoint speaks nothing
/// else; no client library is needed for one request line).
async fn ask_readyz(endpoint: &WorkerEndpoint) -> Readyz {
    let url = format!("http://{}/readyz", endpoint.address);
    let answer = tokio::time::timeout(READYZ_TIMEOUT, http_get(&endpoint.address, "/readyz")).await;
    let (status, detail) = match answer {
        Err(_) => (None, format!("no answer within {READYZ_TIMEOUT:?}")),
        Ok(Err(e)) => (None, format!("cannot connect: {e}")),
        Ok(Ok((status, body))) => {
            let first = body.lines().next().unwrap_or("").trim().to_owned();
            (Some(status), first)
        }
    };
    Readyz {
        url,
        ready: status == Some(200),
        status,
        detail,
    }
}

async fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.take(16 * 1024).read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(invalid)?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
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
    let beat = heartbeat::last(pool, heartbeat::SCHEDULER_TIMER).await?;
    let age = beat
        .as_ref()
        .map(|b| (b.now - b.beat_at).num_seconds().max(0));
    Ok(SchedulerHealth {
        last_published_at: last.map(format_time),
        overdue,
        oldest_overdue_due_at: oldest.map(format_time),
        next_due_at: next.map(format_time),
        last_tick_at: beat.as_ref().map(|b| format_time(b.beat_at)),
        last_tick_age_seconds: age,
        last_tick_by: beat.map(|b| b.beater),
        stale: age.is_none_or(|a| a > STALE_TICK_SECONDS),
    })
}
