//! Sessions against the in-process store, with a manual clock: what each
//! report and each wake pushes.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::limiter::{Code, Descriptor, Outcome, Request};
use crate::service::{FailureMode, LimiterSettings};
use crate::storage::memory::MemoryStore;
use crate::storage::{CounterStore, StoreError};

const SECOND: u64 = 1_000_000;
/// 10 s into a minute.
const T0: u64 = 1_700_000_040 * SECOND - 1_700_000_040 * SECOND % (60 * SECOND) + 10 * SECOND;

const RULES: &str = "
domain: weather
descriptors:
  - key: client_id
    rate_limit: { unit: minute, requests_per_unit: 10, algorithm: fixed_window }
    descriptors:
      - key: name
        rate_limit: { unit: minute, requests_per_unit: 20, algorithm: fixed_window }
  - key: shadow
    shadow_mode: true
    rate_limit: { unit: minute, requests_per_unit: 1, algorithm: fixed_window }
  - key: open
    rate_limit: { unlimited: true }
";

const IDLE: Duration = Duration::from_secs(120);

struct Fixture {
    service: Arc<QuotaService>,
    limiter: Arc<RateLimiter>,
    clock: Arc<ManualClock>,
}

fn fixture_with(
    store: Option<Arc<dyn CounterStore>>,
    failure_mode: FailureMode,
    idle_timeout: Duration,
) -> Fixture {
    let root = crate::rules::yaml::parse_str("weather.yaml", RULES).unwrap();
    let rules = crate::rules::yaml::compile_all(&[("weather.yaml".into(), root)]).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let store = store.unwrap_or_else(|| Arc::new(MemoryStore::new(1_000, clock.clone())));
    let limiter = Arc::new(RateLimiter::new(
        Arc::new(ArcSwap::from_pointee(rules)),
        store,
        KeyHasher::from_secret(b"test"),
        LimiterSettings::for_tests(failure_mode),
        clock.clone(),
    ));
    let settings = QuotaSettings {
        idle_timeout,
        ..QuotaSettings::default()
    };
    Fixture {
        service: QuotaService::new(limiter.clone(), settings),
        limiter,
        clock,
    }
}

fn fixture() -> Fixture {
    fixture_with(None, FailureMode::Allow, IDLE)
}

fn bucket(pairs: &[(&str, &str)]) -> BucketId {
    BucketId::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
}

fn report(domain: &str, usages: &[(&BucketId, u64, u64)]) -> Report {
    Report {
        domain: domain.into(),
        usages: usages
            .iter()
            .map(|(bucket, allowed, denied)| Usage {
                bucket: (*bucket).clone(),
                allowed: *allowed,
                denied: *denied,
            })
            .collect(),
    }
}

fn assigned(actions: &[Action]) -> Vec<Assignment> {
    actions
        .iter()
        .map(|a| match a {
            Action::Assign { assignment, .. } => *assignment,
            Action::Abandon { .. } => panic!("not an assignment: {actions:?}"),
        })
        .collect()
}

