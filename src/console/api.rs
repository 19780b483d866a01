//! The console's HTTP API under `/api` (JSON; `Authorization: Bearer <token>`), described by
//! the OpenAPI document `openapi.json` beside this file, served at `/api/openapi.json`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::Extension;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::actions::{self, ActionError};
use super::auth::Operator;
use super::bookings::{self, Filter, RawFilter, Stored, Summary};
use super::dead_letters::{self, LetterRow, SelectionInput};
use super::timeline::{Event, timeline};
use crate::broker::StageQueue;
use crate::domain::parse_booking;
use crate::format_time;

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/bookings", get(list_bookings).post(create_booking))
        .route("/bookings/{id}", get(get_booking))
        .route("/bookings/{id}/cancel", post(cancel_booking))
        .route("/bookings/{id}/duration", post(change_duration))
        .route(
            "/bookings/{id}/resend-instance-details",
            post(resend_instance_details),
        )
        .route("/dead-letters", get(dead_letter_counts))
        .route("/dead-letters/{queue}", get(list_dead_letters))
        .route("/dead-letters/{queue}/replay", post(replay))
        .route("/dead-letters/{queue}/purge", post(purge))
        .route("/dead-letters/{queue}/{id}", get(get_dead_letter))
        .route("/health", get(health))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path") })
}

