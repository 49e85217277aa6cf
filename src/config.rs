//! The command line. Every `serve` flag also reads a `SLUICE_*` environment
//! variable (flag > env > default), so Helm values become env vars. Values
//! are parsed into types and checked before any port is bound.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::limiter::Algorithm;
pub use crate::secret::{redact_url, Secret};
use crate::service::{FailureMode, UnknownKey};
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "A rate-limit decision service for Envoy and Kong"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC and HTTP servers.
    Serve(Box<ServeArgs>),
    /// Ask a running sluice for a decision and print it.
    Check(CheckArgs),
    /// Ask a running sluice why it would decide what it would: which rule
    /// matches and how, the counters' state, the answer. Counts nothing.
    Explain(ExplainArgs),
    /// Work with rule files, and with rules in PostgreSQL.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Create or upgrade the PostgreSQL schema (idempotent).
    Migrate(DatabaseArgs),
    /// Plans and their monthly quotas, in PostgreSQL.
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Tenants, in PostgreSQL.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// API keys, stored in PostgreSQL only as keyed hashes.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// A tenant's allowed and denied requests per domain in one billing
    /// cycle (a calendar month in the tenant's time zone).
    Usage(UsageArgs),
    /// Consume events from the broker (--events-url) into PostgreSQL.
    #[command(subcommand)]
    Consume(ConsumeCommand),
    /// A tenant's webhooks (quota alerts are POSTed to them, signed).
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// A tenant's invoice lines for one billing cycle.
    Billing(BillingArgs),
    /// Serve the admin API and console (tenants, plans, keys, rules, usage,
    /// audit log) on their own port, apart from the decision servers.
    Admin(Box<AdminArgs>),
    /// Tokens for the admin API, stored in PostgreSQL only as keyed hashes.
    #[command(subcommand)]
    AdminTokens(AdminTokensCommand),
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Where the admin API listens; loopback by default, so exposing it is
    /// a decision (with --tls-cert).
    #[arg(long, env = "SLUICE_ADMIN_ADDR", default_value = "127.0.0.1:8090")]
    pub addr: SocketAddr,
    /// The secret the servers hash API keys with (their --key-secret);
    /// admin tokens are hashed with it too.
    #[arg(long, env = "SLUICE_KEY_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub key_secret: Secret,
    /// Serve HTTPS with this certificate chain (PEM); reloaded on change.
    #[arg(long, env = "SLUICE_ADMIN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --tls-cert.
    #[arg(long, env = "SLUICE_ADMIN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "SLUICE_ADMIN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Failed sign-ins a source address may make per --auth-failure-window
    /// before it is refused (429) without its token being checked.
    #[arg(long, env = "SLUICE_ADMIN_AUTH_FAILURES", default_value = "10")]
    pub auth_failures: std::num::NonZeroU32,
    #[arg(long, env = "SLUICE_ADMIN_AUTH_FAILURE_WINDOW", default_value = "1m", value_parser = parse_window)]
    pub auth_failure_window: Duration,
    /// Also accept JWTs from this OIDC issuer (`iss`), checked against
    /// --oidc-jwks, for --oidc-audience.
    #[arg(long, env = "SLUICE_ADMIN_OIDC_ISSUER", requires_all = ["oidc_audience", "oidc_jwks"])]
    pub oidc_issuer: Option<String>,
    #[arg(long, env = "SLUICE_ADMIN_OIDC_AUDIENCE", requires = "oidc_issuer")]
    pub oidc_audience: Option<String>,
    /// The provider's signing keys, a JWKS file (read at start-up).
    #[arg(long, env = "SLUICE_ADMIN_OIDC_JWKS", requires = "oidc_issuer")]
    pub oidc_jwks: Option<PathBuf>,
    /// The claim naming the role: admin, operator or tenant.
    #[arg(
        long,
        env = "SLUICE_ADMIN_OIDC_ROLE_CLAIM",
        default_value = "sluice_role"
    )]
    pub oidc_role_claim: String,
    /// The claim naming a tenant role's tenant.
    #[arg(
        long,
        env = "SLUICE_ADMIN_OIDC_TENANT_CLAIM",
        default_value = "sluice_tenant"
    )]
    pub oidc_tenant_claim: String,
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_parser = choice(LOG_FORMAT), default_value = "text")]
    pub log_format: LogFormat,
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(86_400) {
        return Err("expected from 1s to 24h".into());
    }
    Ok(d)
}

