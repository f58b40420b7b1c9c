# The agentops image: the controller (`agentops`) and the command agent (`agentops-agent-run`)
# on a slim Debian with git and CA certificates, as a non-root user.
#
#   docker build -t agentops:0.1.0 .
#
# The builder and the runtime are the same Debian release, so the binaries find the shared
# libraries (glibc, OpenSSL 3 for git2's https) they were linked against.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin agentops --bin agentops-agent-run \
    && install -D -m 0755 -t /out target/release/agentops target/release/agentops-agent-run

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git libssl3 \
    && rm -rf /var/lib/apt/lists/*
# A numeric user, so that Kubernetes' runAsNonRoot can check it; the chart runs as the same.
RUN groupadd --system --gid 10001 agentops \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/agentops --create-home agentops
COPY --from=build /out/agentops /out/agentops-agent-run /usr/local/bin/
USER 10001:10001
ENV AGENTOPS_DATA_DIR=/var/lib/agentops \
    AGENTOPS_LISTEN=0.0.0.0:7700
WORKDIR /var/lib/agentops
EXPOSE 7700
ENTRYPOINT ["agentops"]
CMD ["up"]
