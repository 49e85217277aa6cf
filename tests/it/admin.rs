//! The admin API (`sluice admin`) against a real PostgreSQL: every route's
//! happy path, bad input, missing/expired/revoked tokens, wrong roles and
//! cross-tenant access; optimistic concurrency on rule sets; the audit log;
//! the failed-sign-in limit; HTTPS from the real binary; a change made
//! through the API in force on a running `sluice serve`.
//!
//! Tokens are issued by the real `sluice admin-tokens` binary; the server
//! runs in this process through the same `admin_api::serve` the binary
//! calls, except in the HTTPS test, which runs the binary.

use crate::support;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::admin_api::{self, auth::FailedAuthLimiter, AdminState};
use sluice::clock::SystemClock;
use sluice::limiter::KeyHasher;
use sluice::proto::rls::rate_limit_response::Code;
use sqlx::PgPool;
use support::http::{self, HttpResponse};
use support::postgres::PgCluster;
use support::{request, wait_until, ChildGuard, TestServer};
use tokio::sync::oneshot;

const KEY_SECRET: &str = "admin test secret";

// === Helpers ===

/// Runs a command that must succeed; returns its stdout, trimmed.
fn ok(pg: &PgCluster, args: &[&str]) -> String {
    pg.sluice_ok(KEY_SECRET, args).trim().to_owned()
}

fn start_cluster() -> PgCluster {
    let pg = PgCluster::start();
    ok(&pg, &["migrate"]);
    ok(&pg, &["tenants", "create", "acme", "--plan", "free"]);
    ok(&pg, &["tenants", "create", "globex", "--plan", "startup"]);
    pg
}

/// The admin API served in this process on a free port.
struct Admin {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Admin {
    async fn start(pg: &PgCluster, auth_failures: u32) -> Admin {
        Admin::start_with(pg, auth_failures, None).await
    }