#[derive(Debug, Subcommand)]
pub enum AdminTokensCommand {
    /// Issue a token: print it once; only its keyed hash is stored.
    Issue {
        /// admin (everything), operator (all but tokens) or tenant (its own
        /// tenant: usage, violations, API keys).
        #[arg(long, value_parser = ["admin", "operator", "tenant"])]
        role: String,
        /// The tenant of a `tenant` token.
        #[arg(long)]
        tenant: Option<String>,
        /// Expire the token after this long, e.g. 90d; default: never.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// What the token is for, shown in lists.
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, env = "SLUICE_KEY_SECRET", value_parser = parse_secret, hide_env_values = true)]
        key_secret: Secret,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List tokens by prefix.
    List(DatabaseArgs),
    /// Revoke a token by its prefix.
    Revoke {
        prefix: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsumeCommand {
    /// `usage` and `rate-limit-violations` events into the usage and
    /// violations tables (what `sluice usage` reports); runs until SIGTERM.
    Usage(ConsumeArgs),
    /// `usage` events into each tenant's cycle total: 80, 90 and 100 % of
    /// the monthly quota raise one `quota-alerts` event each per cycle,
    /// POSTed, signed, to the tenant's webhooks; runs until SIGTERM.
    Alerts(AlertsArgs),
    /// `usage` events into each tenant's cycle total; a closed cycle
    /// becomes invoice lines and a `billing` event; runs until SIGTERM.
    Billing(BillingConsumeArgs),
}

impl ConsumeCommand {
    /// The flags every consumer has.
    pub fn common(&self) -> &ConsumeArgs {
        match self {
            ConsumeCommand::Usage(args) => args,
            ConsumeCommand::Alerts(args) => &args.common,
            ConsumeCommand::Billing(args) => &args.common,
        }
    }
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    #[command(flatten)]
    pub common: ConsumeArgs,
    /// How long a webhook delivery is retried before it is marked failed.
    #[arg(long, env = "SLUICE_WEBHOOK_RETRY_FOR", default_value = "24h", value_parser = humantime::parse_duration)]
    pub webhook_retry_for: Duration,
    /// The first retry's delay; each next doubles (jittered) up to --webhook-max-backoff.
    #[arg(long, env = "SLUICE_WEBHOOK_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub webhook_backoff: Duration,
    #[arg(long, env = "SLUICE_WEBHOOK_MAX_BACKOFF", default_value = "10m", value_parser = humantime::parse_duration)]
    pub webhook_max_backoff: Duration,
    /// One delivery attempt's bound.
    #[arg(long, env = "SLUICE_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct BillingConsumeArgs {
    #[command(flatten)]
    pub common: ConsumeArgs,
    /// How long after a cycle ends (in the tenant's zone) its invoice is
    /// written: late usage events within it still count.
    #[arg(long, env = "SLUICE_BILLING_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How often ended cycles are looked for.
    #[arg(long, env = "SLUICE_BILLING_CLOSE_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub close_every: Duration,
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Add a webhook; prints its id and signing secret (shown once).
    Add {
        #[arg(long)]
        tenant: String,
        /// http:// or https:// URL receiving POSTed events.
        #[arg(long)]
        url: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List a tenant's webhooks and their deliveries.
    List {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Remove a webhook by id.
    Remove {
        id: uuid::Uuid,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Args)]
pub struct BillingArgs {
    #[arg(long)]
    pub tenant: String,
    /// The cycle, e.g. 2026-11 (the calendar month in the tenant's zone).
    #[arg(long, value_parser = parse_month)]
    pub cycle: (i32, u32),
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The broker, e.g. amqp://guest:guest@127.0.0.1:5672/%2f.
    #[arg(long, env = "SLUICE_EVENTS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub events_url: Secret,
    /// Prefix of the exchange and queue names (as given to `serve`).
    #[arg(long, env = "SLUICE_EVENTS_PREFIX", default_value = "")]
    pub events_prefix: String,
    /// Deliveries held unacknowledged at once; the largest transaction.
    #[arg(long, env = "SLUICE_CONSUME_PREFETCH", default_value = "500")]
    pub prefetch: std::num::NonZeroU16,
    /// How long a batch waits for more deliveries after its first.
    #[arg(long, env = "SLUICE_CONSUME_BATCH_WAIT", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub batch_wait: Duration,
    /// This consumer's name in the events it makes (default: the host name).
    #[arg(long, env = "SLUICE_INSTANCE", default_value_t = host_name())]
    pub instance: String,
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Check a rules file or directory; print every error as `FILE: message`.
    Validate {
        /// A YAML file or a directory of them.
        path: PathBuf,
    },
    /// Validate rule files as `validate` does, then replace each of their
    /// domains' rules in PostgreSQL, all in one transaction.
    Apply {
        /// A YAML file or a directory of them.
        path: PathBuf,
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Print a domain's rules from PostgreSQL as YAML.
    Export {
        #[arg(long)]
        domain: String,
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// Whose rules: the domain's (default), or those replacing them for the
/// keys of one plan or one tenant.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct ScopeArgs {
    /// The rules for the API keys of this plan.
    #[arg(long)]
    pub plan: Option<String>,
    /// The rules for the API keys of this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
}

/// Where PostgreSQL is, for the one-shot commands.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL (the primary), e.g. postgres://sluice@db:5432/sluice.
    #[arg(long, env = "SLUICE_DATABASE_URL", value_parser = parse_database_url)]
    pub database_url: DatabaseUrl,
    /// Password, overriding any in the URL (from a Secret).
    #[arg(long, env = "SLUICE_DATABASE_PASSWORD", value_parser = parse_secret, hide_env_values = true)]
    pub database_password: Option<Secret>,
}

#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// List plans and their quotas.
    List(DatabaseArgs),
    /// Create a plan or change its monthly quota and prices.
    Set {
        name: String,
        /// Requests per billing cycle (a calendar month in the tenant's time
        /// zone) for each tenant on the plan; `none` for no quota.
        #[arg(long, value_parser = parse_quota)]
        monthly_quota: Quota,
        /// The plan's price per cycle, in cents (kept when not given).
        #[arg(long)]
        price_cents: Option<u32>,
        /// Price per 1 000 requests over the quota, in cents: the quota
        /// becomes soft (requests over it are allowed and billed); `none`:
        /// a hard quota (kept when not given).
        #[arg(long, value_parser = parse_overage)]
        overage_cents_per_1000: Option<Overage>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    None,
    Requests(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overage {
    /// A hard quota.
    None,
    CentsPer1000(u32),
}

fn parse_overage(s: &str) -> Result<Overage, String> {
    if s == "none" {
        return Ok(Overage::None);
    }
    s.parse::<u32>()
        .map(Overage::CentsPer1000)
        .map_err(|_| "expected 'none' or a price in cents".to_owned())
}

fn parse_quota(s: &str) -> Result<Quota, String> {
    if s == "none" {
        return Ok(Quota::None);
    }
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Quota::Requests(n)),
        _ => Err(format!(
            "expected 'none' or a number of requests from 1 to {}",
            u32::MAX
        )),
    }
}

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant on a plan.
    Create {
        name: String,
        #[arg(long)]
        plan: String,
        /// The IANA time zone of its billing cycles (calendar months).
        #[arg(long, default_value = "UTC", value_parser = parse_time_zone)]
        time_zone: chrono_tz::Tz,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List tenants with their plans and live keys.
    List(DatabaseArgs),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key: print it once; only its keyed hash is stored.
    Issue {
        #[arg(long)]
        tenant: String,
        /// Give this key another plan's limits than its tenant's.
        #[arg(long)]
        plan: Option<String>,
        /// The secret the servers hash keys with (their --key-secret).
        #[arg(long, env = "SLUICE_KEY_SECRET", value_parser = parse_secret, hide_env_values = true)]
        key_secret: Secret,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke a key by its prefix (as `keys list` shows it).
    Revoke {
        prefix: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List a tenant's keys by prefix.
    List {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[arg(long)]
    pub tenant: String,
    /// The month, e.g. 2026-11.
    #[arg(long, value_parser = parse_month)]
    pub month: (i32, u32),
    #[command(flatten)]
    pub database: DatabaseArgs,
}

fn parse_group(s: &str) -> Result<crate::events::Group, String> {
    crate::events::Group::from_name(s.trim())
        .ok_or_else(|| format!("unknown consumer group '{s}' (expected usage, alerts or billing)"))
}

fn parse_time_zone(s: &str) -> Result<chrono_tz::Tz, String> {
    s.parse().map_err(|_| {
        format!("unknown time zone '{s}' (expected an IANA name such as Europe/Berlin)")
    })
}

fn parse_month(s: &str) -> Result<(i32, u32), String> {
    let bad = || format!("expected a month as YYYY-MM, got '{s}'");
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month: u32 = m.parse().map_err(|_| bad())?;
    if y.len() != 4 || m.len() != 2 || !(1..=12).contains(&month) {
        return Err(bad());
    }
    Ok((year, month))
}

/// Where `serve` reads its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RulesSource {
    /// A YAML file or directory, reloaded on change.
    Files(PathBuf),
    /// PostgreSQL (with `--database-url`), reloaded on NOTIFY.
    Postgres,
}

impl fmt::Display for RulesSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulesSource::Files(p) => write!(f, "{}", p.display()),
            RulesSource::Postgres => f.write_str("postgres"),
        }
    }
}

fn parse_rules_source(s: &str) -> Result<RulesSource, String> {
    Ok(match s {
        "postgres" => RulesSource::Postgres,
        path => RulesSource::Files(PathBuf::from(path)),
    })
}

/// A database URL; `Debug` hides its password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

fn parse_database_url(s: &str) -> Result<DatabaseUrl, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(DatabaseUrl(s.to_owned()))
    } else {
        Err(format!(
            "expected a postgres:// or postgresql:// URL, got '{}'",
            redact_url(s)
        ))
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The sluice gRPC address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub addr: String,
    #[arg(long)]
    pub domain: String,
    /// A descriptor entry `key=value`; repeat for a nested descriptor.
    #[arg(short = 'd', long = "descriptor", value_parser = parse_entry, required = true)]
    pub entries: Vec<(String, String)>,
    /// Hits to add (0 checks without consuming).
    #[arg(long)]
    pub hits: Option<u64>,
    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub call: CheckArgs,
    /// Print the answer as JSON (`sluice.v1.ExplainResponse`).
    #[arg(long)]
    pub json: bool,
}

fn parse_entry(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got '{s}'"))
}

/// Where counters live.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Memory,
    /// `redis://` or `rediss://`, one server.
    Redis(String),
    /// `redis+cluster://host1:port,host2:port` (seed nodes), or `rediss+cluster://`.
    Cluster {
        nodes: Vec<String>,
        tls: bool,
    },
    /// `redis+sentinel://[:pw@]s1:26379,s2:26379/master[/db]`, or
    /// `rediss+sentinel://`: the master the sentinels name.
    Sentinel {
        /// One URL per sentinel, with the master's credentials and database.
        sentinels: Vec<String>,
        master: String,
        tls: bool,
    },
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Redis(url) => write!(f, "{}", redact_url(url)),
            StoreUrl::Cluster { nodes, tls } => {
                let nodes: Vec<_> = nodes.iter().map(|n| redact_url(n)).collect();
                write!(f, "cluster(tls={tls}, {nodes:?})")
            }
            StoreUrl::Sentinel {
                sentinels,
                master,
                tls,
            } => {
                let sentinels: Vec<_> = sentinels.iter().map(|n| redact_url(n)).collect();
                write!(f, "sentinel(tls={tls}, {sentinels:?}, {master})")
            }
        }
    }
}

