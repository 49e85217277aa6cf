//! The imperative shell around the core: load the rules, plan, call the
//! store once (bounded by the store timeout), decide, record metrics. The
//! gRPC and JSON front ends both call [`RateLimiter::should_rate_limit`],
//! and [`RateLimiter::explain`] to say why.
//!
//! With rules from PostgreSQL it also finds each descriptor's API key in
//! the rules snapshot (never a query per request) and hands each decision
//! to the usage recorder, which never blocks.

mod api_keys;
mod metric_handles;

pub use api_keys::{ApiKeyPolicy, UnknownKey};

use std::sync::Arc;
use std::time::Duration;

use metrics::counter;

use crate::clock::Clock;
use crate::limiter::{
    self, Caller, Code, CurrentLimit, DescriptorDecision, KeyHasher, Metadata, Outcome,
    PlanOptions, Request, RequestError,
};
use crate::rules::RulesHandle;
use crate::storage::{CounterStore, StoreError};
use crate::telemetry::names;
use crate::usage::UsageRecorder;

/// What to answer when the store cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// Answer OK (the gateways' own default is to let traffic through).
    Allow,
    /// Answer UNAVAILABLE, so the gateway's `failure_mode_deny` decides.
    Deny,
}

#[derive(Clone, Debug)]
pub struct LimiterSettings {
    pub plan: PlanOptions,
    pub failure_mode: FailureMode,
    pub store_timeout: Duration,
    /// Add `RateLimit-Limit/Remaining/Reset` response headers.
    pub rate_limit_headers: bool,
    /// Answer with Envoy dynamic metadata (see [`Verdict::dynamic_metadata`]).
    pub dynamic_metadata: bool,
}

#[cfg(test)]
impl LimiterSettings {
    /// The settings unit tests decide with: sliding windows by default, a
    /// one-second store timeout, no extra headers or metadata.
    pub(crate) fn for_tests(failure_mode: FailureMode) -> LimiterSettings {
        LimiterSettings {
            plan: PlanOptions {
                default_algorithm: crate::limiter::Algorithm::SlidingWindow,
                global_shadow: false,
                global_quota: false,
            },
            failure_mode,
            store_timeout: Duration::from_secs(1),
            rate_limit_headers: false,
            dynamic_metadata: false,
        }
    }
}

pub struct RateLimiter {
    rules: RulesHandle,
    store: Arc<dyn CounterStore>,
    hasher: KeyHasher,
    settings: LimiterSettings,
    clock: Arc<dyn Clock>,
    api_keys: Option<ApiKeyPolicy>,
    usage: Option<UsageRecorder>,
    metrics: metric_handles::DecisionMetrics,
    /// Decisions carry a `tenant` label (rules from PostgreSQL).
    tenant_labels: Option<metric_handles::TenantLabels>,
}

/// The answer, owned, ready for either front end to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub overall: Code,
    pub statuses: Vec<Status>,
    pub response_headers: Vec<(&'static str, String)>,
    /// With dynamic metadata on: the merged `metadata` of the rules that
    /// admitted their descriptor (possibly empty), which the front ends
    /// return beside the request's domain and descriptors.
    pub dynamic_metadata: Option<Metadata>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub limit: Option<CurrentLimit>,
    pub remaining: u32,
    pub reset: Option<Duration>,
    /// Quota left and when it expires (µs since the epoch).
    pub quota: Option<(u32, u64)>,
}

impl Status {
    fn new(s: &DescriptorDecision<'_>, now_us: u64) -> Status {
        Status {
            code: s.code,
            limit: s.limit.clone(),
            remaining: s.remaining,
            reset: s.reset_us.map(Duration::from_micros),
            quota: s.quota.map(|(left, valid_for)| (left, now_us + valid_for)),
        }
    }
}

/// A request explained, for a front end to present: the core's report, and
/// each descriptor's would-be answer as [`Verdict`] holds it.
#[derive(Debug)]
pub struct Explained<'a> {
    pub report: &'a limiter::Report<'a>,
    pub statuses: Vec<Status>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error(transparent)]
    Invalid(#[from] RequestError),
    #[error(transparent)]
    Unavailable(StoreError),
}

