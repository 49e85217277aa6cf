//! `sluice admin` (the admin API server) and `sluice admin-tokens`.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::admin::tokens::{self, Role};
use crate::admin::Revocation;
use crate::admin_api::auth::FailedAuthLimiter;
use crate::admin_api::oidc::OidcVerifier;
use crate::admin_api::{self, AdminState};
use crate::clock::SystemClock;
use crate::config::{AdminArgs, AdminTokensCommand, DatabaseArgs};
use crate::database;
use crate::limiter::KeyHasher;
use crate::tls::{TlsFiles, TlsReloader};

/// `sluice admin`: serves until SIGTERM or Ctrl-C.
pub async fn serve(
    args: AdminArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<ExitCode> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            TlsReloader::new(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })
            .context("loading the admin API's TLS certificates")?,
        ),
        _ => None,
    };
    let pool = database::connect(
        &args.database.database_url.0,
        args.database.database_password.as_ref(),
    )
    .await?;
    let oidc = match (&args.oidc_issuer, &args.oidc_audience, &args.oidc_jwks) {
        (Some(issuer), Some(audience), Some(jwks)) => Some(Arc::new(
            OidcVerifier::from_jwks_file(
                jwks,
                issuer.clone(),
                audience.clone(),
                args.oidc_role_claim.clone(),
                args.oidc_tenant_claim.clone(),
            )
            .map_err(anyhow::Error::msg)
            .context("--oidc-jwks")?,
        )),
        _ => None,
    };
    let state = AdminState {
        pool,
        hasher: KeyHasher::from_secret(args.key_secret.0.as_bytes()),
        failures: Arc::new(FailedAuthLimiter::new(
            args.auth_failures.get(),
            args.auth_failure_window,
            Arc::new(SystemClock),
        )),
        oidc,
    };
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding the admin API to {}", args.addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        "sluice admin API serving on {}://{addr}/admin/v1",
        if tls.is_some() { "https" } else { "http" }
    );
    admin_api::serve(listener, tls, state, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `sluice admin-tokens ...`.
pub async fn tokens(command: AdminTokensCommand) -> anyhow::Result<ExitCode> {
    match command {
        AdminTokensCommand::Issue {
            role,
            tenant,
            expires,
            description,
            key_secret,
            database,
        } => {
            let role = Role::parse(&role).context("--role")?;
            match (role, &tenant) {
                (Role::Tenant, None) => anyhow::bail!("--role tenant needs --tenant"),
                (Role::Admin | Role::Operator, Some(_)) => {
                    anyhow::bail!("--tenant is only for --role tenant")
                }
                _ => {}
            }
            let expires_at = expires
                .map(|d| chrono::Duration::from_std(d).map(|d| chrono::Utc::now() + d))
                .transpose()
                .context("--expires is too long")?;
            let pool = connect(&database).await?;
            let hasher = KeyHasher::from_secret(key_secret.0.as_bytes());
            let token = tokens::issue(
                &pool,
                &hasher,
                role,
                tenant.as_deref(),
                expires_at,
                &description,
            )
            .await?;
            println!("{}", token.token);
            eprintln!(
                "issued {} token {}; this is the only time it is shown",
                role.as_str(),
                token.prefix
            );
            Ok(ExitCode::SUCCESS)
        }
        AdminTokensCommand::List(database) => {
            let pool = connect(&database).await?;
            let mut out = format!(
                "{:<13} {:<9} {:<20} {:<20} {:<20} {}\n",
                "PREFIX", "ROLE", "TENANT", "EXPIRES", "REVOKED", "DESCRIPTION"
            );
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                )
            };
            for t in tokens::list(&pool).await? {
                let _ = writeln!(
                    out,
                    "{:<13} {:<9} {:<20} {:<20} {:<20} {}",
                    t.prefix,
                    t.role,
                    t.tenant.as_deref().unwrap_or("-"),
                    time(t.expires_at),
                    time(t.revoked_at),
                    t.description
                );
            }
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        AdminTokensCommand::Revoke { prefix, database } => {
            let pool = connect(&database).await?;
            match tokens::revoke(&pool, &prefix).await? {
                Revocation::Revoked => println!("revoked {prefix}"),
                Revocation::AlreadyRevoked => println!("{prefix} was already revoked"),
                Revocation::NoSuchKey => {
                    eprintln!("no admin token with prefix {prefix}");
                    return Ok(ExitCode::from(1));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn connect(db: &DatabaseArgs) -> anyhow::Result<sqlx::PgPool> {
    database::connect(&db.database_url.0, db.database_password.as_ref()).await
}
