//! One stream's state: the buckets its Envoy reports, what each was told,
//! and when each must be looked at again (its window's turn, idleness).
//! A stream that ends takes its state with it; an Envoy that reconnects
//! starts over, and what matters across streams lives in the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};

use super::share::{self, Counts, Ledger, Rate};
use super::{
    Action, Assignment, BucketCounters, BucketId, QuotaService, Report, ReportError, Usage,
    ALLOW_ALL_TTL,
};
use crate::limiter::{
    self, bounds, CounterOp, CounterSpec, Descriptor, Outcome, PlanItem, Request, RuleSet,
};
use crate::service::FailureMode;
use crate::storage::StoreError;
use crate::telemetry::names;

pub struct Session {
    service: Arc<QuotaService>,
    /// The first report's domain.
    domain: Option<String>,
    buckets: HashMap<BucketId, Tracked>,
}

/// One bucket this stream's Envoy reports.
#[derive(Debug)]
struct Tracked {
    ledger: Ledger,
    /// The last report that carried requests (or the first report).
    last_active_us: u64,
    /// When an ALLOW_ALL must be sent again (none sent: now).
    allow_all_due_us: u64,
    /// When the window that promised its share ends.
    turn_at_us: Option<u64>,
}

/// What the rules make of a bucket.
enum Limit {
    /// No rule limits it: ALLOW_ALL.
    Open,
    /// A shadow-mode rule (or global shadow mode): counted, ALLOW_ALL.
    Shadow { usage: CounterOp },
    Limited {
        counters: Box<BucketCounters>,
        rate: Rate,
        rule: Arc<str>,
    },
}

/// A limited bucket to count and share, after a report (`usage`) or at its
/// window's turn (`None`).
struct Evaluation {
    bucket: BucketId,
    counters: BucketCounters,
    rate: Rate,
    rule: Arc<str>,
    usage: Option<Usage>,
}

/// A held share to promise again in the promise window that has begun.
struct Carry {
    bucket: BucketId,
    /// The promised counter, the share as its hits.
    promise: CounterOp,
    window_us: u64,
}

impl Session {
    pub(super) fn new(service: Arc<QuotaService>) -> Session {
        gauge!(names::RLQS_STREAMS).increment(1);
        Session {
            service,
            domain: None,
            buckets: HashMap::new(),
        }
    }

    /// Handles one usage report: the actions to send back, in order.
    pub async fn report(&mut self, report: Report) -> Result<Vec<Action>, ReportError> {
        let domain = self.domain(report.domain)?;
        let now = self.service.now_us();
        let rules = self.service.limiter.rules().load_full();
        let label = if rules.has_domain(&domain) {
            domain.clone()
        } else {
            names::UNKNOWN_DOMAIN_LABEL.to_owned()
        };
        counter!(names::RLQS_REPORTS, "domain" => label.clone())
            .increment(report.usages.len() as u64);
        let (allowed, denied) = report
            .usages
            .iter()
            .fold((0, 0), |(a, d), u| (a + u.allowed, d + u.denied));
        counter!(names::RLQS_REPORTED_REQUESTS, "domain" => label.clone(), "outcome" => "allowed")
            .increment(allowed);
        counter!(names::RLQS_REPORTED_REQUESTS, "domain" => label, "outcome" => "denied")
            .increment(denied);

        // Buckets this report does not bring back to life first: one that
        // carries requests is active again.
        self.touch(&report.usages, now);
        let mut actions = self.abandon_idle(now);
        let mut shadowed = Vec::new();
        let mut evaluations = Vec::new();
        for usage in report.usages {
            // Abandoned just now: the Envoy reported it before hearing so.
            let abandoned =
                |a: &Action| matches!(a, Action::Abandon { bucket } if *bucket == usage.bucket);
            if actions.iter().any(abandoned) {
                continue;
            }
            let tracked = self.buckets.entry(usage.bucket.clone()).or_insert_with(|| {
                gauge!(names::RLQS_BUCKETS).increment(1);
                Tracked {
                    ledger: Ledger::default(),
                    last_active_us: now,
                    allow_all_due_us: now,
                    turn_at_us: None,
                }
            });
            match self.service.limit(&rules, &domain, &usage.bucket) {
                Limit::Open => {
                    tracked.turn_at_us = None;
                    actions.extend(allow_all(tracked, usage.bucket, now, ALLOW_ALL_TTL));
                }
                Limit::Shadow { usage: op } => {
                    tracked.turn_at_us = None;
                    shadowed.push(CounterOp {
                        hits: usage.allowed,
                        ..op
                    });
                    let ttl = self.service.settings.assignment_ttl;
                    actions.extend(allow_all(tracked, usage.bucket, now, ttl));
                }
                Limit::Limited {
                    counters,
                    rate,
                    rule,
                } => evaluations.push(Evaluation {
                    bucket: usage.bucket.clone(),
                    counters: *counters,
                    rate,
                    rule,
                    usage: Some(usage),
                }),
            }
        }
        // Shadow-mode buckets are only counted; if the store fails, they
        // were let through anyway.
        if let Err(e) = self.service.apply(&shadowed).await {
            counter!(names::STORE_ERRORS, "kind" => e.kind()).increment(1);
        }
        actions.extend(self.evaluate(evaluations, now).await);
        count_actions(&actions);
        Ok(actions)
    }

