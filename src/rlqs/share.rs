//! Budget splitting: how much of a bucket's budget one Envoy may admit
//! until its next report. Pure: no I/O, no clock; time comes in as `now_us`
//! (microseconds since the Unix epoch).
//!
//! ## What the store keeps, per bucket
//!
//! - the rule's own counter, which counts the requests Envoys report as
//!   allowed (as it counts per-request decisions): its `remaining` is the
//!   window's budget;
//! - *promised* and *settled*, fixed-window counters over the promise
//!   window ([`promise_window`]: three reporting intervals, shortened to
//!   divide the rule's period): every share handed to an Envoy is added to
//!   *promised*; at the Envoy's next report (whose usage the rule's counter
//!   has just counted) the whole share is added to *settled*, since the new
//!   share replaces whatever is left of it. `promised - settled` is what
//!   Envoys may still admit without the rule's counter knowing yet: the
//!   outstanding shares. A promise is forgotten when its window ends, so
//!   one made on a stream that died (its sluice instance crashed) holds
//!   nothing back for longer than that;
//! - *demand*, a sliding window over [`DEMAND_WINDOWS`] reporting intervals
//!   of the requests (allowed and denied) every Envoy reports.
//!
//! All live in the counter store, so every sluice instance sees every
//! Envoy's demand and promises, and a restarted instance loses nothing.
//!
//! ## One Envoy's share
//!
//! ```text
//! share = min(ceil(remaining * mine / total), remaining - outstanding, cap)
//! ```
//!
//! `mine / total` is this Envoy's part of the bucket's demand, so shares
//! follow demand; `remaining - outstanding` is what nobody has been
//! promised, so shares never add up to more than the budget; `cap`, when
//! other Envoys report the bucket too, keeps a share near what the Envoy
//! can use before its next report (its demand over [`CAP_WINDOWS`]
//! reporting intervals, or the rule's rate over the same span if more), so
//! unused promises hold others back little. A stream's first report for a
//! bucket has no demand history and no cap, nor has an Envoy alone on a
//! bucket: it may burst up to all that is left, as with per-request
//! decisions. An Envoy that joins a busy bucket gets its part at the
//! incumbents' next reports.
//!
//! When the budget is *plenty* (what remains covers everyone's demand at
//! its recent rate for a whole period of the rule, [`plenty`]), a share is
//! at least the cap's amount (within what is unpromised), whatever the
//! Envoy's part: a part of a plentiful budget would only starve an Envoy
//! whose demand the estimate has not seen yet, such as one that has just
//! restarted (its first report is sent at its first request, while the
//! demand of the Envoy it replaced stays in the estimate for the demand
//! window). Shares are never less than without this floor, so the bound
//! below is unchanged.
//!
//! When a promise window ends (`Ledger::turn_at`), a share an Envoy holds
//! is carried: promised again in the new window, with nothing sent, so the
//! Envoy keeps its tokens and its next report settles the share and counts
//! what it admitted since the last (`Ledger::carry`). Renewing it instead
//! would replace those tokens before the rule's counter knew what they
//! had admitted, and let as many requests through again. An Envoy holding
//! DENY_ALL gets a new share at the turn: since promise windows divide the
//! rule's period, one denied for the rest of a rule's window gets its new
//! share when that window turns.
//!
//! ## The bound on over-admission
//!
//! An Envoy admits at most its share between two answers, and every share
//! is promised out of what nobody else holds. What escapes the promises:
//! - what an Envoy admits between sending a report and applying the
//!   answer (a round trip), out of its previous share;
//! - at a promise window's turn, until a held share is carried
//!   ([`TURN_MARGIN_US`] and a round trip to the store), it is not
//!   outstanding in the new window: another Envoy's report in that gap may
//!   be promised what is left of it;
//! - a new bucket's requests before its first answer (Envoy lets them
//!   through by its `no_assignment_behavior`);
//! - when a stream breaks: what is left of its Envoy's share once the
//!   promise window forgets it, and the usage the Envoy drops while it
//!   cannot report (Envoy 1.40 discards a report it cannot send).
//!
//! So, while streams hold and no report falls in a turn's gap, the
//! requests all Envoys admit for a bucket in a window exceed its limit by
//! at most what each admits in one round trip per report, plus new
//! buckets' first requests (the simulation in `share/tests.rs` checks it
//! with reports at several phases of the promise window;
//! `tests/it/rlqs.rs` measures it with real Envoys). A broken stream adds
//! at most its Envoy's last share and one reporting interval of its
//! traffic.

