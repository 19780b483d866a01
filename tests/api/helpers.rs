//! Test harness: every test gets its own RabbitMQ vhost and its own PostgreSQL database, and
//! runs labbook's workers in-process against them.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use labbook::broker::{Topology, connect};
use labbook::config::Settings;
use labbook::crypto::SecretKey;
use labbook::startup::{Application, Worker};
use labbook::store::Store;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use sqlx::{Connection as _, Executor, PgConnection};
use tokio_util::sync::CancellationToken;

pub fn amqp_base() -> String {
    std::env::var("TEST_AMQP_BASE").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// `AMQP_URL` for `vhost`: on each broker `TEST_AMQP_BASE` lists (several, comma-separated,
/// for a cluster's nodes).
fn amqp_urls(vhost: &str) -> String {
    amqp_base()
        .split(',')
        .map(|base| format!("{}/{vhost}", base.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn moto_url() -> String {
    std::env::var("TEST_MOTO_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// A plain SDK client on the emulator, to look at instances as EC2 sees them.
pub async fn raw_ec2() -> aws_sdk_ec2::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(moto_url())
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&conf)
}

/// Instances EC2 has for a booking, any state.
pub async fn instances_for(booking_id: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    let out = raw_ec2()
        .await
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:labbook:booking-id")
                .values(booking_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances().to_vec())
        .collect()
}

/// The user-data an instance was launched with, decoded.
pub async fn user_data_of(instance_id: &str) -> String {
    use base64::Engine;
    let out = raw_ec2()
        .await
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let b64 = out.user_data().and_then(|v| v.value()).unwrap_or_default();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// Whether every instance is terminated or on its way there.
pub fn all_terminated(instances: &[aws_sdk_ec2::types::Instance]) -> bool {
    instances
        .iter()
        .all(|i| matches!(state_of(i).as_str(), "terminated" | "shutting-down"))
}

pub fn state_of(i: &aws_sdk_ec2::types::Instance) -> String {
    i.state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default()
}

pub fn pg_base() -> String {
    std::env::var("TEST_PG_BASE").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// `rabbitmqctl`, or the command `TEST_RABBITMQCTL` names for the broker under test (e.g.
/// `scripts/rabbitmq4.sh ctl` for the RabbitMQ 4.x node).
fn rabbitmqctl_command() -> Command {
    let line = std::env::var("TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().expect("TEST_RABBITMQCTL names a command"));
    cmd.args(words);
    cmd
}

pub fn rabbitmqctl(args: &[&str]) {
    let out = rabbitmqctl_command()
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Logs of the workers a test runs in-process, shown with `TEST_LOG=1` (nextest prints a
/// failing test's output); without it no subscriber is installed and nothing is formatted.
fn init_test_logs() {
    static LOGS: std::sync::Once = std::sync::Once::new();
    LOGS.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let filter = "debug,lapin=info,sqlx=info,aws_config=warn,aws_smithy_runtime=warn";
            // Kept for the life of the test process.
            std::mem::forget(labbook::telemetry::init(
                false,
                filter,
                std::io::stdout,
                None,
            ));
        }
    });
}

/// A test's own broker vhost and database, removed when dropped.
pub struct TestEnv {
    pub vhost: String,
    pub db_name: String,
    pub vars: HashMap<String, String>,
    pub key: SecretKey,
    shutdown: CancellationToken,
    apps: Vec<tokio::task::JoinHandle<()>>,
}

impl TestEnv {
    /// A fresh vhost and migrated database, with fast retry tiers.
    pub async fn new() -> Self {
        Self::with(&[]).await
    }

    pub async fn with(extra: &[(&str, &str)]) -> Self {
        let env = Self::unprepared(extra);
        env.create_database().await;
        env
    }

    /// Like [`TestEnv::with`], but the workers reach the database through a port where
    /// nothing listens yet: [`Relay::start`] on the returned port brings it back.
    pub async fn with_database_away(extra: &[(&str, &str)]) -> (Self, u16) {
        let port = free_port();
        let mut env = Self::with(extra).await;
        env.vars.insert(
            "DATABASE_URL".into(),
            format!("postgres://postgres@127.0.0.1:{port}/{}", env.db_name),
        );
        (env, port)
    }

    /// Settings only: no database is made (for start-up checks).
    pub fn unprepared(extra: &[(&str, &str)]) -> Self {
        init_test_logs();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let vhost = format!("labbook-test-{id}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let db_name = format!("labbook_test_{id}");
        let key_b64 = SecretKey::generate_base64();
        let mut vars: HashMap<String, String> = [
            ("AMQP_URL", amqp_urls(&vhost)),
            ("DATABASE_URL", format!("{}/{db_name}", pg_base())),
            ("LABBOOK_SECRET_KEY", key_b64.clone()),
            ("LABBOOK_RETRY_DELAYS_MS", "200,400".into()),
            ("LABBOOK_MAX_ATTEMPTS", "3".into()),
            ("LABBOOK_METRICS_ADDR", "off".into()),
            ("LABBOOK_SCHEDULER_TICK_MS", "100".into()),
            ("LABBOOK_SHUTDOWN_TIMEOUT_SECONDS", "10".into()),
            ("AWS_ENDPOINT_URL", moto_url()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("LABBOOK_AMI_ID", "ami-03cf127a".into()),
            ("LABBOOK_PROVISION_LEAD_SECONDS", "0".into()),
            ("SMTP_URL", smtp_url()),
            ("MAIL_FROM", "labbook@labbook.test".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        Self {
            vhost,
            db_name,
            vars,
            key: SecretKey::from_base64(&key_b64).unwrap(),
            shutdown: CancellationToken::new(),
            apps: Vec::new(),
        }
    }

    pub fn settings(&self) -> Settings {
        Settings::from_map(&self.vars).expect("test settings are valid")
    }

    pub fn amqp_url(&self) -> String {
        self.vars["AMQP_URL"].clone()
    }

    /// The test's database, reached directly (whatever the workers are given).
    pub fn database_url(&self) -> String {
        format!("{}/{}", pg_base(), self.db_name)
    }

    pub async fn create_database(&self) {
        let mut admin = PgConnection::connect(&format!("{}/postgres", pg_base()))
            .await
            .unwrap();
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                r#"CREATE DATABASE "{}""#,
                self.db_name
            )))
            .await
            .unwrap();
        Store::connect(&self.database_url())
            .await
            .unwrap()
            .migrate()
            .await
            .unwrap();
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.database_url()).await.unwrap()
    }

    /// Starts `workers` in this process.
    pub async fn spawn(&mut self, workers: &[Worker]) {
        self.spawn_with(workers, &[]).await;
    }

    /// Starts `workers` in this process with some settings changed; returns where the
    /// metrics endpoint listens, if it is on.
    pub async fn spawn_with(
        &mut self,
        workers: &[Worker],
        extra: &[(&str, &str)],
    ) -> Option<std::net::SocketAddr> {
        let mut vars = self.vars.clone();
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let settings = Settings::from_map(&vars).expect("test settings are valid");
        let app = Application::build(&settings, workers)
            .await
            .expect("workers build");
        let addr = app.http_addr();
        let stopped = self.shutdown.clone().cancelled_owned();
        self.apps.push(tokio::spawn(app.run_until_stopped(stopped)));
        addr
    }

    /// Stops the in-process workers and waits until they have drained; workers spawned
    /// afterwards run until the next stop.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        for app in self.apps.drain(..) {
            tokio::time::timeout(Duration::from_secs(30), app)
                .await
                .expect("workers stop")
                .unwrap();
        }
        self.shutdown = CancellationToken::new();
    }

    /// Handles every message waiting in the pipeline's queues (intake, scheduling, provisioning,
    /// emails), stage after stage with the same code the workers run, until a whole pass finds
    /// them all empty; returns how many it handled. A test proves that nothing else happens by
    /// draining, not by waiting. Messages waiting in a retry tier are not there yet: check
    /// [`TestEnv::retries_waiting`] too.
    pub async fn drain(&self) -> usize {
        use labbook::broker::run_until_empty;
        use labbook::stages::credentials::CredentialsStage;
        use labbook::stages::notifier::NotifierStage;
        use labbook::stages::provisioner::{ProvisionStage, Provisioner};
        use labbook::stages::scheduler::{LaunchPace, SchedulerStage};
        use std::sync::Arc;
        let settings = self.settings();
        let (store, key, broker) = (self.store().await, self.key.clone(), &settings.broker);
        let credentials = Arc::new(CredentialsStage::new(
            store.clone(),
            key.clone(),
            settings.rules,
            LaunchPace::from_settings(&settings),
        ));
        let scheduler = Arc::new(SchedulerStage::new(
            store.clone(),
            LaunchPace::from_settings(&settings),
        ));
        let ami = settings.require_ami_id().unwrap().to_owned();
        let ec2 = labbook::ec2::Ec2::new(settings.ec2.clone()).await;
        let provisioner =
            Provisioner::new(store.clone(), ec2, key.clone(), settings.ec2.clone(), ami);
        let watch = labbook::stages::provisioner::BootWatch::new(provisioner.clone());
        let provision = Arc::new(ProvisionStage(provisioner));
        let smtp = settings.smtp_url.expose_secret();
        let mailer = labbook::mail::Mailer::new(smtp, &settings.mail_from).unwrap();
        let bootstrap = settings.ec2.bootstrap;
        let relay = labbook::stages::relay::EventRelay::new(store.clone());
        let notifier = Arc::new(
            NotifierStage::new(store, key, mailer, bootstrap, &settings.mail_from)
                .with_https(&settings.ec2.https),
        );
        let mut total = 0;
        loop {
            let pass = run_until_empty(credentials.clone(), broker).await.unwrap()
                + run_until_empty(scheduler.clone(), broker).await.unwrap()
                + run_until_empty(provision.clone(), broker).await.unwrap()
                + labbook::broker::tick_until_idle(&watch, broker)
                    .await
                    .unwrap()
                + run_until_empty(notifier.clone(), broker).await.unwrap();
            // The events the stages recorded (they ask for no further work).
            labbook::broker::tick_until_idle(&relay, broker)
                .await
                .unwrap();
            if pass == 0 {
                return total;
            }
            total += pass;
        }
    }

    /// Messages waiting in any retry tier of any stage queue.
    pub async fn retries_waiting(&self) -> u32 {
        let topology = Topology::new(self.settings().broker.retry_delays);
        let mut n = 0;
        for name in topology
            .queue_names()
            .iter()
            .filter(|q| q.contains(".retry."))
        {
            n += self.depth(name).await;
        }
        n
    }

    /// Waits until the booking is stored in `state`.
    pub async fn wait_state(&self, booking_id: &str, state: &str) {
        let store = self.store().await;
        eventually(
            Duration::from_secs(30),
            &format!("booking {booking_id} {state}"),
            || async {
                let b = labbook::store::bookings::find(&store.pool, booking_id)
                    .await
                    .unwrap()?;
                (b.state.as_str() == state).then_some(())
            },
        )
        .await;
    }

    /// The settings' EC2 client (against the emulator).
    pub async fn ec2(&self) -> labbook::ec2::Ec2 {
        labbook::ec2::Ec2::new(self.settings().ec2).await
    }

    pub async fn channel(&self) -> (Connection, Channel) {
        let conn = connect(&self.amqp_url(), "labbook test").await.unwrap();
        let mut channel = conn.create_channel().await.unwrap();
        Topology::new(self.settings().broker.retry_delays)
            .declare(&conn, &mut channel)
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        (conn, channel)
    }

    /// Publishes raw bytes to a queue through the `labbook` exchange, as an upstream would.
    pub async fn publish_raw(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let (conn, channel) = self.channel().await;
        let confirm = channel
            .basic_publish(
                "labbook".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        conn.close(200, "done".into()).await.ok();
    }

    pub async fn publish_booking(&self, body: &str) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(format!("test-{}", uuid::Uuid::new_v4()).into());
        self.publish_raw("booking-created", body.as_bytes(), props)
            .await;
    }

    /// Takes (acks) up to `n` messages from `queue`, waiting at most `wait`.
    pub async fn take(
        &self,
        queue: &str,
        n: usize,
        wait: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let (conn, channel) = self.channel().await;
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            match channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                Some(msg) => {
                    msg.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .unwrap();
                    out.push(msg.delivery);
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        conn.close(200, "done".into()).await.ok();
        out
    }

    /// How many messages are ready in `queue` now.
    pub async fn depth(&self, queue: &str) -> u32 {
        let (conn, _) = self.channel().await;
        let n = labbook::broker::dlq::depth(&conn, queue).await.unwrap();
        conn.close(200, "done".into()).await.ok();
        n
    }

    /// Starts `workers` with every database query timing out while [`lock_bookings`] holds the
    /// bookings table: a failure that counts against the message's attempts.
    pub async fn spawn_with_queries_timing_out(&mut self, workers: &[Worker]) {
        let url = format!(
            "{}?options=-c%20statement_timeout%3D300",
            self.database_url()
        );
        self.spawn_with(workers, &[("DATABASE_URL", url.as_str())])
            .await;
    }

    /// Closes every broker connection of this test's vhost, as a broker restart would.
    pub fn drop_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "--vhost",
            &self.vhost,
            "labbook test: dropping connections",
        ]);
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = rabbitmqctl_command()
            .args(["delete_vhost", &self.vhost])
            .output();
        let _ = Command::new("psql")
            .args([
                &format!("{}/postgres", pg_base()),
                "-qc",
                &format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.db_name),
            ])
            .output();
    }
}

/// A valid booking body, `users` users, starting `hours_ahead` from now.
pub fn booking_json(id: &str, users: u32, hours_ahead: i64) -> String {
    booking_at(
        id,
        users,
        chrono::Utc::now() + chrono::Duration::hours(hours_ahead),
        180,
    )
}

/// A valid booking body at `at` for `minutes`.
pub fn booking_at(id: &str, users: u32, at: chrono::DateTime<chrono::Utc>, minutes: u32) -> String {
    serde_json::json!({
        "booking_id": id,
        "email": "trainer@example.org",
        "booking_time": at.to_rfc3339(),
        "number_of_users": users,
        "duration_minutes": minutes,
    })
    .to_string()
}

pub fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    labbook::broker::headers::str_header(&d.properties, name)
}

