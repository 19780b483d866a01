//! Connecting to the broker, opening confirmed channels, and retrying with capped exponential
//! backoff and jitter until it works or the process stops.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use super::topology::Topology;

/// One connection attempt. `name` shows in the broker's connection list.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// A channel in confirm mode on which `topology` is in place (declared, or checked when this
/// process may not declare it): the one way labbook opens a channel it publishes on.
pub async fn confirmed_channel(conn: &Connection, topology: &Topology) -> lapin::Result<Channel> {
    let mut channel = conn.create_channel().await?;
    topology.prepare(conn, &mut channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Delays between reconnection attempts: 200 ms doubling to 30 s, with jitter, forever.
pub fn reconnect_delays() -> impl Iterator<Item = Duration> {
    backoff().build()
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
}

/// Runs `attempt` until it succeeds, waiting [`reconnect_delays`] between failures and logging
/// each failure as `what`; `None` once `shutdown` fires. The reconnect and start-up loops of
/// every worker go through here.
pub async fn retry_until_cancelled<T, E, F, Fut>(
    what: &'static str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let retried = attempt.retry(backoff()).notify(|err: &E, delay: Duration| {
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "{what}");
    });
    tokio::select! {
        _ = shutdown.cancelled() => None,
        result = retried => result.ok(),
    }
}

/// Connects, retrying until it works or `shutdown` fires (then `None`).
pub async fn connect_with_retry(
    url: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    retry_until_cancelled("cannot reach the broker", shutdown, || connect(url, name)).await
}
