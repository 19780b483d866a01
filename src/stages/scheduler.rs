//! Stage 2, `credentials-ready`, and the durable timer.
//!
//! The stage stores when a booking's provisioning is due (`booking_time - lead`, earlier by the
//! launches the account's rate needs, see [`LaunchPace`]; now if that is past) and when it ends. The timer, in every scheduler replica, claims due rows with
//! `FOR UPDATE SKIP LOCKED`, publishes `provision-due` / `teardown-due` with confirms, and marks
//! them published in the same transaction: replicas never publish the same row together, and a
//! crash before the commit only means the row is published again (downstream is idempotent).

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::provisioner::slot_count;
use crate::broker::{
    Incoming, Outgoing, Stage, StageError, StageQueue, Topology, Undecodable, confirmed_channel,
    connect, retry_until_cancelled,
};
use crate::config::{BrokerSettings, Settings};
use crate::domain::BookingRef;
use crate::ec2::rate::RateLimit;
use crate::health::ReadyFlag;
use crate::store::schedule::{self, Action};
use crate::store::{BookingState, Store, bookings};

/// Rows claimed per timer tick.
const BATCH: i64 = 100;

pub struct SchedulerStage {
    store: Store,
    pace: LaunchPace,
}

impl SchedulerStage {
    pub fn new(store: Store, pace: LaunchPace) -> Self {
        Self { store, pace }
    }
}

/// When a booking's provisioning is due: `LABBOOK_PROVISION_LEAD_SECONDS` before its time, and
/// earlier by the time the account's `RunInstances` budget needs for its machines and for those
/// of the bookings due before it (they launch first): a big morning is ready by its start times.
#[derive(Debug, Clone, Copy)]
pub struct LaunchPace {
    pub lead: Duration,
    pub users_per_instance: u32,
    /// `LABBOOK_EC2_RATE_RUN_INSTANCES`: `None` when off (no time added).
    pub run_instances: Option<RateLimit>,
}

/// How far back bookings due before this one count as ahead of it: launches of bookings due
/// more than this before its provisioning are long done (an hour is 7,200 launches at EC2's
/// default rate).
const AHEAD_WINDOW: chrono::Duration = chrono::Duration::hours(1);

impl LaunchPace {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            lead: settings.provision_lead,
            users_per_instance: settings.ec2.users_per_instance,
            run_instances: settings.ec2.rate_limits.run_instances,
        }
    }

    /// The time `launches` calls take at the account's rate, beyond the bucket's burst.
    pub fn launch_time(&self, launches: u64) -> chrono::Duration {
        let Some(limit) = self.run_instances else {
            return chrono::Duration::zero();
        };
        let beyond = launches.saturating_sub(u64::from(limit.burst)) as f64;
        chrono::Duration::milliseconds((beyond / limit.per_second * 1000.0).ceil() as i64)
    }

    /// When provisioning `booking` is due (now, if that is past).
    /// `db` is the pool, or the connection of a transaction in progress (an update that moves
    /// the booking holds one: it does not take a second).
    pub async fn provision_at<'e>(
        &self,
        db: impl sqlx::PgExecutor<'e>,
        booking: (&str, DateTime<Utc>, i32),
    ) -> Result<DateTime<Utc>, sqlx::Error> {
        let (id, time, users) = booking;
        let lead = chrono::Duration::from_std(self.lead).unwrap_or_default();
        let per = self.users_per_instance.max(1);
        let own = u64::from(slot_count(users.max(0) as u32, per));
        let since = time - lead - AHEAD_WINDOW;
        let ahead = schedule::instances_ahead(db, id, (since, time), per).await?;
        Ok((time - lead - self.launch_time(own + ahead)).max(Utc::now()))
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
        let pool = &self.store.pool;
        let id = booking.booking_id.as_str();
        let provision_at = self
            .pace
            .provision_at(pool, (id, booking.booking_time, booking.number_of_users))
            .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_beyond_the_burst_take_time_at_the_rate() {
        let pace = LaunchPace {
            lead: Duration::from_secs(900),
            users_per_instance: 2,
            run_instances: Some(RateLimit::new(5, 2.0)),
        };
        assert_eq!(pace.launch_time(5), chrono::Duration::zero());
        assert_eq!(pace.launch_time(60), chrono::Duration::milliseconds(27_500));
        let off = LaunchPace {
            run_instances: None,
            ..pace
        };
        assert_eq!(off.launch_time(1000), chrono::Duration::zero());
    }
}
