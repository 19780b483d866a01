//! Stage 2, `credentials-ready`, and the durable timer.
//!
//! The stage stores when a booking's provisioning is due (`booking_time - lead`, earlier by the
//! launches the account's rate needs, see [`LaunchPace`]; now if that is past) and when it ends. The timer, in every scheduler replica, claims due rows with
//! `FOR UPDATE SKIP LOCKED`, publishes `provision-due` / `teardown-due` with confirms, and marks
//! them published in the same transaction: replicas never publish the same row together, and a
//! crash before the commit only means the row is published again (downstream is idempotent).

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::Channel;
use tokio_util::sync::CancellationToken;

use super::provisioner::slot_count;
use crate::broker::{
    Incoming, Outgoing, Stage, StageError, StageQueue, Tick, TickError, Undecodable, run_ticking,
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

/// When a booking's provisioning is due: `LABBOOK_PROVISION_LEAD_SECONDS` before its time,
/// earlier by the machines' expected boot (the 90th percentile of the image's recorded boots,
/// else `LABBOOK_EXPECTED_BOOT_SECONDS`), and earlier by the time the account's `RunInstances`
/// budget needs for its machines and for those of the bookings due before it (they launch
/// first): a big morning is ready by its start times.
#[derive(Debug, Clone)]
pub struct LaunchPace {
    pub lead: Duration,
    pub users_per_instance: u32,
    /// `LABBOOK_EC2_RATE_RUN_INSTANCES`: `None` when off (no time added).
    pub run_instances: Option<RateLimit>,
    /// `LABBOOK_EXPECTED_BOOT_SECONDS`: launch to ready while the image has no recorded boots.
    pub expected_boot: Duration,
    /// `LABBOOK_AMI_ID`: whose recorded boots count.
    pub image_id: Option<String>,
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
            expected_boot: settings.ec2.expected_boot,
            image_id: settings.ec2.ami_id.clone(),
        }
    }

    /// How long the booking's machines are expected to take from launch to ready.
    async fn boot_time(&self, db: &mut sqlx::PgConnection) -> Result<Duration, sqlx::Error> {
        let Some(image) = &self.image_id else {
            return Ok(self.expected_boot);
        };
        let recorded = crate::store::machines::boot_times(db, image).await?;
        Ok(recorded.map_or(self.expected_boot, |t| t.p90))
    }

    /// The time `launches` calls take at the account's rate, beyond the bucket's burst.
    pub fn launch_time(&self, launches: u64) -> chrono::Duration {
        let Some(limit) = self.run_instances else {
            return chrono::Duration::zero();
        };
        let beyond = launches.saturating_sub(u64::from(limit.burst)) as f64;
        chrono::Duration::milliseconds((beyond / limit.per_second * 1000.0).ceil() as i64)
    }

    /// When provisioning `booking` is due (now, if that is past): its time less the lead, the
    /// expected boot and the launches ahead of it. `db` is a connection of the pool, or of a
    /// transaction in progress (an update that moves the booking holds one: it does not take
    /// a second).
    pub async fn provision_at(
        &self,
        db: &mut sqlx::PgConnection,
        booking: (&str, DateTime<Utc>, i32),
    ) -> Result<DateTime<Utc>, sqlx::Error> {
        let (id, time, users) = booking;
        let lead = chrono::Duration::from_std(self.lead).unwrap_or_default();
        let boot = chrono::Duration::from_std(self.boot_time(&mut *db).await?).unwrap_or_default();
        let per = self.users_per_instance.max(1);
        let own = u64::from(slot_count(users.max(0) as u32, per));
        let since = time - lead - boot - AHEAD_WINDOW;
        let ahead = schedule::instances_ahead(&mut *db, id, (since, time), per).await?;
        Ok((time - lead - boot - self.launch_time(own + ahead)).max(Utc::now()))
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
            .provision_at(
                &mut *pool.acquire().await?,
                (id, booking.booking_time, booking.number_of_users),
            )
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
    metrics::describe_histogram!(
        "labbook_scheduler_lag_seconds",
        "How late the timer published what was due"
    );
    for action in [Action::Provision, Action::Teardown] {
        let _ = metrics::histogram!("labbook_scheduler_lag_seconds", "action" => action.as_str());
    }
    let timer = Timer { store };
    run_ticking("scheduler timer", &timer, &broker, tick, ready, shutdown).await;
}

/// The durable timer's step.
pub struct Timer {
    pub store: Store,
}

impl Tick for Timer {
    async fn tick(&self, channel: &Channel, timeout: Duration) -> Result<usize, TickError> {
        let published = publish_due(&self.store, channel, timeout).await?;
        // The console's health page and the staleness alert read the timer's last tick.
        crate::store::heartbeat::scheduler_tick(&self.store.pool).await;
        Ok(published)
    }
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
            .traced(entry.traceparent.as_deref())
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
            expected_boot: Duration::ZERO,
            image_id: None,
        };
        assert_eq!(pace.launch_time(5), chrono::Duration::zero());
        assert_eq!(pace.launch_time(60), chrono::Duration::milliseconds(27_500));
        let off = LaunchPace {
            run_instances: None,
            ..pace.clone()
        };
        assert_eq!(off.launch_time(1000), chrono::Duration::zero());
    }
}
