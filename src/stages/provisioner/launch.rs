//! Launching a booking's machines: plan the slots once, launch or adopt one instance per slot,
//! wait until every one runs with an address, then ask for the instance-details email.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};

use super::Provisioner;
use crate::broker::{Outgoing, StageError};
use crate::crypto::admin_context;
use crate::domain::{EmailKind, NotifyMessage, Password};
use crate::ec2::userdata::{self, Account};
use crate::ec2::{LaunchRequest, intent};
use crate::store::slots::{self, NewSlot, Slot};
use crate::store::{BookingRecord, BookingState, StoredCredential, bookings};

/// How many lab machines a booking needs.
pub fn slot_count(users: u32, users_per_instance: u32) -> u32 {
    users.div_ceil(users_per_instance)
}

/// How many times one attempt follows a booking that changes while it is launched (trainees
/// added meanwhile) before it leaves the rest to the next message.
const MAX_ROUNDS: usize = 3;

impl Provisioner {
    /// Launches what the booking's current revision asks for and waits until it runs; then
    /// asks for the instance details email. `revision` is the revision of the timer that asked
    /// (`None` from a message without one): a booking moved since is not provisioned by it.
    pub(super) async fn provision(
        &self,
        booking: &BookingRecord,
        revision: Option<u32>,
    ) -> Result<Vec<Outgoing>, StageError> {
        let id = booking.booking_id.as_str();
        let pool = &self.store.pool;
        for _ in 0..MAX_ROUNDS {
            let Some(booking) = bookings::start_provisioning(pool, id, revision).await? else {
                return self.stopped(id).await;
            };
            let slots = self.plan(&booking).await?;
            let credentials = bookings::credentials(pool, id).await?;
            self.launch_missing(&booking, slots, &credentials).await?;
            let Some(ready) = self.wait_until_ready(id).await? else {
                // It changed while this attempt launched (cancelled, moved, grown).
                continue;
            };
            if self.wait_until_bootstrapped(id).await?.is_none() {
                continue;
            }
            if bookings::finish_provisioning(pool, id, booking.revision).await? {
                tracing::info!(
                    instances = ready,
                    revision = booking.revision,
                    "every machine is running with a public address and ready"
                );
                return Ok(vec![NotifyMessage::at_revision(
                    id,
                    EmailKind::InstanceDetails,
                    booking.revision as u32,
                )]);
            }
            tracing::info!(
                "the booking changed while it was provisioned; following its latest revision"
            );
        }
        Err(StageError::transient(anyhow::anyhow!(
            "the booking kept changing while it was provisioned; trying again"
        )))
    }

    /// The booking is no longer to be provisioned by this attempt: it was cancelled, ended,
    /// moved to another time, or provisioned by another attempt. Nothing it launched may
    /// outlive what the latest revision asks.
    async fn stopped(&self, id: &str) -> Result<Vec<Outgoing>, StageError> {
        let booking = self.store.stored_booking(id).await?;
        if booking.state.is_over() {
            let terminated = self.terminate_all(id).await?;
            tracing::warn!(terminated, state = %booking.state, "the booking is over; terminated what this attempt launched");
        } else {
            let terminated = self.terminate_retired(Some(id)).await?;
            tracing::info!(terminated, state = %booking.state, "not provisioning: the booking is not due at this revision");
        }
        if booking.state == BookingState::Provisioned {
            return Ok(vec![self.instance_email(&booking)]);
        }
        Ok(Vec::new())
    }

    /// The request for the instance details email of the booking's machines as they are.
    pub(super) fn instance_email(&self, booking: &BookingRecord) -> Outgoing {
        let revision = booking.provisioned_revision.unwrap_or(0).max(0) as u32;
        NotifyMessage::at_revision(&booking.booking_id, EmailKind::InstanceDetails, revision)
    }

