//! The pure decision core: request and limit types, window math, counter
//! keys, `plan`/`decide`, and `explain`. Nothing here does I/O or reads a clock; time
//! comes in as `now_us` (microseconds since the Unix epoch).

mod explain;
mod key;
mod limit;
mod metadata;
mod plan;
mod ruleset;
mod wildcard;
mod window;

pub use explain::{
    explain, Candidate, CounterReading, DescriptorExplanation, DescriptorReport, Explanation,
    Reason, Report, Step,
};
pub use key::{CounterKey, KeyHasher};
pub use limit::{Calendar, CalendarUnit, Limit, Window, MAX_WINDOW_SECONDS};
pub use metadata::{MetaValue, Metadata};
pub use plan::{
    decide, plan, plan_for, Caller, CounterOp, CurrentLimit, Decision, DescriptorDecision, Plan,
    PlanItem, PlanOptions, PlannedLimit, QuotaItem, MONTHLY_QUOTA,
};
pub use ruleset::{
    ApiKey, Level, Match, Matched, Node, Rule, RuleLimit, RuleSet, Scope, ValueMatch,
};
pub use wildcard::{Pattern, PatternSet};
pub use window::{
    check, gcra_interval_us, window_name, Checked, CounterSpec, CounterState, Outcome,
};

use std::fmt;

/// A time unit of a limit, as in Envoy's `RateLimitUnit`. Month is 30 days and
/// year 365 days, as envoyproxy/ratelimit counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    pub fn period_us(self) -> u64 {
        self.seconds() * 1_000_000
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// Parses a unit name case-insensitively (`minute`, `MINUTE`).
    pub fn parse(s: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|u| u.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a counter decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Weighted sum of the previous and current fixed windows.
    #[default]
    SlidingWindow,
    /// Epoch-aligned fixed windows, as envoyproxy/ratelimit counts.
    FixedWindow,
    /// Generic cell rate algorithm: an exact rate with a burst allowance.
    Gcra,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [
        Algorithm::SlidingWindow,
        Algorithm::FixedWindow,
        Algorithm::Gcra,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::Gcra => "gcra",
        }
    }

    pub fn parse(s: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer for one descriptor or a whole request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    Ok,
    OverLimit,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::OverLimit => "OVER_LIMIT",
        }
    }
}

// === Requests ===

/// Bounds on a request; anything beyond them is rejected as invalid input.
pub mod bounds {
    pub const MAX_DOMAIN_LEN: usize = 255;
    pub const MAX_DESCRIPTORS: usize = 64;
    pub const MAX_ENTRIES: usize = 16;
    pub const MAX_KEY_LEN: usize = 255;
    pub const MAX_VALUE_LEN: usize = 1024;
    pub const MAX_HITS: u64 = u32::MAX as u64;
    /// The largest encoded request, gRPC message or JSON body: 4 MiB, three
    /// times the largest protobuf request the bounds above admit (64
    /// descriptors of 16 entries of 255-byte keys and 1024-byte values, about
    /// 1.3 MB), so that JSON's quoting fits too. Anything larger is refused
    /// before it is read whole.
    pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
}

/// A rate-limit request, borrowing its strings from the decoded message.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub domain: &'a str,
    pub descriptors: Vec<Descriptor<'a>>,
    /// Hits for descriptors that carry no `hits_addend` of their own (already
    /// mapped: a request-level 0 means 1).
    pub hits: u64,
}

#[derive(Clone, Debug)]
pub struct Descriptor<'a> {
    pub entries: Vec<Entry<'a>>,
    pub limit_override: Option<LimitOverride>,
    /// The descriptor's own hits; `Some(0)` checks without consuming.
    pub hits: Option<u64>,
}

impl<'a> Descriptor<'a> {
    /// A descriptor from its `(key, value)` entries, borrowed from the
    /// decoded request.
    pub fn new(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
        limit_override: Option<LimitOverride>,
        hits: Option<u64>,
    ) -> Descriptor<'a> {
        Descriptor {
            entries: entries
                .into_iter()
                .map(|(key, value)| Entry { key, value })
                .collect(),
            limit_override,
            hits,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

/// A limit sent by the caller in place of the configured one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitOverride {
    pub requests_per_unit: u32,
    pub unit: Unit,
}

/// Why a request was refused as invalid input. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("domain: must not be empty")]
    EmptyDomain,
    #[error("domain: longer than {max} bytes")]
    DomainTooLong { max: usize },
    #[error("descriptors: at least one descriptor is required")]
    NoDescriptors,
    #[error("descriptors: more than {max} descriptors")]
    TooManyDescriptors { max: usize },
    #[error("descriptors[{index}].entries: at least one entry is required")]
    NoEntries { index: usize },
    #[error("descriptors[{index}].entries: more than {max} entries")]
    TooManyEntries { index: usize, max: usize },
    #[error("descriptors[{index}].entries[{entry}].key: must not be empty")]
    EmptyKey { index: usize, entry: usize },
    #[error("descriptors[{index}].entries[{entry}].key: longer than {max} bytes")]
    KeyTooLong {
        index: usize,
        entry: usize,
        max: usize,
    },
    #[error("descriptors[{index}].entries[{entry}].value: longer than {max} bytes")]
    ValueTooLong {
        index: usize,
        entry: usize,
        max: usize,
    },
    #[error("descriptors[{index}].limit.unit: {reason}")]
    BadOverrideUnit { index: usize, reason: String },
    #[error("descriptors[{index}].hits_addend: larger than {max}")]
    TooManyHits { index: usize, max: u64 },
}

impl<'a> Request<'a> {
    /// Checks the bounds every request must respect.
    pub fn validate(&self) -> Result<(), RequestError> {
        use bounds::*;
        if self.domain.is_empty() {
            return Err(RequestError::EmptyDomain);
        }
        if self.domain.len() > MAX_DOMAIN_LEN {
            return Err(RequestError::DomainTooLong {
                max: MAX_DOMAIN_LEN,
            });
        }
        if self.descriptors.is_empty() {
            return Err(RequestError::NoDescriptors);
        }
        if self.descriptors.len() > MAX_DESCRIPTORS {
            return Err(RequestError::TooManyDescriptors {
                max: MAX_DESCRIPTORS,
            });
        }
        for (index, d) in self.descriptors.iter().enumerate() {
            if d.entries.is_empty() {
                return Err(RequestError::NoEntries { index });
            }
            if d.entries.len() > MAX_ENTRIES {
                return Err(RequestError::TooManyEntries {
                    index,
                    max: MAX_ENTRIES,
                });
            }
            for (entry, e) in d.entries.iter().enumerate() {
                if e.key.is_empty() {
                    return Err(RequestError::EmptyKey { index, entry });
                }
                if e.key.len() > MAX_KEY_LEN {
                    return Err(RequestError::KeyTooLong {
                        index,
                        entry,
                        max: MAX_KEY_LEN,
                    });
                }
                if e.value.len() > MAX_VALUE_LEN {
                    return Err(RequestError::ValueTooLong {
                        index,
                        entry,
                        max: MAX_VALUE_LEN,
                    });
                }
            }
            if d.hits.is_some_and(|h| h > MAX_HITS) {
                return Err(RequestError::TooManyHits {
                    index,
                    max: MAX_HITS,
                });
            }
        }
        Ok(())
    }
}
