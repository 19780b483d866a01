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

use crate::broker::{Stage, run_stage};
use crate::config::{ConfigError, SecretUrl, Settings};
use crate::ec2::Ec2;
use crate::health::Readiness;
use crate::mail::Mailer;
use crate::stages::credentials::CredentialsStage;
use crate::stages::notifier::NotifierStage;
use crate::stages::provisioner::{ProvisionStage, Provisioner, TeardownStage, run_sweeper};
use crate::stages::scheduler::{SchedulerStage, run_timer};
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
        // Every message in flight may hold a connection (the notifier holds one while it
        // sends), plus the timer and the schema task.
        let consumers: u32 = workers
            .iter()
            .map(|w| if *w == Worker::Provisioner { 2 } else { 1 })
            .sum();
        let pool_size = (u32::from(settings.broker.prefetch) * consumers + 4).clamp(4, 100);
        let store = Store::connect_lazy(&settings.database_url, pool_size)
            .map_err(|e| ConfigError::new("DATABASE_URL", e.to_string()))?;
        let mut app = Self {
            tasks: Vec::new(),
            stop: CancellationToken::new(),
            readiness: Readiness::default(),
            store: store.clone(),
            database_url: settings.database_url.clone(),
            http: None,
        };
        for worker in workers {
            match worker {
                Worker::Credentials => {
                    let key = settings.require_secret_key()?.clone();
                    app.add_stage(
                        "credentials",
                        settings,
                        CredentialsStage::new(store.clone(), key, settings.rules),
                    );
                }
                Worker::Scheduler => {
                    app.add_stage(
                        "scheduler",
                        settings,
                        SchedulerStage::new(store.clone(), settings.provision_lead),
                    );
                    let ready = app.readiness.register("scheduler timer");
                    let timer = run_timer(
                        store.clone(),
                        settings.broker.clone(),
                        settings.scheduler_tick,
                        ready,
                        app.stop.clone(),
                    );
                    app.tasks.push(("scheduler timer", Box::pin(timer)));
                }
                Worker::Provisioner => {
                    let ami_id = settings.require_ami_id()?.to_owned();
                    let key = settings.require_secret_key()?.clone();
                    let ec2 = Ec2::new(settings.ec2.clone()).await;
                    let provisioner =
                        Provisioner::new(store.clone(), ec2, key, settings.ec2.clone(), ami_id);
                    app.add_stage("provisioner", settings, ProvisionStage(provisioner.clone()));
                    app.add_stage("teardown", settings, TeardownStage(provisioner.clone()));
                    let sweeper =
                        run_sweeper(provisioner, settings.ec2.sweep_interval, app.stop.clone());
                    app.tasks.push(("sweeper", Box::pin(sweeper)));
                }
                Worker::Notifier => {
                    let key = settings.require_secret_key()?.clone();
                    let mailer = Mailer::new(&settings.smtp_url, &settings.mail_from)?;
                    let bootstrap = settings.ec2.bootstrap;
                    app.add_stage(
                        "notifier",
                        settings,
                        NotifierStage::new(
                            store.clone(),
                            key,
                            mailer,
                            bootstrap,
                            &settings.mail_from,
                        ),
                    );
                }
            }
        }
        if let Some(addr) = settings.metrics_addr {
            crate::health::prometheus();
            match crate::health::bind(addr).await {
                Ok(listener) => app.http = Some(listener),
                Err(e) if settings.metrics_addr_explicit => {
                    return Err(ConfigError::new(
                        "LABBOOK_METRICS_ADDR",
                        format!("cannot listen on {addr}: {e}"),
                    ));
                }
                Err(e) => tracing::warn!(
                    %addr,
                    error = %e,
                    "the default metrics address is taken (another worker on this host?); \
                     running without /metrics: set LABBOOK_METRICS_ADDR to choose one"
                ),
            }
        }
        Ok(app)
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

/// Creates the database if it is missing and applies pending migrations, retrying with
/// backoff until the database answers. Migrations are idempotent and serialised by an
/// advisory lock, so every worker may do this at start; `labbook migrate` does the same on
/// demand. Handlers that run before it finishes fail transiently and are retried.
async fn ensure_schema(store: Store, url: SecretUrl, stop: CancellationToken) {
    let mut delays = crate::broker::reconnect_delays();
    loop {
        match store.ensure_schema(&url).await {
            Ok(()) => {
                tracing::info!("database schema is up to date");
                return;
            }
            Err(err) => {
                let delay = delays.next().unwrap_or(std::time::Duration::from_secs(30));
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot prepare the database");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
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

/// The whole life of a worker process: settings, telemetry, build, run, exit code.
pub fn worker_main(workers: &[Worker]) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(
        settings.json_logs,
        crate::telemetry::DEFAULT_FILTER,
        std::io::stderr,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
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
            "Consumes provision-due (launches the booking's EC2 instances, once, and publishes \
             the instance-details notify) and teardown-due (terminates them). Needs AMQP_URL, \
             DATABASE_URL, LABBOOK_SECRET_KEY, LABBOOK_AMI_ID and AWS credentials."
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
