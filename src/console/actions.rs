//! What an operator does to a booking from the console: cancel it, give it a new end, resend
//! its instance details email, replay or purge its dead letters. A change is published as the
//! next revision exactly as `labbook cancel` does ([`crate::ops::change`]), so the contract's
//! rules apply; a resend is a copy of its own in the email log, sent once. Each action is
//! kept in `operator_actions` with who did it, and the booking's timeline tells it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::AppState;
use super::auth::Operator;
use super::dead_letters::{self, LetterRow};
use crate::broker::StageQueue;
use crate::domain::{BookingId, EmailKind, NotifyMessage};
use crate::mail::render::{copy_message_id, message_id};
use crate::ops::change::{self, Change, Planned, Refused};
use crate::ops::dlq::Selection;
use crate::store::{BookingState, emails};

/// An action's kinds, as `operator_actions.action` stores them.
pub const CANCEL: &str = "cancel";
pub const NEW_END: &str = "new_end";
pub const RESEND: &str = "resend_instance_details";
pub const REPLAY: &str = "replay";
pub const PURGE: &str = "purge";

/// Why an action was not done.
#[derive(Debug)]
pub enum ActionError {
    NotFound(String),
    /// The booking is not in a state the action applies to.
    Refused(String),
    /// The broker or the database did not answer; nothing was done.
    Unavailable(String),
}

impl From<sqlx::Error> for ActionError {
    fn from(e: sqlx::Error) -> Self {
        Self::Unavailable(format!("the database did not answer: {e}"))
    }
}

fn refused(id: &str, r: Refused) -> ActionError {
    match r {
        Refused::NotFound => ActionError::NotFound(format!("No booking {id:?} is stored.")),
        other => ActionError::Refused(format!("Booking {id} is not changed: {other}.")),
    }
}

fn booking_id(id: &str) -> Result<BookingId, ActionError> {
    BookingId::parse(id).map_err(|_| ActionError::NotFound(format!("No booking {id:?} is stored.")))
}

/// The change `change` would publish, without publishing it (the confirmation page).
pub async fn plan(state: &AppState, id: &str, change: Change) -> Result<Planned, ActionError> {
    let booking = booking_id(id)?;
    change::plan(&state.store.pool, &booking, change, &state.rules)
        .await?
        .map_err(|r| refused(id, r))
}

/// Publishes `change` as the booking's next revision, then records it; returns what happens.
pub async fn apply(
    state: &AppState,
    id: &str,
    change: Change,
    operator: &Operator,
) -> Result<String, ActionError> {
    let planned = plan(state, id, change).await?;
    state
        .broker
        .publish_change(&planned)
        .await
        .map_err(|e| ActionError::Unavailable(format!("nothing was published: {e:#}")))?;
    let action = match change {
        Change::Cancel => CANCEL,
        Change::Duration(_) => NEW_END,
    };
    let revision = Some(planned.revision);
    insert(
        &state.store.pool,
        id,
        operator,
        (action, revision),
        &planned.summary(),
    )
    .await?;
    tracing::info!(booking_id = %id, operator = %operator.0, action, revision = planned.revision, "console: change published");
    Ok(format!(
        "Published revision {} of booking {id} (confirmed by the broker): {}.",
        planned.revision,
        planned.what_happens()
    ))
}

/// Whether the booking's instance details email can be resent, and for which revision.
pub async fn resendable(pool: &PgPool, id: &str) -> Result<i32, ActionError> {
    // An id no booking can have (a NUL byte, too long) is not asked of the database.
    booking_id(id)?;
    let row: Option<(BookingState, bool, Option<i32>)> = sqlx::query_as(
        "SELECT state, cancelled, provisioned_revision FROM bookings WHERE booking_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match row {
        None => Err(ActionError::NotFound(format!(
            "No booking {id:?} is stored."
        ))),
        // As the notifier reads it: no recorded revision is revision 0.
        Some((BookingState::Provisioned, false, revision)) => Ok(revision.unwrap_or(0)),
        Some((state, ..)) => Err(ActionError::Refused(format!(
            "Booking {id} is {state}: only a provisioned booking's instance details email can be resent (its machines are what it lists)."
        ))),
    }
}

