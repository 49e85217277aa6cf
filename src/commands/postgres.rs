//! The PostgreSQL subcommands: `migrate`, `rules apply|export`, `plans`,
//! `tenants`, `keys` and `usage`. Each connects to the primary, does one
//! thing, prints the result for a human and exits.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgPool, Row as _};

use crate::config::{
    DatabaseArgs, KeysCommand, PlansCommand, Quota, RulesCommand, ScopeArgs, Secret, TenantsCommand,
};
use crate::database;
use crate::limiter::KeyHasher;
use crate::rules::catalog::RuleScope;
use crate::rules::postgres::{export_rules, replace_rules};
use crate::rules::yaml;

async fn connect(db: &DatabaseArgs) -> anyhow::Result<PgPool> {
    database::connect(&db.database_url.0, db.database_password.as_ref()).await
}

fn scope(args: &ScopeArgs) -> RuleScope {
    match (&args.plan, &args.tenant) {
        (Some(p), _) => RuleScope::Plan(p.clone()),
        (None, Some(t)) => RuleScope::Tenant(t.clone()),
        (None, None) => RuleScope::Domain,
    }
}

/// `sluice migrate`.
pub async fn migrate(db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let applied = database::migrate(&pool).await.context("migrating")?;
    if applied.is_empty() {
        println!("schema up to date");
    } else {
        let versions: Vec<String> = applied.iter().map(i64::to_string).collect();
        println!("applied migrations: {}", versions.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice rules apply`: the validator's messages, exactly as `rules
/// validate` prints them; nothing is written unless every file is valid.
pub async fn rules_apply(
    path: &Path,
    scope_args: &ScopeArgs,
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let files = match yaml::load_files(path) {
        Ok((_, files)) => files,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    let pool = connect(db).await?;
    let scope = scope(scope_args);
    let written = replace_rules(&pool, &files, &scope).await?;
    for (domain, rows) in written {
        println!("applied {}: {rows} descriptors", scope.label(&domain));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice rules export`.
pub async fn rules_export(
    domain: &str,
    scope_args: &ScopeArgs,
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let scope = scope(scope_args);
    match export_rules(&pool, domain, &scope).await? {
        Some(root) => {
            print!(
                "{}",
                serde_yaml_ng::to_string(&root).context("writing YAML")?
            );
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("no rules for {} in PostgreSQL", scope.label(domain));
            Ok(ExitCode::from(1))
        }
    }
}

/// `sluice plans list`.
pub async fn plans_list(db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let rows = sqlx::query(
        "SELECT p.name, p.monthly_quota, count(t.id) AS tenants
         FROM plans p LEFT JOIN tenants t ON t.plan = p.name
         GROUP BY p.name, p.monthly_quota ORDER BY p.monthly_quota NULLS LAST, p.name",
    )
    .fetch_all(&pool)
    .await?;
    let mut out = format!("{:<16} {:>14} {:>8}\n", "PLAN", "MONTHLY_QUOTA", "TENANTS");
    for r in rows {
        let quota: Option<i64> = r.try_get("monthly_quota")?;
        let _ = writeln!(
            out,
            "{:<16} {:>14} {:>8}",
            r.try_get::<String, _>("name")?,
            quota.map_or_else(|| "none".to_owned(), |q| q.to_string()),
            r.try_get::<i64, _>("tenants")?
        );
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `sluice plans set`.
pub async fn plans_set(name: &str, quota: Quota, db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let quota = match quota {
        Quota::None => None,
        Quota::Requests(n) => Some(i64::from(n)),
    };
    sqlx::query(
        "INSERT INTO plans (name, monthly_quota) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET monthly_quota = EXCLUDED.monthly_quota",
    )
    .bind(name)
    .bind(quota)
    .execute(&pool)
    .await
    .with_context(|| format!("setting plan '{name}'"))?;
    println!(
        "plan {name}: monthly quota {}",
        quota.map_or("none".into(), |q| q.to_string())
    );
    Ok(ExitCode::SUCCESS)
}

async fn plan_exists(pool: &PgPool, plan: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM plans WHERE name = $1")
        .bind(plan)
        .fetch_optional(pool)
        .await?
        .is_some())
}

/// `sluice tenants create`.
pub async fn tenants_create(name: &str, plan: &str, db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    if !plan_exists(&pool, plan).await? {
        anyhow::bail!("there is no plan named '{plan}' (see `sluice plans list`)");
    }
    let id: String =
        sqlx::query_scalar("INSERT INTO tenants (name, plan) VALUES ($1, $2) RETURNING id::text")
            .bind(name)
            .bind(plan)
            .fetch_one(&pool)
            .await
            .map_err(|e| match unique_violation(&e) {
                true => anyhow::anyhow!("a tenant named '{name}' already exists"),
                false => anyhow::Error::new(e).context(format!("creating tenant '{name}'")),
            })?;
    println!("created tenant {name} ({id}) on plan {plan}");
    Ok(ExitCode::SUCCESS)
}

/// `sluice tenants list`.
pub async fn tenants_list(db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let rows = sqlx::query(
        "SELECT t.name, t.plan, t.created_at,
                count(k.id) FILTER (WHERE k.revoked_at IS NULL) AS live_keys
         FROM tenants t LEFT JOIN api_keys k ON k.tenant_id = t.id
         GROUP BY t.id ORDER BY t.name",
    )
    .fetch_all(&pool)
    .await?;
    let mut out = format!(
        "{:<24} {:<16} {:>9} {}\n",
        "TENANT", "PLAN", "LIVE_KEYS", "CREATED"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:>9} {}",
            r.try_get::<String, _>("name")?,
            r.try_get::<String, _>("plan")?,
            r.try_get::<i64, _>("live_keys")?,
            time(r.try_get("created_at")?)
        );
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// A new raw key, `slk_<8 hex>_<48 hex>` (192 random bits after the
/// prefix), and its display prefix `slk_<8 hex>`.
fn new_key() -> anyhow::Result<(String, String)> {
    let mut bytes = [0u8; 28];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("OS random source failed: {e}"))?;
    let hex = |b: &[u8]| {
        b.iter().fold(String::new(), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
    };
    let prefix = format!("slk_{}", hex(&bytes[..4]));
    let raw = format!("{prefix}_{}", hex(&bytes[4..]));
    Ok((raw, prefix))
}

/// `sluice keys issue`: prints the raw key (only it) on stdout, once.
pub async fn keys_issue(
    tenant: &str,
    plan: Option<&str>,
    secret: &Secret,
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    if let Some(plan) = plan {
        if !plan_exists(&pool, plan).await? {
            anyhow::bail!("there is no plan named '{plan}' (see `sluice plans list`)");
        }
    }
    let hasher = KeyHasher::from_secret(secret.0.as_bytes());
    // A display prefix can collide (32 bits); draw again then.
    for _ in 0..5 {
        let (raw, prefix) = new_key()?;
        let inserted = sqlx::query(
            "INSERT INTO api_keys (key_hash, prefix, tenant_id, plan)
             SELECT $1, $2, t.id, $4 FROM tenants t WHERE t.name = $3",
        )
        .bind(hasher.api_key(&raw))
        .bind(&prefix)
        .bind(tenant)
        .bind(plan)
        .execute(&pool)
        .await;
        match inserted {
            Ok(r) if r.rows_affected() == 0 => {
                anyhow::bail!("there is no tenant named '{tenant}'")
            }
            Ok(_) => {
                println!("{raw}");
                eprintln!(
                    "issued key {prefix} for tenant {tenant}; this is the only time it is shown"
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) if unique_violation(&e) => continue,
            Err(e) => return Err(anyhow::Error::new(e).context("issuing a key")),
        }
    }
    anyhow::bail!("could not draw an unused key prefix")
}

/// `sluice keys revoke`.
pub async fn keys_revoke(prefix: &str, db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
    )
    .bind(prefix)
    .execute(&pool)
    .await?
    .rows_affected();
    if revoked == 1 {
        println!("revoked {prefix}");
        return Ok(ExitCode::SUCCESS);
    }
    let known = sqlx::query("SELECT 1 FROM api_keys WHERE prefix = $1")
        .bind(prefix)
        .fetch_optional(&pool)
        .await?
        .is_some();
    if known {
        println!("{prefix} was already revoked");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("no key with prefix '{prefix}'");
        Ok(ExitCode::from(1))
    }
}

/// `sluice keys list`: prefixes only; the keys themselves are not stored.
pub async fn keys_list(tenant: &str, db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let tenant_plan: Option<String> =
        sqlx::query_scalar("SELECT plan FROM tenants WHERE name = $1")
            .bind(tenant)
            .fetch_optional(&pool)
            .await?;
    let Some(tenant_plan) = tenant_plan else {
        anyhow::bail!("there is no tenant named '{tenant}'");
    };
    let rows = sqlx::query(
        "SELECT k.prefix, k.plan, k.created_at, k.revoked_at
         FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
         WHERE t.name = $1 ORDER BY k.created_at, k.prefix",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await?;
    let mut out = format!(
        "{:<14} {:<16} {:<19} {}\n",
        "PREFIX", "PLAN", "CREATED", "REVOKED"
    );
    for r in rows {
        let plan: Option<String> = r.try_get("plan")?;
        let revoked: Option<DateTime<Utc>> = r.try_get("revoked_at")?;
        let _ = writeln!(
            out,
            "{:<14} {:<16} {:<19} {}",
            r.try_get::<String, _>("prefix")?,
            plan.unwrap_or_else(|| format!("({tenant_plan})")),
            time(r.try_get("created_at")?),
            revoked.map_or_else(|| "-".to_owned(), time)
        );
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `sluice usage`: allowed and denied requests per domain in a calendar
/// month (UTC), summed over all instances' hourly rows.
pub async fn usage(
    tenant: &str,
    (year, month): (i32, u32),
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let start = NaiveDate::from_ymd_opt(year, month, 1).context("invalid month")?;
    let end = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    }
    .context("invalid month")?;
    let at = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    let pool = connect(db).await?;
    let exists = sqlx::query("SELECT 1 FROM tenants WHERE name = $1")
        .bind(tenant)
        .fetch_optional(&pool)
        .await?
        .is_some();
    if !exists {
        anyhow::bail!("there is no tenant named '{tenant}'");
    }
    let rows = sqlx::query(
        "SELECT u.domain, sum(u.allowed)::int8 AS allowed, sum(u.denied)::int8 AS denied
         FROM usage_hourly u JOIN tenants t ON t.id = u.tenant_id
         WHERE t.name = $1 AND u.hour >= $2 AND u.hour < $3
         GROUP BY u.domain ORDER BY u.domain",
    )
    .bind(tenant)
    .bind(at(start))
    .bind(at(end))
    .fetch_all(&pool)
    .await?;
    let mut out = format!("{:<32} {:>12} {:>12}\n", "DOMAIN", "ALLOWED", "DENIED");
    let (mut all_allowed, mut all_denied) = (0i64, 0i64);
    for r in rows {
        let (allowed, denied): (i64, i64) = (r.try_get("allowed")?, r.try_get("denied")?);
        all_allowed += allowed;
        all_denied += denied;
        let _ = writeln!(
            out,
            "{:<32} {:>12} {:>12}",
            r.try_get::<String, _>("domain")?,
            allowed,
            denied
        );
    }
    let _ = writeln!(
        out,
        "{:<32} {:>12} {:>12}",
        "total", all_allowed, all_denied
    );
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

// === Dispatch from `main` ===

/// `sluice rules apply|export` (`validate` needs no database).
pub async fn rules(command: RulesCommand) -> anyhow::Result<ExitCode> {
    match command {
        RulesCommand::Validate { path } => Ok(super::validate(&path)),
        RulesCommand::Apply {
            path,
            scope,
            database,
        } => rules_apply(&path, &scope, &database).await,
        RulesCommand::Export {
            domain,
            scope,
            database,
        } => rules_export(&domain, &scope, &database).await,
    }
}

pub async fn plans(command: PlansCommand) -> anyhow::Result<ExitCode> {
    match command {
        PlansCommand::List(database) => plans_list(&database).await,
        PlansCommand::Set {
            name,
            monthly_quota,
            database,
        } => plans_set(&name, monthly_quota, &database).await,
    }
}

pub async fn tenants(command: TenantsCommand) -> anyhow::Result<ExitCode> {
    match command {
        TenantsCommand::Create {
            name,
            plan,
            database,
        } => tenants_create(&name, &plan, &database).await,
        TenantsCommand::List(database) => tenants_list(&database).await,
    }
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Issue {
            tenant,
            plan,
            key_secret,
            database,
        } => keys_issue(&tenant, plan.as_deref(), &key_secret, &database).await,
        KeysCommand::Revoke { prefix, database } => keys_revoke(&prefix, &database).await,
        KeysCommand::List { tenant, database } => keys_list(&tenant, &database).await,
    }
}
