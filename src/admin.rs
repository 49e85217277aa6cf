//! Administration of the catalog in PostgreSQL: rules, plans, tenants, API
//! keys and usage, as typed operations. The `sluice` subcommands print what
//! these return; an admin API can serve the same. Each is one statement or
//! one transaction, and the schema's constraints and triggers do the rest (a
//! change NOTIFYs every running sluice, which reloads).
//!
//! [`tokens`] holds the admin API's tokens and [`audit`] its audit log.

pub mod audit;
pub mod tokens;

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::PgExecutor;

use crate::limiter::KeyHasher;
use crate::rules::catalog::{check_storable, rows_from_yaml, yaml_from_rows, RuleRow, RuleScope};
use crate::rules::postgres::domain_rules;
use crate::rules::yaml::YamlRoot;
use crate::rules::RuleErrors;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("there is no tenant named '{0}'")]
    NoSuchTenant(String),
    #[error("there is no plan named '{0}'")]
    NoSuchPlan(String),
    #[error("a tenant named '{0}' already exists")]
    TenantExists(String),
    #[error(transparent)]
    Invalid(#[from] RuleErrors),
    #[error("OS random source failed: {0}")]
    Random(getrandom::Error),
    #[error("could not draw an unused key prefix")]
    NoUnusedPrefix,
    #[error("invalid month")]
    InvalidMonth,
    #[error("a plan named '{0}' already exists")]
    PlanExists(String),
    #[error("the rule set is at version {current}, not the version given")]
    StaleVersion { current: i64 },
    #[error("there is no admin token with prefix '{0}'")]
    NoSuchToken(String),
    #[error("there is no webhook {0}")]
    NoSuchWebhook(uuid::Uuid),
    #[error("invalid webhook URL '{0}': expected http:// or https:// and a host")]
    InvalidUrl(String),
}

fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

// === Rules: `sluice rules apply` and `export` ===

/// The scope's columns: (plan, tenant id), checking that it exists.
async fn scope_columns(
    conn: &mut PgConnection,
    scope: &RuleScope,
) -> Result<(Option<String>, Option<String>), AdminError> {
    Ok(match scope {
        RuleScope::Domain => (None, None),
        RuleScope::Plan(p) => {
            check_plan(conn, p).await?;
            (Some(p.clone()), None)
        }
        RuleScope::Tenant(t) => (None, Some(find_tenant(conn, t).await?.id)),
    })
}

/// The `rule_set_versions.scope` of a scope's columns.
fn scope_key(plan: Option<&str>, tenant_id: Option<&str>) -> String {
    match (plan, tenant_id) {
        (Some(p), _) => format!("plan:{p}"),
        (None, Some(t)) => format!("tenant:{t}"),
        (None, None) => String::new(),
    }
}

/// A rule set written: its domain, how many descriptors, its new version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AppliedRuleSet {
    pub domain: String,
    pub descriptors: usize,
    pub version: i64,
}

