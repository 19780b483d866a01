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
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("REDACTED"));
                write!(f, "{:?}", u.as_str())
            }
            Ok(u) => write!(f, "{:?}", u.as_str()),
            Err(_) => f.write_str("\"[unparseable URL]\""),
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
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    pub allowed_cidrs: Vec<String>,
    pub users_per_instance: u32,
    pub bootstrap: Bootstrap,
    pub admin_username: Username,
    pub launch_concurrency: usize,
    pub running_timeout: Duration,
    /// How often the provisioner looks for machines of bookings that are over.
    pub sweep_interval: Duration,
    /// `AWS_REGION` (else the SDK's chain decides).
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL`: an EC2 API emulator in tests.
    pub endpoint_url: Option<String>,
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` when both are set (else the SDK's chain).
    pub static_credentials: Option<(String, secrecy::SecretString)>,
}

/// Retry tiers and consumer limits, shared by every stage.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub amqp_url: SecretUrl,
    pub prefetch: u16,
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub shutdown_timeout: Duration,
}

/// Everything a labbook process may need. Binaries ask for the parts they use with the
/// `require_*` methods, so a missing secret stops only the processes that need it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub database_url: SecretUrl,
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
        let retry_delays =
            v.durations_ms("LABBOOK_RETRY_DELAYS_MS", &[1_000, 10_000, 60_000, 600_000])?;
        let max_attempts = v.number(
            "LABBOOK_MAX_ATTEMPTS",
            retry_delays.len() as u64 + 1,
            1,
            100,
        )? as u32;
        let bootstrap = match v.get("LABBOOK_BOOTSTRAP").unwrap_or("jupyterhub") {
            "jupyterhub" => Bootstrap::JupyterHub,
            "ssh" => Bootstrap::Ssh,
            other => {
                return Err(ConfigError::new(
                    "LABBOOK_BOOTSTRAP",
                    format!("must be jupyterhub or ssh (got {other:?})"),
                ));
            }
        };
        let admin = v.get("LABBOOK_ADMIN_USERNAME").unwrap_or("labadmin");
        let admin_username =
            Username::parse(admin).map_err(|e| ConfigError::new("LABBOOK_ADMIN_USERNAME", e))?;
        let mail_from = EmailAddress::parse(v.get("MAIL_FROM").unwrap_or("labbook@localhost"))
            .map_err(|e| ConfigError::new("MAIL_FROM", e))?;
        let smtp_url = v
            .get("SMTP_URL")
            .unwrap_or("smtp://127.0.0.1:1025")
            .to_owned();
        crate::mail::check_url(&smtp_url)?;
        let amqp_url = v
            .get("AMQP_URL")
            .unwrap_or("amqp://guest:guest@127.0.0.1:5672/%2f")
            .to_owned();
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            return Err(ConfigError::new(
                "AMQP_URL",
                "must start with amqp:// or amqps://",
            ));
        }
        amqp_url.parse::<lapin::uri::AMQPUri>().map_err(|_| {
            ConfigError::new(
                "AMQP_URL",
                "is not a valid AMQP URL (amqp://user:pass@host:5672/vhost)",
            )
        })?;
        let database_url = v
            .get("DATABASE_URL")
            .unwrap_or("postgres://postgres@127.0.0.1:5432/labbook")
            .to_owned();
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "must start with postgres://",
            ));
        }
        let metrics_addr = match v.get("LABBOOK_METRICS_ADDR").unwrap_or("0.0.0.0:9464") {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|_| {
                ConfigError::new(
                    "LABBOOK_METRICS_ADDR",
                    format!("must be HOST:PORT or off (got {addr:?})"),
                )
            })?),
        };
        let json_logs = match v.get("LABBOOK_LOG_FORMAT").unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => {
                return Err(ConfigError::new(
                    "LABBOOK_LOG_FORMAT",
                    format!("must be text or json (got {other:?})"),
                ));
            }
        };
        let secret_key = v
            .get("LABBOOK_SECRET_KEY")
            .map(|raw| {
                SecretKey::from_base64(raw).map_err(|e| ConfigError::new("LABBOOK_SECRET_KEY", e))
            })
            .transpose()?;
        let max_users = v.number("LABBOOK_MAX_USERS_PER_BOOKING", 50, 1, 10_000)? as u32;
        let default_duration_minutes = v.number(
            "LABBOOK_DEFAULT_DURATION_MINUTES",
            180,
            u64::from(crate::domain::booking::MIN_DURATION_MINUTES),
            u64::from(crate::domain::booking::MAX_DURATION_MINUTES),
        )? as u32;

        Ok(Self {
            broker: BrokerSettings {
                amqp_url: SecretUrl::new(amqp_url),
                prefetch: v.number("LABBOOK_PREFETCH", 8, 1, 1000)? as u16,
                retry_delays,
                max_attempts,
                shutdown_timeout: Duration::from_secs(v.number(
                    "LABBOOK_SHUTDOWN_TIMEOUT_SECONDS",
                    30,
                    1,
                    3600,
                )?),
            },
            database_url: SecretUrl::new(database_url),
            smtp_url: SecretUrl::new(smtp_url),
            mail_from,
            ec2: Ec2Settings {
                ami_id: v.get("LABBOOK_AMI_ID").map(str::to_owned),
                instance_type: v
                    .get("LABBOOK_INSTANCE_TYPE")
                    .unwrap_or("t3.micro")
                    .to_owned(),
                subnet_id: v.get("LABBOOK_SUBNET_ID").map(str::to_owned),
                security_group_ids: v.list("LABBOOK_SECURITY_GROUP_IDS"),
                key_name: v.get("LABBOOK_KEY_NAME").map(str::to_owned),
                allowed_cidrs: {
                    let cidrs = v.list("LABBOOK_ALLOWED_CIDRS");
                    if cidrs.is_empty() {
                        vec!["0.0.0.0/0".to_owned()]
                    } else {
                        cidrs
                    }
                },
                users_per_instance: v.number("LABBOOK_USERS_PER_INSTANCE", 2, 1, 1000)? as u32,
                bootstrap,
                admin_username,
                launch_concurrency: v.number("LABBOOK_LAUNCH_CONCURRENCY", 4, 1, 64)? as usize,
                running_timeout: Duration::from_secs(v.number(
                    "LABBOOK_RUNNING_TIMEOUT_SECONDS",
                    600,
                    1,
                    7200,
                )?),
                sweep_interval: Duration::from_secs(v.number(
                    "LABBOOK_SWEEP_INTERVAL_SECONDS",
                    300,
                    1,
                    86_400,
                )?),
                region: v
                    .get("AWS_REGION")
                    .or(v.get("AWS_DEFAULT_REGION"))
                    .map(str::to_owned),
                endpoint_url: v.get("AWS_ENDPOINT_URL").map(str::to_owned),
                static_credentials: v
                    .get("AWS_ACCESS_KEY_ID")
                    .zip(v.get("AWS_SECRET_ACCESS_KEY"))
                    .map(|(id, secret)| (id.to_owned(), secret.to_owned().into())),
            },
            rules: BookingRules {
                max_users,
                default_duration_minutes,
            },
            provision_lead: Duration::from_secs(v.number(
                "LABBOOK_PROVISION_LEAD_SECONDS",
                900,
                0,
                7 * 86_400,
            )?),
            scheduler_tick: Duration::from_millis(v.number(
                "LABBOOK_SCHEDULER_TICK_MS",
                1000,
                10,
                600_000,
            )?),
            metrics_addr,
            metrics_addr_explicit: v.get("LABBOOK_METRICS_ADDR").is_some(),
            json_logs,
            secret_key,
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
}

fn read_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let iter = dotenvy::from_path_iter(path).map_err(|e| {
        ConfigError::new(
            "LABBOOK_CONFIG",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    iter.map(|item| {
        item.map_err(|e| ConfigError::new("LABBOOK_CONFIG", format!("{}: {e}", path.display())))
    })
    .collect()
}

struct Vars<'a>(&'a HashMap<String, String>);

impl Vars<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn number(
        &self,
        key: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let Some(raw) = self.get(key) else {
            return Ok(default);
        };
        match raw.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                key,
                format!("must be a whole number from {min} to {max} (got {raw:?})"),
            )),
        }
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
    fn errors_name_the_variable() {
        let cases = [
            ("LABBOOK_USERS_PER_INSTANCE", "0"),
            ("LABBOOK_BOOTSTRAP", "windows"),
            ("LABBOOK_SECRET_KEY", "short"),
            ("MAIL_FROM", "not an address"),
            ("SMTP_URL", "http://x"),
            ("AMQP_URL", "http://x"),
            ("AMQP_URL", "amqp://host:notaport/"),
            ("LABBOOK_RETRY_DELAYS_MS", "1,x"),
            ("LABBOOK_ADMIN_USERNAME", "Root"),
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
}
