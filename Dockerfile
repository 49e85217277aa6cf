# syntax=docker/dockerfile:1
#
# sluice container image.
#
#   docker build -t sluice:dev .
#   docker run --rm -p 8081:8081 -p 8080:8080 sluice:dev
#
# It starts with the example rules (examples/rules, in /etc/sluice/rules);
# mount a directory of your own there, or set SLUICE_RULES.
#
# The build needs no protoc: build.rs compiles the .proto files with a
# pure-Rust compiler. BuildKit cache mounts keep the crate registry and the
# target directory between builds.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin sluice \
 && install -D -m 0755 target/release/sluice /out/sluice

# glibc, libgcc and CA certificates, no shell, user "nonroot" (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/sluice /usr/local/bin/sluice
COPY examples/rules /etc/sluice/rules
ENV SLUICE_RULES=/etc/sluice/rules
USER 65532:65532
# 8081: gRPC (rate-limit service, health, reflection)
# 8080: HTTP (/json, /metrics, /healthz, /readyz)
EXPOSE 8081 8080
ENTRYPOINT ["sluice", "serve"]
