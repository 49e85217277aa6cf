//! `plan` turns a request into counter operations; `decide` turns the
//! counters' outcomes into the answer. Between them sits one call to the
//! store, the only I/O of a decision.

use std::ops::Range;
use std::sync::Arc;

use super::window::{CounterSpec, Outcome};
use super::{Algorithm, Code, CounterKey, Descriptor, KeyHasher, Request, Unit};
use super::{ApiKey, Calendar, CalendarUnit, Limit, Metadata, Rule, RuleLimit, RuleSet, Window};

/// Server-wide settings that shape a plan and a decision.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanOptions {
    /// For rules that name no algorithm, and for limit overrides.
    pub default_algorithm: Algorithm,
    /// Global shadow mode: count everything, deny nothing.
    pub global_shadow: bool,
    /// Global quota mode: every descriptor (but `unlimited` ones) is a quota,
    /// as if its rule had `quota_mode`; see [`decide`].
    pub global_quota: bool,
}

/// One counter to check and update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterOp {
    pub key: CounterKey,
    pub spec: CounterSpec,
    /// 0 checks without consuming.
    pub hits: u64,
}

/// Who sent a descriptor, as the shell found from its API-key entry.
#[derive(Clone, Copy, Debug, Default)]
pub enum Caller<'r> {
    /// No API key, or an unknown one answered with the anonymous limits:
    /// the domain's rules.
    #[default]
    Anonymous,
    /// A live key: its tenant's or plan's rules, and its tenant's quota.
    Key(&'r ApiKey),
    /// An unknown or revoked key, refused.
    Refused,
}

/// The name reported for a tenant's monthly quota.
pub const MONTHLY_QUOTA: &str = "monthly_quota";

/// What a descriptor of the request turned into.
#[derive(Clone, Debug)]
pub enum PlanItem<'r> {
    /// No rule matched, or the domain is unknown: OK without a limit.
    NoLimit,
    /// Sent with an unknown or revoked API key: over the limit, nothing counted.
    Refused,
    /// An `unlimited` rule matched: OK, nothing counted.
    Unlimited { rule: &'r Rule },
    /// Matched, but another matched rule `replaces` it: nothing counted.
    Replaced { rule: &'r Rule },
    /// Counted against `limits[limits]` of the plan (one, or several for a
    /// rule with `rate_limits`), each by its own operation; all of them must
    /// admit a hit. `rule` is `None` for a caller's limit override.
    Limited {
        rule: Option<&'r Rule>,
        limits: Range<usize>,
    },
}

impl PlanItem<'_> {
    /// Whether the descriptor counts as a quota when [`decide`] combines the
    /// answers: its rule has `quota_mode`, or global quota mode is on (then
    /// every descriptor does but `unlimited` ones, matched or not).
    fn is_quota(&self, options: PlanOptions) -> bool {
        match self {
            PlanItem::Unlimited { .. } | PlanItem::Refused => false,
            PlanItem::Limited { rule, .. } => {
                options.global_quota || rule.is_some_and(|r| r.quota_mode)
            }
            PlanItem::NoLimit | PlanItem::Replaced { .. } => options.global_quota,
        }
    }
}

/// One limit a descriptor is counted against, counted by `ops[op]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedLimit<'r> {
    pub requests_per_unit: u32,
    pub window: Window,
    pub name: Option<&'r Arc<str>>,
    pub op: usize,
}

/// A tenant's monthly quota, counted by `ops[op]` and reported on the
/// status of descriptor `descriptor` (the first one sent with the tenant's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaItem {
    pub descriptor: usize,
    pub op: usize,
    pub limit: u32,
    /// The tenant's billing cycle.
    pub cycle: Calendar,
}

#[derive(Clone, Debug)]
pub struct Plan<'r> {
    pub domain_known: bool,
    pub items: Vec<PlanItem<'r>>,
    /// The limits of the `Limited` items, in order.
    pub limits: Vec<PlannedLimit<'r>>,
    /// What the store is asked, in order.
    pub ops: Vec<CounterOp>,
    /// Per op: whether its denial denies the whole request, as [`decide`]
    /// judges: all but those of shadow-mode rules and of quotas, and none in
    /// global shadow mode; a quota's only when it is the request's only one
    /// (several deny only together, which one store call cannot express,
    /// so their requests may consume what the others admit). The store
    /// consumes nothing for a request one of them denies.
    pub vetoes: Vec<bool>,
    pub quotas: Vec<QuotaItem>,
}

