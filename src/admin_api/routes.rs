//! The admin API's handlers, one per route, each checking the caller's
//! role before touching the catalog through `admin`, and appending every
//! change it makes to the audit log.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Datelike as _, Duration, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody, JsonBody, PathParams, QueryParams};
use super::AdminState;
use crate::admin::tokens::{self, IssuedToken, Role, TokenSummary};
use crate::admin::{
    self, audit::AuditEntry, AppliedRuleSet, Granularity, KeySummary, NewWebhook, PlanSummary,
    Revocation, RuleDenials, RuleSetSummary, Tenant, UsagePoint, Violation, WebhookSummary,
};
use crate::rules::catalog::RuleScope;
use crate::rules::yaml;

pub const MAX_PAGE: i64 = 1000;
const DEFAULT_PAGE: i64 = 50;
/// The longest time range a usage query may cover.
const MAX_RANGE_DAYS: i64 = 3700;

type ApiResult<T> = Result<T, ApiError>;

// === Input checks ===

fn check_tenant_name(field: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '.' | '_' | '-')));
    match ok {
        true => Ok(()),
        false => Err(ApiError::bad_request(
            field,
            "a tenant name is 1 to 63 of A-Z a-z 0-9 . _ -, starting with a letter or digit",
        )),
    }
}

fn check_plan_name(field: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || (i > 0 && matches!(c, '_' | '-'))
        });
    match ok {
        true => Ok(()),
        false => Err(ApiError::bad_request(
            field,
            "a plan name is 1 to 63 of a-z 0-9 _ -, starting with a letter or digit",
        )),
    }
}

fn check_quota(field: &str, quota: Option<i64>) -> ApiResult<()> {
    match quota {
        Some(q) if !(1..=i64::from(u32::MAX)).contains(&q) => Err(ApiError::bad_request(
            field,
            format!(
                "a monthly quota is from 1 to {} requests, or null for none",
                u32::MAX
            ),
        )),
        _ => Ok(()),
    }
}

fn check_price(field: &str, price: Option<i64>) -> ApiResult<()> {
    match price {
        Some(p) if !(0..=1_000_000_000_000).contains(&p) => Err(ApiError::bad_request(
            field,
            "a price is from 0 to 10^12 cents, or null for none",
        )),
        _ => Ok(()),
    }
}

fn check_prefix(field: &str, prefix: &str, head: &str) -> ApiResult<()> {
    let hex = prefix.strip_prefix(head).unwrap_or_default();
    match hex.len() == 8
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        true => Ok(()),
        false => Err(ApiError::bad_request(
            field,
            format!("a prefix is {head} and 8 lowercase hex digits"),
        )),
    }
}

impl QueryParams {
    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn int(&self, name: &str, default: i64, min: i64, max: i64) -> ApiResult<i64> {
        match self.text(name) {
            None => Ok(default),
            Some(s) => match s.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(
                    name,
                    format!("expected an integer from {min} to {max}"),
                )),
            },
        }
    }

    /// `limit` and `offset`.
    fn page(&self) -> ApiResult<(i64, i64)> {
        Ok((
            self.int("limit", DEFAULT_PAGE, 1, MAX_PAGE)?,
            self.int("offset", 0, 0, 1_000_000_000)?,
        ))
    }

    fn time(&self, name: &str) -> ApiResult<Option<DateTime<Utc>>> {
        self.text(name)
            .map(|s| {
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::bad_request(
                            name,
                            "expected an RFC 3339 time, e.g. 2026-12-01T00:00:00Z",
                        )
                    })
            })
            .transpose()
    }

    /// `from` and `to`: [from, to), by default `default_from` to now.
    fn range(&self, default_from: DateTime<Utc>) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
        let to = self.time("to")?.unwrap_or_else(Utc::now);
        let from = self.time("from")?.unwrap_or(default_from.min(to));
        if from > to {
            return Err(ApiError::bad_request("from", "`from` is after `to`"));
        }
        if to - from > Duration::days(MAX_RANGE_DAYS) {
            return Err(ApiError::bad_request(
                "from",
                format!("a time range is at most {MAX_RANGE_DAYS} days"),
            ));
        }
        Ok((from, to))
    }

    /// `plan` or `tenant` (at most one): whose rules.
    fn scope(&self) -> ApiResult<RuleScope> {
        match (self.text("plan"), self.text("tenant")) {
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "tenant",
                "give `plan` or `tenant`, not both",
            )),
            (Some(p), None) => {
                check_plan_name("plan", p)?;
                Ok(RuleScope::Plan(p.to_owned()))
            }
            (None, Some(t)) => {
                check_tenant_name("tenant", t)?;
                Ok(RuleScope::Tenant(t.to_owned()))
            }
            (None, None) => Ok(RuleScope::Domain),
        }
    }
}