/// Polls `check` until it returns `Some`, or panics after `wait`.
pub async fn eventually<T, F, Fut>(wait: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + wait;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn attempts(d: &lapin::message::Delivery) -> Option<i64> {
    labbook::broker::headers::int_header(&d.properties, "x-labbook-attempts")
}

/// A unique booking id for a test (moto is shared by every test).
pub fn unique_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// The sink's list of emails: `TEST_MAILDEV_API`, else whichever of maildev's two paths
/// answers (`/email` in maildev 2.2, `/api/email` in some other 2.x releases).
pub async fn maildev_api() -> String {
    if let Ok(url) = std::env::var("TEST_MAILDEV_API") {
        return url;
    }
    for url in [
        "http://127.0.0.1:1080/email",
        "http://127.0.0.1:1080/api/email",
    ] {
        if reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return url.to_owned();
        }
    }
    panic!("maildev's API answers on neither /email nor /api/email at 127.0.0.1:1080")
}

pub fn smtp_url() -> String {
    std::env::var("TEST_SMTP_URL").unwrap_or_else(|_| "smtp://127.0.0.1:1025".into())
}

/// Emails the SMTP sink holds for `address`, oldest first.
pub async fn emails_to(address: &str) -> Vec<serde_json::Value> {
    let all: Vec<serde_json::Value> = reqwest::get(maildev_api().await)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    all.into_iter()
        .filter(|e| {
            e["to"]
                .as_array()
                .is_some_and(|to| to.iter().any(|t| t["address"] == address))
        })
        .collect()
}