fn parse_store(s: &str) -> Result<StoreUrl, String> {
    if s == "memory" {
        return Ok(StoreUrl::Memory);
    }
    if let Some(rest) = s
        .strip_prefix("redis+cluster://")
        .map(|r| (r, false))
        .or_else(|| s.strip_prefix("rediss+cluster://").map(|r| (r, true)))
    {
        let (list, tls) = rest;
        let scheme = if tls { "rediss" } else { "redis" };
        // Credentials, if any, come before the first host and apply to all.
        let (auth, hosts) = match list.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), list),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{auth}{}", h.trim_end_matches('/')))
            .collect();
        if nodes.is_empty() {
            return Err("redis+cluster:// needs at least one seed node host:port".into());
        }
        return Ok(StoreUrl::Cluster { nodes, tls });
    }
    if let Some((rest, tls)) = s
        .strip_prefix("redis+sentinel://")
        .map(|r| (r, false))
        .or_else(|| s.strip_prefix("rediss+sentinel://").map(|r| (r, true)))
    {
        return parse_sentinel(rest, tls);
    }
    if s.starts_with("redis://") || s.starts_with("rediss://") {
        return Ok(StoreUrl::Redis(s.to_owned()));
    }
    Err(format!(
        "unknown store '{}': expected memory, redis://, rediss://, redis+cluster:// or redis+sentinel://",
        redact_url(s)
    ))
}

