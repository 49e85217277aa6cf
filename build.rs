//! Compiles `proto/` with protox (a protobuf compiler written in Rust), so a
//! build needs no `protoc` on the machine. The descriptor set is also written
//! to OUT_DIR for gRPC server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(["envoy/service/ratelimit/v3/rls.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("sluice_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
