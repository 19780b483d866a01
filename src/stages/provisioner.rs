//! Stage 3, `provision-due` and `teardown-due`: launch a booking's lab machines, once, and
//! terminate them when the booking ends.
//!
//! Idempotency: a booking's slots are planned once (stored); before launching a slot, the
//! instance recorded for it, else one tagged with its booking and slot, is taken instead; the
//! `ClientToken` makes EC2 itself return the same instance for a retried launch. So a retry, a
//! redelivery or a crash between launch and record never launches a second machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::{StreamExt, TryStreamExt};

use crate::broker::{Incoming, Outgoing, Stage, StageQueue};
use crate::config::Ec2Settings;
use crate::crypto::SecretKey;
use crate::domain::{BookingRef, EmailKind, NotifyMessage, Password};
use crate::ec2::userdata::{self, Account};
use crate::ec2::{Ec2, Ec2Error, InstanceInfo, LaunchRequest};
use crate::stages::StageError;
use crate::store::slots::{self, NewSlot, Slot};
use crate::store::{BookingRecord, BookingState, Store, StoredCredential, bookings};

/// How many lab machines a booking needs.
pub fn slot_count(users: u32, users_per_instance: u32) -> u32 {
    users.div_ceil(users_per_instance)
}

/// The associated data a slot's admin password is encrypted under.
pub fn admin_context(booking_id: &str, slot: i32) -> String {
    format!("{booking_id}/slot-{slot}/admin")
}

impl From<Ec2Error> for StageError {
    fn from(err: Ec2Error) -> Self {
        if err.is_permanent() {
            StageError::Permanent(err.to_string())
        } else {
            StageError::Transient(err.into())
        }
    }
}

/// What provisioning and teardown share.
pub struct Provisioner {
    store: Store,
    ec2: Ec2,
    key: SecretKey,
    settings: Ec2Settings,
    ami_id: String,
}

impl Provisioner {
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

    async fn provision(&self, booking: &BookingRecord) -> Result<Vec<Outgoing>, StageError> {
        let id = booking.booking_id.as_str();
        bookings::transition(&self.store.pool, id, BookingState::Provisioning, None).await?;
        let slots = self.plan(booking).await?;
        let credentials = bookings::credentials(&self.store.pool, id).await?;

        let missing: Vec<Slot> = slots
            .into_iter()
            .filter(|s| s.instance_id.is_none())
            .collect();
        if !missing.is_empty() {
            // Instances launched by an attempt that died before recording them.
            let tagged = self.ec2.find_for_booking(id).await?;
            let work: Vec<(Slot, Option<String>)> = missing
                .into_iter()
                .map(|slot| {
                    let found = tagged
                        .iter()
                        .find(|i| i.slot == Some(slot.slot))
                        .map(|i| i.instance_id.clone());
                    (slot, found)
                })
                .collect();
            futures_util::stream::iter(work)
                .map(|(slot, found)| self.ensure_instance(id, slot, found, &credentials))
                .buffer_unordered(self.settings.launch_concurrency)
                .try_collect::<Vec<()>>()
                .await?;
        }

        let slots = slots::for_booking(&self.store.pool, id).await?;
        let ids: Vec<String> = slots.iter().filter_map(|s| s.instance_id.clone()).collect();
        let ready = self.wait_until_ready(&ids).await?;
        for i in &ready {
            slots::record_state(
                &self.store.pool,
                &i.instance_id,
                &i.state,
                i.public_dns.as_deref(),
                i.public_ip.as_deref(),
            )
            .await?;
        }
        if !bookings::transition(&self.store.pool, id, BookingState::Provisioned, None).await? {
            let state = bookings::find(&self.store.pool, id).await?.map(|b| b.state);
            if matches!(state.as_deref(), Some("ended" | "failed")) {
                // Teardown (or a failure) ran while this attempt launched: nothing may outlive it.
                let terminated = self.terminate_all(id).await?;
                tracing::warn!(terminated, state = ?state, "the booking ended while it was provisioned; terminated again");
                return Ok(Vec::new());
            }
        }
        tracing::info!(
            instances = ready.len(),
            "every instance is running with a public address"
        );
        Ok(vec![notify(id, EmailKind::InstanceDetails)])
    }