impl<'r> Plan<'r> {
    fn new(
        domain_known: bool,
        items: Vec<PlanItem<'r>>,
        limits: Vec<PlannedLimit<'r>>,
        mut ops: Vec<CounterOp>,
        quotas: Vec<QuotaItem>,
        options: PlanOptions,
    ) -> Plan<'r> {
        let mut vetoes = vec![!options.global_shadow; ops.len()];
        let quotas_in_request = items.iter().filter(|item| item.is_quota(options)).count();
        for item in &items {
            if let PlanItem::Limited {
                rule,
                limits: range,
            } = item
            {
                // Every limit of the descriptor: a quota among several is no
                // veto, whichever of its windows denies.
                let shadow = rule.is_some_and(|r| r.shadow_mode);
                if shadow || (item.is_quota(options) && quotas_in_request > 1) {
                    for limit in limits.get(range.clone()).unwrap_or_default() {
                        if let Some(veto) = vetoes.get_mut(limit.op) {
                            *veto = false;
                        }
                    }
                }
            }
        }
        // A refused API key denies the request whatever the counters say:
        // they are only checked, so that it consumes nothing.
        let refused = items.iter().any(|item| matches!(item, PlanItem::Refused));
        if refused && !options.global_shadow {
            for op in &mut ops {
                op.hits = 0;
            }
        }
        Plan {
            domain_known,
            items,
            limits,
            ops,
            vetoes,
            quotas,
        }
    }
}

/// Matches every descriptor of a validated request against the rules.
pub fn plan<'r>(
    request: &Request<'_>,
    rules: &'r RuleSet,
    hasher: &KeyHasher,
    options: PlanOptions,
) -> Plan<'r> {
    plan_for(request, rules, &[], hasher, options)
}

