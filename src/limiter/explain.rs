//! Explaining a request, for operators asking "which limit fired?": for each
//! descriptor, which rule matched and how, what the matcher passed over on
//! the way, the counters' state, and what the answer would be.
//!
//! Nothing here decides anew. The request is planned by [`plan_for`]; each
//! descriptor's path is walked by the lookup's own walk and matcher
//! (`ruleset::walk`, with a visitor that records each step); the plan's
//! counter operations become reads (0 hits: a store checks without
//! consuming), and [`decide`] answers from what the request's hits would
//! have done to them. Nothing is counted.

use std::fmt::{self, Write as _};
use std::sync::Arc;

use super::plan::{decide, plan_for, Caller, Decision, Plan, PlanItem, PlanOptions};
use super::ruleset::{walk, Matched, Visit};
use super::window::gcra_interval_us;
use super::{Algorithm, CounterKey, CounterOp, CounterSpec, Entry, KeyHasher, Node, Outcome};
use super::{Request, Rule, RuleLimit, RuleSet, Scope};

/// A request explained up to the store: [`Explanation::reads`] are what to
/// ask it, [`Explanation::conclude`] takes its answers.
#[derive(Debug)]
pub struct Explanation<'r> {
    /// The request's plan, its operations made reads (0 hits).
    plan: Plan<'r>,
    /// Per operation: the hits the request would add.
    hits: Vec<u64>,
    descriptors: Vec<DescriptorExplanation<'r>>,
}

/// How one descriptor met the rules.
#[derive(Clone, Debug)]
pub struct DescriptorExplanation<'r> {
    pub reason: Reason<'r>,
    /// Whose rules were walked: `None` for the domain's own, and when none
    /// were (`steps` is empty then).
    pub scope: Option<Scope<'r>>,
    /// One per descriptor entry the walk reached.
    pub steps: Vec<Step<'r>>,
    /// The hits the request would add for this descriptor.
    pub hits: u64,
}

/// Why a descriptor gets its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason<'r> {
    /// A rule matched and counts the descriptor.
    Limited(&'r Rule),
    /// An `unlimited` rule matched: nothing is counted.
    Unlimited(&'r Rule),
    /// A rule matched, but the matched rules in `by` name it in `replaces`:
    /// nothing is counted for it.
    Replaced { rule: &'r Rule, by: Vec<&'r Rule> },
    /// Nothing matches the entry at `depth`; the walk stopped there.
    NoMatch { depth: usize },
    /// The descriptor ends at an entry without a limit: a value listed to
    /// let it through, or (`nested`) an entry whose limits are on longer
    /// descriptors.
    NoLimit { nested: bool },
    /// The domain has no rules.
    UnknownDomain,
    /// The descriptor's own limit replaces the rules.
    Override,
    /// Sent with an unknown or revoked API key: refused, nothing counted.
    RefusedKey,
}

/// One descriptor entry, matched in one level of the rules.
#[derive(Clone, Debug)]
pub struct Step<'r> {
    /// The entry of the rules that matched; `None` when none did.
    pub matched: Option<Candidate<'r>>,
    /// Entries that match too but lose to `matched`, in the matcher's order.
    pub passed_over: Vec<Candidate<'r>>,
}

/// An entry of the rules that matches a descriptor entry.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'r> {
    pub how: Matched<'r>,
    pub node: &'r Node,
}

/// A request explained: what a rate-limit call would answer now, and why.
#[derive(Debug)]
pub struct Report<'r> {
    /// What a call with this request would answer now.
    pub decision: Decision<'r>,
    pub descriptors: Vec<DescriptorReport<'r>>,
}

#[derive(Debug)]
pub struct DescriptorReport<'r> {
    pub explanation: DescriptorExplanation<'r>,
    /// The counters the descriptor is checked against.
    pub counters: Vec<CounterReading<'r>>,
}

