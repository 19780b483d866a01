//! PostgreSQL through sqlx: bookings, credentials, the schedule, slots and the email log.
//! Migrations are embedded and applied by `labbook migrate`.

pub mod bookings;
pub mod emails;
pub mod schedule;
pub mod slots;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use bookings::{BookingRecord, BookingState, Intake, StoredCredential};

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

    /// Creates the database named in `url` if it does not exist, then applies pending
    /// migrations.
    pub async fn ensure_schema(&self, url: &str) -> anyhow::Result<()> {
        use anyhow::Context;
        use sqlx::migrate::MigrateDatabase;
        if !sqlx::Postgres::database_exists(url)
            .await
            .context("cannot reach the database")?
        {
            // Another process may create it at the same moment.
            if let Err(err) = sqlx::Postgres::create_database(url).await
                && !sqlx::Postgres::database_exists(url).await.unwrap_or(false)
            {
                return Err(anyhow::Error::new(err).context("cannot create the database"));
            }
            tracing::info!("created the database");
        }
        self.migrate().await.context("migration failed")
    }

    /// Whether the database answers (for readiness).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}
