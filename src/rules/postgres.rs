//! Rules and API keys from PostgreSQL.
//!
//! [`load_catalog`] reads plans, tenants, live keys and rule rows in one
//! repeatable-read transaction (consistent across tables, and allowed on a
//! hot standby). [`PostgresSource`] keeps the rules in force current: it
//! LISTENs on the primary, and on each NOTIFY waits until the replica has
//! replayed the primary's WAL position before reading, so it never installs
//! rules older than the change it was told about. Every successful load is
//! also written to a local snapshot file, which start-up uses when
//! PostgreSQL is down.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::Row as _;

use super::catalog::{
    rows_from_yaml, yaml_from_rows, Catalog, KeyRow, PlanRow, RuleRow, RuleScope, TenantRow,
};
use super::yaml::YamlRoot;
use super::{RuleErrors, RulesHandle};
use crate::health::Readiness;
use crate::limiter::RuleSet;
use crate::telemetry::names;

/// The NOTIFY channel the schema's triggers send on.
pub const CHANNEL: &str = "sluice_config";

/// A full reload this often even without a NOTIFY: a safety net for a
/// notification lost with a silently dead connection.
const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// How often to ask the replica whether it has replayed far enough.
const REPLAY_POLL: Duration = Duration::from_millis(10);
/// After this, a replica that has not caught up counts as a failure (the
/// session is restarted, with backoff), and is logged.
const REPLAY_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a replica that failed the last load gets to show, on the next,
/// that it is up and has replayed the change.
const REPLICA_RETRY_TIMEOUT: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the replica has not replayed the primary's WAL up to {lsn} after {waited:?}")]
    ReplicaBehind { lsn: String, waited: Duration },
    #[error("the connection to the primary for LISTEN was lost")]
    ListenerLost,
}