/// A counter's state, read without counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterReading<'r> {
    /// The rule counted; `None` for a descriptor's own limit and for a
    /// tenant's quota.
    pub rule: Option<&'r Rule>,
    /// The name of the rule's limit counted, if it has one.
    pub name: Option<&'r Arc<str>>,
    /// The API key's tenant's monthly quota.
    pub tenant_quota: bool,
    pub spec: CounterSpec,
    /// In use now, remaining now, and the time until the window ends (GCRA:
    /// until the bucket is full again).
    pub now: Outcome,
    /// Whether the counter has room for the request's hits.
    pub admits: bool,
}

/// Plans a validated request as [`plan_for`] does and walks each
/// descriptor's path, recording what matched where.
pub fn explain<'r>(
    request: &Request<'_>,
    rules: &'r RuleSet,
    callers: &[Caller<'r>],
    hasher: &KeyHasher,
    options: PlanOptions,
) -> Explanation<'r> {
    let mut plan = plan_for(request, rules, callers, hasher, options);
    let hits = plan.ops.iter().map(|op| op.hits).collect();
    for op in &mut plan.ops {
        op.hits = 0;
    }
    let caller = |i: usize| callers.get(i).copied().unwrap_or_default();
    let descriptors = request
        .descriptors
        .iter()
        .zip(&plan.items)
        .enumerate()
        .map(|(i, (descriptor, item))| {
            // The rules are walked where `plan` looks them up: not for a
            // descriptor with its own limit, nor for a refused key.
            let key = match (descriptor.limit_override, caller(i)) {
                (Some(_), _) | (None, Caller::Refused) => None,
                (None, Caller::Anonymous) => Some(None),
                (None, Caller::Key(key)) => Some(Some(key)),
            };
            let tree = key.and_then(|key| rules.tree(request.domain, key));
            let mut steps = Vec::new();
            if let Some((_, root)) = tree {
                walk(root, &descriptor.entries, |visit| {
                    steps.push(step(visit, &descriptor.entries))
                });
            }
            DescriptorExplanation {
                reason: reason(item, &plan, &steps),
                scope: tree.and_then(|(scope, _)| scope),
                steps,
                hits: descriptor.hits.unwrap_or(request.hits),
            }
        })
        .collect();
    Explanation {
        plan,
        hits,
        descriptors,
    }
}

fn step<'r>(visit: Visit<'r>, entries: &[Entry<'_>]) -> Step<'r> {
    let candidate = |(how, node)| Candidate { how, node };
    let passed_over = match (visit.found, entries.get(visit.depth)) {
        // The matcher's other candidates: the first is the match.
        (Some(_), Some(entry)) => visit
            .level
            .candidates(entry)
            .skip(1)
            .map(candidate)
            .collect(),
        _ => Vec::new(),
    };
    Step {
        matched: visit.found.map(candidate),
        passed_over,
    }
}

fn reason<'r>(item: &PlanItem<'r>, plan: &Plan<'r>, steps: &[Step<'r>]) -> Reason<'r> {
    match *item {
        PlanItem::Refused => Reason::RefusedKey,
        PlanItem::Unlimited { rule } => Reason::Unlimited(rule),
        PlanItem::Replaced { rule } => Reason::Replaced {
            rule,
            by: replacing(plan, rule),
        },
        PlanItem::Limited {
            rule: Some(rule), ..
        } => Reason::Limited(rule),
        PlanItem::Limited { rule: None, .. } => Reason::Override,
        PlanItem::NoLimit if !plan.domain_known => Reason::UnknownDomain,
        PlanItem::NoLimit => match steps.last() {
            Some(Step {
                matched: Some(end), ..
            }) => Reason::NoLimit {
                nested: !end.node.children.is_empty(),
            },
            _ => Reason::NoMatch {
                depth: steps.len().saturating_sub(1),
            },
        },
    }
}

