//! Proto <-> domain conversions for the rate-limit API and `Explain`, for
//! gRPC and JSON alike (`/json` and `/explain` decode and encode these same
//! messages; see `http`).

use std::time::Duration;

use pbjson_types::value::Kind;

use crate::limiter::{
    Algorithm, Candidate, Code, CounterReading, Descriptor, Limit, LimitOverride, Matched,
    MetaValue, Metadata, Reason, Request, RequestError, Rule, RuleLimit, Scope, Unit, Window,
    MONTHLY_QUOTA,
};
use crate::proto::common::RateLimitDescriptor;
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::r#type::v3::RateLimitUnit;
use crate::proto::rls::{rate_limit_response as rsp, RateLimitRequest, RateLimitResponse};
use crate::proto::sluice::v1 as api;
use crate::service::{Explained, Status, Verdict};

/// Borrows a domain request from a decoded message. Request-level
/// `hits_addend` 0 means 1; a descriptor's own `hits_addend` wins.
pub fn request_from_proto(message: &RateLimitRequest) -> Result<Request<'_>, RequestError> {
    let hits = u64::from(message.hits_addend.max(1));
    let descriptors = message
        .descriptors
        .iter()
        .enumerate()
        .map(|(index, d)| descriptor_from_proto(index, d))
        .collect::<Result<_, _>>()?;
    Ok(Request {
        domain: &message.domain,
        descriptors,
        hits,
    })
}

fn descriptor_from_proto(
    index: usize,
    d: &RateLimitDescriptor,
) -> Result<Descriptor<'_>, RequestError> {
    let limit_override = match &d.limit {
        None => None,
        Some(o) => Some(LimitOverride {
            requests_per_unit: o.requests_per_unit,
            unit: unit_from_proto(o.unit).ok_or_else(|| RequestError::BadOverrideUnit {
                index,
                reason: format!("unknown rate limit unit {}", o.unit),
            })?,
        }),
    };
    Ok(Descriptor::new(
        d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())),
        limit_override,
        d.hits_addend.as_ref().map(|h| h.value),
    ))
}

/// The unit a `RateLimitUnit` number names.
fn unit_from_proto(unit: i32) -> Option<Unit> {
    Some(match RateLimitUnit::try_from(unit).ok()? {
        RateLimitUnit::Unknown => return None,
        RateLimitUnit::Second => Unit::Second,
        RateLimitUnit::Minute => Unit::Minute,
        RateLimitUnit::Hour => Unit::Hour,
        RateLimitUnit::Day => Unit::Day,
        RateLimitUnit::Week => Unit::Week,
        RateLimitUnit::Month => Unit::Month,
        RateLimitUnit::Year => Unit::Year,
    })
}

fn unit_to_proto(unit: Unit) -> rsp::rate_limit::Unit {
    use rsp::rate_limit::Unit as P;
    match unit {
        Unit::Second => P::Second,
        Unit::Minute => P::Minute,
        Unit::Hour => P::Hour,
        Unit::Day => P::Day,
        Unit::Week => P::Week,
        Unit::Month => P::Month,
        Unit::Year => P::Year,
    }
}

fn code_to_proto(code: Code) -> rsp::Code {
    match code {
        Code::Ok => rsp::Code::Ok,
        Code::OverLimit => rsp::Code::OverLimit,
    }
}

fn duration_to_proto(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn status_to_proto(s: &Status) -> rsp::DescriptorStatus {
    rsp::DescriptorStatus {
        code: code_to_proto(s.code) as i32,
        current_limit: s
            .limit
            .as_ref()
            .map(|l| rate_limit_to_proto(l.name.as_deref(), l.requests_per_unit, &l.window)),
        limit_remaining: s.remaining,
        duration_until_reset: s.reset.map(duration_to_proto),
        quota: s.quota.map(|(requests, until_us)| rsp::Quota {
            requests,
            id: String::new(),
            expiration_specifier: Some(rsp::quota::ExpirationSpecifier::ValidUntil(
                pbjson_types::Timestamp {
                    seconds: (until_us / 1_000_000) as i64,
                    nanos: ((until_us % 1_000_000) * 1_000) as i32,
                },
            )),
        }),
    }
}

/// The answer to `request`.
pub fn verdict_to_proto(request: &RateLimitRequest, v: &Verdict) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: code_to_proto(v.overall) as i32,
        statuses: v.statuses.iter().map(status_to_proto).collect(),
        response_headers_to_add: v
            .response_headers
            .iter()
            .map(|(k, val)| HeaderValue {
                key: (*k).to_owned(),
                value: val.clone(),
                raw_value: Vec::new(),
            })
            .collect(),
        request_headers_to_add: Vec::new(),
        raw_body: Vec::new(),
        dynamic_metadata: v
            .dynamic_metadata
            .as_ref()
            .map(|metadata| dynamic_metadata(request, metadata)),
        quota: None,
    }
}

