//! What a `booking-created` message does to what is stored under its id (docs/contract.md
//! §3, §3a): a pure function of the message, the stored booking and the clock.

use chrono::{DateTime, Utc};

use crate::domain::{Booking, BookingMessage};
use crate::store::{BookingRecord, BookingState};

/// The outcome of comparing a message with what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A booking never stored: store it.
    Create,
    /// The stored revision again with the same content: a no-op whose follow-ups are published
    /// again (the first publish may not have happened).
    Duplicate,
    /// A lower revision than the stored one: acknowledged, nothing done.
    Stale,
    /// Dead-lettered with this reason; nothing stored changes.
    Refuse(String),
    /// A higher revision of a booking: store its content.
    Update(Update),
    /// A higher revision cancels the stored booking; `ended` when its end has passed (it stays
    /// `ended` and no email is sent).
    Cancel { ended: bool },
    /// A cancellation of a booking already cancelled: nothing changes. `repeat` when it is the
    /// same message again (its follow-ups are published again).
    AlreadyCancelled { repeat: bool },
    /// The cancellation of a booking never stored: kept, so a late lower revision is not
    /// provisioned.
    Tombstone,
}

/// What an update changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// `booking_time` changed.
    pub time_moved: bool,
    /// The end (`booking_time + duration`) changed.
    pub end_moved: bool,
    /// Trainees added (their logins are made).
    pub added: u32,
    /// Trainees removed (before provisioning only).
    pub removed: u32,
    /// Provisioning had started: machines may run.
    pub started: bool,
}

impl Update {
    /// The state the booking is in after the update.
    pub fn next_state(&self, current: BookingState) -> BookingState {
        if current == BookingState::Failed {
            // Moved to a new time, a failed booking is tried again then.
            return if self.time_moved {
                BookingState::Scheduled
            } else {
                current
            };
        }
        if self.started && self.time_moved {
            // Its machines are for the old time: it is provisioned again at the new one.
            BookingState::Scheduled
        } else if self.started && self.added > 0 {
            // New machines are launched for the added trainees.
            BookingState::Provisioning
        } else {
            current
        }
    }
}

/// Compares `msg` with the `stored` booking (or the kept cancellation `tombstone`, the revision
/// of a cancellation of a booking never stored).
pub fn decide(
    msg: &BookingMessage,
    stored: Option<&BookingRecord>,
    tombstone: Option<i32>,
    now: DateTime<Utc>,
) -> Decision {
    let revision = msg.revision() as i64;
    match (msg, stored) {
        (_, None) => match tombstone.map(i64::from) {
            None if matches!(msg, BookingMessage::Cancel(_)) => Decision::Tombstone,
            None => Decision::Create,
            Some(kept) if revision < kept => Decision::Stale,
            Some(kept) if matches!(msg, BookingMessage::Cancel(_)) => {
                if revision == kept {
                    Decision::AlreadyCancelled { repeat: true }
                } else {
                    Decision::Tombstone
                }
            }
            Some(kept) if revision == kept => Decision::Refuse(format!(
                "conflict: booking {} was cancelled at revision {kept}",
                msg.id()
            )),
            Some(_) => Decision::Refuse(cancelled_stays(msg)),
        },
        (_, Some(s)) if revision < i64::from(s.revision) => Decision::Stale,
        (BookingMessage::Cancel(_), Some(s)) => decide_cancel(revision, s, now),
        (BookingMessage::Book(b), Some(s)) => decide_booking(b, s, now),
    }
}

fn cancelled_stays(msg: &BookingMessage) -> String {
    format!(
        "booking {} is cancelled and stays cancelled; a later revision cannot book it again",
        msg.id()
    )
}

fn decide_cancel(revision: i64, s: &BookingRecord, now: DateTime<Utc>) -> Decision {
    if s.cancelled {
        return Decision::AlreadyCancelled {
            repeat: revision == i64::from(s.revision),
        };
    }
    if revision == i64::from(s.revision) {
        return Decision::Refuse(format!(
            "conflict: a cancellation at revision {revision}, the stored revision of booking {}, which is not cancelled; cancel with a higher revision",
            s.booking_id
        ));
    }
    let ended = s.state == BookingState::Ended || s.ends_at() <= now;
    Decision::Cancel { ended }
}

