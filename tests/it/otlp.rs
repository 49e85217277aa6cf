//! Traces over OTLP: the real `sluice serve` exports the span of each
//! rate-limit call, as a child of the caller's W3C `traceparent`, to an
//! OTLP/gRPC trace receiver started here, and the span carries the domain
//! but never a descriptor value.

use crate::support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use support::{repo, request, wait_until, SluiceProcess};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const CLIENT: &str = "otlp-private-client-id";

/// Keeps every export it receives.
#[derive(Clone, Default)]
struct Receiver {
    exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.exports.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_receiver() -> (SocketAddr, Receiver) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, receiver)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_each_call_as_a_child_of_the_callers_trace() {
    let (otlp, receiver) = start_receiver().await;
    let mut command = Command::new(SLUICE);
    command
        .args(["serve", "--rules", "examples/rules"])
        .args(["--otlp-endpoint", &format!("http://{otlp}")])
        .current_dir(repo())
        // Export batches every 100 ms instead of every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let sluice = SluiceProcess::start(command).await;
    let (grpc, log_text) = (sluice.grpc, || sluice.log_text());

    let mut client =
        sluice::proto::rls::rate_limit_service_client::RateLimitServiceClient::connect(format!(
            "http://{grpc}"
        ))
        .await
        .unwrap();
    let mut call = tonic::Request::new(request("weather", &[&[("client_id", CLIENT)]]));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01").parse().unwrap(),
    );
    let answer = client.should_rate_limit(call).await.unwrap().into_inner();
    assert!(answer.statuses[0].current_limit.is_some());

    let exports = receiver.exports.clone();
    let exported = wait_until(Duration::from_secs(10), || {
        let exports = exports.clone();
        async move { !exports.lock().unwrap().is_empty() }
    })
    .await
    .is_some();
    assert!(exported, "no trace exported within 10 s:\n{}", log_text());

    let exports = receiver.exports.lock().unwrap().clone();
    let resource_spans: Vec<_> = exports.iter().flat_map(|e| &e.resource_spans).collect();
    let service_names: Vec<String> = resource_spans
        .iter()
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .filter(|a| a.key == "service.name")
        .map(|a| text(&a.value))
        .collect();
    assert!(
        service_names.iter().all(|n| n == "sluice") && !service_names.is_empty(),
        "{service_names:?}"
    );
    let spans: Vec<_> = resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    let call_span = spans
        .iter()
        .find(|s| s.name == "should_rate_limit")
        .unwrap_or_else(|| panic!("no should_rate_limit span in {spans:#?}"));
    assert_eq!(hex(&call_span.trace_id), TRACE_ID, "the caller's trace");
    assert_eq!(
        hex(&call_span.parent_span_id),
        PARENT_ID,
        "the caller's span"
    );
    let domain = call_span
        .attributes
        .iter()
        .find(|a| a.key == "domain")
        .map(|a| text(&a.value));
    assert_eq!(domain.as_deref(), Some("weather"));
    let everything = format!("{exports:?}");
    assert!(
        !everything.contains(CLIENT),
        "an exported trace holds a descriptor value"
    );
}
