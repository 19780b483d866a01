//! The boot watch: every provisioner replica follows launched machines to ready as rows, not
//! as held deliveries. Each tick claims the watched slots that are due a look (`FOR UPDATE SKIP
//! LOCKED`, [`crate::store::boots`]), looks at them in bulk (one `DescribeInstances` for every
//! machine still starting, a console read for each machine booting), decides each one's next
//! step ([`super::ready::decide`]) and, in the claiming transaction, records it and publishes
//! what follows with confirms: the instance details `notify` of a booking whose machines are
//! all ready, a `provision-due` that launches a replacement, the failure `notify` of a booking
//! that failed. A replica killed mid-tick leaves its rows to the next tick of another; a
//! stopped one drops its tick and exits.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use lapin::Channel;
use sqlx::PgConnection;

use super::Provisioner;
use super::ready::{Boot, Pace, Seen, Step, boot_outcome, decide};
use crate::broker::trace::{self, TraceContext};
use crate::broker::{Outgoing, StageQueue, Tick, TickError};
use crate::config::Readiness;
use crate::domain::{BookingRef, EmailKind, NotifyMessage};
use crate::ec2::Ec2Error;
use crate::store::boots::{self, Described, Look, Phase};
use crate::store::slots::{self, Slot};
use crate::store::{BookingState, bookings, machines, outbox};

/// Machines still starting that one tick describes at most (one `DescribeInstances` per 1,000).
const STARTING_BATCH: i64 = 1000;
/// Machines booting whose consoles one tick reads at most, and how many at once: the claimed
/// rows stay locked while their consoles are read, so a tick stays a few seconds long.
const BOOTING_BATCH: i64 = 64;
const CONSOLE_READS_AT_ONCE: usize = 16;
/// How long an image's recorded boot times are kept before they are read again.
const BOOT_TIMES_TTL: Duration = Duration::from_secs(30);
/// How often the gauges are refreshed from the database.
const CENSUS_EVERY: Duration = Duration::from_secs(5);
/// A message of the stage outbox older than this was left by a replica that died.
const LEFT_AFTER: Duration = Duration::from_secs(10);
/// A look that could not be made (EC2 unavailable) is tried again after this.
const RETRY_LOOK: Duration = Duration::from_secs(5);

/// The boot watch of one provisioner replica.
pub struct BootWatch {
    p: Arc<Provisioner>,
    boot_times: Mutex<Option<(Instant, Option<machines::BootTimes>)>>,
    census_at: Mutex<Option<Instant>>,
}

impl BootWatch {
    pub fn new(provisioner: Arc<Provisioner>) -> Self {
        register_metrics();
        Self {
            p: provisioner,
            boot_times: Mutex::new(None),
            census_at: Mutex::new(None),
        }
    }

    /// The waits and the pace of looks for the image ([`Pace::for_image`]: its recorded boots,
    /// else `LABBOOK_EXPECTED_BOOT_SECONDS`), read again every [`BOOT_TIMES_TTL`].
    async fn pace(&self) -> Result<Pace, sqlx::Error> {
        let cached = *self.boot_times.lock().expect("boot times lock");
        let recorded = match cached {
            Some((at, recorded)) if at.elapsed() < BOOT_TIMES_TTL => recorded,
            _ => {
                let recorded = machines::boot_times(&self.p.store.pool, &self.p.ami_id).await?;
                *self.boot_times.lock().expect("boot times lock") =
                    Some((Instant::now(), recorded));
                recorded
            }
        };
        let s = &self.p.settings;
        Ok(Pace::for_image(
            s.running_timeout,
            s.ready_timeout,
            s.expected_boot,
            recorded,
        ))
    }

    /// One claim of `phase`: look, decide, record, publish, commit. Returns how many machines
    /// it looked at.
    async fn step(
        &self,
        phase: Phase,
        channel: &Channel,
        timeout: Duration,
    ) -> Result<usize, TickError> {
        let pace = self.pace().await?;
        let mut tx = self.p.store.pool.begin().await?;
        let limit = match phase {
            Phase::Starting => STARTING_BATCH,
            Phase::Booting => BOOTING_BATCH,
        };
        let claimed = boots::claim(&mut tx, phase, limit).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let looks = match phase {
            Phase::Starting => self.describe(&claimed).await,
            Phase::Booting => self.read_consoles(&claimed).await,
        };
        let mut after = FollowUps::default();
        for (slot, (seen, look)) in claimed.iter().zip(&looks) {
            let step = decide(slot, seen, &pace, Utc::now());
            self.apply(&mut tx, slot, look, step, &mut after).await?;
        }
        // Published once the looks are committed: the consumer then sees the state they follow.
        let out = after.messages(&mut tx).await?;
        let mut kept = Vec::with_capacity(out.len());
        for message in &out {
            kept.push(outbox::put(&mut tx, message).await?);
        }
        tx.commit().await?;
        // Once committed: a tick that fails before records its boots again.
        after.trace_boots(&self.p.store.pool).await;
        // A failed booking's machines are terminated before its failure email is asked for.
        after.terminate(&self.p).await;
        for message in &out {
            message.publish(channel, timeout).await?;
        }
        outbox::sent(&self.p.store.pool, &kept).await?;
        Ok(claimed.len())
    }

