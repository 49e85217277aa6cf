//! The one-shot subcommands: `check` and `rules validate`; those that work
//! on PostgreSQL are in [`postgres`].

pub mod postgres;

use std::path::Path;
use std::process::ExitCode;

use crate::config::{CheckArgs, ConsumeCommand};
use crate::events::consume::{self, ConsumeSettings};
use crate::proto::common::{rate_limit_descriptor::Entry, RateLimitDescriptor};
use crate::proto::rls::{
    rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient, RateLimitRequest,
};
use crate::rules::yaml;
use crate::telemetry::{self, LogFormat};

/// `sluice check`: one call to a running sluice, printed for a human.
pub async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let addr = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let channel = tonic::transport::Endpoint::from_shared(addr.clone())?
        .connect_timeout(args.timeout)
        .timeout(args.timeout)
        .connect()
        .await
        // tonic's error chain repeats itself ("transport error: tcp connect
        // error: tcp connect error: ..."); its root cause says it all.
        .map_err(|e| anyhow::anyhow!("cannot reach {addr}: {}", root_cause(&e)))?;
    let mut client = RateLimitServiceClient::new(channel);
    let request = RateLimitRequest {
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
    };
    let response = client.should_rate_limit(request).await?.into_inner();
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

/// `sluice consume ...`: a consumer of the event stream, until `shutdown`.
pub async fn consume(
    command: ConsumeCommand,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    let ConsumeCommand::Usage(args) = command;
    telemetry::init_tracing(LogFormat::Text, &args.log_level, None)?;
    let database = &args.database;
    let options = crate::database::options(
        &database.database_url.0,
        database.database_password.as_ref(),
    )
    .map_err(anyhow::Error::msg)?;
    let pool = crate::database::lazy_pool(options, 2, std::time::Duration::from_secs(5));
    let settings = ConsumeSettings {
        url: args.events_url.0.clone(),
        prefix: args.events_prefix.clone(),
        prefetch: args.prefetch.get(),
        batch_wait: args.batch_wait,
    };
    consume::usage(settings, pool, shutdown).await;
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
