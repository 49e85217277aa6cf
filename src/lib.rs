//! sluice: a rate-limit decision service for Envoy and Kong.
//!
//! A request flows `grpc`/`http` -> `convert` -> [`service::RateLimiter`] ->
//! `limiter::plan` -> one `CounterStore::apply` -> `limiter::decide`:
//! a pure core in an imperative shell.
//!
//! | module      | job |
//! |-------------|-----|
//! | `app`       | composition root: build store, rules, servers; run until shutdown |
//! | `commands`  | subcommands (`check`, `explain`, `rules`, the PostgreSQL admin ones, `admin`, `admin-tokens`) |
//! | `config`    | the command line (every flag also a `SLUICE_*` env var), mapped to domain types |
//! | `grpc`      | sluice's gRPC server on `h2` (`ShouldRateLimit` answered in each connection's task, the rest through tonic's router): Envoy's `RateLimitService`, `sluice.v1.Sluice` (`Explain`), health, reflection |
//! | `http`      | `/json`, `/explain`, `/metrics`, `/healthz`, `/readyz` |
//! | `tls`       | TLS and mutual TLS for gRPC and the admin API, with certificate reloads |
//! | `listen`    | accepting connections within bounds: a cap, handshake deadlines, idle timeouts |
//! | `admin_api` | the admin API and console (`sluice admin`): REST under `/admin/v1`, OpenAPI, tokens and roles, audit |
//! | `convert`   | proto <-> domain, for gRPC and `/json` alike |
//! | `rlqs`      | Envoy's Rate Limit Quota Service: buckets on rules, shares of the budget, streams |
//! | `service`   | the shell: rules snapshot, store call with timeout, failure mode, metrics |
//! | `admin`     | the catalog's administration in PostgreSQL: rules, plans, tenants, API keys, usage, admin tokens, audit log |
//! | `storage`   | the `CounterStore` trait and its backends |
//! | `rules`     | rule sources: envoyproxy/ratelimit YAML, file reloads, PostgreSQL rules and API keys |
//! | `usage`     | usage and violation metering: bounded queue, batched writes |
//! | `events`    | the event stream: aggregation, on-disk spool, broker publisher, consumers |
//! | `limiter`   | pure core: request types, the rule model, window math, counter keys, plan/decide, explain |
//! | `database`  | PostgreSQL connections and the schema migrations, embedded by `sqlx::migrate!` |
//! | `health`    | readiness shared by `/readyz` and gRPC health, and the stores' health vocabulary |
//! | `telemetry` | tracing, OpenTelemetry, Prometheus; metric names |
//! | `clock`     | injected time |
//! | `task`      | background tasks, each owned and ended with its owner |
//! | `reload`    | file reloads: poll a fingerprint of the files, act on a change |
//! | `secret`    | secrets and URL redaction, for every layer |
//! | `proto`     | generated code: messages, services, their proto3 JSON mapping, and the codec |
//! | `allocator` | the global allocator (a cargo feature) |
//!
//! ## Layers
//!
//! A module imports only from modules in lower layers, never from its own
//! layer or a higher one, so the module graph has no cycle and the core
//! compiles without the shell. Tests inside a module may reach up (a core
//! test may build its rules from YAML). `tests/it/layers.rs` reads every
//! `crate::` path in `src/` and fails on an import this table forbids.
//!
//! | layer | modules |
//! |-------|---------|
//! | 7 | `app`, `commands` |
//! | 6 | `config`, `admin_api` |
//! | 5 | `grpc`, `http`, `tls` |
//! | 4 | `convert`, `rlqs` |
//! | 3 | `service`, `admin`, `events` |
//! | 2 | `storage`, `rules`, `usage` |
//! | 1 | `limiter`, `database`, `listen` |
//! | 0 | `proto`, `clock`, `task`, `reload`, `secret`, `telemetry`, `health`, `allocator` |

pub mod admin;
pub mod admin_api;
mod allocator;
pub mod app;
pub mod clock;
pub mod commands;
pub mod config;
pub mod convert;
pub mod database;
pub mod events;
pub mod grpc;
pub mod health;
pub mod http;
pub mod limiter;
pub mod listen;
pub mod proto;
pub mod reload;
pub mod rlqs;
pub mod rules;
pub mod secret;
pub mod service;
pub mod storage;
pub mod task;
pub mod telemetry;
pub mod tls;
pub mod usage;
