//! Envoy's Rate Limit Quota Service.

pub mod share;
