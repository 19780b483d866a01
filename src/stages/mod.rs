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
    /// May pass later (throttling, capacity, SMTP 4xx): retry through the delay tiers, then
    /// dead-letter when the attempts are used up.
    #[error(transparent)]
    Transient(anyhow::Error),
    /// A dependency is unreachable (the database is down, its schema not there yet): retry
    /// through the delay tiers for as long as it takes; the message's attempts are not spent.
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
}

/// SQLSTATEs that mean "the database cannot serve now" rather than "this query failed":
/// connection failures, shutdown, too many connections, no such database, no such table yet.
const UNAVAILABLE_STATES: &[&str] = &[
    "08000", "08001", "08003", "08004", "08006", "3D000", "42P01", "53300", "57P01", "57P02",
    "57P03",
];

impl From<sqlx::Error> for StageError {
    fn from(err: sqlx::Error) -> Self {
        let unavailable = match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| UNAVAILABLE_STATES.contains(&c.as_ref())),
            _ => false,
        };
        let err = anyhow::Error::new(err).context("database");
        if unavailable {
            Self::Unavailable(err)
        } else {
            Self::Transient(err)
        }
    }
}

impl From<crate::broker::PublishError> for StageError {
    fn from(err: crate::broker::PublishError) -> Self {
        Self::Transient(err.into())
    }
}