/// Books the next copy of the booking's instance details email in the email log, records the
/// action and publishes the resend to `notify`, all in one transaction that holds the
/// booking's row: the publish is confirmed before anything is committed, and the notifier
/// sends that copy once however often its message comes.
pub async fn resend(
    state: &AppState,
    id: &str,
    operator: &Operator,
) -> Result<String, ActionError> {
    let revision = resendable(&state.store.pool, id).await?;
    let mut tx = state.store.pool.begin().await?;
    sqlx::query("SELECT 1 FROM bookings WHERE booking_id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let domain = state.mail_domain.as_str();
    let original = message_id(
        id,
        EmailKind::InstanceDetails,
        revision.max(0) as u32,
        domain,
    );
    let key = (EmailKind::InstanceDetails, revision);
    let copy = emails::book_copy(&mut tx, id, key, |c| {
        copy_message_id(original.clone(), c.max(0) as u32)
    })
    .await?;
    let detail = format!("copy {copy} of the instance details email of revision {revision}");
    insert(&mut *tx, id, operator, (RESEND, Some(revision)), &detail).await?;
    // Under the booking's trace: the resend is one more step of its story.
    let trace = crate::store::bookings::trace(&mut *tx, id).await?;
    let message = NotifyMessage::resend(
        id,
        EmailKind::InstanceDetails,
        revision.max(0) as u32,
        copy as u32,
    )
    .traced(trace.as_deref());
    state
        .broker
        .publish_outgoing(&message)
        .await
        .map_err(|e| ActionError::Unavailable(format!("nothing was sent: {e:#}")))?;
    tx.commit().await?;
    tracing::info!(booking_id = %id, operator = %operator.0, copy, "console: instance details email resent");
    Ok(format!(
        "The instance details email of booking {id} goes out again (copy {copy}): the notifier sends it within seconds."
    ))
}

/// Replays the selected dead letters (see [`dead_letters::replay`]) and records it in the
/// history of each booking they name.
pub async fn replay(
    state: &AppState,
    stage: StageQueue,
    selection: &Selection,
    operator: &Operator,
) -> anyhow::Result<dead_letters::Replayed> {
    let moving = dead_letters::preview(&state.broker, stage, selection).await?;
    let done = dead_letters::replay(&state.broker, stage, selection).await?;
    if done.replayed > 0 {
        record_dead_letters(&state.store.pool, operator, (REPLAY, &stage.dlq()), &moving).await?;
    }
    Ok(done)
}

/// Deletes the selected dead letters and records it in the history of each booking they name.
pub async fn purge(
    state: &AppState,
    stage: StageQueue,
    selection: &Selection,
    operator: &Operator,
) -> anyhow::Result<usize> {
    let (going, _) = dead_letters::list(&state.broker, stage, selection).await?;
    let removed = dead_letters::purge(&state.broker, stage, selection).await?;
    if removed > 0 {
        record_dead_letters(&state.store.pool, operator, (PURGE, &stage.dlq()), &going).await?;
    }
    Ok(removed)
}

/// Records a replay or purge of dead letters in the history of each booking they name.
async fn record_dead_letters(
    pool: &PgPool,
    operator: &Operator,
    (action, queue): (&'static str, &str),
    letters: &[LetterRow],
) -> Result<(), sqlx::Error> {
    let mut per_booking: std::collections::BTreeMap<&str, usize> = Default::default();
    for l in letters {
        if let Some(id) = l.booking_id.as_deref() {
            *per_booking.entry(id).or_default() += 1;
        }
    }
    let verb = if action == REPLAY {
        "replayed"
    } else {
        "purged"
    };
    for (id, n) in per_booking {
        let detail = format!("{n} dead letter(s) of {queue} {verb}");
        insert(pool, id, operator, (action, None), &detail).await?;
    }
    Ok(())
}

/// One action in a booking's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActionRow {
    pub at: DateTime<Utc>,
    pub operator: String,
    pub action: String,
    pub revision: Option<i32>,
    pub detail: String,
}

/// The booking's actions, oldest first.
pub async fn history(pool: &PgPool, id: &str) -> Result<Vec<ActionRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT at, operator, action, revision, detail FROM operator_actions
          WHERE booking_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

async fn insert<'e>(
    db: impl sqlx::PgExecutor<'e>,
    id: &str,
    operator: &Operator,
    (action, revision): (&'static str, Option<i32>),
    detail: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO operator_actions (booking_id, operator, action, revision, detail)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(&operator.0)
    .bind(action)
    .bind(revision)
    .bind(detail)
    .execute(db)
    .await?;
    Ok(())
}
