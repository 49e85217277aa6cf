//! The events publisher's ceiling: events per second through the same
//! `EventSink` the decision path's publisher uses (RabbitMQ at
//! 127.0.0.1:5672, persistent messages, publisher confirms), in batches of
//! 500 as the publisher sends them, with a durable queue bound to the
//! exchange (as a consumer group's) so the broker stores every message.
//!
//! ```text
//! cargo bench --bench events_publish
//! EVENTS=200000 ROUNDS=3 cargo bench --bench events_publish
//! ```

use std::time::Instant;

use chrono::Utc;
use lapin::options::{QueueDeleteOptions, QueuePurgeOptions};
use sluice::events::amqp::{self, AmqpSink};
use sluice::events::{Event, EventSink as _, Group, Record, Topic, UsageData};

const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BATCH: usize = 500;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`: one
    // small round checks that publishing works, and measures nothing.
    let measuring = std::env::args().any(|a| a == "--bench");
    let (events, rounds) = if measuring {
        (env_or("EVENTS", 100_000), env_or("ROUNDS", 3))
    } else {
        (BATCH, 1)
    };
    let prefix = format!("bench-publish-{}.", std::process::id());
    let connection = amqp::connect(RABBIT)
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
    let channel = connection.create_channel().await.unwrap();
    amqp::declare(&channel, &prefix, &[Group::Usage])
        .await
        .unwrap();
    let queue = amqp::queue_name(&prefix, Topic::Usage, "usage");

    // Realistic bodies: one tenant's minute of usage each.
    let records: Vec<Record> = (0..events)
        .map(|i| {
            let event = Event::new(
                Topic::Usage,
                "bench",
                Utc::now(),
                UsageData {
                    tenant_id: format!("00000000-0000-4000-8000-{:012x}", i % 1_000),
                    domain: "bench".into(),
                    minute: Utc::now(),
                    allowed: 1_000,
                    denied: 10,
                },
            );
            Record::of(&event, Some(&event.data.tenant_id.clone()))
        })
        .collect();
    let bytes: usize = records.iter().map(|r| r.body.len()).sum();
    let mut sink = AmqpSink::new(RABBIT, &prefix, std::time::Duration::from_secs(30), &[]);
    for round in 1..=rounds {
        let started = Instant::now();
        for batch in records.chunks(BATCH) {
            sink.publish(batch).await.expect("publish");
        }
        let took = started.elapsed();
        if measuring {
            println!(
                "round {round}: {events} events ({} bytes each) confirmed in {:.2} s: {:.0} events/s",
                bytes / events,
                took.as_secs_f64(),
                events as f64 / took.as_secs_f64()
            );
        }
        channel
            .queue_purge(&queue, QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    for topic in [Topic::Usage, Topic::RateLimitViolations] {
        let _ = channel
            .queue_delete(
                &amqp::queue_name(&prefix, topic, "usage"),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    for topic in Topic::ALL {
        let _ = channel
            .exchange_delete(&amqp::exchange_name(&prefix, topic), Default::default())
            .await;
    }
}
