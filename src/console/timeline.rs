//! A booking's story, from what is stored today: the booking row, its logins, schedule,
//! machines and emails, and the dead letters that name it. [`timeline`] is the one place that
//! turns them into events, so the booking history table (`booking_events`) can join here.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::actions::{CANCEL, NEW_END, PURGE, REPLAY, RESEND};
use super::bookings::Stored;
use super::dead_letters::LetterRow;
use crate::broker::StageQueue;
use crate::format_time;

/// How an event reads: done, to come, or gone wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tone {
    Done,
    Pending,
    Failed,
}

/// One event of a booking's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When it happened (or is due); `None` when only its place in the story is known.
    pub at: Option<String>,
    /// A stable name: `received`, `credentials`, `scheduled`, `provisioning`, `launched`,
    /// `terminated`, `email_sent`, `email_failed`, `dead_letter`, `failed`, `teardown`, `ended`,
    /// `changed`, `cancelled`, `rejected`, `operator` (an action from the console, not yet seen
    /// by the pipeline, or one that is not a revision: a resend, a replay, a purge).
    pub event: &'static str,
    pub title: String,
    pub detail: String,
    pub tone: Tone,
    #[serde(skip)]
    sort: DateTime<Utc>,
}

impl Event {
    fn new(event: &'static str, at: DateTime<Utc>, title: String, detail: String) -> Self {
        Self {
            at: Some(format_time(at)),
            event,
            title,
            detail,
            tone: Tone::Done,
            sort: at,
        }
    }

    /// An event whose time is unknown, told at `place` in the story.
    fn placed(event: &'static str, place: DateTime<Utc>, title: String, detail: String) -> Self {
        Self {
            at: None,
            ..Self::new(event, place, title, detail)
        }
    }

    fn tone(self, tone: Tone) -> Self {
        Self { tone, ..self }
    }
}

/// The booking's events, oldest first (due ones at their due time).
pub fn timeline(stored: &Stored, dead_letters: &[LetterRow]) -> Vec<Event> {
    let b = &stored.booking;
    let mut events = vec![Event::new(
        "received",
        b.created_at,
        "Booking received".into(),
        format!(
            "{} trainees on {} for {} minutes; trainer {}",
            b.number_of_users,
            format_time(b.booking_time),
            b.duration_minutes,
            b.email
        ),
    )];
    if !stored.usernames.is_empty() {
        events.push(Event::placed(
            "credentials",
            b.created_at,
            format!("{} logins generated", stored.usernames.len()),
            stored.usernames.join(", "),
        ));
    }
    schedule_events(stored, &mut events);
    machine_events(stored, &mut events);
    email_events(stored, &mut events);
    let refusals = stored
        .history
        .iter()
        .filter(|h| h.event == "rejected")
        .count();
    let intake = StageQueue::BookingCreated.dlq();
    // A refused booking message is told once: its `rejected` event stands for its dead letter.
    let mut told_by_history = 0;
    for l in dead_letters {
        if l.queue == intake && told_by_history < refusals {
            told_by_history += 1;
            continue;
        }
        let at = l.failed_at_time.unwrap_or(b.updated_at);
        let title = format!("Dead letter in {}", l.queue);
        let detail = format!("{} (attempts: {})", l.error, l.attempts_text());
        events.push(Event::new("dead_letter", at, title, detail).tone(Tone::Failed));
    }
    let intake_letters = dead_letters.iter().filter(|l| l.queue == intake).count();
    change_events(stored, intake_letters, &mut events);
    outcome_events(stored, &mut events);
    // Stable: events at one instant keep the order they were told in.
    events.sort_by_key(|e| e.sort);
    events
}

/// Changes, cancellation and refused messages, from the booking's history of events, each
/// with the operator who published it when it came from the console; then the console's other
/// actions. `intake_letters`: the booking's dead letters in `booking-created.dlq` (a refusal
/// that has one says so, and is not told a second time as a dead letter).
fn change_events(stored: &Stored, intake_letters: usize, events: &mut Vec<Event>) {
    let mut told = vec![false; stored.actions.len()];
    let mut refusals = 0;
    for h in &stored.history {
        let (event, title, tone) = match h.event.as_str() {
            "accepted" if h.revision > 0 => (
                "changed",
                format!("Change accepted (revision {})", h.revision),
                Tone::Done,
            ),
            "cancelled" => (
                "cancelled",
                format!("Cancelled (revision {})", h.revision),
                Tone::Failed,
            ),
            "rejected" => (
                "rejected",
                format!("Message refused (revision {})", h.revision),
                Tone::Failed,
            ),
            _ => continue,
        };
        let mut title = title;
        let mut detail = h.detail.clone();
        if event == "rejected" {
            refusals += 1;
            if refusals <= intake_letters {
                detail = format!("{detail}; kept in booking-created.dlq (replay it below)");
            }
        }
        let by = stored.actions.iter().enumerate().position(|(i, a)| {
            !told[i]
                && a.revision == Some(h.revision)
                && [CANCEL, NEW_END].contains(&a.action.as_str())
        });
        if let Some(i) = by {
            told[i] = true;
            title = format!(
                "{title}, published by {} from the console",
                stored.actions[i].operator
            );
        }
        events.push(Event::new(event, h.at, title, detail).tone(tone));
    }
    for (a, _) in stored.actions.iter().zip(told).filter(|(_, told)| !told) {
        let (title, tone) = match a.action.as_str() {
            CANCEL => (
                format!("Cancellation published by {}", a.operator),
                Tone::Pending,
            ),
            NEW_END => (
                format!("New end published by {}", a.operator),
                Tone::Pending,
            ),
            RESEND => (
                format!("Instance details email resent by {}", a.operator),
                Tone::Done,
            ),
            REPLAY => (
                format!("Dead letters replayed by {}", a.operator),
                Tone::Done,
            ),
            PURGE => (format!("Dead letters purged by {}", a.operator), Tone::Done),
            other => (format!("{other} by {}", a.operator), Tone::Done),
        };
        events.push(Event::new("operator", a.at, title, a.detail.clone()).tone(tone));
    }
}

