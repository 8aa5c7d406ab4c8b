#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the peers the
# tests talk to (idempotently), builds everything once, then runs the tests.
# End-to-end tests start the real `lumen` binary built here.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${LUMEN_TEST_PYTHON:-python3}
if ! "$python" -c 'import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http, duckdb' 2>/dev/null; then
  echo "installing test peers: OpenTelemetry Python SDK + OTLP exporters, DuckDB" >&2
  "$python" -m pip install --quiet --disable-pip-version-check \
    opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http duckdb
fi

cargo build --workspace --all-targets
cargo test --workspace --all-targets "$@"