    /// Publishes what a replica decided but could not publish before it died.
    async fn publish_left(&self, channel: &Channel, timeout: Duration) -> Result<usize, TickError> {
        let mut tx = self.p.store.pool.begin().await?;
        let left = outbox::claim_left(&mut tx, LEFT_AFTER.as_secs_f64(), 100).await?;
        for (_, message) in &left {
            message.publish(channel, timeout).await?;
        }
        let ids: Vec<i64> = left.iter().map(|(id, _)| *id).collect();
        outbox::sent(&mut *tx, &ids).await?;
        tx.commit().await?;
        if !left.is_empty() {
            tracing::info!(
                messages = left.len(),
                "published what a stopped replica left"
            );
        }
        Ok(left.len())
    }

    /// One `DescribeInstances` for every claimed machine (per 1,000): what each one is.
    async fn describe(&self, claimed: &[Slot]) -> Vec<(Seen, Look)> {
        let ids: Vec<String> = claimed
            .iter()
            .filter_map(|s| s.instance_id.clone())
            .collect();
        let infos = match self.p.ec2.describe(&ids).await {
            Ok(infos) => infos,
            Err(err) => {
                tracing::warn!(error = %err, machines = ids.len(), "boot watch: cannot describe the machines now");
                return claimed
                    .iter()
                    .map(|_| (Seen::Unknown, Look::default()))
                    .collect();
            }
        };
        let readiness = self.p.settings.readiness;
        claimed
            .iter()
            .map(|slot| {
                let Some(i) = infos
                    .iter()
                    .find(|i| slot.instance_id.as_ref() == Some(&i.instance_id))
                else {
                    return (Seen::Unknown, Look::default());
                };
                let seen = if i.is_gone() {
                    Seen::Gone(i.state.clone())
                } else if !i.is_ready() {
                    Seen::Starting
                } else if readiness == Readiness::Running {
                    Seen::Running {
                        boot: None,
                        answers: true,
                    }
                } else {
                    Seen::Runs
                };
                let look = Look {
                    described: Some(Described {
                        state: i.state.clone(),
                        public_dns: i.public_dns.clone(),
                        public_ip: i.public_ip.clone(),
                    }),
                    ..Look::default()
                };
                (seen, look)
            })
            .collect()
    }

    /// Reads each claimed machine's console, a few at once under the shared rate limit.
    async fn read_consoles(&self, claimed: &[Slot]) -> Vec<(Seen, Look)> {
        let mut looks = Vec::with_capacity(claimed.len());
        for some in claimed.chunks(CONSOLE_READS_AT_ONCE) {
            let reads: Vec<_> = some.iter().map(|slot| self.read_console(slot)).collect();
            looks.extend(futures_util::future::join_all(reads).await);
        }
        looks
    }

    /// What the machine's console says: the live output, or the buffered copy where EC2
    /// refuses the live one for the machine's type (remembered for the machine).
    async fn read_console(&self, slot: &Slot) -> (Seen, Look) {
        let id = slot.instance_id.as_deref().unwrap_or_default();
        let ec2 = &self.p.ec2;
        let mut look = Look {
            console_reads: 1,
            console_buffered: slot.console_buffered,
            ..Look::default()
        };
        let read = match ec2.console_output(id, !slot.console_buffered).await {
            Err(err) if !slot.console_buffered && err.refuses_latest_console() => {
                tracing::info!(instance_id = id, error = %err, "EC2 refuses the live console for this machine; reading the buffered copy");
                look.console_reads = 2;
                look.console_buffered = true;
                ec2.console_output(id, false).await
            }
            other => other,
        };
        let console = match read {
            Ok(console) => console,
            Err(err) => {
                log_unread(id, &err);
                return (Seen::Unknown, look);
            }
        };
        let boot = boot_outcome(&console.text);
        let answers = match &boot {
            Boot::Ok { http_only } => self.p.answers(slot, http_only.is_some()).await,
            _ => false,
        };
        look.reported_at = console.updated_at;
        (
            Seen::Running {
                boot: Some(boot),
                answers,
            },
            look,
        )
    }