/// Replaces the rules of every domain in `files` (parsed and validated by
/// the caller), for one scope, in one transaction, raising each rule set's
/// version. With `expected`, a rule set whose version is another is left
/// alone and the whole write refused (`StaleVersion`): concurrent writers
/// queue on the version row, so of two writers holding the same version
/// one wins and the other is refused.
pub async fn replace_rules(
    pool: &PgPool,
    files: &[(String, YamlRoot)],
    scope: &RuleScope,
    expected: Option<i64>,
) -> Result<Vec<AppliedRuleSet>, AdminError> {
    for (file, root) in files {
        check_storable(file, root)?;
    }
    let mut tx = pool.begin().await?;
    let (plan, tenant_id) = scope_columns(&mut tx, scope).await?;
    let scope_key = scope_key(plan.as_deref(), tenant_id.as_deref());
    let mut written = Vec::new();
    for (_, root) in files {
        let rows = rows_from_yaml(root, scope);
        let domain = root.domain.clone().unwrap_or_default();
        sqlx::query(
            "INSERT INTO rule_set_versions (domain, scope) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
        )
        .bind(&domain)
        .bind(&scope_key)
        .execute(&mut *tx)
        .await?;
        let current: i64 = sqlx::query_scalar(
            "SELECT version FROM rule_set_versions WHERE domain = $1 AND scope = $2 FOR UPDATE",
        )
        .bind(&domain)
        .bind(&scope_key)
        .fetch_one(&mut *tx)
        .await?;
        if expected.is_some_and(|e| e != current) {
            return Err(AdminError::StaleVersion { current });
        }
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
        let version = sqlx::query_scalar(
            "UPDATE rule_set_versions SET version = version + 1, updated_at = now()
             WHERE domain = $1 AND scope = $2 RETURNING version",
        )
        .bind(&domain)
        .bind(&scope_key)
        .fetch_one(&mut *tx)
        .await?;
        written.push(AppliedRuleSet {
            domain,
            descriptors: rows.len(),
            version,
        });
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
    Ok(rule_set(pool, domain, scope).await?.map(|(root, _)| root))
}

/// One domain's rules for one scope, as YAML, and the rule set's version,
/// read in one transaction; `None` if it has none.
pub async fn rule_set(
    pool: &PgPool,
    domain: &str,
    scope: &RuleScope,
) -> Result<Option<(YamlRoot, i64)>, AdminError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (plan, tenant_id) = scope_columns(&mut tx, scope).await?;
    let rows = domain_rules(&mut tx, domain, plan.as_deref(), tenant_id.as_deref()).await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM rule_set_versions WHERE domain = $1 AND scope = $2",
    )
    .bind(domain)
    .bind(scope_key(plan.as_deref(), tenant_id.as_deref()))
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let refs: Vec<&RuleRow> = rows.iter().collect();
    let file = format!("postgres:{}", scope.label(domain));
    Ok(Some((
        yaml_from_rows(domain, &file, &refs)?,
        version.unwrap_or(0),
    )))
}

/// The version of a rule set: 0 if it was never written.
pub async fn rule_set_version(
    pool: &PgPool,
    domain: &str,
    scope: &RuleScope,
) -> Result<i64, AdminError> {
    let mut conn = pool.acquire().await?;
    let (plan, tenant_id) = scope_columns(&mut conn, scope).await?;
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM rule_set_versions WHERE domain = $1 AND scope = $2",
    )
    .bind(domain)
    .bind(scope_key(plan.as_deref(), tenant_id.as_deref()))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(version.unwrap_or(0))
}

/// A rule set as listed: a domain's rules in one scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RuleSetSummary {
    pub domain: String,
    /// Set for a plan's rules.
    pub plan: Option<String>,
    /// Set for a tenant's rules (the tenant's name).
    pub tenant: Option<String>,
    pub descriptors: i64,
    pub version: i64,
}

/// Every rule set, by domain, then the domain's own, plans', tenants'.
pub async fn list_rule_sets(pool: &PgPool) -> Result<Vec<RuleSetSummary>, AdminError> {
    Ok(sqlx::query_as(
        "SELECT r.domain, r.plan, t.name AS tenant, count(*) AS descriptors,
                coalesce(max(v.version), 0)::int8 AS version
         FROM rules r
         LEFT JOIN tenants t ON t.id = r.tenant_id
         LEFT JOIN rule_set_versions v ON v.domain = r.domain AND v.scope =
             CASE WHEN r.plan IS NOT NULL THEN 'plan:' || r.plan
                  WHEN r.tenant_id IS NOT NULL THEN 'tenant:' || r.tenant_id::text
                  ELSE '' END
         GROUP BY r.domain, r.plan, t.name
         ORDER BY r.domain, r.plan NULLS FIRST, t.name NULLS FIRST",
    )
    .fetch_all(pool)
    .await?)
}

// === Plans ===

/// A plan and how many tenants are on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PlanSummary {
    pub name: String,
    /// `None`: no quota.
    pub monthly_quota: Option<i64>,
    /// Price per month in cents; `None`: not priced.
    pub monthly_price_cents: Option<i64>,
    /// Price per 1 000 requests over the quota, in cents; `None`: the quota
    /// is hard (denied past it), else soft (billed past it).
    pub overage_cents_per_1000: Option<i64>,
    pub tenants: i64,
}

const PLAN_COLUMNS: &str =
    "SELECT p.name, p.monthly_quota, p.monthly_price_cents, p.overage_cents_per_1000,
        (SELECT count(*) FROM tenants t WHERE t.plan = p.name) AS tenants
     FROM plans p";

/// Every plan, smallest quota first (no quota last).
pub async fn list_plans(pool: &PgPool) -> Result<Vec<PlanSummary>, AdminError> {
    Ok(sqlx::query_as(&format!(
        "{PLAN_COLUMNS} ORDER BY p.monthly_quota NULLS LAST, p.name"
    ))
    .fetch_all(pool)
    .await?)
}

