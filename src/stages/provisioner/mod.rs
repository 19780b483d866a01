//! Stage 3, `provision-due` and `teardown-due`: launch a booking's lab machines, once
//! ([`launch`]), follow them to ready without holding a delivery ([`watch`], deciding with
//! [`ready`]), terminate them when the booking ends ([`teardown`]), and sweep up machines of
//! bookings that are over ([`sweep`]).
//!
//! Idempotency: a booking's slots are planned once (stored); before launching a slot, the
//! instance recorded for it, else one tagged with its booking and slot, is taken instead; the
//! `ClientToken` makes EC2 itself return the same instance for a retried launch. So a retry, a
//! redelivery or a crash between launch and record never launches a second machine.

mod launch;
mod ready;
mod sweep;
mod teardown;
mod watch;

use std::sync::Arc;

use chrono::Utc;

use crate::broker::{Incoming, Outgoing, Stage, StageError, StageQueue, Undecodable};
use crate::config::Ec2Settings;
use crate::crypto::SecretKey;
use crate::domain::{BookingRef, EmailKind, NotifyMessage};
use crate::ec2::Ec2;
use crate::store::schedule::{self, Action};
use crate::store::{BookingRecord, BookingState, Store, bookings};

pub use launch::{NO_CAPACITY, QUOTA, slot_count};
pub use ready::{Boot, NOT_READY, boot_outcome, probe_roots};
pub use sweep::run_sweeper;
pub use watch::BootWatch;

/// What provisioning, teardown and the sweep share.
pub struct Provisioner {
    store: Store,
    ec2: Ec2,
    key: SecretKey,
    settings: Ec2Settings,
    ami_id: String,
}

impl Provisioner {
    /// Whether the booking's provisioning is due: a `provision-due` from the timer of a time
    /// since moved later (or the message an update sends to retire machines) is not. Compared
    /// on the database's clock, which the timer uses too.
    async fn is_due(&self, booking: &BookingRecord) -> Result<bool, StageError> {
        if !matches!(
            booking.state,
            BookingState::Received | BookingState::Scheduled
        ) {
            return Ok(true);
        }
        Ok(schedule::is_due(&self.store.pool, &booking.booking_id, Action::Provision).await?)
    }

    pub fn new(
        store: Store,
        ec2: Ec2,
        key: SecretKey,
        settings: Ec2Settings,
        ami_id: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            ec2,
            key,
            settings,
            ami_id,
        })
    }
}

/// `provision-due`.
pub struct ProvisionStage(pub Arc<Provisioner>);

impl Stage for ProvisionStage {
    const QUEUE: StageQueue = StageQueue::ProvisionDue;
    type Message = BookingRef;

    fn decode(&self, delivery: &Incoming) -> Result<BookingRef, Undecodable> {
        delivery.json()
    }

