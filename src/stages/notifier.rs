//! Stage 4, `notify`: render and send the emails of docs/contract.md §5, each kind once per
//! booking and revision (see [`crate::store::emails`]), then publish the event the email
//! completes (`confirmed`, `provisioned`, `failed`; §7).
//!
//! Passwords are decrypted here only, only to render the email.

use crate::broker::{Incoming, Outgoing, Stage, StageError, StageQueue, Undecodable};
use crate::config::{Bootstrap, Https};
use crate::crypto::{SecretKey, admin_context, password_context};
use crate::domain::{EmailAddress, EmailKind, Event, EventInstance, EventKind, NotifyMessage};
use crate::mail::render::{InstanceBlock, UserLine, copy_message_id, instance_url, message_id};
use crate::mail::{Mailer, Rendered, Templates};
use crate::store::emails::Claim;
use crate::store::slots::Slot;
use crate::store::{BookingRecord, BookingState, Store, bookings, emails, events, intake, slots};

/// What the failure email says failed: plain words, never an internal error.
const WHAT_FAILED: &str = "The lab machines for this booking could not be started.";

/// What the failure email says when the machines ran but their bootstrap never succeeded.
const NOT_READY_TEXT: &str = "The lab machines for this booking started but did not become ready.";

/// What the failure email says when EC2 had no capacity for any configured offering.
const NO_CAPACITY_TEXT: &str =
    "The lab machines for this booking could not be started: AWS had no capacity for them";

/// What the failure email says when the AWS account's quota left no room for the machines.
const QUOTA_TEXT: &str = "The lab machines for this booking could not be started: the AWS account's limit on running machines was reached.";

fn what_failed(booking: &BookingRecord) -> String {
    use crate::stages::provisioner::{NO_CAPACITY, NOT_READY, QUOTA};
    let reason = booking.failure_reason.as_deref().unwrap_or_default();
    if reason.starts_with(NOT_READY) {
        NOT_READY_TEXT.to_owned()
    } else if reason.starts_with(QUOTA) {
        QUOTA_TEXT.to_owned()
    } else if let Some(rest) = reason.strip_prefix(NO_CAPACITY) {
        // What was tried: instance types and subnets, nothing internal.
        let tried = rest.split_once("tried ").map_or("", |(_, t)| t.trim());
        match tried {
            "" => format!("{NO_CAPACITY_TEXT}."),
            tried => format!("{NO_CAPACITY_TEXT} (tried {tried})."),
        }
    } else {
        WHAT_FAILED.to_owned()
    }
}

/// What the cancellation email says of the machines.
const STOPPED: &str = "The lab machines of this booking have been stopped.";
const NOT_STARTED: &str = "No lab machines will be started for it.";

pub struct NotifierStage {
    store: Store,
    key: SecretKey,
    mailer: Mailer,
    templates: Templates,
    bootstrap: Bootstrap,
    /// `LABBOOK_HTTPS` is on (the default): JupyterHub machines are given as `https://<IP>`.
    https: bool,
    domain: String,
}

impl NotifierStage {
    pub fn new(
        store: Store,
        key: SecretKey,
        mailer: Mailer,
        bootstrap: Bootstrap,
        from: &EmailAddress,
    ) -> Self {
        let domain = from
            .as_str()
            .rsplit_once('@')
            .map_or("labbook.invalid", |(_, d)| d)
            .to_owned();
        register_metrics();
        Self {
            store,
            key,
            mailer,
            templates: Templates::default(),
            bootstrap,
            https: true,
            domain,
        }
    }

    /// How JupyterHub machines serve their login page (`LABBOOK_HTTPS`; on unless said).
    pub fn with_https(mut self, https: &Https) -> Self {
        self.https = https.acme().is_some();
        self
    }

    /// Whether this booking's machines were asked to get a certificate.
    fn asks_for_https(&self) -> bool {
        self.https && self.bootstrap == Bootstrap::JupyterHub
    }

    /// The email's `Message-ID`: per kind and revision, and per copy for a resend.
    fn message_id(&self, n: &NotifyMessage) -> String {
        let original = message_id(&n.booking_id, n.kind, n.revision, &self.domain);
        copy_message_id(original, n.copy)
    }

    async fn render(
        &self,
        booking: &BookingRecord,
        kind: EmailKind,
    ) -> Result<Rendered, StageError> {
        let id = booking.booking_id.as_str();
        let time = crate::format_time(booking.booking_time);
        let ends = crate::format_time(booking.ends_at());
        let rendered = match kind {
            EmailKind::Confirmation => {
                let users = self.logins(id).await?;
                self.templates.confirmation(id, &time, &ends, &users)
            }
            EmailKind::InstanceDetails => {
                let instances = self.instances(id).await?;
                let jupyterhub = self.bootstrap == Bootstrap::JupyterHub;
                self.templates
                    .instance_details(id, &time, &ends, &instances, jupyterhub)
            }
            EmailKind::Failure => self.templates.failure(id, &time, &what_failed(booking)),
            EmailKind::Updated => {
                let users = self.logins(id).await?;
                let change = self.change(booking).await?;
                self.templates.updated(id, (&time, &ends), &users, &change)
            }
            EmailKind::Cancelled => {
                let launched = slots::for_booking(&self.store.pool, id)
                    .await?
                    .iter()
                    .any(|s| s.instance_id.is_some());
                let what = if launched { STOPPED } else { NOT_STARTED };
                self.templates.cancelled(id, &time, what)
            }
        };
        rendered.map_err(|e| {
            StageError::permanent(format!("rendering the {} email: {e}", kind.as_str()))
        })
    }