/// [`plan`] for a request whose descriptors were sent by `callers` (one per
/// descriptor; missing ones are anonymous). A key's descriptor is matched
/// against its tenant's or plan's rules; each tenant's monthly quota is
/// counted once per request, alongside the per-unit limits.
pub fn plan_for<'r>(
    request: &Request<'_>,
    rules: &'r RuleSet,
    callers: &[Caller<'r>],
    hasher: &KeyHasher,
    options: PlanOptions,
) -> Plan<'r> {
    let caller = |i: usize| callers.get(i).copied().unwrap_or_default();
    let domain_known = rules.has_domain(request.domain);
    let mut items = Vec::with_capacity(request.descriptors.len());
    let mut limits = Vec::with_capacity(request.descriptors.len());
    let mut ops = Vec::with_capacity(request.descriptors.len());
    let mut quotas = Vec::new();
    let mut tenants_counted: Vec<&str> = Vec::new();
    let mut count_quota = |index: usize, hits: u64, ops: &mut Vec<CounterOp>| {
        let Caller::Key(key) = caller(index) else {
            return;
        };
        let Some(limit) = key.monthly_quota else {
            return;
        };
        if tenants_counted.contains(&&*key.tenant_id) {
            return;
        }
        tenants_counted.push(&key.tenant_id);
        // A billing cycle: the calendar month in the tenant's zone, as
        // usage reports and invoices count it.
        let cycle = Calendar {
            unit: CalendarUnit::Month,
            time_zone: key.time_zone,
        };
        quotas.push(QuotaItem {
            descriptor: index,
            op: ops.len(),
            limit,
            cycle,
        });
        ops.push(CounterOp {
            key: hasher.quota_key(&key.tenant_id, Unit::Month.seconds()),
            spec: CounterSpec {
                algorithm: Algorithm::FixedWindow,
                limit: u64::from(limit),
                period_us: Unit::Month.period_us(),
                burst: u64::from(limit),
                calendar: Some(cycle),
            },
            hits,
        });
    };

    if !domain_known {
        for (i, d) in request.descriptors.iter().enumerate() {
            if matches!(caller(i), Caller::Refused) {
                items.push(PlanItem::Refused);
                continue;
            }
            items.push(PlanItem::NoLimit);
            count_quota(i, d.hits.unwrap_or(request.hits), &mut ops);
        }
        return Plan::new(domain_known, items, limits, ops, quotas, options);
    }

    let matches: Vec<_> = request
        .descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| match (d.limit_override, caller(i)) {
            (Some(_), _) | (None, Caller::Refused) => None,
            (None, Caller::Anonymous) => rules.lookup(request.domain, &d.entries),
            (None, Caller::Key(key)) => rules.lookup_for_key(request.domain, key, &d.entries),
        })
        .collect();
    // A limit named in another matched rule's `replaces` is dropped.
    let replaced = |limit: &Limit| {
        limit.name.as_ref().is_some_and(|name| {
            matches
                .iter()
                .flatten()
                .any(|m| m.rule.replaces.iter().any(|r| r == name))
        })
    };

    for (index, (descriptor, matched)) in request.descriptors.iter().zip(&matches).enumerate() {
        let hits = descriptor.hits.unwrap_or(request.hits);
        if matches!(caller(index), Caller::Refused) {
            items.push(PlanItem::Refused);
            continue;
        }
        count_quota(index, hits, &mut ops);
        let first = limits.len();
        let (rule, shared): (_, &[_]) = match (descriptor.limit_override, matched) {
            (Some(o), _) => {
                let limit = Limit {
                    requests_per_unit: o.requests_per_unit,
                    window: Window::of(o.unit),
                    algorithm: None,
                    burst: None,
                    name: None,
                };
                let counted = Counted {
                    domain: request.domain,
                    descriptor,
                    shared: &[],
                    hits,
                    quota_mode: false,
                };
                counted.push(&limit, None, hasher, options, &mut limits, &mut ops);
                items.push(PlanItem::Limited {
                    rule: None,
                    limits: first..limits.len(),
                });
                continue;
            }
            (None, None) => {
                items.push(PlanItem::NoLimit);
                continue;
            }
            (None, Some(m)) => (m.rule, &m.shared[..]),
        };
        let RuleLimit::Limited(rule_limits) = &rule.limit else {
            items.push(PlanItem::Unlimited { rule });
            continue;
        };
        let counted = Counted {
            domain: request.domain,
            descriptor,
            shared,
            hits,
            quota_mode: rule.quota_mode,
        };
        for limit in rule_limits.iter().filter(|l| !replaced(l)) {
            let name = limit.name.as_ref();
            counted.push(limit, name, hasher, options, &mut limits, &mut ops);
        }
        items.push(if limits.len() == first {
            PlanItem::Replaced { rule }
        } else {
            PlanItem::Limited {
                rule: Some(rule),
                limits: first..limits.len(),
            }
        });
    }
    Plan::new(domain_known, items, limits, ops, quotas, options)
}

/// A descriptor being counted: what each of its limits' operations needs.
struct Counted<'a, 'd> {
    domain: &'a str,
    descriptor: &'a Descriptor<'d>,
    shared: &'a [Option<&'a str>],
    hits: u64,
    quota_mode: bool,
}

impl Counted<'_, '_> {
    /// Plans one limit: its operation, and what to report (as `name`).
    fn push<'r>(
        &self,
        limit: &Limit,
        name: Option<&'r Arc<str>>,
        hasher: &KeyHasher,
        options: PlanOptions,
        limits: &mut Vec<PlannedLimit<'r>>,
        ops: &mut Vec<CounterOp>,
    ) {
        let entries = &self.descriptor.entries;
        let requests = u64::from(limit.requests_per_unit);
        let (key, spec) = match limit.window {
            Window::Units { .. } => {
                // A quota resets at window boundaries; it never slides.
                let algorithm = if self.quota_mode {
                    Algorithm::FixedWindow
                } else {
                    limit.algorithm.unwrap_or(options.default_algorithm)
                };
                let seconds = limit.window.seconds();
                let key = hasher.counter_key(self.domain, entries, self.shared, algorithm, seconds);
                let spec = CounterSpec {
                    algorithm,
                    limit: requests,
                    period_us: seconds * 1_000_000,
                    burst: limit.burst.map_or(requests, u64::from),
                    calendar: None,
                };
                (key, spec)
            }
            // Calendar windows are fixed windows, whatever the default.
            Window::Calendar(calendar) => {
                let key = hasher.calendar_key(self.domain, entries, self.shared, calendar);
                let spec = CounterSpec {
                    algorithm: Algorithm::FixedWindow,
                    limit: requests,
                    period_us: limit.window.seconds() * 1_000_000,
                    burst: requests,
                    calendar: Some(calendar),
                };
                (key, spec)
            }
        };
        limits.push(PlannedLimit {
            requests_per_unit: limit.requests_per_unit,
            window: limit.window,
            name,
            op: ops.len(),
        });
        ops.push(CounterOp {
            key,
            spec,
            hits: self.hits,
        });
    }
}

