# syntax=docker/dockerfile:1
# Build stage: compiles the release binary (cargo caches survive between builds).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin message-queue-service \
    && cp target/release/message-queue-service /usr/local/bin/message-queue-service

# Runtime stage: just the binary, run as an unprivileged user.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home mq
COPY --from=build /usr/local/bin/message-queue-service /usr/local/bin/message-queue-service
USER 10001
ENV PORT=3010
EXPOSE 3010
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["message-queue-service", "healthcheck"]
ENTRYPOINT ["message-queue-service"]