    /// Records the slot's instance: the one `found` by tag, else a new launch.
    async fn ensure_instance(
        &self,
        booking_id: &str,
        slot: Slot,
        found: Option<String>,
        credentials: &[StoredCredential],
    ) -> Result<(), StageError> {
        let instance_id = match found {
            Some(existing) => {
                tracing::info!(slot = slot.slot, instance_id = %existing, "found an instance launched earlier");
                existing
            }
            None => {
                let users: Vec<Account<'_>> = credentials
                    .iter()
                    .filter(|c| slot.user_positions().contains(&c.position))
                    .map(|c| Account {
                        username: &c.username,
                        password_hash: &c.password_hash,
                    })
                    .collect();
                let admin = Account {
                    username: &slot.admin_username,
                    password_hash: &slot.admin_password_hash,
                };
                let user_data = userdata::render(self.settings.bootstrap, &admin, &users)
                    .map_err(StageError::Permanent)?;
                let req = LaunchRequest {
                    booking_id,
                    slot: slot.slot,
                    user_data: &user_data,
                };
                let launched = self.ec2.launch(&req, &self.ami_id).await?;
                tracing::info!(slot = slot.slot, instance_id = %launched, users = users.len(), "launched");
                launched
            }
        };
        slots::record_instance(&self.store.pool, booking_id, slot.slot, &instance_id).await?;
        Ok(())
    }

