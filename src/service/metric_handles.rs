//! Metric handles for the decision path, resolved once per label set.
//!
//! `counter!(NAME, "domain" => d.to_owned(), ...)` allocates its labels,
//! builds and hashes a key and looks it up in the recorder's registry on
//! every call: several thousand instructions per request in all (see
//! BENCHMARKS.md). The labels here are bounded (a domain of the rules, a
//! rule's path from the rules file, a code), so each handle is resolved the
//! first time its labels are seen and kept; a request then reads a snapshot
//! of a map, lock-free, with borrowed `&str` keys.
//!
//! Handles register lazily (`OnceLock`), so a series appears in `/metrics`
//! once it has been counted, as with the plain macros, and only after the
//! recorder is installed (which happens after the limiter is built).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use metrics::{counter, histogram, Counter, Histogram};

use crate::limiter::{Code, Decision};
use crate::telemetry::names;

/// Decision counters by domain label, then by rule path; the store's
/// latency histogram.
#[derive(Default)]
pub(super) struct DecisionMetrics {
    domains: ArcSwap<HashMap<Box<str>, Arc<DomainMetrics>>>,
    store_duration: OnceLock<Histogram>,
}

struct DomainMetrics {
    label: Box<str>,
    decisions: [OnceLock<Counter>; 2],
    global_shadow: OnceLock<Counter>,
    rules: ArcSwap<HashMap<Arc<str>, Arc<RuleMetrics>>>,
}

#[derive(Default)]
struct RuleMetrics {
    hits: [OnceLock<Counter>; 2],
    shadow: OnceLock<Counter>,
    near_limit: OnceLock<Counter>,
}

fn code_index(code: Code) -> usize {
    match code {
        Code::Ok => 0,
        Code::OverLimit => 1,
    }
}

impl DecisionMetrics {
    /// Counts one decision: per limited descriptor by rule (and shadow-mode
    /// and near-limit hits), then the request by domain and overall code.
    /// `domain` is a domain of the rules or [`names::UNKNOWN_DOMAIN_LABEL`].
    pub(super) fn record(&self, domain: &str, decision: &Decision<'_>) {
        let domains = self.domains.load();
        let d = match domains.get(domain) {
            Some(d) => d,
            None => &self.insert_domain(domain),
        };
        for status in &decision.statuses {
            let Some(rule) = status.rule else { continue };
            if status.limit.is_none() {
                continue;
            }
            let rules = d.rules.load();
            let m = match rules.get(&*rule.path) {
                Some(m) => m,
                None => &d.insert_rule(&rule.path),
            };
            let path = || rule.path.to_string();
            let code = status.code;
            m.hits[code_index(code)]
                .get_or_init(|| {
                    counter!(names::RULE_HITS, "domain" => d.label.to_string(), "rule" => path(), "code" => code.as_str())
                })
                .increment(1);
            if status.shadowed {
                m.shadow
                    .get_or_init(|| {
                        counter!(names::SHADOW_MODE, "domain" => d.label.to_string(), "rule" => path())
                    })
                    .increment(1);
            }
            if status.near_limit {
                m.near_limit
                    .get_or_init(|| {
                        counter!(names::NEAR_LIMIT, "domain" => d.label.to_string(), "rule" => path())
                    })
                    .increment(1);
            }
        }
        if decision.global_shadowed {
            d.global_shadow
                .get_or_init(|| counter!(names::GLOBAL_SHADOW, "domain" => d.label.to_string()))
                .increment(1);
        }
        let code = decision.overall;
        d.decisions[code_index(code)]
            .get_or_init(|| {
                counter!(names::DECISIONS, "domain" => d.label.to_string(), "code" => code.as_str())
            })
            .increment(1);
    }

    /// `kind` is the store's, fixed for the limiter's life.
    pub(super) fn store_duration(&self, kind: &'static str) -> &Histogram {
        self.store_duration
            .get_or_init(|| histogram!(names::STORE_DURATION, "store" => kind))
    }

    /// Inserts are rare (once per label), so copy-on-write; `rcu` retries
    /// on a race and keeps whichever entry got in first.
    fn insert_domain(&self, label: &str) -> Arc<DomainMetrics> {
        let made = Arc::new(DomainMetrics {
            label: label.into(),
            decisions: Default::default(),
            global_shadow: OnceLock::new(),
            rules: ArcSwap::default(),
        });
        let mut entry = None;
        self.domains.rcu(|current| {
            let mut next = HashMap::clone(current);
            entry = Some(
                next.entry(label.into())
                    .or_insert_with(|| made.clone())
                    .clone(),
            );
            next
        });
        entry.unwrap_or(made)
    }
}

impl DomainMetrics {
    fn insert_rule(&self, path: &Arc<str>) -> Arc<RuleMetrics> {
        let mut entry = None;
        self.rules.rcu(|current| {
            let mut next = HashMap::clone(current);
            entry = Some(next.entry(path.clone()).or_default().clone());
            next
        });
        entry.unwrap_or_default()
    }
}