use crate::limiter::{check, Algorithm, CounterSpec, CounterState};

/// The demand window, in reporting intervals. Each report adds an Envoy's
/// whole interval at once, so an estimate jumps at its reports and fades
/// between them; over six intervals one report is a sixth of it, and two
/// Envoys with the same traffic get shares within about that of each
/// other, whatever their reports' phases. A demand that changes shows at
/// the next report anyway: requests denied count as demand.
pub const DEMAND_WINDOWS: u64 = 6;

/// The cap on a share, in reporting intervals of demand.
pub const CAP_WINDOWS: u64 = 2;

/// The most a demand, promised or settled counter holds: counts are 32-bit
/// in every store.
pub const COUNTER_LIMIT: u64 = u32::MAX as u64;

/// How long after a promise window's end its shares are carried into the
/// next (and DENY_ALL renewed, after twice as long): enough for the
/// store's clock (Redis' `TIME`) to be past the end too.
pub const TURN_MARGIN_US: u64 = 50_000;

/// The counter spec of a demand estimate over `DEMAND_WINDOWS` reporting
/// intervals: a sliding window (the store's and the local estimate alike),
/// whose `used` is the weighted count of the last two spans.
pub fn demand_spec(report_interval_us: u64) -> CounterSpec {
    let period_us = (report_interval_us * DEMAND_WINDOWS).max(1);
    CounterSpec {
        algorithm: Algorithm::SlidingWindow,
        limit: COUNTER_LIMIT,
        period_us,
        burst: COUNTER_LIMIT,
        calendar: None,
    }
}

/// The promise window, in reporting intervals: a share is settled at the
/// next report, so most promises start and end within one window.
pub const PROMISE_WINDOWS: u64 = 3;

/// The promise window of a rule with this period: [`PROMISE_WINDOWS`]
/// reporting intervals, or less so that a whole number of them make the
/// period (their turns then include the rule's window turns).
pub fn promise_window(period_us: u64, report_interval_us: u64) -> u64 {
    let period_us = period_us.max(1);
    let longest = (report_interval_us * PROMISE_WINDOWS).max(1);
    (period_us / period_us.div_ceil(longest)).max(1)
}

/// The counter spec of the promised and settled counters: fixed windows of
/// the promise window's length.
pub fn promise_spec(window_us: u64) -> CounterSpec {
    CounterSpec {
        algorithm: Algorithm::FixedWindow,
        limit: COUNTER_LIMIT,
        period_us: window_us.max(1),
        burst: COUNTER_LIMIT,
        calendar: None,
    }
}

/// One Envoy's demand for one bucket, estimated as the shared demand
/// counter estimates everyone's, so that the two compare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    state: Option<CounterState>,
}

impl Demand {
    /// Adds `requests` seen at `now_us`; returns the demand over the window.
    pub fn record(&mut self, spec: &CounterSpec, now_us: u64, requests: u64) -> u64 {
        let checked = check(spec, self.state, now_us, requests.min(COUNTER_LIMIT));
        if let Some(state) = checked.state {
            self.state = Some(state);
        }
        checked.outcome.used
    }

    /// The demand over the window ending at `now_us`.
    pub fn estimate(&self, spec: &CounterSpec, now_us: u64) -> u64 {
        check(spec, self.state, now_us, 0).outcome.used
    }
}

/// A rule's limit: `limit` requests per `period_us`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub limit: u64,
    pub period_us: u64,
}

