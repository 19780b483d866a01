//! Stage 2, `credentials-ready`, and the durable timer.
//!
//! The stage stores when a booking's provisioning is due (`booking_time - lead`, or now if that
//! is past) and when it ends. The timer, in every scheduler replica, claims due rows with
//! `FOR UPDATE SKIP LOCKED`, publishes `provision-due` / `teardown-due` with confirms, and marks
//! them published in the same transaction: replicas never publish the same row together, and a
//! crash before the commit only means the row is published again (downstream is idempotent).

use std::time::Duration;

use chrono::Utc;
use lapin::Channel;
use lapin::options::ConfirmSelectOptions;
use tokio_util::sync::CancellationToken;

use crate::broker::{Incoming, Outgoing, Stage, StageQueue, Topology, connect_with_retry};
use crate::config::BrokerSettings;
use crate::domain::BookingRef;
use crate::health::ReadyFlag;
use crate::stages::StageError;
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
    fn queue(&self) -> StageQueue {
        StageQueue::CredentialsReady
    }

    async fn handle(&self, msg: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        let r: BookingRef = msg.json()?;
        let booking = bookings::find(&self.store.pool, &r.booking_id)
            .await?
            .ok_or_else(|| {
                StageError::permanent(format!("booking {} is not stored", r.booking_id))
            })?;
        let lead = chrono::Duration::from_std(self.lead).unwrap_or(chrono::Duration::zero());
        let provision_at = (booking.booking_time - lead).max(Utc::now());
        schedule::insert(
            &self.store.pool,
            &booking.booking_id,
            Action::Provision,
            provision_at,
        )
        .await?;
        schedule::insert(
            &self.store.pool,
            &booking.booking_id,
            Action::Teardown,
            booking.ends_at(),
        )
        .await?;
        bookings::transition(
            &self.store.pool,
            &booking.booking_id,
            BookingState::Scheduled,
            None,
        )
        .await?;
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
    let topology = Topology::new(broker.retry_delays.clone());
    let mut database_down = false;
    loop {
        let Some(conn) =
            connect_with_retry(&broker.amqp_url, "labbook scheduler timer", &shutdown).await
        else {
            return;
        };
        let channel = match prepare(&conn, &topology).await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(error = %err, "timer: broker set-up failed; reconnecting");
                tokio::time::sleep(tick).await;
                continue;
            }
        };
        tracing::info!(tick_ms = tick.as_millis() as u64, "timer running");
        ready.set(true);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "labbook: shutting down".into()).await;
                    return;
                }
                _ = tokio::time::sleep(tick) => {}
            }
            if !conn.status().connected() {
                tracing::warn!("timer: lost the broker connection; reconnecting");
                break;
            }
            match publish_due(&store, &channel).await {
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
                    break;
                }
            }
        }
        ready.set(false);
    }
}

async fn prepare(conn: &lapin::Connection, topology: &Topology) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[derive(Debug, thiserror::Error)]
enum TickError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Broker(#[from] crate::broker::PublishError),
}

/// Publishes every due row once; returns how many.
async fn publish_due(store: &Store, channel: &Channel) -> Result<usize, TickError> {
    let mut tx = store.pool.begin().await?;
    let due = schedule::claim_due(&mut tx, BATCH).await?;
    for entry in &due {
        let queue = match entry.action() {
            Some(Action::Provision) => StageQueue::ProvisionDue,
            Some(Action::Teardown) => StageQueue::TeardownDue,
            None => continue,
        };
        let body = BookingRef {
            booking_id: entry.booking_id.clone(),
        };
        Outgoing::json(queue, format!("{queue}/{}", entry.booking_id), &body)
            .publish(channel)
            .await?;
        schedule::mark_published(&mut tx, entry).await?;
        let lag = (Utc::now() - entry.due_at).num_milliseconds().max(0);
        metrics::histogram!("labbook_scheduler_lag_seconds", "action" => entry.action.clone())
            .record(lag as f64 / 1000.0);
        tracing::info!(booking_id = %entry.booking_id, %queue, lag_ms = lag, "due: published");
    }
    tx.commit().await?;
    Ok(due.len())
}
