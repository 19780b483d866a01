//! Wiring: builds the workers a process runs from [`Settings`], and runs them until a
//! shutdown signal. `build` does every check that can fail on configuration (exit code 2);
//! `run_until_stopped` only runs.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::broker::{Stage, run_stage, run_ticking};
use crate::config::{ConfigError, SecretUrl, Settings};
use crate::ec2::Ec2;
use crate::health::Readiness;
use crate::mail::Mailer;
use crate::stages::credentials::CredentialsStage;
use crate::stages::notifier::NotifierStage;
use crate::stages::provisioner::{
    BootWatch, ProvisionStage, Provisioner, TeardownStage, run_sweeper,
};
use crate::stages::relay::{EventRelay, RELAY_TICK};
use crate::stages::scheduler::{LaunchPace, SchedulerStage, run_timer};
use crate::store::Store;

/// The kinds of worker a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Worker {
    /// `booking-created`: validate, store, generate credentials.
    Credentials,
    /// `credentials-ready` and the durable timer (`provision-due`, `teardown-due`).
    Scheduler,
    /// `provision-due` and `teardown-due`: EC2 instances.
    Provisioner,
    /// `notify`: the emails.
    Notifier,
}

impl Worker {
    pub const ALL: [Worker; 4] = [
        Worker::Credentials,
        Worker::Scheduler,
        Worker::Provisioner,
        Worker::Notifier,
    ];
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Workers built and ready to run. Their futures do nothing until
/// [`Application::run_until_stopped`] polls them.
pub struct Application {
    tasks: Vec<(&'static str, Task)>,
    stop: CancellationToken,
    readiness: Readiness,
    store: Store,
    database_url: SecretUrl,
    http: Option<TcpListener>,
}

impl Application {
    /// Checks the configuration each worker needs, builds its clients and binds the metrics
    /// endpoint. Broker and database connections are made when running.
    pub async fn build(settings: &Settings, workers: &[Worker]) -> Result<Self, ConfigError> {
        // The recorder first, so that the series workers name at start-up are kept.
        let http = match settings.metrics_addr {
            Some(addr) => bind_metrics(addr, settings.metrics_addr_explicit).await?,
            None => None,
        };
        let store = Store::connect_lazy(
            settings.database_url.expose_secret(),
            pool_size(settings, workers),
        )
        .map_err(|e| ConfigError::new("DATABASE_URL", e.to_string()))?;
        let mut app = Self {
            tasks: Vec::new(),
            stop: CancellationToken::new(),
            readiness: Readiness::default(),
            store,
            database_url: settings.database_url.clone(),
            http,
        };
        for worker in workers {
            app.add_worker(*worker, settings).await?;
        }
        let records_events = [Worker::Credentials, Worker::Notifier, Worker::Provisioner];
        if workers.iter().any(|w| records_events.contains(w)) {
            app.add_relay(settings);
        }
        Ok(app)
    }

    async fn add_worker(&mut self, worker: Worker, settings: &Settings) -> Result<(), ConfigError> {
        let store = self.store.clone();
        match worker {
            Worker::Credentials => {
                let key = settings.require_secret_key()?.clone();
                let pace = LaunchPace::from_settings(settings);
                let stage = CredentialsStage::new(store, key, settings.rules, pace)
                    .with_prices(settings.ec2.prices.clone());
                self.add_stage("credentials", settings, stage);
            }
            Worker::Scheduler => {
                let stage = SchedulerStage::new(store.clone(), LaunchPace::from_settings(settings));
                self.add_stage("scheduler", settings, stage);
                let ready = self.readiness.register("scheduler timer");
                let (broker, tick) = (settings.broker.clone(), settings.scheduler_tick);
                let timer = run_timer(store, broker, tick, ready, self.stop.clone());
                self.tasks.push(("scheduler timer", Box::pin(timer)));
            }
            Worker::Provisioner => {
                let ami_id = settings.require_ami_id()?.to_owned();
                let key = settings.require_secret_key()?.clone();
                let ec2 = Ec2::with_pool(settings.ec2.clone(), store.pool.clone()).await;
                crate::ec2::register_metrics();
                let provisioner = Provisioner::new(store, ec2, key, settings.ec2.clone(), ami_id);
                self.add_stage("provisioner", settings, ProvisionStage(provisioner.clone()));
                self.add_stage("teardown", settings, TeardownStage(provisioner.clone()));
                let ready = self.readiness.register("boot watch");
                let (broker, stop) = (settings.broker.clone(), self.stop.clone());
                let watch = BootWatch::new(provisioner.clone());
                let tick = settings.ec2.watch_tick;
                let boots = async move {
                    run_ticking("boot watch", &watch, &broker, tick, ready, stop).await;
                };
                self.tasks.push(("boot watch", Box::pin(boots)));
                let every = settings.ec2.sweep_interval;
                let sweeper = run_sweeper(provisioner, every, self.stop.clone());
                self.tasks.push(("sweeper", Box::pin(sweeper)));
            }
            Worker::Notifier => {
                let key = settings.require_secret_key()?.clone();
                let smtp = settings.smtp_url.expose_secret();
                let mailer = Mailer::new(smtp, &settings.mail_from)?;
                crate::mail::register_metrics();
                let (bootstrap, from) = (settings.ec2.bootstrap, &settings.mail_from);
                let stage = NotifierStage::new(store, key, mailer, bootstrap, from)
                    .with_https(&settings.ec2.https);
                self.add_stage("notifier", settings, stage);
            }
        }
        Ok(())
    }

