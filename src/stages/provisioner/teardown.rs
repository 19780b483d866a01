//! Terminating a booking's machines: at its end, when provisioning fails, and when a launch
//! raced the end.

use chrono::Utc;

use super::Provisioner;
use crate::broker::{Outgoing, StageError};
use crate::domain::{BookingRef, Event, EventKind};
use crate::ec2::intent;
use crate::store::schedule::{self, Action};
use crate::store::{BookingState, bookings, events, machines, slots};

/// How long after a launch was asked for EC2's tag search must show its machine: EC2's reads
/// are eventually consistent, within seconds.
const LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// How early a `teardown-due` may come before the booking's end and still be taken as the
/// booking's end: the scheduler's and the provisioner's clocks may differ a little.
const CLOCK_TOLERANCE: chrono::Duration = chrono::Duration::minutes(2);

impl Provisioner {
    /// Ends the booking: terminates its machines, marks it ended and publishes `ended`. A
    /// cancelled booking's machines are terminated and it stays cancelled. A `teardown-due` for a
    /// booking that has not ended is refused (docs/contract.md §2): its machines keep running;
    /// one from the timer of an end since moved later is acknowledged and does nothing.
    pub(super) async fn teardown(&self, r: &BookingRef) -> Result<Vec<Outgoing>, StageError> {
        let booking_id = r.booking_id.as_str();
        let booking = self.store.stored_booking(booking_id).await?;
        if booking.state == BookingState::Cancelled {
            let terminated = self.terminate_all(booking_id).await?;
            tracing::info!(terminated, "booking cancelled: instances terminated");
            return Ok(Vec::new());
        }
        if booking.ends_at() > Utc::now() + CLOCK_TOLERANCE && !booking.state.is_over() {
            let timer = schedule::find(&self.store.pool, booking_id, Action::Teardown).await?;
            let moved = r
                .revision
                .zip(timer)
                .is_some_and(|(rev, t)| i64::from(t.revision) > rev as i64);
            if moved {
                tracing::info!(
                    ends_at = %crate::format_time(booking.ends_at()),
                    "the booking's end moved later; this teardown is for its earlier end"
                );
                return Ok(Vec::new());
            }
            return Err(StageError::permanent(format!(
                "teardown-due for booking {booking_id}, which has not ended (it ends at {}); its machines keep running",
                crate::format_time(booking.ends_at())
            )));
        }
        let terminated = self.terminate_all(booking_id).await?;
        // The state and its event in one transaction, under the booking's lock.
        let mut tx = self.store.pool.begin().await?;
        crate::store::intake::lock(&mut tx, booking_id).await?;
        bookings::transition(&mut *tx, booking_id, BookingState::Ended, None).await?;
        let usage = machines::usage(&mut *tx, booking_id).await?;
        let event = Event::new(booking_id, EventKind::Ended, booking.revision.max(0) as u32)
            .state(BookingState::Ended)
            .detail(format!(
                "{terminated} machines terminated; {:.2} machine-hours",
                usage.machine_hours()
            ))
            .cost(&usage, &self.settings.prices);
        events::record_in(&mut tx, &event).await?;
        tx.commit().await?;
        tracing::info!(terminated, "booking ended: instances terminated");
        Ok(Vec::new())
    }

    /// Terminates the retired machines (of an earlier time of a booking that moved): the
    /// booking's, or every booking's. Returns how many.
    pub(super) async fn terminate_retired(
        &self,
        booking_id: Option<&str>,
    ) -> Result<usize, StageError> {
        let retired = slots::retired(&self.store.pool, booking_id).await?;
        if retired.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = retired.into_iter().map(|(_, id)| id).collect();
        self.terminate(&ids).await?;
        slots::forget_retired(&self.store.pool, &ids).await?;
        tracing::info!(terminated = ids.len(), "retired machines terminated");
        Ok(ids.len())
    }

    /// Finds the machines of launches whose outcome is unknown and whose slot has moved on
    /// (the booking moved, or the machine was replaced, before EC2's answer was recorded), by
    /// the booking's tags, and retires them: the booking's, or every booking's. A launch EC2
    /// still shows nothing of after [`LOST_AFTER`] is taken as never made.
    pub(super) async fn resolve_lost_launches(
        &self,
        booking_id: Option<&str>,
    ) -> Result<usize, StageError> {
        let pool = &self.store.pool;
        let lost = intent::unresolved(pool, booking_id).await?;
        let mut bookings: Vec<&str> = lost.iter().map(|u| u.booking_id.as_str()).collect();
        bookings.sort_unstable();
        bookings.dedup();
        let mut found = 0;
        for id in bookings {
            let tagged = self.ec2.find_for_booking(id).await?;
            for u in lost.iter().filter(|u| u.booking_id == id) {
                let launched: Vec<&str> = tagged
                    .iter()
                    .filter(|i| i.slot == Some(u.slot) && i.generation == u.generation)
                    .map(|i| i.instance_id.as_str())
                    .collect();
                if launched.is_empty() && u.age_s < LOST_AFTER.as_secs_f64() {
                    continue;
                }
                for instance_id in launched {
                    let key = (u.slot, u.generation);
                    let launch = machines::Launch::default();
                    machines::launched(pool, id, key, instance_id, launch).await?;
                    slots::retire(pool, id, instance_id).await?;
                    tracing::warn!(
                        booking_id = id,
                        slot = u.slot,
                        generation = u.generation,
                        instance_id,
                        "found a machine whose launch was never recorded; it is terminated"
                    );
                    found += 1;
                }
                intent::resolved(pool, u).await?;
            }
        }
        if found > 0 {
            self.terminate_retired(booking_id).await?;
        }
        Ok(found)
    }

    /// Terminates every instance of the booking: recorded, or found by tag.
    pub(super) async fn terminate_all(&self, booking_id: &str) -> Result<usize, StageError> {
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
        self.terminate(&ids).await?;
        Ok(ids.len() + self.terminate_retired(Some(booking_id)).await?)
    }

    /// Terminates instances and records them terminated (their slots, their running time).
    async fn terminate(&self, ids: &[String]) -> Result<(), StageError> {
        self.ec2.terminate(ids).await?;
        let pool = &self.store.pool;
        for id in ids {
            slots::record_state(pool, id, "terminated", None, None).await?;
        }
        let seconds = machines::terminated(pool, ids).await?;
        metrics::counter!("labbook_machine_seconds_total").increment(seconds.round() as u64);
        Ok(())
    }
}