/// The cap on a share after a stream's first report: the Envoy's demand
/// over `CAP_WINDOWS` reporting intervals (from `mine`, its demand over the
/// demand window), or the rule's rate over the same span, whichever is
/// more; at least 1.
pub fn cap(rate: Rate, report_interval_us: u64, mine: u64) -> u64 {
    let span = u128::from(report_interval_us * CAP_WINDOWS);
    let at_rule_rate = (u128::from(rate.limit) * span).div_ceil(u128::from(rate.period_us.max(1)));
    let at_rule_rate = u64::try_from(at_rule_rate).unwrap_or(u64::MAX);
    let recent = (mine * CAP_WINDOWS).div_ceil(DEMAND_WINDOWS);
    recent.max(at_rule_rate).max(1)
}

/// Whether `remaining` covers every Envoy's demand (`total`, over the
/// demand window) at its recent rate for a whole period of the rule, so
/// that none can run short before the window turns, wherever in it we are:
/// then shares need not split the budget by demand.
pub fn plenty(rate: Rate, report_interval_us: u64, remaining: u64, total: u64) -> bool {
    let window = u128::from(report_interval_us * DEMAND_WINDOWS).max(1);
    let expected = (u128::from(total) * u128::from(rate.period_us)).div_ceil(window);
    u128::from(remaining) >= expected
}

/// What one Envoy's share is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareInput {
    /// What the rule's counter has left, this report's usage counted.
    pub remaining: u64,
    /// Shares promised to Envoys and not settled yet (this one's last share
    /// settled already).
    pub outstanding: u64,
    /// This Envoy's demand over the demand window.
    pub mine: u64,
    /// All Envoys' demand over the demand window (this one's included).
    pub total: u64,
    /// [`cap`], or `None` on a stream's first report for the bucket and
    /// for an Envoy alone on it.
    pub cap: Option<u64>,
    /// When the budget is [`plenty`]: the least share (within what is
    /// unpromised), [`cap`]'s amount, whatever this Envoy's part.
    pub floor: Option<u64>,
}

/// The requests one Envoy may admit until its next answer; 0 means
/// DENY_ALL. At least 1 while anything is unpromised and the Envoy's part
/// is not spent: an Envoy with no recent demand still gets its next
/// request through, and its share grows at its next report.
pub fn share(input: ShareInput) -> u64 {
    let unpromised = input.remaining.saturating_sub(input.outstanding);
    if unpromised == 0 {
        return 0;
    }
    let mine = u128::from(input.mine.max(1));
    // The shared counter can lag this Envoy's own estimate (another
    // instance's clock, a report still in flight): never more than all.
    let total = u128::from(input.total).max(mine);
    let remaining = u128::from(input.remaining);
    let part = u64::try_from((remaining * mine).div_ceil(total)).unwrap_or(u64::MAX);
    let mut share = part.min(unpromised);
    if let Some(cap) = input.cap {
        share = share.min(cap.max(1));
    }
    if let Some(floor) = input.floor {
        share = share.max(floor.min(unpromised));
    }
    share.min(COUNTER_LIMIT)
}

/// The store's answers a share is computed from (the first round trip of a
/// report: usage counted, the last share settled, the rest read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// The rule's counter's `remaining`.
    pub remaining: u64,
    /// Everyone's demand over the demand window.
    pub total_demand: u64,
    /// The promised counter, in this promise window.
    pub promised: u64,
    /// The settled counter, in this promise window.
    pub settled: u64,
}

impl Counts {
    /// The limit a share is promised against: the promised counter may
    /// grow to the settled count plus what remains, so that the outstanding
    /// shares never exceed the budget, even when instances promise at once
    /// (the store checks and adds in one step).
    pub fn promise_limit(&self) -> u64 {
        self.settled
            .saturating_add(self.remaining)
            .min(COUNTER_LIMIT)
    }
}

/// The promised and settled counters are 32-bit and add a whole share per
/// report within a promise window, so a bucket whose budget is near the
/// counters' range (a limit of a billion an hour) would overflow them in a
/// few reports, and its promises would be refused: DENY_ALL with the budget
/// untouched. A share takes at most this part of what the promised counter
/// has left, so it never fills (the settled counter only adds promised
/// shares); for any real budget the bound is far above what the rule
/// itself allows and changes nothing.
pub const HEADROOM_PARTS: u64 = 8;

