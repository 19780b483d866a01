//! Typed settings from the environment (docs/contract.md §4), optionally completed by a file.
//!
//! Every value is checked once at start-up; a bad one stops the process with one line that
//! names the variable ([`ConfigError`], exit code 2).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::crypto::SecretKey;
use crate::domain::{BookingRules, EmailAddress, Username};

/// A configuration value that is missing or wrong. Its message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(var: &'static str, problem: impl Into<String>) -> Self {
        Self {
            var,
            problem: problem.into(),
        }
    }
}

/// A connection URL that may hold a password. `Debug` shows it without the password, and
/// there is no `Display`: a settings dump in a log cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the client that connects with it. Nothing else.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // One URL, or several separated by commas (AMQP_URL naming a cluster's nodes).
        let redacted: Option<Vec<String>> = self
            .0
            .split(',')
            .map(|one| {
                let mut u = url::Url::parse(one.trim()).ok()?;
                if u.password().is_some() {
                    let _ = u.set_password(Some("REDACTED"));
                }
                Some(u.as_str().to_owned())
            })
            .collect();
        match redacted {
            Some(urls) => write!(f, "{:?}", urls.join(",")),
            None => f.write_str("\"[unparseable URL]\""),
        }
    }
}

/// What the instances boot into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// The Littlest JupyterHub, the booking's users allowed in with their passwords.
    JupyterHub,
    /// Plain Linux accounts with SSH password login.
    Ssh,
}

/// Where and what the provisioner launches.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    pub ami_id: Option<String>,
    /// `LABBOOK_BASE_AMI_ID`: the image `labbook image build` bakes this installation's image
    /// from (an Ubuntu release TLJH supports).
    pub base_ami_id: Option<String>,
    /// The default instance type: the first of [`Ec2Settings::instance_types`].
    pub instance_type: String,
    /// `LABBOOK_INSTANCE_TYPES` (else `LABBOOK_INSTANCE_TYPE`, else `t3.small`): the types a
    /// machine is launched as, in order, when EC2 has no capacity for the one before.
    pub instance_types: Vec<String>,
    /// The first of [`Ec2Settings::subnet_ids`].
    pub subnet_id: Option<String>,
    /// `LABBOOK_SUBNET_IDS` (else `LABBOOK_SUBNET_ID`; none: the default VPC's choice): the
    /// subnets (zones) a machine is launched in, in order.
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    pub allowed_cidrs: Vec<String>,
    pub users_per_instance: u32,
    pub bootstrap: Bootstrap,
    pub admin_username: Username,
    pub launch_concurrency: usize,
    /// `LABBOOK_RUNNING_TIMEOUT_SECONDS` (default 600): how long a launched machine may take
    /// to run with a public address before it is replaced.
    pub running_timeout: Duration,
    /// How often the provisioner looks for machines of bookings that are over.
    pub sweep_interval: Duration,
    /// `LABBOOK_INSTALLATION` (default `default`; 1–32 of `a-z 0-9 -`): the value of the
    /// `labbook:installation` tag. An installation finds, adopts, sweeps and terminates only
    /// its own instances, so several may share an AWS account.
    pub installation: String,
    /// `AWS_REGION` (else the SDK's chain decides).
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL`: an EC2 API emulator in tests.
    pub endpoint_url: Option<String>,
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` when both are set (else the SDK's chain).
    pub static_credentials: Option<(String, secrecy::SecretString)>,
    /// `LABBOOK_EC2_RATE_RUN_INSTANCES` (default `5/2`), `LABBOOK_EC2_RATE_DESCRIBE_INSTANCES`
    /// (`100/20`), `LABBOOK_EC2_RATE_TERMINATE_INSTANCES` (`100/5`): client-side rate limits per
    /// EC2 action as `BURST/PER_SECOND` (calls at once, then calls per second), or `off`. The
    /// defaults are EC2's own buckets for an account and Region; see [`crate::ec2::rate`].
    pub rate_limits: crate::ec2::rate::RateLimits,
    /// `LABBOOK_READINESS`: what the instance details email waits for besides running machines.
    pub readiness: Readiness,
    /// `LABBOOK_READY_TIMEOUT_SECONDS` (default 900): how long a machine may take from launch
    /// to its bootstrap's report of success before it is replaced (The Littlest JupyterHub
    /// installs in about ten minutes).
    pub ready_timeout: Duration,
    /// `LABBOOK_EXPECTED_BOOT_SECONDS`: launch to ready, until boots of the image are recorded
    /// (see [`expected_boot`]). The boot watch reads a console first then; the scheduler
    /// starts provisioning that much earlier.
    pub expected_boot: Duration,
    /// `LABBOOK_BOOT_WATCH_TICK_MS` (default 1000): how often the boot watch looks for machines
    /// due a look.
    pub watch_tick: Duration,
    /// `LABBOOK_READY_PROBE`: what else must answer before a machine counts as ready.
    pub probe: Probe,
    /// `LABBOOK_READY_PROBE_CA_FILE`: PEM certificates the HTTPS probe trusts besides the
    /// public roots (an ACME server's own root: Let's Encrypt's staging, a test server).
    pub probe_ca_file: Option<std::path::PathBuf>,
    /// `LABBOOK_PRICES`: hourly prices per instance type, for cost estimates.
    pub prices: crate::domain::Prices,
    /// `LABBOOK_HTTPS`, `LABBOOK_ACME_DIRECTORY`, `LABBOOK_ACME_EMAIL`: how JupyterHub machines
    /// serve their login page (SSH mode ignores it).
    pub https: Https,
}

/// What the instance details email waits for (`LABBOOK_READINESS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Running machines with an address (an emulator, whose console stays empty).
    Running,
    /// Besides, each machine's bootstrap reports `labbook-bootstrap: ok` on its serial console
    /// (read with `GetConsoleOutput`).
    Bootstrap,
}

/// A network check of a ready machine (`LABBOOK_READY_PROBE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// None.
    Off,
    /// Each machine's address: port 22 accepts (SSH mode), or `/hub/health` on port 80
    /// answers 200 (JupyterHub mode).
    Machine,
    /// This `host:port` instead of each machine's address (tests point it at loopback).
    Target(String),
}

/// How a JupyterHub machine serves its login page (`LABBOOK_HTTPS`, docs/contract.md §1 item 10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Https {
    /// Plain HTTP on port 80 (`off`: a closed network, or a proxy in front that terminates TLS).
    Off,
    /// HTTPS with a certificate for the machine's public IPv4 address, obtained on the machine
    /// from an ACME server (`letsencrypt`, the default).
    Acme(AcmeSettings),
}

impl Https {
    /// The ACME settings when HTTPS is on.
    pub fn acme(&self) -> Option<&AcmeSettings> {
        match self {
            Https::Off => None,
            Https::Acme(acme) => Some(acme),
        }
    }
}

/// Where a machine asks for its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// `LABBOOK_ACME_DIRECTORY`: an RFC 8555 directory URL (`https://` only).
    pub directory: String,
    /// `LABBOOK_ACME_EMAIL`: the ACME account's contact, if any.
    pub email: Option<EmailAddress>,
}

impl AcmeSettings {
    /// Whether the directory is Let's Encrypt's (production or staging).
    pub fn is_lets_encrypt(&self) -> bool {
        url::Url::parse(&self.directory)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.ends_with(".api.letsencrypt.org")))
            .unwrap_or(false)
    }
}

