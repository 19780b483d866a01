//! `labbook console`: the operator's web console and HTTP API.
//!
//! - [`auth`]: the token, the session cookie and CSRF protection;
//! - [`pages`]: server-rendered pages (templates in `templates/console/`, no JavaScript):
//!   bookings and a booking's story, dead letters with dry-run replay and purge, health;
//! - [`api`]: the same under `/api` as JSON, described by `/api/openapi.json`, plus
//!   `POST /api/bookings` for an upstream that cannot speak AMQP;
//! - [`actions`]: what an operator does to a booking (cancel, a new end, resend the instance
//!   details email, replay or purge its dead letters), each kept in its history with who did it;
//! - [`bookings`], [`timeline`], [`dead_letters`], [`health`]: what they read, in the
//!   console's own queries, and the dead letters through [`crate::ops::dlq`] as
//!   `labbook dlq` does.
//!
//! It needs the broker (`AMQP_URL`) and the database (`DATABASE_URL`), and never the key that
//! decrypts passwords: no page or answer can hold one.

pub mod actions;
pub mod api;
pub mod auth;
pub mod bookings;
pub mod broker;
pub mod dead_letters;
pub mod errors;
pub mod health;
pub mod pages;
pub mod timeline;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::broker::Topology;
use crate::config::{ConfigError, Settings};
use crate::domain::BookingRules;
use crate::store::Store;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub broker: Arc<broker::BrokerLink>,
    pub topology: Arc<Topology>,
    pub auth: Arc<auth::Auth>,
    pub rules: BookingRules,
    /// The domain of `MAIL_FROM`, for the Message-ID of a resent email.
    pub mail_domain: Arc<String>,
    /// Workers' `/readyz` the health page asks (`LABBOOK_CONSOLE_WORKERS`).
    pub workers: Arc<Vec<health::WorkerEndpoint>>,
    /// `LABBOOK_PRICES`, for the machines' estimated cost.
    pub prices: Arc<crate::domain::Prices>,
    /// `LABBOOK_TRACE_URL`: a booking's trace in the trace viewer.
    pub trace_url: Option<Arc<String>>,
}

/// The console, bound to its address and ready to serve.
pub struct Console {
    listener: TcpListener,
    state: AppState,
}

impl Console {
    /// Checks the console's settings (`LABBOOK_CONSOLE_TOKEN` first), makes its clients and
    /// binds `listen` (else `LABBOOK_CONSOLE_LISTEN`). The broker and the database are reached
    /// when a page needs them, so the console starts while they are away.
    pub async fn build(
        settings: &Settings,
        listen: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        let token = settings.console.require_token()?.clone();
        let addr = listen.unwrap_or(settings.console.listen);
        let secure = settings
            .console
            .secure_cookie
            .unwrap_or(!addr.ip().is_loopback());
        let store = Store::connect_lazy(settings.database_url.expose_secret(), 4)
            .map_err(|e| ConfigError::new("DATABASE_URL", e.to_string()))?;
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            ConfigError::new(
                "LABBOOK_CONSOLE_LISTEN",
                format!("cannot listen on {addr}: {e}"),
            )
        })?;
        let state = AppState {
            store,
            broker: Arc::new(broker::BrokerLink::new(&settings.broker)),
            topology: Arc::new(Topology::from_settings(&settings.broker)),
            auth: Arc::new(auth::Auth::new(token, secure)),
            rules: settings.rules,
            mail_domain: Arc::new(mail_domain(&settings.mail_from)),
            workers: Arc::new(health::WorkerEndpoint::parse_all(
                &settings.console.workers,
            )?),
            prices: Arc::new(settings.ec2.prices.clone()),
            trace_url: settings.console.trace_url.clone().map(Arc::new),
        };
        Ok(Self { listener, state })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes; requests in flight finish first.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let addr = self.local_addr();
        tracing::info!(%addr, "console listening: open http://{addr}/ and log in with LABBOOK_CONSOLE_TOKEN");
        let app = router(self.state);
        if let Err(err) = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %err, "the console stopped");
        }
        tracing::info!("console stopped");
    }
}

/// The domain part of the sender's address, as the notifier takes it for Message-IDs.
fn mail_domain(from: &crate::domain::EmailAddress) -> String {
    from.as_str()
        .rsplit_once('@')
        .map_or("labbook.invalid", |(_, d)| d)
        .to_owned()
}

/// Every route: the login page and `/healthz` are open; pages need a session (or the bearer
/// token) and a CSRF token on POST; `/api` needs the bearer token.
pub fn router(state: AppState) -> Router {
    let api = api::routes().layer(from_fn_with_state(state.clone(), auth::api));
    let pages = pages::routes().layer(from_fn_with_state(state.clone(), auth::pages));
    let login = Router::new()
        .route("/login", get(pages::login_page).post(pages::login))
        .layer(from_fn_with_state(state.clone(), pages::login_csrf));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(login)
        .nest("/api", api)
        .merge(pages)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Headers on every answer: nothing cached, framed, sniffed or sent elsewhere; no script runs.
async fn security_headers(mut response: axum::response::Response) -> axum::response::Response {
    let h = response.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, name: HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    response
}