    /// The events relay: one per process, whichever of its workers recorded the events.
    fn add_relay(&mut self, settings: &Settings) {
        let ready = self.readiness.register("events relay");
        let (broker, stop) = (settings.broker.clone(), self.stop.clone());
        let relay = EventRelay::new(self.store.clone());
        let task = async move {
            run_ticking("events relay", &relay, &broker, RELAY_TICK, ready, stop).await;
        };
        self.tasks.push(("events relay", Box::pin(task)));
    }

    fn add_stage<S: Stage>(&mut self, name: &'static str, settings: &Settings, stage: S) {
        let ready = self.readiness.register(name);
        let task = run_stage(
            Arc::new(stage),
            settings.broker.clone(),
            ready,
            self.stop.clone(),
        );
        self.tasks.push((name, Box::pin(task)));
    }

    /// Where the metrics and health endpoint listens, if it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs every worker until `shutdown` completes, then waits until each has drained its
    /// in-flight messages.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send) {
        let mut set = JoinSet::new();
        for (name, task) in self.tasks {
            tracing::info!(worker = name, "starting");
            set.spawn(task);
        }
        let stop = self.stop;
        set.spawn(ensure_schema(
            self.store.clone(),
            self.database_url,
            stop.clone(),
        ));
        if let Some(listener) = self.http {
            tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics, /healthz, /readyz");
            set.spawn(crate::health::serve(
                listener,
                self.readiness,
                self.store,
                stop.clone().cancelled_owned(),
            ));
        }
        tokio::select! {
            _ = shutdown => {}
            _ = stop.cancelled() => {}
        }
        stop.cancel();
        while let Some(result) = set.join_next().await {
            if let Err(err) = result {
                tracing::error!(error = %err, "a worker task failed");
            }
        }
        tracing::info!("stopped");
    }
}

/// Database connections for this process: up to 4 per consumer (a handler holds one only
/// while it queries, the notifier while it sends; a handler that cannot get one in time waits
/// without spending an attempt) plus 2 for the loops (the timer, the boot watch, the events
/// relay: each holds one while it ticks) and the schema task. The defaults come to
/// 6 (credentials, scheduler, notifier) and 10 (provisioner), 28 for one replica of each, so
/// three replicas of every worker fit PostgreSQL's default `max_connections` of 100.
/// `LABBOOK_DB_MAX_CONNECTIONS` replaces it.
fn pool_size(settings: &Settings, workers: &[Worker]) -> u32 {
    if let Some(max) = settings.db_max_connections {
        return max;
    }
    let consumers: u32 = workers
        .iter()
        .map(|w| if *w == Worker::Provisioner { 2 } else { 1 })
        .sum();
    u32::from(settings.broker.prefetch.min(4)) * consumers + 2
}

/// Installs the metrics recorder and binds its endpoint. An address that was chosen must be
/// free; on the default one, several workers on one host just do without.
async fn bind_metrics(
    addr: SocketAddr,
    explicit: bool,
) -> Result<Option<TcpListener>, ConfigError> {
    crate::health::prometheus();
    match crate::health::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if explicit => Err(ConfigError::new(
            "LABBOOK_METRICS_ADDR",
            format!("cannot listen on {addr}: {e}"),
        )),
        Err(e) => {
            tracing::warn!(
                %addr,
                error = %e,
                "the default metrics address is taken (another worker on this host?); \
                 this worker serves no /metrics: set LABBOOK_METRICS_ADDR to give it its own"
            );
            Ok(None)
        }
    }
}

