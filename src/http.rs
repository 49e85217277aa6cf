//! The HTTP front end: `/metrics`, `/healthz`, `/readyz`, and `POST /json`,
//! which takes the proto3 JSON form of a `RateLimitRequest` and answers the
//! JSON `RateLimitResponse`: 200 when OK, 429 when over the limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics::histogram;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Deserializer, Serialize};

use crate::health::Readiness;
use crate::limiter::{Code, Descriptor, LimitOverride, Request, RequestError, Unit};
use crate::service::{DecideError, RateLimiter, Verdict};
use crate::telemetry::names;

#[derive(Clone)]
pub struct HttpState {
    pub limiter: Arc<RateLimiter>,
    pub readiness: Arc<Readiness>,
    pub metrics: PrometheusHandle,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/json", post(json))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let store = state.limiter.store();
    let report = state.readiness.report(store.kind(), store.health());
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report))
}

async fn json(State(state): State<HttpState>, body: Bytes) -> Response {
    let started = Instant::now();
    let response = match decode(&body) {
        Err(message) => error(StatusCode::BAD_REQUEST, message),
        Ok(request) => match request.to_domain() {
            Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            Ok(req) => match state.limiter.should_rate_limit(&req).await {
                Ok(verdict) => {
                    let code = match verdict.overall {
                        Code::Ok => StatusCode::OK,
                        Code::OverLimit => StatusCode::TOO_MANY_REQUESTS,
                    };
                    (code, Json(JsonResponse::from(&verdict))).into_response()
                }
                Err(DecideError::Invalid(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
                Err(DecideError::Unavailable(e)) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                }
            },
        },
    };
    histogram!(names::REQUEST_DURATION, "api" => "json").record(started.elapsed().as_secs_f64());
    response
}

fn decode(body: &[u8]) -> Result<JsonRequest, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

fn error(code: StatusCode, message: String) -> Response {
    #[derive(Serialize)]
    struct Error {
        error: String,
    }
    (code, Json(Error { error: message })).into_response()
}

// === JSON request: proto3 JSON mapping (lowerCamelCase, or the proto names) ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRequest {
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub descriptors: Vec<JsonDescriptor>,
    #[serde(
        default,
        rename = "hitsAddend",
        alias = "hits_addend",
        deserialize_with = "number"
    )]
    pub hits_addend: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonDescriptor {
    #[serde(default)]
    pub entries: Vec<JsonEntry>,
    #[serde(default)]
    pub limit: Option<JsonOverride>,
    #[serde(
        default,
        rename = "hitsAddend",
        alias = "hits_addend",
        deserialize_with = "opt_number"
    )]
    pub hits_addend: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonEntry {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonOverride {
    #[serde(
        default,
        rename = "requestsPerUnit",
        alias = "requests_per_unit",
        deserialize_with = "number"
    )]
    pub requests_per_unit: u64,
    #[serde(default)]
    pub unit: serde_json::Value,
}

/// proto3 JSON writes 64-bit integers as strings and accepts numbers too.
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(opt_number(d)?.unwrap_or(0))
}

fn opt_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a non-negative integer, got {n}"))),
        serde_json::Value::String(s) => s
            .parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("expected a non-negative integer, got \"{s}\""))),
        other => Err(D::Error::custom(format!(
            "expected a non-negative integer, got {other}"
        ))),
    }
}

impl JsonRequest {
    pub fn to_domain(&self) -> Result<Request<'_>, RequestError> {
        let hits = self.hits_addend.clamp(1, u64::from(u32::MAX));
        let descriptors = self
            .descriptors
            .iter()
            .enumerate()
            .map(|(index, d)| {
                let limit_override = match &d.limit {
                    None => None,
                    Some(o) => Some(LimitOverride {
                        requests_per_unit: u32::try_from(o.requests_per_unit).map_err(|_| {
                            RequestError::BadOverrideUnit {
                                index,
                                reason: "requests_per_unit is larger than 4294967295".into(),
                            }
                        })?,
                        unit: json_unit(&o.unit).ok_or_else(|| RequestError::BadOverrideUnit {
                            index,
                            reason: format!("unknown rate limit unit {}", o.unit),
                        })?,
                    }),
                };
                Ok(Descriptor::new(
                    d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())),
                    limit_override,
                    d.hits_addend,
                ))
            })
            .collect::<Result<_, RequestError>>()?;
        Ok(Request {
            domain: &self.domain,
            descriptors,
            hits,
        })
    }
}

