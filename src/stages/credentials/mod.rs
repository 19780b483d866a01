//! Stage 1, `booking-created`: validate the message, then store a new booking with one
//! credential per user (once), an update, or a cancellation (docs/contract.md §3, §3a), and ask
//! the rest of the pipeline for what follows: scheduling, emails, new or retired machines, and
//! the events an upstream follows.

mod decide;

use std::ops::Range;

use chrono::Utc;
use sqlx::PgConnection;

use crate::broker::{Incoming, Outgoing, Stage, StageError, StageQueue, Undecodable};
use crate::crypto::{SecretKey, password_context};
use crate::domain::{
    Booking, BookingMessage, BookingRef, BookingRules, Credential, EmailKind, Event, EventKind,
    NotifyMessage, Prices, parse_message, peek,
};
use crate::stages::scheduler::LaunchPace;
use crate::store::schedule::Action;
use crate::store::{
    BookingRecord, BookingState, Store, StoredCredential, bookings, capacity, events, intake,
    machines,
};
use decide::{Decision, Update, decide};

pub struct CredentialsStage {
    store: Store,
    key: SecretKey,
    rules: BookingRules,
    /// When a moved booking's provisioning is due.
    pace: LaunchPace,
    /// `LABBOOK_PRICES`, for what a cancelled booking's machines cost.
    prices: Prices,
}

impl CredentialsStage {
    pub fn new(store: Store, key: SecretKey, rules: BookingRules, pace: LaunchPace) -> Self {
        metrics::describe_counter!(
            "labbook_capacity_warnings_total",
            "Bookings accepted that would go over the account's vCPU quota at their time"
        );
        metrics::counter!("labbook_capacity_warnings_total").increment(0);
        Self {
            store,
            key,
            rules,
            pace,
            prices: Prices::default(),
        }
    }

    /// Estimates what a cancelled booking's machines cost with these prices.
    pub fn with_prices(mut self, prices: Prices) -> Self {
        self.prices = prices;
        self
    }
}

impl Stage for CredentialsStage {
    const QUEUE: StageQueue = StageQueue::BookingCreated;
    type Message = BookingMessage;

    /// A message that breaks a rule of docs/contract.md §3 does not decode.
    fn decode(&self, delivery: &Incoming) -> Result<BookingMessage, Undecodable> {
        parse_message(&delivery.body, delivery.content_type(), &self.rules).map_err(|e| {
            Undecodable {
                reason: e.0,
                subject: peek(&delivery.body).0.map(|id| id.as_str().to_owned()),
            }
        })
    }

