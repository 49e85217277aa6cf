//! Envoy's `RateLimitQuotaService`: one stream per Envoy, usage reports in,
//! bucket actions out, whenever sluice has something to say (an answer to
//! a report, a new share when a window turns, an abandoned bucket). Proto
//! types become `rlqs` domain types here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use metrics::counter;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::envoy::r#type::v3::{
    rate_limit_strategy::{BlanketRule, Strategy},
    RateLimitStrategy, TokenBucket,
};
use crate::proto::rlqs::{
    rate_limit_quota_response::{bucket_action, BucketAction},
    rate_limit_quota_service_server::{RateLimitQuotaService, RateLimitQuotaServiceServer},
    BucketId as ProtoBucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use crate::rlqs::{Action, Assignment, BucketId, QuotaService, Report, Session, Usage};
use crate::telemetry::names;

/// The fully-qualified service name, as health checks name it.
pub const RLQS_SERVICE_NAME: &str = "envoy.service.rate_limit_quota.v3.RateLimitQuotaService";

/// A share's token bucket refills one token per this: in effect never, so
/// that a share is what the Envoy may admit until its next answer.
const SHARE_FILL_INTERVAL: Duration = Duration::from_secs(86_400);

type QuotaResponses = Pin<Box<dyn Stream<Item = Result<RateLimitQuotaResponse, Status>> + Send>>;

pub struct RateLimitQuotaHandler {
    service: Arc<QuotaService>,
    /// Becomes `true` when the server shuts down: every stream then ends,
    /// and its Envoy reconnects elsewhere (or here, after a restart).
    stop: watch::Receiver<bool>,
}

impl RateLimitQuotaHandler {
    pub fn new(service: Arc<QuotaService>, stop: watch::Receiver<bool>) -> RateLimitQuotaHandler {
        RateLimitQuotaHandler { service, stop }
    }

    pub fn into_server(self) -> RateLimitQuotaServiceServer<RateLimitQuotaHandler> {
        RateLimitQuotaServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RateLimitQuotaService for RateLimitQuotaHandler {
    type StreamRateLimitQuotasStream = QuotaResponses;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<QuotaResponses>, Status> {
        let stream = QuotaStream {
            session: self.service.session(),
            inbound: request.into_inner(),
            stop: self.stop.clone(),
            ended: false,
        };
        // The stream's whole state lives in this one future, which tonic
        // owns: it ends with the call, and no task outlives it.
        Ok(Response::new(Box::pin(futures::stream::unfold(
            stream,
            QuotaStream::next,
        ))))
    }
}

/// One Envoy's stream.
struct QuotaStream {
    session: Session,
    inbound: Streaming<RateLimitQuotaUsageReports>,
    stop: watch::Receiver<bool>,
    /// An error was sent: the stream ends.
    ended: bool,
}

impl QuotaStream {
    /// The next response: after a report, or when the session has
    /// something to push on its own. `None` ends the stream: the Envoy
    /// closed it, the connection failed, or the server is stopping.
    async fn next(mut self) -> Option<(Result<RateLimitQuotaResponse, Status>, QuotaStream)> {
        if self.ended {
            return None;
        }
        loop {
            let wake = self.session.until_wake();
            let event = tokio::select! {
                _ = self.stop.wait_for(|stop| *stop) => Event::Stop,
                message = self.inbound.message() => Event::Message(message),
                () = tokio::time::sleep(wake.unwrap_or_default()), if wake.is_some() => Event::Wake,
            };
            let actions = match event {
                Event::Stop | Event::Message(Ok(None) | Err(_)) => return None,
                Event::Message(Ok(Some(message))) => {
                    match self.session.report(report_from_proto(message)).await {
                        Ok(actions) => actions,
                        Err(e) => {
                            counter!(names::INVALID_REQUESTS).increment(1);
                            self.ended = true;
                            return Some((Err(Status::invalid_argument(e.to_string())), self));
                        }
                    }
                }
                Event::Wake => self.session.wake().await,
            };
            if !actions.is_empty() {
                return Some((Ok(response_to_proto(actions)), self));
            }
        }
    }
}

/// What a stream waits for.
enum Event {
    /// The server is shutting down.
    Stop,
    /// A report, the end of the stream, or a broken one.
    Message(Result<Option<RateLimitQuotaUsageReports>, Status>),
    /// The session has something to do on its own.
    Wake,
}

/// A report in domain terms. A bucket whose id is not a valid descriptor
/// is left out (and counted as an invalid request): it gets no assignment,
/// so its Envoy's `no_assignment_behavior` decides it.
fn report_from_proto(message: RateLimitQuotaUsageReports) -> Report {
    let usages = message
        .bucket_quota_usages
        .into_iter()
        .filter_map(|usage| {
            let pairs = usage.bucket_id.map(|id| id.bucket).unwrap_or_default();
            match BucketId::new(pairs) {
                Ok(bucket) => Some(Usage {
                    bucket,
                    allowed: usage.num_requests_allowed,
                    denied: usage.num_requests_denied,
                }),
                Err(e) => {
                    counter!(names::INVALID_REQUESTS).increment(1);
                    tracing::debug!(error = %e, "bucket left out of a quota report");
                    None
                }
            }
        })
        .collect();
    Report {
        domain: message.domain,
        usages,
    }
}

fn response_to_proto(actions: Vec<Action>) -> RateLimitQuotaResponse {
    let mut bucket_action = Vec::with_capacity(actions.len());
    for action in actions {
        match action {
            Action::Assign {
                bucket,
                assignment,
                ttl,
            } => {
                let id = bucket_id_to_proto(&bucket);
                if let Assignment::Share(_) = assignment {
                    // DENY_ALL first: Envoy 1.40 then starts the token
                    // bucket that follows full, with exactly the share (a
                    // token bucket replacing another starts empty unless
                    // the old one was full). Both are applied before any
                    // request sees either.
                    bucket_action.push(assign(id.clone(), blanket(BlanketRule::DenyAll), ttl));
                }
                let strategy = match assignment {
                    Assignment::AllowAll => blanket(BlanketRule::AllowAll),
                    Assignment::DenyAll => blanket(BlanketRule::DenyAll),
                    Assignment::Share(tokens) => Strategy::TokenBucket(TokenBucket {
                        max_tokens: tokens,
                        tokens_per_fill: Some(pbjson_types::UInt32Value { value: 1 }),
                        fill_interval: Some(duration_to_proto(SHARE_FILL_INTERVAL)),
                        name: String::new(),
                    }),
                };
                bucket_action.push(assign(id, strategy, ttl));
            }
            Action::Abandon { bucket } => bucket_action.push(BucketAction {
                bucket_id: Some(bucket_id_to_proto(&bucket)),
                bucket_action: Some(bucket_action::BucketAction::AbandonAction(
                    bucket_action::AbandonAction {},
                )),
            }),
        }
    }
    RateLimitQuotaResponse { bucket_action }
}

fn assign(bucket_id: ProtoBucketId, strategy: Strategy, ttl: Duration) -> BucketAction {
    BucketAction {
        bucket_id: Some(bucket_id),
        bucket_action: Some(bucket_action::BucketAction::QuotaAssignmentAction(
            bucket_action::QuotaAssignmentAction {
                assignment_time_to_live: Some(duration_to_proto(ttl)),
                rate_limit_strategy: Some(RateLimitStrategy {
                    strategy: Some(strategy),
                }),
            },
        )),
    }
}

fn blanket(rule: BlanketRule) -> Strategy {
    Strategy::BlanketRule(rule as i32)
}

fn bucket_id_to_proto(bucket: &BucketId) -> ProtoBucketId {
    ProtoBucketId {
        bucket: bucket.pairs().iter().cloned().collect(),
    }
}

/// Whole seconds: Envoy 1.40 reads no fractions of a time to live or a
/// fill interval.
fn duration_to_proto(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(pairs: &[(&str, &str)]) -> BucketId {
        BucketId::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    }

    fn strategy(action: &BucketAction) -> Option<&Strategy> {
        match &action.bucket_action {
            Some(bucket_action::BucketAction::QuotaAssignmentAction(a)) => {
                a.rate_limit_strategy.as_ref()?.strategy.as_ref()
            }
            _ => None,
        }
    }

    #[test]
    fn a_share_is_deny_all_then_a_full_token_bucket_that_never_refills() {
        let b = bucket(&[("name", "weather"), ("client_id", "alice")]);
        let response = response_to_proto(vec![Action::Assign {
            bucket: b,
            assignment: Assignment::Share(7),
            ttl: Duration::from_millis(15_900),
        }]);
        let [deny, share] = &response.bucket_action[..] else {
            panic!("two actions expected: {response:?}");
        };
        assert_eq!(deny.bucket_id, share.bucket_id);
        assert_eq!(
            strategy(deny),
            Some(&Strategy::BlanketRule(BlanketRule::DenyAll as i32))
        );
        let Some(Strategy::TokenBucket(tb)) = strategy(share) else {
            panic!("a token bucket expected: {share:?}");
        };
        assert_eq!(tb.max_tokens, 7);
        assert_eq!(tb.tokens_per_fill.map(|t| t.value), Some(1));
        assert_eq!(tb.fill_interval.map(|d| d.seconds), Some(86_400));
        let Some(bucket_action::BucketAction::QuotaAssignmentAction(a)) = &share.bucket_action
        else {
            panic!("an assignment expected");
        };
        // Whole seconds only.
        assert_eq!(
            a.assignment_time_to_live,
            Some(pbjson_types::Duration {
                seconds: 15,
                nanos: 0
            })
        );
    }

    #[test]
    fn blanket_rules_and_abandon_are_one_action_each() {
        let b = bucket(&[("client_id", "bob")]);
        let ttl = Duration::from_secs(3600);
        let response = response_to_proto(vec![
            Action::Assign {
                bucket: b.clone(),
                assignment: Assignment::AllowAll,
                ttl,
            },
            Action::Assign {
                bucket: b.clone(),
                assignment: Assignment::DenyAll,
                ttl,
            },
            Action::Abandon { bucket: b },
        ]);
        assert_eq!(response.bucket_action.len(), 3);
        assert_eq!(
            strategy(&response.bucket_action[0]),
            Some(&Strategy::BlanketRule(BlanketRule::AllowAll as i32))
        );
        assert_eq!(
            strategy(&response.bucket_action[1]),
            Some(&Strategy::BlanketRule(BlanketRule::DenyAll as i32))
        );
        assert!(matches!(
            response.bucket_action[2].bucket_action,
            Some(bucket_action::BucketAction::AbandonAction(_))
        ));
    }

    #[test]
    fn invalid_buckets_are_left_out_of_a_report() {
        use crate::proto::rlqs::rate_limit_quota_usage_reports::BucketQuotaUsage;
        let usage = |pairs: &[(&str, &str)]| BucketQuotaUsage {
            bucket_id: Some(ProtoBucketId {
                bucket: pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
            time_elapsed: None,
            num_requests_allowed: 3,
            num_requests_denied: 1,
            last_report: None,
        };
        let report = report_from_proto(RateLimitQuotaUsageReports {
            domain: "weather".into(),
            bucket_quota_usages: vec![
                usage(&[("name", "weather"), ("client_id", "alice")]),
                usage(&[]),
                usage(&[("", "x")]),
            ],
        });
        assert_eq!(report.domain, "weather");
        assert_eq!(
            report.usages,
            vec![Usage {
                bucket: bucket(&[("client_id", "alice"), ("name", "weather")]),
                allowed: 3,
                denied: 1,
            }]
        );
    }
}