/// Let's Encrypt's production directory, the default of `LABBOOK_ACME_DIRECTORY`.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `LABBOOK_HTTPS` (`letsencrypt` or `off`), with the directory and contact it uses. The two
/// ACME variables are checked even when HTTPS is off, so a typo shows before it matters.
fn https(v: &Vars<'_>) -> Result<Https, ConfigError> {
    let on = v.choice(
        "LABBOOK_HTTPS",
        "letsencrypt",
        [("letsencrypt", true), ("off", false)],
    )?;
    let raw = v
        .get("LABBOOK_ACME_DIRECTORY")
        .unwrap_or(LETS_ENCRYPT_DIRECTORY);
    let directory = match url::Url::parse(raw) {
        Ok(url) if url.scheme() == "https" && url.host().is_some() => url.to_string(),
        _ => {
            return Err(ConfigError::new(
                "LABBOOK_ACME_DIRECTORY",
                format!("must be an https:// URL of an ACME directory (got {raw:?})"),
            ));
        }
    };
    let email = v
        .get("LABBOOK_ACME_EMAIL")
        .map(EmailAddress::parse)
        .transpose()
        .map_err(|e| ConfigError::new("LABBOOK_ACME_EMAIL", e))?;
    Ok(if on {
        Https::Acme(AcmeSettings { directory, email })
    } else {
        Https::Off
    })
}

/// How long Let's Encrypt's certificates for IP addresses last (its `shortlived` profile, the
/// only one it issues them under): 160 hours. Nothing renews a machine's certificate.
pub const LETS_ENCRYPT_IP_CERTIFICATE: Duration = Duration::from_secs(160 * 3600);

/// With certificates from Let's Encrypt (its production or staging directory), a machine started
/// `LABBOOK_PROVISION_LEAD_SECONDS` before the longest booking must not outlive its certificate:
/// the lead, the booking and an hour for the boot and the account's launch pace stay within
/// [`LETS_ENCRYPT_IP_CERTIFICATE`]. Other ACME servers' lifetimes are their own.
fn check_certificate_outlives_bookings(
    ec2: &Ec2Settings,
    lead: Duration,
) -> Result<(), ConfigError> {
    let lets_encrypt = ec2.https.acme().is_some_and(AcmeSettings::is_lets_encrypt);
    if ec2.bootstrap != Bootstrap::JupyterHub || !lets_encrypt {
        return Ok(());
    }
    let longest = Duration::from_secs(u64::from(crate::domain::booking::MAX_DURATION_MINUTES) * 60);
    let most = LETS_ENCRYPT_IP_CERTIFICATE - longest - Duration::from_secs(3600);
    if lead <= most {
        return Ok(());
    }
    Err(ConfigError::new(
        "LABBOOK_PROVISION_LEAD_SECONDS",
        format!(
            "{} s is too early with LABBOOK_HTTPS=letsencrypt: Let's Encrypt's certificates for IP addresses last {} hours and are not renewed, so a machine started that long before a {}-hour booking would lose its HTTPS during it (at most {} s, or LABBOOK_HTTPS=off)",
            lead.as_secs(),
            LETS_ENCRYPT_IP_CERTIFICATE.as_secs() / 3600,
            longest.as_secs() / 3600,
            most.as_secs()
        ),
    ))
}

/// `LABBOOK_RUNNING_TIMEOUT_SECONDS`: how long a launched machine may take to run with a public
/// address before it counts as not ready (and is replaced). No delivery waits through it: the
/// boot watch follows machines as rows (docs/contract.md §1 item 9).
const RUNNING_TIMEOUT: &str = "LABBOOK_RUNNING_TIMEOUT_SECONDS";

impl Ec2Settings {
    /// Where a machine may be launched, in the order to try: each subnet of the first type,
    /// then each subnet of the next type.
    pub fn offerings(&self) -> Vec<crate::ec2::Offering> {
        let subnets: Vec<Option<String>> = if self.subnet_ids.is_empty() {
            vec![None]
        } else {
            self.subnet_ids.iter().cloned().map(Some).collect()
        };
        self.instance_types
            .iter()
            .flat_map(|t| {
                subnets.iter().map(move |s| crate::ec2::Offering {
                    instance_type: t.clone(),
                    subnet_id: s.clone(),
                })
            })
            .collect()
    }

    fn from_vars(v: &Vars<'_>) -> Result<Self, ConfigError> {
        let admin = v.get("LABBOOK_ADMIN_USERNAME").unwrap_or("labadmin");
        let admin_username =
            Username::parse(admin).map_err(|e| ConfigError::new("LABBOOK_ADMIN_USERNAME", e))?;
        let running_timeout = v.seconds(RUNNING_TIMEOUT, 600, 1, 86_400)?;
        // The lists win over the single forms; the first of each is the default.
        let instance_types = Some(v.list("LABBOOK_INSTANCE_TYPES"))
            .filter(|l| !l.is_empty())
            .or_else(|| v.string("LABBOOK_INSTANCE_TYPE").map(|t| vec![t]))
            .unwrap_or_else(|| vec!["t3.small".to_owned()]);
        let subnet_ids = Some(v.list("LABBOOK_SUBNET_IDS"))
            .filter(|l| !l.is_empty())
            .or_else(|| v.string("LABBOOK_SUBNET_ID").map(|s| vec![s]))
            .unwrap_or_default();
        let readiness = readiness(v)?;
        let bootstrap = v.choice(
            "LABBOOK_BOOTSTRAP",
            "jupyterhub",
            [
                ("jupyterhub", Bootstrap::JupyterHub),
                ("ssh", Bootstrap::Ssh),
            ],
        )?;
        Ok(Self {
            ami_id: v.string("LABBOOK_AMI_ID"),
            base_ami_id: v.string("LABBOOK_BASE_AMI_ID"),
            instance_type: instance_types[0].clone(),
            instance_types,
            subnet_id: subnet_ids.first().cloned(),
            subnet_ids,
            security_group_ids: v.list("LABBOOK_SECURITY_GROUP_IDS"),
            key_name: v.string("LABBOOK_KEY_NAME"),
            allowed_cidrs: Some(v.list("LABBOOK_ALLOWED_CIDRS"))
                .filter(|cidrs| !cidrs.is_empty())
                .unwrap_or_else(|| vec!["0.0.0.0/0".to_owned()]),
            users_per_instance: v.number("LABBOOK_USERS_PER_INSTANCE", 2, 1, 1000)? as u32,
            bootstrap,
            admin_username,
            launch_concurrency: v.number("LABBOOK_LAUNCH_CONCURRENCY", 4, 1, 64)? as usize,
            running_timeout,
            sweep_interval: v.seconds("LABBOOK_SWEEP_INTERVAL_SECONDS", 300, 1, 86_400)?,
            installation: installation(v)?,
            region: v
                .string("AWS_REGION")
                .or_else(|| v.string("AWS_DEFAULT_REGION")),
            endpoint_url: v.string("AWS_ENDPOINT_URL"),
            static_credentials: v
                .get("AWS_ACCESS_KEY_ID")
                .zip(v.get("AWS_SECRET_ACCESS_KEY"))
                .map(|(id, secret)| (id.to_owned(), secret.to_owned().into())),
            rate_limits: crate::ec2::rate::RateLimits::from_vars(|var| v.get(var))
                .map_err(|(var, problem)| ConfigError::new(var, problem))?,
            readiness,
            ready_timeout: v.seconds("LABBOOK_READY_TIMEOUT_SECONDS", 900, 1, 86_400)?,
            expected_boot: expected_boot(v, readiness, bootstrap)?,
            watch_tick: Duration::from_millis(v.number(
                "LABBOOK_BOOT_WATCH_TICK_MS",
                1000,
                10,
                60_000,
            )?),
            probe: probe(v)?,
            probe_ca_file: probe_ca_file(v)?,
            prices: crate::domain::Prices::parse(v.get("LABBOOK_PRICES").unwrap_or(""))
                .map_err(|e| ConfigError::new("LABBOOK_PRICES", e))?,
            https: https(v)?,
        })
    }
}

