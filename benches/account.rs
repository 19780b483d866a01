//! Figures for one account's worth of bookings (issue 8), with the four workers as separate
//! processes (the built `labbook-*` binaries) against the real services of this machine:
//! RabbitMQ, PostgreSQL and the moto EC2 emulator (`scripts/services.sh`). Emails go to a small
//! SMTP sink inside this program, which notes when each one arrives (maildev's API is slow
//! with thousands of emails). It prints figures; it asserts nothing about speed.
//!
//!     cargo bench --bench account
//!
//! 1. 200 bookings × 3 users published at once, straight to moto with the client-side rate
//!    limits `off`: bookings/s, latency from publish to each email, EC2 calls per booking,
//!    idle and peak memory of each worker process.
//! 2. moto's own `RunInstances` rate, called directly (200 calls, 8 at a time).
//! 3. 30 bookings × 4 users (60 machines) through a proxy that throttles like EC2 (the one of
//!    `tests/api/throttling.rs`), with the default rate limits: the time to the last instance
//!    details email against the bucket's minimum, and throttled `RunInstances` per accepted.
//!
//! 4. Boot mode (`cargo bench --bench account -- boot`, alone): 300 bookings × 2 users due at
//!    once through the same proxy, which reports each machine ready on its live console 60 s
//!    after its launch; one provisioner replica. The last instance details email against the
//!    ideal (the boot after the bucket's launches: 60 + (launches − 5) / 2 s), EC2 calls per
//!    action per machine, console reads per machine per minute of boot, the provisioner's RSS.
//!
//! Each scenario has its own vhost and database, like the tests. Workers' logs are kept in
//! `$CARGO_TARGET_DIR/account-bench/<scenario>/`. Every address is on 127.0.0.1.

#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;

#[allow(dead_code, unused_imports)]
#[path = "../tests/api/throttling.rs"]
mod throttling;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use helpers::{TestEnv, booking_for, free_port, raw_ec2, unique_id};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use throttling::ThrottlingProxy;

const AMI: &str = "ami-03cf127a";
const CONFIRMATION: &str = "Booking Confirmation";
const DETAILS: &str = "JupyterHub Access Information";
const FAILURE: &str = "Booking Failed";

// ---------------------------------------------------------------------------------------------
// An SMTP sink that notes when each email arrives.

#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    to: String,
    subject: String,
}

type Inbox = Arc<Mutex<Vec<Received>>>;