async fn within<T, E>(
    limit: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, SourceError>
where
    SourceError: From<E>,
{
    match tokio::time::timeout(limit, f).await {
        Ok(result) => result.map_err(SourceError::from),
        Err(_) => Err(SourceError::Timeout(limit)),
    }
}

// === Reading ===

/// Reads everything sluice serves from, in one consistent snapshot.
pub async fn load_catalog(pool: &PgPool) -> Result<Catalog, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let plans = sqlx::query("SELECT name, monthly_quota FROM plans ORDER BY name")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(PlanRow {
                name: r.try_get("name")?,
                monthly_quota: r.try_get("monthly_quota")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    let tenants = sqlx::query("SELECT id::text AS id, name, plan FROM tenants ORDER BY name")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(TenantRow {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                plan: r.try_get("plan")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    let keys = sqlx::query(
        "SELECT key_hash, tenant_id::text AS tenant_id, plan FROM api_keys
         WHERE revoked_at IS NULL ORDER BY key_hash",
    )
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| {
        Ok(KeyRow {
            hash: r.try_get("key_hash")?,
            tenant_id: r.try_get("tenant_id")?,
            plan: r.try_get("plan")?,
        })
    })
    .collect::<Result<_, sqlx::Error>>()?;
    let rules = sqlx::query(&format!(
        "{RULE_COLUMNS} ORDER BY r.domain, r.plan NULLS FIRST, t.name NULLS FIRST, r.position"
    ))
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(rule_row)
    .collect::<Result<_, _>>()?;
    tx.commit().await?;
    Ok(Catalog {
        plans,
        tenants,
        keys,
        rules,
    })
}

const RULE_COLUMNS: &str = "SELECT r.domain, r.plan, t.name AS tenant, r.position,
        r.path_keys, r.path_values, r.unit, r.requests_per_unit, r.unlimited, r.algorithm,
        r.burst, r.name, r.replaces, r.shadow_mode, r.quota_mode, r.detailed_metric,
        r.value_to_metric, r.share_threshold, r.metadata::text AS metadata
    FROM rules r LEFT JOIN tenants t ON t.id = r.tenant_id";

fn rule_row(r: &PgRow) -> Result<RuleRow, sqlx::Error> {
    let plan: Option<String> = r.try_get("plan")?;
    let tenant: Option<String> = r.try_get("tenant")?;
    let keys: Vec<String> = r.try_get("path_keys")?;
    let values: Vec<String> = r.try_get("path_values")?;
    let metadata: String = r.try_get("metadata")?;
    let metadata: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&metadata).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(RuleRow {
        domain: r.try_get("domain")?,
        scope: match (plan, tenant) {
            (Some(p), _) => RuleScope::Plan(p),
            (None, Some(t)) => RuleScope::Tenant(t),
            (None, None) => RuleScope::Domain,
        },
        position: r.try_get("position")?,
        path: keys.into_iter().zip(values).collect(),
        unit: r.try_get("unit")?,
        requests_per_unit: r.try_get("requests_per_unit")?,
        unlimited: r.try_get("unlimited")?,
        algorithm: r.try_get("algorithm")?,
        burst: r.try_get("burst")?,
        name: r.try_get("name")?,
        replaces: r.try_get("replaces")?,
        shadow_mode: r.try_get("shadow_mode")?,
        quota_mode: r.try_get("quota_mode")?,
        detailed_metric: r.try_get("detailed_metric")?,
        value_to_metric: r.try_get("value_to_metric")?,
        share_threshold: r.try_get("share_threshold")?,
        metadata: metadata
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
    })
}

// === Writing: `sluice rules apply` and `export` ===

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("there is no tenant named '{0}'")]
    NoSuchTenant(String),
    #[error("there is no plan named '{0}'")]
    NoSuchPlan(String),
    #[error(transparent)]
    Invalid(#[from] RuleErrors),
}

/// The scope's columns: (plan, tenant id), checking that it exists.
async fn scope_columns(
    conn: &mut sqlx::PgConnection,
    scope: &RuleScope,
) -> Result<(Option<String>, Option<String>), AdminError> {
    match scope {
        RuleScope::Domain => Ok((None, None)),
        RuleScope::Plan(p) => {
            let found: Option<String> =
                sqlx::query_scalar("SELECT name FROM plans WHERE name = $1")
                    .bind(p)
                    .fetch_optional(&mut *conn)
                    .await?;
            found
                .map(|p| (Some(p), None))
                .ok_or_else(|| AdminError::NoSuchPlan(p.clone()))
        }
        RuleScope::Tenant(t) => {
            let id: Option<String> =
                sqlx::query_scalar("SELECT id::text FROM tenants WHERE name = $1")
                    .bind(t)
                    .fetch_optional(&mut *conn)
                    .await?;
            id.map(|id| (None, Some(id)))
                .ok_or_else(|| AdminError::NoSuchTenant(t.clone()))
        }
    }
}

/// Replaces the rules of every domain in `files` (parsed and validated by
/// the caller), for one scope, in one transaction. Returns (domain, rows).
pub async fn replace_rules(
    pool: &PgPool,
    files: &[(String, YamlRoot)],
    scope: &RuleScope,
) -> Result<Vec<(String, usize)>, AdminError> {
    let mut tx = pool.begin().await?;
    let (plan, tenant_id) = scope_columns(&mut tx, scope).await?;
    let mut written = Vec::new();
    for (_, root) in files {
        let rows = rows_from_yaml(root, scope);
        let domain = root.domain.clone().unwrap_or_default();
        sqlx::query(
            "DELETE FROM rules WHERE domain = $1
             AND plan IS NOT DISTINCT FROM $2 AND tenant_id IS NOT DISTINCT FROM $3::uuid",
        )
        .bind(&domain)
        .bind(&plan)
        .bind(&tenant_id)
        .execute(&mut *tx)
        .await?;
        for row in &rows {
            let (keys, values): (Vec<&str>, Vec<&str>) = row
                .path
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .unzip();
            let metadata = serde_json::to_string(&row.metadata).unwrap_or_else(|_| "{}".into());
            sqlx::query(
                "INSERT INTO rules (domain, plan, tenant_id, position, path_keys, path_values,
                     unit, requests_per_unit, unlimited, algorithm, burst, name, replaces,
                     shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold,
                     metadata)
                 VALUES ($1, $2, $3::uuid, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                     $16, $17, $18, $19::jsonb)",
            )
            .bind(&domain)
            .bind(&plan)
            .bind(&tenant_id)
            .bind(row.position)
            .bind(keys)
            .bind(values)
            .bind(&row.unit)
            .bind(row.requests_per_unit)
            .bind(row.unlimited)
            .bind(&row.algorithm)
            .bind(row.burst)
            .bind(&row.name)
            .bind(&row.replaces)
            .bind(row.shadow_mode)
            .bind(row.quota_mode)
            .bind(row.detailed_metric)
            .bind(row.value_to_metric)
            .bind(row.share_threshold)
            .bind(metadata)
            .execute(&mut *tx)
            .await?;
        }
        written.push((domain, rows.len()));
    }
    tx.commit().await?;
    Ok(written)
}