    async fn start_with(
        pg: &PgCluster,
        auth_failures: u32,
        oidc: Option<Arc<sluice::admin_api::oidc::OidcVerifier>>,
    ) -> Admin {
        let pool = PgPool::connect(&pg.primary_url).await.unwrap();
        let state = AdminState {
            pool,
            hasher: KeyHasher::from_secret(KEY_SECRET.as_bytes()),
            failures: Arc::new(FailedAuthLimiter::new(
                auth_failures,
                Duration::from_secs(60),
                Arc::new(SystemClock),
            )),
            oidc,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(admin_api::serve(listener, None, state, async {
            let _ = stopped.await;
        }));
        Admin {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("authorization", a));
        }
        let text = body.map(|b| b.to_string());
        if text.is_some() {
            headers.push(("content-type", "application/json"));
        }
        http::request(
            self.addr,
            method,
            path,
            &headers,
            text.as_deref().map(str::as_bytes),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

/// Asserts a status, and for errors the one error shape (and the field).
#[track_caller]
fn expect(r: &HttpResponse, status: u16, field: Option<&str>) -> Value {
    assert_eq!(r.status, status, "body: {}", r.text());
    if r.body.is_empty() {
        return Value::Null;
    }
    let body = r.json();
    if status >= 400 {
        let error = &body["error"];
        assert!(
            error["code"].is_string() && error["message"].is_string(),
            "not the error shape: {body}"
        );
        if let Some(field) = field {
            assert_eq!(error["field"], field, "{body}");
        }
    }
    body
}

struct Tokens {
    admin: String,
    operator: String,
    acme: String,
    globex: String,
    expired: String,
    revoked: String,
}

fn issue_tokens(pg: &PgCluster) -> Tokens {
    let issue = |args: &[&str]| {
        let mut all = vec!["admin-tokens", "issue"];
        all.extend_from_slice(args);
        ok(pg, &all)
    };
    let tokens = Tokens {
        admin: issue(&["--role", "admin", "--description", "test admin"]),
        operator: issue(&["--role", "operator"]),
        acme: issue(&["--role", "tenant", "--tenant", "acme", "--expires", "1h"]),
        globex: issue(&["--role", "tenant", "--tenant", "globex"]),
        expired: issue(&["--role", "admin"]),
        revoked: issue(&["--role", "admin"]),
    };
    assert!(
        tokens.admin.starts_with("sla_") && tokens.admin.len() == 4 + 8 + 1 + 48,
        "{}",
        tokens.admin
    );
    ok(pg, &["admin-tokens", "revoke", &tokens.revoked[..12]]);
    tokens
}

async fn expire(pool: &PgPool, token: &str) {
    sqlx::query(
        "UPDATE admin_tokens SET expires_at = now() - interval '1 minute' WHERE prefix = $1",
    )
    .bind(&token[..12])
    .execute(pool)
    .await
    .unwrap();
}

// === The API ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_with_roles_bad_input_and_cross_tenant_denial() {
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    expire(&pool, &t.expired).await;
    // Only hashes are stored.
    let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash || prefix FROM admin_tokens")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(stored.iter().all(|s| !s.contains(&t.admin[13..])));
    let listed = ok(&pg, &["admin-tokens", "list"]);
    assert!(
        listed.contains(&t.admin[..12]) && !listed.contains(&t.admin),
        "{listed}"
    );

    let api = Admin::start(&pg, 1000).await;

    // --- The OpenAPI document, unauthenticated, 3.1, every route in it.
    let doc = expect(
        &api.call("GET", "/admin/v1/openapi.json", None, None).await,
        200,
        None,
    );
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    for path in [
        "/admin/v1/tenants",
        "/admin/v1/tenants/{tenant}",
        "/admin/v1/tenants/{tenant}/keys",
        "/admin/v1/tenants/{tenant}/keys/{prefix}",
        "/admin/v1/tenants/{tenant}/webhooks",
        "/admin/v1/tenants/{tenant}/webhooks/{id}",
        "/admin/v1/tenants/{tenant}/usage",
        "/admin/v1/tenants/{tenant}/violations",
        "/admin/v1/tenants/{tenant}/top-rules",
        "/admin/v1/plans",
        "/admin/v1/plans/{plan}",
        "/admin/v1/rules",
        "/admin/v1/rules/validate",
        "/admin/v1/rules/{domain}",
        "/admin/v1/rules/{domain}/export",
        "/admin/v1/tokens",
        "/admin/v1/tokens/{prefix}",
        "/admin/v1/audit",
        "/admin/v1/whoami",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the document"
        );
    }

    // --- Authentication: missing, malformed, unknown, expired, revoked.
    expect(
        &api.call("GET", "/admin/v1/whoami", None, None).await,
        401,
        Some("authorization"),
    );
    for bad in [
        "nonsense",
        t.expired.as_str(),
        t.revoked.as_str(),
        "sla_00000000_0000",
    ] {
        let r = api.call("GET", "/admin/v1/tenants", Some(bad), None).await;
        expect(&r, 401, Some("authorization"));
        assert!(r
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer")));
    }
    let me = expect(
        &api.call("GET", "/admin/v1/whoami", Some(&t.acme), None)
            .await,
        200,
        None,
    );
    assert_eq!(
        (me["role"].as_str(), me["tenant"].as_str()),
        (Some("tenant"), Some("acme"))
    );
    assert_eq!(me["actor"], t.acme[..12]);

    // --- Cross-tenant and wrong-role denial, every route: globex's token
    // on acme's routes, a tenant token on the staff routes, an operator on
    // the token routes.
    let acme_key = expect(
        &api.call(
            "POST",
            "/admin/v1/tenants/acme/keys",
            Some(&t.acme),
            Some(&json!({})),
        )
        .await,
        201,
        None,
    );
    let acme_prefix = acme_key["prefix"].as_str().unwrap().to_owned();
    let denied: Vec<(&str, String, Option<Value>, &str)> = vec![
        (
            "GET",
            "/admin/v1/tenants/acme".into(),
            None,
            t.globex.as_str(),
        ),
        (
            "GET",
            "/admin/v1/tenants/acme/keys".into(),
            None,
            t.globex.as_str(),
        ),
        (
            "POST",
            "/admin/v1/tenants/acme/keys".into(),
            Some(json!({})),
            t.globex.as_str(),
        ),
        (
            "DELETE",
            format!("/admin/v1/tenants/acme/keys/{acme_prefix}"),
            None,
            t.globex.as_str(),
        ),
        (
            "GET",
            "/admin/v1/tenants/acme/usage".into(),
            None,
            t.globex.as_str(),
        ),
        (
            "GET",
            "/admin/v1/tenants/acme/violations".into(),
            None,
            t.globex.as_str(),
        ),
        (
            "GET",
            "/admin/v1/tenants/acme/top-rules".into(),
            None,
            t.globex.as_str(),
        ),
        ("GET", "/admin/v1/tenants".into(), None, t.acme.as_str()),
        (
            "POST",
            "/admin/v1/tenants".into(),
            Some(json!({"name": "x", "plan": "free"})),
            t.acme.as_str(),
        ),
        (
            "PATCH",
            "/admin/v1/tenants/acme".into(),
            Some(json!({"plan": "startup"})),
            t.acme.as_str(),
        ),
        (
            "DELETE",
            "/admin/v1/tenants/acme".into(),
            None,
            t.acme.as_str(),
        ),
        ("GET", "/admin/v1/plans".into(), None, t.acme.as_str()),
        (
            "POST",
            "/admin/v1/plans".into(),
            Some(json!({"name": "x"})),
            t.acme.as_str(),
        ),
        (
            "PATCH",
            "/admin/v1/plans/free".into(),
            Some(json!({"monthly_quota": 5})),
            t.acme.as_str(),
        ),
        ("GET", "/admin/v1/rules".into(), None, t.acme.as_str()),
        ("GET", "/admin/v1/rules/api".into(), None, t.acme.as_str()),
        (
            "GET",
            "/admin/v1/rules/api/export".into(),
            None,
            t.acme.as_str(),
        ),
        (
            "POST",
            "/admin/v1/rules/validate".into(),
            Some(json!({"yaml": "domain: x"})),
            t.acme.as_str(),
        ),
        (
            "PUT",
            "/admin/v1/rules/api".into(),
            Some(json!({"yaml": "domain: api", "version": 0})),
            t.acme.as_str(),
        ),
        ("GET", "/admin/v1/audit".into(), None, t.acme.as_str()),
        ("GET", "/admin/v1/tokens".into(), None, t.acme.as_str()),
        (
            "POST",
            "/admin/v1/tokens".into(),
            Some(json!({"role": "admin"})),
            t.acme.as_str(),
        ),
        (
            "DELETE",
            format!("/admin/v1/tokens/{}", &t.admin[..12]),
            None,
            t.acme.as_str(),
        ),
        ("GET", "/admin/v1/tokens".into(), None, t.operator.as_str()),
        (
            "POST",
            "/admin/v1/tokens".into(),
            Some(json!({"role": "admin"})),
            t.operator.as_str(),
        ),
        (
            "DELETE",
            format!("/admin/v1/tokens/{}", &t.admin[..12]),
            None,
            t.operator.as_str(),
        ),
    ];
    for (method, path, body, token) in &denied {
        let r = api.call(method, path, Some(token), body.as_ref()).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        expect(&r, 403, None);
    }
    // ... and nothing changed: acme's key is live, acme still on free.
    let keys = expect(
        &api.call("GET", "/admin/v1/tenants/acme/keys", Some(&t.acme), None)
            .await,
        200,
        None,
    );
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert!(keys["keys"][0]["revoked_at"].is_null());
    // A tenant cannot choose a key's plan.
    expect(
        &api.call(
            "POST",
            "/admin/v1/tenants/acme/keys",
            Some(&t.acme),
            Some(&json!({"plan": "enterprise"})),
        )
        .await,
        403,
        Some("plan"),
    );
    // Another tenant's key by acme's path: not acme's key.
    let globex_key = expect(
        &api.call(
            "POST",
            "/admin/v1/tenants/globex/keys",
            Some(&t.globex),
            Some(&json!({})),
        )
        .await,
        201,
        None,
    );
    let globex_prefix = globex_key["prefix"].as_str().unwrap();
    expect(
        &api.call(
            "DELETE",
            &format!("/admin/v1/tenants/acme/keys/{globex_prefix}"),
            Some(&t.acme),
            None,
        )
        .await,
        404,
        None,
    );

    // --- Tenants.
    let created = expect(
        &api.call(
            "POST",
            "/admin/v1/tenants",
            Some(&t.operator),
            Some(&json!({"name": "initech", "plan": "free"})),
        )
        .await,
        201,
        None,
    );
    assert_eq!(
        (created["name"].as_str(), created["plan"].as_str()),
        (Some("initech"), Some("free"))
    );
    for (body, field) in [
        (json!({"name": "initech", "plan": "free"}), "name"), // 409 below
        (json!({"name": "bad name!", "plan": "free"}), "name"),
        (json!({"name": "ok", "plan": "no-such-plan"}), "plan"),
        (json!({"name": "ok"}), "body"),
        (json!({"name": 5, "plan": "free"}), "name"),
        (json!({"name": "ok", "plan": "free", "extra": 1}), "extra"),
    ] {
        let r = api
            .call("POST", "/admin/v1/tenants", Some(&t.admin), Some(&body))
            .await;
        let status = if body["name"] == "initech" { 409 } else { 400 };
        expect(&r, status, Some(field));
    }
    let r = http::request(
        api.addr,
        "POST",
        "/admin/v1/tenants",
        &[
            ("authorization", &format!("Bearer {}", t.admin)),
            ("content-type", "application/json"),
        ],
        Some(b"{not json"),
    )
    .await
    .unwrap();
    expect(&r, 400, Some("body"));
    let page = expect(
        &api.call(
            "GET",
            "/admin/v1/tenants?limit=2&offset=1",
            Some(&t.admin),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(page["total"], 3);
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["globex", "initech"]);
    for q in ["limit=0", "limit=abc", "limit=1001", "offset=-1"] {
        let field = q.split('=').next().unwrap();
        expect(
            &api.call(
                "GET",
                &format!("/admin/v1/tenants?{q}"),
                Some(&t.admin),
                None,
            )
            .await,
            400,
            Some(field),
        );
    }
    let acme = expect(
        &api.call("GET", "/admin/v1/tenants/acme", Some(&t.acme), None)
            .await,
        200,
        None,
    );
    assert_eq!(
        (acme["plan"].as_str(), acme["live_keys"].as_i64()),
        (Some("free"), Some(1))
    );
    expect(
        &api.call("GET", "/admin/v1/tenants/nobody", Some(&t.operator), None)
            .await,
        404,
        None,
    );
    expect(
        &api.call(
            "GET",
            "/admin/v1/tenants/bad%20name",
            Some(&t.operator),
            None,
        )
        .await,
        400,
        Some("tenant"),
    );
    let moved = expect(
        &api.call(
            "PATCH",
            "/admin/v1/tenants/initech",
            Some(&t.operator),
            Some(&json!({"plan": "startup"})),
        )
        .await,
        200,
        None,
    );
    assert_eq!(moved["plan"], "startup");
    let suspended = expect(
        &api.call(
            "PATCH",
            "/admin/v1/tenants/initech",
            Some(&t.operator),
            Some(&json!({"suspended": true})),
        )
        .await,
        200,
        None,
    );
    assert!(suspended["suspended_at"].is_string());
    let resumed = expect(
        &api.call(
            "PATCH",
            "/admin/v1/tenants/initech",
            Some(&t.operator),
            Some(&json!({"suspended": false})),
        )
        .await,
        200,
        None,
    );
    assert!(resumed["suspended_at"].is_null());
    expect(
        &api.call(
            "PATCH",
            "/admin/v1/tenants/initech",
            Some(&t.operator),
            Some(&json!({"plan": "nope"})),
        )
        .await,
        400,
        Some("plan"),
    );
    expect(
        &api.call(
            "PATCH",
            "/admin/v1/tenants/initech",
            Some(&t.operator),
            Some(&json!({"suspended": "yes"})),
        )
        .await,
        400,
        Some("suspended"),
    );
    expect(
        &api.call(
            "PATCH",
            "/admin/v1/tenants/nobody",
            Some(&t.operator),
            Some(&json!({"plan": "free"})),
        )
        .await,
        404,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            "/admin/v1/tenants/initech",
            Some(&t.operator),
            None,
        )
        .await,
        204,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            "/admin/v1/tenants/initech",
            Some(&t.operator),
            None,
        )
        .await,
        404,
        None,
    );

    // --- Plans.
    let plans = expect(
        &api.call("GET", "/admin/v1/plans", Some(&t.operator), None)
            .await,
        200,
        None,
    );
    assert!(plans
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "free" && p["monthly_quota"] == 100000));
    let gold = expect(
        &api.call(
            "POST",
            "/admin/v1/plans",
            Some(&t.operator),
            Some(&json!({"name": "gold", "monthly_quota": 1000, "monthly_price_cents": 4900})),
        )
        .await,
        201,
        None,
    );
    assert_eq!(
        (
            gold["monthly_quota"].as_i64(),
            gold["monthly_price_cents"].as_i64()
        ),
        (Some(1000), Some(4900))
    );
    expect(
        &api.call(
            "POST",
            "/admin/v1/plans",
            Some(&t.operator),
            Some(&json!({"name": "gold"})),
        )
        .await,
        409,
        Some("name"),
    );
    expect(
        &api.call(
            "POST",
            "/admin/v1/plans",
            Some(&t.operator),
            Some(&json!({"name": "Gold"})),
        )
        .await,
        400,
        Some("name"),
    );
    expect(
        &api.call(
            "POST",
            "/admin/v1/plans",
            Some(&t.operator),
            Some(&json!({"name": "big", "monthly_quota": 5_000_000_000i64})),
        )
        .await,
        400,
        Some("monthly_quota"),
    );
    let changed = expect(
        &api.call(
            "PATCH",
            "/admin/v1/plans/gold",
            Some(&t.operator),
            Some(&json!({"monthly_quota": null, "monthly_price_cents": 9900})),
        )
        .await,
        200,
        None,
    );
    assert_eq!(
        (
            changed["monthly_quota"].as_i64(),
            changed["monthly_price_cents"].as_i64()
        ),
        (None, Some(9900))
    );
    let unchanged = expect(
        &api.call(
            "PATCH",
            "/admin/v1/plans/gold",
            Some(&t.operator),
            Some(&json!({})),
        )
        .await,
        200,
        None,
    );
    assert_eq!(unchanged["monthly_price_cents"], 9900);
    expect(
        &api.call(
            "PATCH",
            "/admin/v1/plans/gold",
            Some(&t.operator),
            Some(&json!({"monthly_price_cents": -1})),
        )
        .await,
        400,
        Some("monthly_price_cents"),
    );
    expect(
        &api.call(
            "PATCH",
            "/admin/v1/plans/nope",
            Some(&t.operator),
            Some(&json!({})),
        )
        .await,
        404,
        None,
    );