/// A request explained. `request` is the one explained, for the entries'
/// keys and values.
pub fn explained_to_proto(
    request: &Request<'_>,
    explained: &Explained<'_>,
) -> api::ExplainResponse {
    let report = explained.report;
    let descriptors = report
        .descriptors
        .iter()
        .zip(&request.descriptors)
        .zip(explained.statuses.iter().zip(&report.decision.statuses))
        .map(|((d, descriptor), (status, decision))| {
            let e = &d.explanation;
            let rule = match &e.reason {
                Reason::Limited(rule) | Reason::Unlimited(rule) => Some(*rule),
                Reason::Replaced { rule, .. } => Some(*rule),
                _ => None,
            };
            let replaced_by = match &e.reason {
                Reason::Replaced { by, .. } => by.iter().map(|r| rule_to_proto(r)).collect(),
                _ => Vec::new(),
            };
            api::DescriptorExplanation {
                summary: e.summary(&descriptor.entries),
                reason: reason_to_proto(&e.reason) as i32,
                rules: match (e.steps.is_empty(), e.scope) {
                    (true, _) => String::new(),
                    (false, None) => "domain".to_owned(),
                    (false, Some(Scope::Plan(plan))) => format!("plan {plan}"),
                    (false, Some(Scope::Tenant(tenant))) => format!("tenant {tenant}"),
                },
                steps: e
                    .steps
                    .iter()
                    .zip(&descriptor.entries)
                    .map(|(step, entry)| api::Step {
                        key: entry.key.to_owned(),
                        value: entry.value.to_owned(),
                        matched: step
                            .matched
                            .as_ref()
                            .map(|c| candidate_to_proto(c, entry.value)),
                        passed_over: step
                            .passed_over
                            .iter()
                            .map(|c| candidate_to_proto(c, entry.value))
                            .collect(),
                    })
                    .collect(),
                rule: rule.map(rule_to_proto),
                replaced_by,
                hits: e.hits,
                status: Some(status_to_proto(status)),
                shadowed: decision.shadowed,
                counters: d.counters.iter().map(counter_to_proto).collect(),
            }
        })
        .collect();
    api::ExplainResponse {
        overall_code: code_to_proto(report.decision.overall) as i32,
        global_shadow_mode: report.decision.global_shadowed,
        descriptors,
    }
}

fn reason_to_proto(reason: &Reason<'_>) -> api::descriptor_explanation::Reason {
    use api::descriptor_explanation::Reason as P;
    match reason {
        Reason::Limited(_) => P::Limited,
        Reason::Unlimited(_) => P::Unlimited,
        Reason::Replaced { .. } => P::Replaced,
        Reason::NoMatch { .. } => P::NoMatch,
        Reason::NoLimit { .. } => P::NoLimit,
        Reason::UnknownDomain => P::UnknownDomain,
        Reason::Override => P::Override,
        Reason::RefusedKey => P::RefusedKey,
    }
}

/// An entry of the rules that matched `value`.
fn candidate_to_proto(c: &Candidate<'_>, value: &str) -> api::Candidate {
    use api::candidate::Kind;
    let (kind, pattern) = match c.how {
        Matched::Exact => (Kind::Exact, value),
        Matched::Wildcard(pattern) => (Kind::Wildcard, pattern),
        Matched::KeyOnly => (Kind::KeyOnly, ""),
    };
    api::Candidate {
        kind: kind as i32,
        pattern: pattern.to_owned(),
        rule: c
            .node
            .rule
            .as_ref()
            .map(|r| r.path.to_string())
            .unwrap_or_default(),
        nested: !c.node.children.is_empty(),
    }
}

fn rule_to_proto(rule: &Rule) -> api::Rule {
    let limits: Vec<rsp::RateLimit> = match &rule.limit {
        RuleLimit::Unlimited => Vec::new(),
        RuleLimit::Limited(limits) => limits.iter().map(limit_to_proto).collect(),
    };
    api::Rule {
        path: rule.path.to_string(),
        name: rule.name.as_deref().unwrap_or_default().to_owned(),
        limit: limits.first().cloned(),
        shadow_mode: rule.shadow_mode,
        quota_mode: rule.quota_mode,
        replaces: rule.replaces.iter().map(|r| r.to_string()).collect(),
        limits,
    }
}

fn limit_to_proto(l: &Limit) -> rsp::RateLimit {
    rate_limit_to_proto(l.name.as_deref(), l.requests_per_unit, &l.window)
}

