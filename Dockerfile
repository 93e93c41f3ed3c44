# remora: build with cargo, run from a small base as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin remora

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home remora
COPY --from=build /src/target/release/remora /usr/local/bin/remora
COPY config/minimal.yaml /etc/remora/remora.yaml
USER 10001
# Admin: /metrics /ready /live /config /clusters. Bind it to 0.0.0.0 in the config for kubelet probes.
EXPOSE 9901
ENTRYPOINT ["/usr/local/bin/remora"]
CMD ["run", "-c", "/etc/remora/remora.yaml"]