/// The most a share may be with `promised` already promised in the window.
pub fn headroom(promised: u64) -> u64 {
    (COUNTER_LIMIT.saturating_sub(promised) / HEADROOM_PARTS).max(1)
}

/// One stream's record of one bucket: this Envoy's demand, how many
/// reports it has sent, and the share it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    demand: Demand,
    reports: u64,
    /// The last share promised, and the promise window it counts in.
    held: Option<(u64, u64)>,
}

impl Ledger {
    /// Records a report of `requests` (allowed and denied) at `now_us`;
    /// returns this Envoy's demand over the demand window.
    pub fn report(&mut self, spec: &CounterSpec, now_us: u64, requests: u64) -> u64 {
        self.reports += 1;
        self.demand.record(spec, now_us, requests)
    }

    /// This Envoy's demand over the demand window ending at `now_us`.
    pub fn demand(&self, spec: &CounterSpec, now_us: u64) -> u64 {
        self.demand.estimate(spec, now_us)
    }

    /// What to add to the settled counter now that the held share is being
    /// replaced: all of it if it was promised in the promise window (of
    /// `window_us`) `now_us` falls in, else nothing (its window has ended,
    /// and its promise with it).
    pub fn settle(&mut self, now_us: u64, window_us: u64) -> u64 {
        match self.held.take() {
            Some((share, window)) if window == window_of(now_us, window_us) => share,
            _ => 0,
        }
    }

    /// The share for this Envoy, given the store's `counts` and its own
    /// demand `mine` (from [`Ledger::report`] or [`Ledger::demand`]).
    pub fn share(&self, rate: Rate, report_interval_us: u64, counts: Counts, mine: u64) -> u64 {
        let plenty = plenty(
            rate,
            report_interval_us,
            counts.remaining,
            counts.total_demand,
        );
        let cap = cap(rate, report_interval_us, mine);
        let share = share(ShareInput {
            remaining: counts.remaining,
            outstanding: counts.promised.saturating_sub(counts.settled),
            mine,
            total: counts.total_demand,
            // Alone on the bucket, an unused promise holds back nobody.
            cap: (self.reports > 1 && counts.total_demand > mine).then_some(cap),
            floor: plenty.then_some(cap),
        });
        share.min(headroom(counts.promised))
    }

    /// At a promise window's turn, what to carry into the window `now_us`
    /// falls in: the share held from an earlier window, to be promised
    /// again in this one (and [`Ledger::promised`] with it once it is).
    /// The Envoy keeps its tokens: replacing them would forget what it
    /// admitted since its last report, which the rule's counter has not
    /// counted yet; its next report settles the share and counts them.
    /// `Some(0)` when the share is promised in this window already;
    /// `None` when none is held (DENY_ALL): renew it instead, so that an
    /// Envoy denied for the rest of a rule's window gets budget when the
    /// window turns.
    pub fn carry(&self, now_us: u64, window_us: u64) -> Option<u64> {
        let (share, window) = self.held?;
        Some(if window < window_of(now_us, window_us) {
            share
        } else {
            0
        })
    }

    /// Records that `share` was promised at `now_us`.
    pub fn promised(&mut self, share: u64, now_us: u64, window_us: u64) {
        self.held = (share > 0).then_some((share, window_of(now_us, window_us)));
    }

    /// When this bucket must be looked at for the next promise window: the
    /// end of the one `now_us` falls in, plus [`TURN_MARGIN_US`] to carry a
    /// held share, or twice that to renew DENY_ALL. Renewals come after
    /// the carries (every stream's turns are computed alike), so that a
    /// renewed share is never promised what another Envoy still holds.
    pub fn turn_at(&self, now_us: u64, window_us: u64) -> u64 {
        let margin = match self.held {
            Some(_) => TURN_MARGIN_US,
            None => 2 * TURN_MARGIN_US,
        };
        (window_of(now_us, window_us) + 1) * window_us.max(1) + margin
    }
}

/// The number of the promise window (of `window_us`) `now_us` falls in.
fn window_of(now_us: u64, window_us: u64) -> u64 {
    now_us / window_us.max(1)
}

#[cfg(test)]
mod tests;