fn schedule_events(stored: &Stored, events: &mut Vec<Event>) {
    let b = &stored.booking;
    if stored.schedule.is_empty() {
        return;
    }
    let due: Vec<String> = stored
        .schedule
        .iter()
        .map(|s| format!("{} due {}", s.action, format_time(s.due_at)))
        .collect();
    events.push(Event::placed(
        "scheduled",
        b.created_at,
        "Scheduled".into(),
        due.join("; "),
    ));
    for s in &stored.schedule {
        let (event, doing) = match s.action.as_str() {
            "provision" => ("provisioning", "Provisioning"),
            "teardown" => ("teardown", "Teardown"),
            _ => ("scheduled", "Scheduled action"),
        };
        events.push(match s.published_at {
            Some(at) => Event::new(
                event,
                at,
                format!("{doing} started"),
                format!("{}-due published (due {})", s.action, format_time(s.due_at)),
            ),
            None => Event::new(event, s.due_at, format!("{doing} due"), "not yet".into())
                .tone(Tone::Pending),
        });
    }
}

fn machine_events(stored: &Stored, events: &mut Vec<Event>) {
    for m in &stored.machines {
        let users = &stored.usernames;
        let on_it: Vec<&str> = users
            .iter()
            .skip(m.first_user.max(0) as usize)
            .take(m.user_count.max(0) as usize)
            .map(String::as_str)
            .collect();
        let Some(id) = &m.instance_id else {
            continue;
        };
        let state = m.instance_state.as_deref().unwrap_or("unknown");
        let address = m
            .address()
            .map_or("no address yet".into(), |a| format!("http://{a}"));
        let at = m.launched_at.unwrap_or(m.updated_at);
        events.push(Event::new(
            "launched",
            at,
            format!("Machine #{} launched", m.slot),
            format!("{id}: {state}, {address}; trainees {}", on_it.join(", ")),
        ));
        if matches!(state, "terminated" | "shutting-down") {
            events.push(Event::new(
                "terminated",
                m.updated_at,
                format!("Machine #{} {state}", m.slot),
                id.clone(),
            ));
        }
    }
}

fn email_events(stored: &Stored, events: &mut Vec<Event>) {
    for e in &stored.emails {
        let what = match e.kind.as_str() {
            "confirmation" => "Confirmation email".to_owned(),
            "instance_details" => "Instance details email".to_owned(),
            "failure" => "Failure email".to_owned(),
            "updated" => "Booking updated email".to_owned(),
            "cancelled" => "Cancellation email".to_owned(),
            other => format!("Email {other}"),
        };
        let what = match e.copy {
            0 => what,
            n => format!("{what} (resent, copy {n})"),
        };
        let to = format!("to {}", stored.booking.email);
        events.push(match (e.sent_at, &e.last_error) {
            (Some(at), _) => Event::new("email_sent", at, format!("{what} sent"), to),
            (None, error) => Event::placed(
                "email_failed",
                stored.booking.updated_at,
                format!("{what} not sent yet"),
                error
                    .clone()
                    .unwrap_or_else(|| "waiting for the notifier".into()),
            )
            .tone(Tone::Failed),
        });
    }
}