/// The limit reported back to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentLimit {
    pub requests_per_unit: u32,
    pub window: Window,
    pub name: Option<Arc<str>>,
}

/// The answer for one descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorDecision<'r> {
    pub code: Code,
    pub limit: Option<CurrentLimit>,
    pub remaining: u32,
    pub reset_us: Option<u64>,
    /// For `quota_mode` rules: what is left and for how long.
    pub quota: Option<(u32, u64)>,
    /// The rule that matched (none for overrides and unmatched descriptors).
    pub rule: Option<&'r Rule>,
    /// Over the limit, but let through by the rule's shadow mode.
    pub shadowed: bool,
    /// Admitted with 80% or more of the limit in use.
    pub near_limit: bool,
    /// Sent with an unknown or revoked API key, and refused for it.
    pub refused: bool,
    /// The limit reported is the tenant's monthly quota, which denied the
    /// descriptor or bounds it more than its own limit.
    pub tenant_quota: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'r> {
    pub overall: Code,
    pub statuses: Vec<DescriptorDecision<'r>>,
    /// Over the limit, but let through by the global shadow mode.
    pub global_shadowed: bool,
}

impl<'r> Decision<'r> {
    /// The status that bounds the caller most: an over-limit one, else the
    /// limited one with the least remaining.
    pub fn most_constrained(&self) -> Option<&DescriptorDecision<'r>> {
        self.statuses
            .iter()
            .filter(|s| s.limit.is_some())
            .min_by_key(|s| (s.code != Code::OverLimit, s.remaining))
    }

    /// The `metadata` of the rules that admitted their descriptor (not those
    /// over their limit, nor `unlimited` or replaced ones), merged in request
    /// order as envoyproxy/ratelimit merges them: the first value of a key
    /// wins, maps merge key by key.
    pub fn passed_metadata(&self) -> Metadata {
        let mut merged = Metadata::default();
        for s in &self.statuses {
            if let (Code::Ok, Some(_), Some(rule)) = (s.code, &s.limit, s.rule) {
                merged.merge(&rule.metadata);
            }
        }
        merged
    }
}