    /// At a promise window's turn, carries the shares held into the new
    /// window and renews DENY_ALL (`Ledger::carry`); abandons idle
    /// buckets. Call at [`Session::next_wake_us`].
    pub async fn wake(&mut self) -> Vec<Action> {
        let now = self.service.now_us();
        let Some(domain) = self.domain.clone() else {
            return Vec::new();
        };
        let rules = self.service.limiter.rules().load_full();
        let mut actions = self.abandon_idle(now);
        let mut carries = Vec::new();
        let mut evaluations = Vec::new();
        for (bucket, tracked) in &mut self.buckets {
            if tracked.turn_at_us.is_none_or(|at| at > now) {
                continue;
            }
            tracked.turn_at_us = None;
            // A reload that made it unlimited: its next report says so.
            let Limit::Limited {
                counters,
                rate,
                rule,
            } = self.service.limit(&rules, &domain, bucket)
            else {
                continue;
            };
            let window_us = counters.promise_window_us;
            match tracked.ledger.carry(now, window_us) {
                Some(0) => tracked.turn_at_us = Some(tracked.ledger.turn_at(now, window_us)),
                Some(share) => carries.push(Carry {
                    bucket: bucket.clone(),
                    promise: CounterOp {
                        hits: share,
                        ..counters.promised
                    },
                    window_us,
                }),
                None => evaluations.push(Evaluation {
                    bucket: bucket.clone(),
                    counters: *counters,
                    rate,
                    rule,
                    usage: None,
                }),
            }
        }
        self.carry(carries, now).await;
        actions.extend(self.evaluate(evaluations, now).await);
        count_actions(&actions);
        actions
    }

