//! Stage 4, `notify`: render and send the confirmation, instance-details and failure emails,
//! each once per booking (see [`crate::store::emails`]).
//!
//! Passwords are decrypted here only, only to render the email.

use crate::broker::{Incoming, Outgoing, Stage, StageError, StageQueue, Undecodable};
use crate::config::Bootstrap;
use crate::crypto::{SecretKey, admin_context, password_context};
use crate::domain::{EmailAddress, EmailKind, NotifyMessage};
use crate::mail::render::{InstanceBlock, UserLine, message_id};
use crate::mail::{Mailer, Rendered, Templates};
use crate::store::emails::Claim;
use crate::store::{BookingRecord, Store, bookings, emails, slots};

/// What the failure email says failed: plain words, never an internal error.
const WHAT_FAILED: &str = "The lab machines for this booking could not be started.";

pub struct NotifierStage {
    store: Store,
    key: SecretKey,
    mailer: Mailer,
    templates: Templates,
    bootstrap: Bootstrap,
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
        Self {
            store,
            key,
            mailer,
            templates: Templates::default(),
            bootstrap,
            domain,
        }
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
            EmailKind::Failure => self.templates.failure(id, &time, WHAT_FAILED),
        };
        rendered.map_err(|e| {
            StageError::permanent(format!("rendering the {} email: {e}", kind.as_str()))
        })
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

    /// One block per machine: its address, its trainees, its admin login.
    async fn instances(&self, id: &str) -> Result<Vec<InstanceBlock>, StageError> {
        let creds = bookings::credentials(&self.store.pool, id).await?;
        let slots = slots::for_booking(&self.store.pool, id).await?;
        let mut instances = Vec::with_capacity(slots.len());
        for slot in &slots {
            let address = slot.address().ok_or_else(|| {
                StageError::permanent(format!(
                    "no running instance with an address is recorded for slot {}",
                    slot.slot
                ))
            })?;
            let admin = self.key.decrypt(
                &slot.admin_password_encrypted,
                &admin_context(id, slot.slot),
            )?;
            instances.push(InstanceBlock {
                url: format!("http://{address}"),
                host: address.to_owned(),
                usernames: creds
                    .iter()
                    .filter(|c| slot.user_positions().contains(&c.position))
                    .map(|c| c.username.clone())
                    .collect(),
                admin_username: slot.admin_username.clone(),
                admin_password: admin.expose().to_owned(),
            });
        }
        if instances.is_empty() {
            return Err(StageError::permanent(
                "no instances are recorded for this booking",
            ));
        }
        Ok(instances)
    }
}

impl Stage for NotifierStage {
    const QUEUE: StageQueue = StageQueue::Notify;
    type Message = NotifyMessage;

    fn decode(&self, delivery: &Incoming) -> Result<NotifyMessage, Undecodable> {
        delivery.json()
    }

    async fn handle(&self, n: &NotifyMessage, _: &Incoming) -> Result<Vec<Outgoing>, StageError> {
        let booking = self.store.stored_booking(&n.booking_id).await?;
        let id = message_id(&booking.booking_id, n.kind, &self.domain);
        if emails::is_sent(&self.store.pool, &booking.booking_id, n.kind).await? {
            tracing::info!(
                kind = n.kind.as_str(),
                "email already sent; not sending it again"
            );
            return Ok(Vec::new());
        }
        // Rendered before the log row is locked, so a send holds one database connection.
        let email = self.render(&booking, n.kind).await?;
        let claimed =
            match emails::claim(&self.store.pool, &booking.booking_id, n.kind, &id).await? {
                Claim::AlreadySent => {
                    tracing::info!(
                        kind = n.kind.as_str(),
                        "email sent a moment ago by another worker"
                    );
                    return Ok(Vec::new());
                }
                Claim::Claimed(claimed) => claimed,
            };
        let to = EmailAddress::parse(&booking.email).map_err(StageError::Permanent)?;
        self.mailer.send(&to, &id, &email).await?;
        // If the process dies right here, the email went out but is not recorded: the message
        // comes again and the email is sent a second time, with the same Message-ID.
        claimed.sent().await?;
        tracing::info!(kind = n.kind.as_str(), subject = %email.subject, message_id = %id, "email sent");
        Ok(Vec::new())
    }

    async fn give_up(&self, n: &NotifyMessage, reason: &str) -> Result<Vec<Outgoing>, StageError> {
        if bookings::find(&self.store.pool, &n.booking_id)
            .await?
            .is_some()
        {
            let id = message_id(&n.booking_id, n.kind, &self.domain);
            emails::record_failure(&self.store.pool, &n.booking_id, n.kind, &id, reason).await?;
        }
        Ok(Vec::new())
    }
}
