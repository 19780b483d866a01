//! A change an operator makes to a stored booking, published exactly as an upstream would
//! (docs/contract.md §3a): the stored revision plus one, to `booking-created`, with a confirm,
//! so the pipeline applies the contract's rules to it like to any other revision. `labbook
//! cancel` and the console's cancel and new-end actions share it.

use std::fmt;
use std::time::Duration;

use lapin::Channel;

use tracing::Instrument;

use crate::broker::publisher::unstamped_properties;
use crate::broker::trace::{self, TraceContext};
use crate::broker::{EXCHANGE, PublishError, StageQueue, publish_confirmed};
use crate::domain::booking::{MAX_DURATION_MINUTES, MIN_DURATION_MINUTES};
use crate::domain::{BookingId, BookingRules};
use crate::domain::{BookingMessage, parse_message};
use crate::store::{BookingRecord, BookingState, bookings, slots};

/// What the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `"cancelled": true`.
    Cancel,
    /// The same booking with this length (minutes): a later or earlier end.
    Duration(u32),
}

/// Why a change is not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    NotFound,
    AlreadyCancelled { revision: i32 },
    Ended,
    HighestRevision { revision: i32 },
    Unchanged,
    Invalid(String),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NotFound => write!(f, "not found"),
            Refused::AlreadyCancelled { revision } => {
                write!(f, "it is already cancelled (revision {revision})")
            }
            Refused::Ended => write!(f, "it has ended; an ended booking is not changed"),
            Refused::HighestRevision { revision } => write!(
                f,
                "it is at the highest revision ({revision}); it cannot be changed any more"
            ),
            Refused::Unchanged => write!(f, "it already has that length; nothing to change"),
            Refused::Invalid(why) => write!(f, "{why}"),
        }
    }
}

/// A change ready to publish: the message an upstream would send.
#[derive(Debug, Clone)]
pub struct Planned {
    pub change: Change,
    /// The booking as stored now.
    pub booking: BookingRecord,
    /// The revision the message carries (the stored one plus one).
    pub revision: i32,
    pub body: Vec<u8>,
    pub message_id: String,
    /// Machines launched and not terminated.
    pub machines: usize,
}

/// Reads the booking and builds the message for `change`, checked as the credentials stage
/// would check it.
pub async fn plan(
    pool: &sqlx::PgPool,
    id: &BookingId,
    change: Change,
    rules: &BookingRules,
) -> Result<Result<Planned, Refused>, sqlx::Error> {
    let Some(booking) = bookings::find(pool, id.as_str()).await? else {
        return Ok(Err(Refused::NotFound));
    };
    let machines = slots::for_booking(pool, id.as_str())
        .await?
        .iter()
        .filter(|s| s.instance_id.is_some() && s.instance_state.as_deref() != Some("terminated"))
        .count();
    Ok(build(booking, change, rules, machines))
}

fn build(
    booking: BookingRecord,
    change: Change,
    rules: &BookingRules,
    machines: usize,
) -> Result<Planned, Refused> {
    if booking.cancelled {
        return Err(Refused::AlreadyCancelled {
            revision: booking.revision,
        });
    }
    if matches!(change, Change::Duration(_)) && booking.state == BookingState::Ended {
        return Err(Refused::Ended);
    }
    let Some(revision) = booking.revision.checked_add(1) else {
        return Err(Refused::HighestRevision {
            revision: booking.revision,
        });
    };
    let body = match change {
        Change::Cancel => serde_json::json!({
            "booking_id": booking.booking_id,
            "revision": revision,
            "cancelled": true,
        }),
        Change::Duration(minutes) => {
            if minutes == booking.duration_minutes.max(0) as u32 {
                return Err(Refused::Unchanged);
            }
            serde_json::json!({
                "booking_id": booking.booking_id,
                "email": booking.email,
                "booking_time": crate::format_time(booking.booking_time),
                "number_of_users": booking.number_of_users,
                "duration_minutes": minutes,
                "revision": revision,
            })
        }
    };
    let body = serde_json::to_vec(&body).expect("a JSON value serializes");
    check(&body, change, rules)?;
    Ok(Planned {
        change,
        message_id: format!("booking/{}/r{revision}", booking.booking_id),
        booking,
        revision,
        body,
        machines,
    })
}

/// The message checked as the credentials stage parses it.
fn check(body: &[u8], change: Change, rules: &BookingRules) -> Result<(), Refused> {
    if let Change::Duration(m) = change
        && !(MIN_DURATION_MINUTES..=MAX_DURATION_MINUTES).contains(&m)
    {
        return Err(Refused::Invalid(format!(
            "the length must be from {MIN_DURATION_MINUTES} to {MAX_DURATION_MINUTES} minutes (got {m})"
        )));
    }
    match parse_message(body, None, rules) {
        Ok(BookingMessage::Cancel(_)) if change == Change::Cancel => Ok(()),
        Ok(BookingMessage::Book(_)) if change != Change::Cancel => Ok(()),
        Ok(_) => Err(Refused::Invalid(
            "the message is not the change asked for".into(),
        )),
        Err(invalid) => Err(Refused::Invalid(invalid.to_string())),
    }
}