/// The request's matched rules that name `rule` (one of its limits) in
/// `replaces`.
fn replacing<'r>(plan: &Plan<'r>, rule: &Rule) -> Vec<&'r Rule> {
    let names: Vec<&Arc<str>> = match &rule.limit {
        RuleLimit::Limited(limits) => limits.iter().filter_map(|l| l.name.as_ref()).collect(),
        RuleLimit::Unlimited => rule.name.iter().collect(),
    };
    if names.is_empty() {
        return Vec::new();
    }
    let mut by: Vec<&Rule> = Vec::new();
    for item in &plan.items {
        let matched = match *item {
            PlanItem::Unlimited { rule } | PlanItem::Replaced { rule } => rule,
            PlanItem::Limited {
                rule: Some(rule), ..
            } => rule,
            _ => continue,
        };
        let replaces_it = matched.replaces.iter().any(|r| names.contains(&r));
        if replaces_it && !by.iter().any(|r| r.path == matched.path) {
            by.push(matched);
        }
    }
    by
}

impl<'r> Explanation<'r> {
    /// What to ask the store: the plan's operations, each with 0 hits.
    pub fn reads(&self) -> &[CounterOp] {
        &self.plan.ops
    }

    /// The report, from the store's outcomes of [`Explanation::reads`]
    /// (one per read, in order).
    pub fn conclude(self, reads: &[Outcome], options: PlanOptions) -> Report<'r> {
        let mut would = self.would(reads);
        let admits: Vec<bool> = would.iter().map(|o| o.admitted).collect();
        // As a store's `apply_request`: a request that a vetoing counter
        // denies consumes from none, and the others report the read.
        let denied = would
            .iter()
            .zip(&self.plan.vetoes)
            .any(|(o, &veto)| veto && !o.admitted);
        if denied {
            for (w, read) in would.iter_mut().zip(reads) {
                if w.admitted {
                    *w = *read;
                }
            }
        }
        let decision = decide(&self.plan, &would, options);

        let reading =
            |op: usize, rule: Option<&'r Rule>, name: Option<&'r Arc<str>>, tenant_quota: bool| {
                Some(CounterReading {
                    rule,
                    name,
                    tenant_quota,
                    spec: self.plan.ops.get(op)?.spec,
                    now: *reads.get(op)?,
                    admits: *admits.get(op)?,
                })
            };
        let mut descriptors = Vec::with_capacity(self.descriptors.len());
        for (index, explanation) in self.descriptors.into_iter().enumerate() {
            let mut counters = Vec::new();
            // Every limit of the descriptor, each its own counter.
            if let Some(PlanItem::Limited { rule, limits }) = self.plan.items.get(index) {
                for limit in self.plan.limits.get(limits.clone()).unwrap_or_default() {
                    counters.extend(reading(limit.op, *rule, limit.name, false));
                }
            }
            for quota in self.plan.quotas.iter().filter(|q| q.descriptor == index) {
                counters.extend(reading(quota.op, None, None, true));
            }
            descriptors.push(DescriptorReport {
                explanation,
                counters,
            });
        }
        Report {
            decision,
            descriptors,
        }
    }

    /// Each operation's outcome had it carried the request's hits, from the
    /// reads: a hit is admitted exactly when a 0-hit read is admitted with
    /// `remaining >= hits`, and then takes `hits` from what remains (GCRA:
    /// and pushes the reset out by their interval). An operation on a
    /// counter an earlier one of the request took from sees that, as the
    /// stores apply a request in order. A denied operation's reset is when
    /// the hits would fit, as the store says: for a fixed window the
    /// window's end, for GCRA from the bucket's fill; for a sliding window
    /// the read cannot tell (it depends on how the count splits between
    /// this window and the last), so it is the read's (the window's end).
    /// Which of a descriptor's several limits answers when more than one
    /// denies goes by these resets, so among sliding windows it may differ.
    fn would(&self, reads: &[Outcome]) -> Vec<Outcome> {
        let mut taken: Vec<(CounterKey, u64)> = Vec::new();
        let mut would = Vec::with_capacity(reads.len());
        for ((op, read), &hits) in self.plan.ops.iter().zip(reads).zip(&self.hits) {
            let before: u64 = taken
                .iter()
                .filter(|(key, _)| *key == op.key)
                .map(|&(_, h)| h)
                .sum();
            let wanted = before.saturating_add(hits);
            if read.admitted && read.remaining >= wanted {
                taken.push((op.key, hits));
                let interval = match op.spec.algorithm {
                    Algorithm::Gcra => gcra_interval_us(op.spec.limit, op.spec.period_us),
                    Algorithm::SlidingWindow | Algorithm::FixedWindow => 0,
                };
                would.push(Outcome {
                    admitted: true,
                    remaining: read.remaining - wanted,
                    reset_us: read.reset_us + wanted * interval,
                    used: read.used + wanted,
                });
            } else {
                let reset_us = match op.spec.algorithm {
                    Algorithm::Gcra if op.spec.limit > 0 => {
                        // The read's reset is the time until the bucket is
                        // full again; the hits fit once it has drained to
                        // leave room for them (if they ever can).
                        let interval = gcra_interval_us(op.spec.limit, op.spec.period_us);
                        let burst = op.spec.burst.max(1);
                        let full_in = read.reset_us + before * interval;
                        if hits <= burst {
                            (full_in + hits * interval).saturating_sub(burst * interval)
                        } else {
                            full_in.max(interval)
                        }
                    }
                    _ => read.reset_us,
                };
                would.push(Outcome {
                    admitted: false,
                    remaining: read.remaining.saturating_sub(before),
                    reset_us,
                    used: read.used + before,
                });
            }
        }
        would
    }
}

