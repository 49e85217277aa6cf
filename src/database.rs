//! PostgreSQL connections and the schema migrations, embedded in the binary
//! so `sluice migrate` needs nothing but the database.

use std::borrow::Cow;
use std::str::FromStr as _;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::secret::{redact_url, Secret};

/// The files in `migrations/`, in order. sqlx checks each one's checksum
/// against what it applied before, so an applied file must never change:
/// add a new one instead.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "tenancy rules usage",
    include_str!("../migrations/0001_tenancy_rules_usage.sql"),
)];

#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Applies the migrations not yet applied (under sqlx's advisory lock, so
/// instances starting together take turns); returns their versions.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, sqlx::migrate::MigrateError> {
    let before = applied_versions(pool).await.unwrap_or_default();
    let migrator = Migrator::new(Embedded).await?;
    migrator.run(pool).await?;
    let after = applied_versions(pool).await?;
    Ok(after.into_iter().filter(|v| !before.contains(v)).collect())
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
}

/// Connection options from a URL, with the password from a separate secret
/// when given (so it can come from a Kubernetes Secret, not the URL).
pub fn options(url: &str, password: Option<&Secret>) -> Result<PgConnectOptions, String> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| format!("invalid database URL '{}': {e}", redact_url(url)))?
        .application_name("sluice");
    Ok(match password {
        Some(p) => options.password(&p.0),
        None => options,
    })
}

/// A pool that connects on first use: start-up does not wait for (or fail
/// on) a database that is down.
pub fn lazy_pool(options: PgConnectOptions, max_connections: u32, timeout: Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_lazy_with(options)
}

/// A pool for one-shot commands: connects now, so a bad URL fails at once.
pub async fn connect(url: &str, password: Option<&Secret>) -> anyhow::Result<PgPool> {
    let options = options(url, password).map_err(anyhow::Error::msg)?;
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", redact_url(url)))
}
