//! Administration of the catalog in PostgreSQL: rules, plans, tenants, API
//! keys and usage, as typed operations. The `sluice` subcommands print what
//! these return; an admin API can serve the same. Each is one statement or
//! one transaction, and the schema's constraints and triggers do the rest (a
//! change NOTIFYs every running sluice, which reloads).

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
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

/// Replaces the rules of every domain in `files` (parsed and validated by
/// the caller), for one scope, in one transaction. Returns (domain, rows).
pub async fn replace_rules(
    pool: &PgPool,
    files: &[(String, YamlRoot)],
    scope: &RuleScope,
) -> Result<Vec<(String, usize)>, AdminError> {
    for (file, root) in files {
        check_storable(file, root)?;
    }
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
    let rows = domain_rules(&mut conn, domain, plan.as_deref(), tenant_id.as_deref()).await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let refs: Vec<&RuleRow> = rows.iter().collect();
    let file = format!("postgres:{}", scope.label(domain));
    Ok(Some(yaml_from_rows(domain, &file, &refs)?))
}

// === Plans ===

/// A plan and how many tenants are on it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct PlanSummary {
    pub name: String,
    /// `None`: no quota.
    pub monthly_quota: Option<i64>,
    pub tenants: i64,
}

/// Every plan, smallest quota first (no quota last).
pub async fn list_plans(pool: &PgPool) -> Result<Vec<PlanSummary>, AdminError> {
    Ok(sqlx::query_as(
        "SELECT p.name, p.monthly_quota, count(t.id) AS tenants
         FROM plans p LEFT JOIN tenants t ON t.plan = p.name
         GROUP BY p.name, p.monthly_quota ORDER BY p.monthly_quota NULLS LAST, p.name",
    )
    .fetch_all(pool)
    .await?)
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

/// Changes a plan's prices: `price_cents` per cycle, and
/// `overage_cents_per_1000` (`Some(None)`: a hard quota; `Some(Some(p))`: a
/// soft quota billed at `p` per 1 000 requests over it). `None` keeps one.
pub async fn set_plan_prices(
    pool: &PgPool,
    name: &str,
    price_cents: Option<i64>,
    overage_cents_per_1000: Option<Option<i64>>,
) -> Result<(), AdminError> {
    check_plan(pool, name).await?;
    sqlx::query(
        "UPDATE plans SET
             monthly_price_cents = coalesce($2, monthly_price_cents),
             overage_cents_per_1000 = CASE WHEN $3 THEN $4 ELSE overage_cents_per_1000 END
         WHERE name = $1",
    )
    .bind(name)
    .bind(price_cents)
    .bind(overage_cents_per_1000.is_some())
    .bind(overage_cents_per_1000.flatten())
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
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
    )
    .bind(prefix)
    .execute(pool)
    .await?
    .rows_affected();
    if revoked == 1 {
        return Ok(Revocation::Revoked);
    }
    let known = sqlx::query("SELECT 1 FROM api_keys WHERE prefix = $1")
        .bind(prefix)
        .fetch_optional(pool)
        .await?
        .is_some();
    Ok(match known {
        true => Revocation::AlreadyRevoked,
        false => Revocation::NoSuchKey,
    })
}

/// A key as listed: its prefix, never the key (which is not stored).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
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

// === Webhooks ===

/// A webhook just added: its signing secret is shown once.
#[derive(Debug)]
pub struct NewWebhook {
    pub id: uuid::Uuid,
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
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
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