    /// What the update of the booking's current revision changed (its `accepted` event says).
    async fn change(&self, booking: &BookingRecord) -> Result<String, StageError> {
        let history = events::history(&self.store.pool, &booking.booking_id).await?;
        Ok(history
            .into_iter()
            .rev()
            .find(|e| e.event == EventKind::Accepted.as_str() && e.revision == booking.revision)
            .map(|e| e.detail)
            .unwrap_or_default())
    }

    /// Why the email asked for is not to be sent any more, if it is not.
    fn superseded(booking: &BookingRecord, n: &NotifyMessage) -> Option<&'static str> {
        match n.kind {
            EmailKind::Confirmation | EmailKind::Updated if booking.cancelled => {
                Some("the booking was cancelled")
            }
            EmailKind::InstanceDetails
                if booking.cancelled || booking.state != BookingState::Provisioned =>
            {
                Some("the booking's machines changed since (it is no longer provisioned)")
            }
            EmailKind::InstanceDetails
                if booking.provisioned_revision.unwrap_or(0) != n.revision as i32 =>
            {
                Some("a later instance details email lists the booking's machines")
            }
            _ => None,
        }
    }

    /// The event an email completes, if it completes one.
    async fn event(
        &self,
        booking: &BookingRecord,
        n: &NotifyMessage,
    ) -> Result<Option<Event>, StageError> {
        let id = booking.booking_id.as_str();
        let event = match n.kind {
            EmailKind::Confirmation | EmailKind::Updated => {
                Event::new(id, EventKind::Confirmed, n.revision)
                    .detail(format!("{} email sent", n.kind.as_str()))
            }
            EmailKind::InstanceDetails => {
                // The machines as they are, without decrypting their admin passwords.
                let instances: Vec<EventInstance> = self
                    .machines(id)
                    .await?
                    .into_iter()
                    .map(|m| EventInstance {
                        url: m.url,
                        usernames: m.usernames,
                    })
                    .collect();
                Event::new(id, EventKind::Provisioned, n.revision)
                    .detail(format!("{} machines running", instances.len()))
                    .instances(instances)
            }
            EmailKind::Failure => {
                Event::new(id, EventKind::Failed, n.revision).detail(what_failed(booking))
            }
            EmailKind::Cancelled => return Ok(None),
        };
        Ok(Some(event.state(booking.state)))
    }

    /// Records the event of an email sent before (by this message's earlier delivery or by
    /// another worker): a step done again publishes its event again.
    async fn event_again(
        &self,
        booking: &BookingRecord,
        n: &NotifyMessage,
    ) -> Result<Vec<Outgoing>, StageError> {
        if let Some(event) = self.event(booking, n).await? {
            events::record(&self.store.pool, &event).await?;
        }
        Ok(Vec::new())
    }

    /// Every trainee login of the booking, with its password decrypted for the email.
    async fn logins(&self, id: &str) -> Result<Vec<UserLine>, StageError> {
        let creds = bookings::credentials(&self.store.pool, id).await?;
        let mut users = Vec::with_capacity(creds.len());
        for c in creds {
            let password = self
                .key
                .decrypt(&c.password_encrypted, &password_context(id, &c.username))?;
            users.push(UserLine {
                username: c.username,
                password: password.expose().to_owned(),
            });
        }
        Ok(users)
    }

    /// The booking's machines with their addresses and trainees; no password is decrypted.
    async fn machines(&self, id: &str) -> Result<Vec<Machine>, StageError> {
        let creds = bookings::credentials(&self.store.pool, id).await?;
        let slots = slots::for_booking(&self.store.pool, id).await?;
        let mut machines = Vec::with_capacity(slots.len());
        for slot in slots {
            let host = slot
                .address()
                .ok_or_else(|| {
                    StageError::permanent(format!(
                        "no running instance with an address is recorded for slot {}",
                        slot.slot
                    ))
                })?
                .to_owned();
            let usernames = creds
                .iter()
                .filter(|c| slot.user_positions().contains(&c.position))
                .map(|c| c.username.clone())
                .collect();
            // A machine whose bootstrap reported "http only" serves HTTP (its `http_only`).
            let https = self.asks_for_https();
            let serves_https = https && slot.http_only.is_none();
            machines.push(Machine {
                url: instance_url(&host, slot.public_ip.as_deref(), serves_https),
                http_only: https && slot.http_only.is_some(),
                slot,
                host,
                usernames,
            });
        }
        if machines.is_empty() {
            return Err(StageError::permanent(
                "no instances are recorded for this booking",
            ));
        }
        Ok(machines)
    }

    /// One block per machine: its address, its trainees, its admin login (decrypted here, for
    /// the email only).
    async fn instances(&self, id: &str) -> Result<Vec<InstanceBlock>, StageError> {
        let mut instances = Vec::new();
        for m in self.machines(id).await? {
            let context = admin_context(id, m.slot.slot);
            let admin = self
                .key
                .decrypt(&m.slot.admin_password_encrypted, &context)?;
            instances.push(InstanceBlock {
                url: m.url,
                http_only: m.http_only,
                admin_username: m.slot.admin_username,
                admin_password: admin.expose().to_owned(),
                host: m.host,
                usernames: m.usernames,
            });
        }
        Ok(instances)
    }
}

