//! Email: the SMTP transport that `SMTP_URL` describes.

use std::time::Duration;

use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, Tokio1Executor};

use crate::config::ConfigError;

/// The async SMTP transport for `url`: `smtp://host:port` (plain, for local sinks),
/// `smtp://user:pass@host:587?tls=required` (STARTTLS) or `smtps://user:pass@host:465`
/// (implicit TLS). Connections are pooled; each SMTP command times out after 20 s.
/// Must be called inside the tokio runtime (the pool runs a task).
pub fn transport_from_url(url: &str) -> Result<AsyncSmtpTransport<Tokio1Executor>, ConfigError> {
    Ok(builder(url)?
        .timeout(Some(Duration::from_secs(20)))
        .pool_config(
            PoolConfig::new()
                .max_size(4)
                .idle_timeout(Duration::from_secs(60)),
        )
        .build())
}

/// Checks `SMTP_URL` without connecting (usable outside the runtime).
pub fn check_url(url: &str) -> Result<(), ConfigError> {
    builder(url).map(|_| ())
}

fn builder(url: &str) -> Result<lettre::transport::smtp::AsyncSmtpTransportBuilder, ConfigError> {
    if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
        return Err(ConfigError::new(
            "SMTP_URL",
            "must start with smtp:// or smtps://",
        ));
    }
    AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map_err(|e| ConfigError::new("SMTP_URL", format!("is not a usable SMTP URL: {e}")))
}