    /// Records `step` for the slot's machine, and what it asks of the booking.
    async fn apply(
        &self,
        tx: &mut PgConnection,
        slot: &Slot,
        look: &Look,
        step: Step,
        after: &mut FollowUps,
    ) -> Result<(), sqlx::Error> {
        let id = slot.instance_id.as_deref().unwrap_or_default();
        let booking = slot.booking_id.clone();
        match step {
            Step::Later(at) => {
                // A look that could not be made comes again soon, whatever was planned.
                let at = if look.console_reads == 0 && look.described.is_none() {
                    at.min(Utc::now() + chrono::Duration::from_std(RETRY_LOOK).unwrap_or_default())
                } else {
                    at
                };
                boots::looked(tx, slot, look, at).await?;
            }
            Step::Ready { http_only } => {
                after.boot(slot, "ready", http_only.clone());
                let boot = boot_time(slot, look);
                boots::ready(tx, slot, look, boot, http_only.as_deref()).await?;
                metrics::histogram!("labbook_boot_seconds").record(boot.as_secs_f64());
                tracing::info!(booking_id = %booking, slot = slot.slot, instance_id = id, boot_s = boot.as_secs(), http_only = http_only.as_deref().unwrap_or(""), "machine ready");
                after.finish.insert(booking);
            }
            Step::Replace { why, counts } => {
                after.boot(slot, "replaced", Some(why.to_string()));
                tracing::warn!(booking_id = %booking, slot = slot.slot, instance_id = id, reason = %why, "the machine did not become ready; it is replaced");
                // Retired first, then forgotten by its slot: whatever stops here, the machine
                // is terminated (by the provision-due below, or the sweep).
                slots::retire(&mut *tx, &booking, id).await?;
                slots::replace_instance(&mut *tx, id, counts).await?;
                metrics::counter!("labbook_machines_replaced_total").increment(1);
                after.relaunch.insert(booking);
            }
            Step::Fail(why) => {
                after.boot(slot, "failed", Some(why.to_string()));
                tracing::warn!(booking_id = %booking, slot = slot.slot, instance_id = id, reason = %why, "the slot's second machine did not become ready; the booking fails");
                if bookings::transition(&mut *tx, &booking, BookingState::Failed, Some(&why))
                    .await?
                {
                    after.failed.insert(booking);
                }
            }
        }
        Ok(())
    }

