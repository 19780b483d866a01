//! The pipeline's stages, one module each. A stage is a [`crate::broker::Stage`]: a step
//! function over one queue's messages that the shared runtime drives.

pub mod credentials;
pub mod notifier;
pub mod provisioner;
pub mod scheduler;

/// How a stage failed, which decides what the runtime does with the message.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Will not change on retry (bad input, a conflict, an EC2 parameter error): dead-letter now.
    /// The text goes into the `x-labbook-error` header: no secrets, no large pieces of the body.
    #[error("{0}")]
    Permanent(String),
    /// May pass later (connection, throttling, SMTP 4xx): retry through the delay tiers.
    #[error(transparent)]
    Transient(anyhow::Error),
}

impl StageError {
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }

    pub fn transient(err: impl Into<anyhow::Error>) -> Self {
        Self::Transient(err.into())
    }
}

impl From<sqlx::Error> for StageError {
    fn from(err: sqlx::Error) -> Self {
        Self::Transient(anyhow::Error::new(err).context("database"))
    }
}

impl From<crate::broker::PublishError> for StageError {
    fn from(err: crate::broker::PublishError) -> Self {
        Self::Transient(err.into())
    }
}
