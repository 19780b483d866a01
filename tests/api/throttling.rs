//! EC2's request rate: a proxy in front of the emulator throttles like EC2 (a token bucket per
//! API action, `RequestLimitExceeded` when empty), and labbook's shared client-side rate limit
//! keeps a burst of bookings under it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::Response;
use labbook::broker::{StageQueue, run_stage, run_ticking};
use labbook::ec2::Ec2Error;
use labbook::ec2::rate::{RateLimit, RateLimiter, RateLimits};
use labbook::health::Readiness;
use labbook::stages::provisioner::{BootWatch, ProvisionStage, Provisioner};
use labbook::startup::Worker;
use labbook::store::Store;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestEnv, booking_json, free_port, moto_url, unique_id};

/// EC2's buckets per action (burst, refill per second); other actions are not limited.
const EC2_BUCKETS: [(&str, f64, f64); 4] = [
    ("RunInstances", 5.0, 2.0),
    ("DescribeInstances", 100.0, 20.0),
    ("TerminateInstances", 100.0, 5.0),
    ("GetConsoleOutput", 100.0, 20.0),
];

/// What EC2 buffered of a machine's console shortly after it started: the boot's first lines,
/// never a report the bootstrap writes minutes later. Only `Latest=true` returns the live output.
pub const BUFFERED_CONSOLE: &str = "[    0.000000] Linux version 6.8.0-1012-aws (buildd@lcy02-amd64-050)\n[    3.1] Cloud-init v. 25.1 running 'init-local'\n";

/// The live console of a machine booting, and once its bootstrap reported success.
pub const BOOTING_CONSOLE: &str = "[    3.1] Cloud-init v. 25.1 running 'init-local'\n";
pub const READY_CONSOLE: &str = "[    3.1] Cloud-init v. 25.1 running 'init-local'\n[  58.2] cloud-init[901]: labbook-bootstrap: ok\n";

const INTERNAL_ERROR_BODY: &str = "<Response><Errors><Error><Code>InternalError</Code><Message>An internal error has occurred.</Message></Error></Errors><RequestID>x</RequestID></Response>";

const THROTTLED_BODY: &str = "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>x</RequestID></Response>";

#[derive(Default)]
struct ProxyState {
    /// Tokens left and when they were counted, per action.
    buckets: HashMap<String, (f64, Instant)>,
    /// Calls forwarded and calls throttled, per action.
    counts: HashMap<String, (u64, u64)>,
    /// How many of the next `RunInstances` calls get a 500 (EC2 failing, not throttling).
    fail_run_instances: u32,
    /// How many of the next `RunInstances` calls launch their machine but lose the answer
    /// (labbook sees a 500).
    lose_run_answers: u32,
    /// `RunInstances` of these (instance type, subnet or any) answered with (HTTP status, code).
    refusals: Vec<(String, Option<String>, u16, String)>,
    /// The body of every `RunInstances` call, in order.
    run_bodies: Vec<Vec<u8>>,
    /// What the live console (`GetConsoleOutput` with `Latest=true`) answers, per instance,
    /// else `console_default`, else the boot clock's, else moto's.
    console: HashMap<String, String>,
    console_default: Option<String>,
    /// With a boot clock: every machine launched through the proxy reports success on its live
    /// console this long after its launch.
    boot_after: Option<Duration>,
    /// When each machine was launched through the proxy.
    launched: HashMap<String, (Instant, chrono::DateTime<chrono::Utc>)>,
    /// EC2 refuses `Latest=true` (an instance type not on Nitro): the buffered copy is then
    /// what the live console would say.
    refuse_latest: bool,
    /// `GetConsoleOutput` calls answered: (with `Latest=true`, without).
    console_reads: (u64, u64),
    /// What Service Quotas answers for the vCPU quota (`GetServiceQuota`); `None`: moto's
    /// answer (it knows no EC2 quota).
    vcpu_quota: Option<f64>,
}

/// An HTTP proxy to the EC2 emulator that throttles like EC2.
pub struct ThrottlingProxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

type Shared = (Arc<Mutex<ProxyState>>, reqwest::Client, String);