    /// Refreshes the gauges from the database, every few seconds.
    async fn census(&self) {
        {
            let mut at = self.census_at.lock().expect("census lock");
            if at.is_some_and(|at| at.elapsed() < CENSUS_EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        if let Ok(c) = boots::census(&self.p.store.pool).await {
            metrics::gauge!("labbook_machines", "state" => "booting").set(c.booting as f64);
            metrics::gauge!("labbook_machines", "state" => "ready").set(c.ready as f64);
            metrics::gauge!("labbook_readiness_due").set(c.due as f64);
        }
    }
}

impl Tick for BootWatch {
    async fn tick(&self, channel: &Channel, timeout: Duration) -> Result<usize, TickError> {
        let left = self.publish_left(channel, timeout).await?;
        let starting = self.step(Phase::Starting, channel, timeout).await?;
        let booting = self.step(Phase::Booting, channel, timeout).await?;
        self.census().await;
        Ok(left + starting + booting)
    }

    /// Its looks wait on EC2's rate: a stop drops them (another replica looks again).
    fn finishes_on_stop(&self) -> bool {
        false
    }
}

/// What the bookings of one claim need once its looks are recorded.
#[derive(Default)]
struct FollowUps {
    /// A machine became ready: maybe every machine is.
    finish: BTreeSet<String>,
    /// Boots that ended (ready, replaced, failed), for the trace: the slot, how, why.
    boots: Vec<(Slot, &'static str, Option<String>)>,
    /// A machine was replaced: launch its slot anew.
    relaunch: BTreeSet<String>,
    /// The booking failed: terminate its machines, send the failure email.
    failed: BTreeSet<String>,
}

impl FollowUps {
    /// Notes a boot that ended, for the trace (only when traces are exported).
    fn boot(&mut self, slot: &Slot, outcome: &'static str, note: Option<String>) {
        if crate::telemetry::exporting() {
            self.boots.push((slot.clone(), outcome, note));
        }
    }

    /// Each boot noted as a span of its booking's trace; a booking whose trace cannot be read
    /// now has its boot in a trace of its own (the boot watch goes on).
    async fn trace_boots(&self, pool: &sqlx::PgPool) {
        for (slot, outcome, note) in &self.boots {
            let parent = bookings::trace(pool, &slot.booking_id).await.ok().flatten();
            let parent = parent
                .as_deref()
                .and_then(|tp| TraceContext::parse(tp, None));
            trace_boot(slot, parent.as_ref(), outcome, note.clone());
        }
    }

    /// The messages to publish once the claim commits, each continuing the trace its booking
    /// was stored under.
    async fn messages(&self, tx: &mut PgConnection) -> Result<Vec<Outgoing>, sqlx::Error> {
        let mut out = Vec::new();
        for id in &self.failed {
            slots::retire_all(&mut *tx, id).await?;
            let Some(b) = bookings::find(&mut *tx, id).await? else {
                continue;
            };
            let revision = b.schedule_revision.max(0) as u32;
            let failure = NotifyMessage::at_revision(id, EmailKind::Failure, revision);
            out.push(failure.traced(b.traceparent.as_deref()));
        }
        for id in self.relaunch.difference(&self.failed) {
            let Some(b) = bookings::find(&mut *tx, id).await? else {
                continue;
            };
            let revision = Some(b.schedule_revision.max(0) as u32);
            let relaunch = BookingRef::at_revision(StageQueue::ProvisionDue, id, revision);
            out.push(relaunch.traced(b.traceparent.as_deref()));
        }
        for id in self.finish.difference(&self.failed) {
            if let Some(revision) = boots::finish_if_ready(&mut *tx, id).await? {
                tracing::info!(booking_id = %id, revision, "every machine of the booking is ready");
                let revision = revision.max(0) as u32;
                let trace = bookings::trace(&mut *tx, id).await?;
                let details = NotifyMessage::at_revision(id, EmailKind::InstanceDetails, revision);
                out.push(details.traced(trace.as_deref()));
            }
        }
        Ok(out)
    }

    /// Terminates the machines of the bookings that failed (the sweep does it if this fails).
    async fn terminate(&self, p: &Provisioner) {
        for id in &self.failed {
            match p.terminate_all(id).await {
                Ok(n) => {
                    tracing::warn!(booking_id = %id, terminated = n, "booking failed; its machines are terminated")
                }
                Err(err) => {
                    tracing::warn!(booking_id = %id, error = %err, "cannot terminate the failed booking's machines now; the sweep will")
                }
            }
        }
    }
}

/// A machine's boot, from its launch to now, as a span of its booking's trace: how long it
/// took and how it ended. `note`: why it was replaced or failed (an error status), or why it
/// serves HTTP only.
fn trace_boot(slot: &Slot, parent: Option<&TraceContext>, outcome: &str, note: Option<String>) {
    use opentelemetry::KeyValue;
    let mut attributes = vec![
        KeyValue::new("labbook.booking_id", slot.booking_id.clone()),
        KeyValue::new("labbook.slot", i64::from(slot.slot)),
        KeyValue::new("labbook.boot.outcome", outcome.to_owned()),
        KeyValue::new("labbook.console_reads", i64::from(slot.console_reads)),
    ];
    if let Some(id) = &slot.instance_id {
        attributes.push(KeyValue::new("cloud.resource_id", id.clone()));
    }
    if let Some(image) = &slot.image_id {
        attributes.push(KeyValue::new("labbook.image_id", image.clone()));
    }
    let (error, note) = match outcome {
        "ready" => (None, note),
        _ => (note, None),
    };
    if let Some(note) = note {
        attributes.push(KeyValue::new("labbook.http_only", note));
    }
    let start = slot.launched_at.unwrap_or_else(Utc::now);
    trace::record_span("machine boot", parent, start.into(), attributes, error);
}

/// The machine's time from launch to ready: to when EC2 says its console was last written,
/// where that is plausible (the report is the bootstrap's last word), else to now.
fn boot_time(slot: &Slot, look: &Look) -> Duration {
    let now = Utc::now();
    let launched = slot.launched_at.unwrap_or(now);
    let reported = look
        .reported_at
        .filter(|t| *t >= launched && *t <= now)
        .unwrap_or(now);
    (reported - launched).to_std().unwrap_or_default()
}

fn log_unread(instance_id: &str, err: &Ec2Error) {
    tracing::warn!(instance_id, error = %err, "boot watch: cannot read the machine's console now");
}

fn register_metrics() {
    metrics::describe_gauge!(
        "labbook_machines",
        "Machines of bookings being provisioned or provisioned: booting (launched, not yet ready) and ready"
    );
    metrics::describe_gauge!(
        "labbook_readiness_due",
        "Booting machines due a look by the boot watch now (work waiting for provisioners)"
    );
    metrics::describe_histogram!(
        "labbook_boot_seconds",
        "Time from a machine's launch to ready"
    );
    metrics::describe_counter!(
        "labbook_machines_replaced_total",
        "Machines replaced because they did not become ready"
    );
    metrics::counter!("labbook_machines_replaced_total").increment(0);
    for state in ["booting", "ready"] {
        metrics::gauge!("labbook_machines", "state" => state).set(0.0);
    }
    metrics::gauge!("labbook_readiness_due").set(0.0);
}
