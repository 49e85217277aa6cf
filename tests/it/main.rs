//! sluice's integration tests, as one test binary: each module starts the
//! real server (through the same `serve` function `main` uses, or the
//! `sluice` binary itself) and the real components around it: Redis, a Redis
//! Cluster, PostgreSQL and a replica, Envoy, grpcurl, an OTLP receiver,
//! RabbitMQ.
//!
//! One binary rather than one per file, so that tonic, sqlx and the rest
//! link once: on a 2-core CI machine linking dominated the build. Tests in
//! different modules share one process, so they share its global Prometheus
//! recorder: a test reads only the series its own requests make (its own
//! domain or rule), never a whole-process total.

mod support;

mod admin;
mod alerts;
mod bounds;
mod cli;
mod compat;
mod edges;
mod envoy_e2e;
mod envoy_tls;
mod events;
mod explain;
mod fuzz_corpus;
mod grpc_api;
mod grpcurl;
mod json_api;
mod layers;
mod observability;
mod otlp;
mod parity;
mod postgres;
mod redis_cluster;
mod redis_sentinel;
mod redis_store;
mod reload;
mod rlqs;
mod soak;
mod storage_contract;
mod tls;
mod wire_fuzz;