impl ThrottlingProxy {
    pub async fn start() -> Self {
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let shared: Shared = (state.clone(), reqwest::Client::new(), moto_url());
        let app = axum::Router::new().fallback(forward).with_state(shared);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            state,
            task,
        }
    }

    /// Service Quotas gives the account this vCPU quota (its applied value).
    pub fn set_vcpu_quota(&self, vcpus: f64) {
        self.state.lock().unwrap().vcpu_quota = Some(vcpus);
    }

    /// Answers the next `n` `RunInstances` calls with EC2's `500 InternalError`.
    pub fn fail_next_run_instances(&self, n: u32) {
        self.state.lock().unwrap().fail_run_instances = n;
    }

    /// The next `n` `RunInstances` calls launch their machine, and labbook gets a 500 instead
    /// of the answer: a launch whose outcome it cannot know.
    pub fn lose_next_run_instances_answers(&self, n: u32) {
        self.state.lock().unwrap().lose_run_answers = n;
    }

    /// Answers `RunInstances` of `instance_type` (in `subnet`, or in any) with EC2's error
    /// `code` and HTTP `status` (`InsufficientInstanceCapacity` comes as a 500).
    pub fn refuse_run_instances(
        &self,
        instance_type: &str,
        subnet: Option<&str>,
        status: u16,
        code: &str,
    ) {
        self.state.lock().unwrap().refusals.push((
            instance_type.to_owned(),
            subnet.map(str::to_owned),
            status,
            code.to_owned(),
        ));
    }

    /// `GetConsoleOutput` of every instance answers `text` (unless set per instance).
    pub fn set_console_default(&self, text: &str) {
        self.state.lock().unwrap().console_default = Some(text.to_owned());
    }

    /// `GetConsoleOutput` of `instance_id` answers `text`.
    pub fn set_console(&self, instance_id: &str, text: &str) {
        let mut state = self.state.lock().unwrap();
        state
            .console
            .insert(instance_id.to_owned(), text.to_owned());
    }

    /// Every machine launched through the proxy reports success on its live console `after`
    /// its launch (unless its console is scripted).
    pub fn boot_machines_after(&self, after: Duration) {
        self.state.lock().unwrap().boot_after = Some(after);
    }

    /// Answers `Latest=true` with EC2's refusal for an instance type not on Nitro.
    pub fn refuse_latest_console(&self) {
        self.state.lock().unwrap().refuse_latest = true;
    }

    /// `GetConsoleOutput` calls answered: (live, buffered).
    pub fn console_reads(&self) -> (u64, u64) {
        self.state.lock().unwrap().console_reads
    }

    /// When `instance_id` was launched through the proxy.
    pub fn launched_at(&self, instance_id: &str) -> Option<Instant> {
        let state = self.state.lock().unwrap();
        state.launched.get(instance_id).map(|(at, _)| *at)
    }

    /// The body of every `RunInstances` call the proxy saw, in order.
    pub fn run_instances_bodies(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().run_bodies.clone()
    }

    /// (accepted, throttled) for `action`.
    pub fn counts(&self, action: &str) -> (u64, u64) {
        let state = self.state.lock().unwrap();
        state.counts.get(action).copied().unwrap_or_default()
    }

    /// `Action: accepted/throttled`, for every action seen.
    pub fn summary(&self) -> String {
        self.actions()
            .iter()
            .map(|a| {
                let (ok, throttled) = self.counts(a);
                format!("{a}: {ok}/{throttled}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn actions(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let mut out: Vec<String> = state.counts.keys().cloned().collect();
        out.sort();
        out
    }
}

impl Drop for ThrottlingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a call of `action` may go through now (and counts it).
fn admit(state: &Mutex<ProxyState>, action: &str) -> bool {
    let mut state = state.lock().unwrap();
    let admitted = match EC2_BUCKETS.iter().find(|(a, _, _)| *a == action) {
        None => true,
        Some(&(_, burst, rate)) => {
            let now = Instant::now();
            let (tokens, at) = state
                .buckets
                .entry(action.to_owned())
                .or_insert((burst, now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
            *at = now;
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                true
            } else {
                false
            }
        }
    };
    let counts = state.counts.entry(action.to_owned()).or_default();
    if admitted {
        counts.0 += 1;
    } else {
        counts.1 += 1;
    }
    admitted
}

const UNSUPPORTED_LATEST_BODY: &str = "<Response><Errors><Error><Code>UnsupportedOperation</Code><Message>The latest console output is only available on Nitro instances.</Message></Error></Errors><RequestID>x</RequestID></Response>";

/// EC2's answer to `GetConsoleOutput` as EC2 documents it: without `Latest=true` the copy
/// buffered after the machine's start ([`BUFFERED_CONSOLE`]); with it, the live output the test
/// scripted or the boot clock gives. `None`: nothing scripted, moto answers.
fn console_answer(state: &Mutex<ProxyState>, body: &[u8]) -> Option<Response> {
    let form = String::from_utf8_lossy(body).into_owned();
    let instance = form
        .split('&')
        .find_map(|pair| pair.strip_prefix("InstanceId="))?
        .to_owned();
    let latest = form.split('&').any(|pair| pair == "Latest=true");
    let mut state = state.lock().unwrap();
    let now = chrono::Utc::now();
    let clock = state.launched.get(&instance).copied();
    let live = match (
        state.console.get(&instance),
        &state.console_default,
        state.boot_after,
    ) {
        (Some(text), _, _) | (None, Some(text), _) => Some((text.clone(), now)),
        (None, None, Some(after)) => clock.map(|(at, wall)| {
            if at.elapsed() >= after {
                let written = wall + chrono::Duration::from_std(after).unwrap();
                (READY_CONSOLE.to_owned(), written)
            } else {
                (BOOTING_CONSOLE.to_owned(), wall)
            }
        }),
        (None, None, None) => None,
    }?;
    if latest {
        state.console_reads.0 += 1;
    } else {
        state.console_reads.1 += 1;
    }
    let (text, written) = match (latest, state.refuse_latest) {
        (true, true) => {
            return Some(
                Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .header("content-type", "text/xml;charset=UTF-8")
                    .body(Body::from(UNSUPPORTED_LATEST_BODY))
                    .unwrap(),
            );
        }
        (true, false) | (false, true) => live,
        (false, false) => (
            BUFFERED_CONSOLE.to_owned(),
            clock.map_or(now, |(_, wall)| wall),
        ),
    };
    Some(console_xml(&instance, &text, written))
}

fn console_xml(instance: &str, text: &str, written: chrono::DateTime<chrono::Utc>) -> Response {
    use base64::Engine;
    let output = base64::engine::general_purpose::STANDARD.encode(text);
    let timestamp = written.format("%Y-%m-%dT%H:%M:%S%.3fZ");
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>x</requestId><instanceId>{instance}</instanceId><timestamp>{timestamp}</timestamp><output>{output}</output></GetConsoleOutputResponse>"#
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Body::from(xml))
        .unwrap()
}

/// The error a scripted refusal answers a `RunInstances` call with, if one matches.
fn refusal(state: &Mutex<ProxyState>, body: &[u8]) -> Option<Response> {
    let form = String::from_utf8_lossy(body).into_owned();
    let field = |name: &str| {
        form.split('&')
            .find_map(|pair| pair.strip_prefix(name))
            .map(str::to_owned)
    };
    let (kind, subnet) = (field("InstanceType=")?, field("SubnetId="));
    let state = state.lock().unwrap();
    let (_, _, status, code) = state
        .refusals
        .iter()
        .find(|(t, s, _, _)| *t == kind && (s.is_none() || *s == subnet))?;
    let xml = format!(
        "<Response><Errors><Error><Code>{code}</Code><Message>We currently do not have sufficient {kind} capacity in the Availability Zone you requested.</Message></Error></Errors><RequestID>x</RequestID></Response>"
    );
    Some(
        Response::builder()
            .status(*status)
            .header("content-type", "text/xml;charset=UTF-8")
            .body(Body::from(xml))
            .unwrap(),
    )
}

/// Notes when each instance in a `RunInstances` answer was launched (the boot clock).
fn note_launches(state: &Mutex<ProxyState>, answer: &[u8]) {
    let text = String::from_utf8_lossy(answer);
    let mut state = state.lock().unwrap();
    for piece in text.split("<instanceId>").skip(1) {
        if let Some((id, _)) = piece.split_once("</instanceId>") {
            state
                .launched
                .entry(id.to_owned())
                .or_insert((Instant::now(), chrono::Utc::now()));
        }
    }
}

/// The `Action` of an EC2 query-protocol request (`Action=RunInstances&...`).
fn action_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|pair| pair.strip_prefix("Action="))
        .unwrap_or("Unknown")
        .to_owned()
}

