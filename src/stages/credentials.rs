//! Stage 1, `booking-created`: validate the booking, store it with one credential per user
//! (once), then ask for scheduling and the confirmation email.

use chrono::Utc;

use crate::broker::{Incoming, Outgoing, Stage, StageError, StageQueue, Undecodable};
use crate::crypto::{SecretKey, password_context};
use crate::domain::{
    Booking, BookingRef, BookingRules, Credential, EmailKind, NotifyMessage, parse_booking_content,
    peek_booking_id,
};
use crate::store::{Intake, Store, StoredCredential, bookings};

pub struct CredentialsStage {
    store: Store,
    key: SecretKey,
    rules: BookingRules,
}

impl CredentialsStage {
    pub fn new(store: Store, key: SecretKey, rules: BookingRules) -> Self {
        Self { store, key, rules }
    }
}

impl Stage for CredentialsStage {
    const QUEUE: StageQueue = StageQueue::BookingCreated;
    type Message = Booking;

    /// A booking that breaks a rule of docs/contract.md §3 does not decode.
    fn decode(&self, delivery: &Incoming) -> Result<Booking, Undecodable> {
        parse_booking_content(&delivery.body, delivery.content_type(), &self.rules).map_err(|e| {
            Undecodable {
                reason: e.0,
                subject: peek_booking_id(&delivery.body).map(|id| id.as_str().to_owned()),
            }
        })
    }

    async fn handle(&self, booking: &Booking, _: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        // A booking stored before is compared first: its copy arriving after the booking
        // ended is still a duplicate, not a new booking in the past.
        let intake = match bookings::check_existing(&self.store.pool, booking).await? {
            Some(existing) => existing,
            None => {
                booking
                    .check_not_over(Utc::now())
                    .map_err(|e| StageError::Permanent(e.0))?;
                let stored = seal_credentials(booking, &self.key).await?;
                bookings::insert(&self.store.pool, booking, &stored).await?
            }
        };
        match intake {
            Intake::Conflict(fields) => {
                return Err(StageError::Permanent(format!(
                    "conflict: booking {} is already stored with a different {}; the stored booking is unchanged",
                    booking.id,
                    fields.join(", ")
                )));
            }
            Intake::Created => tracing::info!(
                users = booking.number_of_users.get(),
                booking_time = %crate::format_time(booking.booking_time),
                "booking stored with its credentials"
            ),
            Intake::Duplicate => {
                tracing::info!(
                    "booking already stored with the same content; its follow-ups are published again"
                )
            }
        }
        Ok(follow_ups(booking.id.as_str()))
    }
}

/// What intake asks of the rest of the pipeline. Downstream stages are idempotent, so these
/// are published again when a booking comes twice (the first publish may not have happened).
pub fn follow_ups(booking_id: &str) -> Vec<Outgoing> {
    vec![
        BookingRef::outgoing(StageQueue::CredentialsReady, booking_id),
        NotifyMessage::outgoing(booking_id, EmailKind::Confirmation),
    ]
}

/// Generates, encrypts and hashes the booking's credentials off the async runtime (hashing
/// is CPU work). The plaintext passwords are dropped here.
async fn seal_credentials(
    booking: &Booking,
    key: &SecretKey,
) -> Result<Vec<StoredCredential>, StageError> {
    let n = booking.number_of_users.get() as usize;
    let booking_id = booking.id.as_str().to_owned();
    let key = key.clone();
    tokio::task::spawn_blocking(move || {
        Credential::generate_set(n)
            .into_iter()
            .enumerate()
            .map(|(i, c)| StoredCredential {
                position: i as i32,
                password_encrypted: key.encrypt(
                    &c.password,
                    &password_context(&booking_id, c.username.as_str()),
                ),
                password_hash: c.password.sha512_crypt(),
                username: c.username.as_str().to_owned(),
            })
            .collect()
    })
    .await
    .map_err(StageError::transient)
}
