//! The console's one broker connection, made on first use and made again when it is lost;
//! every operation opens its own channel on it.

use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::broker::{
    EXCHANGE, PublishError, StageQueue, Topology, confirmed_channel, connect, json_properties,
    publish_confirmed,
};
use crate::config::{BrokerSettings, SecretUrl};

/// How long the console waits for the broker before it says the broker is away.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct BrokerLink {
    url: SecretUrl,
    topology: Topology,
    publish_timeout: Duration,
    conn: Mutex<Option<Arc<Connection>>>,
}

/// What a queue holds and who consumes it now.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct QueueStats {
    pub messages: u32,
    pub consumers: u32,
}

impl BrokerLink {
    pub fn new(settings: &BrokerSettings) -> Self {
        Self {
            url: settings.amqp_url.clone(),
            topology: Topology::from_settings(settings),
            publish_timeout: settings.publish_timeout,
            conn: Mutex::new(None),
        }
    }

    /// The connection, made (again) if there is none or it was lost.
    pub async fn connection(&self) -> anyhow::Result<Arc<Connection>> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let url = self.url.expose_secret();
        // Each further broker of a cluster's list may take its own connect timeout.
        let others = crate::broker::broker_urls(url).count().saturating_sub(1) as u32;
        let wait = CONNECT_TIMEOUT + crate::broker::BROKER_CONNECT_TIMEOUT * others;
        let conn = tokio::time::timeout(wait, connect(url, "labbook console"))
            .await
            .map_err(|_| anyhow::anyhow!("the broker did not answer within {wait:?}"))?
            .map_err(|e| anyhow::anyhow!("cannot reach the broker: {e}"))?;
        tracing::info!("connected to the broker");
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Messages and consumers of `queue` (a passive declare: nothing is created).
    pub async fn stats(&self, queue: &str) -> anyhow::Result<QueueStats> {
        let conn = self.connection().await?;
        let channel = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        let _ = channel.close(200, "done".into()).await;
        Ok(QueueStats {
            messages: q.message_count(),
            consumers: q.consumer_count(),
        })
    }

    /// Publishes an operator's change of a booking (see [`crate::ops::change`]) and waits for
    /// the broker's confirm.
    pub async fn publish_change(
        &self,
        planned: &crate::ops::change::Planned,
    ) -> anyhow::Result<()> {
        let conn = self.connection().await?;
        let channel = confirmed_channel(&conn, &self.topology).await?;
        let sent = planned.publish(&channel, self.publish_timeout).await;
        let _ = channel.close(200, "done".into()).await;
        Ok(sent?)
    }

    /// Publishes a message to a stage queue, as the stages do, and waits for the confirm.
    pub async fn publish_outgoing(&self, message: &crate::broker::Outgoing) -> anyhow::Result<()> {
        let conn = self.connection().await?;
        let channel = confirmed_channel(&conn, &self.topology).await?;
        let sent = message.publish(&channel, self.publish_timeout).await;
        let _ = channel.close(200, "done".into()).await;
        Ok(sent?)
    }

    /// Publishes a booking to `booking-created` through the `labbook` exchange, as an upstream
    /// would, and waits for the broker's confirm.
    pub async fn publish_booking(&self, body: &[u8], message_id: &str) -> anyhow::Result<()> {
        let conn = self.connection().await?;
        let channel = confirmed_channel(&conn, &self.topology).await?;
        let route = (EXCHANGE, StageQueue::BookingCreated.name());
        let span = crate::broker::trace::producer_span(route.0, route.1, message_id, None);
        let sent = async {
            let props = json_properties(message_id);
            publish_confirmed(&channel, route, body, props, self.publish_timeout).await
        }
        .instrument(span)
        .await;
        let _ = channel.close(200, "done".into()).await;
        sent.map_err(|e: PublishError| anyhow::Error::new(e))
    }
}