/// An error answer: `{"error": "<code>", "reasons": ["…"]}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    reasons: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            code,
            reasons: vec![reason.into()],
        }
    }

    /// The status and the reasons, for a page that shows them.
    pub fn parts(self) -> (StatusCode, Vec<String>) {
        (self.status, self.reasons)
    }

    fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    /// The database failed: said in plain words (what to set or run), answered as 503.
    fn database(err: &sqlx::Error) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            super::errors::database(err),
        )
    }

    /// The broker failed: said in plain words, answered as 503.
    fn broker(err: &anyhow::Error) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            super::errors::broker(err),
        )
    }

    /// A dependency failed: logged with its cause, answered as 503.
    fn unavailable(what: &'static str, err: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %err, "console API: {what}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what}: {err}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "reasons": self.reasons });
        (self.status, Json(body)).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request(r.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::bad_request(r.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `GET /api/bookings`.
#[derive(Serialize)]
pub struct BookingList {
    pub bookings: Vec<Summary>,
    pub total: i64,
    /// Machine-hours and estimated cost of every booking the filter selects.
    pub totals: crate::domain::Cost,
    pub limit: i64,
    pub offset: i64,
}

/// The bookings list. Dead letters are not counted here (that would read every dead-letter
/// queue on each view): a booking's page shows its own.
pub async fn booking_list(state: &AppState, filter: &Filter) -> ApiResult<BookingList> {
    let listed = bookings::list(&state.store.pool, filter, &state.prices)
        .await
        .map_err(|e| ApiError::database(&e))?;
    Ok(BookingList {
        bookings: listed.rows,
        total: listed.total,
        totals: listed.totals,
        limit: filter.limit,
        offset: filter.offset,
    })
}

async fn list_bookings(
    State(state): State<AppState>,
    query: Result<Query<RawFilter>, QueryRejection>,
) -> ApiResult<Json<BookingList>> {
    let Query(raw) = query?;
    let filter = Filter::parse(&raw).map_err(ApiError::bad_request)?;
    Ok(Json(booking_list(&state, &filter).await?))
}

/// A booking as stored, without anything secret.
#[derive(Serialize)]
pub struct BookingInfo {
    pub booking_id: String,
    pub state: String,
    pub email: String,
    pub booking_time: String,
    pub ends_at: String,
    pub number_of_users: i32,
    pub duration_minutes: i32,
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A lab machine: its address and logins, never a password.
#[derive(Serialize)]
pub struct Machine {
    pub slot: i32,
    pub instance_id: Option<String>,
    pub state: Option<String>,
    pub address: Option<String>,
    pub url: Option<String>,
    pub usernames: Vec<String>,
    pub admin_username: String,
    pub launched_at: Option<String>,
    /// The image (AMI) it booted from.
    pub image_id: Option<String>,
    /// When it became ready; `None` while it boots or before its launch.
    pub ready_at: Option<String>,
    /// Launch to ready, in whole seconds (what the scheduler's expected boot is made of).
    pub boot_seconds: Option<i64>,
    /// `ready`, `booting` (launched, not ready yet), `never ready` (gone before it was) or
    /// `not launched`.
    pub boot: &'static str,
}

#[derive(Serialize)]
pub struct ScheduleItem {
    pub action: String,
    pub due_at: String,
    pub published_at: Option<String>,
}

#[derive(Serialize)]
pub struct EmailItem {
    pub kind: String,
    /// 0: the email the pipeline sends; n: an operator's n-th resend.
    pub copy: i32,
    pub sent_at: Option<String>,
    pub last_error: Option<String>,
}

/// `GET /api/bookings/{id}`: a booking's whole story.
#[derive(Serialize)]
pub struct BookingDetail {
    pub booking: BookingInfo,
    pub usernames: Vec<String>,
    pub machines: Vec<Machine>,
    pub schedule: Vec<ScheduleItem>,
    pub emails: Vec<EmailItem>,
    /// `None` when the broker could not be read (then `dead_letters_error` says why).
    pub dead_letters: Option<Vec<LetterRow>>,
    pub dead_letters_error: Option<String>,
    pub timeline: Vec<Event>,
    /// Its machines' running time and estimated cost (`LABBOOK_PRICES`).
    pub cost: crate::domain::Cost,
    /// Its trace, and where to see it.
    pub trace: Option<TraceLink>,
}

/// A booking's trace: its id, and its page in the trace viewer `LABBOOK_TRACE_URL` names.
#[derive(Debug, Clone, Serialize)]
pub struct TraceLink {
    pub trace_id: String,
    pub url: Option<String>,
}

impl TraceLink {
    fn of(traceparent: Option<&str>, template: Option<&str>) -> Option<Self> {
        let ctx = crate::broker::trace::TraceContext::parse(traceparent?, None)?;
        let trace_id = ctx.trace_id().to_owned();
        Some(Self {
            url: template.map(|t| t.replace("{trace_id}", &trace_id)),
            trace_id,
        })
    }
}

/// Loads a booking's story; `None` if it was never stored.
pub async fn booking_detail(state: &AppState, id: &str) -> ApiResult<Option<BookingDetail>> {
    let stored = bookings::find(&state.store.pool, id)
        .await
        .map_err(|e| ApiError::database(&e))?;
    let Some(stored) = stored else {
        return Ok(None);
    };
    let letters = dead_letters::for_booking(&state.broker, id).await;
    let events = timeline(&stored, letters.as_deref().unwrap_or_default());
    let (dead_letters, dead_letters_error) = match letters {
        Ok(l) => (Some(l), None),
        Err(e) => {
            let why = super::errors::broker(&e);
            (
                None,
                Some(format!("Its dead letters could not be read. {why}")),
            )
        }
    };
    Ok(Some(BookingDetail {
        trace: TraceLink::of(
            stored.booking.traceparent.as_deref(),
            state.trace_url.as_deref().map(String::as_str),
        ),
        cost: crate::domain::Cost::of(&stored.usage, &state.prices),
        machines: machines(&stored),
        schedule: stored.schedule.iter().map(schedule_item).collect(),
        emails: stored.emails.iter().map(email_item).collect(),
        booking: info(&stored),
        usernames: stored.usernames,
        dead_letters,
        dead_letters_error,
        timeline: events,
    }))
}

fn info(stored: &Stored) -> BookingInfo {
    let b = &stored.booking;
    BookingInfo {
        booking_id: b.booking_id.clone(),
        state: b.state.clone(),
        email: b.email.clone(),
        booking_time: format_time(b.booking_time),
        ends_at: format_time(b.ends_at()),
        number_of_users: b.number_of_users,
        duration_minutes: b.duration_minutes,
        failure_reason: b.failure_reason.clone(),
        created_at: format_time(b.created_at),
        updated_at: format_time(b.updated_at),
    }
}

fn machines(stored: &Stored) -> Vec<Machine> {
    stored
        .machines
        .iter()
        .map(|m| Machine {
            slot: m.slot,
            instance_id: m.instance_id.clone(),
            state: m.instance_state.clone(),
            address: m.address().map(str::to_owned),
            url: m.address().map(|a| format!("http://{a}")),
            usernames: stored
                .usernames
                .iter()
                .skip(m.first_user.max(0) as usize)
                .take(m.user_count.max(0) as usize)
                .cloned()
                .collect(),
            admin_username: m.admin_username.clone(),
            launched_at: m.launched_at.map(format_time),
            image_id: m.image_id.clone(),
            ready_at: m.ready_at.map(format_time),
            boot_seconds: m
                .ready_at
                .and(m.boot_seconds)
                .map(|s| s.max(0.0).round() as i64),
            boot: match (&m.instance_id, m.ready_at, m.instance_state.as_deref()) {
                (_, Some(_), _) => "ready",
                (None, None, _) => "not launched",
                (Some(_), None, Some("shutting-down" | "terminated")) => "never ready",
                (Some(_), None, _) => "booting",
            },
        })
        .collect()
}

fn schedule_item(s: &bookings::ScheduleRow) -> ScheduleItem {
    ScheduleItem {
        action: s.action.clone(),
        due_at: format_time(s.due_at),
        published_at: s.published_at.map(format_time),
    }
}

fn email_item(e: &bookings::EmailRow) -> EmailItem {
    EmailItem {
        kind: e.kind.clone(),
        copy: e.copy,
        sent_at: e.sent_at.map(format_time),
        last_error: e.last_error.clone(),
    }
}

async fn get_booking(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<BookingDetail>> {
    booking_detail(&state, &id).await?.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("booking {id:?} is not stored"),
        )
    })
}

/// `POST /api/bookings`: where the booking went.
#[derive(Serialize)]
struct Accepted {
    booking_id: String,
    exchange: &'static str,
    routing_key: &'static str,
    message_id: String,
    confirmed: bool,
    status: String,
}

/// Validates a booking as `docs/contract.md` §3 says and publishes it to `booking-created`
/// with a confirm: 202, or 400 (not a JSON object) / 422 (a rule broken) with the reason.
async fn create_booking(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    // Not a JSON object, too large or another content type: the request's form is wrong (400);
    // a JSON object that breaks a rule is a booking labbook refuses (422).
    let is_json = |ct: &str| {
        let essence = ct.split(';').next().unwrap_or("").trim();
        essence.eq_ignore_ascii_case("application/json")
    };
    let well_formed = content_type.is_none_or(is_json)
        && body.len() <= crate::domain::booking::MAX_BODY_BYTES
        && serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v.is_object());
    let booking = match parse_booking(&body, content_type, &state.rules, chrono::Utc::now()) {
        Ok(b) => b,
        Err(invalid) if well_formed => {
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            return Err(ApiError::new(status, "invalid_booking", invalid.0));
        }
        Err(invalid) => return Err(ApiError::bad_request(invalid.0)),
    };
    let id = booking.id.as_str().to_owned();
    let message_id = format!("booking/{id}");
    state
        .broker
        .publish_booking(&body, &message_id)
        .await
        .map_err(|e| ApiError::unavailable("the booking was not published", format!("{e:#}")))?;
    tracing::info!(booking_id = %id, "console API: booking published to booking-created");
    let accepted = Accepted {
        status: format!("/api/bookings/{}", super::auth::urlencode(&id)),
        booking_id: id,
        exchange: crate::broker::EXCHANGE,
        routing_key: "booking-created",
        message_id,
        confirmed: true,
    };
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::NotFound(why) => Self::new(StatusCode::NOT_FOUND, "not_found", why),
            ActionError::Refused(why) => Self::new(StatusCode::CONFLICT, "refused", why),
            ActionError::Unavailable(why) => {
                tracing::warn!(error = %why, "console API: an action was not done");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why)
            }
        }
    }
}