/// One plan, or `NoSuchPlan`.
pub async fn get_plan(pool: &PgPool, name: &str) -> Result<PlanSummary, AdminError> {
    let found = sqlx::query_as(&format!("{PLAN_COLUMNS} WHERE p.name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await?;
    found.ok_or_else(|| AdminError::NoSuchPlan(name.to_owned()))
}

/// Creates a plan; `PlanExists` if there is one of that name.
pub async fn create_plan(
    pool: &PgPool,
    name: &str,
    monthly_quota: Option<i64>,
    monthly_price_cents: Option<i64>,
) -> Result<PlanSummary, AdminError> {
    sqlx::query("INSERT INTO plans (name, monthly_quota, monthly_price_cents) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(monthly_quota)
        .bind(monthly_price_cents)
        .execute(pool)
        .await
        .map_err(|e| match unique_violation(&e) {
            true => AdminError::PlanExists(name.to_owned()),
            false => AdminError::Database(e),
        })?;
    get_plan(pool, name).await
}

/// What [`update_plan`] changes: each `None` leaves its field as it is,
/// `Some(None)` clears it.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanUpdate {
    pub monthly_quota: Option<Option<i64>>,
    pub monthly_price_cents: Option<Option<i64>>,
    pub overage_cents_per_1000: Option<Option<i64>>,
}

/// Changes a plan's quota and/or prices.
pub async fn update_plan(
    pool: &PgPool,
    name: &str,
    change: PlanUpdate,
) -> Result<PlanSummary, AdminError> {
    let updated = sqlx::query(
        "UPDATE plans SET
             monthly_quota = CASE WHEN $2 THEN $3 ELSE monthly_quota END,
             monthly_price_cents = CASE WHEN $4 THEN $5 ELSE monthly_price_cents END,
             overage_cents_per_1000 = CASE WHEN $6 THEN $7 ELSE overage_cents_per_1000 END
         WHERE name = $1",
    )
    .bind(name)
    .bind(change.monthly_quota.is_some())
    .bind(change.monthly_quota.flatten())
    .bind(change.monthly_price_cents.is_some())
    .bind(change.monthly_price_cents.flatten())
    .bind(change.overage_cents_per_1000.is_some())
    .bind(change.overage_cents_per_1000.flatten())
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(AdminError::NoSuchPlan(name.to_owned()));
    }
    get_plan(pool, name).await
}

/// Creates a plan, or changes its monthly quota (`None`: no quota).
pub async fn set_plan(
    pool: &PgPool,
    name: &str,
    monthly_quota: Option<i64>,
) -> Result<(), AdminError> {
    sqlx::query(
        "INSERT INTO plans (name, monthly_quota) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET monthly_quota = EXCLUDED.monthly_quota",
    )
    .bind(name)
    .bind(monthly_quota)
    .execute(pool)
    .await?;
    Ok(())
}

async fn check_plan<'c>(db: impl PgExecutor<'c>, plan: &str) -> Result<(), AdminError> {
    let found = sqlx::query("SELECT 1 FROM plans WHERE name = $1")
        .bind(plan)
        .fetch_optional(db)
        .await?;
    found
        .map(drop)
        .ok_or_else(|| AdminError::NoSuchPlan(plan.to_owned()))
}

// === Tenants ===

/// Creates a tenant on a plan; returns its id. Its billing cycles are
/// calendar months in UTC; [`create_tenant_in`] names another zone.
pub async fn create_tenant(pool: &PgPool, name: &str, plan: &str) -> Result<String, AdminError> {
    create_tenant_in(pool, name, plan, chrono_tz::Tz::UTC).await
}

/// Creates a tenant on a plan, its billing cycles in `time_zone`.
pub async fn create_tenant_in(
    pool: &PgPool,
    name: &str,
    plan: &str,
    time_zone: chrono_tz::Tz,
) -> Result<String, AdminError> {
    check_plan(pool, plan).await?;
    sqlx::query_scalar(
        "INSERT INTO tenants (name, plan, time_zone) VALUES ($1, $2, $3) RETURNING id::text",
    )
    .bind(name)
    .bind(plan)
    .bind(time_zone.name())
    .fetch_one(pool)
    .await
    .map_err(|e| match unique_violation(&e) {
        true => AdminError::TenantExists(name.to_owned()),
        false => AdminError::Database(e),
    })
}