    /// Promises the shares held from the window that has just ended in the
    /// new one (one store call, whatever is unpromised: the Envoys hold
    /// them whatever the store says). Nothing is sent: each Envoy keeps
    /// its tokens until its next report settles the share. A share the
    /// store fails to carry is forgotten with its window, as a broken
    /// stream's is, and the bucket waits for its next report.
    async fn carry(&mut self, carries: Vec<Carry>, now: u64) {
        if carries.is_empty() {
            return;
        }
        let ops: Vec<CounterOp> = carries.iter().map(|c| c.promise).collect();
        let outcomes = match self.service.apply(&ops).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                counter!(names::STORE_ERRORS, "kind" => e.kind()).increment(1);
                return;
            }
        };
        for (carry, outcome) in carries.into_iter().zip(outcomes) {
            let Some(tracked) = self.buckets.get_mut(&carry.bucket) else {
                continue;
            };
            if outcome.admitted {
                let share = carry.promise.hits;
                tracked.ledger.promised(share, now, carry.window_us);
                tracked.turn_at_us = Some(tracked.ledger.turn_at(now, carry.window_us));
            }
        }
    }

    /// When [`Session::wake`] has something to do, in µs since the epoch.
    pub fn next_wake_us(&self) -> Option<u64> {
        let idle = self.idle_timeout_us();
        self.buckets
            .values()
            .flat_map(|t| [t.turn_at_us, Some(t.last_active_us.saturating_add(idle))])
            .flatten()
            .min()
    }

    /// How long until [`Session::wake`] has something to do.
    pub fn until_wake(&self) -> Option<Duration> {
        let at = self.next_wake_us()?;
        Some(Duration::from_micros(
            at.saturating_sub(self.service.now_us()),
        ))
    }

    /// Buckets this stream tracks.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    fn domain(&mut self, domain: String) -> Result<String, ReportError> {
        match &self.domain {
            Some(first) if domain.is_empty() || domain == *first => Ok(first.clone()),
            Some(_) => Err(ReportError::DomainChanged),
            None if domain.is_empty() => Err(ReportError::NoDomain),
            None if domain.len() > bounds::MAX_DOMAIN_LEN => Err(ReportError::DomainTooLong {
                max: bounds::MAX_DOMAIN_LEN,
            }),
            None => {
                self.domain = Some(domain.clone());
                Ok(domain)
            }
        }
    }

    fn idle_timeout_us(&self) -> u64 {
        duration_us(self.service.settings.idle_timeout)
    }

    /// Marks the buckets whose usage carries requests as active.
    fn touch(&mut self, usages: &[Usage], now: u64) {
        for usage in usages {
            if usage.allowed + usage.denied > 0 {
                if let Some(tracked) = self.buckets.get_mut(&usage.bucket) {
                    tracked.last_active_us = now;
                }
            }
        }
    }

    fn abandon_idle(&mut self, now: u64) -> Vec<Action> {
        let idle = self.idle_timeout_us();
        let gone: Vec<BucketId> = self
            .buckets
            .iter()
            .filter(|(_, t)| now.saturating_sub(t.last_active_us) >= idle)
            .map(|(bucket, _)| bucket.clone())
            .collect();
        for bucket in &gone {
            self.buckets.remove(bucket);
        }
        gauge!(names::RLQS_BUCKETS).decrement(gone.len() as f64);
        gone.into_iter()
            .map(|bucket| Action::Abandon { bucket })
            .collect()
    }

    /// Counts the usage of limited buckets, settles their last shares and
    /// reads their budget (one store call), then promises and pushes each
    /// its new share (a second). A store failure is answered by the
    /// failure mode.
    async fn evaluate(&mut self, evaluations: Vec<Evaluation>, now: u64) -> Vec<Action> {
        if evaluations.is_empty() {
            return Vec::new();
        }
        let service = self.service.clone();
        let settings = &service.settings;
        let interval_us = duration_us(settings.report_interval);
        let mut ops = Vec::with_capacity(evaluations.len() * 4);
        for e in &evaluations {
            let (allowed, requests) = e
                .usage
                .as_ref()
                .map_or((0, 0), |u| (u.allowed, u.allowed.saturating_add(u.denied)));
            let settle = self
                .buckets
                .get_mut(&e.bucket)
                .map_or(0, |t| t.ledger.settle(now, e.counters.promise_window_us));
            let c = &e.counters;
            ops.push(CounterOp {
                hits: allowed,
                ..c.usage
            });
            ops.push(CounterOp {
                hits: requests.min(share::COUNTER_LIMIT),
                ..c.demand
            });
            ops.push(CounterOp {
                hits: settle,
                ..c.settled
            });
            ops.push(c.promised);
        }
        let mut outcomes = match service.apply(&ops).await {
            Ok(outcomes) => outcomes,
            Err(e) => return self.answer_failure(&evaluations, e),
        };
        self.count_beyond_the_limit(&ops, &mut outcomes).await;

        let demand_spec = share::demand_spec(interval_us);
        let mut wanted = Vec::with_capacity(evaluations.len());
        for (e, outcome) in evaluations.iter().zip(outcomes.chunks(4)) {
            let counts = Counts {
                remaining: outcome[0].remaining,
                total_demand: outcome[1].used,
                settled: outcome[2].used,
                promised: outcome[3].used,
            };
            gauge!(names::RLQS_BUDGET_REMAINING, "rule" => e.rule.to_string())
                .set(counts.remaining as f64);
            let share = match self.buckets.get_mut(&e.bucket) {
                Some(tracked) => {
                    let mine = match &e.usage {
                        Some(u) => {
                            let requests = u.allowed.saturating_add(u.denied);
                            tracked.ledger.report(&demand_spec, now, requests)
                        }
                        None => tracked.ledger.demand(&demand_spec, now),
                    };
                    tracked.ledger.share(e.rate, interval_us, counts, mine)
                }
                None => 0,
            };
            wanted.push(CounterOp {
                hits: share,
                spec: CounterSpec {
                    limit: counts.promise_limit(),
                    ..e.counters.promised.spec
                },
                ..e.counters.promised
            });
        }
        let shares = match self.promise(&wanted).await {
            Ok(shares) => shares,
            Err(e) => return self.answer_failure(&evaluations, e),
        };

        let ttl = settings.assignment_ttl;
        let mut actions = Vec::with_capacity(evaluations.len());
        for (e, share) in evaluations.into_iter().zip(shares) {
            let Some(tracked) = self.buckets.get_mut(&e.bucket) else {
                continue;
            };
            let window_us = e.counters.promise_window_us;
            tracked.ledger.promised(share, now, window_us);
            tracked.turn_at_us = Some(tracked.ledger.turn_at(now, window_us));
            // Should a reload lift its limit, ALLOW_ALL goes out at once.
            tracked.allow_all_due_us = now;
            let assignment = match u32::try_from(share) {
                Ok(0) => Assignment::DenyAll,
                Ok(n) => Assignment::Share(n),
                Err(_) => Assignment::Share(u32::MAX),
            };
            actions.push(Action::Assign {
                bucket: e.bucket,
                assignment,
                ttl,
            });
        }
        actions
    }

    /// Promises the shares `wanted` (each op's hits, against its limit:
    /// `Counts::promise_limit`), atomically against every other promise:
    /// the promised counter admits a share only while what is outstanding
    /// stays within what remains, so two instances answering at once never
    /// promise the same budget twice. A share that no longer fits shrinks
    /// to what does. Returns what was promised, per op.
    async fn promise(&self, wanted: &[CounterOp]) -> Result<Vec<u64>, StoreError> {
        let mut promised = vec![0; wanted.len()];
        let mut pending: Vec<(usize, CounterOp)> = wanted
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, op)| op.hits > 0)
            .collect();
        // The ask, then, for those that did not fit, what was left.
        for _ in 0..2 {
            if pending.is_empty() {
                break;
            }
            let ops: Vec<CounterOp> = pending.iter().map(|(_, op)| *op).collect();
            let outcomes = self.service.apply(&ops).await?;
            let mut retry = Vec::new();
            for ((i, op), outcome) in pending.into_iter().zip(outcomes) {
                if outcome.admitted {
                    promised[i] = op.hits;
                } else if outcome.remaining > 0 {
                    let hits = outcome.remaining;
                    retry.push((i, CounterOp { hits, ..op }));
                }
            }
            pending = retry;
        }
        Ok(promised)
    }

    /// Requests an Envoy reports as allowed were admitted, whatever the
    /// counter says: a report that no longer fits (requests let through
    /// before a first share, or in the round trip of an answer) fills the
    /// counter to its limit instead of being left out.
    async fn count_beyond_the_limit(&self, ops: &[CounterOp], outcomes: &mut [Outcome]) {
        let fill: Vec<(usize, CounterOp)> = ops
            .iter()
            .zip(outcomes.iter())
            .enumerate()
            .step_by(4)
            .filter(|(_, (op, o))| op.hits > 0 && !o.admitted && o.remaining > 0)
            .map(|(i, (op, o))| {
                (
                    i,
                    CounterOp {
                        hits: o.remaining,
                        ..*op
                    },
                )
            })
            .collect();
        if fill.is_empty() {
            return;
        }
        let fill_ops: Vec<CounterOp> = fill.iter().map(|(_, op)| *op).collect();
        // If this fails, the first answer stands: the budget is spent
        // either way.
        if let Ok(filled) = self.service.apply(&fill_ops).await {
            for ((i, _), outcome) in fill.iter().zip(filled) {
                outcomes[*i] = outcome;
            }
        }
    }

    /// The failure mode's answer for buckets the store could not decide:
    /// ALLOW_ALL under `allow`, nothing under `deny` (each Envoy's
    /// `expired_assignment_behavior` decides, once its share expires).
    fn answer_failure(&mut self, evaluations: &[Evaluation], error: StoreError) -> Vec<Action> {
        counter!(names::STORE_ERRORS, "kind" => error.kind()).increment(1);
        let mode = self.service.limiter.settings().failure_mode;
        let label = match mode {
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
        };
        counter!(names::FAILURE_MODE_ANSWERS, "mode" => label).increment(1);
        tracing::debug!(error = %error, failure_mode = label, "store failed; answering quota reports by the failure mode");
        let ttl = self.service.settings.assignment_ttl;
        let now = self.service.now_us();
        let mut actions = Vec::new();
        for e in evaluations {
            let Some(tracked) = self.buckets.get_mut(&e.bucket) else {
                continue;
            };
            tracked
                .ledger
                .promised(0, now, e.counters.promise_window_us);
            // Asked again at its next report.
            tracked.turn_at_us = None;
            if mode == FailureMode::Allow {
                actions.push(Action::Assign {
                    bucket: e.bucket.clone(),
                    assignment: Assignment::AllowAll,
                    ttl,
                });
            }
        }
        actions
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        gauge!(names::RLQS_STREAMS).decrement(1);
        gauge!(names::RLQS_BUCKETS).decrement(self.buckets.len() as f64);
    }
}

