//! The event stream: what the decision process tells the rest of the
//! system, through a message broker, instead of writing to PostgreSQL itself.
//!
//! Decisions go, as today, to the usage recorder's bounded queue (a full
//! queue drops and counts; a decision never waits). With `--events-url`
//! the recorder's reader is [`pipeline`]: it folds decisions into usage per
//! tenant, domain and minute and violations per tenant, rule, client hash
//! and minute, and every `--events-flush` appends the sums as events to an
//! on-disk [`spool`]. A publisher sends the spool, in order, through an
//! [`EventSink`] (RabbitMQ today: [`amqp`]) and forgets events only when the
//! broker confirms them. [`consume`] holds the consumers that turn events
//! into PostgreSQL rows, each event applied once by its id: usage, and the
//! tenants' billing [`cycles`] behind [`alerts`] (quota thresholds, signed
//! webhooks) and [`billing`] (invoices); the events those make go out
//! through the [`outbox`].
//!
//! docs/events.md describes the events; docs/events/*.schema.json are their
//! JSON Schemas.

pub mod alerts;
pub mod amqp;
pub mod billing;
pub mod consume;
pub mod cycles;
pub mod outbox;
pub mod pipeline;
pub mod spool;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of every event's layout; consumers refuse others.
pub const SCHEMA_VERSION: u32 = 1;

/// What an event carries; its topic (an exchange in RabbitMQ, a topic in
/// Kafka) is named after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topic {
    RateLimitViolations,
    Usage,
    QuotaAlerts,
    Billing,
    RequestLogs,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::RateLimitViolations,
        Topic::Usage,
        Topic::QuotaAlerts,
        Topic::Billing,
        Topic::RequestLogs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Topic::RateLimitViolations => "rate-limit-violations",
            Topic::Usage => "usage",
            Topic::QuotaAlerts => "quota-alerts",
            Topic::Billing => "billing",
            Topic::RequestLogs => "request-logs",
        }
    }

    pub fn from_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A consumer group: each has its own durable queue per topic it reads,
/// its own ids in `applied_events`, and its own tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    /// `usage` events into `usage_hourly` and `usage_monthly`,
    /// `rate-limit-violations` into `violations`.
    Usage,
    /// `usage` events into each tenant's cycle total; quota thresholds
    /// crossed become `quota-alerts` events and webhook deliveries.
    Alerts,
    /// `usage` events into each tenant's cycle total; closed cycles become
    /// invoices and `billing` events.
    Billing,
}

impl Group {
    pub const ALL: [Group; 3] = [Group::Usage, Group::Alerts, Group::Billing];

    pub fn name(self) -> &'static str {
        match self {
            Group::Usage => "usage",
            Group::Alerts => "alerts",
            Group::Billing => "billing",
        }
    }

    pub fn from_name(name: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == name)
    }

    /// The topics the group reads.
    pub fn topics(self) -> &'static [Topic] {
        match self {
            Group::Usage => &[Topic::Usage, Topic::RateLimitViolations],
            Group::Alerts | Group::Billing => &[Topic::Usage],
        }
    }
}

/// Every event: the envelope, with the topic's own fields in `data`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event<T> {
    /// Unique per event: consumers apply an id once.
    pub id: Uuid,
    #[serde(rename = "type")]
    pub topic: Topic,
    pub schema_version: u32,
    /// When the event was made (for usage: when its sums were flushed).
    pub time: DateTime<Utc>,
    /// The sluice instance that made it (`--instance`).
    pub instance: String,
    pub data: T,
}

impl<T> Event<T> {
    pub fn new(topic: Topic, instance: &str, time: DateTime<Utc>, data: T) -> Event<T> {
        Event {
            id: Uuid::new_v4(),
            topic,
            schema_version: SCHEMA_VERSION,
            time,
            instance: instance.to_owned(),
            data,
        }
    }
}

/// `usage`: requests of one tenant in one domain, in one minute, counted
/// since the previous event for that minute (sums add up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageData {
    pub tenant_id: String,
    pub domain: String,
    pub minute: DateTime<Utc>,
    pub allowed: u64,
    pub denied: u64,
}

/// `rate-limit-violations`: denials of one client (a keyed hash) by one
/// rule in one minute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationData {
    pub tenant_id: Option<String>,
    pub domain: String,
    /// The rule's name, else its path; `monthly_quota`; `unknown_api_key`;
    /// `limit_override`.
    pub rule: String,
    /// Keyed hash of the descriptor's entries, never the raw values.
    pub client_id: String,
    pub minute: DateTime<Utc>,
    pub first_at: DateTime<Utc>,
    pub hits: u64,
}

/// `quota-alerts`: a tenant reached a share of its monthly quota in a
/// billing cycle; one per tenant, cycle and threshold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaAlertData {
    pub tenant_id: String,
    /// `YYYY-MM`, the calendar month in the tenant's time zone.
    pub cycle: String,
    /// 80, 90 or 100 (percent of the quota).
    pub threshold: u8,
    /// Requests counted in the cycle when the threshold was crossed.
    pub used: u64,
    pub quota: u64,
}

/// `billing`: a closed cycle's invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingData {
    pub tenant_id: String,
    pub cycle: String,
    pub plan: String,
    pub requests: u64,
    pub total_cents: i64,
    pub lines: Vec<BillingLine>,
}

/// One invoice line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingLine {
    /// `subscription`, `included` or `overage`.
    pub kind: String,
    pub description: String,
    pub quantity: i64,
    /// Per unit (subscription) or per 1 000 requests (overage).
    pub unit_price_cents: i64,
    pub amount_cents: i64,
}

/// `request-logs` (sampled, off by default): one metered decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLogData {
    pub at: DateTime<Utc>,
    pub tenant_id: Option<String>,
    pub domain: String,
    pub allowed: bool,
    pub violations: Vec<RequestLogViolation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLogViolation {
    pub rule: String,
    pub client_id: String,
}

/// One event ready to send: its topic, id, routing key and JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub topic: Topic,
    pub id: Uuid,
    /// The tenant id, or `-`: the partition key a Kafka sink would use.
    pub key: String,
    pub body: Vec<u8>,
}

impl Record {
    pub fn of<T: Serialize>(event: &Event<T>, key: Option<&str>) -> Record {
        Record {
            topic: event.topic,
            id: event.id,
            key: key.unwrap_or("-").to_owned(),
            // Serializing plain structs of strings and numbers cannot fail.
            body: serde_json::to_vec(event).unwrap_or_default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("broker unreachable: {0}")]
    Connect(String),
    #[error("broker refused event {0}")]
    Nacked(Uuid),
    #[error("no confirmation within {0:?}")]
    Timeout(std::time::Duration),
    #[error("broker error: {0}")]
    Broker(String),
}

/// Where events go. `publish` returns only when the broker has taken
/// responsibility for every record (publisher confirms), in order; on an
/// error the caller sends them all again, so a record may arrive twice and
/// consumers dedupe by id. A Kafka sink would implement this with an
/// idempotent producer and `acks=all`.
#[async_trait]
pub trait EventSink: Send {
    async fn publish(&mut self, records: &[Record]) -> Result<(), SinkError>;

    /// For logs: where the events go, without credentials.
    fn describe(&self) -> String;
}