    // --- API keys: the raw key once, prefixes after.
    let raw = acme_key["key"].as_str().unwrap();
    assert!(raw.starts_with(&acme_prefix) && raw.len() == 4 + 8 + 1 + 48);
    let listed = api
        .call(
            "GET",
            "/admin/v1/tenants/acme/keys",
            Some(&t.operator),
            None,
        )
        .await;
    assert!(!listed.text().contains(raw), "a raw key listed");
    let staff_key = expect(
        &api.call(
            "POST",
            "/admin/v1/tenants/acme/keys",
            Some(&t.operator),
            Some(&json!({"plan": "gold"})),
        )
        .await,
        201,
        None,
    );
    expect(
        &api.call(
            "POST",
            "/admin/v1/tenants/acme/keys",
            Some(&t.operator),
            Some(&json!({"plan": "nope"})),
        )
        .await,
        400,
        Some("plan"),
    );
    expect(
        &api.call(
            "POST",
            "/admin/v1/tenants/nobody/keys",
            Some(&t.operator),
            Some(&json!({})),
        )
        .await,
        404,
        None,
    );
    let path = format!(
        "/admin/v1/tenants/acme/keys/{}",
        staff_key["prefix"].as_str().unwrap()
    );
    expect(
        &api.call("DELETE", &path, Some(&t.acme), None).await,
        204,
        None,
    );
    expect(
        &api.call("DELETE", &path, Some(&t.acme), None).await,
        409,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            "/admin/v1/tenants/acme/keys/slk_00000000",
            Some(&t.acme),
            None,
        )
        .await,
        404,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            "/admin/v1/tenants/acme/keys/nope",
            Some(&t.acme),
            None,
        )
        .await,
        400,
        Some("prefix"),
    );

    // --- Usage, violations, top rules.
    let acme_id: String = sqlx::query_scalar("SELECT id::text FROM tenants WHERE name = 'acme'")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO usage_hourly (tenant_id, domain, hour, allowed, denied) VALUES
           ($1::uuid, 'api', '2026-11-03T10:00:00Z', 100, 5),
           ($1::uuid, 'api', '2026-11-03T11:00:00Z', 50, 0),
           ($1::uuid, 'web', '2026-11-04T00:00:00Z', 7, 3),
           ($1::uuid, 'api', '2026-12-01T00:00:00Z', 1, 1)",
    )
    .bind(&acme_id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT sluice_violations_partition('2026-11-03T10:00:00Z')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO violations (at, tenant_id, domain, rule, client_id, hits) VALUES
           ('2026-11-03T10:05:00Z', $1::uuid, 'api', 'per_key', '00000000000000aa', 4),
           ('2026-11-03T10:06:00Z', $1::uuid, 'api', 'per_key', '00000000000000bb', 1),
           ('2026-11-04T00:30:00Z', $1::uuid, 'web', 'per_ip', '00000000000000aa', 3)",
    )
    .bind(&acme_id)
    .execute(&pool)
    .await
    .unwrap();
    let range = "from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z";
    let daily = expect(
        &api.call(
            "GET",
            &format!("/admin/v1/tenants/acme/usage?granularity=day&{range}"),
            Some(&t.acme),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(
        (daily["allowed"].as_i64(), daily["denied"].as_i64()),
        (Some(157), Some(8))
    );
    assert_eq!(daily["monthly_quota"], 100000);
    let points: Vec<(String, i64, i64)> = daily["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_str().unwrap().to_owned(),
                p["allowed"].as_i64().unwrap(),
                p["denied"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        points,
        [
            ("2026-11-03T00:00:00Z".to_owned(), 150, 5),
            ("2026-11-04T00:00:00Z".to_owned(), 7, 3)
        ]
    );
    let hourly = expect(
        &api.call(
            "GET",
            &format!("/admin/v1/tenants/acme/usage?granularity=hour&{range}"),
            Some(&t.operator),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(hourly["points"].as_array().unwrap().len(), 3);
    let monthly = expect(
        &api.call("GET", "/admin/v1/tenants/acme/usage?granularity=month&from=2026-01-01T00:00:00Z&to=2027-01-01T00:00:00Z", Some(&t.acme), None).await,
        200,
        None,
    );
    assert_eq!(monthly["points"].as_array().unwrap().len(), 2);
    for (q, field) in [
        ("granularity=week", "granularity"),
        ("from=yesterday", "from"),
        ("to=2026-13-01T00:00:00Z", "to"),
        ("from=2026-12-01T00:00:00Z&to=2026-11-01T00:00:00Z", "from"),
        ("from=1990-01-01T00:00:00Z&to=2026-11-01T00:00:00Z", "from"),
    ] {
        expect(
            &api.call(
                "GET",
                &format!("/admin/v1/tenants/acme/usage?{q}"),
                Some(&t.acme),
                None,
            )
            .await,
            400,
            Some(field),
        );
    }
    let violations = expect(
        &api.call(
            "GET",
            &format!("/admin/v1/tenants/acme/violations?{range}&limit=2"),
            Some(&t.acme),
            None,
        )
        .await,
        200,
        None,
    );
    let items = violations["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[0]["rule"].as_str(), items[0]["hits"].as_i64()),
        (Some("per_ip"), Some(3))
    );
    let second = expect(
        &api.call(
            "GET",
            &format!("/admin/v1/tenants/acme/violations?{range}&limit=2&offset=2"),
            Some(&t.acme),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(second["items"][0]["client_id"], "00000000000000aa");
    let top = expect(
        &api.call(
            "GET",
            &format!("/admin/v1/tenants/acme/top-rules?{range}"),
            Some(&t.acme),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(top[0]["rule"], "per_key");
    assert_eq!(
        (top[0]["hits"].as_i64(), top[0]["clients"].as_i64()),
        (Some(5), Some(2))
    );
    let globex_usage = expect(
        &api.call(
            "GET",
            "/admin/v1/tenants/globex/usage",
            Some(&t.globex),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(globex_usage["allowed"], 0, "globex sees acme's usage");

    // --- Admin tokens over the API.
    let issued = expect(
        &api.call(
            "POST",
            "/admin/v1/tokens",
            Some(&t.admin),
            Some(&json!({"role": "operator", "description": "ci"})),
        )
        .await,
        201,
        None,
    );
    let new_token = issued["token"].as_str().unwrap().to_owned();
    expect(
        &api.call("GET", "/admin/v1/whoami", Some(&new_token), None)
            .await,
        200,
        None,
    );
    let tokens = api
        .call("GET", "/admin/v1/tokens", Some(&t.admin), None)
        .await;
    expect(&tokens, 200, None);
    assert!(tokens.text().contains(&new_token[..12]) && !tokens.text().contains(&new_token));
    for (body, field) in [
        (json!({"role": "tenant"}), "tenant"),
        (json!({"role": "admin", "tenant": "acme"}), "tenant"),
        (json!({"role": "root"}), "role"),
        (json!({"role": "tenant", "tenant": "nobody"}), "tenant"),
        (
            json!({"role": "admin", "expires_at": "2000-01-01T00:00:00Z"}),
            "expires_at",
        ),
    ] {
        expect(
            &api.call("POST", "/admin/v1/tokens", Some(&t.admin), Some(&body))
                .await,
            400,
            Some(field),
        );
    }
    expect(
        &api.call(
            "DELETE",
            &format!("/admin/v1/tokens/{}", &new_token[..12]),
            Some(&t.admin),
            None,
        )
        .await,
        204,
        None,
    );
    expect(
        &api.call("GET", "/admin/v1/whoami", Some(&new_token), None)
            .await,
        401,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            &format!("/admin/v1/tokens/{}", &new_token[..12]),
            Some(&t.admin),
            None,
        )
        .await,
        409,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            "/admin/v1/tokens/sla_00000000",
            Some(&t.admin),
            None,
        )
        .await,
        404,
        None,
    );

    // --- Errors: 404 route, 405, 413.
    expect(
        &api.call("GET", "/admin/v1/nothing", Some(&t.admin), None)
            .await,
        404,
        None,
    );
    expect(
        &api.call("PUT", "/admin/v1/tenants", Some(&t.admin), Some(&json!({})))
            .await,
        405,
        None,
    );
    let huge = json!({"name": "x".repeat(2 << 20), "plan": "free"});
    expect(
        &api.call("POST", "/admin/v1/tenants", Some(&t.admin), Some(&huge))
            .await,
        413,
        Some("body"),
    );

    // --- The audit log: who, what, from where; no raw key or token.
    let audit = api
        .call("GET", "/admin/v1/audit?limit=1000", Some(&t.operator), None)
        .await;
    let log = expect(&audit, 200, None);
    let entries = log["items"].as_array().unwrap();
    let find = |route: &str, object: &str| {
        entries
            .iter()
            .find(|e| e["route"] == route && e["object"] == object)
            .unwrap_or_else(|| panic!("no audit entry for {route} {object}: {log}"))
    };
    let create = find("/admin/v1/tenants", "tenant:initech");
    assert_eq!(
        (create["actor"].as_str(), create["role"].as_str()),
        (Some(&t.operator[..12]), Some("operator"))
    );
    assert_eq!(create["source"], "127.0.0.1");
    assert_eq!(create["after"]["plan"], "free");
    let moved = entries
        .iter()
        .find(|e| {
            e["object"] == "tenant:initech"
                && e["before"]["plan"] == "free"
                && e["after"]["plan"] == "startup"
        })
        .expect("the plan change, before and after");
    assert_eq!(moved["method"], "PATCH");
    let suspension = entries
        .iter()
        .find(|e| {
            e["object"] == "tenant:initech"
                && e["before"]["suspended_at"].is_null()
                && e["after"]["suspended_at"].is_string()
        })
        .expect("the suspension");
    assert_eq!(suspension["route"], "/admin/v1/tenants/{tenant}");
    find("/admin/v1/tenants/{tenant}", "tenant:initech");
    find(
        "/admin/v1/tenants/{tenant}/keys",
        &format!("tenant:acme/key:{acme_prefix}"),
    );
    find("/admin/v1/plans/{plan}", "plan:gold");
    find(
        "/admin/v1/tokens/{prefix}",
        &format!("token:{}", &new_token[..12]),
    );
    for secret in [
        raw,
        staff_key["key"].as_str().unwrap(),
        new_token.as_str(),
        t.admin.as_str(),
    ] {
        assert!(
            !audit.text().contains(secret),
            "the audit log holds a raw key or token"
        );
    }
    // Append-only.
    let deleted = sqlx::query("DELETE FROM audit_log").execute(&pool).await;
    assert!(deleted.is_err(), "the audit log accepted a DELETE");
    let window = expect(
        &api.call(
            "GET",
            "/admin/v1/audit?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z",
            Some(&t.admin),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(window["total"], 0);

    api.stop().await;
}

// === Rules ===

const API_RULES: &str = "domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: 100, name: per_key}\n";
const BAD_RULES: &str = "domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: fortnight, requests_per_unit: 100}\n  - value: x\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_sets_validate_apply_with_versions_and_export() {
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let api = Admin::start(&pg, 1000).await;

    // Validation: the same lines as `sluice rules validate`.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, BAD_RULES).unwrap();
    let cli = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["rules", "validate", "rules.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!cli.status.success());
    let cli_lines: Vec<String> = String::from_utf8_lossy(&cli.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(!cli_lines.is_empty());
    let r = api
        .call(
            "POST",
            "/admin/v1/rules/validate",
            Some(&t.operator),
            Some(&json!({"yaml": BAD_RULES})),
        )
        .await;
    let body = expect(&r, 422, Some("yaml"));
    assert_eq!(body["error"]["code"], "invalid_rules");
    let api_lines: Vec<String> = body["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(api_lines, cli_lines);
    assert!(
        api_lines.iter().all(|l| l.starts_with("rules.yaml: ")),
        "{api_lines:?}"
    );
    let good = expect(
        &api.call(
            "POST",
            "/admin/v1/rules/validate",
            Some(&t.operator),
            Some(&json!({"yaml": API_RULES})),
        )
        .await,
        200,
        None,
    );
    assert_eq!(
        (good["valid"].as_bool(), good["domain"].as_str()),
        (Some(true), Some("api"))
    );
    expect(
        &api.call(
            "POST",
            "/admin/v1/rules/validate",
            Some(&t.operator),
            Some(&json!({})),
        )
        .await,
        400,
        Some("body"),
    );

    // Apply: a version is required; 0 for a new rule set.
    expect(
        &api.call(
            "PUT",
            "/admin/v1/rules/api",
            Some(&t.operator),
            Some(&json!({"yaml": API_RULES})),
        )
        .await,
        400,
        Some("version"),
    );
    expect(
        &api.call("GET", "/admin/v1/rules/api", Some(&t.operator), None)
            .await,
        404,
        None,
    );
    let bad = api
        .call(
            "PUT",
            "/admin/v1/rules/api",
            Some(&t.operator),
            Some(&json!({"yaml": BAD_RULES, "version": 0})),
        )
        .await;
    let bad = expect(&bad, 422, Some("yaml"));
    assert!(bad["error"]["problems"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("api.yaml: "));
    let other = api
        .call(
            "PUT",
            "/admin/v1/rules/web",
            Some(&t.operator),
            Some(&json!({"yaml": API_RULES, "version": 0})),
        )
        .await;
    expect(&other, 422, Some("yaml"));
    let applied = api
        .call(
            "PUT",
            "/admin/v1/rules/api",
            Some(&t.operator),
            Some(&json!({"yaml": API_RULES, "version": 0})),
        )
        .await;
    let body = expect(&applied, 200, None);
    assert_eq!(
        (body["version"].as_i64(), body["descriptors"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(applied.header("etag"), Some("\"1\""));
    let got = api
        .call("GET", "/admin/v1/rules/api", Some(&t.operator), None)
        .await;
    let set = expect(&got, 200, None);
    assert_eq!(
        (set["version"].as_i64(), got.header("etag")),
        (Some(1), Some("\"1\""))
    );
    assert!(set["yaml"].as_str().unwrap().contains("per_key"));
    let export = api
        .call("GET", "/admin/v1/rules/api/export", Some(&t.operator), None)
        .await;
    assert_eq!(export.status, 200);
    assert_eq!(export.header("content-type"), Some("application/yaml"));
    assert_eq!(
        export.text(),
        ok(&pg, &["rules", "export", "--domain", "api"]) + "\n"
    );

    // A stale version: 409, nothing written.
    let stale = api
        .call(
            "PUT",
            "/admin/v1/rules/api",
            Some(&t.operator),
            Some(&json!({"yaml": API_RULES.replace("100", "7"), "version": 0})),
        )
        .await;
    expect(&stale, 409, Some("version"));
    assert!(!api
        .call("GET", "/admin/v1/rules/api/export", Some(&t.operator), None)
        .await
        .text()
        .contains("7"));
    // If-Match works too, and must agree with `version`.
    let auth = format!("Bearer {}", t.operator);
    let put = |if_match: &'static str, body: Value| {
        let auth = auth.clone();
        let addr = api.addr;
        async move {
            http::request(
                addr,
                "PUT",
                "/admin/v1/rules/api",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                    ("if-match", if_match),
                ],
                Some(body.to_string().as_bytes()),
            )
            .await
            .unwrap()
        }
    };
    expect(
        &put("\"0\"", json!({"yaml": API_RULES})).await,
        409,
        Some("version"),
    );
    expect(
        &put("\"1\"", json!({"yaml": API_RULES, "version": 0})).await,
        400,
        Some("version"),
    );
    expect(
        &put("one", json!({"yaml": API_RULES})).await,
        400,
        Some("If-Match"),
    );
    expect(&put("\"1\"", json!({"yaml": API_RULES})).await, 200, None);

    // Two operators with the same version at once: one wins, one gets 409.
    let edit = |limit: u32| {
        let addr = api.addr;
        let auth = format!("Bearer {}", t.operator);
        async move {
            let body = json!({"yaml": API_RULES.replace("100", &limit.to_string()), "version": 2})
                .to_string();
            http::request(
                addr,
                "PUT",
                "/admin/v1/rules/api",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                Some(body.as_bytes()),
            )
            .await
            .unwrap()
        }
    };
    let (a, b) = tokio::join!(tokio::spawn(edit(11)), tokio::spawn(edit(22)));
    let mut statuses = [a.unwrap().status, b.unwrap().status];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
    let set = expect(
        &api.call("GET", "/admin/v1/rules/api", Some(&t.operator), None)
            .await,
        200,
        None,
    );
    assert_eq!(set["version"], 3);

    // Scopes: a plan's and a tenant's rule sets are versioned apart.
    let plan_rules = json!({"yaml": API_RULES, "version": 0});
    expect(
        &api.call(
            "PUT",
            "/admin/v1/rules/api?plan=free",
            Some(&t.admin),
            Some(&plan_rules),
        )
        .await,
        200,
        None,
    );
    expect(
        &api.call(
            "PUT",
            "/admin/v1/rules/api?tenant=acme",
            Some(&t.admin),
            Some(&plan_rules),
        )
        .await,
        200,
        None,
    );
    expect(
        &api.call(
            "PUT",
            "/admin/v1/rules/api?tenant=nobody",
            Some(&t.admin),
            Some(&plan_rules),
        )
        .await,
        404,
        None,
    );
    expect(
        &api.call(
            "GET",
            "/admin/v1/rules/api?plan=free&tenant=acme",
            Some(&t.admin),
            None,
        )
        .await,
        400,
        Some("tenant"),
    );
    let sets = expect(
        &api.call("GET", "/admin/v1/rules", Some(&t.operator), None)
            .await,
        200,
        None,
    );
    let sets: Vec<(Option<&str>, Option<&str>, i64)> = sets
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["plan"].as_str(),
                s["tenant"].as_str(),
                s["version"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sets,
        [
            (None, None, 3),
            (None, Some("acme"), 1),
            (Some("free"), None, 1)
        ]
    );
    // The CLI raises versions too, so an API edit never overwrites it.
    std::fs::write(&file, API_RULES).unwrap();
    ok(&pg, &["rules", "apply", file.to_str().unwrap()]);
    expect(
        &api.call(
            "PUT",
            "/admin/v1/rules/api",
            Some(&t.operator),
            Some(&json!({"yaml": API_RULES, "version": 3})),
        )
        .await,
        409,
        Some("version"),
    );
    api.stop().await;
}

// === Failed sign-ins ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_limited_per_source_address() {
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let api = Admin::start(&pg, 3).await;
    for _ in 0..3 {
        expect(
            &api.call("GET", "/admin/v1/whoami", Some("sla_guess"), None)
                .await,
            401,
            None,
        );
    }
    // Refused before the token is even checked, a valid one too.
    for token in ["sla_guess", t.admin.as_str()] {
        let r = api.call("GET", "/admin/v1/whoami", Some(token), None).await;
        expect(&r, 429, None);
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
    // The OpenAPI document needs no token and stays open.
    expect(
        &api.call("GET", "/admin/v1/openapi.json", None, None).await,
        200,
        None,
    );
    api.stop().await;

    // A server with room for failures: no token at all is not a failure.
    let api = Admin::start(&pg, 1).await;
    for _ in 0..3 {
        expect(
            &api.call("GET", "/admin/v1/whoami", None, None).await,
            401,
            None,
        );
    }
    expect(
        &api.call("GET", "/admin/v1/whoami", Some(&t.admin), None)
            .await,
        200,
        None,
    );
    api.stop().await;
}

// === The binary, over HTTPS, and a change in force on `sluice serve` ===

/// One HTTP/1.1 request over TLS, trusting `ca_pem`.
async fn https(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> HttpResponse {
    use rustls_pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    http::parse(&raw).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_https_and_serve_sees_api_changes_within_a_second() {
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let dir = tempfile::tempdir().unwrap();
    let ca = support::certs::TestCa::new("admin test CA");
    let (cert, key) = ca.server().write(dir.path(), "admin");

    // Loopback by default.
    let help = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["admin", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("127.0.0.1:8090"));

    let port = support::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = dir.path().join("admin.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = ChildGuard::spawn(
        "sluice admin",
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["admin", "--addr", &addr.to_string()])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env("SLUICE_DATABASE_URL", &pg.primary_url)
            .env("SLUICE_KEY_SECRET", KEY_SECRET)
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file),
    );
    let ca_pem = ca.cert_pem();
    let up = wait_until(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    child.assert_running(&std::fs::read_to_string(&log).unwrap_or_default());
    assert!(up.is_some(), "sluice admin did not listen");
    let me = https(addr, &ca_pem, "GET", "/admin/v1/whoami", &t.admin, None).await;
    assert_eq!(me.status, 200, "{}", me.text());
    assert_eq!(me.json()["role"], "admin");
    // Plain HTTP on the TLS port gets nothing.
    assert!(http::get(addr, "/admin/v1/openapi.json")
        .await
        .map_or(true, |r| r.status != 200));

    // A decision server on the same catalog.
    let server = TestServer::from_cli(&[
        "--rules",
        "postgres",
        "--database-url",
        &pg.primary_url,
        "--key-secret",
        KEY_SECRET,
    ])
    .await;
    let client = server.client().await;
    let rules = json!({"yaml": API_RULES.replace("100", "5"), "version": 0}).to_string();
    let put = https(
        addr,
        &ca_pem,
        "PUT",
        "/admin/v1/rules/api",
        &t.operator,
        Some(&rules),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let issued = https(
        addr,
        &ca_pem,
        "POST",
        "/admin/v1/tenants/acme/keys",
        &t.acme,
        Some("{}"),
    )
    .await;
    assert_eq!(issued.status, 201, "{}", issued.text());
    let key = issued.json()["key"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let call = || {
        let req = request("api", &[&[("api_key", key.as_str())]]);
        let mut client = client.clone();
        async move {
            let r = client.should_rate_limit(req).await.unwrap().into_inner();
            (
                r.overall_code(),
                r.statuses[0]
                    .current_limit
                    .as_ref()
                    .map(|l| l.requests_per_unit),
            )
        }
    };
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(3) {
        if call().await == (Code::Ok, Some(5)) {
            seen = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.expect("the key and rules issued through the API were not in force within 3 s");
    eprintln!("MEASURED admin API change in force on sluice serve after {seen:?}");
    // Suspending the tenant refuses its key.
    let suspend = https(
        addr,
        &ca_pem,
        "PATCH",
        "/admin/v1/tenants/acme",
        &t.operator,
        Some(r#"{"suspended":true}"#),
    )
    .await;
    assert_eq!(suspend.status, 200, "{}", suspend.text());
    let started = Instant::now();
    let mut refused = false;
    while started.elapsed() < Duration::from_secs(3) {
        if call().await == (Code::OverLimit, None) {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a suspended tenant's key was still served");
    server.stop().await.unwrap();
}

// === The console, in a real headless Chromium ===

/// A minimal Chrome DevTools Protocol client: one WebSocket (RFC 6455,
/// text frames, masked as a client must) to one page target.
struct Cdp {
    stream: tokio::net::TcpStream,
    next_id: u64,
}

impl Cdp {
    async fn connect(ws_url: &str) -> Cdp {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let rest = ws_url.strip_prefix("ws://").expect("a ws:// URL");
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        while !response.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            response.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.starts_with("HTTP/1.1 101"),
            "no WebSocket upgrade: {text}"
        );
        Cdp { stream, next_id: 1 }
    }

    async fn send(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt as _;
        let payload = text.as_bytes();
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x5a, 0x17, 0xc3, 0x9e];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    /// The next whole text message (continuation frames joined).
    async fn receive(&mut self) -> String {
        use tokio::io::AsyncReadExt as _;
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).await.unwrap();
            let fin = head[0] & 0x80 != 0;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.stream.read_exact(&mut b).await.unwrap();
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.stream.read_exact(&mut b).await.unwrap();
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload).await.unwrap();
            message.extend_from_slice(&payload);
            if fin {
                return String::from_utf8(message).unwrap();
            }
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"id": id, "method": method, "params": params}).to_string())
            .await;
        loop {
            let message: Value = serde_json::from_str(&self.receive().await).unwrap();
            if message["id"] == id {
                assert!(message["error"].is_null(), "{method}: {message}");
                return message["result"].clone();
            }
        }
    }

    /// Evaluates JavaScript in the page (awaiting a promise) and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is true, for up to 10 s.
    async fn wait_for(&mut self, what: &str, expression: &str) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if self.eval(expression).await == Value::Bool(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let body = self.eval("document.body.innerText").await;
        panic!("the console did not show {what} within 10 s; the page says:\n{body}");
    }

    /// Saves a PNG screenshot under the test's artifacts directory.
    async fn screenshot(&mut self, name: &str) -> std::path::PathBuf {
        use base64_png::decode;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-console");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

/// Standard base64, for the screenshots (no crate for one decoder).
mod base64_png {
    pub fn decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let bytes: Vec<u8> = text
            .bytes()
            .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
            .collect();
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for chunk in bytes.chunks(4) {
            let v: Vec<u32> = chunk.iter().map(|c| u32::from(value(*c))).collect();
            let n = v
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, x)| n | x << (18 - 6 * i));
            out.push((n >> 16) as u8);
            if v.len() > 2 {
                out.push((n >> 8) as u8);
            }
            if v.len() > 3 {
                out.push(n as u8);
            }
        }
        out
    }
}

/// Chromium's `/json/list`: its HTTP server keeps the connection open, so
/// read by `Content-Length` rather than to the end.
async fn devtools_targets(addr: SocketAddr) -> Value {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET /json/list HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("no answer from Chromium's /json/list in 10 s")
            .unwrap();
        assert!(n > 0, "Chromium closed /json/list early");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("Content-Length");
            if raw.len() >= end + 4 + length {
                return serde_json::from_slice(&raw[end + 4..end + 4 + length]).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_signs_in_charts_usage_and_manages_keys() {
    let chromium = support::tool("chromium");
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let pool = PgPool::connect(&pg.primary_url).await.unwrap();
    // Usage this month: the month's first hour and the current hour.
    sqlx::query(
        "INSERT INTO usage_hourly (tenant_id, domain, hour, allowed, denied)
         SELECT id, 'api', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', 120, 7
         FROM tenants WHERE name = 'acme'
         UNION ALL
         SELECT id, 'web', date_trunc('hour', now()), 30, 2 FROM tenants WHERE name = 'acme'
         ON CONFLICT (tenant_id, domain, hour) DO NOTHING",
    )
    .execute(&pool)
    .await
    .unwrap();
    let api = Admin::start(&pg, 1000).await;
    let usage = expect(
        &api.call("GET", "/admin/v1/tenants/acme/usage", Some(&t.acme), None)
            .await,
        200,
        None,
    );
    let expected: Vec<Value> = usage["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["start"], p["allowed"], p["denied"]]))
        .collect();
    assert!(!expected.is_empty());

    let profile = tempfile::tempdir().unwrap();
    let log = profile.path().join("chromium.log");
    let _browser = ChildGuard::spawn(
        "chromium",
        Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1000,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(profile.path().join("chromium.err")).unwrap()),
    );
    let port_file = profile.path().join("DevToolsActivePort");
    let mut port = None;
    let started = Instant::now();
    while port.is_none() && started.elapsed() < Duration::from_secs(30) {
        port = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.parse::<u16>().ok()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let port = port.unwrap_or_else(|| {
        panic!(
            "chromium wrote no DevToolsActivePort in 30 s:\n{}",
            std::fs::read_to_string(profile.path().join("chromium.err")).unwrap_or_default()
        )
    });
    let devtools: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let targets = devtools_targets(devtools).await;
    let page = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .expect("a page target");
    let mut cdp = Cdp::connect(page["webSocketDebuggerUrl"].as_str().unwrap()).await;
    cdp.call("Page.enable", json!({})).await;
    cdp.call(
        "Page.navigate",
        json!({"url": format!("http://{}/admin/", api.addr)}),
    )
    .await;
    cdp.wait_for(
        "the sign-in form",
        "document.readyState === 'complete' && !!document.getElementById('token')",
    )
    .await;

    // A wrong token: refused, the form stays.
    cdp.eval("document.getElementById('token').value = 'sla_wrong'; document.getElementById('signin').requestSubmit(); true").await;
    cdp.wait_for(
        "the sign-in error",
        "document.getElementById('signin-error').textContent.includes('Sign-in failed')",
    )
    .await;

    // Sign in as acme's tenant token.
    cdp.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('signin').requestSubmit(); true",
        json!(t.acme)
    ))
    .await;
    cdp.wait_for(
        "the usage chart",
        "document.querySelectorAll('#chart g.bar').length > 0",
    )
    .await;
    assert_eq!(
        cdp.eval("document.getElementById('staff').hidden").await,
        true,
        "a tenant sees the staff section"
    );
    let bars = cdp
        .eval("[...document.querySelectorAll('#chart g.bar')].map(g => [g.dataset.start, +g.dataset.allowed, +g.dataset.denied])")
        .await;
    assert_eq!(
        bars,
        Value::Array(expected),
        "the chart does not show the API's numbers"
    );
    assert_eq!(
        cdp.eval("document.getElementById('usage-allowed').textContent")
            .await,
        usage["allowed"].to_string()
    );
    assert_eq!(
        cdp.eval("document.getElementById('usage-quota').textContent")
            .await,
        "100000"
    );
    let shot = cdp.screenshot("tenant-usage").await;
    eprintln!("screenshot: {}", shot.display());

    // Issue a key: shown once, listed by prefix.
    cdp.eval("document.getElementById('issue-key').click(); true")
        .await;
    cdp.wait_for("the new key", "!document.getElementById('new-key').hidden && document.querySelectorAll('#keys tbody tr').length === 1").await;
    let shown = cdp
        .eval("document.getElementById('new-key').textContent")
        .await;
    let prefix = cdp
        .eval("document.querySelector('#keys tbody tr').dataset.prefix")
        .await;
    let prefix = prefix.as_str().unwrap().to_owned();
    assert!(
        shown.as_str().unwrap().contains(&format!("{prefix}_")),
        "{shown}"
    );
    let keys = expect(
        &api.call(
            "GET",
            "/admin/v1/tenants/acme/keys",
            Some(&t.operator),
            None,
        )
        .await,
        200,
        None,
    );
    assert_eq!(keys["keys"][0]["prefix"], prefix.as_str());
    assert!(keys["keys"][0]["revoked_at"].is_null());

    // Revoke it.
    cdp.eval(&format!(
        "document.querySelector('#keys tr[data-prefix=\"{prefix}\"] button.revoke').click(); true"
    ))
    .await;
    cdp.wait_for("the revocation", &format!("document.querySelector('#keys tr[data-prefix=\"{prefix}\"] td:nth-child(4)').textContent !== ''")).await;
    let keys = expect(
        &api.call(
            "GET",
            "/admin/v1/tenants/acme/keys",
            Some(&t.operator),
            None,
        )
        .await,
        200,
        None,
    );
    assert!(keys["keys"][0]["revoked_at"].is_string());
    let shot = cdp.screenshot("tenant-keys-revoked").await;
    eprintln!("screenshot: {}", shot.display());

    // An operator sees tenants, plans, rule sets and the audit log (with the
    // tenant's key changes in it).
    cdp.eval("sessionStorage.clear(); location.reload(); true")
        .await;
    cdp.wait_for(
        "the sign-in form",
        "document.readyState === 'complete' && !document.getElementById('signin').hidden",
    )
    .await;
    cdp.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('signin').requestSubmit(); true",
        json!(t.operator)
    ))
    .await;
    cdp.wait_for(
        "the audit log",
        "document.querySelectorAll('#audit tbody tr').length >= 2",
    )
    .await;
    let tenants = cdp.eval("[...document.querySelectorAll('#tenants tbody tr td:first-child')].map(td => td.textContent)").await;
    assert_eq!(tenants, json!(["acme", "globex"]));
    cdp.eval("document.getElementById('rules-yaml').value = 'domain: api\\ndescriptors:\\n  - key: k\\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\\n'; document.getElementById('validate').click(); true").await;
    cdp.wait_for(
        "the validation errors inline",
        "document.getElementById('rules-result').textContent.startsWith('rules.yaml: ')",
    )
    .await;
    let shot = cdp.screenshot("operator").await;
    eprintln!("screenshot: {}", shot.display());
    api.stop().await;
}

// === Property-based, from the OpenAPI document ===

/// `schemathesis run` against the document: every operation, generated
/// inputs (valid and not), no 5xx, and every response's status, content
/// type and body as the document says.
fn schemathesis(addr: SocketAddr, token: &str, exclude: &[&str]) -> Output {
    // It keeps a cache in its working directory: not in the repository.
    let scratch = tempfile::tempdir().unwrap();
    let mut command = Command::new(support::tool("schemathesis"));
    command
        .current_dir(scratch.path())
        .arg("run")
        .arg(format!("http://{addr}/admin/v1/openapi.json"))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--max-examples",
            "15",
            "--no-color",
        ]);
    for path in exclude {
        command.args(["--exclude-path", path]);
    }
    command.output().expect("running schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_document() {
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let api = Admin::start(&pg, 1_000_000).await;
    // The tenant first: the admin run may delete its tenant (and its token).
    // The admin run leaves token revocation out: it would revoke its own.
    for (who, token, exclude) in [
        ("tenant", t.acme.as_str(), &[][..]),
        (
            "admin",
            t.admin.as_str(),
            &["/admin/v1/tokens/{prefix}"][..],
        ),
    ] {
        let addr = api.addr;
        let token = token.to_owned();
        let exclude: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            let exclude: Vec<&str> = exclude.iter().map(String::as_str).collect();
            schemathesis(addr, &token, &exclude)
        })
        .await
        .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis as {who} failed:\n{report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(report.contains("passed"), "{report}");
        let summary = report
            .lines()
            .find(|l| l.contains("generated,"))
            .unwrap_or_default();
        eprintln!("schemathesis as {who}: {}", summary.trim());
    }
    api.stop().await;
}

// === OIDC ===

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A P-256 signing key and its JWKS entry, as an identity provider has.
struct Provider {
    key: rcgen::KeyPair,
    kid: &'static str,
}

impl Provider {
    fn new(kid: &'static str) -> Provider {
        Provider {
            key: rcgen::KeyPair::generate().unwrap(),
            kid,
        }
    }

    fn jwk(&self) -> Value {
        let point = self.key.public_key_raw(); // 0x04 || x || y
        assert_eq!(point.len(), 65);
        json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
               "x": base64url(&point[1..33]), "y": base64url(&point[33..])})
    }

    fn sign(&self, claims: Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.to_owned());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_signed_by_the_provider_map_a_claim_to_a_role() {
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let provider = Provider::new("k1");
    let stranger = Provider::new("k1"); // same kid, another key
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [provider.jwk()]}).to_string()).unwrap();
    let verifier = sluice::admin_api::oidc::OidcVerifier::from_jwks_file(
        &jwks,
        "https://id.example".into(),
        "sluice-admin".into(),
        "sluice_role".into(),
        "sluice_tenant".into(),
    )
    .unwrap();
    let api = Admin::start_with(&pg, 1000, Some(Arc::new(verifier))).await;
    let now = chrono::Utc::now().timestamp();
    let claims = |extra: Value| {
        let mut c = json!({"iss": "https://id.example", "aud": "sluice-admin", "sub": "alice",
                           "exp": now + 300, "sluice_role": "operator"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    let operator = provider.sign(claims(json!({})));
    let me = expect(
        &api.call("GET", "/admin/v1/whoami", Some(&operator), None)
            .await,
        200,
        None,
    );
    assert_eq!(
        (me["actor"].as_str(), me["role"].as_str()),
        (Some("oidc:alice"), Some("operator"))
    );
    expect(
        &api.call("GET", "/admin/v1/tokens", Some(&operator), None)
            .await,
        403,
        None,
    );
    let created = api
        .call(
            "POST",
            "/admin/v1/tenants",
            Some(&operator),
            Some(&json!({"name": "oidc-co", "plan": "free"})),
        )
        .await;
    expect(&created, 201, None);
    let audit = expect(
        &api.call("GET", "/admin/v1/audit", Some(&t.admin), None)
            .await,
        200,
        None,
    );
    assert_eq!(audit["items"][0]["actor"], "oidc:alice");

    let tenant = provider.sign(claims(
        json!({"sub": "bob", "sluice_role": "tenant", "sluice_tenant": "globex"}),
    ));
    expect(
        &api.call("GET", "/admin/v1/tenants/globex/usage", Some(&tenant), None)
            .await,
        200,
        None,
    );
    expect(
        &api.call("GET", "/admin/v1/tenants/acme/usage", Some(&tenant), None)
            .await,
        403,
        None,
    );
    expect(
        &api.call("GET", "/admin/v1/tenants", Some(&tenant), None)
            .await,
        403,
        None,
    );

    // Refused: another key, another issuer or audience, expired, no or a
    // bad role, a tenant role without a known tenant, an unsigned token.
    for (what, token) in [
        ("another key", stranger.sign(claims(json!({})))),
        (
            "another issuer",
            provider.sign(claims(json!({"iss": "https://evil.example"}))),
        ),
        (
            "another audience",
            provider.sign(claims(json!({"aud": "other"}))),
        ),
        ("expired", provider.sign(claims(json!({"exp": now - 600})))),
        (
            "no role",
            provider.sign(claims(json!({"sluice_role": null}))),
        ),
        (
            "a bad role",
            provider.sign(claims(json!({"sluice_role": "root"}))),
        ),
        (
            "no tenant",
            provider.sign(claims(json!({"sluice_role": "tenant"}))),
        ),
        (
            "an unknown tenant",
            provider.sign(claims(
                json!({"sluice_role": "tenant", "sluice_tenant": "nobody"}),
            )),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                base64url(br#"{"alg":"none","typ":"JWT"}"#),
                base64url(claims(json!({})).to_string().as_bytes())
            ),
        ),
    ] {
        let r = api
            .call("GET", "/admin/v1/whoami", Some(&token), None)
            .await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
    }
    // Admin tokens still work beside OIDC.
    expect(
        &api.call("GET", "/admin/v1/whoami", Some(&t.admin), None)
            .await,
        200,
        None,
    );
    api.stop().await;
}

/// Webhooks through the API: a tenant adds (secret shown once), lists (no
/// secret) and removes its own; it can neither see nor remove another
/// tenant's, by path or by id; bad URLs name the field; each change is
/// audited without the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_manage_their_own_webhooks_and_nobody_elses() {
    let pg = start_cluster();
    let t = issue_tokens(&pg);
    let api = Admin::start(&pg, 1000).await;
    let hooks = |tenant: &str| format!("/admin/v1/tenants/{tenant}/webhooks");

    let added = expect(
        &api.call(
            "POST",
            &hooks("acme"),
            Some(&t.acme),
            Some(&json!({"url": "https://hooks.acme.example/quota"})),
        )
        .await,
        201,
        None,
    );
    let id = added["id"].as_str().unwrap().to_owned();
    let secret = added["secret"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("whsec_") && secret.len() >= 32,
        "{added}"
    );
    // The operator adds one for globex.
    let other = expect(
        &api.call(
            "POST",
            &hooks("globex"),
            Some(&t.operator),
            Some(&json!({"url": "http://127.0.0.1:9/globex"})),
        )
        .await,
        201,
        None,
    );
    let other_id = other["id"].as_str().unwrap().to_owned();

    // Another scheme, no host, no scheme.
    for url in ["ftp://x/y", "https://", "hooks"] {
        expect(
            &api.call(
                "POST",
                &hooks("acme"),
                Some(&t.acme),
                Some(&json!({"url": url})),
            )
            .await,
            400,
            Some("url"),
        );
    }
    expect(
        &api.call(
            "POST",
            &hooks("acme"),
            Some(&t.acme),
            Some(&json!({"link": "https://x"})),
        )
        .await,
        400,
        None,
    );

    let listed = expect(
        &api.call("GET", &hooks("acme"), Some(&t.acme), None).await,
        200,
        None,
    );
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["url"], "https://hooks.acme.example/quota");
    assert!(!listed[0].to_string().contains(&secret), "a secret listed");

    // Another tenant's, by its path: forbidden; by its id under one's own
    // path: not found; nothing removed.
    expect(
        &api.call("GET", &hooks("globex"), Some(&t.acme), None).await,
        403,
        None,
    );
    expect(
        &api.call(
            "POST",
            &hooks("globex"),
            Some(&t.acme),
            Some(&json!({"url": "https://x.example"})),
        )
        .await,
        403,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            &format!("{}/{other_id}", hooks("globex")),
            Some(&t.acme),
            None,
        )
        .await,
        403,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            &format!("{}/{other_id}", hooks("acme")),
            Some(&t.acme),
            None,
        )
        .await,
        404,
        None,
    );
    expect(
        &api.call(
            "DELETE",
            &format!("{}/not-a-uuid", hooks("acme")),
            Some(&t.acme),
            None,
        )
        .await,
        400,
        Some("id"),
    );
    let globex = expect(
        &api.call("GET", &hooks("globex"), Some(&t.globex), None)
            .await,
        200,
        None,
    );
    assert_eq!(globex.as_array().unwrap().len(), 1, "{globex}");

    expect(
        &api.call(
            "DELETE",
            &format!("{}/{id}", hooks("acme")),
            Some(&t.acme),
            None,
        )
        .await,
        204,
        None,
    );
    let listed = expect(
        &api.call("GET", &hooks("acme"), Some(&t.acme), None).await,
        200,
        None,
    );
    assert_eq!(listed, json!([]));
    expect(
        &api.call(
            "DELETE",
            &format!("{}/{id}", hooks("acme")),
            Some(&t.acme),
            None,
        )
        .await,
        404,
        None,
    );

    // Audited: three changes, never the secret.
    let audit = expect(
        &api.call("GET", "/admin/v1/audit?limit=100", Some(&t.admin), None)
            .await,
        200,
        None,
    );
    let text = audit.to_string();
    assert!(!text.contains(&secret), "a secret in the audit log");
    let webhook_entries = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["object"]
                .as_str()
                .is_some_and(|o| o.contains("/webhook:"))
        })
        .count();
    assert_eq!(webhook_entries, 3, "{audit}");
    api.stop().await;
}
