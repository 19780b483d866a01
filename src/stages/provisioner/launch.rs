//! Launching a booking's machines: plan the slots once, launch or adopt one instance per slot,
//! wait until every one runs with an address, then ask for the instance-details email.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};

use super::Provisioner;
use crate::broker::{Outgoing, StageError};
use crate::crypto::admin_context;
use crate::domain::{EmailKind, NotifyMessage, Password};
use crate::ec2::userdata::{self, Account};
use crate::ec2::{InstanceInfo, LaunchRequest, intent};
use crate::store::slots::{self, NewSlot, Slot};
use crate::store::{BookingRecord, BookingState, StoredCredential, bookings};

/// How many lab machines a booking needs.
pub fn slot_count(users: u32, users_per_instance: u32) -> u32 {
    users.div_ceil(users_per_instance)
}

impl Provisioner {
    pub(super) async fn provision(
        &self,
        booking: &BookingRecord,
    ) -> Result<Vec<Outgoing>, StageError> {
        let id = booking.booking_id.as_str();
        bookings::transition(&self.store.pool, id, BookingState::Provisioning, None).await?;
        let slots = self.plan(booking).await?;
        let credentials = bookings::credentials(&self.store.pool, id).await?;
        self.launch_missing(id, slots, &credentials).await?;

        let slots = slots::for_booking(&self.store.pool, id).await?;
        let ids: Vec<String> = slots.iter().filter_map(|s| s.instance_id.clone()).collect();
        let ready = self.wait_until_ready(&ids).await?;
        for i in &ready {
            let (dns, ip) = (i.public_dns.as_deref(), i.public_ip.as_deref());
            slots::record_state(&self.store.pool, &i.instance_id, &i.state, dns, ip).await?;
        }
        if !bookings::transition(&self.store.pool, id, BookingState::Provisioned, None).await? {
            let state = bookings::find(&self.store.pool, id).await?.map(|b| b.state);
            if state.is_some_and(BookingState::is_over) {
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
        Ok(vec![NotifyMessage::outgoing(
            id,
            EmailKind::InstanceDetails,
        )])
    }

    /// Launches (or adopts) an instance for every slot that has none recorded. EC2 is searched
    /// by tag only when a slot's launch was asked for earlier (its intent is recorded for its
    /// generation) and its outcome is unknown; otherwise each slot costs one `RunInstances`.
    async fn launch_missing(
        &self,
        booking_id: &str,
        slots: Vec<Slot>,
        credentials: &[StoredCredential],
    ) -> Result<(), StageError> {
        let missing: Vec<Slot> = slots
            .into_iter()
            .filter(|s| s.instance_id.is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let intents = intent::recorded(&self.store.pool, booking_id).await?;
        let uncertain = missing
            .iter()
            .any(|s| intents.contains(&(s.slot, s.generation)));
        // Instances launched by an attempt that died (or lost EC2's answer) before recording them.
        let tagged = if uncertain {
            self.ec2.find_for_booking(booking_id).await?
        } else {
            Vec::new()
        };
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
            .map(|(slot, found)| self.ensure_instance(booking_id, slot, found, credentials))
            .buffer_unordered(self.settings.launch_concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
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
            None => self.launch(booking_id, &slot, credentials).await?,
        };
        slots::record_instance(&self.store.pool, booking_id, slot.slot, &instance_id).await?;
        Ok(())
    }

    /// Launches the slot's machine with user-data that creates its admin and its trainees.
    async fn launch(
        &self,
        booking_id: &str,
        slot: &Slot,
        credentials: &[StoredCredential],
    ) -> Result<String, StageError> {
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
            generation: slot.generation,
            user_data: &user_data,
        };
        intent::record(&self.store.pool, booking_id, slot.slot, slot.generation).await?;
        let launched = self.ec2.launch(&req, &self.ami_id).await?;
        tracing::info!(slot = slot.slot, instance_id = %launched, users = users.len(), "launched");
        Ok(launched)
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
                // EC2 took it back before it ran (no capacity, a volume limit): the slot gets a
                // new launch generation, and the next attempt a replacement.
                slots::replace_instance(&self.store.pool, &gone.instance_id).await?;
                return Err(StageError::transient(anyhow::anyhow!(
                    "instance {} stopped before it was ready ({}); a replacement is launched on the next attempt",
                    gone.instance_id,
                    gone.state
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