/// A tenant and how many keys it has that are not revoked.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct TenantSummary {
    pub name: String,
    pub plan: String,
    pub created_at: DateTime<Utc>,
    pub live_keys: i64,
}

/// Every tenant, by name.
pub async fn list_tenants(pool: &PgPool) -> Result<Vec<TenantSummary>, AdminError> {
    Ok(sqlx::query_as(
        "SELECT t.name, t.plan, t.created_at,
                count(k.id) FILTER (WHERE k.revoked_at IS NULL) AS live_keys
         FROM tenants t LEFT JOIN api_keys k ON k.tenant_id = t.id
         GROUP BY t.id ORDER BY t.name",
    )
    .fetch_all(pool)
    .await?)
}

/// A tenant as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub plan: String,
    pub created_at: DateTime<Utc>,
    /// Set while the tenant is suspended: its API keys are refused.
    pub suspended_at: Option<DateTime<Utc>>,
    pub live_keys: i64,
}

const TENANT_COLUMNS: &str =
    "SELECT t.id::text AS id, t.name, t.plan, t.created_at, t.suspended_at,
        (SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id AND k.revoked_at IS NULL)
            AS live_keys
     FROM tenants t";

/// A page of tenants by name, and how many there are in all.
pub async fn list_tenants_page(
    pool: &PgPool,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Tenant>, i64), AdminError> {
    let tenants = sqlx::query_as(&format!(
        "{TENANT_COLUMNS} ORDER BY t.name LIMIT $1 OFFSET $2"
    ))
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total = sqlx::query_scalar("SELECT count(*) FROM tenants")
        .fetch_one(pool)
        .await?;
    Ok((tenants, total))
}

