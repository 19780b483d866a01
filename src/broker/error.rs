//! How a stage failed, which decides what the runtime does with the message.
//!
//! The conversions from the errors of the database, EC2 and the mail relay live beside those
//! errors (`store`, `ec2`, `mail`): each knows which of its failures are permanent, which may
//! pass, and which mean the dependency is down.

/// How a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Will not change on retry (bad input, a conflict, an EC2 parameter error): dead-letter now.
    /// The text goes into the `x-labbook-error` header: no secrets, no large pieces of the body.
    #[error("{0}")]
    Permanent(String),
    /// May pass later (capacity, SMTP 4xx): retry through the delay tiers, then dead-letter
    /// when the attempts are used up.
    #[error(transparent)]
    Transient(anyhow::Error),
    /// A dependency is down or pushing back (the database, the mail relay, EC2 unreachable or
    /// throttling): wait through the delay tiers for as long as it takes, without spending the
    /// message's attempts.
    #[error(transparent)]
    Unavailable(anyhow::Error),
}

impl StageError {
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }

    pub fn transient(err: impl Into<anyhow::Error>) -> Self {
        Self::Transient(err.into())
    }

    pub fn unavailable(err: impl Into<anyhow::Error>) -> Self {
        Self::Unavailable(err.into())
    }
}

impl From<super::PublishError> for StageError {
    fn from(err: super::PublishError) -> Self {
        Self::Unavailable(err.into())
    }
}
