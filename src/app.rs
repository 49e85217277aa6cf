//! The composition root: build the store, rules and limiter from the
//! configuration, serve gRPC and HTTP, and drain on shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::clock::{Clock, SystemClock};
use crate::config::{RulesSource, ServeArgs, StoreUrl};
use crate::events::amqp::AmqpSink;
use crate::events::pipeline::{self, PipelineSettings};
use crate::events::spool::Spool;
use crate::grpc::{
    ExplainHandler, GrpcServer, RateLimitHandler, RateLimitQuotaHandler, RLQS_SERVICE_NAME,
    SERVICE_NAME,
};
use crate::health::EventsStatus;
use crate::health::Readiness;
use crate::limiter::RuleSet;
use crate::limiter::{KeyHasher, PlanOptions};
use crate::listen::{self, ConnectionSettings, Limits};
use crate::rlqs::{QuotaService, QuotaSettings};
use crate::rules::postgres::{Connections, PostgresSource};
use crate::rules::{watch, RulesHandle};
use crate::service::{ApiKeyPolicy, LimiterSettings, RateLimiter};
use crate::storage::memory::MemoryStore;
use crate::storage::redis::{RedisOptions, RedisStore, RedisTarget};
use crate::storage::CounterStore;
use crate::task::{OwnedTask, TaskSet};
use crate::telemetry::{self, names};
use crate::tls::{self, TlsFiles, TlsReloader};
use crate::usage::UsageRecorder;
use crate::{database, http, proto};

/// How long shutdown waits for the last usage records to be written.
const USAGE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What `serve` needs, built by [`build`] or by a test.
#[derive(Clone)]
pub struct Deps {
    pub limiter: Arc<RateLimiter>,
    pub readiness: Arc<Readiness>,
    pub metrics: PrometheusHandle,
    /// How long in-flight calls may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Serve gRPC over TLS with these (reloading) certificates.
    pub tls: Option<Arc<TlsReloader>>,
    /// The Rate Limit Quota Service's settings.
    pub quota: QuotaSettings,
    /// Bounds on the connections of both ports and what they carry.
    pub connections: ConnectionSettings,
    /// The background tasks `build` started (rule and certificate reloads,
    /// usage writes, counter expiry, metrics upkeep); `serve` ends them when
    /// it returns.
    pub tasks: TaskSet,
}

/// Serves the rate-limit API (with health and reflection) on `grpc` and the
/// HTTP endpoints on `http` until `shutdown` completes; then reports
/// NOT_SERVING, stops accepting, and gives in-flight calls up to the grace
/// period to finish. Ends the background tasks in `deps` when it returns,
/// whether it stopped by `shutdown` or because a server failed.
pub async fn serve(
    grpc: TcpListener,
    http: TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let tasks = deps.tasks.clone();
    let result = serve_until(grpc, http, deps, shutdown).await;
    tasks.end().await;
    result
}