/// Service Quotas' answer to `GetServiceQuota` (JSON protocol) with the scripted quota.
fn quota_answer(state: &Mutex<ProxyState>, parts: &axum::http::request::Parts) -> Option<Response> {
    let target = parts.headers.get("x-amz-target")?.to_str().ok()?;
    if target != "ServiceQuotasV20190624.GetServiceQuota" {
        return None;
    }
    let value = state.lock().unwrap().vcpu_quota?;
    let json = serde_json::json!({"Quota": {
        "ServiceCode": "ec2", "QuotaCode": "L-1216C47A", "Value": value, "Unit": "None",
        "QuotaName": "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
        "Adjustable": true, "GlobalQuota": false,
    }});
    Some(
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/x-amz-json-1.1")
            .body(Body::from(json.to_string()))
            .unwrap(),
    )
}

/// moto refuses snapshot tags in `CreateImage` (`NotImplementedError`), which EC2 takes: the
/// proxy sends moto the image's tags only and returns the snapshots' tags, to put on the
/// image's snapshots once moto made them, as EC2 does.
fn take_snapshot_tags(body: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    let prefixes: Vec<String> = pairs
        .iter()
        .filter(|(k, v)| {
            k.starts_with("TagSpecification.") && k.ends_with(".ResourceType") && v == "snapshot"
        })
        .map(|(k, _)| k.trim_end_matches("ResourceType").to_owned())
        .collect();
    if prefixes.is_empty() {
        return (body.to_vec(), Vec::new());
    }
    let mut tags: std::collections::BTreeMap<String, (String, String)> = Default::default();
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in &pairs {
        let Some(rest) = prefixes.iter().find_map(|p| k.strip_prefix(p.as_str())) else {
            kept.append_pair(k, v);
            continue;
        };
        if let Some(tag) = rest.strip_prefix("Tag.") {
            if let Some(n) = tag.strip_suffix(".Key") {
                tags.entry(n.to_owned()).or_default().0 = v.clone();
            } else if let Some(n) = tag.strip_suffix(".Value") {
                tags.entry(n.to_owned()).or_default().1 = v.clone();
            }
        }
    }
    (kept.finish().into_bytes(), tags.into_values().collect())
}