impl RateLimiter {
    pub fn new(
        rules: RulesHandle,
        store: Arc<dyn CounterStore>,
        hasher: KeyHasher,
        settings: LimiterSettings,
        clock: Arc<dyn Clock>,
    ) -> RateLimiter {
        RateLimiter {
            rules,
            store,
            hasher,
            settings,
            clock,
            api_keys: None,
            usage: None,
            metrics: Default::default(),
            tenant_labels: None,
        }
    }

    /// Labels decisions with the tenant of the request's API key, for at
    /// most `cap` tenants (the first by name); the rest, and requests
    /// without a key, are `other`. 0 adds no label.
    pub fn with_tenant_labels(mut self, cap: usize) -> RateLimiter {
        self.tenant_labels = (cap > 0).then(|| metric_handles::TenantLabels::new(cap));
        self
    }

    /// Looks up API keys in descriptors (rules from PostgreSQL).
    pub fn with_api_keys(mut self, policy: ApiKeyPolicy) -> RateLimiter {
        self.api_keys = Some(policy);
        self
    }

    /// Counts decisions for usage records.
    pub fn with_usage(mut self, usage: UsageRecorder) -> RateLimiter {
        self.usage = Some(usage);
        self
    }

    pub fn usage(&self) -> Option<&UsageRecorder> {
        self.usage.as_ref()
    }

    pub fn rules(&self) -> &RulesHandle {
        &self.rules
    }

    pub fn store(&self) -> &Arc<dyn CounterStore> {
        &self.store
    }

    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn settings(&self) -> &LimiterSettings {
        &self.settings
    }

    /// Decides one request.
    pub async fn should_rate_limit(&self, request: &Request<'_>) -> Result<Verdict, DecideError> {
        if let Err(e) = request.validate() {
            counter!(names::INVALID_REQUESTS).increment(1);
            return Err(e.into());
        }
        let rules = self.rules.load();
        let callers = match &self.api_keys {
            Some(policy) => policy.callers(request, &rules, &self.hasher),
            None => Vec::new(),
        };
        let plan = limiter::plan_for(request, &rules, &callers, &self.hasher, self.settings.plan);
        let tenant_label = self.tenant_labels.as_ref().map(|labels| {
            let tenant = callers.iter().find_map(|c| match c {
                Caller::Key(key) => Some(&*key.tenant),
                _ => None,
            });
            labels.label(&rules, tenant)
        });
        let domain_label = if plan.domain_known {
            request.domain
        } else {
            counter!(names::UNKNOWN_DOMAIN).increment(1);
            names::UNKNOWN_DOMAIN_LABEL
        };

        let outcomes = if plan.ops.is_empty() {
            Vec::new()
        } else {
            match self.apply(&plan.ops, &plan.vetoes).await {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    let verdict =
                        self.answer_failure(domain_label, tenant_label, plan.items.len(), e);
                    if let (Some(usage), Ok(_)) = (&self.usage, &verdict) {
                        // Let through by the failure mode: allowed, uncounted.
                        usage.record_allowed(request, &callers, self.clock.now_us());
                    }
                    return verdict;
                }
            }
        };
        let decision = limiter::decide(&plan, &outcomes, self.settings.plan);
        let now_us = self.clock.now_us();
        if let Some(usage) = &self.usage {
            usage.record_decision(request, &callers, &decision, &self.hasher, now_us);
        }

        self.metrics.record(domain_label, tenant_label, &decision);