async fn serve_until(
    grpc: TcpListener,
    http: TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for service in [SERVICE_NAME, RLQS_SERVICE_NAME, ""] {
        health
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    let _store_health = OwnedTask::spawn(report_store_health(
        health.clone(),
        deps.limiter.store().clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    // grpcurl before 1.8.8 only speaks v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building gRPC reflection")?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // Quota streams last as long as their Envoy's connection: they end when
    // shutdown begins, so that draining does not wait for them.
    let quota = QuotaService::new(deps.limiter.clone(), deps.quota.clone());
    let limits = &deps.connections;
    let rate_limit = Arc::new(RateLimitHandler::new(deps.limiter.clone()));
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(RateLimitHandler::server(rate_limit.clone()))
        .add_service(ExplainHandler::new(deps.limiter.clone()).into_server())
        .add_service(RateLimitQuotaHandler::new(quota, stop_rx.clone()).into_server());
    // sluice's own server on h2: ShouldRateLimit answered in each
    // connection's task, everything else through tonic's router.
    let grpc_server = Arc::new(GrpcServer::new(
        rate_limit,
        routes,
        limits.clone(),
        // Past its age a connection gets a GOAWAY; its calls in flight have
        // the shutdown grace period to finish.
        deps.shutdown_grace,
    ));
    // Both ports accept through `listen`: a cap on connections, and a
    // deadline for the handshake (TLS and the HTTP/2 preface) before the
    // server keeps any state for a connection.
    let grpc_server: Pin<Box<dyn Future<Output = ()> + Send>> = match &deps.tls {
        Some(tls) => Box::pin(grpc_server.serve(
            tls::incoming(grpc, tls.clone(), limits.grpc, limits.max_tls_handshakes),
            stopped(stop_rx.clone()),
        )),
        None => Box::pin(grpc_server.serve(
            listen::incoming(grpc, "grpc", limits.grpc, |mut tcp| async move {
                let preface = listen::read_preface(&mut tcp).await?;
                Ok::<_, std::io::Error>((tcp, preface))
            }),
            stopped(stop_rx.clone()),
        )),
    };
    let router = http::router(http::HttpState {
        limiter: deps.limiter.clone(),
        readiness: deps.readiness.clone(),
        metrics: deps.metrics.clone(),
    });
    let http_server = http::serve(http, router, limits, stopped(stop_rx));

    let servers = async {
        tokio::try_join!(
            async {
                grpc_server.await;
                Ok::<_, anyhow::Error>(())
            },
            async {
                http_server.await;
                Ok(())
            },
        )
        .map(|_| ())
    };
    tokio::pin!(servers);
    tokio::select! {
        result = &mut servers => return result,
        () = shutdown => {}
    }

    tracing::info!(grace = ?deps.shutdown_grace, "shutting down: draining in-flight calls");
    deps.readiness.set_draining();
    for service in [SERVICE_NAME, RLQS_SERVICE_NAME, ""] {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    let _ = stop_tx.send(true);
    let result = match tokio::time::timeout(deps.shutdown_grace, servers).await {
        Ok(result) => result,
        Err(_) => {
            // Dropping the servers stops the accept loops; connections still
            // open end when the process exits, which `main` does next.
            tracing::warn!("grace period over; giving up on the calls still in flight");
            Ok(())
        }
    };
    // After the last call: its decision is in the usage queue too.
    if let Some(usage) = deps.limiter.usage() {
        if !usage.close(USAGE_CLOSE_TIMEOUT).await {
            tracing::warn!("usage records not all written at shutdown");
        }
    }
    result
}

/// The gRPC health service name that reports the counter store's state.
/// The rate-limit service itself stays SERVING while the store fails: it
/// still answers, by the failure mode.
pub const STORE_HEALTH_SERVICE: &str = "sluice.CounterStore";

/// Mirrors `CounterStore::health` into gRPC health, as `/readyz` shows it.
async fn report_store_health(
    health: tonic_health::server::HealthReporter,
    store: Arc<dyn CounterStore>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut last = None;
    loop {
        ticker.tick().await;
        let status = match store.health() {
            crate::storage::StoreHealth::Up => ServingStatus::Serving,
            crate::storage::StoreHealth::Down(_) => ServingStatus::NotServing,
        };
        if last != Some(status) {
            health
                .set_service_status(STORE_HEALTH_SERVICE, status)
                .await;
            last = Some(status);
        }
    }
}

/// Builds everything `serve` needs from the command line, and starts the
/// background tasks (rule reloads, counter expiry, ...) in `Deps::tasks`.
pub async fn build(args: &ServeArgs) -> anyhow::Result<Deps> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let readiness = Arc::new(Readiness::default());
    let tasks = TaskSet::default();
    let metrics = telemetry::prometheus();
    tasks.spawn(telemetry::upkeep(metrics.clone()));

    let rules: RulesHandle = Arc::new(ArcSwap::from_pointee(RuleSet::new()));
    let mut usage = None;
    match &args.rules {
        RulesSource::Files(path) => {
            watch::load_into(path, &rules, &readiness)
                .map_err(|errors| anyhow::anyhow!("invalid rules:\n{errors}"))?;
            tasks.spawn(watch::watch(
                path.clone(),
                args.rules_poll,
                rules.clone(),
                readiness.clone(),
            ));
        }
        RulesSource::Postgres => {
            let (mut source, primary) = postgres_source(args, &rules, &readiness)?;
            source.start_up(args.require_rules).await?;
            tasks.spawn(source.run());
            // With an event stream, usage goes to the broker instead.
            if args.events_url.is_none() {
                let (recorder, writer) =
                    UsageRecorder::new(primary, args.usage_flush, args.usage_queue.get());
                tasks.spawn(writer);
                usage = Some(recorder);
            }
        }
    }
    if let Some(recorder) = event_stream(args, &readiness, &tasks)? {
        usage = Some(recorder);
    }

    let hasher = match &args.key_secret {
        Some(secret) => KeyHasher::from_secret(secret.0.as_bytes()),
        None => KeyHasher::random(),
    };
    let store: Arc<dyn CounterStore> = match &args.store {
        StoreUrl::Memory => {
            let store = Arc::new(MemoryStore::new(args.memory_max_keys.get(), clock.clone()));
            tasks.spawn(sweep(store.clone()));
            store
        }
        StoreUrl::Redis(url) => redis_store(RedisTarget::Standalone(url.clone()), args)?,
        StoreUrl::Cluster { nodes, .. } => redis_store(RedisTarget::Cluster(nodes.clone()), args)?,
        StoreUrl::Sentinel {
            sentinels, master, ..
        } => redis_store(
            RedisTarget::Sentinel {
                sentinels: sentinels.clone(),
                master: master.clone(),
            },
            args,
        )?,
    };

    let mut limiter = RateLimiter::new(
        rules,
        store,
        hasher,
        LimiterSettings {
            plan: PlanOptions {
                default_algorithm: args.default_algorithm,
                global_shadow: args.shadow_mode,
                global_quota: args.quota_mode,
            },
            failure_mode: args.failure_mode,
            store_timeout: args.store_timeout,
            rate_limit_headers: args.rate_limit_headers,
            dynamic_metadata: args.response_dynamic_metadata,
        },
        clock,
    );
    if args.rules == RulesSource::Postgres {
        limiter = limiter
            .with_api_keys(ApiKeyPolicy {
                descriptor: args.api_key_descriptor.clone(),
                unknown: args.unknown_key,
            })
            .with_tenant_labels(args.metrics_tenants);
    }
    register_failure_series(args, limiter.store().kind());
    if let Some(usage) = usage {
        limiter = limiter.with_usage(usage);
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let reloader = TlsReloader::new(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })
            .context("loading TLS certificates")?;
            tasks.spawn(reloader.clone().watch(Duration::from_secs(1)));
            Some(reloader)
        }
        _ => None,
    };
    Ok(Deps {
        limiter: Arc::new(limiter),
        tls,
        quota: QuotaSettings {
            idle_timeout: args.rlqs_idle_timeout,
            assignment_ttl: args.rlqs_assignment_ttl,
            ..QuotaSettings::default()
        },
        connections: connection_settings(args),
        readiness,
        metrics,
        shutdown_grace: args.shutdown_grace,
        tasks,
    })
}

/// The connection bounds from the command line.
fn connection_settings(args: &ServeArgs) -> ConnectionSettings {
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    ConnectionSettings {
        grpc: Limits {
            max_connections: args.grpc_max_connections.get(),
            handshake_timeout: args.handshake_timeout,
            idle_timeout: nonzero(args.grpc_idle_timeout),
        },
        max_tls_handshakes: args.max_tls_handshakes.get(),
        max_concurrent_streams: args.grpc_max_concurrent_streams.get(),
        keepalive_interval: nonzero(args.keepalive_interval),
        keepalive_timeout: args.keepalive_timeout,
        max_connection_age: nonzero(args.grpc_max_connection_age),
        http: Limits {
            max_connections: args.http_max_connections.get(),
            handshake_timeout: args.handshake_timeout,
            idle_timeout: None,
        },
        http_idle_timeout: args.http_idle_timeout,
        max_header_bytes: args.max_header_bytes.get(),
    }
}

/// With --events-url: the usage recorder whose decisions become events,
/// and its aggregator and publisher started in `tasks`.
fn event_stream(
    args: &ServeArgs,
    readiness: &Arc<Readiness>,
    tasks: &TaskSet,
) -> anyhow::Result<Option<UsageRecorder>> {
    let (Some(url), Some(dir)) = (&args.events_url, &args.events_spool) else {
        return Ok(None);
    };
    let spool = Spool::open(dir, args.events_spool_max_bytes)
        .with_context(|| format!("opening the event spool {}", dir.display()))?;
    let status = Arc::new(EventsStatus::default());
    readiness.set_events(status.clone());
    let sink = AmqpSink::new(
        &url.0,
        &args.events_prefix,
        args.events_confirm_timeout,
        &args.events_groups,
    );
    let (recorder, aggregator, publisher) = pipeline::start(
        PipelineSettings {
            instance: args.instance.clone(),
            flush_every: args.events_flush,
            request_log_sample: args.request_log_sample,
            queue: args.usage_queue.get(),
        },
        spool,
        Box::new(sink),
        status,
    );
    tasks.spawn(aggregator);
    tasks.spawn(publisher);
    Ok(Some(recorder))
}

/// The PostgreSQL rules source and the primary's pool (for usage writes).
/// Pools connect lazily: start-up decides what to do when PostgreSQL is down.
fn postgres_source(
    args: &ServeArgs,
    rules: &RulesHandle,
    readiness: &Arc<Readiness>,
) -> anyhow::Result<(PostgresSource, sqlx::PgPool)> {
    let password = args.database_password.as_ref();
    let primary_url = args
        .database_url
        .as_ref()
        .context("--rules postgres needs --database-url")?;
    let primary = database::options(&primary_url.0, password).map_err(anyhow::Error::msg)?;
    let replica = args
        .database_replica_url
        .as_ref()
        .map(|url| database::options(&url.0, password))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let timeout = args.database_timeout;
    let primary_pool = database::lazy_pool(primary.clone(), 4, timeout);
    let connections = Connections {
        primary: primary_pool.clone(),
        replica: replica.map(|r| database::lazy_pool(r, 2, timeout)),
        listen: database::lazy_pool(primary, 1, timeout),
        timeout,
    };
    let source = PostgresSource::new(
        connections,
        rules.clone(),
        readiness.clone(),
        args.rules_snapshot.clone(),
    );
    Ok((source, primary_pool))
}

/// Puts the failure counters in `/metrics` at 0 from the start. A counter
/// that appears only at its first increment hides that increment from
/// `rate()` and `increase()`, and alerts and dashboards would have nothing
/// to read until the first failure.
fn register_failure_series(args: &ServeArgs, store_kind: &'static str) {
    use metrics::counter;
    let mode = match args.failure_mode {
        crate::service::FailureMode::Allow => "allow",
        crate::service::FailureMode::Deny => "deny",
    };
    counter!(names::FAILURE_MODE_ANSWERS, "mode" => mode).increment(0);
    for kind in ["timeout", "connection", "script", "breaker_open"] {
        counter!(names::STORE_ERRORS, "kind" => kind).increment(0);
    }
    for result in ["success", "failure"] {
        counter!(names::RULE_RELOADS, "result" => result).increment(0);
    }
    if store_kind == "memory" {
        counter!(names::STORE_ERRORS, "kind" => "full").increment(0);
    } else {
        counter!(names::STORE_ERRORS, "kind" => "queue_full").increment(0);
    }
    counter!(names::INVALID_REQUESTS).increment(0);
    counter!(names::UNKNOWN_DOMAIN).increment(0);
    if store_kind != "memory" {
        counter!(names::LOCAL_CACHE_ANSWERS, "store" => store_kind).increment(0);
        counter!(names::LOCAL_CACHE_EVICTIONS).increment(0);
        counter!(names::REDIS_PROBE_FAILURES, "store" => store_kind).increment(0);
        for to in ["open", "closed"] {
            counter!(names::BREAKER_TRANSITIONS, "store" => store_kind, "to" => to).increment(0);
        }
        counter!(names::REDIS_RETRIES, "reason" => "noscript").increment(0);
        if store_kind == "redis-sentinel" {
            counter!(names::REDIS_MASTER_CHANGES, "store" => store_kind).increment(0);
        }
    }
    if args.rules == RulesSource::Postgres {
        for reason in ["queue_full", "backlog_full"] {
            counter!(names::USAGE_DROPPED, "reason" => reason).increment(0);
        }
        for result in ["success", "failure"] {
            counter!(names::USAGE_FLUSHES, "result" => result).increment(0);
        }
        counter!(names::POSTGRES_REPLICA_FALLBACKS).increment(0);
    }
}

/// The Redis store; it connects in the background, so sluice starts (and
/// answers by the failure mode) while Redis is down.
fn redis_store(target: RedisTarget, args: &ServeArgs) -> anyhow::Result<Arc<dyn CounterStore>> {
    let mut options = RedisOptions::new(args.store_timeout);
    options.breaker_failures = args.breaker_failures.get();
    options.breaker_cooldown = args.breaker_cooldown;
    options.local_cache_size = args.local_cache_size;
    options.password = args.redis_password.as_ref().map(|p| p.0.clone());
    if let Some(path) = &args.redis_ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading --redis-ca-cert {}", path.display()))?;
        options.ca_cert = Some(pem);
    }
    // The client's messages name what is wrong, never the URL itself, and
    // the target's Debug redacts the password.
    let store = RedisStore::new(&target, options)
        .map_err(|e| anyhow::anyhow!("invalid Redis store {target:?}: {e}"))?;
    Ok(Arc::new(store))
}

/// Expires idle in-process counters and reports how many are live.
async fn sweep(store: Arc<MemoryStore>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        store.sweep();
        gauge!(names::STORE_KEYS, "store" => "memory").set(store.len() as f64);
    }
}

/// `sluice serve`: bind, serve, and stop on SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let deps = build(&args).await?;
    let grpc = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC on {}", args.grpc_addr))?;
    let http = TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", args.http_addr))?;
    // The bound addresses, not the flags: with port 0 the log tells which.
    let local = |l: &TcpListener| {
        l.local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    };
    tracing::info!(
        grpc = %local(&grpc),
        http = %local(&http),
        store = ?args.store,
        rules = %args.rules,
        "sluice serving"
    );
    serve(grpc, http, deps, shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_defaults_are_the_connection_settings_defaults() {
        use clap::Parser as _;
        let cli = crate::config::Cli::try_parse_from(["sluice", "serve"]).unwrap();
        let crate::config::Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert_eq!(connection_settings(&args), ConnectionSettings::default());
    }
}
