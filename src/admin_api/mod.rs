//! The admin API (`sluice admin`): tenants, plans, API keys, rules, usage,
//! admin tokens and the audit log over HTTP(S) under `/admin/v1`, with its
//! OpenAPI 3.1 document at `/admin/v1/openapi.json` generated from the
//! handlers and types below (utoipa), and a small console at `/admin/`.
//!
//! It runs apart from the decision servers, on its own port, and changes
//! the catalog in PostgreSQL through [`crate::admin`]: every running
//! `sluice serve` sees a change through the catalog's NOTIFY, as it does a
//! CLI change.

pub mod auth;
pub mod error;
pub mod oidc;
pub mod routes;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt as _;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use utoipa::OpenApi;

use self::auth::{FailedAuthLimiter, Peer};
use self::error::ApiError;
use crate::limiter::KeyHasher;
use crate::listen::{Connection, Incoming};
use crate::task::OwnedTask;
use crate::tls::{self, TlsReloader};

/// The largest request body (a rule set's YAML inside JSON).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub pool: PgPool,
    /// The servers' `--key-secret` hasher: API keys and admin tokens are
    /// stored as its keyed hashes.
    pub hasher: KeyHasher,
    pub failures: Arc<FailedAuthLimiter>,
    /// Accept provider-signed JWTs as well as admin tokens.
    pub oidc: Option<Arc<oidc::OidcVerifier>>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "sluice admin API", description = "Tenants, plans, API keys, rules, usage, admin tokens and the audit log of sluice's catalog in PostgreSQL. Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`."),
    paths(
        routes::whoami,
        routes::list_tenants, routes::create_tenant, routes::get_tenant, routes::update_tenant,
        routes::delete_tenant,
        routes::list_plans, routes::create_plan, routes::update_plan,
        routes::list_keys, routes::issue_key, routes::revoke_key,
        routes::list_webhooks, routes::add_webhook, routes::remove_webhook,
        routes::usage, routes::violations, routes::top_rules,
        routes::list_rule_sets, routes::get_rule_set, routes::export_rule_set,
        routes::validate_rule_set, routes::put_rule_set,
        routes::list_tokens, routes::issue_token, routes::revoke_token,
        routes::audit_log,
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, as served.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

const CONSOLE_HTML: &str = include_str!("console.html");

pub fn router(state: AdminState) -> Router {
    use routes::*;
    let api = Router::new()
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .route("/whoami", get(whoami))
        .route("/tenants", get(list_tenants).post(create_tenant))
        .route(
            "/tenants/{tenant}",
            get(get_tenant).patch(update_tenant).delete(delete_tenant),
        )
        .route("/tenants/{tenant}/keys", get(list_keys).post(issue_key))
        .route(
            "/tenants/{tenant}/keys/{prefix}",
            axum::routing::delete(revoke_key),
        )
        .route(
            "/tenants/{tenant}/webhooks",
            get(list_webhooks).post(add_webhook),
        )
        .route(
            "/tenants/{tenant}/webhooks/{id}",
            axum::routing::delete(remove_webhook),
        )
        .route("/tenants/{tenant}/usage", get(usage))
        .route("/tenants/{tenant}/violations", get(violations))
        .route("/tenants/{tenant}/top-rules", get(top_rules))
        .route("/plans", get(list_plans).post(create_plan))
        .route("/plans/{plan}", axum::routing::patch(update_plan))
        .route("/rules", get(list_rule_sets))
        .route("/rules/validate", post(validate_rule_set))
        .route("/rules/{domain}", get(get_rule_set).put(put_rule_set))
        .route("/rules/{domain}/export", get(export_rule_set))
        .route("/tokens", get(list_tokens).post(issue_token))
        .route("/tokens/{prefix}", axum::routing::delete(revoke_token))
        .route("/audit", get(audit_log))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/admin/v1", api)
        .route("/admin/", get(console))
        .route(
            "/admin",
            get(|| async { axum::response::Redirect::permanent("/admin/") }),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn console() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        Html(CONSOLE_HTML),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

// === Serving ===

/// Serves the admin API on `listener` (TLS when `tls` is given) until
/// `shutdown` completes, then finishes the requests under way.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<TlsReloader>>,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<Peer>();
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(tls) => {
            let listener = TlsListener::new(listener, tls)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// TLS connections within the admin port's bounds (`tls::incoming_admin`).
pub struct TlsListener {
    connections: Incoming<Connection<TlsStream<TcpStream>>>,
    local: SocketAddr,
    _watch: OwnedTask,
}

impl TlsListener {
    fn new(listener: TcpListener, tls: Arc<TlsReloader>) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let watch = OwnedTask::spawn(tls.clone().watch(std::time::Duration::from_secs(5)));
        Ok(TlsListener {
            connections: tls::incoming_admin(listener, tls),
            local,
            _watch: watch,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Connection<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.connections.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.peer();
                    return (conn, peer);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "admin TLS connection failed"),
                // The accepting task never ends while the listener lives.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
