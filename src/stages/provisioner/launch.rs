//! Launching a booking's machines: plan the slots once, launch or adopt one instance per slot,
//! record it, and leave the rest to the boot watch.

use futures_util::{StreamExt, TryStreamExt};

use super::Provisioner;
use crate::broker::{Outgoing, StageError};
use crate::crypto::admin_context;
use crate::domain::{EmailKind, NotifyMessage, Password};
use crate::ec2::userdata::{self, Account};
use crate::ec2::{Ec2Error, InstanceInfo, LaunchRequest, Offering, intent};
use crate::store::slots::{self, NewSlot, Slot};
use crate::store::{
    BookingRecord, BookingState, StoredCredential, bookings, boots, machines, offerings,
};

/// How a failure reason of a booking no offering had capacity for starts; the failure email
/// says so in plain words, with what was tried.
pub const NO_CAPACITY: &str = "no capacity:";

/// How a failure reason of a booking the account's vCPU quota could not take starts.
pub const QUOTA: &str = "quota:";

/// How long every replica skips an offering EC2 had no capacity for, in seconds.
const OFFERING_SKIPPED_FOR: f64 = 180.0;

/// The account's vCPU quota is used up: the booking waits (its attempts untouched) while
/// machines of earlier bookings end and free it, and fails once its start has passed, with a
/// reason the operator can act on.
fn quota_used_up(booking: &BookingRecord, detail: &str) -> StageError {
    metrics::counter!("labbook_ec2_quota_exceeded_total").increment(1);
    let why = format!(
        "{QUOTA} the AWS account's vCPU quota for running On-Demand instances (Service Quotas L-1216C47A) is used up ({detail}); ask AWS to raise it, or end other machines"
    );
    if booking.booking_time <= chrono::Utc::now() {
        return StageError::Permanent(why);
    }
    tracing::error!(booking_id = %booking.booking_id, reason = %why, "the booking waits for vCPUs to free up before its start");
    StageError::Unavailable(anyhow::anyhow!(why))
}

/// How many lab machines a booking needs.
pub fn slot_count(users: u32, users_per_instance: u32) -> u32 {
    users.div_ceil(users_per_instance)
}

