//! PostgreSQL connections and the schema migrations, embedded in the binary
//! so `sluice migrate` needs nothing but the database.

use std::str::FromStr as _;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::secret::{redact_url, Secret};

/// The files in `migrations/`, `<version>_<description>.sql`, read at build
/// time (`build.rs` has cargo rebuild when the folder changes). sqlx checks
/// each one's checksum against what it applied before, so an applied file
/// must never change: add a new one instead.
static MIGRATOR: Migrator = sqlx::migrate!();

/// Applies the migrations not yet applied (under sqlx's advisory lock, so
/// instances starting together take turns); returns their versions.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, sqlx::migrate::MigrateError> {
    let before = applied_versions(pool).await.unwrap_or_default();
    MIGRATOR.run(pool).await?;
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

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::MIGRATOR;

    /// What every migrated database holds in `_sqlx_migrations`: sqlx
    /// refuses to run against one whose applied file has changed since, so
    /// a changed file fails here first, not at a deployment.
    #[test]
    fn applied_migrations_never_change() {
        let applied: Vec<(i64, &str, String)> = MIGRATOR
            .iter()
            .map(|m| {
                let checksum = m.checksum.iter().fold(String::new(), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                });
                (m.version, &*m.description, checksum)
            })
            .collect();
        assert_eq!(
            applied,
            [(
                1,
                "tenancy rules usage",
                "5f634752fd4bc3d55a5552c23d59c8da0c371b70ddbfb17e31aa6ab684aa1142d9ae6f4659ccc263e9b7a7141ef26356".to_owned(),
            ), (
                5,
                "events",
                "494dd0db95ac309f9dd71660fdb6444ea395977c030f1aa88583c90af55c4cc43060112166bf39b9bc6ca950a5b25b8e".to_owned(),
            ), (
                6,
                "admin",
                "af5976befabf670e2cb9d44be736e7cd62089fe73b92f3f3a941a82ecb9e53f36398df770137cbe55b3827f1e9f7cf2c".to_owned(),
            ), (
                7,
                "cycles alerts billing",
                "5429bf32db6839f1bda373dc0a9a87ddccb69961720ed076fec713b1d8e8672a5fed4ed0f56589497e79c43d2a481bb0".to_owned(),
            )],
            "add a migration; never edit an applied one"
        );
    }
}
