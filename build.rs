//! Compiles `proto/` (Envoy's rate-limit API and sluice's own) with protox
//! (a protobuf compiler written in Rust), so a build needs no `protoc` on the
//! machine. From the one descriptor set come the prost messages and tonic
//! services, the proto3 JSON mapping of the same messages (pbjson: serde
//! impls, for `/json` and `/explain`), and the bytes that gRPC server
//! reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds these; a new file must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(
        [
            "envoy/service/ratelimit/v3/rls.proto",
            "sluice/v1/sluice.proto",
            "envoy/service/rate_limit_quota/v3/rlqs.proto",
        ],
        ["proto"],
    )?;
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out_dir.join("sluice_descriptor.bin"), &encoded)?;

    // The well-known types (Duration, Timestamp, Struct, UInt64Value) come
    // from pbjson-types: the same messages as prost-types, with their proto3
    // JSON forms ("42s", RFC 3339, 64-bit numbers as strings).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_well_known_types(true)
        // tonic-prost's codec, but a request that does not decode is the
        // caller's error (INVALID_ARGUMENT), not the server's (INTERNAL).
        .codec_path("crate::proto::Codec")
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .extern_path(".google.protobuf", "::pbjson_types")
        // Zero values are written too (`"limitRemaining": 0`), as proto3 JSON
        // allows: a client reads every field of an answer without defaulting.
        // Unknown fields in a request stay errors, naming the field.
        .emit_fields()
        .build(&[".envoy", ".sluice"])?;
    Ok(())
}
