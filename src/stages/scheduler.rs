//! Stage 2, `credentials-ready`, and the durable timer.
//!
//! The stage stores when a booking's provisioning is due (`booking_time - lead`, or now if that
//! is past) and when it ends. The timer, in every scheduler replica, claims due rows with
//! `FOR UPDATE SKIP LOCKED`, publishes `provision-due` / `teardown-due` with confirms, and marks
//! them published in the same transaction: replicas never publish the same row together, and a
//! crash before the commit only means the row is published again (downstream is idempotent).

use std::time::Duration;

use chrono::Utc;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::broker::{
    Incoming, Outgoing, Stage, StageError, StageQueue, Topology, Undecodable, confirmed_channel,
    connect, retry_until_cancelled,
};
use crate::config::BrokerSettings;
use crate::domain::BookingRef;
use crate::health::ReadyFlag;
use crate::store::schedule::{self, Action};
use crate::store::{BookingState, Store, bookings};

/// Rows claimed per timer tick.
const BATCH: i64 = 100;

pub struct SchedulerStage {
    store: Store,
    lead: Duration,
}

impl SchedulerStage {
    pub fn new(store: Store, lead: Duration) -> Self {
        Self { store, lead }
    }
}

impl Stage for SchedulerStage {
    const QUEUE: StageQueue = StageQueue::CredentialsReady;
    type Message = BookingRef;

    fn decode(&self, delivery: &Incoming) -> Result<BookingRef, Undecodable> {
        delivery.json()
    }

    async fn handle(&self, r: &BookingRef, _: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        let booking = self.store.stored_booking(&r.booking_id).await?;
        if booking.cancelled || booking.state.is_over() {
            tracing::info!(state = %booking.state, "the booking is over or cancelled; nothing to schedule");
            return Ok(Vec::new());
        }
        let lead = chrono::Duration::from_std(self.lead).unwrap_or(chrono::Duration::zero());
        let provision_at = (booking.booking_time - lead).max(Utc::now());
        let pool = &self.store.pool;
        let id = booking.booking_id.as_str();
        // A row an update set already (it moved the booking) stays as it is.
        schedule::insert(
            pool,
            id,
            Action::Provision,
            provision_at,
            booking.schedule_revision,
        )
        .await?;
        schedule::insert(
            pool,
            id,
            Action::Teardown,
            booking.ends_at(),
            booking.revision,
        )
        .await?;
        bookings::transition(pool, id, BookingState::Scheduled, None).await?;
        tracing::info!(
            provision_at = %crate::format_time(provision_at),
            teardown_at = %crate::format_time(booking.ends_at()),
            "scheduled"
        );
        Ok(Vec::new())
    }
}

/// Runs the durable timer until `shutdown` fires, reconnecting to the broker as needed.
pub async fn run_timer(
    store: Store,
    broker: BrokerSettings,
    tick: Duration,
    ready: ReadyFlag,
    shutdown: CancellationToken,
) {
    let topology = Topology::from_settings(&broker);
    metrics::describe_histogram!(
        "labbook_scheduler_lag_seconds",
        "How late the timer published what was due"
    );
    for action in [Action::Provision, Action::Teardown] {
        let _ = metrics::histogram!("labbook_scheduler_lag_seconds", "action" => action.as_str());
    }
    loop {
        let setup = retry_until_cancelled("timer: cannot set up the broker", &shutdown, || {
            open(&broker, &topology)
        });
        let Some((conn, channel)) = setup.await else {
            return;
        };
        tracing::info!(tick_ms = tick.as_millis() as u64, "timer running");
        ready.set(true);
        let timeout = broker.publish_timeout;
        tick_until_lost(&store, (&conn, &channel, timeout), tick, &shutdown).await;
        ready.set(false);
        let _ = conn.close(200, "labbook: closing".into()).await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

async fn open(
    broker: &BrokerSettings,
    topology: &Topology,
) -> lapin::Result<(Connection, Channel)> {
    let conn = connect(broker.amqp_url.expose_secret(), "labbook scheduler timer").await?;
    let channel = confirmed_channel(&conn, topology).await?;
    Ok((conn, channel))
}

/// Publishes what is due every `tick` until shutdown or until the broker goes away. A
/// database outage is waited out tick by tick, logged once.
async fn tick_until_lost(
    store: &Store,
    (conn, channel, timeout): (&Connection, &Channel, Duration),
    tick: Duration,
    shutdown: &CancellationToken,
) {
    let mut database_down = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        if !conn.status().connected() {
            tracing::warn!("timer: lost the broker connection; reconnecting");
            return;
        }
        match publish_due(store, channel, timeout).await {
            Ok(_) if database_down => {
                database_down = false;
                tracing::info!("timer: the database is back");
            }
            Ok(_) => {}
            Err(TickError::Database(err)) => {
                if !database_down {
                    tracing::warn!(error = %err, "timer: database unavailable; trying again every tick");
                }
                database_down = true;
            }
            Err(TickError::Broker(err)) => {
                tracing::warn!(error = %err, "timer: publishing failed; reconnecting");
                return;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TickError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Broker(#[from] crate::broker::PublishError),
}

/// Publishes every due row once; returns how many.
/// A publish that is not confirmed within `timeout` fails the tick: the transaction, and the
/// row locks it holds, end with it, and the rows are published again.
async fn publish_due(
    store: &Store,
    channel: &Channel,
    timeout: Duration,
) -> Result<usize, TickError> {
    let mut tx = store.pool.begin().await?;
    let due = schedule::claim_due(&mut tx, BATCH).await?;
    for entry in &due {
        let queue = match entry.action {
            Action::Provision => StageQueue::ProvisionDue,
            Action::Teardown => StageQueue::TeardownDue,
        };
        let revision = Some(entry.revision.max(0) as u32);
        BookingRef::at_revision(queue, &entry.booking_id, revision)
            .publish(channel, timeout)
            .await?;
        schedule::mark_published(&mut tx, entry).await?;
        let lag = (Utc::now() - entry.due_at).num_milliseconds().max(0);
        metrics::histogram!("labbook_scheduler_lag_seconds", "action" => entry.action.as_str())
            .record(lag as f64 / 1000.0);
        tracing::info!(booking_id = %entry.booking_id, %queue, lag_ms = lag, "due: published");
    }
    tx.commit().await?;
    Ok(due.len())
}