/// Tags the snapshots of the image in moto's `CreateImage` answer.
async fn tag_snapshots(answer: &[u8], tags: &[(String, String)]) {
    let text = String::from_utf8_lossy(answer);
    let Some(image_id) = text
        .split_once("<imageId>")
        .and_then(|(_, rest)| rest.split_once("</imageId>"))
        .map(|(id, _)| id.to_owned())
    else {
        return;
    };
    let ec2 = crate::helpers::raw_ec2().await;
    let images = ec2
        .describe_images()
        .image_ids(&image_id)
        .send()
        .await
        .unwrap();
    let snapshots: Vec<String> = images
        .images()
        .iter()
        .flat_map(|i| i.block_device_mappings())
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
        .collect();
    if snapshots.is_empty() {
        return;
    }
    let tags = tags
        .iter()
        .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
        .collect();
    ec2.create_tags()
        .set_resources(Some(snapshots))
        .set_tags(Some(tags))
        .send()
        .await
        .unwrap();
}

async fn forward(State((state, client, target)): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20).await.unwrap();
    if let Some(answer) = quota_answer(&state, &parts) {
        return answer;
    }
    let action = action_of(&body);
    let (body, snapshot_tags) = if action == "CreateImage" {
        let (body, tags) = take_snapshot_tags(&body);
        (axum::body::Bytes::from(body), tags)
    } else {
        (body, Vec::new())
    };
    if action == "RunInstances"
        && let Some(refusal) = refusal(&state, &body)
    {
        return refusal;
    }
    if action == "RunInstances" {
        let mut state = state.lock().unwrap();
        state.run_bodies.push(body.to_vec());
        if state.fail_run_instances > 0 {
            state.fail_run_instances -= 1;
            return Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .header("content-type", "text/xml;charset=UTF-8")
                .body(Body::from(INTERNAL_ERROR_BODY))
                .unwrap();
        }
    }
    if !admit(&state, &action) {
        return Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("content-type", "text/xml;charset=UTF-8")
            .body(Body::from(THROTTLED_BODY))
            .unwrap();
    }
    if action == "GetConsoleOutput"
        && let Some(answer) = console_answer(&state, &body)
    {
        return answer;
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut outgoing = client.request(method, format!("{target}{path}"));
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            outgoing = outgoing.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = match outgoing.body(body).send().await {
        Ok(answer) => answer,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(e.to_string()))
                .unwrap();
        }
    };
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            response = response.header(
                HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
                value.as_bytes(),
            );
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    if action == "CreateImage" && !snapshot_tags.is_empty() {
        tag_snapshots(&bytes, &snapshot_tags).await;
    }
    if action == "RunInstances" {
        note_launches(&state, &bytes);
        let mut state = state.lock().unwrap();
        if state.lose_run_answers > 0 {
            state.lose_run_answers -= 1;
            return Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .header("content-type", "text/xml;charset=UTF-8")
                .body(Body::from(INTERNAL_ERROR_BODY))
                .unwrap();
        }
    }
    response.body(Body::from(bytes)).unwrap()
}

