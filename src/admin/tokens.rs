//! Tokens for the admin API: issued with a role (and, for `tenant`, the one
//! tenant it may see), shown once, stored only as keyed BLAKE3 hashes as
//! API keys are, revocable and optionally expiring.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::{unique_violation, AdminError, Revocation};
use crate::limiter::KeyHasher;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, tokens included.
    Admin,
    /// Tenants, plans, keys, rules, usage and the audit log; no tokens.
    Operator,
    /// Its own tenant: read it, its usage and violations; its API keys.
    Tenant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Tenant => "tenant",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "tenant" => Some(Role::Tenant),
            _ => None,
        }
    }
}

/// A token just issued: `raw` is shown once and cannot be shown again.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedToken {
    pub token: String,
    /// `sla_<8 hex>`: names the token in lists, revocations and the audit log.
    pub prefix: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// `sla_<8 hex>_<48 hex>`: 192 random bits after the display prefix.
fn new_token() -> Result<IssuedToken, AdminError> {
    let mut bytes = [0u8; 28];
    getrandom::fill(&mut bytes).map_err(AdminError::Random)?;
    let prefix = format!("sla_{}", hex(&bytes[..4]));
    let token = format!("{prefix}_{}", hex(&bytes[4..]));
    Ok(IssuedToken { token, prefix })
}

/// Issues a token. A `tenant` token needs `tenant`; the others refuse one.
pub async fn issue(
    pool: &PgPool,
    hasher: &KeyHasher,
    role: Role,
    tenant: Option<&str>,
    expires_at: Option<DateTime<Utc>>,
    description: &str,
) -> Result<IssuedToken, AdminError> {
    let tenant_id = match tenant {
        Some(name) => Some(super::find_tenant(pool, name).await?.id),
        None => None,
    };
    for _ in 0..5 {
        let token = new_token()?;
        let inserted = sqlx::query(
            "INSERT INTO admin_tokens (token_hash, prefix, role, tenant_id, expires_at, description)
             VALUES ($1, $2, $3, $4::uuid, $5, $6)",
        )
        .bind(hasher.admin_token(&token.token))
        .bind(&token.prefix)
        .bind(role.as_str())
        .bind(&tenant_id)
        .bind(expires_at)
        .bind(description)
        .execute(pool)
        .await;
        match inserted {
            Ok(_) => return Ok(token),
            Err(e) if unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AdminError::NoUnusedPrefix)
}

/// A token as listed: never the token, which is not stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenSummary {
    pub prefix: String,
    pub role: String,
    pub tenant: Option<String>,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Every token, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<TokenSummary>, AdminError> {
    Ok(sqlx::query_as(
        "SELECT a.prefix, a.role, t.name AS tenant, a.description, a.created_at, a.expires_at,
                a.revoked_at
         FROM admin_tokens a LEFT JOIN tenants t ON t.id = a.tenant_id
         ORDER BY a.created_at, a.prefix",
    )
    .fetch_all(pool)
    .await?)
}

pub async fn revoke(pool: &PgPool, prefix: &str) -> Result<Revocation, AdminError> {
    super::revoke_by_prefix(pool, "admin_tokens", prefix, None).await
}

/// Who a live token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's prefix (or an OIDC subject): the audit log's "who".
    pub actor: String,
    pub role: Role,
    /// (id, name) of a `tenant` token's tenant.
    pub tenant: Option<(String, String)>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    prefix: String,
    role: String,
    tenant_id: Option<String>,
    tenant: Option<String>,
}

/// The identity of a raw token, if it is known, not revoked and not
/// expired; `None` otherwise (the caller learns no more than that).
pub async fn authenticate(
    pool: &PgPool,
    hasher: &KeyHasher,
    raw: &str,
) -> Result<Option<Identity>, AdminError> {
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT a.prefix, a.role, a.tenant_id::text AS tenant_id, t.name AS tenant
         FROM admin_tokens a LEFT JOIN tenants t ON t.id = a.tenant_id
         WHERE a.token_hash = $1 AND a.revoked_at IS NULL
           AND (a.expires_at IS NULL OR a.expires_at > now())",
    )
    .bind(hasher.admin_token(raw))
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|r| {
        let role = Role::parse(&r.role)?;
        let tenant = match role {
            Role::Tenant => Some((r.tenant_id?, r.tenant?)),
            _ => None,
        };
        Some(Identity {
            actor: r.prefix,
            role,
            tenant,
        })
    }))
}