/// One domain's rules for one scope, as YAML; `None` if it has none.
pub async fn export_rules(
    pool: &PgPool,
    domain: &str,
    scope: &RuleScope,
) -> Result<Option<YamlRoot>, AdminError> {
    let mut conn = pool.acquire().await?;
    let (plan, tenant_id) = scope_columns(&mut conn, scope).await?;
    let rows: Vec<RuleRow> = sqlx::query(&format!(
        "{RULE_COLUMNS} WHERE r.domain = $1 AND r.plan IS NOT DISTINCT FROM $2
         AND r.tenant_id IS NOT DISTINCT FROM $3::uuid ORDER BY r.position"
    ))
    .bind(domain)
    .bind(plan)
    .bind(tenant_id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(rule_row)
    .collect::<Result<_, _>>()?;
    if rows.is_empty() {
        return Ok(None);
    }
    let refs: Vec<&RuleRow> = rows.iter().collect();
    let file = format!("postgres:{}", scope.label(domain));
    Ok(Some(yaml_from_rows(domain, &file, &refs)?))
}

// === The local snapshot ===

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    version: u32,
    /// RFC 3339, for humans.
    written_at: String,
    catalog: Catalog,
}

/// Writes the catalog atomically (a temporary file, then rename), readable
/// by its owner only: it holds key hashes.
pub fn write_snapshot(path: &Path, catalog: &Catalog) -> std::io::Result<()> {
    let file = SnapshotFile {
        version: 1,
        written_at: chrono::Utc::now().to_rfc3339(),
        catalog: catalog.clone(),
    };
    let json = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads a snapshot back; the error says why it cannot be used.
pub fn read_snapshot(path: &Path) -> Result<(Catalog, String), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: SnapshotFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a sluice snapshot: {e}", path.display()))?;
    if file.version != 1 {
        return Err(format!(
            "{}: unknown snapshot version {}",
            path.display(),
            file.version
        ));
    }
    Ok((file.catalog, file.written_at))
}

// === The live source ===

/// Where to read from and what to publish into.
pub struct PostgresSource {
    primary: PgPool,
    /// Reads go here when set; else to the primary.
    replica: Option<PgPool>,
    /// A pool of one for the LISTEN connection, so it never waits behind
    /// queries.
    listen: PgPool,
    timeout: Duration,
    rules: RulesHandle,
    readiness: Arc<Readiness>,
    snapshot: Option<PathBuf>,
    /// Of the catalog in force, to skip reloads that change nothing.
    fingerprint: Option<[u8; 32]>,
    /// Of the last catalog refused as invalid, to log it once.
    refused: Option<[u8; 32]>,
    up: bool,
    /// Why the last read from the replica failed, while reads go to the
    /// primary instead.
    replica_failing: Option<String>,
}

impl PostgresSource {
    pub fn new(
        primary: PgPool,
        replica: Option<PgPool>,
        listen: PgPool,
        timeout: Duration,
        rules: RulesHandle,
        readiness: Arc<Readiness>,
        snapshot: Option<PathBuf>,
    ) -> PostgresSource {
        PostgresSource {
            primary,
            replica,
            listen,
            timeout,
            rules,
            readiness,
            snapshot,
            fingerprint: None,
            refused: None,
            up: true,
            replica_failing: None,
        }
    }

