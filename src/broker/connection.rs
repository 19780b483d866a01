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

/// How long one broker of `AMQP_URL` may take to accept a connection before the next is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection attempt. `urls` is `AMQP_URL`: one broker, or the nodes of a cluster
/// separated by commas, tried in turn until one answers (a node that went away is passed over
/// at the next attempt). `name` shows in the broker's connection list.
pub async fn connect(urls: &str, name: &str) -> lapin::Result<Connection> {
    let mut last = None;
    for (i, url) in broker_urls(urls).enumerate() {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props));
        let err = match attempt.await {
            Ok(Ok(conn)) => {
                if i > 0 {
                    tracing::info!(broker = %endpoint(url), "connected to another broker of AMQP_URL");
                }
                return Ok(conn);
            }
            Ok(Err(err)) => err,
            Err(_) => lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            )),
        };
        tracing::debug!(broker = %endpoint(url), error = %err, "broker did not answer");
        last = Some(err);
    }
    Err(last.unwrap_or_else(|| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "AMQP_URL names no broker",
        ))
    }))
}

/// The brokers `AMQP_URL` names, in order.
pub fn broker_urls(urls: &str) -> impl Iterator<Item = &str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// A broker's host and port, for logs (never its credentials).
fn endpoint(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(u) => format!("{}:{}", u.authority.host, u.authority.port),
        Err(_) => "[unparseable URL]".to_owned(),
    }
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
