//! EC2 behind a narrow client: the handful of calls labbook makes, with errors sorted into
//! permanent and transient. Tested against an EC2 API emulator through `AWS_ENDPOINT_URL`.
//! Every call first takes a token from its action's client-side rate limit ([`rate`]).

mod group;
pub mod images;
pub mod intent;
pub mod quota;
pub mod rate;
pub mod userdata;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceType, ResourceType, Tag, TagSpecification,
};
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::broker::StageError;
use crate::config::Ec2Settings;
use rate::RateLimiter;

pub const TAG_BOOKING: &str = "labbook:booking-id";
pub const TAG_SLOT: &str = "labbook:slot";
/// The slot's launch generation the instance was launched for (absent: generation 0, launched
/// before the tag existed).
pub const TAG_GENERATION: &str = "labbook:generation";
pub const TAG_MANAGED: &str = "labbook:managed";
/// The labbook installation (`LABBOOK_INSTALLATION`) that launched the instance.
pub const TAG_INSTALLATION: &str = "labbook:installation";
/// The installation that also owns managed instances without [`TAG_INSTALLATION`] (launched
/// before installations had their own tag).
pub const DEFAULT_INSTALLATION: &str = "default";
/// The security group labbook finds or creates when none is configured.
pub const SECURITY_GROUP_NAME: &str = "labbook-lab";

/// An EC2 failure, sorted for the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// Will not change on retry: a missing AMI or subnet, a bad parameter, no permission, a
    /// `ClientToken` reused with other parameters.
    #[error("EC2 refused {operation}: {code}: {message}")]
    Permanent {
        operation: &'static str,
        code: String,
        message: String,
    },
    /// May pass on its own: no capacity for the instance type now.
    #[error("EC2 {operation} failed for now: {detail}")]
    Transient {
        operation: &'static str,
        detail: String,
    },
    /// EC2 has no capacity for this offering now (the instance type in the subnet's zone): the
    /// next offering is tried.
    #[error("EC2 has no capacity for {operation} now: {detail}")]
    Capacity {
        operation: &'static str,
        detail: String,
    },
    /// The account's vCPU quota for running On-Demand instances is used up
    /// (`VcpuLimitExceeded`): machines of earlier bookings must end, or AWS raise the quota.
    #[error("EC2 refused {operation}: the account's vCPU quota is used up: {detail}")]
    Quota {
        operation: &'static str,
        detail: String,
    },
    /// EC2 is pushing back or out of reach: the account's request rate is used up
    /// (`RequestLimitExceeded`), EC2 answers 5xx, or the endpoint does not answer in time.
    /// Waited out; never a reason to fail a booking.
    #[error("EC2 {operation} is unavailable for now: {detail}")]
    Unavailable {
        operation: &'static str,
        detail: String,
    },
}

impl Ec2Error {
    pub fn is_permanent(&self) -> bool {
        matches!(self, Ec2Error::Permanent { .. })
    }