/// `[user:pw@]s1[:26379],s2[:26379]/master[/db]` (after the scheme).
fn parse_sentinel(rest: &str, tls: bool) -> Result<StoreUrl, String> {
    let usage = "redis+sentinel:// needs sentinels and a master name: \
                 redis+sentinel://[:password@]host:26379,host:26379/mymaster[/db]";
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (hosts, path) = rest.split_once('/').ok_or(usage)?;
    let (master, db) = match path.split_once('/') {
        Some((master, db)) => {
            let db: u32 = db
                .trim_end_matches('/')
                .parse()
                .map_err(|_| format!("redis+sentinel://: '{db}' is not a database number"))?;
            (master, db)
        }
        None => (path, 0),
    };
    if master.is_empty() {
        return Err(usage.into());
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let sentinels: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            // A sentinel's port is 26379 unless given.
            let has_port = h
                .rsplit_once(':')
                .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            let port = if has_port { "" } else { ":26379" };
            format!("{scheme}://{auth}{h}{port}/{db}")
        })
        .collect();
    if sentinels.is_empty() {
        return Err(usage.into());
    }
    Ok(StoreUrl::Sentinel {
        sentinels,
        master: master.to_owned(),
        tls,
    })
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_owned()))
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address (Envoy's rate-limit API, health, reflection).
    #[arg(long, env = "SLUICE_GRPC_ADDR", default_value = "0.0.0.0:8081")]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address (/json, /metrics, /healthz, /readyz).
    #[arg(long, env = "SLUICE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// A rules file or directory (envoyproxy/ratelimit YAML), reloaded on
    /// change; or `postgres`: rules and API keys from --database-url.
    #[arg(long, env = "SLUICE_RULES", default_value = "examples/rules", value_parser = parse_rules_source)]
    pub rules: RulesSource,

    /// How often to look for changed rule files.
    #[arg(long, env = "SLUICE_RULES_POLL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub rules_poll: Duration,

    /// PostgreSQL primary, with --rules postgres: NOTIFY, usage writes, and
    /// reads when no replica is given.
    #[arg(long, env = "SLUICE_DATABASE_URL", value_parser = parse_database_url)]
    pub database_url: Option<DatabaseUrl>,

    /// A streaming replica of the primary to read rules and keys from.
    #[arg(long, env = "SLUICE_DATABASE_REPLICA_URL", value_parser = parse_database_url)]
    pub database_replica_url: Option<DatabaseUrl>,

    /// PostgreSQL password, overriding any in the URLs (from a Secret).
    #[arg(long, env = "SLUICE_DATABASE_PASSWORD", value_parser = parse_secret, hide_env_values = true)]
    pub database_password: Option<Secret>,

    /// The longest a PostgreSQL connection attempt or query may take.
    #[arg(long, env = "SLUICE_DATABASE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub database_timeout: Duration,

    /// Where to keep the last rules and keys loaded from PostgreSQL, to
    /// start from when PostgreSQL is down at start-up.
    #[arg(long, env = "SLUICE_RULES_SNAPSHOT")]
    pub rules_snapshot: Option<PathBuf>,

    /// With --rules postgres: refuse to start when PostgreSQL is down and
    /// there is no snapshot (default: start with no limits).
    #[arg(long, env = "SLUICE_REQUIRE_RULES", default_value_t = false)]
    pub require_rules: bool,

    /// The descriptor entry key that carries an API key.
    #[arg(long, env = "SLUICE_API_KEY_DESCRIPTOR", default_value = "api_key")]
    pub api_key_descriptor: String,

    /// What a request with an unknown or revoked API key gets.
    #[arg(long, env = "SLUICE_UNKNOWN_KEY", value_parser = choice(UNKNOWN_KEY), default_value = "deny")]
    pub unknown_key: UnknownKey,

    /// How often usage and violations are written to PostgreSQL.
    #[arg(long, env = "SLUICE_USAGE_FLUSH", default_value = "5s", value_parser = humantime::parse_duration)]
    pub usage_flush: Duration,

    /// With --rules postgres: decisions carry a `tenant` label for at most
    /// this many tenants (the first by name), `other` for the rest and for
    /// requests without a key; 0: no tenant label.
    #[arg(long, env = "SLUICE_METRICS_TENANTS", default_value = "20")]
    pub metrics_tenants: usize,

    /// Most decisions waiting to be counted; beyond it they are dropped
    /// (and counted in sluice_usage_dropped_total), never waited for.
    #[arg(long, env = "SLUICE_USAGE_QUEUE", default_value = "65536")]
    pub usage_queue: std::num::NonZeroUsize,

    /// Counter store: memory, redis://host:6379/0, rediss://..., redis+cluster://h1:7000,h2:7001,
    /// redis+sentinel://s1:26379,s2:26379/mymaster.
    #[arg(long, env = "SLUICE_STORE", default_value = "memory", value_parser = parse_store)]
    pub store: StoreUrl,

    /// Redis password, overriding any in the store URL (from a Secret).
    #[arg(long, env = "SLUICE_REDIS_PASSWORD", value_parser = parse_secret, hide_env_values = true)]
    pub redis_password: Option<Secret>,

    /// Secret for the keyed hashes of client identifiers; instances that
    /// share counters must share it. Required with a Redis store.
    #[arg(long, env = "SLUICE_KEY_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub key_secret: Option<Secret>,

    /// What to answer when the store cannot: allow (OK) or deny (UNAVAILABLE).
    #[arg(long, env = "SLUICE_FAILURE_MODE", value_parser = choice(FAILURE_MODE), default_value = "allow")]
    pub failure_mode: FailureMode,

    /// The longest a decision waits for the store.
    #[arg(long, env = "SLUICE_STORE_TIMEOUT", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,

    /// CA certificates (PEM) to trust for rediss:// instead of the web PKI roots.
    #[arg(long, env = "SLUICE_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,

    /// Consecutive failed store calls, spanning at least --store-timeout,
    /// that open the circuit breaker (Redis).
    #[arg(long, env = "SLUICE_BREAKER_FAILURES", default_value = "5")]
    pub breaker_failures: std::num::NonZeroU32,

    /// While the breaker is open, Redis is probed once per cool-down;
    /// decisions resume within one cool-down of Redis answering again.
    #[arg(long, env = "SLUICE_BREAKER_COOLDOWN", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub breaker_cooldown: Duration,

    /// Most over-limit counters answered locally, without Redis, until
    /// they can admit again; 0 turns the cache off.
    #[arg(long, env = "SLUICE_LOCAL_CACHE_SIZE", default_value = "100000")]
    pub local_cache_size: usize,

    /// Algorithm for rules that name none.
    #[arg(long, env = "SLUICE_DEFAULT_ALGORITHM", default_value = "sliding_window", value_parser = parse_algorithm)]
    pub default_algorithm: Algorithm,

    /// Global shadow mode: count and report, but never deny.
    #[arg(long, env = "SLUICE_SHADOW_MODE", default_value_t = false)]
    pub shadow_mode: bool,

    /// Global quota mode: every descriptor is a quota, and a request is
    /// denied only when all of them are over.
    #[arg(long, env = "SLUICE_QUOTA_MODE", default_value_t = false)]
    pub quota_mode: bool,

    /// Add RateLimit-Limit/Remaining/Reset headers to responses.
    #[arg(long, env = "SLUICE_RATE_LIMIT_HEADERS", default_value_t = false)]
    pub rate_limit_headers: bool,

    /// Return Envoy dynamic metadata: the domain, the descriptors, and the
    /// merged `metadata` of the rules that admitted the request.
    #[arg(
        long,
        env = "SLUICE_RESPONSE_DYNAMIC_METADATA",
        default_value_t = false
    )]
    pub response_dynamic_metadata: bool,

    /// Most counters the in-process store holds.
    #[arg(long, env = "SLUICE_MEMORY_MAX_KEYS", default_value = "1000000")]
    pub memory_max_keys: std::num::NonZeroUsize,

    #[arg(long, env = "SLUICE_LOG_FORMAT", value_parser = choice(LOG_FORMAT), default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `sluice=debug,info`.
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Send traces over OTLP/gRPC to this endpoint, e.g. http://otel-collector:4317.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Serve gRPC over TLS with this certificate chain (PEM); reloaded on change.
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) for --tls-cert.
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// On SIGTERM: how long in-flight calls may take to finish.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Publish usage and violations as events to this broker
    /// (amqp://user:pass@host:5672/vhost) instead of writing them to
    /// PostgreSQL; `sluice consume usage` writes them.
    #[arg(long, env = "SLUICE_EVENTS_URL", value_parser = parse_secret, hide_env_values = true)]
    pub events_url: Option<Secret>,

    /// Prefix of the exchange and queue names (e.g. one per environment).
    #[arg(long, env = "SLUICE_EVENTS_PREFIX", default_value = "")]
    pub events_prefix: String,

    /// The consumer groups that will read the stream (`usage`, `alerts`,
    /// `billing`, comma-separated): their queues are declared with the
    /// exchanges, so events wait for a consumer that has not started yet.
    #[arg(long, env = "SLUICE_EVENTS_GROUPS", default_value = "usage", value_delimiter = ',', value_parser = parse_group)]
    pub events_groups: Vec<crate::events::Group>,

    /// Directory where events wait until the broker confirms them; kept
    /// across restarts. Required with --events-url.
    #[arg(long, env = "SLUICE_EVENTS_SPOOL")]
    pub events_spool: Option<PathBuf>,

    /// Most bytes the spool holds; beyond it events are dropped (and
    /// counted in sluice_events_dropped_total).
    #[arg(
        long,
        env = "SLUICE_EVENTS_SPOOL_MAX_BYTES",
        default_value = "268435456"
    )]
    pub events_spool_max_bytes: u64,

    /// How often the aggregated usage and violations become events.
    #[arg(long, env = "SLUICE_EVENTS_FLUSH", default_value = "1s", value_parser = humantime::parse_duration)]
    pub events_flush: Duration,

    /// How long the broker may take to confirm a batch before it is sent again.
    #[arg(long, env = "SLUICE_EVENTS_CONFIRM_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub events_confirm_timeout: Duration,

    /// Share of metered decisions also published as `request-logs` events,
    /// 0 (off) to 1.
    #[arg(long, env = "SLUICE_REQUEST_LOG_SAMPLE", default_value = "0")]
    pub request_log_sample: f64,

    /// This instance's name in events (default: the host name).
    #[arg(long, env = "SLUICE_INSTANCE", default_value_t = host_name())]
    pub instance: String,

    /// Rate Limit Quota Service: a bucket an Envoy reports no requests for
    /// this long is abandoned (Envoy forgets it until a request falls into it).
    #[arg(long, env = "SLUICE_RLQS_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub rlqs_idle_timeout: Duration,

    /// Rate Limit Quota Service: how long a share or a DENY_ALL lasts
    /// unless renewed (whole seconds, longer than Envoy's 5 s between
    /// reports); then the Envoy's `expired_assignment_behavior` applies.
    #[arg(long, env = "SLUICE_RLQS_ASSIGNMENT_TTL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub rlqs_assignment_ttl: Duration,

    /// Most connections open on the gRPC port, counting those in their
    /// handshake; at the cap, new ones wait in the kernel's backlog.
    #[arg(long, env = "SLUICE_GRPC_MAX_CONNECTIONS", default_value = "10000")]
    pub grpc_max_connections: std::num::NonZeroUsize,

    /// Calls in flight on one gRPC connection (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(
        long,
        env = "SLUICE_GRPC_MAX_CONCURRENT_STREAMS",
        default_value = "1024"
    )]
    pub grpc_max_concurrent_streams: std::num::NonZeroU32,

    /// How long a new gRPC connection may take to finish the TLS handshake
    /// and send the HTTP/2 preface before it is closed.
    #[arg(long, env = "SLUICE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Most TLS handshakes under way at once on the gRPC port.
    #[arg(long, env = "SLUICE_MAX_TLS_HANDSHAKES", default_value = "256")]
    pub max_tls_handshakes: std::num::NonZeroUsize,

    /// Send an HTTP/2 PING after this long without a frame from the client
    /// (both ports); 0s: never.
    #[arg(long, env = "SLUICE_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// Close an HTTP/2 connection whose PING is not answered within this long.
    #[arg(long, env = "SLUICE_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Send a gRPC connection GOAWAY after this long, so its client moves
    /// to a new one (spreading clients over new instances); 0s: never.
    #[arg(long, env = "SLUICE_GRPC_MAX_CONNECTION_AGE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub grpc_max_connection_age: Duration,

    /// Close a gRPC connection with no call in flight (streams included)
    /// for this long, so idle clients do not hold places under the cap;
    /// 0s: never.
    #[arg(long, env = "SLUICE_GRPC_IDLE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub grpc_idle_timeout: Duration,

    /// Most connections open on the HTTP port; at the cap, new ones wait in
    /// the kernel's backlog.
    #[arg(long, env = "SLUICE_HTTP_MAX_CONNECTIONS", default_value = "1024")]
    pub http_max_connections: std::num::NonZeroUsize,

    /// How long an HTTP/1 connection may wait for a request head, idle
    /// between requests or part-way through one.
    #[arg(long, env = "SLUICE_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,

    /// The largest header block a client may send on either port, in bytes.
    #[arg(long, env = "SLUICE_MAX_HEADER_BYTES", default_value = "65536")]
    pub max_header_bytes: std::num::NonZeroU32,
}

