//! Terminating a booking's machines: at its end, when provisioning fails, and when a launch
//! raced the end.

use chrono::Utc;

use super::Provisioner;
use crate::broker::{Outgoing, StageError};
use crate::store::{BookingState, bookings, slots};

/// How early a `teardown-due` may come before the booking's end and still be taken as the
/// booking's end: the scheduler's and the provisioner's clocks may differ a little.
const CLOCK_TOLERANCE: chrono::Duration = chrono::Duration::minutes(2);

impl Provisioner {
    /// Ends the booking: terminates its machines and marks it ended. A `teardown-due` for a
    /// booking that has not ended is refused (docs/contract.md §2): its machines keep running.
    pub(super) async fn teardown(&self, booking_id: &str) -> Result<Vec<Outgoing>, StageError> {
        let booking = self.store.stored_booking(booking_id).await?;
        if booking.ends_at() > Utc::now() + CLOCK_TOLERANCE && !booking.state.is_over() {
            return Err(StageError::permanent(format!(
                "teardown-due for booking {booking_id}, which has not ended (it ends at {}); its machines keep running",
                crate::format_time(booking.ends_at())
            )));
        }
        let terminated = self.terminate_all(booking_id).await?;
        bookings::transition(&self.store.pool, booking_id, BookingState::Ended, None).await?;
        tracing::info!(terminated, "booking ended: instances terminated");
        Ok(Vec::new())
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
        self.ec2.terminate(&ids).await?;
        for id in &ids {
            slots::record_state(&self.store.pool, id, "terminated", None, None).await?;
        }
        Ok(ids.len())
    }
}
