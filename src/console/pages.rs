//! The console's pages: server-rendered from `templates/console/`, no JavaScript. Every page
//! that reads something shows what it could and says what it could not.

use std::sync::LazyLock;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum_extra::extract::cookie::{Cookie, CookieJar};
use axum_extra::extract::{Form, Query};
use minijinja::{Environment, Value, context};
use serde::Deserialize;

use super::AppState;
use super::actions::{self, ActionError};
use super::api::{booking_detail, booking_list};
use super::auth::{self, CsrfToken, Operator};
use super::bookings::{Filter, RawFilter, STATES};
use super::dead_letters::{self, SelectionInput};
use crate::broker::StageQueue;
use crate::ops::change::Change;

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, source) in [
        (
            "base.html",
            include_str!("../../templates/console/base.html"),
        ),
        (
            "login.html",
            include_str!("../../templates/console/login.html"),
        ),
        (
            "error.html",
            include_str!("../../templates/console/error.html"),
        ),
        (
            "bookings.html",
            include_str!("../../templates/console/bookings.html"),
        ),
        (
            "booking.html",
            include_str!("../../templates/console/booking.html"),
        ),
        (
            "dead_letters.html",
            include_str!("../../templates/console/dead_letters.html"),
        ),
        (
            "queue.html",
            include_str!("../../templates/console/queue.html"),
        ),
        (
            "letter.html",
            include_str!("../../templates/console/letter.html"),
        ),
        (
            "confirm.html",
            include_str!("../../templates/console/confirm.html"),
        ),
        (
            "done.html",
            include_str!("../../templates/console/done.html"),
        ),
        (
            "health.html",
            include_str!("../../templates/console/health.html"),
        ),
        (
            "booking_action.html",
            include_str!("../../templates/console/booking_action.html"),
        ),
    ] {
        env.add_template(name, source)
            .expect("console templates parse");
    }
    env
});

fn render(name: &str, ctx: Value) -> Response {
    match TEMPLATES.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => Html(html).into_response(),
        Err(err) => {
            tracing::error!(template = name, error = %err, "console: a page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page did not render").into_response()
        }
    }
}

/// A page that could not be shown, and why.
pub struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<ActionError> for PageError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::NotFound(why) => Self::new(StatusCode::NOT_FOUND, why),
            ActionError::Refused(why) => Self::new(StatusCode::CONFLICT, why),
            ActionError::Unavailable(why) => Self::new(StatusCode::SERVICE_UNAVAILABLE, why),
        }
    }
}

impl From<super::api::ApiError> for PageError {
    fn from(e: super::api::ApiError) -> Self {
        let (status, reasons) = e.parts();
        Self::new(status, reasons.join("; "))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let mut page = render(
            "error.html",
            context! { status => self.status.as_u16(), message => self.message },
        );
        *page.status_mut() = self.status;
        page
    }
}

type PageResult = Result<Response, PageError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/bookings") }))
        .route("/bookings", get(bookings_page))
        .route("/bookings/{id}", get(booking_page))
        .route(
            "/bookings/{id}/cancel",
            get(cancel_preview).post(cancel_booking),
        )
        .route("/bookings/{id}/end", get(end_preview).post(end_booking))
        .route(
            "/bookings/{id}/resend",
            get(resend_preview).post(resend_email),
        )
        .route("/dead-letters", get(dead_letters_page))
        .route("/dead-letters/{queue}", get(queue_page))
        .route("/dead-letters/{queue}/letters/{id}", get(letter_page))
        .route(
            "/dead-letters/{queue}/replay",
            get(replay_preview).post(replay),
        )
        .route(
            "/dead-letters/{queue}/purge",
            get(purge_preview).post(purge),
        )
        .route("/health", get(health_page))
        .route("/logout", axum::routing::post(logout))
        .fallback(|| async { PageError::new(StatusCode::NOT_FOUND, "There is no such page.") })
}