    /// Launches (or adopts) an instance for every slot that has none recorded. EC2 is searched
    /// by tag only when a slot's launch was asked for earlier (its intent is recorded for its
    /// generation) and its outcome is unknown; otherwise each slot costs one `RunInstances`.
    async fn launch_missing(
        &self,
        booking: &BookingRecord,
        slots: Vec<Slot>,
        credentials: &[StoredCredential],
    ) -> Result<(), StageError> {
        let booking_id = booking.booking_id.as_str();
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
            .map(|(slot, found)| self.ensure_instance(booking, slot, found, credentials))
            .buffer_unordered(self.settings.launch_concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Records the slot's instance: the one `found` by tag, else a new launch. Nothing is
    /// launched once the booking is no longer being provisioned (cancelled or moved meanwhile).
    async fn ensure_instance(
        &self,
        booking: &BookingRecord,
        slot: Slot,
        found: Option<String>,
        credentials: &[StoredCredential],
    ) -> Result<(), StageError> {
        let booking_id = booking.booking_id.as_str();
        let instance_id = match found {
            Some(existing) => {
                tracing::info!(slot = slot.slot, instance_id = %existing, "found an instance launched earlier");
                existing
            }
            None => match self.launch(booking, &slot, credentials).await? {
                Some(launched) => launched,
                None => {
                    tracing::info!(slot = slot.slot, "the booking changed; not launching");
                    return Ok(());
                }
            },
        };
        let key = (slot.slot, slot.generation);
        if slots::record_instance(&self.store.pool, booking_id, key, &instance_id)
            .await?
            .is_none()
        {
            tracing::warn!(slot = slot.slot, %instance_id, "the booking moved while this machine was launched; it is terminated");
            self.terminate_retired(Some(booking_id)).await?;
        }
        Ok(())
    }

    /// Launches the slot's machine with user-data that creates its admin and its trainees,
    /// unless the booking is no longer being provisioned when its turn to launch comes. Its
    /// turn comes after the launches of bookings due earlier (the booking's time is its rank).
    async fn launch(
        &self,
        booking: &BookingRecord,
        slot: &Slot,
        credentials: &[StoredCredential],
    ) -> Result<Option<String>, StageError> {
        let booking_id = booking.booking_id.as_str();
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
        let user_data = userdata::render(
            self.settings.bootstrap,
            &self.settings.https,
            &admin,
            &users,
        )
        .map_err(StageError::Permanent)?;
        let req = LaunchRequest {
            booking_id,
            slot: slot.slot,
            generation: slot.generation,
            user_data: &user_data,
        };
        intent::record(&self.store.pool, booking_id, slot.slot, slot.generation).await?;
        let pool = &self.store.pool;
        let still_wanted = || async {
            // A database that cannot answer does not stop a launch: the end of the attempt
            // checks again and terminates what it must.
            bookings::is_provisioning(pool, booking_id)
                .await
                .unwrap_or(true)
        };
        let rank = Some(booking.booking_time);
        let launched = self
            .ec2
            .launch_if(&req, &self.ami_id, rank, still_wanted)
            .await?;
        if let Some(id) = &launched {
            tracing::info!(slot = slot.slot, instance_id = %id, users = users.len(), "launched");
        }
        Ok(launched)
    }

    /// The booking's slots: planned (and stored) on the first attempt, and extended with slots
    /// for trainees added later. Slots planned before keep their machines and admin logins.
    async fn plan(&self, booking: &BookingRecord) -> Result<Vec<Slot>, StageError> {
        let id = booking.booking_id.as_str();
        let existing = slots::for_booking(&self.store.pool, id).await?;
        let covered = existing
            .iter()
            .map(|s| s.first_user + s.user_count)
            .max()
            .unwrap_or(0)
            .max(0) as u32;
        let users = booking.number_of_users.max(0) as u32;
        if covered >= users {
            return Ok(existing);
        }
        let next_slot = existing.iter().map(|s| s.slot + 1).max().unwrap_or(0);
        let per = self.settings.users_per_instance;
        let admin = self.settings.admin_username.as_str().to_owned();
        let key = self.key.clone();
        let booking_id = id.to_owned();
        let plan = tokio::task::spawn_blocking(move || {
            (0..slot_count(users - covered, per))
                .map(|k| {
                    let slot = next_slot + k as i32;
                    let first = covered + k * per;
                    let password = Password::generate();
                    NewSlot {
                        slot,
                        first_user: first as i32,
                        user_count: per.min(users - first) as i32,
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

    /// Polls with backoff (one `DescribeInstances` per poll for the whole booking) until every
    /// slot's instance runs with a public address, recording what EC2 says; returns how many.
    /// `None` as soon as the booking is no longer being provisioned (cancelled or moved while
    /// its machines launched), so that what was launched is terminated at once.
    async fn wait_until_ready(&self, booking_id: &str) -> Result<Option<usize>, StageError> {
        let pool = &self.store.pool;
        let slots = slots::for_booking(pool, booking_id).await?;
        let ids: Vec<String> = slots.iter().filter_map(|s| s.instance_id.clone()).collect();
        if ids.len() < slots.len() {
            if !bookings::is_provisioning(pool, booking_id).await? {
                return Ok(None);
            }
            return Err(StageError::transient(anyhow::anyhow!(
                "{} of {} machines could be launched; the rest on the next attempt",
                ids.len(),
                slots.len()
            )));
        }
        let started = Instant::now();
        let mut delays = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(10))
                .without_max_times(),
        );
        loop {
            if !bookings::is_provisioning(pool, booking_id).await? {
                return Ok(None);
            }
            let infos = self.ec2.describe(&ids).await?;
            if let Some(gone) = infos.iter().find(|i| i.is_gone()) {
                // EC2 took it back before it ran (no capacity, a volume limit): the slot gets a
                // new launch generation, and the next attempt a replacement.
                slots::replace_instance(pool, &gone.instance_id, false).await?;
                return Err(StageError::transient(anyhow::anyhow!(
                    "instance {} stopped before it was ready ({}); a replacement is launched on the next attempt",
                    gone.instance_id,
                    gone.state
                )));
            }
            let ready = infos.iter().filter(|i| i.is_ready()).count();
            if ready == ids.len() && infos.len() == ids.len() {
                for i in &infos {
                    let (dns, ip) = (i.public_dns.as_deref(), i.public_ip.as_deref());
                    slots::record_state(pool, &i.instance_id, &i.state, dns, ip).await?;
                }
                return Ok(Some(ready));
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
