# syntax=docker/dockerfile:1
# chorus container image: build the binary (release profile with fat LTO, `dist`), ship
# it on a slim Debian.
#   docker build -t chorus:dev .
# (docker-compose.yml builds it for the `topics`, `chorus-1` and `chorus-2` services.)

FROM rust:1.95-bookworm AS builder
# cmake: librdkafka (rdkafka-sys); clang/libclang: bindgen for librocksdb-sys.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io registry and target/ between builds (BuildKit);
# the binary is copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p chorus \
 && install -D -m 0755 target/dist/chorus /out/chorus

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/chorus --shell /usr/sbin/nologin chorus \
 && mkdir -p /var/lib/chorus /etc/chorus \
 && chown chorus:chorus /var/lib/chorus
COPY --from=builder /out/chorus /usr/local/bin/chorus
COPY topology.yaml /etc/chorus/topology.yaml
USER chorus
WORKDIR /var/lib/chorus
VOLUME ["/var/lib/chorus"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/chorus"]
CMD ["--help"]