    fn code(&self) -> Option<&str> {
        match self {
            Ec2Error::Permanent { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether EC2 said the account's bucket for the action is empty.
    fn is_throttling(&self) -> bool {
        match self {
            Ec2Error::Unavailable { detail, .. } => THROTTLING_CODES.iter().any(|code| {
                detail
                    .strip_prefix(code)
                    .is_some_and(|r| r.starts_with(':'))
            }),
            _ => false,
        }
    }
}

/// The codes of an empty request-rate bucket.
const THROTTLING_CODES: &[&str] = &["RequestLimitExceeded", "Throttling", "ThrottlingException"];

/// Throttled answers in a row that one call waits through (each after the bucket's refill)
/// before it is given up for now; the message then waits in a delay queue, attempts untouched.
const MAX_THROTTLED: u32 = 10;

/// Tries of a call that gets no answer or a 5xx (after 0.5 s, then 1 s).
const MAX_UNAVAILABLE_TRIES: u32 = 3;

impl From<Ec2Error> for StageError {
    fn from(err: Ec2Error) -> Self {
        match err {
            Ec2Error::Permanent { .. } => StageError::Permanent(err.to_string()),
            Ec2Error::Transient { .. } | Ec2Error::Capacity { .. } => {
                StageError::Transient(err.into())
            }
            Ec2Error::Unavailable { .. } | Ec2Error::Quota { .. } => {
                StageError::Unavailable(err.into())
            }
        }
    }
}

/// Error codes of an account or a service pushing back: waited out, never counted.
const BACKPRESSURE_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "Unavailable",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "RequestTimeout",
];

/// Error codes of an offering (an instance type in a zone) that cannot be had now: another
/// subnet or type may serve. EC2 answers some of them with a 5xx, so they are sorted first.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
];

/// The account's vCPU quota is used up.
const QUOTA_CODES: &[&str] = &["VcpuLimitExceeded", "InstanceLimitExceeded"];

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    operation: &'static str,
    err: SdkError<E, HttpResponse>,
) -> Ec2Error {
    let (outcome, err) = match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown").to_owned();
            let detail = format!("{code}: {}", e.message().unwrap_or(""));
            // A 5xx is EC2 (or a proxy in front of it) failing, whatever its body says.
            let server_error = service.raw().status().is_server_error();
            if CAPACITY_CODES.contains(&code.as_str()) {
                ("capacity", Ec2Error::Capacity { operation, detail })
            } else if QUOTA_CODES.contains(&code.as_str()) {
                ("quota", Ec2Error::Quota { operation, detail })
            } else if server_error
                || BACKPRESSURE_CODES.contains(&code.as_str())
                || code.starts_with("Internal")
            {
                ("throttled", Ec2Error::Unavailable { operation, detail })
            } else {
                let message = e.message().unwrap_or("").to_owned();
                let err = Ec2Error::Permanent {
                    operation,
                    code,
                    message,
                };
                ("permanent", err)
            }
        }
        _ => {
            // No answer: a time-out, a refused connection, a broken response.
            let detail =
                std::error::Error::source(&err).map_or_else(|| err.to_string(), |s| s.to_string());
            ("unreachable", Ec2Error::Unavailable { operation, detail })
        }
    };
    metrics::counter!("labbook_ec2_calls_total", "operation" => operation, "outcome" => outcome)
        .increment(1);
    err
}

/// Names the EC2 call series at 0 at start-up (see [`crate::health`]).
pub fn register_metrics() {
    metrics::describe_counter!(
        "labbook_ec2_calls_total",
        "EC2 API calls, by operation and outcome"
    );
    metrics::describe_counter!(
        "labbook_machine_seconds_total",
        "Running time of the machines this installation terminated (launch to termination)"
    );
    metrics::counter!("labbook_machine_seconds_total").increment(0);
    metrics::describe_counter!(
        "labbook_ec2_quota_exceeded_total",
        "Launches EC2 refused because the account's vCPU quota was used up"
    );
    metrics::counter!("labbook_ec2_quota_exceeded_total").increment(0);
    metrics::describe_counter!(
        "labbook_ec2_rate_limited_total",
        "EC2 calls that waited for a token of the shared rate limit"
    );
    metrics::describe_counter!(
        "labbook_ec2_rate_wait_milliseconds_total",
        "Time EC2 calls waited for a token"
    );
    for operation in [
        "RunInstances",
        "DescribeInstances",
        "TerminateInstances",
        "GetConsoleOutput",
    ] {
        metrics::counter!("labbook_ec2_rate_limited_total", "operation" => operation).increment(0);
        metrics::counter!("labbook_ec2_rate_wait_milliseconds_total", "operation" => operation)
            .increment(0);
        for outcome in [
            "ok",
            "throttled",
            "transient",
            "capacity",
            "quota",
            "permanent",
            "unreachable",
        ] {
            metrics::counter!("labbook_ec2_calls_total", "operation" => operation, "outcome" => outcome)
                .increment(0);
        }
    }
}