    async fn handle(
        &self,
        r: &BookingRef,
        delivery: &Incoming,
    ) -> Result<Vec<Outgoing>, StageError> {
        let p = &self.0;
        let booking = p.store.stored_booking(&r.booking_id).await?;
        let id = booking.booking_id.as_str();
        // Machines of an earlier time of a booking that moved go first, whatever comes next.
        p.terminate_retired(Some(id)).await?;
        p.resolve_lost_launches(Some(id)).await?;
        if r.revision.is_some() && !p.is_due(&booking).await? {
            tracing::info!(
                "the booking's provisioning is not due at its current time; nothing to launch now"
            );
            return Ok(Vec::new());
        }
        let over = booking.ends_at() <= Utc::now();
        // A replay asks for the work again only if the booking failed before it was replayed:
        // a copy of the replayed message that comes back after failing again does not.
        let replayed_after_failure = delivery
            .replayed_at()
            .is_some_and(|at| booking.updated_at <= at);
        match booking.state {
            BookingState::Failed if replayed_after_failure && !over => {
                // The operator fixed the cause and replayed the dead letter: provision again.
                bookings::reopen(&p.store.pool, id).await?;
                let reset = crate::store::slots::reset_gone(&p.store.pool, id).await?;
                tracing::warn!(
                    slots_relaunched = reset,
                    "replay of a failed booking: provisioning it again"
                );
            }
            BookingState::Failed => {
                // A copy of the message that failed for good: the failure email may not have
                // been published when it failed (the notifier sends it once).
                tracing::info!("the booking failed; asking for the failure email again");
                let revision = booking.revision.max(0) as u32;
                return Ok(vec![NotifyMessage::at_revision(
                    id,
                    EmailKind::Failure,
                    revision,
                )]);
            }
            BookingState::Ended | BookingState::Cancelled => {
                tracing::info!(state = %booking.state, "nothing to provision");
                return Ok(Vec::new());
            }
            BookingState::Provisioned => {
                // A duplicate or a replay: the machines run; make sure the email goes out.
                tracing::info!("already provisioned; asking for the instance-details email again");
                return Ok(vec![p.instance_email(&booking)]);
            }
            _ if over => {
                tracing::warn!("the booking is over before it was provisioned; nothing to launch");
                return Ok(Vec::new());
            }
            _ => {}
        }
        p.provision(&booking, r.revision).await
    }

    /// The booking cannot be provisioned: terminate what was launched, mark it failed and
    /// tell the booker.
    async fn give_up(&self, r: &BookingRef, reason: &str) -> Result<Vec<Outgoing>, StageError> {
        let p = &self.0;
        let Some(booking) = bookings::find(&p.store.pool, &r.booking_id).await? else {
            return Ok(Vec::new());
        };
        if booking.state == BookingState::Provisioned {
            // Its machines run and its email is on its way: a copy that failed (e.g. redelivered
            // too often while the broker could not take the outcome) must not end the class.
            tracing::warn!(
                "provision-due dead-lettered for a provisioned booking; its machines keep running"
            );
            return Ok(Vec::new());
        }
        if r.revision
            .is_some_and(|rev| (rev as i64) < i64::from(booking.schedule_revision))
        {
            tracing::warn!(
                "provision-due of a time the booking has moved from dead-lettered; the booking goes on"
            );
            return Ok(Vec::new());
        }
        if booking.provisioned_revision.is_some() && booking.state == BookingState::Provisioning {
            // Machines for added trainees could not be launched: the class keeps the machines
            // it has; the dead letter, replayed, launches the rest.
            tracing::warn!(
                "machines for added trainees could not be launched; the running ones are kept"
            );
            return Ok(Vec::new());
        }
        let terminated = p.terminate_all(&r.booking_id).await?;
        let failed = bookings::transition(
            &p.store.pool,
            &r.booking_id,
            BookingState::Failed,
            Some(reason),
        )
        .await?;
        if !failed {
            // Already failed, or ended meanwhile: the booker has been told, or needs nothing.
            tracing::warn!(
                terminated,
                "provisioning given up; the booking was no longer in progress"
            );
            return Ok(Vec::new());
        }
        tracing::warn!(
            terminated,
            "provisioning failed; partial launches terminated, booking marked failed"
        );
        let revision = booking.schedule_revision.max(0) as u32;
        Ok(vec![NotifyMessage::at_revision(
            &r.booking_id,
            EmailKind::Failure,
            revision,
        )])
    }
}

/// `teardown-due`.
pub struct TeardownStage(pub Arc<Provisioner>);

impl Stage for TeardownStage {
    const QUEUE: StageQueue = StageQueue::TeardownDue;
    type Message = BookingRef;

    fn decode(&self, delivery: &Incoming) -> Result<BookingRef, Undecodable> {
        delivery.json()
    }

    /// Machines left running cost money and stay open: never give up on terminating them.
    fn retries_forever(&self) -> bool {
        true
    }

    async fn handle(&self, r: &BookingRef, _: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        self.0.teardown(r).await
    }
}