/// Waits until the sink holds at least `n` emails for `address`.
pub async fn wait_emails(address: &str, n: usize) -> Vec<serde_json::Value> {
    eventually(
        Duration::from_secs(40),
        &format!("{n} emails to {address}"),
        || async {
            let got = emails_to(address).await;
            (got.len() >= n).then_some(got)
        },
    )
    .await
}

/// A valid booking body for `email`.
pub fn booking_for(
    id: &str,
    email: &str,
    users: u32,
    at: chrono::DateTime<chrono::Utc>,
    minutes: u32,
) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&booking_at(id, users, at, minutes)).unwrap();
    v["email"] = email.into();
    v.to_string()
}

/// A port on 127.0.0.1 where nothing listens (until a [`Relay`] does).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// Forwards TCP connections from a local port to `target`: a service "coming back".
pub struct Relay(tokio::task::JoinHandle<()>);

impl Relay {
    pub async fn start(port: u16, target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let target = target.to_owned();
        Self(tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// host:port of the PostgreSQL server the tests use.
pub fn pg_host_port() -> String {
    let base = pg_base();
    base.rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .to_owned()
}

/// Holds the bookings table locked, so a handler blocks on it, until the transaction ends.
pub async fn lock_bookings(env: &TestEnv) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let store = env.store().await;
    let mut tx = store.pool.begin().await.unwrap();
    tx.execute("LOCK TABLE bookings IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    tx
}

/// Waits until a query of the test's database waits for a lock (a worker blocked by
/// [`lock_bookings`]).
pub async fn wait_blocked_on_lock(env: &TestEnv) {
    let store = env.store().await;
    eventually(
        Duration::from_secs(20),
        "a query waiting for the lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&store.pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
}

/// Publishes `{"booking_id": …}` to `queue`, as the scheduler (or a replayed message) would.
pub async fn publish_ref(env: &TestEnv, queue: &str, booking_id: &str) {
    let body = serde_json::to_vec(&labbook::domain::BookingRef {
        booking_id: booking_id.into(),
        revision: None,
    })
    .unwrap();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    env.publish_raw(queue, &body, props).await;
}

/// The emails (their `RCPT TO` lines) a [`scripted_smtp`] server accepted.
pub type Accepted = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A small SMTP server on 127.0.0.1:`port` whose answer to the n-th `RCPT` (from 0) is
/// `rcpt(n)`, as relays that refuse (5xx) or defer (4xx) do; it keeps what it accepts.
pub async fn scripted_smtp(
    port: u16,
    rcpt: fn(usize) -> &'static [u8],
) -> (tokio::task::JoinHandle<()>, Accepted) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let accepted = Accepted::default();
    let rcpts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let kept = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (kept, rcpts) = (kept.clone(), rcpts.clone());
            tokio::spawn(smtp_session(stream, rcpt, rcpts, kept));
        }
    });
    (task, accepted)
}

