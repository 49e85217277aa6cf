//! Generated protobuf and gRPC code for Envoy's rate-limit APIs (the
//! per-request one and the Rate Limit Quota Service) and sluice's own (see
//! build.rs), and the codec the generated services use.

#![allow(clippy::all, missing_docs)]

mod codec;

pub use codec::{does_not_decode, Codec};

/// A package's prost messages (and tonic service), and their proto3 JSON
/// mapping: pbjson's serde impls.
macro_rules! include_package {
    ($package:literal) => {
        tonic::include_proto!($package);
        include!(concat!(env!("OUT_DIR"), "/", $package, ".serde.rs"));
    };
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                include_package!("envoy.config.core.v3");
            }
        }
    }
    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    include_package!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                include_package!("envoy.service.ratelimit.v3");
            }
        }
        pub mod rate_limit_quota {
            pub mod v3 {
                include_package!("envoy.service.rate_limit_quota.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            include_package!("envoy.r#type.v3");
        }
    }
}

/// sluice's own API: `Explain`.
pub mod sluice {
    pub mod v1 {
        include_package!("sluice.v1");
    }
}

/// The encoded descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));

pub use envoy::extensions::common::ratelimit::v3 as common;
pub use envoy::service::rate_limit_quota::v3 as rlqs;
pub use envoy::service::ratelimit::v3 as rls;