/// The kernel's host name (the pod name in Kubernetes).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "sluice".to_owned())
}

// The domain enums below carry no clap derives, so the core compiles without
// clap: each flag maps its spellings to them here, with the help text
// `--help` shows.
type Choices<T> = &'static [(&'static str, T, &'static str)];

const FAILURE_MODE: Choices<FailureMode> = &[
    (
        "allow",
        FailureMode::Allow,
        "Answer OK (the gateways' own default is to let traffic through)",
    ),
    (
        "deny",
        FailureMode::Deny,
        "Answer UNAVAILABLE, so the gateway's `failure_mode_deny` decides",
    ),
];

const UNKNOWN_KEY: Choices<UnknownKey> = &[
    (
        "deny",
        UnknownKey::Deny,
        "OVER_LIMIT for the descriptor that carries it",
    ),
    (
        "anonymous",
        UnknownKey::Anonymous,
        "The domain's own rules, as for a caller without a key",
    ),
];

const LOG_FORMAT: Choices<LogFormat> = &[
    ("text", LogFormat::Text, "Human-readable lines"),
    ("json", LogFormat::Json, "One JSON object per line"),
];

fn choice<T: Copy + Send + Sync + 'static>(
    choices: Choices<T>,
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(
        choices
            .iter()
            .map(|(name, _, help)| PossibleValue::new(*name).help(*help)),
    )
    .map(move |name| {
        // PossibleValuesParser admits only the names listed, so one matches.
        choices
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or(choices[0].1, |(_, value, _)| *value)
    })
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    Algorithm::parse(s).ok_or_else(|| {
        format!("unknown algorithm '{s}' (expected sliding_window, fixed_window or gcra)")
    })
}

