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
//!
//! With rules from PostgreSQL, decisions also carry a `tenant` label
//! ([`TenantLabels`]): the tenant of the request's API key if it is one of
//! the first `--metrics-tenants` tenants of the rules snapshot (by name),
//! else `other`, so the label has at most that many values plus one.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::{ArcSwap, ArcSwapOption};
use metrics::{counter, histogram, Counter, Histogram};

use crate::limiter::{Code, Decision, RuleSet};
use crate::telemetry::names;

/// The handles' maps: foldhash, not SipHash, as the rules' own maps
/// (`limiter::ruleset`). Their keys are bounded by the rules (a domain of
/// the rules or the unknown label, a rule's path, a tenant label), so no
/// client can fill them; a decision looks up two of them.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

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
    /// Decisions by tenant label, when decisions carry one.
    tenants: ArcSwap<HashMap<Box<str>, Arc<ByCode>>>,
    global_shadow: OnceLock<Counter>,
    rules: ArcSwap<HashMap<Arc<str>, Arc<RuleMetrics>>>,
}

/// One counter per decision code (see `code_index`).
type ByCode = [OnceLock<Counter>; 2];

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
    /// and near-limit hits), then the request by domain (and tenant, when
    /// given) and overall code. `domain` is a domain of the rules or
    /// [`names::UNKNOWN_DOMAIN_LABEL`].
    pub(super) fn record(&self, domain: &str, tenant: Option<&str>, decision: &Decision<'_>) {
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
        self.count(d, tenant, decision.overall);
    }

    /// Counts a decision the failure mode made (allow): no rule decided it.
    pub(super) fn record_failure_mode(&self, domain: &str, tenant: Option<&str>) {
        let domains = self.domains.load();
        let d = match domains.get(domain) {
            Some(d) => d,
            None => &self.insert_domain(domain),
        };
        self.count(d, tenant, Code::Ok);
    }

    fn count(&self, d: &DomainMetrics, tenant: Option<&str>, code: Code) {
        let Some(tenant) = tenant else {
            d.decisions[code_index(code)]
                .get_or_init(|| {
                    counter!(names::DECISIONS, "domain" => d.label.to_string(), "code" => code.as_str())
                })
                .increment(1);
            return;
        };
        let tenants = d.tenants.load();
        let counters = match tenants.get(tenant) {
            Some(c) => c,
            None => &d.insert_tenant(tenant),
        };
        counters[code_index(code)]
            .get_or_init(|| {
                counter!(names::DECISIONS, "domain" => d.label.to_string(), "tenant" => tenant.to_owned(), "code" => code.as_str())
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
            tenants: ArcSwap::default(),
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
    fn insert_tenant(&self, label: &str) -> Arc<ByCode> {
        let mut entry = None;
        self.tenants.rcu(|current| {
            let mut next = HashMap::clone(current);
            entry = Some(next.entry(label.into()).or_default().clone());
            next
        });
        entry.unwrap_or_default()
    }

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

// === TenantLabels ===

/// Which tenants get a `tenant` label of their own: the first `cap` tenant
/// names (sorted) among the live API keys of the rules in force, computed
/// once per rules snapshot. Every pod that loads the same rules picks the
/// same tenants, so their series add up.
pub(super) struct TenantLabels {
    cap: usize,
    /// The snapshot the set was computed for (held weakly: a dropped
    /// snapshot's address cannot be reused while this points at it).
    cached: ArcSwapOption<(Weak<RuleSet>, HashSet<Arc<str>>)>,
}

impl TenantLabels {
    pub(super) fn new(cap: usize) -> TenantLabels {
        TenantLabels {
            cap,
            cached: ArcSwapOption::empty(),
        }
    }

    /// `tenant` itself if it is labelled under `rules`, else `other`.
    pub(super) fn label<'t>(&self, rules: &Arc<RuleSet>, tenant: Option<&'t str>) -> &'t str {
        let Some(tenant) = tenant else {
            return names::OTHER_TENANT_LABEL;
        };
        let cached = self.cached.load();
        let labelled = match &*cached {
            Some(c) if std::ptr::eq(c.0.as_ptr(), Arc::as_ptr(rules)) => c.1.contains(tenant),
            _ => {
                let set = self.labelled(rules);
                let found = set.contains(tenant);
                self.cached
                    .store(Some(Arc::new((Arc::downgrade(rules), set))));
                found
            }
        };
        if labelled {
            tenant
        } else {
            names::OTHER_TENANT_LABEL
        }
    }

    fn labelled(&self, rules: &RuleSet) -> HashSet<Arc<str>> {
        let mut tenants: Vec<&Arc<str>> = rules.api_keys().map(|k| &k.tenant).collect();
        tenants.sort();
        tenants.dedup();
        if tenants.len() > self.cap {
            tracing::info!(
                tenants = tenants.len(),
                labelled = self.cap,
                "more tenants than --metrics-tenants: the rest count as tenant=\"other\""
            );
        }
        tenants.into_iter().take(self.cap).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::ApiKey;

    fn rules(tenants: &[&str]) -> Arc<RuleSet> {
        let mut rules = RuleSet::new();
        for (i, t) in tenants.iter().enumerate() {
            rules.insert_api_key(
                &format!("hash{i}"),
                ApiKey {
                    tenant_id: format!("id-{t}").into(),
                    tenant: (*t).into(),
                    plan: "free".into(),
                    monthly_quota: None,
                    time_zone: chrono_tz::Tz::UTC,
                },
            );
        }
        Arc::new(rules)
    }

    #[test]
    fn the_first_tenants_by_name_are_labelled_the_rest_are_other() {
        let labels = TenantLabels::new(2);
        let r = rules(&["zeta", "acme", "beta", "acme"]);
        assert_eq!(labels.label(&r, Some("acme")), "acme");
        assert_eq!(labels.label(&r, Some("beta")), "beta");
        assert_eq!(labels.label(&r, Some("zeta")), "other", "beyond the cap");
        assert_eq!(labels.label(&r, Some("ghost")), "other", "no such tenant");
        assert_eq!(labels.label(&r, None), "other", "no key");
        // A new snapshot is seen at once.
        let r = rules(&["zeta"]);
        assert_eq!(labels.label(&r, Some("zeta")), "zeta");
        assert_eq!(labels.label(&r, Some("acme")), "other", "gone");
        assert_eq!(TenantLabels::new(0).label(&r, Some("zeta")), "other");
    }
}