#[test]
fn bucket_ids_are_descriptors_in_byte_order_of_their_keys() {
    let b = bucket(&[("name", "weather"), ("client_id", "alice")]);
    let keys: Vec<&str> = b.entries().iter().map(|e| e.key).collect();
    assert_eq!(keys, ["client_id", "name"]);
    assert_eq!(format!("{b:?}"), r#"["client_id", "name"]"#, "no values");
    assert_eq!(BucketId::new([]), Err(BucketError::Empty));
    let many = (0..17).map(|i| (format!("k{i}"), String::new()));
    assert!(matches!(
        BucketId::new(many),
        Err(BucketError::TooManyPairs { .. })
    ));
}

#[tokio::test]
async fn a_bucket_no_rule_limits_is_allowed_for_long() {
    let f = fixture();
    let mut session = f.service.session();
    for b in [
        bucket(&[("unknown", "x")]),
        bucket(&[("open", "x")]),
        bucket(&[("client_id", "alice"), ("name", "weather"), ("more", "x")]),
    ] {
        let actions = session
            .report(report("weather", &[(&b, 1, 0)]))
            .await
            .unwrap();
        assert_eq!(
            actions,
            vec![Action::Assign {
                bucket: b.clone(),
                assignment: Assignment::AllowAll,
                ttl: ALLOW_ALL_TTL,
            }]
        );
        // Not again until half of it has passed.
        f.clock.advance(5 * SECOND);
        let actions = session.report(report("", &[(&b, 3, 0)])).await.unwrap();
        assert_eq!(actions, vec![]);
    }
    let mut other = f.service.session();
    let b = bucket(&[("client_id", "alice")]);
    let actions = other
        .report(report("elsewhere", &[(&b, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::AllowAll]);
}

#[tokio::test]
async fn an_envoy_alone_gets_what_is_left_then_deny_all_then_a_new_window() {
    let f = fixture();
    let mut session = f.service.session();
    let alice = bucket(&[("client_id", "alice")]);
    // The first request passed before any assignment: 9 left, all hers.
    let actions = session
        .report(report("weather", &[(&alice, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::Share(9)]);
    let ttl = QuotaSettings::default().assignment_ttl;
    assert!(matches!(&actions[0], Action::Assign { ttl: t, .. } if *t == ttl));
    f.clock.advance(5 * SECOND);
    let actions = session
        .report(report("", &[(&alice, 9, 30)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::DenyAll]);

    // DENY_ALL is renewed with each promise window (15 s) until the rule's
    // window ends, 50 s after T0; then the new window's budget, all hers.
    let rule_turn = T0 + 50 * SECOND + 2 * share::TURN_MARGIN_US;
    loop {
        let wake = session.next_wake_us().unwrap();
        assert!(wake <= rule_turn);
        f.clock.set(wake);
        let actions = session.wake().await;
        if wake < rule_turn {
            assert_eq!(assigned(&actions), [Assignment::DenyAll]);
        } else {
            assert_eq!(assigned(&actions), [Assignment::Share(10)]);
            break;
        }
    }
}

#[tokio::test]
async fn a_promise_windows_turn_carries_a_held_share_and_keeps_what_was_admitted() {
    let f = fixture();
    let (mut a, mut b) = (f.service.session(), f.service.session());
    let alice = bucket(&[("client_id", "alice")]);
    let actions = a
        .report(report("weather", &[(&alice, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::Share(9)]);
    // The promise window (15 s of the minute) turns 5 s after T0; the
    // Envoy has admitted 6 of its 9 since and not reported them yet. Its
    // share is carried into the new window: nothing is sent, so its
    // tokens are not replaced (a renewed share of 9 would let 6 too many
    // through).
    let turn = a.next_wake_us().unwrap();
    assert_eq!(turn, T0 + 5 * SECOND + share::TURN_MARGIN_US);
    f.clock.set(turn);
    assert_eq!(a.wake().await, vec![]);
    assert_eq!(a.next_wake_us(), Some(turn + 15 * SECOND));
    // Carried, the share is still promised: another Envoy gets nothing.
    f.clock.advance(SECOND);
    let actions = b
        .report(report("weather", &[(&alice, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::DenyAll]);
    // The next report counts the 6 and settles the 9: 10 - 1 - 1 - 6 are
    // left.
    f.clock.advance(SECOND);
    let actions = a.report(report("", &[(&alice, 6, 0)])).await.unwrap();
    assert_eq!(assigned(&actions), [Assignment::Share(2)]);
}

#[tokio::test]
async fn a_report_is_counted_in_the_rules_own_counter() {
    let f = fixture();
    let mut session = f.service.session();
    let b = bucket(&[("name", "weather"), ("client_id", "alice")]);
    let actions = session
        .report(report("weather", &[(&b, 4, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::Share(16)]);
    // A per-request call with the same entries, in key order, shares it.
    let request = Request {
        domain: "weather",
        descriptors: vec![Descriptor::new(
            [("client_id", "alice"), ("name", "weather")],
            None,
            None,
        )],
        hits: 1,
    };
    let verdict = f.limiter.should_rate_limit(&request).await.unwrap();
    assert_eq!(verdict.overall, Code::Ok);
    assert_eq!(verdict.statuses[0].remaining, 15);
}

#[tokio::test]
async fn envoys_on_one_bucket_share_its_budget() {
    let f = fixture();
    let (mut a, mut b) = (f.service.session(), f.service.session());
    let alice = bucket(&[("client_id", "alice")]);
    let Assignment::Share(first) = assigned(
        &a.report(report("weather", &[(&alice, 1, 0)]))
            .await
            .unwrap(),
    )[0] else {
        panic!("a share expected");
    };
    assert_eq!(first, 9, "alone so far: all that is left");
    // All of it is promised to the first Envoy until it reports again.
    let actions = b
        .report(report("weather", &[(&alice, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::DenyAll]);
    // It used 3 of its 9: the rest is free again, split by demand
    // (4 requests here, 1 + 5 denied there).
    f.clock.advance(2 * SECOND);
    let Assignment::Share(a_share) =
        assigned(&a.report(report("", &[(&alice, 3, 0)])).await.unwrap())[0]
    else {
        panic!("a share expected");
    };
    f.clock.advance(SECOND);
    let Assignment::Share(b_share) =
        assigned(&b.report(report("", &[(&alice, 0, 5)])).await.unwrap())[0]
    else {
        panic!("a share expected");
    };
    // 5 left: never more promised than that.
    assert!(a_share + b_share <= 5, "{a_share} + {b_share}");
    assert!(b_share >= 2, "its part of the demand: {b_share}");
}

#[tokio::test]
async fn a_shadow_mode_rule_counts_and_allows_all() {
    let f = fixture();
    let mut session = f.service.session();
    let b = bucket(&[("shadow", "x")]);
    let actions = session
        .report(report("weather", &[(&b, 5, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::AllowAll]);
    // Counted: a per-request call sees the limit (1) exceeded, and lets it
    // through by the shadow mode.
    let request = Request {
        domain: "weather",
        descriptors: vec![Descriptor::new([("shadow", "x")], None, None)],
        hits: 1,
    };
    let verdict = f.limiter.should_rate_limit(&request).await.unwrap();
    assert_eq!(verdict.overall, Code::Ok);
    assert_eq!(verdict.statuses[0].remaining, 0);
}

#[tokio::test]
async fn idle_buckets_are_abandoned() {
    let f = fixture_with(None, FailureMode::Allow, Duration::from_secs(30));
    let mut session = f.service.session();
    let alice = bucket(&[("client_id", "alice")]);
    let bob = bucket(&[("client_id", "bob")]);
    session
        .report(report("weather", &[(&alice, 1, 0), (&bob, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(session.buckets(), 2);
    // Envoy reports idle buckets too, with no requests; bob stays busy.
    for _ in 0..5 {
        f.clock.advance(5 * SECOND);
        let actions = session
            .report(report("", &[(&alice, 0, 0), (&bob, 1, 0)]))
            .await
            .unwrap();
        assert!(actions.iter().all(|a| matches!(a, Action::Assign { .. })));
    }
    f.clock.advance(5 * SECOND);
    let actions = session
        .report(report("", &[(&alice, 0, 0), (&bob, 1, 0)]))
        .await
        .unwrap();
    assert!(actions.contains(&Action::Abandon {
        bucket: alice.clone()
    }));
    assert_eq!(session.buckets(), 1);
    // A bucket no longer reported at all goes the same way, at its time.
    let wake = session.next_wake_us().unwrap();
    assert!(wake <= f.clock.now_us() + 30 * SECOND);
    f.clock.set(T0 + 40 * SECOND + 30 * SECOND);
    let actions = session.wake().await;
    assert!(actions.contains(&Action::Abandon { bucket: bob }));
    assert_eq!(session.buckets(), 0);
}

#[tokio::test]
async fn a_stream_keeps_its_first_domain() {
    let f = fixture();
    let mut session = f.service.session();
    let b = bucket(&[("client_id", "alice")]);
    assert_eq!(
        session.report(report("", &[(&b, 1, 0)])).await,
        Err(ReportError::NoDomain)
    );
    session
        .report(report("weather", &[(&b, 1, 0)]))
        .await
        .unwrap();
    session.report(report("", &[(&b, 0, 0)])).await.unwrap();
    session
        .report(report("weather", &[(&b, 0, 0)]))
        .await
        .unwrap();
    assert_eq!(
        session.report(report("other", &[(&b, 0, 0)])).await,
        Err(ReportError::DomainChanged)
    );
}

/// A store that is down.
struct DownStore;

#[async_trait]
impl CounterStore for DownStore {
    async fn apply(&self, _: &[CounterOp]) -> Result<Vec<Outcome>, StoreError> {
        Err(StoreError::Connection("down".into()))
    }

    fn kind(&self) -> &'static str {
        "down"
    }
}

#[tokio::test]
async fn a_store_failure_is_answered_by_the_failure_mode() {
    let b = bucket(&[("client_id", "alice")]);
    let f = fixture_with(Some(Arc::new(DownStore)), FailureMode::Allow, IDLE);
    let mut session = f.service.session();
    let actions = session
        .report(report("weather", &[(&b, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(assigned(&actions), [Assignment::AllowAll]);

    // Under `deny`, nothing: the Envoy's expired_assignment_behavior
    // decides once its share expires.
    let f = fixture_with(Some(Arc::new(DownStore)), FailureMode::Deny, IDLE);
    let mut session = f.service.session();
    let actions = session
        .report(report("weather", &[(&b, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(actions, vec![]);
}