impl ServeArgs {
    /// Checks what clap cannot check alone.
    pub fn validate(&self) -> Result<(), String> {
        if self.store != StoreUrl::Memory && self.key_secret.is_none() {
            return Err(
                "--key-secret (SLUICE_KEY_SECRET) is required with a Redis store: \
                 instances sharing counters must hash client identifiers with the same secret"
                    .into(),
            );
        }
        if self.store_timeout.is_zero() {
            return Err("--store-timeout must be greater than zero".into());
        }
        if self.breaker_cooldown.is_zero() {
            return Err("--breaker-cooldown must be greater than zero".into());
        }
        if self.rules_poll.is_zero() {
            return Err("--rules-poll must be greater than zero".into());
        }
        if self.events_url.is_some() {
            if self.events_spool.is_none() {
                return Err("--events-url needs --events-spool (SLUICE_EVENTS_SPOOL), a directory for events the broker has not confirmed".into());
            }
            if self.events_flush.is_zero() || self.events_confirm_timeout.is_zero() {
                return Err(
                    "--events-flush and --events-confirm-timeout must be greater than zero".into(),
                );
            }
        }
        if !(0.0..=1.0).contains(&self.request_log_sample) {
            return Err("--request-log-sample must be between 0 and 1".into());
        }
        for (flag, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--keepalive-timeout", self.keepalive_timeout),
            ("--http-idle-timeout", self.http_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{flag} must be greater than zero"));
            }
        }
        if self.max_header_bytes.get() < 8192 {
            return Err("--max-header-bytes must be at least 8192".into());
        }
        if self.rlqs_idle_timeout.is_zero() {
            return Err("--rlqs-idle-timeout must be greater than zero".into());
        }
        if self.rlqs_assignment_ttl.subsec_nanos() != 0 {
            return Err(
                "--rlqs-assignment-ttl must be a whole number of seconds (Envoy reads no fractions)"
                    .into(),
            );
        }
        if self.rlqs_assignment_ttl <= crate::rlqs::ENVOY_REPORT_INTERVAL {
            return Err(format!(
                "--rlqs-assignment-ttl must be longer than Envoy's {:?} between reports, \
                 or shares expire before they are renewed",
                crate::rlqs::ENVOY_REPORT_INTERVAL
            ));
        }
        if self.rules == RulesSource::Postgres {
            if self.database_url.is_none() {
                return Err("--rules postgres needs --database-url (SLUICE_DATABASE_URL)".into());
            }
            if self.key_secret.is_none() {
                return Err(
                    "--rules postgres needs --key-secret (SLUICE_KEY_SECRET): API keys \
                     are stored as hashes keyed with it"
                        .into(),
                );
            }
            if self.api_key_descriptor.is_empty() {
                return Err("--api-key-descriptor must not be empty".into());
            }
            if self.database_timeout.is_zero() || self.usage_flush.is_zero() {
                return Err(
                    "--database-timeout and --usage-flush must be greater than zero".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_and_redact() {
        assert_eq!(parse_store("memory").unwrap(), StoreUrl::Memory);
        let s = parse_store("redis+cluster://:pw@a:7000,b:7001").unwrap();
        assert_eq!(
            s,
            StoreUrl::Cluster {
                nodes: vec!["redis://:pw@a:7000".into(), "redis://:pw@b:7001".into()],
                tls: false
            }
        );
        assert!(!format!("{s:?}").contains("pw"));
        let r = parse_store("redis://user:hunter2@h:6379/0").unwrap();
        assert_eq!(format!("{r:?}"), "redis://user:***@h:6379/0");
        assert!(parse_store("http://x").is_err());
    }

    #[test]
    fn sentinel_urls_parse_and_redact() {
        let s = parse_store("redis+sentinel://:pw@s1:26379,s2/mymaster").unwrap();
        assert_eq!(
            s,
            StoreUrl::Sentinel {
                sentinels: vec![
                    "redis://:pw@s1:26379/0".into(),
                    "redis://:pw@s2:26379/0".into()
                ],
                master: "mymaster".into(),
                tls: false,
            }
        );
        assert!(!format!("{s:?}").contains("pw"));
        let s = parse_store("rediss+sentinel://s1:5000/cache/3").unwrap();
        assert_eq!(
            s,
            StoreUrl::Sentinel {
                sentinels: vec!["rediss://s1:5000/3".into()],
                master: "cache".into(),
                tls: true,
            }
        );
        for bad in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/",
            "redis+sentinel:///mymaster",
            "redis+sentinel://s1/mymaster/x",
        ] {
            assert!(parse_store(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_serve_flag_reads_an_env_var() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("SLUICE_")),
                "--{} has no SLUICE_* env var",
                arg.get_id()
            );
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let cli = Cli::try_parse_from(["sluice", "serve", "--key-secret", "hunter2"]).unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let argv = ["sluice", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => *args,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn postgres_rules_need_a_database_and_a_key_secret() {
        let args = serve(&["--rules", "postgres"]);
        assert_eq!(args.rules, RulesSource::Postgres);
        assert!(args.validate().unwrap_err().contains("--database-url"));
        let args = serve(&[
            "--rules",
            "postgres",
            "--database-url",
            "postgres://u:pw@h/db",
        ]);
        assert!(args.validate().unwrap_err().contains("--key-secret"));
        let args = serve(&[
            "--rules",
            "postgres",
            "--database-url",
            "postgres://u:pw@h/db",
            "--key-secret",
            "s",
        ]);
        args.validate().unwrap();
        assert!(!format!("{args:?}").contains("pw"));
        assert_eq!(args.unknown_key, UnknownKey::Deny);
        assert_eq!(args.api_key_descriptor, "api_key");
        let args = serve(&["--rules", "examples/rules"]);
        assert_eq!(args.rules, RulesSource::Files("examples/rules".into()));
        assert!(Cli::try_parse_from(["sluice", "serve", "--database-url", "mysql://x"]).is_err());
    }

    #[test]
    fn quota_assignments_last_whole_seconds() {
        let args = serve(&[]);
        assert_eq!(args.rlqs_assignment_ttl, Duration::from_secs(15));
        assert_eq!(args.rlqs_idle_timeout, Duration::from_secs(60));
        args.validate().unwrap();
        let args = serve(&["--rlqs-assignment-ttl", "1500ms"]);
        assert!(args
            .validate()
            .unwrap_err()
            .contains("whole number of seconds"));
        let args = serve(&["--rlqs-assignment-ttl", "5s"]);
        assert!(args.validate().unwrap_err().contains("between reports"));
        serve(&["--rlqs-assignment-ttl", "6s"]).validate().unwrap();
        let args = serve(&["--rlqs-idle-timeout", "0s"]);
        assert!(args.validate().unwrap_err().contains("--rlqs-idle-timeout"));
    }

    #[test]
    fn connection_bounds_have_defaults_and_refuse_zero_timeouts() {
        let args = serve(&[]);
        assert_eq!(args.grpc_max_connections.get(), 10_000);
        assert_eq!(args.http_max_connections.get(), 1024);
        assert_eq!(args.handshake_timeout, Duration::from_secs(10));
        assert!(args.grpc_max_connection_age.is_zero());
        args.validate().unwrap();
        let args = serve(&["--handshake-timeout", "0s"]);
        assert!(args.validate().unwrap_err().contains("--handshake-timeout"));
        let args = serve(&["--max-header-bytes", "100"]);
        assert!(args.validate().unwrap_err().contains("--max-header-bytes"));
        assert!(Cli::try_parse_from(["sluice", "serve", "--grpc-max-connections", "0"]).is_err());
    }

    #[test]
    fn months_and_quotas_parse() {
        assert_eq!(parse_month("2026-11"), Ok((2026, 11)));
        assert!(parse_month("2026-13").is_err());
        assert!(parse_month("2026-1").is_err());
        assert_eq!(parse_quota("none"), Ok(Quota::None));
        assert_eq!(parse_quota("5"), Ok(Quota::Requests(5)));
        assert!(parse_quota("0").is_err());
    }

    #[test]
    fn redis_needs_a_key_secret() {
        let Command::Serve(args) =
            Cli::try_parse_from(["sluice", "serve", "--store", "redis://h:6379"])
                .unwrap()
                .command
        else {
            panic!("not serve");
        };
        assert!(args.validate().unwrap_err().contains("--key-secret"));
    }
}