/// A booking action's request: `dry_run` says what would happen and does nothing.
#[derive(Deserialize, Default)]
struct ActionInput {
    #[serde(default)]
    dry_run: bool,
    /// For `/duration`: the booking's new length in minutes (its start stays).
    duration_minutes: Option<u32>,
}

/// What a booking action did (or, with `dry_run`, would do).
#[derive(Serialize)]
struct ActionDone {
    booking_id: String,
    dry_run: bool,
    /// The revision published (cancel, duration) or whose email is resent.
    revision: Option<i32>,
    what_happens: String,
}

fn action_input(body: Bytes) -> ApiResult<ActionInput> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ActionInput::default());
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body: {e}")))
}

async fn change_action(
    state: &AppState,
    id: &str,
    change: crate::ops::change::Change,
    (dry_run, operator): (bool, &Operator),
) -> ApiResult<Json<ActionDone>> {
    let planned = actions::plan(state, id, change).await?;
    let what_happens = if dry_run {
        planned.what_happens()
    } else {
        actions::apply(state, id, change, operator).await?
    };
    Ok(Json(ActionDone {
        booking_id: id.to_owned(),
        dry_run,
        revision: Some(planned.revision),
        what_happens,
    }))
}

/// `POST /api/bookings/{id}/cancel`: publishes the cancellation as `labbook cancel` does.
async fn cancel_booking(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ActionDone>> {
    let input = action_input(body)?;
    let change = crate::ops::change::Change::Cancel;
    change_action(&state, &id, change, (input.dry_run, &operator)).await
}

/// `POST /api/bookings/{id}/duration`: publishes the booking with a new length.
async fn change_duration(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ActionDone>> {
    let input = action_input(body)?;
    let minutes = input
        .duration_minutes
        .ok_or_else(|| ApiError::bad_request("duration_minutes is required"))?;
    let change = crate::ops::change::Change::Duration(minutes);
    change_action(&state, &id, change, (input.dry_run, &operator)).await
}

/// `POST /api/bookings/{id}/resend-instance-details`: one more copy of the email, sent once.
async fn resend_instance_details(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ActionDone>> {
    let input = action_input(body)?;
    let revision = actions::resendable(&state.store.pool, &id).await?;
    let what_happens = if input.dry_run {
        format!(
            "the instance details email of revision {revision} is sent again to the booker, with a Message-ID of its own"
        )
    } else {
        actions::resend(&state, &id, &operator).await?
    };
    Ok(Json(ActionDone {
        booking_id: id,
        dry_run: input.dry_run,
        revision: Some(revision),
        what_happens,
    }))
}

fn stage(queue: &str) -> ApiResult<StageQueue> {
    StageQueue::parse(queue).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            crate::ops::dlq::unknown_queue(queue),
        )
    })
}

