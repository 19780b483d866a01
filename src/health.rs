//! The workers' HTTP endpoint (`LABBOOK_METRICS_ADDR`): `/metrics` in Prometheus format,
//! `/healthz` (the process is alive) and `/readyz` (every worker is connected to the broker
//! and the database answers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::store::Store;

/// Latency buckets (seconds) for the handler and scheduler-lag histograms.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets (seconds) for `labbook_instance_email_seconds`: a booking's lead time is minutes to
/// days, so a minute to a week. (A full-name matcher is chosen before the suffix one.)
const LEAD_TIME_BUCKETS: &[f64] = &[
    10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0, 259200.0, 604800.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("valid buckets")
                .set_buckets_for_metric(
                    Matcher::Full("labbook_instance_email_seconds".into()),
                    LEAD_TIME_BUCKETS,
                )
                .expect("valid buckets")
                .install_recorder()
                .expect("the only metrics recorder")
        })
        .clone()
}

type NamedFlags = Vec<(&'static str, Arc<AtomicBool>)>;

/// Whether each worker of this process is connected and consuming.
#[derive(Clone, Default)]
pub struct Readiness {
    flags: Arc<Mutex<NamedFlags>>,
}

impl Readiness {
    /// A flag the named worker sets while it is connected.
    pub fn register(&self, name: &'static str) -> ReadyFlag {
        let flag = Arc::new(AtomicBool::new(false));
        self.flags
            .lock()
            .expect("readiness lock")
            .push((name, flag.clone()));
        ReadyFlag(flag)
    }

    /// The workers that are not connected now.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let flags = self.flags.lock().expect("readiness lock");
        flags
            .iter()
            .filter(|(_, f)| !f.load(Ordering::Relaxed))
            .map(|(n, _)| *n)
            .collect()
    }
}

/// One worker's connection state.
#[derive(Clone, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    store: Store,
    metrics: PrometheusHandle,
}

/// Binds the endpoint; serving starts with [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the endpoint until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    store: Store,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let state = AppState {
        readiness,
        store,
        metrics: prometheus(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %err, "the metrics endpoint stopped");
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let not_ready = state.readiness.not_ready();
    if !not_ready.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not connected to the broker: {}\n", not_ready.join(", ")),
        );
    }
    if !state.store.ping().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the database does not answer\n".to_owned(),
        );
    }
    (StatusCode::OK, "ready\n".to_owned())
}