impl Provisioner {
    /// Launches what the booking's current revision asks for and records it; the boot watch
    /// ([`super::watch`]) follows the machines from there to ready and asks for the instance
    /// details email, so the message is acknowledged as soon as every slot has its machine.
    /// `revision` is the revision of the timer that asked (`None` from a message without
    /// one): a booking moved since is not provisioned by it.
    pub(super) async fn provision(
        &self,
        booking: &BookingRecord,
        revision: Option<u32>,
    ) -> Result<Vec<Outgoing>, StageError> {
        let id = booking.booking_id.as_str();
        let pool = &self.store.pool;
        let Some(booking) = bookings::start_provisioning(pool, id, revision).await? else {
            return self.stopped(id).await;
        };
        let slots = self.plan(&booking).await?;
        let credentials = bookings::credentials(pool, id).await?;
        self.launch_missing(&booking, slots, &credentials).await?;
        let slots = slots::for_booking(pool, id).await?;
        let launched = slots.iter().filter(|s| s.instance_id.is_some()).count();
        if launched < slots.len() {
            if !bookings::is_provisioning(pool, id).await? {
                // Cancelled or moved while it launched: nothing more to launch for it.
                return self.stopped(id).await;
            }
            return Err(StageError::transient(anyhow::anyhow!(
                "{launched} of {} machines could be launched; the rest on the next attempt",
                slots.len()
            )));
        }
        // Every machine ready already (a copy of the message, trainees added and removed...):
        // the watch has nothing to wait for.
        if let Some(revision) = boots::finish_if_ready(pool, id).await? {
            return Ok(vec![NotifyMessage::at_revision(
                id,
                EmailKind::InstanceDetails,
                revision as u32,
            )]);
        }
        let booting = slots.iter().filter(|s| s.ready_at.is_none()).count();
        tracing::info!(
            machines = slots.len(),
            booting,
            revision = booking.revision,
            "every machine is launched; the boot watch follows them until they are ready"
        );
        Ok(Vec::new())
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
        let work: Vec<(Slot, Option<InstanceInfo>)> = missing
            .into_iter()
            .map(|slot| {
                let found = tagged
                    .iter()
                    .find(|i| i.slot == Some(slot.slot) && i.generation == slot.generation)
                    .cloned();
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

    /// Records the slot's instance: the one `found` by tag (as EC2 describes it: its image,
    /// type and subnet, which a changed configuration may not name any more), else a new
    /// launch. Nothing is launched once the booking is no longer being provisioned (cancelled
    /// or moved meanwhile).
    async fn ensure_instance(
        &self,
        booking: &BookingRecord,
        slot: Slot,
        found: Option<InstanceInfo>,
        credentials: &[StoredCredential],
    ) -> Result<(), StageError> {
        let booking_id = booking.booking_id.as_str();
        let (instance_id, image_id, instance_type, subnet_id) = match found {
            Some(existing) => {
                tracing::info!(slot = slot.slot, instance_id = %existing.instance_id, "found an instance launched earlier");
                let image = existing.image_id.unwrap_or_else(|| self.ami_id.clone());
                (
                    existing.instance_id,
                    image,
                    existing.instance_type,
                    existing.subnet_id,
                )
            }
            None => match self.launch(booking, &slot, credentials).await? {
                Some((launched, offering)) => (
                    launched,
                    self.ami_id.clone(),
                    Some(offering.instance_type),
                    offering.subnet_id,
                ),
                None => {
                    tracing::info!(slot = slot.slot, "the booking changed; not launching");
                    return Ok(());
                }
            },
        };
        let key = (slot.slot, slot.generation);
        let launch = machines::Launch {
            image_id: Some(&image_id),
            instance_type: instance_type.as_deref(),
            subnet_id: subnet_id.as_deref(),
        };
        if slots::record_instance(&self.store.pool, booking_id, key, &instance_id, launch)
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
    /// Where EC2 has no capacity for an offering, the next is tried (subnets, then types),
    /// and the offering is skipped by every replica for a few minutes; when none has any,
    /// the booking fails saying what was tried.
    async fn launch(
        &self,
        booking: &BookingRecord,
        slot: &Slot,
        credentials: &[StoredCredential],
    ) -> Result<Option<(String, Offering)>, StageError> {
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
        let offerings = self.settings.offerings();
        let mut blocked = offerings::blocked(pool).await?;
        if offerings.iter().all(|o| blocked.contains(o)) {
            // Every offering refused a moment ago: ask again rather than fail unasked.
            blocked.clear();
        }
        let mut tried = Vec::new();
        for (index, offering) in offerings.iter().enumerate() {
            if blocked.contains(offering) {
                tried.push(format!("{offering} (skipped: no capacity a moment ago)"));
                continue;
            }
            let req = LaunchRequest {
                booking_id,
                slot: slot.slot,
                generation: slot.generation,
                user_data: &user_data,
                offering,
                offering_index: index,
            };
            match self
                .ec2
                .launch_if(&req, &self.ami_id, rank, still_wanted)
                .await
            {
                Ok(Some(id)) => {
                    tracing::info!(slot = slot.slot, instance_id = %id, users = users.len(), %offering, "launched");
                    return Ok(Some((id, offering.clone())));
                }
                Ok(None) => return Ok(None),
                Err(Ec2Error::Capacity { detail, .. }) => {
                    let code = detail.split(':').next().unwrap_or_default().to_owned();
                    tracing::warn!(slot = slot.slot, %offering, error = %detail, "EC2 has no capacity for this offering; trying the next");
                    offerings::block(pool, offering, OFFERING_SKIPPED_FOR, &code).await?;
                    tried.push(format!("{offering} ({code})"));
                }
                Err(Ec2Error::Quota { detail, .. }) => return Err(quota_used_up(booking, &detail)),
                Err(err) => return Err(err.into()),
            }
        }
        Err(StageError::Permanent(format!(
            "{NO_CAPACITY} EC2 had no capacity for any configured instance type and subnet; tried {}",
            tried.join(", ")
        )))
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