/// One tenant by name, or `NoSuchTenant`.
pub async fn get_tenant(pool: &PgPool, name: &str) -> Result<Tenant, AdminError> {
    let found = sqlx::query_as(&format!("{TENANT_COLUMNS} WHERE t.name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await?;
    found.ok_or_else(|| AdminError::NoSuchTenant(name.to_owned()))
}

/// Moves a tenant to another plan and/or suspends or resumes it.
pub async fn update_tenant(
    pool: &PgPool,
    name: &str,
    plan: Option<&str>,
    suspended: Option<bool>,
) -> Result<Tenant, AdminError> {
    if let Some(plan) = plan {
        check_plan(pool, plan).await?;
    }
    let updated = sqlx::query(
        "UPDATE tenants SET
             plan = coalesce($2, plan),
             suspended_at = CASE WHEN $3 IS NULL THEN suspended_at
                                 WHEN $3 THEN coalesce(suspended_at, now())
                                 ELSE NULL END
         WHERE name = $1",
    )
    .bind(name)
    .bind(plan)
    .bind(suspended)
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(AdminError::NoSuchTenant(name.to_owned()));
    }
    get_tenant(pool, name).await
}

/// Deletes a tenant with its keys and rules (its usage history goes too;
/// violations, kept for analytics, stay).
pub async fn delete_tenant(pool: &PgPool, name: &str) -> Result<(), AdminError> {
    let deleted = sqlx::query("DELETE FROM tenants WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    match deleted.rows_affected() {
        0 => Err(AdminError::NoSuchTenant(name.to_owned())),
        _ => Ok(()),
    }
}

#[derive(sqlx::FromRow)]
struct TenantRef {
    id: String,
    plan: String,
}

/// A tenant by name, or `NoSuchTenant`.
async fn find_tenant<'c>(db: impl PgExecutor<'c>, name: &str) -> Result<TenantRef, AdminError> {
    let found = sqlx::query_as("SELECT id::text AS id, plan FROM tenants WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?;
    found.ok_or_else(|| AdminError::NoSuchTenant(name.to_owned()))
}

// === API keys ===

/// A key just issued. Only its hash is stored: `raw` cannot be shown again.
#[derive(Debug)]
pub struct IssuedKey {
    pub raw: String,
    /// `slk_<8 hex>`, to recognise and revoke the key.
    pub prefix: String,
}

/// A new raw key, `slk_<8 hex>_<48 hex>` (192 random bits after the
/// prefix), and its display prefix `slk_<8 hex>`.
fn new_key() -> Result<IssuedKey, AdminError> {
    let mut bytes = [0u8; 28];
    getrandom::fill(&mut bytes).map_err(AdminError::Random)?;
    let hex = |b: &[u8]| {
        b.iter().fold(String::new(), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
    };
    let prefix = format!("slk_{}", hex(&bytes[..4]));
    let raw = format!("{prefix}_{}", hex(&bytes[4..]));
    Ok(IssuedKey { raw, prefix })
}

/// Issues a key for a tenant, on the tenant's plan or its own `plan`.
pub async fn issue_key(
    pool: &PgPool,
    hasher: &KeyHasher,
    tenant: &str,
    plan: Option<&str>,
) -> Result<IssuedKey, AdminError> {
    if let Some(plan) = plan {
        check_plan(pool, plan).await?;
    }
    // A display prefix can collide (32 bits); draw again then.
    for _ in 0..5 {
        let key = new_key()?;
        let inserted = sqlx::query(
            "INSERT INTO api_keys (key_hash, prefix, tenant_id, plan)
             SELECT $1, $2, t.id, $4 FROM tenants t WHERE t.name = $3",
        )
        .bind(hasher.api_key(&key.raw))
        .bind(&key.prefix)
        .bind(tenant)
        .bind(plan)
        .execute(pool)
        .await;
        match inserted {
            Ok(r) if r.rows_affected() == 0 => {
                return Err(AdminError::NoSuchTenant(tenant.to_owned()))
            }
            Ok(_) => return Ok(key),
            Err(e) if unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AdminError::NoUnusedPrefix)
}

/// What revoking a key by its prefix did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    AlreadyRevoked,
    NoSuchKey,
}

pub async fn revoke_key(pool: &PgPool, prefix: &str) -> Result<Revocation, AdminError> {
    revoke_by_prefix(pool, "api_keys", prefix, None).await
}

/// Revokes the row of `table` (`api_keys` or `admin_tokens`: both are
/// found by a display prefix and revoked by a timestamp) with `prefix`,
/// and only if it is `tenant_id`'s when that is given.
pub(crate) async fn revoke_by_prefix(
    pool: &PgPool,
    table: &'static str,
    prefix: &str,
    tenant_id: Option<&str>,
) -> Result<Revocation, AdminError> {
    let mine = "prefix = $1 AND ($2::uuid IS NULL OR tenant_id = $2::uuid)";
    let revoked = sqlx::query(&format!(
        "UPDATE {table} SET revoked_at = now() WHERE {mine} AND revoked_at IS NULL"
    ))
    .bind(prefix)
    .bind(tenant_id)
    .execute(pool)
    .await?
    .rows_affected();
    if revoked == 1 {
        return Ok(Revocation::Revoked);
    }
    let known = sqlx::query(&format!("SELECT 1 FROM {table} WHERE {mine}"))
        .bind(prefix)
        .bind(tenant_id)
        .fetch_optional(pool)
        .await?
        .is_some();
    Ok(match known {
        true => Revocation::AlreadyRevoked,
        false => Revocation::NoSuchKey,
    })
}

/// Revokes a key by its prefix, only if it is one of `tenant`'s keys
/// (another tenant's key is `NoSuchKey`, as an unknown one is).
pub async fn revoke_tenant_key(
    pool: &PgPool,
    tenant: &str,
    prefix: &str,
) -> Result<Revocation, AdminError> {
    let id = find_tenant(pool, tenant).await?.id;
    revoke_by_prefix(pool, "api_keys", prefix, Some(&id)).await
}

/// A key as listed: its prefix, never the key (which is not stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KeySummary {
    pub prefix: String,
    /// `None`: the tenant's plan.
    pub plan: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A tenant's keys, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantKeys {
    /// The plan of the keys without one of their own.
    pub tenant_plan: String,
    pub keys: Vec<KeySummary>,
}

pub async fn list_keys(pool: &PgPool, tenant: &str) -> Result<TenantKeys, AdminError> {
    let tenant_plan = find_tenant(pool, tenant).await?.plan;
    let keys = sqlx::query_as(
        "SELECT k.prefix, k.plan, k.created_at, k.revoked_at
         FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
         WHERE t.name = $1 ORDER BY k.created_at, k.prefix",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(TenantKeys { tenant_plan, keys })
}

// === Usage ===

/// A billing cycle, `YEAR-MONTH`, as the date of its first day.
pub fn cycle(year: i32, month: u32) -> Result<NaiveDate, AdminError> {
    NaiveDate::from_ymd_opt(year, month, 1).ok_or(AdminError::InvalidMonth)
}

/// A tenant's allowed and denied requests in one domain.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct DomainUsage {
    pub domain: String,
    pub allowed: i64,
    pub denied: i64,
}

/// A tenant's usage per domain in one billing cycle (a calendar month in
/// the tenant's time zone, as its quota counts it), summed over all
/// instances.
pub async fn usage(
    pool: &PgPool,
    tenant: &str,
    cycle: NaiveDate,
) -> Result<Vec<DomainUsage>, AdminError> {
    find_tenant(pool, tenant).await?;
    Ok(sqlx::query_as(
        "SELECT u.domain, u.allowed, u.denied
         FROM usage_monthly u JOIN tenants t ON t.id = u.tenant_id
         WHERE t.name = $1 AND u.cycle = $2
         ORDER BY u.domain",
    )
    .bind(tenant)
    .bind(cycle)
    .fetch_all(pool)
    .await?)
}

/// The buckets of a usage series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "month" => Some(Granularity::Month),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }
}