/// An enum in proto3 JSON is its name or its number.
fn json_unit(v: &serde_json::Value) -> Option<Unit> {
    match v {
        serde_json::Value::String(s) => Unit::parse(s),
        serde_json::Value::Number(n) => {
            crate::convert::unit_from_proto(i32::try_from(n.as_u64()?).ok()?)
        }
        _ => None,
    }
}

// === JSON response ===

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JsonResponse {
    pub overall_code: String,
    pub statuses: Vec<JsonStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_add: Vec<JsonHeader>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JsonStatus {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_limit: Option<JsonLimit>,
    pub limit_remaining: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_until_reset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<JsonQuota>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JsonLimit {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub requests_per_unit: u32,
    pub unit: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JsonQuota {
    pub requests: u32,
    /// RFC 3339, UTC.
    pub valid_until: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JsonHeader {
    pub key: String,
    pub value: String,
}

impl From<&Verdict> for JsonResponse {
    fn from(v: &Verdict) -> JsonResponse {
        JsonResponse {
            overall_code: v.overall.as_str().to_owned(),
            statuses: v
                .statuses
                .iter()
                .map(|s| JsonStatus {
                    code: s.code.as_str().to_owned(),
                    current_limit: s.limit.as_ref().map(|l| JsonLimit {
                        name: l.name.as_deref().unwrap_or_default().to_owned(),
                        requests_per_unit: l.requests_per_unit,
                        unit: l.unit.as_str().to_ascii_uppercase(),
                    }),
                    limit_remaining: s.remaining,
                    duration_until_reset: s.reset.map(proto_duration),
                    quota: s.quota.map(|(requests, until_us)| JsonQuota {
                        requests,
                        valid_until: rfc3339(until_us),
                    }),
                })
                .collect(),
            response_headers_to_add: v
                .response_headers
                .iter()
                .map(|(k, val)| JsonHeader {
                    key: (*k).to_owned(),
                    value: val.clone(),
                })
                .collect(),
            dynamic_metadata: (!v.metadata.is_empty()).then(|| {
                v.metadata
                    .iter()
                    .map(|(k, val)| (k.clone(), serde_json::Value::String(val.clone())))
                    .collect()
            }),
        }
    }
}

/// A `google.protobuf.Duration` in proto3 JSON: `"42s"`, `"1.500s"`.
pub fn proto_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else if nanos % 1_000_000 == 0 {
        format!("{}.{:03}s", d.as_secs(), nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{}.{:06}s", d.as_secs(), nanos / 1_000)
    } else {
        format!("{}.{:09}s", d.as_secs(), nanos)
    }
}

fn rfc3339(us: u64) -> String {
    chrono::DateTime::from_timestamp_micros(us as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_proto3_json_form() {
        assert_eq!(proto_duration(Duration::from_secs(42)), "42s");
        assert_eq!(proto_duration(Duration::from_millis(1500)), "1.500s");
        assert_eq!(
            proto_duration(Duration::from_micros(2_000_001)),
            "2.000001s"
        );
    }

    #[test]
    fn requests_accept_camel_case_snake_case_and_string_numbers() {
        let r = decode(
            br#"{"domain":"d","hits_addend":3,"descriptors":[{"entries":[{"key":"k","value":"v"}],"hitsAddend":"0","limit":{"requestsPerUnit":5,"unit":"MINUTE"}}]}"#,
        )
        .unwrap();
        let req = r.to_domain().unwrap();
        assert_eq!(req.hits, 3);
        assert_eq!(req.descriptors[0].hits, Some(0));
        assert_eq!(
            req.descriptors[0].limit_override,
            Some(LimitOverride {
                requests_per_unit: 5,
                unit: Unit::Minute
            })
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = decode(br#"{"domain":"d","descriptors":[{"entriez":[]}]}"#).unwrap_err();
        assert!(err.starts_with("descriptors[0]"), "{err}");
        assert!(err.contains("entriez"), "{err}");
    }
}