fn decide_booking(b: &Booking, s: &BookingRecord, now: DateTime<Utc>) -> Decision {
    let same_revision = b.revision as i64 == i64::from(s.revision);
    if s.cancelled {
        return Decision::Refuse(if same_revision {
            format!(
                "conflict: booking {} was cancelled at revision {}",
                s.booking_id, s.revision
            )
        } else {
            format!(
                "booking {} is cancelled and stays cancelled; a later revision cannot book it again",
                s.booking_id
            )
        });
    }
    let diff = s.differences(b);
    if same_revision {
        return if diff.is_empty() {
            Decision::Duplicate
        } else {
            Decision::Refuse(format!(
                "conflict: booking {} is already stored at revision {} with a different {}; the stored booking is unchanged (raise the revision to change it)",
                b.id,
                s.revision,
                diff.join(", ")
            ))
        };
    }
    match refuse_update(b, s, now) {
        Some(reason) => Decision::Refuse(reason),
        None => Decision::Update(Update {
            time_moved: s.booking_time != b.booking_time,
            end_moved: s.ends_at() != b.ends_at(),
            added: (b.number_of_users.get() as i32 - s.number_of_users).max(0) as u32,
            removed: (s.number_of_users - b.number_of_users.get() as i32).max(0) as u32,
            started: s.state.provisioning_started() || s.state == BookingState::Failed,
        }),
    }
}

