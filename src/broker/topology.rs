//! The broker topology of docs/contract.md §2, declared idempotently.
//!
//! - exchange `labbook` (direct, durable); each stage queue bound with its own name;
//! - exchange `labbook.events` (topic, durable) for the upstream's events, with no binding;
//! - stage queues and their `<queue>.dlq` dead-letter queues: durable quorum queues;
//! - one delay queue per stage and retry tier, `<queue>.retry.<delay>` (e.g.
//!   `booking-created.retry.10s`): a quorum queue whose fixed message TTL sends the message back
//!   to its stage queue through the default exchange when it expires. Every message in a tier
//!   waits the same time, so none waits behind a longer one.
//!
//! Stage queues and dead-letter queues carry `x-delivery-limit` = [`DELIVERY_LIMIT`], a limit
//! no message reaches: RabbitMQ 4.x gives quorum queues a default limit of 20 and deletes a
//! message returned more often (a confirm timeout during an alarm returns what a channel held,
//! a dry run of a replay returns what it read), and labbook keeps its own crash-loop guard
//! (`MAX_REDELIVERIES`, counting only deliveries a worker may have crashed on). A queue
//! declared by an earlier labbook without the argument is kept as it is (RabbitMQ cannot
//! change a queue's arguments): the policy `labbook-delivery-limit` of
//! `deploy/rabbitmq-definitions.json` gives it the same limit.

use std::fmt;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

/// The exchange every stage queue is bound to.
pub const EXCHANGE: &str = "labbook";

/// The topic exchange of the events upstreams follow (docs/contract.md §7). labbook binds
/// nothing to it: upstreams bind their own queues.
pub const EVENTS_EXCHANGE: &str = "labbook.events";

/// The five stage queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageQueue {
    BookingCreated,
    CredentialsReady,
    ProvisionDue,
    Notify,
    TeardownDue,
}

impl StageQueue {
    pub const ALL: [StageQueue; 5] = [
        StageQueue::BookingCreated,
        StageQueue::CredentialsReady,
        StageQueue::ProvisionDue,
        StageQueue::Notify,
        StageQueue::TeardownDue,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageQueue::BookingCreated => "booking-created",
            StageQueue::CredentialsReady => "credentials-ready",
            StageQueue::ProvisionDue => "provision-due",
            StageQueue::Notify => "notify",
            StageQueue::TeardownDue => "teardown-due",
        }
    }

    pub fn dlq(self) -> String {
        format!("{}.dlq", self.name())
    }

    /// Accepts a stage queue's name or its `.dlq` name.
    pub fn parse(name: &str) -> Option<Self> {
        let base = name.strip_suffix(".dlq").unwrap_or(name);
        Self::ALL.into_iter().find(|q| q.name() == base)
    }
}

impl fmt::Display for StageQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The delivery limit of stage and dead-letter queues: a message returned this many times is
/// one no worker took to its end, which labbook's own guard dead-letters long before.
pub const DELIVERY_LIMIT: i64 = 1_000_000_000;

/// The policy that gives queues declared before [`DELIVERY_LIMIT`] the same limit.
pub const DELIVERY_LIMIT_POLICY: &str = "labbook-delivery-limit";

/// The retry tiers in force, and whether this process declares the topology or only checks
/// it; everything else about the topology is fixed.
#[derive(Debug, Clone)]
pub struct Topology {
    pub retry_delays: Vec<Duration>,
    /// `LABBOOK_DECLARE_TOPOLOGY`: false for a broker user without the *configure* permission
    /// (docs/contract.md §2); [`Topology::prepare`] then only checks, passively.
    pub declare: bool,
}

impl Topology {
    /// A topology this process declares.
    pub fn new(retry_delays: Vec<Duration>) -> Self {
        assert!(!retry_delays.is_empty(), "at least one retry tier");
        Self {
            retry_delays,
            declare: true,
        }
    }

    /// The topology as the broker settings describe it.
    pub fn from_settings(settings: &crate::config::BrokerSettings) -> Self {
        Self {
            declare: settings.declare_topology,
            ..Self::new(settings.retry_delays.clone())
        }
    }

    /// What a worker does at start-up: declares the topology, or with `declare` off checks
    /// passively that every exchange and queue exists (a missing one fails with NOT_FOUND and
    /// the worker tries again later).
    /// `channel` is replaced by a new one of `conn` where the broker closed it (a queue of an
    /// earlier labbook, see [`Topology::declare`]).
    pub async fn prepare(&self, conn: &Connection, channel: &mut Channel) -> lapin::Result<()> {
        if self.declare {
            return self.declare(conn, channel).await;
        }
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        declare_exchanges(channel, passive).await?;
        for name in self.queue_names() {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .queue_declare(name.into(), passive, FieldTable::default())
                .await?;
        }
        Ok(())
    }