fn start_of_month(now: DateTime<Utc>) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(now.year(), now.month(), 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(now, |t| t.and_utc())
}

fn to_json<T: Serialize>(value: &T) -> Option<serde_json::Value> {
    serde_json::to_value(value).ok()
}

/// Deserializes a field that may be absent (outer `None`) or null (inner).
fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

// === Who am I ===

#[derive(Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// The token's prefix.
    pub actor: String,
    pub role: Role,
    /// A `tenant` token's tenant.
    pub tenant: Option<String>,
}

/// The caller's identity: role and, for a tenant token, its tenant.
#[utoipa::path(get, path = "/admin/v1/whoami", tag = "auth",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        actor: caller.identity.actor.clone(),
        role: caller.identity.role,
        tenant: caller.identity.tenant.map(|(_, name)| name),
    })
}

// === Tenants ===

#[derive(Serialize, utoipa::ToSchema)]
pub struct TenantPage {
    pub items: Vec<Tenant>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// A page of tenants, by name (admin, operator).
#[utoipa::path(get, path = "/admin/v1/tenants", tag = "tenants",
    params(("limit" = Option<i64>, Query, minimum = 1, maximum = 1000), ("offset" = Option<i64>, Query, minimum = 0)),
    responses((status = 200, body = TenantPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tenants(
    State(state): State<AdminState>,
    caller: Caller,
    query: QueryParams,
) -> ApiResult<Json<TenantPage>> {
    caller.staff()?;
    let (limit, offset) = query.page()?;
    let (items, total) = admin::list_tenants_page(&state.pool, limit, offset).await?;
    Ok(Json(TenantPage {
        items,
        total,
        limit,
        offset,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    pub name: String,
    pub plan: String,
}

/// Creates a tenant on a plan (admin, operator).
#[utoipa::path(post, path = "/admin/v1/tenants", tag = "tenants", request_body = NewTenant,
    responses((status = 201, body = Tenant), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_tenant(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewTenant>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    caller.staff()?;
    check_tenant_name("name", &body.name)?;
    check_plan_name("plan", &body.plan)?;
    admin::create_tenant(&state.pool, &body.name, &body.plan)
        .await
        .map_err(|e| match e {
            admin::AdminError::NoSuchPlan(_) => ApiError::bad_request("plan", e.to_string()),
            e => e.into(),
        })?;
    let tenant = admin::get_tenant(&state.pool, &body.name).await?;
    caller
        .audit(
            &state,
            Method::POST,
            "/admin/v1/tenants",
            &format!("tenant:{}", tenant.name),
            None,
            to_json(&tenant),
            201,
        )
        .await;
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// One tenant (admin, operator; a tenant token: its own).
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path)),
    responses((status = 200, body = Tenant), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_tenant(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
) -> ApiResult<Json<Tenant>> {
    caller.may_see_tenant(&name)?;
    check_tenant_name("tenant", &name)?;
    Ok(Json(admin::get_tenant(&state.pool, &name).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantChange {
    /// Move the tenant to this plan.
    pub plan: Option<String>,
    /// Suspend (true) or resume (false): a suspended tenant's keys are refused.
    pub suspended: Option<bool>,
}

/// Changes a tenant's plan, or suspends or resumes it (admin, operator).
#[utoipa::path(patch, path = "/admin/v1/tenants/{tenant}", tag = "tenants", request_body = TenantChange,
    params(("tenant" = String, Path)),
    responses((status = 200, body = Tenant), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_tenant(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
    JsonBody(body): JsonBody<TenantChange>,
) -> ApiResult<Json<Tenant>> {
    caller.staff()?;
    check_tenant_name("tenant", &name)?;
    if let Some(plan) = &body.plan {
        check_plan_name("plan", plan)?;
    }
    let before = admin::get_tenant(&state.pool, &name).await?;
    let after = admin::update_tenant(&state.pool, &name, body.plan.as_deref(), body.suspended)
        .await
        .map_err(|e| match e {
            admin::AdminError::NoSuchPlan(_) => ApiError::bad_request("plan", e.to_string()),
            e => e.into(),
        })?;
    caller
        .audit(
            &state,
            Method::PATCH,
            "/admin/v1/tenants/{tenant}",
            &format!("tenant:{name}"),
            to_json(&before),
            to_json(&after),
            200,
        )
        .await;
    Ok(Json(after))
}

/// Deletes a tenant with its keys and rules (admin, operator).
#[utoipa::path(delete, path = "/admin/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_tenant(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
) -> ApiResult<StatusCode> {
    caller.staff()?;
    check_tenant_name("tenant", &name)?;
    let before = admin::get_tenant(&state.pool, &name).await?;
    admin::delete_tenant(&state.pool, &name).await?;
    caller
        .audit(
            &state,
            Method::DELETE,
            "/admin/v1/tenants/{tenant}",
            &format!("tenant:{name}"),
            to_json(&before),
            None,
            204,
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

// === Plans ===

/// Every plan (admin, operator).
#[utoipa::path(get, path = "/admin/v1/plans", tag = "plans",
    responses((status = 200, body = Vec<PlanSummary>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_plans(
    State(state): State<AdminState>,
    caller: Caller,
) -> ApiResult<Json<Vec<PlanSummary>>> {
    caller.staff()?;
    Ok(Json(admin::list_plans(&state.pool).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPlan {
    pub name: String,
    /// Requests per month per tenant; null or absent: no quota.
    pub monthly_quota: Option<i64>,
    pub monthly_price_cents: Option<i64>,
}

/// Creates a plan (admin, operator).
#[utoipa::path(post, path = "/admin/v1/plans", tag = "plans", request_body = NewPlan,
    responses((status = 201, body = PlanSummary), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_plan(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewPlan>,
) -> ApiResult<(StatusCode, Json<PlanSummary>)> {
    caller.staff()?;
    check_plan_name("name", &body.name)?;
    check_quota("monthly_quota", body.monthly_quota)?;
    check_price("monthly_price_cents", body.monthly_price_cents)?;
    let plan = admin::create_plan(
        &state.pool,
        &body.name,
        body.monthly_quota,
        body.monthly_price_cents,
    )
    .await?;
    caller
        .audit(
            &state,
            Method::POST,
            "/admin/v1/plans",
            &format!("plan:{}", plan.name),
            None,
            to_json(&plan),
            201,
        )
        .await;
    Ok((StatusCode::CREATED, Json(plan)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChange {
    /// A new quota; null: no quota; absent: unchanged.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub monthly_quota: Option<Option<i64>>,
    /// A new price; null: not priced; absent: unchanged.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub monthly_price_cents: Option<Option<i64>>,
    /// A price per 1 000 requests over the quota (the quota becomes soft);
    /// null: a hard quota; absent: unchanged.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub overage_cents_per_1000: Option<Option<i64>>,
}

/// Changes a plan's quota and/or price (admin, operator).
#[utoipa::path(patch, path = "/admin/v1/plans/{plan}", tag = "plans", request_body = PlanChange,
    params(("plan" = String, Path)),
    responses((status = 200, body = PlanSummary), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_plan(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
    JsonBody(body): JsonBody<PlanChange>,
) -> ApiResult<Json<PlanSummary>> {
    caller.staff()?;
    check_plan_name("plan", &name)?;
    check_quota("monthly_quota", body.monthly_quota.flatten())?;
    check_price("monthly_price_cents", body.monthly_price_cents.flatten())?;
    check_price(
        "overage_cents_per_1000",
        body.overage_cents_per_1000.flatten(),
    )?;
    let before = admin::get_plan(&state.pool, &name).await?;
    let after = admin::update_plan(
        &state.pool,
        &name,
        admin::PlanUpdate {
            monthly_quota: body.monthly_quota,
            monthly_price_cents: body.monthly_price_cents,
            overage_cents_per_1000: body.overage_cents_per_1000,
        },
    )
    .await?;
    caller
        .audit(
            &state,
            Method::PATCH,
            "/admin/v1/plans/{plan}",
            &format!("plan:{name}"),
            to_json(&before),
            to_json(&after),
            200,
        )
        .await;
    Ok(Json(after))
}

// === API keys ===

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyList {
    /// The plan of the keys without one of their own.
    pub tenant_plan: String,
    pub keys: Vec<KeySummary>,
}

/// A tenant's API keys, by prefix (admin, operator; a tenant token: its own).
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant}/keys", tag = "keys",
    params(("tenant" = String, Path)),
    responses((status = 200, body = KeyList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(tenant): PathParams<String>,
) -> ApiResult<Json<KeyList>> {
    caller.may_see_tenant(&tenant)?;
    check_tenant_name("tenant", &tenant)?;
    let listed = admin::list_keys(&state.pool, &tenant).await?;
    Ok(Json(KeyList {
        tenant_plan: listed.tenant_plan,
        keys: listed.keys,
    }))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Another plan's limits for this key (admin, operator only).
    pub plan: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct IssuedKeyBody {
    /// The raw key: shown this once, never stored.
    pub key: String,
    pub prefix: String,
}

/// Issues an API key; the raw key is in this response only (admin,
/// operator; a tenant token: for itself, on its own plan).
#[utoipa::path(post, path = "/admin/v1/tenants/{tenant}/keys", tag = "keys", request_body = NewKey,
    params(("tenant" = String, Path)),
    responses((status = 201, body = IssuedKeyBody), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue_key(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(tenant): PathParams<String>,
    JsonBody(body): JsonBody<NewKey>,
) -> ApiResult<(StatusCode, Json<IssuedKeyBody>)> {
    caller.may_see_tenant(&tenant)?;
    check_tenant_name("tenant", &tenant)?;
    if let Some(plan) = &body.plan {
        if caller.role() == Role::Tenant {
            return Err(
                ApiError::forbidden("a tenant token cannot choose a key's plan").with_field("plan"),
            );
        }
        check_plan_name("plan", plan)?;
    }
    let key = admin::issue_key(&state.pool, &state.hasher, &tenant, body.plan.as_deref())
        .await
        .map_err(|e| match e {
            admin::AdminError::NoSuchPlan(_) => ApiError::bad_request("plan", e.to_string()),
            e => e.into(),
        })?;
    caller
        .audit(
            &state,
            Method::POST,
            "/admin/v1/tenants/{tenant}/keys",
            &format!("tenant:{tenant}/key:{}", key.prefix),
            None,
            Some(json!({"prefix": key.prefix, "plan": body.plan})),
            201,
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(IssuedKeyBody {
            key: key.raw,
            prefix: key.prefix,
        }),
    ))
}

/// Revokes one of a tenant's API keys by its prefix (admin, operator; a
/// tenant token: its own keys).
#[utoipa::path(delete, path = "/admin/v1/tenants/{tenant}/keys/{prefix}", tag = "keys",
    params(("tenant" = String, Path), ("prefix" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams((tenant, prefix)): PathParams<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.may_see_tenant(&tenant)?;
    check_tenant_name("tenant", &tenant)?;
    check_prefix("prefix", &prefix, "slk_")?;
    match admin::revoke_tenant_key(&state.pool, &tenant, &prefix).await? {
        Revocation::Revoked => {
            caller
                .audit(
                    &state,
                    Method::DELETE,
                    "/admin/v1/tenants/{tenant}/keys/{prefix}",
                    &format!("tenant:{tenant}/key:{prefix}"),
                    Some(json!({"revoked": false})),
                    Some(json!({"revoked": true})),
                    204,
                )
                .await;
            Ok(StatusCode::NO_CONTENT)
        }
        Revocation::AlreadyRevoked => Err(ApiError::conflict(format!(
            "key {prefix} is already revoked"
        ))),
        Revocation::NoSuchKey => Err(ApiError::not_found(format!(
            "tenant {tenant} has no key {prefix}"
        ))),
    }
}

// === Webhooks ===

/// A tenant's webhooks and their deliveries, never their secrets (admin,
/// operator; a tenant token: its own).
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant}/webhooks", tag = "webhooks",
    params(("tenant" = String, Path)),
    responses((status = 200, body = Vec<WebhookSummary>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_webhooks(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(tenant): PathParams<String>,
) -> ApiResult<Json<Vec<WebhookSummary>>> {
    caller.may_see_tenant(&tenant)?;
    check_tenant_name("tenant", &tenant)?;
    Ok(Json(admin::list_webhooks(&state.pool, &tenant).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhookBody {
    /// An http:// or https:// URL that receives quota alerts, POSTed and
    /// signed (docs/events.md).
    pub url: String,
}

/// Adds a webhook; its signing secret is in this response only (admin,
/// operator; a tenant token: for itself).
#[utoipa::path(post, path = "/admin/v1/tenants/{tenant}/webhooks", tag = "webhooks", request_body = NewWebhookBody,
    params(("tenant" = String, Path)),
    responses((status = 201, body = NewWebhook), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_webhook(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(tenant): PathParams<String>,
    JsonBody(body): JsonBody<NewWebhookBody>,
) -> ApiResult<(StatusCode, Json<NewWebhook>)> {
    caller.may_see_tenant(&tenant)?;
    check_tenant_name("tenant", &tenant)?;
    if body.url.len() > 2048 {
        return Err(ApiError::bad_request("url", "at most 2048 bytes"));
    }
    let hook = admin::add_webhook(&state.pool, &tenant, &body.url).await?;
    caller
        .audit(
            &state,
            Method::POST,
            "/admin/v1/tenants/{tenant}/webhooks",
            &format!("tenant:{tenant}/webhook:{}", hook.id),
            None,
            Some(json!({"id": hook.id, "url": body.url})),
            201,
        )
        .await;
    Ok((StatusCode::CREATED, Json(hook)))
}

/// Removes one of a tenant's webhooks (admin, operator; a tenant token:
/// its own).
#[utoipa::path(delete, path = "/admin/v1/tenants/{tenant}/webhooks/{id}", tag = "webhooks",
    params(("tenant" = String, Path), ("id" = uuid::Uuid, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_webhook(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams((tenant, id)): PathParams<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.may_see_tenant(&tenant)?;
    check_tenant_name("tenant", &tenant)?;
    let id: uuid::Uuid = id
        .parse()
        .map_err(|_| ApiError::bad_request("id", "expected a webhook id (a UUID)"))?;
    admin::remove_tenant_webhook(&state.pool, &tenant, id).await?;
    caller
        .audit(
            &state,
            Method::DELETE,
            "/admin/v1/tenants/{tenant}/webhooks/{id}",
            &format!("tenant:{tenant}/webhook:{id}"),
            Some(json!({"id": id})),
            None,
            204,
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

// === Usage ===

/// The tenant id behind a name a caller may see.
async fn visible_tenant(state: &AdminState, caller: &Caller, name: &str) -> ApiResult<Tenant> {
    caller.may_see_tenant(name)?;
    check_tenant_name("tenant", name)?;
    Ok(admin::get_tenant(&state.pool, name).await?)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub tenant: String,
    pub granularity: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The tenant's plan's monthly quota (null: none).
    pub monthly_quota: Option<i64>,
    pub allowed: i64,
    pub denied: i64,
    pub points: Vec<UsagePoint>,
}

/// A tenant's requests per hour, day or month in [from, to) (default: this
/// month so far), with totals and its plan's quota.
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant}/usage", tag = "usage",
    params(("tenant" = String, Path),
        ("granularity" = Option<String>, Query, description = "hour, day (default) or month"),
        ("from" = Option<DateTime<Utc>>, Query), ("to" = Option<DateTime<Utc>>, Query)),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
    query: QueryParams,
) -> ApiResult<Json<UsageReport>> {
    let tenant = visible_tenant(&state, &caller, &name).await?;
    let granularity = match query.text("granularity") {
        None => Granularity::Day,
        Some(g) => Granularity::parse(g)
            .ok_or_else(|| ApiError::bad_request("granularity", "expected hour, day or month"))?,
    };
    let range = query.range(start_of_month(Utc::now()))?;
    let points = admin::usage_series(&state.pool, &tenant.id, range, granularity).await?;
    let quota = admin::get_plan(&state.pool, &tenant.plan)
        .await?
        .monthly_quota;
    Ok(Json(UsageReport {
        tenant: tenant.name,
        granularity: query.text("granularity").unwrap_or("day").to_owned(),
        from: range.0,
        to: range.1,
        monthly_quota: quota,
        allowed: points.iter().map(|p| p.allowed).sum(),
        denied: points.iter().map(|p| p.denied).sum(),
        points,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ViolationPage {
    pub items: Vec<Violation>,
    pub limit: i64,
    pub offset: i64,
}

/// A page of a tenant's violations in [from, to) (default: the last 7
/// days), newest first.
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant}/violations", tag = "usage",
    params(("tenant" = String, Path), ("from" = Option<DateTime<Utc>>, Query), ("to" = Option<DateTime<Utc>>, Query),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000), ("offset" = Option<i64>, Query, minimum = 0)),
    responses((status = 200, body = ViolationPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn violations(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
    query: QueryParams,
) -> ApiResult<Json<ViolationPage>> {
    let tenant = visible_tenant(&state, &caller, &name).await?;
    let range = query.range(Utc::now() - Duration::days(7))?;
    let (limit, offset) = query.page()?;
    let items = admin::violations(&state.pool, &tenant.id, range, limit, offset).await?;
    Ok(Json(ViolationPage {
        items,
        limit,
        offset,
    }))
}

/// The rules that denied a tenant's requests most in [from, to) (default:
/// this month so far).
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant}/top-rules", tag = "usage",
    params(("tenant" = String, Path), ("from" = Option<DateTime<Utc>>, Query), ("to" = Option<DateTime<Utc>>, Query),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000)),
    responses((status = 200, body = Vec<RuleDenials>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn top_rules(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(name): PathParams<String>,
    query: QueryParams,
) -> ApiResult<Json<Vec<RuleDenials>>> {
    let tenant = visible_tenant(&state, &caller, &name).await?;
    let range = query.range(start_of_month(Utc::now()))?;
    let limit = query.int("limit", 10, 1, MAX_PAGE)?;
    Ok(Json(
        admin::top_rules(&state.pool, &tenant.id, range, limit).await?,
    ))
}

// === Rules ===

/// Every rule set: a domain's rules in one scope, with its version
/// (admin, operator).
#[utoipa::path(get, path = "/admin/v1/rules", tag = "rules",
    responses((status = 200, body = Vec<RuleSetSummary>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_rule_sets(
    State(state): State<AdminState>,
    caller: Caller,
) -> ApiResult<Json<Vec<RuleSetSummary>>> {
    caller.staff()?;
    Ok(Json(admin::list_rule_sets(&state.pool).await?))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RuleSetBody {
    pub domain: String,
    /// `api`, `api[plan=free]` or `api[tenant=acme]`.
    pub scope: String,
    /// Send it back (as `version` or `If-Match`) to replace the rule set.
    pub version: i64,
    /// The rules, in envoyproxy/ratelimit YAML.
    pub yaml: String,
}

fn check_domain(domain: &str) -> ApiResult<()> {
    match !domain.is_empty() && domain.len() <= 255 {
        true => Ok(()),
        false => Err(ApiError::bad_request(
            "domain",
            "a domain is 1 to 255 bytes",
        )),
    }
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// One rule set as YAML, with its version (also the `ETag`) (admin,
/// operator). `plan` or `tenant` picks the scope.
#[utoipa::path(get, path = "/admin/v1/rules/{domain}", tag = "rules",
    params(("domain" = String, Path), ("plan" = Option<String>, Query), ("tenant" = Option<String>, Query)),
    responses((status = 200, body = RuleSetBody, headers(("ETag" = String))), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_rule_set(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(domain): PathParams<String>,
    query: QueryParams,
) -> ApiResult<Response> {
    caller.staff()?;
    check_domain(&domain)?;
    let scope = query.scope()?;
    let Some((root, version)) = admin::rule_set(&state.pool, &domain, &scope).await? else {
        return Err(ApiError::not_found(format!(
            "no rules for {} in PostgreSQL",
            scope.label(&domain)
        )));
    };
    let yaml = serde_yaml_ng::to_string(&root).map_err(|e| {
        tracing::error!(error = %e, "writing rules as YAML");
        ApiError::internal()
    })?;
    let body = RuleSetBody {
        scope: scope.label(&domain),
        domain,
        version,
        yaml,
    };
    Ok(([(header::ETAG, etag(version))], Json(body)).into_response())
}

/// One rule set as a YAML file, as `sluice rules export` prints it.
#[utoipa::path(get, path = "/admin/v1/rules/{domain}/export", tag = "rules",
    params(("domain" = String, Path), ("plan" = Option<String>, Query), ("tenant" = Option<String>, Query)),
    responses((status = 200, content_type = "application/yaml", body = String), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn export_rule_set(
    state: State<AdminState>,
    caller: Caller,
    domain: PathParams<String>,
    query: QueryParams,
) -> ApiResult<Response> {
    let response = get_rule_set(state, caller, domain, query).await?;
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|_| ApiError::internal())?;
    let set: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| ApiError::internal())?;
    let yaml = set["yaml"].as_str().unwrap_or_default().to_owned();
    let mut response = ([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response();
    if let Some(tag) = parts.headers.get(header::ETAG) {
        response.headers_mut().insert(header::ETAG, tag.clone());
    }
    Ok(response)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSetWrite {
    /// The rules, in envoyproxy/ratelimit YAML; its `domain` must be the
    /// URL's.
    pub yaml: String,
    /// The version this edit was made against (0 for a new rule set); or
    /// send it as `If-Match`. Another version in force: 409.
    pub version: Option<i64>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSetCheck {
    pub yaml: String,
    /// The file name errors are reported under (default `rules.yaml`).
    pub file: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Validated {
    pub valid: bool,
    pub domain: String,
    pub descriptors: usize,
}

/// Parses and compiles YAML exactly as `sluice rules validate` does, and
/// checks it can be stored.
fn validate_yaml(file: &str, text: &str) -> ApiResult<yaml::YamlRoot> {
    let root = yaml::parse_str(file, text).map_err(|e| ApiError::invalid_rules(&e))?;
    let files = vec![(file.to_owned(), root)];
    yaml::compile_all(&files).map_err(|e| ApiError::invalid_rules(&e))?;
    let Some((_, root)) = files.into_iter().next() else {
        return Err(ApiError::internal());
    };
    crate::rules::catalog::check_storable(file, &root).map_err(|e| ApiError::invalid_rules(&e))?;
    Ok(root)
}

/// Validates a rule set without writing it: 200, or 422 with every problem
/// as `sluice rules validate` prints it (admin, operator).
#[utoipa::path(post, path = "/admin/v1/rules/validate", tag = "rules", request_body = RuleSetCheck,
    responses((status = 200, body = Validated), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn validate_rule_set(
    caller: Caller,
    JsonBody(body): JsonBody<RuleSetCheck>,
) -> ApiResult<Json<Validated>> {
    caller.staff()?;
    let file = body.file.as_deref().unwrap_or("rules.yaml");
    if file.is_empty() || file.len() > 255 {
        return Err(ApiError::bad_request(
            "file",
            "a file name is 1 to 255 bytes",
        ));
    }
    let root = validate_yaml(file, &body.yaml)?;
    Ok(Json(Validated {
        valid: true,
        domain: root.domain.clone().unwrap_or_default(),
        descriptors: crate::rules::catalog::rows_from_yaml(&root, &RuleScope::Domain).len(),
    }))
}

/// Replaces a rule set, if `version` (or `If-Match`) is the version in
/// force; 409 otherwise, 422 if the rules do not validate (admin, operator).
#[utoipa::path(put, path = "/admin/v1/rules/{domain}", tag = "rules", request_body = RuleSetWrite,
    params(("domain" = String, Path), ("plan" = Option<String>, Query), ("tenant" = Option<String>, Query),
        ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = AppliedRuleSet, headers(("ETag" = String))), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_rule_set(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(domain): PathParams<String>,
    query: QueryParams,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RuleSetWrite>,
) -> ApiResult<Response> {
    caller.staff()?;
    check_domain(&domain)?;
    let scope = query.scope()?;
    let if_match = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(|s| s.trim().trim_start_matches("W/").trim_matches('"'))
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|v| *v >= 0)
                .ok_or_else(|| {
                    ApiError::bad_request("If-Match", "expected a version, e.g. \"3\"")
                })?,
        ),
    };
    let expected = match (if_match, body.version) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::bad_request(
                "version",
                "`version` and `If-Match` disagree",
            ))
        }
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => {
            return Err(ApiError::bad_request(
                "version",
                "give the version this edit was made against (`version` or `If-Match`; 0 for a new rule set)",
            ))
        }
    };
    if expected < 0 {
        return Err(ApiError::bad_request("version", "a version is 0 or more"));
    }
    let file = format!("{domain}.yaml");
    let root = validate_yaml(&file, &body.yaml)?;
    if root.domain.as_deref() != Some(domain.as_str()) {
        return Err(ApiError::invalid_rules(&crate::rules::RuleErrors(vec![
            crate::rules::RuleError {
                file,
                path: "domain".into(),
                message: format!(
                    "the domain is '{}', not the URL's '{domain}'",
                    root.domain.unwrap_or_default()
                ),
            },
        ])));
    }
    let before = admin::rule_set_version(&state.pool, &domain, &scope).await?;
    let written =
        admin::replace_rules(&state.pool, &[(file, root)], &scope, Some(expected)).await?;
    let Some(applied) = written.into_iter().next() else {
        return Err(ApiError::internal());
    };
    caller
        .audit(
            &state,
            Method::PUT,
            "/admin/v1/rules/{domain}",
            &format!("rules:{}", scope.label(&domain)),
            Some(json!({"version": before})),
            Some(json!({"version": applied.version, "descriptors": applied.descriptors})),
            200,
        )
        .await;
    Ok(([(header::ETAG, etag(applied.version))], Json(applied)).into_response())
}

// === Admin tokens ===

/// Every admin token, by prefix (admin).
#[utoipa::path(get, path = "/admin/v1/tokens", tag = "tokens",
    responses((status = 200, body = Vec<TokenSummary>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tokens(
    State(state): State<AdminState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenSummary>>> {
    caller.require(&[Role::Admin])?;
    Ok(Json(tokens::list(&state.pool).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub role: Role,
    /// Required for (and only for) the `tenant` role.
    pub tenant: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub description: Option<String>,
}

/// Issues an admin token; the token is in this response only (admin).
#[utoipa::path(post, path = "/admin/v1/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 201, body = IssuedToken), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue_token(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewToken>,
) -> ApiResult<(StatusCode, Json<IssuedToken>)> {
    caller.require(&[Role::Admin])?;
    match (body.role, &body.tenant) {
        (Role::Tenant, None) => {
            return Err(ApiError::bad_request(
                "tenant",
                "a tenant token needs `tenant`",
            ))
        }
        (Role::Tenant, Some(t)) => check_tenant_name("tenant", t)?,
        (_, Some(_)) => {
            return Err(ApiError::bad_request(
                "tenant",
                "only a tenant token has a `tenant`",
            ))
        }
        (_, None) => {}
    }
    if body.expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(ApiError::bad_request(
            "expires_at",
            "the expiry is in the past",
        ));
    }
    let description = body.description.unwrap_or_default();
    if description.len() > 200 {
        return Err(ApiError::bad_request("description", "at most 200 bytes"));
    }
    let token = tokens::issue(
        &state.pool,
        &state.hasher,
        body.role,
        body.tenant.as_deref(),
        body.expires_at,
        &description,
    )
    .await
    .map_err(|e| match e {
        admin::AdminError::NoSuchTenant(_) => ApiError::bad_request("tenant", e.to_string()),
        e => e.into(),
    })?;
    caller
        .audit(
            &state,
            Method::POST,
            "/admin/v1/tokens",
            &format!("token:{}", token.prefix),
            None,
            Some(
                json!({"prefix": token.prefix, "role": body.role, "tenant": body.tenant,
                "expires_at": body.expires_at}),
            ),
            201,
        )
        .await;
    Ok((StatusCode::CREATED, Json(token)))
}

/// Revokes an admin token by its prefix (admin).
#[utoipa::path(delete, path = "/admin/v1/tokens/{prefix}", tag = "tokens",
    params(("prefix" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    State(state): State<AdminState>,
    caller: Caller,
    PathParams(prefix): PathParams<String>,
) -> ApiResult<StatusCode> {
    caller.require(&[Role::Admin])?;
    check_prefix("prefix", &prefix, "sla_")?;
    match tokens::revoke(&state.pool, &prefix).await? {
        Revocation::Revoked => {
            caller
                .audit(
                    &state,
                    Method::DELETE,
                    "/admin/v1/tokens/{prefix}",
                    &format!("token:{prefix}"),
                    Some(json!({"revoked": false})),
                    Some(json!({"revoked": true})),
                    204,
                )
                .await;
            Ok(StatusCode::NO_CONTENT)
        }
        Revocation::AlreadyRevoked => Err(ApiError::conflict(format!(
            "token {prefix} is already revoked"
        ))),
        Revocation::NoSuchKey => Err(admin::AdminError::NoSuchToken(prefix).into()),
    }
}

// === Audit log ===

#[derive(Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// A page of the audit log in [from, to) (default: the last 30 days),
/// newest first (admin, operator).
#[utoipa::path(get, path = "/admin/v1/audit", tag = "audit",
    params(("from" = Option<DateTime<Utc>>, Query), ("to" = Option<DateTime<Utc>>, Query),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000), ("offset" = Option<i64>, Query, minimum = 0)),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit_log(
    State(state): State<AdminState>,
    caller: Caller,
    query: QueryParams,
) -> ApiResult<Json<AuditPage>> {
    caller.staff()?;
    let range = query.range(Utc::now() - Duration::days(30))?;
    // `to` defaults to now: include entries written this very instant.
    let range = match query.text("to") {
        None => (range.0, range.1 + Duration::seconds(1)),
        Some(_) => range,
    };
    let (limit, offset) = query.page()?;
    let (items, total) = admin::audit::list(&state.pool, range, limit, offset).await?;
    Ok(Json(AuditPage {
        items,
        total,
        limit,
        offset,
    }))
}
