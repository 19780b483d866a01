//! The events relay (docs/contract.md §7): publishes what the stages recorded in bookings'
//! histories, each booking's events in the order of its sequence, with confirms, marking them
//! published in the claiming transaction. Every worker that records events runs one; relays of
//! several replicas share the work (`FOR UPDATE SKIP LOCKED`) without reordering a booking's
//! events, as a booking's next event is claimed only once the one before it is published. A
//! relay that stops part-way leaves its rows unpublished: published again later, at least once.

use std::time::Duration;

use lapin::Channel;

use crate::broker::{Tick, TickError};
use crate::store::{Store, events};

/// How often an idle relay looks for events; one that published looks again at once.
pub const RELAY_TICK: Duration = Duration::from_millis(100);

/// Events claimed per tick.
const BATCH: i64 = 200;

/// The [`Tick`] of the events relay.
pub struct EventRelay {
    store: Store,
}

impl EventRelay {
    pub fn new(store: Store) -> Self {
        metrics::describe_counter!(
            "labbook_events_published_total",
            "Events the relay published to labbook.events"
        );
        metrics::counter!("labbook_events_published_total").increment(0);
        Self { store }
    }
}

impl Tick for EventRelay {
    async fn tick(&self, channel: &Channel, timeout: Duration) -> Result<usize, TickError> {
        let mut tx = self.store.pool.begin().await?;
        let next = events::claim_next(&mut tx, BATCH).await?;
        if next.is_empty() {
            return Ok(0);
        }
        for (_, event) in &next {
            event.publish(channel, timeout).await?;
        }
        let seqs: Vec<i64> = next.iter().map(|(seq, _)| *seq).collect();
        events::published(&mut tx, &seqs).await?;
        tx.commit().await?;
        metrics::counter!("labbook_events_published_total").increment(next.len() as u64);
        Ok(next.len())
    }
}
