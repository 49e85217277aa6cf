//! Logs, traces and metrics: tracing with text or JSON output, OpenTelemetry
//! over OTLP when configured, and a Prometheus recorder. Metric names live
//! here as constants.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{
    layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter, Layer as _,
};

pub mod names {
    pub const DECISIONS: &str = "sluice_decisions_total";
    pub const RULE_HITS: &str = "sluice_rule_hits_total";
    pub const SHADOW_MODE: &str = "sluice_shadow_mode_total";
    pub const GLOBAL_SHADOW: &str = "sluice_global_shadow_mode_total";
    pub const NEAR_LIMIT: &str = "sluice_near_limit_total";
    pub const UNKNOWN_DOMAIN: &str = "sluice_unknown_domain_total";
    pub const UNKNOWN_DOMAIN_LABEL: &str = "_unknown";
    pub const INVALID_REQUESTS: &str = "sluice_invalid_requests_total";
    pub const REQUEST_DURATION: &str = "sluice_request_duration_seconds";
    pub const STORE_DURATION: &str = "sluice_store_duration_seconds";
    pub const STORE_ERRORS: &str = "sluice_store_errors_total";
    pub const STORE_KEYS: &str = "sluice_store_keys";
    pub const FAILURE_MODE_ANSWERS: &str = "sluice_failure_mode_answers_total";
    /// One Redis round trip (a pipeline), by store (`redis`, `redis-cluster`).
    pub const REDIS_DURATION: &str = "sluice_redis_duration_seconds";
    /// Commands resent after a reply that says they did not run, by reason
    /// (`noscript`, `moved`, `ask`).
    pub const REDIS_RETRIES: &str = "sluice_redis_retries_total";
    /// Counter operations decided by one script call (concurrent calls to
    /// one node coalesced into a batch), by store.
    pub const REDIS_BATCH_OPERATIONS: &str = "sluice_redis_batch_operations";
    /// Masters a Redis Sentinel named in place of the one before, by store.
    pub const REDIS_MASTER_CHANGES: &str = "sluice_redis_master_changes_total";
    /// Failed circuit-breaker probes, by store.
    pub const REDIS_PROBE_FAILURES: &str = "sluice_redis_probe_failures_total";
    /// 1 while the store's circuit breaker is open, by store.
    pub const BREAKER_OPEN: &str = "sluice_store_breaker_open";
    /// Circuit-breaker state changes, by store and `to` (`open`, `closed`).
    pub const BREAKER_TRANSITIONS: &str = "sluice_store_breaker_transitions_total";
    /// Counter operations answered by the local over-limit cache, by store.
    pub const LOCAL_CACHE_ANSWERS: &str = "sluice_local_cache_answers_total";
    /// Over-limit cache entries dropped, oldest first, to make room.
    pub const LOCAL_CACHE_EVICTIONS: &str = "sluice_local_cache_evictions_total";
    pub const RULE_RELOADS: &str = "sluice_rule_reloads_total";
    pub const RULES_LOADED: &str = "sluice_rules_loaded";
    // PostgreSQL rules, API keys and usage metering.
    pub const API_KEYS_LOADED: &str = "sluice_api_keys_loaded";
    pub const API_KEY_LOOKUPS: &str = "sluice_api_key_lookups_total";
    pub const POSTGRES_UP: &str = "sluice_postgres_up";
    /// When the rules in force were last confirmed current against
    /// PostgreSQL (a successful load, changed or not), in Unix seconds.
    pub const RULES_SYNCED: &str = "sluice_postgres_rules_synced_timestamp_seconds";
    /// The `tenant` label of decisions beyond `--metrics-tenants`, and of
    /// requests without a live API key.
    pub const OTHER_TENANT_LABEL: &str = "other";
    /// Rule loads that read the primary because the replica failed.
    pub const POSTGRES_REPLICA_FALLBACKS: &str = "sluice_postgres_replica_fallbacks_total";
    /// From a NOTIFY received to the new rules in force.
    pub const RULES_RELOAD_DURATION: &str = "sluice_rules_reload_duration_seconds";
    pub const USAGE_DROPPED: &str = "sluice_usage_dropped_total";
    pub const USAGE_FLUSHES: &str = "sluice_usage_flushes_total";
    // The event stream (--events-url).
    /// Events sent to the broker, each attempt (retries included).
    pub const EVENTS_PUBLISHED: &str = "sluice_events_published_total";
    /// Events the broker confirmed.
    pub const EVENTS_CONFIRMED: &str = "sluice_events_confirmed_total";
    /// Events sent again after a failed or unconfirmed attempt.
    pub const EVENTS_RETRIED: &str = "sluice_events_retried_total";
    /// Events dropped because the spool was full.
    pub const EVENTS_DROPPED: &str = "sluice_events_dropped_total";
    pub const EVENTS_SPOOL_BYTES: &str = "sluice_events_spool_bytes";
    pub const EVENTS_SPOOL_EVENTS: &str = "sluice_events_spool_events";
    /// 1 while the last publish was confirmed.
    pub const EVENTS_BROKER_UP: &str = "sluice_events_broker_up";
    /// Events a consumer applied to PostgreSQL, by consumer and `result`
    /// (`applied`, `duplicate`, `invalid`).
    pub const EVENTS_CONSUMED: &str = "sluice_events_consumed_total";
    /// Quota alerts raised (alerts consumer), by `threshold`.
    pub const QUOTA_ALERTS: &str = "sluice_quota_alerts_total";
    /// Webhook delivery attempts, by the delivery's `result` after it
    /// (`delivered`, `pending`: to be retried, `failed`: given up).
    pub const WEBHOOK_ATTEMPTS: &str = "sluice_webhook_attempts_total";
    /// Invoices written when billing cycles close (billing consumer).
    pub const INVOICES: &str = "sluice_invoices_total";
    // The Rate Limit Quota Service (RLQS).
    /// Quota streams open (one per Envoy).
    pub const RLQS_STREAMS: &str = "sluice_rlqs_streams";
    /// Buckets the open streams track.
    pub const RLQS_BUCKETS: &str = "sluice_rlqs_buckets";
    /// Bucket usage reports received, by domain.
    pub const RLQS_REPORTS: &str = "sluice_rlqs_reports_total";
    /// Requests Envoys report, by domain and `outcome` (`allowed`, `denied`).
    pub const RLQS_REPORTED_REQUESTS: &str = "sluice_rlqs_reported_requests_total";
    /// Actions pushed, by `kind` (`token_bucket`, `deny_all`, `allow_all`, `abandon`).
    pub const RLQS_ASSIGNMENTS: &str = "sluice_rlqs_assignments_total";
    /// What the last report found left of a bucket's budget, by rule path.
    pub const RLQS_BUDGET_REMAINING: &str = "sluice_rlqs_budget_remaining";
    // Connections (`port`: `grpc`, `http`).
    /// Connections open, counting those still in their handshake.
    pub const CONNECTIONS_OPEN: &str = "sluice_connections_open";
    /// Times the accept loop found the port at its connection cap and waited.
    pub const CONNECTIONS_AT_CAP: &str = "sluice_connections_at_cap_total";
    /// Connections closed before their handshake (TLS, HTTP/2 preface)
    /// finished, by `reason` (`timeout`, `error`).
    pub const HANDSHAKES_FAILED: &str = "sluice_handshakes_failed_total";
    /// Connections closed after their idle timeout.
    pub const CONNECTIONS_IDLE_CLOSED: &str = "sluice_connections_idle_closed_total";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber. Call once, from `main`.
pub fn init_tracing(
    format: LogFormat,
    level: &str,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    let filter =
        || EnvFilter::try_new(level).with_context(|| format!("invalid log level '{level}'"));
    let log_filter = filter()?;
    let (otel_layer, provider) = match otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .context("building the OTLP exporter")?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("sluice")
                        .build(),
                )
                .build();
            let tracer = provider.tracer("sluice");
            // Each layer filters on its own: the log level decides what is
            // logged, and exported traces also get the span of every
            // rate-limit call (at debug, so that without OTLP it costs
            // nothing), unless the log level says otherwise for sluice::grpc.
            // OTEL_TRACES_SAMPLER(_ARG) samples them.
            let mut trace_filter = filter()?;
            if !level.contains("sluice::grpc") {
                trace_filter = trace_filter.add_directive(
                    "sluice::grpc=debug"
                        .parse()
                        .context("the trace filter directive")?,
                );
            }
            (
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(trace_filter),
                ),
                Some(provider),
            )
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(otel_layer);
    match format {
        // Colours only for a terminal: a file or a log collector would keep
        // the escape codes.
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                    .with_filter(log_filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_filter(log_filter),
            )
            .try_init(),
    }
    .context("installing the tracing subscriber")?;
    Ok(provider)
}

/// The process-wide Prometheus recorder, installed on first use. Several
/// servers in one process (tests) share it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (a test harness); keep a
                // private one so /metrics still renders.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// How often [`upkeep`] drains the histogram samples.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// `install_recorder` starts no upkeep: every histogram sample is kept until
/// `/metrics` is rendered, about 40 bytes per request, without bound when
/// nothing scrapes (BENCHMARKS.md). This drains them into the buckets on a
/// timer, for as long as it runs (`sluice serve` runs it as a background
/// task).
pub async fn upkeep(handle: PrometheusHandle) {
    loop {
        tokio::time::sleep(UPKEEP_EVERY).await;
        let handle = handle.clone();
        // Draining is CPU work proportional to the requests since the last
        // time: on a blocking thread, not on a worker serving requests.
        if let Err(e) = tokio::task::spawn_blocking(move || handle.run_upkeep()).await {
            tracing::warn!(error = %e, "metrics upkeep failed");
        }
    }
}
