//! The gRPC front end: Envoy's `RateLimitService`, plus health and
//! reflection. Proto types become domain types here and nowhere else, and
//! this is the one place where errors become `tonic::Status`.

mod convert;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::{histogram, Histogram};
use tonic::{Request, Response};
use tracing::instrument;

use crate::proto::rls::{
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
    RateLimitRequest, RateLimitResponse,
};
use crate::service::{DecideError, RateLimiter};
use crate::telemetry::names;

pub use convert::{request_from_proto, verdict_to_proto};

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

    pub fn into_server(self) -> RateLimitServiceServer<RateLimitHandler> {
        RateLimitServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitHandler {
    // A debug span: at the default `info` level an enabled span per call
    // costs the fmt layer a formatted field and a registry slot, about 7% of
    // the server's instructions per call (BENCHMARKS.md), for a span that
    // nothing logs inside. `--log-level info,sluice::grpc=debug` turns it on
    // (also for OTLP export).
    #[instrument(level = "debug", skip_all, fields(domain = %request.get_ref().domain))]
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, tonic::Status> {
        let started = Instant::now();
        let message = request.into_inner();
        let result = match request_from_proto(&message) {
            Ok(req) => self.limiter.should_rate_limit(&req).await,
            Err(e) => Err(DecideError::Invalid(e)),
        };
        self.duration
            .get_or_init(|| histogram!(names::REQUEST_DURATION, "api" => "grpc"))
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(verdict) => Ok(Response::new(verdict_to_proto(&verdict))),
            Err(e) => Err(to_status(e)),
        }
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