fn rate_limit_to_proto(
    name: Option<&str>,
    requests_per_unit: u32,
    window: &Window,
) -> rsp::RateLimit {
    rsp::RateLimit {
        name: name.unwrap_or_default().to_owned(),
        requests_per_unit,
        // No unit is as long as a 5-minute window: UNKNOWN, so that Envoy
        // states no window rather than a wrong one.
        unit: window
            .reported_unit()
            .map_or(rsp::rate_limit::Unit::Unknown, unit_to_proto) as i32,
    }
}

fn counter_to_proto(c: &CounterReading<'_>) -> api::Counter {
    let name = match (c.tenant_quota, c.name, c.rule) {
        (true, _, _) => MONTHLY_QUOTA.to_owned(),
        (false, Some(name), _) => name.to_string(),
        (false, None, Some(rule)) => rule.path.to_string(),
        (false, None, None) => String::new(),
    };
    api::Counter {
        name,
        algorithm: c.spec.algorithm.as_str().to_owned(),
        limit: c.spec.limit,
        window: Some(duration_to_proto(Duration::from_micros(c.spec.period_us))),
        burst: match c.spec.algorithm {
            Algorithm::Gcra => c.spec.burst,
            Algorithm::SlidingWindow | Algorithm::FixedWindow => 0,
        },
        used: c.now.used,
        remaining: c.now.remaining,
        reset: Some(duration_to_proto(Duration::from_micros(c.now.reset_us))),
        admits: c.admits,
    }
}

/// Envoy dynamic metadata as envoyproxy/ratelimit builds it: the request's
/// `domain`, its `descriptors` (each with `entries` as `key=value`, its
/// `limit` override in protobuf text form and its `hitsAddend`, when set),
/// the request's `hitsAddend` unless 0, and `metadata`, the rules' merged
/// metadata, unless empty.
fn dynamic_metadata(request: &RateLimitRequest, metadata: &Metadata) -> pbjson_types::Struct {
    let mut fields = std::collections::HashMap::new();
    fields.insert("domain".to_owned(), string(request.domain.clone()));
    let descriptors = request.descriptors.iter().map(|d| {
        let mut fields = std::collections::HashMap::new();
        let entries = d
            .entries
            .iter()
            .map(|e| string(format!("{}={}", e.key, e.value)))
            .collect();
        fields.insert("entries".to_owned(), list(entries));
        if let Some(limit) = &d.limit {
            let mut text = Vec::new();
            if limit.requests_per_unit != 0 {
                text.push(format!("requests_per_unit:{}", limit.requests_per_unit));
            }
            if limit.unit != 0 {
                let unit = RateLimitUnit::try_from(limit.unit)
                    .map(|u| u.as_str_name().to_owned())
                    .unwrap_or_else(|_| limit.unit.to_string());
                text.push(format!("unit:{unit}"));
            }
            fields.insert("limit".to_owned(), string(text.join(" ")));
        }
        if let Some(hits) = &d.hits_addend {
            fields.insert("hitsAddend".to_owned(), number(hits.value as f64));
        }
        struct_value(pbjson_types::Struct { fields })
    });
    fields.insert("descriptors".to_owned(), list(descriptors.collect()));
    if request.hits_addend != 0 {
        fields.insert(
            "hitsAddend".to_owned(),
            number(f64::from(request.hits_addend)),
        );
    }
    if !metadata.is_empty() {
        fields.insert(
            "metadata".to_owned(),
            struct_value(metadata_struct(metadata)),
        );
    }
    pbjson_types::Struct { fields }
}

fn metadata_struct(metadata: &Metadata) -> pbjson_types::Struct {
    pbjson_types::Struct {
        fields: metadata
            .0
            .iter()
            .map(|(k, v)| (k.clone(), meta_value(v)))
            .collect(),
    }
}

fn meta_value(v: &MetaValue) -> pbjson_types::Value {
    match v {
        MetaValue::Null => pbjson_types::Value {
            kind: Some(Kind::NullValue(0)),
        },
        MetaValue::Bool(b) => pbjson_types::Value {
            kind: Some(Kind::BoolValue(*b)),
        },
        MetaValue::Number(n) => number(*n),
        MetaValue::String(s) => string(s.clone()),
        MetaValue::List(l) => list(l.iter().map(meta_value).collect()),
        MetaValue::Map(m) => struct_value(metadata_struct(m)),
    }
}

fn string(s: String) -> pbjson_types::Value {
    pbjson_types::Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn number(n: f64) -> pbjson_types::Value {
    pbjson_types::Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn list(values: Vec<pbjson_types::Value>) -> pbjson_types::Value {
    pbjson_types::Value {
        kind: Some(Kind::ListValue(pbjson_types::ListValue { values })),
    }
}

fn struct_value(s: pbjson_types::Struct) -> pbjson_types::Value {
    pbjson_types::Value {
        kind: Some(Kind::StructValue(s)),
    }
}