/// `LABBOOK_READINESS`: `auto` (default: `bootstrap` against EC2, `running` when
/// `AWS_ENDPOINT_URL` names an emulator, whose console output is fixed), `bootstrap` or `running`.
fn readiness(v: &Vars<'_>) -> Result<Readiness, ConfigError> {
    let emulated = v.string("AWS_ENDPOINT_URL").is_some();
    let auto = if emulated {
        Readiness::Running
    } else {
        Readiness::Bootstrap
    };
    v.choice(
        "LABBOOK_READINESS",
        "auto",
        [
            ("auto", auto),
            ("bootstrap", Readiness::Bootstrap),
            ("running", Readiness::Running),
        ],
    )
}

/// `LABBOOK_EXPECTED_BOOT_SECONDS`: how long a machine takes from launch to ready until this
/// installation has recorded boots of its own image: 600 in JupyterHub mode (The Littlest
/// JupyterHub installs in about ten minutes), 120 in SSH mode, 0 where running is ready.
fn expected_boot(
    v: &Vars<'_>,
    readiness: Readiness,
    bootstrap: Bootstrap,
) -> Result<Duration, ConfigError> {
    let default = match (readiness, bootstrap) {
        (Readiness::Running, _) => 0,
        (Readiness::Bootstrap, Bootstrap::JupyterHub) => 600,
        (Readiness::Bootstrap, Bootstrap::Ssh) => 120,
    };
    v.seconds("LABBOOK_EXPECTED_BOOT_SECONDS", default, 0, 86_400)
}

/// `LABBOOK_READY_PROBE_CA_FILE`: a readable file of PEM certificates, checked at start.
fn probe_ca_file(v: &Vars<'_>) -> Result<Option<std::path::PathBuf>, ConfigError> {
    let Some(path) = v.get("LABBOOK_READY_PROBE_CA_FILE").map(str::trim) else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    crate::stages::provisioner::probe_roots(Some(&path))
        .map_err(|why| ConfigError::new("LABBOOK_READY_PROBE_CA_FILE", why))?;
    Ok(Some(path))
}

/// `LABBOOK_READY_PROBE`: `off` (default), `on`, or `HOST:PORT`.
fn probe(v: &Vars<'_>) -> Result<Probe, ConfigError> {
    match v.get("LABBOOK_READY_PROBE").map(str::trim) {
        None | Some("off") => Ok(Probe::Off),
        Some("on") => Ok(Probe::Machine),
        Some(target)
            if target
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
        {
            Ok(Probe::Target(target.to_owned()))
        }
        Some(other) => Err(ConfigError::new(
            "LABBOOK_READY_PROBE",
            format!("must be off, on, or HOST:PORT (got {other:?})"),
        )),
    }
}

/// `LABBOOK_INSTALLATION`: `default`, or 1–32 characters of `a-z 0-9 -`.
fn installation(v: &Vars<'_>) -> Result<String, ConfigError> {
    let name = v.get("LABBOOK_INSTALLATION").unwrap_or("default");
    let valid = name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(ConfigError::new(
            "LABBOOK_INSTALLATION",
            format!("must be 1 to 32 characters of a-z, 0-9 and - (got {name:?})"),
        ));
    }
    Ok(name.to_owned())
}

/// Retry tiers and consumer limits, shared by every stage.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub amqp_url: SecretUrl,
    pub prefetch: u16,
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub shutdown_timeout: Duration,
    /// `LABBOOK_PUBLISH_TIMEOUT_SECONDS` (default 30, 1 to 600): how long a publish waits for
    /// the broker's confirm.
    pub publish_timeout: Duration,
    /// `LABBOOK_DECLARE_TOPOLOGY` (`true`, the default, or `false`): whether a worker declares
    /// the topology at start-up, or only checks passively that it exists (then its broker user
    /// needs no *configure* permission).
    pub declare_topology: bool,
}

impl BrokerSettings {
    fn from_vars(v: &Vars<'_>) -> Result<Self, ConfigError> {
        let retry_delays =
            v.durations_ms("LABBOOK_RETRY_DELAYS_MS", &[1_000, 10_000, 60_000, 600_000])?;
        let max_attempts = v.number(
            "LABBOOK_MAX_ATTEMPTS",
            retry_delays.len() as u64 + 1,
            1,
            100,
        )? as u32;
        Ok(Self {
            amqp_url: amqp_url(v)?,
            prefetch: v.number("LABBOOK_PREFETCH", 8, 1, 1000)? as u16,
            retry_delays,
            max_attempts,
            shutdown_timeout: v.seconds("LABBOOK_SHUTDOWN_TIMEOUT_SECONDS", 30, 1, 3600)?,
            publish_timeout: v.seconds("LABBOOK_PUBLISH_TIMEOUT_SECONDS", 30, 1, 600)?,
            declare_topology: v.choice(
                "LABBOOK_DECLARE_TOPOLOGY",
                "true",
                [("true", true), ("false", false)],
            )?,
        })
    }
}

fn amqp_url(v: &Vars<'_>) -> Result<SecretUrl, ConfigError> {
    let url = v
        .get("AMQP_URL")
        .unwrap_or("amqp://guest:guest@127.0.0.1:5672/%2f");
    let urls: Vec<&str> = crate::broker::broker_urls(url).collect();
    if urls.is_empty() {
        return Err(ConfigError::new("AMQP_URL", "names no broker"));
    }
    for (i, one) in urls.iter().enumerate() {
        // Which of several URLs is wrong (never the URL itself: it holds a password).
        let which = if urls.len() > 1 {
            format!("its broker {} of {}", i + 1, urls.len())
        } else {
            "it".to_owned()
        };
        if !(one.starts_with("amqp://") || one.starts_with("amqps://")) {
            return Err(ConfigError::new(
                "AMQP_URL",
                format!(
                    "must start with amqp:// or amqps:// ({which} does not; several brokers are separated by commas)"
                ),
            ));
        }
        one.parse::<lapin::uri::AMQPUri>().map_err(|_| {
            ConfigError::new(
                "AMQP_URL",
                format!("is not a valid AMQP URL ({which}: amqp://user:pass@host:5672/vhost, several separated by commas)"),
            )
        })?;
    }
    Ok(SecretUrl::new(url))
}

/// Everything a labbook process may need. Binaries ask for the parts they use with the
/// `require_*` methods, so a missing secret stops only the processes that need it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub database_url: SecretUrl,
    /// `LABBOOK_DB_MAX_CONNECTIONS` (1 to 1000): the size of the database pool. Unset (`None`):
    /// the process chooses from what it runs.
    pub db_max_connections: Option<u32>,
    pub smtp_url: SecretUrl,
    pub mail_from: EmailAddress,
    pub ec2: Ec2Settings,
    pub rules: BookingRules,
    pub provision_lead: Duration,
    pub scheduler_tick: Duration,
    pub metrics_addr: Option<SocketAddr>,
    /// Whether `LABBOOK_METRICS_ADDR` was set: then failing to listen is a configuration
    /// error; on the default address, several workers on one host just skip it.
    pub metrics_addr_explicit: bool,
    pub json_logs: bool,
    /// Where spans are exported (`None`: not exported).
    pub traces: Option<TraceExport>,
    pub console: ConsoleSettings,
    secret_key: Option<SecretKey>,
}