    /// The booking's slots, planned (and stored) on the first attempt.
    async fn plan(&self, booking: &BookingRecord) -> Result<Vec<Slot>, StageError> {
        let id = booking.booking_id.as_str();
        let existing = slots::for_booking(&self.store.pool, id).await?;
        if !existing.is_empty() {
            return Ok(existing);
        }
        let per = self.settings.users_per_instance;
        let users = booking.number_of_users as u32;
        let admin = self.settings.admin_username.as_str().to_owned();
        let key = self.key.clone();
        let booking_id = id.to_owned();
        let plan = tokio::task::spawn_blocking(move || {
            (0..slot_count(users, per))
                .map(|k| {
                    let slot = k as i32;
                    let password = Password::generate();
                    NewSlot {
                        slot,
                        first_user: (k * per) as i32,
                        user_count: (per.min(users - k * per)) as i32,
                        admin_username: admin.clone(),
                        admin_password_encrypted: key
                            .encrypt(&password, &admin_context(&booking_id, slot)),
                        admin_password_hash: password.sha512_crypt(),
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(StageError::transient)?;
        slots::insert_plan(&self.store.pool, id, &plan).await?;
        Ok(slots::for_booking(&self.store.pool, id).await?)
    }

    /// Polls with backoff until every instance runs with a public address.
    async fn wait_until_ready(&self, ids: &[String]) -> Result<Vec<InstanceInfo>, StageError> {
        let started = Instant::now();
        let mut delays = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(10))
                .without_max_times(),
        );
        loop {
            let infos = self.ec2.describe(ids).await?;
            if let Some(gone) = infos.iter().find(|i| i.is_gone()) {
                return Err(StageError::Permanent(format!(
                    "instance {} stopped before it was ready ({})",
                    gone.instance_id, gone.state
                )));
            }
            let ready = infos.iter().filter(|i| i.is_ready()).count();
            if ready == ids.len() && infos.len() == ids.len() {
                return Ok(infos);
            }
            if started.elapsed() >= self.settings.running_timeout {
                return Err(StageError::transient(anyhow::anyhow!(
                    "{ready} of {} instances running with a public address after {} s",
                    ids.len(),
                    started.elapsed().as_secs()
                )));
            }
            tracing::info!(
                ready,
                total = ids.len(),
                waited_s = started.elapsed().as_secs(),
                "waiting for instances"
            );
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
        }
    }

    /// Terminates the machines of bookings that are over (ended, failed, or past their end by
    /// more than `grace`) which are still running: launched by an attempt that raced the
    /// teardown, or left by a teardown that could not finish. Only bookings this database
    /// knows are touched, so several labbook installations may share an AWS account.
    pub async fn sweep(&self, grace: chrono::Duration) -> Result<usize, StageError> {
        let running = self.ec2.find_managed(None).await?;
        let mut booking_ids: Vec<&str> = running
            .iter()
            .filter_map(|i| i.booking_id.as_deref())
            .collect();
        booking_ids.sort_unstable();
        booking_ids.dedup();
        let mut terminated = 0;
        for id in booking_ids {
            let Some(booking) = bookings::find(&self.store.pool, id).await? else {
                continue;
            };
            let over = matches!(booking.state.as_str(), "ended" | "failed")
                || booking.ends_at() + grace < Utc::now();
            if over {
                let n = self.terminate_all(id).await?;
                tracing::warn!(booking_id = id, terminated = n, state = %booking.state, "sweep: terminated machines of a booking that is over");
                terminated += n;
            }
        }
        Ok(terminated)
    }

    /// Terminates every instance of the booking: recorded, or found by tag.
    async fn terminate_all(&self, booking_id: &str) -> Result<usize, StageError> {
        let mut ids: Vec<String> = self
            .ec2
            .find_for_booking(booking_id)
            .await?
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        for slot in slots::for_booking(&self.store.pool, booking_id).await? {
            if let Some(id) = slot.instance_id
                && !ids.contains(&id)
                && slot.instance_state.as_deref() != Some("terminated")
            {
                ids.push(id);
            }
        }
        self.ec2.terminate(&ids).await?;
        for id in &ids {
            slots::record_state(&self.store.pool, id, "terminated", None, None).await?;
        }
        Ok(ids.len())
    }
}

fn notify(booking_id: &str, kind: EmailKind) -> Outgoing {
    Outgoing::json(
        StageQueue::Notify,
        format!("notify/{booking_id}/{}", kind.as_str()),
        &NotifyMessage {
            booking_id: booking_id.to_owned(),
            kind,
        },
    )
}

/// Sweeps every `every` until `shutdown` fires (see [`Provisioner::sweep`]).
pub async fn run_sweeper(
    provisioner: Arc<Provisioner>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let grace = chrono::Duration::minutes(5);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(err) = provisioner.sweep(grace).await {
            tracing::warn!(error = %err, "sweep failed; trying again next time");
        }
    }
}

/// `provision-due`.
pub struct ProvisionStage(pub Arc<Provisioner>);

impl Stage for ProvisionStage {
    fn queue(&self) -> StageQueue {
        StageQueue::ProvisionDue
    }

    async fn handle(&self, msg: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        let r: BookingRef = msg.json()?;
        let booking = bookings::find(&self.0.store.pool, &r.booking_id)
            .await?
            .ok_or_else(|| {
                StageError::permanent(format!("booking {} is not stored", r.booking_id))
            })?;
        match booking.state.as_str() {
            "failed" | "ended" => {
                tracing::info!(state = %booking.state, "nothing to provision");
                return Ok(Vec::new());
            }
            "provisioned" => {
                // A duplicate or a replay: the machines run; make sure the email goes out.
                tracing::info!("already provisioned; asking for the instance-details email again");
                return Ok(vec![notify(
                    &booking.booking_id,
                    EmailKind::InstanceDetails,
                )]);
            }
            _ if booking.ends_at() <= Utc::now() => {
                tracing::warn!("the booking is over before it was provisioned; nothing to launch");
                return Ok(Vec::new());
            }
            _ => {}
        }
        self.0.provision(&booking).await
    }

    /// The booking cannot be provisioned: terminate what was launched, mark it failed and
    /// tell the booker.
    async fn give_up(&self, msg: &Incoming, reason: &str) -> Result<Vec<Outgoing>, StageError> {
        let Ok(r) = msg.json::<BookingRef>() else {
            return Ok(Vec::new());
        };
        if bookings::find(&self.0.store.pool, &r.booking_id)
            .await?
            .is_none()
        {
            return Ok(Vec::new());
        }
        let terminated = self.0.terminate_all(&r.booking_id).await?;
        let failed = bookings::transition(
            &self.0.store.pool,
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
        Ok(vec![notify(&r.booking_id, EmailKind::Failure)])
    }
}

/// `teardown-due`.
pub struct TeardownStage(pub Arc<Provisioner>);

impl Stage for TeardownStage {
    fn queue(&self) -> StageQueue {
        StageQueue::TeardownDue
    }

    /// Machines left running cost money and stay open: never give up on terminating them.
    fn retries_forever(&self) -> bool {
        true
    }

    async fn handle(&self, msg: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        let r: BookingRef = msg.json()?;
        let terminated = self.0.terminate_all(&r.booking_id).await?;
        bookings::transition(&self.0.store.pool, &r.booking_id, BookingState::Ended, None).await?;
        tracing::info!(terminated, "booking ended: instances terminated");
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_arithmetic() {
        assert_eq!(slot_count(1, 2), 1);
        assert_eq!(slot_count(2, 2), 1);
        assert_eq!(slot_count(3, 2), 2);
        assert_eq!(slot_count(50, 2), 25);
        assert_eq!(slot_count(50, 3), 17);
    }
}
