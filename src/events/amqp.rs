//! RabbitMQ through lapin: the [`EventSink`] that publishes with publisher
//! confirms, and the topology both publisher and consumers declare.
//!
//! Topology: one durable topic exchange per [`Topic`], named
//! `PREFIX + topic`; messages are persistent, routed by the tenant id (`-`
//! when none). Each consumer group sluice ships has one durable queue per
//! topic it reads, `PREFIX + topic + "." + group`, bound with `#`; replicas
//! of a group share the queues (competing consumers). The publisher declares
//! these queues too, so events published before a consumer's first start
//! wait in its queue instead of being dropped by an exchange with no queue.

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use super::{EventSink, Group, Record, SinkError, Topic};
use crate::secret::redact_url;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn exchange_name(prefix: &str, topic: Topic) -> String {
    format!("{prefix}{topic}")
}

pub fn queue_name(prefix: &str, topic: Topic, group: &str) -> String {
    format!("{prefix}{topic}.{group}")
}

/// Connects on tokio's executor and reactor.
pub async fn connect(url: &str) -> Result<Connection, SinkError> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(SinkError::Connect(e.to_string())),
        Err(_) => Err(SinkError::Connect(format!(
            "no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Declares every exchange and the queues of `groups` (idempotent). The
/// publisher declares the groups it is told will consume (`--events-groups`),
/// so their events wait in the broker from the first one, even before the
/// consumer's first start; a consumer declares its own group's too. A group
/// nobody runs is never declared, so it cannot fill the broker.
pub async fn declare(
    channel: &Channel,
    prefix: &str,
    groups: &[Group],
) -> Result<(), lapin::Error> {
    for topic in Topic::ALL {
        channel
            .exchange_declare(
                &exchange_name(prefix, topic),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    for &group in groups {
        declare_group(channel, prefix, group).await?;
    }
    Ok(())
}

/// A consumer group's durable queues, one per topic it reads, bound to the
/// topics' exchanges.
pub async fn declare_group(
    channel: &Channel,
    prefix: &str,
    group: Group,
) -> Result<(), lapin::Error> {
    for &topic in group.topics() {
        let queue = queue_name(prefix, topic, group.name());
        channel
            .queue_declare(
                &queue,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                &queue,
                &exchange_name(prefix, topic),
                "#",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Publishes to RabbitMQ, one connection and one confirming channel,
/// opened on first use and again after any failure.
pub struct AmqpSink {
    url: String,
    prefix: String,
    confirm_timeout: Duration,
    /// The consumer groups whose queues it declares.
    groups: Vec<Group>,
    open: Option<(Connection, Channel)>,
}

impl AmqpSink {
    pub fn new(url: &str, prefix: &str, confirm_timeout: Duration, groups: &[Group]) -> AmqpSink {
        AmqpSink {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            confirm_timeout,
            groups: groups.to_vec(),
            open: None,
        }
    }

    async fn channel(&mut self) -> Result<Channel, SinkError> {
        if let Some((connection, channel)) = &self.open {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        self.close().await;
        let connection = connect(&self.url).await?;
        let broker = |e: lapin::Error| SinkError::Broker(e.to_string());
        let channel = connection.create_channel().await.map_err(broker)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker)?;
        declare(&channel, &self.prefix, &self.groups)
            .await
            .map_err(broker)?;
        self.open = Some((connection, channel.clone()));
        Ok(channel)
    }

    async fn close(&mut self) {
        if let Some((connection, _)) = self.open.take() {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), connection.close(200, "bye")).await;
        }
    }

    async fn send(&mut self, records: &[Record]) -> Result<(), SinkError> {
        let channel = self.channel().await?;
        let broker = |e: lapin::Error| SinkError::Broker(e.to_string());
        let mut confirms = Vec::with_capacity(records.len());
        for record in records {
            let properties = BasicProperties::default()
                .with_message_id(record.id.to_string().into())
                .with_type(record.topic.name().into())
                .with_content_type("application/json".into())
                // Persistent: the broker writes it to disk before it
                // confirms.
                .with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    &exchange_name(&self.prefix, record.topic),
                    &record.key,
                    BasicPublishOptions::default(),
                    &record.body,
                    properties,
                )
                .await
                .map_err(broker)?;
            confirms.push((record.id, confirm));
        }
        let all = async {
            for (id, confirm) in confirms {
                let confirmation = confirm.await.map_err(broker)?;
                if confirmation.is_nack() {
                    return Err(SinkError::Nacked(id));
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.confirm_timeout, all).await {
            Ok(result) => result,
            Err(_) => Err(SinkError::Timeout(self.confirm_timeout)),
        }
    }
}

#[async_trait]
impl EventSink for AmqpSink {
    async fn publish(&mut self, records: &[Record]) -> Result<(), SinkError> {
        let result = self.send(records).await;
        if result.is_err() {
            // A channel with unconfirmed messages is not reused: the next
            // attempt starts on a fresh one.
            self.close().await;
        }
        result
    }

    fn describe(&self) -> String {
        redact_url(&self.url)
    }
}
