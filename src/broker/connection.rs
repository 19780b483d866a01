//! Connecting to the broker, and reconnecting with capped exponential backoff and jitter.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

/// One connection attempt. `name` shows in the broker's connection list.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// Delays between reconnection attempts: 200 ms doubling to 30 s, with jitter, forever.
pub fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Connects, retrying until it works or `shutdown` fires (then `None`).
pub async fn connect_with_retry(
    url: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    let mut delays = reconnect_delays();
    loop {
        match connect(url, name).await {
            Ok(conn) => return Some(conn),
            Err(err) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot reach the broker");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