fn ok(operation: &'static str) {
    metrics::counter!("labbook_ec2_calls_total", "operation" => operation, "outcome" => "ok")
        .increment(1);
}

/// The states of an instance that may still run, or run again.
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// A DescribeInstances filter on the tag `key`.
fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// What labbook knows of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    pub state: String,
    pub public_dns: Option<String>,
    pub public_ip: Option<String>,
    pub slot: Option<i32>,
    /// The slot's launch generation it was launched for (see [`TAG_GENERATION`]).
    pub generation: i32,
    pub booking_id: Option<String>,
    pub installation: Option<String>,
    /// What it was launched as, where: recorded for a machine adopted after a crash.
    pub image_id: Option<String>,
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
}

impl InstanceInfo {
    pub fn is_gone(&self) -> bool {
        matches!(self.state.as_str(), "shutting-down" | "terminated")
    }

    /// Whether `installation` owns the instance: its tag says so, or it has none and this is
    /// the default installation.
    pub fn belongs_to(&self, installation: &str) -> bool {
        self.installation.as_deref().unwrap_or(DEFAULT_INSTALLATION) == installation
    }

    pub fn is_ready(&self) -> bool {
        self.state == "running" && (self.public_dns.is_some() || self.public_ip.is_some())
    }
}

fn info(i: &aws_sdk_ec2::types::Instance) -> Option<InstanceInfo> {
    let non_empty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    Some(InstanceInfo {
        instance_id: i.instance_id()?.to_owned(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map_or("unknown".into(), |n| n.as_str().to_owned()),
        public_dns: non_empty(i.public_dns_name()),
        public_ip: non_empty(i.public_ip_address()),
        slot: tag(i, TAG_SLOT).and_then(|v| v.parse().ok()),
        generation: tag(i, TAG_GENERATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        booking_id: tag(i, TAG_BOOKING).map(str::to_owned),
        installation: tag(i, TAG_INSTALLATION).map(str::to_owned),
        image_id: non_empty(i.image_id()),
        instance_type: i.instance_type().map(|t| t.as_str().to_owned()),
        subnet_id: non_empty(i.subnet_id()),
    })
}

fn tag<'a>(i: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// EC2's most instance ids in one `DescribeInstances`.
pub const DESCRIBE_MAX_IDS: usize = 1000;

/// A machine's console as `GetConsoleOutput` answered it.
#[derive(Debug, Clone, Default)]
pub struct ConsoleOutput {
    pub text: String,
    /// When EC2 says the output was last updated.
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Ec2Error {
    /// Whether EC2 refused the live console for the instance's type (not on Nitro): the
    /// buffered copy is all there is. Any refusal other than an unknown instance counts.
    pub fn refuses_latest_console(&self) -> bool {
        matches!(self, Ec2Error::Permanent { code, .. } if !code.starts_with("InvalidInstanceID"))
    }
}

/// Where a machine is launched: an instance type, in a subnet (its zone) or wherever the
/// default VPC chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offering {
    pub instance_type: String,
    pub subnet_id: Option<String>,
}

impl std::fmt::Display for Offering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.subnet_id {
            Some(subnet) => write!(f, "{} in {subnet}", self.instance_type),
            None => f.write_str(&self.instance_type),
        }
    }
}

/// One instance to launch.
#[derive(Debug, Clone)]
pub struct LaunchRequest<'a> {
    pub booking_id: &'a str,
    pub slot: i32,
    /// The slot's launch generation (0 for its first machine).
    pub generation: i32,
    /// cloud-init user-data (holds password hashes only).
    pub user_data: &'a str,
    /// Where: the instance type and subnet.
    pub offering: &'a Offering,
    /// The offering's place in the configured order (0: the first), part of the `ClientToken`.
    pub offering_index: usize,
}