impl DescriptorExplanation<'_> {
    /// One sentence for a human, about the descriptor with these entries.
    pub fn summary(&self, entries: &[Entry<'_>]) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut s, entries);
        s
    }

    fn write_summary(&self, s: &mut String, entries: &[Entry<'_>]) -> fmt::Result {
        match &self.reason {
            Reason::Limited(rule) => {
                write!(s, "rule {} applies: {}", rule.path, Limit(rule))?;
                if rule.shadow_mode {
                    s.push_str(" (shadow mode: reported, never denied)");
                }
                if rule.quota_mode {
                    s.push_str(" (quota mode)");
                }
            }
            Reason::Unlimited(rule) => {
                write!(s, "rule {} is unlimited: nothing is counted", rule.path)?
            }
            Reason::Replaced { rule, by } => {
                write!(s, "rule {} matches but is replaced by ", rule.path)?;
                for (i, r) in by.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(s, "{sep}{}", r.path)?;
                }
                s.push_str(": nothing is counted for it");
            }
            Reason::NoMatch { depth } => match entries.get(*depth) {
                Some(e) if entries.len() == 1 => {
                    write!(s, "no rule matches {}={}: no limit", e.key, e.value)?
                }
                Some(e) => write!(
                    s,
                    "no rule matches {}={}, entry {} of {}: no limit",
                    e.key,
                    e.value,
                    depth + 1,
                    entries.len()
                )?,
                None => s.push_str("no rule matches: no limit"),
            },
            Reason::NoLimit { nested } => {
                s.push_str("the descriptor ends at an entry without a rate limit: no limit");
                if *nested {
                    s.push_str(" (its limits are on longer descriptors)");
                }
            }
            Reason::UnknownDomain => s.push_str("the domain has no rules: no limit"),
            Reason::Override => s.push_str("the descriptor's own limit replaces the rules"),
            Reason::RefusedKey => {
                s.push_str("the API key is unknown or revoked: refused, nothing counted")
            }
        }
        Ok(())
    }
}

/// A rule's limits as text: `3 per minute`, `10 per second and 1000 per
/// calendar day in UTC`, `unlimited`.
struct Limit<'a>(&'a Rule);

impl fmt::Display for Limit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.limit {
            RuleLimit::Unlimited => f.write_str("unlimited"),
            RuleLimit::Limited(limits) => {
                for (i, l) in limits.iter().enumerate() {
                    let sep = if i == 0 { "" } else { " and " };
                    write!(f, "{sep}{} per {}", l.requests_per_unit, l.window)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
