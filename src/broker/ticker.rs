//! Loops that publish from the database: every tick, a step that claims due rows, publishes
//! what they ask with confirms on a channel of its own, and marks them done in the claiming
//! transaction. The scheduler's timer and the provisioner's boot watch run on it. The loop
//! reconnects when the broker goes away, waits out a database outage tick by tick (logged
//! once), and on shutdown lets a step that only publishes finish for up to one publish timeout,
//! so what it published is marked done rather than published again by the next replica; any
//! other step, or one that takes longer, is dropped: its transaction rolls back, its row locks
//! go with it, and another replica takes the rows at its next tick (at least once).

use std::future::Future;
use std::time::Duration;

use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::{PublishError, Topology, confirmed_channel, connect, retry_until_cancelled};
use crate::config::BrokerSettings;
use crate::health::ReadyFlag;

/// Why a tick did not finish.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    /// The database did not answer: the next tick tries again.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Publishing failed: the loop reconnects.
    #[error(transparent)]
    Broker(#[from] PublishError),
}

/// One step of a loop, run every tick.
pub trait Tick: Send + Sync {
    /// Does what is due; returns how much it did. A tick that did something is followed by
    /// the next at once (more may be due), one that did nothing by a pause of one tick.
    fn tick(
        &self,
        channel: &Channel,
        publish_timeout: Duration,
    ) -> impl Future<Output = Result<usize, TickError>> + Send;

    /// Whether a stop lets the tick in flight finish (for up to one publish timeout): for a
    /// step that only publishes what it claimed, so a stop does not publish it twice. A step
    /// that may wait on something slower (EC2's rate) is dropped at once instead.
    fn finishes_on_stop(&self) -> bool {
        true
    }
}

/// Runs `step` every `every` until `shutdown` fires, reconnecting to the broker as needed.
/// `name` names the loop in logs and in the broker's connection list.
pub async fn run_ticking<T: Tick>(
    name: &'static str,
    step: &T,
    broker: &BrokerSettings,
    every: Duration,
    ready: ReadyFlag,
    shutdown: CancellationToken,
) {
    let topology = Topology::from_settings(broker);
    loop {
        let setup = retry_until_cancelled("cannot set up the broker", &shutdown, || {
            open(broker, &topology, name)
        });
        let Some((conn, channel)) = setup.await else {
            return;
        };
        tracing::info!(
            loop_name = name,
            tick_ms = every.as_millis() as u64,
            "running"
        );
        ready.set(true);
        let publishing = (&conn, &channel, broker.publish_timeout);
        tick_until_lost(name, step, publishing, every, &shutdown).await;
        ready.set(false);
        let _ = conn.close(200, "labbook: closing".into()).await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

async fn open(
    broker: &BrokerSettings,
    topology: &Topology,
    name: &str,
) -> lapin::Result<(Connection, Channel)> {
    let conn = connect(broker.amqp_url.expose_secret(), &format!("labbook {name}")).await?;
    let channel = confirmed_channel(&conn, topology).await?;
    Ok((conn, channel))
}

/// Ticks until shutdown or until the broker goes away.
async fn tick_until_lost<T: Tick>(
    name: &'static str,
    step: &T,
    (conn, channel, timeout): (&Connection, &Channel, Duration),
    every: Duration,
    shutdown: &CancellationToken,
) {
    let mut database_down = false;
    let mut pause = every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        if !conn.status().connected() {
            tracing::warn!(loop_name = name, "lost the broker connection; reconnecting");
            return;
        }
        let tick = step.tick(channel, timeout);
        tokio::pin!(tick);
        let outcome = tokio::select! {
            outcome = &mut tick => outcome,
            _ = shutdown.cancelled() => {
                if !step.finishes_on_stop() {
                    return;
                }
                if tokio::time::timeout(timeout, &mut tick).await.is_err() {
                    tracing::warn!(loop_name = name, "stopping in the middle of a tick: its rows are taken again");
                }
                return;
            }
        };
        pause = every;
        match outcome {
            Ok(done) => {
                if database_down {
                    database_down = false;
                    tracing::info!(loop_name = name, "the database is back");
                }
                if done > 0 {
                    pause = Duration::ZERO;
                }
            }
            Err(TickError::Database(err)) => {
                if !database_down {
                    tracing::warn!(loop_name = name, error = %err, "database unavailable; trying again every tick");
                }
                database_down = true;
            }
            Err(TickError::Broker(err)) => {
                tracing::warn!(loop_name = name, error = %err, "publishing failed; reconnecting");
                return;
            }
        }
    }
}

/// Runs `step` on a channel of its own until a tick does nothing: what a test or a tool does
/// instead of running the loop.
pub async fn tick_until_idle<T: Tick>(step: &T, broker: &BrokerSettings) -> anyhow::Result<usize> {
    let topology = Topology::from_settings(broker);
    let (conn, channel) = open(broker, &topology, "tick until idle").await?;
    let mut total = 0;
    loop {
        let done = step.tick(&channel, broker.publish_timeout).await?;
        if done == 0 {
            break;
        }
        total += done;
    }
    let _ = conn.close(200, "labbook: idle".into()).await;
    Ok(total)
}