async fn dead_letter_counts(
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<dead_letters::QueueCount>>> {
    let counts = dead_letters::counts(&state.broker).await;
    Ok(Json(counts.map_err(|e| ApiError::broker(&e))?))
}

#[derive(Deserialize)]
struct LetterFilter {
    booking_id: Option<String>,
    error: Option<String>,
}

#[derive(Serialize)]
struct LetterList {
    queue: String,
    total: usize,
    dead_letters: Vec<LetterRow>,
}

async fn list_dead_letters(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    query: Result<Query<LetterFilter>, QueryRejection>,
) -> ApiResult<Json<LetterList>> {
    let stage = stage(&queue)?;
    let Query(f) = query?;
    let input = SelectionInput {
        booking_id: f.booking_id,
        error: f.error,
        ..Default::default()
    };
    let selection = input.selection().map_err(ApiError::bad_request)?;
    let (rows, total) = dead_letters::list(&state.broker, stage, &selection)
        .await
        .map_err(|e| ApiError::broker(&e))?;
    Ok(Json(LetterList {
        queue: stage.dlq(),
        total,
        dead_letters: rows,
    }))
}

async fn get_dead_letter(
    State(state): State<AppState>,
    Path((queue, id)): Path<(String, String)>,
) -> ApiResult<Json<dead_letters::LetterDetail>> {
    let stage = stage(&queue)?;
    let found = dead_letters::find(&state.broker, stage, &id)
        .await
        .map_err(|e| ApiError::broker(&e))?;
    found.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead letter {id:?} in {}", stage.dlq()),
        )
    })
}