impl Settings {
    /// Reads the process environment, completed by the file named in `LABBOOK_CONFIG`
    /// (`KEY=VALUE` lines) where a variable is not set. The environment wins.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut vars: HashMap<String, String> = HashMap::new();
        if let Ok(path) = std::env::var("LABBOOK_CONFIG") {
            vars.extend(read_file(Path::new(&path))?);
        }
        // A variable that is not UTF-8 cannot be one of labbook's; skip it rather than panic.
        vars.extend(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        );
        Self::from_map(&vars)
    }

    /// Builds settings from a map of variables (the environment, or a test's own).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let v = Vars(vars);
        let broker = BrokerSettings::from_vars(&v)?;
        let database = DatabaseSettings::from_vars(&v)?;
        let mail = MailSettings::from_vars(&v)?;
        let ec2 = Ec2Settings::from_vars(&v)?;
        crate::ec2::userdata::check_room(
            ec2.bootstrap,
            &ec2.https,
            ec2.admin_username.as_str(),
            ec2.users_per_instance,
        )
        .map_err(|problem| ConfigError::new("LABBOOK_USERS_PER_INSTANCE", problem))?;
        let schedule = ScheduleSettings::from_vars(&v)?;
        check_certificate_outlives_bookings(&ec2, schedule.provision_lead)?;
        let telemetry = TelemetrySettings::from_vars(&v)?;
        Ok(Self {
            broker,
            database_url: database.url,
            db_max_connections: database.max_connections,
            smtp_url: mail.smtp_url,
            mail_from: mail.from,
            ec2,
            rules: schedule.rules,
            provision_lead: schedule.provision_lead,
            scheduler_tick: schedule.tick,
            metrics_addr: telemetry.metrics_addr,
            metrics_addr_explicit: telemetry.metrics_addr_explicit,
            json_logs: telemetry.json_logs,
            traces: trace_export(&v)?,
            console: ConsoleSettings::from_vars(&v)?,
            secret_key: secret_key(&v)?,
        })
    }

    /// The key that encrypts stored passwords; an error names `LABBOOK_SECRET_KEY` if unset.
    pub fn require_secret_key(&self) -> Result<&SecretKey, ConfigError> {
        self.secret_key.as_ref().ok_or_else(|| {
            ConfigError::new(
                "LABBOOK_SECRET_KEY",
                "is not set (32 random bytes in base64, e.g. from `openssl rand -base64 32`)",
            )
        })
    }

    /// The AMI to launch; an error names `LABBOOK_AMI_ID` if unset.
    pub fn require_ami_id(&self) -> Result<&str, ConfigError> {
        self.ec2.ami_id.as_deref().ok_or_else(|| {
            ConfigError::new("LABBOOK_AMI_ID", "is not set (the image to launch, ami-…)")
        })
    }

    /// The image `labbook image build` starts from; an error names `LABBOOK_BASE_AMI_ID` if
    /// unset.
    pub fn require_base_ami_id(&self) -> Result<&str, ConfigError> {
        self.ec2.base_ami_id.as_deref().ok_or_else(|| {
            ConfigError::new(
                "LABBOOK_BASE_AMI_ID",
                "is not set (the image to bake from, ami-…: an Ubuntu LTS that The Littlest JupyterHub supports)",
            )
        })
    }
}

fn secret_key(v: &Vars<'_>) -> Result<Option<SecretKey>, ConfigError> {
    v.get("LABBOOK_SECRET_KEY")
        .map(|raw| {
            SecretKey::from_base64(raw).map_err(|e| ConfigError::new("LABBOOK_SECRET_KEY", e))
        })
        .transpose()
}

/// The operator console (`labbook console`). Only the console asks for its token, so a
/// worker starts whatever `LABBOOK_CONSOLE_TOKEN` holds.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    token: Option<secrecy::SecretString>,
    /// `LABBOOK_CONSOLE_LISTEN` (default `127.0.0.1:8080`; `--listen` wins).
    pub listen: SocketAddr,
    /// `LABBOOK_CONSOLE_SECURE_COOKIE` (`true` or `false`); unset: the session cookie is
    /// `Secure` unless the console listens on a loopback address.
    pub secure_cookie: Option<bool>,
    /// `LABBOOK_CONSOLE_WORKERS`: comma-separated `http://HOST:PORT` of the workers' metrics
    /// endpoints (`LABBOOK_METRICS_ADDR`), whose `/readyz` the health page shows; checked by
    /// the console when it starts.
    pub workers: Vec<String>,
    /// `LABBOOK_TRACE_URL`: a trace viewer's page of one trace, `{trace_id}` standing for the
    /// trace id (e.g. Jaeger's `http://jaeger:16686/trace/{trace_id}`); a booking's page links
    /// to it.
    pub trace_url: Option<String>,
}

fn trace_url(v: &Vars<'_>) -> Result<Option<String>, ConfigError> {
    let Some(template) = v.get("LABBOOK_TRACE_URL") else {
        return Ok(None);
    };
    let sample = template.replace("{trace_id}", "0af7651916cd43dd8448eb211c80319c");
    let web = url::Url::parse(&sample)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
    if !template.contains("{trace_id}") || !web {
        return Err(ConfigError::new(
            "LABBOOK_TRACE_URL",
            "must be an http(s) URL holding {trace_id}, e.g. http://jaeger:16686/trace/{trace_id}",
        ));
    }
    Ok(Some(template.to_owned()))
}

/// The shortest `LABBOOK_CONSOLE_TOKEN` the console accepts.
pub const MIN_CONSOLE_TOKEN_CHARS: usize = 16;

impl ConsoleSettings {
    fn from_vars(v: &Vars<'_>) -> Result<Self, ConfigError> {
        let listen = v.get("LABBOOK_CONSOLE_LISTEN").unwrap_or("127.0.0.1:8080");
        Ok(Self {
            token: v.string("LABBOOK_CONSOLE_TOKEN").map(Into::into),
            listen: listen.parse().map_err(|_| {
                ConfigError::new(
                    "LABBOOK_CONSOLE_LISTEN",
                    format!("must be HOST:PORT, e.g. 127.0.0.1:8080 (got {listen:?})"),
                )
            })?,
            secure_cookie: v
                .get("LABBOOK_CONSOLE_SECURE_COOKIE")
                .map(|_| {
                    v.choice(
                        "LABBOOK_CONSOLE_SECURE_COOKIE",
                        "true",
                        [("true", true), ("false", false)],
                    )
                })
                .transpose()?,
            workers: v.list("LABBOOK_CONSOLE_WORKERS"),
            trace_url: trace_url(v)?,
        })
    }

    /// The secret every console request must carry; an error names `LABBOOK_CONSOLE_TOKEN`
    /// when it is unset or shorter than [`MIN_CONSOLE_TOKEN_CHARS`].
    pub fn require_token(&self) -> Result<&secrecy::SecretString, ConfigError> {
        use secrecy::ExposeSecret;
        let var = "LABBOOK_CONSOLE_TOKEN";
        let token = self.token.as_ref().ok_or_else(|| {
            ConfigError::new(
                var,
                "is not set (a random secret of at least 16 characters, e.g. from `openssl rand -base64 32`)",
            )
        })?;
        if token.expose_secret().chars().count() < MIN_CONSOLE_TOKEN_CHARS {
            return Err(ConfigError::new(
                var,
                format!("is shorter than {MIN_CONSOLE_TOKEN_CHARS} characters"),
            ));
        }
        Ok(token)
    }
}

/// `DATABASE_URL` and `LABBOOK_DB_MAX_CONNECTIONS` (flattened into [`Settings`]).
struct DatabaseSettings {
    url: SecretUrl,
    max_connections: Option<u32>,
}

impl DatabaseSettings {
    fn from_vars(v: &Vars<'_>) -> Result<Self, ConfigError> {
        let url = v
            .get("DATABASE_URL")
            .unwrap_or("postgres://postgres@127.0.0.1:5432/labbook");
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "must start with postgres://",
            ));
        }
        Ok(Self {
            url: SecretUrl::new(url),
            max_connections: v
                .optional_number("LABBOOK_DB_MAX_CONNECTIONS", 1, 1000)?
                .map(|n| n as u32),
        })
    }
}