/// The login page's CSRF cookie (the pages' middleware does this for the others).
pub async fn login_csrf(
    State(state): State<AppState>,
    jar: CookieJar,
    req: Request,
    next: Next,
) -> Response {
    auth::with_csrf_cookie(&state.auth, jar, req, next).await
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

pub async fn login_page(
    Extension(csrf): Extension<CsrfToken>,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = auth::safe_next(q.next.as_deref());
    render("login.html", context! { csrf => csrf.0, next => next })
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    /// Who is logging in: recorded with each action in the booking's history.
    #[serde(default)]
    name: String,
    csrf: String,
    next: Option<String>,
}

pub async fn login(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    jar: CookieJar,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = auth::safe_next(form.next.as_deref()).to_owned();
    match auth::login_ok(&state.auth, &jar, &form.csrf, (&form.token, &form.name)) {
        Ok(operator) => {
            tracing::info!(operator = %operator.0, "console: an operator logged in");
            let jar = jar.add(state.auth.session_cookie(&operator));
            (jar, Redirect::to(&next)).into_response()
        }
        Err(why) => {
            tracing::warn!("console: a login was refused: {why}");
            // A little patience per wrong guess costs an operator nothing.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let mut page = render(
                "login.html",
                context! { csrf => csrf.0, next => next, error => why, name => form.name },
            );
            *page.status_mut() = StatusCode::UNAUTHORIZED;
            page
        }
    }
}

async fn logout(jar: CookieJar) -> Response {
    let jar = jar.remove(Cookie::build(auth::SESSION_COOKIE).path("/"));
    (jar, Redirect::to("/login")).into_response()
}

async fn bookings_page(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Query(raw): Query<RawFilter>,
) -> PageResult {
    let filter = Filter::parse(&raw).map_err(|e| PageError::new(StatusCode::BAD_REQUEST, e))?;
    let list = booking_list(&state, &filter).await?;
    let page = |offset: i64| {
        let q = RawFilter {
            offset: Some(offset.max(0)),
            ..raw.clone()
        };
        format!("/bookings?{}", serde_urlencoded_lite(&q))
    };
    let shown_to = filter.offset + list.bookings.len() as i64;
    Ok(render(
        "bookings.html",
        context! {
            csrf => csrf.0, nav => "bookings", list => list, filter => raw, states => STATES,
            shown_from => filter.offset + 1, shown_to => shown_to,
            prev => (filter.offset > 0).then(|| page(filter.offset - filter.limit)),
            next => (shown_to < list.total).then(|| page(shown_to)),
        },
    ))
}

/// The bookings filter as a query string.
fn serde_urlencoded_lite(q: &RawFilter) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    let pairs = [
        ("state", &q.state),
        ("from", &q.from),
        ("to", &q.to),
        ("q", &q.q),
    ];
    for (k, v) in pairs {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            out.append_pair(k, v);
        }
    }
    if let Some(limit) = q.limit {
        out.append_pair("limit", &limit.to_string());
    }
    if let Some(offset) = q.offset {
        out.append_pair("offset", &offset.to_string());
    }
    out.finish()
}

async fn booking_page(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path(id): Path<String>,
) -> PageResult {
    let detail = booking_detail(&state, &id).await?.ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            format!("No booking {id:?} is stored."),
        )
    })?;
    // A booking on its way (or its machines on theirs) is live work: the page refreshes itself.
    let live = matches!(
        detail.booking.state.as_str(),
        "received" | "scheduled" | "provisioning"
    );
    let refresh = live.then_some(LIVE_REFRESH_SECONDS);
    Ok(render(
        "booking.html",
        context! { csrf => csrf.0, nav => "bookings", b => detail, refresh => refresh },
    ))
}

/// How often a page showing live work reloads itself (a `<meta http-equiv="refresh">`: no
/// script, so the console's CSP stays `default-src 'none'`).
const LIVE_REFRESH_SECONDS: u32 = 10;

/// The length asked for on the booking page's "new end" form.
#[derive(Deserialize)]
struct NewLength {
    duration_minutes: Option<String>,
}

impl NewLength {
    fn minutes(&self) -> Result<u32, PageError> {
        let raw = self.duration_minutes.as_deref().unwrap_or("").trim();
        raw.parse::<u32>().map_err(|_| {
            PageError::new(
                StatusCode::BAD_REQUEST,
                format!("The new length must be a number of minutes (got {raw:?})."),
            )
        })
    }
}

/// The confirmation page of a booking action: what it will do, and the button that does it.
fn confirm_action(csrf: &CsrfToken, id: &str, action: Value) -> Response {
    render(
        "booking_action.html",
        context! { csrf => csrf.0.clone(), nav => "bookings", id => id, a => action },
    )
}