impl QuotaService {
    /// What the rules make of `bucket` in `domain`: the plan a per-request
    /// call with the bucket's descriptor would get.
    fn limit(&self, rules: &RuleSet, domain: &str, bucket: &BucketId) -> Limit {
        let settings = self.limiter.settings();
        let request = Request {
            domain,
            descriptors: vec![Descriptor::new(
                bucket.entries().into_iter().map(|e| (e.key, e.value)),
                None,
                Some(0),
            )],
            hits: 0,
        };
        let plan = limiter::plan(&request, rules, self.limiter.hasher(), settings.plan);
        let Some(PlanItem::Limited {
            rule: Some(rule),
            limits,
        }) = plan.items.first()
        else {
            return Limit::Open;
        };
        // An assignment carries one rate: of a rule's several limits (a
        // burst and a daily one), the tightest in requests per second.
        let tightest = plan
            .limits
            .get(limits.clone())
            .unwrap_or_default()
            .iter()
            .filter_map(|l| plan.ops.get(l.op))
            .min_by(|a, b| {
                // a's rate against b's: limit_a / period_a vs limit_b / period_b.
                let cross = |x: &limiter::CounterOp, y: &limiter::CounterOp| {
                    u128::from(x.spec.limit) * u128::from(y.spec.period_us.max(1))
                };
                cross(a, b).cmp(&cross(b, a))
            });
        let Some(&usage) = tightest else {
            return Limit::Open;
        };
        if rule.shadow_mode || settings.plan.global_shadow {
            return Limit::Shadow { usage };
        }
        Limit::Limited {
            counters: Box::new(BucketCounters::new(
                self.limiter.hasher(),
                usage,
                self.settings.report_interval,
            )),
            rate: Rate {
                limit: usage.spec.limit,
                period_us: usage.spec.period_us,
            },
            rule: rule.path.clone(),
        }
    }
}

/// ALLOW_ALL for `ttl`, if the last one is half over (or none was sent).
fn allow_all(tracked: &mut Tracked, bucket: BucketId, now: u64, ttl: Duration) -> Option<Action> {
    if now < tracked.allow_all_due_us {
        return None;
    }
    tracked.allow_all_due_us = now.saturating_add(duration_us(ttl) / 2);
    Some(Action::Assign {
        bucket,
        assignment: Assignment::AllowAll,
        ttl,
    })
}

fn count_actions(actions: &[Action]) {
    for action in actions {
        counter!(names::RLQS_ASSIGNMENTS, "kind" => action.kind()).increment(1);
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