/// `SMTP_URL` and `MAIL_FROM` (flattened into [`Settings`]).
struct MailSettings {
    smtp_url: SecretUrl,
    from: EmailAddress,
}

impl MailSettings {
    fn from_vars(v: &Vars<'_>) -> Result<Self, ConfigError> {
        let from = EmailAddress::parse(v.get("MAIL_FROM").unwrap_or("labbook@localhost"))
            .map_err(|e| ConfigError::new("MAIL_FROM", e))?;
        let smtp_url = v.get("SMTP_URL").unwrap_or("smtp://127.0.0.1:1025");
        crate::mail::check_url(smtp_url)?;
        Ok(Self {
            smtp_url: SecretUrl::new(smtp_url),
            from,
        })
    }
}

/// The booking rules and the timer (flattened into [`Settings`]).
struct ScheduleSettings {
    rules: BookingRules,
    provision_lead: Duration,
    tick: Duration,
}

impl ScheduleSettings {
    fn from_vars(v: &Vars<'_>) -> Result<Self, ConfigError> {
        let max_users = v.number("LABBOOK_MAX_USERS_PER_BOOKING", 50, 1, 10_000)? as u32;
        let default_duration_minutes = v.number(
            "LABBOOK_DEFAULT_DURATION_MINUTES",
            180,
            u64::from(crate::domain::booking::MIN_DURATION_MINUTES),
            u64::from(crate::domain::booking::MAX_DURATION_MINUTES),
        )? as u32;
        Ok(Self {
            rules: BookingRules {
                max_users,
                default_duration_minutes,
            },
            provision_lead: v.seconds("LABBOOK_PROVISION_LEAD_SECONDS", 900, 0, 7 * 86_400)?,
            tick: Duration::from_millis(v.number(
                "LABBOOK_SCHEDULER_TICK_MS",
                1000,
                10,
                600_000,
            )?),
        })
    }
}

/// Metrics endpoint and log format (flattened into [`Settings`]).
struct TelemetrySettings {
    metrics_addr: Option<SocketAddr>,
    metrics_addr_explicit: bool,
    json_logs: bool,
}

impl TelemetrySettings {
    fn from_vars(v: &Vars<'_>) -> Result<Self, ConfigError> {
        let metrics_addr = match v.get("LABBOOK_METRICS_ADDR").unwrap_or("0.0.0.0:9464") {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|_| {
                ConfigError::new(
                    "LABBOOK_METRICS_ADDR",
                    format!("must be HOST:PORT or off (got {addr:?})"),
                )
            })?),
        };
        Ok(Self {
            metrics_addr,
            metrics_addr_explicit: v.get("LABBOOK_METRICS_ADDR").is_some(),
            json_logs: v.choice(
                "LABBOOK_LOG_FORMAT",
                "text",
                [("text", false), ("json", true)],
            )?,
        })
    }
}

/// Where spans go: OTLP over HTTP, from the standard `OTEL_*` variables (docs/contract.md §4).
/// `Settings::traces` is `None` (nothing exported, no cost) unless
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, and also when
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The sampler
/// (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`) and `OTEL_RESOURCE_ATTRIBUTES` are read
/// by the OpenTelemetry SDK itself.
#[derive(Clone)]
pub struct TraceExport {
    /// The URL spans are sent to: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended.
    pub endpoint: String,
    /// `http/json` rather than `http/protobuf` (the default).
    pub json: bool,
    /// `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`: often a backend's API key, so never logged.
    pub headers: Vec<(String, secrecy::SecretString)>,
    /// `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`, milliseconds (default 10 s).
    pub timeout: Duration,
    /// `OTEL_SERVICE_NAME`; unset: the binary's name (`labbook-provisioner`, …).
    pub service_name: Option<String>,
}

impl std::fmt::Debug for TraceExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TraceExport")
            .field("endpoint", &redacted_endpoint(&self.endpoint))
            .field("json", &self.json)
            .field("headers", &names)
            .field("timeout", &self.timeout)
            .field("service_name", &self.service_name)
            .finish()
    }
}

/// `scheme://host:port/path` of an endpoint, without user information or query.
fn redacted_endpoint(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(u) => format!(
            "{}://{}{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "(unparsable)".to_owned(),
    }
}

/// The first of `keys` that is set, with its name.
fn first_set<'v>(v: &'v Vars<'_>, keys: [&'static str; 2]) -> Option<(&'static str, &'v str)> {
    keys.into_iter()
        .find_map(|k| v.get(k).map(|value| (k, value)))
}

fn trace_export(v: &Vars<'_>) -> Result<Option<TraceExport>, ConfigError> {
    if v.get("OTEL_SDK_DISABLED")
        .is_some_and(|d| d.eq_ignore_ascii_case("true"))
    {
        return Ok(None);
    }
    // A list, case-insensitive (the SDK's rule); labbook has one exporter: otlp.
    if let Some(raw) = v.get("OTEL_TRACES_EXPORTER") {
        let names: Vec<String> = raw
            .split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        if names.iter().any(|n| n == "none") {
            return Ok(None);
        }
        if let Some(other) = names.iter().find(|n| *n != "otlp") {
            return Err(ConfigError::new(
                "OTEL_TRACES_EXPORTER",
                format!(
                    "must be otlp or none: labbook exports traces over OTLP only (got {other:?})"
                ),
            ));
        }
    }
    let endpoint = if let Some(url) = v.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.to_owned())
    } else if let Some(base) = v.get("OTEL_EXPORTER_OTLP_ENDPOINT") {
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("{}/v1/traces", base.trim_end_matches('/')),
        )
    } else {
        return Ok(None);
    };
    let (var, endpoint) = endpoint;
    match url::Url::parse(&endpoint) {
        Ok(u) if !u.username().is_empty() || u.password().is_some() => {
            return Err(ConfigError::new(
                var,
                "must not hold credentials: give them as OTEL_EXPORTER_OTLP_HEADERS",
            ));
        }
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
        _ => {
            return Err(ConfigError::new(
                var,
                "must be an http:// or https:// URL, e.g. http://otel-collector:4318",
            ));
        }
    }
    let json = match first_set(
        v,
        [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
    ) {
        None | Some((_, "http/protobuf")) => false,
        Some((_, "http/json")) => true,
        Some((var, "grpc")) => {
            return Err(ConfigError::new(
                var,
                "grpc is not built into labbook: use http/protobuf (a collector's port 4318)",
            ));
        }
        Some((var, other)) => {
            return Err(ConfigError::new(
                var,
                format!("must be http/protobuf or http/json (got {other:?})"),
            ));
        }
    };
    let mut headers = Vec::new();
    if let Some((var, raw)) = first_set(
        v,
        [
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ],
    ) {
        for (n, pair) in raw.split(',').filter(|p| !p.trim().is_empty()).enumerate() {
            // The value may be a secret: the error names the entry by its place only.
            let bad = || ConfigError::new(var, format!("entry {} is not key=value", n + 1));
            let (key, value) = pair.split_once('=').ok_or_else(bad)?;
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s.trim())
                    .decode_utf8()
                    .ok()
                    .map(|d| d.trim().to_owned())
            };
            let (key, value) = (decode(key).ok_or_else(bad)?, decode(value).ok_or_else(bad)?);
            if key.is_empty() {
                return Err(bad());
            }
            headers.push((key, value.into()));
        }
    }
    let timeout = match first_set(
        v,
        [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ],
    ) {
        None => Duration::from_secs(10),
        Some((var, raw)) => match raw.parse::<u64>() {
            Ok(ms) if (1..=600_000).contains(&ms) => Duration::from_millis(ms),
            _ => {
                return Err(ConfigError::new(
                    var,
                    format!("must be milliseconds from 1 to 600000 (got {raw:?})"),
                ));
            }
        },
    };
    Ok(Some(TraceExport {
        endpoint,
        json,
        headers,
        timeout,
        // OTEL_SERVICE_NAME, else a service.name among the resource attributes.
        service_name: v.string("OTEL_SERVICE_NAME").or_else(|| {
            let attributes = v.get("OTEL_RESOURCE_ATTRIBUTES")?;
            attributes.split(',').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                let value = percent_encoding::percent_decode_str(value.trim())
                    .decode_utf8()
                    .ok()?;
                (key.trim() == "service.name" && !value.trim().is_empty())
                    .then(|| value.trim().to_owned())
            })
        }),
    }))
}