        let mut response_headers = Vec::new();
        if self.settings.rate_limit_headers {
            if let Some(s) = decision.most_constrained() {
                if let Some(limit) = &s.limit {
                    let reset_s = s.reset_us.unwrap_or(0).div_ceil(1_000_000);
                    response_headers.push(("RateLimit-Limit", limit.requests_per_unit.to_string()));
                    response_headers.push(("RateLimit-Remaining", s.remaining.to_string()));
                    response_headers.push(("RateLimit-Reset", reset_s.to_string()));
                }
            }
        }
        let dynamic_metadata = self
            .settings
            .dynamic_metadata
            .then(|| decision.passed_metadata());
        Ok(Verdict {
            overall: decision.overall,
            statuses: decision
                .statuses
                .iter()
                .map(|s| Status::new(s, now_us))
                .collect(),
            response_headers,
            dynamic_metadata,
        })
    }

    /// Explains a request: for each descriptor, which rule matched and why,
    /// the counters' state, and what [`RateLimiter::should_rate_limit`]
    /// would answer now. Counts nothing: the store is only read (0 hits),
    /// no usage is recorded, and a store failure is an error whatever the
    /// failure mode, since an answer by the failure mode explains nothing.
    ///
    /// The report borrows the rules snapshot, so it is handed to `present`,
    /// which turns it into the front end's answer.
    pub async fn explain<T>(
        &self,
        request: &Request<'_>,
        present: impl FnOnce(&Explained<'_>) -> T,
    ) -> Result<T, DecideError> {
        request.validate()?;
        let rules = self.rules.load();
        let callers = match &self.api_keys {
            Some(policy) => policy.callers(request, &rules, &self.hasher),
            None => Vec::new(),
        };
        let explanation =
            limiter::explain(request, &rules, &callers, &self.hasher, self.settings.plan);
        let reads = if explanation.reads().is_empty() {
            Vec::new()
        } else {
            let reads = explanation.reads();
            self.timed(self.store.apply(reads))
                .await
                .map_err(DecideError::Unavailable)?
        };
        let report = explanation.conclude(&reads, self.settings.plan);
        let now_us = self.clock.now_us();
        let statuses = report
            .decision
            .statuses
            .iter()
            .map(|s| Status::new(s, now_us))
            .collect();
        Ok(present(&Explained {
            report: &report,
            statuses,
        }))
    }

    /// One store call, never longer than the store timeout.
    async fn apply(
        &self,
        ops: &[limiter::CounterOp],
        vetoes: &[bool],
    ) -> Result<Vec<Outcome>, StoreError> {
        self.timed(self.store.apply_request(ops, vetoes)).await
    }

    /// A store call bounded by the store timeout, and timed.
    async fn timed(
        &self,
        call: impl std::future::Future<Output = Result<Vec<Outcome>, StoreError>>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let timeout = self.settings.store_timeout;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(timeout)),
        };
        self.metrics
            .store_duration(self.store.kind())
            .record(started.elapsed().as_secs_f64());
        result
    }

    fn answer_failure(
        &self,
        domain_label: &str,
        tenant_label: Option<&str>,
        descriptors: usize,
        error: StoreError,
    ) -> Result<Verdict, DecideError> {
        counter!(names::STORE_ERRORS, "kind" => error.kind()).increment(1);
        let mode = match self.settings.failure_mode {
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
        };
        counter!(names::FAILURE_MODE_ANSWERS, "mode" => mode).increment(1);
        // Per-request detail only at debug: during an outage every call fails,
        // and the store reports its own state changes once.
        tracing::debug!(domain = domain_label, error = %error, failure_mode = mode, "store failed; answering by the failure mode");
        match self.settings.failure_mode {
            FailureMode::Allow => {
                self.metrics.record_failure_mode(domain_label, tenant_label);
                Ok(Verdict {
                    overall: Code::Ok,
                    statuses: vec![
                        Status {
                            code: Code::Ok,
                            limit: None,
                            remaining: 0,
                            reset: None,
                            quota: None,
                        };
                        descriptors
                    ],
                    response_headers: Vec::new(),
                    // Nothing was decided, so no rule's metadata.
                    dynamic_metadata: self.settings.dynamic_metadata.then(Metadata::default),
                })
            }
            FailureMode::Deny => Err(DecideError::Unavailable(error)),
        }
    }
}