fn action_done(csrf: &CsrfToken, id: &str, message: String) -> Response {
    render(
        "booking_action.html",
        context! { csrf => csrf.0.clone(), nav => "bookings", id => id, done => message },
    )
}

async fn cancel_preview(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path(id): Path<String>,
) -> PageResult {
    let planned = actions::plan(&state, &id, Change::Cancel).await?;
    let action = context! {
        verb => "cancel", title => "Cancel this booking?", what => planned.what_happens(),
        revision => planned.revision, button => "Cancel the booking", danger => true,
    };
    Ok(confirm_action(&csrf, &id, action))
}

async fn cancel_booking(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
) -> PageResult {
    let message = actions::apply(&state, &id, Change::Cancel, &operator).await?;
    Ok(action_done(&csrf, &id, message))
}

async fn end_preview(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path(id): Path<String>,
    Query(length): Query<NewLength>,
) -> PageResult {
    let minutes = length.minutes()?;
    let planned = actions::plan(&state, &id, Change::Duration(minutes)).await?;
    let action = context! {
        verb => "end", title => "Give this booking a new end?", what => planned.what_happens(),
        revision => planned.revision, button => "Publish the new end", minutes => minutes,
    };
    Ok(confirm_action(&csrf, &id, action))
}

async fn end_booking(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
    Form(length): Form<NewLength>,
) -> PageResult {
    let change = Change::Duration(length.minutes()?);
    let message = actions::apply(&state, &id, change, &operator).await?;
    Ok(action_done(&csrf, &id, message))
}

async fn resend_preview(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path(id): Path<String>,
) -> PageResult {
    let revision = actions::resendable(&state.store.pool, &id).await?;
    let what = format!(
        "the instance details email of revision {revision} (its machines' addresses and logins) is sent again to the booker, once, with a Message-ID of its own"
    );
    let action = context! {
        verb => "resend", title => "Resend the instance details email?", what => what,
        revision => revision, button => "Resend the email",
    };
    Ok(confirm_action(&csrf, &id, action))
}

async fn resend_email(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
) -> PageResult {
    let message = actions::resend(&state, &id, &operator).await?;
    Ok(action_done(&csrf, &id, message))
}

fn stage(queue: &str) -> Result<StageQueue, PageError> {
    StageQueue::parse(queue)
        .ok_or_else(|| PageError::new(StatusCode::NOT_FOUND, crate::ops::dlq::unknown_queue(queue)))
}

fn broker_down(e: anyhow::Error) -> PageError {
    PageError::new(StatusCode::SERVICE_UNAVAILABLE, super::errors::broker(&e))
}

async fn dead_letters_page(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
) -> PageResult {
    let counts = dead_letters::counts(&state.broker)
        .await
        .map_err(broker_down)?;
    let total: u32 = counts.iter().map(|c| c.dead_letters).sum();
    Ok(render(
        "dead_letters.html",
        context! { csrf => csrf.0, nav => "dead-letters", queues => counts, total => total },
    ))
}

/// A dead-letter filter from the query string (pages: `id` once per ticked row).
fn selection(input: &SelectionInput) -> Result<crate::ops::dlq::Selection, PageError> {
    input
        .selection()
        .map_err(|e| PageError::new(StatusCode::BAD_REQUEST, e))
}

async fn queue_page(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path(queue): Path<String>,
    Query(input): Query<SelectionInput>,
) -> PageResult {
    let stage = stage(&queue)?;
    let filter = SelectionInput {
        ids: Vec::new(),
        limit: None,
        ..input
    };
    let (rows, total) = dead_letters::list(&state.broker, stage, &selection(&filter)?)
        .await
        .map_err(broker_down)?;
    let filtered = filter.booking_id.is_some() || filter.error.is_some();
    Ok(render(
        "queue.html",
        context! {
            csrf => csrf.0, nav => "dead-letters", queue => stage.dlq(), stage => stage.name(),
            rows => rows, total => total, filter => filter, filtered => filtered,
        },
    ))
}

async fn letter_page(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path((queue, id)): Path<(String, String)>,
) -> PageResult {
    let stage = stage(&queue)?;
    let letter = dead_letters::find(&state.broker, stage, &id)
        .await
        .map_err(broker_down)?;
    let letter = letter.ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            format!("{} holds no dead letter {id:?} (any more).", stage.dlq()),
        )
    })?;
    Ok(render(
        "letter.html",
        context! { csrf => csrf.0, nav => "dead-letters", l => letter },
    ))
}