/// Creates the database if it is missing and applies pending migrations, retrying with
/// backoff until the database answers. Migrations are idempotent and serialised by an
/// advisory lock, so every worker may do this at start; `labbook migrate` does the same on
/// demand. Handlers that run before it finishes wait (the database is "unavailable").
async fn ensure_schema(store: Store, url: SecretUrl, stop: CancellationToken) {
    let prepared =
        crate::broker::retry_until_cancelled("cannot prepare the database", &stop, || {
            store.ensure_schema(url.expose_secret())
        });
    if prepared.await.is_some() {
        tracing::info!("database schema is up to date");
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}

/// The whole life of a labbook process, worker or CLI: settings from the environment (a
/// configuration error prints one line and exits 2), telemetry with `log_filter` unless
/// `RUST_LOG` says otherwise, a tokio runtime, then `main` until it returns the exit code.
pub fn run_process<F, Fut>(log_filter: &str, main: F) -> ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    let service = service_name();
    let traces = settings.traces.as_ref().map(|t| (t, service.as_str()));
    let telemetry =
        match crate::telemetry::init(settings.json_logs, log_filter, std::io::stderr, traces) {
            Ok(t) => t,
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::from(2);
            }
        };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(main(settings));
    // The tasks still held end first (their spans close), then the last spans are sent.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    drop(telemetry);
    code
}

/// The service a process's spans are exported under: its binary's name (`labbook-notifier`).
fn service_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .filter(|s| s.starts_with("labbook"))
        .unwrap_or_else(|| "labbook".to_owned())
}

/// The whole life of a worker process: run `workers` until SIGTERM/SIGINT.
pub fn worker_main(workers: &[Worker]) -> ExitCode {
    run_process(crate::telemetry::DEFAULT_FILTER, |settings| async move {
        let app = match Application::build(&settings, workers).await {
            Ok(app) => app,
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::from(2);
            }
        };
        app.run_until_stopped(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// The `--help` text of a worker binary.
pub fn about(worker: Worker) -> String {
    let what = match worker {
        Worker::Credentials => {
            "Consumes booking-created: validates each booking, stores it once with one generated \
             credential per user (passwords encrypted), then publishes credentials-ready and the \
             confirmation notify. Needs AMQP_URL, DATABASE_URL, LABBOOK_SECRET_KEY."
        }
        Worker::Scheduler => {
            "Consumes credentials-ready and runs the durable timer: stores when each booking is \
             to be provisioned (booking time minus LABBOOK_PROVISION_LEAD_SECONDS) and torn down, \
             and publishes provision-due / teardown-due when due. Any number of replicas. Needs \
             AMQP_URL, DATABASE_URL."
        }
        Worker::Provisioner => {
            "Consumes provision-due (launches the booking's EC2 instances, once, and acknowledges \
             once they are recorded) and teardown-due (terminates them). Its boot watch follows \
             the launched machines until each runs and its bootstrap reports success, and then \
             publishes the instance-details notify; every replica shares that work through the \
             database. Needs AMQP_URL, DATABASE_URL, LABBOOK_SECRET_KEY, LABBOOK_AMI_ID and AWS \
             credentials."
        }
        Worker::Notifier => {
            "Consumes notify: renders and sends the confirmation, instance-details and failure \
             emails (plain text and HTML), each once per booking. Needs AMQP_URL, DATABASE_URL, \
             LABBOOK_SECRET_KEY, SMTP_URL, MAIL_FROM."
        }
    };
    format!(
        "{what}\n\nConfigured by the environment (see the README); LABBOOK_CONFIG may name a \
         KEY=VALUE file for what the environment leaves unset. Stops on SIGTERM/SIGINT after \
         finishing the messages in flight (exit 0); a configuration error exits 2."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_replicas_of_every_worker_fit_postgres_default_connections() {
        let settings = Settings::from_map(&Default::default()).unwrap();
        let one_each: u32 = Worker::ALL
            .iter()
            .map(|w| pool_size(&settings, std::slice::from_ref(w)))
            .sum();
        assert_eq!(one_each, 28);
        assert!(
            3 * one_each <= 100 - 10,
            "room left for operators and migrations"
        );
    }
}