/// The `ClientToken` for a booking's slot in a launch generation of an installation: EC2
/// returns the same instance for the same token, so a retried launch never makes a second
/// machine, a new generation makes a new one, and two installations sharing an account never
/// get each other's. (The default installation's first generation keeps the tokens of the
/// machines launched before generations and installations existed; an offering after the first
/// adds its place, since a token names one request's parameters.)
pub fn client_token(
    installation: &str,
    booking_id: &str,
    (slot, generation): (i32, i32),
    offering_index: usize,
) -> String {
    let mut seed = match generation {
        0 => format!("{booking_id}/{slot}"),
        g => format!("{booking_id}/{slot}/g{g}"),
    };
    if offering_index > 0 {
        // Another offering is another request: EC2 would refuse a token reused with it.
        seed = format!("{seed}/o{offering_index}");
    }
    if installation != DEFAULT_INSTALLATION {
        // `|` is in neither an installation name nor a booking id: no two seeds collide.
        seed = format!("{installation}|{seed}");
    }
    let digest = Sha256::digest(seed.as_bytes());
    let hex: String = digest.iter().take(24).map(|b| format!("{b:02x}")).collect();
    format!("labbook-{hex}")
}

/// The EC2 calls labbook makes.
#[derive(Debug, Clone)]
pub struct Ec2 {
    client: Client,
    /// Service Quotas, for the account's vCPU quota ([`quota`]).
    quotas: aws_sdk_servicequotas::Client,
    settings: Ec2Settings,
    security_groups: std::sync::Arc<OnceCell<Vec<String>>>,
    limiter: RateLimiter,
}

impl Ec2 {
    /// A client from the standard AWS chain, with the region, endpoint and static credentials
    /// of `settings` where they are set. Its rate limits (`settings.rate_limits`) are kept in
    /// this process only: right for one process, tools and tests; the provisioner uses
    /// [`Ec2::with_pool`].
    pub async fn new(settings: Ec2Settings) -> Self {
        let limiter = RateLimiter::local(settings.rate_limits.clone());
        Self::build(settings, limiter).await
    }

    /// Like [`Ec2::new`], with the rate limits kept in the database, so that every replica
    /// calling EC2 for the account shares them.
    pub async fn with_pool(settings: Ec2Settings, pool: sqlx::PgPool) -> Self {
        let limiter = RateLimiter::shared(settings.rate_limits.clone(), pool);
        Self::build(settings, limiter).await
    }

