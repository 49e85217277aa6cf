//! The gRPC front end: Envoy's `RateLimitService` and its Rate Limit Quota
//! Service (`rlqs`), sluice's own `sluice.v1.Sluice` (`Explain`), plus
//! health and reflection. Proto types become domain types here and nowhere
//! else, and this is the one place where errors become `tonic::Status`.

mod bounded;
mod server;
mod short;

pub mod rlqs;

pub use rlqs::{RateLimitQuotaHandler, RLQS_SERVICE_NAME};
pub use server::GrpcServer;
pub use short::{framed, ok_trailers, OkBody};

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{histogram, Histogram};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataMap};
use tonic::{Request, Response};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::limiter::bounds::MAX_REQUEST_BYTES;
use crate::proto::rls::{
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
    RateLimitRequest, RateLimitResponse,
};
use crate::proto::sluice::v1::{
    sluice_server::{Sluice, SluiceServer},
    ExplainResponse,
};
use crate::service::{DecideError, RateLimiter};
use crate::telemetry::names;

pub use bounded::Bounded;

use crate::convert::{explained_to_proto, request_from_proto, verdict_to_proto};

/// The fully-qualified service name, as health checks name it.
pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";

pub struct RateLimitHandler {
    limiter: Arc<RateLimiter>,
    /// Resolved on the first call, once the recorder is installed: the
    /// `histogram!` macro looks its key up in the registry on every call.
    duration: OnceLock<Histogram>,
}

impl RateLimitHandler {
    pub fn new(limiter: Arc<RateLimiter>) -> RateLimitHandler {
        RateLimitHandler {
            limiter,
            duration: OnceLock::new(),
        }
    }

    /// The service, its request messages bounded by
    /// [`MAX_REQUEST_BYTES`](crate::limiter::bounds::MAX_REQUEST_BYTES).
    /// Uncompressed calls are answered before they reach it, by
    /// the short path (`short`) with the same handler.
    pub fn server(
        handler: Arc<RateLimitHandler>,
    ) -> Bounded<RateLimitServiceServer<RateLimitHandler>> {
        Bounded::new(
            RateLimitServiceServer::from_arc(handler).max_decoding_message_size(MAX_REQUEST_BYTES),
            MAX_REQUEST_BYTES,
        )
    }

    /// One call, whichever path it came by: its message, and its metadata
    /// for the trace context.
    async fn answer(
        &self,
        message: RateLimitRequest,
        metadata: &MetadataMap,
    ) -> Result<RateLimitResponse, tonic::Status> {
        // A debug span: at the default `info` level an enabled span per
        // call costs the fmt layer a formatted field and a registry slot,
        // about 7% of the server's instructions per call (BENCHMARKS.md),
        // for a span that nothing logs inside. It is on with
        // `--otlp-endpoint` (exported as a child of the caller's
        // `traceparent`, when Envoy traces) or with
        // `--log-level info,sluice::grpc=debug`.
        let span = tracing::debug_span!("should_rate_limit", domain = %message.domain);
        if !span.is_disabled() {
            let parent = TraceContextPropagator::new().extract(&Metadata(metadata));
            // Fails only without the OpenTelemetry layer (logging alone).
            let _ = span.set_parent(parent);
        }
        self.decide(message).instrument(span).await
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitHandler {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, tonic::Status> {
        let (metadata, _, message) = request.into_parts();
        self.answer(message, &metadata).await.map(Response::new)
    }
}

impl RateLimitHandler {
    async fn decide(&self, message: RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        let started = Instant::now();
        let result = match request_from_proto(&message) {
            Ok(req) => self.limiter.should_rate_limit(&req).await,
            Err(e) => Err(DecideError::Invalid(e)),
        };
        self.duration
            .get_or_init(|| histogram!(names::REQUEST_DURATION, "api" => "grpc"))
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(verdict) => Ok(verdict_to_proto(&message, &verdict)),
            Err(e) => Err(to_status(e)),
        }
    }
}

/// `sluice.v1.Sluice`: explains what `ShouldRateLimit` would answer.
pub struct ExplainHandler {
    limiter: Arc<RateLimiter>,
}

impl ExplainHandler {
    pub fn new(limiter: Arc<RateLimiter>) -> ExplainHandler {
        ExplainHandler { limiter }
    }

    /// The service, its request messages bounded as `ShouldRateLimit`'s.
    pub fn into_server(self) -> Bounded<SluiceServer<ExplainHandler>> {
        Bounded::new(
            SluiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES),
            MAX_REQUEST_BYTES,
        )
    }
}

#[tonic::async_trait]
impl Sluice for ExplainHandler {
    async fn explain(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<ExplainResponse>, tonic::Status> {
        let message = request.into_inner();
        let request = request_from_proto(&message).map_err(|e| to_status(e.into()))?;
        self.limiter
            .explain(&request, |explained| {
                explained_to_proto(&request, explained)
            })
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}

/// A call's gRPC metadata as a source of trace context (`traceparent`).
struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Errors to gRPC codes: bad input is INVALID_ARGUMENT naming the field; a
/// store failure under `--failure-mode deny` is UNAVAILABLE, so Envoy's
/// `failure_mode_deny` decides. Never UNKNOWN.
pub fn to_status(error: DecideError) -> tonic::Status {
    match error {
        DecideError::Invalid(e) => tonic::Status::invalid_argument(e.to_string()),
        DecideError::Unavailable(e) => tonic::Status::unavailable(e.to_string()),
    }
}