/// A tenant's requests in one bucket (its start, UTC), all domains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct UsagePoint {
    pub start: DateTime<Utc>,
    pub allowed: i64,
    pub denied: i64,
}

/// A tenant's usage in [start, end) per hour, day or month (UTC), oldest
/// first; buckets without requests are left out.
pub async fn usage_series(
    pool: &PgPool,
    tenant_id: &str,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    granularity: Granularity,
) -> Result<Vec<UsagePoint>, AdminError> {
    Ok(sqlx::query_as(
        "SELECT date_trunc($4, u.hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS start,
                sum(u.allowed)::int8 AS allowed, sum(u.denied)::int8 AS denied
         FROM usage_hourly u
         WHERE u.tenant_id = $1::uuid AND u.hour >= $2 AND u.hour < $3
         GROUP BY 1 ORDER BY 1",
    )
    .bind(tenant_id)
    .bind(start)
    .bind(end)
    .bind(granularity.as_str())
    .fetch_all(pool)
    .await?)
}

/// A batch of denials of one client by one rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Violation {
    pub at: DateTime<Utc>,
    pub domain: String,
    pub rule: String,
    /// A keyed hash of the client, never its identifier.
    pub client_id: String,
    pub hits: i64,
}

/// A page of a tenant's violations in [start, end), newest first.
pub async fn violations(
    pool: &PgPool,
    tenant_id: &str,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    limit: i64,
    offset: i64,
) -> Result<Vec<Violation>, AdminError> {
    Ok(sqlx::query_as(
        "SELECT at, domain, rule, client_id, hits FROM violations
         WHERE tenant_id = $1::uuid AND at >= $2 AND at < $3
         ORDER BY at DESC, domain, rule, client_id LIMIT $4 OFFSET $5",
    )
    .bind(tenant_id)
    .bind(start)
    .bind(end)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?)
}

/// A rule and how many of a tenant's requests it denied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RuleDenials {
    pub domain: String,
    pub rule: String,
    pub hits: i64,
    pub clients: i64,
}

/// The rules that denied a tenant's requests most in [start, end).
pub async fn top_rules(
    pool: &PgPool,
    tenant_id: &str,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    limit: i64,
) -> Result<Vec<RuleDenials>, AdminError> {
    Ok(sqlx::query_as(
        "SELECT domain, rule, sum(hits)::int8 AS hits, count(DISTINCT client_id) AS clients
         FROM violations WHERE tenant_id = $1::uuid AND at >= $2 AND at < $3
         GROUP BY domain, rule ORDER BY hits DESC, domain, rule LIMIT $4",
    )
    .bind(tenant_id)
    .bind(start)
    .bind(end)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

// === Webhooks ===

/// A webhook just added: its signing secret is shown once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewWebhook {
    pub id: uuid::Uuid,
    /// The HMAC-SHA256 key of its signatures: shown this once.
    pub secret: String,
}

/// Adds a webhook to a tenant, with a new random signing secret.
pub async fn add_webhook(pool: &PgPool, tenant: &str, url: &str) -> Result<NewWebhook, AdminError> {
    let valid = url.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.starts_with('/')
    });
    if !valid {
        return Err(AdminError::InvalidUrl(url.to_owned()));
    }
    let tenant_id = find_tenant(pool, tenant).await?.id;
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(AdminError::Random)?;
    let secret = format!("whsec_{}", hex::encode(bytes));
    let id = sqlx::query_scalar(
        "INSERT INTO webhooks (tenant_id, url, secret) VALUES ($1::uuid, $2, $3) RETURNING id",
    )
    .bind(tenant_id)
    .bind(url)
    .bind(&secret)
    .fetch_one(pool)
    .await?;
    Ok(NewWebhook { id, secret })
}