/// The body of the replay and purge verbs.
#[derive(Deserialize)]
struct Verb {
    #[serde(flatten)]
    selection: SelectionInput,
    /// Say what would happen; change nothing.
    #[serde(default)]
    dry_run: bool,
    /// Purge only: must be true to delete.
    #[serde(default)]
    confirm: bool,
}

#[derive(Serialize)]
struct DryRun {
    dry_run: bool,
    queue: String,
    to: String,
    count: usize,
    dead_letters: Vec<LetterRow>,
}

async fn replay(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(queue): Path<String>,
    body: Result<Json<Verb>, JsonRejection>,
) -> ApiResult<Response> {
    let stage = stage(&queue)?;
    let Json(verb) = body?;
    let selection = verb.selection.selection().map_err(ApiError::bad_request)?;
    let link = &state.broker;
    let broker_err = |e: anyhow::Error| ApiError::broker(&e);
    if verb.dry_run {
        let rows = dead_letters::preview(link, stage, &selection)
            .await
            .map_err(broker_err)?;
        let to = stage.name().to_owned();
        let (queue, count) = (stage.dlq(), rows.len());
        return Ok(Json(DryRun {
            dry_run: true,
            queue,
            to,
            count,
            dead_letters: rows,
        })
        .into_response());
    }
    let done = actions::replay(&state, stage, &selection, &operator)
        .await
        .map_err(broker_err)?;
    Ok(Json(done).into_response())
}

#[derive(Serialize)]
struct Purged {
    purged: usize,
    queue: String,
}

async fn purge(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(queue): Path<String>,
    body: Result<Json<Verb>, JsonRejection>,
) -> ApiResult<Response> {
    let stage = stage(&queue)?;
    let Json(verb) = body?;
    let selection = verb.selection.selection().map_err(ApiError::bad_request)?;
    if selection.limit.is_some() {
        return Err(ApiError::bad_request("limit applies to replay only"));
    }
    let link = &state.broker;
    let broker_err = |e: anyhow::Error| ApiError::broker(&e);
    if verb.dry_run {
        let (rows, _) = dead_letters::list(link, stage, &selection)
            .await
            .map_err(broker_err)?;
        let to = "(deleted)".to_owned();
        let (queue, count) = (stage.dlq(), rows.len());
        return Ok(Json(DryRun {
            dry_run: true,
            queue,
            to,
            count,
            dead_letters: rows,
        })
        .into_response());
    }
    if !verb.confirm {
        return Err(ApiError::bad_request(
            "a purge deletes for good: send \"confirm\": true (or \"dry_run\": true to see what it would delete)",
        ));
    }
    let purged = actions::purge(&state, stage, &selection, &operator)
        .await
        .map_err(broker_err)?;
    Ok(Json(Purged {
        purged,
        queue: stage.dlq(),
    })
    .into_response())
}

async fn health(State(state): State<AppState>) -> Json<super::health::Health> {
    let h = &state;
    Json(super::health::check(&h.broker, &h.topology, &h.store.pool, &h.workers).await)
}