/// Reads a `LABBOOK_CONFIG` file. A malformed line is reported by its number only: it may
/// hold a secret.
fn read_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            "LABBOOK_CONFIG",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    parse_file(&text).map_err(|line| {
        ConfigError::new(
            "LABBOOK_CONFIG",
            format!("{} line {line} is not KEY=VALUE", path.display()),
        )
    })
}

/// Parses `KEY=VALUE` lines: blank lines and `#` comments are skipped, `export ` before the key
/// is allowed, and the value may be in matching single or double quotes (taken literally: no
/// escapes, no `$` substitution, one line). An unquoted value ends at ` #` (a comment). A key
/// given twice takes its last value. Err: the number (from 1) of the first malformed line.
fn parse_file(text: &str) -> Result<HashMap<String, String>, usize> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut vars = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = parse_line(line).ok_or(index + 1)?;
        vars.insert(key.to_owned(), value.to_owned());
    }
    Ok(vars)
}

fn parse_line(line: &str) -> Option<(&str, &str)> {
    let line = line
        .strip_prefix("export")
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .map_or(line, str::trim_start);
    let (key, value) = line.split_once('=')?;
    let key = key.trim_end();
    let mut chars = key.chars();
    let valid_key = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !valid_key {
        return None;
    }
    Some((key, parse_value(value.trim_start())?))
}

fn parse_value(raw: &str) -> Option<&str> {
    if let Some(quote) = raw.chars().next().filter(|c| matches!(c, '"' | '\'')) {
        let inner = &raw[1..];
        let end = inner.find(quote)?;
        let after = inner[end + 1..].trim_start();
        return (after.is_empty() || after.starts_with('#')).then_some(&inner[..end]);
    }
    let comment = raw
        .match_indices('#')
        .map(|(i, _)| i)
        .find(|&i| raw[..i].ends_with(char::is_whitespace));
    Some(raw[..comment.unwrap_or(raw.len())].trim_end())
}

struct Vars<'a>(&'a HashMap<String, String>);

