//! The admin API's audit log: one row per change, appended and never
//! updated (a trigger refuses updates and deletes). Entries name keys and
//! tokens by their prefixes only.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::AdminError;

/// One change, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// A token's prefix, or an OIDC subject.
    pub actor: String,
    pub role: String,
    pub method: String,
    /// The route's template, e.g. `/admin/v1/tenants/{tenant}`.
    pub route: String,
    /// What was changed, e.g. `tenant:acme`.
    pub object: String,
    #[schema(value_type = Option<Object>)]
    pub before: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub after: Option<serde_json::Value>,
    pub status: i32,
    /// The client's address.
    pub source: String,
}

/// An entry to append.
#[derive(Clone, Debug)]
pub struct NewEntry<'a> {
    pub actor: &'a str,
    pub role: &'a str,
    pub actor_tenant_id: Option<&'a str>,
    pub method: &'a str,
    pub route: &'a str,
    pub object: &'a str,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub status: u16,
    pub source: &'a str,
}

pub async fn append(pool: &PgPool, entry: &NewEntry<'_>) -> Result<(), AdminError> {
    sqlx::query(
        "INSERT INTO audit_log (actor, role, actor_tenant_id, method, route, object, before, after,
             status, source)
         VALUES ($1, $2, $3::uuid, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(entry.actor)
    .bind(entry.role)
    .bind(entry.actor_tenant_id)
    .bind(entry.method)
    .bind(entry.route)
    .bind(entry.object)
    .bind(&entry.before)
    .bind(&entry.after)
    .bind(i32::from(entry.status))
    .bind(entry.source)
    .execute(pool)
    .await?;
    Ok(())
}

/// A page of entries in [start, end), newest first, and how many in all.
pub async fn list(
    pool: &PgPool,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    limit: i64,
    offset: i64,
) -> Result<(Vec<AuditEntry>, i64), AdminError> {
    let entries = sqlx::query_as(
        "SELECT id, at, actor, role, method, route, object, before, after, status, source
         FROM audit_log WHERE at >= $1 AND at < $2 ORDER BY id DESC LIMIT $3 OFFSET $4",
    )
    .bind(start)
    .bind(end)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE at >= $1 AND at < $2")
        .bind(start)
        .bind(end)
        .fetch_one(pool)
        .await?;
    Ok((entries, total))
}
