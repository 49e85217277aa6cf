//! The PostgreSQL subcommands: `migrate`, `rules apply|export`, `plans`,
//! `tenants`, `keys` and `usage`. Each connects to the primary, does one
//! thing through `admin`, prints the result for a human and exits.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::admin::{self, AdminError, Revocation};
use crate::config::{
    BillingArgs, DatabaseArgs, KeysCommand, Overage, PlansCommand, Quota, RulesCommand, ScopeArgs,
    Secret, TenantsCommand, WebhooksCommand,
};
use crate::database;
use crate::limiter::KeyHasher;
use crate::rules::catalog::{check_storable, RuleScope};
use crate::rules::yaml;
use crate::rules::RuleErrors;

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
    let loaded = yaml::load_files(path).and_then(|(_, files)| {
        let unstorable: Vec<_> = files
            .iter()
            .filter_map(|(file, root)| check_storable(file, root).err())
            .flat_map(|e| e.0)
            .collect();
        if unstorable.is_empty() {
            Ok(files)
        } else {
            Err(RuleErrors(unstorable))
        }
    });
    let files = match loaded {
        Ok(files) => files,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    let pool = connect(db).await?;
    let scope = scope(scope_args);
    let written = admin::replace_rules(&pool, &files, &scope, None).await?;
    for set in written {
        println!(
            "applied {}: {} descriptors (version {})",
            scope.label(&set.domain),
            set.descriptors,
            set.version
        );
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
    match admin::export_rules(&pool, domain, &scope).await? {
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
    let mut out = format!("{:<16} {:>14} {:>8}\n", "PLAN", "MONTHLY_QUOTA", "TENANTS");
    for plan in admin::list_plans(&pool).await? {
        let _ = writeln!(
            out,
            "{:<16} {:>14} {:>8}",
            plan.name,
            plan.monthly_quota
                .map_or_else(|| "none".to_owned(), |q| q.to_string()),
            plan.tenants
        );
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `sluice plans set`.
pub async fn plans_set(
    name: &str,
    quota: Quota,
    price_cents: Option<u32>,
    overage: Option<Overage>,
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let quota = match quota {
        Quota::None => None,
        Quota::Requests(n) => Some(i64::from(n)),
    };
    admin::set_plan(&pool, name, quota)
        .await
        .with_context(|| format!("setting plan '{name}'"))?;
    let overage = overage.map(|o| match o {
        Overage::None => None,
        Overage::CentsPer1000(c) => Some(i64::from(c)),
    });
    if price_cents.is_some() || overage.is_some() {
        let change = admin::PlanUpdate {
            monthly_price_cents: price_cents.map(|c| Some(i64::from(c))),
            overage_cents_per_1000: overage,
            ..Default::default()
        };
        admin::update_plan(&pool, name, change)
            .await
            .with_context(|| format!("setting plan '{name}' prices"))?;
    }
    println!(
        "plan {name}: monthly quota {}",
        quota.map_or("none".into(), |q| q.to_string())
    );
    Ok(ExitCode::SUCCESS)
}

/// A failure, with what to do about a missing plan, and what was being done
/// when the database failed.
fn explained(e: AdminError, doing: impl FnOnce() -> String) -> anyhow::Error {
    match e {
        AdminError::NoSuchPlan(_) => anyhow::anyhow!("{e} (see `sluice plans list`)"),
        AdminError::Database(_) => anyhow::Error::new(e).context(doing()),
        e => e.into(),
    }
}

/// `sluice tenants create`.
pub async fn tenants_create(
    name: &str,
    plan: &str,
    time_zone: chrono_tz::Tz,
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let id = admin::create_tenant_in(&pool, name, plan, time_zone)
        .await
        .map_err(|e| explained(e, || format!("creating tenant '{name}'")))?;
    println!("created tenant {name} ({id}) on plan {plan}, billing cycles in {time_zone}");
    Ok(ExitCode::SUCCESS)
}

/// `sluice tenants list`.
pub async fn tenants_list(db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let mut out = format!(
        "{:<24} {:<16} {:>9} {}\n",
        "TENANT", "PLAN", "LIVE_KEYS", "CREATED"
    );
    for t in admin::list_tenants(&pool).await? {
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:>9} {}",
            t.name,
            t.plan,
            t.live_keys,
            time(t.created_at)
        );
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `sluice keys issue`: prints the raw key (only it) on stdout, once.
pub async fn keys_issue(
    tenant: &str,
    plan: Option<&str>,
    secret: &Secret,
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let hasher = KeyHasher::from_secret(secret.0.as_bytes());
    let key = admin::issue_key(&pool, &hasher, tenant, plan)
        .await
        .map_err(|e| explained(e, || "issuing a key".to_owned()))?;
    println!("{}", key.raw);
    eprintln!(
        "issued key {} for tenant {tenant}; this is the only time it is shown",
        key.prefix
    );
    Ok(ExitCode::SUCCESS)
}

/// `sluice keys revoke`.
pub async fn keys_revoke(prefix: &str, db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    match admin::revoke_key(&pool, prefix).await? {
        Revocation::Revoked => println!("revoked {prefix}"),
        Revocation::AlreadyRevoked => println!("{prefix} was already revoked"),
        Revocation::NoSuchKey => {
            eprintln!("no key with prefix '{prefix}'");
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice keys list`: prefixes only; the keys themselves are not stored.
pub async fn keys_list(tenant: &str, db: &DatabaseArgs) -> anyhow::Result<ExitCode> {
    let pool = connect(db).await?;
    let listed = admin::list_keys(&pool, tenant).await?;
    let mut out = format!(
        "{:<14} {:<16} {:<19} {}\n",
        "PREFIX", "PLAN", "CREATED", "REVOKED"
    );
    for k in listed.keys {
        let _ = writeln!(
            out,
            "{:<14} {:<16} {:<19} {}",
            k.prefix,
            k.plan
                .unwrap_or_else(|| format!("({})", listed.tenant_plan)),
            time(k.created_at),
            k.revoked_at.map_or_else(|| "-".to_owned(), time)
        );
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `sluice usage`: allowed and denied requests per domain in a billing
/// cycle (the calendar month in the tenant's time zone).
pub async fn usage(
    tenant: &str,
    (year, month): (i32, u32),
    db: &DatabaseArgs,
) -> anyhow::Result<ExitCode> {
    let cycle = admin::cycle(year, month)?;
    let pool = connect(db).await?;
    let mut out = format!("{:<32} {:>12} {:>12}\n", "DOMAIN", "ALLOWED", "DENIED");
    let (mut all_allowed, mut all_denied) = (0i64, 0i64);
    for u in admin::usage(&pool, tenant, cycle).await? {
        all_allowed += u.allowed;
        all_denied += u.denied;
        let _ = writeln!(out, "{:<32} {:>12} {:>12}", u.domain, u.allowed, u.denied);
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
            price_cents,
            overage_cents_per_1000,
            database,
        } => {
            plans_set(
                &name,
                monthly_quota,
                price_cents,
                overage_cents_per_1000,
                &database,
            )
            .await
        }
    }
}

pub async fn tenants(command: TenantsCommand) -> anyhow::Result<ExitCode> {
    match command {
        TenantsCommand::Create {
            name,
            plan,
            time_zone,
            database,
        } => tenants_create(&name, &plan, time_zone, &database).await,
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

pub async fn webhooks(command: WebhooksCommand) -> anyhow::Result<ExitCode> {
    match command {
        WebhooksCommand::Add {
            tenant,
            url,
            database,
        } => {
            let pool = connect(&database).await?;
            let hook = admin::add_webhook(&pool, &tenant, &url)
                .await
                .map_err(|e| explained(e, || format!("adding a webhook to '{tenant}'")))?;
            println!("webhook {} for {tenant}: {url}", hook.id);
            println!("signing secret (shown once): {}", hook.secret);
        }
        WebhooksCommand::List { tenant, database } => {
            let pool = connect(&database).await?;
            let mut out = format!(
                "{:<36} {:>9} {:>7} {:>6} {:>4} {}\n",
                "ID", "DELIVERED", "PENDING", "FAILED", "LAST", "URL"
            );
            for w in admin::list_webhooks(&pool, &tenant).await? {
                let last = w.last_status.map_or("-".into(), |s| s.to_string());
                let _ = writeln!(
                    out,
                    "{:<36} {:>9} {:>7} {:>6} {:>4} {}",
                    w.id, w.delivered, w.pending, w.failed, last, w.url
                );
            }
            print!("{out}");
        }
        WebhooksCommand::Remove { id, database } => {
            let pool = connect(&database).await?;
            admin::remove_webhook(&pool, id).await?;
            println!("removed webhook {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice billing`: a cycle's invoice lines, or its count so far.
pub async fn billing(args: &BillingArgs) -> anyhow::Result<ExitCode> {
    let (year, month) = args.cycle;
    let cycle = admin::cycle(year, month)?;
    let pool = connect(&args.database).await?;
    let cents = |c: i64| format!("{}.{:02}", c / 100, c % 100);
    match admin::invoice(&pool, &args.tenant, cycle).await? {
        admin::Invoice::Open { requests } => {
            println!(
                "{} {year}-{month:02}: open (not invoiced yet); {requests} requests counted so far",
                args.tenant
            );
        }
        admin::Invoice::Closed {
            plan,
            requests,
            total_cents,
            lines,
        } => {
            let mut out = format!(
                "{} {year}-{month:02}: plan {plan}, {requests} requests\n{:<14} {:>12} {:>12} {:>12}  {}\n",
                args.tenant, "KIND", "QUANTITY", "UNIT_PRICE", "AMOUNT", "DESCRIPTION"
            );
            for l in lines {
                let _ = writeln!(
                    out,
                    "{:<14} {:>12} {:>12} {:>12}  {}",
                    l.kind,
                    l.quantity,
                    cents(l.unit_price_cents),
                    cents(l.amount_cents),
                    l.description
                );
            }
            let _ = writeln!(
                out,
                "{:<14} {:>12} {:>12} {:>12}",
                "total",
                "",
                "",
                cents(total_cents)
            );
            print!("{out}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