    async fn build(settings: Ec2Settings, limiter: RateLimiter) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some((id, secret)) = &settings.static_credentials {
            use secrecy::ExposeSecret;
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                id.clone(),
                secret.expose_secret().to_owned(),
                None,
                None,
                "labbook-settings",
            ));
        }
        // Every call is bounded. Retries are labbook's ([`Ec2::call`]): each try takes a token
        // from the shared rate limit. (The SDK's adaptive mode has a rate limiter of its own,
        // per process: after one throttled call it held a whole process far below EC2's rate.)
        loader = loader
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .operation_attempt_timeout(std::time::Duration::from_secs(20))
                    .operation_timeout(std::time::Duration::from_secs(60))
                    .build(),
            )
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1));
        let config = loader.load().await;
        Self {
            client: Client::new(&config),
            quotas: aws_sdk_servicequotas::Client::new(&config),
            settings,
            security_groups: Default::default(),
            limiter,
        }
    }

    /// Makes one EC2 call of `action`: each try takes a token from the action's rate limit
    /// first. When EC2 says the account's bucket is empty, the limiter's bucket is emptied too
    /// (every replica then waits for the refill) and the call tried again; no answer or a 5xx
    /// is tried again after a short pause.
    async fn call<T, F, Fut>(&self, action: &'static str, send: F) -> Result<T, Ec2Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Ec2Error>>,
    {
        self.call_ranked(action, None, send).await
    }

    /// [`Ec2::call`] whose tokens of the shared rate limit go to the earliest `rank` first.
    async fn call_ranked<T, F, Fut>(
        &self,
        action: &'static str,
        rank: Option<chrono::DateTime<chrono::Utc>>,
        mut send: F,
    ) -> Result<T, Ec2Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Ec2Error>>,
    {
        let (mut throttled, mut unavailable) = (0, 1);
        loop {
            self.limiter.acquire_ranked(action, rank).await?;
            match send().await {
                Err(err) if err.is_throttling() && throttled < MAX_THROTTLED => {
                    throttled += 1;
                    tracing::debug!(operation = action, throttled, "EC2 throttled the call");
                    self.limiter.drain(action).await?;
                }
                Err(err @ Ec2Error::Unavailable { .. })
                    if !err.is_throttling() && unavailable < MAX_UNAVAILABLE_TRIES =>
                {
                    let pause = std::time::Duration::from_millis(250 << unavailable);
                    unavailable += 1;
                    tracing::debug!(operation = action, error = %err, "trying again");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    /// Instances tagged with the booking that are not terminated, with their slot tags.
    pub async fn find_for_booking(&self, booking_id: &str) -> Result<Vec<InstanceInfo>, Ec2Error> {
        self.find_managed(Some(booking_id)).await
    }

    /// Every instance this installation launched (tagged `labbook:managed=true` and with its
    /// `labbook:installation`) that is not terminated, of one booking or of all.
    pub async fn find_managed(
        &self,
        booking_id: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, Ec2Error> {
        let installation = self.settings.installation.as_str();
        let mut filters = vec![tag_filter(TAG_MANAGED, "true")];
        if installation != DEFAULT_INSTALLATION {
            // EC2 filters cannot ask for a missing tag: the default installation filters below.
            filters.push(tag_filter(TAG_INSTALLATION, installation));
        }
        if let Some(id) = booking_id {
            filters.push(tag_filter(TAG_BOOKING, id));
        }
        // Terminated instances stay visible for about an hour: leave them to EC2.
        filters.push(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(LIVE_STATES.map(str::to_owned).to_vec()))
                .build(),
        );
        Ok(self
            .instances_matching(filters)
            .await?
            .iter()
            .filter_map(info)
            .filter(|i| !i.is_gone() && i.belongs_to(installation))
            .collect())
    }

    /// Every instance `DescribeInstances` gives for `filters`, all its pages.
    pub(crate) async fn instances_matching(
        &self,
        filters: Vec<Filter>,
    ) -> Result<Vec<aws_sdk_ec2::types::Instance>, Ec2Error> {
        let request = self.client.describe_instances().set_filters(Some(filters));
        let mut out = Vec::new();
        let mut next_token = None;
        loop {
            let page = self
                .call("DescribeInstances", || {
                    let request = request.clone().set_next_token(next_token.clone());
                    async move {
                        request
                            .send()
                            .await
                            .map_err(|e| classify("DescribeInstances", e))
                    }
                })
                .await?;
            for r in page.reservations() {
                out.extend(r.instances().iter().cloned());
            }
            next_token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if next_token.is_none() {
                break;
            }
        }
        ok("DescribeInstances");
        Ok(out)
    }

    /// The instances with these ids that EC2 shows, one `DescribeInstances` per 1,000 ids (EC2's
    /// most per call). EC2's reads are eventually consistent: an instance launched a moment ago
    /// may not be visible yet, and is then left out.
    pub async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceInfo>, Ec2Error> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(DESCRIBE_MAX_IDS) {
            found.extend(self.describe_some(chunk).await?);
        }
        Ok(found)
    }

    async fn describe_some(&self, ids: &[String]) -> Result<Vec<InstanceInfo>, Ec2Error> {
        let result = self
            .call("DescribeInstances", || async {
                self.client
                    .describe_instances()
                    .set_instance_ids(Some(ids.to_vec()))
                    .send()
                    .await
                    .map_err(|e| classify("DescribeInstances", e))
            })
            .await;
        let out = match result {
            Ok(out) => out,
            Err(err) if err.code() == Some("InvalidInstanceID.NotFound") && ids.len() > 1 => {
                // One id EC2 does not show yet (or any more) fails the whole call: ask one by one.
                let mut found = Vec::new();
                for id in ids {
                    found.extend(Box::pin(self.describe_some(std::slice::from_ref(id))).await?);
                }
                return Ok(found);
            }
            Err(err) if err.code() == Some("InvalidInstanceID.NotFound") => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        ok("DescribeInstances");
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances().iter().filter_map(info))
            .collect())
    }

    /// Launches one instance for a slot, tagged, IMDSv2 required, with a `ClientToken`.
    pub async fn launch(&self, req: &LaunchRequest<'_>, ami_id: &str) -> Result<String, Ec2Error> {
        let launched = self.launch_if(req, ami_id, None, || async { true }).await?;
        Ok(launched.expect("an open gate launches"))
    }

    /// Launches one instance for `req`, if `gate` still says so once the call may be made (its
    /// turn under the rate limit came): a booking cancelled or moved while its launches waited
    /// for the account's budget launches nothing more. `None` when the gate was closed. With a
    /// `rank` (the booking's time) the launch waits behind launches of earlier bookings only.
    pub async fn launch_if<G, Open>(
        &self,
        req: &LaunchRequest<'_>,
        ami_id: &str,
        rank: Option<chrono::DateTime<chrono::Utc>>,
        gate: G,
    ) -> Result<Option<String>, Ec2Error>
    where
        G: Fn() -> Open,
        Open: std::future::Future<Output = bool>,
    {
        let request = self.run_instances_request(req, ami_id).await?;
        let out = self
            .call_ranked("RunInstances", rank, || async {
                if !gate().await {
                    return Ok(None);
                }
                request
                    .clone()
                    .send()
                    .await
                    .map(Some)
                    .map_err(|e| classify("RunInstances", e))
            })
            .await?;
        let Some(out) = out else {
            return Ok(None);
        };
        ok("RunInstances");
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(|id| Some(id.to_owned()))
            .ok_or(Ec2Error::Transient {
                operation: "RunInstances",
                detail: "no instance in the answer".into(),
            })
    }

    /// The `RunInstances` call of `req`: the same parameters for every retry of the slot's
    /// generation (EC2 answers `IdempotentParameterMismatch` to a token reused with others).
    async fn run_instances_request(
        &self,
        req: &LaunchRequest<'_>,
        ami_id: &str,
    ) -> Result<RunInstancesFluentBuilder, Ec2Error> {
        let token = client_token(
            &self.settings.installation,
            req.booking_id,
            (req.slot, req.generation),
            req.offering_index,
        );
        let tags = [
            (TAG_BOOKING, req.booking_id.to_owned()),
            (TAG_SLOT, req.slot.to_string()),
            (TAG_GENERATION, req.generation.to_string()),
            (TAG_MANAGED, "true".to_owned()),
            (TAG_INSTALLATION, self.settings.installation.clone()),
            ("Name", format!("labbook {} #{}", req.booking_id, req.slot)),
        ];
        self.run_request(ami_id, req.offering, req.user_data, &token, &tags)
            .await
    }

    /// What every launch of labbook's sends: one instance of `ami_id` where `offering` says,
    /// in labbook's security groups, with the key pair, IMDSv2 required, `user_data`, and
    /// `tags` on the instance and its volumes.
    async fn run_request(
        &self,
        ami_id: &str,
        offering: &Offering,
        user_data: &str,
        client_token: &str,
        tags: &[(&str, String)],
    ) -> Result<RunInstancesFluentBuilder, Ec2Error> {
        let security_groups = self.security_groups().await?;
        Ok(self
            .client
            .run_instances()
            .image_id(ami_id)
            .instance_type(InstanceType::from(offering.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(client_token)
            .set_subnet_id(offering.subnet_id.clone())
            .set_security_group_ids(Some(security_groups))
            .set_key_name(self.settings.key_name.clone())
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .tag_specifications(tag_specification(ResourceType::Instance, tags))
            .tag_specifications(tag_specification(ResourceType::Volume, tags)))
    }

    /// What the instance wrote to its serial console (EC2 keeps its last 64 KiB): empty until
    /// there is something. labbook's bootstrap reports its outcome there. `latest` asks for the
    /// live output (`Latest=true`, Nitro instance types); without it EC2 answers the copy it
    /// buffered shortly after the instance's last state transition, which a report written
    /// minutes after the start is not in.
    pub async fn console_output(
        &self,
        instance_id: &str,
        latest: bool,
    ) -> Result<ConsoleOutput, Ec2Error> {
        let out = self
            .call("GetConsoleOutput", || async {
                self.client
                    .get_console_output()
                    .instance_id(instance_id)
                    .set_latest(latest.then_some(true))
                    .send()
                    .await
                    .map_err(|e| classify("GetConsoleOutput", e))
            })
            .await?;
        ok("GetConsoleOutput");
        let encoded = out.output().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .unwrap_or_default();
        let updated_at = out
            .timestamp()
            .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos()));
        Ok(ConsoleOutput {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            updated_at,
        })
    }

    /// Terminates instances; ones already gone are fine.
    pub async fn terminate(&self, ids: &[String]) -> Result<(), Ec2Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let all = self
            .call("TerminateInstances", || async {
                self.client
                    .terminate_instances()
                    .set_instance_ids(Some(ids.to_vec()))
                    .send()
                    .await
                    .map_err(|e| classify("TerminateInstances", e))
            })
            .await;
        match all {
            Ok(_) => {
                ok("TerminateInstances");
                Ok(())
            }
            Err(err) => {
                if err
                    .code()
                    .is_some_and(|c| c.starts_with("InvalidInstanceID"))
                {
                    // Some are already gone: terminate the rest one by one.
                    for id in ids {
                        let one = self
                            .call("TerminateInstances", || async {
                                self.client
                                    .terminate_instances()
                                    .instance_ids(id)
                                    .send()
                                    .await
                                    .map_err(|e| classify("TerminateInstances", e))
                            })
                            .await;
                        if let Err(err) = one
                            && !err
                                .code()
                                .is_some_and(|c| c.starts_with("InvalidInstanceID"))
                        {
                            return Err(err);
                        }
                    }
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }

    /// The configured security groups, or labbook's own group (found or created once).
    async fn security_groups(&self) -> Result<Vec<String>, Ec2Error> {
        if !self.settings.security_group_ids.is_empty() {
            return Ok(self.settings.security_group_ids.clone());
        }
        self.security_groups
            .get_or_try_init(|| async { self.find_or_create_group().await.map(|id| vec![id]) })
            .await
            .cloned()
    }
}

/// `tags` for a resource of `kind` created by the call.
fn tag_specification(kind: ResourceType, tags: &[(&str, String)]) -> TagSpecification {
    tags.iter()
        .fold(
            TagSpecification::builder().resource_type(kind),
            |b, (k, v)| b.tags(Tag::builder().key(*k).value(v).build()),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_stable_short_and_distinct() {
        let a = client_token("default", "course-42", (0, 0), 0);
        assert_eq!(a, client_token("default", "course-42", (0, 0), 0));
        assert_ne!(a, client_token("default", "course-42", (1, 0), 0));
        assert_ne!(a, client_token("default", "course-42", (0, 1), 0));
        assert_ne!(a, client_token("default", "course-42", (0, 0), 1));
        assert_ne!(a, client_token("staging", "course-42", (0, 0), 0));
        // A booking id may hold `:`; the default installation's `staging:c1` is not
        // installation `staging`'s `c1`.
        assert_ne!(
            client_token("default", "staging:c1", (0, 0), 0),
            client_token("staging", "c1", (0, 0), 0)
        );
        assert!(a.len() <= 64 && a.is_ascii());
        let longest = client_token(&"s".repeat(32), &"x".repeat(64), (999, 7), 9);
        assert_eq!(longest.len(), a.len());
    }
}