fn outcome_events(stored: &Stored, events: &mut Vec<Event>) {
    let b = &stored.booking;
    match b.state.as_str() {
        "failed" => events.push(
            Event::new(
                "failed",
                b.updated_at,
                "Booking failed".into(),
                b.failure_reason.clone().unwrap_or_default(),
            )
            .tone(Tone::Failed),
        ),
        "ended" => events.push(Event::new(
            "ended",
            b.updated_at,
            "Booking ended".into(),
            "the machines were terminated".into(),
        )),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::bookings::{BookingRow, EmailRow, MachineRow, ScheduleRow};

    fn at(h: u32) -> DateTime<Utc> {
        chrono::NaiveDate::from_ymd_opt(2026, 12, 1)
            .unwrap()
            .and_hms_opt(h, 0, 0)
            .unwrap()
            .and_utc()
    }

    fn failed_booking() -> Stored {
        Stored {
            booking: BookingRow {
                booking_id: "b1".into(),
                email: "t@example.org".into(),
                booking_time: at(9),
                number_of_users: 2,
                duration_minutes: 60,
                state: "failed".into(),
                failure_reason: Some("InvalidSubnetID.NotFound".into()),
                created_at: at(1),
                updated_at: at(5),
                traceparent: None,
            },
            usernames: vec!["ua".into(), "ub".into()],
            usage: Default::default(),
            machines: vec![MachineRow {
                slot: 0,
                first_user: 0,
                user_count: 2,
                admin_username: "labadmin".into(),
                instance_id: Some("i-1".into()),
                instance_state: Some("terminated".into()),
                public_dns: None,
                public_ip: Some("203.0.113.9".into()),
                launched_at: Some(at(4)),
                updated_at: at(5),
                image_id: Some("ami-1".into()),
                ready_at: None,
                boot_seconds: None,
            }],
            schedule: vec![
                ScheduleRow {
                    action: "provision".into(),
                    due_at: at(3),
                    published_at: Some(at(3)),
                },
                ScheduleRow {
                    action: "teardown".into(),
                    due_at: at(10),
                    published_at: None,
                },
            ],
            emails: vec![
                EmailRow {
                    kind: "confirmation".into(),
                    copy: 0,
                    sent_at: Some(at(2)),
                    last_error: None,
                },
                EmailRow {
                    kind: "failure".into(),
                    copy: 0,
                    sent_at: None,
                    last_error: Some("451 try later".into()),
                },
            ],
            history: Vec::new(),
            actions: Vec::new(),
        }
    }

    #[test]
    fn changes_and_cancellation_come_from_the_history() {
        use crate::store::events::HistoryEntry;
        let mut stored = failed_booking();
        let entry = |event: &str, revision, minutes| HistoryEntry {
            event: event.into(),
            revision,
            at: at(minutes),
            state: None,
            detail: format!("{event} detail"),
        };
        stored.history = vec![
            entry("accepted", 0, 1),
            entry("accepted", 1, 3),
            entry("cancelled", 2, 4),
        ];
        let events = timeline(&stored, &[]);
        let changed = events.iter().find(|e| e.event == "changed").unwrap();
        assert_eq!(changed.title, "Change accepted (revision 1)");
        let cancelled = events.iter().find(|e| e.event == "cancelled").unwrap();
        assert_eq!(cancelled.tone, Tone::Failed);
        // The first acceptance is the booking's reception, told once.
        assert_eq!(events.iter().filter(|e| e.event == "changed").count(), 1);
    }

    #[test]
    fn an_operator_change_is_told_once_with_who_published_it() {
        use crate::console::actions::ActionRow;
        use crate::store::events::HistoryEntry;
        let mut stored = failed_booking();
        stored.history = vec![HistoryEntry {
            event: "cancelled".into(),
            revision: 1,
            at: at(6),
            state: None,
            detail: "cancelled".into(),
        }];
        let action = |action: &str, revision| ActionRow {
            at: at(6),
            operator: "alice".into(),
            action: action.into(),
            revision,
            detail: "d".into(),
        };
        stored.actions = vec![action(CANCEL, Some(1)), action(RESEND, Some(0))];
        let events = timeline(&stored, &[]);
        let cancelled: Vec<&Event> = events.iter().filter(|e| e.event == "cancelled").collect();
        assert_eq!(cancelled.len(), 1);
        assert!(
            cancelled[0]
                .title
                .ends_with("published by alice from the console")
        );
        let by_hand: Vec<&Event> = events.iter().filter(|e| e.event == "operator").collect();
        assert_eq!(by_hand.len(), 1, "the cancellation is not told twice");
        assert_eq!(by_hand[0].title, "Instance details email resent by alice");
    }

    #[test]
    fn tells_a_failed_booking_in_order() {
        let events = timeline(&failed_booking(), &[]);
        let names: Vec<&str> = events.iter().map(|e| e.event).collect();
        assert_eq!(
            names,
            [
                "received",
                "credentials",
                "scheduled",
                "email_sent",
                "provisioning",
                "launched",
                "terminated",
                "email_failed",
                "failed",
                "teardown"
            ]
        );
        let failed = events.iter().find(|e| e.event == "failed").unwrap();
        assert_eq!(
            (failed.tone, failed.detail.as_str()),
            (Tone::Failed, "InvalidSubnetID.NotFound")
        );
        assert!(
            events
                .iter()
                .any(|e| e.detail.contains("http://203.0.113.9"))
        );
        assert_eq!(events.last().unwrap().tone, Tone::Pending);
    }
}