/// Why an update of `s` to `b` is refused, if it is.
fn refuse_update(b: &Booking, s: &BookingRecord, now: DateTime<Utc>) -> Option<String> {
    let id = &b.id;
    if s.state == BookingState::Ended || s.ends_at() <= now {
        return Some(format!("booking {id} has ended; it can no longer change"));
    }
    let started = s.state.provisioning_started() || s.state == BookingState::Failed;
    if started && (b.number_of_users.get() as i32) < s.number_of_users {
        return Some(format!(
            "booking {id}: number_of_users cannot go down from {} to {} after provisioning started (machines cannot drop accounts); the stored booking is unchanged",
            s.number_of_users,
            b.number_of_users.get()
        ));
    }
    let time_moved = s.booking_time != b.booking_time;
    // A booking not yet started (or one provisioned again at a new time) must end in the future,
    // like a new booking; a running one may be shortened to an end already past (it ends now).
    if (!started || time_moved)
        && let Err(e) = b.check_not_over(now)
    {
        return Some(format!("booking {id}: {e}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BookingId, BookingRules, Cancellation, EmailAddress, UserCount};

    fn now() -> DateTime<Utc> {
        "2026-12-01T08:00:00Z".parse().unwrap()
    }

    fn booking(revision: u32, hour: u32, users: u32, minutes: u32) -> Booking {
        Booking {
            id: BookingId::parse("b-1").unwrap(),
            email: EmailAddress::parse("t@example.org").unwrap(),
            booking_time: format!("2026-12-01T{hour:02}:00:00Z").parse().unwrap(),
            number_of_users: UserCount::new(users, BookingRules::default().max_users).unwrap(),
            duration_minutes: minutes,
            revision,
        }
    }

    fn stored(b: &Booking, state: BookingState, cancelled: bool) -> BookingRecord {
        BookingRecord {
            booking_id: b.id.to_string(),
            email: b.email.to_string(),
            booking_time: b.booking_time,
            number_of_users: b.number_of_users.get() as i32,
            duration_minutes: b.duration_minutes as i32,
            state,
            failure_reason: None,
            created_at: now(),
            updated_at: now(),
            revision: b.revision as i32,
            first_revision: 0,
            cancelled,
            schedule_revision: b.revision as i32,
            provisioned_revision: None,
            traceparent: None,
        }
    }

    fn cancel(revision: u32) -> BookingMessage {
        BookingMessage::Cancel(Cancellation {
            id: BookingId::parse("b-1").unwrap(),
            revision,
        })
    }

    fn book(b: Booking) -> BookingMessage {
        BookingMessage::Book(b)
    }

    #[test]
    fn new_duplicate_stale_and_conflict() {
        let b = booking(1, 10, 3, 60);
        let s = stored(&b, BookingState::Scheduled, false);
        assert_eq!(
            decide(&book(b.clone()), None, None, now()),
            Decision::Create
        );
        assert_eq!(
            decide(&book(b.clone()), Some(&s), None, now()),
            Decision::Duplicate
        );
        assert_eq!(
            decide(&book(booking(0, 11, 3, 60)), Some(&s), None, now()),
            Decision::Stale
        );
        assert!(matches!(
            decide(&book(booking(1, 11, 3, 60)), Some(&s), None, now()),
            Decision::Refuse(r) if r.starts_with("conflict") && r.contains("booking_time")
        ));
    }

    #[test]
    fn updates_say_what_changed() {
        let s = stored(&booking(0, 10, 3, 60), BookingState::Scheduled, false);
        let moved = decide(&book(booking(1, 11, 5, 60)), Some(&s), None, now());
        assert_eq!(
            moved,
            Decision::Update(Update {
                time_moved: true,
                end_moved: true,
                added: 2,
                removed: 0,
                started: false
            })
        );
        let shrunk = decide(&book(booking(1, 10, 1, 60)), Some(&s), None, now());
        assert!(matches!(shrunk, Decision::Update(u) if u.removed == 2 && !u.time_moved));
    }

    #[test]
    fn running_bookings_extend_and_shorten_but_never_shrink() {
        let s = stored(&booking(0, 7, 4, 120), BookingState::Provisioned, false);
        let longer = decide(&book(booking(1, 7, 4, 180)), Some(&s), None, now());
        assert!(matches!(longer, Decision::Update(u) if u.end_moved && !u.time_moved && u.started));
        // An end already past means now for a running booking.
        let past = decide(&book(booking(1, 7, 4, 30)), Some(&s), None, now());
        assert!(matches!(past, Decision::Update(u) if u.end_moved));
        let fewer = decide(&book(booking(1, 7, 3, 120)), Some(&s), None, now());
        assert!(matches!(fewer, Decision::Refuse(r) if r.contains("cannot go down")));
        let u = Update {
            started: true,
            added: 1,
            ..Default::default()
        };
        assert_eq!(
            u.next_state(BookingState::Provisioned),
            BookingState::Provisioning
        );
        let u = Update {
            started: true,
            time_moved: true,
            added: 1,
            ..Default::default()
        };
        assert_eq!(
            u.next_state(BookingState::Provisioned),
            BookingState::Scheduled
        );
    }

    #[test]
    fn a_failed_booking_moved_to_a_new_time_is_tried_again_then() {
        let s = stored(&booking(0, 10, 3, 60), BookingState::Failed, false);
        let Decision::Update(u) = decide(&book(booking(1, 12, 3, 60)), Some(&s), None, now())
        else {
            panic!("an update")
        };
        assert_eq!(u.next_state(BookingState::Failed), BookingState::Scheduled);
        let Decision::Update(u) = decide(&book(booking(1, 10, 4, 60)), Some(&s), None, now())
        else {
            panic!("an update")
        };
        assert_eq!(u.next_state(BookingState::Failed), BookingState::Failed);
        // Past its end, a failed booking is over: cancelling it sends nothing.
        let over = stored(&booking(0, 6, 3, 60), BookingState::Failed, false);
        assert_eq!(
            decide(&cancel(1), Some(&over), None, now()),
            Decision::Cancel { ended: true }
        );
    }

    #[test]
    fn a_booking_not_started_must_end_in_the_future() {
        let s = stored(&booking(0, 10, 3, 60), BookingState::Scheduled, false);
        let past = decide(&book(booking(1, 6, 3, 60)), Some(&s), None, now());
        assert!(matches!(past, Decision::Refuse(r) if r.contains("already past")));
    }

    #[test]
    fn cancellations() {
        let b = booking(2, 10, 3, 60);
        let s = stored(&b, BookingState::Scheduled, false);
        assert_eq!(
            decide(&cancel(3), Some(&s), None, now()),
            Decision::Cancel { ended: false }
        );
        assert!(
            matches!(decide(&cancel(2), Some(&s), None, now()), Decision::Refuse(r) if r.starts_with("conflict"))
        );
        assert_eq!(decide(&cancel(1), Some(&s), None, now()), Decision::Stale);
        let ended = stored(&b, BookingState::Ended, false);
        assert_eq!(
            decide(&cancel(3), Some(&ended), None, now()),
            Decision::Cancel { ended: true }
        );
        let gone = stored(&b, BookingState::Cancelled, true);
        assert_eq!(
            decide(&cancel(4), Some(&gone), None, now()),
            Decision::AlreadyCancelled { repeat: false }
        );
        assert_eq!(
            decide(&cancel(2), Some(&gone), None, now()),
            Decision::AlreadyCancelled { repeat: true }
        );
        assert!(matches!(
            decide(&book(booking(5, 10, 3, 60)), Some(&gone), None, now()),
            Decision::Refuse(r) if r.contains("stays cancelled")
        ));
    }

    #[test]
    fn a_cancellation_of_an_unknown_booking_is_kept() {
        assert_eq!(decide(&cancel(3), None, None, now()), Decision::Tombstone);
        assert_eq!(
            decide(&cancel(3), None, Some(3), now()),
            Decision::AlreadyCancelled { repeat: true }
        );
        assert_eq!(
            decide(&cancel(4), None, Some(3), now()),
            Decision::Tombstone
        );
        assert_eq!(
            decide(&book(booking(2, 10, 3, 60)), None, Some(3), now()),
            Decision::Stale
        );
        assert!(
            matches!(decide(&book(booking(3, 10, 3, 60)), None, Some(3), now()), Decision::Refuse(r) if r.starts_with("conflict"))
        );
        assert!(
            matches!(decide(&book(booking(4, 10, 3, 60)), None, Some(3), now()), Decision::Refuse(r) if r.contains("stays cancelled"))
        );
    }
}