    async fn handle(
        &self,
        msg: &BookingMessage,
        _: &Incoming,
    ) -> Result<Vec<Outgoing>, StageError> {
        let id = msg.id().as_str();
        let mut tx = self.store.pool.begin().await?;
        intake::lock(&mut tx, id).await?;
        let stored = intake::find_for_update(&mut tx, id).await?;
        let tombstone = match stored {
            Some(_) => None,
            None => intake::tombstone(&mut tx, id).await?,
        };
        let decision = decide(msg, stored.as_ref(), tombstone, Utc::now());
        let effects = match (&decision, msg, &stored) {
            (Decision::Refuse(reason), ..) => return Err(StageError::Permanent(reason.clone())),
            (Decision::Create, BookingMessage::Book(b), _) => self.create(&mut tx, b).await?,
            (Decision::Update(u), BookingMessage::Book(b), Some(s)) => {
                self.update(&mut tx, s, b, u).await?
            }
            (Decision::Cancel { ended }, _, Some(s)) => {
                cancel(&mut tx, s, msg.revision(), *ended).await?
            }
            (Decision::Tombstone, ..) => {
                intake::put_tombstone(&mut tx, id, msg.revision()).await?;
                tracing::info!(
                    revision = msg.revision(),
                    "cancellation of a booking never stored: kept"
                );
                // A kept cancellation reads as a cancelled booking.
                Effects::cancelled(BookingState::Cancelled, false)
            }
            (Decision::Duplicate, _, Some(s)) => Effects::again(s),
            (Decision::AlreadyCancelled { repeat: true }, _, s) => {
                tracing::info!("the same cancellation again; its follow-ups are published again");
                let state = s.as_ref().map_or(BookingState::Cancelled, |s| s.state);
                let kept = s.is_none();
                Effects::cancelled(state, state == BookingState::Cancelled && !kept)
            }
            (Decision::AlreadyCancelled { repeat: false }, ..) => {
                tracing::info!("the booking is already cancelled; nothing changes");
                return Ok(Vec::new());
            }
            _ => {
                tracing::info!(
                    revision = msg.revision(),
                    stored = stored.as_ref().map(|s| s.revision),
                    "stale: a lower revision than the stored one; nothing to do"
                );
                return Ok(Vec::new());
            }
        };
        let effects = match (&decision, msg) {
            (Decision::Create | Decision::Update(_), BookingMessage::Book(b)) => {
                self.check_capacity(&mut tx, b, effects).await?
            }
            _ => effects,
        };
        // The event joins the booking's history in the same transaction, under its lock, so
        // the relay publishes the booking's events in the order they happened.
        let event = self.event(&mut tx, msg, &effects).await?;
        events::record_in(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(follow_ups(msg, effects))
    }

    /// A refused booking message whose id could be read is published as `rejected`, with the
    /// reason its dead letter gets. A refused update of a stored booking joins its history; a
    /// message refused before anything was stored stores nothing (its record is its dead letter
    /// and the event, published unrecorded with the state `null`), so invalid messages never
    /// grow the database. The event never holds the dead letter back: when the database cannot
    /// say the booking's state (it may be why the message failed), it goes out unrecorded too.
    async fn dead_lettered(
        &self,
        delivery: &Incoming,
        _subject: Option<&str>,
        reason: &str,
    ) -> Result<Vec<Outgoing>, StageError> {
        if delivery.body.len() > crate::broker::MAX_BODY_BYTES {
            return Ok(Vec::new()); // never read
        }
        let (Some(id), revision) = peek(&delivery.body) else {
            return Ok(Vec::new());
        };
        let event = Event::new(id.as_str(), EventKind::Rejected, revision).detail(reason);
        match self.record_rejection(event.clone()).await {
            Ok(true) => Ok(Vec::new()), // the relay publishes it, in the booking's order
            Ok(false) => Ok(vec![unrecorded(&event)]),
            Err(err) => {
                tracing::warn!(error = %err, "the rejection could not be recorded; its event is published without the booking's state");
                Ok(vec![unrecorded(&event)])
            }
        }
    }
}

impl CredentialsStage {
    /// Records the rejection in the history of the stored booking it refused to change;
    /// false when no booking of that id is stored.
    async fn record_rejection(&self, mut event: Event) -> Result<bool, sqlx::Error> {
        let mut tx = self.store.pool.begin().await?;
        intake::lock(&mut tx, &event.booking_id).await?;
        let Some(stored) = bookings::find(&mut *tx, &event.booking_id).await? else {
            return Ok(false);
        };
        event.state = Some(stored.state.to_string());
        events::record_in(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// The message of an event that is published without a row in the history (its state as
/// the event says, `null` for a booking never stored).
fn unrecorded(event: &Event) -> Outgoing {
    let body = serde_json::to_string(event).expect("events serialize");
    crate::domain::events::outgoing(&event.booking_id, event.event, event.revision, body)
}

/// What an accepted message asks of the rest of the pipeline, besides its event.
struct Effects {
    event: EventKind,
    /// The booking's state after the message.
    state: BookingState,
    detail: String,
    /// `credentials-ready`, for a booking stored for the first time.
    schedule: bool,
    email: Option<EmailKind>,
    /// `provision-due` now, at the message's revision: launch added machines, or terminate
    /// the machines of a booking that moved.
    provision_now: bool,
}

impl Effects {
    fn cancelled(state: BookingState, email: bool) -> Self {
        Self {
            event: EventKind::Cancelled,
            state,
            detail: "the booking was cancelled".into(),
            schedule: false,
            email: email.then_some(EmailKind::Cancelled),
            provision_now: false,
        }
    }

    /// The same message again: its follow-ups once more (downstream is idempotent).
    fn again(s: &BookingRecord) -> Self {
        tracing::info!(
            revision = s.revision,
            "already stored with the same content; its follow-ups are published again"
        );
        let first = s.revision == s.first_revision;
        Self {
            event: EventKind::Accepted,
            state: s.state,
            detail: String::new(),
            schedule: first,
            email: Some(if first {
                EmailKind::Confirmation
            } else {
                EmailKind::Updated
            }),
            provision_now: !first
                && matches!(
                    s.state,
                    BookingState::Scheduled | BookingState::Provisioning
                ),
        }
    }
}

impl CredentialsStage {
    async fn create(&self, tx: &mut PgConnection, b: &Booking) -> Result<Effects, StageError> {
        b.check_not_over(Utc::now())
            .map_err(|e| StageError::Permanent(e.0))?;
        let credentials = self
            .seal(b.id.as_str(), 0..b.number_of_users.get() as i32)
            .await?;
        intake::insert(tx, b, &credentials).await?;
        let trace = crate::broker::trace::current().map(|t| t.traceparent());
        bookings::remember_trace(&mut *tx, b.id.as_str(), trace.as_deref()).await?;
        tracing::info!(
            users = b.number_of_users.get(),
            revision = b.revision,
            booking_time = %crate::format_time(b.booking_time),
            "booking stored with its credentials"
        );
        Ok(Effects {
            event: EventKind::Accepted,
            state: BookingState::Received,
            detail: format!("stored with {} users", b.number_of_users.get()),
            schedule: true,
            email: Some(EmailKind::Confirmation),
            provision_now: false,
        })
    }

    /// Stores a higher revision and moves what it moves: the timers, the logins, the machines.
    async fn update(
        &self,
        tx: &mut PgConnection,
        s: &BookingRecord,
        b: &Booking,
        u: &Update,
    ) -> Result<Effects, StageError> {
        let id = b.id.as_str();
        let state = u.next_state(s.state);
        intake::store_update(tx, b, state, u.time_moved).await?;
        let users = b.number_of_users.get() as i32;
        if u.added > 0 {
            let credentials = self.seal(id, s.number_of_users..users).await?;
            intake::add_credentials(tx, id, &credentials).await?;
        }
        if u.removed > 0 {
            intake::remove_credentials_from(tx, id, users).await?;
        }
        if u.time_moved {
            let users = b.number_of_users.get() as i32;
            let booking = (id, b.booking_time, users);
            let due = self.pace.provision_at(&mut *tx, booking).await?;
            intake::arm(tx, id, Action::Provision, due, b.revision).await?;
        }
        if u.end_moved {
            let end = b.ends_at().max(Utc::now());
            intake::arm(tx, id, Action::Teardown, end, b.revision).await?;
        }
        let retired = if u.started && u.time_moved {
            intake::retire_machines(tx, id).await?
        } else {
            0
        };
        let detail = describe(s, b, u);
        tracing::info!(revision = b.revision, %state, retired, change = %detail, "booking updated");
        Ok(Effects {
            event: EventKind::Accepted,
            state,
            detail,
            schedule: false,
            email: Some(EmailKind::Updated),
            provision_now: u.started
                && state != BookingState::Failed
                && (u.time_moved || u.added > 0),
        })
    }

    /// Generates, encrypts and hashes credentials for the trainees at `positions`, off the async
    /// runtime (hashing is CPU work). The plaintext passwords are dropped here.
    async fn seal(
        &self,
        booking_id: &str,
        positions: Range<i32>,
    ) -> Result<Vec<StoredCredential>, StageError> {
        let booking_id = booking_id.to_owned();
        let key = self.key.clone();
        tokio::task::spawn_blocking(move || {
            let first = positions.start;
            Credential::generate_set(positions.len())
                .into_iter()
                .enumerate()
                .map(|(i, c)| StoredCredential {
                    position: first + i as i32,
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

    /// Compares what the booking will run at its time with the account's vCPU quota (as the
    /// provisioner last read it): a booking that would not fit is accepted, and the operator
    /// told at once in its `accepted` event and history, a warning in the log and
    /// `labbook_capacity_warnings_total`, so someone can ask AWS for more days ahead.
    async fn check_capacity(
        &self,
        tx: &mut PgConnection,
        b: &Booking,
        mut effects: Effects,
    ) -> Result<Effects, sqlx::Error> {
        let per = self.pace.users_per_instance.max(1);
        let machines = i64::from(crate::stages::provisioner::slot_count(
            b.number_of_users.get(),
            per,
        ));
        let window = (b.booking_time, b.ends_at());
        let over = capacity::check(tx, b.id.as_str(), window, machines, per as i32).await?;
        if let Some(over) = over {
            tracing::warn!(
                needed_vcpus = over.needed_vcpus,
                quota_vcpus = over.quota_vcpus,
                "the booking would go over the account's vCPU quota at its time; accepted"
            );
            metrics::counter!("labbook_capacity_warnings_total").increment(1);
            effects.detail = format!("{}; {over}", effects.detail);
        }
        Ok(effects)
    }

    /// The event the message's step is told by.
    async fn event(
        &self,
        tx: &mut PgConnection,
        msg: &BookingMessage,
        effects: &Effects,
    ) -> Result<Event, sqlx::Error> {
        let id = msg.id().as_str();
        let mut event = Event::new(id, effects.event, msg.revision())
            .detail(effects.detail.clone())
            .state(effects.state);
        if effects.event == EventKind::Cancelled {
            // What its machines ran for until now (they are terminated within a minute).
            let usage = machines::usage(&mut *tx, id).await?;
            event = event.cost(&usage, &self.prices);
        }
        Ok(event)
    }
}

/// The messages an accepted step asks for, published once its transaction (and its event)
/// is committed: the event goes out before anything it causes.
fn follow_ups(msg: &BookingMessage, effects: Effects) -> Vec<Outgoing> {
    let id = msg.id().as_str();
    let revision = msg.revision();
    let mut out = Vec::new();
    if effects.schedule {
        out.push(BookingRef::outgoing(StageQueue::CredentialsReady, id));
    }
    if let Some(kind) = effects.email {
        out.push(NotifyMessage::at_revision(id, kind, revision));
    }
    if effects.provision_now {
        out.push(BookingRef::at_revision(
            StageQueue::ProvisionDue,
            id,
            Some(revision),
        ));
    }
    out
}

/// Cancels a stored booking: nothing is provisioned any more, and whatever runs is terminated
/// now (the teardown timer is set to now). A booking whose end has passed stays `ended`.
async fn cancel(
    tx: &mut PgConnection,
    s: &BookingRecord,
    revision: u32,
    ended: bool,
) -> Result<Effects, StageError> {
    let id = s.booking_id.as_str();
    let state = if ended {
        s.state
    } else {
        BookingState::Cancelled
    };
    intake::store_cancel(tx, id, revision, state).await?;
    if !ended {
        intake::disarm_provisioning(tx, id).await?;
        intake::arm(tx, id, Action::Teardown, Utc::now(), revision).await?;
    }
    tracing::info!(revision, was = %s.state, "booking cancelled");
    Ok(Effects::cancelled(state, !ended))
}

/// One line saying what an update changed, for its event and the log.
fn describe(s: &BookingRecord, b: &Booking, u: &Update) -> String {
    let mut parts = Vec::new();
    if u.time_moved {
        parts.push(format!("moved to {}", crate::format_time(b.booking_time)));
    }
    if u.end_moved {
        parts.push(format!("ends at {}", crate::format_time(b.ends_at())));
    }
    if u.added > 0 {
        parts.push(format!("{} trainees added", u.added));
    }
    if u.removed > 0 {
        parts.push(format!("{} trainees removed", u.removed));
    }
    if s.email != b.email.as_str() {
        parts.push("email changed".into());
    }
    if parts.is_empty() {
        parts.push("no change".into());
    }
    parts.join("; ")
}