/// One provisioner replica (provision-due only) whose EC2 client takes its tokens from the
/// database's shared buckets.
async fn spawn_provisioner_replica(
    env: &TestEnv,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let settings = env.settings();
    let store = Store::connect_lazy(&env.database_url(), 20).unwrap();
    let ec2 = labbook::ec2::Ec2::with_pool(settings.ec2.clone(), store.pool.clone()).await;
    let provisioner = Provisioner::new(
        store,
        ec2,
        env.key.clone(),
        settings.ec2.clone(),
        settings.ec2.ami_id.clone().unwrap(),
    );
    let readiness = Readiness::default();
    let watch = BootWatch::new(provisioner.clone());
    let (broker, tick, watching) = (
        settings.broker.clone(),
        settings.ec2.watch_tick,
        stop.clone(),
    );
    let ready = readiness.register("boot watch");
    tokio::spawn(async move {
        run_ticking("boot watch", &watch, &broker, tick, ready, watching).await;
    });
    tokio::spawn(run_stage(
        Arc::new(ProvisionStage(provisioner)),
        settings.broker.clone(),
        readiness.register("provisioner"),
        stop,
    ))
}

#[tokio::test]
async fn the_proxy_throttles_like_ec2() {
    let proxy = ThrottlingProxy::start().await;
    let env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_EC2_RATE_DESCRIBE_INSTANCES", "off"),
    ])
    .await;
    // 150 calls at once, without labbook's limit: EC2's burst is 100. The SDK retries the
    // throttled ones; any still throttled is an Unavailable error, never another kind.
    let ec2 = env.ec2().await;
    let ids = vec!["i-00000000000000000".to_owned()];
    let calls = (0..150).map(|_| ec2.describe(&ids));
    let results = futures_util::future::join_all(calls).await;
    let (accepted, throttled) = proxy.counts("DescribeInstances");
    assert!(accepted >= 100, "{accepted} accepted");
    assert!(throttled > 0, "none throttled");
    for r in results {
        if let Err(e) = r {
            assert!(matches!(e, Ec2Error::Unavailable { .. }), "{e:?}");
        }
    }
}

#[tokio::test]
async fn replicas_share_the_databases_bucket() {
    let env = TestEnv::new().await;
    let limits = RateLimits {
        run_instances: Some(RateLimit::new(3, 10.0)),
        ..RateLimits::off()
    };
    // Two replicas, each with its own pool.
    let a = RateLimiter::shared(limits.clone(), env.store().await.pool);
    let b = RateLimiter::shared(limits, env.store().await.pool);
    let started = Instant::now();
    let takes = (0..13).map(|i| {
        let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            limiter.acquire("RunInstances").await.unwrap();
            started.elapsed()
        }
    });
    let mut at = futures_util::future::join_all(takes).await;
    at.sort();
    // 3 at once, then 10 at 10 per second: the last one after about 1 s, none early.
    assert!(at[2] < Duration::from_millis(500), "{at:?}");
    for (k, t) in at.iter().enumerate().skip(3) {
        let due = Duration::from_millis(100 * (k as u64 - 2));
        assert!(
            *t + Duration::from_millis(5) >= due,
            "call {k} at {t:?}: {at:?}"
        );
    }
    assert!(at[12] < Duration::from_secs(3), "{at:?}");
}

#[tokio::test]
async fn the_limit_waits_out_a_database_outage_as_unavailable() {
    let url = format!("postgres://postgres@127.0.0.1:{}/none", free_port());
    let store = Store::connect_lazy(&url, 1).unwrap();
    let limiter = RateLimiter::shared(RateLimits::default(), store.pool);
    let err = limiter.acquire("RunInstances").await.unwrap_err();
    assert!(matches!(err, Ec2Error::Unavailable { .. }), "{err:?}");
    // An action without a limit does not need the database.
    limiter.acquire("CreateSecurityGroup").await.unwrap();
}

