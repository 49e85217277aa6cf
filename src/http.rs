//! The HTTP front end: `/metrics`, `/healthz`, `/readyz`, and two calls in
//! proto3 JSON. `POST /json` is Envoy's rate-limit call: the body is a
//! `RateLimitRequest` (lowerCamelCase or proto field names, 64-bit numbers
//! as strings or numbers, enums by name or number), the answer a
//! `RateLimitResponse` with every field written, zero values too. 200 when
//! OK, 429 when over the limit, 400 `{"error": ...}` naming the field for
//! bad input, 413 for a body over [`MAX_REQUEST_BYTES`], 503 when the store
//! fails under `--failure-mode deny`. `POST /explain` takes the same body
//! and answers a `sluice.v1.ExplainResponse` (200, whatever it would
//! decide): why `/json` would answer what it would, counting nothing.
//!
//! The JSON mapping is generated from the protos (pbjson, see build.rs) and a
//! decoded message goes through `convert` as a gRPC one does, so `/json` and
//! gRPC cannot drift apart: this module only routes and picks status codes.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics::histogram;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::convert::{explained_to_proto, request_from_proto, verdict_to_proto};
use crate::health::Readiness;
use crate::limiter::bounds::MAX_REQUEST_BYTES;
use crate::limiter::Code;
use crate::listen::{self, ConnectionSettings};
use crate::proto::rls::RateLimitRequest;
use crate::service::{DecideError, RateLimiter};
use crate::telemetry::names;

#[derive(Clone)]
pub struct HttpState {
    pub limiter: Arc<RateLimiter>,
    pub readiness: Arc<Readiness>,
    pub metrics: PrometheusHandle,
}

/// Serves `router` on `listener` within `settings` until `shutdown`
/// completes; then stops accepting and waits for the connections open to
/// finish their requests (the caller bounds that wait).
///
/// Not `axum::serve`: it sets no timer, so a client could hold a connection
/// forever with half a request head; here an HTTP/1 connection has
/// the handshake deadline to send its first bytes and `http_idle_timeout`
/// to send each request head, HTTP/2 connections are
/// kept alive by PINGs and bounded in streams, and the port in connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &ConnectionSettings,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(settings.http_idle_timeout)
        .max_buf_size((settings.max_header_bytes as usize).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .max_header_list_size(settings.max_header_bytes);
    let mut incoming = listen::incoming(listener, "http", settings.http, |mut tcp| async move {
        let first = listen::read_protocol(&mut tcp).await?;
        Ok::<_, std::io::Error>((tcp, first))
    });
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let connection = tokio::select! {
            connection = incoming.next_connection() => connection,
            () = &mut shutdown => break,
        };
        let Some(connection) = connection else { break };
        let service = TowerToHyperService::new(router.clone());
        let served = builder
            .serve_connection(TokioIo::new(connection), service)
            .into_owned();
        let served = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    // Closes the listener before waiting for the connections to finish.
    drop(incoming);
    graceful.shutdown().await;
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/json", post(json))
        .route("/explain", post(explain))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
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

async fn json(State(state): State<HttpState>, Body(body): Body) -> Response {
    let started = Instant::now();
    let response = match decode_request(&body) {
        Ok(message) => decide(&state.limiter, &message).await,
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    };
    histogram!(names::REQUEST_DURATION, "api" => "json").record(started.elapsed().as_secs_f64());
    response
}

/// `POST /explain`: the body is a `/json` request; the answer a
/// `sluice.v1.ExplainResponse`, 200 whatever it would decide.
async fn explain(State(state): State<HttpState>, Body(body): Body) -> Response {
    let message = match decode_request(&body) {
        Ok(message) => message,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let result = match request_from_proto(&message) {
        Ok(request) => {
            state
                .limiter
                .explain(&request, |explained| {
                    explained_to_proto(&request, explained)
                })
                .await
        }
        Err(e) => Err(DecideError::Invalid(e)),
    };
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => decide_error(e),
    }
}

async fn decide(limiter: &RateLimiter, message: &RateLimitRequest) -> Response {
    let result = match request_from_proto(message) {
        Ok(request) => limiter.should_rate_limit(&request).await,
        Err(e) => Err(DecideError::Invalid(e)),
    };
    match result {
        Ok(verdict) => {
            let code = match verdict.overall {
                Code::Ok => StatusCode::OK,
                Code::OverLimit => StatusCode::TOO_MANY_REQUESTS,
            };
            (code, Json(verdict_to_proto(message, &verdict))).into_response()
        }
        Err(e) => decide_error(e),
    }
}

fn decide_error(e: DecideError) -> Response {
    match e {
        DecideError::Invalid(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
        DecideError::Unavailable(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// A request body of at most [`MAX_REQUEST_BYTES`]. A longer one is 413
/// with a JSON error: from its `Content-Length` before any of it is read,
/// else as soon as the bytes read pass the bound (`DefaultBodyLimit`).
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Body, Response> {
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is over the bound of {MAX_REQUEST_BYTES} bytes"),
            )
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > MAX_REQUEST_BYTES as u64) {
            return Err(too_large());
        }
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large()),
            Err(e) => Err(error(e.status(), e.body_text())),
        }
    }
}