    fn source_name(&self) -> &'static str {
        match (&self.replica, &self.replica_failing) {
            (Some(_), None) => "postgres:replica",
            (Some(_), Some(_)) => "postgres:primary (replica failing)",
            (None, _) => "postgres:primary",
        }
    }

    /// The catalog as the primary has committed it: from the replica once
    /// it has replayed that far (waiting up to `max_wait`), else from the
    /// primary, so that a replica that is down or stuck never holds back a
    /// change; the replica is tried first again on the next load. Fails when
    /// the primary cannot say what it has committed.
    async fn load_current(&mut self, max_wait: Duration) -> Result<Catalog, SourceError> {
        let Some(replica) = self.replica.clone() else {
            return within(self.timeout, load_catalog(&self.primary)).await;
        };
        let lsn: String = within(
            self.timeout,
            sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&self.primary),
        )
        .await?;
        // A replica that failed last time gets a short try at showing it is
        // up and current, so that while it stays down or stuck a change waits
        // for it once, not every time; once it is, it is read as usual.
        let (poll_timeout, max_wait) = match self.replica_failing {
            Some(_) => (
                self.timeout.min(REPLICA_RETRY_TIMEOUT),
                max_wait.min(REPLICA_RETRY_TIMEOUT),
            ),
            None => (self.timeout, max_wait),
        };
        let from_replica = match wait_for_replay(&replica, &lsn, poll_timeout, max_wait).await {
            Ok(()) => within(self.timeout, load_catalog(&replica)).await,
            Err(e) => Err(e),
        };
        match from_replica {
            Ok(catalog) => {
                if self.replica_failing.take().is_some() {
                    tracing::info!("reading rules from the replica again");
                }
                return Ok(catalog);
            }
            Err(e) => {
                if self.replica_failing.replace(e.to_string()).is_none() {
                    tracing::warn!(error = %e, "cannot read rules from the replica; reading the primary");
                }
                counter!(names::POSTGRES_REPLICA_FALLBACKS).increment(1);
            }
        }
        within(self.timeout, load_catalog(&self.primary)).await
    }

    /// The first load. When PostgreSQL cannot give valid rules, starts from
    /// the snapshot; without one, starts with no limits, or fails when
    /// `require_rules`.
    pub async fn start_up(&mut self, require_rules: bool) -> anyhow::Result<()> {
        // Not older than what the primary has committed; when neither the
        // primary nor a current replica answers, the replica as it is (newer
        // than any snapshot), and the follow-up in `run` catches up.
        let loaded = match (self.load_current(self.timeout).await, self.replica.clone()) {
            (Err(e), Some(replica)) => {
                tracing::warn!(error = %e, "the primary cannot be read; reading the replica as it is");
                within(self.timeout, load_catalog(&replica)).await
            }
            (loaded, _) => loaded,
        };
        let reason = match loaded {
            Ok(catalog) => match catalog.compile() {
                Ok(set) => {
                    self.install(catalog, set, None).await;
                    return Ok(());
                }
                Err(errors) => format!("the rules in PostgreSQL are invalid:\n{errors}"),
            },
            Err(e) => format!("PostgreSQL unavailable: {e}"),
        };
        gauge!(names::POSTGRES_UP).set(0.0);
        self.up = false;
        if let Some(path) = &self.snapshot {
            let loaded = read_snapshot(path).and_then(|(catalog, written_at)| {
                let set = catalog
                    .compile()
                    .map_err(|e| format!("{}: invalid rules: {e}", path.display()))?;
                Ok((catalog, set, written_at))
            });
            match loaded {
                Ok((catalog, set, written_at)) => {
                    tracing::warn!(
                        reason = %reason,
                        snapshot = %path.display(),
                        written_at = %written_at,
                        "starting from the local snapshot of the rules; PostgreSQL will be retried"
                    );
                    self.fingerprint = Some(catalog.fingerprint());
                    publish(&self.rules, set);
                    self.readiness.update_rules(|s| {
                        s.loaded = true;
                        s.source = format!("snapshot:{}", path.display());
                        s.last_error = Some(format!(
                            "serving the snapshot written at {written_at}: {reason}"
                        ));
                    });
                    return Ok(());
                }
                Err(why) => tracing::warn!(snapshot = %why, "the snapshot cannot be used"),
            }
        }
        if require_rules {
            anyhow::bail!(
                "{reason}; no usable snapshot (--rules-snapshot); refusing to start (--require-rules)"
            );
        }
        tracing::warn!(reason = %reason, "starting with no rate limits until PostgreSQL answers");
        self.readiness.update_rules(|s| {
            s.loaded = true;
            s.source = "none".into();
            s.last_error = Some(format!("no rules yet, nothing is limited: {reason}"));
        });
        Ok(())
    }

    /// Follows changes until the process ends: LISTEN, reload on NOTIFY,
    /// reconnect with backoff when PostgreSQL goes away.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let Err(e) = self.session(&mut backoff).await;
            self.mark_down(&e);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One LISTEN connection's life; returns why it ended.
    async fn session(&mut self, backoff: &mut Duration) -> Result<Infallible, SourceError> {
        let mut listener = within(self.timeout, PgListener::connect_with(&self.listen)).await?;
        listener.eager_reconnect(false);
        within(self.timeout, listener.listen(CHANNEL)).await?;
        // Catch up with whatever changed while nobody listened.
        self.reload(None).await?;
        *backoff = BACKOFF_MIN;
        loop {
            match tokio::time::timeout(RESYNC_EVERY, listener.try_recv()).await {
                Ok(Ok(Some(_))) => {
                    let notified = Instant::now();
                    // Several changes committed together need one reload.
                    while listener.next_buffered().is_some() {}
                    self.reload(Some(notified)).await?;
                }
                Ok(Ok(None)) => return Err(SourceError::ListenerLost),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => self.reload(None).await?,
            }
        }
    }

    /// Loads what the primary has committed (see `load_current`) and puts
    /// it in force if it changed and is valid.
    async fn reload(&mut self, notified: Option<Instant>) -> Result<(), SourceError> {
        let catalog = self.load_current(REPLAY_WAIT_MAX).await?;
        self.mark_up();
        let fingerprint = catalog.fingerprint();
        if self.fingerprint == Some(fingerprint) {
            self.readiness.update_rules(|s| {
                s.source = self.source_name().into();
                s.last_error = None;
            });
            return Ok(());
        }
        match catalog.compile() {
            Ok(set) => {
                self.install(catalog, set, notified).await;
                counter!(names::RULE_RELOADS, "result" => "success").increment(1);
            }
            Err(errors) => {
                counter!(names::RULE_RELOADS, "result" => "failure").increment(1);
                if self.refused.replace(fingerprint) != Some(fingerprint) {
                    for e in &errors.0 {
                        tracing::warn!(error = %e, "invalid rules in PostgreSQL; keeping the rules in force");
                    }
                }
                self.readiness.update_rules(|s| {
                    s.last_error = Some(format!("invalid rules refused:\n{errors}"))
                });
            }
        }
        Ok(())
    }

    /// Publishes a valid catalog and keeps a snapshot of it.
    async fn install(&mut self, catalog: Catalog, set: RuleSet, notified: Option<Instant>) {
        let count = set.rules().len();
        let keys = set.api_key_count();
        publish(&self.rules, set);
        if let Some(t) = notified {
            histogram!(names::RULES_RELOAD_DURATION).record(t.elapsed().as_secs_f64());
        }
        self.fingerprint = Some(catalog.fingerprint());
        self.refused = None;
        let source = self.source_name();
        self.readiness.update_rules(|s| {
            s.loaded = true;
            s.source = source.into();
            s.last_error = None;
        });
        tracing::info!(
            rules = count,
            api_keys = keys,
            source,
            "rules loaded from PostgreSQL"
        );
        if let Some(path) = self.snapshot.clone() {
            let written =
                tokio::task::spawn_blocking(move || write_snapshot(&path, &catalog).map(|()| path))
                    .await;
            match written {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the rules snapshot"),
                Err(e) => tracing::warn!(error = %e, "cannot write the rules snapshot"),
            }
        }
    }

    fn mark_up(&mut self) {
        gauge!(names::POSTGRES_UP).set(1.0);
        gauge!(names::RULES_SYNCED).set(unix_seconds());
        if !std::mem::replace(&mut self.up, true) {
            tracing::info!("PostgreSQL reachable again");
        }
    }

    fn mark_down(&mut self, error: &SourceError) {
        gauge!(names::POSTGRES_UP).set(0.0);
        if std::mem::replace(&mut self.up, false) {
            tracing::warn!(error = %error, "PostgreSQL unavailable; the rules in force stay, retrying with backoff");
        }
        self.readiness.update_rules(|s| {
            s.last_error = Some(format!(
                "PostgreSQL unavailable, serving the rules loaded before: {error}"
            ));
        });
    }
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn publish(rules: &RulesHandle, set: RuleSet) {
    gauge!(names::RULES_LOADED).set(set.rules().len() as f64);
    gauge!(names::API_KEYS_LOADED).set(set.api_key_count() as f64);
    rules.store(Arc::new(set));
}

/// Polls the replica until it has replayed the primary's WAL up to `lsn`
/// (immediately true when it is not in recovery, e.g. after a promotion),
/// for at most `max_wait`.
async fn wait_for_replay(
    replica: &PgPool,
    lsn: &str,
    timeout: Duration,
    max_wait: Duration,
) -> Result<(), SourceError> {
    let started = Instant::now();
    let mut warned = false;
    loop {
        let caught_up: bool = within(
            timeout,
            sqlx::query_scalar(
                "SELECT NOT pg_is_in_recovery()
                     OR coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)",
            )
            .bind(lsn)
            .fetch_one(replica),
        )
        .await?;
        if caught_up {
            if warned {
                tracing::info!(waited = ?started.elapsed(), "the replica caught up");
            }
            return Ok(());
        }
        let waited = started.elapsed();
        if waited > max_wait {
            return Err(SourceError::ReplicaBehind {
                lsn: lsn.to_owned(),
                waited,
            });
        }
        if !warned && waited > Duration::from_secs(2) {
            warned = true;
            tracing::warn!(lsn, "waiting for the replica to replay a rules change");
        }
        tokio::time::sleep(REPLAY_POLL).await;
    }
}