/// The dry run: what a replay of the ticked rows (or of the filter) would move.
async fn replay_preview(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path(queue): Path<String>,
    Query(input): Query<SelectionInput>,
) -> PageResult {
    let stage = stage(&queue)?;
    let rows = dead_letters::preview(&state.broker, stage, &selection(&input)?)
        .await
        .map_err(broker_down)?;
    Ok(render(
        "confirm.html",
        context! {
            csrf => csrf.0, nav => "dead-letters", verb => "replay", queue => stage.dlq(),
            stage => stage.name(), rows => rows, filter => input,
        },
    ))
}

/// What a confirmed replay or purge sends: the ids the dry run showed.
#[derive(Deserialize)]
struct Confirmed {
    #[serde(default)]
    id: Vec<String>,
    /// The booking whose page the operator came from (for the way back).
    booking_id: Option<String>,
}

impl Confirmed {
    fn selection(&self) -> Result<crate::ops::dlq::Selection, PageError> {
        if self.id.is_empty() {
            return Err(PageError::new(
                StatusCode::BAD_REQUEST,
                "Nothing was selected: run the dry run first.",
            ));
        }
        selection(&SelectionInput {
            ids: self.id.clone(),
            ..Default::default()
        })
    }
}

/// The real replay of what the dry run showed; each dead letter is confirmed in its stage
/// queue before it leaves the dead-letter queue.
async fn replay(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Extension(operator): Extension<Operator>,
    Path(queue): Path<String>,
    Form(form): Form<Confirmed>,
) -> PageResult {
    let stage = stage(&queue)?;
    let done = actions::replay(&state, stage, &form.selection()?, &operator)
        .await
        .map_err(broker_down)?;
    let message = format!(
        "Replayed {} dead letter(s) to {}; {} left in {}.",
        done.replayed,
        done.to,
        done.left,
        stage.dlq()
    );
    Ok(render(
        "done.html",
        context! { csrf => csrf.0, nav => "dead-letters", message => message, queue => stage.dlq(), stage => stage.name(), booking => form.booking_id },
    ))
}

/// The confirmation before a purge: what it would delete.
async fn purge_preview(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Path(queue): Path<String>,
    Query(input): Query<SelectionInput>,
) -> PageResult {
    let stage = stage(&queue)?;
    let input = SelectionInput {
        limit: None,
        ..input
    };
    let (rows, _) = dead_letters::list(&state.broker, stage, &selection(&input)?)
        .await
        .map_err(broker_down)?;
    Ok(render(
        "confirm.html",
        context! {
            csrf => csrf.0, nav => "dead-letters", verb => "purge", queue => stage.dlq(),
            stage => stage.name(), rows => rows, filter => input,
        },
    ))
}

async fn purge(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
    Extension(operator): Extension<Operator>,
    Path(queue): Path<String>,
    Form(form): Form<Confirmed>,
) -> PageResult {
    let stage = stage(&queue)?;
    let removed = actions::purge(&state, stage, &form.selection()?, &operator)
        .await
        .map_err(broker_down)?;
    let message = format!("Deleted {removed} dead letter(s) from {}.", stage.dlq());
    Ok(render(
        "done.html",
        context! { csrf => csrf.0, nav => "dead-letters", message => message, queue => stage.dlq(), stage => stage.name(), booking => form.booking_id },
    ))
}

async fn health_page(
    State(state): State<AppState>,
    Extension(csrf): Extension<CsrfToken>,
) -> Response {
    let s = &state;
    let health = super::health::check(&s.broker, &s.topology, &s.store.pool, &s.workers).await;
    render(
        "health.html",
        context! { csrf => csrf.0, nav => "health", h => health, refresh => LIVE_REFRESH_SECONDS },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses_and_escapes() {
        let page = TEMPLATES
            .get_template("error.html")
            .unwrap()
            .render(context! { status => 400, message => "<script>x</script>", csrf => "c" })
            .unwrap();
        assert!(
            page.contains("&lt;script&gt;x") && !page.contains("<script>"),
            "{page}"
        );
        assert!(page.contains(r#"name="csrf" value="c""#));
    }
}