/// The body as a message; an error names the path to the bad field
/// (`descriptors[0].limit.unit: unknown variant ...`).
pub fn decode_request(body: &[u8]) -> Result<RateLimitRequest, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let error = e.into_inner();
        let mut message = error.to_string();
        if message.starts_with(NOT_A_NUMBER) {
            message = format!(
                "expected a number that fits the field, or a string holding one, at line {} column {}",
                error.line(),
                error.column()
            );
        }
        if path == "." {
            message
        } else {
            format!("{path}: {message}")
        }
    })
}

/// pbjson reads a number as an untagged enum (a number, or a string holding
/// one), whose error for anything else (`-1` for a uint32, `1.5`, `true`)
/// says only that no variant matched.
const NOT_A_NUMBER: &str = "data did not match any variant of untagged enum";

fn error(code: StatusCode, message: String) -> Response {
    #[derive(Serialize)]
    struct Error {
        error: String,
    }
    (code, Json(Error { error: message })).into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limiter::{CurrentLimit, LimitOverride, Unit, Window};
    use crate::service::{Status, Verdict};

    #[test]
    fn requests_accept_camel_case_snake_case_and_string_numbers() {
        let message = decode_request(
            br#"{"domain":"d","hits_addend":3,"descriptors":[{"entries":[{"key":"k","value":"v"}],"hitsAddend":"0","limit":{"requestsPerUnit":5,"unit":"MINUTE"}}]}"#,
        )
        .unwrap();
        let req = request_from_proto(&message).unwrap();
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
        let err = decode_request(br#"{"domain":"d","descriptors":[{"entriez":[]}]}"#).unwrap_err();
        assert!(err.starts_with("descriptors[0]"), "{err}");
        assert!(err.contains("entriez"), "{err}");
    }

    #[test]
    fn numbers_out_of_range_say_so() {
        let err = decode_request(br#"{"domain":"d","hitsAddend":-1}"#).unwrap_err();
        assert!(
            err.starts_with("hitsAddend: expected a number that fits the field"),
            "{err}"
        );
    }

    #[test]
    fn answers_are_proto3_json_with_zero_values_written() {
        let verdict = Verdict {
            overall: Code::OverLimit,
            statuses: vec![Status {
                code: Code::OverLimit,
                limit: Some(CurrentLimit {
                    requests_per_unit: 3,
                    window: Window::of(Unit::Minute),
                    name: None,
                }),
                remaining: 0,
                reset: Some(Duration::from_millis(1500)),
                quota: None,
            }],
            response_headers: Vec::new(),
            dynamic_metadata: None,
        };
        let json =
            serde_json::to_value(verdict_to_proto(&RateLimitRequest::default(), &verdict)).unwrap();
        let status = &json["statuses"][0];
        assert_eq!(json["overallCode"], "OVER_LIMIT");
        assert_eq!(status["currentLimit"]["unit"], "MINUTE");
        assert_eq!(status["currentLimit"]["requestsPerUnit"], 3);
        assert_eq!(status["limitRemaining"], 0);
        assert_eq!(status["durationUntilReset"], "1.500s");
        assert!(status.get("quota").is_none(), "{json}");
    }
}
