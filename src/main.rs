use std::process::ExitCode;

use clap::Parser;
use sluice::config::{Cli, Command, RulesCommand};
use sluice::{app, commands, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            if let Err(message) = args.validate() {
                eprintln!("sluice: {message}");
                return ExitCode::from(2);
            }
            let tracer = match telemetry::init_tracing(
                args.log_format,
                &args.log_level,
                args.otlp_endpoint.as_deref(),
            ) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("sluice: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let result = app::run(*args).await.map(|()| ExitCode::SUCCESS);
            if let Some(provider) = tracer {
                let _ = provider.shutdown();
            }
            result
        }
        Command::Check(args) => commands::check(args).await,
        Command::Explain(args) => commands::explain(args).await,
        Command::Rules(RulesCommand::Validate { path }) => Ok(commands::validate(&path)),
        Command::Rules(command) => commands::postgres::rules(command).await,
        Command::Migrate(database) => commands::postgres::migrate(&database).await,
        Command::Plans(command) => commands::postgres::plans(command).await,
        Command::Tenants(command) => commands::postgres::tenants(command).await,
        Command::Keys(command) => commands::postgres::keys(command).await,
        Command::Usage(args) => {
            commands::postgres::usage(&args.tenant, args.month, &args.database).await
        }
        Command::Consume(command) => commands::consume(command, app::shutdown_signal()).await,
        Command::Admin(args) => {
            if let Err(e) = telemetry::init_tracing(args.log_format, &args.log_level, None) {
                eprintln!("sluice: {e:#}");
                return ExitCode::from(2);
            }
            commands::admin::serve(*args, app::shutdown_signal()).await
        }
        Command::AdminTokens(command) => commands::admin::tokens(command).await,
        Command::Webhooks(command) => commands::postgres::webhooks(command).await,
        Command::Billing(args) => commands::postgres::billing(&args).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("sluice: {e:#}");
        ExitCode::FAILURE
    })
}
