//! Reading the catalog: plans, tenants, live API keys and rule rows, mapped
//! by `sqlx::FromRow` into the plain rows of `rules::catalog`.

use sqlx::postgres::{PgConnection, PgPool};

use crate::rules::catalog::{Catalog, RuleRow, RuleScope};

/// Reads everything sluice serves from in one repeatable-read transaction:
/// consistent across tables, and allowed on a hot standby.
pub async fn load_catalog(pool: &PgPool) -> Result<Catalog, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let plans = sqlx::query_as(
        "SELECT name, monthly_quota, overage_cents_per_1000 FROM plans ORDER BY name",
    )
    .fetch_all(&mut *tx)
    .await?;
    let tenants =
        sqlx::query_as("SELECT id::text AS id, name, plan, time_zone FROM tenants ORDER BY name")
            .fetch_all(&mut *tx)
            .await?;
    let keys = sqlx::query_as(
        // A suspended tenant's keys are refused as unknown ones are.
        "SELECT k.key_hash AS hash, k.tenant_id::text AS tenant_id, k.plan
         FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
         WHERE k.revoked_at IS NULL AND t.suspended_at IS NULL ORDER BY k.key_hash",
    )
    .fetch_all(&mut *tx)
    .await?;
    let rules = sqlx::query_as(&format!(
        "{RULE_COLUMNS} ORDER BY r.domain, r.plan NULLS FIRST, t.name NULLS FIRST, r.position"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let rules = rule_rows(rules)?;
    tx.commit().await?;
    Ok(Catalog {
        plans,
        tenants,
        keys,
        rules,
    })
}

/// One domain's rule rows for one scope, given as the columns that hold it
/// (a plan name, or a tenant id), in file order.
pub async fn domain_rules(
    conn: &mut PgConnection,
    domain: &str,
    plan: Option<&str>,
    tenant_id: Option<&str>,
) -> Result<Vec<RuleRow>, sqlx::Error> {
    let records = sqlx::query_as(&format!(
        "{RULE_COLUMNS} WHERE r.domain = $1 AND r.plan IS NOT DISTINCT FROM $2
         AND r.tenant_id IS NOT DISTINCT FROM $3::uuid ORDER BY r.position"
    ))
    .bind(domain)
    .bind(plan)
    .bind(tenant_id)
    .fetch_all(conn)
    .await?;
    rule_rows(records)
}

const RULE_COLUMNS: &str = "SELECT r.domain, r.plan, t.name AS tenant, r.position,
        r.path_keys, r.path_values, r.unit, r.requests_per_unit, r.unlimited, r.algorithm,
        r.burst, r.name, r.replaces, r.shadow_mode, r.quota_mode, r.detailed_metric,
        r.value_to_metric, r.share_threshold, r.metadata::text AS metadata
    FROM rules r LEFT JOIN tenants t ON t.id = r.tenant_id";

/// A row as [`RULE_COLUMNS`] selects it: the columns a [`RuleRow`] holds
/// as they are, and those it holds in another shape (its scope, its path as
/// pairs, its metadata parsed from JSON text).
#[derive(sqlx::FromRow)]
struct RuleRecord {
    #[sqlx(flatten)]
    row: RuleRow,
    plan: Option<String>,
    tenant: Option<String>,
    path_keys: Vec<String>,
    path_values: Vec<String>,
    /// A JSON object as text: sqlx's `json` feature is not on.
    metadata: String,
}

fn rule_rows(records: Vec<RuleRecord>) -> Result<Vec<RuleRow>, sqlx::Error> {
    records.into_iter().map(RuleRow::try_from).collect()
}

impl TryFrom<RuleRecord> for RuleRow {
    type Error = sqlx::Error;

    fn try_from(r: RuleRecord) -> Result<RuleRow, sqlx::Error> {
        let metadata =
            serde_json::from_str(&r.metadata).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        Ok(RuleRow {
            scope: match (r.plan, r.tenant) {
                (Some(p), _) => RuleScope::Plan(p),
                (None, Some(t)) => RuleScope::Tenant(t),
                (None, None) => RuleScope::Domain,
            },
            path: r.path_keys.into_iter().zip(r.path_values).collect(),
            // Any JSON object, as a rules file's metadata is any YAML map.
            metadata,
            ..r.row
        })
    }
}
