//! Email: rendering (`render`) and sending through the SMTP relay that `SMTP_URL` names, or
//! into an in-memory outbox (`memory://`) that tests read.

pub mod render;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::stub::AsyncStubTransport;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::broker::StageError;
use crate::config::ConfigError;
use crate::domain::EmailAddress;
pub use render::{Rendered, Templates};

/// Why an email was not accepted by the relay.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A 5xx answer: the relay will not take this email.
    #[error("the mail relay refused the email: {0}")]
    Permanent(String),
    /// A 4xx answer: the relay asks to try again later.
    #[error("the mail relay deferred the email: {0}")]
    Transient(String),
    /// No connection, or no answer in time: the relay is down.
    #[error("the mail relay is unreachable: {0}")]
    Unreachable(String),
}

/// Names the email series at 0 at start-up (see [`crate::health`]).
pub fn register_metrics() {
    metrics::describe_counter!(
        "labbook_emails_total",
        "Emails handed to the relay, by outcome"
    );
    for outcome in ["sent", "refused", "failed"] {
        metrics::counter!("labbook_emails_total", "outcome" => outcome).increment(0);
    }
}

/// A refusal is permanent, a deferral transient, and a relay out of reach is waited for.
impl From<SendError> for StageError {
    fn from(err: SendError) -> Self {
        match err {
            SendError::Permanent(_) => StageError::Permanent(err.to_string()),
            SendError::Transient(_) => StageError::transient(err),
            SendError::Unreachable(_) => StageError::unavailable(err),
        }
    }
}

/// `SMTP_URL` of the in-memory backend: `memory://<outbox name>`.
const MEMORY_SCHEME: &str = "memory://";

/// Where emails go: an SMTP relay, or an outbox in this process's memory (for tests that read
/// what was sent; nobody receives those emails).
#[derive(Clone)]
enum Backend {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Memory(AsyncStubTransport),
}

/// The email sender, with pooled SMTP connections.
#[derive(Clone)]
pub struct Mailer {
    backend: Backend,
    from: Mailbox,
}

impl Mailer {
    /// Must be called inside the tokio runtime (the pool runs a task).
    pub fn new(smtp_url: &str, from: &EmailAddress) -> Result<Self, ConfigError> {
        let from = from
            .as_str()
            .parse()
            .map_err(|e| ConfigError::new("MAIL_FROM", format!("{e}")))?;
        let backend = match smtp_url.strip_prefix(MEMORY_SCHEME) {
            Some(name) => {
                tracing::warn!(
                    outbox = name,
                    "SMTP_URL is memory://: emails are kept in this process only and nobody receives them"
                );
                Backend::Memory(memory_outbox(name))
            }
            None => Backend::Smtp(transport_from_url(smtp_url)?),
        };
        Ok(Self { backend, from })
    }

    /// Sends a `multipart/alternative` email (plain text and HTML). Its span holds the email's
    /// id, never its address or body.
    #[tracing::instrument(name = "smtp send", skip_all, fields(otel.kind = "client", email_id = message_id))]
    pub async fn send(
        &self,
        to: &EmailAddress,
        message_id: &str,
        email: &Rendered,
    ) -> Result<(), SendError> {
        // The same parser intake validated the address with: what was accepted can be sent.
        let address: lettre::Address = to
            .as_str()
            .parse()
            .map_err(|e| SendError::Permanent(format!("bad recipient: {e}")))?;
        let to = Mailbox::new(None, address);
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&email.subject)
            .message_id(Some(message_id.to_owned()))
            .multipart(MultiPart::alternative_plain_html(
                email.text.clone(),
                email.html.clone(),
            ))
            .map_err(|e| SendError::Permanent(format!("cannot build the email: {e}")))?;
        let transport = match &self.backend {
            Backend::Smtp(transport) => transport,
            Backend::Memory(outbox) => {
                outbox
                    .send(message)
                    .await
                    .map_err(|e| SendError::Permanent(e.to_string()))?;
                metrics::counter!("labbook_emails_total", "outcome" => "sent").increment(1);
                return Ok(());
            }
        };
        match transport.send(message).await {
            Ok(_) => {
                metrics::counter!("labbook_emails_total", "outcome" => "sent").increment(1);
                Ok(())
            }
            Err(err) if err.is_permanent() => {
                metrics::counter!("labbook_emails_total", "outcome" => "refused").increment(1);
                Err(SendError::Permanent(without_addresses(&err.to_string())))
            }
            Err(err) => {
                metrics::counter!("labbook_emails_total", "outcome" => "failed").increment(1);
                if err.is_transient() {
                    Err(SendError::Transient(without_addresses(&err.to_string())))
                } else {
                    Err(SendError::Unreachable(without_addresses(&err.to_string())))
                }
            }
        }
    }
}

/// `reply` with every word holding an `@` replaced by `<address>`: an SMTP server's refusal
/// often quotes the recipient (`550 5.1.1 <ana@example.org>: Recipient address rejected`), and
/// the reason goes on to logs, dead letters, the console and traces.
fn without_addresses(reply: &str) -> String {
    reply
        .split(' ')
        .map(|word| {
            if word.contains('@') {
                "<address>"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The async SMTP transport for `url`: `smtp://host:port` (plain, for local sinks),
/// `smtp://user:pass@host:587?tls=required` (STARTTLS) or `smtps://user:pass@host:465`
/// (implicit TLS). Connections are pooled; each SMTP command times out after 20 s.
/// Must be called inside the tokio runtime (the pool runs a task).
pub fn transport_from_url(url: &str) -> Result<AsyncSmtpTransport<Tokio1Executor>, ConfigError> {
    Ok(builder(url)?
        .timeout(Some(Duration::from_secs(20)))
        .pool_config(
            PoolConfig::new()
                .max_size(4)
                .idle_timeout(Duration::from_secs(60)),
        )
        .build())
}

/// Checks `SMTP_URL` without connecting (usable outside the runtime).
pub fn check_url(url: &str) -> Result<(), ConfigError> {
    if url.starts_with(MEMORY_SCHEME) {
        return Ok(());
    }
    builder(url).map(|_| ())
}

/// The in-memory outbox `name` of this process (`SMTP_URL=memory://<name>`), made on first
/// use: every mailer on that URL writes to it, and [`AsyncStubTransport::messages`] reads the
/// raw emails back.
pub fn memory_outbox(name: &str) -> AsyncStubTransport {
    static OUTBOXES: OnceLock<Mutex<HashMap<String, AsyncStubTransport>>> = OnceLock::new();
    let mut outboxes = OUTBOXES
        .get_or_init(Default::default)
        .lock()
        .expect("outbox registry lock");
    outboxes
        .entry(name.to_owned())
        .or_insert_with(AsyncStubTransport::new_ok)
        .clone()
}

fn builder(url: &str) -> Result<lettre::transport::smtp::AsyncSmtpTransportBuilder, ConfigError> {
    if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
        return Err(ConfigError::new(
            "SMTP_URL",
            "must start with smtp:// or smtps://",
        ));
    }
    AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map_err(|_| {
        ConfigError::new(
            "SMTP_URL",
            "is not a usable SMTP URL (smtp://host:port, smtps://user:pass@host:465)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_its_code_and_loses_the_address() {
        let reply =
            "permanent error (550): 5.1.1 <ana.lopez@example.org>: Recipient address rejected";
        assert_eq!(
            without_addresses(reply),
            "permanent error (550): 5.1.1 <address> Recipient address rejected"
        );
    }
}
