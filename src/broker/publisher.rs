//! Publishing with publisher confirms: a message counts as sent only once the broker has
//! confirmed it and routed it to a queue.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error while publishing: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key {0:?}: declare the topology (`labbook topology`)")]
    Unroutable(String),
    #[error(
        "the broker did not confirm the message within {0:?} (a memory or disk alarm, a lost quorum?)"
    )]
    Unconfirmed(Duration),
}

/// How long a publish waits for the broker's confirm unless told otherwise
/// (`LABBOOK_PUBLISH_TIMEOUT_SECONDS`).
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes `body` (mandatory) and waits at most `timeout` for the broker's confirm: a publish
/// that is not confirmed in time has failed. The channel must be in confirm mode.
pub async fn publish_confirmed(
    channel: &Channel,
    (exchange, routing_key): (&str, &str),
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), PublishError> {
    within(
        timeout,
        publish(channel, (exchange, routing_key), body, properties, true),
    )
    .await
}

/// Publishes an event to `labbook.events` and waits at most `timeout` for the broker's
/// confirm. Not mandatory: an event nobody has bound a queue for is dropped by the broker,
/// which is what an upstream that does not follow events asks.
pub async fn publish_event_confirmed(
    channel: &Channel,
    route: (&str, &str),
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), PublishError> {
    within(timeout, publish(channel, route, body, properties, false)).await
}

/// A publish that is not confirmed within `timeout` has failed.
async fn within(
    timeout: Duration,
    publish: impl std::future::Future<Output = Result<(), PublishError>>,
) -> Result<(), PublishError> {
    tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| PublishError::Unconfirmed(timeout))?
}

async fn publish(
    channel: &Channel,
    (exchange, routing_key): (&str, &str),
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<(), PublishError> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            body,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(routing_key.to_owned())),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}

/// Properties of a message labbook publishes: JSON, persistent, with an id and a time, and the
/// trace it continues ([`super::trace::stamp_outgoing`]).
pub fn json_properties(message_id: &str) -> BasicProperties {
    super::trace::stamp_outgoing(unstamped_properties(message_id))
}

/// [`json_properties`] without the trace headers.
pub fn unstamped_properties(message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
}