/// Combines the store's outcomes (one per `plan.ops`) into the answer.
pub fn decide<'r>(plan: &Plan<'r>, outcomes: &[Outcome], options: PlanOptions) -> Decision<'r> {
    let mut statuses: Vec<_> = plan
        .items
        .iter()
        .map(|item| match *item {
            PlanItem::NoLimit => unlimited_status(None, 0),
            PlanItem::Refused => DescriptorDecision {
                code: Code::OverLimit,
                refused: true,
                ..unlimited_status(None, 0)
            },
            PlanItem::Replaced { rule } => unlimited_status(Some(rule), 0),
            PlanItem::Unlimited { rule } => unlimited_status(Some(rule), u32::MAX),
            PlanItem::Limited { rule, ref limits } => {
                // The descriptor's answer is its most constrained limit's.
                let mut chosen: Option<(&PlannedLimit<'r>, &Outcome)> = None;
                for limit in plan.limits.get(limits.clone()).unwrap_or_default() {
                    let outcome = &outcomes[limit.op];
                    if chosen.is_none_or(|(_, o)| constraint(outcome) > constraint(o)) {
                        chosen = Some((limit, outcome));
                    }
                }
                match chosen {
                    Some((limit, outcome)) => limited_status(plan, rule, limit, outcome),
                    None => unlimited_status(rule, 0),
                }
            }
        })
        .collect();
    for quota in &plan.quotas {
        let (Some(outcome), Some(status)) =
            (outcomes.get(quota.op), statuses.get_mut(quota.descriptor))
        else {
            continue;
        };
        let remaining = u32::try_from(outcome.remaining).unwrap_or(u32::MAX);
        let bounds_more = status.limit.is_none() || remaining < status.remaining;
        if outcome.admitted && !(bounds_more && status.code == Code::Ok) {
            continue;
        }
        status.code = if outcome.admitted {
            status.code
        } else {
            Code::OverLimit
        };
        status.limit = Some(CurrentLimit {
            requests_per_unit: quota.limit,
            window: Window::Calendar(quota.cycle),
            name: Some(Arc::from(MONTHLY_QUOTA)),
        });
        status.remaining = remaining;
        status.reset_us = Some(outcome.reset_us);
        status.shadowed = false;
        status.near_limit = outcome.admitted && outcome.used * 10 >= u64::from(quota.limit) * 8;
        status.tenant_quota = true;
    }
    // envoyproxy/ratelimit's rule: the request is over when a descriptor
    // that is not a quota is over, or when every quota is; a quota that is
    // over while another is not leaves its own status OVER_LIMIT only.
    let (mut quotas, mut quotas_over, mut others_over) = (0, 0, false);
    for (item, status) in plan.items.iter().zip(&statuses) {
        // A tenant's monthly quota is a hard limit, whatever the rule says.
        let quota =
            item.is_quota(options) && !(status.tenant_quota && status.code == Code::OverLimit);
        let is_over = status.code == Code::OverLimit;
        quotas += usize::from(quota);
        quotas_over += usize::from(quota && is_over);
        others_over |= !quota && is_over;
    }
    let over = others_over || (quotas > 0 && quotas == quotas_over);
    let global_shadowed = over && options.global_shadow;
    Decision {
        overall: if over && !global_shadowed {
            Code::OverLimit
        } else {
            Code::Ok
        },
        statuses,
        global_shadowed,
    }
}

/// How much a limit's outcome bounds the caller, as an order: a denial
/// before an admission; among denials the longest wait; among admissions the
/// fewest hits remaining (what Envoy's `x-ratelimit-remaining` compares),
/// then the latest reset.
fn constraint(outcome: &Outcome) -> (bool, u64, u64) {
    if outcome.admitted {
        (false, u64::MAX - outcome.remaining, outcome.reset_us)
    } else {
        (true, outcome.reset_us, 0)
    }
}

/// The status of a descriptor answered by one of its limits.
fn limited_status<'r>(
    plan: &Plan<'r>,
    rule: Option<&'r Rule>,
    limit: &PlannedLimit<'r>,
    outcome: &Outcome,
) -> DescriptorDecision<'r> {
    let shadow = rule.is_some_and(|r| r.shadow_mode);
    let remaining = u32::try_from(outcome.remaining).unwrap_or(u32::MAX);
    DescriptorDecision {
        code: if outcome.admitted || shadow {
            Code::Ok
        } else {
            Code::OverLimit
        },
        limit: Some(CurrentLimit {
            requests_per_unit: limit.requests_per_unit,
            window: limit.window,
            name: limit.name.cloned(),
        }),
        remaining,
        reset_us: Some(outcome.reset_us),
        quota: rule
            .filter(|r| r.quota_mode)
            .map(|_| (remaining, outcome.reset_us)),
        rule,
        shadowed: shadow && !outcome.admitted,
        near_limit: outcome.admitted && outcome.used * 10 >= capacity(&plan.ops[limit.op].spec) * 8,
        refused: false,
        tenant_quota: false,
    }
}

/// What `Outcome::used` is measured against: the bucket for GCRA, the
/// window's limit otherwise.
fn capacity(spec: &CounterSpec) -> u64 {
    match spec.algorithm {
        Algorithm::Gcra => spec.burst,
        Algorithm::SlidingWindow | Algorithm::FixedWindow => spec.limit,
    }
}

fn unlimited_status(rule: Option<&Rule>, remaining: u32) -> DescriptorDecision<'_> {
    DescriptorDecision {
        code: Code::Ok,
        limit: None,
        remaining,
        reset_us: None,
        quota: None,
        rule,
        shadowed: false,
        near_limit: false,
        refused: false,
        tenant_quota: false,
    }
}

#[cfg(test)]
mod tenant_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod window_tests;