/// 30 bookings of 4 users (60 instances) due at once, provisioned by two replicas through a
/// proxy that throttles like EC2: all get their machines, none fails, and the shared limit
/// keeps throttled `RunInstances` calls rare.
#[tokio::test]
async fn a_burst_of_bookings_is_provisioned_within_ec2s_rate() {
    const BOOKINGS: usize = 30;
    let proxy = ThrottlingProxy::start().await;
    let mut env = TestEnv::with(&[("AWS_ENDPOINT_URL", proxy.url.as_str())]).await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Notifier])
        .await;
    let stop = CancellationToken::new();
    let replicas = [
        spawn_provisioner_replica(&env, stop.clone()).await,
        spawn_provisioner_replica(&env, stop.clone()).await,
    ];
    let store = env.store().await;

    let prefix = unique_id("burst");
    let ids: Vec<String> = (0..BOOKINGS).map(|i| format!("{prefix}-{i}")).collect();
    let bodies: Vec<String> = ids.iter().map(|id| booking_json(id, 4, 0)).collect();
    let started = Instant::now();
    futures_util::future::join_all(bodies.iter().map(|b| env.publish_booking(b))).await;

    let deadline = started + Duration::from_secs(60);
    let count = |state: &'static str| {
        let pool = store.pool.clone();
        let prefix = format!("{prefix}-%");
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM bookings WHERE booking_id LIKE $1 AND state = $2",
            )
            .bind(prefix)
            .bind(state)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let mut report = Instant::now();
    loop {
        let (done, failed) = (count("provisioned").await, count("failed").await);
        assert_eq!(failed, 0, "a booking failed");
        if done == BOOKINGS as i64 {
            break;
        }
        if report.elapsed() >= Duration::from_secs(5) || Instant::now() >= deadline {
            report = Instant::now();
            println!(
                "after {:.0} s: {done} provisioned; {}",
                started.elapsed().as_secs_f64(),
                proxy.summary()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {BOOKINGS} bookings provisioned after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();

    let (run_ok, run_throttled) = proxy.counts("RunInstances");
    println!(
        "{BOOKINGS} bookings, {} instances provisioned in {:.1} s (RunInstances bucket alone: at least {:.1} s)",
        BOOKINGS * 2,
        elapsed.as_secs_f64(),
        (BOOKINGS as f64 * 2.0 - 5.0) / 2.0
    );
    for action in proxy.actions() {
        let (ok, throttled) = proxy.counts(&action);
        println!("  {action}: {ok} accepted, {throttled} throttled");
    }

    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM emails WHERE kind = 'failure'")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(failures, 0, "a failure email");
    for q in StageQueue::ALL {
        let dlq = format!("{}.dlq", q.name());
        assert_eq!(env.depth(&dlq).await, 0, "{dlq} is not empty");
    }
    let instances: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT instance_id) FROM slots WHERE booking_id LIKE $1",
    )
    .bind(format!("{prefix}-%"))
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!(instances, BOOKINGS as i64 * 2);
    assert_eq!(
        run_ok,
        BOOKINGS as u64 * 2,
        "one RunInstances call per instance"
    );
    assert!(
        run_throttled as f64 <= 0.5 * run_ok as f64,
        "{run_throttled} RunInstances throttled for {run_ok} accepted"
    );

    stop.cancel();
    for r in replicas {
        tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .expect("replicas stop")
            .unwrap();
    }
    env.stop().await;
}

#[tokio::test]
async fn a_retried_launch_sends_byte_identical_parameters() {
    // EC2 fails the first five RunInstances: three tries in one attempt, then the message waits
    // and a new attempt renders the user-data again from the database and tries again.
    let proxy = ThrottlingProxy::start().await;
    proxy.fail_next_run_instances(5);
    let mut env = TestEnv::with(&[
        ("AWS_ENDPOINT_URL", proxy.url.as_str()),
        ("LABBOOK_RETRY_DELAYS_MS", "100,200"),
        ("LABBOOK_MAX_ATTEMPTS", "2"),
    ])
    .await;
    env.spawn(&[Worker::Credentials, Worker::Scheduler, Worker::Provisioner])
        .await;
    let id = unique_id("same-params");
    env.publish_booking(&booking_json(&id, 2, -1)).await;
    env.wait_state(&id, "provisioned").await;
    env.stop().await;

    let bodies = proxy.run_instances_bodies();
    assert_eq!(bodies.len(), 6, "five failed tries, then the launch");
    let first = String::from_utf8_lossy(&bodies[0]).into_owned();
    assert!(
        first.contains("ClientToken=") && first.contains("UserData="),
        "{first}"
    );
    for (i, body) in bodies.iter().enumerate() {
        assert!(
            body == &bodies[0],
            "RunInstances #{i} differs from the first"
        );
    }
    assert_eq!(
        crate::helpers::instances_for(&id).await.len(),
        1,
        "one machine"
    );
}
