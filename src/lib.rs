//! sluice: a rate-limit decision service for Envoy and Kong.
//!
//! A request flows `grpc`/`http` -> [`service::RateLimiter`] ->
//! `limiter::plan` -> one `CounterStore::apply` -> `limiter::decide`:
//! a pure core in an imperative shell.
//!
//! | module      | job |
//! |-------------|-----|
//! | `app`       | composition root: build store, rules, servers; run until shutdown |
//! | `config`    | the command line (every flag also a `SLUICE_*` env var) |
//! | `grpc`      | Envoy's `RateLimitService`, health, reflection; proto <-> domain |
//! | `http`      | `/json`, `/metrics`, `/healthz`, `/readyz` |
//! | `service`   | the shell: rules snapshot, store call with timeout, failure mode, metrics |
//! | `limiter`   | pure core: request types, window math, counter keys, plan/decide |
//! | `rules`     | the rule model, envoyproxy/ratelimit YAML, file reloads, PostgreSQL rules and API keys |
//! | `database`  | PostgreSQL connections and the embedded schema migrations |
//! | `usage`     | usage and violation metering: bounded queue, batched writes |
//! | `storage`   | the `CounterStore` trait and its backends |
//! | `health`    | readiness shared by `/readyz` and gRPC health |
//! | `telemetry` | tracing, OpenTelemetry, Prometheus; metric names |
//! | `tls`       | TLS and mutual TLS for gRPC, with certificate reloads |
//! | `clock`     | injected time |
//! | `secret`    | secrets and URL redaction, for every layer |
//! | `commands`  | one-shot subcommands (`check`, `rules`, and the PostgreSQL admin ones) |
//! | `proto`     | generated code |
//! | `allocator` | the global allocator (a cargo feature) |

mod allocator;
pub mod app;
pub mod clock;
pub mod commands;
pub mod config;
pub mod database;
pub mod grpc;
pub mod health;
pub mod http;
pub mod limiter;
pub mod proto;
pub mod rules;
pub mod secret;
pub mod service;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod usage;