    /// The delay before attempt `attempts_done + 1`, and the queue that holds the message
    /// meanwhile. The last tier repeats.
    pub fn delay_for(&self, queue: StageQueue, attempts_done: u32) -> (Duration, String) {
        let tier = (attempts_done.max(1) as usize - 1).min(self.retry_delays.len() - 1);
        let delay = self.retry_delays[tier];
        (delay, delay_queue_name(queue, delay))
    }

    /// Every queue name the topology declares, for documentation and checks.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for q in StageQueue::ALL {
            names.push(q.name().to_owned());
            names.push(q.dlq());
            names.extend(self.retry_delays.iter().map(|d| delay_queue_name(q, *d)));
        }
        names
    }

    /// Declares the whole topology. Safe to call any number of times, from any process. A
    /// stage or dead-letter queue that exists with other arguments (declared by an earlier
    /// labbook, without the delivery limit) is kept: the broker refuses the declaration and
    /// closes `channel`, which is replaced by a new one of `conn`.
    pub async fn declare(&self, conn: &Connection, channel: &mut Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        declare_exchanges(channel, durable_exchange).await?;
        for q in StageQueue::ALL {
            declare_limited(conn, channel, q.name()).await?;
            channel
                .queue_bind(
                    q.name().into(),
                    EXCHANGE.into(),
                    q.name().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            declare_limited(conn, channel, &q.dlq()).await?;
            for delay in &self.retry_delays {
                let mut args = quorum();
                args.insert(
                    "x-message-ttl".into(),
                    AMQPValue::LongLongInt(delay.as_millis() as i64),
                );
                args.insert("x-dead-letter-exchange".into(), long_string(""));
                args.insert("x-dead-letter-routing-key".into(), long_string(q.name()));
                args.insert(
                    "x-dead-letter-strategy".into(),
                    long_string("at-least-once"),
                );
                args.insert("x-overflow".into(), long_string("reject-publish"));
                channel
                    .queue_declare(delay_queue_name(q, *delay).into(), durable, args)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Declares a stage or dead-letter queue with [`DELIVERY_LIMIT`]; one that exists without it
/// (RabbitMQ answers 406 and closes the channel) is checked on a new channel and kept.
async fn declare_limited(
    conn: &Connection,
    channel: &mut Channel,
    name: &str,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = quorum();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    match channel.queue_declare(name.into(), durable, args).await {
        Ok(_) => Ok(()),
        Err(err) if precondition_failed(&err) => {
            *channel = conn.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .queue_declare(name.into(), passive, FieldTable::default())
                .await?;
            tracing::warn!(
                queue = name,
                policy = DELIVERY_LIMIT_POLICY,
                "this queue was declared by an earlier labbook, without a delivery limit, and is \
                 kept as it is; on RabbitMQ 4.x apply the policy (deploy/README.md, \"Upgrading\") \
                 or the broker deletes a message returned 20 times"
            );
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// The broker refused a declaration that does not match the existing entity.
fn precondition_failed(err: &lapin::Error) -> bool {
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(err.kind(), ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// The stage exchange and the events exchange, declared (or checked) with `options`.
async fn declare_exchanges(
    channel: &Channel,
    options: ExchangeDeclareOptions,
) -> lapin::Result<()> {
    for (name, kind) in [
        (EXCHANGE, ExchangeKind::Direct),
        (EVENTS_EXCHANGE, ExchangeKind::Topic),
    ] {
        channel
            .exchange_declare(name.into(), kind, options, FieldTable::default())
            .await?;
    }
    Ok(())
}

/// `booking-created.retry.10s`, `notify.retry.500ms`.
pub fn delay_queue_name(queue: StageQueue, delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}.retry.{}s", queue.name(), ms / 1000)
    } else {
        format!("{}.retry.{ms}ms", queue.name())
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(StageQueue::parse("notify.dlq"), Some(StageQueue::Notify));
        assert_eq!(
            StageQueue::parse("booking-created"),
            Some(StageQueue::BookingCreated)
        );
        assert_eq!(StageQueue::parse("nope"), None);
        assert_eq!(StageQueue::TeardownDue.dlq(), "teardown-due.dlq");
    }

    #[test]
    fn tiers_grow_then_repeat_the_last() {
        let t = Topology::new(vec![Duration::from_secs(1), Duration::from_millis(1500)]);
        assert_eq!(t.delay_for(StageQueue::Notify, 1).1, "notify.retry.1s");
        assert_eq!(t.delay_for(StageQueue::Notify, 2).1, "notify.retry.1500ms");
        assert_eq!(t.delay_for(StageQueue::Notify, 9).1, "notify.retry.1500ms");
        assert_eq!(t.queue_names().len(), 5 * 4);
    }
}