async fn smtp_session(
    stream: tokio::net::TcpStream,
    rcpt: fn(usize) -> &'static [u8],
    rcpts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accepted: Accepted,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"220 scripted.test ESMTP\r\n").await;
    let (mut to, mut in_data) = (String::new(), false);
    while let Ok(Some(line)) = lines.next_line().await {
        if in_data {
            if line == "." {
                in_data = false;
                accepted.lock().unwrap().push(to.clone());
                let _ = write.write_all(b"250 2.0.0 queued\r\n").await;
            }
            continue;
        }
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 scripted.test\r\n",
            "MAIL" | "RSET" | "NOOP" => b"250 OK\r\n",
            "RCPT" => {
                to = line.clone();
                rcpt(rcpts.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
            }
            "DATA" => {
                in_data = true;
                b"354 go ahead\r\n"
            }
            "QUIT" => b"221 bye\r\n",
            _ => b"500 5.5.1 not understood\r\n",
        };
        if write.write_all(reply).await.is_err() || verb == "QUIT" {
            break;
        }
    }
}

/// The sum of the samples of `name` on a worker's `/metrics` at `addr` whose labels include
/// every one of `labels`.
pub async fn metric(addr: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the stage consuming `stage` has waited `n` times for a dependency that is down
/// (`labbook_messages_total{outcome="waiting"}` on the metrics endpoint at `addr`): a message
/// that waited more times than its attempts allow and is not dead-lettered was not charged
/// for them. No fixed sleep: the count says when.
pub async fn wait_waiting(addr: Option<std::net::SocketAddr>, stage: &str, n: u32) {
    let addr = addr.expect("the workers' metrics endpoint is on");
    let labels = [("stage", stage), ("outcome", "waiting")];
    eventually(
        Duration::from_secs(60),
        &format!("{n} waits at {stage}"),
        || async move {
            (metric(addr, "labbook_messages_total", &labels).await >= f64::from(n)).then_some(())
        },
    )
    .await
}

/// Metrics on a port of its own, for [`wait_waiting`].
pub const METRICS_ON: (&str, &str) = ("LABBOOK_METRICS_ADDR", "127.0.0.1:0");

/// The offering a test's machines launch as by default (`t3.small`, the default VPC).
pub fn default_offering() -> labbook::ec2::Offering {
    labbook::ec2::Offering {
        instance_type: "t3.small".into(),
        subnet_id: None,
    }
}
