//! The one-shot subcommands: `check`, `explain` and `rules validate`; those
//! that work on PostgreSQL are in [`postgres`].

pub mod admin;
pub mod postgres;

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::config::{CheckArgs, ConsumeCommand, ExplainArgs};
use crate::events::amqp::AmqpSink;
use crate::events::consume::{self, ConsumeSettings};
use crate::events::{alerts, billing, outbox, Group};
use crate::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
use crate::proto::rls::{
    rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient, RateLimitRequest,
};
use crate::proto::sluice::v1::{
    candidate::Kind, sluice_client::SluiceClient, Candidate, ExplainResponse,
};
use crate::rules::yaml;
use crate::telemetry::{self, LogFormat};

/// `sluice check`: one call to a running sluice, printed for a human.
pub async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut client = RateLimitServiceClient::new(connect(&args).await?);
    let response = client.should_rate_limit(request(&args)).await?.into_inner();
    let overall = response.overall_code();
    println!("overall: {}", overall.as_str_name());
    for (i, s) in response.statuses.iter().enumerate() {
        let mut line = format!("descriptor[{i}]: {}", s.code().as_str_name());
        if let Some(limit) = &s.current_limit {
            line += &format!(
                " limit={}/{}",
                limit.requests_per_unit,
                limit.unit().as_str_name().to_ascii_lowercase()
            );
            if !limit.name.is_empty() {
                line += &format!(" name={}", limit.name);
            }
            line += &format!(" remaining={}", s.limit_remaining);
        }
        if let Some(d) = &s.duration_until_reset {
            line += &format!(" reset={}.{:03}s", d.seconds, d.nanos / 1_000_000);
        }
        println!("{line}");
    }
    for h in &response.response_headers_to_add {
        println!("header: {}: {}", h.key, h.value);
    }
    Ok(if overall == Code::OverLimit {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `sluice explain`: why a running sluice would answer what it would,
/// printed for a human, or as JSON. Counts nothing; exits 0 whatever the
/// answer would be.
pub async fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let mut client = SluiceClient::new(connect(&args.call).await?);
    let response = client.explain(request(&args.call)).await?.into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else {
        print!("{}", render(&response));
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(args: &CheckArgs) -> anyhow::Result<tonic::transport::Channel> {
    let addr = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    tonic::transport::Endpoint::from_shared(addr.clone())?
        .connect_timeout(args.timeout)
        .timeout(args.timeout)
        .connect()
        .await
        // tonic's error chain repeats itself ("transport error: tcp connect
        // error: tcp connect error: ..."); its root cause says it all.
        .map_err(|e| anyhow::anyhow!("cannot reach {addr}: {}", root_cause(&e)))
}

/// The request `check` and `explain` send: one descriptor.
fn request(args: &CheckArgs) -> RateLimitRequest {
    RateLimitRequest {
        domain: args.domain.clone(),
        descriptors: vec![RateLimitDescriptor {
            entries: args
                .entries
                .iter()
                .map(|(key, value)| Entry {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            limit: None,
            hits_addend: args.hits.map(pbjson_types::UInt64Value::from),
        }],
        hits_addend: 0,
    }
}

/// An explanation as lines for a human.
fn render(response: &ExplainResponse) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_explanation(&mut out, response);
    out
}

fn write_explanation(out: &mut String, response: &ExplainResponse) -> std::fmt::Result {
    let shadow = if response.global_shadow_mode {
        ", let through by the global shadow mode"
    } else {
        ""
    };
    writeln!(
        out,
        "overall: {} (would be; nothing was counted{shadow})",
        response.overall_code().as_str_name()
    )?;
    for (i, d) in response.descriptors.iter().enumerate() {
        let code = d
            .status
            .as_ref()
            .map_or("UNKNOWN", |s| s.code().as_str_name());
        writeln!(out, "descriptor[{i}]: {code}: {}", d.summary)?;
        if d.shadowed {
            writeln!(
                out,
                "  over the limit, let through by the rule's shadow mode"
            )?;
        }
        if !d.rules.is_empty() {
            writeln!(out, "  rules: {}", d.rules)?;
        }
        let last = d.steps.len().saturating_sub(1);
        for (depth, step) in d.steps.iter().enumerate() {
            let matched = match &step.matched {
                Some(c) => describe(c, depth != last),
                None => "nothing matches".to_owned(),
            };
            writeln!(out, "  {}={}: {matched}", step.key, step.value)?;
            for c in &step.passed_over {
                writeln!(out, "    passed over: {}", describe(c, depth != last))?;
            }
        }
        for c in &d.counters {
            let name = if c.name.is_empty() {
                "(own limit)"
            } else {
                &c.name
            };
            let room = if c.admits { "room for" } else { "no room for" };
            let burst = if c.burst > 0 {
                format!(" (burst {})", c.burst)
            } else {
                String::new()
            };
            writeln!(
                out,
                "  counter {name}: {} {} per {}{burst}: used {}, remaining {}, reset in {}; {room} {} hit{}",
                c.algorithm,
                c.limit,
                seconds(c.window.as_ref()),
                c.used,
                c.remaining,
                seconds(c.reset.as_ref()),
                d.hits,
                if d.hits == 1 { "" } else { "s" },
            )?;
        }
    }
    Ok(())
}

/// An entry of the rules: `exact value`, `wildcard ab*`, `key only`, with
/// its rule. `before_end`: the descriptor goes on past it, so its rule
/// does not apply.
fn describe(c: &Candidate, before_end: bool) -> String {
    let mut s = match c.kind() {
        Kind::Exact => format!("exact value {}", c.pattern),
        Kind::Wildcard => format!("wildcard {}", c.pattern),
        Kind::KeyOnly | Kind::Unspecified => "key only".to_owned(),
    };
    if !c.rule.is_empty() {
        s += &format!(" (rule {}", c.rule);
        if before_end {
            s += ", for descriptors that end here";
        }
        s += ")";
    }
    s
}

/// `40s`, `1.5s`.
fn seconds(d: Option<&pbjson_types::Duration>) -> String {
    let Some(d) = d else {
        return "-".to_owned();
    };
    let millis = d.nanos / 1_000_000;
    if millis == 0 {
        format!("{}s", d.seconds)
    } else {
        let fraction = format!("{millis:03}");
        format!("{}.{}s", d.seconds, fraction.trim_end_matches('0'))
    }
}

/// `sluice consume ...`: a consumer of the event stream, until `shutdown`.
/// The alerts consumer also delivers webhooks and the billing consumer
/// closes cycles; both publish the events they make from the outbox.
pub async fn consume(
    command: ConsumeCommand,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    use futures::FutureExt as _;
    let args = command.common();
    telemetry::init_tracing(LogFormat::Text, &args.log_level, None)?;
    let database = &args.database;
    let options = crate::database::options(
        &database.database_url.0,
        database.database_password.as_ref(),
    )
    .map_err(anyhow::Error::msg)?;
    let pool = crate::database::lazy_pool(options, 4, std::time::Duration::from_secs(5));
    let settings = ConsumeSettings {
        url: args.events_url.0.clone(),
        prefix: args.events_prefix.clone(),
        prefetch: args.prefetch.get(),
        batch_wait: args.batch_wait,
        webhook_retry_for: match &command {
            ConsumeCommand::Alerts(a) => Some(a.webhook_retry_for),
            _ => None,
        },
        instance: args.instance.clone(),
    };
    let shutdown = shutdown.shared();
    let outbox = || {
        // The outbox's events (quota-alerts, billing) feed no group of ours.
        let sink = AmqpSink::new(
            &settings.url,
            &settings.prefix,
            std::time::Duration::from_secs(5),
            &[],
        );
        outbox::publish(
            pool.clone(),
            sink,
            std::time::Duration::from_millis(500),
            shutdown.clone(),
        )
    };
    match &command {
        ConsumeCommand::Usage(_) => {
            consume::run(
                Group::Usage,
                settings.clone(),
                pool.clone(),
                shutdown.clone(),
            )
            .await;
        }
        ConsumeCommand::Alerts(a) => {
            let delivery = alerts::DeliverySettings {
                backoff: a.webhook_backoff,
                max_backoff: a.webhook_max_backoff,
                timeout: a.webhook_timeout,
                poll: std::time::Duration::from_millis(500),
            };
            tokio::join!(
                consume::run(
                    Group::Alerts,
                    settings.clone(),
                    pool.clone(),
                    shutdown.clone()
                ),
                alerts::deliver(pool.clone(), delivery, shutdown.clone()),
                outbox(),
            );
        }
        ConsumeCommand::Billing(b) => {
            tokio::join!(
                consume::run(
                    Group::Billing,
                    settings.clone(),
                    pool.clone(),
                    shutdown.clone()
                ),
                billing::close_cycles(
                    pool.clone(),
                    b.grace,
                    b.close_every,
                    settings.instance.clone(),
                    shutdown.clone()
                ),
                outbox(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The innermost error of a chain, e.g. "Connection refused (os error 111)".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// `sluice rules validate`: every error, one per line; non-zero on any.
pub fn validate(path: &Path) -> ExitCode {
    match yaml::load_path(path) {
        Ok(set) => {
            // Sorted: the set keeps its domains in a hash map.
            let mut domains: Vec<_> = set.domains().collect();
            domains.sort_unstable();
            let plural = |n: usize| if n == 1 { "" } else { "s" };
            let rules = set.rules().len();
            println!(
                "ok: {rules} rule{} in {} domain{} ({})",
                plural(rules),
                domains.len(),
                plural(domains.len()),
                domains.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::from(1)
        }
    }
}