impl Planned {
    /// Publishes the message to `booking-created` through the `labbook` exchange and waits for
    /// the broker's confirm.
    pub async fn publish(&self, channel: &Channel, timeout: Duration) -> Result<(), PublishError> {
        let route = (EXCHANGE, StageQueue::BookingCreated.name());
        // Under the booking's own trace: the change is one more step of its story.
        let stored = self.booking.traceparent.as_deref();
        let stored = stored.and_then(|tp| TraceContext::parse(tp, None));
        let span = trace::producer_span(route.0, route.1, &self.message_id, stored.as_ref());
        async {
            let props =
                trace::stamp_published(unstamped_properties(&self.message_id), stored.as_ref());
            publish_confirmed(channel, route, &self.body, props, timeout).await
        }
        .instrument(span)
        .await
    }

    /// What the change will do to the booking, in a sentence for the operator.
    pub fn what_happens(&self) -> String {
        let b = &self.booking;
        let over = b.ends_at() <= chrono::Utc::now();
        match self.change {
            Change::Cancel => match b.state {
                BookingState::Ended => "it has ended: it stays ended, and no email is sent".into(),
                _ if over => "its end has passed: it ends as planned, and no email is sent".into(),
                BookingState::Received | BookingState::Scheduled => {
                    "it will not be provisioned; the booker gets a Booking Cancelled email".into()
                }
                BookingState::Failed => "it had failed and nothing runs for it; the booker gets a Booking Cancelled email".into(),
                _ => format!(
                    "its {} running machine(s) will be terminated within a minute; the booker gets a Booking Cancelled email",
                    self.machines
                ),
            },
            Change::Duration(minutes) => {
                let end = b.booking_time + chrono::Duration::minutes(i64::from(minutes));
                let when = if end <= chrono::Utc::now() {
                    "its machines are terminated within a minute (the new end has passed)"
                        .to_owned()
                } else {
                    format!("its machines run until {}", crate::format_time(end))
                };
                format!(
                    "it ends at {} instead of {} ({minutes} minutes instead of {}): {when}; the booker gets a Booking Updated email",
                    crate::format_time(end),
                    crate::format_time(b.ends_at()),
                    b.duration_minutes
                )
            }
        }
    }

    /// The change in a few words, for the booking's history.
    pub fn summary(&self) -> String {
        match self.change {
            Change::Cancel => format!("cancellation published as revision {}", self.revision),
            Change::Duration(m) => format!(
                "length {} → {m} minutes (ends {}), published as revision {}",
                self.booking.duration_minutes,
                crate::format_time(
                    self.booking.booking_time + chrono::Duration::minutes(i64::from(m))
                ),
                self.revision
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(state: BookingState, cancelled: bool) -> BookingRecord {
        let at = chrono::Utc::now() + chrono::Duration::hours(2);
        BookingRecord {
            booking_id: "b-1".into(),
            email: "t@example.org".into(),
            booking_time: at,
            number_of_users: 3,
            duration_minutes: 60,
            state,
            failure_reason: None,
            created_at: at,
            updated_at: at,
            revision: 4,
            first_revision: 0,
            cancelled,
            schedule_revision: 4,
            provisioned_revision: None,
            traceparent: None,
        }
    }

    #[test]
    fn a_change_is_the_next_revision_as_an_upstream_would_send_it() {
        let rules = BookingRules::default();
        let cancel = build(
            stored(BookingState::Scheduled, false),
            Change::Cancel,
            &rules,
            0,
        );
        let cancel = cancel.unwrap();
        assert_eq!(cancel.revision, 5);
        assert_eq!(cancel.message_id, "booking/b-1/r5");
        let body: serde_json::Value = serde_json::from_slice(&cancel.body).unwrap();
        assert_eq!(body["cancelled"], true);
        let longer = build(
            stored(BookingState::Provisioned, false),
            Change::Duration(90),
            &rules,
            2,
        );
        let longer = longer.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&longer.body).unwrap();
        assert_eq!(
            (body["duration_minutes"].as_u64(), body["revision"].as_u64()),
            (Some(90), Some(5))
        );
        assert_eq!(body["number_of_users"], 3);
        assert!(
            longer.what_happens().contains("90 minutes instead of 60"),
            "{}",
            longer.what_happens()
        );
    }

    #[test]
    fn refuses_what_the_pipeline_would_refuse_or_ignore() {
        let rules = BookingRules::default();
        let refused = |b, c| build(b, c, &rules, 0).unwrap_err();
        assert_eq!(
            refused(stored(BookingState::Cancelled, true), Change::Cancel),
            Refused::AlreadyCancelled { revision: 4 }
        );
        assert_eq!(
            refused(stored(BookingState::Ended, false), Change::Duration(90)),
            Refused::Ended
        );
        assert_eq!(
            refused(stored(BookingState::Scheduled, false), Change::Duration(60)),
            Refused::Unchanged
        );
        assert!(matches!(
            refused(stored(BookingState::Scheduled, false), Change::Duration(5)),
            Refused::Invalid(_)
        ));
        let mut last = stored(BookingState::Scheduled, false);
        last.revision = i32::MAX;
        assert!(matches!(
            refused(last, Change::Cancel),
            Refused::HighestRevision { .. }
        ));
    }
}