/// A webhook and its deliveries so far (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct WebhookSummary {
    pub id: uuid::Uuid,
    pub url: String,
    pub created_at: DateTime<Utc>,
    pub delivered: i64,
    pub pending: i64,
    pub failed: i64,
    /// The last attempt's status code, if any answered.
    pub last_status: Option<i32>,
}

pub async fn list_webhooks(pool: &PgPool, tenant: &str) -> Result<Vec<WebhookSummary>, AdminError> {
    let tenant_id = find_tenant(pool, tenant).await?.id;
    Ok(sqlx::query_as(
        "SELECT w.id, w.url, w.created_at,
                count(d.id) FILTER (WHERE d.state = 'delivered') AS delivered,
                count(d.id) FILTER (WHERE d.state = 'pending') AS pending,
                count(d.id) FILTER (WHERE d.state = 'failed') AS failed,
                (SELECT a.status_code FROM webhook_attempts a
                 JOIN webhook_deliveries d2 ON d2.id = a.delivery_id
                 WHERE d2.webhook_id = w.id ORDER BY a.at DESC LIMIT 1) AS last_status
         FROM webhooks w LEFT JOIN webhook_deliveries d ON d.webhook_id = w.id
         WHERE w.tenant_id = $1::uuid GROUP BY w.id ORDER BY w.created_at, w.id",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?)
}

pub async fn remove_webhook(pool: &PgPool, id: uuid::Uuid) -> Result<(), AdminError> {
    let done = sqlx::query("DELETE FROM webhooks WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    match done.rows_affected() {
        0 => Err(AdminError::NoSuchWebhook(id)),
        _ => Ok(()),
    }
}

/// Removes one of `tenant`'s webhooks; `NoSuchWebhook` when the id is not
/// one of that tenant's (another tenant's id is not found either).
pub async fn remove_tenant_webhook(
    pool: &PgPool,
    tenant: &str,
    id: uuid::Uuid,
) -> Result<(), AdminError> {
    let tenant_id = find_tenant(pool, tenant).await?.id;
    let done = sqlx::query("DELETE FROM webhooks WHERE id = $1 AND tenant_id = $2::uuid")
        .bind(id)
        .bind(tenant_id)
        .execute(pool)
        .await?;
    match done.rows_affected() {
        0 => Err(AdminError::NoSuchWebhook(id)),
        _ => Ok(()),
    }
}

// === Invoices ===

/// One line of a closed cycle's invoice.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct InvoiceLine {
    pub kind: String,
    pub description: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
    pub amount_cents: i64,
}

/// A cycle's invoice, or where an open cycle stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invoice {
    Closed {
        plan: String,
        requests: i64,
        total_cents: i64,
        lines: Vec<InvoiceLine>,
    },
    /// Not closed yet: the requests the billing consumer has counted.
    Open { requests: i64 },
}

pub async fn invoice(pool: &PgPool, tenant: &str, cycle: NaiveDate) -> Result<Invoice, AdminError> {
    let tenant_id = find_tenant(pool, tenant).await?.id;
    let head: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT plan, requests, total_cents FROM invoices WHERE tenant_id = $1::uuid AND cycle = $2",
    )
    .bind(&tenant_id)
    .bind(cycle)
    .fetch_optional(pool)
    .await?;
    let Some((plan, requests, total_cents)) = head else {
        let requests = sqlx::query_scalar(
            "SELECT requests FROM cycle_usage
             WHERE consumer = 'billing' AND tenant_id = $1::uuid AND cycle = $2",
        )
        .bind(&tenant_id)
        .bind(cycle)
        .fetch_optional(pool)
        .await?
        .unwrap_or(0);
        return Ok(Invoice::Open { requests });
    };
    let lines = sqlx::query_as(
        "SELECT kind, description, quantity, unit_price_cents, amount_cents FROM invoice_lines
         WHERE tenant_id = $1::uuid AND cycle = $2 ORDER BY line",
    )
    .bind(&tenant_id)
    .bind(cycle)
    .fetch_all(pool)
    .await?;
    Ok(Invoice::Closed {
        plan,
        requests,
        total_cents,
        lines,
    })
}