/// `labbook_instance_email_seconds`: from the booking's first storing to its instance details
/// email sent (the time an upstream waits for the machines, lead time included).
fn record_instance_email_time(booking: &BookingRecord) {
    let waited = (chrono::Utc::now() - booking.created_at)
        .num_milliseconds()
        .max(0);
    metrics::histogram!("labbook_instance_email_seconds").record(waited as f64 / 1000.0);
}

/// Names the notifier's own series before its first email, so dashboards see them at once.
pub fn register_metrics() {
    metrics::describe_histogram!(
        "labbook_instance_email_seconds",
        "Time from a booking's first storing to its instance details email sent"
    );
    let _ = metrics::histogram!("labbook_instance_email_seconds");
}

/// A machine of a booking as the emails and events tell it.
struct Machine {
    slot: Slot,
    host: String,
    /// `https://<IP>` or `http://<host>` ([`instance_url`]).
    url: String,
    /// HTTPS was asked for and the machine could not get a certificate.
    http_only: bool,
    usernames: Vec<String>,
}

impl Stage for NotifierStage {
    const QUEUE: StageQueue = StageQueue::Notify;
    type Message = NotifyMessage;

    fn decode(&self, delivery: &Incoming) -> Result<NotifyMessage, Undecodable> {
        delivery.json()
    }

    async fn handle(&self, n: &NotifyMessage, _: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        let booking = self.store.stored_booking(&n.booking_id).await?;
        if let Some(why) = Self::superseded(&booking, n) {
            tracing::info!(
                kind = n.kind.as_str(),
                revision = n.revision,
                "not sending: {why}"
            );
            return Ok(Vec::new());
        }
        let id = self.message_id(n);
        let key = (n.kind, n.revision as i32, n.copy as i32);
        if emails::is_sent(&self.store.pool, &booking.booking_id, key).await? {
            tracing::info!(
                kind = n.kind.as_str(),
                "email already sent; not sending it again"
            );
            return self.event_again(&booking, n).await;
        }
        // Rendered, and its event made, before the log row is locked, so a send holds one
        // database connection (a claim waiting for a second one could starve the pool).
        let email = self.render(&booking, n.kind).await?;
        let event = self.event(&booking, n).await?;
        let mut claimed =
            match emails::claim(&self.store.pool, &booking.booking_id, key, &id).await? {
                Claim::AlreadySent => {
                    tracing::info!(
                        kind = n.kind.as_str(),
                        "email sent a moment ago by another worker"
                    );
                    return self.event_again(&booking, n).await;
                }
                Claim::Claimed(claimed) => claimed,
            };
        // From here until the email's event is recorded the booking's lock is held: a
        // cancellation or change stored meanwhile waits, and its event follows this one.
        intake::lock(claimed.conn(), &booking.booking_id).await?;
        let booking = bookings::find(claimed.conn(), &booking.booking_id)
            .await?
            .ok_or_else(|| {
                StageError::permanent(format!("booking {} is not stored", n.booking_id))
            })?;
        if let Some(why) = Self::superseded(&booking, n) {
            tracing::info!(
                kind = n.kind.as_str(),
                revision = n.revision,
                "not sending: {why}"
            );
            return Ok(Vec::new());
        }
        let to = EmailAddress::parse(&booking.email).map_err(StageError::Permanent)?;
        self.mailer.send(&to, &id, &email).await?;
        // If the process dies right here, the email went out but is not recorded: the message
        // comes again and the email is sent a second time, with the same Message-ID.
        if let Some(event) = &event {
            events::record_in(claimed.conn(), event).await?;
        }
        claimed.sent().await?;
        if n.kind == EmailKind::InstanceDetails && n.copy == 0 {
            record_instance_email_time(&booking);
        }
        tracing::info!(kind = n.kind.as_str(), revision = n.revision, copy = n.copy, subject = %email.subject, message_id = %id, "email sent");
        Ok(Vec::new())
    }

    async fn give_up(&self, n: &NotifyMessage, reason: &str) -> Result<Vec<Outgoing>, StageError> {
        if bookings::find(&self.store.pool, &n.booking_id)
            .await?
            .is_some()
        {
            let id = self.message_id(n);
            let key = (n.kind, n.revision as i32, n.copy as i32);
            emails::record_failure(&self.store.pool, &n.booking_id, key, &id, reason).await?;
        }
        Ok(Vec::new())
    }
}