struct Sink {
    url: String,
    inbox: Inbox,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start() -> Self {
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let inbox = Inbox::default();
        let kept = inbox.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(smtp_session(stream, kept.clone()));
            }
        });
        Self {
            url: format!("smtp://127.0.0.1:{port}"),
            inbox,
            task,
        }
    }

    fn emails(&self) -> Vec<Received> {
        self.inbox.lock().unwrap().clone()
    }

    fn count(&self, subject: &str) -> usize {
        self.inbox
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.subject == subject)
            .count()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn smtp_session(stream: tokio::net::TcpStream, inbox: Inbox) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"220 sink.bench ESMTP\r\n").await;
    let (mut to, mut subject) = (Vec::<String>::new(), String::new());
    let (mut in_data, mut in_headers) = (false, false);
    while let Ok(Some(line)) = lines.next_line().await {
        if in_data {
            if line == "." {
                in_data = false;
                let at = Instant::now();
                inbox
                    .lock()
                    .unwrap()
                    .extend(to.drain(..).map(|rcpt| Received {
                        at,
                        to: rcpt,
                        subject: subject.clone(),
                    }));
                if write.write_all(b"250 2.0.0 queued\r\n").await.is_err() {
                    break;
                }
            } else if in_headers {
                if line.is_empty() {
                    in_headers = false;
                } else if let Some(value) = line
                    .get(..8)
                    .filter(|h| h.eq_ignore_ascii_case("subject:"))
                    .and_then(|_| line.get(8..))
                {
                    subject = value.trim().to_owned();
                }
            }
            continue;
        }
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 sink.bench\r\n",
            "MAIL" | "RSET" => {
                to.clear();
                b"250 OK\r\n"
            }
            "NOOP" => b"250 OK\r\n",
            "RCPT" => {
                let addr = line
                    .split_once('<')
                    .and_then(|(_, r)| r.split_once('>'))
                    .map_or("", |(a, _)| a);
                to.push(addr.to_ascii_lowercase());
                b"250 OK\r\n"
            }
            "DATA" => {
                (in_data, in_headers) = (true, true);
                subject.clear();
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

// ---------------------------------------------------------------------------------------------
// The workers, as processes.

const WORKERS: [(&str, &str); 4] = [
    ("credentials", env!("CARGO_BIN_EXE_labbook-credentials")),
    ("scheduler", env!("CARGO_BIN_EXE_labbook-scheduler")),
    ("provisioner", env!("CARGO_BIN_EXE_labbook-provisioner")),
    ("notifier", env!("CARGO_BIN_EXE_labbook-notifier")),
];

struct Proc {
    name: &'static str,
    child: Child,
    metrics_port: u16,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of `/proc/<pid>/status` in MiB (`VmRSS`, `VmHWM`).
    fn memory_mib(&self, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics_port)
    }

    /// SIGTERM, then at most 20 s to drain, then SIGKILL.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "  {} did not stop within 20 s of SIGTERM: killed",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A scenario's vhost and database (removed when dropped) and its worker processes.
struct Scenario {
    env: TestEnv,
    logs: PathBuf,
    workers: Vec<Proc>,
}

impl Scenario {
    /// A fresh vhost and database with the production defaults (retry tiers, timer tick) except
    /// what `extra` sets; `labbook migrate` and `labbook topology` run first.
    async fn new(name: &str, extra: &[(&str, &str)]) -> Self {
        let mut env = TestEnv::unprepared(&[]);
        for knob in [
            "LABBOOK_RETRY_DELAYS_MS",
            "LABBOOK_MAX_ATTEMPTS",
            "LABBOOK_METRICS_ADDR",
            "LABBOOK_SCHEDULER_TICK_MS",
        ] {
            env.vars.remove(knob);
        }
        for (k, v) in extra {
            env.vars.insert((*k).to_owned(), (*v).to_owned());
        }
        let logs =
            PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
                .join("account-bench")
                .join(name);
        std::fs::create_dir_all(&logs).unwrap();
        let scenario = Self {
            env,
            logs,
            workers: Vec::new(),
        };
        for verb in ["migrate", "topology"] {
            let out = scenario
                .command(env!("CARGO_BIN_EXE_labbook"))
                .arg(verb)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "labbook {verb}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        scenario
    }

    /// A command with only the scenario's environment (and `PATH`, `HOME`).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear();
        for keep in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.envs(&self.env.vars)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        cmd
    }

    /// Starts the four workers and waits until each answers `/readyz`.
    async fn start_workers(&mut self) {
        for (name, bin) in WORKERS {
            let port = free_port();
            let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
            let child = self
                .command(bin)
                .env("LABBOOK_METRICS_ADDR", format!("127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            self.workers.push(Proc {
                name,
                child,
                metrics_port: port,
            });
        }
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        for w in &mut self.workers {
            loop {
                if let Ok(Some(status)) = w.child.try_wait() {
                    panic!(
                        "{} exited at start-up ({status}); see {}",
                        w.name,
                        self.logs.display()
                    );
                }
                let ready = http
                    .get(w.url("/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    break;
                }
                assert!(Instant::now() < deadline, "{} not ready after 90 s", w.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Every worker's counters summed: (metric, labels) -> value.
    async fn metrics(&self) -> BTreeMap<(String, String), f64> {
        let mut out = BTreeMap::new();
        for w in &self.workers {
            let Ok(resp) = reqwest::get(w.url("/metrics")).await else {
                continue;
            };
            let text = resp.text().await.unwrap_or_default();
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let Some((series, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let (name, labels) = series
                    .split_once('{')
                    .map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
                let value: f64 = value.parse().unwrap_or(0.0);
                *out.entry((name.to_owned(), labels.to_owned()))
                    .or_insert(0.0) += value;
            }
        }
        out
    }

    fn stop_workers(&mut self) {
        for w in &mut self.workers {
            w.stop();
        }
    }

    /// Publishes every booking on one channel, as fast as the broker confirms; returns when
    /// each was published.
    async fn publish(&self, bookings: &[(String, String)]) -> HashMap<String, Instant> {
        let conn = labbook::broker::connect(&self.env.amqp_url(), "labbook account bench")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut at = HashMap::new();
        let mut confirms = Vec::new();
        for (id, body) in bookings {
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(format!("bench-{id}").into());
            at.insert(id.clone(), Instant::now());
            confirms.push(
                channel
                    .basic_publish(
                        "labbook".into(),
                        "booking-created".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        body.as_bytes(),
                        props,
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            assert!(
                confirm.await.unwrap().is_ack(),
                "a booking was not confirmed"
            );
        }
        let first = at.values().min().copied().unwrap_or_else(Instant::now);
        println!(
            "  published {} bookings, all confirmed by the broker {:.2} s after the first",
            bookings.len(),
            first.elapsed().as_secs_f64()
        );
        conn.close(200, "done".into()).await.ok();
        at
    }

    /// Messages in every dead-letter queue.
    async fn dead_letters(&self) -> u32 {
        let mut n = 0;
        for q in labbook::broker::StageQueue::ALL {
            n += self.env.depth(&format!("{}.dlq", q.name())).await;
        }
        n
    }

    /// The instances labbook recorded, terminated at moto directly (teardown is an hour away),
    /// so they do not pile up in the emulator.
    async fn terminate_instances(&self) {
        let store = self.env.store().await;
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT instance_id FROM slots WHERE instance_id IS NOT NULL")
                .fetch_all(&store.pool)
                .await
                .unwrap_or_default();
        store.pool.close().await;
        terminate(&ids).await;
    }
}

async fn terminate(ids: &[String]) {
    let ec2 = raw_ec2().await;
    for chunk in ids.chunks(100) {
        let _ = ec2
            .terminate_instances()
            .set_instance_ids(Some(chunk.to_vec()))
            .send()
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// (p50, p99) by nearest rank, in seconds.
fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.50), rank(0.99))
}

/// `labbook_ec2_calls_total` between two scrapes: operation -> (outcome -> calls).
fn ec2_calls(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for ((name, labels), v) in after {
        if name != "labbook_ec2_calls_total" {
            continue;
        }
        let n = v - before
            .get(&(name.clone(), labels.clone()))
            .copied()
            .unwrap_or(0.0);
        if n < 0.5 {
            continue;
        }
        let op = label(labels, "operation");
        let outcome = label(labels, "outcome");
        *out.entry(op).or_default().entry(outcome).or_default() += n.round() as u64;
    }
    out
}

/// Messages per stage and outcome other than `done` (retries, waits, dead letters).
fn not_done(after: &BTreeMap<(String, String), f64>) -> Vec<String> {
    after
        .iter()
        .filter(|((name, labels), v)| {
            name == "labbook_messages_total" && label(labels, "outcome") != "done" && **v > 0.0
        })
        .map(|((_, labels), v)| {
            format!(
                "{} {} {v}",
                label(labels, "stage"),
                label(labels, "outcome")
            )
        })
        .collect()
}

fn label(labels: &str, key: &str) -> String {
    labels
        .split(&format!("{key}=\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_owned()
}

fn calls_line(calls: &BTreeMap<String, BTreeMap<String, u64>>, per: f64) -> String {
    calls
        .iter()
        .map(|(op, outcomes)| {
            let total: u64 = outcomes.values().sum();
            let extra: Vec<String> = outcomes
                .iter()
                .filter(|(o, _)| o.as_str() != "ok")
                .map(|(o, n)| format!("{n} {o}"))
                .collect();
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(" [{}]", extra.join(", "))
            };
            format!("{op} {:.2}{extra}", total as f64 / per)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many instances moto holds: (all, running). Lists them all (slow when it holds many).
async fn moto_instances() -> (usize, usize) {
    let ec2 = raw_ec2().await;
    let (mut all, mut running, mut token) = (0, 0, None);
    loop {
        let Ok(out) = ec2.describe_instances().set_next_token(token).send().await else {
            return (all, running);
        };
        for i in out.reservations().iter().flat_map(|r| r.instances()) {
            all += 1;
            if helpers::state_of(i) == "running" {
                running += 1;
            }
        }
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            return (all, running);
        }
    }
}

struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, what: impl Into<String>, figure: impl Into<String>) {
        self.0.push((what.into(), figure.into()));
    }

    fn print(&self) {
        let width = self.0.iter().map(|(w, _)| w.len()).max().unwrap_or(0);
        println!("\n{:-<1$}", "", width + 40);
        for (what, figure) in &self.0 {
            println!("{what:<width$}  {figure}");
        }
        println!("{:-<1$}", "", width + 40);
    }
}

/// Waits until `n` bookings have their instance details (or failure) email, at most `limit`;
/// prints progress every 10 s. Whether all arrived.
async fn wait_for_details(scenario: &Scenario, sink: &Sink, n: usize, limit: Duration) -> bool {
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        let (details, failures) = (sink.count(DETAILS), sink.count(FAILURE));
        if details + failures >= n {
            return true;
        }
        if started.elapsed() > limit {
            println!("  gave up after {} s", limit.as_secs());
            return false;
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            let m = scenario.metrics().await;
            let run = m
                .iter()
                .filter(|((name, labels), _)| {
                    name == "labbook_ec2_calls_total" && labels.contains("RunInstances")
                })
                .map(|(_, v)| *v)
                .sum::<f64>();
            println!(
                "  after {:.0} s: {} confirmations, {details} instance details, {failures} failures; {run} RunInstances",
                started.elapsed().as_secs_f64(),
                sink.count(CONFIRMATION)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

/// Bookings for a run: (id, body), each to its own address.
fn bookings(prefix: &str, n: usize, users: u32) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let body = booking_for(&id, &address(&id), users, Utc::now(), 60);
            (id, body)
        })
        .collect()
}

fn address(booking_id: &str) -> String {
    format!("{}@bench.test", booking_id.to_ascii_lowercase())
}

/// Seconds from each booking's publish to its first email with `subject`.
fn latencies(emails: &[Received], published: &HashMap<String, Instant>, subject: &str) -> Vec<f64> {
    let mut first: HashMap<&str, Instant> = HashMap::new();
    for e in emails.iter().filter(|e| e.subject == subject) {
        first.entry(e.to.as_str()).or_insert(e.at);
    }
    published
        .iter()
        .filter_map(|(id, at)| {
            first
                .get(address(id).as_str())
                .map(|got| got.duration_since(*at).as_secs_f64())
        })
        .collect()
}

async fn many_bookings(table: &mut Table, n: usize, users: u32) -> Option<f64> {
    println!("\n[1] {n} bookings × {users} users at once, straight to moto, rate limits off");
    let sink = Sink::start().await;
    let mut scenario = Scenario::new(
        "many",
        &[
            ("SMTP_URL", sink.url.as_str()),
            ("LABBOOK_EC2_RATE_RUN_INSTANCES", "off"),
            ("LABBOOK_EC2_RATE_DESCRIBE_INSTANCES", "off"),
            ("LABBOOK_EC2_RATE_TERMINATE_INSTANCES", "off"),
        ],
    )
    .await;
    scenario.start_workers().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle: Vec<f64> = scenario
        .workers
        .iter()
        .map(|w| w.memory_mib("VmRSS:"))
        .collect();
    let before = scenario.metrics().await;

    let list = bookings(&unique_id("acct"), n, users);
    let published = scenario.publish(&list).await;
    let first = published.values().min().copied().unwrap();
    let complete = wait_for_details(&scenario, &sink, n, Duration::from_secs(900)).await;

    let after = scenario.metrics().await;
    let peak: Vec<f64> = scenario
        .workers
        .iter()
        .map(|w| w.memory_mib("VmHWM:"))
        .collect();
    let emails = sink.emails();
    let dead = scenario.dead_letters().await;
    let busy = not_done(&after);
    scenario.stop_workers();
    scenario.terminate_instances().await;

    let confirmations = latencies(&emails, &published, CONFIRMATION);
    let details = latencies(&emails, &published, DETAILS);
    let failures = emails.iter().filter(|e| e.subject == FAILURE).count();
    let last = emails
        .iter()
        .filter(|e| e.subject == DETAILS)
        .map(|e| e.at)
        .max();
    let secs = last.map_or(f64::NAN, |l| l.duration_since(first).as_secs_f64());
    let instances = n * users.div_ceil(2) as usize;
    let rate = details.len() as f64 / secs;
    let (c50, c99) = percentiles(confirmations.clone());
    let (d50, d99) = percentiles(details.clone());
    let calls = ec2_calls(&before, &after);
    let run_ok = calls
        .get("RunInstances")
        .and_then(|o| o.get("ok"))
        .copied()
        .unwrap_or(0);

    let t = format!("[1] {n}×{users} users, moto direct, rate limits off");
    table.row(
        format!("{t}: bookings/s"),
        format!(
            "{rate:.2} bookings/s ({} of {n} instance details emails in {secs:.1} s, first publish to last email; {:.1} instances/s){}",
            details.len(),
            run_ok as f64 / secs,
            if complete { "" } else { " INCOMPLETE" }
        ),
    );
    table.row(
        format!("{t}: publish → confirmation"),
        format!(
            "p50 {c50:.2} s, p99 {c99:.2} s ({} emails)",
            confirmations.len()
        ),
    );
    table.row(
        format!("{t}: publish → instance details"),
        format!("p50 {d50:.2} s, p99 {d99:.2} s ({} emails)", details.len()),
    );
    table.row(
        format!("{t}: EC2 calls per booking"),
        calls_line(&calls, n as f64),
    );
    table.row(
        format!("{t}: instances"),
        format!("{run_ok} RunInstances ok for {instances} machines"),
    );
    for (i, w) in scenario.workers.iter().enumerate() {
        table.row(
            format!("{t}: memory, {}", w.name),
            format!("idle RSS {:.1} MiB, peak RSS {:.1} MiB", idle[i], peak[i]),
        );
    }
    table.row(
        format!("{t}: failures, dead letters"),
        format!("{failures} failure emails, {dead} dead letters"),
    );
    table.row(
        format!("{t}: messages not done at once"),
        if busy.is_empty() {
            "none".to_owned()
        } else {
            busy.join(", ")
        },
    );
    complete.then_some(run_ok as f64 / secs)
}

async fn moto_direct(table: &mut Table, calls: usize, concurrency: usize, labbook: Option<f64>) {
    println!("\n[2] moto alone: {calls} RunInstances, {concurrency} at a time");
    let ec2 = raw_ec2().await;
    let tag = unique_id("acct-direct");
    let started = Instant::now();
    let results: Vec<Result<String, String>> = futures_util::stream::iter(0..calls)
        .map(|_| {
            let ec2 = ec2.clone();
            let tag = tag.clone();
            async move {
                use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
                let out = ec2
                    .run_instances()
                    .image_id(AMI)
                    .instance_type(InstanceType::T3Small)
                    .min_count(1)
                    .max_count(1)
                    .tag_specifications(
                        TagSpecification::builder()
                            .resource_type(ResourceType::Instance)
                            .tags(Tag::builder().key("labbook:bench").value(tag).build())
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                Ok::<String, String>(
                    out.instances()
                        .first()
                        .and_then(|i| i.instance_id())
                        .unwrap_or_default()
                        .to_owned(),
                )
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let ids: Vec<String> = results.iter().filter_map(|r| r.clone().ok()).collect();
    let errors = results.len() - ids.len();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        println!("  first error: {e}");
    }
    terminate(&ids).await;
    let rate = ids.len() as f64 / secs;
    table.row(
        format!("[2] moto alone: {calls} RunInstances, {concurrency} at a time"),
        format!(
            "{rate:.1} RunInstances/s ({} ok, {errors} errors, {secs:.1} s); labbook in [1]: {}",
            ids.len(),
            labbook.map_or("n/a".to_owned(), |l| format!(
                "{l:.1} instances/s = {:.0} % of moto's",
                100.0 * l / rate
            ))
        ),
    );
}

async fn burst(table: &mut Table, n: usize, users: u32) {
    let machines = n * users.div_ceil(2) as usize;
    let minimum = (machines as f64 - 5.0) / 2.0;
    println!(
        "\n[3] {n} bookings × {users} users ({machines} machines) through EC2's buckets, default rate limits"
    );
    let proxy = ThrottlingProxy::start().await;
    let sink = Sink::start().await;
    let mut scenario = Scenario::new(
        "burst",
        &[
            ("SMTP_URL", sink.url.as_str()),
            ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ],
    )
    .await;
    scenario.start_workers().await;
    let before = scenario.metrics().await;
    let list = bookings(&unique_id("acct-burst"), n, users);
    let published = scenario.publish(&list).await;
    let first = published.values().min().copied().unwrap();
    let complete = wait_for_details(&scenario, &sink, n, Duration::from_secs(300)).await;
    let after = scenario.metrics().await;
    let peak: Vec<(String, f64)> = scenario
        .workers
        .iter()
        .map(|w| (w.name.to_owned(), w.memory_mib("VmHWM:")))
        .collect();
    let emails = sink.emails();
    let dead = scenario.dead_letters().await;
    let busy = not_done(&after);
    scenario.stop_workers();
    scenario.terminate_instances().await;

    let details = latencies(&emails, &published, DETAILS);
    let failures = emails.iter().filter(|e| e.subject == FAILURE).count();
    let secs = emails
        .iter()
        .filter(|e| e.subject == DETAILS)
        .map(|e| e.at)
        .max()
        .map_or(f64::NAN, |l| l.duration_since(first).as_secs_f64());
    let (run_ok, run_throttled) = proxy.counts("RunInstances");
    let (d50, d99) = percentiles(details.clone());
    let calls = ec2_calls(&before, &after);

    let t = format!("[3] {n}×{users} users ({machines} machines) through EC2's buckets (5/2)");
    table.row(
        format!("{t}: to last instance details"),
        format!(
            "{secs:.1} s vs the bucket's minimum {minimum:.1} s = ×{:.2} ({} of {n} emails){}",
            secs / minimum,
            details.len(),
            if complete { "" } else { " INCOMPLETE" }
        ),
    );
    table.row(
        format!("{t}: publish → instance details"),
        format!("p50 {d50:.2} s, p99 {d99:.2} s"),
    );
    table.row(
        format!("{t}: RunInstances at the proxy"),
        format!(
            "{run_ok} accepted, {run_throttled} throttled = {:.3} throttled per accepted",
            run_throttled as f64 / run_ok.max(1) as f64
        ),
    );
    table.row(format!("{t}: all calls at the proxy"), proxy.summary());
    table.row(
        format!("{t}: EC2 calls per booking (labbook)"),
        calls_line(&calls, n as f64),
    );
    table.row(
        format!("{t}: failures, dead letters"),
        format!("{failures} failure emails, {dead} dead letters"),
    );
    table.row(
        format!("{t}: messages not done at once"),
        if busy.is_empty() {
            "none".to_owned()
        } else {
            busy.join(", ")
        },
    );
    table.row(
        format!("{t}: peak RSS"),
        peak.iter()
            .map(|(w, m)| format!("{w} {m:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

async fn boot(table: &mut Table, n: usize, boot_s: u64) {
    let machines = n; // 2 users per booking, 2 per machine
    let ideal = boot_s as f64 + (machines as f64 - 5.0) / 2.0;
    println!(
        "\n[4] boot mode: {n} bookings × 2 users ({machines} machines), each ready {boot_s} s after its launch, EC2's buckets"
    );
    let proxy = ThrottlingProxy::start().await;
    proxy.boot_machines_after(Duration::from_secs(boot_s));
    let sink = Sink::start().await;
    let expected = boot_s.to_string();
    let mut scenario = Scenario::new(
        "boot",
        &[
            ("SMTP_URL", sink.url.as_str()),
            ("AWS_ENDPOINT_URL", proxy.url.as_str()),
            ("LABBOOK_READINESS", "bootstrap"),
            ("LABBOOK_EXPECTED_BOOT_SECONDS", expected.as_str()),
        ],
    )
    .await;
    scenario.start_workers().await;
    let list = bookings(&unique_id("acct-boot"), n, 2);
    let published = scenario.publish(&list).await;
    let first = published.values().min().copied().unwrap();
    let limit = Duration::from_secs_f64(ideal * 3.0 + 120.0);
    let complete = wait_for_details(&scenario, &sink, n, limit).await;
    let peak: Vec<(String, f64)> = scenario
        .workers
        .iter()
        .map(|w| (w.name.to_owned(), w.memory_mib("VmHWM:")))
        .collect();
    let emails = sink.emails();
    let dead = scenario.dead_letters().await;
    scenario.stop_workers();
    scenario.terminate_instances().await;

    let failures = emails.iter().filter(|e| e.subject == FAILURE).count();
    let details = latencies(&emails, &published, DETAILS);
    let last = emails
        .iter()
        .filter(|e| e.subject == DETAILS)
        .map(|e| e.at)
        .max()
        .map_or(f64::NAN, |l| l.duration_since(first).as_secs_f64());
    let (live, buffered) = proxy.console_reads();
    let per_machine = |calls: u64| calls as f64 / machines as f64;
    let t = format!("[4] boot {boot_s} s, {n}×2 users ({machines} machines), 1 provisioner");
    table.row(
        format!("{t}: to last instance details"),
        format!(
            "{last:.1} s vs the ideal {ideal:.1} s = ×{:.2} ({} of {n} emails){}",
            last / ideal,
            details.len(),
            if complete { "" } else { " INCOMPLETE" }
        ),
    );
    let (d50, d99) = percentiles(details);
    table.row(
        format!("{t}: publish → instance details"),
        format!("p50 {d50:.1} s, p99 {d99:.1} s"),
    );
    let calls: Vec<String> = proxy
        .actions()
        .iter()
        .map(|a| format!("{a} {:.2}", per_machine(proxy.counts(a).0)))
        .collect();
    table.row(format!("{t}: EC2 calls per machine"), calls.join(", "));
    table.row(
        format!("{t}: console reads per machine per minute of boot"),
        format!(
            "{:.2} (live {live}, buffered {buffered})",
            per_machine(live + buffered) / (boot_s as f64 / 60.0)
        ),
    );
    table.row(
        format!("{t}: failures, dead letters"),
        format!("{failures} failure emails, {dead} dead letters"),
    );
    table.row(
        format!("{t}: peak RSS"),
        peak.iter()
            .map(|(w, m)| format!("{w} {m:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "boot") {
        let started = Instant::now();
        let mut table = Table(Vec::new());
        boot(&mut table, 300, 60).await;
        table.row(
            "whole run",
            format!("{:.0} s", started.elapsed().as_secs_f64()),
        );
        table.print();
        return;
    }
    let started = Instant::now();
    println!(
        "labbook account benchmark: workers as processes ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut table = Table(Vec::new());
    let (all, running) = moto_instances().await;
    println!("moto holds {all} instances ({running} running) at the start");
    table.row(
        "moto at the start",
        format!("{all} instances ({running} running)"),
    );

    let labbook = many_bookings(&mut table, 200, 3).await;
    moto_direct(&mut table, 200, 8, labbook).await;
    burst(&mut table, 30, 4).await;

    let (all, running) = moto_instances().await;
    table.row(
        "moto at the end",
        format!("{all} instances ({running} running)"),
    );
    table.row(
        "whole run",
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    );
    table.print();
}
