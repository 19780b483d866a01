//! PostgreSQL through sqlx: bookings, credentials, the schedule, slots, the email log and each
//! booking's history of events.
//! Migrations are embedded and applied by `labbook migrate`.

pub mod bookings;
pub mod boots;
pub mod capacity;
pub mod emails;
pub mod events;
pub mod heartbeat;
pub mod intake;
pub mod machines;
pub mod offerings;
pub mod outbox;
pub mod schedule;
pub mod slots;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use bookings::{BookingRecord, BookingState, StoredCredential};

use crate::broker::StageError;

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The database handle every stage shares.
#[derive(Clone, Debug)]
pub struct Store {
    pub pool: PgPool,
}

impl Store {
    /// A pool that connects lazily: a worker starts while the database is away and its
    /// handlers fail transiently (and retry) until it is back.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)?;
        Ok(Self { pool })
    }

    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Self { pool })
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Applies pending migrations to the database named in `url`, creating it first only
    /// when it does not exist (SQLSTATE 3D000). The target database is reached directly, so a
    /// role that may not connect to the `postgres` maintenance database (a managed server,
    /// PgBouncer exposing one database) migrates as well.
    pub async fn ensure_schema(&self, url: &str) -> anyhow::Result<()> {
        use anyhow::Context;
        use sqlx::migrate::MigrateDatabase;
        match self.migrate().await {
            Err(sqlx::migrate::MigrateError::Execute(err)) if is_missing_database(&err) => {
                // Another process may create it at the same moment.
                if let Err(err) = sqlx::Postgres::create_database(url).await
                    && !sqlx::Postgres::database_exists(url).await.unwrap_or(false)
                {
                    return Err(anyhow::Error::new(err).context("cannot create the database"));
                }
                tracing::info!("created the database");
                self.migrate().await.context("migration failed")
            }
            other => other.context("migration failed"),
        }
    }

    /// The stored booking `booking_id`; a booking that was never stored is permanent for the
    /// message that names it.
    pub async fn stored_booking(&self, booking_id: &str) -> Result<BookingRecord, StageError> {
        bookings::find(&self.pool, booking_id)
            .await?
            .ok_or_else(|| StageError::permanent(format!("booking {booking_id} is not stored")))
    }

    /// Whether the database answers (for readiness).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

fn is_missing_database(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

/// SQLSTATEs that mean "the database cannot serve now" rather than "this query failed":
/// connection failures, shutdown, too many connections, no such database, no such table yet.
const UNAVAILABLE_STATES: &[&str] = &[
    "08000", "08001", "08003", "08004", "08006", "3D000", "42P01", "53300", "57P01", "57P02",
    "57P03",
];

/// A database that is away, full or not migrated yet is waited for (no attempt is spent);
/// any other database error is transient.
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