impl Vars<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key).map(str::to_owned)
    }

    /// One of a few words, each standing for a value; the error lists the words.
    fn choice<T: Copy, const N: usize>(
        &self,
        key: &'static str,
        default: &str,
        options: [(&str, T); N],
    ) -> Result<T, ConfigError> {
        let raw = self.get(key).unwrap_or(default);
        if let Some((_, value)) = options.iter().find(|(word, _)| *word == raw) {
            return Ok(*value);
        }
        let words: Vec<&str> = options.iter().map(|(word, _)| *word).collect();
        Err(ConfigError::new(
            key,
            format!("must be {} (got {raw:?})", words.join(" or ")),
        ))
    }

    fn number(
        &self,
        key: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        Ok(self.optional_number(key, min, max)?.unwrap_or(default))
    }

    fn optional_number(
        &self,
        key: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ConfigError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        match raw.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ConfigError::new(
                key,
                format!("must be a whole number from {min} to {max} (got {raw:?})"),
            )),
        }
    }

    fn seconds(
        &self,
        key: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.number(key, default, min, max)?))
    }

    fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn durations_ms(
        &self,
        key: &'static str,
        default: &[u64],
    ) -> Result<Vec<Duration>, ConfigError> {
        let Some(raw) = self.get(key) else {
            return Ok(default
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect());
        };
        let parsed: Result<Vec<u64>, _> = raw.split(',').map(|s| s.trim().parse::<u64>()).collect();
        match parsed {
            Ok(list) if !list.is_empty() && list.iter().all(|ms| *ms >= 10) => {
                Ok(list.into_iter().map(Duration::from_millis).collect())
            }
            _ => Err(ConfigError::new(
                key,
                format!(
                    "must be a comma-separated list of delays in milliseconds, each at least 10 (got {raw:?})"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_map(&map)
    }

    #[test]
    fn defaults_work_for_local_use() {
        let s = with(&[]).unwrap();
        assert_eq!(s.ec2.users_per_instance, 2);
        assert_eq!(s.rules.max_users, 50);
        assert_eq!(s.rules.default_duration_minutes, 180);
        assert_eq!(s.provision_lead, Duration::from_secs(900));
        assert_eq!(s.ec2.admin_username.as_str(), "labadmin");
        assert_eq!(s.ec2.bootstrap, Bootstrap::JupyterHub);
        assert_eq!(s.broker.max_attempts, 5);
        assert!(s.require_secret_key().is_err());
    }

    #[test]
    fn traces_are_exported_only_when_an_otlp_endpoint_is_set() {
        assert!(with(&[]).unwrap().traces.is_none(), "off by default");
        let on = with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        let t = on.traces.unwrap();
        assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
        assert!(!t.json, "http/protobuf by default");
        assert_eq!(t.timeout, Duration::from_secs(10));
        let own = with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://traces.example/otlp",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-api-key=s3cr%3Dt&x+y,tenant=labs",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_SERVICE_NAME", "labbook-eu"),
        ])
        .unwrap()
        .traces
        .unwrap();
        assert_eq!(
            own.endpoint, "https://traces.example/otlp",
            "the signal's own, as it is"
        );
        assert!(own.json);
        assert_eq!(own.timeout, Duration::from_millis(2500));
        assert_eq!(own.service_name.as_deref(), Some("labbook-eu"));
        use secrecy::ExposeSecret;
        let headers: Vec<(&str, &str)> = own
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose_secret()))
            .collect();
        assert_eq!(headers, [("x-api-key", "s3cr=t&x+y"), ("tenant", "labs")]);
        let shown = format!("{own:?}");
        assert!(
            !shown.contains("s3cr") && shown.contains("x-api-key"),
            "{shown}"
        );
        let named = with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,service.name=labbook%20eu",
            ),
            ("OTEL_TRACES_EXPORTER", "OTLP"),
        ])
        .unwrap();
        assert_eq!(
            named.traces.unwrap().service_name.as_deref(),
            Some("labbook eu")
        );
        let err = with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://user:pw@c:4318")]).unwrap_err();
        assert!(!err.to_string().contains("pw@"), "{err}");
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_TRACES_EXPORTER", "otlp, None"),
        ] {
            let s = with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), off]).unwrap();
            assert!(s.traces.is_none(), "{off:?}");
        }
        for (var, bad) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign-secret"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ] {
            let err =
                with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), (var, bad)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let err = with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]).unwrap_err();
        assert_eq!(err.var, "OTEL_EXPORTER_OTLP_ENDPOINT");
    }

    #[test]
    fn the_trace_viewer_url_needs_the_trace_id() {
        assert!(with(&[]).unwrap().console.trace_url.is_none());
        let ok = with(&[(
            "LABBOOK_TRACE_URL",
            "https://grafana.example/explore?traceId={trace_id}",
        )]);
        assert!(ok.unwrap().console.trace_url.is_some());
        for bad in [
            "http://jaeger:16686/trace/",
            "javascript:alert({trace_id})",
            "{trace_id}",
        ] {
            let err = with(&[("LABBOOK_TRACE_URL", bad)]).unwrap_err();
            assert_eq!(err.var, "LABBOOK_TRACE_URL", "{bad}");
        }
    }

    #[test]
    fn the_console_token_is_required_long_and_never_printed() {
        let none = with(&[]).unwrap();
        assert_eq!(none.console.listen.to_string(), "127.0.0.1:8080");
        let err = none.console.require_token().unwrap_err();
        assert_eq!(err.var, "LABBOOK_CONSOLE_TOKEN");
        let short = with(&[("LABBOOK_CONSOLE_TOKEN", "0123456789abcde")]).unwrap();
        assert!(short.console.require_token().is_err());
        let good = with(&[("LABBOOK_CONSOLE_TOKEN", "0123456789abcdef")]).unwrap();
        assert!(good.console.require_token().is_ok());
        assert!(!format!("{good:?}").contains("0123456789abcdef"));
        let bad = with(&[("LABBOOK_CONSOLE_LISTEN", "localhost")]).unwrap_err();
        assert_eq!(bad.var, "LABBOOK_CONSOLE_LISTEN");
    }

    #[test]
    fn urls_do_not_print_their_passwords() {
        let s = with(&[
            ("AMQP_URL", "amqp://user:hunter2@mq:5672/%2f"),
            ("DATABASE_URL", "postgres://app:hunter2@db/labbook"),
            ("SMTP_URL", "smtps://mail:hunter2@relay:465"),
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
            (
                "LABBOOK_SECRET_KEY",
                &crate::crypto::SecretKey::generate_base64(),
            ),
        ])
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("REDACTED"));
        assert_eq!(
            s.database_url.expose_secret(),
            "postgres://app:hunter2@db/labbook"
        );
    }

    #[test]
    fn amqp_url_may_name_the_nodes_of_a_cluster() {
        let urls = "amqp://u:hunter2@rmq-0:5672/%2f, amqp://u:hunter2@rmq-1:5672/%2f";
        let s = with(&[("AMQP_URL", urls)]).unwrap();
        let listed: Vec<&str> =
            crate::broker::broker_urls(s.broker.amqp_url.expose_secret()).collect();
        assert_eq!(
            listed,
            [
                "amqp://u:hunter2@rmq-0:5672/%2f",
                "amqp://u:hunter2@rmq-1:5672/%2f"
            ]
        );
        let shown = format!("{:?}", s.broker.amqp_url);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("rmq-1"), "{shown}");
        let err = with(&[("AMQP_URL", "amqp://u:hunter2@rmq-0/%2f,http://rmq-1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker 2 of 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(with(&[("AMQP_URL", " , ")]).is_err());
    }

    #[test]
    fn errors_name_the_variable() {
        let cases = [
            ("LABBOOK_USERS_PER_INSTANCE", "0"),
            ("LABBOOK_BOOTSTRAP", "windows"),
            ("LABBOOK_SECRET_KEY", "short"),
            ("MAIL_FROM", "not an address"),
            ("SMTP_URL", "http://x"),
            ("AMQP_URL", "http://x"),
            ("AMQP_URL", "amqp://host:notaport/"),
            ("LABBOOK_READY_PROBE_CA_FILE", "/nonexistent/ca.pem"),
            ("LABBOOK_READY_PROBE_CA_FILE", "Cargo.toml"),
            ("LABBOOK_RETRY_DELAYS_MS", "1,x"),
            ("LABBOOK_ADMIN_USERNAME", "Root"),
            ("LABBOOK_HTTPS", "on"),
            ("LABBOOK_ACME_DIRECTORY", "http://acme.example/directory"),
            ("LABBOOK_ACME_DIRECTORY", "not a url"),
            ("LABBOOK_ACME_EMAIL", "nobody"),
        ];
        for (var, value) in cases {
            let err = with(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(
                err.to_string()
                    .starts_with(&format!("configuration error: {var}: "))
            );
        }
    }

    #[test]
    fn https_defaults_to_lets_encrypt_and_can_be_turned_off() {
        let s = with(&[]).unwrap();
        let acme = s.ec2.https.acme().expect("HTTPS is on by default");
        assert_eq!(acme.directory, LETS_ENCRYPT_DIRECTORY);
        assert_eq!(acme.email, None);
        let staging = "https://acme-staging-v02.api.letsencrypt.org/directory";
        let s = with(&[
            ("LABBOOK_ACME_DIRECTORY", staging),
            ("LABBOOK_ACME_EMAIL", "ops@example.org"),
        ])
        .unwrap();
        let acme = s.ec2.https.acme().unwrap();
        assert_eq!(acme.directory, staging);
        assert_eq!(acme.email.as_ref().unwrap().as_str(), "ops@example.org");
        let off = with(&[("LABBOOK_HTTPS", "off")]).unwrap();
        assert_eq!(off.ec2.https, Https::Off);
        let err = error("LABBOOK_HTTPS", "yes").to_string();
        assert!(err.contains("letsencrypt or off"), "{err}");
    }

    #[test]
    fn a_lead_that_would_outlive_lets_encrypts_certificate_is_refused() {
        // 160 h - 24 h - 1 h = 135 h.
        let most = (135 * 3600).to_string();
        let too_early = (135 * 3600 + 1).to_string();
        assert!(with(&[("LABBOOK_PROVISION_LEAD_SECONDS", most.as_str())]).is_ok());
        let err = error("LABBOOK_PROVISION_LEAD_SECONDS", &too_early).to_string();
        assert!(err.contains("at most 486000 s"), "{err}");
        assert!(
            err.contains("last 160 hours") && err.contains("a 24-hour booking"),
            "{err}"
        );
        let staging = "https://acme-staging-v02.api.letsencrypt.org/directory";
        let refused = with(&[
            ("LABBOOK_PROVISION_LEAD_SECONDS", too_early.as_str()),
            ("LABBOOK_ACME_DIRECTORY", staging),
        ]);
        assert!(refused.is_err(), "staging's certificates last as long");
        // Without Let's Encrypt's certificates, the lead is the scheduler's alone.
        for other in [
            [("LABBOOK_HTTPS", "off")],
            [("LABBOOK_BOOTSTRAP", "ssh")],
            [("LABBOOK_ACME_DIRECTORY", "https://acme.example/directory")],
        ] {
            let vars = [
                other[0],
                ("LABBOOK_PROVISION_LEAD_SECONDS", too_early.as_str()),
            ];
            assert!(with(&vars).is_ok(), "{other:?}");
        }
    }

    fn error(var: &str, value: &str) -> ConfigError {
        let err = with(&[(var, value)]).unwrap_err();
        assert_eq!(err.var, var);
        err
    }

    #[test]
    fn the_base_image_is_required_only_to_build_an_image() {
        let none = with(&[]).unwrap();
        assert_eq!(
            none.require_base_ami_id().unwrap_err().var,
            "LABBOOK_BASE_AMI_ID"
        );
        let set = with(&[("LABBOOK_BASE_AMI_ID", " ami-0abc ")]).unwrap();
        assert_eq!(set.require_base_ami_id().unwrap(), "ami-0abc");
        assert!(
            set.require_ami_id().is_err(),
            "the two images are separate settings"
        );
    }

    #[test]
    fn publish_timeout_defaults_to_30_seconds_and_is_bounded() {
        assert_eq!(
            with(&[]).unwrap().broker.publish_timeout,
            Duration::from_secs(30)
        );
        let s = with(&[("LABBOOK_PUBLISH_TIMEOUT_SECONDS", "600")]).unwrap();
        assert_eq!(s.broker.publish_timeout, Duration::from_secs(600));
        for bad in ["0", "601", "1.5", "soon"] {
            error("LABBOOK_PUBLISH_TIMEOUT_SECONDS", bad);
        }
    }

    #[test]
    fn declare_topology_is_true_unless_false() {
        assert!(with(&[]).unwrap().broker.declare_topology);
        assert!(
            with(&[("LABBOOK_DECLARE_TOPOLOGY", "true")])
                .unwrap()
                .broker
                .declare_topology
        );
        assert!(
            !with(&[("LABBOOK_DECLARE_TOPOLOGY", "false")])
                .unwrap()
                .broker
                .declare_topology
        );
        for bad in ["no", "0", "FALSE", "yes"] {
            let err = error("LABBOOK_DECLARE_TOPOLOGY", bad);
            assert!(err.to_string().contains("must be true or false"), "{err}");
        }
    }

    #[test]
    fn installation_defaults_to_default_and_is_checked() {
        assert_eq!(with(&[]).unwrap().ec2.installation, "default");
        let name = "a".repeat(32);
        for good in ["staging-2", "x", name.as_str()] {
            let s = with(&[("LABBOOK_INSTALLATION", good)]).unwrap();
            assert_eq!(s.ec2.installation, good);
        }
        let too_long = "a".repeat(33);
        for bad in ["Prod", "a_b", "a b", "é", too_long.as_str()] {
            error("LABBOOK_INSTALLATION", bad);
        }
    }

    #[test]
    fn boot_waits_are_bounded_by_the_boot_not_by_a_delivery() {
        let s = with(&[]).unwrap();
        assert_eq!(s.ec2.running_timeout, Duration::from_secs(600));
        assert_eq!(s.ec2.ready_timeout, Duration::from_secs(900));
        // No delivery is held through a boot: waits longer than a consumer_timeout are fine.
        let long = [
            ("LABBOOK_RUNNING_TIMEOUT_SECONDS", "1500"),
            ("LABBOOK_READY_TIMEOUT_SECONDS", "3600"),
        ];
        let s = with(&long).unwrap();
        assert_eq!(s.ec2.ready_timeout, Duration::from_secs(3600));
        error("LABBOOK_RUNNING_TIMEOUT_SECONDS", "0");
        error("LABBOOK_READY_TIMEOUT_SECONDS", "soon");
    }

    #[test]
    fn capacity_fallbacks_come_in_order_and_the_lists_win() {
        let one = with(&[("LABBOOK_INSTANCE_TYPE", "t3.micro")]).unwrap();
        assert_eq!(one.ec2.instance_types, ["t3.micro"]);
        let both = [
            ("LABBOOK_INSTANCE_TYPE", "t3.micro"),
            ("LABBOOK_INSTANCE_TYPES", "t3.small, t3a.small"),
            ("LABBOOK_SUBNET_ID", "subnet-x"),
            ("LABBOOK_SUBNET_IDS", "subnet-a,subnet-b"),
        ];
        let s = with(&both).unwrap();
        assert_eq!(s.ec2.instance_type, "t3.small");
        assert_eq!(s.ec2.subnet_id.as_deref(), Some("subnet-a"));
        let order: Vec<String> = s.ec2.offerings().iter().map(|o| o.to_string()).collect();
        assert_eq!(
            order,
            [
                "t3.small in subnet-a",
                "t3.small in subnet-b",
                "t3a.small in subnet-a",
                "t3a.small in subnet-b"
            ]
        );
        let default = with(&[]).unwrap();
        assert_eq!(default.ec2.offerings().len(), 1);
        assert_eq!(default.ec2.offerings()[0].to_string(), "t3.small");
        let prices = with(&[("LABBOOK_PRICES", "t3.small=0.0208")]).unwrap();
        assert!(!prices.ec2.prices.is_empty());
        error("LABBOOK_PRICES", "t3.small:0.0208");
    }

    #[test]
    fn the_expected_boot_follows_what_ready_means() {
        let bootstrap = [("LABBOOK_READINESS", "bootstrap")];
        assert_eq!(with(&bootstrap).unwrap().ec2.expected_boot.as_secs(), 600);
        let ssh = [
            ("LABBOOK_READINESS", "bootstrap"),
            ("LABBOOK_BOOTSTRAP", "ssh"),
        ];
        assert_eq!(with(&ssh).unwrap().ec2.expected_boot.as_secs(), 120);
        let running = [("LABBOOK_READINESS", "running")];
        assert_eq!(with(&running).unwrap().ec2.expected_boot.as_secs(), 0);
        let set = [("LABBOOK_EXPECTED_BOOT_SECONDS", "90")];
        assert_eq!(with(&set).unwrap().ec2.expected_boot.as_secs(), 90);
        error("LABBOOK_EXPECTED_BOOT_SECONDS", "-1");
    }

    #[test]
    fn db_max_connections_is_optional_and_bounded() {
        assert_eq!(with(&[]).unwrap().db_max_connections, None);
        let s = with(&[("LABBOOK_DB_MAX_CONNECTIONS", "1000")]).unwrap();
        assert_eq!(s.db_max_connections, Some(1000));
        let s = with(&[("LABBOOK_DB_MAX_CONNECTIONS", "1")]).unwrap();
        assert_eq!(s.db_max_connections, Some(1));
        for bad in ["0", "1001", "-1", "many"] {
            error("LABBOOK_DB_MAX_CONNECTIONS", bad);
        }
    }

    fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("labbook-config-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn config_file_lines_are_parsed() {
        let path = temp_file(
            "good",
            "\u{feff}# a comment\n\n  AMQP_URL = amqp://u:p@mq:5672/%2f\r\n\
             export LABBOOK_PREFETCH=3 # inline comment\n\
             MAIL_FROM=\"ops@example.org\"\n\
             LABBOOK_SECRET_KEY='a#b\"c$d'  # quoted\n\
             LABBOOK_BOOTSTRAP=jupyterhub\nLABBOOK_BOOTSTRAP=ssh\n\
             SMTP_URL=\n",
        );
        let vars = read_file(&path);
        std::fs::remove_file(&path).unwrap();
        let vars = vars.unwrap();
        assert_eq!(vars["AMQP_URL"], "amqp://u:p@mq:5672/%2f");
        assert_eq!(vars["LABBOOK_PREFETCH"], "3");
        assert_eq!(vars["MAIL_FROM"], "ops@example.org");
        assert_eq!(vars["LABBOOK_SECRET_KEY"], "a#b\"c$d");
        assert_eq!(vars["LABBOOK_BOOTSTRAP"], "ssh");
        assert_eq!(vars["SMTP_URL"], "");
        assert_eq!(vars.len(), 6);
    }

    #[test]
    fn a_bad_config_line_is_named_by_its_number_not_its_content() {
        let bad_lines = [
            "hunter2-is-the-password",
            "DATABASE_URL=\"postgres://app:hunter2@db/labbook",
            "DATABASE_URL='postgres://app:hunter2@db/labbook' trailing",
            "postgres://app:hunter2@db/labbook=x",
            "=hunter2",
        ];
        for (i, bad) in bad_lines.iter().enumerate() {
            let path = temp_file(
                &format!("bad-{i}"),
                &format!("# labbook\n\nAMQP_URL=amqp://mq\n{bad}\nMAIL_FROM=a@b.org\n"),
            );
            let err = read_file(&path).unwrap_err();
            std::fs::remove_file(&path).unwrap();
            assert_eq!(err.var, "LABBOOK_CONFIG");
            let shown = err.to_string();
            assert_eq!(
                shown,
                format!(
                    "configuration error: LABBOOK_CONFIG: {} line 4 is not KEY=VALUE",
                    path.display()
                )
            );
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    #[test]
    fn a_missing_config_file_is_named() {
        let path = std::env::temp_dir().join("labbook-config-does-not-exist");
        let err = read_file(&path).unwrap_err();
        assert_eq!(err.var, "LABBOOK_CONFIG");
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
